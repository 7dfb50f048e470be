"""Every numeric option of every command, and the same arguments of the public functions,
checked in one place (issue 14).

    from pyfastscan.validate import check, cli_type
    alpha = check("alpha", alpha)                              # a public function's argument
    p.add_argument("--alpha", type=cli_type("alpha"))          # the command line

A value is refused with one line naming the option and the allowed range, e.g.
``map_threshold must be a number in [0, 1), got nan``; on the command line argparse adds
the option's spelling: ``argument --map-threshold: must be a number in [0, 1), got 'nan'``.
Booleans, strings (a probability written "0.9" in JSON), NaN and infinities are never
numbers here.
"""
import argparse
import math
import numbers
from dataclasses import dataclass
from typing import Optional

from .errors import InvalidArgumentError


@dataclass(frozen=True)
class Number:
    """A finite int or float in a range; ``lo_open`` / ``hi_open`` exclude the bound."""

    integer: bool = False
    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False
    hi_open: bool = False

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a number"
        lo, hi = self.lo, self.hi
        if lo is not None and hi is not None:
            return f"{kind} in {'(' if self.lo_open else '['}{lo:g}, {hi:g}{')' if self.hi_open else ']'}"
        if lo is not None:
            return f"{kind} {'>' if self.lo_open else '>='} {lo:g}"
        if hi is not None:
            return f"{kind} {'<' if self.hi_open else '<='} {hi:g}"
        return f"a finite {kind[2:] if self.integer else 'number'}"

    def problem(self, v) -> Optional[str]:
        """None if ``v`` is allowed, else what is wrong with it."""
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            return f"must be {self.describe()}, got {type(v).__name__} {v!r}"
        if not math.isfinite(v):
            return f"must be {self.describe()}, got {v!r}"
        if self.integer and v != int(v):
            return f"must be {self.describe()}, got {v!r}"
        lo, hi = self.lo, self.hi
        if (lo is not None and (v < lo or (self.lo_open and v == lo))) or \
                (hi is not None and (v > hi or (self.hi_open and v == hi))):
            return f"must be {self.describe()}, got {v!r}"
        return None


POSITIVE = Number(lo=0, lo_open=True)
PROBABILITY = Number(lo=0, hi=1, hi_open=True)  # a threshold a probability must exceed
UNIT = Number(lo=0, hi=1)  # a fraction, both ends allowed

# name -> allowed values; public arguments and command-line options share the names
# (--map-threshold is map_threshold).
OPTIONS = {
    "alpha": Number(integer=True, lo=1, hi=256),
    "num_classes": Number(integer=True, lo=2, hi=1 << 16),
    "positive_class": Number(integer=True, lo=0, hi=(1 << 16) - 1),
    "roi_outputs": Number(integer=True, lo=1, hi=1 << 16),
    "workers": Number(integer=True, lo=1, hi=256),  # Ray workers (engine="ray")
    "retries": Number(integer=True, lo=0, hi=100),  # cohort: attempts after the first for a slide that fails
    "gpus_per_worker": Number(lo=0, hi=64),  # cohort: GPUs each Ray worker holds (a fraction shares one)
    "cpus_per_worker": Number(lo=0, hi=4096, lo_open=True),  # cohort: CPUs each Ray worker holds
    "readers": Number(integer=True, lo=1, hi=256),  # reader threads decoding ROIs ahead of the model
    "patch": Number(integer=True, lo=1, hi=1 << 16),
    "stride": Number(integer=True, lo=1, hi=1 << 16),
    "batch_size": Number(integer=True, lo=1, hi=1 << 20),
    "step": Number(integer=True, lo=1, hi=1 << 16),  # patch mode: pixels between patches
    "side": Number(integer=True, lo=1, hi=1 << 20),  # a ROI side, pixels
    "repeats": Number(integer=True, lo=1, hi=1000),
    "steps": Number(integer=True, lo=1, hi=10_000_000),
    "threads": Number(integer=True, lo=0, hi=4096),  # 0: torch's choice
    "memory_mib": Number(integer=True, lo=0, hi=1 << 30),  # 0: the default budget
    "memory": Number(integer=True, lo=1),  # bytes
    "mpp": Number(lo=0, hi=1e4, lo_open=True),
    "scan_mpp": Number(lo=0, hi=1e4, lo_open=True),
    "slide_mpp": Number(lo=0, hi=1e4, lo_open=True),
    "model_mpp": Number(lo=0, hi=1e4, lo_open=True),
    "default_mpp": Number(lo=0, hi=1e4, lo_open=True),
    "threshold": PROBABILITY,
    "map_threshold": PROBABILITY,
    "delta": PROBABILITY,
    "nms_um": Number(lo=0, hi=1e6),
    "step_um": Number(lo=0, hi=1e6, lo_open=True),
    "theta1": Number(lo=0),
    "theta2": Number(lo=0),
    "level": Number(integer=True, lo=0, hi=20),  # evaluate froc: mask level, downsample 2^level
    "resolution": Number(lo=0, hi=1e4, lo_open=True),
    "radius_px": Number(lo=0, hi=1e7, lo_open=True),
    "radius_um": Number(lo=0, hi=1e7, lo_open=True),
    "f1_threshold": Number(lo=0, hi=1),  # evaluate f1 --threshold: keep probability >= this
}


def check(name: str, value, spec: Optional[Number] = None):
    """``value`` if allowed for option ``name`` (as an int for integer options), else
    InvalidArgumentError naming it and the allowed range."""
    spec = spec or OPTIONS[name]
    why = spec.problem(value)
    if why:
        raise InvalidArgumentError(f"{name} must{why[4:]}")
    return int(value) if spec.integer else float(value)


def check_optional(name: str, value, spec: Optional[Number] = None):
    """:func:`check`, letting None (the default) through."""
    return None if value is None else check(name, value, spec)


def cli_type(name: str, spec: Optional[Number] = None):
    """An argparse ``type=`` for option ``name``: parses the text and checks it, so a bad
    value is a usage error (exit status 2) naming the option."""
    spec = spec or OPTIONS[name]

    def parse(text: str):
        try:
            v = int(text) if spec.integer else float(text)
        except ValueError:
            try:
                v = float(text)  # "2.0" for an integer option is fine, "2.5" is refused below
            except ValueError:
                raise argparse.ArgumentTypeError(f"must be {spec.describe()}, got {text!r}") from None
        why = spec.problem(v)
        if why:
            raise argparse.ArgumentTypeError(f"{why.rsplit(', got', 1)[0]}, got {text!r}")
        return int(v) if spec.integer else v

    parse.__name__ = name  # argparse names the type in some messages
    return parse
