"""Warp / WarpTools tilt-series XML: reading it, and Warp's tilt-series model expressed in ours.

Warp (``TiltSeries.GetPositionInAllTilts``; warpylib reproduces it) maps a
tomogram point ``p`` (Å, corner origin) into tilt ``i`` as

    c = p − V/2 + volume_warp(p/V, dose_i)
    q = E(0, θ_i + levelY, −axis_i) · Rx(levelX) · c  + (offsetX_i, offsetY_i) + I/2
    image = q_xy − movement(q_xy / I, i/(n−1)),   defocus = ctf_grid(i) + 1e-4 q_z  (µm)

with ``E`` RELION's Euler matrix, so the rotation is
``Rz(axis_i) Ry(−(θ_i + levelY)) Rx(levelX)``: ours with θ = −Angles,
ωx = levelX, ωy = −levelY, ωz = axis_i − axis_0, shifts = the axis offsets
and the image warp = −movement. Warp's grids are natural cubic
*interpolating* splines (einspline): the same curves as our B-spline grids
once the node values are turned into control points (``interpolating_to_bspline``).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import FormatError, InvalidInputError, NotFoundError
from .formats.tilts import exposure_from_pre_exposure

__all__ = ["WarpTiltSeries", "read_warp_xml", "interpolating_to_bspline", "warp_model"]


@dataclass(frozen=True)
class WarpTiltSeries:
    path: Path
    angles: np.ndarray
    dose: np.ndarray  # accumulated exposure before each tilt, e-/Å²
    use_tilt: np.ndarray
    axis_angles: np.ndarray
    axis_offsets: np.ndarray  # (n, 2) Å
    are_angles_inverted: bool
    level_angles: tuple[float, float]  # x, y
    volume_angstrom: tuple[float, float, float] | None
    image_angstrom: tuple[float, float] | None
    ctf: dict[str, str]
    grids: dict[str, np.ndarray]  # name → values [w][z][y][x] (4-D) or [z][y][x]
    text: str  # the whole file, kept verbatim


def _floats(root: ET.Element, tag: str, path: Path, n: int | None = None) -> np.ndarray:
    el = root.find(tag)
    if el is None or el.text is None:
        raise FormatError("missing element", path=str(path), field=f"<{tag}>")
    try:
        values = np.array([float(v) for v in el.text.split()])
    except ValueError as exc:
        raise FormatError(f"not a number ({exc})", path=str(path), field=f"<{tag}>") from None
    if n is not None and len(values) != n:
        raise FormatError("one value per tilt expected", path=str(path), field=f"<{tag}>", expected=n,
                          found=len(values))
    if not np.isfinite(values).all():
        raise InvalidInputError("NaN or infinite value", path=str(path), field=f"<{tag}>")
    return values


def _vector(root: ET.Element, name: str, path: Path, k: int) -> tuple[float, ...] | None:
    if name not in root.attrib:
        return None  # older files: Warp derives it from the stack and its settings
    try:
        values = tuple(float(v) for v in root.attrib[name].split(","))
    except ValueError:
        raise FormatError("not a list of numbers", path=str(path), field=f"TiltSeries@{name}",
                          found=root.attrib[name]) from None
    if len(values) != k:
        raise FormatError(f"{k} values expected", path=str(path), field=f"TiltSeries@{name}", found=len(values))
    return values


def _grid(el: ET.Element, path: Path) -> np.ndarray:
    dims = [int(el.attrib.get(k, 1)) for k in ("Duration", "Depth", "Height", "Width")]
    four = "Duration" in el.attrib
    values = np.zeros(dims)
    for node in el:
        try:
            w, z, y, x = (int(node.attrib.get(k, 0)) for k in ("W", "Z", "Y", "X"))
            values[w, z, y, x] = float(node.attrib["Value"])
        except (KeyError, ValueError, IndexError):
            raise FormatError("bad grid node", path=str(path), field=f"<{el.tag}>", found=node.attrib) from None
    return values if four else values[0]


def read_warp_xml(path: str | Path) -> WarpTiltSeries:
    path = Path(path)
    if not path.is_file():
        raise NotFoundError("file not found", path=str(path))
    text = path.read_text(encoding="utf-8-sig")
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise FormatError(f"not well-formed XML ({exc})", path=str(path)) from None
    if root.tag != "TiltSeries":
        raise FormatError("not a Warp tilt-series XML", path=str(path), expected="<TiltSeries>", found=f"<{root.tag}>")
    angles = _floats(root, "Angles", path)
    n = len(angles)
    use = root.find("UseTilt")
    ctf = root.find("CTF")
    return WarpTiltSeries(
        path=path, angles=angles, dose=_floats(root, "Dose", path, n),
        use_tilt=np.array([t.strip() == "True" for t in use.text.split()]) if use is not None else np.ones(n, bool),
        axis_angles=_floats(root, "AxisAngle", path, n),
        axis_offsets=np.stack([_floats(root, "AxisOffsetX", path, n), _floats(root, "AxisOffsetY", path, n)], 1),
        are_angles_inverted=root.attrib.get("AreAnglesInverted", "False") == "True",
        level_angles=(float(root.attrib.get("LevelAngleX", 0)), float(root.attrib.get("LevelAngleY", 0))),
        volume_angstrom=_vector(root, "VolumeDimensionsAngstrom", path, 3),
        image_angstrom=_vector(root, "ImageDimensionsAngstrom", path, 2),
        ctf={p.attrib["Name"]: p.attrib["Value"] for p in (ctf if ctf is not None else [])},
        grids={el.tag: _grid(el, path) for el in root if el.tag.startswith("Grid")},
        text=text)


def interpolating_to_bspline(values: np.ndarray) -> np.ndarray:
    """Node values of a natural cubic interpolating spline grid → our B-spline control points (any axes).

    Along each axis with ``m > 1`` nodes, control points ``c`` solve
    ``(c[j−1] + 4 c[j] + c[j+1]) / 6 = f[j]`` with ``c[−1] = 2c[0] − c[1]`` (our
    linear end extension, which is exactly the natural end condition), i.e.
    ``c[0] = f[0]``, ``c[m−1] = f[m−1]``.
    """
    out = np.asarray(values, dtype=np.float64)
    for axis, m in enumerate(out.shape):
        if m < 3:
            continue
        t = np.zeros((m, m))
        t[0, 0] = t[-1, -1] = 1.0
        for j in range(1, m - 1):
            t[j, j - 1:j + 2] = (1 / 6, 4 / 6, 1 / 6)
        moved = np.moveaxis(out, axis, 0)
        out = np.moveaxis(np.linalg.solve(t, moved.reshape(m, -1)).reshape(moved.shape), 0, axis)
    return out


def warp_model(ts: WarpTiltSeries, pixel_size_angstrom: float) -> dict:
    """Our item model (numpy) for a Warp tilt series: angles, corrections, shifts, warps, defocus, exposure."""
    if ts.are_angles_inverted:
        raise InvalidInputError("AreAnglesInverted=True is not supported yet", path=str(ts.path),
                                field="TiltSeries@AreAnglesInverted",
                                hint="Warp then computes defocus from a mirrored geometry; see docs/conventions.md")
    for name, value in (("VolumeDimensionsAngstrom", ts.volume_angstrom), ("ImageDimensionsAngstrom", ts.image_angstrom)):
        if value is None:
            raise FormatError("missing attribute", path=str(ts.path), field=f"TiltSeries@{name}",
                              hint="older Warp files leave it to the stack and the .settings file")
    n = len(ts.angles)
    lx, ly = ts.level_angles
    g = ts.grids
    for name in ("GridCTF", "GridCTFDefocusDelta", "GridCTFDefocusAngle"):
        if name in g and g[name].shape[1:] != (1, 1):
            raise InvalidInputError("spatially varying CTF grids are not supported yet", path=str(ts.path),
                                    field=f"<{name}>", found=g[name].shape)
    warp = [g.get(f"GridVolumeWarp{a}") for a in "XYZ"]
    volume_warp = None
    if all(w is not None for w in warp) and any(np.any(w != 0) for w in warp):
        if warp[0].shape[0] > 1:
            raise InvalidInputError("time-resolved volume warps are not supported yet", path=str(ts.path),
                                    field="<GridVolumeWarpX> Duration", found=warp[0].shape[0])
        volume_warp = np.stack([interpolating_to_bspline(w) for w in warp])  # (3, w, z, y, x)
    image_warp = None
    if "GridMovementX" in g and (np.any(g["GridMovementX"] != 0) or np.any(g["GridMovementY"] != 0)):
        image_warp = -np.stack([interpolating_to_bspline(g["GridMovementX"]),
                                interpolating_to_bspline(g["GridMovementY"])])  # (2, t, y, x)

    def per_tilt(name: str, default: float) -> np.ndarray:
        if name not in g:
            return np.full(n, default)
        v = g[name][:, 0, 0]
        if len(v) == n:
            return v.astype(np.float64)
        if len(v) == 1:
            return np.full(n, float(v[0]))
        raise InvalidInputError("per-tilt grid with a depth other than the tilt count", path=str(ts.path),
                                field=f"<{name}>", expected=n, found=len(v))
    defocus = per_tilt("GridCTF", float(ts.ctf.get("Defocus", 0))) * 1e4
    delta = per_tilt("GridCTFDefocusDelta", float(ts.ctf.get("DefocusDelta", 0))) * 1e4
    if n < 2:
        raise InvalidInputError("a tilt series needs at least two tilts", path=str(ts.path), field="<Angles>")
    axis0 = float(ts.axis_angles[0])
    return {
        "tilt_angles_deg": -ts.angles, "tilt_axis_angle_deg": axis0,
        "angle_corrections_deg": np.stack([np.full(n, lx), np.full(n, -ly), ts.axis_angles - axis0], 1),
        "shifts_angstrom": ts.axis_offsets.copy(), "image_warp": image_warp, "volume_warp": volume_warp,
        "defocus_u_angstrom": defocus + delta, "defocus_v_angstrom": defocus - delta,
        "defocus_angle_deg": per_tilt("GridCTFDefocusAngle", float(ts.ctf.get("DefocusAngle", 0))),
        "pre_exposure": ts.dose.astype(np.float64), "exposure": exposure_from_pre_exposure(ts.dose),
        "image_size_px": tuple(int(round(v / pixel_size_angstrom)) for v in ts.image_angstrom[::-1]),
        "tomogram_size_px": [int(round(v / pixel_size_angstrom)) for v in ts.volume_angstrom],
        "voltage_kv": float(ts.ctf.get("Voltage", 300)), "spherical_aberration_mm": float(ts.ctf.get("Cs", 2.7)),
        "amplitude_contrast": float(ts.ctf.get("Amplitude", 0.07)),
    }
