"""Manual pages of the role commands, made from their argument parsers by debian/manpage.py."""

import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest

from f2bzmq.cli import ROLES, VERBS, build_parser

GENERATOR = Path(__file__).resolve().parent.parent / "debian" / "manpage.py"


def load_generator():
    spec = importlib.util.spec_from_file_location("manpage", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("role", ROLES)
def test_a_page_per_command_with_every_option_and_command_of_its_parser(tmp_path, role):
    generator = load_generator()
    assert generator.main([str(tmp_path)]) == 0
    page = (tmp_path / f"f2bzmq-{role}.1").read_text()
    assert page.startswith(f".TH F2BZMQ-{role.upper()} 1 ")
    name = page.split(".SH NAME\n", 1)[1].splitlines()[0]
    assert name.startswith(f"f2bzmq\\-{role} \\- ")  # the whatis line apropos reads
    options = [option for action in build_parser(role)._actions for option in action.option_strings]
    assert {"-c", "--config", "--dir", "--version"} <= set(options)
    for option in options:
        assert generator.bold(option) in page, option
    for verb in VERBS:
        assert f".TP\n\\fB{verb}\\fR\n" in page, verb
    for section in ("SYNOPSIS", "DESCRIPTION", "COMMANDS", "OPTIONS", "FILES", "EXIT STATUS"):
        assert f".SH {section}\n" in page


def test_pages_render_without_a_warning(tmp_path):
    groff = shutil.which("groff")
    if groff is None:
        pytest.skip("needs groff (Debian: groff-base)")
    load_generator().main([str(tmp_path)])
    for page in sorted(tmp_path.glob("*.1")):
        done = subprocess.run(
            [groff, "-man", "-ww", "-z", "-Tutf8", str(page)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert done.returncode == 0 and done.stderr == "", (page.name, done.stderr)


def test_the_console_has_a_page_with_every_command_and_option():
    from f2bzmq.console import COMMANDS, build_parser

    generator = load_generator()
    page = generator.console_manpage()
    assert page.startswith(".TH F2BZMQ-CLUSTER 1 ")
    assert page.split(".SH NAME\n", 1)[1].startswith("f2bzmq\\-cluster \\- ")
    for command in COMMANDS:
        assert f"\\fBf2bzmq\\-cluster {command}" in page, command
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command")
    options = {
        option
        for sub in [parser, *commands.choices.values()]
        for action in sub._actions
        for option in action.option_strings
    }
    assert {"--json", "--hub", "--hold", "--fingerprint", "--hub-key", "--all-jails"} <= options
    for option in options:
        assert generator.bold(option) in page, option
    for section in ("SYNOPSIS", "DESCRIPTION", "COMMANDS", "OPTIONS", "FILES", "EXIT STATUS"):
        assert f".SH {section}\n" in page
