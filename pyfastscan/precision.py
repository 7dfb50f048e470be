"""The precision a scan runs in: "auto" picks bf16 where the hardware runs it fast.

- ``fp32``: float32 everywhere; on CUDA true fp32 (TF32 off while the scan runs).
- ``tf32``: float32 storage with TF32 convolutions and matmuls on CUDA (~1e-3 relative).
- ``bf16``: bfloat16 weights and activations, float32 accumulation (DESIGN.md 5's
  low-precision bound).
- ``auto`` (the default of the scan jobs): bf16 on a CPU with AMX (its bf16 tile units run
  VGG-sized convolutions several times faster than fp32) and on CUDA devices with native
  bf16 (compute capability 8.0 and up); fp32 otherwise (without AMX, bf16 convolutions on
  a CPU are slower than fp32). Decided once per process from the CPU flags and the device.
"""
import contextlib
import functools
from typing import Optional, Tuple

import torch

from .errors import InvalidArgumentError

PRECISIONS = ("auto", "fp32", "tf32", "bf16")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset:
    """The CPU's feature flags (from /proc/cpuinfo; empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_amx_bf16() -> bool:
    """Does this CPU have AMX tiles with bf16 (Intel Sapphire Rapids and later)?"""
    return {"amx_bf16", "amx_tile"} <= cpu_flags()


@functools.lru_cache(maxsize=8)
def auto_precision(device_type: str, index: int = 0) -> Tuple[str, str]:
    """(precision, reason) that "auto" means on this device."""
    if device_type == "cuda":
        major, minor = torch.cuda.get_device_capability(index)
        if major >= 8:
            return "bf16", f"CUDA device {index} has compute capability {major}.{minor} (native bf16)"
        return "fp32", f"CUDA device {index} has compute capability {major}.{minor} (no native bf16)"
    if device_type == "cpu":
        if cpu_has_amx_bf16():
            return "bf16", "the CPU has AMX (amx_bf16, amx_tile)"
        return "fp32", ("the CPU has no AMX (amx_bf16): auto keeps fp32 (without AMX bf16 was 1.2x slower on one "
                        "CPU and 2.5-3.1x faster on another; `pyfastscan bench --precision fp32 --precision bf16` "
                        "measures this one)")
    return "fp32", f"no bf16 rule for {device_type} devices"


def resolve_precision(precision: str, device, model_dtype: Optional[torch.dtype] = None) -> Tuple[str, str]:
    """(precision to run, why) for a requested precision on ``device``. A model whose
    parameters are float64 asked for reference precision: "auto" keeps its dtype ("fp32",
    which runs a model in its own dtype) rather than casting it to bf16."""
    if precision not in PRECISIONS:
        raise InvalidArgumentError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision, "requested"
    if model_dtype == torch.float64:
        return "fp32", "the model is float64: auto keeps the model's own dtype"
    device = torch.device(device)
    return auto_precision(device.type, device.index or 0)


@contextlib.contextmanager
def tf32_mode(device, allow: bool):
    """On CUDA, TF32 on (``allow``) or off for the duration, restored after; elsewhere nothing."""
    if torch.device(device).type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allow
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
