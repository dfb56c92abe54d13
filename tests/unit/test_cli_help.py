"""--version and --help of the three installed commands, through their real parsers."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from client.cli import build_parser as client_parser
from server.cli import build_parser as server_parser
from simulation.cli import build_parser as sim_parser

PARSERS = {"idc-client": client_parser, "idc-server": server_parser, "idc-sim": sim_parser}


@pytest.mark.parametrize("prog", sorted(PARSERS))
def test_version_prints_the_package_version(prog, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        PARSERS[prog]().parse_args(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"{prog} {version('idc-fl')}"


def test_installed_command_answers_version() -> None:
    exe = shutil.which("idc-client", path=str(Path(sys.executable).parent))
    assert exe is not None
    done = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == f"idc-client {version('idc-fl')}"


def _all_parsers(parser: argparse.ArgumentParser, name: str):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _all_parsers(sub, f"{name} {sub_name}")


@pytest.mark.parametrize("prog", sorted(PARSERS))
def test_help_shows_defaults_and_never_an_empty_one(prog) -> None:
    shown = 0
    for name, parser in _all_parsers(PARSERS[prog](), prog):
        text = parser.format_help()
        assert "(default: None)" not in text, name
        assert "(default: False)" not in text, name
        assert "(default: [])" not in text, name
        shown += text.count("(default: ")
    assert shown > 0


def test_subcommand_help_names_each_default() -> None:
    (predict,) = [
        p for n, p in _all_parsers(client_parser(), "idc-client") if n.endswith("predict")
    ]
    text = " ".join(predict.format_help().split())  # argparse wraps lines
    assert "(default: auto)" in text and "(default: 10)" in text
    assert "(default: the model record's, else 0.5)" in text
    (start,) = [p for n, p in _all_parsers(server_parser(), "idc-server") if n.endswith("start")]
    assert "(default: 127.0.0.1:8000)" in " ".join(start.format_help().split())
