"""Per-tilt metadata: IMOD ``.tlt`` angle lists, SerialEM ``.mdoc``, dose bookkeeping."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

from ..errors import FormatError, InvalidInputError, NotFoundError

__all__ = ["read_tlt", "Mdoc", "read_mdoc", "dose_symmetric_order", "pre_exposure", "exposure_from_pre_exposure", "parse_tilt_range"]


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


@dataclass
class Mdoc:
    global_values: dict[str, str]
    sections: list[dict[str, str]] = field(default_factory=list)  # one per [ZValue = n], in z order

    def column(self, key: str, path: str) -> list[str]:
        out = []
        for i, sec in enumerate(self.sections):
            if key not in sec:
                raise FormatError("mdoc section lacks a key", path=path, field=f"[ZValue = {i}] {key}")
            out.append(sec[key])
        return out

    def floats(self, key: str, path: str) -> list[float]:
        out = []
        for i, v in enumerate(self.column(key, path)):
            try:
                out.append(float(v.split()[0]))
            except (ValueError, IndexError):
                raise FormatError("mdoc value is not a number", path=path, field=f"[ZValue = {i}] {key}", found=v) from None
        return out

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
        if not s or (s.startswith("[") and not _SECTION.match(s)):
            continue  # blank lines and [T = ...] titles
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
        raise InvalidInputError("tilt range must be MIN:MAX:STEP in degrees", found=repr(text)) from None
    if step <= 0 or hi < lo:
        raise InvalidInputError("tilt range must have MIN <= MAX and STEP > 0", found=repr(text))
    n = int(round((hi - lo) / step)) + 1
    return [round(lo + i * step, 6) for i in range(n)]
