"""Evaluation as the public benchmarks compute it: Camelyon16 FROC and slide AUC, mitosis
detection F1, TUPAC kappa and Spearman."""
from .classification import quadratic_kappa, roc_auc, spearman
from .detection import DetectionScore, detection_score, f1_curve, match
from .froc import (CAMELYON16_RESOLUTION, RATES, SlideHits, evaluation_mask, froc_curve, froc_score, itc_labels,
                   major_axis_lengths, slide_hits)

__all__ = ["quadratic_kappa", "roc_auc", "spearman", "DetectionScore", "detection_score", "f1_curve", "match",
           "CAMELYON16_RESOLUTION", "RATES", "SlideHits", "evaluation_mask", "froc_curve", "froc_score",
           "itc_labels", "major_axis_lengths", "slide_hits"]
