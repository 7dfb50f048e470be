"""Pure-PyTorch references: literal transcriptions of DESIGN.md, written for clarity.

They are the specification every fast backend is tested against, not fast paths.
"""
from .anchor import anch_conv2d_ref, anch_pool2d_ref, anchor_taps
from .stain import hed_augment_ref, hed_to_rgb_ref, rgb_to_hed_ref

__all__ = ["anch_conv2d_ref", "anch_pool2d_ref", "anchor_taps", "hed_augment_ref", "hed_to_rgb_ref", "rgb_to_hed_ref"]
