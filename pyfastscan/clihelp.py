"""How every `pyfastscan` subcommand presents itself: help for each option with its
default, and an examples section. Subcommands defined outside cli.py (eval/cli.py, ...)
use :func:`add_command` too, so ``pyfastscan X --help`` reads the same for every X;
tests/test_cli_help.py walks the whole parser and holds every command to it."""
import argparse
from typing import Optional

from .errors import ERROR_LOG

EXIT_CODES = ("exit status: 0 every slide done, 1 some slides failed (each reported on one line), "
              "2 usage error (a bad option or weights file), 3 internal error (the traceback is in "
              f"{ERROR_LOG} in the output folder)")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the layout of the description and the examples, and adds "(default: X)" to an
    option's help unless the help already says its default or there is none to say."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or not action.option_strings or any(action.default is v for v in (None, False, argparse.SUPPRESS)):
            return text
        return f"{text} (default: %(default)s)"


def add_command(sub, name: str, *, help: str, examples, exit_codes: str = EXIT_CODES, **kwargs):
    """``sub.add_parser(name)`` with the package's formatter and an epilog of ``examples``
    (lines ``command  # what it does``) followed by the exit statuses."""
    lines = "\n".join(f"  {e}" for e in examples)
    epilog = f"examples:\n{lines}" + (f"\n\n{exit_codes}" if exit_codes else "")
    return sub.add_parser(name, help=help, description=kwargs.pop("description", help), epilog=epilog,
                          formatter_class=HelpFormatter, **kwargs)


def parse_arch_kwargs(text: Optional[str]) -> Optional[dict]:
    """--arch-kwargs: a JSON object, or None when not given (ValueError naming the option)."""
    import json

    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"--arch-kwargs is not JSON ({exc}): {text!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"--arch-kwargs must be a JSON object, got {text!r}")
    return value
