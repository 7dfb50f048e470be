"""Typed errors. Everything pyfastscan raises on purpose derives from PyfastscanError."""


class PyfastscanError(Exception):
    """Base class of every error pyfastscan raises on purpose."""


class InvalidArgumentError(PyfastscanError, ValueError):
    """An argument has a value the operation cannot take; the message names it."""


class BackendUnavailableError(PyfastscanError, RuntimeError):
    """No backend (or not the requested one) can run this call; the message says why."""


class ModelOutputError(PyfastscanError, ValueError):
    """The model produced values that are not probabilities (NaN or infinity)."""


class SlideError(PyfastscanError, ValueError):
    """A slide that cannot be used: missing, unreadable, or without a resolution."""


class NoResolutionError(SlideError):
    """The slide does not say how many micrometres a pixel is."""
