"""The mitosis job: whole-slide detection, hotspot and grade (detect.py), and the
candidate detector used to sample training data (candidates.py)."""
from ..ops.candidates import candidates
from .detect import BandDetector, MitosisResult, detect_mitoses, detect_on_map, suppress

__all__ = ["candidates", "BandDetector", "MitosisResult", "detect_mitoses", "detect_on_map", "suppress"]
