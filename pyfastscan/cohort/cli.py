"""`pyfastscan cohort SLIDE... | --list slides.txt --out DIR [--engine local|ray] ...`: every
option of `pyfastscan scan`, plus the cohort's own. The parser is built with the scan
subcommand's builders (passed in by pyfastscan.cli, which this module does not import)."""
import os
import shlex
import sys

from ..io.files import COHORT_CSV
from ..validate import cli_type

EPILOG_COHORT = ("Each slide goes to OUT/<its path relative to the slides' common folder, without extension>/; "
                 "OUT/cohort.csv has a row per slide, OUT/cohort.jsonl an event per line. A re-run skips the "
                 "slides done with the same slide, model and options. ")


def add_parser(sub, slide_job_parser, scan_options) -> None:
    p = slide_job_parser(sub, "cohort", "scan a cohort: one folder per slide, finished slides skipped on a re-run, "
                                        "lost workers retried, locally or on Ray", "vgg16_fcn", 2, [
                             "pyfastscan cohort slides/*/*.tif --weights model.safetensors --out cohort",
                             "pyfastscan cohort --list slides.txt --weights model.safetensors --out cohort "
                             "--engine ray --workers 2",
                             "pyfastscan cohort --list slides.txt --weights model.safetensors --out cohort "
                             "--engine ray --ray-address auto  # a cluster started with `ray start --head`"],
                         slides="*")
    scan_options(p)
    p.epilog = EPILOG_COHORT + "\n\n" + p.epilog
    p.add_argument("--list", default=None, metavar="slides.txt",
                   help="a file naming one slide per line (blank lines and # comments skipped; relative paths are "
                        "relative to the file's folder), added to the SLIDEs")
    p.add_argument("--gpus-per-worker", type=cli_type("gpus_per_worker"), default=None,
                   help="GPUs each Ray worker holds (default 1 on a cluster with GPUs, else 0; 0.5: two per GPU)")
    p.add_argument("--cpus-per-worker", type=cli_type("cpus_per_worker"), default=None,
                   help="CPUs each Ray worker holds (default: the cluster's CPUs shared among the workers)")
    p.add_argument("--retries", type=cli_type("retries"), default=2,
                   help="attempts after the first for a slide whose worker was lost or that failed reading (default "
                        "2); each resumes from the slide's checkpoint")
    p.add_argument("--no-resume", dest="no_resume", action="store_true",
                   help="start slides an interrupted run left half done over (default: resume them)")


def read_list(path: str) -> list:
    """The slides a --list file names."""
    from ..errors import InvalidArgumentError

    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read(64 << 20).splitlines()
    except OSError as exc:
        raise InvalidArgumentError(f"--list {path}: {exc.strerror}") from None
    root = os.path.dirname(os.path.abspath(path))
    names = (ln.strip() for ln in lines)
    return [n if os.path.isabs(n) else os.path.join(root, n) for n in names if n and not n.startswith("#")]


def main(args, load_model, common) -> int:
    """Run the cohort (``load_model(args)``: the model, threads set, or None after saying
    why not; ``common(args)``: the scan options); the exit status: 0 every slide done, 1
    some failed, 2 usage error, 3 some failed with an internal error (traceback in the
    slide folder's log)."""
    from ..errors import PyfastscanError, one_line
    from .job import scan_cohort

    try:
        slides = list(args.slides) + (read_list(args.list) if args.list else [])
    except PyfastscanError as exc:
        print(f"pyfastscan cohort: {exc}", file=sys.stderr)
        return 2
    if not slides:
        print("pyfastscan cohort: error: no slides: give SLIDE paths or --list slides.txt", file=sys.stderr)
        return 2
    model = load_model(args)  # None: it said why
    if model is None:
        return 2
    options = common(args)
    progress = options.pop("progress")
    ray = args.engine == "ray"
    try:
        res = scan_cohort(slides, model, args.out, engine=args.engine, address=args.ray_address if ray else None,
                          workers=args.workers, gpus_per_worker=args.gpus_per_worker,
                          cpus_per_worker=args.cpus_per_worker, retries=args.retries, resume=not args.no_resume,
                          overwrite=args.overwrite, progress=progress, heatmap_dtype="float32" if args.heatmap_float
                          else "uint8", command=" ".join(shlex.quote(a) for a in sys.argv), **options)
    except PyfastscanError as exc:
        print(f"pyfastscan cohort: {one_line(exc)}", file=sys.stderr)
        return 2
    for r in res.records:
        if r.status == "failed":
            print(f"pyfastscan cohort: {r.slide}: FAILED after {r.attempts} attempt(s): {r.error}", file=sys.stderr)
        else:
            print(f"{r.slide}: {r.status}, score {r.score:.4f}, {r.detections} detections -> {r.folder}")
    failed = res.count("failed")
    print(f"pyfastscan cohort: {res.count('done')} done, {res.count('skipped')} skipped, {failed} failed of "
          f"{len(res.records)} -> {os.path.join(args.out, COHORT_CSV)}", file=sys.stderr)
    if failed:
        return 3 if any(r.internal for r in res.records) else 1
    return 0
