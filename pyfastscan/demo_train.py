"""Train the demo model: carcinoma (the bundled TIAToolbox patch) against skin (the bundled
CMU slide), reproducibly, in about two minutes on a 2-core CPU.

    python -m pyfastscan.demo_train [--out demo_model.safetensors] [--steps 3000]

It writes into the current folder by default; the copy bundled with the installed package
(pyfastscan/data/demo_model.safetensors) is replaced only when --out names it.

A small padding-free CNN (patch 38 px, stride 8 at 1 um/px), trained on 38 px crops at
1 um/px with HED stain augmentation (pyfastscan.ops.hed_augment), blur, flips and rotations;
from half-way on, a third of the skin negatives are hard negatives (where the half-trained
model says carcinoma).
Positives come from the left 70% of the carcinoma image only; the right 30% is held out
and planted into the skin slide by the demo (pyfastscan/demo.py). A demonstration of the
pipeline, not a diagnostic model.
"""
import argparse
import os
import time

import numpy as np
import torch
from torch import nn

from .models import demo_cnn, save_model
from .ops import hed_augment, sample_hed_params
from .samples import CARCINOMA_MPP, DATA_DIR, carcinoma_image, skin_slide_path
from .validate import cli_type

SCAN_MPP = 1.0
PATCH = 38
TRAIN_FRACTION = 0.7  # of the carcinoma image's width, from the left
WEIGHTS = os.path.join(DATA_DIR, "demo_model.safetensors")


def demo_model() -> nn.Sequential:
    """Padding-free: patch 38 px, stride 8 (at SCAN_MPP); ``pyfastscan.models.demo_cnn``."""
    return demo_cnn()


def resize(rgb: np.ndarray, scale: float) -> np.ndarray:
    from PIL import Image

    h, w = rgb.shape[:2]
    return np.asarray(Image.fromarray(rgb).resize((max(1, round(w * scale)), max(1, round(h * scale))),
                                                  Image.Resampling.BOX))


def carcinoma_at(mpp: float) -> np.ndarray:
    return resize(carcinoma_image(), CARCINOMA_MPP / mpp)


def not_glass(rgb: np.ndarray) -> np.ndarray:
    """Everything that is not bare glass: any channel below 200."""
    return rgb.min(axis=2) < 200


def skin_at(mpp: float):
    """(RGB of the skin slide at mpp, a mask of everything that is not bare glass, slide mpp).
    The mask is deliberately generous (any channel below 200): pale dermis must be among
    the negatives, or the model learns "pink" as carcinoma."""
    from .slide import open_slide

    s = open_slide(skin_slide_path())
    w, h = s.dimensions
    rgb = resize(s.read(0, 0, w, h), s.mpp / mpp)
    mask = not_glass(rgb)
    s.close()
    return rgb, mask, s.mpp


def _centres(mask: np.ndarray) -> np.ndarray:
    """(N, 2) patch centres (y, x) where ``mask`` is set and a whole patch fits."""
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    c = PATCH // 2
    ok = (ys >= c) & (ys <= h - PATCH + c) & (xs >= c) & (xs <= w - PATCH + c)
    return np.stack([ys[ok], xs[ok]], axis=1)


def _crops(img: np.ndarray, n: int, rng: np.random.Generator, centres=None) -> np.ndarray:
    """n PATCH-sized crops: anywhere, or centred on rows of ``centres`` (see _centres)."""
    h, w = img.shape[:2]
    if centres is None:
        tops = np.stack([rng.integers(0, h - PATCH + 1, n), rng.integers(0, w - PATCH + 1, n)], axis=1)
    else:
        tops = centres[rng.integers(0, len(centres), n)] - PATCH // 2
    return np.stack([img[y:y + PATCH, x:x + PATCH] for y, x in tops]) if n else np.zeros((0, PATCH, PATCH, 3),
                                                                                         dtype=img.dtype)


def _hard_mask(model: nn.Module, skin: np.ndarray, mask: np.ndarray, threshold: float = 0.2) -> np.ndarray:
    """Tissue positions (patch centres) of the skin image where ``model`` says carcinoma with
    probability above ``threshold``: the hard negatives, from one dense pass over the image."""
    from .dense import to_dense

    dense = to_dense(model.eval(), 1)
    g = dense.geometry
    with torch.no_grad():
        x = torch.from_numpy(skin.copy()).permute(2, 0, 1)[None].float() / 255
        prob = torch.softmax(dense(x), dim=1)[0, 1].numpy()
    model.train()
    hard = np.zeros(mask.shape, dtype=bool)
    ys, xs = np.nonzero(prob > threshold)
    hard[ys * g.step + PATCH // 2, xs * g.step + PATCH // 2] = True
    return hard & mask


def _blur(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Gaussian blur of a random strength (sigma 0-1.2 px) on a random half of the batch, so
    the model cannot tell the classes apart by sharpness (the two sources were resampled by
    different factors, and scans add JPEG and resampling blur)."""
    sigma = float(rng.uniform(0.3, 1.2))
    t = torch.arange(-2, 3, dtype=torch.float32)
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = (k[:, None] * k[None, :]) / k.sum() ** 2
    blurred = nn.functional.conv2d(nn.functional.pad(x, (2, 2, 2, 2), mode="reflect"),
                                   k.expand(3, 1, 5, 5).contiguous(), groups=3)
    pick = torch.from_numpy(rng.random(x.shape[0]) < 0.5)[:, None, None, None]
    return torch.where(pick, blurred, x)


def train(steps: int = 3000, batch: int = 128, seed: int = 0, log=print) -> nn.Sequential:
    """Adam with a cosine schedule; from half-way on, a third of the tissue negatives are
    hard negatives: skin positions the half-trained model calls carcinoma."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    carc = carcinoma_at(SCAN_MPP)
    carc = carc[:, : int(carc.shape[1] * TRAIN_FRACTION)]
    skin, mask, _ = skin_at(SCAN_MPP)
    tissue = _centres(mask)
    model = demo_model()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    hard = None
    for step in range(steps):
        if step == steps // 2:
            hard = _centres(_hard_mask(model, skin, mask))
            log(f"step {step:4d}: {len(hard)} hard-negative positions")
        half = batch // 3  # a third positives: false positives cost more on a slide of skin
        neg = batch - half
        n_hard = (neg - neg // 8) // 3 if hard is not None and len(hard) else 0
        neg_tissue = _crops(skin, neg - neg // 8 - n_hard, rng, tissue)
        neg_hard = _crops(skin, n_hard, rng, hard)
        neg_any = _crops(skin, neg // 8, rng)  # some background and tissue edges
        pos = _crops(carc, half, rng)
        x = torch.from_numpy(np.concatenate([pos, neg_tissue, neg_hard, neg_any])).permute(0, 3, 1, 2).contiguous()
        y = torch.cat([torch.ones(half, dtype=torch.long), torch.zeros(neg, dtype=torch.long)])
        alpha, beta = sample_hed_params(batch, 0.05, gen)
        x = hed_augment(x, alpha, beta)
        k = int(rng.integers(0, 4))
        x = torch.rot90(x, k, dims=(2, 3))
        if rng.random() < 0.5:
            x = x.flip(3)
        logits = model(_blur(x.float() / 255, rng)).flatten(1)
        loss = nn.functional.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            acc = (logits.argmax(1) == y).float().mean().item()
            log(f"step {step:4d}: loss {loss.item():.4f}, batch accuracy {acc:.3f} ({time.perf_counter() - t0:.0f} s)")
    return model.eval()


def save(model: nn.Module, path: str) -> None:
    """Write the demo model as a self-describing weights file (``pyfastscan scan --weights``
    needs nothing else)."""
    save_model(model, path, arch="demo_cnn", classes=["skin", "carcinoma"], positive_class="carcinoma",
               mpp=SCAN_MPP, extra={"note": "pyfastscan demo model; a demonstration, not a diagnostic model",
                                    "trained_by": "python -m pyfastscan.demo_train"})


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="demo_model.safetensors",
                    help=f"weights file to write (default: ./demo_model.safetensors; the bundled model is {WEIGHTS})")
    ap.add_argument("--steps", type=cli_type("steps"), default=3000, help="training steps (default 3000)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    model = train(args.steps)
    save(model, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


# ----------------------------------------------------------------------------- pyfastscan train
# The same two images as annotated slides, for `pyfastscan train` (pyfastscan demo --train):
# the skin slide at SCAN_MPP cut in two, carcinoma planted into each half (from the left 70%
# of the carcinoma image into the training half, the held-out 30% into the other half), the
# planted rectangles as GeoJSON polygons, a tissue mask (everything not glass) beside each.
SPLIT_ROW = 800  # skin rows at SCAN_MPP above this line: the training slide; below: held out


def _plant(img: np.ndarray, tissue: np.ndarray, pieces, rng: np.random.Generator):
    """Paste each piece at a random tissue position, apart from the others; returns the
    rectangles (x0, y0, x1, y1)."""
    h, w = img.shape[:2]
    boxes = []
    for piece in pieces:
        ph, pw = piece.shape[:2]
        for _ in range(10_000):
            y, x = int(rng.integers(PATCH, h - ph - PATCH)), int(rng.integers(PATCH, w - pw - PATCH))
            apart = all(x + pw + PATCH < b[0] or b[2] + PATCH < x or y + ph + PATCH < b[1] or b[3] + PATCH < y
                        for b in boxes)
            if apart and tissue[y + ph // 2, x + pw // 2]:
                break
        img[y:y + ph, x:x + pw] = piece
        boxes.append((x, y, x + pw, y + ph))
    return boxes


def build_training_slides(folder: str, seed: int = 0) -> str:
    """Write demo_train.tif and demo_heldout.tif (pyramidal TIFFs at SCAN_MPP) with their
    carcinoma polygons (.geojson) and tissue masks (.png), and manifest.json naming them
    (split train / val). Returns the manifest's path."""
    from PIL import Image

    from .io import Annotation, write_geojson
    from .io.files import write_json
    from .pipeline.outputs import write_pyramid_tif

    os.makedirs(folder, exist_ok=True)
    skin, _, _ = skin_at(SCAN_MPP)
    carc = carcinoma_at(SCAN_MPP)
    cut = int(carc.shape[1] * TRAIN_FRACTION)
    train_part, held = carc[:, :cut], carc[:, cut + 2:]
    hh = held.shape[0] // 4
    parts = {"demo_train": (skin[:SPLIT_ROW], [train_part[:125], train_part[125:]], "train"),
             "demo_heldout": (skin[SPLIT_ROW:], [held[k * hh:(k + 1) * hh] for k in range(4)], "val")}
    rng = np.random.default_rng(seed)
    entries = []
    for name, (img, pieces, split) in parts.items():
        img = img.copy()
        boxes = _plant(img, not_glass(img), pieces, rng)
        write_pyramid_tif(os.path.join(folder, name + ".tif"), img, SCAN_MPP, levels=2, compression="zlib")
        polys = [Annotation("polygon", [[x0, y0], [x1, y0], [x1, y1], [x0, y1]], "carcinoma", f"carcinoma {k}")
                 for k, (x0, y0, x1, y1) in enumerate(boxes)]
        write_geojson(os.path.join(folder, name + ".geojson"), polys)
        Image.fromarray(not_glass(img).astype(np.uint8) * 255).save(os.path.join(folder, name + "_tissue.png"))
        entries.append(dict(slide=name + ".tif", annotations=[name + ".geojson"], tissue=name + "_tissue.png",
                            split=split))
    return write_json(os.path.join(folder, "manifest.json"), {"slides": entries}, indent=2)
