"""Triton kernels of pyfastscan (installed as pyfastscan.kernels).

Importing a module here imports triton; set TRITON_INTERPRET=1 before that to run the
kernels on CPU tensors (tests do, in tests/conftest.py). Kernels take torch tensors and
never import torch.nn.
"""
import contextlib


def on_device(t):
    """Context making t's CUDA device current for a launch: Triton launches on the current
    device and its current stream, so a tensor on cuda:1 while cuda:0 is current needs it.
    Nothing for CPU tensors (the interpreter)."""
    import torch

    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()
