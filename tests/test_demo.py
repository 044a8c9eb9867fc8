"""The README's main job, shortened (one final iteration): two labs, a server, a partial clone, a merge with
collisions, refinement against the truth, verify, the report."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

from cryopool.cli.main import cli
from cryopool.engine.assess import compare_with_truth
from cryopool.repo import Population, Repository, refinement_marks


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "demo"
    result = CliRunner().invoke(cli, ["demo", str(root), "--refine-iterations", "1"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return root, result.output


def _row(output: str, label: str) -> tuple[float, float]:
    line = next(line for line in output.splitlines() if line.startswith(label))
    before, after = re.findall(r"(-?\d+(?:\.\d+)?)", line[len(label):])[:2]
    return float(before), float(after)


def test_the_story_is_told_and_every_step_holds(demo):
    root, out = demo
    assert "verify: OK" in out
    assert "merge: 3 collision(s) between lab B's picks and lab A's particles, 3 resolved by dropping lab B's pick" \
        in out
    assert _row(out, "proteasome: picks with no true particle") == (3, 0)  # the planted false picks, all caught
    pos_before, pos_after = _row(out, "projected particle positions (RMS)")
    assert pos_after < 0.7 * pos_before
    for name in ("proteasome", "ribosome"):
        before, after = _row(out, f"{name}: map vs true map (FSC 0.5)")
        assert after < before  # Å: better
    assert (root / "fsc_vs_truth.png").stat().st_size > 10_000


def test_the_labs_histories_and_the_merge(demo):
    root, _ = demo
    lab_a, lab_b = Repository.open(root / "lab-a"), Repository.open(root / "lab-b")
    assert lab_b.config.get("partial")  # a partial clone of lab A's server
    merge_id = next(cid for cid, c in lab_a.log() if c.operation.kind == "merge")
    merge = lab_a.get_commit(merge_id)
    assert merge.parents[1].id == lab_b.resolve("lab-b/proteasome")  # lab B's pushed branch, as lab B has it
    collisions = merge.operation.parameters["collisions"]
    assert len(collisions) == 3 and all(c[c["dropped"]]["species"] == "proteasome" for c in collisions)
    # after the final refinement the population is checked against the simulation's truth independently here
    start = lab_a.resolve("published-v1")
    truth = lab_a.get_record(lab_a.get_commit(start).attachments["truth"], Population)
    final = compare_with_truth(lab_a, lab_a.population(), truth)
    assert final["species"]["proteasome"]["false_picks"] == 0
    assert refinement_marks(lab_a.population()) == []  # the final refinement cleared the merge's marks


def test_the_report_lists_every_collision_and_its_resolution(demo):
    root, _ = demo
    html = (root / "report" / "index.html").read_text()
    lab_a = Repository.open(root / "lab-a")
    merge_id = next(cid for cid, c in lab_a.log() if c.operation.kind == "merge")
    for c in lab_a.get_commit(merge_id).operation.parameters["collisions"]:
        loser = c[c["dropped"]]
        assert f"dropped {loser['species']} #{loser['particle_id']}" in html
    assert html.count("Species proteasome") == 1 and "Tilt series lab_b/TS_01" in html


def test_simulate_can_withhold_a_species_for_another_lab_to_pick(tmp_path):
    run = CliRunner()
    pop, picks = tmp_path / "sim", tmp_path / "picks"
    result = run.invoke(cli, ["simulate", str(pop), "--species", "big:200:3", "--species", "small:90:4", "--items",
                              "1", "--image-size", "96", "--withhold", f"small:{picks}", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["species"]["small"]["withheld_to"] == str(picks)
    repo = Repository.open(pop)
    assert set(repo.population().species) == {"big"}
    truth = repo.get_record(repo.get_commit("HEAD").attachments["truth"], Population)
    assert set(truth.species) == {"big", "small"}
    result = run.invoke(cli, ["-C", str(pop), "import", "species", "small", "--half1", str(picks / "half1.mrc"),
                              "--half2", str(picks / "half2.mrc"), "--mask", str(picks / "mask.mrc"),
                              "--particles", str(picks / "particles.star"), "--diameter", "90"])
    assert result.exit_code == 0, result.output
    # the imported picks (new ids) are matched to the true particles by position: none is a false pick
    report = compare_with_truth(repo, repo.population(), truth)
    assert report["species"]["small"]["false_picks"] == 0
    assert report["position_rms_angstrom"] < 60
    again = run.invoke(cli, ["simulate", str(tmp_path / "x"), "--withhold", f"nosuch:{tmp_path / 'y'}"])
    assert again.exit_code == 2 and "nosuch" in again.output
