"""Training a patch classifier from a :class:`~pyfastscan.train.PatchDataset` (issue 18).

    result = fit("demo_cnn", train_ds, val_ds, epochs=5, batch_size=64, out="run/")
    result.weights        # run/model.safetensors: pyfastscan scan --weights takes it as it is

Every epoch: ``len(train) // batch_size`` steps of Adam (``lr``, the schedule ``schedule``)
on augmented batches (:class:`~pyfastscan.train.Augment`, on ``device``), then the
validation patches (the same draws every epoch, no augmentation but the centre crop): loss,
accuracy, F1 at ``threshold`` and ROC AUC. The epoch with the best ``select`` metric (F1 or
AUC; ties: the earlier) is the model written, with its card (architecture, classes,
training resolution, normalisation; DESIGN.md 6.3). Written atomically into ``out``:

- ``checkpoint.pt``: model, optimiser, schedule, the best state and the history, after
  every epoch; ``resume=True`` continues from it to the same state a run without the
  interruption reaches (the draws and the augmentation of epoch e depend on (seed, e) only).
- ``metrics.csv``: one row per epoch. ``learning_curve.png``: the losses and the metrics.
- ``model.safetensors``: the selected model.

Schedules (``SCHEDULES``): "cosine" (cosine annealing to 0 over all steps), "step" (x 0.1
at 2/3 of the steps), "constant". The papers train with their own optimiser settings
(Fast ScanNet and Tellez et al.); this package does not claim to reproduce them: Adam with
a cosine schedule is the default, the others are there to choose.
"""
import csv
import io as _io
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidArgumentError
from ..validate import Number, check
from .augment import Augment

SCHEDULES = ("cosine", "step", "constant")
SELECT = ("f1", "auc", "loss")
COLUMNS = ("epoch", "train_loss", "val_loss", "val_accuracy", "val_f1", "val_auc", "lr", "seconds")


@dataclass
class FitResult:
    """What :func:`fit` produced: the selected model (eval mode), its epoch and metric,
    one metrics row per epoch, and the files written (None without ``out``)."""

    model: nn.Module
    best_epoch: int
    best_metric: float
    history: List[Dict[str, float]]
    weights: Optional[str] = None
    checkpoint: Optional[str] = None
    files: Dict[str, str] = field(default_factory=dict)


def binary_metrics(labels: np.ndarray, prob: np.ndarray, threshold: float = 0.5) -> Dict[str, float]:
    """Accuracy, F1 (positive class, at ``threshold``) and ROC AUC (nan without both classes)."""
    from ..eval.classification import roc_auc

    y = np.asarray(labels).astype(bool)
    pred = np.asarray(prob) > threshold
    tp, fp, fn = int((pred & y).sum()), int((pred & ~y).sum()), int((~pred & y).sum())
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")
    auc = roc_auc(y.astype(int), prob) if y.any() and (~y).any() else float("nan")
    return dict(accuracy=float((pred == y).mean()) if len(y) else float("nan"), f1=float(f1), auc=float(auc))


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(N, C): a padding-free model's output cells averaged (one cell at its own patch size)."""
    out = model(x)
    return out.flatten(2).mean(2) if out.dim() > 2 else out


def _target(y: torch.Tensor, positive_class: int) -> torch.Tensor:
    """Class indices of a two-class model whose ``positive_class`` is the label-1 class."""
    return torch.where(y == 1, positive_class, 1 - positive_class).long()


def _normalized(x: torch.Tensor, normalize) -> torch.Tensor:
    if normalize is None:
        return x
    mean = torch.tensor(normalize[0], device=x.device, dtype=x.dtype)[None, :, None, None]
    std = torch.tensor(normalize[1], device=x.device, dtype=x.dtype)[None, :, None, None]
    return (x - mean) / std


def evaluate(model: nn.Module, dataset, *, batch_size: int = 128, device="cpu", normalize=None,
             positive_class: int = 1, workers: int = 0, threshold: float = 0.5) -> Dict[str, float]:
    """Loss, accuracy, F1 and AUC of ``model`` on every draw of ``dataset`` (its current epoch),
    the centre ``patch`` of each context, no augmentation."""
    crop = Augment("none", patch=dataset.patch)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    was = model.training
    model.eval()
    probs, labels, loss, n = [], [], 0.0, 0
    with torch.no_grad():
        for x, y in loader:
            x = _normalized(crop(x.to(device)), normalize)
            logits = _logits(model, x)
            y = y.to(device)
            loss += float(F.cross_entropy(logits, _target(y, positive_class), reduction="sum"))
            n += len(y)
            probs.append(torch.softmax(logits.double(), 1)[:, positive_class].cpu().numpy())
            labels.append(y.cpu().numpy())
    model.train(was)
    p, y = np.concatenate(probs), np.concatenate(labels)
    return dict(loss=loss / max(n, 1), **binary_metrics(y == 1, p, threshold))


def _schedule(opt, name: str, total: int):
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(total, 1))
    if name == "step":
        return torch.optim.lr_scheduler.StepLR(opt, max(1, (2 * total) // 3), gamma=0.1)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def _metrics_csv(history: Sequence[Dict[str, float]]) -> str:
    buf = _io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for r in history:
        w.writerow([r.get(c, "") if not isinstance(r.get(c), float) else f"{r[c]:.6g}" for c in COLUMNS])
    return buf.getvalue()


def _save_checkpoint(path: str, state: dict) -> None:
    from ..io.files import atomic_write

    atomic_write(path, lambda tmp: torch.save(state, tmp))


def fit(arch: str, train, val=None, *, arch_kwargs: Optional[dict] = None, model: Optional[nn.Module] = None,
        epochs: int = 10, batch_size: int = 64, lr: float = 1e-3, weight_decay: float = 0.0,
        schedule: str = "cosine", augment: Union[str, Augment] = "fastscannet", select: str = "f1",
        out: Optional[str] = None, resume: bool = False, device="cpu", workers: int = 0, seed: int = 0,
        classes: Sequence[str] = ("negative", "positive"), positive_class: int = 1, normalize=None,
        threshold: float = 0.5, extra: Optional[Dict[str, str]] = None,
        log: Optional[Callable[[str], None]] = print) -> FitResult:
    """Train ``arch`` (a registry name; ``model`` to start from given weights, e.g. for
    fine-tuning after hard negative mining) on ``train`` and select by ``val``.

    Args:
        arch, arch_kwargs: the architecture (``pyfastscan.models.create``); the weights file
            names it.
        train, val: :class:`~pyfastscan.train.PatchDataset` (val may be None: the last
            epoch is selected).
        epochs, batch_size, lr, weight_decay, schedule: Adam and its schedule (SCHEDULES).
        augment: a preset name or an :class:`Augment` (its patch is the dataset's).
        select: "f1", "auc" (higher is better) or "loss" (validation loss, lower).
        out: folder for the checkpoint, metrics and weights (module docstring); None keeps
            everything in memory.
        resume: continue from ``out``/checkpoint.pt (refused if it is another run's).
        device, workers: where the model and the augmentation run; DataLoader processes.
        seed: draws (the datasets'), augmentation and initialisation.
        classes, positive_class, normalize: written to the weights' card.
        threshold: the probability above which a patch counts as positive for F1.
        extra: other metadata for the weights file.
        log: a line per epoch (None: quiet).
    Returns:
        :class:`FitResult`.
    """
    from ..models import create, save_model

    epochs = check("epochs", epochs, Number(integer=True, lo=1, hi=1e6))
    batch_size = check("batch_size", batch_size)
    lr = check("lr", lr, Number(lo=0, lo_open=True, hi=10))
    check("weight_decay", weight_decay, Number(lo=0, hi=10))
    check("threshold", threshold)
    if positive_class not in (0, 1):
        raise InvalidArgumentError(f"positive_class must be 0 or 1 (two-class models), got {positive_class!r}")
    if schedule not in SCHEDULES:
        raise InvalidArgumentError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if select not in SELECT:
        raise InvalidArgumentError(f"select must be one of {SELECT}, got {select!r}")
    steps = len(train) // batch_size
    if steps < 1:
        raise InvalidArgumentError(f"the training set draws {len(train)} patches per epoch, fewer than one batch of "
                                   f"{batch_size}: give it a larger length or a smaller batch")
    aug = augment if isinstance(augment, Augment) else Augment(augment, patch=train.patch)
    aug.patch = train.patch
    arch_kwargs = dict(arch_kwargs or {})
    torch.manual_seed(seed)
    if model is None:
        model = create(arch, **arch_kwargs)
    model = model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = _schedule(opt, schedule, steps * epochs)
    run_key = dict(arch=arch, arch_kwargs=arch_kwargs, epochs=epochs, batch_size=batch_size, lr=lr,
                   schedule=schedule, seed=seed, steps=steps, select=select, mpp=train.mpp, patch=train.patch)
    history: List[Dict[str, float]] = []
    best = (None, -1, None)  # (metric, epoch, state)
    start = 0
    ckpt = weights = None
    files: Dict[str, str] = {}
    if out is not None:
        os.makedirs(out, exist_ok=True)
        ckpt = os.path.join(out, "checkpoint.pt")
    if resume:
        if ckpt is None or not os.path.isfile(ckpt):
            raise InvalidArgumentError(f"resume needs a checkpoint: {ckpt or '(no out folder)'} does not exist")
        state = torch.load(ckpt, map_location=device, weights_only=True)
        if state.get("key") != run_key:
            raise InvalidArgumentError(f"{ckpt} is from another run ({state.get('key')}), not this one ({run_key}); "
                                       "use another --out or the same options")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        history, start = list(state["history"]), int(state["epoch"])
        best = (state["best_metric"], int(state["best_epoch"]), state["best_state"])
        if log:
            log(f"resuming from {ckpt} after epoch {start}")
    sign = -1.0 if select == "loss" else 1.0
    for epoch in range(start, epochs):
        t0 = time.perf_counter()
        train.set_epoch(epoch)
        torch.manual_seed(seed * 100_003 + epoch)  # dropout and the like: the same in a resumed run
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
        loader = torch.utils.data.DataLoader(train, batch_size=batch_size, num_workers=workers, drop_last=True)
        total, n = 0.0, 0
        for x, y in loader:
            x = _normalized(aug(x.to(device), gen), normalize)
            y = y.to(device)
            loss = F.cross_entropy(_logits(model, x), _target(y, positive_class))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(y)
            n += len(y)
        row = dict(epoch=epoch + 1, train_loss=total / max(n, 1), lr=opt.param_groups[0]["lr"])
        if val is not None:
            val.set_epoch(0)
            m = evaluate(model, val, batch_size=max(batch_size, 64), device=device, normalize=normalize,
                         positive_class=positive_class, workers=workers, threshold=threshold)
            row.update(val_loss=m["loss"], val_accuracy=m["accuracy"], val_f1=m["f1"], val_auc=m["auc"])
            metric = m[select]
        else:
            metric = -row["train_loss"] if select == "loss" else float(epoch)
        row["seconds"] = time.perf_counter() - t0
        history.append(row)
        score = sign * metric if val is not None else metric
        if best[0] is None or (math.isfinite(score) and (not math.isfinite(best[0]) or score > best[0])):
            best = (score, epoch + 1, {k: v.detach().clone() for k, v in model.state_dict().items()})
        if out is not None:
            from ..io.files import write_text
            from .plot import write_learning_curve

            _save_checkpoint(ckpt, dict(key=run_key, epoch=epoch + 1, model=model.state_dict(),
                                        optimizer=opt.state_dict(), scheduler=sched.state_dict(), history=history,
                                        best_metric=best[0], best_epoch=best[1], best_state=best[2]))
            files["metrics"] = write_text(os.path.join(out, "metrics.csv"), _metrics_csv(history))
            files["learning_curve"] = write_learning_curve(os.path.join(out, "learning_curve.png"), history)
        if log:  # after the checkpoint: an interruption here loses nothing
            vals = "".join(f", {k} {row[k]:.4f}" for k in ("val_loss", "val_f1", "val_auc") if k in row)
            log(f"epoch {epoch + 1}/{epochs}: train loss {row['train_loss']:.4f}{vals} ({row['seconds']:.1f} s)")
    model.load_state_dict(best[2])
    model.eval()
    best_metric = sign * best[0] if val is not None else float("nan")
    if out is not None:
        note = {"trained_by": "pyfastscan train", "selected_epoch": str(best[1]),
                "selected_by": f"val_{select}" if val is not None else "last epoch",
                "augment": str(aug.config), **(extra or {})}
        weights = os.path.join(out, "model.safetensors")
        save_model(model, weights, arch=arch, arch_kwargs=arch_kwargs, classes=list(classes),
                   positive_class=positive_class, mpp=train.mpp, normalize=normalize, extra=note)
        files["weights"] = weights
    return FitResult(model, best[1], best_metric, history, weights, ckpt, files)
