"""Hard negative mining by dense scanning (Fast ScanNet's second training stage, issue 18).

    mined = mine_slide(model, spec, mpp=1.0, threshold=0.5)     # one slide: its false positives
    files, results = mine(model, specs, "round1/", mpp=1.0)     # every slide, one CSV each

A slide is scanned with the current model (:func:`pyfastscan.scan_slide`, dense: seconds
where a patch loop takes hours); every map cell on tissue whose patch centre lies outside
the positive annotations by the margin (the same label grid and margin as
:class:`~pyfastscan.train.PatchDataset`, so a mined negative is never a training
positive) and whose probability exceeds ``threshold`` is a hard negative, at its patch
centre, with its probability. The false-positive share of a slide is those cells over all
such negative cells on tissue.

:func:`train_rounds` is ``pyfastscan train --mine-rounds N``: train, then N times: scan the
training slides, add their false positives to the negative pool with ``hard_share`` of
every batch, fine-tune; each round reports how many negatives it found and the
false-positive share of the validation slides before and after.
"""
import os
import shutil
import time
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from torch import nn

from ..validate import Number, check
from .dataset import SlideSpec, slide_labels


_COUNT = Number(integer=True, lo=0)


@dataclass
class Mined:
    """One slide's hard negatives (level-0 patch centres, probabilities, hardest first) and
    its false-positive count over the negative cells on tissue."""

    slide: str
    xy: np.ndarray
    probability: np.ndarray
    negative_cells: int
    false_positives: int
    seconds: float
    positive_cells: int = 0  # map cells whose centre is in a positive region
    true_positives: int = 0  # of those, above the threshold

    @property
    def fp_share(self) -> float:
        return self.false_positives / self.negative_cells if self.negative_cells else float("nan")

    @property
    def sensitivity(self) -> float:
        return self.true_positives / self.positive_cells if self.positive_cells else float("nan")


def mine_slide(model: nn.Module, spec: SlideSpec, *, mpp: float, threshold: float = 0.5, margin_um: float = 16.0,
               grid_um: float = 8.0, alpha: int = 1, device="cpu", max_negatives: Optional[int] = None,
               positive_class: Optional[int] = None, normalize=None, progress: bool = False) -> Mined:
    """Scan ``spec.slide`` with ``model`` at ``mpp`` and return the cells above ``threshold``
    that lie on tissue and outside the positives by ``margin_um`` (see the module
    docstring). ``max_negatives`` keeps the most probable ones (default: all)."""
    from ..pipeline.scan import scan_slide
    from ..slide import open_slide

    check("threshold", threshold)
    t0 = time.perf_counter()
    s = open_slide(spec.slide, default_mpp=spec.slide_mpp)
    try:
        # the positives and the tissue only: candidate negatives play no part in mining
        labels = slide_labels(replace(spec, candidates=False), s, grid_um=grid_um, margin_um=margin_um)
        tissue_mask = None
        if spec.tissue:
            from PIL import Image

            with Image.open(spec.tissue) as im:
                tissue_mask = np.asarray(im)
        res = scan_slide(s, model, alpha=alpha, scan_mpp=mpp, device=device, tissue_mask=tissue_mask,
                         positive_class=positive_class, normalize=normalize, progress=progress, threshold=threshold)
    finally:
        s.close()
    heat = res.heatmap
    cx = res.origin_px[0] + np.arange(heat.shape[1]) * res.stride_px
    cy = res.origin_px[1] + np.arange(heat.shape[0]) * res.stride_px
    r, _ = labels.cell_of(np.zeros_like(cy), cy)
    _, c = labels.cell_of(cx, np.zeros_like(cx))
    negative = labels.tissue[r[:, None], c[None, :]]  # tissue, outside the positives by the margin
    positive = labels.positive[r[:, None], c[None, :]]
    hot = negative & (heat > threshold)
    ii, jj = np.nonzero(hot)
    prob = heat[ii, jj].astype(np.float64)
    order = np.lexsort((jj, ii, -prob))  # hardest first, then raster order
    if max_negatives is not None:
        order = order[:check("max_negatives", max_negatives, _COUNT)]
    xy = np.stack([cx[jj[order]], cy[ii[order]]], axis=1).reshape(-1, 2)
    return Mined(spec.slide, xy, prob[order], int(negative.sum()), int(hot.sum()), time.perf_counter() - t0,
                 int(positive.sum()), int((positive & (heat > threshold)).sum()))


def write_negatives(path: str, mined: Mined) -> str:
    """``x,y,probability`` CSV (level-0 pixels), the format the dataset's ``negatives`` read."""
    from ..io.files import write_text

    lines = ["x,y,probability"] + [f"{x!r},{y!r},{p!r}" for (x, y), p in zip(mined.xy.tolist(),
                                                                            mined.probability.tolist())]
    return write_text(path, "\n".join(lines) + "\n")


def mine(model: nn.Module, specs: Sequence[SlideSpec], out: str, *, log: Optional[Callable[[str], None]] = print,
         **kwargs) -> Tuple[Dict[str, str], List[Mined]]:
    """:func:`mine_slide` on every slide of ``specs``; each slide's negatives go to
    ``out``/NAME.negatives.csv. Returns (slide -> CSV path, the Mined results)."""
    os.makedirs(out, exist_ok=True)
    files, results = {}, []
    used = set()
    for spec in specs:
        m = mine_slide(model, spec, **kwargs)
        name = os.path.splitext(os.path.basename(spec.slide))[0]
        while name in used:
            name += "_"
        used.add(name)
        files[spec.slide] = write_negatives(os.path.join(out, f"{name}.negatives.csv"), m)
        results.append(m)
        if log:
            log(f"  mined {os.path.basename(spec.slide)}: {len(m.xy)} hard negatives ({m.fp_share:.2%} of "
                f"{m.negative_cells} negative cells above {kwargs.get('threshold', 0.5)}) in {m.seconds:.1f} s")
    return files, results


def fp_share(results: Sequence[Mined]) -> float:
    """False-positive share pooled over slides: all their false positives over all their
    negative cells."""
    neg = sum(m.negative_cells for m in results)
    return sum(m.false_positives for m in results) / neg if neg else float("nan")


def sensitivity(results: Sequence[Mined]) -> float:
    """Share of the positive regions' map cells above the threshold, pooled over slides."""
    pos = sum(m.positive_cells for m in results)
    return sum(m.true_positives for m in results) / pos if pos else float("nan")


def validation_fp(model, specs: Sequence[SlideSpec], **kwargs) -> Tuple[float, float]:
    """(pooled false-positive share, pooled sensitivity) of ``model`` on ``specs`` (nan
    without slides)."""
    if not specs:
        return float("nan"), float("nan")
    results = [mine_slide(model, s, **kwargs) for s in specs]
    return fp_share(results), sensitivity(results)


def train_rounds(arch: str, train_ds, val_ds, *, out: str, mine_rounds: int = 1, mine_epochs: int = 1,
                 hard_share: float = 0.25, mine_lr: Optional[float] = None, threshold: float = 0.5,
                 alpha: int = 1, val_specs: Sequence[SlideSpec] = (), max_negatives: Optional[int] = 10_000,
                 resume: bool = False, log: Optional[Callable[[str], None]] = print, **fit_kwargs) -> dict:
    """Stage 1 (:func:`~pyfastscan.train.fit` into ``out``/stage1), then ``mine_rounds``
    rounds of mining and fine-tuning (``out``/roundK: the negatives, the fine-tuned model);
    the final model is copied to ``out``/model.safetensors. Returns the report (also written
    to ``out``/training.json): per round the negatives found and the validation slides'
    false-positive share before and after."""
    from ..io.files import write_json
    from .fit import fit

    check("mine_rounds", mine_rounds, _COUNT)
    check("hard_share", hard_share, Number(lo=0, hi=1, lo_open=True, hi_open=True))
    os.makedirs(out, exist_ok=True)
    mine_kw = dict(mpp=train_ds.mpp, threshold=threshold, margin_um=train_ds.margin_um, grid_um=train_ds.grid_um,
                   alpha=alpha, device=fit_kwargs.get("device", "cpu"),
                   positive_class=fit_kwargs.get("positive_class", 1), normalize=fit_kwargs.get("normalize"))
    if log:
        log(f"stage 1: {train_ds.summary()}")
    res = fit(arch, train_ds, val_ds, out=os.path.join(out, "stage1"), resume=resume, log=log, **fit_kwargs)
    report = dict(stage1=dict(best_epoch=res.best_epoch, best_metric=res.best_metric, weights=res.weights),
                  rounds=[])
    model, weights = res.model, res.weights
    base_share = {k: v for k, v in train_ds.shares.items() if k != "hard"}
    if mine_rounds:  # each round's "before" is the model the previous round left: scanned once
        before, sens_before = validation_fp(model, val_specs, **mine_kw)
    for k in range(1, mine_rounds + 1):
        folder = os.path.join(out, f"round{k}")
        t0 = time.perf_counter()
        files, mined = mine(model, train_ds.specs, os.path.join(folder, "negatives"), log=log,
                            max_negatives=max_negatives, **mine_kw)
        found = sum(len(m.xy) for m in mined)
        t_mine = time.perf_counter() - t0
        if found == 0:
            if log:
                log(f"round {k}: no false positives on the training slides: nothing to fine-tune on")
            report["rounds"].append(dict(round=k, found=0, fp_before=before, fp_after=before,
                                         sensitivity_before=sens_before, sensitivity_after=sens_before,
                                         seconds_mining=t_mine))
            continue
        total = sum(base_share.values())
        shares = {p: v / total * (1 - hard_share) for p, v in base_share.items()}
        shares["hard"] = hard_share
        ds = train_ds.with_negatives(files, shares)
        kw = dict(fit_kwargs, epochs=mine_epochs)
        if mine_lr is not None:
            kw["lr"] = mine_lr
        res = fit(arch, ds, val_ds, model=model, out=folder, resume=resume and os.path.exists(
            os.path.join(folder, "checkpoint.pt")), log=log, **kw)
        model, weights = res.model, res.weights
        after, sens_after = validation_fp(model, val_specs, **mine_kw)
        report["rounds"].append(dict(round=k, found=found, fp_before=before, fp_after=after,
                                     sensitivity_before=sens_before, sensitivity_after=sens_after,
                                     seconds_mining=t_mine, weights=weights))
        if log:
            log(f"round {k}: {found} hard negatives; on the validation slides, false-positive share "
                f"{before:.2%} -> {after:.2%}, positive cells found {sens_before:.2%} -> {sens_after:.2%}")
        before, sens_before = after, sens_after
    final = os.path.join(out, "model.safetensors")
    if weights and os.path.abspath(weights) != os.path.abspath(final):
        from ..io.files import atomic_write

        atomic_write(final, lambda tmp: shutil.copyfile(weights, tmp))
    report["weights"] = final
    write_json(os.path.join(out, "training.json"), report, indent=2)
    return report
