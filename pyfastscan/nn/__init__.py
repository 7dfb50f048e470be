"""nn.Module wrappers of pyfastscan.ops."""
from .anchor import AnchConv2d, AnchPool2d
from .normalize import Normalize
from .stain import HEDAugment

__all__ = ["AnchConv2d", "AnchPool2d", "HEDAugment", "Normalize"]
