"""The command line as a new user reads it (issue 17, item 5): --version, help for every
option with its default, examples in every subcommand's help, and a demo that writes
where it is told and refuses an unwritable folder in one line."""
import argparse
import os
import subprocess
import sys

import pytest

import pyfastscan
from helpers import unwritable_folder
from pyfastscan.cli import build_parser, main


def _commands(parser, prefix=("pyfastscan",)):
    """(words, parser) for the parser and every subcommand below it."""
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, prefix + (name,))


COMMANDS = list(_commands(build_parser()))


def test_every_command_is_walked():
    names = {" ".join(words) for words, _ in COMMANDS}
    assert {"pyfastscan scan", "pyfastscan mitosis", "pyfastscan demo", "pyfastscan evaluate froc"} <= names


@pytest.mark.parametrize("words,parser", COMMANDS, ids=[" ".join(w) for w, _ in COMMANDS])
def test_help_has_examples_and_every_option_says_what_it_does_and_its_default(words, parser):
    text = parser.format_help()
    assert "examples:\n" in text, f"{' '.join(words)} --help has no examples section"
    examples = text.split("examples:\n", 1)[1]
    assert " ".join(words[:2]) in examples  # the examples are of this command
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
            continue
        name = action.option_strings[0] if action.option_strings else action.dest
        assert action.help and len(action.help) > 8, f"{' '.join(words)}: {name} has no help"
        if action.option_strings and not any(action.default is v for v in (None, False, argparse.SUPPRESS)):
            shown = parser._get_formatter()._get_help_string(action)
            assert "default" in shown, f"{' '.join(words)}: {name}'s help does not show its default {action.default!r}"


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"pyfastscan {pyfastscan.__version__}"


def test_demo_refuses_an_unwritable_folder_in_one_line(tmp_path):
    out = unwritable_folder(tmp_path)
    r = subprocess.run([sys.executable, "-m", "pyfastscan", "demo", "--out", str(out)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert str(out) in r.stderr and "--out" in r.stderr
    assert r.stdout == ""  # refused before any work


def test_demo_train_writes_beside_the_caller_by_default():
    from pyfastscan.demo_train import WEIGHTS, build_parser

    out = build_parser().parse_args([]).out
    assert os.path.dirname(out) == "" and os.path.abspath(out) != os.path.abspath(WEIGHTS)
