"""``cryopool report``: every number from the records, the merge's collisions listed, figures that are SVG."""

from __future__ import annotations

import json
import math
import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from click.testing import CliRunner

from cryopool.cli.main import cli
from cryopool.repo import ParticleTable, Repository, Species, iter_items


def _records(repo, rev="HEAD"):
    pop = repo.population(rev)
    return {n: repo.get_record(r, Species) for n, r in pop.species.items()}


@pytest.fixture(scope="module")
def report(merged_population, tmp_path_factory):
    repo, planted = merged_population
    out = tmp_path_factory.mktemp("out") / "report"
    result = CliRunner().invoke(cli, ["-C", str(repo.work_dir), "report", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    return repo, planted, out, json.loads(result.output), (out / "index.html").read_text()


def test_numbers_come_from_the_records(report):
    repo, _, out, summary, html = report
    assert summary["commit"] == repo.resolve("HEAD")
    for name, sp in _records(repo).items():
        assert sp.metrics.resolution_angstrom is not None
        assert f"{sp.metrics.resolution_angstrom:.2f} Å" in html  # as recorded by the refinement
        # particle counts per tilt series, counted here from the particle table
        table = repo.get_record(sp.particles, ParticleTable)
        idx = repo.get_array(table.columns["item_index"]).read()
        for i, key in enumerate(table.item_names):
            assert re.search(rf'{re.escape(key)}</a></td>(<td class="num">\d+</td>)*<td class="num">'
                             rf'{int((idx == i).sum())}</td>', html)
    for key, ref, _ in iter_items(repo, repo.population()):
        assert ref.id in html and f'id="item-{key}"' in html


def test_the_fsc_figure_plots_the_recorded_curve_with_its_thresholds(report):
    repo, _, out, _, _ = report
    for name, sp in _records(repo).items():
        svg = (out / "figures" / f"species-{name}-fsc.svg").read_text()
        ET.fromstring(svg)  # well-formed
        assert "0.143" in svg and "0.5" in svg and "resolution (Å)" in svg
        fsc = repo.get_array(sp.metrics.fsc).read().reshape(-1, 2)
        # the recorded resolution's line sits at 1/resolution on the frequency axis: the tick labels in Å are
        # 1/f of evenly spaced frequencies up to the curve's last frequency
        labels = [float(t) for t in re.findall(r">(\d+\.\d)</text>", svg) if float(t) > 1]
        top = float(fsc[-1, 0])
        expected = [round(1 / f, 1) for f in np.linspace(0, top, 6)[1:]]
        assert all(e in labels for e in expected)


def test_the_merge_and_its_collisions_are_listed_with_their_resolution(report):
    repo, planted, _, _, html = report
    recorded = repo.get_commit("HEAD").operation.parameters["collisions"]
    assert len(recorded) == len(planted) > 0
    for item, near_id, new_id, _ in planted:
        assert f"a #{near_id}" in html and f"b #{new_id}" in html
    assert html.count("kept both") == len(planted)


def test_collisions_left_in_the_population_are_found_by_the_merge_rule(merged_population):
    from cryopool.cli.report_data import collisions_in
    repo, planted = merged_population
    found = collisions_in(repo, repo.population())
    pairs = {(c["a"]["particle_id"], c["b"]["particle_id"]) for c in found} | \
        {(c["b"]["particle_id"], c["a"]["particle_id"]) for c in found}
    for _, near_id, new_id, distance in planted:
        assert (near_id, new_id) in pairs
    # independently: every pair closer than 0.8 × (r_a + r_b), by brute force over the particle tables
    species = _records(repo)
    pos = {}
    for name, sp in species.items():
        t = repo.get_record(sp.particles, ParticleTable)
        p = repo.get_array(t.columns["position_angstrom"]).read().reshape(t.count, t.temporal_samples, 3)[:, 0]
        idx = repo.get_array(t.columns["item_index"]).read()
        ids = repo.get_array(t.columns["particle_id"]).read()
        for k in range(t.count):
            pos.setdefault(t.item_names[idx[k]], []).append((name, int(ids[k]), p[k], sp.diameter_angstrom / 2))
    brute = 0
    for parts in pos.values():
        for i in range(len(parts)):
            for j in range(i + 1, len(parts)):
                d = math.dist(parts[i][2], parts[j][2])
                brute += d < 0.8 * (parts[i][3] + parts[j][3])
    assert brute == len(found)


def test_exposure_weights_are_the_engines_dose_and_tilt_weighting(merged_population):
    from cryopool.cli.report_data import exposure_weights
    from cryopool.engine.records_io import load_item
    repo, _ = merged_population
    _, _, ts = next(iter_items(repo, repo.population()))
    freq, w = exposure_weights(load_item(repo, ts, with_stack=False), size=64)
    # Grant & Grigorieff-style B-factor of 4 Å² per e⁻/Å² at the middle of each tilt's exposure, times cos(tilt),
    # from the record's own numbers
    dose = np.asarray(ts.pre_exposure_e_per_angstrom2) + np.asarray(ts.exposure_e_per_angstrom2) / 2
    expected = np.exp(-4 * dose[:, None] * freq[None, :] ** 2 / 4) * np.cos(np.radians(ts.tilt_angles_deg))[:, None]
    np.testing.assert_allclose(w, expected, rtol=1e-5, atol=1e-6)


def test_provenance_reaches_the_raw_tilt_series(merged_population):
    from cryopool.cli.report_data import history_of, provenance_graph, species_history
    repo, _ = merged_population
    history = species_history(repo, history_of(repo, "HEAD"), "a")
    assert [v["operation"] for v in history] == ["simulate", "refine"]
    g = provenance_graph(repo, history)
    sp = _records(repo)["a"]
    stacks = {repo.get_record(r).stack.id for r in sp.reconstructed_from}
    assert stacks and stacks <= set(g.nodes)
    assert all(g.nodes[s][1] == "raw" for s in stacks)
    refine_op = f"op:{history[-1]['commit']}"
    assert {(refine_op, r.id) for r in sp.reconstructed_from} <= set(g.edges)
    assert (refine_op, history[0]["species"]) in g.edges  # made from the previous version


def test_every_figure_file_is_embedded_and_well_formed(report):
    _, _, out, summary, html = report
    files = sorted(p.name for p in (out / "figures").iterdir())
    assert files == summary["figures"]
    kinds = {re.sub(r"^(species|item)-.*-(\w+)\.svg$", r"\1 \2", f) for f in files}
    assert kinds >= {"species fsc", "species history", "species maps", "species provenance", "item particles",
                     "item tilts", "item exposure", "item warp"}
    for f in files:
        svg = (out / "figures" / f).read_text()
        ET.fromstring(svg)
        assert svg[:200] in html  # inline: the page needs no other file
    assert not re.search(r'(src|href)="(https?:)?//', html)  # nothing loaded from elsewhere


def test_the_report_needs_a_commit(tmp_path):
    Repository.init(tmp_path / "empty")
    result = CliRunner().invoke(cli, ["-C", str(tmp_path / "empty"), "report", "-o", str(tmp_path / "r")])
    assert result.exit_code == 1 and "no commits" in result.output
    assert not (tmp_path / "r").exists()
