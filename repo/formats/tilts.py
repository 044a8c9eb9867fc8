"""Per-tilt metadata: IMOD ``.tlt`` angle lists and ``.xf`` alignments, SerialEM ``.mdoc``, dose bookkeeping."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

from ..errors import FormatError, InvalidInputError, NotFoundError

__all__ = ["mdoc_number", "read_tlt", "read_xf", "xf_alignment", "Mdoc", "read_mdoc", "dose_symmetric_order",
           "pre_exposure", "exposure_from_pre_exposure", "parse_tilt_range"]


def _text(path: Path) -> str:
    if not path.is_file():
        raise NotFoundError("file not found", path=str(path))
    try:
        return path.read_text(encoding="utf-8", errors="strict")
    except UnicodeDecodeError as exc:
        raise FormatError(f"not a text file ({exc.reason} at byte {exc.start})", path=str(path)) from None


def read_tlt(path: str | Path) -> list[float]:
    """One tilt angle (degrees) per non-empty line, in stack order."""
    path = Path(path)
    angles = []
    for n, line in enumerate(_text(path).splitlines(), 1):
        s = line.strip()
        if not s:
            continue
        try:
            v = float(s.split()[0])
        except ValueError:
            raise FormatError("tilt angle is not a number", path=str(path), field=f"line {n}", found=repr(s)) from None
        if not math.isfinite(v) or abs(v) > 90:
            raise InvalidInputError("tilt angle out of range", path=str(path), field=f"line {n}",
                                    expected="-90..90 degrees", found=v)
        angles.append(v)
    if not angles:
        raise FormatError("no tilt angles in file", path=str(path))
    return angles


_MAX_XF_SHIFT_PX = 1e6
_MAX_TILTS = 10_000


def read_xf(path: str | Path) -> np.ndarray:
    """IMOD ``.xf``: one line ``A11 A12 A21 A22 DX DY`` per tilt → ``(n, 6)``.

    IMOD maps a raw image point to the aligned image as ``x' = A x + d``
    (pixels, about the image centre).
    """
    path = Path(path)
    rows = []
    for n, line in enumerate(_text(path).splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 6:
            raise FormatError("expected 6 numbers: A11 A12 A21 A22 DX DY", path=str(path), field=f"line {n}",
                              found=len(parts))
        try:
            row = [float(v) for v in parts]
        except ValueError:
            raise FormatError("not a number", path=str(path), field=f"line {n}", found=repr(line.strip())) from None
        if not all(math.isfinite(v) for v in row):
            raise InvalidInputError("NaN or infinite value", path=str(path), field=f"line {n}")
        if max(abs(v) for v in row[:4]) > 10 or max(abs(v) for v in row[4:]) > _MAX_XF_SHIFT_PX:
            raise InvalidInputError("transform out of range", path=str(path), field=f"line {n}",
                                    expected=f"|A| <= 10 and |DX|, |DY| <= {_MAX_XF_SHIFT_PX:g} px", found=row)
        rows.append(row)
    if not rows:
        raise FormatError("no transforms in file", path=str(path))
    return np.array(rows)


def xf_alignment(xf: np.ndarray, pixel_size_angstrom: float, path: str = ".xf") -> tuple[np.ndarray, np.ndarray]:
    """Per-tilt tilt-axis angles (degrees) and image shifts (Å) that an IMOD ``.xf`` stands for.

    The raw image holds the aligned projection turned back: ``raw = A⁻¹(aligned − d)``,
    so with ``A = R(φ)`` the tilt axis lies at ``−φ`` and the shift is ``−A⁻¹ d``.
    ``A`` must be a rotation; tiltalign's small magnification changes (≤ 2 %)
    are not modelled and are reported by the caller, larger ones or skew are refused.
    """
    a = xf[:, :4].reshape(-1, 2, 2)
    d = xf[:, 4:]
    scale = np.sqrt(np.abs(np.linalg.det(a)))
    rotation = a / scale[:, None, None]
    skew = np.abs(np.einsum("nij,nkj->nik", rotation, rotation) - np.eye(2)).max(axis=(1, 2))
    bad = np.flatnonzero((np.abs(scale - 1) > 0.02) | (skew > 0.02) | (np.linalg.det(a) <= 0))
    if len(bad):
        raise InvalidInputError("transform is not a rotation (magnification, stretch or mirror)", path=path,
                                field=f"line {bad[0] + 1}", expected="|scale - 1| <= 0.02 and no skew",
                                found=xf[bad[0], :4].tolist())
    phi = np.degrees(np.arctan2(rotation[:, 1, 0], rotation[:, 0, 0]))
    shifts = -np.einsum("nji,nj->ni", rotation, d) / scale[:, None] * pixel_size_angstrom
    return -phi, shifts


def mdoc_number(value: str, path: str, field: str) -> float:
    """The first number of an mdoc value (``PixelSpacing = 1.35``, ``TiltAngle = -59.99 …``); finite."""
    try:
        v = float(value.split()[0])
    except (ValueError, IndexError):
        raise FormatError("mdoc value is not a number", path=path, field=field, found=value) from None
    if not math.isfinite(v):
        raise InvalidInputError("NaN or infinite value", path=path, field=field, found=value)
    return v


@dataclass
class Mdoc:
    global_values: dict[str, str]
    sections: list[dict[str, str]] = field(default_factory=list)  # one per [ZValue = n], in z order
    titles: list[str] = field(default_factory=list)  # the [T = ...] lines, text inside the brackets

    def column(self, key: str, path: str) -> list[str]:
        out = []
        for i, sec in enumerate(self.sections):
            if key not in sec:
                raise FormatError("mdoc section lacks a key", path=path, field=f"[ZValue = {i}] {key}")
            out.append(sec[key])
        return out

    def floats(self, key: str, path: str) -> list[float]:
        return [mdoc_number(v, path, f"[ZValue = {i}] {key}") for i, v in enumerate(self.column(key, path))]

    def acquisition_order(self, path: str) -> list[int] | None:
        """Stack indices in the order they were acquired (from DateTime), if every section has one."""
        if not self.sections or not all("DateTime" in s for s in self.sections):
            return None
        times = []
        for i, s in enumerate(self.sections):
            text = " ".join(s["DateTime"].split())
            for fmt in ("%d-%b-%y %H:%M:%S", "%d-%b-%Y %H:%M:%S", "%Y-%b-%d %H:%M:%S"):
                try:
                    times.append(datetime.strptime(text, fmt))
                    break
                except ValueError:
                    continue
            else:
                raise FormatError("unrecognised DateTime", path=path, field=f"[ZValue = {i}] DateTime", found=text)
        return sorted(range(len(times)), key=lambda i: (times[i], i))


_SECTION = re.compile(r"^\[\s*ZValue\s*=\s*(\d+)\s*\]$")


def read_mdoc(path: str | Path) -> Mdoc:
    path = Path(path)
    mdoc = Mdoc(global_values={})
    current: dict[str, str] | None = None
    for n, line in enumerate(_text(path).splitlines(), 1):
        s = line.strip()
        if not s:
            continue
        if s.startswith("[") and not _SECTION.match(s):
            mdoc.titles.append(s.strip("[]").strip())
            continue
        m = _SECTION.match(s)
        if m:
            z = int(m.group(1))
            if z != len(mdoc.sections):
                raise FormatError("ZValue sections out of order", path=str(path), field=f"line {n}",
                                  expected=f"[ZValue = {len(mdoc.sections)}]", found=s)
            current = {}
            mdoc.sections.append(current)
            continue
        if "=" not in s:
            raise FormatError("expected 'Key = value'", path=str(path), field=f"line {n}", found=repr(s))
        key, value = (p.strip() for p in s.split("=", 1))
        (current if current is not None else mdoc.global_values)[key] = value
    if not mdoc.sections:
        raise FormatError("mdoc has no [ZValue = n] sections", path=str(path))
    return mdoc


def dose_symmetric_order(angles: list[float], group_size: int = 2) -> list[int]:
    """Stack indices in Hagen's dose-symmetric acquisition order.

    Starts at the tilt nearest 0°, then alternates sides in groups of
    ``group_size`` tilts, moving outwards.
    """
    a = np.asarray(angles, dtype=float)
    start = int(np.argmin(np.abs(a)))
    pos = sorted((i for i in range(len(a)) if i != start and a[i] >= a[start]), key=lambda i: a[i])
    neg = sorted((i for i in range(len(a)) if i != start and a[i] < a[start]), key=lambda i: -a[i])
    order, side = [start], 0
    while pos or neg:
        src = pos if (side == 0 and pos) or not neg else neg
        order.extend(src[:group_size])
        del src[:group_size]
        side ^= 1
    return order


def pre_exposure(order: list[int], exposure: list[float]) -> list[float]:
    """Accumulated dose before each tilt (stack order), given the acquisition order."""
    n = len(exposure)
    if sorted(order) != list(range(n)):
        raise InvalidInputError("acquisition order is not a permutation of the tilts", expected=f"0..{n - 1}", found=order)
    out, acc = [0.0] * n, 0.0
    for i in order:
        out[i] = acc
        acc += exposure[i]
    return out


def exposure_from_pre_exposure(pre: np.ndarray) -> np.ndarray:
    """Exposure of each tilt from the pre-exposures alone (RELION and Warp keep only those).

    Each tilt's exposure is the step to the next tilt in acquisition order; the
    last tilt gets the step before it. Needs at least two tilts.
    """
    pre = np.asarray(pre, dtype=np.float64)
    order = np.argsort(pre, kind="stable")
    steps = np.diff(pre[order])
    exposure = np.empty(len(pre))
    exposure[order[:-1]] = steps
    exposure[order[-1]] = steps[-1]
    return exposure


def parse_tilt_range(text: str) -> list[float]:
    """``"-60:60:3"`` → [-60, -57, ..., 60]."""
    try:
        lo, hi, step = (float(x) for x in text.split(":"))
    except ValueError:
        raise InvalidInputError("tilt range must be MIN:MAX:STEP in degrees", field="tilt angles",
                                found=repr(text)) from None
    if not (-90 <= lo <= hi <= 90 and step > 0):  # also false for NaN
        raise InvalidInputError("tilt range must have -90 <= MIN <= MAX <= 90 and STEP > 0", field="tilt angles",
                                found=repr(text))
    n = int(round((hi - lo) / step)) + 1
    if n > _MAX_TILTS:
        raise InvalidInputError("too many tilts", field="tilt angles", expected=f"at most {_MAX_TILTS}",
                                found=f"{n} from {text!r}")
    return [round(lo + i * step, 6) for i in range(n)]
