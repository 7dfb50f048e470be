"""Pure-PyTorch references: literal transcriptions of DESIGN.md, written for clarity.

They are the specification every fast backend is tested against, not fast paths.
"""
from .anchor import anch_conv2d_ref, anch_pool2d_ref, anchor_taps

__all__ = ["anch_conv2d_ref", "anch_pool2d_ref", "anchor_taps"]
