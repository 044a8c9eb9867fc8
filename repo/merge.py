"""Three-way merges of populations, with physical collisions between particles resolved by policy.

From the merge base of two commits: data sources and items are united; an
item changed on one side only is taken from that side, changed on both is a
conflict; species added on one side are added. A species changed on both
sides merges field by field (half-maps, mask, metrics… taken from the side
that changed them; changed on both is a conflict) and its particles merge
by stable particle id: a particle added, removed or changed on one side
gets that change; one changed differently on both sides is a per-particle
conflict. Population metadata merges key by key the same way. Then every item of the merged
population is checked for **collisions**: two particles (of different
species, or duplicate picks of one species) whose centres are closer than
``factor × (r₁ + r₂)`` (default factor 0.8), where at least one of them is
new to our side. Policies: ``fail`` (nothing changes; a report lists every
collision), ``ours`` (drop their particle), ``theirs`` (drop ours), ``score``
(drop the lower score; an unknown score ranks lowest; ties drop the second),
``keep-both``. The merge commit has two
parents and records the policy and every resolved collision.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field, fields, replace

import numpy as np
from scipy.spatial import cKDTree

from .errors import ConflictError, InvalidInputError
from .fsutil import write_atomic
from .hashing import ObjectId
from .population import NEEDS_REFINEMENT, item_refs, refinement_marks, with_marks
from .canonical import Ref
from .records import DataSource, Operation, ParticleTable, Population, Species
from .repository import Repository, software_version

__all__ = ["POLICIES", "CONFLICT_CHOICES", "Collision", "MergeReport", "merge_base", "find_collisions",
           "merge", "resolve", "load_state", "clear_state"]

POLICIES = ("fail", "ours", "theirs", "score", "keep-both")
# items, species and metadata keys changed on both sides; "re-refine" keeps ours and marks the item or species
# for re-refinement of the merged population (population metadata "needs_refinement"; refine clears it)
CONFLICT_CHOICES = ("fail", "ours", "theirs", "re-refine")


def merge_base(repo: Repository, a: str, b: str) -> ObjectId | None:
    """The nearest common ancestor of commits ``a`` and ``b`` (breadth-first from ``b``)."""
    seen_a: set[str] = set()
    queue = deque([a])
    while queue:
        c = queue.popleft()
        if c in seen_a:
            continue
        seen_a.add(c)
        queue.extend(p.id for p in repo.get_commit(c).parents)
    queue, seen_b = deque([b]), set()
    while queue:
        c = queue.popleft()
        if c in seen_a:
            return ObjectId(c)
        if c in seen_b:
            continue
        seen_b.add(c)
        queue.extend(p.id for p in repo.get_commit(c).parents)
    return None


@dataclass(frozen=True)
class Collision:
    item: str
    species_a: str
    id_a: int
    species_b: str
    id_b: int
    distance_angstrom: float
    threshold_angstrom: float
    dropped: str | None = None  # "a", "b" or None (kept both / unresolved)

    def as_dict(self) -> dict:
        return {"item": self.item, "a": {"species": self.species_a, "particle_id": self.id_a},
                "b": {"species": self.species_b, "particle_id": self.id_b},
                "distance_angstrom": round(self.distance_angstrom, 3),
                "threshold_angstrom": round(self.threshold_angstrom, 3), "dropped": self.dropped}

    def __str__(self) -> str:
        return (f"{self.item}: {self.species_a} #{self.id_a} and {self.species_b} #{self.id_b} are "
                f"{self.distance_angstrom:.1f} Å apart (< {self.threshold_angstrom:.1f} Å)")


@dataclass
class MergeReport:
    ours: str
    theirs: str
    base: str | None
    policy: str
    conflicts: list[str] = field(default_factory=list)
    collisions: list[Collision] = field(default_factory=list)
    commit: str | None = None
    fast_forward: bool = False
    needs_refinement: list[str] = field(default_factory=list)  # the merged population's marks


def _three_way(base, ours, theirs, what: str, conflicts: list[str], prefer: str = "fail", taken: list | None = None):
    """Merge two dicts of refs from a base: take one-sided changes; two-sided ones are conflicts unless ``prefer``
    names the side that wins (``taken`` then lists them)."""
    out = {}
    for key in sorted(set(ours) | set(theirs) | set(base)):
        b, o, t = base.get(key), ours.get(key), theirs.get(key)
        if o == t:
            value = o
        elif o == b:
            value = t
        elif t == b:
            value = o
        elif prefer in ("ours", "theirs"):
            value = o if prefer == "ours" else t
            if taken is not None:
                taken.append(f"{what} {key}: {prefer}")
        else:
            conflicts.append(f"{what} {key} changed on both sides")
            value = o
        if value is not None:
            out[key] = value
    return out


def _changed_on_both(base: dict, ours: dict, theirs: dict) -> list[str]:
    """Keys whose three versions all differ (absent counts as a version: added or removed)."""
    return sorted(k for k in set(ours) | set(theirs) | set(base)
                  if len({base.get(k), ours.get(k), theirs.get(k)}) == 3)


def _pick(key: str, b, o, t, prefer: str, conflicts: list[str], taken: list[str]):
    """One value from a three-way comparison; both sides changed it differently → ``prefer`` or a conflict."""
    if o == t or t == b:
        return o
    if o == b:
        return t
    if prefer in ("ours", "theirs"):
        taken.append(f"{key}: {prefer}")
        return o if prefer == "ours" else t
    conflicts.append(f"{key} changed on both sides")
    return o


TRAJECTORY_COLUMNS = ("position_angstrom", "orientation_deg")  # (n, temporal samples, 3)


def _table_rows(repo: Repository, ref: Ref, samples: int
                ) -> tuple[ParticleTable, dict[str, np.ndarray], dict[int, tuple]]:
    """A particle table's columns and, per stable particle id, the row's content (item by name).

    A one-pose table is given ``samples`` temporal samples by repeating its pose: the same pose at
    every dose time is the same trajectory (``trajectory``), exactly.
    """
    table = repo.get_record(ref, ParticleTable)
    cols = {k: repo.get_array(v).read() for k, v in table.columns.items()}
    if table.temporal_samples == 1 and samples > 1:
        cols = {k: np.repeat(c, samples, axis=1) if k in TRAJECTORY_COLUMNS else c for k, c in cols.items()}
        table = replace(table, temporal_samples=samples)
    other = sorted(k for k in cols if k not in ("particle_id", "item_index"))
    rows = {}
    for row, pid in enumerate(cols["particle_id"]):
        rows[int(pid)] = (table.item_names[int(cols["item_index"][row])],
                          *(cols[k][row].tobytes() for k in other))
    return table, cols, rows


def _merge_particles(repo: Repository, name: str, base: Ref, ours: Ref, theirs: Ref, prefer: str,
                     conflicts: list[str], taken: list[str]) -> tuple[Ref, dict]:
    """Particles of one species merged by stable id; returns the new table and a summary for the record.

    Where one side refined pose trajectories and the other kept one pose per particle, the one-pose
    side (and the base) are given the trajectories' temporal samples; other differences conflict.
    """
    own_samples = {side: repo.get_record(r, ParticleTable).temporal_samples for side, r in (("ours", ours),
                                                                                           ("theirs", theirs))}
    samples = max(own_samples.values())
    (tb, _, rb), (to, co, ro), (tt, ct, rt) = (_table_rows(repo, r, samples) for r in (base, ours, theirs))
    layout = {(t.temporal_samples, tuple(sorted((k, c.dtype.str, c.shape[1:]) for k, c in cols.items())))
              for t, cols in ((to, co), (tt, ct))}
    if len(layout) != 1:
        conflicts.append(f"species {name}: particle tables have different columns or temporal samples")
        return ours, {}
    summary = {"from_theirs": 0, "removed_by_theirs": 0, "conflicts": []}
    repeated = [side for side, t in own_samples.items() if t != samples]
    if repeated:
        summary["poses_repeated_to_temporal_samples"] = {"sides": repeated, "samples": samples}
    chosen: list[tuple[str, int]] = []  # (side, row)
    row_o = {int(p): i for i, p in enumerate(co["particle_id"])}
    row_t = {int(p): i for i, p in enumerate(ct["particle_id"])}
    for pid in list(row_o) + [p for p in row_t if p not in row_o]:
        b, o, t = rb.get(pid), ro.get(pid), rt.get(pid)
        if o == t or t == b:
            side = "ours" if o is not None else None
        elif o == b:
            side = "theirs" if t is not None else None
            summary["from_theirs" if t is not None else "removed_by_theirs"] += 1
        elif prefer in ("ours", "theirs"):
            side = prefer if (o if prefer == "ours" else t) is not None else None
            summary["conflicts"].append({"particle_id": pid, "taken": prefer})
        else:
            conflicts.append(f"species {name} particle {pid} changed on both sides")
            continue
        if side:
            chosen.append((side, row_o[pid] if side == "ours" else row_t[pid]))
    names = list(to.item_names) + [n for n in tt.item_names if n not in to.item_names]
    index = {n: i for i, n in enumerate(names)}
    out = {}
    for key in co:
        parts = []
        for side, row in chosen:
            table, cols = (to, co) if side == "ours" else (tt, ct)
            value = cols[key][row]
            parts.append(np.asarray(index[table.item_names[int(value)]], dtype=value.dtype)
                         if key == "item_index" else value)
        out[key] = np.stack(parts) if parts else co[key][:0]
    table = replace(to, count=len(chosen), item_names=names,
                    columns={k: repo.put_array(np.ascontiguousarray(v)) for k, v in out.items()})
    if summary["conflicts"]:
        taken.append(f"species {name}: {len(summary['conflicts'])} particle(s) changed on both sides: {prefer}")
    return repo.put_record(table), summary


def _merge_species(repo: Repository, name: str, base: Ref, ours: Ref, theirs: Ref, prefer: str,
                   conflicts: list[str], taken: list[str]) -> tuple[Ref, dict]:
    """A species changed on both sides: field by field, particles by stable id."""
    sb, so, st = (repo.get_record(r, Species) for r in (base, ours, theirs))
    values = {}
    for f in fields(Species):
        if f.name != "particles":
            values[f.name] = _pick(f"species {name}.{f.name}", getattr(sb, f.name), getattr(so, f.name),
                                   getattr(st, f.name), prefer, conflicts, taken)
    particles, summary = _merge_particles(repo, name, sb.particles, so.particles, st.particles, prefer,
                                          conflicts, taken)
    return repo.put_record(replace(so, **values, particles=particles)), summary


@dataclass
class _Particle:
    species: str
    index: int  # row in the species' table
    pid: int
    pos: np.ndarray
    radius: float
    score: float
    new: bool  # not in our side's population


def _particles(repo: Repository, pop: Population, ours_ids: dict[str, set[int]]) -> dict[str, list[_Particle]]:
    by_item: dict[str, list[_Particle]] = {}
    for name, ref in pop.species.items():
        sp = repo.get_record(ref, Species)
        t = repo.get_record(sp.particles, ParticleTable)
        ids = repo.get_array(t.columns["particle_id"]).read()
        idx = repo.get_array(t.columns["item_index"]).read()
        pos = repo.get_array(t.columns["position_angstrom"]).read().reshape(t.count, t.temporal_samples, 3)[:, 0]
        score = repo.get_array(t.columns["score"]).read()
        for row in range(t.count):
            by_item.setdefault(t.item_names[idx[row]], []).append(_Particle(
                name, row, int(ids[row]), pos[row], sp.diameter_angstrom / 2,
                float(score[row]) if np.isfinite(score[row]) else -np.inf, int(ids[row]) not in ours_ids.get(name, set())))
    return by_item


def find_collisions(repo: Repository, merged: Population, ours: Population, *, factor: float = 0.8) -> list[tuple]:
    """Pairs (item, a, b, distance, threshold) of colliding particles with at least one new to ``ours``."""
    ours_ids: dict[str, set[int]] = {}
    for name, ref in ours.species.items():
        t = repo.get_record(repo.get_record(ref, Species).particles, ParticleTable)
        ours_ids[name] = set(int(i) for i in repo.get_array(t.columns["particle_id"]).read())
    out = []
    for item, parts in sorted(_particles(repo, merged, ours_ids).items()):
        if len(parts) < 2:
            continue
        tree = cKDTree(np.stack([p.pos for p in parts]))
        reach = factor * 2 * max(p.radius for p in parts)
        for i, j in sorted(tree.query_pairs(reach)):
            a, b = parts[i], parts[j]
            if not (a.new or b.new):
                continue  # both already ours: not this merge's business
            d = float(np.linalg.norm(a.pos - b.pos))
            limit = factor * (a.radius + b.radius)
            if d < limit:
                out.append((item, a, b, d, limit))
    return out


def _drop(repo: Repository, pop: Population, drops: dict[str, set[int]]) -> Population:
    """A population without the listed particle rows (species → row indices)."""
    species = dict(pop.species)
    for name, rows in drops.items():
        if not rows:
            continue
        sp = repo.get_record(pop.species[name], Species)
        t = repo.get_record(sp.particles, ParticleTable)
        keep = np.array([r not in rows for r in range(t.count)])
        cols = {k: repo.put_array(repo.get_array(v).read()[keep]) for k, v in t.columns.items()}
        table = replace(t, count=int(keep.sum()), columns=cols)
        species[name] = repo.put_record(replace(sp, particles=repo.put_record(table)))
    return replace(pop, species=species)


def merge(repo: Repository, theirs_rev: str, *, policy: str = "fail", factor: float = 0.8,
          message: str | None = None, branch: str | None = None,
          drop: set[tuple[str, int]] | None = None, conflicts: str = "fail",
          theirs_name: str | None = None) -> MergeReport:
    """Merge ``theirs_rev`` into the branch (default: HEAD's). Raises ConflictError with the report on failure.

    ``theirs_name`` is what messages call the other side (default ``theirs_rev``; ``resolve`` passes the
    branch name the merge was started with, not the commit id it stored).

    ``drop`` settles individual collisions: a collision involving one of these (species, particle id)
    pairs drops that particle, whatever the policy; the policy decides the rest. ``conflicts``
    settles items, species and metadata keys changed on both sides: ``fail`` (report them),
    ``ours`` or ``theirs`` (that side's version wins, recorded in the merge commit).
    """
    if policy not in POLICIES:
        raise InvalidInputError("unknown collision policy", field="policy", expected=list(POLICIES), found=policy)
    if conflicts not in CONFLICT_CHOICES:
        raise InvalidInputError("unknown conflict choice", field="conflicts", expected=list(CONFLICT_CHOICES),
                                found=conflicts)
    if not factor > 0:
        raise InvalidInputError("collision factor must be > 0", field="factor", found=factor)
    ref_name = repo.branch_ref(branch)
    ours_id = repo.refs.read(ref_name)
    theirs_id = repo.resolve(theirs_rev)
    theirs_rev = theirs_name or theirs_rev
    if ours_id is None:
        raise InvalidInputError("the branch has no commits to merge into")
    base = merge_base(repo, ours_id, theirs_id)
    report = MergeReport(ours_id, theirs_id, base, policy)
    if base == theirs_id:
        return report  # already contained
    if base == ours_id:  # fast-forward: nothing of ours to reconcile, no new particles against ours
        repo.refs.update(ref_name, theirs_id, expected=ours_id, author="merge",
                         message=f"merge: fast-forward to {theirs_rev}")
        report.commit, report.fast_forward = theirs_id, True
        return report
    pb = repo.population(base) if base else Population(name="population")
    po, pt = repo.population(ours_id), repo.population(theirs_id)
    found_conflicts: list[str] = []
    taken: list[str] = []
    prefer = "ours" if conflicts == "re-refine" else conflicts
    items_b, items_o, items_t = item_refs(repo, pb), item_refs(repo, po), item_refs(repo, pt)
    items = _three_way(items_b, items_o, items_t, "item", found_conflicts, prefer, taken)
    marks = [f"item {k}" for k in _changed_on_both(items_b, items_o, items_t)] if conflicts == "re-refine" else []
    kept = [set(refinement_marks(p)) for p in (pb, po, pt)]  # marks merge as sets: one side's clearing wins
    marks += sorted((kept[1] | kept[2]) - ((kept[0] - kept[1]) | (kept[0] - kept[2])))
    both = [k for k in _changed_on_both(pb.species, po.species, pt.species)  # merged particle by particle below
            if k in pb.species and k in po.species and k in pt.species]
    species = _three_way({k: v for k, v in pb.species.items() if k not in both},
                         {k: v for k, v in po.species.items() if k not in both},
                         {k: v for k, v in pt.species.items() if k not in both},
                         "species", found_conflicts, prefer, taken)
    marks += [f"species {k}" for k in _changed_on_both(pb.species, po.species, pt.species)
              if k not in both] if conflicts == "re-refine" else []
    metadata = _three_way(*({k: v for k, v in p.metadata.items() if k != NEEDS_REFINEMENT} for p in (pb, po, pt)),
                          "population metadata key", found_conflicts, prefer, taken)
    with repo.transaction() as tx:
        particle_merges = {}
        for name in both:
            settled = len(taken)
            species[name], particle_merges[name] = _merge_species(tx, name, pb.species[name], po.species[name],
                                                                  pt.species[name], prefer, found_conflicts, taken)
            if conflicts == "re-refine" and len(taken) > settled:
                marks.append(f"species {name}")
        species = dict(sorted(species.items()))
        if found_conflicts:
            report.conflicts = found_conflicts
            shown = "; ".join(found_conflicts[:8]) + (f" … ({len(found_conflicts)} in all)"
                                                      if len(found_conflicts) > 8 else "")
            raise ConflictError("merge has conflicts: " + shown,
                                hint="keep one side's version (--conflicts ours|theirs), re-refine one side on "
                                     "top of the other, or merge the other way")
        sources: dict[str, dict] = {}
        for key, ref in items.items():
            s, name = key.split("/", 1)
            sources.setdefault(s, {})[name] = ref
        data_sources = {}
        for s, its in sources.items():
            old = po.data_sources.get(s) or pt.data_sources.get(s)
            ds = tx.get_record(old, DataSource)
            data_sources[s] = tx.put_record(replace(ds, items=its))
        merged = with_marks(replace(po, data_sources=data_sources, species=species, metadata=metadata), marks)
        report.needs_refinement = refinement_marks(merged)
        found = find_collisions(tx, merged, po, factor=factor)
        drops: dict[str, set[int]] = {}
        drop = drop or set()
        for item, a, b, d, limit in found:
            if (a.species, a.pid) in drop or (b.species, b.pid) in drop:
                loser = "a" if (a.species, a.pid) in drop else "b"
            elif policy == "fail" or policy == "keep-both":
                loser = None
            elif policy == "ours":
                loser = "b" if b.new else "a"
            elif policy == "theirs":
                loser = "a" if not a.new else "b"
            else:  # score
                if not (np.isfinite(a.score) or np.isfinite(b.score)):
                    raise ConflictError(f"--policy score needs scores, and neither particle has one: {a.species} "
                                        f"{a.pid} and {b.species} {b.pid} in {item}",
                                        hint="choose --policy ours, theirs or keep-both, or settle collisions one by "
                                             "one with 'cryopool resolve --drop SPECIES:ID'")
                loser = "a" if a.score < b.score else "b"
            if loser:
                victim = a if loser == "a" else b
                drops.setdefault(victim.species, set()).add(victim.index)
            report.collisions.append(Collision(item, a.species, a.pid, b.species, b.pid, d, limit, loser))
        unsettled = [c for c in report.collisions if c.dropped is None]
        if policy == "fail" and unsettled:
            error = ConflictError(f"{len(unsettled)} particle collision(s): " +
                                  "; ".join(str(c) for c in unsettled[:5]) + (" …" if len(unsettled) > 5 else ""),
                                  hint="choose --policy ours, theirs, score or keep-both, or settle them one by "
                                       "one with 'cryopool resolve --drop SPECIES:ID'")
            error.collisions = unsettled  # the full report, for callers to show
            _save_state(repo, {"theirs": theirs_id, "theirs_rev": theirs_rev, "ours": ours_id, "base": base,
                               "factor": factor, "branch": branch, "drop": sorted([list(x) for x in drop]),
                               "conflicts": conflicts,
                               "collisions": [c.as_dict() for c in unsettled]})
            raise error
        for name, rows in drops.items():  # a species is never emptied by a policy: that is a decision to say aloud
            count = tx.get_record(tx.get_record(merged.species[name], Species).particles, ParticleTable).count
            if len(rows) >= count:
                raise ConflictError(f"resolving the collisions this way would remove every particle of species "
                                    f"{name} ({count})", hint="keep some (--policy keep-both, or resolve --drop one "
                                                            "by one), or remove the species deliberately")
        merged = _drop(tx, merged, drops)
        operation = Operation(kind="merge", software=software_version(),
                              inputs={"ours": tx.get_commit(ours_id).population, "theirs":
                                      tx.get_commit(theirs_id).population},
                              parameters={"policy": policy, "factor": factor, "base": base, "theirs": theirs_id,
                                          "collisions": [c.as_dict() for c in report.collisions],
                                          **({"conflicts": conflicts, "conflicts_taken": taken} if taken else {}),
                                          **({"particle_merges": particle_merges} if particle_merges else {}),
                                          **({"needs_refinement": sorted(set(marks))} if marks else {})})
        msg = message or (f"Merge {theirs_rev}: {len(report.collisions)} collision(s), policy {policy}")
        report.commit = tx.commit(merged, message=msg, operation=operation, branch=branch, retries=0,
                                  extra_parents=[theirs_id])
    clear_state(repo)
    return report


STATE_FILE = "MERGE"


def _save_state(repo: Repository, state: dict) -> None:
    """Keep an unfinished merge (its ids are gc/verify roots while it waits) for ``resolve``."""
    if repo.root is not None:
        write_atomic(repo.root / "state" / STATE_FILE, json.dumps(state, indent=2).encode(), repo.root / "tmp")


def load_state(repo: Repository) -> dict | None:
    path = None if repo.root is None else repo.root / "state" / STATE_FILE
    return json.loads(path.read_text()) if path is not None and path.is_file() else None


def clear_state(repo: Repository) -> None:
    if repo.root is not None:
        (repo.root / "state" / STATE_FILE).unlink(missing_ok=True)


def resolve(repo: Repository, *, policy: str = "fail", drop: set[tuple[str, int]] | None = None,
            message: str | None = None) -> MergeReport:
    """Continue the stored unfinished merge with more decisions; commits once every collision is settled."""
    state = load_state(repo)
    if state is None:
        raise InvalidInputError("no unfinished merge to resolve")
    if repo.refs.read(repo.branch_ref(state["branch"])) != state["ours"]:
        raise ConflictError("the branch moved since the merge stopped", hint="cryopool resolve --abort, then merge again")
    decided = {tuple(x) for x in state["drop"]} | set(drop or ())
    return merge(repo, state["theirs"], theirs_name=state["theirs_rev"], policy=policy, factor=state["factor"],
                 message=message,
                 branch=state["branch"], drop=decided, conflicts=state.get("conflicts", "fail"))
