"""nn.Module wrappers of pyfastscan.ops."""
from .anchor import AnchConv2d, AnchPool2d

__all__ = ["AnchConv2d", "AnchPool2d"]
