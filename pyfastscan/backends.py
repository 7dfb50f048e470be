"""Backend choice, in one place.

Every op offers some of the backends ``torch`` (the pure-PyTorch reference), ``cpu``
(C++), ``cuda`` (CUDA C++), ``triton`` and ``numba`` (Numba CUDA). ``backend="auto"`` walks a priority list for
the input's device and takes the first backend that can run the call; a backend that
cannot says why. The environment variable ``PYFASTSCAN_BACKEND`` replaces ``"auto"``
(an explicit ``backend=`` argument still wins) for the ops that have that backend; the
others go on with ``auto``, and say so in the log once. The backend that ran is
recorded: ``last_backend(op)``.

Triton runs on CPU tensors only under its interpreter (``TRITON_INTERPRET=1``, set before
the first kernel module is imported), and ``auto`` never picks it there: the interpreter
is for testing, not speed. Likewise Numba CUDA kernels run without a GPU only in Numba's
simulator (``NUMBA_ENABLE_CUDASIM=1``).
"""
import logging
import functools
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import _native
from .errors import BackendUnavailableError, InvalidArgumentError

logger = logging.getLogger("pyfastscan")

BACKENDS = ("torch", "cpu", "cuda", "triton", "numba")
ENV_VAR = "PYFASTSCAN_BACKEND"
_PRIORITY = {"cpu": ("cpu", "torch"), "cuda": ("cuda", "triton", "numba", "torch")}

_last = {}  # op -> backend of its latest call: documented API, read with last_backend()


@functools.lru_cache(maxsize=None)
def _log_once(message: str) -> None:
    """Log a fallback once per process (the same message again would only repeat it)."""
    logger.warning("%s", message)


@dataclass(frozen=True)
class Impl:
    """One backend of one op: ``run(*args)`` and ``reason(*args)`` (None when it can run)."""

    run: Callable
    reason: Callable[..., Optional[str]] = lambda *a, **k: None
    # Replaces the backend's device check (``_DEVICE_REASON``) when given: called as
    # ``device_reason(device, *args)``, for a backend that does not always need its
    # native module (AnchConv on CUDA lowered to cuDNN).
    device_reason: Optional[Callable[..., Optional[str]]] = None


def last_backend(op: str) -> Optional[str]:
    """Name of the backend that ran the most recent call of ``op`` in this process."""
    return _last.get(op)


def triton_reason(device: torch.device) -> Optional[str]:
    """Why Triton cannot run on ``device`` here, or None."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not installed ({exc}); pip install triton"
    if device.type == "cuda":
        return None
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return f"tensor on {device.type}; Triton runs there only under TRITON_INTERPRET=1 (its CPU interpreter)"


def cpu_reason(device: torch.device) -> Optional[str]:
    if device.type != "cpu":
        return f"tensor on {device.type}, the C++ kernels take CPU tensors"
    if _native.cpu() is None:
        err = _native.cpu_error()
        if err.startswith("pyfastscan._C was built"):  # for instructions this CPU lacks: says what to do
            return err
        return f"pyfastscan._C did not load ({err}); reinstall with a C++17 compiler"
    return None


def cuda_reason(device: torch.device) -> Optional[str]:
    if _native.cuda() is None:
        return f"pyfastscan._C_cuda is not available ({_native.cuda_error()}); it is built when nvcc is found"
    if device.type != "cuda":
        return f"tensor on {device.type}, the CUDA kernels take CUDA tensors"
    err = _native.cuda_device_error()
    if err is not None:  # e.g. a CUDA 13 build on an older driver, while torch still sees the GPU
        return (f"pyfastscan._C_cuda cannot use a device ({err}); build it with the CUDA version of the "
                f"driver (nvidia-smi), or update the driver")
    return None


def numba_reason(device: torch.device) -> Optional[str]:
    """Why Numba CUDA kernels cannot run here, or None (the simulator counts as a device)."""
    try:
        from numba import cuda
    except ImportError as exc:
        return f"numba is not installed ({exc}); pip install numba"
    if not cuda.is_available():
        return "no CUDA device for Numba (NUMBA_ENABLE_CUDASIM=1 runs its simulator)"
    return None


_DEVICE_REASON = {"cpu": cpu_reason, "cuda": cuda_reason, "triton": triton_reason, "numba": numba_reason,
                  "torch": lambda d: None}


def dispatch(op: str, backend: str, impls: dict, device: torch.device, *args):
    """Run ``op`` on the chosen backend and record which one ran.

    Args:
        op: op name, for messages and ``last_backend``.
        backend: "auto" or one of BACKENDS.
        impls: backend name -> Impl, for the backends this op has.
        device: device of the op's tensors (validated to agree beforehand).
        *args: passed to ``Impl.reason`` and ``Impl.run``.
    """
    if backend != "auto" and backend not in BACKENDS:
        raise InvalidArgumentError(f"{op}: backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = _from_environment(op, impls)

    def why_not(name):
        if name not in impls:
            return f"{op} has no {name} backend"
        impl = impls[name]
        dev = impl.device_reason(device, *args) if impl.device_reason else _DEVICE_REASON[name](device)
        return dev or impl.reason(*args)

    if backend != "auto":
        reason = why_not(backend)
        if reason is not None:
            raise BackendUnavailableError(f"{op}: backend {backend!r} cannot run this call: {reason}")
        chosen = backend
    else:
        chosen, skipped = None, []
        for name in _PRIORITY.get(device.type, ("torch",)):
            reason = why_not(name)
            if reason is None:
                chosen = name
                break
            skipped.append((name, reason))
        if chosen is None:
            listing = "; ".join(f"{n}: {r}" for n, r in skipped)
            raise BackendUnavailableError(f"{op}: no backend can run this call ({listing})")
        for name, reason in skipped:  # a fallback is never silent
            _log_once(f"{op}: backend {name!r} skipped ({reason}); using {chosen!r}")
    _last[op] = chosen
    return impls[chosen].run(*args)


def _from_environment(op: str, impls: dict) -> str:
    """The backend PYFASTSCAN_BACKEND asks for, when ``op`` has it; else "auto" (logged once)."""
    env = os.environ.get(ENV_VAR, "auto") or "auto"
    if env != "auto" and env not in BACKENDS:
        raise InvalidArgumentError(f"{ENV_VAR} must be 'auto' or one of {BACKENDS}, got {env!r}")
    if env != "auto" and env not in impls:
        _log_once(f"{op}: {ENV_VAR}={env} ignored, {op} has no {env} backend (it has {', '.join(impls)}); using auto")
        return "auto"
    return env


def build_info() -> dict:
    """What was built and what can run here, with the reason for each backend that cannot.

    Returns:
        dict with keys ``version``, ``torch``, ``triton``, ``native`` (per native module:
        loaded, and compiler / CUDA versions or the load error) and ``backends`` (per
        backend: ``usable`` and ``reason``).
    """
    from ._version import __version__

    native = {}
    c = _native.cpu()
    native["_C"] = dict(loaded=True, **c.build_info()) if c else dict(loaded=False, error=_native.cpu_error())
    cu = _native.cuda()
    native["_C_cuda"] = dict(loaded=True, **cu.build_info()) if cu else dict(loaded=False, error=_native.cuda_error())
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda_dev = torch.device("cuda")
    has_gpu = torch.cuda.is_available()
    no_gpu = "no CUDA device (torch.cuda.is_available() is False)"
    backends = {
        "torch": None,
        "cpu": cpu_reason(torch.device("cpu")),
        "cuda": cuda_reason(cuda_dev) or (None if has_gpu else no_gpu),
        # On a machine without a GPU, Triton can still run CPU tensors in its interpreter.
        "triton": triton_reason(cuda_dev if has_gpu else torch.device("cpu")),
        "numba": numba_reason(cuda_dev),
    }
    return {
        "version": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "native": native,
        "backends": {k: {"usable": r is None, "reason": r} for k, r in backends.items()},
        "triton_interpreter": os.environ.get("TRITON_INTERPRET") == "1",
    }


def format_build_info(info: dict) -> str:
    """build_info() as the few lines `pyfastscan info` prints."""
    lines = [f"pyfastscan {info['version']} (torch {info['torch']}, triton {info['triton']})"]
    for name, mod in info["native"].items():
        lines.append(f"  {name}: " + ("loaded " + ", ".join(f"{k}={v}" for k, v in mod.items() if k != "loaded")
                                      if mod["loaded"] else f"not loaded ({mod['error']})"))
    for name, b in info["backends"].items():
        lines.append(f"  backend {name:7s} " + ("usable" if b["usable"] else f"not usable: {b['reason']}"))
    return "\n".join(lines)
