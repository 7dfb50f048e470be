"""Public operations. Each validates its arguments once, then dispatches to a backend."""
from ..backends import last_backend
from .anchor import AnchorAxis, anch_conv2d, anch_pool2d
from .candidates import candidates
from .hotspot import CountMap, HotspotStats, hotspot_counts, hotspot_stats, mitotic_grade
from .stain import hed_augment, hed_to_rgb, rgb_to_hed, sample_hed_params

__all__ = ["AnchorAxis", "candidates", "CountMap", "HotspotStats", "anch_conv2d", "anch_pool2d", "hed_augment", "hed_to_rgb",
           "hotspot_counts", "hotspot_stats", "last_backend", "mitotic_grade", "rgb_to_hed", "sample_hed_params"]
