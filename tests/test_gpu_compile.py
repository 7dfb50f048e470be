"""The GPU code compiles for real targets (sm_80, sm_90) without a GPU, without spills on
the hot path, and the exact hotspot kernel has no fma (shared/notes/GPU-WITHOUT-GPU.md).

* Triton: every kernel at every launch configuration the package uses, through the
  package's own launchers (their ``*_config`` choice, the JIT's own specialisation) with
  ``JITFunction.run(warmup=True)`` and a driver whose target is GPUTarget("cuda", cc, 32);
  then Triton's ptxas -v on the PTX for registers and spills.
* Numba: the hotspot kernel to PTX with the toolkit's NVVM (``compile_ptx``, cc 8.0 and
  9.0) at the argument types its launcher passes; no ``fma.`` in it (an fma rounds
  dy*dy + dx*dx once and moves window boundaries), no spills.
* CUDA C++: nvcc -Xptxas -v on every csrc/cuda/*.cu for sm_80 and sm_90.

The session runs with TRITON_INTERPRET=1 and NUMBA_ENABLE_CUDASIM=1 (tests/conftest.py),
which both libraries read at import: the Triton and Numba compiles run in subprocesses
(this file run as a script) with those removed from the environment. Compiled Triton
kernels are cached in Triton's cache, so a second run takes seconds. Runs whenever nvcc
is on PATH; skips only without it.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TARGETS = (80, 90)
SIM_VARS = ("TRITON_INTERPRET", "NUMBA_ENABLE_CUDASIM")

# What the package launches (models/nets.py, models/residual.py through dense.py: pools of
# 2 and 3, convolutions of 2 and 3 taps a side in anchor form).
DTYPES = ("float32", "bfloat16", "float64")
POOL_KERNELS = (2, 3)
CONV_KERNELS = (2, 3)

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None,
                                reason="nvcc not on PATH: GPU compile checks need the CUDA toolkit")


# ----------------------------------------------------------------------------- helpers


def cuda_home() -> str:
    """Root of the toolkit nvcc belongs to (nvcc may be a wrapper script elsewhere)."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    out = subprocess.run(["nvcc", "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True)
    m = re.search(r"TOP=(\S+)", out.stdout + out.stderr)
    top = Path(m.group(1)).resolve() if m else Path(shutil.which("nvcc")).resolve().parents[1]
    return str(top)


def clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in SIM_VARS}
    env["CUDA_HOME"] = cuda_home()
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # today's default, stated (silences Triton 3.9's warning)
    return env


def ptxas_report(text: str) -> dict:
    """kernel name -> (registers, spill store bytes, spill load bytes) from ptxas -v output."""
    out, name = {}, None
    for line in text.splitlines():
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            name = m.group(1)
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and name is not None:
            out[name] = [None, int(m.group(1)), int(m.group(2))]
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and name is not None and name in out:
            out[name][0] = int(m.group(1))
    return out


def _run_worker(*args) -> list:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=clean_env(),
                          cwd=ROOT, timeout=900)
    rows = [json.loads(line[5:]) for line in proc.stdout.splitlines() if line.startswith("JSON ")]
    assert proc.returncode == 0 and rows, (f"worker {args} failed (exit {proc.returncode}):\n"
                                           f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return rows


def _nvcc(src: Path, cc: int, tmp: Path) -> dict:
    cmd = ["nvcc", "-O3", "-std=c++17", f"-arch=sm_{cc}", "-Xptxas", "-v", f"-I{ROOT / 'csrc'}",
           f"-I{ROOT / 'csrc' / 'include'}", "-c", str(src), "-o", str(tmp / f"{src.stem}_sm{cc}.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return dict(src=src.name, cc=cc, ok=proc.returncode == 0, log=proc.stdout + proc.stderr,
                kernels=ptxas_report(proc.stdout + proc.stderr))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every compile of this file, run once, two at a time (the machine has 2 cores)."""
    tmp = tmp_path_factory.mktemp("nvcc")
    jobs = [("triton", lambda cc=cc: _run_worker("triton", str(cc))) for cc in TARGETS]
    jobs.append(("numba", lambda: _run_worker("numba")))
    jobs += [("nvcc", lambda s=s, cc=cc: [_nvcc(s, cc, tmp)])
             for s in sorted((ROOT / "csrc" / "cuda").glob("*.cu")) for cc in TARGETS]
    out = {"triton": [], "numba": [], "nvcc": []}
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [(kind, pool.submit(fn)) for kind, fn in jobs]
        for kind, fut in futures:
            out[kind] += fut.result()
    return out


# ----------------------------------------------------------------------------- tests


def test_triton_kernels_compile_without_spills(results):
    rows = results["triton"]
    expected = len(TARGETS) * (len(DTYPES) * 2 * len(POOL_KERNELS) + len(DTYPES) * 2 * len(CONV_KERNELS) + 4)
    assert len(rows) == expected, f"compiled {len(rows)} Triton specialisations, expected {expected}"
    errors = [r for r in rows if r.get("error")]
    assert not errors, "Triton compile errors:\n" + "\n".join(f"  {r['case']} sm_{r['cc']}: {r['error']}"
                                                            for r in errors)
    spills = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    assert not spills, "Triton kernels spill:\n" + "\n".join(
        f"  {r['case']} sm_{r['cc']}: {r['registers']} registers, {r['spill_stores']} B spill stores" for r in spills)
    assert {r["cc"] for r in rows} == set(TARGETS)


def test_triton_anchor_offsets_are_int64(results):
    """Input and output offsets of the anchor kernels are int64 (an image of N*O*Ho*Wo
    outputs or C*H*W inputs can pass 2**31 elements): no int32 size products or offset
    tensors in their Triton IR."""
    rows = [r for r in results["triton"] if r["case"].startswith("anch_") and not r.get("error")]
    assert rows
    bad = {f"{r['case']} sm_{r['cc']}": r["int32_offsets"][:3] for r in rows if r["int32_offsets"]}
    assert not bad, f"int32 address arithmetic: {bad}"


def test_int32_offset_detector():
    """The detector flags what the kernels had before they used int64 (kernels/anchor.py)."""
    assert int32_offsets("%out_off_46 = arith.muli %O, %Ho : i32 loc(#loc116)")
    assert int32_offsets("%a_84 = tt.addptr %a_82, %a_83 : tensor<32x32x!tt.ptr<f32>>, tensor<32x32xi32> loc(#l)")
    assert not int32_offsets("%b_1 = tt.addptr %b_0, %b_9 : tensor<16x1x!tt.ptr<f32>>, tensor<16x1xi32> loc(#l)")
    assert not int32_offsets("%6 = tt.addptr %5, %o : tensor<32x32x!tt.ptr<f32>>, tensor<32x32xi64> loc(#l)")


def test_numba_hotspot_kernel_compiles_exact(results):
    rows = results["numba"]
    assert {tuple(r["cc"]) for r in rows} == {(8, 0), (9, 0)}
    for r in rows:
        assert not r.get("error"), f"hotspot_rows_kernel does not compile for cc {r['cc']}: {r['error']}"
        assert r["fma"] == 0, (f"hotspot_rows_kernel PTX for cc {r['cc']} has {r['fma']} fma instructions: "
                               f"counts would no longer equal the oracle at window boundaries")
        assert r["mul_rn"] > 0, "the window tests' products should be mul.rn.f64 (libdevice dmul_rn)"
        assert r["spill_stores"] == 0, r


@pytest.mark.parametrize("cc", TARGETS)
def test_nvcc_compiles_cuda_sources_without_spills(results, cc):
    rows = [r for r in results["nvcc"] if r["cc"] == cc]
    assert rows, "no .cu files found in csrc/cuda"
    for r in rows:
        assert r["ok"], f"nvcc failed on {r['src']} for sm_{cc}:\n{r['log'][-4000:]}"
        assert r["kernels"], f"no ptxas report for {r['src']}:\n{r['log'][-2000:]}"
        spills = {k: v for k, v in r["kernels"].items() if v[1] or v[2]}
        assert not spills, f"{r['src']} sm_{cc} kernels spill (registers, stores, loads): {spills}"


def test_ptxas_report_parser():
    text = ("ptxas info    : Function properties for k1\n    0 bytes stack frame, 8 bytes spill stores, "
            "4 bytes spill loads\nptxas info    : Used 255 registers, used 0 barriers\n")
    assert ptxas_report(text) == {"k1": [255, 8, 4]}


# ----------------------------------------------------------------------------- workers
# Run as `python tests/test_gpu_compile.py triton 80` / `... numba` in a clean environment;
# each prints one "JSON {...}" line per compiled kernel.


def _emit(**row):
    print("JSON " + json.dumps(row), flush=True)


def _ptxas(ptx: str, cc: int, ptxas: str) -> dict:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "k.ptx"
        f.write_text(ptx)
        arch = re.search(r"\.target\s+(sm_\w+)", ptx).group(1)
        proc = subprocess.run([ptxas, "-v", f"-arch={arch}", str(f), "-o", str(Path(d) / "k.cubin")],
                              capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed: {proc.stderr[-2000:]}")
    rep = ptxas_report(proc.stderr + proc.stdout)
    regs = max((v[0] or 0) for v in rep.values())
    return dict(registers=regs, spill_stores=sum(v[1] for v in rep.values()),
                spill_loads=sum(v[2] for v in rep.values()))


def _triton_worker(cc: int):
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.driver import CudaDriver
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    class TargetOnly(CudaDriver):
        """A driver that names a target and never touches a GPU."""

        def __init__(self):
            self.utils = None

        def get_current_target(self):
            return GPUTarget("cuda", cc, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

        @staticmethod
        def is_active():
            return True

    driver.set_active(TargetOnly())
    compiled = []
    run = JITFunction.run

    def warmup_run(self, *args, **kwargs):
        kwargs["warmup"] = True
        kernel = run(self, *args, **kwargs)
        compiled.append(kernel)
        return kernel

    JITFunction.run = warmup_run
    from pyfastscan.kernels import anchor, stain
    from pyfastscan.ops.stain import fused_params

    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    ptxas = str(bin_dir / ("ptxas-blackwell" if cc >= 90 else "ptxas"))

    def case(name, launch):
        compiled.clear()
        row = dict(case=name, cc=cc)
        try:
            launch()
            (kernel,) = compiled
            ptx = kernel.asm["ptx"]
            row.update(_ptxas(ptx, cc, ptxas), num_warps=kernel.metadata.num_warps, shared=kernel.metadata.shared)
            if name.startswith("anch_"):
                row["int32_offsets"] = int32_offsets(kernel.asm["ttir"])
        except Exception as exc:  # reported by the test, with the case
            row["error"] = f"{type(exc).__name__}: {exc}"[-3000:]
        _emit(**row)

    # Shapes like a dense scan's: contiguous NCHW, channels a multiple of 16.
    for dt in DTYPES:
        dtype = getattr(torch, dt)
        x = torch.randn(2, 16, 48, 48).to(dtype)
        for k in POOL_KERNELS:
            for average in (False, True):
                axis = (k, 2, 4, 2)  # d = 2, s_a = 4, d_a = 2: an anchor pool
                out_len = anchor_out_len(48, axis)
                case(f"anch_pool2d {dt} k={k} {'avg' if average else 'max'}",
                     lambda: anchor.anch_pool2d_triton(x, axis, axis, (out_len, out_len), average))
        for k in CONV_KERNELS:
            w = torch.randn(32, 16, k, k).to(dtype)
            for bias in (None, torch.randn(32).to(dtype)):
                axis = (k, 2, 4, 2)
                out_len = anchor_out_len(48, axis)
                case(f"anch_conv2d {dt} k={k} bias={bias is not None}",
                     lambda: anchor.anch_conv2d_triton(x, w, bias, axis, axis, (out_len, out_len)))
    for dt in ("uint8", "float32"):
        for channels_last in (False, True):
            shape = (2, 64, 64, 3) if channels_last else (2, 3, 64, 64)
            img = torch.randint(0, 256, shape, dtype=torch.uint8)
            img = img if dt == "uint8" else img.float() / 255
            p = fused_params(torch.ones(2, 3), torch.zeros(2, 3), dt == "uint8")
            case(f"hed_augment {dt} channels_last={channels_last}",
                 lambda: stain.hed_augment_triton(img, torch.empty_like(img), p, channels_last))


def anchor_out_len(n, axis):
    from pyfastscan.ops.anchor import AnchorAxis

    return AnchorAxis(*axis).out_len(n)


_SIZES = r"%(?:O|C|M|Ho|Wo|NBLK)"


def int32_offsets(ttir: str) -> list:
    """Lines of an anchor kernel's Triton IR where an address could wrap at 2**31: a 32-bit
    product of two size arguments (O*Ho*Wo, ...), or a tensor of int32 offsets added to a
    pointer into the input or output (weights, named b_*, are small and may use int32)."""
    bad = []
    for line in ttir.splitlines():
        if re.search(rf"arith\.muli {_SIZES}\b[^,]*, {_SIZES}\b.*: i32", line):
            bad.append(line.strip())
        elif re.search(r"tt\.addptr %(?!b_)\S+, %\S+ : tensor<.*>, tensor<[^>]*xi32>", line):
            bad.append(line.strip())
    return bad


def _numba_worker():
    import numba.cuda.dispatcher as dispatcher

    class Device:  # compile_ptx asks the driver's current device for device functions
        compute_capability = (8, 0)

    dispatcher.get_current_device = lambda: Device()
    from numba import cuda

    from pyfastscan.kernels import hotspot_numba

    ptxas = str(Path(os.environ["CUDA_HOME"]) / "bin" / "ptxas")
    for cc in ((8, 0), (9, 0)):
        Device.compute_capability = cc
        row = dict(case="hotspot_rows_kernel", cc=list(cc))
        try:
            ptx, _ = cuda.compile_ptx(hotspot_numba.hotspot_rows_kernel.py_func,
                                      hotspot_numba.hotspot_rows_signature(), cc=cc)
            row.update(fma=len(re.findall(r"\bfma\.", ptx)), mul_rn=len(re.findall(r"\bmul\.rn\.f64", ptx)))
            row.update(_ptxas(ptx, cc[0] * 10 + cc[1], ptxas))
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"[-3000:]
        _emit(**row)


if __name__ == "__main__":
    for var in SIM_VARS:
        assert var not in os.environ, f"run the compile workers without {var}"
    if sys.argv[1] == "triton":
        _triton_worker(int(sys.argv[2]))
    elif sys.argv[1] == "numba":
        _numba_worker()
    else:
        raise SystemExit(f"unknown worker {sys.argv[1]!r}")
