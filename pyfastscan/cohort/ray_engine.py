"""The cohort on Ray Core: one long-lived :class:`SlideWorker` actor per GPU (or per CPU
share), each holding the model (sent once through the object store) and converting it
once, scanning whole slides into their folders on the shared file system.

What is retried: a slide whose worker process is lost (killed, out of memory, its node
gone) or which failed with an error another attempt may cure (I/O, a read error) goes
back to the queue, at most ``retries`` times, and its next attempt resumes from the ROI
checkpoint in its folder, so no finished ROI is computed twice. Ray restarts a lost actor
(it converts the model again). What is not: bad options, output folders that cannot be
used, bugs (internal errors) — they would fail the same way again.
"""
from collections import deque
from typing import List, Optional

from ..errors import InvalidArgumentError
from ..pipeline.distributed import actor_errors, dispatch, ray_session, restarted, worker_info
from .run import Ledger, SlideRecord, attempt


class SlideWorker:
    """A Ray actor scanning whole slides (see the module docstring)."""

    def __init__(self, model, index: int, threads: int):
        import torch

        torch.set_num_threads(threads)  # the driver's: oneDNN's sums, so the maps' last bits, depend on it
        self.model, self.index, self.scanners, self._info = model, index, {}, None

    def info(self) -> dict:
        if self._info is None:  # once per process: a restarted worker is a new process, its __init__ runs again
            info = worker_info()
            gpus = f" GPU {','.join(info['gpus'])}" if info["gpus"] else ""
            self._info = dict(info, name=f"ray worker {self.index} ({info['node']} pid {info['pid']}{gpus})")
        return self._info

    def scan(self, rec: SlideRecord, work: dict) -> dict:
        return attempt(rec, dict(work, model=self.model), self.info()["name"], self.scanners)


def plan_workers(ray, workers: Optional[int], gpus_per_worker: Optional[float],
                 cpus_per_worker: Optional[float]):
    """(number of workers, GPUs each, CPUs each) on the cluster Ray is connected to:
    one worker per ``gpus_per_worker`` GPUs (default 1) when the cluster has GPUs, else one
    per node; the CPUs shared among them unless ``cpus_per_worker``. Refuses a plan that
    does not fit the cluster (its workers would wait for ever)."""
    res = ray.cluster_resources()
    gpus, cpus = res.get("GPU", 0.0), res.get("CPU", 0.0)
    g = gpus_per_worker if gpus_per_worker is not None else (1.0 if gpus >= 1 else 0.0)
    if workers is None:
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        workers = int(gpus // g) if g > 0 else max(1, nodes)
    if workers < 1:
        raise InvalidArgumentError(f"the Ray cluster has {gpus:g} GPU(s): not one worker of {g:g} GPU(s) fits")
    c = cpus_per_worker if cpus_per_worker is not None else cpus / workers
    if workers * g > gpus + 1e-9 or workers * c > cpus + 1e-9 or c <= 0:
        raise InvalidArgumentError(f"{workers} worker(s) of {g:g} GPU(s) and {c:g} CPU(s) do not fit the Ray cluster "
                                   f"({gpus:g} GPUs, {cpus:g} CPUs): ask for fewer --workers or smaller shares")
    return workers, g, c


def run_ray(todo: List[SlideRecord], ledger: Ledger, work: dict, *, address: Optional[str], workers: Optional[int],
            gpus_per_worker: Optional[float], cpus_per_worker: Optional[float]) -> None:
    """The Ray engine: every slide of ``todo`` through the workers, one slide in flight per
    worker, results recorded in ``ledger`` as they come."""
    if not todo:
        return
    with ray_session(address) as ray:
        n, g, c = plan_workers(ray, workers, gpus_per_worker, cpus_per_worker)
        cls = ray.remote(SlideWorker).options(num_gpus=g, num_cpus=c, max_restarts=-1, max_task_retries=0)
        model_ref = ray.put(work["model"])
        shared = dict(work, model=None)
        import torch

        actors = [cls.remote(model_ref, i, torch.get_num_threads()) for i in range(n)]
        lost = actor_errors(ray)
        try:
            infos = ray.get([a.info.remote() for a in actors])
            ledger.event("workers", workers=[i["name"] for i in infos])

            def submit(i, rec):
                ledger.start(rec, infos[i]["name"], infos[i]["pid"])
                return actors[i].scan.remote(rec, shared)

            queue = deque(todo)  # one slide in flight per worker
            for i, rec, result, exc in dispatch(ray, n, queue, submit, lost):
                if exc is not None:
                    error = " ".join(f"{infos[i]['name']} was lost ({type(exc).__name__}: {exc})".split())[:500]
                    result = dict(status="failed", error=error, retryable=True, worker=infos[i]["name"])
                    infos[i] = restarted(ray, actors[i], lost)  # Ray restarts it: its new process
                if not ledger.settle(rec, result):
                    queue.appendleft(rec)  # retried next, from its checkpoint
        finally:
            for a in actors:
                ray.kill(a)

