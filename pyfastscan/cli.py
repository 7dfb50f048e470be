"""Command line: `pyfastscan info`, `pyfastscan demo`."""
import argparse
import json
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="pyfastscan", description="Fast, dense CNN inference on whole-slide images.")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="print what was built and which backends can run here")
    info.add_argument("--json", action="store_true", help="print the full build_info() as JSON")
    sub.add_parser("demo", help="run the demonstration on bundled / generated data")
    args = parser.parse_args(argv)
    if args.command == "info":
        from .backends import build_info, format_build_info

        info = build_info()
        print(json.dumps(info, indent=2) if args.json else format_build_info(info))
        return 0
    if args.command == "demo":
        from . import demo

        return demo.main()
    return 2


if __name__ == "__main__":
    sys.exit(main())
