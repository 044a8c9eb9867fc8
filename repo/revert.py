"""Reverting a commit: undo what one commit changed, on top of everything committed since.

Per item, species and population metadata key (the units a merge reconciles), a three-way
choice with the commit as base and its first parent as the target: what the commit changed and
nobody touched since goes back to its earlier version; what it changed and a later commit changed
again is a conflict, refused with its names (undo the later change first, or edit by hand).
"""

from __future__ import annotations

from dataclasses import replace

from .errors import ConflictError, InvalidInputError
from .hashing import ObjectId
from .population import item_refs, split_item_key
from .records import DataSource, Operation, Population
from .repository import Repository, software_version

__all__ = ["revert"]


def _undo(what: str, now: dict, after: dict, before: dict, conflicts: list[str]) -> dict:
    """Key by key: what the commit changed (``before`` → ``after``) and nobody touched since goes back;
    what was changed again since is a conflict (named in ``conflicts``, left as it is)."""
    out = {}
    for key in sorted(set(now) | set(after) | set(before)):
        value, changed_to, earlier = now.get(key), after.get(key), before.get(key)
        if changed_to != earlier:  # the commit touched it
            if value == changed_to:
                value = earlier
            else:
                conflicts.append(f"{what} {key}")
        if value is not None:
            out[key] = value
    return out


def revert(repo: Repository, rev: str, *, branch: str | None = None, message: str | None = None) -> ObjectId:
    """A new commit on the branch that undoes ``rev`` (a commit with one parent, reachable or not)."""
    target = repo.resolve(rev)
    commit = repo.get_commit(target)
    if len(commit.parents) != 1:
        raise InvalidInputError("only a commit with one parent can be reverted", field="rev", found=rev,
                                hint="to undo a merge, reset to its first parent ('cryopool reset REV~1')")
    after, before = repo.population(target), repo.population(commit.parents[0].id)

    def update(now: Population | None) -> Population:
        if now is None:
            raise InvalidInputError("the branch has no commits")
        conflicts: list[str] = []
        items = _undo("item", item_refs(repo, now), item_refs(repo, after), item_refs(repo, before), conflicts)
        species = _undo("species", now.species, after.species, before.species, conflicts)
        metadata = _undo("metadata", now.metadata, after.metadata, before.metadata, conflicts)
        if conflicts:
            raise ConflictError(f"changed again since {rev}: " + ", ".join(conflicts),
                                hint="revert the later commits first (newest first), or change these by hand")
        sources: dict[str, dict] = {}
        for key, ref in items.items():
            source, item = split_item_key(key)
            sources.setdefault(source, {})[item] = ref
        data_sources = {}
        for name, its in sorted(sources.items()):
            old = now.data_sources.get(name) or before.data_sources.get(name) or after.data_sources.get(name)
            data_sources[name] = repo.put_record(replace(repo.get_record(old, DataSource), items=its))
        return replace(now, data_sources=data_sources, species=species, metadata=metadata)

    return repo.commit(update, message=message or f"Revert \"{commit.message.splitlines()[0]}\" ({target[:12]})",
                       branch=branch, operation=Operation(kind="edit", software=software_version(),
                                                          parameters={"reverted": target}))
