"""What a physically possible value is, written once for every reader and record.

A reader that turns a file or an option into a number calls :func:`check`
with the quantity it read and where it came from; records check themselves
with the same limits, so a path that forgets still cannot commit an absurd
value. The bounds are deliberately wide (they catch corruption, unit
mix-ups and typos, not unusual experiments); docs/format.md lists them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import numpy as np

from .errors import InvalidInputError

__all__ = ["LIMITS", "COUNTS", "check", "check_count", "check_item_model", "validate_symmetry", "same_pixel"]

# name → (low, high, whether low itself is allowed, unit): every bound is finite.
LIMITS: dict[str, tuple[float, float, bool, str]] = {
    "pixel_size_angstrom": (0.01, 1000.0, False, "Å"),
    "voltage_kv": (10.0, 3000.0, True, "kV"),
    "spherical_aberration_mm": (0.0, 100.0, True, "mm"),
    "amplitude_contrast": (0.0, 1.0, True, ""),
    "defocus_angstrom": (0.0, 1.0e6, False, "Å"),  # > 0 (underfocus) up to 100 µm
    "astigmatism_angstrom": (-1.0e5, 1.0e5, True, "Å"),  # U − V
    "angle_deg": (-3600.0, 3600.0, True, "°"),  # axis, astigmatism, Euler angles: any turn, but finite
    "tilt_angle_deg": (-90.0, 90.0, True, "°"),
    "angle_correction_deg": (-90.0, 90.0, True, "°"),
    "exposure_e_per_angstrom2": (0.0, 1000.0, True, "e⁻/Å²"),  # per tilt
    "pre_exposure_e_per_angstrom2": (0.0, 1.0e5, True, "e⁻/Å²"),
    "shift_angstrom": (-1.0e6, 1.0e6, True, "Å"),  # 100 µm: far beyond any camera
    "coordinate_angstrom": (-1.0e7, 1.0e7, True, "Å"),  # 1 mm
    "diameter_angstrom": (0.0, 1.0e5, False, "Å"),  # > 0, up to 10 µm
    "phase_shift_deg": (-3600.0, 3600.0, True, "°"),
    "bfactor": (-1.0e5, 1.0e5, True, "Å²"),
}

# counts and sizes: (low, high)
COUNTS: dict[str, tuple[int, int]] = {
    "tilts": (2, 10_000),
    "image_size_px": (1, 1 << 20),
    "tomogram_size_px": (1, 1 << 20),
    "group_size": (1, 10_000),
    "symmetry_order": (1, 1000),
    "temporal_samples": (1, 1000),
}


def _expected(quantity: str) -> str:
    lo, hi, inclusive, unit = LIMITS[quantity]
    return f"a finite {quantity} {'>=' if inclusive else '>'} {lo:g} and <= {hi:g}{(' ' + unit) if unit else ''}"


def check(quantity: str, values: float | Iterable[float] | np.ndarray, *, path: str | None = None,
          field: str | None = None, index_label: str = "index") -> None:
    """Refuse NaN, infinity and values outside the quantity's physical range, naming the first bad one.

    ``field`` names where the values came from (an option, a STAR column, an
    XML element); with several values the message adds the offending one's
    position as ``index_label`` (e.g. ``row`` or ``tilt``), counted from 1.
    """
    lo, hi, inclusive, _ = LIMITS[quantity]
    scalar = np.ndim(values) == 0
    try:
        a = np.asarray(values)
        if a.dtype.kind not in "iuf":  # booleans and strings are not quantities, even where numpy would cast them
            raise TypeError
        a = a.astype(np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise InvalidInputError("expected a number", path=path, field=field, expected=_expected(quantity),
                                found=repr(values)) from None
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(a) | (a > hi) | ((a < lo) if inclusive else (a <= lo))
    if not bad.any():
        return
    i = int(np.flatnonzero(bad)[0])
    where = field if scalar or a.size == 1 else f"{field or quantity} {index_label} {i + 1}"
    raise InvalidInputError("value is not physically possible", path=path, field=where,
                            expected=_expected(quantity), found=_show(a[i]))


def check_count(quantity: str, value: float, *, path: str | None = None, field: str | None = None) -> int:
    """An integer count or size within its bounds (tilts, pixels, orders), returned as ``int``."""
    lo, hi = COUNTS[quantity]
    ok = isinstance(value, (int, np.integer)) or (isinstance(value, float) and math.isfinite(value)
                                                    and value == int(value))
    if not ok or not lo <= int(value) <= hi:
        raise InvalidInputError("count out of range", path=path, field=field or quantity,
                                expected=f"an integer {lo}..{hi}", found=_show(value))
    return int(value)


def same_pixel(a: float, b: float) -> bool:
    """Two pixel sizes that differ by at most 0.1 % (headers round them): the same pixel."""
    return abs(a - b) <= 1e-3 * max(abs(a), abs(b))


def _show(v) -> str:
    return repr(float(v)) if isinstance(v, (float, np.floating)) else repr(v)


_SYMMETRY = re.compile(r"(?:([CD])([0-9]+)|T|O|I[1-4]?)")


def validate_symmetry(symmetry: str, *, path: str | None = None, field: str = "symmetry") -> str:
    """A point group as RELION names it (Cn, Dn, T, O, I, I1–I4), upper-cased, with a sane order."""
    m = _SYMMETRY.fullmatch(symmetry.upper()) if isinstance(symmetry, str) else None
    if m is None or (m.group(2) is not None and not 1 <= int(m.group(2)) <= COUNTS["symmetry_order"][1]):
        raise InvalidInputError("unknown point-group symmetry", path=path, field=field,
                                expected=f"Cn or Dn (n = 1..{COUNTS['symmetry_order'][1]}), T, O or I (I1-I4)",
                                found=repr(symmetry))
    return symmetry.upper()


# the item model every importer builds (repo.warp.warp_model's keys): quantity of each array
_MODEL_QUANTITIES = {
    "tilt_angles_deg": "tilt_angle_deg", "tilt_axis_angle_deg": "angle_deg",
    "angle_corrections_deg": "angle_correction_deg", "shifts_angstrom": "shift_angstrom",
    "image_warp": "shift_angstrom", "volume_warp": "shift_angstrom",
    "orientation_corrections_deg": "angle_correction_deg", "defocus_u_angstrom": "defocus_angstrom",
    "defocus_v_angstrom": "defocus_angstrom", "defocus_angle_deg": "angle_deg",
    "pre_exposure": "pre_exposure_e_per_angstrom2", "exposure": "exposure_e_per_angstrom2",
    "voltage_kv": "voltage_kv", "spherical_aberration_mm": "spherical_aberration_mm",
    "amplitude_contrast": "amplitude_contrast", "phase_shift_deg": "phase_shift_deg",
}


def check_item_model(model: dict, *, path: str | None = None, fields: dict[str, str] | None = None) -> None:
    """Every number of an item model (tilts, shifts, warps, CTF, dose, sizes) within its physical range.

    ``fields`` names where each key came from in the file (e.g. ``<GridCTF>``),
    so the error points at the element or column a user can fix.
    """
    fields = fields or {}
    for key, quantity in _MODEL_QUANTITIES.items():
        if model.get(key) is not None:
            check(quantity, model[key], path=path, field=fields.get(key, key), index_label="value")
    u, v = np.asarray(model["defocus_u_angstrom"], float), np.asarray(model["defocus_v_angstrom"], float)
    check("astigmatism_angstrom", u - v, path=path, field=fields.get("defocus_u_angstrom", "U - V"),
          index_label="value")
    for key in ("image_size_px", "tomogram_size_px"):
        for i, value in enumerate(model[key]):
            check_count(key, value, path=path, field=f"{fields.get(key, key)} [{i}]")
