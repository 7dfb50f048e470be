"""The build: native modules, build_info, the CLI and the interim demo."""
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import pyfastscan
from helpers import nvcc_present
from pyfastscan import BackendUnavailableError, _native, backends

ROOT = Path(__file__).resolve().parents[1]


def test_build_info_reports_modules_and_backends():
    info = pyfastscan.build_info()
    assert info["native"]["_C"]["loaded"], info["native"]["_C"]
    assert info["native"]["_C"]["openmp"] is not None, "the C++ module must be built with OpenMP"
    assert info["native"]["_C"]["cxx_standard"] >= 201703
    assert set(info["backends"]) == set(pyfastscan.backends.BACKENDS) == {"torch", "cpu", "cuda", "triton", "numba"}
    assert info["backends"]["torch"]["usable"] and info["backends"]["cpu"]["usable"]
    for name, b in info["backends"].items():
        assert b["usable"] == (b["reason"] is None), name
        if not b["usable"]:
            assert isinstance(b["reason"], str) and len(b["reason"]) > 10, (name, b)


def _declared_extensions(env_update) -> list:
    """Extension names setup.py declares in an environment (setup() captured, not run)."""
    code = ("import runpy, setuptools, sys; seen = {}\n"
            "setuptools.setup = lambda **kw: seen.update(kw)\n"
            "sys.argv = ['setup.py', '--name']\n"
            "runpy.run_path('setup.py', run_name='__main__')\n"
            "print(' '.join(e.name for e in seen['ext_modules']))")
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_CUDA", "PYFASTSCAN_NO_CUDA")}
    env.update(env_update)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_setup_declares_cuda_module_only_when_cuda_is_built():
    """setuptools keeps only declared extensions (an editable install dropped _C_cuda when
    just _C was declared): _C_cuda is declared exactly when the CUDA build is configured."""
    assert _declared_extensions({"PYFASTSCAN_NO_CUDA": "1"}) == ["pyfastscan._C"]
    assert _declared_extensions({"FORCE_CUDA": "1"}) == ["pyfastscan._C", "pyfastscan._C_cuda"]
    if nvcc_present():
        assert _declared_extensions({}) == ["pyfastscan._C", "pyfastscan._C_cuda"]
    else:
        assert _declared_extensions({}) == ["pyfastscan._C"]


def test_cuda_kernels_built_when_nvcc_present():
    """CI compiles csrc/cuda whenever nvcc is on PATH; the module must then exist, load
    (it links the CUDA runtime statically, so it loads without a driver) and say whether it
    can use a device."""
    if not nvcc_present():
        pytest.skip("nvcc not on PATH: the CUDA kernels are not built here")
    package_dir = Path(pyfastscan.__file__).parent
    assert list(package_dir.glob("_C_cuda*.so")), f"no _C_cuda module in {package_dir}"
    info = pyfastscan.build_info()["native"]["_C_cuda"]
    assert info["loaded"], info
    assert info["cudart_version"] >= 11000
    assert "80" in info["cuda_architectures"].split(","), info
    if info["device_count"] == 0:  # no GPU or driver here: the reason is reported, and used
        assert info["device_error"], info
        assert _native.cuda_device_error() == info["device_error"]
        assert info["device_error"] in backends.cuda_reason(torch.device("cuda"))


# ----------------------------------------------------------------------------- backend choice


class _FakeCudaModule:
    """A _C_cuda built for a newer CUDA than the driver: loads, but reaches no device."""

    def __init__(self, device_error):
        self.device_error = device_error

    def build_info(self):
        return {"cudart_version": 13000, "device_count": 0 if self.device_error else 1,
                "device_error": self.device_error}


def test_cuda_reason_reads_the_device_error(monkeypatch, caplog):
    """A CUDA 13 build on an older driver: auto must not pick cuda (the op would raise),
    but fall back, and say why."""
    err = "CUDA driver version is insufficient for CUDA runtime version"
    monkeypatch.setattr(_native, "cuda", lambda: _FakeCudaModule(err))
    reason = backends.cuda_reason(torch.device("cuda", 0))
    assert reason is not None and err in reason and "driver" in reason
    impls = {"cuda": backends.Impl(lambda: "cuda ran"), "torch": backends.Impl(lambda: "torch ran")}
    with caplog.at_level(logging.WARNING, logger="pyfastscan"):
        assert backends.dispatch("fake_op", "auto", impls, torch.device("cuda", 0)) == "torch ran"
    assert backends.last_backend("fake_op") == "torch"
    assert err in caplog.text
    with pytest.raises(BackendUnavailableError, match="insufficient"):
        backends.dispatch("fake_op", "cuda", impls, torch.device("cuda", 0))
    # a module that reaches its device is usable
    monkeypatch.setattr(_native, "cuda", lambda: _FakeCudaModule(""))
    assert backends.cuda_reason(torch.device("cuda", 0)) is None
    assert backends.dispatch("fake_op", "auto", impls, torch.device("cuda", 0)) == "cuda ran"


def test_environment_backend_applies_only_to_ops_that_have_it(monkeypatch, caplog):
    """PYFASTSCAN_BACKEND=cuda: ops without a cuda backend (hotspot, candidates) go on with
    auto and log it; ops with one are held to it."""
    from pyfastscan.ops import candidates, hotspot_counts, hotspot_stats, last_backend

    monkeypatch.setenv("PYFASTSCAN_BACKEND", "cuda")
    img = np.full((64, 64, 3), 230, np.uint8)
    img[30:34, 40:44] = 20
    pts = [[500.0, 500.0], [520.0, 480.0]]
    kw = dict(slide_size=(1000, 1000), mpp=0.25, step_um=25)
    with caplog.at_level(logging.WARNING, logger="pyfastscan"):
        assert candidates(img, d_um=10, mpp=0.5).tolist() == [[40, 30]]
        assert last_backend("candidates") == "cpu"
        assert int(hotspot_counts(pts, **kw).counts.max()) == 2
        assert last_backend("hotspot_counts") == "cpu"
        assert hotspot_stats(pts, **kw).max_count == 2
    assert "PYFASTSCAN_BACKEND=cuda ignored" in caplog.text and "candidates" in caplog.text
    x = torch.zeros(1, 1, 4, 4)
    with pytest.raises(BackendUnavailableError, match="cuda"):
        pyfastscan.ops.anch_pool2d(x, 2, anchor_stride=2, operating_distance=1)  # has cuda: held to it
    monkeypatch.setenv("PYFASTSCAN_BACKEND", "gpu")
    with pytest.raises(pyfastscan.InvalidArgumentError, match="PYFASTSCAN_BACKEND"):
        hotspot_counts(pts, **kw)


def test_cli_info_json(tmp_path):
    # The installed console script, run outside the source tree (which has no _C).
    script = Path(sys.executable).parent / "pyfastscan"
    out = subprocess.run([str(script), "info", "--json"], check=True, capture_output=True, text=True,
                         cwd=tmp_path).stdout
    info = json.loads(out)
    assert info["native"]["_C"]["loaded"]
    from pyfastscan.pipeline.readers import cpu_cores, default_readers, reader_cores

    pinned = reader_cores(default_readers())  # the default readers, and whether they keep to cores
    assert info["readers"] == {"default": default_readers(), "cores": cpu_cores(),
                               "pinned_cores": None if pinned is None else list(pinned)}
    plain = subprocess.run([str(script), "info"], check=True, capture_output=True, text=True, cwd=tmp_path,
                           env={**os.environ, "PYFASTSCAN_PIN_READERS": "0"}).stdout
    assert f"readers by default: {default_readers()} for {cpu_cores()} core(s), free to move" in plain


def test_interim_demo_dense_equals_patch_loop():
    from pyfastscan import demo

    r = demo.run(map_side=8)
    assert r["map_shape"] == (1, 2, 16, 16)  # alpha * L_m per side
    assert r["max_abs_diff"] <= 1e-12, r
    assert r["pool_backend"] == "cpu" and r["conv_backend"] == "cpu"


def test_every_package_folder_is_declared_to_setuptools():
    """setuptools warns ("Package would be ignored") for an importable folder that the
    packages list leaves out, and an installed copy would lack it: every folder of
    pyfastscan/ holding files is declared, and package data is declared on its own package."""
    import tomllib

    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    declared = set(conf["packages"])
    folders = {".".join(p.relative_to(ROOT).parts) for p in (ROOT / "pyfastscan").rglob("*")
               if p.is_dir() and p.name != "__pycache__" and any(f.is_file() for f in p.iterdir())}
    assert folders <= declared, f"not in [tool.setuptools] packages: {sorted(folders - declared)}"
    assert all(not pattern.count("/") for patterns in conf["package-data"].values() for pattern in patterns)


def test_a_build_for_instructions_this_cpu_lacks_is_refused_not_run(monkeypatch):
    """_C carries the -march it was built with and the instruction sets the compiler could
    use (PYFASTSCAN_MARCH; native by default). On a CPU lacking one (a venv shared by a
    cluster's older nodes, a wheel built on a newer machine) it is not imported, which would
    stop the process with SIGILL inside a kernel: the ops fall back to PyTorch and the
    reason names the missing instructions and the fix."""
    from pyfastscan import precision
    from pyfastscan.ops import hed_augment

    origin = _native.cpu().__file__
    target = _native.cpu().build_info()["target"]
    march, isa = target.split(" ", 1)
    need = isa.removeprefix("isa=").split()
    assert march.startswith("march=") and (need or sys.platform != "linux")
    flags = precision.cpu_flags()
    if flags:
        assert set(need) <= flags  # it loaded here, so this CPU has them all
        assert _native.isa_mismatch(origin, flags) is None
    older = frozenset({"sse4_2"})
    why = _native.isa_mismatch(origin, older)
    missing = [f for f in need if f not in older]
    if missing:
        assert why is not None and ", ".join(missing) in why and "PYFASTSCAN_MARCH" in why
    assert _native.isa_mismatch(origin, frozenset()) is None  # no /proc/cpuinfo: nothing known, nothing refused
    if not missing:
        pytest.skip(f"this build ({target}) needs nothing beyond sse4_2")
    # the loader on such a CPU: _C refused, the auto backend PyTorch, the reason given
    monkeypatch.setattr(precision, "cpu_flags", lambda: older)
    monkeypatch.setattr(_native, "_modules", {k: v for k, v in _native._modules.items() if k != "_C"})
    monkeypatch.setattr(_native, "_errors", {})
    assert _native.cpu() is None and _native.cpu_error() == why
    assert backends.cpu_reason(torch.device("cpu")) == why
    x = torch.rand(1, 3, 8, 8)
    a, b = torch.full((1, 3), 1.03), torch.full((1, 3), -0.02)
    hed_augment(x, a, b)  # runs, on the PyTorch backend
    assert backends.last_backend("hed_augment") == "torch"
    monkeypatch.undo()  # on this CPU, _C again (tests/test_stain.py: its kernel equals the reference)
    hed_augment(x, a, b)
    assert _native.cpu() is not None and backends.last_backend("hed_augment") == "cpu"
