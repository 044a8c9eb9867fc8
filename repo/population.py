"""Reading and editing populations: pure functions from one population to the next."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import blake3
import numpy as np

from .canonical import Ref
from .errors import AlreadyExistsError, InvalidInputError, NotFoundError
from .records import DataSource, ParticleTable, Population, Species, TiltSeries, validate_name

__all__ = ["stable_particle_ids", "item_key", "export_names", "split_item_key", "iter_items", "item_refs", "find_item",
           "with_item", "with_items", "with_species",
           "empty_population", "population_summary", "NEEDS_REFINEMENT", "refinement_marks", "with_marks",
           "without_marks", "without_species", "without_item"]

NEEDS_REFINEMENT = "needs_refinement"  # population metadata: ["item SRC/ITEM", "species NAME", ...]


def item_key(source: str, item: str) -> str:
    return f"{source}/{item}"


def split_item_key(key: str) -> tuple[str, str]:
    source, sep, item = key.partition("/")
    if not sep:
        raise InvalidInputError("item key must be 'source/item'", found=repr(key))
    return source, item


def export_names(keys: list[str]) -> dict[str, str]:
    """File names for items in an export: the item name, or ``source_item`` where two sources share a name."""
    items = [split_item_key(k)[1] for k in keys]
    return {k: (i if items.count(i) == 1 else k.replace("/", "_")) for k, i in zip(keys, items)}


def empty_population(name: str = "population") -> Population:
    return Population(name=validate_name(name, "population"))


def iter_items(repo, population: Population) -> Iterator[tuple[str, Ref, TiltSeries]]:
    """Every item as ("source/item", ref, record), sources and items in name order."""
    for source_name in sorted(population.data_sources):
        source = repo.get_record(population.data_sources[source_name], DataSource)
        for item_name in sorted(source.items):
            ref = source.items[item_name]
            yield item_key(source_name, item_name), ref, repo.get_record(ref)


def item_refs(repo, population: Population) -> dict[str, Ref]:
    """Every item's current version by "source/item" key, without opening the items."""
    out = {}
    for source_name in sorted(population.data_sources):
        source = repo.get_record(population.data_sources[source_name], DataSource)
        for item_name in sorted(source.items):
            out[item_key(source_name, item_name)] = source.items[item_name]
    return out


def find_item(repo, population: Population, name: str) -> tuple[str, Ref]:
    """Resolve ``source/item`` or a bare item name that is unique across sources."""
    if "/" in name:
        source_name, item_name = split_item_key(name)
        if source_name in population.data_sources:
            source = repo.get_record(population.data_sources[source_name], DataSource)
            if item_name in source.items:
                return name, source.items[item_name]
        raise NotFoundError(f"no item '{name}' in the population")
    hits = []
    for source_name in sorted(population.data_sources):
        source = repo.get_record(population.data_sources[source_name], DataSource)
        if name in source.items:
            hits.append((item_key(source_name, name), source.items[name]))
    if not hits:
        raise NotFoundError(f"no item named '{name}' in any data source")
    if len(hits) > 1:
        raise InvalidInputError(f"item name '{name}' is ambiguous", expected="source/item",
                                found=[k for k, _ in hits])
    return hits[0]


def with_item(repo, population: Population, source_name: str, item_name: str, item: Ref,
              *, replace_existing: bool = False) -> Population:
    """A population with ``item`` under ``source_name`` (the source is created if new)."""
    validate_name(source_name, "data source")
    validate_name(item_name, "item")
    return with_items(repo, population, {item_key(source_name, item_name): item}, replace_existing=replace_existing)


def with_items(repo, population: Population, items: dict[str, Ref], *, replace_existing: bool = False) -> Population:
    """Many items ("source/item" keys) at once: one new record per data source, not one per item."""
    by_source: dict[str, dict[str, Ref]] = {}
    for key, ref in items.items():
        source, name = split_item_key(key)
        validate_name(source, "data source")
        validate_name(name, "item")
        by_source.setdefault(source, {})[name] = ref
    sources = dict(population.data_sources)
    for source_name, new in sorted(by_source.items()):
        source = (repo.get_record(sources[source_name], DataSource) if source_name in sources
                  else DataSource(name=source_name, items={}))
        clash = sorted(set(new) & set(source.items))
        if clash and not replace_existing:
            raise AlreadyExistsError(f"item '{item_key(source_name, clash[0])}' already exists",
                                     hint="to correct it: 'cryopool rm item SOURCE/ITEM', then import again "
                                          "(history keeps the old version); to keep both: another --name or --source")
        sources[source_name] = repo.put_record(replace(source, items={**source.items, **new}))
    return replace(population, data_sources=sources)


def with_species(repo, population: Population, species: Ref, *, replace_existing: bool = False) -> Population:
    record = repo.get_record(species, Species)
    if record.name in population.species and not replace_existing:
        raise AlreadyExistsError(f"species '{record.name}' already exists")
    return replace(population, species={**population.species, record.name: species})


def without_species(population: Population, name: str) -> Population:
    """The population without species ``name`` (its versions stay in history)."""
    if name not in population.species:
        raise NotFoundError(f"no species '{name}' in the population")
    return replace(population, species={k: v for k, v in population.species.items() if k != name})


def without_item(repo, population: Population, key: str) -> Population:
    """The population without item ``source/item``; refused while a species has particles in it."""
    key, _ = find_item(repo, population, key)
    users = []
    for name, ref in sorted(population.species.items()):
        table = repo.get_record(repo.get_record(ref, Species).particles, ParticleTable)
        if key in table.item_names:
            index = table.item_names.index(key)
            if (repo.get_array(table.columns["item_index"]).read() == index).any():
                users.append(name)
    if users:
        raise InvalidInputError(f"species {', '.join(users)} have particles in {key}", field="item", found=key,
                                hint="remove those species (or their particles in it) first")
    source_name, item_name = split_item_key(key)
    source = repo.get_record(population.data_sources[source_name], DataSource)
    items = {k: v for k, v in source.items.items() if k != item_name}
    sources = dict(population.data_sources)
    if items:
        sources[source_name] = repo.put_record(replace(source, items=items))
    else:
        del sources[source_name]
    return replace(population, data_sources=sources)


def population_summary(repo, population: Population) -> dict:
    """Counts a scientist wants at a glance (used by status/show/demo)."""
    items = list(iter_items(repo, population))
    species = {}
    for name in sorted(population.species):
        sp = repo.get_record(population.species[name], Species)
        table = repo.get_record(sp.particles, ParticleTable)
        species[name] = {
            "particles": table.count,
            "resolution_angstrom": sp.metrics.resolution_angstrom,
            "box_px": repo.get_array(sp.half_map_1).shape[0],
            "pixel_size_angstrom": sp.pixel_size_angstrom,
            "symmetry": sp.symmetry,
        }
    return {
        "name": population.name,
        "data_sources": len(population.data_sources),
        "items": len(items),
        "tilts": sum(ts.n_tilts for _, _, ts in items),
        "species": species,
    }


def refinement_marks(population: Population) -> list[str]:
    """What a merge left for re-refinement ("item SRC/ITEM", "species NAME"); refine clears what it refines."""
    return list(population.metadata.get(NEEDS_REFINEMENT, []))


def with_marks(population: Population, marks: list[str]) -> Population:
    metadata = {k: v for k, v in population.metadata.items() if k != NEEDS_REFINEMENT}
    if marks:
        metadata[NEEDS_REFINEMENT] = sorted(set(marks))
    return replace(population, metadata=metadata)


def without_marks(population: Population, *, items: list[str] = (), species: list[str] = ()) -> Population:
    """The population with the marks of these items and species cleared (they were just refined)."""
    done = {f"item {k}" for k in items} | {f"species {n}" for n in species}
    return with_marks(population, [m for m in refinement_marks(population) if m not in done])


def stable_particle_ids(species: str, item_keys: list[str], positions: np.ndarray) -> np.ndarray:
    """uint64 ids from the species name, the item, the row and the position.

    Deterministic (re-importing the same table gives the same ids, so the
    same hashes) and, at 64 bits, unique in practice across labs; uniqueness
    within a table is checked.
    """
    ids = np.empty(len(item_keys), dtype=np.uint64)
    for i, (key, pos) in enumerate(zip(item_keys, positions)):
        h = blake3.blake3(f"{species}\0{key}\0{i}\0".encode() + np.asarray(pos, "<f8").tobytes(),
                          derive_key_context="cryopool 2026-11-21 particle id v1")
        ids[i] = int.from_bytes(h.digest(8), "little")
    if len(np.unique(ids)) != len(ids):
        raise InvalidInputError("particle id collision; rename the species and import again")
    return ids
