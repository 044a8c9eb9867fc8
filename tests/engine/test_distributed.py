"""Refinement on Dask workers (issue 21 §3): a LocalCluster of worker processes on loopback.

The reference is the same refinement in this process: the items are independent except through the
maps, so the distributed result must equal it up to the order in which accumulators are added.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import replace

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import running_server

from cryopool.cli.main import cli
from cryopool.engine.refine import RefineOptions, refine_population
from cryopool.engine.simulate import PRESETS, SpeciesSpec, simulate, write_simulation
from cryopool.engine.records_io import load_particles
from cryopool.repo import DeformationModel, NotFoundError, Repository, Species, TiltSeries, item_refs

distributed = pytest.importorskip("distributed")
from cryopool.engine.distributed import DaskRunner, dask_client  # noqa: E402

# every refinement kept: the comparison then covers the refined poses and shifts, not only the reconstruction
FAST = dict(groups=("shifts", "poses"), lbfgs_iterations=4, rounds=1, image_warp_grid=(2, 2), require_significance=False)


@pytest.fixture(scope="module")
def sim():
    return simulate(replace(PRESETS["test"], species=[SpeciesSpec("a", 150.0, 4), SpeciesSpec("b", 80.0, 4)],
                            items_per_source=2, image_size_px=(112, 112), seed=21))


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None) as c:
        yield c


@pytest.fixture(scope="module")
def in_process(sim, tmp_path_factory):
    repo = Repository.init(tmp_path_factory.mktemp("local") / "pop")
    write_simulation(repo, sim)
    start = repo.refs.read(repo.branch_ref())
    (report,) = refine_population(repo, RefineOptions(iterations=1, **FAST))
    out, before = _outcome(repo, report.commit), _outcome(repo, start)
    for key in out:
        if key.endswith(("/positions", "/shifts")):
            assert not np.allclose(out[key], before[key]), key  # refinement moved them: equality below means something
    return out


def _outcome(repo: Repository, commit: str) -> dict:
    pop = repo.population(commit)
    out = {}
    for name, ref in pop.species.items():
        sp = repo.get_record(ref, Species)
        for field in ("half_map_1", "half_map_2"):
            out[f"{name}/{field}"] = np.asarray(repo.get_array(getattr(sp, field)).read())
        out[f"{name}/positions"] = load_particles(repo, sp.particles).positions.numpy()
    for key, ref in item_refs(repo, pop).items():
        ts = repo.get_record(ref, TiltSeries)
        deformation = repo.get_record(ts.deformation, DeformationModel)
        out[f"{key}/shifts"] = np.asarray(repo.get_array(deformation.tilt_shifts_angstrom).read())
    return out


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        scale = max(float(np.abs(a[k]).max()), 1e-6)
        assert np.abs(a[k] - b[k]).max() <= 1e-4 * scale, k


def _fresh(sim, path) -> Repository:
    repo = Repository.init(path)
    write_simulation(repo, sim)
    return repo


def test_distributed_refinement_equals_the_in_process_one(sim, cluster, in_process, tmp_path):
    repo = _fresh(sim, tmp_path / "pop")
    with dask_client(cluster.scheduler_address) as client:
        (report,) = refine_population(repo, RefineOptions(iterations=1, **FAST), runner=DaskRunner(client))
    _assert_same(in_process, _outcome(repo, report.commit))
    assert len(list(repo.log())) == 2  # the simulation and one refine commit, written by this process only


def test_a_worker_killed_mid_iteration_is_retried_and_nothing_partial_is_committed(sim, cluster, in_process,
                                                                                      tmp_path):
    repo = _fresh(sim, tmp_path / "pop")
    start = repo.refs.read(repo.branch_ref())
    with dask_client(cluster.scheduler_address) as watcher:
        pids = watcher.run(os.getpid)
        outcome: dict = {}

        def run():
            with dask_client(cluster.scheduler_address) as client:
                try:
                    outcome["reports"] = refine_population(repo, RefineOptions(iterations=1, **FAST),
                                                           runner=DaskRunner(client))
                except BaseException as exc:  # noqa: BLE001  reported below
                    outcome["error"] = exc
        thread = threading.Thread(target=run)
        thread.start()
        victim, deadline = None, time.monotonic() + 120
        while victim is None and time.monotonic() < deadline:
            for address, keys in watcher.processing().items():
                if any(str(k).startswith("cryopool-refine") for k in keys) and address in pids:
                    victim = address
            time.sleep(0.05)
        assert victim is not None, "no item was ever seen running"
        assert repo.refs.read(repo.branch_ref()) == start  # mid-iteration: nothing committed yet
        os.kill(pids[victim], signal.SIGKILL)
        thread.join(timeout=300)
    assert "error" not in outcome, outcome.get("error")
    (report,) = outcome["reports"]
    assert repo.get_commit(report.commit).parents[0].id == start  # one commit, straight on the start
    _assert_same(in_process, _outcome(repo, report.commit))


def test_workers_read_the_repository_from_a_url(sim, cluster, in_process, tmp_path):
    """Workers that do not share the repository's disk receive each item's objects from ``cryopool serve``."""
    repo = _fresh(sim, tmp_path / "pop")
    with running_server(repo.work_dir, anonymous_read=True) as url, dask_client(cluster.scheduler_address) as client:
        (report,) = refine_population(repo, RefineOptions(iterations=1, **FAST), runner=DaskRunner(client, url))
        caches = client.run(lambda dask_worker: os.path.isdir(os.path.join(dask_worker.local_directory,
                                                                            "cryopool-cache", ".cryopool")))
    assert any(caches.values())  # the items came through the server, into the workers' caches
    _assert_same(in_process, _outcome(repo, report.commit))


def test_an_unreachable_scheduler_is_a_clear_error(tmp_path):
    with pytest.raises(NotFoundError, match="no Dask scheduler answers at tcp://127.0.0.1:9"):
        with dask_client("tcp://127.0.0.1:9", timeout_s=2):
            pass


def test_the_command_line_refines_on_a_cluster_and_reports_a_bad_scheduler(sim, cluster, tmp_path, monkeypatch):
    repo = _fresh(sim, tmp_path / "pop")
    monkeypatch.chdir(repo.work_dir)
    runner = CliRunner()
    ok = runner.invoke(cli, ["refine", "-n", "1", "--groups", "shifts,poses", "--lbfgs-iterations", "2",
                             "--rounds", "1", "--scheduler", cluster.scheduler_address])
    assert ok.exit_code == 0, ok.output
    assert "sent to 2 Dask worker(s)" in ok.output and "iteration 1:" in ok.output
    monkeypatch.setattr("cryopool.engine.distributed.CONNECT_TIMEOUT_S", 1)
    bad = runner.invoke(cli, ["refine", "-n", "1", "--scheduler", "tcp://127.0.0.1:9"])
    assert bad.exit_code != 0 and "no Dask scheduler answers" in bad.output and "Traceback" not in bad.output
    clash = runner.invoke(cli, ["refine", "--scheduler", "tcp://127.0.0.1:9", "--workers", "2"])
    assert clash.exit_code != 0 and "exclude each other" in clash.output
