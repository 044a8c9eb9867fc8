"""Typed population records: what a population, item, species and commit are.

Each record is a frozen dataclass that round-trips through canonical msgpack.
Fields are coerced to their declared type when written (a float field given
``300`` stores ``300.0``, so the same state always hashes the same) and
checked strictly when read (a missing, extra or mistyped field is a
``FormatError`` naming the record and the field).  A reference field declares
which record types it may point to; ``verify`` checks that too.

Hash dependencies follow the brief: an item version points to the species
versions its models were refined against; a species version points to the
item versions its half-maps were reconstructed from.  Both point backwards in
time, so the object graph is a DAG.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Union

from . import physical
from .canonical import Ref, walk_refs
from .errors import FormatError, InvalidInputError
from .hashing import Kind

__all__ = [
    "Struct", "Record", "RECORD_TYPES", "parse_record", "reference_targets", "validate_name",
    "ArrayManifest", "Grid", "DeformationModel", "ImagingModel", "HalfSetModel", "TiltSeries", "DataSource",
    "ParticleTable", "StateDict", "Metrics", "Species", "Population", "Operation", "Commit",
    "OPERATION_KINDS", "PARTICLE_COLUMNS",
]


@dataclass(frozen=True)
class Target:
    """Record types (``_type``) a reference may point to; ``"*"`` for any."""

    types: tuple[str, ...]
    kind: Kind = Kind.RECORD


def ref_to(*types_: str) -> Any:
    return Annotated[Ref, Target(tuple(types_))]


ArrayRef = ref_to("Array")
ChunkRef = Annotated[Ref, Target(("*",), Kind.CHUNK)]

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")


def validate_name(name: str, what: str) -> str:
    """Names of sources, items and species: safe in paths, STAR files and URLs."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name.endswith(".lock"):
        raise InvalidInputError(f"invalid {what} name", field=what, found=repr(name),
                                expected="1-128 characters from A-Z a-z 0-9 . _ + -, starting with a letter or digit")
    return name


LATER = "added_later"  # field metadata: a field added after format 1 is left out of the encoding while it is None


def later(default: Any = None) -> Any:
    """A field added after format 1: optional, and not encoded while None, so older objects keep their hashes."""
    return field(default=default, metadata={LATER: True})


class Struct:
    """A nested value inside a record (no identity of its own)."""

    def to_value(self) -> dict:
        hints = typing.get_type_hints(type(self), include_extras=True)
        return {f.name: _to(getattr(self, f.name), hints[f.name], f.name) for f in dataclasses.fields(self)
                if not (f.metadata.get(LATER) and getattr(self, f.name) is None)}

    @classmethod
    def from_value(cls, value: Any, where: str = "") -> "Struct":
        where = where or cls.__name__
        if not isinstance(value, dict):
            raise FormatError("expected a map", path=where, found=type(value).__name__)
        hints = typing.get_type_hints(cls, include_extras=True)
        names = [f.name for f in dataclasses.fields(cls)]
        extra = sorted(set(value) - set(names) - {"_type", "_v"})
        if extra:
            raise FormatError("unknown fields", path=where, field=extra[0], found=extra)
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name not in value:
                if f.metadata.get(LATER):
                    continue  # added after format 1, absent when null (older objects keep their hashes)
                raise FormatError("missing field", path=where, field=f.name)
            kwargs[f.name] = _from(value[f.name], hints[f.name], f"{where}.{f.name}")
        return cls(**kwargs)


class Record(Struct):
    """A top-level object with a type tag; stored as one RECORD object."""

    TYPE: ClassVar[str] = ""
    VERSION: ClassVar[int] = 1

    def to_value(self) -> dict:
        value = super().to_value()
        value["_type"] = self.TYPE
        value["_v"] = self.VERSION
        return value


# --------------------------------------------------------------------------- conversion


def _unwrap(hint: Any) -> tuple[Any, Target | None]:
    if typing.get_origin(hint) is Annotated:
        base, *meta = typing.get_args(hint)
        return base, next((m for m in meta if isinstance(m, Target)), None)
    return hint, None


def _optional_inner(hint: Any) -> Any | None:
    if typing.get_origin(hint) in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return None


def _to(value: Any, hint: Any, where: str) -> Any:
    hint, _ = _unwrap(hint)
    inner = _optional_inner(hint)
    if inner is not None:
        return None if value is None else _to(value, inner, where)
    if hint is Any:
        return value
    origin = typing.get_origin(hint)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
            raise InvalidInputError("expected a number", field=where, found=repr(value))
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not hasattr(value, "__index__"):
            raise InvalidInputError("expected an integer", field=where, found=repr(value))
        return int(value.__index__())
    if hint in (str, bool, bytes, Ref):
        if not isinstance(value, hint) or (hint is bool and not isinstance(value, bool)):
            raise InvalidInputError(f"expected {hint.__name__}", field=where, found=repr(value))
        return value
    if origin in (list, tuple):
        (item,) = typing.get_args(hint)[:1]
        return [_to(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _, item = typing.get_args(hint)
        if any(not isinstance(k, str) for k in value):
            raise InvalidInputError("map keys must be strings", field=where)
        return {k: _to(v, item, f"{where}.{k}") for k, v in value.items()}
    if isinstance(hint, type) and issubclass(hint, Struct):
        if not isinstance(value, hint):
            raise InvalidInputError(f"expected {hint.__name__}", field=where, found=type(value).__name__)
        return value.to_value()
    raise TypeError(f"unsupported field type {hint!r} at {where}")


def _from(value: Any, hint: Any, where: str) -> Any:
    hint, _ = _unwrap(hint)
    inner = _optional_inner(hint)
    if inner is not None:
        return None if value is None else _from(value, inner, where)
    if hint is Any:
        return value
    origin = typing.get_origin(hint)
    ok_types = {float: (float,), int: (int,), str: (str,), bool: (bool,), bytes: (bytes,), Ref: (Ref,)}
    if hint in ok_types:
        if not isinstance(value, ok_types[hint]) or (hint is int and isinstance(value, bool)):
            raise FormatError(f"expected {hint.__name__}", path=where, found=type(value).__name__)
        return value
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise FormatError("expected a list", path=where, found=type(value).__name__)
        (item,) = typing.get_args(hint)[:1]
        return [_from(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise FormatError("expected a map", path=where, found=type(value).__name__)
        _, item = typing.get_args(hint)
        return {k: _from(v, item, f"{where}.{k}") for k, v in value.items()}
    if isinstance(hint, type) and issubclass(hint, Struct):
        return hint.from_value(value, where)
    raise TypeError(f"unsupported field type {hint!r} at {where}")


def _targets(value: Any, hint: Any, where: str, out: list) -> None:
    hint, target = _unwrap(hint)
    if hint is Any:  # free-form values may hold references too: any kind, any type
        out.extend((where, ref, Target(("*",), ref.kind)) for ref in walk_refs(value))
        return
    inner = _optional_inner(hint)
    if inner is not None:
        if value is not None:
            _targets(value, typing.Annotated[inner, target] if target else inner, where, out)
        return
    origin = typing.get_origin(hint)
    if hint is Ref:
        out.append((where, value, target or Target(("*",), value.kind)))
    elif origin in (list, tuple):
        (item,) = typing.get_args(hint)[:1]
        for i, v in enumerate(value):
            _targets(v, item, f"{where}[{i}]", out)
    elif origin is dict:
        _, item = typing.get_args(hint)
        for k, v in value.items():
            _targets(v, item, f"{where}.{k}", out)
    elif isinstance(hint, type) and issubclass(hint, Struct):
        hints = typing.get_type_hints(hint, include_extras=True)
        for f in dataclasses.fields(value):
            _targets(getattr(value, f.name), hints[f.name], f"{where}.{f.name}", out)


def reference_targets(record: Struct) -> list[tuple[str, Ref, Target]]:
    """Every reference in ``record`` with the field it sits in and what it may point to."""
    out: list = []
    hints = typing.get_type_hints(type(record), include_extras=True)
    for f in dataclasses.fields(record):
        _targets(getattr(record, f.name), hints[f.name], f.name, out)
    return out


# --------------------------------------------------------------------------- the records


@dataclass(frozen=True)
class ArrayManifest(Record):
    """An n-d array: its zarr v3 metadata and chunk references (C order)."""

    TYPE: ClassVar[str] = "Array"
    zarr: dict[str, Any]
    chunks: list[ChunkRef]


@dataclass(frozen=True)
class Grid(Struct):
    """Control points of a cubic B-spline grid; ``values`` has shape dimensions (+ channels)."""

    dimensions: list[int]
    values: ArrayRef


@dataclass(frozen=True)
class DeformationModel(Record):
    """Geometry corrections of one tilt series (M's deformation model)."""

    TYPE: ClassVar[str] = "DeformationModel"
    tilt_shifts_angstrom: ArrayRef  # (n_tilts, 2): x, y image shift per tilt
    tilt_angle_corrections_deg: ArrayRef  # (n_tilts, 3): stage-angle corrections about x, y, z
    image_warp: Grid | None = None  # 2-D + time grid, in image coordinates
    volume_warp: Grid | None = None  # 3-D + time grid, anchored in the sample
    movie_grids: dict[str, Grid] = field(default_factory=dict)
    # (n_tilts, 3): rotations about x, y, z (degrees) applied to particle orientations only, not positions
    # (Warp's and M's GridAngleX/Y/Z): orientation in tilt i = Rz Ry Rx · R_i · A
    orientation_corrections_deg: ArrayRef | None = later()


@dataclass(frozen=True)
class ImagingModel(Record):
    """CTF and optics per tilt (M's imaging model). Defocus positive = underfocus."""

    TYPE: ClassVar[str] = "ImagingModel"
    defocus_u_angstrom: ArrayRef  # (n_tilts,)
    defocus_v_angstrom: ArrayRef  # (n_tilts,)
    defocus_angle_deg: ArrayRef  # (n_tilts,) angle of the U axis from x, counter-clockwise
    phase_shift_deg: ArrayRef | None = None
    magnification_anisotropy: list[float] | None = None  # [major scale, minor scale, angle_deg]
    beam_tilt_mrad: list[float] | None = None  # [x, y]
    grids: dict[str, Grid] = field(default_factory=dict)


@dataclass(frozen=True)
class HalfSetModel(Struct):
    """The models one half-set's particles were refined with (gold standard: halves never share)."""

    deformation: Annotated[Ref, Target(("DeformationModel",))]
    imaging: Annotated[Ref, Target(("ImagingModel",))]


@dataclass(frozen=True)
class TiltSeries(Record):
    """One tilt series: raw images, acquisition metadata, deformation and imaging models."""

    TYPE: ClassVar[str] = "TiltSeries"
    name: str
    stack: ArrayRef  # (n_tilts, height, width), in acquisition-independent stack order
    pixel_size_angstrom: float
    voltage_kv: float
    spherical_aberration_mm: float
    amplitude_contrast: float
    tilt_axis_angle_deg: float
    tilt_angles_deg: list[float]
    exposure_e_per_angstrom2: list[float]  # dose received by each tilt
    pre_exposure_e_per_angstrom2: list[float]  # dose received before each tilt
    tomogram_size_px: list[int]  # x, y, z of the reconstructed volume, at pixel_size_angstrom
    deformation: Annotated[Ref, Target(("DeformationModel",))]
    imaging: Annotated[Ref, Target(("ImagingModel",))]
    handedness: int = 1
    refined_against: list[Annotated[Ref, Target(("Species",))]] = field(default_factory=list)
    half_set_models: dict[str, HalfSetModel] = field(default_factory=dict)  # "1", "2" after a refinement
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_tilt_series(self)

    @property
    def n_tilts(self) -> int:
        return len(self.tilt_angles_deg)


ITEM_TYPES = ("TiltSeries",)  # FrameSeries joins here when single-particle data arrives


@dataclass(frozen=True)
class DataSource(Record):
    """A named set of items (tilt series) contributed together."""

    TYPE: ClassVar[str] = "DataSource"
    name: str
    items: dict[str, Annotated[Ref, Target(ITEM_TYPES)]]
    description: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)


PARTICLE_COLUMNS = {
    "particle_id": "uint64 (n,) stable id, unique within the population",
    "item_index": "int32 (n,) index into item_names",
    "position_angstrom": "float64 (n, t, 3) x, y, z relative to the tomogram centre",
    "orientation_deg": "float64 (n, t, 3) RELION ZYZ Euler angles rot, tilt, psi",
    "half_set": "uint8 (n,) 1 or 2",
    "score": "float32 (n,)",
}


@dataclass(frozen=True)
class ParticleTable(Record):
    """Particles of one species, as columns; ``t`` temporal samples per trajectory."""

    TYPE: ClassVar[str] = "ParticleTable"
    count: int
    temporal_samples: int
    item_names: list[str]  # "source/item" keys
    columns: dict[str, ArrayRef]


@dataclass(frozen=True)
class StateDict(Record):
    """Network weights as named arrays (never a pickle)."""

    TYPE: ClassVar[str] = "StateDict"
    tensors: dict[str, ArrayRef]
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Metrics(Struct):
    resolution_angstrom: float | None = None
    fsc: ArrayRef | None = None  # (k, 2): spatial frequency 1/Å, FSC
    values: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Species(Record):
    """A macromolecule or state: half-maps, mask, particles, denoiser, metrics."""

    TYPE: ClassVar[str] = "Species"
    name: str
    symmetry: str
    diameter_angstrom: float
    pixel_size_angstrom: float
    half_map_1: ArrayRef
    half_map_2: ArrayRef
    particles: Annotated[Ref, Target(("ParticleTable",))]
    mask: ArrayRef | None = None
    denoiser: Annotated[Ref, Target(("StateDict",))] | None = None
    metrics: Metrics = field(default_factory=Metrics)
    reconstructed_from: list[Annotated[Ref, Target(ITEM_TYPES)]] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    # each half's particles split in two by particle id (half 1 A, 1 B, 2 A, 2 B): non-uniform filtering's
    # cross-validation inside one half
    quarter_maps: list[ArrayRef] | None = later()

    def __post_init__(self) -> None:
        where = f"species {self.name}"
        if self.quarter_maps is not None and len(self.quarter_maps) != 4:
            raise InvalidInputError("four quarter-maps expected (half 1 A, 1 B, 2 A, 2 B)", path=where,
                                    field="quarter_maps", expected=4, found=len(self.quarter_maps))
        physical.check("diameter_angstrom", self.diameter_angstrom, path=where, field="diameter_angstrom")
        physical.check("pixel_size_angstrom", self.pixel_size_angstrom, path=where, field="pixel_size_angstrom")
        physical.validate_symmetry(self.symmetry, path=where)


def _check_tilt_series(ts: TiltSeries) -> None:
    """Every path that builds an item (readers, simulator, refinement, a peer's push) meets the same limits."""
    where = f"tilt series {ts.name}"
    for quantity, name in (("pixel_size_angstrom", "pixel_size_angstrom"), ("voltage_kv", "voltage_kv"),
                           ("spherical_aberration_mm", "spherical_aberration_mm"),
                           ("amplitude_contrast", "amplitude_contrast"), ("angle_deg", "tilt_axis_angle_deg"),
                           ("tilt_angle_deg", "tilt_angles_deg"), ("exposure_e_per_angstrom2", "exposure_e_per_angstrom2"),
                           ("pre_exposure_e_per_angstrom2", "pre_exposure_e_per_angstrom2")):
        physical.check(quantity, getattr(ts, name), path=where, field=name, index_label="tilt")
    n = physical.check_count("tilts", len(ts.tilt_angles_deg), path=where, field="tilt_angles_deg")
    for name in ("exposure_e_per_angstrom2", "pre_exposure_e_per_angstrom2"):
        if len(getattr(ts, name)) != n:
            raise InvalidInputError("one value per tilt expected", path=where, field=name, expected=n,
                                    found=len(getattr(ts, name)))
    if len(ts.tomogram_size_px) != 3:
        raise InvalidInputError("x, y, z expected", path=where, field="tomogram_size_px", found=ts.tomogram_size_px)
    for axis, v in zip("xyz", ts.tomogram_size_px):
        physical.check_count("tomogram_size_px", v, path=where, field=f"tomogram_size_px {axis}")
    if ts.handedness not in (1, -1):
        raise InvalidInputError("handedness must be 1 or -1", path=where, field="handedness", found=ts.handedness)


@dataclass(frozen=True)
class Population(Record):
    """The whole shared project: data sources and species."""

    TYPE: ClassVar[str] = "Population"
    name: str
    data_sources: dict[str, Annotated[Ref, Target(("DataSource",))]] = field(default_factory=dict)
    species: dict[str, Annotated[Ref, Target(("Species",))]] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)


OPERATION_KINDS = ("init", "import", "refine", "merge", "edit", "simulate", "match", "tomogram")


@dataclass(frozen=True)
class Operation(Struct):
    """What produced a commit: enough to understand it and to replay it."""

    kind: str
    parameters: dict[str, Any]
    software: str
    inputs: dict[str, Ref] = field(default_factory=dict)  # any object: records, blobs of input files

    def __post_init__(self) -> None:
        if self.kind not in OPERATION_KINDS:
            raise InvalidInputError("unknown operation kind", field="operation.kind",
                                    expected=list(OPERATION_KINDS), found=self.kind)


@dataclass(frozen=True)
class Commit(Record):
    """A population snapshot in the version DAG."""

    TYPE: ClassVar[str] = "Commit"
    population: Annotated[Ref, Target(("Population",))]
    parents: list[Annotated[Ref, Target(("Commit",))]]
    author: str
    time_utc: str  # ISO 8601, "YYYY-MM-DDTHH:MM:SSZ"
    message: str
    operation: Operation
    attachments: dict[str, Ref] = field(default_factory=dict)  # e.g. simulation ground truth


RECORD_TYPES: dict[str, type[Record]] = {
    cls.TYPE: cls
    for cls in (ArrayManifest, DeformationModel, ImagingModel, TiltSeries, DataSource, ParticleTable,
                StateDict, Species, Population, Commit)
}


def parse_record(value: Any, where: str = "record") -> Record:
    """A decoded record value as its typed class (strict)."""
    if not isinstance(value, dict) or not isinstance(value.get("_type"), str):
        raise FormatError("record has no _type tag", path=where)
    cls = RECORD_TYPES.get(value["_type"])
    if cls is None:
        raise FormatError("unknown record type", path=where, field="_type", expected=sorted(RECORD_TYPES),
                          found=value["_type"])
    if value.get("_v") != cls.VERSION:
        raise FormatError("unsupported record version", path=where, field="_v", expected=cls.VERSION,
                          found=value.get("_v"))
    return cls.from_value(value, where)
