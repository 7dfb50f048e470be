"""Training padding-free scanners (issue 18): patch datasets from annotated slides, the
papers' batch augmentations, ``fit`` with checkpoints and selection, and hard negative
mining by dense scanning.

    from pyfastscan.train import PatchDataset, fit, read_manifest, train_rounds
    specs = read_manifest("slides.csv")
    train = PatchDataset(specs, mpp=0.243, patch=244, split="train", length=20_000)
    val = PatchDataset(specs, mpp=0.243, patch=244, split="val", length=2_000)
    result = fit("vgg16_fcn", train, val, epochs=10, out="run/")   # run/model.safetensors

The command line: ``pyfastscan train`` and ``pyfastscan mine`` (pyfastscan/train/cli.py).
"""
from .augment import PRESETS, Augment, AugmentConfig, Params
from .dataset import Draw, PatchDataset, SlideLabels, SlideSpec, read_manifest, slide_labels, write_manifest
from .fit import FitResult, binary_metrics, evaluate, fit
from .mine import Mined, fp_share, mine, mine_slide, sensitivity, train_rounds, validation_fp, write_negatives

__all__ = ["PRESETS", "Augment", "AugmentConfig", "Params", "Draw", "PatchDataset", "SlideLabels", "SlideSpec",
           "read_manifest", "slide_labels", "write_manifest", "FitResult", "binary_metrics", "evaluate", "fit",
           "Mined", "fp_share", "sensitivity", "mine", "mine_slide", "train_rounds", "validation_fp", "write_negatives"]
