#!/usr/bin/env python3
"""Manual pages of the role commands, made from their argument parsers (f2bzmq.cli).

    python3 debian/manpage.py OUTDIR      writes OUTDIR/f2bzmq-ROLE.1 for each role

Our own generator rather than Debian 12's argparse-manpage (1.2.2): that one has no
way to name the installed program (the parsers call themselves fail2ban-ROLE, the
commands are f2bzmq-ROLE), drops the epilog that lists the commands, writes no
one-line description in NAME, and fills AUTHORS with "<<UNSET --author OPTION>>".
Needs only the standard library: f2bzmq.cli imports nothing else until a role runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from f2bzmq import __version__  # noqa: E402
from f2bzmq.cli import ROLES, VERBS, build_parser  # noqa: E402
from f2bzmq.config import DEFAULT_PATHS, load_config  # noqa: E402

CONF = DEFAULT_PATHS[0]
CONF_BASE = CONF.removesuffix(".conf")
CONF_SOURCE = str(Path(__file__).resolve().parent.parent / "fail2ban-cluster.conf")  # shipped

FILES = [
    (CONF, "The configuration, the same on every server; it lists every key with its default."),
    (
        f"{CONF_BASE}.d/*.conf, {CONF_BASE}.local, {CONF_BASE}.d/*.local",
        "Read after it, in this order (each folder in name order), as fail2ban reads "
        "jail.conf: the last file that sets a key wins.",
    ),
    ("/etc/fail2ban-cluster/keys/", "CURVE keys (keys_dir): hub.key, NODE.key_secret, nodes/."),
    ("RUN_DIR/ROLE.pid, ROLE.sock", "PID file and control socket (run_dir)."),
    ("STATE_DIR/", "Databases: the outbox and the log position, or the hub's ban table."),
    ("/var/log/fail2ban-cluster/ROLE.log", "The log of start (logtarget AUTO); run logs to stderr"),
]

EXIT_STATUS = [
    ("0", "Success; for status: the daemon is running and healthy."),
    ("1", "Failure; for status: the daemon reports a problem or gives no answer within 5 s."),
    ("2", "A mistake in the command line or the configuration (named: file, section, key)."),
    ("3", "status, reload: the daemon is not running."),
]


def role_path(path: str, role: str) -> str:
    """A FILES path for one role: the hub keeps its own folders ([publisher] state_dir and
    run_dir, by default "publisher" in the node's)."""
    config = load_config(CONF_SOURCE)
    return (
        path.replace("RUN_DIR", str(config.run_dir(role)))
        .replace(
            "STATE_DIR",
            config.publisher.state_dir if role == "publisher" else config.general.state_dir,
        )
        .replace("ROLE", role)
    )


def roff(text: str) -> str:
    """Text safe in a roff line: backslashes and leading dots or quotes escaped."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + text if text.startswith((".", "'")) else text


def bold(text: str) -> str:
    return f"\\fB{roff(text)}\\fR"


def italic(text: str) -> str:
    return f"\\fI{roff(text)}\\fR"


def option_line(action: argparse.Action) -> str:
    metavar = action.metavar or (action.dest.upper() if action.nargs != 0 else None)
    names = []
    for name in action.option_strings:
        names.append(bold(name) + (" " + italic(metavar) if metavar else ""))
    return ", ".join(names)


def manpage(role: str) -> str:
    program = f"f2bzmq-{role}"
    parser = build_parser(role)
    parser.prog = program
    summary = ROLES[role].split(". ")[0].rstrip(".")
    usage = parser.format_usage().removeprefix("usage: ").strip()
    lines = [
        f'.TH {program.upper()} 1 "" "f2bzmq {__version__}" "f2bzmq manual"',
        ".SH NAME",
        f"{roff(program)} \\- {roff(summary[0].lower() + summary[1:])}",
        ".SH SYNOPSIS",
        ".nf",
        roff(usage),
        ".fi",
        ".SH DESCRIPTION",
        roff(ROLES[role]),
        ".PP",
        f"The command is also {bold(f'python3 -m f2bzmq {role}')}, and "
        f"{bold(f'fail2ban-{role}.py')} in a clone of the source.",
        ".SH COMMANDS",
    ]
    for verb, text in VERBS.items():
        lines += [".TP", bold(verb), roff(text)]
    lines.append(".SH OPTIONS")
    for action in parser._actions:
        if action.option_strings:
            lines += [".TP", option_line(action), roff(action.help or "")]
    lines.append(".SH FILES")
    for path, text in FILES:
        lines += [".TP", italic(role_path(path, role)), roff(text)]
    lines.append(".SH EXIT STATUS")
    for code, text in EXIT_STATUS:
        lines += [".TP", bold(code), roff(text)]
    others = [f"f2bzmq-{other}" for other in ROLES if other != role]
    pages = [(name, 1) for name in [*others, "fail2ban-client"]] + [("jail.conf", 5)]
    lines += [".SH SEE ALSO", ", ".join(f"{bold(name)}({section})" for name, section in pages)]
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    folder = Path(argv[0])
    folder.mkdir(parents=True, exist_ok=True)
    for role in ROLES:
        (folder / f"f2bzmq-{role}.1").write_text(manpage(role), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
