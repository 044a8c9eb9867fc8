"""cryopool.repo: the content-addressed population repository (no torch, no engine).

Layers, lowest first: ``hashing``/``canonical`` (ids and encoding) ←
``store`` (objects) and ``refs`` (names) ← ``arrays``/``records`` (typed
content) ← ``repository`` (the API) ← ``population``, ``verify``, ``gc``,
``diff``, ``importers`` (porcelain).
"""

from .canonical import Ref
from .errors import (
    AlreadyExistsError,
    ConflictError,
    CryopoolError,
    FormatError,
    IntegrityError,
    InvalidInputError,
    LockedError,
    NotFoundError,
)
from .hashing import Kind, ObjectId, hash_bytes
from .records import (
    ArrayManifest,
    Commit,
    DataSource,
    DeformationModel,
    Grid,
    HalfSetModel,
    ImagingModel,
    Metrics,
    Operation,
    ParticleTable,
    Population,
    Species,
    StateDict,
    TiltSeries,
)
from .population import (find_item, item_key, item_refs, iter_items, population_summary, refinement_marks,
                         split_item_key, stable_particle_ids, with_item, with_items, with_marks, with_species,
                         without_marks)
from .particles import particle_table
from .ingest import ItemModel, TiltSeriesDraft, put_stack, put_tilt_series
from .repository import Head, Repository, software_version
from .trajectory import MAX_TEMPORAL_SAMPLES, dose_times, trajectory_weights
from .version import __version__

__all__ = [
    "Ref", "Kind", "ObjectId", "hash_bytes", "Repository", "Head", "__version__",
    "CryopoolError", "NotFoundError", "AlreadyExistsError", "ConflictError", "LockedError", "IntegrityError",
    "FormatError", "InvalidInputError",
    "ArrayManifest", "Commit", "DataSource", "DeformationModel", "Grid", "HalfSetModel", "ImagingModel", "Metrics",
    "Operation",
    "ParticleTable", "Population", "Species", "StateDict", "TiltSeries",
    "item_key", "item_refs", "split_item_key", "iter_items", "find_item", "stable_particle_ids", "with_item",
    "with_items", "with_species", "population_summary",
    "software_version", "particle_table", "ItemModel", "TiltSeriesDraft", "put_stack", "put_tilt_series",
    "refinement_marks", "with_marks", "without_marks", "MAX_TEMPORAL_SAMPLES", "dose_times", "trajectory_weights",
    "readable_at",
]


def __getattr__(name: str):
    """``readable_at`` on first use only: it brings the network layer (httpx, fsspec), which opening a repository,
    and with it status/log/show, never pays for."""
    if name == "readable_at":
        from .remote import readable_at
        return readable_at
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
