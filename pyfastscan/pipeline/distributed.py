"""The scan engine on Ray Core (DESIGN.md 6.1: distribution wraps the engine).

A Ray worker is a long-lived actor that holds one model; the driver plans, stitches and
checkpoints, so a distributed map is the local map, bit for bit. Two uses:

- one slide over K workers (``scan_slide(..., engine="ray", workers=K)``): the driver
  opens the slide and plans its ROIs; each :class:`RoiWorker` opens the slide itself (its
  plan is checked against the driver's by the scan key) and computes batches of ROIs with
  :func:`~pyfastscan.pipeline.engine.infer_rois`; the driver stitches the blocks and appends
  them to the checkpoint as they come.
- a cohort (:mod:`pyfastscan.cohort`): one worker per GPU scans whole slides.

Ray is optional (``pip install "pyfastscan[ray]"``); nothing here imports it before it
is used. A Ray instance this module starts binds to 127.0.0.1 only and sends no usage
statistics (:data:`LOCAL_ONLY_ENV`, set when this module is the first to import Ray); ``address="auto"`` or ``"HOST:PORT"`` joins a cluster started with
``ray start --head``.
"""
import contextlib
import math
import os
from collections import deque
from typing import Optional

from ..errors import BackendUnavailableError, InvalidArgumentError

BATCHES_PER_WORKER = 4  # ROI batches per worker over a slide: the last worker to finish waits at most ~1/4 of its share
IN_FLIGHT = 2  # batches queued per worker, so that it never waits for the driver between two


LOCAL_ONLY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",  # no usage statistics sent anywhere
    # Ray's switch for local-only instances (the default on Windows and macOS): the node is
    # 127.0.0.1 and every Ray server listens there only. Read when ray is first imported.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}


def import_ray(local_only: bool = False):
    """The ``ray`` module, or BackendUnavailableError saying how to install it. With
    ``local_only``, a first import sets :data:`LOCAL_ONLY_ENV` (unless the environment
    says otherwise) so that a Ray instance started here binds to 127.0.0.1 only."""
    import sys

    if local_only and "ray" not in sys.modules:
        for k, v in LOCAL_ONLY_ENV.items():
            os.environ.setdefault(k, v)
    try:
        import ray
    except ImportError as exc:
        raise BackendUnavailableError(f"engine='ray' needs Ray ({exc}): pip install \"pyfastscan[ray]\"") from None
    return ray


@contextlib.contextmanager
def ray_session(address: Optional[str] = None):
    """Ray, connected for the duration of the block. Inside a process where Ray is already
    initialised, that session is used (and left running). Otherwise ``address=None`` starts
    a local instance bound to 127.0.0.1, without the dashboard or usage statistics, and
    shuts it down afterwards; ``"auto"`` or ``"HOST:PORT"`` joins a running cluster (and
    disconnects afterwards)."""
    ray = import_ray(local_only=address is None)
    if ray.is_initialized():
        yield ray
        return
    if address is None:
        ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    else:
        try:
            ray.init(address=address, log_to_driver=False)
        except ConnectionError as exc:
            raise InvalidArgumentError(f"cannot join the Ray cluster at {address!r} ({exc}); start one with "
                                       "`ray start --head`, or leave the address out for a local instance") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def actor_errors(ray):
    """The exceptions a call raises when its worker process is lost (killed, node lost)."""
    return (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.ObjectLostError)


def restarted(ray, actor, lost, wait_s: float = 300.0) -> dict:
    """The info of ``actor`` once Ray has restarted it (calls fail while it restarts)."""
    import time

    deadline = time.monotonic() + wait_s
    while True:
        try:
            return ray.get(actor.info.remote(), timeout=wait_s)
        except lost + (ray.exceptions.GetTimeoutError,):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def worker_info() -> dict:
    """Where this worker runs: process id, node address, the GPUs Ray gave it."""
    import ray

    return dict(pid=os.getpid(), node=ray.util.get_node_ip_address(), gpus=[str(g) for g in ray.get_gpu_ids()])


def portable_slide(slide):
    """What a worker opens for the driver's ``slide``: its path, or the reader object itself
    when it pickles (an in-memory reader); an opened OpenSlide handle does not travel."""
    from ..slide.reader import Slide

    if isinstance(slide, (str, os.PathLike)):
        return os.path.abspath(os.fspath(slide))
    if isinstance(slide, Slide):
        if slide.path is not None:
            return os.path.abspath(slide.path)
        slide = slide.handle
    try:
        from ray import cloudpickle

        cloudpickle.dumps(slide)
    except Exception as exc:
        raise InvalidArgumentError(f"engine='ray' sends the slide to its workers, and {type(slide).__name__} does not "
                                   f"pickle ({type(exc).__name__}: {exc}); pass the slide's path") from None
    return slide


class RoiWorker:
    """A Ray actor computing ROI batches of one slide at a time (see the module docstring)."""

    def __init__(self, model, options: dict, threads: int):
        import torch

        torch.set_num_threads(threads)  # the driver's: oneDNN's sums, so the maps' last bits, depend on it
        self.model, self.options = model, options
        self.scanners, self.stack, self.job, self.slide_key = {}, None, None, None

    def info(self) -> dict:
        return worker_info()

    def _open(self, slide, key: dict):
        from .engine import open_scan, scan_key

        if self.job is not None and self.slide_key == key:
            return self.job
        if self.stack is not None:
            self.stack.close()
        self.stack = contextlib.ExitStack()
        job = open_scan(self.stack, slide, self.model, progress=False, scanners=self.scanners, **self.options)
        mine = scan_key(job)
        if mine != key:
            diff = sorted(k for k in set(mine) | set(key) if mine.get(k) != key.get(k))
            raise InvalidArgumentError(f"{job.slide.name}: this worker's scan differs from the driver's in "
                                       f"{', '.join(diff)} (another slide file, model or library version on its node)")
        self.job, self.slide_key = job, key
        return job

    def compute(self, slide, key: dict, rois: list) -> list:
        """[(roi, block)] for ``rois`` (tuples of :class:`~pyfastscan.pipeline.engine.Roi`)."""
        from .engine import Roi, infer_rois

        job = self._open(slide, key)
        return [(tuple(roi), block) for roi, block in
                infer_rois(job, [Roi(*r) for r in rois], device=self.options["device"], label="", progress=False)]


def dispatch(ray, n: int, queue: deque, submit, lost, per_actor: int = 1):
    """The driver's loop over ``n`` actors: while ``queue`` has work and an actor has fewer
    than ``per_actor`` calls in flight, ``submit(i, item)`` (-> an object ref) gives the
    least loaded actor ``i`` the next item; yields (i, item, value, lost exception or None)
    as calls finish. ``lost``: the exception types of a lost actor (:func:`actor_errors`),
    yielded instead of raised, so the caller may requeue the item (``queue`` is read live:
    ``queue.appendleft(item)`` retries it next). Any other failure of a call is raised."""
    pending, load = {}, [0] * n
    while queue or pending:
        while queue and min(load) < per_actor:
            i = load.index(min(load))
            item = queue.popleft()
            pending[submit(i, item)] = (i, item)
            load[i] += 1
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            i, item = pending.pop(ref)
            load[i] -= 1
            try:
                value, exc = ray.get(ref), None
            except lost as e:
                value, exc = None, e
            yield i, item, value, exc


def split(todo: list, parts: int) -> list:
    """``todo`` in consecutive batches, about ``parts`` of them (at least one ROI each)."""
    size = max(1, math.ceil(len(todo) / max(1, parts)))
    return [todo[k:k + size] for k in range(0, len(todo), size)]


def infer_rois_ray(job, todo: list, slide, model, options: dict, *, workers: Optional[int], address: Optional[str],
                   label: str, progress: bool, retries: int = 2):
    """Yield (roi, probability block) for each ROI of ``todo``, in the order they finish,
    computed by ``workers`` :class:`RoiWorker` actors (default: one per GPU of the cluster,
    else 2). A batch whose worker is lost is sent again (at most ``retries`` times per
    batch) to a restarted worker. The driver's ``job`` gives the plan and the key the
    workers check theirs against."""
    from ..progress import Progress
    from .engine import scan_key

    if not todo:
        return
    where = portable_slide(slide)
    key = scan_key(job)
    with ray_session(address) as ray:
        resources = ray.cluster_resources()
        gpus = resources.get("GPU", 0)
        n = workers or (int(gpus) if gpus >= 1 else 2)
        on_gpu = str(options["device"]).startswith("cuda") and gpus >= n
        cls = ray.remote(RoiWorker).options(num_cpus=0 if on_gpu else min(1.0, resources.get("CPU", 1) / n),
                                            num_gpus=1 if on_gpu else 0, max_restarts=-1, max_task_retries=0)
        model_ref = ray.put(model)
        import torch

        actors = [cls.remote(model_ref, options, torch.get_num_threads()) for _ in range(n)]
        lost = actor_errors(ray)
        queue = deque((b, 0) for b in split([tuple(r) for r in todo], n * BATCHES_PER_WORKER))
        bar = Progress(len(todo), label + " on Ray", progress, unit="ROIs")
        done = 0

        def submit(i, item):
            return actors[i].compute.remote(where, key, item[0])

        try:
            for i, (batch, attempt), blocks, exc in dispatch(ray, n, queue, submit, lost, per_actor=IN_FLIGHT):
                if exc is not None:
                    if attempt >= retries:
                        raise BackendUnavailableError(f"{job.slide.name}: a Ray worker was lost {attempt + 1} "
                                                      f"times computing ROIs {batch[0][:2]}..: {exc}") from None
                    restarted(ray, actors[i], lost)  # calls to it fail while Ray restarts it
                    queue.appendleft((batch, attempt + 1))
                    continue
                for roi, block in blocks:
                    yield roi, block
                done += len(blocks)
                bar.update(done)
        except ray.exceptions.RayTaskError as exc:
            raise exc.as_instanceof_cause() from None
        finally:
            for a in actors:
                ray.kill(a)

