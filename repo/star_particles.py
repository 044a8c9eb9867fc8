"""RELION particle tables → positions and orientations in our frame (RELION 5's own conventions).

Shared by the species importer and the RELION project importer:

* ``rlnCenteredCoordinate*Angst`` are Å from ``size/2`` (a float) but RELION's
  projection turns about ``⌊size/2⌋`` (``Tomogram::setProjectionMatrix``): along an
  odd axis the particle sits half a pixel from where its centred coordinate
  says. We store where RELION projects it. Pixel ``rlnCoordinate*`` are taken
  about ``⌊size/2⌋`` for the same reason.
* Orientation ``A = A_subtomogram · A_particle`` (``ParticleSet::getMatrix3x3``);
  position ``−= A_subtomogram · origin`` (origins are in the subtomogram frame).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import FormatError, InvalidInputError
from .physical import check, same_pixel
from .formats.star import numeric_column, read_star_blocks, require_table, string_column

__all__ = ["StarParticles", "read_star_particles", "euler_matrix", "matrix_euler"]



def euler_matrix(angles_deg: np.ndarray) -> np.ndarray:
    """RELION's ``Euler_angles2matrix``: ``(..., 3)`` (rot, tilt, psi) → ``(..., 3, 3)``."""
    a, b, g = np.deg2rad(np.moveaxis(np.asarray(angles_deg, float), -1, 0))
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    rows = [[cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb],
            [-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb],
            [sc, ss, cb]]
    return np.moveaxis(np.array(rows), (0, 1), (-2, -1))


def matrix_euler(m: np.ndarray) -> np.ndarray:
    """Inverse of :func:`euler_matrix` (tilt in [0, 180]); ``(..., 3, 3)`` → ``(..., 3)`` degrees."""
    m = np.asarray(m, float)
    sin_tilt = np.hypot(m[..., 2, 0], m[..., 2, 1])
    tilt = np.arctan2(sin_tilt, m[..., 2, 2])
    gimbal = sin_tilt < 1e-9
    rot = np.where(gimbal, 0.0, np.arctan2(m[..., 2, 1], m[..., 2, 0]))
    psi = np.where(gimbal, np.arctan2(m[..., 0, 1], m[..., 0, 0] * np.sign(m[..., 2, 2])),
                   np.arctan2(m[..., 1, 2], -m[..., 0, 2]))
    return np.rad2deg(np.stack([rot, tilt, psi], -1))



@dataclass(frozen=True)
class StarParticles:
    tomo_names: list[str]
    positions: np.ndarray  # (n, 3) Å from the rotation centre, as RELION projects them
    angles: np.ndarray  # (n, 3) absolute rot, tilt, psi
    half_sets: np.ndarray
    scores: np.ndarray
    particle_names: list[str] | None = None  # rlnTomoParticleName, which names a trajectory in motion.star


def read_star_particles(path: Path, lookup: Callable[[str], dict | None]) -> StarParticles:
    """A RELION particle table in our frame.

    ``lookup(rlnTomoName)`` gives ``{"pixel": Å, "size_px": [x, y, z]}`` of the tilt series a
    particle sits in, or None when there is no such tilt series (an error naming the row); a
    lookup that finds the name ambiguous raises, and the error names the row too.
    """
    blocks = read_star_blocks(path)
    block, table = require_table(blocks, path, ("particles", ""))
    if len(table) == 0:
        raise FormatError("particle table is empty", path=str(path), field=f"data_{block}")
    names = string_column(table, "rlnTomoName", path, block)
    centred = all(f"rlnCenteredCoordinate{a}Angst" in table for a in "XYZ")
    if not centred and not all(f"rlnCoordinate{a}" in table for a in "XYZ"):  # before the names: the real fault
        raise FormatError("missing coordinate columns", path=str(path), field=f"data_{block}",
                          expected="_rlnCenteredCoordinateX/Y/ZAngst (or _rlnCoordinateX/Y/Z in pixels)",
                          found=sorted(table.columns)[:12])
    tomograms: dict[str, dict] = {}
    for row, name in enumerate(names, 1):
        if name not in tomograms:
            try:
                found = lookup(name)
            except InvalidInputError as exc:  # e.g. an item name held by two data sources
                raise InvalidInputError(exc.message, path=str(path), field=f"data_{block}/_rlnTomoName row {row}",
                                        expected=exc.expected, found=exc.found,
                                        hint="name it as source/item in _rlnTomoName") from None
            if found is None:
                raise InvalidInputError("particle refers to an unknown tilt series", path=str(path),
                                        field=f"data_{block}/_rlnTomoName row {row}", found=name)
            tomograms[name] = found
    if "optics" in blocks and isinstance(blocks["optics"], pd.DataFrame) \
            and "rlnTomoTiltSeriesPixelSize" in blocks["optics"]:
        optics = blocks["optics"]
        groups = dict(zip(numeric_column(optics, "rlnOpticsGroup", path, "optics").astype(int),
                          numeric_column(optics, "rlnTomoTiltSeriesPixelSize", path, "optics",
                                         quantity="pixel_size_angstrom")))
        og = (numeric_column(table, "rlnOpticsGroup", path, block).astype(int) if "rlnOpticsGroup" in table
              else np.full(len(table), next(iter(groups))))
        for row, (name, g) in enumerate(zip(names, og), 1):
            if g not in groups:
                raise InvalidInputError("unknown optics group", path=str(path),
                                        field=f"data_{block}/_rlnOpticsGroup row {row}", found=int(g))
            if not same_pixel(groups[g], tomograms[name]["pixel"]):
                raise InvalidInputError("pixel sizes disagree", path=str(path),
                                        field=f"data_optics/_rlnTomoTiltSeriesPixelSize (group {g})",
                                        expected=f"{tomograms[name]['pixel']} Å (tilt series {name})",
                                        found=groups[g])
    pixel = np.array([tomograms[n]["pixel"] for n in names])
    size = np.array([tomograms[n]["size_px"] for n in names], dtype=np.float64)
    if centred:
        columns = [f"rlnCenteredCoordinate{a}Angst" for a in "XYZ"]
        pos = np.stack([numeric_column(table, c, path, block) for c in columns], 1)
        pos = pos + (size / 2 - np.floor(size / 2)) * pixel[:, None]
    else:
        columns = [f"rlnCoordinate{a}" for a in "XYZ"]
        px = np.stack([numeric_column(table, c, path, block) for c in columns], 1)
        pos = (px - np.floor(size / 2)) * pixel[:, None]
    for k, c in enumerate(columns):
        check("coordinate_angstrom", pos[:, k], path=str(path), field=f"data_{block}/_{c} (as Å)", index_label="row")
    angle_cols = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
    angles = (np.stack([numeric_column(table, c, path, block, quantity="angle_deg") for c in angle_cols], 1)
              if any(c in table for c in angle_cols) else np.zeros((len(table), 3)))  # picks: no angles yet
    sub_cols = ("rlnTomoSubtomogramRot", "rlnTomoSubtomogramTilt", "rlnTomoSubtomogramPsi")
    a_sub = None
    if any(c in table for c in sub_cols):
        a_sub = euler_matrix(np.stack([numeric_column(table, c, path, block, quantity="angle_deg") for c in sub_cols], 1))
        angles = matrix_euler(a_sub @ euler_matrix(angles))
    if all(f"rlnOrigin{a}Angst" in table for a in "XYZ"):
        origin = np.stack([numeric_column(table, f"rlnOrigin{a}Angst", path, block, quantity="shift_angstrom")
                           for a in "XYZ"], 1)
        pos = pos - (origin if a_sub is None else np.einsum("nij,nj->ni", a_sub, origin))
    if "rlnRandomSubset" in table:
        halves = numeric_column(table, "rlnRandomSubset", path, block)
        bad = ~np.isin(halves, (1, 2))
        if bad.any():
            row = int(np.flatnonzero(bad)[0]) + 1
            raise InvalidInputError("half-set must be 1 or 2", path=str(path),
                                    field=f"data_{block}/_rlnRandomSubset row {row}", found=halves[row - 1])
        halves = halves.astype(np.uint8)
    else:
        halves = (np.arange(len(table)) % 2 + 1).astype(np.uint8)
    scores = (numeric_column(table, "rlnMaxValueProbDistribution", path, block)
              if "rlnMaxValueProbDistribution" in table else np.full(len(table), np.nan)).astype(np.float32)
    particle_names = string_column(table, "rlnTomoParticleName", path, block) if "rlnTomoParticleName" in table \
        else None
    return StarParticles(names, pos, angles, halves, scores, particle_names)
