"""pyfastscan.train (issue 18): the patch dataset's geometry (centring, margins, class
shares, determinism per seed and worker), the augmentations (ranges as property tests, the
papers' presets, HED equal to hed_augment), a tiny end-to-end run on the bundled samples
(loss falls, resume reaches the same state, the weights scan from the CLI) and hard negative
mining (planted false positives are exactly what is mined; a round lowers the held-out
false-positive share)."""
import json
import math
import os
import sqlite3

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from pyfastscan.io import Annotation, write_geojson
from pyfastscan.ops import hed_augment
from pyfastscan.pipeline.outputs import write_pyramid_tif
from pyfastscan.train import (PRESETS, Augment, AugmentConfig, PatchDataset, SlideSpec, evaluate, fit, mine_slide,
                              read_manifest, train_rounds)

MPP = 1.0
RECT = (160, 160, 240, 240)  # x0, y0, x1, y1: on cell edges of the 8 px label grid
POINTS = np.array([[400.0, 120.0], [420.0, 400.0]])
NEGATIVES = np.array([[100.0, 420.0], [300.0, 330.0], [405.0, 130.0]])  # the last is next to a positive point


def _tissue_png(path, shape):
    from PIL import Image

    Image.fromarray(np.full(shape, 255, np.uint8)).save(path)
    return path


def _write_points(path, xy, header="x,y"):
    with open(path, "w") as f:
        f.write(header + "\n" + "".join(f"{x},{y}\n" for x, y in xy))
    return path


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A 512 x 512 px slide at 1 um/px: noise texture, a positive rectangle (GeoJSON), two
    positive points (CSV) and three hard negatives (CSV), everything tissue."""
    d = tmp_path_factory.mktemp("synthetic")
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)
    write_pyramid_tif(str(d / "s.tif"), img, MPP, levels=2, compression="zlib")
    x0, y0, x1, y1 = RECT
    write_geojson(str(d / "s.geojson"), [Annotation("polygon", [[x0, y0], [x1, y0], [x1, y1], [x0, y1]], "tumor")])
    spec = SlideSpec(str(d / "s.tif"), annotations=(str(d / "s.geojson"), _write_points(str(d / "p.csv"), POINTS)),
                     negatives=(_write_points(str(d / "n.csv"), NEGATIVES),),
                     tissue=_tissue_png(str(d / "t.png"), (64, 64)))
    return spec, img


def _rect_distance(x, y):
    x0, y0, x1, y1 = RECT
    dx = np.maximum(np.maximum(x0 - x, x - x1), 0)
    dy = np.maximum(np.maximum(y0 - y, y - y1), 0)
    return np.hypot(dx, dy)


def _draws(ds, n):
    return [ds.draw(i) for i in range(n)]


def test_positives_are_centred_on_the_annotations(synthetic):
    spec, _ = synthetic
    ds = PatchDataset([spec], MPP, 16, context=24, length=3000, shares={"positive": 1.0}, margin_um=20,
                      jitter_um=4)
    draws = _draws(ds, 3000)
    xy = np.array([(d.x, d.y) for d in draws])
    in_rect = _rect_distance(xy[:, 0], xy[:, 1]) == 0
    near_point = (np.abs(xy[:, None, :] - POINTS[None]).max(axis=2) <= 4).any(axis=1)  # the jitter, per axis
    assert all(d.label == 1 and d.pool == "positive" for d in draws)
    assert (in_rect | near_point).all(), xy[~(in_rect | near_point)][:5]
    # locations are equally likely: 100 cells of the rectangle, 2 points
    assert near_point.sum() > 0 and in_rect.sum() > near_point.sum()
    # both points are used, each spread over its jitter square
    for p in POINTS:
        mine = xy[(np.abs(xy - p).max(axis=1) <= 4)]
        assert len(mine) > 5 and mine[:, 0].std() > 1


def test_asap_xml_annotations_label_as_the_same_geojson(synthetic, tmp_path):
    """Camelyon16's ground truth is ASAP XML: the same polygon as XML and as GeoJSON gives
    the same draws."""
    import dataclasses

    from pyfastscan.io import write_asap_xml

    spec, _ = synthetic
    x0, y0, x1, y1 = RECT
    xml = write_asap_xml(str(tmp_path / "s.xml"), [Annotation("polygon", [[x0, y0], [x1, y0], [x1, y1], [x0, y1]],
                                                              "tumor")])
    as_xml = dataclasses.replace(spec, annotations=(xml,) + tuple(spec.annotations[1:]))
    kw = dict(mpp=MPP, patch=16, context=24, length=200, shares={"positive": 1.0}, margin_um=20, jitter_um=4)
    a, b = PatchDataset([spec], **kw), PatchDataset([as_xml], **kw)
    assert [(d.x, d.y, d.label) for d in _draws(a, 200)] == [(d.x, d.y, d.label) for d in _draws(b, 200)]


def test_a_positive_inset_keeps_centres_inside_the_region(synthetic):
    spec, _ = synthetic
    ds = PatchDataset([spec], MPP, 16, context=24, length=1000, shares={"positive": 1.0}, positive_inset_um=16)
    xy = np.array([(d.x, d.y) for d in _draws(ds, 1000)])
    xy = xy[_rect_distance(xy[:, 0], xy[:, 1]) == 0]  # the region's draws (the points have no inset)
    x0, y0, x1, y1 = RECT
    depth = np.minimum.reduce([xy[:, 0] - x0, x1 - xy[:, 0], xy[:, 1] - y0, y1 - xy[:, 1]])
    # kept cells have their centre >= 16 px deep; a draw is anywhere in its 8 px cell
    assert len(xy) > 100 and depth.min() >= 16 - 4
    assert depth.min() < 16 + 4  # the shallowest kept cells (centres 16 to 24 px deep) are used


def test_pixels_are_read_around_the_centre(synthetic):
    spec, img = synthetic
    ds = PatchDataset([spec], MPP, 16, context=24, length=50, shares={"positive": 1, "negative": 1, "hard": 1})
    for i in range(50):
        d = ds.draw(i)
        x0, y0 = math.floor(d.x - 12 + 0.5), math.floor(d.y - 12 + 0.5)
        got, label = ds[i]
        assert label.item() == d.label
        np.testing.assert_array_equal(got.permute(1, 2, 0).numpy(), img[y0:y0 + 24, x0:x0 + 24])


def test_negatives_keep_the_margin_and_hard_negatives_come_from_their_list(synthetic):
    spec, _ = synthetic
    margin = 20.0
    ds = PatchDataset([spec], MPP, 16, context=24, length=4000, shares={"negative": 0.5, "hard": 0.5},
                      margin_um=margin, jitter_um=3)
    draws = _draws(ds, 4000)
    neg = np.array([(d.x, d.y) for d in draws if d.pool == "negative"])
    hard = np.array([(d.x, d.y) for d in draws if d.pool == "hard"])
    assert all(d.label == 0 for d in draws)
    dist_points = np.sqrt(((neg[:, None, :] - POINTS[None]) ** 2).sum(-1)).min(axis=1)
    assert _rect_distance(neg[:, 0], neg[:, 1]).min() >= margin
    assert dist_points.min() >= margin
    assert neg[:, 0].min() >= 12 and neg[:, 0].max() <= 512 - 12  # the whole context on the slide
    # hard negatives: jittered around the listed ones, except the one next to a positive point
    owner = np.abs(hard[:, None, :] - NEGATIVES[None]).max(axis=2) <= 3
    assert owner.any(axis=1).all()
    assert owner[:, 0].any() and owner[:, 1].any() and not owner[:, 2].any()
    assert ds.counts["hard"].sum() == 2


def test_class_shares_over_many_draws(synthetic):
    spec, _ = synthetic
    shares = {"positive": 0.3, "negative": 0.5, "hard": 0.2}
    n = 6000
    ds = PatchDataset([spec], MPP, 16, context=24, length=n, shares=shares, seed=3)
    pools = [d.pool for d in _draws(ds, n)]
    for pool, p in shares.items():
        k = pools.count(pool)
        # binomial: 5 standard deviations (a false failure has probability ~6e-7)
        assert abs(k - n * p) <= 5 * math.sqrt(n * p * (1 - p)), (pool, k, n * p)


def test_draws_depend_on_seed_epoch_and_index_only(synthetic):
    spec, _ = synthetic
    kw = dict(context=24, length=64, shares={"positive": 1, "negative": 1, "hard": 1})
    a, b = PatchDataset([spec], MPP, 16, seed=5, **kw), PatchDataset([spec], MPP, 16, seed=5, **kw)
    assert _draws(a, 64) == _draws(b, 64)
    assert _draws(a, 64) != _draws(PatchDataset([spec], MPP, 16, seed=6, **kw), 64)
    b.set_epoch(1)
    assert _draws(a, 64) != _draws(b, 64)
    # any number of DataLoader workers reads the same batches
    single = [torch.cat([x.flatten(), y]) for x, y in torch.utils.data.DataLoader(a, batch_size=16)]
    multi = [torch.cat([x.flatten(), y]) for x, y in torch.utils.data.DataLoader(a, batch_size=16, num_workers=2)]
    assert all(torch.equal(s, m) for s, m in zip(single, multi)) and len(single) == len(multi) == 4


def test_label_masks_and_sliderunner_points(tmp_path, synthetic):
    from PIL import Image

    spec, _ = synthetic
    labels = np.zeros((128, 128), np.uint8)  # 4 level-0 px per mask pixel
    labels[:, :64] = 2                        # left half: background tissue (negatives)
    labels[40:60, 80:100] = 1                 # diagnostically significant (positive)
    labels[100:120, 20:40] = 3                # artefact: neither
    Image.fromarray(labels).save(tmp_path / "labels.png")
    s = SlideSpec(spec.slide, annotations=(str(tmp_path / "labels.png"),), positive_labels=(1,),
                  negative_labels=(2,), tissue=spec.tissue)
    ds = PatchDataset([s], MPP, 16, context=24, length=2000, shares={"positive": 1, "negative": 1}, margin_um=0)
    for d in _draws(ds, 2000):
        v = labels[int(d.y // 4), int(d.x // 4)]
        assert v == (1 if d.label else 2), (d, v)
    db = str(tmp_path / "m.sqlite")
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE Slides (uid INTEGER PRIMARY KEY, filename TEXT)")
    con.execute("CREATE TABLE Classes (uid INTEGER PRIMARY KEY, name TEXT)")
    con.execute("CREATE TABLE Annotations (uid INTEGER PRIMARY KEY, slide INT, agreedClass INT, type INT)")
    con.execute("CREATE TABLE Annotations_coordinates (uid INTEGER PRIMARY KEY, coordinateX REAL, "
                "coordinateY REAL, annoId INT, orderIdx INT)")
    con.execute("INSERT INTO Slides VALUES (1, ?)", (os.path.basename(spec.slide),))
    con.executemany("INSERT INTO Classes VALUES (?, ?)", [(1, "Mitotic figure"), (2, "Mitotic figure lookalike")])
    for uid, cls, (x, y) in [(1, 1, (100, 100)), (2, 2, (300, 300)), (3, 1, (200, 400))]:
        con.execute("INSERT INTO Annotations VALUES (?, 1, ?, 1)", (uid, cls))
        con.execute("INSERT INTO Annotations_coordinates (coordinateX, coordinateY, annoId, orderIdx) "
                    "VALUES (?, ?, ?, 0)", (x, y, uid))
    con.commit()
    con.close()
    s = SlideSpec(spec.slide, annotations=(db,), tissue=spec.tissue)
    ds = PatchDataset([s], MPP, 16, context=24, length=500, shares={"positive": 1, "hard": 1}, jitter_um=2)
    for d in _draws(ds, 500):
        targets = np.array([[100, 100], [200, 400]] if d.label else [[300, 300]])
        assert (np.abs(targets - (d.x, d.y)).max(axis=1) <= 2).any(), d


def test_candidate_detector_negatives(tmp_path):
    img = np.full((256, 256, 3), 225, np.uint8)
    blobs = [(60, 60), (190, 70), (80, 200), (200, 200)]  # dark discs; the last next to a positive point
    yy, xx = np.mgrid[:256, :256]
    for x, y in blobs:
        img[(xx - x) ** 2 + (yy - y) ** 2 <= 16] = 40
        img[y, x] = 10  # the darkest pixel: the detector picks it
    write_pyramid_tif(str(tmp_path / "c.tif"), img, MPP, levels=1, compression="zlib")
    pts = _write_points(str(tmp_path / "p.csv"), [[205.0, 200.0]])
    spec = SlideSpec(str(tmp_path / "c.tif"), annotations=(pts,), candidates=True,
                     tissue=_tissue_png(str(tmp_path / "t.png"), (32, 32)))
    ds = PatchDataset([spec], MPP, 16, context=24, length=600, shares={"positive": 1, "hard": 1}, jitter_um=2,
                      margin_um=12)
    hard = np.array([(d.x, d.y) for d in _draws(ds, 600) if d.pool == "hard"])
    owner = np.abs(hard[:, None, :] - np.array(blobs, float)[None]).max(axis=2) <= 2 + 1  # jitter + a pixel centre
    assert owner.any(axis=1).all() and owner[:, :3].any(axis=0).all() and not owner[:, 3].any()
    assert ds.counts["hard"].sum() == 3


def test_bad_input_is_refused_clearly(synthetic, tmp_path):
    from pyfastscan.errors import InvalidArgumentError

    spec, _ = synthetic
    with pytest.raises(InvalidArgumentError, match="context"):
        PatchDataset([spec], MPP, 16, context=21)
    bare = SlideSpec(spec.slide, tissue=spec.tissue)
    with pytest.raises(InvalidArgumentError, match="positive.*no locations"):
        PatchDataset([bare], MPP, 16)
    (tmp_path / "m.csv").write_text("slide,annotaions\na.tif,b.xml\n")
    with pytest.raises(InvalidArgumentError, match="unknown field"):
        read_manifest(tmp_path / "m.csv")
    with pytest.raises(InvalidArgumentError, match="split"):
        SlideSpec("a.tif", split="test")


# ----------------------------------------------------------------------------- augmentation


def test_presets_are_the_papers_numbers():
    t = PRESETS["tellez_rcsehbg"]
    assert (t.rot90, t.flip) == (True, True)
    assert (t.hed_alpha, t.hed_beta) == ((0.95, 1.05), (-0.05, 0.05))
    assert t.zoom == (0.75, 1.25)
    assert (t.elastic_alpha, t.elastic_sigma) == (100.0, 10.0)
    assert (t.saturation, t.contrast, t.brightness) == ((0.75, 1.5), (0.75, 1.5), (0.75, 1.25))
    assert t.blur_sigma == (0.0, 2.0) and t.noise_std == (0.0, 0.1)
    f = PRESETS["fastscannet"]  # the transforms the paper names: shift, rotation, flip, scale, colour
    assert f.shift_px > 0 and f.rot90 and f.flip and f.zoom != (1, 1) and f.hed_alpha != (1, 1)
    assert PRESETS["none"] == AugmentConfig()


_range = st.tuples(st.floats(0.5, 1.5), st.floats(0, 0.5)).map(lambda t: (t[0], t[0] + t[1]))


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 6), zoom=_range, sat=_range, con=_range, bri=_range, blur=st.floats(0, 2),
       noise=st.floats(0, 0.1), shift=st.floats(0, 4), seed=st.integers(0, 2 ** 31))
def test_every_parameter_stays_in_its_range(n, zoom, sat, con, bri, blur, noise, shift, seed):
    cfg = AugmentConfig(rot90=True, flip=True, shift_px=shift, zoom=zoom, elastic_alpha=20.0, elastic_sigma=3.0,
                        hed_alpha=(0.9, 1.1), hed_beta=(-0.05, 0.05), saturation=sat, contrast=con,
                        brightness=bri, blur_sigma=(0.0, blur), noise_std=(0.0, noise))
    aug = Augment(cfg, patch=12)
    p = aug.sample(n, torch.Generator().manual_seed(seed))

    def inside(t, r):
        return bool(((t >= r[0]) & (t <= r[1])).all())

    assert inside(p.k, (0, 3)) and inside(p.zoom, zoom) and inside(p.shift, (-shift, shift))
    assert inside(p.saturation, sat) and inside(p.contrast, con) and inside(p.brightness, bri)
    assert inside(p.blur_sigma, (0, blur)) and inside(p.noise_std, (0, noise))
    assert inside(p.hed_alpha, (0.9, 1.1)) and inside(p.hed_beta, (-0.05, 0.05)) and inside(p.elastic, (-1, 1))
    x = torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    out = aug.apply(x, p)
    assert out.shape == (n, 3, 12, 12) and out.dtype == torch.float32
    assert float(out.min()) >= 0 and float(out.max()) <= 1 and torch.isfinite(out).all()


def _batch(n=5, side=20, seed=0):
    return torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("preset, side, patch", [("none", 20, 14), ("fastscannet", 50, 38),
                                                  ("tellez_rcsehbg", 128, 100)])
def test_an_empty_batch_and_the_callers_tensor(preset, side, patch):
    aug = Augment(preset, patch=patch)
    for dtype in (torch.uint8, torch.float32):
        assert aug(torch.zeros((0, 3, side, side), dtype=dtype)).shape == (0, 3, patch, patch)
    x = _batch(n=3, side=side).float() / 255
    before = x.clone()
    aug(x, torch.Generator().manual_seed(0))  # the steps work in place, on a tensor of their own
    assert torch.equal(x, before)


def test_the_hed_step_is_hed_augment():
    x = _batch()
    aug = Augment(AugmentConfig(hed_alpha=(0.95, 1.05), hed_beta=(-0.05, 0.05)), patch=20)
    p = aug.sample(5, torch.Generator().manual_seed(1))
    assert torch.equal(aug.apply(x, p), hed_augment(x, p.hed_alpha, p.hed_beta).float() / 255)


def test_rotation_and_mirror_are_exact_and_a_plain_crop_is_the_centre():
    x = _batch(side=20)
    assert torch.equal(Augment("none", patch=14)(x), x[..., 3:17, 3:17].float() / 255)
    aug = Augment(AugmentConfig(rot90=True, flip=True), patch=14)
    p = aug.sample(5, torch.Generator().manual_seed(2))
    out = aug.apply(x, p)
    for i in range(5):
        ref = torch.rot90(x[i, :, 3:17, 3:17], int(p.k[i]), dims=(1, 2))
        ref = ref.flip(2) if p.flip[i] else ref
        assert torch.equal(out[i], ref.float() / 255)


def test_turns_and_mirror_inside_the_warp_equal_the_exact_ones():
    x = _batch(side=20)
    exact = Augment(AugmentConfig(rot90=True, flip=True), patch=14)
    warp = Augment(AugmentConfig(rot90=True, flip=True, shift_px=2.0), patch=14)  # a warp, here with no shift
    p = exact.sample(5, torch.Generator().manual_seed(5))
    for k in range(4):
        q = p._replace(k=torch.full((5,), k), flip=torch.tensor([True, False, True, False, True]))
        # bilinear sampling at pixel centres; coordinates in float32 are off by ~20 * 2^-24 px
        torch.testing.assert_close(warp.apply(x, q), exact.apply(x, q), atol=1e-5, rtol=0)


def test_integer_shift_moves_the_crop_and_zoom_keeps_the_centre():
    x = _batch(side=24)
    aug = Augment(AugmentConfig(shift_px=3.0), patch=12)
    p = aug.sample(5, torch.Generator().manual_seed(0))
    p = p._replace(shift=torch.tensor([[2.0, -3.0]] * 5, dtype=torch.float64))
    # bilinear sampling at pixel centres; coordinates in float32 are off by ~24 * 2^-24 px
    expect = x[:, :, 6 - 3:18 - 3, 6 + 2:18 + 2].float() / 255
    torch.testing.assert_close(aug.apply(x, p), expect, atol=1e-5, rtol=0)
    zoom = Augment(AugmentConfig(zoom=(0.5, 2.0)), patch=11)
    odd = _batch(side=25)
    out = zoom.apply(odd, zoom.sample(5, torch.Generator().manual_seed(0)))
    # whatever the zoom, the output's centre samples the context's centre pixel
    torch.testing.assert_close(out[..., 5, 5], odd[..., 12, 12].float() / 255, atol=1e-5, rtol=0)


def test_colour_contrast_brightness_blur_noise_follow_their_definitions():
    x = _batch(side=12).float() / 255
    aug = Augment(AugmentConfig(saturation=(0.75, 1.5), contrast=(0.75, 1.5), brightness=(0.75, 1.25)), patch=12)
    p = aug.sample(5, torch.Generator().manual_seed(3))
    w = torch.tensor([0.299, 0.587, 0.114])[None, :, None, None]
    f = lambda t: t.float()[:, None, None, None]  # noqa: E731
    grey = (x * w).sum(1, keepdim=True)
    ref = (grey + f(p.saturation) * (x - grey)).clamp(0, 1)
    mean = (ref * w).sum(1, keepdim=True).mean((2, 3), keepdim=True)
    ref = (mean + f(p.contrast) * (ref - mean)).clamp(0, 1)
    ref = (ref * f(p.brightness)).clamp(0, 1)
    torch.testing.assert_close(aug.apply(x, p), ref, atol=1e-6, rtol=0)
    none = Augment(AugmentConfig(blur_sigma=(0.0, 2.0), noise_std=(0.0, 0.1)), patch=12)
    q = none.sample(5, torch.Generator().manual_seed(4))
    q = q._replace(blur_sigma=torch.zeros(5, dtype=torch.float64), noise_std=torch.zeros(5, dtype=torch.float64))
    torch.testing.assert_close(none.apply(x, q), x, atol=1e-6, rtol=0)  # sigma 0 and std 0: nothing changes
    q = q._replace(noise_std=torch.full((5,), 0.05, dtype=torch.float64))
    mid = torch.full((5, 3, 64, 64), 0.5)
    big = Augment(AugmentConfig(noise_std=(0.0, 0.1)), patch=64)
    qq = big.sample(5, torch.Generator().manual_seed(4))._replace(noise_std=torch.full((5,), 0.05, dtype=torch.float64))
    dev = (big.apply(mid, qq) - 0.5).std().item()
    # 61440 samples of N(0, 0.05): the sample std is within 2% of 0.05 (about 7 of its standard errors)
    assert abs(dev - 0.05) < 0.001, dev


# ----------------------------------------------------------------------------- fit and the CLI


@pytest.fixture(scope="module")
def demo_slides(tmp_path_factory):
    from pyfastscan.demo_train import build_training_slides

    return build_training_slides(str(tmp_path_factory.mktemp("demo")))


def _datasets(manifest, length=384):
    specs = read_manifest(manifest)
    train = PatchDataset(specs, 1.0, 38, context=48, split="train", length=length, seed=0)
    val = PatchDataset(specs, 1.0, 38, context=48, split="val", length=128, seed=1)
    return train, val


def test_fit_lowers_the_loss_and_resumes_to_the_same_state(demo_slides, tmp_path):
    train, val = _datasets(demo_slides)
    torch.manual_seed(0)
    before = evaluate(__import__("pyfastscan").models.create("demo_cnn"), val)["loss"]
    kw = dict(epochs=2, batch_size=32, lr=3e-3, augment="fastscannet", seed=0, log=None)
    full = fit("demo_cnn", train, val, out=str(tmp_path / "full"), **kw)
    assert full.history[-1]["val_loss"] < before and full.history[-1]["train_loss"] < full.history[0]["train_loss"]

    class Stop(Exception):
        pass

    def stop_after_first(line):
        if line.startswith("epoch 1/"):
            raise Stop

    with pytest.raises(Stop):
        fit("demo_cnn", train, val, out=str(tmp_path / "cut"), **dict(kw, log=stop_after_first))
    resumed = fit("demo_cnn", train, val, out=str(tmp_path / "cut"), resume=True, **kw)
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    timeless = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert timeless(resumed.history) == timeless(full.history) and len(full.history) == 2
    lines = open(tmp_path / "full" / "metrics.csv").read().splitlines()
    assert lines[0].startswith("epoch,train_loss,val_loss") and len(lines) == 3
    from PIL import Image

    assert Image.open(tmp_path / "full" / "learning_curve.png").size == (720, 480)
    with pytest.raises(__import__("pyfastscan").InvalidArgumentError, match="another run"):
        fit("demo_cnn", train, val, out=str(tmp_path / "full"), resume=True, **dict(kw, lr=1e-2))


def test_train_cli_with_a_mining_round_and_its_weights_scan(demo_slides, tmp_path):
    from pyfastscan.cli import main

    out = tmp_path / "run"
    rc = main(["train", "--manifest", demo_slides, "--out", str(out), "--arch", "demo_cnn", "--epochs", "1",
               "--epoch-patches", "256", "--val-patches", "128", "--batch-size", "32", "--mine-rounds", "1",
               "--hard-share", "0.3"])
    assert rc == 0
    report = json.load(open(out / "training.json"))
    r = report["rounds"][0]
    assert r["found"] >= 0 and 0 <= r["fp_before"] <= 1 and 0 <= r["fp_after"] <= 1
    for f in ("stage1/model.safetensors", "stage1/metrics.csv", "stage1/learning_curve.png", "model.safetensors"):
        assert (out / f).is_file(), f
    from pyfastscan.models import read_card

    card = read_card(out / "model.safetensors")
    assert (card.arch, card.mpp, card.classes, card.positive_class) == ("demo_cnn", 1.0, ("negative", "positive"), 1)
    slide = read_manifest(demo_slides)[1].slide
    assert main(["scan", slide, "--weights", str(out / "model.safetensors"), "--out", str(tmp_path / "scan"),
                 "--quiet"]) == 0
    rep = json.load(open(tmp_path / "scan" / "report.json"))
    assert rep["model"]["arch"] == "demo_cnn" and rep["model"]["trained_mpp"] == 1.0
    assert main(["mine", "--manifest", demo_slides, "--weights", str(out / "model.safetensors"),
                 "--out", str(tmp_path / "mined")]) == 0
    mined = read_manifest(tmp_path / "mined" / "manifest.json")
    assert mined[0].negatives and os.path.isfile(mined[0].negatives[0]) and not mined[1].negatives


# ----------------------------------------------------------------------------- mining


def _red_detector(t, a=1000.0) -> nn.Sequential:
    """Padding-free (an 8 px conv, stride 4), float64: logit(positive) = a * (mean red - t)."""
    conv = nn.Conv2d(3, 2, 8, stride=4).double()
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[1, 0] = a / 64
        conv.bias.copy_(torch.tensor([0.0, -a * t]))
    return nn.Sequential(conv)


def test_mining_finds_exactly_the_planted_false_positives(tmp_path):
    img = np.zeros((256, 256, 3), np.uint8)
    img[...] = (200, 150, 180)
    planted = [(40, 40, 20), (180, 60, 12), (60, 190, 16)]  # x, y, side: red squares, not annotated
    for x, y, s in planted:
        img[y:y + s, x:x + s] = (255, 60, 60)
    img[150:200, 150:200] = (255, 60, 60)  # the annotated positive
    write_pyramid_tif(str(tmp_path / "s.tif"), img, MPP, levels=1, compression="zlib")
    write_geojson(str(tmp_path / "s.geojson"), [Annotation("polygon", [[150, 150], [200, 150], [200, 200],
                                                                        [150, 200]], "tumor")])
    spec = SlideSpec(str(tmp_path / "s.tif"), annotations=(str(tmp_path / "s.geojson"),),
                     tissue=_tissue_png(str(tmp_path / "t.png"), (64, 64)))
    # mean red of an 8 x 8 patch: (200 (64 - k) + 255 k) / 64 / 255 for k red pixels; the
    # threshold sits between k = 40 and 41, far from every attainable value
    t = (200 * (64 - 40.5) + 255 * 40.5) / 64 / 255
    model = _red_detector(t)
    margin = 10.0
    mined = mine_slide(model, spec, mpp=MPP, threshold=0.5, margin_um=margin, grid_um=4.0)
    # the definition: every 8 px patch at stride 4, by a loop, on tissue and outside the margin
    x = torch.from_numpy(img).permute(2, 0, 1)[None].double() / 255
    expect = set()
    for i in range(0, 256 - 8 + 1, 4):
        for j in range(0, 256 - 8 + 1, 4):
            p = torch.softmax(model(x[..., i:i + 8, j:j + 8]), 1)[0, 1, 0, 0].item()
            cx, cy = j + 4.0, i + 4.0
            # the label grid (4 px cells) excludes a cell some point of which is within the margin
            gx, gy = (cx // 4) * 4 + 2, (cy // 4) * 4 + 2  # its cell's centre
            cell_dist = _cell_rect_distance(gx, gy, 4.0, (150, 150, 200, 200))
            if p > 0.5 and cell_dist >= margin + 4.0 * math.sqrt(2):
                expect.add((cx, cy))
    got = {tuple(v) for v in mined.xy.tolist()}
    assert got == expect and len(got) > 0
    for x0, y0, s in planted:  # every planted square is found, and nothing else
        assert any(x0 - 4 <= cx <= x0 + s + 4 and y0 - 4 <= cy <= y0 + s + 4 for cx, cy in got)
    assert all(any(x0 - 4 <= cx <= x0 + s + 4 and y0 - 4 <= cy <= y0 + s + 4 for x0, y0, s in planted)
               for cx, cy in got)
    assert mined.false_positives == len(got) and 0 < mined.fp_share < 1
    assert list(mined.probability) == sorted(mined.probability, reverse=True)


def _cell_rect_distance(gx, gy, d, rect):
    """Distance between the centre of grid cell (gx, gy) and the nearest positive cell
    centre (the EDT the dataset uses), for a rectangle on cell edges."""
    x0, y0, x1, y1 = rect
    nx = min(max(gx, x0 + d / 2), x1 - d / 2)
    ny = min(max(gy, y0 + d / 2), y1 - d / 2)
    return math.hypot(gx - nx, gy - ny)


def _textured(rng, shape, base, amp=25):
    return np.clip(np.asarray(base, np.int16) + rng.integers(-amp, amp + 1, (*shape, 3)), 0, 255).astype(np.uint8)


def _mining_slide(folder, name, rng, split):
    """Pink tissue; two blue positive squares (annotated); lookalikes: blue squares crossed
    by pink stripes, 3% of the tissue (rare in the first stage's negatives)."""
    img = _textured(rng, (320, 320), (225, 170, 200))
    boxes = [(30, 30), (200, 220)]
    for x, y in boxes:
        img[y:y + 60, x:x + 60] = _textured(rng, (60, 60), (70, 70, 190))
    for x, y in [(200, 40), (60, 220)]:
        tile = _textured(rng, (48, 48), (70, 70, 190))
        tile[::6] = _textured(rng, (8, 48), (225, 170, 200))
        tile[1::6] = tile[::6]
        img[y:y + 48, x:x + 48] = tile
    path = os.path.join(folder, name + ".tif")
    write_pyramid_tif(path, img, MPP, levels=1, compression="zlib")
    write_geojson(os.path.join(folder, name + ".geojson"),
                  [Annotation("polygon", [[x, y], [x + 60, y], [x + 60, y + 60], [x, y + 60]], "tumor")
                   for x, y in boxes])
    return SlideSpec(path, annotations=(os.path.join(folder, name + ".geojson"),), split=split,
                     tissue=_tissue_png(os.path.join(folder, name + "_t.png"), (80, 80)))


def test_a_mining_round_lowers_the_held_out_false_positive_share(tmp_path):
    rng = np.random.default_rng(0)
    specs = [_mining_slide(str(tmp_path), "a", rng, "train"), _mining_slide(str(tmp_path), "b", rng, "val")]
    train = PatchDataset(specs, MPP, 38, context=38, split="train", length=640, seed=0, margin_um=8)
    val = PatchDataset(specs, MPP, 38, context=38, split="val", length=128, seed=1, margin_um=8)
    torch.manual_seed(0)
    report = train_rounds("demo_cnn", train, val, out=str(tmp_path / "run"), mine_rounds=1, mine_epochs=2,
                          hard_share=0.5, val_specs=[specs[1]], epochs=1, batch_size=32, lr=3e-3,
                          augment="none", seed=0, log=None)
    r = report["rounds"][0]
    assert r["found"] > 0
    # lookalikes are 2 x 48^2 px of the 320^2 px of tissue (4.5%): the first stage calls at
    # least about half of them carcinoma (the pink tissue it has seen it does not)
    assert r["fp_before"] >= 0.02, r
    assert r["fp_after"] <= 0.5 * r["fp_before"], r  # the round at least halves it
