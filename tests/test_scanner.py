"""Dense or patch mode, chosen per model; both give the patch-by-patch map of a whole slide
(DESIGN.md 6.2)."""
import os
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import gamma, network_error_bound, patch_loop
from pyfastscan import InvalidArgumentError, scan_slide, to_dense
from pyfastscan.dense import DenseModel, _flatten
from pyfastscan.models import residual_fcn, resnet18
from pyfastscan.models.files import CARD_ATTR, ModelCard
from pyfastscan.patch import PatchModel
from pyfastscan.pipeline.scanner import make_scanner
from test_patch import _first_order_bound
from helpers import ArraySlide
from test_scan import _image, _model


def _padded(width=4):
    torch.manual_seed(0)
    return resnet18(num_classes=2, width=width).double().eval()


def test_auto_picks_dense_for_a_padding_free_net_and_patch_for_a_padded_one():
    sc = make_scanner(residual_fcn(width=4).eval(), alpha=2)
    assert sc.mode == "dense" and isinstance(sc.model, DenseModel) and sc.note is None
    net = _padded()
    setattr(net, CARD_ATTR, ModelCard("resnet18", {"width": 4}, ("n", "t"), 1, 0.5, None, 64, 32))
    sc = make_scanner(net, alpha=2)
    assert sc.mode == "patch" and isinstance(sc.model, PatchModel)
    assert sc.model.geometry.patch == 64 and sc.model.geometry.step == 16  # stride 32 / alpha 2
    assert "not dense-convertible" in sc.note and "padding" in sc.note and "fewer multiply-adds" in sc.note
    with pytest.raises(InvalidArgumentError, match="padding"):
        make_scanner(net, mode="dense", alpha=2)
    with pytest.raises(InvalidArgumentError, match="patch mode needs the patch size.*--patch"):
        make_scanner(_padded(), alpha=1)
    with pytest.raises(InvalidArgumentError, match="alpha must be a positive integer dividing the stride 32"):
        make_scanner(net, alpha=3)
    with pytest.raises(InvalidArgumentError, match="mode must be one of"):
        make_scanner(net, mode="fast")
    dense = to_dense(_model(), 2)
    assert make_scanner(dense).model is dense
    with pytest.raises(InvalidArgumentError, match="conflicts"):
        make_scanner(dense, mode="patch")


def test_patch_mode_scan_equals_dense_mode_scan_and_the_patch_loop():
    """The same padding-free model scanned both ways over a whole (in-memory) slide."""
    model, img = _model(), _image()
    kw = dict(alpha=2, tissue_mask=np.ones((17, 14), dtype=bool), progress=False, roi_outputs=6)
    dense = scan_slide(ArraySlide(img), model, mode="dense", **kw)
    g = to_dense(model, 2).geometry
    patch = scan_slide(ArraySlide(img), model, mode="patch", patch=g.patch, stride=g.stride, batch_size=7, **kw)
    assert dense.model["mode"] == "dense" and patch.model["mode"] == "patch"
    x = torch.from_numpy(img).permute(2, 0, 1)[None].double() / 255
    loop = torch.softmax(patch_loop(model, x, g.patch, g.step), dim=1)[0, 1].numpy()
    crops = torch.cat([x[:, :, i * g.step:i * g.step + g.patch, j * g.step:j * g.step + g.patch]
                       for i in range(loop.shape[0]) for j in range(loop.shape[1])])
    bound = network_error_bound(_flatten(model), crops, torch.float64).amax(dim=1).reshape(loop.shape).numpy()
    store = 2.0 ** -24 * np.abs(loop)
    for res in (dense, patch):
        assert res.heatmap.shape == loop.shape
        assert np.all(np.abs(res.heatmap.astype(np.float64) - loop) <= 2 * bound + store)


def test_padded_resnet_in_patch_mode_equals_the_literal_patch_loop():
    net = _padded()
    img = np.ascontiguousarray(_image()[:120, :110])
    kw = dict(alpha=1, tissue_mask=np.ones((12, 11), dtype=bool), progress=False, roi_outputs=3)
    res = scan_slide(ArraySlide(img), net, patch=32, stride=16, **kw)
    assert res.model["mode"] == "patch" and "padding" in res.model["note"]
    x = torch.from_numpy(img).permute(2, 0, 1)[None].double() / 255
    ny, nx = res.heatmap.shape
    assert (ny, nx) == ((120 - 32) // 16 + 1, (110 - 32) // 16 + 1)
    crops = torch.cat([x[:, :, i * 16:i * 16 + 32, j * 16:j * 16 + 32] for i in range(ny) for j in range(nx)])
    with torch.inference_mode():
        logits = torch.cat([net(c[None]) for c in crops])
    loop = torch.softmax(logits, dim=1)[:, 1].reshape(ny, nx).numpy()
    # softmax is 1/4-Lipschitz in the logit difference: the logits' bound (both classes) carries
    # over; each path's softmax adds its own roundings (exp, sum, division), the map one float32
    bound = 2 * _first_order_bound(net, crops).sum(1).reshape(ny, nx).numpy() / 4
    store = 2.0 ** -24 * np.abs(loop) + 2 * gamma(6, torch.float64) * np.abs(loop)
    assert np.all(np.abs(res.heatmap.astype(np.float64) - loop) <= bound + store)


@pytest.fixture(params=["phases", "overlap"])
def cpu_mode(request, monkeypatch):
    """The CPU pipeline in each of its modes: reading and computing in turns (the model's
    threads fill the cores) and overlapped (they do not)."""
    from pyfastscan.pipeline import readers

    if request.param == "phases":
        monkeypatch.setattr(readers, "cpu_cores", lambda: 1)
    else:
        monkeypatch.setattr(readers, "CPU_PHASES", False)
    return request.param


def test_pipeline_keeps_inference_mode_inside_and_stops_early(cpu_mode):
    from pyfastscan.pipeline.readers import RoiPipeline

    reads = []

    def read(roi):
        reads.append(roi)
        return np.full((8, 8, 3), roi, np.uint8)

    def run(x):
        assert torch.is_inference_mode_enabled()  # the model runs in inference mode
        return x[0, 0] * 2

    pipe = RoiPipeline(read, range(40), run, device="cpu", in_dtype=torch.float32, readers=2)
    it = iter(pipe)
    roi, block = next(it)
    assert roi == 0 and not torch.is_inference_mode_enabled()  # the caller's mode is its own
    assert np.allclose(block, 0)
    roi, block = next(it)
    assert roi == 1 and np.allclose(block, 2 / 255)
    it.close()  # the consumer stops: no further read starts (overlapped), no phase after this one (phases)
    assert len(reads) < 40
    assert pipe.ring.allocated <= pipe.max_depth + 1  # buffers bounded by the read-ahead
    assert pipe.phased == (cpu_mode == "phases")


def test_in_phases_no_read_runs_beside_the_model_and_the_blocks_are_the_same(cpu_mode):
    import threading
    import time

    from pyfastscan.pipeline.readers import RoiPipeline

    lock, active, beside = threading.Lock(), [0], []
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (5 + k % 3, 7, 3), dtype=np.uint8) for k in range(30)]

    def read(k):
        with lock:
            active[0] += 1
        time.sleep(0.002)  # a read long enough to be seen if it overlaps
        with lock:
            active[0] -= 1
        return images[k]

    def run(x):
        beside.append(active[0])
        time.sleep(0.002)
        beside.append(active[0])
        return x[0, 1] * 3 + x[0, 2]

    pipe = RoiPipeline(read, range(30), run, device="cpu", in_dtype=torch.float32, readers=2)
    out = list(pipe)
    assert [k for k, _ in out] == list(range(30))
    for k, block in out:  # the model's input: the pixels / 255 (bit for bit), (1, 3, h, w)
        x = torch.from_numpy(images[k]).permute(2, 0, 1).float().div_(255)
        assert np.array_equal(block, (x[1] * 3 + x[2]).numpy())
    if cpu_mode == "phases":
        assert max(beside) == 0  # no reader ran while the model did


def test_a_failing_read_and_odd_arrays(cpu_mode):
    from pyfastscan.pipeline.readers import RoiPipeline

    img = np.arange(6 * 5 * 3, dtype=np.uint8).reshape(6, 5, 3)
    frozen = img.copy()
    frozen.flags.writeable = False

    def read(k):
        if k == 7:
            raise OSError("tile 7 is corrupt")
        return (img, frozen, img[::-1], img[:, ::-1])[k % 4]  # plain, read-only, negative strides

    expect = [img, frozen, img[::-1], img[:, ::-1]]
    pipe = RoiPipeline(read, range(12), lambda x: x[0].sum(0), device="cpu", in_dtype=torch.float32, readers=2)
    got = []
    with pytest.raises(OSError, match="tile 7"):
        for k, block in pipe:
            got.append(k)
            ref = torch.from_numpy(expect[k % 4].copy()).permute(2, 0, 1).float().div_(255).sum(0)
            assert np.array_equal(block, ref.numpy())
    assert got == list(range(7))  # every ROI before the failing one, in order, then its error


def test_reader_threads_are_kept_between_pipelines_and_never_shared_at_once(cpu_mode):
    import threading
    import time

    from pyfastscan.pipeline.readers import RoiPipeline

    running = [0]
    lock = threading.Lock()

    def pipeline(threads: set):
        def read(k):
            with lock:
                running[0] += 1
                threads.add(threading.get_native_id())  # (not reused as soon as a thread ends)
            time.sleep(0.001)
            with lock:
                running[0] -= 1
            return np.full((4, 4, 3), k, np.uint8)

        return RoiPipeline(read, range(20), lambda x: x[0, 0], device="cpu", in_dtype=torch.float32, readers=2)

    first, second, beside, held = set(), set(), set(), set()
    assert [k for k, _ in pipeline(first)] == list(range(20))
    assert [k for k, _ in pipeline(second)] == list(range(20))
    assert second <= first  # the next scan's reads ran on the threads the first one started
    a = iter(pipeline(held))
    next(a)  # a holds the kept threads ...
    assert [k for k, _ in pipeline(beside)] == list(range(20))
    assert held <= first and beside and not beside & first  # ... so a scan beside it got threads of its own
    a.close()  # a pipeline that stops early leaves no read of its own running
    assert running[0] == 0


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 60), st.integers(1, 4), st.one_of(st.none(), st.integers(0, 70)))
def test_reader_runs_hand_out_every_roi_once_in_runs_of_neighbours(n, k, stop):
    """Phases' scheduling: each index once (up to a failure's index, then none after it),
    each reader's own share first, front to back."""
    import threading

    from pyfastscan.pipeline.readers import _Runs

    k = min(k, n)
    runs, taken, lock = _Runs(n, k), [[] for _ in range(k)], threading.Lock()
    if stop is not None:
        runs.stop_at(stop)
    barrier = threading.Barrier(k)

    def reader(me):
        barrier.wait()  # all at once
        for i in iter(lambda: runs.take(me), None):
            with lock:
                taken[me].append(i)

    threads = [threading.Thread(target=reader, args=(me,)) for me in range(k)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
        assert not t.is_alive()
    every = sorted(i for t in taken for i in t)
    assert every == list(range(n if stop is None else min(n, stop)))
    cuts = [round(i * n / k) for i in range(k + 1)]
    for me, got in enumerate(taken):  # its own share first, front to back, from its start
        p = next((j for j, i in enumerate(got) if not cuts[me] <= i < cuts[me + 1]), len(got))
        assert got[:p] == list(range(cuts[me], cuts[me] + p))


def test_a_phase_reads_runs_of_neighbours_and_holds_what_the_budget_leaves(monkeypatch):
    """In phases, each reader reads a contiguous run of the phase's ROIs; a scan's phase
    is sized from the memory budget (engine.phase_rois) and never exceeds it."""
    import threading
    import time

    from pyfastscan.pipeline import engine, readers
    from pyfastscan.pipeline.readers import RoiPipeline

    monkeypatch.setattr(readers, "cpu_cores", lambda: 1)  # in phases
    by_thread, lock, in_phase, phases = {}, threading.Lock(), [0], []

    def read(k):
        with lock:
            by_thread.setdefault(threading.get_ident(), []).append(k)
            in_phase[0] += 1
        time.sleep(0.001)  # both readers get to read
        return np.full((4, 4, 3), k, np.uint8)

    def run(x):
        phases.append(in_phase[0])
        in_phase[0] = 0
        return x[0, 0]

    out = [k for k, _ in RoiPipeline(read, range(100), run, device="cpu", in_dtype=torch.float32, readers=2,
                                     phase=100)]
    assert out == list(range(100)) and phases[0] == 100  # one phase: every read before the first compute
    assert len(by_thread) == 2
    for ks in by_thread.values():  # runs of neighbours (its own share forwards, then another's backwards)
        assert sum(abs(b - a) == 1 for a, b in zip(ks, ks[1:])) >= len(ks) - 3

    class Job:  # what phase_rois reads of a ScanJob
        def __init__(self, memory):
            self.memory, self.dense = memory, _DenseStub()

    class _DenseStub:
        input_dtype = torch.float32

        def activation_bytes(self, side):
            return 1000 * side * side

    rois = [engine.Roi(0, 0, 5, 5, 0, 0, 100, 80), engine.Roi(0, 5, 5, 5, 90, 0, 120, 100)]
    side = 120
    for memory in (3 << 20, 64 << 20, 4 << 30):
        n = engine.phase_rois(Job(memory), rois)
        spare = memory - 2 * 1000 * side * side - 3 * side * side * 4
        assert n >= 1 and (n == 1 or n * 3 * side * side <= min(spare, engine.PHASE_BYTES))
        assert (n + 1) * 3 * side * side > min(spare, engine.PHASE_BYTES) or n == 1
    assert engine.phase_rois(Job(None), rois) is None


@pytest.mark.parametrize("mode", ["phases", "overlapped"])
def test_an_interrupt_while_reads_run_starts_no_further_read(monkeypatch, mode):
    """Ctrl-C while the readers read a long phase, or while the model waits for an
    overlapped read, reaches the caller at once: the reads already running finish, no
    other starts."""
    import os
    import signal
    import threading
    import time

    from pyfastscan.pipeline import readers
    from pyfastscan.pipeline.readers import RoiPipeline

    if mode == "phases":
        monkeypatch.setattr(readers, "cpu_cores", lambda: 1)
    else:
        monkeypatch.setattr(readers, "CPU_PHASES", False)  # as beside an accelerator
    reads = []

    def read(k):
        reads.append(k)
        time.sleep(0.005)
        return np.zeros((4, 4, 3), np.uint8)

    pipe = RoiPipeline(read, range(400), lambda x: x[0, 0], device="cpu", in_dtype=torch.float32, readers=2,
                       phase=400)  # 400 reads: 1 s on two readers
    assert pipe.phased == (mode == "phases")
    timer = threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGINT))  # Ctrl-C
    t = time.perf_counter()
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        list(pipe)
    took, caught = time.perf_counter() - t, len(reads)
    timer.cancel()
    assert took < 0.5 and caught < 150, (took, caught)
    time.sleep(0.1)
    assert len(reads) <= caught + 2  # after the interrupt, only the reads already running (2 readers)


def test_a_scan_reads_in_phases_sized_by_its_memory_budget(monkeypatch):
    """scan_slide's pipeline gets engine.phase_rois of its job: the budget decides the phase."""
    from pyfastscan.pipeline import engine, readers

    seen = []
    init = readers.RoiPipeline.__init__

    def spy(self, *args, **kw):
        seen.append(kw.get("phase"))
        init(self, *args, **kw)

    monkeypatch.setattr(readers.RoiPipeline, "__init__", spy)
    kw = dict(alpha=2, roi_outputs=5, tissue_mask=np.ones((17, 14), dtype=bool), progress=False)
    scan_slide(ArraySlide(_image()), _model(), memory=256 << 20, **kw)
    side = to_dense(_model(), 2).geometry.input_side(5)
    assert seen[-1] == int(engine.PHASE_BYTES // (3 * side * side))  # 256 MB leaves more than the cap
    scan_slide(ArraySlide(_image()), _model(), memory=48 << 20, **kw)
    assert seen[-1] < int(engine.PHASE_BYTES // (3 * side * side))  # a smaller budget: a shorter phase


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="per-thread CPU affinity is Linux's")
def test_readers_that_fill_the_cores_each_keep_to_one_and_others_stay_free(monkeypatch):
    """reader_cores: pinned only at the model's priority and when the readers are at least
    the cores this process may use; then each reader thread of the pool keeps to a core of
    its own, in turn (read back from the OS)."""
    import threading

    from pyfastscan.pipeline import readers

    cores = tuple(sorted(os.sched_getaffinity(0)))
    n = len(cores)
    if n < 2:
        pytest.skip("one core: nothing to pin to")
    assert readers.reader_cores(n) == cores and readers.reader_cores(n + 3) == cores
    assert readers.reader_cores(n - 1) is None  # more cores than readers: free to move
    assert readers.reader_cores(n, nice=10) is None  # beside a CPU model's threads: free
    monkeypatch.setattr(readers, "PIN_READERS", False)
    assert readers.reader_cores(n) is None
    monkeypatch.setattr(readers, "PIN_READERS", True)

    barrier = threading.Barrier(n)

    def where():
        barrier.wait(timeout=10)  # every thread of the pool started, each answering for itself
        return os.sched_getaffinity(threading.get_native_id())

    with readers.reader_pool(n) as submit:
        got = [f.result(timeout=10) for f in [submit(where) for _ in range(n)]]
    assert sorted(min(s) for s in got) == list(cores) and all(len(s) == 1 for s in got)
    assert os.sched_getaffinity(threading.get_native_id()) == set(cores)  # the caller's own stays as it was


def test_overlapped_reads_deepen_only_while_the_model_waits(monkeypatch):
    """Beside a model that is faster than the readers, the read-ahead grows to its limit;
    beside a slower one it stays where it started."""
    import time

    from pyfastscan.pipeline import readers
    from pyfastscan.pipeline.readers import RoiPipeline

    monkeypatch.setattr(readers, "CPU_PHASES", False)  # overlapped, as beside an accelerator

    def read(k, pause):
        time.sleep(pause)
        return np.full((4, 4, 3), k % 256, np.uint8)

    def model(pause):
        def run(x):
            time.sleep(pause)
            return x[0, 0] * 255

        return run

    fast = RoiPipeline(lambda k: read(k, 0.004), range(60), model(0), device="cpu", in_dtype=torch.float32,
                       readers=2)
    got = [(k, int(block[0, 0])) for k, block in fast]
    assert got == [(k, k) for k in range(60)]  # in order, each its own pixels
    assert fast.depth == fast.max_depth == 5 and fast.depth_grew == 2  # from readers + 1 = 3
    assert fast.ring.allocated <= fast.max_depth + 1
    slow = RoiPipeline(lambda k: read(k, 0), range(10), model(0.05), device="cpu", in_dtype=torch.float32,
                       readers=2)  # each read has 50 ms to be ready before the model asks for it
    assert [k for k, _ in slow] == list(range(10))
    assert slow.depth == 3 and slow.depth_grew == 0


def test_a_process_with_an_overlapped_pipeline_left_part_way_exits(tmp_path):
    """A pipeline paused at a ROI when the interpreter exits (a generator in a variable, a
    notebook) stops its reader loops, which would otherwise wait for read-ahead permits
    and keep the process from exiting."""
    import subprocess
    import sys

    script = tmp_path / "left.py"
    script.write_text("""
import numpy as np, torch
from pyfastscan.pipeline import readers
readers.CPU_PHASES = False  # overlapped, as beside an accelerator
pipe = readers.RoiPipeline(lambda k: np.zeros((4, 4, 3), np.uint8), range(50), lambda x: x[0, 0], device="cpu",
                           in_dtype=torch.float32, readers=2)
it = iter(pipe)
next(it)
print("left part-way", flush=True)
""")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == 0 and "left part-way" in proc.stdout, proc.stderr


def test_a_consumer_whose_reads_are_stopped_at_exit_gets_an_error_not_a_hang(monkeypatch):
    """The exit hook stops every live read-ahead; a consumer in another thread still
    taking ROIs then gets a RuntimeError once the reads in progress are delivered, instead
    of waiting for ROIs no reader will read (the process would never exit)."""
    import threading
    import time

    from pyfastscan.pipeline import readers
    from pyfastscan.pipeline.readers import RoiPipeline

    monkeypatch.setattr(readers, "CPU_PHASES", False)

    def read(k):
        time.sleep(0.01)
        return np.full((4, 4, 3), k, np.uint8)

    got, errors = [], []

    def consume():
        try:
            for k, _ in RoiPipeline(read, range(200), lambda x: x[0, 0], device="cpu", in_dtype=torch.float32,
                                    readers=2):
                got.append(k)
        except RuntimeError as exc:
            errors.append(exc)

    th = threading.Thread(target=consume)
    th.start()
    time.sleep(0.1)
    readers._stop_live_read_aheads()  # what the interpreter's exit runs
    th.join(10)
    assert not th.is_alive()
    assert len(errors) == 1 and "stopped" in str(errors[0]) and 0 < len(got) < 200
    assert got == list(range(len(got)))  # the ROIs before it, in order
