"""Command line: `pyfastscan info`, `demo`, `models`, `scan`, `cohort`, `mitosis`, `export`, `evaluate`, `train`,
`mine`, `bench`."""
import argparse
import json
import os
import shlex
import sys
import warnings

from ._version import __version__
from .clihelp import EXIT_CODES, HelpFormatter, add_command, parse_arch_kwargs
from .validate import cli_type

from .pipeline.scan import CHECKPOINT, ENGINES  # CHECKPOINT: in each slide's output folder while its scan runs


def _roi_outputs(v: str):
    return v if v == "auto" else cli_type("roi_outputs")(v)


def _common(args) -> dict:
    """scan_slide / detect_mitoses keyword arguments both jobs take from the command line."""
    return dict(alpha=args.alpha, mpp=args.mpp, scan_mpp=args.scan_mpp, slide_mpp=args.slide_mpp, device=args.device, precision=args.precision,
                roi_outputs=args.roi_outputs, memory=args.memory_mib << 20 if args.memory_mib else None,
                progress=not args.quiet, mode=args.mode, patch=args.patch, stride=args.stride,
                batch_size=args.batch_size, readers=args.readers)


def _warn_line(message, category, filename, lineno, file=None, line=None):
    print(f"pyfastscan: warning: {message}", file=sys.stderr if file is None else file)


def _arch_kwargs(args):
    """--arch-kwargs (a JSON object) with --num-classes added, or None when neither is given."""
    kwargs = parse_arch_kwargs(args.arch_kwargs)
    if args.num_classes is not None:
        kwargs = dict(kwargs or {}, num_classes=args.num_classes)
    return kwargs


def _load_cli_model(args):
    """The classifier from --weights: its architecture, classes, resolution, normalisation and
    patch grid from the file's metadata; --arch, --arch-kwargs, --num-classes,
    --positive-class, --patch and --stride override it, with a warning where they contradict
    it. Returns the model (with its card)."""
    from .models import load_model
    from .models.files import CARD_ATTR, card_of, override_card

    from .models.files import read_card

    kwargs = _arch_kwargs(args)

    file_card = read_card(args.weights)
    arch = args.arch
    if arch is None and file_card is None and getattr(args, "default_arch", None):
        arch = args.default_arch
        warnings.warn(f"{args.weights} does not name its architecture; using {arch}, the {args.command} job's "
                      "default (pass --arch to choose)")
    if file_card is not None and arch in (None, file_card.arch) and kwargs is not None:
        kwargs = dict(file_card.arch_kwargs, **kwargs)  # options add to the file's arguments
    model = load_model(args.weights, arch=arch, arch_kwargs=kwargs)
    card = override_card(card_of(model), "--option", positive_class=getattr(args, "positive_class", None),
                         patch=getattr(args, "patch", None), stride=getattr(args, "stride", None))
    setattr(model, CARD_ATTR, card)
    return model


def _scan_one(slide, out, model, args, command):
    """Scan one slide into ``out``; the checkpoint lives there until the outputs are written."""
    from .pipeline.scan import scan_to_folder

    truth = _truth(args.truth, slide) if args.truth else None  # a bad file fails before the scan
    res = scan_to_folder(slide, out, model, resume=args.resume, command=command,
                         heatmap_dtype="float32" if args.heatmap_float else "uint8", truth=truth, engine=args.engine,
                         workers=args.workers, address=args.ray_address, **_common(args))
    t = res.timings
    resumed = f" ({res.n_rois_resumed} from the checkpoint)" if res.n_rois_resumed else ""
    return (f"score {res.score:.4f}, {len(res.detections)} detections, {res.n_rois}/{res.n_rois_total} ROIs{resumed}, "
            f"{t['total']:.1f} s (infer {t['infer']:.1f} s, waiting for reads {t['read_wait']:.1f} s) -> {out}")


def _truth(where: str, slide):
    """The ground truth of ``slide`` for --truth: the annotation file ``where`` (a SlideRunner
    database: this slide's entry), or in a folder ``where`` the file NAME.xml / .geojson /
    .json named like the slide (none there: a slide without ground truth)."""
    from .io import read_annotations

    name = os.path.basename(os.fspath(getattr(slide, "path", None) or slide.name))
    if os.path.isdir(where):
        stem = os.path.splitext(name)[0]
        found = [os.path.join(where, stem + e) for e in (".xml", ".geojson", ".json")]
        found = [p for p in found if os.path.isfile(p)]
        return read_annotations(found[0]) if found else []
    return read_annotations(where, slide=name)


def _mitosis_one(slide, out, model, args, command):
    from . import detect_mitoses

    region = None
    if args.region:
        from .io import read_asap_xml, read_geojson

        region = read_asap_xml(args.region) if args.region.lower().endswith(".xml") else read_geojson(args.region)
        region = [a for a in region if a.kind == "polygon"]
    res = detect_mitoses(slide, model, map_threshold=args.map_threshold, nms_um=args.nms_um, delta=args.delta,
                         theta=(args.theta1, args.theta2), region_mask=region or None, **_common(args))
    paths = res.save(out, command=command)
    c = res.circle
    return (f"{len(res.mitoses)} mitoses ({len(res.candidates)} candidates), hotspot p95 {c.percentile_count:g} / "
            f"max {c.max_count} (2 mm^2), 10 HPF max {res.rect.max_count}, grade {res.grade}, "
            f"{res.timings['total']:.1f} s -> {os.path.dirname(paths['report'])}")


EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3
from .errors import internal_error as _internal_error  # noqa: E402  (kept below the CLI for the jobs)


def _job_model(args):
    """The model of a slide job (scan, mitosis, cohort), with the process settings its
    options ask for (threads) and the --mpp deprecation notice; None after saying on one
    line why the weights cannot be loaded."""
    import torch

    from .errors import PyfastscanError

    try:
        model = _load_cli_model(args)
    except (PyfastscanError, OSError, ValueError) as exc:
        print(f"pyfastscan {args.command}: cannot load weights {args.weights}: {_one_line(exc)}", file=sys.stderr)
        return None
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mpp is not None:
        print(f"pyfastscan {args.command}: --mpp is deprecated: use --scan-mpp (the resolution to scan at) and "
              "--slide-mpp (level 0's, for slides without one)", file=sys.stderr)
    return model


def _slides(args, run_one) -> int:
    """Run ``run_one`` on every slide; a slide that fails, for any reason, is reported on one
    line with its file and the reason, its output folder is marked failed, and the others
    go on. Returns the exit status (see EXIT_CODES)."""
    from .errors import PyfastscanError
    from .io.files import slide_folders
    from .pipeline.scan import slide_job, slide_job_failure

    job = args.command
    model = _job_model(args)
    if model is None:
        return EXIT_USAGE
    command = " ".join(shlex.quote(a) for a in sys.argv)
    try:
        folders = slide_folders(args.out, args.slides, args.per_slide_folder)
    except PyfastscanError as exc:
        print(f"pyfastscan {job}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    failed, internal = [], False
    for path, out in zip(args.slides, folders):
        try:
            summary = slide_job(path, out, job, lambda slide: run_one(slide, out, model, args, command),
                                default_mpp=args.slide_mpp if args.slide_mpp is not None else args.mpp,
                                overwrite=args.overwrite)
        except KeyboardInterrupt:
            again = "; run the same command with --resume to continue from the ROIs already finished" \
                if job == "scan" else ""
            print(f"\npyfastscan {job}: interrupted during {path}{again}", file=sys.stderr)
            return 130
        except Exception as exc:
            reason, bug = slide_job_failure(exc, path, args.out, job)
            internal |= bug
            print(f"pyfastscan {job}: {path}: FAILED: {reason}", file=sys.stderr)
            failed.append(path)
            continue
        print(f"{path}: {summary}")
    if failed:
        print(f"pyfastscan {job}: {len(failed)} of {len(args.slides)} slides failed: {', '.join(failed)}",
              file=sys.stderr)
        return EXIT_INTERNAL if internal else EXIT_FAILED
    return EXIT_OK


from .errors import one_line as _one_line  # noqa: E402


def _slide_job_parser(sub, name: str, help: str, arch: str, alpha: int, examples, slides: str = "+"):
    p = add_command(sub, name, help=help, examples=examples)
    p.add_argument("slides", nargs=slides, metavar="SLIDE", help="slide files (anything OpenSlide or tifffile reads)")
    _model_options(p, alpha, f"default {arch} for a file that names none")
    p.set_defaults(default_arch=arch)
    p.add_argument("--out", required=True,
                   help="output folder; for several slides one sub-folder each: OUT/<the slide's path relative to "
                        "the slides' common folder, without extension>")
    p.add_argument("--per-slide-folder", action="store_true", help="use OUT/<slide name> for a single slide too")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results of an earlier run or another slide found in an output folder "
                        "(refused otherwise)")
    p.add_argument("--scan-mpp", type=cli_type("scan_mpp"), default=None,
                   help="the resolution to scan at, um/px (default: the resolution the weights file says the model "
                        "was trained at, else the slide's level 0)")
    p.add_argument("--slide-mpp", type=cli_type("slide_mpp"), default=None,
                   help="level-0 um/px of slides that do not say their own (others keep theirs)")
    p.add_argument("--mpp", type=cli_type("mpp"), default=None,
                   help="deprecated: --scan-mpp, and --slide-mpp for slides without a resolution")
    p.add_argument("--device", default="cpu", help="torch device the model runs on: cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", choices=("auto", "fp32", "tf32", "bf16"), default="auto",
                   help="auto (default): bf16 on a CPU with AMX or a CUDA device of compute capability >= 8.0, "
                        "else fp32; fp32 is true fp32 on CUDA too; tf32 allows CUDA's TF32")
    p.add_argument("--mode", choices=("auto", "dense", "patch"), default="auto",
                   help="dense (padding-free networks, exact and fast), patch (any network, on every patch), or "
                        "auto: dense when the network converts, else patch (default auto)")
    p.add_argument("--batch-size", type=cli_type("batch_size"), default=None, help="patches per batch in patch mode (default: from "
                                                                "the memory budget)")
    p.add_argument("--roi-outputs", type=_roi_outputs, default="auto",
                   help="L_m': map cells per ROI side (default auto: the largest that fits --memory-mib)")
    p.add_argument("--memory-mib", type=cli_type("memory_mib"), default=0,
                   help="memory budget for one ROI (default: half the free GPU memory, or a quarter of the "
                        "available RAM up to 1 GiB)")
    p.add_argument("--threads", type=cli_type("threads"), default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--readers", type=cli_type("readers"), default=None,
                   help="threads decoding ROIs ahead of the model (default: one per core, at least 2, at most 8)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    return p


def _model_options(p, alpha: int, arch_help: str = "", weights_required: bool = True, scan: bool = True) -> None:
    """The options that say which model a weights file holds and (``scan``) how to scan it."""
    p.add_argument("--weights", required=weights_required,
                   help=".safetensors from pyfastscan.save_model (says everything else), a bare state dict or a "
                        "PyTorch checkpoint (then --arch)")
    p.add_argument("--arch", default=None,
                   help="architecture (registry name, see `pyfastscan models`), for files that do not name theirs"
                        + (f"; {arch_help}" if arch_help else ""))
    p.add_argument("--arch-kwargs", default=None, metavar="JSON", help='architecture arguments, e.g. \'{"width": 0.5}\'')
    p.add_argument("--num-classes", type=cli_type("num_classes"), default=None,
                   help="shorthand for --arch-kwargs num_classes")
    p.add_argument("--alpha", type=cli_type("alpha"), default=alpha, help=f"dense factor (map step = stride / alpha; default {alpha})")
    if not scan:
        return
    p.add_argument("--positive-class", type=cli_type("positive_class"), default=None,
                   help="output channel the map shows (default: the weights file's, else 1)")
    p.add_argument("--patch", type=cli_type("patch"), default=None, help="patch mode: patch side in px (default: the file's)")
    p.add_argument("--stride", type=cli_type("stride"), default=None,
                   help="patch mode: grid stride at alpha 1 in px (default: the file's); the step is stride / alpha")


def _scan_options(scan) -> None:
    """The options `pyfastscan scan` adds to a slide job's (`pyfastscan cohort` takes them too)."""
    scan.add_argument("--resume", action="store_true",
                      help=f"continue an interrupted scan from the ROIs it finished (kept in OUT/{CHECKPOINT} "
                           "until the outputs are written)")
    scan.add_argument("--heatmap-float", action="store_true",
                      help="write heatmap.tif as float32 probabilities (QuPath, tifffile) instead of uint8 x 255 "
                           "(which OpenSlide and ASAP also open)")
    scan.add_argument("--engine", choices=ENGINES, default="local",
                      help="local (default: this process) or ray (Ray workers, pip install \"pyfastscan[ray]\"; "
                           "scan: the ROIs of each slide over --workers; cohort: whole slides per worker)")
    scan.add_argument("--workers", type=cli_type("workers"), default=None,
                      help="Ray workers (default: one per GPU of the cluster; scan: else 2, cohort: else one per node)")
    scan.add_argument("--ray-address", default=None, metavar="auto|HOST:PORT",
                      help="join this Ray cluster (`ray start --head`; auto: the one on this machine) instead of "
                           "starting a local Ray instance bound to 127.0.0.1")


def _models(args) -> int:
    """`pyfastscan models`: every registered architecture with its geometry and size."""
    from .dense import geometry
    from .errors import InvalidArgumentError
    from .models import create, get_entry, list_models

    rows = []
    for name in list_models():
        entry = get_entry(name)
        try:
            net = create(name).eval()
        except Exception as exc:  # a plug-in whose builder needs arguments
            rows.append(dict(name=name, patch=None, stride=None, parameters=None, mode="?", mpp=entry.mpp,
                             description=f"({type(exc).__name__}: {exc})"))
            continue
        try:
            g = geometry(net)
            patch, stride, mode = g.patch, g.stride, "dense"
        except InvalidArgumentError:
            patch, stride, mode = entry.patch, entry.stride, "patch"
        rows.append(dict(name=name, patch=patch, stride=stride, parameters=sum(p.numel() for p in net.parameters()),
                         mode=mode, mpp=entry.mpp, description=entry.description))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':<14} {'patch':>5} {'stride':>6} {'parameters':>11} {'mode':<6} {'mpp':>5}  description")
    for r in rows:
        params = f"{r['parameters'] / 1e6:.2f} M" if r["parameters"] is not None else "?"
        print(f"{r['name']:<14} {r['patch'] or '-':>5} {r['stride'] or '-':>6} {params:>11} {r['mode']:<6} "
              f"{r['mpp'] if r['mpp'] is not None else '-':>5}  {r['description']}")
    return 0


def _export(args) -> int:
    """`pyfastscan export`: the dense model for a fixed ROI size as ONNX."""
    from .errors import PyfastscanError
    from .export import export_onnx
    from .models.files import card_of

    try:
        model = _load_cli_model(args)
        card = card_of(model)
        info = export_onnx(model, args.output, roi_outputs=args.roi_outputs, alpha=args.alpha, plan=args.plan,
                           normalize=card.normalize if card else None)
    except (PyfastscanError, OSError, ValueError) as exc:
        print(f"pyfastscan export: {exc}", file=sys.stderr)
        return 1 if isinstance(exc, OSError) else 2
    print(f"wrote {info['path']}: input {tuple(info['input_shape'])} -> output {tuple(info['output_shape'])}")
    return 0


def _bench(args) -> int:
    """`pyfastscan bench`: pyfastscan.benchmark.run_bench on the model the options name."""
    from .benchmark import format_bench, run_bench
    from .errors import PyfastscanError
    from .models import create

    try:
        if args.weights:
            model = _load_cli_model(args)
        else:  # random weights (speed does not depend on them), the architecture's registered grid
            from .models import get_entry
            from .models.files import CARD_ATTR, ModelCard

            arch = args.arch or "vgg16_fcn"
            model = create(arch, **(_arch_kwargs(args) or {}))
            entry = get_entry(arch)
            setattr(model, CARD_ATTR, ModelCard(arch, patch=entry.patch, stride=entry.stride))
        result = run_bench(model, alpha=args.alpha, device=args.device, roi_outputs=args.roi_outputs,
                           patch=args.patch, stride=args.stride, precisions=args.precision or None, slide=args.slide,
                           repeats=args.repeats)
    except (PyfastscanError, OSError, ValueError) as exc:
        print(f"pyfastscan bench: {exc}")
        return 2
    print(json.dumps(result) if args.json else format_bench(result))
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error on one line (the option and what it must be) and exit
    status 2; the full usage is in --help."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The whole command line (every subcommand), for main and for tests that walk it."""
    parser = _Parser(prog="pyfastscan", description="Fast, dense CNN inference on whole-slide images.",
                     epilog="examples:\n  pyfastscan demo\n  pyfastscan scan slide.svs --weights model.safetensors "
                            "--out results\n  pyfastscan SUBCOMMAND --help\n\n" + EXIT_CODES,
                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"pyfastscan {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    info = add_command(sub, "info", help="print what was built and which backends can run here",
                       examples=["pyfastscan info", "pyfastscan info --json  # everything, for a bug report"],
                       exit_codes="")
    info.add_argument("--json", action="store_true", help="print the full build_info() as JSON")
    demo = add_command(sub, "demo", help="run the demonstration on bundled / generated data",
                       examples=["pyfastscan demo", "pyfastscan demo --out /tmp/demo  # results elsewhere",
                                 "pyfastscan demo --train  # train the demo model with pyfastscan train + mining"],
                       exit_codes="exit status: 0 done, 1 a check failed or the output folder is not writable")
    demo.add_argument("--out", default=None, metavar="DIR",
                      help="folder for the demo's slides and outputs (default: pyfastscan-demo, with --train "
                           "pyfastscan-demo-train)")
    demo.add_argument("--train", action="store_true",
                      help="instead: train the demo model with `pyfastscan train` and one hard negative mining "
                           "round (a few minutes), reporting the held-out false-positive share before and after")
    models = add_command(sub, "models", help="list the registered architectures (patch, stride, parameters)",
                         examples=["pyfastscan models", "pyfastscan models --json"], exit_codes="")
    models.add_argument("--json", action="store_true", help="print the table as JSON")
    scan = _slide_job_parser(sub, "scan", "dense whole-slide scan: heat map, detections, report per slide",
                             "vgg16_fcn", 2, [
                                 "pyfastscan scan slide.svs --weights model.safetensors --out results",
                                 "pyfastscan scan slides/*.tif --weights model.safetensors --out results --resume",
                                 "pyfastscan scan slide.svs --weights vgg.pth --arch vgg16_fcn --alpha 4 "
                                 "--precision fp32 --out results  # a bare state dict",
                                 "pyfastscan scan slide.svs --weights resnet.safetensors --mode patch --out results",
                                 "pyfastscan scan big.svs --weights model.safetensors --engine ray --workers 4 --out r"])
    _scan_options(scan)
    scan.add_argument("--truth", default=None, metavar="FILE",
                      help="ground truth to outline in overlay.png: an ASAP .xml, a .geojson or a SlideRunner "
                           "database (the slide's entry), or a folder of NAME.xml / NAME.geojson named like the "
                           "slides (default: none)")
    from .cohort.cli import add_parser as add_cohort_parser

    add_cohort_parser(sub, _slide_job_parser, _scan_options)
    mit = _slide_job_parser(sub, "mitosis", "mitoses, hotspot and grade per slide (Tellez et al.)", "tellez_cnn", 1, [
        "pyfastscan mitosis slide.svs --weights tellez.safetensors --out mitoses",
        "pyfastscan mitosis slide.svs --weights tellez.safetensors --region tumour.xml --out mitoses  # count there"])
    mit.add_argument("--map-threshold", type=cli_type("map_threshold"), default=0.8, help="map binarisation threshold (0.8)")
    mit.add_argument("--nms-um", type=cli_type("nms_um"), default=25.0, help="minimum distance between detections, um (25)")
    mit.add_argument("--delta", type=cli_type("delta"), default=0.970,
                     help="probability a detection needs to count (0.970; the paper's F1 operating point is 0.919)")
    mit.add_argument("--theta1", type=cli_type("theta1"), default=6, help="grade 1 up to this hotspot count (6)")
    mit.add_argument("--theta2", type=cli_type("theta2"), default=20, help="grade 2 up to this hotspot count (20), then 3")
    mit.add_argument("--region", default=None,
                     help="count only inside these polygons (ASAP .xml or .geojson, level-0 px), e.g. the tumour")
    bench = add_command(sub, "bench", help="cells per second of dense and patch mode in each precision, and the read "
                                           "ceiling of a slide, on this machine", exit_codes="", examples=[
                            "pyfastscan bench --arch demo_cnn",
                            "pyfastscan bench --weights model.safetensors --slide slide.svs --json"])
    _model_options(bench, 2, "default vgg16_fcn with random weights when no --weights", weights_required=False)
    bench.add_argument("--device", default="cpu", help="torch device to time: cpu, cuda, ...")
    bench.add_argument("--precision", action="append", choices=("fp32", "bf16"), default=None,
                       help="precision to time (repeatable; default fp32, and bf16 where auto picks it)")
    bench.add_argument("--roi-outputs", type=cli_type("roi_outputs"), default=16, help="map cells per ROI side for dense mode (16)")
    bench.add_argument("--slide", default=None, help="also measure this slide's read ceiling")
    bench.add_argument("--repeats", type=cli_type("repeats"), default=3, help="timed calls per scanner (3; the median is reported)")
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    exp = add_command(sub, "export", help="write the dense model for a fixed ROI size as ONNX", exit_codes="",
                      examples=["pyfastscan export --weights model.safetensors --roi-outputs 32 model.onnx"])
    _model_options(exp, 1, scan=False)
    exp.add_argument("--roi-outputs", type=cli_type("roi_outputs"), required=True, help="L_m': map cells per ROI side")
    exp.add_argument("--plan", choices=("minimal", "paper"), default="minimal", help="conversion plan (minimal)")
    exp.add_argument("output", metavar="OUT.onnx", help="the ONNX file to write")
    from .eval.cli import add_parsers

    add_parsers(sub)
    from .train.cli import add_parsers as add_train_parsers

    add_train_parsers(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # a usage error (2, said on stderr) or --help (0): a status, in-process too
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _warn_line  # one line per warning, not Python's file:line form
            return _run(args)
    except KeyboardInterrupt:
        print(f"\npyfastscan {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: one line on the terminal, the traceback in a log file
        folder = getattr(args, "out", None) or os.getcwd()
        print(f"pyfastscan {args.command}: {_internal_error(folder, ' '.join(sys.argv), exc)}", file=sys.stderr)
        return EXIT_INTERNAL


def _run(args) -> int:
    if args.command == "info":
        from .backends import build_info, format_build_info

        info = build_info()
        from .precision import auto_precision

        from .pipeline.readers import cpu_cores, default_readers, reader_cores

        prec, why = auto_precision("cpu")
        info["precision_auto"] = {"cpu": {"precision": prec, "reason": why}}
        n, cores = default_readers(), cpu_cores()
        pinned = reader_cores(n)
        info["readers"] = {"default": n, "cores": cores, "pinned_cores": None if pinned is None else list(pinned)}
        where = "free to move" if pinned is None else "each pinned to one of cores " + ", ".join(map(str, pinned))
        print(json.dumps(info, indent=2) if args.json else
              format_build_info(info) + f"\nprecision auto on the CPU: {prec} ({why})"
              f"\nreaders by default: {n} for {cores} core(s), {where} (beside an accelerator, and in "
              "a CPU scan's read phases)")
        return 0
    if args.command == "demo":
        from . import demo

        if args.train:  # the demo runs `pyfastscan train` through this command line (passed in: demo imports no CLI)
            return demo.train_main(args.out or "pyfastscan-demo-train", cli=main)
        return demo.main(args.out or "pyfastscan-demo")
    if args.command == "models":
        return _models(args)
    if args.command == "export":
        return _export(args)
    if args.command == "bench":
        return _bench(args)
    if args.command == "scan":
        if args.workers is not None and args.engine != "ray":
            print("pyfastscan scan: error: --workers are Ray workers: add --engine ray (reader threads: --readers)",
                  file=sys.stderr)
            return EXIT_USAGE
        return _slides(args, _scan_one)
    if args.command == "cohort":
        from .cohort.cli import main as cohort

        return cohort(args, _job_model, _common)
    if args.command == "mitosis":
        if args.theta1 > args.theta2:
            print(f"pyfastscan mitosis: error: --theta1 ({args.theta1:g}) must not exceed --theta2 "
                  f"({args.theta2:g})", file=sys.stderr)
            return EXIT_USAGE
        return _slides(args, _mitosis_one)
    if args.command == "evaluate":
        from .eval.cli import main as evaluate

        return evaluate(args)
    if args.command in ("train", "mine"):
        from .train.cli import main as train_main

        return train_main(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
