"""Slide-level and grade metrics: ROC AUC by the rank formula, quadratic-weighted Cohen's
kappa (TUPAC grades) and Spearman's rank correlation (TUPAC proliferation scores)."""
from typing import Optional, Sequence

import numpy as np

from ..errors import InvalidArgumentError


def _ranks(a: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties given their average rank."""
    order = np.argsort(a, kind="mergesort")
    s = a[order]
    starts = np.r_[0, np.flatnonzero(s[1:] != s[:-1]) + 1]
    ends = np.r_[starts[1:], len(s)]
    avg = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(len(a))
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def roc_auc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """Area under the ROC curve: (sum of the positives' ranks - P(P+1)/2) / (P N), ties
    at their average rank (a tie between a positive and a negative counts 1/2)."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    if y.shape != s.shape or y.ndim != 1:
        raise InvalidArgumentError(f"labels and scores must be 1-D of one length, got {y.shape} and {s.shape}")
    p, n = int(y.sum()), int((~y).sum())
    if p == 0 or n == 0:
        raise InvalidArgumentError(f"AUC needs positive and negative slides, got {p} positive and {n} negative")
    if not np.isfinite(s).all():
        raise InvalidArgumentError("scores must be finite")
    return float((_ranks(s)[y].sum() - p * (p + 1) / 2) / (p * n))


def quadratic_kappa(a: Sequence[int], b: Sequence[int], categories: Optional[Sequence[int]] = None) -> float:
    """Cohen's kappa with quadratic weights between two ratings of the same items."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise InvalidArgumentError(f"two 1-D ratings of one non-zero length needed, got {a.shape} and {b.shape}")
    cats = np.asarray(sorted(set(a.tolist()) | set(b.tolist())) if categories is None else categories)
    k = len(cats)
    index = {c: i for i, c in enumerate(cats.tolist())}
    try:
        ia, ib = np.array([index[v] for v in a.tolist()]), np.array([index[v] for v in b.tolist()])
    except KeyError as exc:
        raise InvalidArgumentError(f"rating {exc.args[0]!r} is not one of the categories {cats.tolist()}") from None
    observed = np.zeros((k, k))
    np.add.at(observed, (ia, ib), 1)
    expected = np.outer(observed.sum(1), observed.sum(0)) / len(a)
    w = (np.subtract.outer(np.arange(k), np.arange(k)) ** 2) / max((k - 1) ** 2, 1)
    denom = (w * expected).sum()
    return 1.0 if denom == 0 else float(1 - (w * observed).sum() / denom)


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rho: Pearson's correlation of the ranks (ties at their average rank)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise InvalidArgumentError(f"two 1-D series of one length >= 2 needed, got {a.shape} and {b.shape}")
    ra, rb = _ranks(a) - (len(a) + 1) / 2, _ranks(b) - (len(b) + 1) / 2
    denom = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float("nan") if denom == 0 else float((ra * rb).sum() / denom)
