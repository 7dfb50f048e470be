"""Camelyon16 lesion-level FROC, as the organisers' Evaluation_FROC.py computes it
(https://github.com/computationalpathologygroup/Camelyon16, Python/Evaluation_FROC.py).

Per tumour slide:

1. The evaluation mask at ``level`` (5: downsample 32): the ground-truth mask grown by
   75 um (pixels whose Euclidean distance to tumour is below 75 / (resolution * 2^level * 2)),
   holes filled, 8-connected labels.
2. Isolated tumour cells (ITC): labels whose major axis (as skimage's regionprops
   computes it) is shorter than 275 / (resolution * 2^level) pixels.
3. Each detection (probability, x, y in level-0 pixels) is looked up at
   (floor(y / 2^level), floor(x / 2^level)): background is a false positive; a lesion is
   a true positive, the lesion keeping its highest probability (stored as float32, as the
   organisers' script does); an ITC is ignored. A detection outside the mask counts as
   background (the organisers' script would fail or wrap around there).

A slide without tumour: every detection is a false positive.

The curve: thresholds are the distinct probabilities of all false positives and all
lesions' probabilities (0 for a missed lesion, ITCs included as the script does), except
the smallest; at each threshold t, FPs with probability >= t per slide and lesions with
probability >= t over all lesions; then the point (0, 0).

The score: the mean sensitivity at 1/4, 1/2, 1, 2, 4 and 8 average false positives per
slide. The organisers' script stops at the curve. Two readings of the curve between its
points are in use, both offered:

- ``"linear"`` (default): linear interpolation along the curve (numpy.interp over the
  points sorted by false positives), as MONAI's ``compute_froc_score`` and the NCRF
  evaluation do; the reading behind most published Camelyon16 FROC figures.
- ``"step"``: the best sensitivity among the operating points with at most that many
  false positives per slide (a detector can only run at its thresholds).
"""
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import InvalidArgumentError

RATES = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
CAMELYON16_RESOLUTION = 0.243  # um/px: the level-0 resolution the organisers' script assumes for every slide


def evaluation_mask(tumour: np.ndarray, resolution: float = CAMELYON16_RESOLUTION, level: int = 5) -> np.ndarray:
    """Labels (int32) of the grown, hole-filled, 8-connected lesions of a boolean tumour
    mask given at ``level`` (downsample 2^level)."""
    from scipy import ndimage

    tumour = np.asarray(tumour, dtype=bool)
    distance = ndimage.distance_transform_edt(~tumour)
    grown = ndimage.binary_fill_holes(distance < 75 / (resolution * 2 ** level * 2))
    labels, _ = ndimage.label(grown, structure=np.ones((3, 3), dtype=bool))
    return labels.astype(np.int32)


def major_axis_lengths(labels: np.ndarray) -> np.ndarray:
    """Major axis length of each label 1..max (skimage's definition: 4 * sqrt of the larger
    eigenvalue of the covariance of the label's pixel coordinates)."""
    n = int(labels.max())
    if n == 0:
        return np.zeros(0)
    rows, cols = np.nonzero(labels)
    lab = labels[rows, cols]
    count = np.bincount(lab, minlength=n + 1)[1:].astype(np.float64)
    mean_r = np.bincount(lab, rows, n + 1)[1:] / count
    mean_c = np.bincount(lab, cols, n + 1)[1:] / count
    dr, dc = rows - mean_r[lab - 1], cols - mean_c[lab - 1]
    a = np.bincount(lab, dr * dr, n + 1)[1:] / count
    b = np.bincount(lab, dr * dc, n + 1)[1:] / count
    c = np.bincount(lab, dc * dc, n + 1)[1:] / count
    largest = (a + c) / 2 + np.sqrt(((a - c) / 2) ** 2 + b * b)
    return 4 * np.sqrt(largest)


def itc_labels(labels: np.ndarray, resolution: float = CAMELYON16_RESOLUTION, level: int = 5) -> set:
    """Labels of isolated tumour cells: major axis below 275 um at that level."""
    threshold = 275 / (resolution * 2 ** level)
    return {i + 1 for i, m in enumerate(major_axis_lengths(labels)) if m < threshold}


@dataclass
class SlideHits:
    """One slide's contribution to the FROC: false-positive probabilities, each lesion's
    probability (float32, 0 when missed; ITC labels included, as in the organisers'
    script), the number of lesions that count (ITCs excluded)."""

    name: str
    fp_probs: List[float]
    tp_probs: np.ndarray
    n_lesions: int
    detections: Dict[int, Tuple[float, float, float]] = field(default_factory=dict)


def slide_hits(name: str, probs: Sequence[float], xs: Sequence[float], ys: Sequence[float],
               labels: Optional[np.ndarray], itc: set = frozenset(), level: int = 5) -> SlideHits:
    """Classify one slide's detections against its evaluation mask (None: a normal slide)."""
    probs = [float(p) for p in probs]
    if labels is None or labels.max() == 0:
        return SlideHits(name, probs, np.zeros(0, dtype=np.float32), 0)
    n = int(labels.max())
    tp = np.zeros(n, dtype=np.float32)
    fp, where = [], {}
    d = 2 ** level
    for p, x, y in zip(probs, xs, ys):
        r, c = math.floor(y / d), math.floor(x / d)
        hit = int(labels[r, c]) if 0 <= r < labels.shape[0] and 0 <= c < labels.shape[1] else 0
        if hit == 0:
            fp.append(p)
        elif hit not in itc and p > float(tp[hit - 1]):  # compared in float64, stored in float32
            tp[hit - 1] = p
            where[hit] = (p, float(x), float(y))
    return SlideHits(name, fp, tp, n - len(itc), where)


def froc_curve(slides: Sequence[SlideHits]) -> Tuple[np.ndarray, np.ndarray]:
    """(average false positives per slide, sensitivity) at each threshold, as the
    organisers' computeFROC: descending thresholds, ending at (0, 0)."""
    if not slides:
        raise InvalidArgumentError("FROC needs at least one slide")
    n_lesions = sum(s.n_lesions for s in slides)
    if n_lesions == 0:
        raise InvalidArgumentError("FROC needs at least one lesion (non-ITC) among the slides")
    fps = np.sort(np.array([p for s in slides for p in s.fp_probs], dtype=np.float64))
    tps = np.sort(np.concatenate([s.tp_probs for s in slides]).astype(np.float32))
    thresholds = sorted(set(fps.tolist()) | set(tps.astype(np.float64).tolist()))[1:]
    # as in the script: FPs (float64) compared with the threshold as it is; the lesions'
    # float32 array compared with the threshold cast to float32 (numpy's promotion rules)
    th = np.asarray(thresholds, dtype=np.float64)
    n_fp = np.r_[len(fps) - np.searchsorted(fps, th, side="left"), 0]
    n_tp = np.r_[len(tps) - np.searchsorted(tps, th.astype(np.float32), side="left"), 0]
    return np.asarray(n_fp, dtype=np.float64) / len(slides), np.asarray(n_tp, dtype=np.float64) / n_lesions


def froc_score(fps: np.ndarray, sensitivity: np.ndarray, rates: Sequence[float] = RATES,
               reading: str = "linear") -> Tuple[float, np.ndarray]:
    """(mean sensitivity at ``rates``, the sensitivity at each rate). See the module
    docstring for the two readings."""
    fps, sensitivity = np.asarray(fps, dtype=np.float64), np.asarray(sensitivity, dtype=np.float64)
    if reading == "linear":
        at = np.interp(rates, fps[::-1], sensitivity[::-1])
    elif reading == "step":
        at = np.array([sensitivity[fps <= r].max(initial=0.0) for r in rates])
    else:
        raise InvalidArgumentError(f"reading must be 'linear' or 'step', got {reading!r}")
    return float(np.mean(at)), at
