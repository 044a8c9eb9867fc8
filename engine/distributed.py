"""Refinement items on Dask workers (issue 21 §3), with Dask distributed as it is.

The process that runs ``refine`` builds each iteration's plan (``refine_job.IterationPlan``), ships
it once to every worker (``Client.scatter(broadcast=True)``) and submits one task per item. A worker
opens the repository itself: a path all machines share, or a URL (``cryopool serve``, ``s3://…``)
from which it receives the item's objects into a cache in its local directory, each re-hashed on
arrival (``cryopool.repo.readable_at``). It runs ``refine_job.refine_item`` and returns the item's
refined models, poses and reconstruction accumulators; the runner adds the accumulators up as
results arrive. Only the starting process writes, once per iteration, after every item is back: a
task whose worker dies is run again by Dask's scheduler (up to its ``allowed-failures``), and an
item that fails for good fails the iteration before anything is committed.

Dask moves tasks and results with pickle: connect only to a scheduler of your own, or secure the
cluster with TLS (``distributed.Security``).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import torch
from distributed import Client, LocalCluster, as_completed, get_worker

from cryopool.repo import NotFoundError, Repository, TiltSeries, readable_at

from .refine import pick_device
from .refine_job import IterationPlan, ItemResult, refine_item

__all__ = ["DaskRunner", "dask_client", "CONNECT_TIMEOUT_S"]

CONNECT_TIMEOUT_S = 10


@contextlib.contextmanager
def dask_client(scheduler: str | None = None, workers: int | None = None, *,
                timeout_s: float | None = None) -> Iterator[Client]:
    """A client of the scheduler at ``scheduler``, or of a local cluster of ``workers`` worker processes on
    loopback (each with its share of this machine's cores), closed on exit."""
    timeout_s = CONNECT_TIMEOUT_S if timeout_s is None else timeout_s
    if scheduler:
        try:
            client = Client(scheduler, timeout=f"{timeout_s}s")
        except (OSError, TimeoutError) as exc:
            raise NotFoundError(f"no Dask scheduler answers at {scheduler} within {timeout_s:g} s ({exc})",
                                field="scheduler", hint="start one (dask scheduler, or dask-jobqueue on a cluster) "
                                "and give its address, e.g. tcp://host:8786; or use --workers N for a local "
                                "cluster") from None
        with client:
            yield client
        return
    threads = max(1, (os.cpu_count() or 1) // max(1, workers or 1))
    with LocalCluster(n_workers=workers or 1, threads_per_worker=threads, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster, Client(cluster) as client:
        yield client


class DaskRunner:
    """Refines an iteration's items as Dask tasks (``refine.refine_population(runner=...)``).

    ``location``: where the workers read the repository from (a shared path or a URL; default: the
    repository being refined, by its path). ``device``: chosen on each worker ("auto": its GPU if it
    has one).
    """

    def __init__(self, client: Client, location: str | None = None, *, device: str = "auto",
                 token: str | None = None) -> None:
        self.client, self.location, self.device, self.token = client, location, device, token

    def workers(self) -> int:
        return len(self.client.scheduler_info().get("workers", {}))

    def run(self, repo: Repository, plan: IterationPlan, items: list, accumulators, progress) -> Iterator[ItemResult]:
        location = self.location or str(repo.work_dir)
        shipped = self.client.scatter(plan.to("cpu"), broadcast=True, hash=False)
        tag = uuid.uuid4().hex[:8]
        futures = [self.client.submit(_refine_on_worker, location, shipped, key, ref, self.device, self.token,
                                      key=f"cryopool-refine-{tag}-{key}", pure=False)
                   for key, ref, _ in items]
        if progress:
            progress(f"{len(items)} item(s) sent to {self.workers()} Dask worker(s)", 0, len(items))
        try:
            for done, future in enumerate(as_completed(futures), start=1):
                result = future.result()  # a task that failed for good raises here: nothing is committed
                if progress:
                    progress(f"item {result.key} refined", done, len(items))
                yield result
        finally:
            self.client.cancel(futures + [shipped])


def _refine_on_worker(location: str, plan: IterationPlan, key: str, ref, device: str, token: str | None) -> ItemResult:
    """One item on a Dask worker, with that worker's share of the cores."""
    worker = get_worker()
    torch.set_num_threads(max(1, worker.state.nthreads))
    repo = readable_at(location, [ref.id], Path(worker.local_directory) / "cryopool-cache", token=token)
    dev = pick_device(device)
    return refine_item(repo, plan.to(dev), key, repo.get_record(ref, TiltSeries), dev).cpu()
