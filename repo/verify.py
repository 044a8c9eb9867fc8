"""``verify``: recompute every reachable object's hash and check the version DAG.

Starting from every ref (and, by default, every reflog entry), the walk reads
each object, recomputes its BLAKE3 id from content (skipped with ``quick``),
decodes records strictly, checks that each reference points to an object of
the declared kind and record type, checks a few invariants that tie records
together (tilt counts, particle column lengths), and finally checks that the
object graph is acyclic with networkx.  Every problem names the bad object
and who refers to it.
"""

from __future__ import annotations

import os
import re
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import networkx as nx

from . import canonical
from .errors import CryopoolError
from .hashing import Kind, ObjectId
from .records import (ArrayManifest, Commit, ParticleTable, Record, Species, TiltSeries, parse_record,
                      reference_targets)
from .repository import Repository

__all__ = ["verify", "VerifyReport", "Problem", "roots"]


@dataclass(frozen=True)
class Problem:
    object_id: str
    problem: str
    referrers: tuple[str, ...] = ()

    def __str__(self) -> str:
        via = f" (referred to by {', '.join(self.referrers[:3])}{' …' if len(self.referrers) > 3 else ''})" \
            if self.referrers else ""
        return f"{self.object_id}: {self.problem}{via}"


@dataclass
class VerifyReport:
    problems: list[Problem] = field(default_factory=list)
    objects: int = 0
    records: int = 0
    bytes_hashed: int = 0
    commits: int = 0
    seconds: float = 0.0
    quick: bool = False
    deferred: int = 0  # chunks a partial clone has not fetched yet (not a problem: the remote holds them)
    temporary_bytes: int = 0  # left in .cryopool/tmp by killed operations (not a problem: `gc` clears it)

    @property
    def ok(self) -> bool:
        return not self.problems


def roots(repo: Repository, *, include_reflogs: bool = True) -> dict[ObjectId, list[str]]:
    """Everything that keeps objects alive, with a label for each."""
    out: dict[ObjectId, list[str]] = {}
    for name, value in repo.refs.list("refs/").items():
        out.setdefault(value, []).append(name)
    if repo.refs.head_target() is None:
        head = repo.refs.read("HEAD")
        if head is not None:
            out.setdefault(head, []).append("HEAD")
    if include_reflogs:
        for name in repo.refs.reflog_names():
            for entry in repo.refs.reflog(name):
                for value in (entry.old, entry.new):
                    if value is not None:
                        out.setdefault(value, []).append(f"reflog of {name}")
    for value, label in _extra_roots(repo):
        out.setdefault(value, []).append(label)
    return out


def _extra_roots(repo: Repository) -> list[tuple[ObjectId, str]]:
    """Unfinished operations keep their objects alive (e.g. a stored merge state)."""
    if repo.root is None:
        return []
    found = []
    state_dir = repo.root / "state"
    if state_dir.is_dir():
        for path in sorted(state_dir.iterdir()):
            text = path.read_text(errors="replace")
            for token in sorted(set(re.findall(r"(?<![0-9a-f])[0-9a-f]{64}(?![0-9a-f])", text))):
                found.append((ObjectId(token), f"state/{path.name}"))
    return found


def _semantic(record: Record, repo: Repository) -> list[str]:
    """Cross-record invariants that the types alone cannot express."""
    issues = []
    try:
        if isinstance(record, TiltSeries):
            n = record.n_tilts
            for name in ("exposure_e_per_angstrom2", "pre_exposure_e_per_angstrom2"):
                if len(getattr(record, name)) != n:
                    issues.append(f"{name} has {len(getattr(record, name))} values for {n} tilts")
            shape = repo.get_array(record.stack).shape
            if shape[0] != n:
                issues.append(f"stack has {shape[0]} images for {n} tilt angles")
        elif isinstance(record, ParticleTable):
            for name, ref in record.columns.items():
                rows = repo.get_array(ref).shape[0]
                if rows != record.count:
                    issues.append(f"column {name} has {rows} rows, table count is {record.count}")
        elif isinstance(record, Species):
            shapes = {repo.get_array(r).shape for r in (record.half_map_1, record.half_map_2) if r}
            if len(shapes) != 1:
                issues.append(f"half-maps differ in shape: {sorted(shapes)}")
    except CryopoolError as exc:  # a missing target is reported by the walk itself
        issues.append(f"could not check contents: {exc}")
    return issues


def verify(repo: Repository, *, quick: bool = False, include_reflogs: bool = True,
           progress: Callable[[int, int], None] | None = None, workers: int | None = None,
           start: dict[ObjectId, list[str]] | None = None) -> VerifyReport:
    """Check everything reachable; ``quick`` checks structure only (no re-hashing of leaves).

    ``progress(done, total)`` follows the re-hashing of chunks and blobs (the long part).
    ``start`` checks only what is reachable from these commits (id → labels), e.g. a
    commit a client asks the server to point a ref at.
    """
    t0 = time.perf_counter()
    report = VerifyReport(quick=quick)
    referrers: dict[str, list[str]] = {}
    kinds: dict[str, Kind] = {}
    graph = nx.DiGraph()
    queue: deque[tuple[ObjectId, Kind | None, tuple[str, ...], str]] = deque()
    leaves: list[ObjectId] = []
    seen: set[str] = set()

    partial = bool(repo.config.get("partial"))

    def problem(object_id: str, text: str) -> None:
        report.problems.append(Problem(object_id, text, tuple(referrers.get(object_id, []))))

    if start is None and hasattr(repo.refs, "problems"):  # HEAD, ref and reflog files, byte for byte
        for path, text in repo.refs.problems():
            report.problems.append(Problem(path, text))
    try:
        start_at = start if start is not None else roots(repo, include_reflogs=include_reflogs)
    except CryopoolError as exc:  # a ref that cannot be read at all: reported above, or here
        report.problems.append(Problem("refs", str(exc)))
        start_at = {}
    for object_id, labels in start_at.items():
        referrers.setdefault(object_id, []).extend(labels)
        queue.append((object_id, Kind.RECORD, ("Commit",), ", ".join(labels)))

    while queue:
        object_id, want_kind, want_types, via = queue.popleft()
        graph.add_node(object_id)
        if object_id in seen:
            _check_expectation(object_id, kinds.get(object_id), None, want_kind, want_types, via, problem)
            continue
        seen.add(object_id)
        if not repo.store.has(object_id):
            if partial and want_kind == Kind.CHUNK:
                report.deferred += 1
            else:
                problem(object_id, "missing object")
            continue
        report.objects += 1
        try:
            info_kind = repo.store.info(object_id).kind
        except CryopoolError as exc:
            problem(object_id, str(exc.message))
            continue
        kinds[object_id] = info_kind
        if info_kind != Kind.RECORD:
            _check_expectation(object_id, info_kind, None, want_kind, want_types, via, problem)
            if not quick:
                leaves.append(object_id)
            continue
        try:
            kind, data = repo.store.get(object_id, verify=not quick)
            report.bytes_hashed += 0 if quick else len(data)
            record = parse_record(canonical.decode(data, where=f"object {object_id}"), f"object {object_id}")
        except CryopoolError as exc:
            problem(object_id, exc.message if exc.path == f"object {object_id}" else str(exc))
            continue
        report.records += 1
        report.commits += isinstance(record, Commit)
        _check_expectation(object_id, Kind.RECORD, record.TYPE, want_kind, want_types, via, problem)
        for text in _semantic(record, repo) if not isinstance(record, ArrayManifest) else ():
            problem(object_id, f"{record.TYPE}: {text}")
        label = f"{record.TYPE} {object_id[:12]}"
        for field_path, ref, target in reference_targets(record):
            where = f"{label}.{field_path}"
            graph.add_edge(object_id, ref.id)
            referrers.setdefault(ref.id, []).append(where)
            if ref.kind != target.kind:
                problem(object_id, f"field {field_path} refers to a {ref.kind.name.lower()}, "
                                   f"expected a {target.kind.name.lower()}")
            queue.append((ref.id, ref.kind, target.types, where))

    if leaves:
        def check(object_id: ObjectId) -> tuple[ObjectId, int, str | None]:
            try:
                _, data = repo.store.get(object_id, verify=True)
                return object_id, len(data), None
            except CryopoolError as exc:
                return object_id, 0, exc.message
        with ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:
            results = pool.map(check, leaves, chunksize=max(1, len(leaves) // 256))
            for done, (object_id, nbytes, error) in enumerate(results, 1):
                report.bytes_hashed += nbytes
                if error:
                    problem(object_id, error)
                if progress:
                    progress(done, len(leaves))

    if not nx.is_directed_acyclic_graph(graph):
        cycle = nx.find_cycle(graph)
        problem(cycle[0][0], "the object graph has a cycle: " + " -> ".join(e[0][:12] for e in cycle))
    if repo.root is not None and (repo.root / "tmp").is_dir():
        report.temporary_bytes = sum(p.stat().st_size for p in (repo.root / "tmp").rglob("*")
                                     if p.is_file() and not p.is_symlink())
    report.seconds = time.perf_counter() - t0
    return report


def _check_expectation(object_id, kind, record_type, want_kind, want_types, via, problem) -> None:
    if kind is None or want_kind is None:
        return
    if kind != want_kind:
        problem(object_id, f"is a {kind.name.lower()}, but {via} expects a {want_kind.name.lower()}")
        return
    if record_type is not None and "*" not in want_types and record_type not in want_types:
        problem(object_id, f"is a {record_type} record, but {via} expects {' or '.join(want_types)}")
