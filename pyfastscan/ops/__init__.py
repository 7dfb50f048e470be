"""Public operations. Each validates its arguments once, then dispatches to a backend."""
from ..backends import last_backend
from .anchor import AnchorAxis, anch_conv2d, anch_pool2d

__all__ = ["AnchorAxis", "anch_conv2d", "anch_pool2d", "last_backend"]
