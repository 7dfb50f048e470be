"""Triton kernels of pyfastscan (installed as pyfastscan.kernels).

Importing a module here imports triton; set TRITON_INTERPRET=1 before that to run the
kernels on CPU tensors (tests do, in tests/conftest.py). Kernels take torch tensors and
never import torch.nn.
"""
