"""Loads the native modules once and remembers why one did not load."""
import importlib

_modules = {}
_errors = {}
_device_errors = {}  # id(module) -> (module, error or None)


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
