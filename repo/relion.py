"""RELION 5 tomography projects in and out: tomograms.star, per-tilt-series STAR, particles.star, optimisation sets.

The conventions are RELION 5's own (``Tomogram::setProjectionMatrix``,
``ParticleSet::getMatrix3x3``/``getParticleCoordDecenteredPixel``); docs/conventions.md
states each with a worked example.

* Tilt ``i`` projects a specimen point ``p`` (pixels, corner origin) to
  ``Rz(zrot) Ry(ytilt) Rx(xtilt) (p − ⌊size/2⌋) + ⌊image/2⌋ + shift/px``. Ours is
  ``Rz(axis + ωz) Ry(θ + ωy) Rx(ωx)`` with θ = ``rlnTomoNominalStageTiltAngle`` and
  axis = the first tilt's ``rlnTomoNominalTiltAxisAngle``, so ``ωx = xtilt``,
  ``ωy = ytilt − θ``, ``ωz = zrot − axis``; shifts are the same Å.
* Particles: see ``star_particles`` (centred Å about ``⌊size/2⌋``, subtomogram frames).
* Defocus ``rlnDefocusU/V`` (Å) is the tilt's, at the tomogram centre; a
  particle adds ``rlnTomoHand × height``.

Export inverts every conversion exactly (to the last bit: ``_exact_inverse`` for
angles, a rounding residual in ``rlnOrigin*Angst`` for positions), so
import → export → import reproduces the same objects.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import FormatError, InvalidInputError, NotFoundError
from .formats.mrc import read_mrc, read_mrc_header, write_mrc
from .formats.star import numeric_column, read_star_blocks, require_table, string_column, write_star
from .formats.tilts import exposure_from_pre_exposure
from .fsutil import staged_folder
from .hashing import ObjectId
from .physical import check, check_count, same_pixel
from .importers import default_tomogram_size, input_file, stable_particle_ids, validate_symmetry
from .ingest import (ItemModel, SpeciesDraft, SpeciesMaps, TiltSeriesDraft, add_items, items_in_source, put_species,
                     put_tilt_series, read_species_maps)
from .population import export_names, item_key, iter_items, with_species
from .records import (DeformationModel, ImagingModel, Operation, ParticleTable, Population, Species,
                      TiltSeries, validate_name)
from .repository import Repository, software_version
from .star_particles import StarParticles, read_star_particles
from .trajectory import MAX_TEMPORAL_SAMPLES, dose_times, trajectory_weights

__all__ = ["import_relion", "export_relion"]

Progress = Callable[[int], None] | None
_SECTION = re.compile(r"(\d+)@(.+)")


# --------------------------------------------------------------------------- small conversions


def _exact_inverse(target: np.ndarray, guess: np.ndarray, forward: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``x`` near ``guess`` with ``forward(x) == target`` bit for bit, where one exists within a few ulps.

    Import computes ``target = forward(x)`` in floating point; export writes ``x``.
    Searching the neighbouring floats makes the round trip exact, so re-importing
    an export gives identical hashes.
    """
    x = np.array(guess, dtype=np.float64, copy=True)
    target = np.asarray(target, dtype=np.float64)
    for _ in range(8):
        miss = forward(x) != target
        if not miss.any():
            break
        low = forward(x) < target
        x = np.where(miss, np.where(low, np.nextafter(x, np.inf), np.nextafter(x, -np.inf)), x)
    return x


def _centre_offset(size_px: list[int], pixel: float) -> np.ndarray:
    """Where RELION projects a centred coordinate minus the coordinate: half a pixel along odd axes."""
    size = np.asarray(size_px, dtype=np.float64)
    return (size / 2 - np.floor(size / 2)) * pixel


def _resolve(name: str, referrer: Path, field: str) -> Path:
    """A path from a STAR file: absolute, or relative to the project directory (an ancestor of the referrer)."""
    p = Path(name)
    if p.is_absolute():
        candidates = [p]
    else:
        candidates = [d / p for d in [referrer.parent, *referrer.resolve().parent.parents]] + [Path.cwd() / p]
    for c in candidates:
        if c.is_file():
            return c
    raise NotFoundError("file named in a STAR file not found", path=str(referrer), field=field, found=name,
                        hint="paths are looked up relative to the STAR file's folder and its parents "
                             "(RELION writes them relative to the project directory)")


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class _TiltSeriesIn:
    name: str
    star: Path
    pixel: float
    voltage: float
    cs: float
    amplitude_contrast: float
    hand: int
    size_px: list[int] | None
    images: list[tuple[Path, int]]  # per tilt: file and 0-based section
    nominal_tilt: np.ndarray
    axis: float
    corrections: np.ndarray  # (n, 3) about x, y, z
    shifts: np.ndarray  # (n, 2) Å
    defocus_u: np.ndarray
    defocus_v: np.ndarray
    defocus_angle: np.ndarray
    pre_exposure: np.ndarray
    exposure: np.ndarray


def _images(tomo: str, global_row: pd.Series, tilts: pd.DataFrame, tomograms: Path, ts_star: Path,
            block: str) -> list[tuple[Path, int]]:
    n = len(tilts)
    stack_name = global_row.get("rlnTomoTiltSeriesName")
    if isinstance(stack_name, str) and stack_name.strip():
        stack = _resolve(re.sub(r":mrcs?$", "", stack_name.strip()), tomograms,
                         f"data_global/_rlnTomoTiltSeriesName ({tomo})")
        return [(stack, i) for i in range(n)]
    names = string_column(tilts, "rlnMicrographName", ts_star, block)
    out = []
    for row, name in enumerate(names, 1):
        hit = _SECTION.fullmatch(name.strip())
        field = f"data_{block}/_rlnMicrographName row {row}"
        if hit:
            if int(hit.group(1)) < 1:
                raise FormatError("image sections count from 1", path=str(ts_star), field=field, found=name)
            out.append((_resolve(hit.group(2), ts_star, field), int(hit.group(1)) - 1))
        else:
            out.append((_resolve(name.strip(), ts_star, field), 0))
    return out


def _exposures(pre: np.ndarray, fractional: float | None, path: Path) -> np.ndarray:
    if fractional is not None:
        return np.full(len(pre), fractional)
    if len(pre) < 2:
        raise InvalidInputError("the dose per tilt is unknown", path=str(path),
                                field="data_global/_rlnTomoImportFractionalDose")
    return exposure_from_pre_exposure(pre)


def _read_tomograms(path: Path) -> list[_TiltSeriesIn]:
    blocks = read_star_blocks(path)
    block, table = require_table(blocks, path, ("global", ""))
    if len(table) == 0:
        raise FormatError("no tilt series listed", path=str(path), field=f"data_{block}")
    names = string_column(table, "rlnTomoName", path, block)
    ts_files = string_column(table, "rlnTomoTiltSeriesStarFile", path, block)
    pixel_col = ("rlnTomoTiltSeriesPixelSize" if "rlnTomoTiltSeriesPixelSize" in table
                 else "rlnMicrographOriginalPixelSize")
    pixels = numeric_column(table, pixel_col, path, block, quantity="pixel_size_angstrom")
    volt = numeric_column(table, "rlnVoltage", path, block, quantity="voltage_kv")
    cs = numeric_column(table, "rlnSphericalAberration", path, block, quantity="spherical_aberration_mm")
    ac = numeric_column(table, "rlnAmplitudeContrast", path, block, quantity="amplitude_contrast")
    hand = numeric_column(table, "rlnTomoHand", path, block) if "rlnTomoHand" in table else np.ones(len(table))
    sizes = (np.stack([numeric_column(table, f"rlnTomoSize{a}", path, block) for a in "XYZ"], 1)
             if all(f"rlnTomoSize{a}" in table for a in "XYZ") else None)
    frac = (numeric_column(table, "rlnTomoImportFractionalDose", path, block, quantity="exposure_e_per_angstrom2")
            if "rlnTomoImportFractionalDose" in table else None)
    out = []
    for row, tomo in enumerate(names):
        where = f"data_{block} row {row + 1}"
        validate_name(tomo, "tilt series (rlnTomoName)")
        if names.count(tomo) > 1:
            raise InvalidInputError("tilt series listed twice", path=str(path), field=f"{where}/_rlnTomoName",
                                    found=tomo)
        if not pixels[row] > 0:
            raise InvalidInputError("pixel size must be > 0", path=str(path), field=f"{where}/_{pixel_col}",
                                    found=pixels[row])
        if hand[row] not in (1, -1):
            raise InvalidInputError("handedness must be 1 or -1", path=str(path), field=f"{where}/_rlnTomoHand",
                                    found=hand[row])
        size = None
        if sizes is not None:
            size = [check_count("tomogram_size_px", float(v), path=str(path), field=f"{where}/_rlnTomoSize{a}")
                    for a, v in zip("XYZ", sizes[row])]
        ts_star = _resolve(ts_files[row], path, f"{where}/_rlnTomoTiltSeriesStarFile")
        tblocks = read_star_blocks(ts_star)
        tblock, tilts = require_table(tblocks, ts_star, (tomo, ""))
        if len(tilts) == 0:
            raise FormatError("tilt-series table is empty", path=str(ts_star), field=f"data_{tblock}")

        def col(name: str, quantity: str, default: np.ndarray | None = None) -> np.ndarray:
            if default is not None and name not in tilts:
                return default
            return numeric_column(tilts, name, ts_star, tblock, quantity=quantity)
        xtilt, ytilt = col("rlnTomoXTilt", "angle_deg"), col("rlnTomoYTilt", "tilt_angle_deg")
        zrot = col("rlnTomoZRot", "angle_deg")
        nominal = col("rlnTomoNominalStageTiltAngle", "tilt_angle_deg", ytilt)
        axis = float(col("rlnTomoNominalTiltAxisAngle", "angle_deg", zrot)[0])
        pre = col("rlnMicrographPreExposure", "pre_exposure_e_per_angstrom2")
        du, dv = col("rlnDefocusU", "defocus_angstrom"), col("rlnDefocusV", "defocus_angstrom")
        out.append(_TiltSeriesIn(
            name=tomo, star=ts_star, pixel=float(pixels[row]), voltage=float(volt[row]), cs=float(cs[row]),
            amplitude_contrast=float(ac[row]), hand=int(hand[row]), size_px=size,
            images=_images(tomo, table.iloc[row], tilts, path, ts_star, tblock),
            nominal_tilt=nominal, axis=axis,
            corrections=np.stack([xtilt, ytilt - nominal, zrot - axis], 1),
            shifts=np.stack([col("rlnTomoXShiftAngst", "shift_angstrom"), col("rlnTomoYShiftAngst", "shift_angstrom")], 1),
            defocus_u=du, defocus_v=dv, defocus_angle=col("rlnDefocusAngle", "angle_deg", np.zeros(len(tilts))),
            pre_exposure=pre, exposure=_exposures(pre, None if frac is None else float(frac[row]), path)))
    return out


def _stack(ts: _TiltSeriesIn) -> np.ndarray:
    """The tilt images in STAR row order: one memory map when they are a whole stack in order, else a copy."""
    files = {p for p, _ in ts.images}
    n = len(ts.images)
    if len(files) == 1 and [s for _, s in ts.images] == list(range(n)):
        path = ts.images[0][0]
        shape, voxel, _ = read_mrc_header(path)
        _check_stack_pixel(ts, path, voxel[0])
        if shape[0] != n:
            raise InvalidInputError("tilt count differs between STAR file and image stack", path=str(ts.star),
                                    field="rows", expected=f"{shape[0]} (sections in {path.name})", found=n)
        return read_mrc(path, mmap=True, check_finite=False).data
    images, cache = [], {}
    for path, section in ts.images:
        if path not in cache:
            m = read_mrc(path)
            _check_stack_pixel(ts, path, m.voxel_size_angstrom[0])
            cache[path] = m.data
        data = cache[path]
        if section >= data.shape[0]:
            raise InvalidInputError("image section beyond the end of the stack", path=str(ts.star),
                                    field="rlnMicrographName", expected=f"<= {data.shape[0]}", found=section + 1)
        images.append(data[section])
    if len({im.shape for im in images}) != 1:
        raise InvalidInputError("tilt images differ in size", path=str(ts.star), field="rlnMicrographName")
    return np.stack(images).astype(np.float32)


_STAR_FIELDS = {"tilt_angles_deg": "rlnTomoNominalStageTiltAngle", "tilt_axis_angle_deg": "rlnTomoNominalTiltAxisAngle",
                "angle_corrections_deg": "rlnTomoXTilt/YTilt/ZRot", "shifts_angstrom": "rlnTomoX/YShiftAngst",
                "defocus_u_angstrom": "rlnDefocusU", "defocus_v_angstrom": "rlnDefocusV",
                "defocus_angle_deg": "rlnDefocusAngle", "pre_exposure": "rlnMicrographPreExposure",
                "exposure": "rlnTomoImportFractionalDose", "tomogram_size_px": "rlnTomoSizeX/Y/Z"}


def _draft(ts: _TiltSeriesIn, stack: np.ndarray, size_px: list[int]) -> TiltSeriesDraft:
    return TiltSeriesDraft(
        name=ts.name, stack=stack, pixel_size_angstrom=ts.pixel, voltage_kv=ts.voltage, spherical_aberration_mm=ts.cs,
        amplitude_contrast=ts.amplitude_contrast, tilt_axis_angle_deg=ts.axis, tilt_angles_deg=ts.nominal_tilt,
        exposure_e_per_angstrom2=ts.exposure, pre_exposure_e_per_angstrom2=ts.pre_exposure, tomogram_size_px=size_px,
        handedness=ts.hand, model=ItemModel(ts.shifts, ts.corrections, ts.defocus_u, ts.defocus_v, ts.defocus_angle),
        metadata={"acquisition_order": [int(i) for i in np.argsort(ts.pre_exposure, kind="stable")]},
        origin=str(ts.star), fields=_STAR_FIELDS, stack_origin=str(ts.images[0][0]))


def _check_stack_pixel(ts: _TiltSeriesIn, path: Path, header: float) -> None:
    if header > 0 and not np.isclose(header, 1.0) and not same_pixel(header, ts.pixel):
        raise InvalidInputError("pixel sizes disagree", path=str(path), field="header voxel size",
                                expected=f"{ts.pixel} Å (rlnTomoTiltSeriesPixelSize of {ts.name})",
                                found=f"{header} Å")


@dataclass(frozen=True)
class _SpeciesIn:
    name: str
    diameter: float
    symmetry: str
    maps: SpeciesMaps
    map_paths: tuple[Path, ...]
    particles: StarParticles
    trajectories: np.ndarray | None


@dataclass(frozen=True)
class _OptimisationSet:
    path: Path
    tomograms: Path | None
    particles: Path | None
    half_maps: tuple[Path, Path] | None
    mask: Path | None
    species: str | None
    diameter: float | None
    symmetry: str | None
    trajectories: Path | None = None  # motion.star


def _read_optimisation_set(path: Path) -> _OptimisationSet:
    blocks = read_star_blocks(path)
    values: dict = {}
    for block in blocks.values():
        if isinstance(block, dict):
            values.update(block)
    if "rlnTomoTomogramsFile" not in values and "rlnTomoParticlesFile" not in values:
        raise FormatError("not an optimisation set", path=str(path),
                          expected="_rlnTomoTomogramsFile and/or _rlnTomoParticlesFile")

    def file(label: str) -> Path | None:
        v = values.get(label)
        return None if v in (None, "") else _resolve(str(v), path, f"_{label}")
    maps = (file("rlnTomoReferenceMap1File"), file("rlnTomoReferenceMap2File"))
    diameter = values.get("cryopoolDiameterAngst")
    if diameter is not None:
        try:
            diameter = float(diameter)
        except (TypeError, ValueError):
            raise FormatError("not a number", path=str(path), field="_cryopoolDiameterAngst",
                              found=repr(diameter)) from None
        check("diameter_angstrom", diameter, path=str(path), field="_cryopoolDiameterAngst")
    return _OptimisationSet(
        path=path, tomograms=file("rlnTomoTomogramsFile"), particles=file("rlnTomoParticlesFile"),
        half_maps=maps if all(maps) else None, mask=file("rlnTomoReferenceMaskFile"),
        species=values.get("cryopoolSpecies"), diameter=diameter,
        symmetry=values.get("cryopoolSymmetry"), trajectories=file("rlnTomoTrajectoriesFile"))


def _per_set(value, sets: list, what: str) -> list:
    """An option given once per optimisation set with particles (a single value for a single set)."""
    if value is None or (isinstance(value, (list, tuple)) and not value):
        return [None] * len(sets)
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if len(values) != len(sets):
        raise InvalidInputError(f"one --{what} per optimisation set with particles, in order", field=what,
                                expected=len(sets), found=len(values))
    return values


def _mask_diameter(mask: np.ndarray, pixel: float) -> float:
    """The widest extent of a mask (where it exceeds 0.5), in Å: the particle diameter RELION's masks imply."""
    inside = np.argwhere(mask > 0.5)
    if len(inside) == 0:
        raise InvalidInputError("the mask is empty (nothing above 0.5)", field="mask")
    centre = (np.array(mask.shape) - 1) / 2
    return float(2 * np.sqrt(((inside - centre) ** 2).sum(axis=1)).max() * pixel + pixel)


def _read_trajectories(path: Path, parts: StarParticles, particles_path: Path, doses: dict[str, tuple],
                       samples: int) -> np.ndarray:
    """Each particle's position trajectory ``(n, samples, 3)`` from RELION's motion.star.

    RELION gives a particle's position in every tilt (stack order) as its coordinate plus that
    tilt's offset; the control points at our dose times are their least-squares fit (exact when the
    motion is a polynomial of degree ``samples − 1`` over dose, as ours is).
    """
    if parts.particle_names is None:
        raise FormatError("a trajectories file needs particle names", path=str(particles_path),
                          field="_rlnTomoParticleName", hint=f"named by the optimisation set: {path}")
    blocks = read_star_blocks(path)
    out = np.empty((len(parts.tomo_names), samples, 3))
    fits: dict[str, np.ndarray] = {}
    for p, (tomo, name) in enumerate(zip(parts.tomo_names, parts.particle_names)):
        block = blocks.get(name)
        if not isinstance(block, pd.DataFrame):
            raise FormatError("no trajectory for this particle", path=str(path), field=f"data_{name}",
                              expected=f"a table named after the particle's _rlnTomoParticleName ({particles_path})")
        offsets = np.stack([numeric_column(block, f"rlnOrigin{a}Angst", path, name) for a in "XYZ"], 1)
        pre, exposure = doses[tomo]
        if len(offsets) != len(pre):
            raise FormatError("trajectory length differs from the tilt series", path=str(path), field=f"data_{name}",
                              expected=f"{len(pre)} rows, one per tilt of {tomo}", found=len(offsets))
        if tomo not in fits:  # least-squares solution operator, (samples, tilts)
            fits[tomo] = np.linalg.pinv(trajectory_weights(dose_times(pre, exposure), samples))
        out[p] = fits[tomo] @ (parts.positions[p] + offsets)
    return out


# --------------------------------------------------------------------------- import


def _read_species(s: _OptimisationSet, name: str | None, diameter: float | None, half_maps, mask, symmetry,
                  known: dict, doses: dict, temporal_samples: int) -> _SpeciesIn:
    """One optimisation set's species: name, maps, diameter (given, or from the mask), particles, trajectories."""
    name = name or s.species
    if name is None:
        raise InvalidInputError("the species needs a name", path=str(s.path),
                                hint="pass --species NAME (once per optimisation set, in order)")
    validate_name(name, "species")
    diameter = diameter if diameter is not None else s.diameter
    maps_paths = tuple(map(Path, half_maps)) if half_maps else s.half_maps
    if maps_paths is None:
        raise InvalidInputError("the optimisation set names no half-maps", path=str(s.path),
                                field="_rlnTomoReferenceMap1File/_rlnTomoReferenceMap2File",
                                hint="pass --half1 and --half2")
    mask_path = Path(mask) if mask else s.mask
    maps = read_species_maps(*maps_paths, mask_path)
    if diameter is None and mask_path:
        diameter = _mask_diameter(maps.mask, maps.pixel_size_angstrom)
    if diameter is None:
        raise InvalidInputError("the particle diameter is unknown", path=str(s.path), field="diameter",
                                hint="pass --diameter (Å), once per optimisation set, or give the set a mask")
    check("diameter_angstrom", diameter, field="diameter")
    parts = read_star_particles(s.particles, known.get)
    trajectories = None
    if s.trajectories is not None:
        trajectories = _read_trajectories(s.trajectories, parts, s.particles, doses, temporal_samples)
    return _SpeciesIn(name, float(diameter), validate_symmetry(symmetry or s.symmetry or "C1"), maps,
                      (*maps_paths, *([mask_path] if mask_path else [])), parts, trajectories)


def import_relion(
    repo: Repository,
    paths: list[str | Path],
    *,
    source: str,
    species: str | list[str] | None = None,
    temporal_samples: int = MAX_TEMPORAL_SAMPLES,
    diameter_angstrom: float | list[float] | None = None,
    symmetry: str | None = None,
    half_maps: tuple[str | Path, str | Path] | None = None,
    mask: str | Path | None = None,
    branch: str | None = None,
    message: str | None = None,
    progress: Progress = None,
) -> ObjectId:
    """Import RELION 5 optimisation sets (or tomograms.star files) into data source ``source``; one commit.

    Each optimisation set brings its tilt series and, with a particles file and
    half-maps, one species: several sets (one per species, as RELION writes
    them) import as one population, their tilt series once. Tilt series already
    in ``source`` with identical content are reused; a different one under the
    same name is refused. ``species`` and ``diameter_angstrom`` name each set's
    species and particle diameter, in order (one value: one set); without a
    diameter it is taken from the mask (the widest extent where it is above
    0.5). ``symmetry``/``half_maps``/``mask`` override what a single set says.
    Particle
    trajectories (motion.star, ``rlnTomoTrajectoriesFile``) are stored with
    ``temporal_samples`` control points over the exposure (``trajectory``).
    """
    if not 1 <= temporal_samples <= MAX_TEMPORAL_SAMPLES:
        raise InvalidInputError("temporal samples out of range", field="temporal_samples",
                                expected=f"1 to {MAX_TEMPORAL_SAMPLES}", found=temporal_samples)
    validate_name(source, "data source")
    sets: list[_OptimisationSet] = []
    for p in map(Path, paths):
        blocks = read_star_blocks(p)
        if any(isinstance(b, pd.DataFrame) and "rlnTomoTiltSeriesStarFile" in b for b in blocks.values()):
            sets.append(_OptimisationSet(p, p, None, None, None, None, None, None))
        else:
            sets.append(_read_optimisation_set(p))
    with_species_sets = [s for s in sets if s.particles is not None]
    names = _per_set(species, with_species_sets, "species")
    diameters = _per_set(diameter_angstrom, with_species_sets, "diameter")
    if (half_maps or mask or symmetry) and len(with_species_sets) != 1:
        raise InvalidInputError("--half1/--half2, --mask and --symmetry override one optimisation set",
                                found=f"{len(with_species_sets)} sets with particles",
                                hint="with several, each set names its own maps (and cryopoolSymmetry)")
    # tilt series: read and check everything before writing
    tilt_series: dict[str, _TiltSeriesIn] = {}
    for s in sets:
        if s.tomograms is None:
            continue
        for ts in _read_tomograms(s.tomograms):
            if ts.name in tilt_series and tilt_series[ts.name].star.resolve() != ts.star.resolve():
                raise InvalidInputError("two tomograms files define the same tilt series", path=str(s.tomograms),
                                        field="rlnTomoName", found=ts.name)
            tilt_series[ts.name] = ts
    stacks = {name: _stack(ts) for name, ts in tilt_series.items()}
    existing = items_in_source(repo, branch, source)
    known = {name: {"pixel": ts.pixel,
                    "size_px": ts.size_px or default_tomogram_size(stacks[name].shape[2], stacks[name].shape[1])}
             for name, ts in tilt_series.items()}
    for name, (_, item) in existing.items():
        known.setdefault(name, {"pixel": item.pixel_size_angstrom, "size_px": item.tomogram_size_px})
    doses = {n: (ts.pre_exposure, ts.exposure) for n, ts in tilt_series.items()}
    for n, (_, item) in existing.items():
        doses.setdefault(n, (item.pre_exposure_e_per_angstrom2, item.exposure_e_per_angstrom2))
    species_in: list[_SpeciesIn] = []
    for s, given_name, given_diameter in zip(with_species_sets, names, diameters):
        sp = _read_species(s, given_name, given_diameter, half_maps, mask, symmetry, known, doses, temporal_samples)
        if any(other.name == sp.name for other in species_in):
            raise InvalidInputError("two optimisation sets name the same species", path=str(s.path), found=sp.name)
        species_in.append(sp)
    files = {}
    for s in sets:
        for label, p in (("optimisation_set", s.path), ("tomograms", s.tomograms), ("particles", s.particles)):
            if p is not None:
                files[str(p)] = input_file(p, role=label)
        if s.trajectories is not None and s.particles is not None:
            p = s.trajectories
            files[str(p)] = input_file(p, role="trajectories")
    with repo.transaction() as tx:
        item_refs = {name: put_tilt_series(tx, _draft(ts, stacks[name], known[name]["size_px"]), progress)
                     for name, ts in tilt_series.items()}
        origins = {name: str(ts.star) for name, ts in tilt_series.items()}
        population_items = {name: ref for name, (ref, _) in existing.items()} | item_refs
        species_refs = []
        for sp in species_in:
            parts = sp.particles
            keys = [item_key(source, t) for t in parts.tomo_names]
            positions = parts.positions if sp.trajectories is None else sp.trajectories
            species_refs.append(put_species(tx, SpeciesDraft(  # RELION: one orientation at every sample
                sp.name, sp.symmetry, sp.diameter, sp.maps, stable_particle_ids(sp.name, keys, parts.positions), keys,
                positions, parts.angles, parts.half_sets, parts.scores,
                [population_items[k.split("/", 1)[1]] for k in sorted(set(keys))])))
            for p in sp.map_paths:
                files[str(p)] = input_file(p, role=f"map of {sp.name}")
        inputs = {f"star:{Path(k).name}": tx.put_blob(Path(k).read_bytes()) for k, v in files.items()
                  if not v["role"].startswith("map")}
        operation = Operation(kind="import", software=software_version(), inputs=inputs, parameters={
            "what": "relion5", "source": source, "files": files, "tilt_series": sorted(tilt_series),
            "species": [sp.name for sp in species_in]})

        def update(pop: Population | None) -> Population:
            pop = add_items(tx, pop, source, item_refs, existing, origins)  # an identical one already there is reused
            for ref in species_refs:
                pop = with_species(tx, pop, ref)
            return pop

        what = ", ".join(filter(None, [f"{len(tilt_series)} tilt series" if tilt_series else "",
                                       *[f"species {sp.name} ({len(sp.particles.tomo_names)} particles)"
                                         for sp in species_in]]))
        return tx.commit(update, message=message or f"Import RELION 5 project into {source}: {what}",
                         operation=operation, branch=branch)


# --------------------------------------------------------------------------- export


def _tilt_series_table(repo: Repository, item: TiltSeries, tomo: str, stack_name: str) -> pd.DataFrame:
    deformation = repo.get_record(item.deformation, DeformationModel)
    imaging = repo.get_record(item.imaging, ImagingModel)
    n = item.n_tilts
    corr = repo.get_array(deformation.tilt_angle_corrections_deg).read().reshape(n, 3)
    shifts = repo.get_array(deformation.tilt_shifts_angstrom).read().reshape(n, 2)
    theta = np.asarray(item.tilt_angles_deg, dtype=np.float64)
    axis = float(item.tilt_axis_angle_deg)
    # the values whose re-import gives back corr bit for bit
    ytilt = _exact_inverse(corr[:, 1], theta + corr[:, 1], lambda y: y - theta)
    zrot = _exact_inverse(corr[:, 2], axis + corr[:, 2], lambda z: z - axis)
    return pd.DataFrame({
        "rlnMicrographName": [f"{i + 1}@{stack_name}" for i in range(n)],
        "rlnTomoNominalStageTiltAngle": theta,
        "rlnTomoNominalTiltAxisAngle": np.full(n, axis),
        "rlnMicrographPreExposure": np.asarray(item.pre_exposure_e_per_angstrom2, dtype=np.float64),
        "rlnTomoXTilt": corr[:, 0], "rlnTomoYTilt": ytilt, "rlnTomoZRot": zrot,
        "rlnTomoXShiftAngst": shifts[:, 0], "rlnTomoYShiftAngst": shifts[:, 1],
        "rlnDefocusU": repo.get_array(imaging.defocus_u_angstrom).read().astype(np.float64),
        "rlnDefocusV": repo.get_array(imaging.defocus_v_angstrom).read().astype(np.float64),
        "rlnDefocusAngle": repo.get_array(imaging.defocus_angle_deg).read().astype(np.float64),
        "rlnCtfScalefactor": np.ones(n),
    })


def export_relion(repo: Repository, rev: str, out: str | Path, *, species: list[str] | None = None,
                  progress: Callable[[str], None] | None = None,
                  extra_maps: Callable[[Species], dict[str, np.ndarray]] | None = None) -> dict:
    """Write the population at ``rev`` as a RELION 5 project in the new folder ``out``; returns a summary.

    Layout: ``tomograms.star``, ``tilt_series/<tomo>.star`` + ``.mrcs``, and per species
    ``<species>/particles.star``, ``half_map_1.mrc``, ``half_map_2.mrc``, ``mask.mrc``
    and ``optimisation_set.star`` (RELION's ``--ios`` input). Every data source
    goes into one project. ``extra_maps`` adds maps derived from a species
    (``{"filtered": volume}`` → ``<species>/filtered.mrc``; the CLI passes the
    engine's filter here). Written into a temporary folder first: a failure
    leaves nothing behind.
    """
    out = Path(out)
    population = repo.population(repo.resolve(rev))
    names = sorted(population.species) if species is None else list(species)
    for name in names:
        if name not in population.species:
            raise NotFoundError(f"no species '{name}' at {rev}", expected=sorted(population.species))
    items = {key: (ref, item) for key, ref, item in iter_items(repo, population)}
    tomo = export_names(sorted(items))
    notes: list[str] = []
    with staged_folder(out) as staging:
        (staging / "tilt_series").mkdir()
        rows = []
        for key in sorted(items):
            ref, item = items[key]
            name = tomo[key]
            if progress:
                progress(f"tilt series {key}")
            stack_rel = f"tilt_series/{name}.mrcs"
            write_mrc(staging / stack_rel, repo.get_array(item.stack).read(), item.pixel_size_angstrom, stack=True)
            write_star(staging / f"tilt_series/{name}.star",
                       {name: _tilt_series_table(repo, item, name, stack_rel)})
            exposure = set(item.exposure_e_per_angstrom2)
            if len(exposure) > 1:
                notes.append(f"{key}: exposure differs between tilts; RELION keeps only pre-exposures, "
                             "so the per-tilt exposure is re-derived from their differences on import")
            if item.half_set_models:
                notes.append(f"{key}: the per-half-set models of the gold-standard refinement are not exported "
                             "(RELION has one model per tilt series); the item's shared model is")
            if repo.get_record(item.deformation, DeformationModel).orientation_corrections_deg is not None:
                notes.append(f"{key}: orientation-only corrections (Warp's GridAngleX/Y/Z) are not exported: "
                             "RELION turns positions and orientations with the same matrix")
            rows.append({
                "rlnTomoName": name, "rlnVoltage": item.voltage_kv,
                "rlnSphericalAberration": item.spherical_aberration_mm,
                "rlnAmplitudeContrast": item.amplitude_contrast,
                "rlnMicrographOriginalPixelSize": item.pixel_size_angstrom,
                "rlnTomoHand": int(item.handedness), "rlnTomoTiltSeriesPixelSize": item.pixel_size_angstrom,
                "rlnTomoTiltSeriesStarFile": f"tilt_series/{name}.star",
                "rlnTomoSizeX": item.tomogram_size_px[0], "rlnTomoSizeY": item.tomogram_size_px[1],
                "rlnTomoSizeZ": item.tomogram_size_px[2],
                **({"rlnTomoImportFractionalDose": exposure.pop()} if len(exposure) == 1 else {})})
        if any("rlnTomoImportFractionalDose" not in r for r in rows):
            for r in rows:
                r.pop("rlnTomoImportFractionalDose", None)
        write_star(staging / "tomograms.star", {"global": pd.DataFrame(rows)})
        for name in names:
            if progress:
                progress(f"species {name}")
            _export_species(repo, population, name, items, tomo, staging, notes)
            if extra_maps is not None:
                record = repo.get_record(population.species[name], Species)
                for label, volume in extra_maps(record).items():
                    write_mrc(staging / name / f"{validate_name(label, 'map')}.mrc", volume, record.pixel_size_angstrom)
    return {"folder": str(out), "tilt_series": [tomo[k] for k in sorted(items)], "species": names, "notes": notes}


def _trajectories_for_relion(positions: np.ndarray, keys: list[str], items: dict, samples: int):
    """RELION's form of pose trajectories: the position in the chronologically first tilt, plus per-tilt offsets.

    Returns that position ``(n, 3)``, the offsets ``[(tilts, 3)]`` in each item's stack order (None
    without trajectories) and, per particle, the temporal sample nearest the first tilt's dose time.
    """
    n = positions.shape[0]
    control = positions.reshape(n, samples, 3).astype(np.float64)
    if samples == 1:
        return control[:, 0], None, np.zeros(n, dtype=int)
    per_item = {}
    for key in set(keys):
        item = items[key][1]
        times = dose_times(item.pre_exposure_e_per_angstrom2, item.exposure_e_per_angstrom2)
        first = int(np.argmin(item.pre_exposure_e_per_angstrom2))
        per_item[key] = (trajectory_weights(times, samples), first,
                         int(np.argmin(np.abs(np.linspace(0, 1, samples) - times[first]))))
    stored, motion, sample = np.empty((n, 3)), [], np.empty(n, dtype=int)
    for p, key in enumerate(keys):
        w, first, sample[p] = per_item[key]
        path = w @ control[p]  # (tilts, 3)
        stored[p] = path[first]
        motion.append(path - path[first])
    return stored, motion, sample


def _export_species(repo: Repository, population: Population, name: str, items: dict, tomo: dict[str, str],
                    root: Path, notes: list[str]) -> None:
    sp = repo.get_record(population.species[name], Species)
    table = repo.get_record(sp.particles, ParticleTable)
    n = table.count
    cols = {k: repo.get_array(v).read() for k, v in table.columns.items()}
    keys = [table.item_names[i] for i in cols["item_index"].astype(int)]
    stored, motion, sample = _trajectories_for_relion(cols["position_angstrom"], keys, items, table.temporal_samples)
    if motion is not None:
        notes.append(f"{name}: particle trajectories ({table.temporal_samples} samples) are written to motion.star "
                     "(positions per tilt); RELION has no orientation trajectories, so each particle's orientation "
                     "is its sample nearest the first tilt's exposure")
    offset = np.array([_centre_offset(items[k][1].tomogram_size_px, items[k][1].pixel_size_angstrom)
                       for k in keys]).reshape(n, 3)
    centred = stored - offset
    # import computes (centred + offset) − origin; this origin is the rounding residual, so that is exact
    origin = (centred + offset) - stored
    angles = cols["orientation_deg"].reshape(n, table.temporal_samples, 3)[np.arange(n), sample].astype(np.float64)
    pixels = sorted({items[k][1].pixel_size_angstrom for k in keys})
    group = {p: i + 1 for i, p in enumerate(pixels)}
    sp_item = {k: items[k][1] for k in set(keys)}
    optics = pd.DataFrame({
        "rlnOpticsGroup": [group[p] for p in pixels], "rlnOpticsGroupName": [f"optics{group[p]}" for p in pixels],
        "rlnVoltage": [next(i.voltage_kv for i in sp_item.values() if i.pixel_size_angstrom == p) for p in pixels],
        "rlnSphericalAberration": [next(i.spherical_aberration_mm for i in sp_item.values()
                                        if i.pixel_size_angstrom == p) for p in pixels],
        "rlnAmplitudeContrast": [next(i.amplitude_contrast for i in sp_item.values()
                                      if i.pixel_size_angstrom == p) for p in pixels],
        "rlnTomoTiltSeriesPixelSize": pixels, "rlnImagePixelSize": [sp.pixel_size_angstrom] * len(pixels),
        "rlnImageSize": [int(repo.get_array(sp.half_map_1).shape[0])] * len(pixels), "rlnImageDimensionality": 3})
    particles = pd.DataFrame({
        "rlnTomoName": [tomo[k] for k in keys],
        "rlnTomoParticleName": [f"{tomo[k]}/{pid}" for k, pid in zip(keys, cols["particle_id"].tolist())],
        "rlnCenteredCoordinateXAngst": centred[:, 0], "rlnCenteredCoordinateYAngst": centred[:, 1],
        "rlnCenteredCoordinateZAngst": centred[:, 2],
        **({f"rlnOrigin{a}Angst": origin[:, k] for k, a in enumerate("XYZ")} if origin.any() else {}),
        "rlnAngleRot": angles[:, 0], "rlnAngleTilt": angles[:, 1], "rlnAnglePsi": angles[:, 2],
        "rlnOpticsGroup": [group[items[k][1].pixel_size_angstrom] for k in keys],
        "rlnRandomSubset": cols["half_set"].astype(int)})
    if np.isfinite(cols["score"]).all():
        particles["rlnMaxValueProbDistribution"] = cols["score"].astype(np.float64)
    folder = root / name
    folder.mkdir()
    write_star(folder / "particles.star", {"general": {"rlnTomoSubTomosAre2DStacks": 0},
                                            "optics": optics, "particles": particles})
    if motion is not None:
        blocks: dict = {"general": {"rlnParticleNumber": n}}
        for name_p, offsets in zip(particles["rlnTomoParticleName"], motion):
            blocks[name_p] = pd.DataFrame({f"rlnOrigin{a}Angst": offsets[:, k] for k, a in enumerate("XYZ")})
        write_star(folder / "motion.star", blocks)
    for label, ref in (("half_map_1", sp.half_map_1), ("half_map_2", sp.half_map_2), ("mask", sp.mask)):
        if ref is not None:
            write_mrc(folder / f"{label}.mrc", repo.get_array(ref).read(), sp.pixel_size_angstrom)
    values = {"rlnTomoParticlesFile": f"{name}/particles.star", "rlnTomoTomogramsFile": "tomograms.star",
              "rlnTomoReferenceMap1File": f"{name}/half_map_1.mrc",
              "rlnTomoReferenceMap2File": f"{name}/half_map_2.mrc",
              **({"rlnTomoReferenceMaskFile": f"{name}/mask.mrc"} if sp.mask is not None else {}),
              **({"rlnTomoTrajectoriesFile": f"{name}/motion.star"} if motion is not None else {}),
              "cryopoolSpecies": name, "cryopoolDiameterAngst": sp.diameter_angstrom,
              "cryopoolSymmetry": sp.symmetry}
    write_star(folder / "optimisation_set.star", {"optimisation_set": values})
