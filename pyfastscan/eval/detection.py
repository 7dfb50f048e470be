"""Point detection against ground-truth points (mitotic figures): one-to-one matching
within a radius, precision, recall, F1, and F1 against the probability threshold.

Matching is an optimal assignment: the largest number of detection-truth pairs closer
than the radius (inclusive), and among those the smallest total distance. Greedy matching
(each detection to its nearest free truth, in order of probability) can pair a detection
with the one truth another detection needed and so undercount; the assignment does not.
Pairs are found with a k-d tree and each connected group of candidate pairs is solved on
its own (scipy's linear_sum_assignment), so memory grows with the pairs, not with
detections x truths.
"""
from dataclasses import dataclass
from typing import Tuple

import numpy as np

from ..errors import InvalidArgumentError
from ..validate import POSITIVE, check


@dataclass
class DetectionScore:
    tp: int
    fp: int
    fn: int
    precision: float
    recall: float
    f1: float
    pairs: np.ndarray  # (tp, 2) indices (detection, truth)


def _points(a, name: str) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.size == 0:
        return np.zeros((0, 2))
    if a.ndim != 2 or a.shape[1] != 2 or not np.isfinite(a).all():
        raise InvalidArgumentError(f"{name} must be (N, 2) finite (x, y), got shape {a.shape}")
    return a


def match(detections, truths, radius: float) -> np.ndarray:
    """(K, 2) index pairs (detection, truth) of a maximum one-to-one matching within
    ``radius`` with the least total distance among maximum matchings."""
    from scipy.optimize import linear_sum_assignment
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    d, t = _points(detections, "detections"), _points(truths, "truths")
    radius = check("radius", radius, POSITIVE)
    if len(d) == 0 or len(t) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    cand = cKDTree(d).sparse_distance_matrix(cKDTree(t), radius, output_type="ndarray")
    if len(cand) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    i, j, dist = cand["i"], cand["j"], cand["v"]
    n = len(d) + len(t)
    graph = coo_matrix((np.ones(len(i)), (i, len(d) + j)), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    out = []
    order = np.argsort(comp[i], kind="stable")
    bounds = np.flatnonzero(np.diff(comp[i][order])) + 1
    for group in np.split(order, bounds):
        gi, gj, gd = i[group], j[group], dist[group]
        ui, ri = np.unique(gi, return_inverse=True)
        uj, rj = np.unique(gj, return_inverse=True)
        # a missing pair costs more than any matching of valid pairs could: cardinality first
        big = radius * (min(len(ui), len(uj)) + 1) + 1.0
        cost = np.full((len(ui), len(uj)), big)
        cost[ri, rj] = gd
        r, c = linear_sum_assignment(cost)
        ok = cost[r, c] < big
        out.append(np.column_stack([ui[r[ok]], uj[c[ok]]]))
    return np.concatenate(out).astype(np.int64)


def detection_score(detections, truths, radius: float) -> DetectionScore:
    """Precision, recall and F1 of ``detections`` (N, 2) against ``truths`` (M, 2)."""
    d, t = _points(detections, "detections"), _points(truths, "truths")
    pairs = match(d, t, radius)
    tp = len(pairs)
    fp, fn = len(d) - tp, len(t) - tp
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0
    return DetectionScore(tp, fp, fn, precision, recall, f1, pairs)


def f1_curve(detections, probabilities, truths, radius: float) -> Tuple[np.ndarray, np.ndarray, float, float]:
    """(thresholds, F1 at each) for keeping detections with probability >= threshold, at
    every distinct probability; plus (best threshold, best F1) (the lowest threshold among
    ties)."""
    d = _points(detections, "detections")
    p = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    if len(p) != len(d):
        raise InvalidArgumentError(f"{len(d)} detections but {len(p)} probabilities")
    thresholds = np.unique(p)
    if len(thresholds) == 0:
        return thresholds, thresholds, float("nan"), detection_score(d, truths, radius).f1
    f1 = np.array([detection_score(d[p >= th], truths, radius).f1 for th in thresholds])
    best = int(np.argmax(f1))
    return thresholds, f1, float(thresholds[best]), float(f1[best])
