"""BRIEF §1 end to end on the simulated population, through the shared server on loopback.

Lab A simulates a population with species S1 and pushes it to the server. Lab B clones it, picks a second
species S2 in the same tomograms (with planted collisions against S1 and duplicate picks), and pushes a
branch. Lab A pulls the branch and merges it with each policy; the result is checked particle by particle,
both labs' repositories verify, and the histories agree.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from conftest import running_server, write_mrc, write_particles
from cryopool.engine.simulate import PRESETS, SpeciesSpec, simulate, write_simulation
from cryopool.repo import Operation, ParticleTable, Repository, Species
from cryopool.repo.errors import ConflictError
from cryopool.repo.importers import import_species
from cryopool.repo.merge import merge
from cryopool.repo.remote import add_remote, clone, fetch, push
from cryopool.repo.verify import verify


@pytest.fixture(scope="module")
def simulated():
    cfg = replace(PRESETS["test"], species=[SpeciesSpec("S1", 200.0, 6)], items_per_source=1,
                  image_size_px=(128, 128), seed=8)
    return simulate(cfg)


@pytest.fixture
def server(tmp_path):
    central = Repository.init(tmp_path / "central")
    with running_server(central.work_dir, tokens={"a": ["read", "write"], "b": ["read", "write"]}) as url:
        yield central, url


def _table(repo, rev, name):
    sp = repo.get_record(repo.population(rev).species[name], Species)
    t = repo.get_record(sp.particles, ParticleTable)
    return {k: repo.get_array(v).read() for k, v in t.columns.items()}


def _lab_b_picks(tmp_path, lab_b, s1):
    """S2 (80 Å): two picks on top of S1 particles, one duplicate pair, three clean picks far from everything."""
    item = "TS_01"
    pos = s1["position_angstrom"][:, 0]
    near = [pos[0] + [40, 0, 0], pos[1] + [0, 50, 0]]  # < 0.8 × (100 + 40) = 112 Å: collisions
    free = []
    rng = np.random.default_rng(2)
    while len(free) < 4:
        p = np.array([rng.uniform(-500, 500), rng.uniform(-500, 500), rng.uniform(-80, 80)])
        if np.linalg.norm(pos - p, axis=1).min() > 200 and all(np.linalg.norm(p - q) > 200 for q in free):
            free.append(p)
    dup = [free[3], free[3] + [10, 0, 0]]  # a duplicate pick: 10 Å apart
    coords = near + free[:3] + dup
    scores = [0.2, 0.99, 0.5, 0.5, 0.5, 0.7, 0.6]
    rows = [{"rlnTomoName": item, "rlnCenteredCoordinateXAngst": c[0], "rlnCenteredCoordinateYAngst": c[1],
             "rlnCenteredCoordinateZAngst": c[2], "rlnAngleRot": 0.0, "rlnAngleTilt": 0.0, "rlnAnglePsi": 0.0,
             "rlnRandomSubset": i % 2 + 1, "rlnMaxValueProbDistribution": s} for i, (c, s) in enumerate(zip(coords, scores))]
    star = write_particles(tmp_path / "s2.star", rows)
    vol = write_mrc(tmp_path / "s2.mrc", np.random.default_rng(1).normal(size=(16, 16, 16)).astype(np.float32))
    import_species(lab_b, "S2", half_map_1=vol, half_map_2=vol, particles=star, diameter_angstrom=80)


# the simulator gives S1 no scores (NaN): under "score" an unknown score ranks lowest, so S1 loses both
# collisions and the duplicate pair keeps its higher-scoring pick
@pytest.mark.parametrize("policy,expected", [("ours", (6, 4)), ("theirs", (4, 6)), ("score", (4, 6)),
                                             ("keep-both", (6, 7))])
def test_two_labs_share_and_merge(tmp_path, server, simulated, policy, expected):
    central, url = server
    lab_a = Repository.init(tmp_path / "lab_a")
    write_simulation(lab_a, simulated)
    add_remote(lab_a, "central", url, token="a")
    push(lab_a, "central")
    lab_b = clone(url, str(tmp_path / "lab_b"), token="b")
    lab_b.create_branch("lab-b/S2")
    lab_b.checkout("lab-b/S2")
    s1 = _table(lab_b, "HEAD", "S1")
    _lab_b_picks(tmp_path, lab_b, s1)
    push(lab_b, "origin", "lab-b/S2")
    # lab A keeps working, then brings lab B's species in
    lab_a.commit(lambda p: replace(p, metadata={"lab A": "notes"}), message="lab A notes",
                 operation=Operation(kind="edit", parameters={}, software="test"))
    fetch(lab_a, "central")
    if policy == "ours":  # the default refuses and lists every collision first
        with pytest.raises(ConflictError) as info:
            merge(lab_a, "central/lab-b/S2")
        assert len(info.value.collisions) == 3
    report = merge(lab_a, "central/lab-b/S2", policy=policy)
    counts = (len(_table(lab_a, "HEAD", "S1")["particle_id"]), len(_table(lab_a, "HEAD", "S2")["particle_id"]))
    assert counts == expected
    dropped = {(c.species_a if c.dropped == "a" else c.species_b, c.id_a if c.dropped == "a" else c.id_b)
               for c in report.collisions if c.dropped}
    for name in ("S1", "S2"):  # the survivors are exactly the originals minus what the record says was dropped
        survivors = set(_table(lab_a, "HEAD", name)["particle_id"].tolist())
        original = set(_table(lab_a if name == "S1" else lab_b, "HEAD" if name == "S1" else "lab-b/S2",
                              name)["particle_id"].tolist())
        assert survivors == original - {pid for sp, pid in dropped if sp == name}
    recorded = lab_a.get_commit(report.commit).operation.parameters["collisions"]
    assert len(recorded) == 3 and all(c["distance_angstrom"] < c["threshold_angstrom"] for c in recorded)
    push(lab_a, "central")
    fetch(lab_b, "origin")
    lab_b.checkout("main")
    merge(lab_b, "origin/main")  # lab B pulls the merged population: a fast-forward
    assert lab_b.resolve("main") == lab_a.resolve("main") == central.resolve("main")
    assert [c for c, _ in lab_b.log()] == [c for c, _ in lab_a.log()]
    assert verify(lab_a).ok and verify(lab_b).ok and verify(central).ok
