"""The one way new data becomes records: drafts in, records out, inside the caller's transaction.

Every importer (tilt-series files, RELION 5, Warp, copick) and the simulator
describe what they read as drafts: a :class:`TiltSeriesDraft` (stack,
acquisition, and an :class:`ItemModel` of arrays) and a :class:`SpeciesDraft`
(maps read and checked by :func:`read_species_maps`, particle columns). This
module checks every number once for every path (``physical``'s limits,
naming the file and field the draft came from),
stores the arrays and records, and places items in their data source, reusing
an identical item and refusing a different one of the same name. A check
added here protects every reader.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .canonical import Ref
from .errors import InvalidInputError
from .formats.mrc import MrcData, finite_check, read_mrc
from .particles import particle_table
from .physical import check, check_item_model, same_pixel, validate_symmetry
from .population import item_key, iter_items, with_items
from .records import DeformationModel, Grid, ImagingModel, Metrics, Population, Species, TiltSeries, validate_name
from .repository import Repository

__all__ = ["ItemModel", "TiltSeriesDraft", "SpeciesMaps", "SpeciesDraft", "put_stack", "put_tilt_series",
           "items_in_source", "add_items", "read_species_maps", "put_species"]

Progress = Callable[[int], None] | None


@dataclass(frozen=True)
class ItemModel:
    """An item's deformation and imaging model as arrays (Å, degrees, one row per tilt), before it is stored."""

    shifts_angstrom: np.ndarray  # (n, 2)
    angle_corrections_deg: np.ndarray  # (n, 3) about x, y, z
    defocus_u_angstrom: np.ndarray
    defocus_v_angstrom: np.ndarray
    defocus_angle_deg: np.ndarray
    image_warp: np.ndarray | None = None  # (2, t, y, x) B-spline control values
    volume_warp: np.ndarray | None = None  # (3, w, z, y, x)
    orientation_corrections_deg: np.ndarray | None = None
    phase_shift_deg: np.ndarray | None = None
    magnification_anisotropy: list[float] | None = None

    @classmethod
    def flat(cls, n: int, defocus_angstrom: float) -> "ItemModel":
        """No shifts, no corrections, one nominal defocus: a tilt series as the microscope reports it."""
        return cls(np.zeros((n, 2)), np.zeros((n, 3)), np.full(n, float(defocus_angstrom)),
                   np.full(n, float(defocus_angstrom)), np.zeros(n))

    def records(self, tx: Repository) -> tuple[DeformationModel, ImagingModel]:
        """The two model records, their arrays written to ``tx`` (float64: a model's hash does not depend on
        which reader or engine made it)."""
        def arr(x) -> Ref:
            return tx.put_array(np.asarray(x, dtype=np.float64))

        def grid(x) -> Grid | None:
            return None if x is None else Grid(dimensions=list(np.shape(x)[1:]), values=arr(x))
        deformation = DeformationModel(
            tilt_shifts_angstrom=arr(self.shifts_angstrom), tilt_angle_corrections_deg=arr(self.angle_corrections_deg),
            image_warp=grid(self.image_warp), volume_warp=grid(self.volume_warp),
            orientation_corrections_deg=None if self.orientation_corrections_deg is None
            else arr(self.orientation_corrections_deg))
        imaging = ImagingModel(
            defocus_u_angstrom=arr(self.defocus_u_angstrom), defocus_v_angstrom=arr(self.defocus_v_angstrom),
            defocus_angle_deg=arr(self.defocus_angle_deg),
            phase_shift_deg=None if self.phase_shift_deg is None else arr(self.phase_shift_deg),
            magnification_anisotropy=self.magnification_anisotropy)
        return deformation, imaging


@dataclass(frozen=True)
class TiltSeriesDraft:
    """A tilt series as a reader understood its files: everything a TiltSeries record holds, not yet stored.

    ``origin`` is the file errors name, ``fields`` where in it each quantity was
    read (keys of :func:`physical.check_item_model`, e.g. ``"defocus_u_angstrom":
    "<GridCTF>"``), so a refused value points at what a user can fix.
    """

    name: str
    stack: np.ndarray | Ref  # (n, h, w) images, or an array already stored (shared by several drafts)
    pixel_size_angstrom: float
    voltage_kv: float
    spherical_aberration_mm: float
    amplitude_contrast: float
    tilt_axis_angle_deg: float
    tilt_angles_deg: Sequence[float]
    exposure_e_per_angstrom2: Sequence[float]
    pre_exposure_e_per_angstrom2: Sequence[float]
    tomogram_size_px: Sequence[int]
    handedness: int
    model: ItemModel
    metadata: dict[str, Any] = field(default_factory=dict)
    origin: str | None = None
    fields: dict[str, str] = field(default_factory=dict)
    stack_origin: str | None = None  # the image file, where it is not ``origin``

    def check(self, image_size_px: tuple[int, int]) -> None:
        """One value per tilt everywhere, and every number within its physical range."""
        n = len(self.tilt_angles_deg)
        m = self.model
        for key, value, rows in (("shifts_angstrom", m.shifts_angstrom, (n, 2)),
                                 ("angle_corrections_deg", m.angle_corrections_deg, (n, 3)),
                                 ("defocus_u_angstrom", m.defocus_u_angstrom, (n,)),
                                 ("defocus_v_angstrom", m.defocus_v_angstrom, (n,)),
                                 ("defocus_angle_deg", m.defocus_angle_deg, (n,)),
                                 ("exposure", self.exposure_e_per_angstrom2, (n,)),
                                 ("pre_exposure", self.pre_exposure_e_per_angstrom2, (n,))):
            if np.shape(value) != rows:
                raise InvalidInputError("one value per tilt expected", path=self.origin,
                                        field=self.fields.get(key, key), expected=rows, found=np.shape(value))
        check("pixel_size_angstrom", self.pixel_size_angstrom, path=self.origin,
              field=self.fields.get("pixel_size_angstrom", "pixel size"))
        check_item_model({
            "tilt_angles_deg": self.tilt_angles_deg, "tilt_axis_angle_deg": self.tilt_axis_angle_deg,
            "angle_corrections_deg": m.angle_corrections_deg, "shifts_angstrom": m.shifts_angstrom,
            "image_warp": m.image_warp, "volume_warp": m.volume_warp,
            "orientation_corrections_deg": m.orientation_corrections_deg,
            "defocus_u_angstrom": m.defocus_u_angstrom, "defocus_v_angstrom": m.defocus_v_angstrom,
            "defocus_angle_deg": m.defocus_angle_deg, "pre_exposure": self.pre_exposure_e_per_angstrom2,
            "exposure": self.exposure_e_per_angstrom2, "voltage_kv": self.voltage_kv,
            "spherical_aberration_mm": self.spherical_aberration_mm, "amplitude_contrast": self.amplitude_contrast,
            "phase_shift_deg": m.phase_shift_deg, "image_size_px": list(image_size_px),
            "tomogram_size_px": list(self.tomogram_size_px)}, path=self.origin, fields=self.fields)


def put_stack(tx: Repository, images: np.ndarray, origin: str | Path | None, progress: Progress = None) -> Ref:
    """A tilt stack stored one tilt per chunk (whole images up to 16 MiB), refusing NaN/inf with the voxel's place."""
    _, h, w = images.shape
    chunks = (1, h, w) if h * w * images.itemsize <= 1 << 24 else None
    return tx.put_array(images, chunks=chunks, progress=progress, check=finite_check(Path(origin or "stack")))


def put_tilt_series(tx: Repository, draft: TiltSeriesDraft, progress: Progress = None) -> Ref:
    """Check a draft, store its stack (unless already stored), models and record; the record's ref."""
    if isinstance(draft.stack, Ref):
        shape = tx.get_array(draft.stack).shape
    else:
        shape = draft.stack.shape
    if len(shape) != 3 or shape[0] != len(draft.tilt_angles_deg):
        raise InvalidInputError("tilt count differs between metadata and image stack", path=draft.origin,
                                field=draft.fields.get("tilt_angles_deg", "tilt angles"),
                                expected=f"{shape[0] if len(shape) == 3 else '(n, h, w)'} (sections in the stack)",
                                found=len(draft.tilt_angles_deg))
    draft.check((int(shape[1]), int(shape[2])))
    stack = (draft.stack if isinstance(draft.stack, Ref)
             else put_stack(tx, draft.stack, draft.stack_origin or draft.origin, progress))
    deformation, imaging = draft.model.records(tx)
    return tx.put_record(TiltSeries(
        name=draft.name, stack=stack, pixel_size_angstrom=float(draft.pixel_size_angstrom),
        voltage_kv=float(draft.voltage_kv), spherical_aberration_mm=float(draft.spherical_aberration_mm),
        amplitude_contrast=float(draft.amplitude_contrast), tilt_axis_angle_deg=float(draft.tilt_axis_angle_deg),
        tilt_angles_deg=[float(a) for a in draft.tilt_angles_deg],
        exposure_e_per_angstrom2=[float(e) for e in draft.exposure_e_per_angstrom2],
        pre_exposure_e_per_angstrom2=[float(e) for e in draft.pre_exposure_e_per_angstrom2],
        tomogram_size_px=[int(v) for v in draft.tomogram_size_px], deformation=tx.put_record(deformation),
        imaging=tx.put_record(imaging), handedness=int(draft.handedness), metadata=draft.metadata))


def items_in_source(repo: Repository, branch: str | None, source: str) -> dict[str, tuple[Ref, TiltSeries]]:
    """The items data source ``source`` holds at the tip of ``branch``, by name (empty on an unborn branch)."""
    tip = repo.refs.read(repo.branch_ref(branch))
    if tip is None:
        return {}
    return {key.split("/", 1)[1]: (ref, item) for key, ref, item in iter_items(repo, repo.population(tip))
            if key.startswith(source + "/")}


def add_items(tx: Repository, population: Population | None, source: str, refs: dict[str, Ref],
              existing: dict[str, tuple[Ref, TiltSeries]], origins: dict[str, str | None] | None = None) -> Population:
    """``population`` with new items under ``source``: one identical to an existing item is reused, a different
    one of the same name refused (naming the file it came from)."""
    new = {}
    for name, ref in refs.items():
        if name in existing:
            if existing[name][0] != ref:
                raise InvalidInputError("the data source already has a different tilt series of this name",
                                        path=(origins or {}).get(name), field="name", found=item_key(source, name),
                                        hint="import into another --source, or 'cryopool rm item' the old one")
            continue
        new[item_key(source, name)] = ref
    return with_items(tx, population or Population(name="population"), new)


@dataclass(frozen=True)
class SpeciesMaps:
    """A species' half-maps and mask as read and checked: cubic, one shape, one pixel size, mask in [0, 1]."""

    half_map_1: np.ndarray
    half_map_2: np.ndarray
    mask: np.ndarray | None
    pixel_size_angstrom: float


def read_species_maps(half_map_1: str | Path, half_map_2: str | Path, mask: str | Path | None = None, *,
                      pixel_size_angstrom: float | None = None) -> SpeciesMaps:
    """Read and check a species' maps. ``pixel_size_angstrom`` overrides the headers (a map whose header says
    0 takes the others'); without it the first half-map's header must give one."""
    paths = [Path(half_map_1), Path(half_map_2), *([Path(mask)] if mask is not None else [])]
    maps: list[MrcData] = []
    for p, what in zip(paths, ("half-map 1", "half-map 2", "mask")):
        m = read_mrc(p)
        if m.data.ndim != 3 or len(set(m.data.shape)) != 1:
            raise InvalidInputError(f"{what} must be a cubic 3-D map", path=str(p), field="shape",
                                    expected="(d, d, d)", found=m.data.shape)
        if maps and m.data.shape != maps[0].data.shape:
            raise InvalidInputError("map shapes differ", path=str(p), field="shape",
                                    expected=f"{maps[0].data.shape} (as {paths[0].name})", found=m.data.shape)
        first = maps[0].voxel_size_angstrom[0] if maps else None
        if first and m.voxel_size_angstrom[0] > 0 and not same_pixel(m.voxel_size_angstrom[0], first):
            raise InvalidInputError("map pixel sizes differ", path=str(p), field="voxel size",
                                    expected=f"{first} Å (as {paths[0].name})", found=m.voxel_size_angstrom[0])
        maps.append(m)
    if pixel_size_angstrom is not None:
        check("pixel_size_angstrom", pixel_size_angstrom, field="pixel_size_angstrom")
        pixel = float(pixel_size_angstrom)
    else:
        header = maps[0].voxel_size_angstrom[0]
        if not header > 0:
            raise InvalidInputError("the half-map has no pixel size", path=str(paths[0]), field="voxel size",
                                    hint="set the voxel size in the MRC header (import species: or pass "
                                         "--pixel-size)")
        check("pixel_size_angstrom", header, path=str(paths[0]), field="voxel size")
        pixel = float(header)
    if mask is not None:
        lo, hi = float(maps[2].data.min()), float(maps[2].data.max())
        if lo < -1e-6 or hi > 1 + 1e-6:
            raise InvalidInputError("mask values must lie in [0, 1]", path=str(paths[2]), field="data",
                                    found=f"[{lo:.3g}, {hi:.3g}]")
    return SpeciesMaps(maps[0].data.astype(np.float32), maps[1].data.astype(np.float32),
                       maps[2].data.astype(np.float32) if mask is not None else None, pixel)


@dataclass(frozen=True)
class SpeciesDraft:
    """A new species as a reader understood it: its maps and its particles (one row per particle)."""

    name: str
    symmetry: str
    diameter_angstrom: float
    maps: SpeciesMaps
    particle_ids: np.ndarray  # (n,) uint64, ``stable_particle_ids``
    item_keys: list[str]  # "source/item" per particle
    positions_angstrom: np.ndarray  # (n, 3), or (n, samples, 3) along a trajectory
    euler_zyz_deg: np.ndarray  # (n, 3)
    half_sets: np.ndarray
    scores: np.ndarray
    reconstructed_from: list[Ref]  # the item versions the maps came from
    metadata: dict[str, Any] = field(default_factory=dict)


def put_species(tx: Repository, draft: SpeciesDraft) -> Ref:
    """Store a new species version (maps, particle table, record); its ref."""
    check("diameter_angstrom", draft.diameter_angstrom, field="diameter")
    table = particle_table(tx, draft.particle_ids, draft.item_keys, draft.positions_angstrom, draft.euler_zyz_deg,
                           draft.half_sets, draft.scores)
    m = draft.maps
    return tx.put_record(Species(
        name=validate_name(draft.name, "species"), symmetry=validate_symmetry(draft.symmetry),
        diameter_angstrom=float(draft.diameter_angstrom), pixel_size_angstrom=float(m.pixel_size_angstrom),
        half_map_1=tx.put_array(m.half_map_1), half_map_2=tx.put_array(m.half_map_2),
        mask=None if m.mask is None else tx.put_array(m.mask), particles=tx.put_record(table), metrics=Metrics(),
        reconstructed_from=draft.reconstructed_from, metadata=draft.metadata))
