"""`pyfastscan evaluate froc | auc | f1`: tables on stdout, optional JSON, the FROC curve as
a PNG. Each returns the exit status (0 done, 2 bad input, reported on stderr)."""
import math
import os
import sys
from typing import Optional, Tuple

import numpy as np

from ..clihelp import add_command
from ..io import AnnotationError, rasterize, read_asap_xml
from ..io.files import write_json
from ..progress import Progress
from ..validate import cli_type
from .classification import roc_auc
from .detection import detection_score, f1_curve
from .files import prediction_files, read_labels, read_points, read_points_csv, scan_report
from .froc import RATES, evaluation_mask, froc_curve, froc_score, itc_labels, slide_hits


def add_parsers(sub) -> None:
    done = "exit status: 0 done, 2 bad input (said on stderr)"
    ev = add_command(sub, "evaluate", help="Camelyon16 FROC and AUC, detection F1", exit_codes=done, examples=[
        "pyfastscan evaluate froc --pred results --gt ground_truth --json froc.json",
        "pyfastscan evaluate auc --pred results --labels reference.csv",
        "pyfastscan evaluate f1 --pred mitoses/mitoses.csv --gt truth.sqlite --slide 7 --radius-um 7.5 --mpp 0.25"])
    evs = ev.add_subparsers(dest="metric", required=True, metavar="METRIC")
    froc = add_command(evs, "froc", help="Camelyon16 lesion-level FROC (the organisers' evaluation)", exit_codes=done,
                       examples=["pyfastscan evaluate froc --pred results --gt ground_truth --json froc.json",
                                 "pyfastscan evaluate froc --pred results --gt masks --level 5 --plot froc.png"])
    froc.add_argument("--pred", required=True, help="folder of NAME.csv or NAME/detections.csv (scan outputs)")
    froc.add_argument("--gt", required=True,
                      help="folder of NAME.xml (ASAP) or NAME_Mask.tif ground truth; slides without one are normal")
    froc.add_argument("--level", type=cli_type("level"), default=5, help="evaluation mask level, downsample 2^level (default 5)")
    froc.add_argument("--resolution", type=cli_type("resolution"), default=None,
                      help="level-0 um/px for the 75 um growth and the ITC size (default: each scan's slide_mpp "
                           "from its report.json, else the organisers' constant 0.243)")
    froc.add_argument("--slides", default=None,
                      help="folder of the slides, for the sizes of slides whose predictions have no report.json")
    froc.add_argument("--reading", choices=("linear", "step"), default="linear",
                      help="how sensitivity is read between curve points (default linear, see pyfastscan.eval.froc)")
    froc.add_argument("--json", default=None, help="write the results as JSON here")
    froc.add_argument("--plot", default=None, help="FROC curve PNG (default: froc.png beside --json, or here)")
    auc = add_command(evs, "auc", help="slide-level ROC AUC (slide score: maximum of the heat map)", exit_codes=done,
                      examples=["pyfastscan evaluate auc --pred results --labels reference.csv --json auc.json"])
    auc.add_argument("--pred", required=True, help="folder of scan outputs or NAME.csv detections")
    auc.add_argument("--labels", required=True, help="CSV of name,label (Tumor/Normal or 1/0)")
    auc.add_argument("--json", default=None, help="write the results as JSON here")
    f1 = add_command(evs, "f1", help="detection F1 with one-to-one matching within a radius", exit_codes=done,
                     examples=["pyfastscan evaluate f1 --pred mitoses/mitoses.csv --gt truth.csv --radius-px 30",
                               "pyfastscan evaluate f1 --pred mitoses/mitoses.csv --gt truth.sqlite --slide 7 "
                               "--radius-um 7.5 --mpp 0.25"])
    f1.add_argument("--pred", required=True, help="detections: CSV, GeoJSON or ASAP XML")
    f1.add_argument("--gt", required=True, help="ground-truth points: CSV, GeoJSON, ASAP XML or SlideRunner database")
    f1.add_argument("--slide", default=None, help="slide (filename or uid) in a SlideRunner database")
    f1.add_argument("--class", dest="cls", default="Mitotic figure", help="class in a SlideRunner database")
    g = f1.add_mutually_exclusive_group()
    g.add_argument("--radius-px", type=cli_type("radius_px"), default=None, help="match radius in level-0 pixels (default 25)")
    g.add_argument("--radius-um", type=cli_type("radius_um"), default=None, help="match radius in um (needs --mpp)")
    f1.add_argument("--mpp", type=cli_type("mpp"), default=None, help="level-0 um/px, for --radius-um")
    f1.add_argument("--threshold", type=cli_type("f1_threshold"), default=None,
                    help="keep detections with probability >= this for the F1 line (default: all)")
    f1.add_argument("--json", default=None, help="write the results as JSON here")


def main(args) -> int:
    run = {"froc": _froc, "auc": _auc, "f1": _f1}[args.metric]
    try:
        return run(args)
    except (AnnotationError, ValueError, OSError) as exc:
        print(f"pyfastscan evaluate {args.metric}: {exc}", file=sys.stderr)
        return 2


def _slide_size(name: str, csv_path: str, slides: Optional[str]) -> Tuple[int, int]:
    report = scan_report(csv_path)
    if report and "slide_size_px" in report:
        return tuple(report["slide_size_px"])
    if slides:
        from ..slide import open_slide

        for entry in sorted(os.listdir(slides)):
            if os.path.splitext(entry)[0] == name:
                s = open_slide(os.path.join(slides, entry), default_mpp=1.0)
                try:
                    return s.dimensions
                finally:
                    s.close()
    raise AnnotationError(f"{name}: the slide size is needed to rasterise its ground truth: scan outputs carry it "
                          "in report.json, otherwise pass --slides with the slide files")


CAMELYON_MPP = 0.243  # the organisers' evaluation constant


def _resolution(given: Optional[float], csv_path: str) -> float:
    """Level-0 um/px for a slide's evaluation mask: ``--resolution`` if given, else the
    slide_mpp its scan recorded in report.json, else the organisers' 0.243."""
    if given is not None:
        return given
    report = scan_report(csv_path)
    mpp = report.get("slide_mpp") if report else None
    if isinstance(mpp, (int, float)) and not isinstance(mpp, bool) and math.isfinite(mpp) and mpp > 0:
        return float(mpp)
    return CAMELYON_MPP


def _ground_truth(gt: str, name: str, csv_path: str, args) -> Optional[np.ndarray]:
    """The boolean tumour mask at the evaluation level, or None for a normal slide."""
    d = 2 ** args.level
    xml = os.path.join(gt, name + ".xml")
    tif = next((p for p in (os.path.join(gt, name + s) for s in ("_Mask.tif", "_mask.tif")) if os.path.isfile(p)), None)
    if os.path.isfile(xml):
        w, h = _slide_size(name, csv_path, args.slides)
        anns = read_asap_xml(xml)
        return rasterize(anns, (math.ceil(h / d), math.ceil(w / d)), float(d))
    if tif:
        import openslide

        with openslide.OpenSlide(tif) as m:
            level = next((i for i, ds in enumerate(m.level_downsamples) if abs(ds - d) < 1e-6 * d), None)
            if level is None:
                raise AnnotationError(f"{tif}: no level with downsample {d} (has {list(m.level_downsamples)})")
            # as the organisers' script: tumour is 255 in the first channel
            return np.asarray(m.read_region((0, 0), level, m.level_dimensions[level]))[..., 0] == 255
    return None


def _froc(args) -> int:
    preds = prediction_files(args.pred)
    if not preds:
        raise AnnotationError(f"{args.pred}: no NAME.csv or NAME/detections.csv predictions")
    if not os.path.isdir(args.gt):
        raise AnnotationError(f"{args.gt}: no such folder")
    slides, rows, resolutions = [], [], {}
    bar = Progress(len(preds), "FROC", unit="slides")
    for i, (name, path) in enumerate(preds.items()):
        xy, prob = read_points_csv(path)
        tumour = _ground_truth(args.gt, name, path, args)
        labels = itc = None
        if tumour is not None:
            res = _resolution(args.resolution, path)
            resolutions[name] = res
            labels = evaluation_mask(tumour, res, args.level)
            itc = itc_labels(labels, res, args.level)
        s = slide_hits(name, prob, xy[:, 0], xy[:, 1], labels, itc or set(), args.level)
        slides.append(s)
        rows.append((name, "tumour" if tumour is not None else "normal", s.n_lesions, len(s.detections),
                     len(s.fp_probs)))
        bar.update(i + 1)
    fps, sens = froc_curve(slides)
    score, at = froc_score(fps, sens, reading=args.reading)
    other = "step" if args.reading == "linear" else "linear"
    score_other, _ = froc_score(fps, sens, reading=other)
    print("| slide | ground truth | lesions (non-ITC) | lesions hit | false positives |")
    print("|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(str(v) for v in r) + " |")
    print("\n| FPs per slide | " + " | ".join(f"{r:g}" for r in RATES) + " |")
    print("|---|" + "---|" * len(RATES))
    print("| sensitivity | " + " | ".join(f"{v:.4f}" for v in at) + " |")
    print(f"\nFROC score ({args.reading}): {score:.4f}   ({other} reading: {score_other:.4f}); "
          f"{len(slides)} slides, {sum(s.n_lesions for s in slides)} lesions")
    result = {"froc": score, "reading": args.reading, f"froc_{other}": score_other, "rates": list(RATES),
              "sensitivity_at_rates": at.tolist(), "curve": {"fps_per_slide": fps.tolist(), "sensitivity": sens.tolist()},
              "slides": [dict(zip(("name", "ground_truth", "lesions", "hit", "false_positives"), r)) for r in rows],
              "level": args.level, "resolution": args.resolution, "resolution_per_slide": resolutions}
    if args.json:
        write_json(args.json, result, indent=2)
    plot = args.plot or os.path.join(os.path.dirname(args.json) or "." if args.json else ".", "froc.png")
    from .plot import tick_label, write_curve_png

    write_curve_png(plot, fps, sens, "average false positives per slide", "metastasis detection sensitivity",
                    f"FROC {score:.4f} ({args.reading} reading): mean sensitivity at "
                    f"{', '.join(tick_label(r) for r in RATES)} FPs per slide",
                    marks=RATES, log_x=True, points=at)
    print(f"curve: {plot}")
    return 0


def _auc(args) -> int:
    labels = read_labels(args.labels)
    preds = prediction_files(args.pred)
    missing = sorted(set(labels) - set(preds))
    if missing:
        print(f"pyfastscan evaluate auc: no predictions for {len(missing)} labelled slides, scored 0: "
              f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}", file=sys.stderr)
    scores = {}
    for name in sorted(labels):
        if name not in preds:
            scores[name] = 0.0
            continue
        report = scan_report(preds[name])
        if report and "score" in report:
            scores[name] = float(report["score"])  # the maximum of the heat map
        else:
            _, prob = read_points_csv(preds[name])
            scores[name] = float(prob.max()) if len(prob) else 0.0
    names = sorted(labels)
    auc = roc_auc([labels[n] for n in names], [scores[n] for n in names])
    print("| slide | label | score |\n|---|---|---|")
    for n in names:
        print(f"| {n} | {'tumour' if labels[n] else 'normal'} | {scores[n]:.4f} |")
    print(f"\nslide-level AUC: {auc:.4f} ({sum(labels.values())} tumour, {len(labels) - sum(labels.values())} normal)")
    if args.json:
        write_json(args.json, {"auc": auc, "scores": scores, "labels": labels}, indent=2)
    return 0


def _f1(args) -> int:
    if args.radius_um is not None:
        if not args.mpp:
            raise AnnotationError("--radius-um needs --mpp (level-0 um/px)")
        radius = args.radius_um / args.mpp
    else:
        radius = args.radius_px if args.radius_px is not None else 25.0
    det, prob = read_points(args.pred)
    gt, _ = read_points(args.gt, args.slide, args.cls)
    keep = prob >= args.threshold if args.threshold is not None else np.ones(len(prob), dtype=bool)
    s = detection_score(det[keep], gt, radius)
    th, f1, best_t, best = f1_curve(det, prob, gt, radius)
    print("| detections | truths | TP | FP | FN | precision | recall | F1 |\n|---|---|---|---|---|---|---|---|")
    print(f"| {int(keep.sum())} | {len(gt)} | {s.tp} | {s.fp} | {s.fn} | {s.precision:.4f} | {s.recall:.4f} | "
          f"{s.f1:.4f} |")
    print(f"\nmatch radius {radius:g} px; best F1 {best:.4f} at probability >= {best_t:g}")
    if args.json:
        write_json(args.json, {"radius_px": radius, "threshold": args.threshold, "tp": s.tp, "fp": s.fp, "fn": s.fn,
                               "precision": s.precision, "recall": s.recall, "f1": s.f1, "best_threshold": best_t,
                               "best_f1": best, "curve": {"threshold": th.tolist(), "f1": f1.tolist()}}, indent=2)
    return 0
