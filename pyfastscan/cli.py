"""Command line: `pyfastscan info`, `pyfastscan demo`, `pyfastscan scan`, `pyfastscan evaluate`."""
import argparse
import json
import os
import shlex
import sys

ARCHS = ("vgg16_fcn", "tellez_cnn")
CHECKPOINT = ".pyfastscan-scan.ckpt"  # in each slide's output folder while its scan runs


def _roi_outputs(v: str):
    return v if v == "auto" else int(v)


def _scan_one(path, out, model, args, command):
    """Scan one slide into ``out``; the checkpoint lives there until the outputs are written."""
    from . import open_slide, scan_slide
    from .io.files import prepare_folder

    ckpt = os.path.join(out, CHECKPOINT)
    slide = open_slide(path, default_mpp=args.mpp)  # a bad slide fails before any folder is made
    try:
        prepare_folder(out)  # an unwritable folder fails before the scan, not after it
        res = scan_slide(slide, model, alpha=args.alpha, mpp=args.mpp, device=args.device, precision=args.precision,
                         roi_outputs=args.roi_outputs, memory=args.memory_mib << 20 if args.memory_mib else None,
                         checkpoint=ckpt, resume=args.resume and os.path.exists(ckpt), progress=not args.quiet)
        paths = res.save(out, command=command)
    finally:
        slide.close()
    os.remove(ckpt)  # the outputs are complete: nothing left to resume
    return res, paths


def _scan(args) -> int:
    """Scan every slide; a slide that fails is reported and the others go on.
    Exit status 0 when all succeeded, 1 when any failed."""
    import torch

    from . import load_weights
    from .errors import PyfastscanError
    from .models import tellez_cnn, vgg16_fcn

    model = (vgg16_fcn if args.arch == "vgg16_fcn" else tellez_cnn)(num_classes=args.num_classes)
    try:
        load_weights(model, args.weights)
    except (PyfastscanError, OSError) as exc:
        print(f"pyfastscan scan: cannot load weights {args.weights}: {exc}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    command = " ".join(shlex.quote(a) for a in sys.argv)
    failed = []
    for path in args.slides:
        name = os.path.splitext(os.path.basename(path))[0]
        out = os.path.join(args.out, name) if len(args.slides) > 1 or args.per_slide_folder else args.out
        try:
            res, paths = _scan_one(path, out, model, args, command)
        except (PyfastscanError, OSError, ValueError, RuntimeError) as exc:
            print(f"pyfastscan scan: {path}: FAILED: {exc}", file=sys.stderr)
            failed.append(path)
            continue
        except KeyboardInterrupt:
            print(f"\npyfastscan scan: interrupted during {path}; run the same command with --resume to continue "
                  "from the ROIs already finished", file=sys.stderr)
            return 130
        t = res.timings
        resumed = f" ({res.n_rois_resumed} from the checkpoint)" if res.n_rois_resumed else ""
        print(f"{path}: score {res.score:.4f}, {len(res.detections)} detections, {res.n_rois}/{res.n_rois_total} "
              f"ROIs{resumed}, {t['total']:.1f} s (infer {t['infer']:.1f} s, waiting for reads {t['read_wait']:.1f} s) "
              f"-> {os.path.dirname(paths['report'])}")
    if failed:
        print(f"pyfastscan scan: {len(failed)} of {len(args.slides)} slides failed: {', '.join(failed)}",
              file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="pyfastscan", description="Fast, dense CNN inference on whole-slide images.")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="print what was built and which backends can run here")
    info.add_argument("--json", action="store_true", help="print the full build_info() as JSON")
    sub.add_parser("demo", help="run the demonstration on bundled / generated data")
    scan = sub.add_parser("scan", help="dense whole-slide scan: heat map, detections, report per slide")
    scan.add_argument("slides", nargs="+", metavar="SLIDE")
    scan.add_argument("--weights", required=True, help=".safetensors or PyTorch checkpoint")
    scan.add_argument("--arch", choices=ARCHS, default="vgg16_fcn")
    scan.add_argument("--num-classes", type=int, default=2)
    scan.add_argument("--alpha", type=int, default=2, help="dense factor (map step = stride / alpha)")
    scan.add_argument("--out", required=True, help="output folder (one sub-folder per slide when several)")
    scan.add_argument("--per-slide-folder", action="store_true", help="use OUT/<slide name> for a single slide too")
    scan.add_argument("--mpp", type=float, default=None,
                      help="scan resolution in um/px (default: level 0); the level-0 resolution of slides without one")
    scan.add_argument("--device", default="cpu")
    scan.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    scan.add_argument("--roi-outputs", type=_roi_outputs, default="auto",
                      help="L_m': map cells per ROI side (default auto: the largest that fits --memory-mib)")
    scan.add_argument("--memory-mib", type=int, default=0,
                      help="memory budget for one ROI (default: half the free GPU memory, or a quarter of the "
                           "available RAM up to 4 GiB)")
    scan.add_argument("--resume", action="store_true",
                      help=f"continue an interrupted scan from the ROIs it finished (kept in OUT/{CHECKPOINT} "
                           "until the outputs are written)")
    scan.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    scan.add_argument("--quiet", action="store_true", help="no progress line")
    from .eval.cli import add_parsers

    add_parsers(sub)
    args = parser.parse_args(argv)
    if args.command == "info":
        from .backends import build_info, format_build_info

        info = build_info()
        print(json.dumps(info, indent=2) if args.json else format_build_info(info))
        return 0
    if args.command == "demo":
        from . import demo

        return demo.main()
    if args.command == "scan":
        return _scan(args)
    if args.command == "evaluate":
        from .eval.cli import main as evaluate

        return evaluate(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
