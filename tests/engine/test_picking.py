"""Tomograms and template matching, against the simulation's truth: where the particles are, which way they
face, and a new species picked around the ones already there, merged back without a collision."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import small_config
from cryopool.cli.main import cli
from cryopool.engine.geometry import degrees_between
from cryopool.engine.picking import occupied
from cryopool.engine.records_io import load_item, load_map, load_particles
from cryopool.engine.simulate import SpeciesSpec, simulate, write_simulation
from cryopool.engine.symmetry import symmetry_operators
from cryopool.engine.template_match import MatchSettings, match_template, pick_peaks, so3_grid
from cryopool.engine.tomogram import TomogramSettings, reconstruct_tomogram, voxel_centres
from cryopool.repo import Population, Repository, Species, iter_items
from cryopool.repo.formats.mrc import write_mrc
from cryopool.repo.merge import merge
from cryopool.repo.verify import verify

STEP = 30.0  # degrees: coarse, so the suite stays fast


@pytest.fixture(scope="module")
def sim():
    cfg = replace(small_config(), species=[SpeciesSpec("big", 220.0, 3), SpeciesSpec("prot", 120.0, 6)],
                  image_size_px=(128, 128), seed=5)
    return simulate(cfg)


@pytest.fixture
def repo(tmp_path, sim):
    r = Repository.init(tmp_path / "pop")
    write_simulation(r, sim, withhold=("prot",))
    return r


def _truth(repo):
    start = next(cid for cid, c in repo.log() if c.operation.kind == "simulate")
    return repo.get_record(repo.get_commit(start).attachments["truth"], Population)


def _true_particles(repo, name, key):
    truth = _truth(repo)
    sp = repo.get_record(truth.species[name], Species)
    cols = load_particles(repo, sp.particles)
    sel = cols.select(key)
    return sp, cols.positions[sel, 0].numpy(), cols.orientations[sel, 0]


def test_the_so3_grid_leaves_no_orientation_far_from_a_grid_point():
    grid = so3_grid(STEP)
    probe = so3_grid(7.0)[:: 37]  # orientations of a finer, different grid
    nearest = degrees_between(probe[:, None], grid[None]).min(dim=1).values
    assert float(nearest.max()) < STEP
    assert len(grid) == math.ceil(4 * math.pi / math.radians(STEP) ** 2) * round(360 / STEP)


@pytest.mark.parametrize("symmetry", ["C7", "D2", "D7"])
def test_a_symmetric_particle_needs_only_part_of_the_grid(symmetry):
    """Every orientation is within one step of the reduced grid once the particle's symmetry is applied."""
    full, reduced = so3_grid(STEP), so3_grid(STEP, symmetry)
    n = int(symmetry[1:]) * (2 if symmetry[0] == "D" else 1)
    assert len(full) / n <= len(reduced) <= 1.25 * len(full) / n + 360 / STEP  # ceil: one more direction at most
    ops = symmetry_operators(symmetry, dtype=torch.float64)
    equivalents = (reduced[:, None] @ ops[None]).reshape(-1, 3, 3)  # A·S: the same particle, turned
    probe = so3_grid(7.0)[:: 37]
    nearest = degrees_between(probe[:, None], equivalents[None]).min(dim=1).values
    assert float(nearest.max()) < STEP


def _blob_tomogram(shape, voxel, positions, radius):
    """An independent picture of the truth: a ball of the particle's radius at each true position."""
    zs, ys, xs = (voxel_centres(n, voxel).numpy() for n in shape)
    z, y, x = np.meshgrid(zs, ys, xs, indexing="ij")
    out = np.zeros(shape)
    for p in positions:
        out += ((x - p[0]) ** 2 + (y - p[1]) ** 2 + (z - p[2]) ** 2) < radius**2
    return out


def test_the_tomogram_shows_the_particles_where_the_truth_puts_them(repo):
    key, ref, ts = next(iter_items(repo, _truth(repo)))  # the true models: geometry errors are not the point here
    item = load_item(repo, ts)
    vol, voxel = reconstruct_tomogram(item, ts.tomogram_size_px, TomogramSettings(binning=2))
    positions = np.concatenate([_true_particles(repo, n, key)[1] for n in ("big", "prot")])
    truth = _blob_tomogram(tuple(vol.shape), voxel, positions, 60.0)
    # the cross-correlation of the two over every circular shift peaks at no shift, in x, y and z (particles are
    # dense: positive in the phase-flipped tomogram, as in the simulated specimen)
    cc = np.fft.irfftn(np.fft.rfftn(vol.numpy()) * np.conj(np.fft.rfftn(truth)), s=vol.shape, axes=(0, 1, 2))
    peak = np.array(np.unravel_index(np.argmax(cc), cc.shape))
    peak = np.where(peak > np.array(vol.shape) // 2, peak - np.array(vol.shape), peak)
    assert np.all(np.abs(peak) <= 1), peak
    assert cc.max() > 4 * cc.std()
    # streamed in slabs: the same volume whatever the memory budget
    small, _ = reconstruct_tomogram(item, ts.tomogram_size_px, TomogramSettings(binning=2, memory_budget_bytes=10**6))
    torch.testing.assert_close(small, vol)


@pytest.fixture(scope="module")
def matched(sim):
    """The first tilt series' tomogram searched for the withheld species with its true map."""
    repo = Repository.in_memory()
    write_simulation(repo, sim, withhold=("prot",))
    key, _, ts = next(iter_items(repo, repo.population()))
    item = load_item(repo, ts)
    vol, voxel = reconstruct_tomogram(item, ts.tomogram_size_px)
    sp, true_pos, true_rot = _true_particles(repo, "prot", key)
    result = match_template(vol, voxel, load_map(repo, sp), sp.pixel_size_angstrom, item, sp.diameter_angstrom,
                            MatchSettings(angular_step_deg=STEP))
    return repo, key, sp, true_pos, true_rot, result


def test_matching_finds_the_withheld_species_where_and_as_it_is(matched):
    repo, key, sp, true_pos, true_rot, result = matched
    picks = pick_peaks(result, sp.diameter_angstrom, occupied(repo, repo.population()).get(key, []),
                       threshold=8 * result.score_std, max_picks=len(true_pos))
    hits, angles = 0, []
    for pos, rot, _ in picks:
        d = np.linalg.norm(true_pos - pos, axis=1)
        j = int(d.argmin())
        if d[j] < sp.diameter_angstrom / 4:
            hits += 1
            angles.append(float(degrees_between(rot, true_rot[j])))
    assert hits >= len(true_pos) - 1, (hits, len(true_pos))
    assert np.median(angles) < STEP / 2 + 5  # within the grid's reach of the true orientation


def test_picks_avoid_the_particles_already_there_and_each_other(matched):
    repo, key, sp, true_pos, _, result = matched
    taken = occupied(repo, repo.population()).get(key, []) + [(true_pos[0], 60.0)]  # one as if already picked
    picks = pick_peaks(result, sp.diameter_angstrom, taken, threshold=3 * result.score_std)
    assert len(picks) > len(true_pos)  # a low threshold: every place that is free gets a pick
    for pos, _, _ in picks:
        for other, radius in taken:
            assert np.linalg.norm(pos - other) >= 0.8 * (radius + 60.0)
    p = np.stack([pos for pos, _, _ in picks])
    d = np.linalg.norm(p[:, None] - p[None], axis=-1) + np.eye(len(p)) * 1e9
    assert d.min() >= 0.8 * 120.0


def test_lab_b_matches_a_new_species_refines_it_and_merges_without_collisions(repo, tmp_path):
    """The issue's acceptance: nothing removed, a species lab A did not pick, matched on a branch, refined with
    the others, merged into lab A's branch with no collision, verify passes."""
    truth = _truth(repo)
    tsp = repo.get_record(truth.species["prot"], Species)
    template = tmp_path / "prot.mrc"
    write_mrc(template, repo.get_array(tsp.half_map_1).read(), tsp.pixel_size_angstrom)
    run = CliRunner()
    pop = str(repo.work_dir)
    result = run.invoke(cli, ["-C", pop, "match", "--template", str(template), "--species", "prot", "--diameter",
                              "120", "--angular-step", str(STEP), "--threshold", "8", "-b", "lab-b/prot"])
    assert result.exit_code == 0, result.output
    picked = repo.population("lab-b/prot")
    assert set(picked.species) == {"big", "prot"}
    commit = repo.get_commit("lab-b/prot")
    assert commit.operation.kind == "match" and "template" in commit.operation.inputs
    t = load_particles(repo, repo.get_record(picked.species["prot"], Species).particles)
    assert len(set(t.ids.tolist())) == len(t.ids) and torch.all(t.scores >= 8)
    result = run.invoke(cli, ["-C", pop, "checkout", "lab-b/prot"])
    result = run.invoke(cli, ["-C", pop, "refine", "-n", "1", "--groups", "shifts,poses", "--lbfgs-iterations", "4",
                              "--rounds", "1"])
    assert result.exit_code == 0, result.output
    run.invoke(cli, ["-C", pop, "checkout", "main"])
    result = run.invoke(cli, ["-C", pop, "tomogram", "lab_a/TS_01", "-o", str(tmp_path / "ts.mrc"), "--binning",
                              "4", "--store"])  # lab A moves on meanwhile: a tomogram kept with its provenance
    assert result.exit_code == 0, result.output
    report = merge(repo, "lab-b/prot", policy="fail")  # "fail": any collision would stop the merge
    assert report.collisions == [] and report.commit
    assert set(repo.population().species) == {"big", "prot"}
    assert verify(repo).ok
    stored = next(c for _, c in repo.log() if c.operation.kind == "tomogram")
    array = repo.get_array(stored.attachments["tomogram lab_a/TS_01"])
    assert array.attributes["voxel_angstrom"] == pytest.approx(40.0) and array.read().ndim == 3
    result = run.invoke(cli, ["-C", pop, "report", "-o", str(tmp_path / "report")])  # the report shows it
    assert result.exit_code == 0, result.output
    html = (tmp_path / "report" / "index.html").read_text()
    assert stored.attachments["tomogram lab_a/TS_01"].id[:16] in html and "fig-tomogram" in html
    assert (tmp_path / "report" / "figures" / "item-lab_a-TS_01-tomogram.svg").exists()


def test_a_search_that_finds_nothing_says_so_and_leaves_no_branch(repo, tmp_path):
    tsp = repo.get_record(_truth(repo).species["prot"], Species)
    template = tmp_path / "prot.mrc"
    write_mrc(template, repo.get_array(tsp.half_map_1).read(), tsp.pixel_size_angstrom)
    key = next(iter_items(repo, repo.population()))[0]
    before = repo.refs.list("refs/heads/")
    result = CliRunner().invoke(cli, ["-C", str(repo.work_dir), "match", key, "--template", str(template),
                                      "--species", "prot", "--diameter", "120", "--angular-step", "90",
                                      "--threshold", "1000", "-b", "lab-b/none"])
    assert result.exit_code == 1 and "scored above the threshold" in result.output
    assert repo.refs.list("refs/heads/") == before
