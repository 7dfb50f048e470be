"""Measure before you adopt: `pyfastscan bench` on this machine and device.

    pyfastscan bench --arch vgg16_fcn [--alpha 2] [--slide SLIDE] [--json]
    pyfastscan bench --weights model.safetensors --device cuda

For a model (a weights file, or an architecture with random weights: speed does not
depend on the weights) it times one ROI per scanner and reports map cells per second:
dense mode (when the network converts) and patch mode, in each precision the device
offers (fp32 always; bf16 where it is fast or on request), and the read ceiling of a
slide (``--slide``): the single-thread rate of the readers' work times the reader threads,
capped by the cores. bench/bench_pipeline.py and bench/bench_models.py use the same
functions.
"""
import platform
import time
from typing import Callable, List, Optional

import torch
from torch import nn

from .dense import to_dense
from .errors import InvalidArgumentError
from .pipeline.readers import BufferRing, read_into
from .pipeline.readers import cpu_cores as cores


def cpu_name() -> str:
    """The CPU's model name with the flags that decide precision (AMX, AVX-512)."""
    from .precision import cpu_flags

    name = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    flags = cpu_flags()
    extras = [f for f in ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2") if f in flags]
    return f"{name} ({', '.join(extras) if extras else 'no AVX2'})"


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (cc {'.'.join(map(str, torch.cuda.get_device_capability(device)))})"
    return cpu_name()


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device="cpu", repeats: int = 3, min_seconds: float = 0.0) -> List[float]:
    """Seconds of ``repeats`` calls of ``fn`` after one warm-up call (device synchronised)."""
    fn()
    _sync(device)
    times = []
    while len(times) < repeats or sum(times) < min_seconds:
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return times


def cell_throughput(scanner: nn.Module, roi_outputs: int, device="cpu", repeats: int = 3) -> dict:
    """Map cells per second of ``scanner`` (DenseModel or PatchModel) on one ROI of
    ``roi_outputs`` x ``roi_outputs`` cells (median of ``repeats``)."""
    g = scanner.geometry
    side = g.input_side(roi_outputs)
    x = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0)).to(scanner.input_dtype).to(device)
    scanner = scanner.to(device)
    with torch.inference_mode():
        times = sorted(time_call(lambda: scanner(x), device, repeats))
    median = times[len(times) // 2]
    return dict(roi_outputs=roi_outputs, roi_side=side, seconds=median, spread=[times[0], times[-1]],
                cells_per_s=roi_outputs ** 2 / median, multiply_adds=scanner.multiply_adds(side))


def _seconds_in_threads(work: Callable[[int], object], k: int) -> float:
    """Seconds for ``k`` threads running ``work(0)`` .. ``work(k - 1)`` at once."""
    import threading

    pool = [threading.Thread(target=work, args=(j,)) for j in range(k)]
    t0 = time.perf_counter()
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    return time.perf_counter() - t0


def thread_scaling(threads: int, seconds: float = 0.1) -> float:
    """How much faster ``threads`` threads run than one, right now, on work that needs no
    GIL, no memory bandwidth and no shared cache (SHA-256 of a 64 KiB buffer: hashlib
    releases the GIL), each way for about ``seconds``: ``threads`` where each thread has a
    core to itself. A diagnostic beside a read ceiling that assumes ``threads`` cores
    (single-thread rate x readers): a 2-vCPU machine whose host is busy gave 1.51-1.98
    within one minute, and readers cannot beat what the cores give."""
    import hashlib
    import os

    data = os.urandom(1 << 16)

    def work(n):
        for _ in range(n):
            hashlib.sha256(data).digest()

    t = time.perf_counter()
    n = 0
    while time.perf_counter() - t < seconds / 4:  # calibrate: hashes per thread for `seconds`
        work(16)
        n += 16
    per_thread = max(16, int(n * seconds / (time.perf_counter() - t)))

    def rate(k):
        return k * per_thread / _seconds_in_threads(lambda j: work(per_thread), k)

    return rate(threads) / rate(1)


def memory_scaling(threads: int, seconds: float = 0.1, nbytes: int = 32 << 20) -> float:
    """How much more memory bandwidth ``threads`` threads get than one, right now: each
    copies its own ``nbytes`` buffer (numpy releases the GIL) over and over for about
    ``seconds``, in ``threads`` threads at once against one alone (the bytes per second of
    all against one). The readers' work streams ~40 MB per 1084 px ROI through memory
    (tiles, the uint8 ROI, its float input), so where this stays near 1 (a 2-vCPU
    machine here: one thread copied 21.5 GB/s, two 20.5 GB/s together) two readers
    cannot run at twice one reader's rate, whatever the cores do."""
    import numpy as np

    src = [np.ones(nbytes, np.uint8) for _ in range(threads)]
    dst = [np.empty(nbytes, np.uint8) for _ in range(threads)]
    np.copyto(dst[0], src[0])  # pages touched before anything is timed
    t = time.perf_counter()
    np.copyto(dst[0], src[0])
    reps = max(1, int(seconds / max(time.perf_counter() - t, 1e-6)))

    def work(k):
        for _ in range(reps):
            np.copyto(dst[k], src[k])

    def rate(k):
        for d, s_ in zip(dst[:k], src[:k]):
            np.copyto(d, s_)
        return k * reps * nbytes / _seconds_in_threads(work, k)

    return rate(threads) / rate(1)


def reader_rate(read: Callable, rois, memory_format: torch.memory_format = torch.contiguous_format) -> float:
    """Mpx/s of one reader thread's work beside a CPU model over ``rois``
    (:func:`~pyfastscan.pipeline.readers.read_into`: ``read(roi)``, converted into a reused
    float32 buffer of ``memory_format``), in the calling thread."""
    ring = BufferRing(torch.float32, memory_format=memory_format)
    px = 0
    t = time.perf_counter()
    for roi in rois:
        buf = read_into(read, roi, ring)
        px += buf.shape[-2] * buf.shape[-1]
        ring.give(buf)
    return px / (time.perf_counter() - t) / 1e6


def read_ceiling(slide, roi_side: int = 1024, n: int = 8, readers: Optional[int] = None,
                 memory_format: torch.memory_format = torch.contiguous_format) -> dict:
    """The read ceiling of a slide: the single-thread rate (Mpx/s) of what a reader thread
    does per ROI (:func:`reader_rate`: a ``roi_side`` px region of level 0 read as a scan
    reads it, converted into an input buffer of ``memory_format``) over ``n`` regions along
    the diagonal, the best of two passes, times the reader threads, capped by the cores
    this process may use; with :func:`thread_scaling` of those cores beside it (the
    ceiling assumes each thread a core of its own)."""
    from .pipeline.readers import default_readers
    from .slide import open_slide

    readers = readers or default_readers()

    def one_pass():  # through a freshly opened slide: its tile cache starts cold, as a scan's
        s = open_slide(slide)
        try:
            w, h = s.dimensions
            side = min(roi_side, w, h)
            spots = [(int((w - side) * k / max(1, n - 1)), int((h - side) * k / max(1, n - 1))) for k in range(n)]
            return side, reader_rate(lambda xy: s.read_level(xy[0], xy[1], side, side, 0), spots, memory_format)
        finally:
            s.close()

    (side, a), (_, b) = one_pass(), one_pass()  # the second: the file in the OS's cache
    single = max(a, b)
    n_cores = min(readers, cores())
    return dict(slide=str(slide), roi_side=side, single_thread_mpx_s=single, readers=readers, cores=cores(),
                ceiling_mpx_s=single * n_cores, thread_scaling=thread_scaling(n_cores) if n_cores > 1 else 1.0)


def run_bench(model: nn.Module, *, alpha: int, device="cpu", roi_outputs: int = 16, patch: Optional[int] = None,
              stride: Optional[int] = None, precisions=None, slide=None, patch_roi_outputs: int = 4,
              repeats: int = 3) -> dict:
    """Everything `pyfastscan bench` prints, as a dict (see the module docstring)."""
    from .models.files import card_of
    from .patch import PatchModel
    from .precision import resolve_precision

    card = card_of(model)
    model = model.eval()
    auto, why = resolve_precision("auto", device)
    precisions = list(precisions or (["fp32", "bf16"] if auto == "bf16" else ["fp32"]))
    rows = []
    dense_reason = None
    fmt = torch.contiguous_format  # the input buffers' layout a scan's readers fill
    for prec in precisions:
        try:
            dense = to_dense(model, alpha, precision=prec)
        except InvalidArgumentError as exc:
            dense_reason = str(exc)
            dense = None
        if dense is not None:
            if prec == "fp32":
                fmt = dense.input_memory_format("cpu")
            g = dense.geometry
            rows.append(dict(mode="dense", precision=prec, **cell_throughput(dense, roi_outputs, device, repeats)))
            patch_, step = g.patch, g.step
        else:
            patch_ = patch or (card.patch if card else None)
            stride_ = stride or (card.stride if card else None)
            if patch_ is None or stride_ is None:
                raise InvalidArgumentError(f"the model is not dense-convertible ({dense_reason}); patch mode needs "
                                           "--patch and --stride")
            if stride_ % alpha:
                raise InvalidArgumentError(f"alpha must divide the stride {stride_}, got {alpha}")
            step = stride_ // alpha
        pm = PatchModel(model, patch_, step, precision=prec)
        rows.append(dict(mode="patch", precision=prec, **cell_throughput(pm, patch_roi_outputs, device, repeats)))
    out = dict(device=device_name(device), torch=torch.__version__, alpha=alpha, auto_precision=auto,
               auto_precision_reason=why, rows=rows)
    if dense_reason:
        out["dense_refused"] = dense_reason
    for prec in precisions:
        d = [r for r in rows if r["precision"] == prec and r["mode"] == "dense"]
        p = [r for r in rows if r["precision"] == prec and r["mode"] == "patch"]
        if d and p:
            out.setdefault("dense_over_patch", {})[prec] = d[0]["cells_per_s"] / p[0]["cells_per_s"]
    if slide is not None:
        out["read"] = read_ceiling(slide, memory_format=fmt)
    return out


def format_bench(result: dict) -> str:
    lines = [f"device: {result['device']}, torch {result['torch']}, alpha {result['alpha']}",
             f"precision auto here: {result['auto_precision']} ({result['auto_precision_reason']})", "",
             f"{'mode':<6} {'precision':<9} {'ROI cells':>9} {'ms / ROI':>9} {'cells / s':>11} {'GMAC / s':>9}"]
    for r in result["rows"]:
        lines.append(f"{r['mode']:<6} {r['precision']:<9} {r['roi_outputs'] ** 2:>9} {r['seconds'] * 1e3:>9.1f} "
                     f"{r['cells_per_s']:>11.0f} {r['multiply_adds'] / r['seconds'] / 1e9:>9.1f}")
    for prec, ratio in result.get("dense_over_patch", {}).items():
        lines.append(f"dense / patch cells per second ({prec}): {ratio:.1f}x")
    if "dense_refused" in result:
        lines.append(f"dense mode refused: {result['dense_refused']}")
    if "read" in result:
        r = result["read"]
        lines.append(f"read ceiling of {r['slide']}: {r['ceiling_mpx_s']:.1f} Mpx/s "
                     f"({r['single_thread_mpx_s']:.1f} Mpx/s per thread x {r['readers']} readers, {r['cores']} cores; "
                     f"the cores ran {min(r['readers'], r['cores'])} threads {r['thread_scaling']:.2f}x as fast as one)")
    return "\n".join(lines)
