"""Build script: drives CMakeLists.txt to build pyfastscan._C (and _C_cuda when nvcc is found).

Both modules are declared as extensions (``ext_modules()``), each built as its own CMake
target: setuptools copies only declared extensions into place (an editable install keeps
nothing else), so a _C_cuda built but not declared would be dropped.

Environment:
    FORCE_CUDA=1        build the CUDA kernels even if nvcc is not on PATH (CUDACXX or
                        CMAKE_CUDA_COMPILER must then point at it).
    PYFASTSCAN_NO_CUDA=1  never build the CUDA kernels.
    CMAKE_BUILD_PARALLEL_LEVEL  parallel compile jobs (default: number of CPUs).
"""
import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


def _want_cuda():
    if os.environ.get("PYFASTSCAN_NO_CUDA") == "1":
        return False, "PYFASTSCAN_NO_CUDA=1"
    if os.environ.get("FORCE_CUDA") == "1":
        return True, "FORCE_CUDA=1"
    nvcc = shutil.which("nvcc")
    return (True, f"nvcc found at {nvcc}") if nvcc else (False, "nvcc not found")


def ext_modules():
    """The extensions this build produces: pyfastscan._C always, pyfastscan._C_cuda when
    the CUDA kernels are configured (tests/test_build.py checks this against nvcc)."""
    names = ["pyfastscan._C"] + (["pyfastscan._C_cuda"] if _want_cuda()[0] else [])
    return [CMakeExtension(n) for n in names]


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import pybind11

        outdir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_temp = Path(self.build_temp).resolve() / "cmake"
        build_temp.mkdir(parents=True, exist_ok=True)
        cuda, why = _want_cuda()
        cpu_src = sorted(glob.glob(str(ROOT / "csrc" / "cpu" / "*.cpp")))
        cuda_src = sorted(glob.glob(str(ROOT / "csrc" / "cuda" / "*.cu")))
        target = ext.name.rsplit(".", 1)[-1]
        if target == "_C":  # one configure report per build, not per extension
            print(f"pyfastscan build: _C from csrc/bindings.cpp + {len(cpu_src)} file(s) in csrc/cpu", flush=True)
            print(f"pyfastscan build: CUDA {'ON' if cuda else 'OFF'} ({why})"
                  + (f", {len(cuda_src)} .cu file(s) in csrc/cuda" if cuda else ""), flush=True)
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={outdir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={'Debug' if self.debug else 'Release'}",
            f"-DPYFASTSCAN_CUDA={'ON' if cuda else 'OFF'}",
            # -march of _C: this CPU unless the build is for other machines (CMakeLists.txt)
            f"-DPYFASTSCAN_MARCH={os.environ.get('PYFASTSCAN_MARCH') or 'native'}",
        ]
        env = dict(os.environ)
        env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_temp), *args], check=True, env=env)
        subprocess.run(["cmake", "--build", str(build_temp), "--target", target], check=True, env=env)


setup(
    ext_modules=ext_modules(),
    cmdclass={"build_ext": CMakeBuild},
)
