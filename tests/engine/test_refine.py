"""Refinement: commits and provenance, the gold standard, resuming, the command line."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cryopool.cli.main import cli
from cryopool.engine.refine import RefineOptions, refine_population, resume_point
from cryopool.engine.register import register_shift, shift_map
from cryopool.engine.simulate import write_simulation
from cryopool.repo import (ImagingModel, InvalidInputError, Operation, ParticleTable, Repository, Species, iter_items,
                           refinement_marks, software_version, with_item, with_marks)
from cryopool.repo.verify import verify

FAST = dict(groups=("shifts", "poses"), lbfgs_iterations=4, rounds=1, image_warp_grid=(2, 2))


@pytest.fixture
def repo(tmp_path, small_sim):
    r = Repository.init(tmp_path / "pop")
    write_simulation(r, small_sim)
    return r


def test_refine_commits_with_full_provenance(repo):
    key = next(iter_items(repo, repo.population()))[0]
    marks = [f"item {key}", "species a", "item elsewhere/TS_9"]  # as a merge with --conflicts re-refine leaves them
    before = repo.commit(with_marks(repo.population(), marks), message="marks",
                         operation=Operation(kind="edit", parameters={}, software="test"))
    (report,) = refine_population(repo, RefineOptions(iterations=1, **FAST))
    assert refinement_marks(repo.population()) == ["item elsewhere/TS_9"]  # what it refined is no longer marked
    commit = repo.get_commit(report.commit)
    assert commit.parents[0].id == before and commit.operation.kind == "refine"
    params = commit.operation.parameters
    assert params["run"]["iteration"] == 1 and params["run"]["of"] == 1 and params["groups"] == ["shifts", "poses"]
    registration = params["registration_angstrom"]  # each half-map's move into its species' frame, Å (x, y, z)
    assert set(registration) == {"a", "b"} and all(len(r["half1"]) == len(r["half2"]) == 3
                                                   for r in registration.values())
    assert commit.operation.software == software_version()
    old_pop, new_pop = repo.population(before), repo.population(report.commit)
    old_species = {old_pop.species[n] for n in old_pop.species}
    new_items = {ref for _, ref, _ in iter_items(repo, new_pop)}
    for _, ref, ts in iter_items(repo, new_pop):
        assert set(ts.refined_against) == old_species  # the species versions the item was refined against
        assert set(ts.half_set_models) == {"1", "2"}
    for name in new_pop.species:
        sp = repo.get_record(new_pop.species[name], Species)
        assert set(sp.reconstructed_from) == new_items  # the item versions the half-maps came from
        assert sp.metrics.resolution_angstrom is not None and sp.metrics.fsc is not None
        assert np.asarray(repo.get_array(sp.metrics.fsc).read()).shape[1] == 2
    assert report.resolution_after.keys() == {"a", "b"}
    assert verify(repo).ok


def _replace_half_map_1(repo: Repository, name: str, noise_seed: int) -> str:
    pop = repo.population()
    sp = repo.get_record(pop.species[name], Species)
    shape = repo.get_array(sp.half_map_1).shape
    noise = np.random.default_rng(noise_seed).normal(size=shape).astype(np.float32)
    sp2 = dataclasses.replace(sp, half_map_1=repo.put_array(noise))
    return repo.commit(dataclasses.replace(pop, species={**pop.species, name: repo.put_record(sp2)}),
                       message="replace half-map 1", operation=Operation(kind="edit", parameters={}, software="test"))


def test_gold_standard_one_half_cannot_change_the_other(repo):
    # every refinement kept: this system is too small for the significance rule to keep any, and then neither
    # half would depend on its reference at all
    opts = RefineOptions(iterations=1, require_significance=False, **FAST)
    refine_population(repo, opts)  # records an FSC for the filter
    repo.create_branch("edited")
    repo.checkout("edited")
    _replace_half_map_1(repo, "a", 1)
    _replace_half_map_1(repo, "b", 2)
    (edited,) = refine_population(repo, opts)
    repo.checkout("main")
    (plain,) = refine_population(repo, opts)
    for name in ("a", "b"):
        e = repo.get_record(repo.population(edited.commit).species[name], Species)
        p = repo.get_record(repo.population(plain.commit).species[name], Species)
        h2e, h2p = (torch.from_numpy(np.asarray(repo.get_array(x.half_map_2).read())).double() for x in (e, p))
        # half 2 never saw half 1, except for its frame (3 numbers: where both halves' start puts the species,
        # engine/register.py); in that frame it is the same map
        shift = register_shift(h2e, h2p, pixel_size_angstrom=e.pixel_size_angstrom, resolution_angstrom=30.0)
        assert float(shift.norm()) < 0.5
        # compared below Nyquist: a sub-pixel shift is not exact on an even box's Nyquist planes
        keep = torch.ones(h2p.shape[0], h2p.shape[1], h2p.shape[2] // 2 + 1, dtype=torch.bool)
        keep[h2p.shape[0] // 2], keep[:, h2p.shape[1] // 2], keep[..., -1] = False, False, False
        below = lambda v: torch.fft.rfftn(v)[keep]  # noqa: E731
        inside = below(shift_map(h2e, shift)) - below(h2p)
        assert float(inside.abs().norm() / below(h2p).abs().norm()) < 1e-5
        assert not np.array_equal(repo.get_array(e.half_map_1).read(), repo.get_array(p.half_map_1).read())
    # and the half-sets are disjoint particle sets
    cols = repo.get_array(repo.get_record(repo.get_record(repo.population().species["a"], Species).particles)
                          .columns["half_set"]).read()
    assert set(cols.tolist()) == {1, 2}


def test_interrupted_run_resumes_after_its_last_iteration(repo):
    opts = RefineOptions(iterations=2, **FAST)
    (first,) = refine_population(repo, opts, max_iterations=1)  # as if killed after iteration 1
    run = resume_point(repo)
    assert run is not None and run["iteration"] == 1 and run["of"] == 2
    (second,) = refine_population(repo, RefineOptions(), resume=True)  # options come from the run record
    c1, c2 = repo.get_commit(first.commit), repo.get_commit(second.commit)
    assert c2.parents[0].id == first.commit
    assert c1.operation.parameters["run"]["id"] == c2.operation.parameters["run"]["id"]
    assert c2.operation.parameters["run"]["iteration"] == 2 and c2.operation.parameters["lbfgs_iterations"] == 4
    assert resume_point(repo) is None


def test_refine_command(repo):
    runner = CliRunner()
    result = runner.invoke(cli, ["-C", str(repo.work_dir), "refine", "-n", "1", "--groups", "shifts,poses",
                                 "--lbfgs-iterations", "3", "--image-warp", "2x2", "--temporal-samples", "2",
                                 "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    (it,) = data["iterations"]
    assert set(it["resolution_after"]) == {"a", "b"} and it["particles"] == {"a": 4, "b": 4}

    def tables():
        pop = repo.population()
        return [repo.get_record(repo.get_record(pop.species[n], Species).particles, ParticleTable) for n in "ab"]
    for table in tables():  # pose trajectories with 2 samples, stored as (n, 2, 3)
        assert table.temporal_samples == 2
        assert repo.get_array(table.columns["position_angstrom"]).shape == (4, 2, 3)
    assert verify(repo).ok
    human = runner.invoke(cli, ["-C", str(repo.work_dir), "refine", "-n", "1", "--groups", "shifts",
                                "--lbfgs-iterations", "2"], catch_exceptions=False)
    assert human.exit_code == 0 and "resolution before" in human.output
    assert [t.temporal_samples for t in tables()] == [1, 1]  # back to one pose: the mid-exposure one
    too_many = runner.invoke(cli, ["-C", str(repo.work_dir), "refine", "--temporal-samples", "4"])
    assert too_many.exit_code == 2 and "temporal-samples" in too_many.output
    bad = runner.invoke(cli, ["-C", str(repo.work_dir), "refine", "--groups", "wobble"])
    assert bad.exit_code == 2 and "wobble" in bad.output
    nothing = runner.invoke(cli, ["-C", str(repo.work_dir), "refine", "--resume"])
    assert nothing.exit_code == 2 and "nothing to resume" in nothing.output


@pytest.mark.parametrize("what", ["stack", "half_map_1"])
def test_a_corrupted_chunk_stops_refinement_and_nothing_is_committed(repo, what):
    """One flipped byte in a tilt-series or half-map chunk: refine stops naming the object, HEAD stays put."""
    population = repo.population()
    if what == "stack":
        target = next(iter_items(repo, population))[2].stack
    else:
        target = repo.get_record(population.species["a"], Species).half_map_1
    chunk = repo.get_array(target).chunk_refs[0].id
    path = repo.store.path(chunk)
    raw = bytearray(path.read_bytes())
    raw[-7] ^= 0x10  # inside the payload: the file still decodes, its hash no longer matches
    path.chmod(0o644)
    path.write_bytes(bytes(raw))
    head = repo.resolve("HEAD")
    runner = CliRunner()
    result = runner.invoke(cli, ["-C", str(repo.work_dir), "refine", "-n", "1", "--groups", "shifts",
                                 "--lbfgs-iterations", "2"])
    assert result.exit_code == 1 and chunk in result.output and "corrupted" in result.output, result.output
    assert repo.resolve("HEAD") == head


def test_optics_the_engine_does_not_model_are_refused_unless_allowed(repo):
    """A phase-plate item (phase shift in its imaging model) is not refined as if it had none, silently."""
    population = repo.population()
    key, ref, item = next(iter_items(repo, population))
    imaging = repo.get_record(item.imaging, ImagingModel)
    with repo.transaction() as tx:
        phased = replace(imaging, phase_shift_deg=tx.put_array(np.full(item.n_tilts, 90.0)))
        new_item = tx.put_record(replace(item, imaging=tx.put_record(phased)))
        tx.commit(with_item(tx, population, *key.split("/"), new_item, replace_existing=True), message="phase plate",
                  operation=Operation(kind="edit", parameters={}, software="t"))
    head = repo.resolve("HEAD")
    with pytest.raises(InvalidInputError, match="phase shift"):
        refine_population(repo, RefineOptions(iterations=1, **FAST))
    assert repo.resolve("HEAD") == head
    (report,) = refine_population(repo, RefineOptions(iterations=1, allow_unmodelled=True, **FAST))
    assert repo.get_commit(report.commit).operation.parameters["allow_unmodelled"] is True
