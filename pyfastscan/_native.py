"""Loads the native modules once and remembers why one did not load."""
import importlib

_modules = {}
_errors = {}


def _load(name):
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


def buffer(t):
    """numpy view (no copy) of a contiguous CPU tensor, for the C++ kernels; bfloat16 as
    its int16 bits (numpy has no bfloat16)."""
    import torch

    t = t.detach()
    return t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
