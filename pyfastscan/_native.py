"""Loads the native modules once and remembers why one did not load (or must not: built
for instructions this CPU lacks)."""
import importlib
import importlib.util
import re
from typing import Optional

_modules = {}
_errors = {}
_device_errors = {}  # id(module) -> (module, error or None)


_ISA_MARKER = re.compile(rb"PYFASTSCAN-ISA\[march=([^ \]]*) isa=([^\]]*)\]")


def isa_mismatch(module_file: str, flags: frozenset) -> Optional[str]:
    """Why the native module ``module_file`` must not be loaded on a CPU with ``flags``, or
    None: the build's marker (the -march it was built with and the instruction sets the
    compiler could use, csrc/bindings.cpp) names one this CPU lacks. None too when either
    side is unknown (no marker, no /proc/cpuinfo)."""
    try:
        with open(module_file, "rb") as f:
            m = _ISA_MARKER.search(f.read())
    except OSError:
        return None
    if m is None or not flags:
        return None
    march, need = m.group(1).decode(), m.group(2).decode().split()
    missing = [f for f in need if f not in flags]
    if not missing:
        return None
    return (f"pyfastscan._C was built with -march={march}, for instructions this CPU lacks: {', '.join(missing)} "
            "(running it would stop the process with an illegal instruction): reinstall "
            "pyfastscan on this machine, or build it for every machine that shares it with "
            "PYFASTSCAN_MARCH=x86-64-v3 (or their common baseline)")


def _load(name):
    if name == "_C" and name not in _modules and name not in _errors:
        spec = importlib.util.find_spec("pyfastscan._C")
        if spec is not None and spec.origin:
            from .precision import cpu_flags

            why = isa_mismatch(spec.origin, cpu_flags())
            if why:
                _errors[name] = why
    if name not in _modules and name not in _errors:
        try:
            _modules[name] = importlib.import_module(f"pyfastscan.{name}")
        except ImportError as exc:  # not built (no nvcc) or not loadable here
            _errors[name] = f"{type(exc).__name__}: {exc}"
    return _modules.get(name)


def cpu():
    """The C++ CPU module pyfastscan._C, or None (see cpu_error())."""
    return _load("_C")


def cuda():
    """The CUDA module pyfastscan._C_cuda, or None (see cuda_error())."""
    return _load("_C_cuda")


def cpu_error():
    _load("_C")
    return _errors.get("_C")


def cuda_error():
    _load("_C_cuda")
    return _errors.get("_C_cuda")


def cuda_device_error():
    """Why the loaded _C_cuda cannot use a CUDA device, or None: the ``device_error`` of its
    build_info() (its CUDA runtime's cudaGetDeviceCount, e.g. "CUDA driver version is
    insufficient for CUDA runtime version" for a CUDA 13 build on an older driver). Asked
    once per module; None when _C_cuda is not loaded (see cuda_error())."""
    mod = cuda()
    if mod is None:
        return None
    entry = _device_errors.get(id(mod))
    if entry is None or entry[0] is not mod:
        try:
            err = mod.build_info().get("device_error") or None
        except Exception as exc:  # a broken module must not break backend choice
            err = f"build_info() failed: {type(exc).__name__}: {exc}"
        entry = _device_errors[id(mod)] = (mod, err)
    return entry[1]


def cuda_device_index(t) -> int:
    """Index of the CUDA device t is on, the ``device`` argument of every _C_cuda launcher
    (which makes it current for the launch and restores the caller's afterwards)."""
    if t.device.index is not None:
        return t.device.index
    import torch

    return torch.cuda.current_device()


def buffer(t):
    """numpy view (no copy) of a contiguous CPU tensor, for the C++ kernels; bfloat16 as
    its int16 bits (numpy has no bfloat16)."""
    import torch

    t = t.detach()
    return t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
