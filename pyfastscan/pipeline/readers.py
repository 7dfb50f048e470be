"""The engine's input pipeline: ROIs decoded by reader threads, copied to the device and
computed, reading and computing overlapped on CUDA and taking turns on a CPU whose cores
the model's threads fill.

    for roi, block in RoiPipeline(read, todo, run, device="cuda", readers=4):
        ...                     # blocks in the order of ``todo``

- ``readers`` threads decode ROIs (OpenSlide and tifffile release the GIL while they
  decode). The model's inputs (on CUDA, the ROIs' pinned uint8 pixels) come from a ring
  of reusable buffers (one set per ROI shape), and at most a bounded number of ROIs are
  read ahead, so memory stays flat however long the slide.
- The reader threads are kept between pipelines (:func:`reader_pool`): the next slide of a
  cohort or the next mining scan reuses them. Readers that fill the process's cores each
  keep to one core (:func:`reader_cores`).
- Reader threads touch only numpy, never PyTorch ops (a PyTorch op in a thread of its
  own starts another OpenMP team whose threads spin on the model's cores: with that, the
  scan of bench_scan's slide took 1.2-1.3x the model alone even with every read cached,
  1.06x without). On CUDA the uint8 pixels travel (a quarter of the bytes) on a copy
  stream of their own, ``non_blocking``, and are converted on the device.
- On the CPU, when the model's threads fill the cores (``torch.get_num_threads()`` >= the
  cores this process may use), reading and computing take turns (``CPU_PHASES``): all
  readers decode a phase of ROIs (uint8, as many as the memory budget leaves beside the
  forward pass, each reader a run of neighbouring ROIs), then the model computes them with
  no reader running, the conversion to
  its input (float in [0, 1], ``div_(255)``) done by the model's own threads. A reader
  running beside the model takes a core from one of its threads, and the others then wait
  at the next barrier, so overlapping costs more than the reads it hides. Otherwise (a
  model on fewer threads than cores) the readers run beside it, at a lower priority, and
  convert the pixels themselves (numpy's division, bit for bit ``div_(255)``).
- The model's output stays on the device and comes back asynchronously: the block of ROI
  k is waited for only after ROI k + 1 has been launched, so there is no synchronisation
  between launching one ROI and the next.
- Overlapped (CUDA, or a CPU model on fewer threads than cores), the readers are loops
  that take read-ahead permits and hand ROIs back through C queues (:class:`_ReadAhead`),
  and the read-ahead depth adapts: it starts at ``readers + 1`` and grows (up to
  ``max_depth``) each time the model had to wait for a read (but the first and the
  last), so the model never waits when the readers can keep up.
"""
import contextlib
import itertools
import os
import queue
import threading
import time
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Callable, Dict, Iterable, Optional, Tuple

import numpy as np
import torch


def cpu_cores() -> int:
    """The cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_readers() -> int:
    """Reader threads by default: one per core this process may use, at least 2, at most 8."""
    return max(2, min(8, cpu_cores()))


CPU_READER_NICE = 10  # how much lower a CPU scan's reader threads run than the model's threads
# On the CPU, read and compute in turns when the model's threads fill the cores (see the
# module's docstring); a benchmark whose stand-in model takes no CPU sets it False.
CPU_PHASES = True


def _yield_to_the_model() -> None:
    """Reader-thread initializer of a CPU scan: the readers and the model's threads share
    the cores, and a reader preempting one of the model's threads stalls all of them at
    the next barrier; at a lower priority (Linux: per-thread nice) the readers run in the
    gaps of the model's work. Nothing changes where the OS does not allow it."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), min(19, os.getpriority(os.PRIO_PROCESS, 0)
                                                                       + CPU_READER_NICE))
    except (AttributeError, OSError):
        pass


# Readers that fill the cores this process may use each keep to a core of their own (see
# reader_cores); False (or PYFASTSCAN_PIN_READERS=0 in the environment) leaves every reader
# free to move.
PIN_READERS = os.environ.get("PYFASTSCAN_PIN_READERS", "1") != "0"


def reader_cores(readers: int, nice: int = 0) -> Optional[Tuple[int, ...]]:
    """The cores reader threads are pinned to, one each in turn, or None (not pinned).
    Pinned only when they run at the model's priority (beside an accelerator, or alone in
    a CPU scan's read phases) and there are at least as many of them as cores this process
    may use (Linux): they then fill those cores, and the thread that feeds the device,
    waking a few times per ROI, would otherwise push a reader onto the other core, where it
    finds its caches cold (bench_pipeline on a 2-core AMD EPYC, 2 readers: delivered /
    ceiling 0.879 pinned against 0.852 free, medians of 10 interleaved pairs, pinned ahead
    in 8). With more cores than readers they stay free to move. Several processes whose
    readers fill the cores (Ray actors, a cohort's workers) each pin their reader k to
    core k, so each core gets one reader of each. ``PIN_READERS = False`` or
    ``PYFASTSCAN_PIN_READERS=0`` turns it off (a desktop whose other programs keep cores busy)."""
    if not PIN_READERS or nice or not hasattr(os, "sched_setaffinity"):
        return None
    try:
        cores = tuple(sorted(os.sched_getaffinity(0)))
    except OSError:
        return None
    return cores if 1 < len(cores) <= readers else None


def _pin_to(cores: Tuple[int, ...], turn) -> None:
    """Reader-thread initializer: keep this thread to the next core of ``cores``."""
    try:
        os.sched_setaffinity(threading.get_native_id(), {cores[next(turn) % len(cores)]})
    except OSError:
        pass


_IDLE_POOLS: Dict[tuple, list] = {}  # reader pools not in use, by (pid, threads, nice, pinned cores)
_POOLS_LOCK = threading.Lock()


@contextlib.contextmanager
def reader_pool(readers: int, nice: int = 0):
    """A pool of ``readers`` reader threads (at ``nice`` below the model's threads, pinned
    to cores when :func:`reader_cores` says so) for one pipeline's use, kept for the next
    one: a cohort's slides, a training run's mining scans and a benchmark's runs reuse
    started threads instead of starting them per scan (freshly started threads ran the
    reads measurably slower here). Each pipeline has its pool to itself (two scans at
    once each get one); on the way out the tasks not started are cancelled and the
    running ones waited for (a pipeline's reader loops are told to stop first), so no
    reader touches the slide after the scan. Keyed by process id: a forked child (a
    DataLoader worker) starts its own."""
    cores = reader_cores(readers, nice)
    key = (os.getpid(), readers, nice, cores)
    with _POOLS_LOCK:
        idle = _IDLE_POOLS.setdefault(key, [])
        pool = idle.pop() if idle else None
    if pool is None:
        init, args = None, ()
        if nice:
            init = _yield_to_the_model
        elif cores:  # (reader_cores is None at any nice)
            init, args = _pin_to, (cores, itertools.count())
        pool = ThreadPoolExecutor(max_workers=readers, thread_name_prefix="pyfastscan-reader", initializer=init,
                                  initargs=args)
    submitted = []

    def submit(fn, *args):
        fut = pool.submit(fn, *args)
        submitted.append(fut)
        if len(submitted) > 64:  # keep only the futures that may still run
            submitted[:] = [f for f in submitted if not f.done()]
        return fut

    try:
        yield submit
    finally:
        for f in submitted:
            f.cancel()
        wait(submitted)
        with _POOLS_LOCK:
            _IDLE_POOLS.setdefault(key, []).append(pool)


def to_model_input(rgb: np.ndarray, out: np.ndarray) -> np.ndarray:
    """(h, w, 3) uint8 pixels -> ``out``, (3, h, w) float in [0, 1] (its dtype), with numpy
    only, so a reader thread runs no PyTorch op; bit for bit PyTorch's ``div_(255)``."""
    return np.divide(rgb.transpose(2, 0, 1), 255, out=out, dtype=out.dtype)


def read_into(read: Callable, roi, ring: "BufferRing") -> torch.Tensor:
    """What a reader thread does per ROI beside a CPU model: ``read(roi)`` ((h, w, 3) uint8)
    converted into a (1, 3, h, w) buffer of ``ring`` (the model's input dtype and layout)
    with numpy only (:func:`to_model_input`). The benchmarks' read ceilings time this."""
    rgb = read(roi)
    buf = ring.take((1, 3) + rgb.shape[:2])
    to_model_input(rgb, buf.numpy()[0])
    return buf


def pixels_to_input(rgb, out: torch.Tensor) -> torch.Tensor:
    """(h, w, 3) uint8 pixels (numpy, or a tensor on ``out``'s device) -> ``out``, (1, 3, h,
    w) in its dtype and layout (NCHW or channels_last): the pixels / 255 (``div_(255)``), in
    the calling thread's PyTorch threads."""
    if isinstance(rgb, np.ndarray):
        if not rgb.flags.writeable or any(st < 0 for st in rgb.strides):
            rgb = np.array(rgb)  # torch.from_numpy takes neither
        rgb = torch.from_numpy(rgb)
    out[0].copy_(rgb.permute(2, 0, 1))
    return out.div_(255)


def max_read_ahead(readers: int) -> int:
    """The most ROIs read ahead at once (the memory budget counts this many buffers)."""
    return 2 * readers + 1


class BufferRing:
    """Reusable tensors by shape: ``take`` hands out a free one (or makes one), ``give``
    returns it. At most as many buffers per shape exist as were ever out at once."""

    def __init__(self, dtype: torch.dtype, pin: bool = False, memory_format: torch.memory_format = torch.contiguous_format):
        self.dtype, self.pin, self.memory_format = dtype, pin, memory_format
        self._free: Dict[Tuple[int, ...], list] = {}
        self._lock = threading.Lock()
        self.allocated = 0

    def take(self, shape: Tuple[int, ...]) -> torch.Tensor:
        with self._lock:
            free = self._free.setdefault(tuple(shape), [])
            if free:
                return free.pop()
            self.allocated += 1
        return torch.empty(shape, dtype=self.dtype, pin_memory=self.pin, memory_format=self.memory_format)

    def give(self, t: torch.Tensor) -> None:
        with self._lock:
            self._free.setdefault(tuple(t.shape), []).append(t)


class _Runs:
    """Indices 0 .. n - 1 handed to ``k`` readers in runs: reader ``me`` takes its own
    contiguous share from the front; with it done, it takes from the back of the share
    with the most left, so the readers finish together and each reads neighbours in a row.
    ``stop_at(i)``: ``i`` and the indices after it are no longer handed out (a read failed
    there, or the consumer stopped waiting: ``stop_at(0)``; the ones before it are still read)."""

    def __init__(self, n: int, k: int):
        cuts = [round(i * n / k) for i in range(k + 1)]
        self.k = k
        self._left = [[cuts[i], cuts[i + 1]] for i in range(k)]  # [next, end) of each share
        self._lock = threading.Lock()

    def take(self, me: int) -> Optional[int]:
        with self._lock:
            own = self._left[me]
            if own[0] < own[1]:
                own[0] += 1
                return own[0] - 1
            most = max(self._left, key=lambda share: share[1] - share[0])
            if most[0] < most[1]:
                most[1] -= 1
                return most[1]
            return None

    def stop_at(self, i: int) -> None:
        with self._lock:
            for share in self._left:
                share[1] = min(share[1], i)


class RoiPipeline:
    """Iterate (roi, block) over ``todo`` in order.

    Args:
        read: ``read(roi) -> np.ndarray`` (h, w, 3) uint8, called in reader threads.
        todo: the ROIs.
        run: ``run(x) -> tensor`` on the device: the model plus the selection of the
            positive-class map, (h', w'); ``x`` is (1, 3, h, w) in ``in_dtype`` in [0, 1],
            a reused buffer: the result must be a tensor of its own, not a view of ``x``.
        device: where ``run`` computes.
        in_dtype: the model's input dtype.
        memory_format: the CPU input buffers' layout (the model's, :meth:`DenseModel.input_memory_format`:
            a channels_last model then takes them without a copy).
        readers: reader threads.
        max_depth: most ROIs read ahead (default :func:`max_read_ahead`).
        phase: in phases, the ROIs read per phase, if more than the default (as many
            uint8 ROIs as the bytes of ``max_depth`` input buffers, which the memory budget
            counts); the engine sizes it from what the budget leaves (engine.phase_rois).
        timings: a dict whose "read_wait" and "infer" entries are increased (seconds the
            consumer waited for reads; seconds spent converting the pixels, where the
            model's threads do it, and launching and finishing the model).
    """

    def __init__(self, read: Callable, todo: Iterable, run: Callable, *, device, in_dtype: torch.dtype,
                 readers: int, max_depth: Optional[int] = None, timings: Optional[dict] = None,
                 memory_format: torch.memory_format = torch.contiguous_format, phase: Optional[int] = None):
        self.read, self.todo, self.run = read, list(todo), run
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.in_dtype = in_dtype
        self.readers = readers
        self.max_depth = max(readers + 1, max_depth or max_read_ahead(readers))
        self.depth = readers + 1
        self.timings = timings if timings is not None else {}
        self.timings.setdefault("read_wait", 0.0)
        self.timings.setdefault("infer", 0.0)
        # CPU: the model's input (converted by the readers, or by the model's threads in
        # phases); CUDA: pinned uint8 pixels.
        self.ring = BufferRing(torch.uint8, pin=True) if self.cuda else BufferRing(in_dtype, memory_format=memory_format)
        self.depth_grew = 0
        self.phased = not self.cuda and CPU_PHASES and torch.get_num_threads() >= cpu_cores()
        # at least, a phase's uint8 ROIs take the bytes of the max_depth input buffers the budget counts
        self.phase = max(self.max_depth * in_dtype.itemsize, phase or 0)

    def _load(self, roi):
        """Reader thread: decode ``roi`` into a buffer of the ring."""
        if not self.cuda:
            return read_into(self.read, roi, self.ring)
        rgb = self.read(roi)
        buf = self.ring.take(rgb.shape)
        np.copyto(buf.numpy(), rgb)
        return buf

    def __iter__(self):
        if not self.todo:
            return
        if self.phased:
            yield from self._cpu_phases()
            return
        timings = self.timings
        # a failing ROI or a consumer that stops early: no further read starts
        ahead = _ReadAhead(self)
        try:
            with reader_pool(self.readers, 0 if self.cuda else CPU_READER_NICE) as submit:
                try:
                    ahead.start(submit)
                    if self.cuda:
                        yield from self._cuda_loop(ahead)
                        return
                    for i, roi in enumerate(self.todo):
                        t = time.perf_counter()
                        buf = ahead.take(i)
                        timings["read_wait"] += time.perf_counter() - t
                        t = time.perf_counter()
                        with torch.inference_mode():  # only around the model: never across a yield
                            block = self.run(buf).float().numpy()
                        timings["infer"] += time.perf_counter() - t
                        self.ring.give(buf)
                        yield roi, block
                finally:
                    ahead.close()  # before the pool waits for the reader loops
        finally:
            ahead.drop()  # the loops have ended: what they read and nobody took goes now

    def _cpu_phases(self):
        """CPU, the model's threads on every core: the readers decode ``phase`` ROIs, then
        the model computes them (its threads converting each to its input) with no reader
        running, and so on. Within a phase each reader reads a run of neighbouring ROIs
        (:class:`_Runs`): they share tiles, which it then decodes once and finds in its
        own CPU cache, and the readers do not wait for each other's tiles (bench_scan's
        196 ROIs of 438 px: 2 readers 1.4x one reader taking the ROIs in turns, 1.8x in runs)."""
        timings = self.timings
        with reader_pool(self.readers) as submit:
            it = iter(self.todo)
            while True:
                batch = list(itertools.islice(it, self.phase))
                if not batch:
                    return
                t = time.perf_counter()
                runs = _Runs(len(batch), min(self.readers, len(batch)))
                got, failed = [None] * len(batch), {}

                def reader(me):
                    for k in iter(lambda: runs.take(me), None):
                        try:
                            got[k] = self.read(batch[k])
                        except BaseException as exc:  # raised below, after the ROIs read before it
                            failed[k] = exc
                            runs.stop_at(k)

                futures = [submit(reader, me) for me in range(runs.k)]
                try:
                    for f in futures:
                        f.result()  # every read of the phase done before the model starts
                except BaseException:  # interrupted (Ctrl-C) while waiting: no further read starts
                    runs.stop_at(0)
                    raise
                timings["read_wait"] += time.perf_counter() - t
                for k, roi in enumerate(batch):
                    if k in failed:
                        got.clear()  # the phase's unread ROIs go now, not with the traceback's cycle
                        raise failed[k]
                    rgb, got[k] = got[k], None
                    t = time.perf_counter()
                    with torch.inference_mode():  # only around the model: never across a yield
                        x = pixels_to_input(rgb, self.ring.take((1, 3) + rgb.shape[:2]))
                        block = self.run(x).float().numpy()
                    del rgb
                    timings["infer"] += time.perf_counter() - t
                    self.ring.give(x)
                    yield roi, block

    def _cuda_loop(self, ahead: "_ReadAhead"):
        """Copy on its own stream, compute on the current one, results one ROI behind."""
        timings = self.timings
        copy_stream = torch.cuda.Stream(self.device)
        compute = torch.cuda.current_stream(self.device)
        host_out = BufferRing(torch.float32, pin=True)
        inflight = deque()  # (roi, host block, done event, pinned input buffer)

        def finish_one():
            roi, host, done, buf = inflight.popleft()
            t = time.perf_counter()
            done.synchronize()
            timings["infer"] += time.perf_counter() - t
            self.ring.give(buf)
            block = host.numpy().copy()
            host_out.give(host)
            return roi, block

        for i, roi in enumerate(self.todo):
            t = time.perf_counter()
            buf = ahead.take(i)
            timings["read_wait"] += time.perf_counter() - t
            t = time.perf_counter()
            with torch.inference_mode():
                with torch.cuda.stream(copy_stream):
                    dev = buf.to(self.device, non_blocking=True)
                compute.wait_stream(copy_stream)
                dev.record_stream(compute)
                x = pixels_to_input(dev, torch.empty((1, 3) + tuple(dev.shape[:2]), dtype=self.in_dtype,
                                                    device=self.device))
                out = self.run(x).float()
                host = host_out.take(tuple(out.shape))
                host.copy_(out, non_blocking=True)
            done = torch.cuda.Event()
            done.record(compute)
            inflight.append((roi, host, done, buf))
            timings["infer"] += time.perf_counter() - t
            if len(inflight) > 1:  # ROI k + 1 is launched: now wait for ROI k
                yield finish_one()
        while inflight:
            yield finish_one()


_LIVE: "weakref.WeakSet[_ReadAhead]" = weakref.WeakSet()  # read-aheads whose reader loops may run


def _stop_live_read_aheads() -> None:
    """At interpreter exit, before the thread pools wait for their threads: a pipeline
    left part-way (a paused generator in a variable, a notebook) stops its reader loops,
    which would otherwise wait for permits that never come and hold up the exit. A
    consumer still taking ROIs then (a scan in a thread the main thread did not wait for)
    gets a RuntimeError instead of waiting for reads that will not come."""
    for ahead in list(_LIVE):
        ahead.close()


if hasattr(threading, "_register_atexit"):  # runs before concurrent.futures' own hook (registered earlier)
    threading._register_atexit(_stop_live_read_aheads)


class _ReadAhead:
    """The overlapped paths' reads of a :class:`RoiPipeline`: ``readers`` reader loops (one
    task each in the pool) take the next ROI as soon as a read-ahead permit is free and
    hand (index, buffer or error) back through a queue; the consumer takes ROI ``i``'s
    buffer in order (:meth:`take`), which frees its permit for the next read. At most
    ``pipeline.depth`` ROIs are read ahead; the depth grows (up to ``max_depth``) each
    time the consumer finds its ROI not read yet (not for the first ROI, which every model
    waits for, nor the last). Permits and results pass through ``queue.SimpleQueue`` (C,
    no Python lock or Future per ROI: the thread feeding the device holds the GIL less,
    and the readers wait for it less). A loop waiting for a permit looks every
    ``IDLE_CHECK`` seconds whether it was told to stop, so a stop that lost its permits
    (an interrupt in :meth:`close`) still ends it."""

    IDLE_CHECK = 0.25

    def __init__(self, pipeline: RoiPipeline):
        self.p = pipeline
        self.n = len(pipeline.todo)
        self._permits, self._done = queue.SimpleQueue(), queue.SimpleQueue()
        self._next = itertools.count()  # the next ROI a reader takes (next() is atomic under the GIL)
        self._early: Dict[int, object] = {}  # results that came before the consumer asked for them
        self._stop = False
        self._tasks: list = []

    def start(self, submit) -> None:
        """Grant the first ``depth`` permits and start the reader loops."""
        _LIVE.add(self)
        for _ in range(self.p.depth):
            self._permits.put(True)
        for _ in range(self.p.readers):
            self._tasks.append(submit(self._reader))

    def _reader(self) -> None:
        todo, load = self.p.todo, self.p._load
        while not self._stop:
            try:
                self._permits.get(timeout=self.IDLE_CHECK)
            except queue.Empty:
                continue
            if self._stop:
                return
            i = next(self._next)
            if i >= self.n:
                return
            try:
                self._done.put((i, load(todo[i])))
            except BaseException as exc:  # raised by the consumer at ROI i, after the ROIs before it
                self._done.put((i, exc))
                return

    def _collect(self) -> None:
        """Move the results already handed back into ``_early``, without waiting."""
        while True:
            try:
                k, got = self._done.get_nowait()
            except queue.Empty:
                return
            self._early[k] = got

    def take(self, i: int):
        """ROI ``i``'s buffer (ROIs are taken in order, 0, 1, ...), or its read's error."""
        p = self.p
        if i not in self._early:
            self._collect()  # only then: an empty queue costs an exception
            if 0 < i < self.n - 1 and i not in self._early and p.depth < p.max_depth:
                p.depth += 1  # the model caught up with the readers: read further ahead
                p.depth_grew += 1
                self._permits.put(True)
        while i not in self._early:
            try:
                k, got = self._done.get(timeout=self.IDLE_CHECK)
            except queue.Empty:
                if self._stop and all(t.done() for t in self._tasks):  # stopped from outside: nothing will come
                    raise RuntimeError("pyfastscan: the ROI reads were stopped (the interpreter is exiting)") from None
                continue
            self._early[k] = got
        got = self._early.pop(i)
        if isinstance(got, BaseException):
            raise got
        self._permits.put(True)  # ROI i is the consumer's: another may be read
        return got

    def close(self) -> None:
        """No further read starts; the reader loops end after the reads they are in (at
        once for those waiting for a permit). Safe to call again."""
        self._stop = True
        for _ in self._tasks:
            self._permits.put(True)
        _LIVE.discard(self)

    def drop(self) -> None:
        """Let go of the buffers read and not taken (pinned memory on CUDA)."""
        self._collect()
        self._early.clear()


__all__ = ["RoiPipeline", "BufferRing", "cpu_cores", "default_readers", "max_read_ahead", "pixels_to_input",
           "read_into", "reader_cores", "reader_pool", "to_model_input"]
