"""Importing files into a population: tilt-series stacks and species.

Every importer reads and checks *all* of its input before it writes anything,
then writes inside one transaction, so bad input or a crash leaves the
repository exactly as it was.  The files themselves are part of provenance:
small metadata files are stored as blobs referenced by the operation record,
and every input file's BLAKE3 (plain, over the file bytes) is recorded.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import blake3
import numpy as np

from .canonical import Ref
from .errors import InvalidInputError, NotFoundError
from .formats.mrc import read_mrc, read_mrc_header
from .formats.tilts import (dose_symmetric_order, mdoc_number, parse_tilt_range, pre_exposure, read_mdoc, read_tlt, read_xf,
                            xf_alignment)
from .hashing import ObjectId
from .ingest import (ItemModel, SpeciesDraft, TiltSeriesDraft, put_species, put_stack, put_tilt_series,
                     read_species_maps)
from .physical import check, check_count, same_pixel, validate_symmetry
from .population import find_item, stable_particle_ids, with_item, with_species
from .records import Operation, Population, TiltSeries, validate_name
from .repository import Repository, software_version
from .star_particles import read_star_particles

__all__ = ["import_tilt_series", "import_species", "file_blake3", "input_file", "stable_particle_ids", "validate_symmetry",
           "default_tomogram_size"]

Progress = Callable[[int], None] | None


def input_file(path: Path, **about: str) -> dict:
    """How an operation records an input file: its name, BLAKE3 and size (plus e.g. its role or item)."""
    return {"name": path.name, "blake3": file_blake3(path), "bytes": path.stat().st_size, **about}


def file_blake3(path: Path) -> str:
    """Plain BLAKE3 of a file's bytes (all threads, memory-mapped): its provenance fingerprint."""
    if Path(path).stat().st_size == 0:
        return blake3.blake3().hexdigest()
    return blake3.blake3(max_threads=blake3.blake3.AUTO).update_mmap(str(path)).hexdigest()


def default_tomogram_size(width: int, height: int) -> list[int]:
    """The image size in x and y and a quarter of the width (even) in z, when nobody says otherwise."""
    return [width, height, max(2, (width // 4) // 2 * 2)]


# --------------------------------------------------------------------------- tilt series


@dataclass(frozen=True)
class _TiltMetadata:
    angles: list[float]
    order: list[int]
    exposure: list[float]
    tilt_axis_deg: float
    pixel_size_angstrom: float | None
    voltage_kv: float | None
    defocus_um: float | None
    sources: dict[str, Path]


def _tilt_metadata(*, tilt_angles, tlt, mdoc, dose_per_tilt, order, group_size, tilt_axis_deg,
                   defocus_um) -> _TiltMetadata:
    given = [x is not None for x in (tilt_angles, tlt, mdoc)]
    if sum(given) != 1:
        raise InvalidInputError("give exactly one of tilt angles (MIN:MAX:STEP), a .tlt file or an .mdoc file",
                                field="tilts")
    sources: dict[str, Path] = {}
    pixel = voltage = None
    axis = tilt_axis_deg
    acquisition = None
    exposure = None
    if mdoc is not None:
        path = Path(mdoc)
        m = read_mdoc(path)
        sources["mdoc"] = path
        angles = m.floats("TiltAngle", str(path))
        acquisition = m.acquisition_order(str(path))
        check("tilt_angle_deg", angles, path=str(path), field="TiltAngle", index_label="section")
        doses = [mdoc_number(s.get("ExposureDose", "0"), str(path), f"[ZValue = {i}] ExposureDose")
                 for i, s in enumerate(m.sections)]
        if any(d > 0 for d in doses):
            check("exposure_e_per_angstrom2", doses, path=str(path), field="ExposureDose", index_label="section")
            exposure = doses
        if "PixelSpacing" in m.global_values:
            pixel = mdoc_number(m.global_values["PixelSpacing"], str(path), "PixelSpacing")
            check("pixel_size_angstrom", pixel, path=str(path), field="PixelSpacing")
        if axis is None:
            hit = re.search(r"Tilt axis angle\s*=\s*([-+0-9.eE]+)", "\n".join(m.titles))
            axis = mdoc_number(hit.group(1), str(path), "[T = … Tilt axis angle]") if hit else None
        if defocus_um is None and "TargetDefocus" in m.sections[0]:
            # SerialEM: negative = underfocus
            defocus_um = -mdoc_number(m.sections[0]["TargetDefocus"], str(path), "[ZValue = 0] TargetDefocus")
            check("defocus_angstrom", defocus_um * 1e4, path=str(path), field="[ZValue = 0] TargetDefocus (Å)")
        if "Voltage" in m.global_values:
            voltage = mdoc_number(m.global_values["Voltage"], str(path), "Voltage")
    elif tlt is not None:
        sources["tlt"] = Path(tlt)
        angles = read_tlt(Path(tlt))
    else:
        angles = list(tilt_angles) if not isinstance(tilt_angles, str) else parse_tilt_range(tilt_angles)
    n = len(angles)
    if exposure is None:
        if dose_per_tilt is None:
            raise InvalidInputError("the dose per tilt is unknown", field="dose_per_tilt",
                                    hint="pass --dose-per-tilt (e-/Å² per tilt image)")
        check("exposure_e_per_angstrom2", dose_per_tilt, field="dose_per_tilt")
        exposure = [float(dose_per_tilt)] * n
    if order == "file" or (order is None and acquisition is not None):
        if acquisition is None:
            raise InvalidInputError("acquisition order 'file' needs an .mdoc with DateTime per tilt", field="order")
        acq = acquisition
    elif order in (None, "dose-symmetric"):
        acq = dose_symmetric_order(angles, check_count("group_size", group_size, field="group_size"))
    elif order == "sequential":
        acq = list(range(n))
    else:
        raise InvalidInputError("unknown acquisition order", field="order",
                                expected="dose-symmetric, sequential or file", found=order)
    return _TiltMetadata(angles=[float(a) for a in angles], order=acq, exposure=exposure,
                         tilt_axis_deg=float(axis if axis is not None else 0.0), pixel_size_angstrom=pixel,
                         voltage_kv=voltage, defocus_um=defocus_um, sources=sources)


def import_tilt_series(
    repo: Repository,
    stack: str | Path,
    *,
    source: str,
    name: str | None = None,
    tilt_angles: str | list[float] | None = None,
    tlt: str | Path | None = None,
    mdoc: str | Path | None = None,
    dose_per_tilt: float | None = None,
    order: str | None = None,
    group_size: int = 2,
    pixel_size_angstrom: float | None = None,
    voltage_kv: float | None = None,
    spherical_aberration_mm: float = 2.7,
    amplitude_contrast: float = 0.07,
    tilt_axis_deg: float | None = None,
    defocus_um: float | None = None,
    tomogram_size_px: tuple[int, int, int] | None = None,
    xf: str | Path | None = None,
    handedness: int = -1,
    branch: str | None = None,
    message: str | None = None,
    progress: Progress = None,
) -> ObjectId:
    """Import one MRC tilt-series stack as a new item; returns the commit id.

    Tilt angles keep the SerialEM/IMOD sign (θ = the ``.tlt``/mdoc angle, as
    RELION imports them); with that sign IMOD's convention (at positive tilts
    the right side of the image is further underfocused) is handedness −1,
    the default. An IMOD ``.xf`` brings per-tilt axis angles and shifts.
    """
    stack = Path(stack)
    if handedness not in (1, -1):
        raise InvalidInputError("handedness must be 1 or -1", field="handedness", found=handedness)
    if xf is not None and tilt_axis_deg is not None:
        raise InvalidInputError("give the tilt axis or an .xf alignment, not both", field="tilt_axis_deg",
                                hint="the .xf holds the tilt-axis angle of every tilt")
    name = validate_name(name or stack.name.split(".")[0], "item")
    validate_name(source, "data source")
    shape, voxel, dtype = read_mrc_header(stack)
    meta = _tilt_metadata(tilt_angles=tilt_angles, tlt=tlt, mdoc=mdoc, dose_per_tilt=dose_per_tilt, order=order,
                          group_size=group_size, tilt_axis_deg=tilt_axis_deg, defocus_um=defocus_um)
    n, height, width = shape
    if len(meta.angles) != n:
        where = str(meta.sources.get("mdoc") or meta.sources.get("tlt") or "tilt angles")
        raise InvalidInputError("tilt count differs between metadata and image stack", path=where,
                                field="tilt angles", expected=f"{n} (sections in {stack.name})", found=len(meta.angles))
    pixel = _choose_pixel_size(stack, voxel[0], pixel_size_angstrom, meta.pixel_size_angstrom)
    axis = meta.tilt_axis_deg
    corrections, shifts = np.zeros((n, 3)), np.zeros((n, 2))
    if xf is not None:
        xf = Path(xf)
        transforms = read_xf(xf)
        if len(transforms) != n:
            raise InvalidInputError("tilt count differs between .xf and image stack", path=str(xf), field="lines",
                                    expected=f"{n} (sections in {stack.name})", found=len(transforms))
        axes, shifts = xf_alignment(transforms, pixel, str(xf))
        axis = float(axes[0])
        corrections[:, 2] = axes - axis
        meta.sources["xf"] = xf
    volt = float(voltage_kv if voltage_kv is not None else (meta.voltage_kv or 300.0))
    if meta.defocus_um is None:
        raise InvalidInputError("the nominal defocus is unknown", field="defocus_um",
                                hint="pass --defocus-um (positive = underfocus)")
    size = tuple(check_count("tomogram_size_px", v, field="tomogram_size_px")
                 for v in (tomogram_size_px or default_tomogram_size(width, height)))
    mrc = read_mrc(stack, mmap=True, check_finite=False)  # truncation is checked here
    draft = TiltSeriesDraft(
        name=name, stack=mrc.data, pixel_size_angstrom=pixel, voltage_kv=volt,
        spherical_aberration_mm=spherical_aberration_mm, amplitude_contrast=amplitude_contrast,
        tilt_axis_angle_deg=axis, tilt_angles_deg=meta.angles, exposure_e_per_angstrom2=meta.exposure,
        pre_exposure_e_per_angstrom2=pre_exposure(meta.order, meta.exposure), tomogram_size_px=size,
        handedness=handedness, model=replace(ItemModel.flat(n, float(meta.defocus_um) * 1e4), shifts_angstrom=shifts,
                                             angle_corrections_deg=corrections),
        metadata={"acquisition_order": meta.order}, origin=str(stack),
        fields={"tilt_angles_deg": "tilt angles", "tilt_axis_angle_deg": "tilt_axis_deg", "defocus_u_angstrom": "defocus_um",
                "defocus_v_angstrom": "defocus_um", "shifts_angstrom": str(xf or "shifts")})
    draft.check((height, width))

    with repo.transaction() as tx, ThreadPoolExecutor(1) as side:  # a NaN found while storing aborts it
        # the file's own fingerprint is computed beside the chunk pass, not after it
        stack_hash = side.submit(lambda: blake3.blake3(mrc.file_bytes).hexdigest())
        stack_ref = put_stack(tx, mrc.data, stack, progress)
        file_hashes = {"stack": {"name": stack.name, "blake3": stack_hash.result(), "bytes": len(mrc.file_bytes)}}
        # the item records the stack's fingerprint; the operation, every input file's
        item_ref = put_tilt_series(tx, replace(draft, stack=stack_ref, metadata={
            **draft.metadata, "source_files": {"stack": file_hashes["stack"]}}))
        inputs: dict[str, Ref] = {}
        for label, path in meta.sources.items():
            inputs[label] = tx.put_blob(path.read_bytes())
            file_hashes[label] = input_file(path)
        operation = Operation(kind="import", software=software_version(), inputs=inputs, parameters={
            "what": "tilt-series", "source": source, "item": name, "files": file_hashes,
            "pixel_size_angstrom": pixel, "voltage_kv": volt, "spherical_aberration_mm": spherical_aberration_mm,
            "amplitude_contrast": amplitude_contrast, "tilt_axis_angle_deg": axis, "handedness": handedness,
            "defocus_um": float(meta.defocus_um), "acquisition_order": meta.order, "tomogram_size_px": list(size)})

        def update(pop: Population | None) -> Population:
            return with_item(tx, pop or Population(name="population"), source, name, item_ref)

        return tx.commit(update, message=message or f"Import tilt series {source}/{name} ({n} tilts)",
                         operation=operation, branch=branch)


def _choose_pixel_size(path: Path, header: float, given: float | None, metadata: float | None) -> float:
    """The pixel size: given (it overrides a wrong header or mdoc), else the mdoc's, else the MRC header's."""
    if given is not None:
        check("pixel_size_angstrom", given, field="pixel_size_angstrom")
        return float(given)
    if metadata is not None:
        if header > 0 and not np.isclose(header, 1.0) and not same_pixel(header, metadata):
            raise InvalidInputError("pixel sizes disagree", path=str(path), field="header voxel size",
                                    expected=f"{metadata} Å (mdoc PixelSpacing)", found=f"{header} Å (MRC header)",
                                    hint="pass --pixel-size to say which is right")
        return float(metadata)
    if header <= 0:
        raise InvalidInputError("the MRC header has no pixel size", path=str(path), field="voxel size",
                                hint="pass --pixel-size")
    check("pixel_size_angstrom", header, path=str(path), field="voxel size")
    return float(header)


# --------------------------------------------------------------------------- species


@dataclass(frozen=True)
class _Particles:
    item_keys: list[str]
    item_refs: dict[str, Ref]
    positions: np.ndarray  # (n, 3) Å, centred
    angles: np.ndarray  # (n, 3) deg
    half_sets: np.ndarray  # (n,) uint8
    scores: np.ndarray  # (n,) float32


def _read_particles(repo: Repository, population: Population, path: Path) -> _Particles:
    items: dict[str, tuple[str, Ref]] = {}

    def lookup(name: str) -> dict | None:
        try:
            key, ref = find_item(repo, population, name)
        except NotFoundError:
            return None  # an ambiguous name raises: the reader names the row
        items[name] = (key, ref)
        ts = repo.get_record(ref, TiltSeries)
        return {"pixel": ts.pixel_size_angstrom, "size_px": ts.tomogram_size_px}
    parts = read_star_particles(path, lookup)
    keys = [items[name][0] for name in parts.tomo_names]
    refs = {key: ref for key, ref in items.values()}
    return _Particles(keys, refs, parts.positions, parts.angles, parts.half_sets, parts.scores)


def import_species(
    repo: Repository,
    name: str,
    *,
    half_map_1: str | Path,
    half_map_2: str | Path,
    particles: str | Path,
    mask: str | Path | None = None,
    symmetry: str = "C1",
    diameter_angstrom: float,
    pixel_size_angstrom: float | None = None,
    branch: str | None = None,
    message: str | None = None,
) -> ObjectId:
    """Import a species (two half-maps, optional mask, a particle STAR table); returns the commit id."""
    validate_name(name, "species")
    symmetry = validate_symmetry(symmetry)
    check("diameter_angstrom", diameter_angstrom, field="diameter_angstrom")
    paths = {"half_map_1": Path(half_map_1), "half_map_2": Path(half_map_2), "particles": Path(particles)}
    if mask is not None:
        paths["mask"] = Path(mask)
    maps = read_species_maps(paths["half_map_1"], paths["half_map_2"], paths.get("mask"),
                             pixel_size_angstrom=pixel_size_angstrom)
    pixel = maps.pixel_size_angstrom
    tip = repo.refs.read(repo.branch_ref(branch))
    if tip is None:
        raise NotFoundError("the branch has no data sources yet", hint="import tilt series before species")
    base = repo.population(tip)
    parts = _read_particles(repo, base, paths["particles"])
    n = len(parts.item_keys)
    item_names = sorted(set(parts.item_keys))
    ids = stable_particle_ids(name, parts.item_keys, parts.positions)
    files = {k: input_file(p) for k, p in paths.items()}

    with repo.transaction() as tx:
        species_ref = put_species(tx, SpeciesDraft(
            name, symmetry, float(diameter_angstrom), maps, ids, parts.item_keys, parts.positions, parts.angles,
            parts.half_sets, parts.scores, [parts.item_refs[k] for k in item_names], {"source_files": files}))
        operation = Operation(kind="import", software=software_version(),
                              inputs={"particles.star": tx.put_blob(paths["particles"].read_bytes())},
                              parameters={"what": "species", "species": name, "files": files, "symmetry": symmetry,
                                          "diameter_angstrom": float(diameter_angstrom), "pixel_size_angstrom": pixel,
                                          "particles": n})

        def update(pop: Population | None) -> Population:
            if pop is None:
                raise NotFoundError("the branch lost its population")
            for key in item_names:  # the items the particles sit in must still be there, unchanged
                if find_item(tx, pop, key)[1] != parts.item_refs[key]:
                    raise InvalidInputError(f"item {key} changed while importing; import again")
            return with_species(tx, pop, species_ref)

        return tx.commit(update, message=message or f"Import species {name} ({n} particles)",
                         operation=operation, branch=branch)
