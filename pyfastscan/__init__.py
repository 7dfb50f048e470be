"""pyfastscan: fast, dense CNN inference on whole-slide images.

    >>> import pyfastscan
    >>> pyfastscan.build_info()["backends"]["cpu"]["usable"]
    True
"""
__version__ = "0.1.0"

from . import nn, ops  # noqa: E402
from .backends import build_info  # noqa: E402
from .errors import BackendUnavailableError, InvalidArgumentError, PyfastscanError  # noqa: E402

__all__ = ["build_info", "nn", "ops", "PyfastscanError", "InvalidArgumentError", "BackendUnavailableError",
           "__version__"]
