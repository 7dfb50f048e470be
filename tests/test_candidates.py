"""Mitosis candidate detector (Tellez et al. 2018, Sec. IV-A): the C++ kernel against the
reference loop (pyfastscan/reference/candidates.py) on the real sample patch and on
synthetic dark blobs with ties, and the defining properties of its output."""
import numpy as np
import pytest

from pyfastscan import InvalidArgumentError
from pyfastscan.ops import candidates, last_backend
from pyfastscan.samples import carcinoma_image


def _check_candidate_properties(img, got, r):
    """Candidates are darker than t, more than r apart, and every dark pixel is within r
    of one (the loop stops only when no dark pixel is left unsuppressed)."""
    inten = img.astype(np.int64).sum(axis=2)
    assert (inten[got[:, 1], got[:, 0]] < 0.6 * 765).all()
    d2 = ((got[:, None, :] - got[None, :, :]) ** 2).sum(-1)
    assert (d2[~np.eye(len(got), dtype=bool)] > r * r).all()
    dy, dx = np.nonzero(inten < 0.6 * 765)
    near = np.zeros(len(dy), dtype=bool)
    for x, y in got:
        near |= (dx - x) ** 2 + (dy - y) ** 2 <= r * r
    assert near.all()


def test_candidates_equal_the_reference_on_the_real_patch():
    img = carcinoma_image()[200:600, 300:700, :3]
    got = candidates(img, d_um=25, t=0.6, mpp=0.5, backend="cpu")
    assert last_backend("candidates") == "cpu"
    ref = candidates(img, d_um=25, t=0.6, mpp=0.5, backend="torch")
    assert last_backend("candidates") == "torch"
    assert len(got) > 20 and np.array_equal(got, ref)
    _check_candidate_properties(img, got, 25.0)


def test_candidates_on_synthetic_dark_blobs_with_ties():
    rng = np.random.default_rng(0)
    img = np.full((120, 150, 3), 235, dtype=np.uint8)
    yy, xx = np.mgrid[:120, :150]
    for _ in range(12):
        cy, cx, rad = rng.integers(0, 120), rng.integers(0, 150), rng.integers(2, 9)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= rad * rad] = rng.integers(20, 120)  # flat blobs: many ties
    for d_um, mpp in ((10, 0.5), (25, 0.25), (3, 1.0)):
        got = candidates(img, d_um=d_um, mpp=mpp)
        assert last_backend("candidates") == "cpu"  # auto picks the C++ kernel
        assert np.array_equal(got, candidates(img, d_um=d_um, mpp=mpp, backend="torch"))
        _check_candidate_properties(img, got, d_um / mpp / 2)
    assert candidates(np.full((5, 5, 3), 255, np.uint8), mpp=0.25).shape == (0, 2)
    with pytest.raises(InvalidArgumentError, match="uint8"):
        candidates(img.astype(np.float32), mpp=0.25)
    with pytest.raises(TypeError, match="mpp"):  # no silent resolution: the disc's size depends on it
        candidates(img)
