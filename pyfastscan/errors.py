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


ERROR_LOG = "pyfastscan-error.log"  # where an internal error's traceback is kept


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (whitespace runs collapsed)."""
    return " ".join(str(exc).split())


def internal_error(folder, where: str, exc: BaseException) -> str:
    """Keep the traceback of an unexpected exception in ``folder``/ERROR_LOG (a temporary
    file when the folder cannot be written); returns the one line the terminal gets."""
    import os
    import tempfile
    import traceback

    from ._version import __version__

    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        os.makedirs(folder, exist_ok=True)
        log = os.path.join(folder, ERROR_LOG)
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"pyfastscan {__version__}: {where}\n{text}\n")
    except OSError:
        fd, log = tempfile.mkstemp(prefix="pyfastscan-error-", suffix=".log")
        with os.fdopen(fd, "w") as f:
            f.write(text)
    return f"internal error ({type(exc).__name__}: {exc}); please report it with the traceback in {log}"


def failure_reason(exc: BaseException, folder, where: str):
    """(the one-line reason a slide failed, whether it is an internal error). Errors a user
    can act on are pyfastscan's own, the system's (OSError) and running out of memory;
    anything else is a bug, whose traceback is kept in ``folder``/ERROR_LOG."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", False
    if isinstance(exc, MemoryError):
        return f"out of memory ({one_line(exc) or 'MemoryError'}); try a smaller --memory-mib or --roi-outputs", False
    if isinstance(exc, (PyfastscanError, OSError)):
        return one_line(exc), False
    return internal_error(folder, where, exc), True
