"""The build: native modules, build_info, the CLI and the interim demo."""
import json
import subprocess
import sys
from pathlib import Path

import pyfastscan
from helpers import nvcc_present


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


def test_cuda_kernels_built_when_nvcc_present():
    """CI compiles csrc/cuda whenever nvcc is on PATH; the module must then exist."""
    if not nvcc_present():
        import pytest

        pytest.skip("nvcc not on PATH: the CUDA kernels are not built here")
    package_dir = Path(pyfastscan.__file__).parent
    assert list(package_dir.glob("_C_cuda*.so")), f"no _C_cuda module in {package_dir}"
    info = pyfastscan.build_info()["native"]["_C_cuda"]
    assert info["loaded"], info
    assert info["cudart_version"] >= 11000


def test_cli_info_json(tmp_path):
    # The installed console script, run outside the source tree (which has no _C).
    script = Path(sys.executable).parent / "pyfastscan"
    out = subprocess.run([str(script), "info", "--json"], check=True, capture_output=True, text=True,
                         cwd=tmp_path).stdout
    assert json.loads(out)["native"]["_C"]["loaded"]


def test_interim_demo_dense_equals_patch_loop():
    from pyfastscan import demo

    r = demo.run(map_side=8)
    assert r["map_shape"] == (1, 2, 16, 16)  # alpha * L_m per side
    assert r["max_abs_diff"] <= 1e-12, r
    assert r["pool_backend"] == "cpu" and r["conv_backend"] == "cpu"
