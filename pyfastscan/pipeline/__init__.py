"""The whole-slide job: scan_slide() and the files it writes."""
from .scan import Detection, ScanResult, postprocess, scan_slide

__all__ = ["Detection", "ScanResult", "postprocess", "scan_slide"]
