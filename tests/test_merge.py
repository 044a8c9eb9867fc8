"""Three-way merges with particle collisions, on two labs' branches of one simulated population."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import TILT_ARGS, write_mrc, write_particles
from cryopool.cli.main import cli
from cryopool.repo import Repository
from cryopool.repo.errors import ConflictError
from cryopool.repo.importers import import_species, import_tilt_series
from cryopool.repo.gc import reachable
from cryopool.repo.merge import load_state, merge, merge_base
from cryopool.repo.population import item_refs, refinement_marks
from cryopool.repo.records import Operation, ParticleTable, Species
from cryopool.repo.verify import verify


def _rows(item, coords, angles=(0.0, 0.0, 0.0)):
    return [{"rlnTomoName": item, "rlnCenteredCoordinateXAngst": x, "rlnCenteredCoordinateYAngst": y,
             "rlnCenteredCoordinateZAngst": z, "rlnAngleRot": angles[0], "rlnAngleTilt": angles[1],
             "rlnAnglePsi": angles[2], "rlnRandomSubset": i % 2 + 1, "rlnMaxValueProbDistribution": s}
            for i, (x, y, z, s) in enumerate(coords)]


@pytest.fixture
def labs(tmp_path, inputs):
    """Lab A: two tilt series and species S1 (200 Å) on main. Lab B (a branch from there): species S2 (100 Å)
    with two planted collisions against S1, one duplicate pair, and two clean particles."""
    repo = Repository.init(tmp_path / "pop")
    import_tilt_series(repo, inputs["ts1"], source="lab_a", **TILT_ARGS)
    import_tilt_series(repo, inputs["ts2"], source="lab_a", **TILT_ARGS)
    s1 = write_particles(tmp_path / "s1.star", _rows("TS_01", [(0, 0, 0, 0.9), (400, 0, 0, 0.9)]) +
                         _rows("TS_02", [(0, 0, 0, 0.9)]))
    import_species(repo, "S1", half_map_1=inputs["half1"], half_map_2=inputs["half2"], particles=s1,
                   diameter_angstrom=200)
    repo.create_branch("lab-b")
    repo.checkout("lab-b")
    vol = np.random.default_rng(3).normal(size=(16, 16, 16)).astype(np.float32)
    h = write_mrc(tmp_path / "s2.mrc", vol)
    s2 = write_particles(tmp_path / "s2.star",
                         _rows("TS_01", [(50, 0, 0, 0.5),      # collides with S1 #0 (50 < 0.8 * 150)
                                         (400, 60, 0, 0.99),   # collides with S1 #1, higher score
                                         (-400, -400, 0, 0.7), (-410, -400, 0, 0.6),  # duplicate pick
                                         (-400, 400, 0, 0.8)]) +
                         _rows("TS_02", [(300, 300, 0, 0.8)]))
    import_species(repo, "S2", half_map_1=h, half_map_2=h, particles=s2, diameter_angstrom=100)
    repo.checkout("main")
    return repo


def _move_main(repo):
    """Lab A commits after lab B branched off, so the merge is a real three-way merge."""
    repo.commit(lambda p: dataclasses.replace(p, metadata={**p.metadata, "note": "lab A moved on"}), message="note",
                operation=Operation(kind="edit", parameters={}, software="t"))


def _counts(repo, rev="HEAD"):
    pop = repo.population(rev)
    return {n: repo.get_record(repo.get_record(r, Species).particles, ParticleTable).count
            for n, r in pop.species.items()}


def test_merge_base(labs):
    assert merge_base(labs, labs.resolve("main"), labs.resolve("lab-b")) == labs.resolve("main")


def test_fail_policy_reports_every_collision_and_changes_nothing(labs):
    _move_main(labs)
    before = labs.resolve("main")
    with pytest.raises(ConflictError) as info:
        merge(labs, "lab-b")
    text = str(info.value)
    assert "3 particle collision(s)" in text and "lab_a/TS_01" in text
    assert labs.resolve("main") == before


@pytest.mark.parametrize("policy,expected", [("ours", {"S1": 3, "S2": 3}), ("theirs", {"S1": 1, "S2": 5}),
                                             ("score", {"S1": 2, "S2": 4}), ("keep-both", {"S1": 3, "S2": 6})])
def test_policies_particle_by_particle(labs, policy, expected):
    _move_main(labs)
    report = merge(labs, "lab-b", policy=policy)
    assert len(report.collisions) == 3 and _counts(labs) == expected
    commit = labs.get_commit(report.commit)
    assert [p.id for p in commit.parents] == [report.ours, report.theirs]
    assert commit.operation.kind == "merge" and commit.operation.parameters["policy"] == policy
    recorded = commit.operation.parameters["collisions"]
    assert {(c["a"]["species"], c["b"]["species"]) for c in recorded} == {("S1", "S2"), ("S2", "S2")}
    assert all((c["dropped"] is None) == (policy == "keep-both") for c in recorded)
    assert verify(labs).ok


def test_fast_forward_when_ours_has_not_moved(labs):
    report = merge(labs, "lab-b", policy="fail")
    assert report.fast_forward and labs.resolve("main") == labs.resolve("lab-b")


def _item_changed_on_both_sides(labs, inputs):
    """Lab B and lab A each import a different lab_c/TS_01."""
    labs.checkout("lab-b")
    import_tilt_series(labs, inputs["ts1"], source="lab_c", **TILT_ARGS)
    labs.checkout("main")
    import_tilt_series(labs, inputs["ts2"], source="lab_c", name="TS_01", **TILT_ARGS)


def test_items_changed_on_both_sides_conflict(labs, inputs):
    _item_changed_on_both_sides(labs, inputs)
    before = labs.resolve("main")
    with pytest.raises(ConflictError, match="item lab_c/TS_01 changed on both sides"):
        merge(labs, "lab-b", policy="keep-both")
    assert labs.resolve("main") == before
    ours = item_refs(labs, labs.population("main"))["lab_c/TS_01"]
    theirs = item_refs(labs, labs.population("lab-b"))["lab_c/TS_01"]
    assert ours != theirs
    report = merge(labs, "lab-b", policy="keep-both", conflicts="theirs")
    assert item_refs(labs, labs.population("main"))["lab_c/TS_01"] == theirs
    params = labs.get_commit(report.commit).operation.parameters
    assert params["conflicts"] == "theirs" and params["conflicts_taken"] == ["item lab_c/TS_01: theirs"]
    assert verify(labs).ok


def test_merge_command_lists_collisions(labs):
    _move_main(labs)
    runner = CliRunner()
    refused = runner.invoke(cli, ["-C", str(labs.work_dir), "merge", "lab-b"])
    assert refused.exit_code == 1 and "3 particle collision(s)" in refused.output and "S2 #" in refused.output
    done = runner.invoke(cli, ["-C", str(labs.work_dir), "merge", "lab-b", "--policy", "score", "--json"])
    data = json.loads(done.stdout)
    assert done.exit_code == 0 and data["merged"] and len(data["collisions"]) == 3


def test_population_metadata_merges_key_by_key(labs):
    op = Operation(kind="edit", parameters={}, software="t")
    labs.commit(lambda p: dataclasses.replace(p, metadata={**p.metadata, "a": 1}), message="a", operation=op)
    labs.checkout("lab-b")
    labs.commit(lambda p: dataclasses.replace(p, metadata={**p.metadata, "b": 2}), message="b", operation=op)
    labs.checkout("main")
    merge(labs, "lab-b", policy="keep-both")
    assert labs.population().metadata == {"a": 1, "b": 2}


def test_unfinished_merge_is_stored_and_resolved_one_by_one(labs):
    _move_main(labs)
    tip = labs.resolve("main")
    with pytest.raises(ConflictError):
        merge(labs, "lab-b")
    state = load_state(labs)
    assert state is not None and len(state["collisions"]) == 3
    s2_ids = {c["b"]["particle_id"] for c in state["collisions"] if c["a"]["species"] == "S1"}
    runner = CliRunner()
    status = runner.invoke(cli, ["-C", str(labs.work_dir), "status"])
    assert "Unfinished operation: MERGE" in status.output
    # settle the two S1/S2 collisions by dropping the S2 particles, one at a time
    first, second = sorted(s2_ids)
    partial = runner.invoke(cli, ["-C", str(labs.work_dir), "resolve", "--drop", f"S2:{first}"])
    assert partial.exit_code == 1 and "2 particle collision(s)" in partial.output
    assert labs.resolve("main") == tip  # still nothing committed
    partial = runner.invoke(cli, ["-C", str(labs.work_dir), "resolve", "--drop", f"S2:{second}"])
    assert partial.exit_code == 1 and "1 particle collision(s)" in partial.output  # the duplicate pair is left
    done = runner.invoke(cli, ["-C", str(labs.work_dir), "resolve", "--policy", "score", "--json"])
    assert done.exit_code == 0 and json.loads(done.stdout)["merged"]
    assert load_state(labs) is None and _counts(labs) == {"S1": 3, "S2": 3}
    assert verify(labs).ok


def test_resolve_abort_and_gc_keeps_the_pending_merge(labs):
    _move_main(labs)
    theirs = labs.resolve("lab-b")
    with pytest.raises(ConflictError):
        merge(labs, "lab-b")
    labs.delete_ref("refs/heads/lab-b")
    assert theirs in reachable(labs, include_reflogs=False)  # the stored merge keeps their commit alive
    out = CliRunner().invoke(cli, ["-C", str(labs.work_dir), "resolve", "--abort"])
    assert out.exit_code == 0 and load_state(labs) is None


def _edit_particles(repo, species, edit, message, samples=None):
    """Commit an edit of one species' particle columns (a dict of numpy arrays, edited in place or replaced)."""
    def update(pop):
        sp = repo.get_record(pop.species[species], Species)
        table = repo.get_record(sp.particles, ParticleTable)
        cols = {k: repo.get_array(v).read().copy() for k, v in table.columns.items()}
        cols = edit(cols)
        n = len(cols["particle_id"])
        new = dataclasses.replace(table, count=n, columns={k: repo.put_array(v) for k, v in cols.items()},
                                  temporal_samples=samples or table.temporal_samples)
        return dataclasses.replace(pop, species={**pop.species, species: repo.put_record(
            dataclasses.replace(sp, particles=repo.put_record(new)))})
    repo.commit(update, message=message, operation=Operation(kind="edit", parameters={}, software="t"))


def _by_id(repo, species, rev="HEAD"):
    sp = repo.get_record(repo.population(rev).species[species], Species)
    table = repo.get_record(sp.particles, ParticleTable)
    cols = {k: repo.get_array(v).read() for k, v in table.columns.items()}
    return {int(p): {k: cols[k][i] for k in cols} | {"item": table.item_names[int(cols["item_index"][i])]}
            for i, p in enumerate(cols["particle_id"])}


def _keep(cols, mask):
    return {k: v[mask] for k, v in cols.items()}


def test_one_species_changed_on_both_sides_merges_particle_by_particle(labs):
    base = _by_id(labs, "S1")
    p0, p1, p2 = list(base)  # TS_01 (0,0,0), TS_01 (400,0,0), TS_02 (0,0,0)
    labs.checkout("lab-b")  # lab B: drops p0 as junk, refines p1's position
    _edit_particles(labs, "S1", lambda c: _keep(c, c["particle_id"] != p0), "drop junk")

    def shift(c):
        c["position_angstrom"][c["particle_id"] == p1] += 5.0
        return c
    _edit_particles(labs, "S1", shift, "refine p1")
    labs.checkout("main")  # lab A: re-scores p2 and adds a far-away pick (a copy of p2 at a new place)

    def rescore_and_add(c):
        c["score"][c["particle_id"] == p2] = 0.123
        extra = _keep(c, c["particle_id"] == p2)
        extra["particle_id"] = extra["particle_id"] + 1
        extra["position_angstrom"] = extra["position_angstrom"] + 2000.0
        return {k: np.concatenate([c[k], extra[k]]) for k in c}
    _edit_particles(labs, "S1", rescore_and_add, "rescore and add")
    report = merge(labs, "lab-b", policy="keep-both")  # (lab B's S2 brings collisions of its own)
    merged, ours, theirs = _by_id(labs, "S1"), _by_id(labs, "S1", report.ours), _by_id(labs, "S1", report.theirs)
    assert sorted(merged) == sorted([p1, p2, p2 + 1])  # p0 removed by them, p2+1 added by us
    assert np.array_equal(merged[p1]["position_angstrom"], theirs[p1]["position_angstrom"])  # their refinement
    assert merged[p2]["score"] == ours[p2]["score"] == 0.123  # our re-score
    assert merged[p2 + 1]["item"] == ours[p2 + 1]["item"] == "lab_a/TS_02"
    params = labs.get_commit(report.commit).operation.parameters
    assert params["particle_merges"]["S1"] == {"from_theirs": 1, "removed_by_theirs": 1, "conflicts": []}
    sp = {r: labs.get_record(labs.population(r).species["S1"], Species) for r in ("HEAD", report.ours)}
    assert sp["HEAD"].half_map_1 == sp[report.ours].half_map_1  # maps changed on neither side
    assert verify(labs).ok


def _trajectories(samples, drift):
    """Give every particle ``samples`` temporal samples, the position drifting by ``drift`` Å in x per sample."""
    def edit(c):
        steps = np.arange(samples, dtype=np.float64)[None, :, None] * np.array([drift, 0.0, 0.0])
        c["position_angstrom"] = c["position_angstrom"][:, :1] + steps
        c["orientation_deg"] = np.repeat(c["orientation_deg"][:, :1], samples, axis=1)
        return c
    return edit


def test_trajectories_on_one_side_and_new_picks_on_the_other_merge(labs):
    """Lab B refines S1 with 3-sample trajectories; lab A adds a pick (one pose): the pick gets its pose at all 3."""
    base = _by_id(labs, "S1")
    labs.checkout("lab-b")
    _edit_particles(labs, "S1", _trajectories(3, 4.0), "refine with trajectories", samples=3)
    labs.checkout("main")
    new = max(base) + 1

    def add(c):
        extra = {k: v[:1].copy() for k, v in c.items()}
        extra["particle_id"][:] = new
        extra["position_angstrom"] = extra["position_angstrom"] + 2000.0
        return {k: np.concatenate([c[k], extra[k]]) for k in c}
    _edit_particles(labs, "S1", add, "add a pick")
    report = merge(labs, "lab-b", policy="keep-both")
    merged, ours, theirs = _by_id(labs, "S1"), _by_id(labs, "S1", report.ours), _by_id(labs, "S1", report.theirs)
    assert sorted(merged) == sorted([*base, new])
    for pid in base:  # their trajectories
        assert np.array_equal(merged[pid]["position_angstrom"], theirs[pid]["position_angstrom"])
    assert merged[new]["position_angstrom"].shape == (3, 3)  # our pick, its one pose at every sample
    assert np.array_equal(merged[new]["position_angstrom"], np.repeat(ours[new]["position_angstrom"], 3, axis=0))
    sp = labs.get_record(labs.population("HEAD").species["S1"], Species)
    assert labs.get_record(sp.particles, ParticleTable).temporal_samples == 3
    assert labs.get_commit(report.commit).operation.parameters["particle_merges"]["S1"][
        "poses_repeated_to_temporal_samples"] == {"sides": ["ours"], "samples": 3}
    assert verify(labs).ok


def test_different_trajectory_samples_on_both_sides_are_a_conflict(labs):
    for branch, samples in (("lab-b", 3), ("main", 2)):
        labs.checkout(branch)
        _edit_particles(labs, "S1", _trajectories(samples, 4.0), f"{samples} samples", samples=samples)
    with pytest.raises(ConflictError, match="species S1: particle tables have different columns or temporal samples"):
        merge(labs, "lab-b", policy="keep-both")


def test_a_particle_changed_differently_on_both_sides_is_a_conflict(labs):
    pid = list(_by_id(labs, "S1"))[1]

    def move(delta):
        def edit(c):
            c["position_angstrom"][c["particle_id"] == pid] += delta
            return c
        return edit
    labs.checkout("lab-b")
    _edit_particles(labs, "S1", move(5.0), "b moves it")
    labs.checkout("main")
    _edit_particles(labs, "S1", move(-5.0), "a moves it")
    before = labs.resolve("main")
    with pytest.raises(ConflictError, match=f"species S1 particle {pid} changed on both sides"):
        merge(labs, "lab-b", policy="keep-both")
    assert labs.resolve("main") == before
    report = merge(labs, "lab-b", policy="keep-both", conflicts="theirs")
    assert np.array_equal(_by_id(labs, "S1")[pid]["position_angstrom"],
                          _by_id(labs, "S1", report.theirs)[pid]["position_angstrom"])
    params = labs.get_commit(report.commit).operation.parameters
    assert params["particle_merges"]["S1"]["conflicts"] == [{"particle_id": pid, "taken": "theirs"}]


def test_half_maps_changed_on_both_sides_are_a_conflict(labs, tmp_path):
    def new_maps(repo, seed):
        vol = repo.put_array(np.random.default_rng(seed).normal(size=(16, 16, 16)).astype(np.float32))

        def update(pop):
            sp = repo.get_record(pop.species["S1"], Species)
            return dataclasses.replace(pop, species={**pop.species, "S1": repo.put_record(
                dataclasses.replace(sp, half_map_1=vol, half_map_2=vol))})
        repo.commit(update, message="maps", operation=Operation(kind="edit", parameters={}, software="t"))
    labs.checkout("lab-b")
    new_maps(labs, 1)
    labs.checkout("main")
    new_maps(labs, 2)
    with pytest.raises(ConflictError, match="species S1.half_map_1 changed on both sides"):
        merge(labs, "lab-b", policy="keep-both")
    report = merge(labs, "lab-b", policy="keep-both", conflicts="ours")
    assert labs.get_record(labs.population().species["S1"], Species).half_map_1 == \
        labs.get_record(labs.population(report.ours).species["S1"], Species).half_map_1


@pytest.mark.parametrize("choice", ["ours", "re-refine"])
def test_ours_and_re_refine_keep_our_version_through_the_cli(labs, inputs, choice):
    _item_changed_on_both_sides(labs, inputs)
    ours = item_refs(labs, labs.population("main"))["lab_c/TS_01"]
    runner = CliRunner()
    done = runner.invoke(cli, ["-C", str(labs.work_dir), "merge", "lab-b", "--policy", "keep-both",
                               "--conflicts", choice])
    assert done.exit_code == 0, done.output
    pop = labs.population("main")
    marks = ["item lab_c/TS_01"] if choice == "re-refine" else []
    assert item_refs(labs, pop)["lab_c/TS_01"] == ours and refinement_marks(pop) == marks
    params = labs.get_commit(labs.resolve("main")).operation.parameters
    assert params["conflicts"] == choice and params.get("needs_refinement", []) == marks
    status = runner.invoke(cli, ["-C", str(labs.work_dir), "status"]).output
    assert ("Marked for re-refinement: item lab_c/TS_01" in done.output) == bool(marks)
    assert ("Marked for re-refinement by a merge: item lab_c/TS_01" in status) == bool(marks)
    assert verify(labs).ok


def test_no_policy_silently_empties_a_species_or_ranks_missing_scores(tmp_path, inputs):
    """The first-time user's case: `--policy score` with no scores on either side, and a policy that would drop
    every particle of a species: both refuse, saying why, and nothing changes."""
    repo = Repository.init(tmp_path / "pop")
    import_tilt_series(repo, inputs["ts1"], source="lab_a", **TILT_ARGS)
    unscored = [{k: v for k, v in r.items() if k != "rlnMaxValueProbDistribution"}
                for r in _rows("TS_01", [(0, 0, 0, 0), (400, 0, 0, 0)])]
    import_species(repo, "virus", half_map_1=inputs["half1"], half_map_2=inputs["half2"],
                   particles=write_particles(tmp_path / "v.star", unscored), diameter_angstrom=200)
    repo.create_branch("lab-b")
    repo.checkout("lab-b")
    picks = [{k: v for k, v in r.items() if k != "rlnMaxValueProbDistribution"}
             for r in _rows("TS_01", [(20, 0, 0, 0), (420, 0, 0, 0)])]
    import_species(repo, "virus2", half_map_1=inputs["half1"], half_map_2=inputs["half2"],
                   particles=write_particles(tmp_path / "v2.star", picks), diameter_angstrom=200)
    repo.checkout("main")
    _move_main(repo)
    before = repo.resolve("main")
    with pytest.raises(ConflictError, match="needs scores"):
        merge(repo, "lab-b", policy="score")
    with pytest.raises(ConflictError, match="every particle of species virus2"):
        merge(repo, "lab-b", policy="ours")
    assert repo.resolve("main") == before and verify(repo).ok
    report = merge(repo, "lab-b", policy="keep-both")
    assert _counts(repo) == {"virus": 2, "virus2": 2} and report.commit


def test_a_species_emptied_by_an_older_version_still_exports_and_merges(labs, tmp_path):
    """Repositories made before the refusal above may hold a 0-particle species: reading it must still work."""
    from cryopool.repo.merge import _drop
    from cryopool.repo.relion import export_relion
    labs.checkout("lab-b")
    labs.commit(lambda p: _drop(labs, p, {"S2": set(range(6))}), message="emptied",
                operation=Operation(kind="edit", parameters={}, software="t"))
    labs.checkout("main")
    _move_main(labs)
    assert _counts(labs, "lab-b")["S2"] == 0
    merge(labs, "lab-b", policy="fail")  # nothing can collide with nothing
    assert _counts(labs)["S2"] == 0 and verify(labs).ok
    summary = export_relion(labs, "HEAD", tmp_path / "out")
    assert "S2" in summary["species"]
