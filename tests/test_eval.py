"""Evaluation metrics: Camelyon16 FROC on hand-built slides with known answers, AUC by
the rank formula, optimal detection matching, kappa and Spearman against scipy."""
import numpy as np
import pytest

from pyfastscan import InvalidArgumentError
from pyfastscan.eval import (detection_score, evaluation_mask, f1_curve, froc_curve, froc_score, itc_labels,
                             major_axis_lengths, match, quadratic_kappa, roc_auc, slide_hits, spearman)

RES = 0.243
LEVEL = 5
D = 2 ** LEVEL  # level-0 px per evaluation-mask pixel
GROW = 75 / (RES * D * 2)  # 4.82 mask pixels


def _tumour_slide():
    """A 200 x 200 mask at level 5 with a big lesion (a 40 x 60 block) and an ITC (one pixel)."""
    m = np.zeros((200, 200), dtype=bool)
    m[50:90, 40:100] = True
    m[150, 150] = True
    return m


def test_evaluation_mask_grows_by_75um_fills_holes_and_finds_the_itc():
    m = _tumour_slide()
    m[60:80, 60:80] = False  # a hole: filled after growing
    labels = evaluation_mask(m, RES, LEVEL)
    assert labels.max() == 2
    big, itc = labels[70, 70], labels[150, 150]
    assert big and itc and big != itc
    # grown by the distance rule: row 46 is 4 px from the lesion (< 4.82), row 45 is 5 px
    assert labels[50 - 4, 70] == big and labels[50 - 5, 70] == 0
    assert itc_labels(labels, RES, LEVEL) == {itc}  # 275 um / (0.243 * 32) = 35.4 px major axis


def test_major_axis_equals_skimage():
    measure = pytest.importorskip("skimage.measure")
    rng = np.random.default_rng(0)
    labels = measure.label(rng.random((80, 90)) > 0.6, connectivity=2)
    ours = major_axis_lengths(labels)
    theirs = np.array([p.axis_major_length for p in measure.regionprops(labels)])
    assert np.allclose(ours, theirs, rtol=1e-9, atol=1e-9)


def _hits():
    """Three slides: a tumour slide with a lesion hit twice, an ITC hit and a false
    positive; a second tumour slide whose lesion is missed; a normal slide."""
    labels = evaluation_mask(_tumour_slide(), RES, LEVEL)
    itc = itc_labels(labels, RES, LEVEL)
    x_in, y_in = 70 * D + 5, 60 * D + 5  # inside the big lesion
    just_inside = (40 - 4) * D + D - 1  # column 36 (grown by 4 px), last level-0 pixel of it
    a = slide_hits("tumor_a", [0.9, 0.6, 0.8, 0.7, 0.3], [x_in, just_inside, 150 * D, 10 * D, x_in + D],
                   [y_in, y_in, 150 * D, 10 * D, y_in], labels, itc, LEVEL)
    b = slide_hits("tumor_b", [0.5], [10 * D], [190 * D], labels, itc, LEVEL)
    n = slide_hits("normal", [0.4, 0.95], [5.0, 6.0], [5.0, 6.0], None)
    return a, b, n


def test_slide_hits_by_hand():
    a, b, n = _hits()
    assert a.fp_probs == [0.7] and a.n_lesions == 1  # the ITC hit (0.8) is ignored
    assert sorted(a.tp_probs.tolist()) == [0.0, pytest.approx(0.9)]  # lesion keeps its best; the ITC label stays 0
    assert b.fp_probs == [0.5] and b.tp_probs.max() == 0
    assert n.fp_probs == [0.4, 0.95] and n.n_lesions == 0
    # a detection just outside the grown boundary is a false positive
    labels = evaluation_mask(_tumour_slide(), RES, LEVEL)
    out = slide_hits("x", [0.5], [(40 - 5) * D + D - 1], [60 * D], labels, set(), LEVEL)
    assert out.fp_probs == [0.5]


def test_froc_curve_and_score_by_hand():
    """FPs: 0.7, 0.5, 0.4, 0.95 over 3 slides; lesion probabilities 0.9 (a) and 0 (b, missed),
    plus the ITC labels' zeros; 2 lesions. Thresholds: distinct values but the smallest (0)."""
    fps, sens = froc_curve(list(_hits()))
    thresholds = [0.4, 0.5, 0.7, 0.9, 0.95]  # sorted({0, 0.4, 0.5, 0.7, 0.9, 0.95})[1:]
    exp_fp = [4 / 3, 3 / 3, 2 / 3, 1 / 3, 1 / 3, 0]  # FPs >= t per slide; then the (0, 0) point
    exp_sens = [0.5, 0.5, 0.5, 0.5, 0.0, 0]  # lesion a (0.9) >= t, of 2 lesions
    assert len(fps) == len(thresholds) + 1
    assert np.allclose(fps, exp_fp) and np.allclose(sens, exp_sens)
    # linear: np.interp over the curve sorted by FPs; step: best sensitivity with FPs <= rate
    score, at = froc_score(fps, sens, reading="linear")
    expected_at = np.interp([0.25, 0.5, 1, 2, 4, 8], np.array(exp_fp)[::-1], np.array(exp_sens)[::-1])
    assert np.allclose(at, expected_at) and score == pytest.approx(expected_at.mean())
    step, at_step = froc_score(fps, sens, reading="step")
    assert np.allclose(at_step, [0.0, 0.5, 0.5, 0.5, 0.5, 0.5]) and step == pytest.approx(2.5 / 6)


def test_froc_float32_lesion_probabilities_follow_the_script():
    """The script stores lesion probabilities in float32 and compares the lesions' array
    with the threshold cast to float32: a false positive at 0.3 (float64) and a lesion at
    0.3 (float32 0.30000001) are distinct thresholds, and the lesion counts at both."""
    labels = np.zeros((4, 4), dtype=np.int32)
    labels[1:3, 1:3] = 1
    s = slide_hits("t", [0.3, 0.3, 0.1], [1.5 * D, 0.0, 0.0], [1.5 * D, 0.0, 0.0], labels, set(), LEVEL)
    fps, sens = froc_curve([s])
    # thresholds: sorted({0.1, 0.3, float32(0.3)})[1:] = [0.3, 0.30000001]
    assert np.allclose(fps, [1.0, 0.0, 0.0]) and np.allclose(sens, [1.0, 1.0, 0.0])


def test_froc_errors():
    with pytest.raises(InvalidArgumentError):
        froc_curve([slide_hits("n", [0.5], [1], [1], None)])  # no lesions at all
    with pytest.raises(InvalidArgumentError, match="reading"):
        froc_score([0], [0], reading="cubic")


def test_auc_rank_formula_and_ties():
    y = [1, 1, 0, 0, 1, 0]
    s = [0.9, 0.5, 0.5, 0.1, 0.7, 0.3]
    # pairs (pos, neg): 9 pairs; wins: 0.9 beats 3, 0.7 beats 3, 0.5 beats 2 and ties 1 -> 8.5 / 9
    assert roc_auc(y, s) == pytest.approx(8.5 / 9)
    assert roc_auc([1, 0], [0.2, 0.2]) == 0.5
    with pytest.raises(InvalidArgumentError):
        roc_auc([1, 1], [0.1, 0.2])


def test_matching_beats_greedy_on_crossing_candidates():
    """Detection A is nearest to truth 1 but is the only one that can reach truth 0 ...
    greedy (nearest first) matches A-1 and leaves B and truth 0 unmatched."""
    truths = np.array([[0.0, 0.0], [10.0, 0.0]])
    dets = np.array([[6.0, 0.0],    # A: 6 from truth 0, 4 from truth 1
                     [14.0, 0.0]])  # B: 4 from truth 1 only (14 from truth 0)
    s = detection_score(dets, truths, radius=7.0)
    assert s.tp == 2 and s.fp == 0 and s.fn == 0 and s.f1 == 1.0
    assert sorted(map(tuple, s.pairs.tolist())) == [(0, 0), (1, 1)]
    # one-to-one: two detections on one truth give one TP and one FP
    s = detection_score([[0, 0], [1, 1]], [[0.5, 0.5]], radius=5)
    assert (s.tp, s.fp, s.fn) == (1, 1, 0)
    # the radius is inclusive
    assert detection_score([[3, 4]], [[0, 0]], radius=5).tp == 1


def test_matching_equals_brute_force_on_random_points():
    """Maximum cardinality with the least total distance, checked against exhaustive search."""
    from itertools import permutations

    rng = np.random.default_rng(1)
    for _ in range(30):
        d, t = rng.random((5, 2)) * 30, rng.random((4, 2)) * 30
        pairs = match(d, t, radius=9.0)
        dist = np.hypot(*(d[:, None] - t[None]).transpose(2, 0, 1))
        best = (0, 0.0)
        for perm in permutations(range(5), 4):  # truth k paired with detection perm[k] when close enough
            ok = [(perm[k], k) for k in range(4) if dist[perm[k], k] <= 9.0]
            cand = (len(ok), -sum(dist[i, j] for i, j in ok))
            best = max(best, cand)
        assert len(pairs) == best[0]
        assert -sum(dist[i, j] for i, j in pairs) == pytest.approx(best[1])


def test_f1_curve_picks_the_best_threshold():
    truths = [[0, 0], [100, 0]]
    dets = [[1, 0], [101, 0], [500, 500]]
    probs = [0.9, 0.6, 0.8]
    th, f1, best_t, best = f1_curve(dets, probs, truths, radius=25)
    assert th.tolist() == [0.6, 0.8, 0.9]
    # >= 0.6: 2 TP 1 FP -> 0.8; >= 0.8: 1 TP 1 FP 1 FN -> 0.5; >= 0.9: 1 TP 1 FN -> 2/3
    assert np.allclose(f1, [0.8, 0.5, 2 / 3]) and best_t == 0.6 and best == pytest.approx(0.8)


def test_kappa_by_its_definition_and_spearman_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(2)
    a = rng.integers(1, 4, 50)
    b = np.clip(a + rng.integers(-1, 2, 50), 1, 3)
    # quadratic kappa by its definition with explicit loops
    k = 3
    o = np.zeros((k, k))
    for i, j in zip(a - 1, b - 1):
        o[i, j] += 1
    e = np.outer(o.sum(1), o.sum(0)) / len(a)
    w = np.array([[(i - j) ** 2 / (k - 1) ** 2 for j in range(k)] for i in range(k)])
    assert quadratic_kappa(a, b) == pytest.approx(1 - (w * o).sum() / (w * e).sum())
    assert quadratic_kappa(a, a) == 1.0
    x, y = rng.random(40), rng.random(40)
    y[:10] = x[:10]
    x[20:25] = 0.5  # ties
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic)


def _scan_folder(root, name, rows, size, score, layout="detections.csv"):
    """A scan's output folder and report.json, its detections in ``layout``: detections.csv
    (x,y,probability with a header), camelyon16_submission.csv (probability,x,y, integers,
    no header) or "legacy" (detections.csv as it was before: probability,x,y, no header)."""
    import json
    import os

    os.makedirs(root / name)
    if layout == "detections.csv":
        text = "x,y,probability\n" + "".join(f"{x:.1f},{y:.1f},{p}\n" for p, x, y in rows)
    else:
        text = "".join(f"{p},{x},{y}\n" for p, x, y in rows)
    file = "camelyon16_submission.csv" if layout.startswith("camelyon") else "detections.csv"
    (root / name / file).write_text(text)
    (root / name / "report.json").write_text(json.dumps({"slide_size_px": list(size), "score": score}))


@pytest.mark.parametrize("layout", ["detections.csv", "camelyon16_submission.csv", "legacy"])
def test_cli_froc_and_auc_on_scan_outputs(tmp_path, capsys, layout):
    """Two tumour slides (ASAP XML ground truth) and a normal one, predictions as scan
    outputs (each CSV layout a scan writes or wrote): the CLI's FROC equals the API's on
    the same masks; AUC from report scores."""
    import json

    from pyfastscan.cli import main
    from pyfastscan.io import Annotation, rasterize, write_asap_xml

    size = (6400, 6400)  # level 5: 200 x 200
    lesion = Annotation("polygon", [[1280, 1600], [3200, 1600], [3200, 2880], [1280, 2880]], "_0")
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir()
    write_asap_xml(gt / "tumor_001.xml", [lesion])
    write_asap_xml(gt / "tumor_002.xml", [lesion])
    _scan_folder(pred, "tumor_001", [(0.9, 2000, 2000), (0.7, 100, 100), (0.3, 2100, 2000)], size, 0.95, layout)
    _scan_folder(pred, "tumor_002", [(0.6, 6000, 6000)], size, 0.6, layout)
    _scan_folder(pred, "normal_001", [(0.8, 50, 50), (0.2, 70, 70)], size, 0.8, layout)
    out = tmp_path / "res" / "froc.json"
    out.parent.mkdir()
    assert main(["evaluate", "froc", "--pred", str(pred), "--gt", str(gt), "--json", str(out)]) == 0
    res = json.load(open(out))
    assert (tmp_path / "res" / "froc.png").stat().st_size > 1000
    mask = rasterize([lesion], (200, 200), 32.0)
    labels = evaluation_mask(mask)
    hits = [slide_hits("normal_001", [0.8, 0.2], [50, 70], [50, 70], None),
            slide_hits("tumor_001", [0.9, 0.7, 0.3], [2000, 100, 2100], [2000, 100, 2000], labels,
                       itc_labels(labels)),
            slide_hits("tumor_002", [0.6], [6000], [6000], labels, itc_labels(labels))]
    fps, sens = froc_curve(hits)
    assert res["curve"]["fps_per_slide"] == fps.tolist() and res["curve"]["sensitivity"] == sens.tolist()
    assert res["froc"] == pytest.approx(froc_score(fps, sens)[0])
    # by hand: FPs 0.7, 0.6, 0.8, 0.2 over 3 slides; lesions 0.9 and 0 (missed), 2 lesions
    # thresholds sorted({0, 0.2, 0.6, 0.7, 0.8, 0.9})[1:]: FPs/slide 4/3, 3/3, 2/3, 1/3, 0;
    # sensitivity 1/2 at each; then (0, 0). The detection at 0.3 on the lesion is not its best.
    assert np.allclose(fps, [4 / 3, 1, 2 / 3, 1 / 3, 0, 0]) and np.allclose(sens, [0.5] * 5 + [0])
    assert [s["hit"] for s in res["slides"]] == [0, 1, 0]
    # the same ground truth as Camelyon16 mask TIFs (255 = tumour, pyramid down to level 5)
    # gives the same curve
    from pyfastscan.io.images import write_pyramid_tif

    gt2 = tmp_path / "gt_masks"
    gt2.mkdir()
    level0 = np.kron(mask, np.ones((32, 32), dtype=bool)).astype(np.uint8) * 255
    for name in ("tumor_001", "tumor_002"):
        write_pyramid_tif(str(gt2 / f"{name}_Mask.tif"), level0, 0.243, levels=6)
    out2 = tmp_path / "res" / "froc_masks.json"
    assert main(["evaluate", "froc", "--pred", str(pred), "--gt", str(gt2), "--json", str(out2),
                 "--reading", "step"]) == 0
    res2 = json.load(open(out2))
    assert res2["curve"] == res["curve"] and res2["froc_linear"] == res["froc"]
    assert res2["froc"] == pytest.approx(froc_score(fps, sens, reading="step")[0])
    labels_csv = tmp_path / "labels.csv"
    labels_csv.write_text("name,label\ntumor_001,Tumor\ntumor_002,Tumor\nnormal_001,Normal\n")
    assert main(["evaluate", "auc", "--pred", str(pred), "--labels", str(labels_csv)]) == 0
    assert "slide-level AUC: 0.5000" in capsys.readouterr().out  # 0.95 > 0.8 > 0.6: one of two pairs won


def test_cli_f1_and_bad_input(tmp_path, capsys):
    from pyfastscan.cli import main
    from pyfastscan.io import Annotation, write_geojson

    (tmp_path / "det.csv").write_text("x,y,probability\n0,0,0.9\n100,0,0.6\n500,500,0.8\n")
    write_geojson(tmp_path / "gt.geojson", [Annotation("points", [[10, 0], [100, 20]], "Mitosis")])
    assert main(["evaluate", "f1", "--pred", str(tmp_path / "det.csv"), "--gt", str(tmp_path / "gt.geojson")]) == 0
    out = capsys.readouterr().out
    assert "| 3 | 2 | 2 | 1 | 0 |" in out and "best F1 0.8000 at probability >= 0.6" in out
    # a radius in um: 5 um at 0.25 um/px is 20 px; the second truth (20.0 px away) still matches
    assert main(["evaluate", "f1", "--pred", str(tmp_path / "det.csv"), "--gt", str(tmp_path / "gt.geojson"),
                 "--radius-um", "5", "--mpp", "0.25"]) == 0
    assert "| 2 | 1 | 0 |" in capsys.readouterr().out
    (tmp_path / "bad.csv").write_text("0.5,1,2\n0.4,x,3\n")
    assert main(["evaluate", "f1", "--pred", str(tmp_path / "bad.csv"), "--gt", str(tmp_path / "gt.geojson")]) == 2
    assert "bad.csv: line 2: x='x' is not a number" in capsys.readouterr().err
    assert main(["evaluate", "froc", "--pred", str(tmp_path / "nope"), "--gt", str(tmp_path)]) == 2
    assert "nope: no such folder" in capsys.readouterr().err


def test_froc_plot_starts_where_the_curve_crosses_the_left_edge():
    """On the log axis the curve begins at the axis's left end with the linear reading's
    value there, so the dot drawn at 1/4 lies on the curve (points further left are off the axis)."""
    from pyfastscan.eval.plot import _clip_left

    line = [(0.0, 0.0), (0.05, 0.4), (0.1, 0.45), (0.3, 0.55), (1.0, 0.7)]
    got = _clip_left(line, 0.25)
    assert got[1:] == line[3:] and got[0][0] == 0.25
    assert got[0][1] == pytest.approx(float(np.interp(0.25, [p[0] for p in line], [p[1] for p in line])))
    assert _clip_left(line[:2], 0.25) == [(0.25, 0.4)] and _clip_left(line[3:], 0.25) == line[3:]


def test_a_failed_or_unfinished_slide_folder_is_not_evaluated(tmp_path):
    """A folder whose status is not "done" holds an earlier run's or a half-written CSV:
    refused, naming it, rather than scored."""
    from pyfastscan.eval.files import prediction_files
    from pyfastscan.io import AnnotationError
    from pyfastscan.io.files import write_status

    for name, state in (("a", "done"), ("b", None)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "detections.csv").write_text("x,y,probability\n1,2,0.9\n")
        if state:
            write_status(str(tmp_path / name), state, slide=name, job="scan")
    assert set(prediction_files(str(tmp_path))) == {"a", "b"}  # b: a folder from before status.json
    write_status(str(tmp_path / "b"), "failed", slide="b", job="scan", reason="killed")
    with pytest.raises(AnnotationError, match=r"b: the slide's folder is marked 'failed'"):
        prediction_files(str(tmp_path))
