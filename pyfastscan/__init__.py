"""pyfastscan: fast, dense CNN inference on whole-slide images.

    >>> import pyfastscan
    >>> pyfastscan.build_info()["backends"]["cpu"]["usable"]
    True
"""
from ._version import __version__  # noqa: E402

from . import nn, ops  # noqa: E402
from .backends import build_info  # noqa: E402
from .dense import DenseModel, Geometry, geometry, to_dense  # noqa: E402
from .errors import BackendUnavailableError, InvalidArgumentError, ModelOutputError, PyfastscanError  # noqa: E402
from .pipeline import ScanResult, scan_slide  # noqa: E402
from .slide import SlideError, open_slide  # noqa: E402
from . import mitosis  # noqa: E402
from .mitosis import MitosisResult, detect_mitoses  # noqa: E402
from .weights import WeightsError, load_weights  # noqa: E402
from . import eval, io, models  # noqa: E402,A004
from .models import ModelCard, load_model, save_model  # noqa: E402

__all__ = ["build_info", "nn", "ops", "to_dense", "geometry", "Geometry", "DenseModel", "load_weights", "WeightsError", "PyfastscanError", "InvalidArgumentError", "BackendUnavailableError", "ModelOutputError",
           "scan_slide", "ScanResult", "open_slide", "SlideError", "mitosis", "detect_mitoses", "MitosisResult", "models", "io", "eval",
           "save_model", "load_model", "ModelCard", "__version__"]
