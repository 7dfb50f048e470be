"""`pyfastscan train` and `pyfastscan mine`. Each returns the exit status (0 done, 2 bad
input, reported on stderr in one line)."""
import math
import os
import sys

from ..clihelp import add_command, parse_arch_kwargs
from ..validate import Number, cli_type

_INT1 = Number(integer=True, lo=1, hi=1 << 30)
_INT0 = Number(integer=True, lo=0, hi=1 << 30)
_NONNEG = Number(lo=0, hi=1e6)
_POS = Number(lo=0, lo_open=True, hi=1e6)


def _shares(text: str) -> dict:
    import argparse

    out = {}
    for part in text.split(","):
        k, sep, v = part.partition("=")
        try:
            out[k.strip()] = float(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected pool=share pairs like positive=0.5,negative=0.5, got "
                                             f"{text!r}") from None
        if not sep:
            raise argparse.ArgumentTypeError(f"expected pool=share pairs, got {text!r}")
    return out


def _common(p) -> None:
    p.add_argument("--manifest", required=True,
                   help="CSV or JSON list of slides with their annotations and split (train / val), see "
                        "pyfastscan.train.read_manifest")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--grid-um", type=cli_type("grid_um", _POS), default=8.0,
                   help="label-grid cell side in um (default 8)")
    p.add_argument("--margin-um", type=cli_type("margin_um", _NONNEG), default=None,
                   help="negatives keep this far from the positives, um (default half a patch)")
    p.add_argument("--alpha", type=cli_type("alpha"), default=1,
                   help="dense factor of the mining scans (default 1: one cell per stride)")
    p.add_argument("--device", default="cpu", help="torch device to train / scan on: cpu, cuda, ...")
    p.add_argument("--threads", type=cli_type("threads"), default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--max-negatives", type=cli_type("max_negatives", _INT0), default=10_000,
                   help="most hard negatives kept per slide and round, the most probable (default 10000)")


def add_parsers(sub) -> None:
    done = "exit status: 0 done, 2 bad input (said on stderr)"
    t = add_command(sub, "train", help="train a padding-free patch classifier on annotated slides, with hard "
                                       "negative mining rounds", exit_codes=done, examples=[
                        "pyfastscan train --manifest slides.csv --arch tellez_cnn --mpp 0.25 --augment tellez_rcsehbg "
                        "--out run",
                        "pyfastscan train --manifest slides.csv --arch vgg16_fcn --mine-rounds 2 --out run  "
                        "# Fast ScanNet's two stages",
                        "pyfastscan train --manifest slides.csv --arch demo_cnn --out run --resume  # after a crash"])
    _common(t)
    t.add_argument("--arch", required=True, help="architecture (registry name, see `pyfastscan models`)")
    t.add_argument("--arch-kwargs", default=None, metavar="JSON", help='architecture arguments, e.g. \'{"gamma": 0.6}\'')
    t.add_argument("--mpp", type=cli_type("mpp"), default=None,
                   help="training resolution, um/px (default: the architecture's registered one)")
    t.add_argument("--patch", type=cli_type("patch"), default=None,
                   help="model input side in px (default: the network's patch)")
    t.add_argument("--context", type=cli_type("patch"), default=None,
                   help="side read around each centre before augmentation (default: patch + 28%% when the "
                        "augmentation warps, as Tellez's 128 -> 100 px, else patch)")
    t.add_argument("--epochs", type=cli_type("epochs", _INT1), default=10, help="epochs (default 10)")
    t.add_argument("--epoch-patches", type=cli_type("epoch_patches", _INT1), default=6400,
                   help="patches drawn per epoch (default 6400)")
    t.add_argument("--val-patches", type=cli_type("val_patches", _INT1), default=1024,
                   help="validation patches from the val slides, the same every epoch (default 1024)")
    t.add_argument("--batch-size", type=cli_type("batch_size"), default=64, help="batch size (default 64)")
    t.add_argument("--lr", type=cli_type("lr", _POS), default=1e-3, help="Adam learning rate (default 1e-3)")
    t.add_argument("--weight-decay", type=cli_type("weight_decay", _NONNEG), default=0.0, help="Adam weight decay")
    t.add_argument("--schedule", choices=("cosine", "step", "constant"), default="cosine",
                   help="learning-rate schedule over all steps of a stage (default cosine)")
    t.add_argument("--augment", choices=("fastscannet", "tellez_rcsehbg", "none"), default="fastscannet",
                   help="augmentation preset (default fastscannet; see pyfastscan.train.augment)")
    t.add_argument("--select", choices=("f1", "auc", "loss"), default="f1",
                   help="the epoch kept: best validation F1, AUC or loss (default f1)")
    t.add_argument("--threshold", type=cli_type("threshold"), default=0.5,
                   help="probability a patch needs to count positive (F1) and a cell to be a false positive "
                        "(mining) (default 0.5)")
    t.add_argument("--shares", type=_shares, default={"positive": 0.5, "negative": 0.5},
                   help="pool shares of each batch, e.g. positive=0.5,negative=0.3,hard=0.2 (default "
                        "positive=0.5,negative=0.5)")
    t.add_argument("--jitter-um", type=cli_type("jitter_um", _NONNEG), default=None,
                   help="shift of point-centred patches, um per axis (default a quarter patch)")
    t.add_argument("--positive-inset-um", type=cli_type("positive_inset_um", _NONNEG), default=0.0,
                   help="positive patches are centred at least this deep inside their region, um (default 0)")
    t.add_argument("--classes", default="negative,positive", help="class names (default negative,positive)")
    t.add_argument("--workers", type=cli_type("workers", _INT0), default=0,
                   help="DataLoader processes reading patches (default 0: in the training process)")
    t.add_argument("--seed", type=cli_type("seed", _INT0), default=0,
                   help="seed of the patch draws, augmentations and initial weights")
    t.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    t.add_argument("--mine-rounds", type=cli_type("mine_rounds", _INT0), default=0,
                   help="hard negative mining rounds after the first stage (default 0)")
    t.add_argument("--mine-epochs", type=cli_type("mine_epochs", _INT1), default=1,
                   help="fine-tuning epochs per mining round (default 1)")
    t.add_argument("--hard-share", type=cli_type("hard_share", Number(lo=0, hi=1, lo_open=True, hi_open=True)),
                   default=0.25, help="share of each batch from the mined negatives (default 0.25)")
    t.add_argument("--mine-lr", type=cli_type("mine_lr", _POS), default=None,
                   help="learning rate of the fine-tuning (default --lr)")
    m = add_command(sub, "mine", help="dense-scan slides with a model and write their false positives as hard "
                                      "negatives (and a manifest that adds them)", exit_codes=done, examples=[
                        "pyfastscan mine --manifest slides.csv --weights run/model.safetensors --out mined",
                        "pyfastscan mine --manifest slides.csv --weights run/model.safetensors --threshold 0.8 "
                        "--out mined"])
    _common(m)
    m.add_argument("--weights", required=True, help="a weights file from pyfastscan train (or save_model)")
    m.add_argument("--mpp", type=cli_type("mpp"), default=None,
                   help="scan resolution, um/px (default: the weights file's training resolution)")
    m.add_argument("--threshold", type=cli_type("threshold"), default=0.5,
                   help="probability above which a cell is a false positive (default 0.5)")
    m.add_argument("--split", choices=("train", "val", "all"), default="train",
                   help="which slides of the manifest to mine (default train)")


def main(args) -> int:
    from ..errors import PyfastscanError

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        return _train(args) if args.command == "train" else _mine(args)
    except (PyfastscanError, ValueError, OSError, KeyError) as exc:
        print(f"pyfastscan {args.command}: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


def _arch_kwargs(text):
    return parse_arch_kwargs(text) or {}


def _train(args) -> int:
    from ..dense import geometry
    from ..models import create, get_entry
    from .augment import PRESETS, TELLEZ_MARGIN
    from .dataset import PatchDataset, read_manifest
    from .mine import train_rounds

    specs = read_manifest(args.manifest)
    kwargs = _arch_kwargs(args.arch_kwargs)
    entry = get_entry(args.arch)
    mpp = args.mpp or entry.mpp
    if mpp is None:
        raise ValueError(f"{args.arch} has no registered resolution: pass --mpp (the training um/px)")
    patch = args.patch or geometry(create(args.arch, **kwargs).eval()).patch
    context = args.context
    if context is None:
        cfg = PRESETS[args.augment]
        context = patch + 2 * math.ceil(TELLEZ_MARGIN * patch) if cfg.warps or cfg.rot90 else patch
    val_specs = [s for s in specs if s.split == "val"]
    common = dict(context=context, grid_um=args.grid_um, margin_um=args.margin_um, jitter_um=args.jitter_um,
                  seed=args.seed, positive_inset_um=args.positive_inset_um)
    train_ds = PatchDataset(specs, mpp, patch, split="train", length=args.epoch_patches, shares=args.shares, **common)
    val_ds = None
    if val_specs:
        val_shares = {k: v for k, v in args.shares.items() if k != "hard"} or None
        val_ds = PatchDataset(specs, mpp, patch, split="val", length=args.val_patches, shares=val_shares,
                              **dict(common, seed=args.seed + 1))
    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    if len(classes) != 2:
        raise ValueError(f"--classes must name two classes (negative,positive), got {args.classes!r}")
    print(f"training {args.arch} at {mpp:g} um/px, patch {patch} (context {context}) on {len(train_ds.specs)} slides "
          f"({train_ds.summary()}); validation on {len(val_specs)} slides")
    report = train_rounds(args.arch, train_ds, val_ds, out=args.out, mine_rounds=args.mine_rounds,
                          mine_epochs=args.mine_epochs, hard_share=args.hard_share, mine_lr=args.mine_lr,
                          threshold=args.threshold, alpha=args.alpha, val_specs=val_specs,
                          max_negatives=args.max_negatives, resume=args.resume, arch_kwargs=kwargs,
                          epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                          schedule=args.schedule, augment=args.augment, select=args.select, device=args.device,
                          workers=args.workers, seed=args.seed, classes=classes)
    for r in report["rounds"]:
        print(f"mining round {r['round']}: {r['found']} hard negatives; false-positive share on the validation "
              f"slides {r['fp_before']:.2%} before, {r['fp_after']:.2%} after (positive cells found "
              f"{r['sensitivity_before']:.2%} before, {r['sensitivity_after']:.2%} after)")
    print(f"wrote {report['weights']} (pyfastscan scan --weights takes it as it is)")
    return 0


def _mine(args) -> int:
    from dataclasses import replace

    from ..models import load_model
    from ..models.files import card_of
    from .dataset import read_manifest, write_manifest
    from .mine import fp_share, mine

    specs = read_manifest(args.manifest)
    chosen = [s for s in specs if args.split == "all" or s.split == args.split]
    if not chosen:
        raise ValueError(f"{args.manifest}: no slides in split {args.split!r}")
    model = load_model(args.weights)
    card = card_of(model)
    mpp = args.mpp or (card.mpp if card else None)
    if mpp is None:
        raise ValueError(f"{args.weights} does not say its training resolution: pass --mpp")
    patch = card.patch if card and card.patch else 0
    margin = args.margin_um if args.margin_um is not None else 0.5 * patch * mpp
    files, results = mine(model, chosen, args.out, mpp=mpp, threshold=args.threshold, margin_um=margin,
                          grid_um=args.grid_um, alpha=args.alpha, device=args.device,
                          max_negatives=args.max_negatives)
    mined = [replace(s, negatives=tuple(s.negatives) + ((files[s.slide],) if s.slide in files else ()))
             for s in specs]
    path = write_manifest(os.path.join(args.out, "manifest.json"), mined)
    print(f"{sum(len(m.xy) for m in results)} hard negatives on {len(results)} slides; false-positive share "
          f"{fp_share(results):.2%}; manifest with them: {path}")
    return 0
