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
import pandas as pd

from .errors import FormatError, InvalidInputError, NotFoundError
from .formats.star import numeric_column, read_star_blocks, require_table, string_column
from .formats.tilts import exposure_from_pre_exposure
from .physical import check, check_item_model

__all__ = ["WarpTiltSeries", "read_warp_xml", "parse_warp_xml", "interpolating_to_bspline",
           "bspline_to_interpolating", "warp_model", "warp_xml_text", "rebuilt_warp_xml", "centre_shift", "Tomostar",
           "read_tomostar", "tomostar_table"]


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
    movie_paths: list[str]
    raw: bytes  # the whole file, kept verbatim
    magnification: tuple[float, float, float, float] | None = None  # MagnificationCorrection, a 2×2 matrix


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


def _vector(root: ET.Element, name: str, path: Path, k: int, *, lo: float = 0.0, hi: float = 1e9,
            what: str = "dimensions (Å)") -> tuple[float, ...] | None:
    if name not in root.attrib:
        return None  # older files: Warp derives it from the stack and its settings
    try:
        values = tuple(float(v) for v in root.attrib[name].split(","))
    except ValueError:
        raise FormatError("not a list of numbers", path=str(path), field=f"TiltSeries@{name}",
                          found=root.attrib[name]) from None
    if len(values) != k:
        raise FormatError(f"{k} values expected", path=str(path), field=f"TiltSeries@{name}", found=len(values))
    if not all(np.isfinite(v) and lo < v <= hi for v in values):
        raise InvalidInputError("value out of range", path=str(path), field=f"TiltSeries@{name}",
                                expected=f"{what} in ({lo:g}, {hi:g}]", found=values)
    return values


def _number(text: str | None, path: Path, field: str, kind: type = float):
    """One number from an attribute or element text; anything else is a FormatError naming it."""
    try:
        return kind(text)
    except (TypeError, ValueError):
        raise FormatError("not a number", path=str(path), field=field, found=repr(text)) from None


_MAX_GRID_NODES = 10_000_000  # Warp's largest grids (4-D volume warps) hold thousands of nodes


def _grid(el: ET.Element, path: Path) -> np.ndarray:
    field = f"<{el.tag}>"
    dims = [_number(el.attrib.get(k, "1"), path, f"{field} {k}", int) for k in ("Duration", "Depth", "Height", "Width")]
    if min(dims) < 1 or int(np.prod(dims, dtype=np.float64)) > _MAX_GRID_NODES:
        raise FormatError("grid size out of range", path=str(path), field=field,
                          expected=f"each dimension >= 1, at most {_MAX_GRID_NODES} nodes", found=dims)
    four = "Duration" in el.attrib
    values = np.zeros(dims)
    for node in el:
        index = tuple(_number(node.attrib.get(k, "0"), path, f"{field} Node {k}", int) for k in ("W", "Z", "Y", "X"))
        if not all(0 <= i < d for i, d in zip(index, dims)):
            raise FormatError("grid node outside the grid", path=str(path), field=f"{field} Node",
                              expected=f"W, Z, Y, X within {dims}", found=index)
        value = _number(node.attrib.get("Value"), path, f"{field} Node Value")
        if not np.isfinite(value):
            raise InvalidInputError("NaN or infinite value", path=str(path), field=f"{field} Node {index}")
        values[index] = value
    return values if four else values[0]


def _ctf_params(ctf: ET.Element | None, path: Path) -> dict[str, str]:
    out = {}
    for p in ctf if ctf is not None else []:
        if "Name" not in p.attrib or "Value" not in p.attrib:
            raise FormatError("CTF parameter without Name and Value", path=str(path), field="<CTF><Param>",
                              found=p.attrib)
        out[p.attrib["Name"]] = p.attrib["Value"]
    return out


def _use_tilt(el: ET.Element | None, n: int, path: Path) -> np.ndarray:
    if el is None:
        return np.ones(n, bool)
    words = (el.text or "").split()
    if len(words) != n or any(w not in ("True", "False") for w in words):
        raise FormatError("one True or False per tilt expected", path=str(path), field="<UseTilt>",
                          expected=n, found=" ".join(words[:5]) + (" …" if len(words) > 5 else ""))
    return np.array([w == "True" for w in words])


def read_warp_xml(path: str | Path) -> WarpTiltSeries:
    path = Path(path)
    if not path.is_file():
        raise NotFoundError("file not found", path=str(path))
    return parse_warp_xml(path.read_bytes(), path)


def parse_warp_xml(raw: bytes, path: str | Path) -> WarpTiltSeries:
    """A Warp XML from its bytes; ``path`` names it in errors."""
    path = Path(path)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise FormatError(f"not UTF-8 text ({exc.reason} at byte {exc.start})", path=str(path)) from None
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise FormatError(f"not well-formed XML ({exc})", path=str(path)) from None
    if root.tag != "TiltSeries":
        raise FormatError("not a Warp tilt-series XML", path=str(path), expected="<TiltSeries>", found=f"<{root.tag}>")
    angles = _floats(root, "Angles", path)
    n = len(angles)
    return WarpTiltSeries(
        path=path, angles=angles, dose=_floats(root, "Dose", path, n),
        use_tilt=_use_tilt(root.find("UseTilt"), n, path),
        axis_angles=_floats(root, "AxisAngle", path, n),
        axis_offsets=np.stack([_floats(root, "AxisOffsetX", path, n), _floats(root, "AxisOffsetY", path, n)], 1),
        are_angles_inverted=root.attrib.get("AreAnglesInverted", "False") == "True",
        level_angles=tuple(_number(root.attrib.get(f"LevelAngle{a}", "0"), path, f"TiltSeries@LevelAngle{a}")
                           for a in "XY"),
        volume_angstrom=_vector(root, "VolumeDimensionsAngstrom", path, 3),
        image_angstrom=_vector(root, "ImageDimensionsAngstrom", path, 2),
        ctf=_ctf_params(root.find("CTF"), path),
        grids={el.tag: _grid(el, path) for el in root if el.tag.startswith("Grid")},
        movie_paths=(root.findtext("MoviePath") or "").split(), raw=raw,
        magnification=_vector(root, "MagnificationCorrection", path, 4, lo=-2.0, hi=2.0,
                              what="magnification matrix entries"))


def _spline_matrix(m: int) -> np.ndarray:
    t = np.zeros((m, m))
    t[0, 0] = t[-1, -1] = 1.0
    for j in range(1, m - 1):
        t[j, j - 1:j + 2] = (1 / 6, 4 / 6, 1 / 6)
    return t


def _per_axis(values: np.ndarray, apply) -> np.ndarray:
    out = np.asarray(values, dtype=np.float64)
    for axis, m in enumerate(out.shape):
        if m < 3:
            continue  # one node: a constant; two: a straight line, in both representations
        moved = np.moveaxis(out, axis, 0)
        out = np.moveaxis(apply(_spline_matrix(m), moved.reshape(m, -1)).reshape(moved.shape), 0, axis)
    return out


def interpolating_to_bspline(values: np.ndarray) -> np.ndarray:
    """Node values of a natural cubic interpolating spline grid → our B-spline control points (any axes).

    Along each axis with ``m > 1`` nodes, control points ``c`` solve
    ``(c[j−1] + 4 c[j] + c[j+1]) / 6 = f[j]`` with ``c[−1] = 2c[0] − c[1]`` (our
    linear end extension, which is exactly the natural end condition), i.e.
    ``c[0] = f[0]``, ``c[m−1] = f[m−1]``.
    """
    return _per_axis(values, np.linalg.solve)


def bspline_to_interpolating(values: np.ndarray) -> np.ndarray:
    """Our B-spline control points → the node values of the same curve (the inverse of the above)."""
    return _per_axis(values, np.matmul)


def centre_shift(size_px: tuple[int, int], pixel: float) -> np.ndarray:
    """Warp's image centre is ``size/2`` px, ours the pixel ``size // 2``: the step between them (x, y Å)."""
    h, w = size_px
    return np.array([(w / 2 - w // 2) * pixel, (h / 2 - h // 2) * pixel])


def _anisotropy(matrix: tuple[float, float, float, float] | None) -> list[float] | None:
    """Warp's MagnificationCorrection as [major scale, minor scale, angle of the major axis (°)], or None for
    the identity (the engine does not model it: refine refuses such items unless told to ignore it)."""
    if matrix is None:
        return None
    m = np.array(matrix, dtype=np.float64).reshape(2, 2)
    if np.abs(m - np.eye(2)).max() < 1e-7:
        return None
    values, vectors = np.linalg.eigh((m + m.T) / 2)  # Warp's is symmetric: a stretch along two axes
    angle = float(np.degrees(np.arctan2(vectors[1, 1], vectors[0, 1])))
    return [float(values[1]), float(values[0]), (angle + 90.0) % 180.0 - 90.0]  # an axis: −90° ≤ angle < 90°


# where each of our model's values comes from in a Warp XML (for errors a user can act on)
XML_FIELDS = {
    "tilt_angles_deg": "<Angles>", "tilt_axis_angle_deg": "<AxisAngle>",
    "angle_corrections_deg": "<AxisAngle>/LevelAngleX/LevelAngleY", "shifts_angstrom": "<AxisOffsetX/Y>",
    "image_warp": "<GridMovementX/Y>", "volume_warp": "<GridVolumeWarpX/Y/Z>",
    "orientation_corrections_deg": "<GridAngleX/Y/Z>",
    "defocus_u_angstrom": "<GridCTF>/<GridCTFDefocusDelta> (or CTF Defocus/DefocusDelta)",
    "defocus_v_angstrom": "<GridCTF>/<GridCTFDefocusDelta> (or CTF Defocus/DefocusDelta)",
    "defocus_angle_deg": "<GridCTFDefocusAngle>", "pre_exposure": "<Dose>", "exposure": "<Dose>",
    "voltage_kv": "<CTF> Voltage", "spherical_aberration_mm": "<CTF> Cs", "amplitude_contrast": "<CTF> Amplitude",
    "image_size_px": "ImageDimensionsAngstrom / pixel size", "tomogram_size_px": "VolumeDimensionsAngstrom / pixel size",
}


@np.errstate(over="ignore", invalid="ignore")  # absurd values overflow to inf here and are refused by the checks
def warp_model(ts: WarpTiltSeries, pixel_size_angstrom: float, *, image_size_px: tuple[int, int] | None = None,
               tomogram_size_px: list[int] | None = None, defocus_um: float | None = None) -> dict:
    """Our item model (numpy) for a Warp tilt series, for the tilts it uses (``UseTilt``).

    A file whose CTF was never estimated (defocus 0 everywhere, as after
    Warp's IMOD import) takes ``defocus_um`` as every tilt's defocus.

    ``image_size_px`` (h, w) and ``tomogram_size_px`` default to the XML's
    ``ImageDimensionsAngstrom``/``VolumeDimensionsAngstrom`` at ``pixel_size_angstrom``.
    """
    px = pixel_size_angstrom
    check("pixel_size_angstrom", px, path=str(ts.path), field="pixel size")
    if image_size_px is None:
        if ts.image_angstrom is None:
            raise FormatError("missing attribute", path=str(ts.path), field="TiltSeries@ImageDimensionsAngstrom",
                              hint="older Warp files leave it to the stack: import with the stack")
        image_size_px = tuple(int(round(v / px)) for v in ts.image_angstrom[::-1])
    if tomogram_size_px is None:
        if ts.volume_angstrom is None:
            raise FormatError("missing attribute", path=str(ts.path), field="TiltSeries@VolumeDimensionsAngstrom",
                              hint="older Warp files leave it to the .settings file: give the tomogram size")
        tomogram_size_px = [int(round(v / px)) for v in ts.volume_angstrom]
    n = len(ts.angles)
    keep = np.flatnonzero(ts.use_tilt)
    if len(keep) < 2:
        raise InvalidInputError("a tilt series needs at least two tilts in use", path=str(ts.path), field="<UseTilt>",
                                found=len(keep))
    g = ts.grids

    def tilts_of(name: str, values: np.ndarray, axis: int) -> np.ndarray:
        """Only the tilts in use, along a grid's tilt axis (Depth n: one node per tilt)."""
        if len(keep) == n or values.shape[axis] == 1:
            return values
        if values.shape[axis] != n:
            raise InvalidInputError("grid with a tilt axis other than one node per tilt, and unused tilts",
                                    path=str(ts.path), field=f"<{name}> Depth", expected=f"1 or {n}",
                                    found=values.shape[axis])
        return np.take(values, keep, axis=axis)

    warp = [g.get(f"GridVolumeWarp{a}") for a in "XYZ"]
    volume_warp = None
    if all(w is not None for w in warp) and any(np.any(w != 0) for w in warp):
        if warp[0].shape[0] > 1:
            raise InvalidInputError("time-resolved volume warps are not supported yet", path=str(ts.path),
                                    field="<GridVolumeWarpX> Duration", found=warp[0].shape[0],
                                    hint="Warp's time axis is the dose normalised to its range, ours mid-exposure")
        volume_warp = np.stack([interpolating_to_bspline(w) for w in warp])  # (3, w, z, y, x)
    image_warp = None
    if "GridMovementX" in g and (np.any(g["GridMovementX"] != 0) or np.any(g["GridMovementY"] != 0)):
        image_warp = -np.stack([interpolating_to_bspline(tilts_of(f"GridMovement{a}", g[f"GridMovement{a}"], 0))
                                for a in "XY"])  # (2, t, y, x)

    def per_tilt(name: str, default: float) -> np.ndarray:
        """One value per tilt from a grid of depth n (or 1); grids varying across the image are refused."""
        if name not in g:
            return np.full(n, default)
        if g[name].shape[1:] != (1, 1):
            raise InvalidInputError("grids that vary across the image or volume are not supported yet",
                                    path=str(ts.path), field=f"<{name}>", expected="Width = Height = 1",
                                    found=g[name].shape)
        v = g[name][:, 0, 0].astype(np.float64)
        if len(v) == 1:
            return np.full(n, float(v[0]))
        if len(v) != n:
            raise InvalidInputError("per-tilt grid with a depth other than the tilt count", path=str(ts.path),
                                    field=f"<{name}>", expected=n, found=len(v))
        return v
    orientation = np.stack([per_tilt(f"GridAngle{a}", 0.0) for a in "XYZ"], 1)[keep]
    def param(name: str, default: float) -> float:
        return _number(ts.ctf.get(name, default), ts.path, f"<CTF> {name}")
    defocus = per_tilt("GridCTF", param("Defocus", 0)) * 1e4
    if not np.any(defocus):
        if defocus_um is None:
            raise InvalidInputError("the CTF was never estimated (defocus 0 in every tilt)", path=str(ts.path),
                                    field="<GridCTF>", hint="estimate it in Warp, or pass --defocus-um")
        defocus = np.full(n, float(defocus_um) * 1e4)
    # Warp's DefocusDelta is U − V (its CTF adds ½·delta·cos 2(φ − angle); its RELION writers write D ± delta/2)
    half_delta = per_tilt("GridCTFDefocusDelta", param("DefocusDelta", 0)) * 1e4 / 2
    lx, ly = ts.level_angles
    axis = ts.axis_angles[keep]
    phase = per_tilt("GridCTFPhase", param("PhaseShift", 0)) * 180.0  # Warp: fractions of π
    model = {
        "tilt_angles_deg": -ts.angles[keep], "tilt_axis_angle_deg": float(axis[0]),
        "angle_corrections_deg": np.stack([np.full(len(keep), lx), np.full(len(keep), -ly), axis - axis[0]], 1),
        "shifts_angstrom": ts.axis_offsets[keep] + centre_shift(image_size_px, px),
        "image_warp": image_warp, "volume_warp": volume_warp,
        "orientation_corrections_deg": orientation if np.any(orientation != 0) else None,
        "defocus_u_angstrom": (defocus + half_delta)[keep], "defocus_v_angstrom": (defocus - half_delta)[keep],
        "defocus_angle_deg": per_tilt("GridCTFDefocusAngle", param("DefocusAngle", 0))[keep],
        "pre_exposure": ts.dose[keep].astype(np.float64), "exposure": exposure_from_pre_exposure(ts.dose)[keep],
        "handedness": -1 if ts.are_angles_inverted else 1, "tilts": [int(i) for i in keep],
        "image_size_px": tuple(image_size_px), "tomogram_size_px": list(tomogram_size_px),
        "voltage_kv": param("Voltage", 300), "spherical_aberration_mm": param("Cs", 2.7),
        "amplitude_contrast": param("Amplitude", 0.07),
        "phase_shift_deg": phase[keep] if np.any(phase != 0) else None,
        "magnification_anisotropy": _anisotropy(ts.magnification),
    }
    check_item_model(model, path=str(ts.path), fields=XML_FIELDS)
    return model


# --------------------------------------------------------------------------- writing


def _lines(values) -> str:
    return "\n".join(repr(float(v)) for v in values)


def _grid_element(tag: str, nodes: np.ndarray, four: bool = False) -> ET.Element:
    """A Warp grid from node values ``[w][z][y][x]`` (4-D) or ``[z][y][x]``."""
    values = nodes if four else nodes[None]
    w, d, h, wd = values.shape
    attrs = {"Width": str(wd), "Height": str(h), "Depth": str(d)}
    attrs.update({"Duration": str(w)} if four else {"MarginX": "0", "MarginY": "0", "MarginZ": "0"})
    el = ET.Element(tag, attrs)
    for (t, z, y, x), v in np.ndenumerate(values):
        node = {"X": str(x), "Y": str(y), "Z": str(z), **({"W": str(t)} if four else {}), "Value": repr(float(v))}
        ET.SubElement(el, "Node", node)
    return el


def warp_xml_text(model: dict, pixel_size_angstrom: float, movie_paths: list[str]) -> tuple[str, list[str]]:
    """A Warp tilt-series XML for our model, and notes on what Warp's model cannot hold.

    The inverse of :func:`warp_model` for everything Warp's model has:
    per-tilt x-tilt corrections collapse to one ``LevelAngleX`` (their mean),
    per-tilt y-tilt corrections go into ``Angles``, and a time-resolved volume
    warp (our time axis is mid-exposure) is left out.
    """
    px = pixel_size_angstrom
    h, w = model["image_size_px"]
    n = len(model["tilt_angles_deg"])
    notes = []
    corr = np.asarray(model["angle_corrections_deg"], dtype=np.float64)
    level_x = float(corr[:, 0].mean())
    if np.ptp(corr[:, 0]) > 0:
        notes.append(f"per-tilt x-tilt corrections (spread {np.ptp(corr[:, 0]):.3g}°) written as their mean "
                     "LevelAngleX: Warp has one per tilt series")
    size = model["tomogram_size_px"]
    root = ET.Element("TiltSeries", {
        "AreAnglesInverted": str(model["handedness"] == -1), "LevelAngleX": repr(level_x), "LevelAngleY": "0.0",
        "ImageDimensionsAngstrom": f"{w * px!r}, {h * px!r}",
        "VolumeDimensionsAngstrom": ", ".join(repr(s * px) for s in size)})
    offsets = np.asarray(model["shifts_angstrom"]) - centre_shift((h, w), px)
    for tag, values in (("Angles", -(np.asarray(model["tilt_angles_deg"]) + corr[:, 1])),
                        ("Dose", model["pre_exposure"]), ("UseTilt", None),
                        ("AxisAngle", model["tilt_axis_angle_deg"] + corr[:, 2]),
                        ("AxisOffsetX", offsets[:, 0]), ("AxisOffsetY", offsets[:, 1])):
        ET.SubElement(root, tag).text = "\n".join(["True"] * n) if values is None else _lines(values)
    ET.SubElement(root, "MoviePath").text = "\n".join(movie_paths)
    du, dv = np.asarray(model["defocus_u_angstrom"]), np.asarray(model["defocus_v_angstrom"])
    mean, delta, angle = (du + dv) / 2e4, (du - dv) / 1e4, np.asarray(model["defocus_angle_deg"], dtype=np.float64)
    ctf = ET.SubElement(root, "CTF")
    for name, value in (("PixelSize", px), ("Voltage", model["voltage_kv"]), ("Cs", model["spherical_aberration_mm"]),
                        ("Amplitude", model["amplitude_contrast"]), ("Defocus", mean.mean()),
                        ("DefocusDelta", delta.mean()), ("DefocusAngle", angle.mean())):
        ET.SubElement(ctf, "Param", {"Name": name, "Value": repr(float(value))})
    for tag, values in (("GridCTF", mean), ("GridCTFDefocusDelta", delta), ("GridCTFDefocusAngle", angle)):
        root.append(_grid_element(tag, values.reshape(n, 1, 1)))
    if model.get("phase_shift_deg") is not None:
        phase = np.asarray(model["phase_shift_deg"], dtype=np.float64) / 180.0
        root.append(_grid_element("GridCTFPhase", phase.reshape(n, 1, 1)))
    if model.get("orientation_corrections_deg") is not None:
        corrections = np.asarray(model["orientation_corrections_deg"], dtype=np.float64)
        root.extend(_grid_element(f"GridAngle{a}", corrections[:, i].reshape(n, 1, 1)) for i, a in enumerate("XYZ"))
    if model["image_warp"] is not None:
        nodes = [bspline_to_interpolating(-np.asarray(c, dtype=np.float64)) for c in model["image_warp"]]
        root.extend([_grid_element("GridMovementX", nodes[0]), _grid_element("GridMovementY", nodes[1])])
    volume = model["volume_warp"]
    if volume is not None and np.asarray(volume).shape[1] > 1:
        notes.append("time-resolved volume warp left out: Warp's time axis is the dose range, ours mid-exposure")
    elif volume is not None:
        nodes = [bspline_to_interpolating(np.asarray(c, dtype=np.float64)) for c in volume]
        root.extend([_grid_element(f"GridVolumeWarp{a}", nodes[i], four=True) for i, a in enumerate("XYZ")])
    ET.indent(root, "\t")
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n", notes


# what warp_xml_text writes: in a rebuilt XML these come from the model, everything else from the original
_MODELLED = {"Angles", "Dose", "UseTilt", "AxisAngle", "AxisOffsetX", "AxisOffsetY", "GridCTF", "GridCTFDefocusDelta",
             "GridCTFDefocusAngle", "GridCTFPhase", "GridAngleX", "GridAngleY", "GridAngleZ", "GridMovementX",
             "GridMovementY", "GridVolumeWarpX", "GridVolumeWarpY", "GridVolumeWarpZ"}


def rebuilt_warp_xml(original: bytes, model: dict, pixel_size_angstrom: float) -> tuple[str, list[str]] | None:
    """``original`` (a Warp XML) with what our model holds written over it and every other element and
    attribute kept as Warp wrote it (movie paths, magnification correction, plane normal, power spectra,
    dose and location grids, the CTF's Zernike and other parameters, Warp's processing options).

    None when the original has tilts the item left out (``UseTilt = False``): their values cannot be
    rebuilt, so the caller writes a fresh XML instead.
    """
    root = ET.fromstring(original.decode("utf-8-sig"))
    angles = root.find("Angles")
    if angles is None or len((angles.text or "").split()) != len(model["tilt_angles_deg"]):
        return None
    text, notes = warp_xml_text(model, pixel_size_angstrom, [])
    fresh = ET.fromstring(text.split("\n", 1)[1])
    root.attrib.update(fresh.attrib)
    written = {el.tag for el in fresh}
    for el in list(root):  # modelled grids the model now holds as zero (absent) go, unless they were zero already
        if el.tag in _MODELLED and el.tag not in written and \
                any(float(node.attrib.get("Value", 0)) != 0 for node in el):
            root.remove(el)
    for el in fresh:
        if el.tag == "MoviePath":
            continue  # Warp's own names stay
        if el.tag == "CTF" and root.find("CTF") is not None:
            params = {p.attrib.get("Name"): p for p in root.find("CTF")}
            for p in el:
                if p.attrib["Name"] in params:
                    params[p.attrib["Name"]].set("Value", p.attrib["Value"])
                else:
                    root.find("CTF").append(p)
            continue
        old = root.find(el.tag)
        if old is None:
            root.append(el)
        else:
            el.tail = old.tail
            root[list(root).index(old)] = el
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n", notes


# --------------------------------------------------------------------------- tomostar


@dataclass(frozen=True)
class Tomostar:
    """A WarpTools ``.tomostar``: one row per tilt movie (pre-exposure in ``_wrpDose``)."""

    path: Path
    movies: list[str]
    angles: np.ndarray
    dose: np.ndarray
    axis_angles: np.ndarray | None
    axis_offsets: np.ndarray | None  # (n, 2) Å


def read_tomostar(path: str | Path) -> Tomostar:
    path = Path(path)
    blocks = read_star_blocks(path)
    block, table = require_table(blocks, path, ("",))
    n = len(table)
    if n < 2:
        raise InvalidInputError("a tilt series needs at least two tilts", path=str(path), field="rows", found=n)

    def optional(name: str) -> np.ndarray | None:
        return numeric_column(table, name, path, block) if name in table.columns else None
    offsets = [optional("wrpAxisOffsetX"), optional("wrpAxisOffsetY")]
    dose = numeric_column(table, "wrpDose", path, block)
    if (dose < 0).any():
        row = int(np.flatnonzero(dose < 0)[0]) + 1
        raise InvalidInputError("dose must be >= 0", path=str(path), field=f"data_{block}/_wrpDose row {row}")
    return Tomostar(path=path, movies=string_column(table, "wrpMovieName", path, block),
                    angles=numeric_column(table, "wrpAngleTilt", path, block), dose=dose,
                    axis_angles=optional("wrpAxisAngle"),
                    axis_offsets=None if offsets[0] is None or offsets[1] is None else np.stack(offsets, 1))


def tomostar_table(movies: list[str], xml: WarpTiltSeries) -> pd.DataFrame:
    """The tomostar rows for the tilts of a Warp XML."""
    return pd.DataFrame({"wrpMovieName": movies, "wrpAngleTilt": xml.angles, "wrpAxisAngle": xml.axis_angles,
                         "wrpAxisOffsetX": xml.axis_offsets[:, 0], "wrpAxisOffsetY": xml.axis_offsets[:, 1],
                         "wrpDose": xml.dose})
