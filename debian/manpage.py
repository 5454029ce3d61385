#!/usr/bin/env python3
"""Manual pages of the commands, made from their argument parsers (f2bzmq.cli, f2bzmq.console).

    python3 debian/manpage.py OUTDIR      writes OUTDIR/f2bzmq-ROLE.1 for each role, and
                                          OUTDIR/f2bzmq-cluster.1 for the cluster console

Our own generator rather than Debian 12's argparse-manpage (1.2.2): that one has no
way to name the installed program (the parsers call themselves fail2ban-ROLE, the
commands are f2bzmq-ROLE), drops the epilog that lists the commands, writes no
one-line description in NAME, and fills AUTHORS with "<<UNSET --author OPTION>>".
Needs only the standard library: f2bzmq.cli and f2bzmq.console import nothing else until
a role runs or a command asks a hub.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from f2bzmq import __version__  # noqa: E402
from f2bzmq.cli import ROLES, VERBS, build_parser  # noqa: E402
from f2bzmq.config import DEFAULT_PATHS, load_config  # noqa: E402
from f2bzmq.console import COMMANDS  # noqa: E402
from f2bzmq.console import build_parser as console_parser  # noqa: E402

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


CONSOLE_FILES = [
    (CONF, "The configuration: [general] hubs and keys_dir, [console] admin."),
    (
        "/etc/fail2ban-cluster/keys/admins/NAME.key_secret",
        "The operator's admin key pair; every hub holds NAME.key in its keys_dir/admins/.",
    ),
    ("/etc/fail2ban-cluster/keys/hub.key", "The hubs' public key."),
    (
        "/etc/fail2ban-cluster/keys/NODE.key_secret",
        "join: the node's key pair, made if there is none.",
    ),
]

CONSOLE_EXIT_STATUS = [
    ("0", "Success."),
    ("1", "A hub refused the request (the reason is printed), or no hub answered."),
    ("2", "A mistake in the command line, a file or the configuration."),
]


# The options every console command takes, listed once under OPTIONS.
COMMON = {"help", "config", "json", "hub", "admin", "timeout"}


def _synopsis(action: argparse.Action) -> str:
    if action.option_strings:
        flag = action.option_strings[-1]
        value = "" if action.nargs == 0 else " " + (action.metavar or action.dest.upper())
        return f"[{flag}{value}]"
    name = action.metavar or ("|".join(action.choices) if action.choices else action.dest)
    return f"[{name}]" if action.nargs == "?" else name


def console_manpage() -> str:
    """The cluster console's page: each command with its own options."""
    program = "f2bzmq-cluster"
    parser = console_parser()
    parser.prog = program
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    lines = [
        f'.TH {program.upper()} 1 "" "f2bzmq {__version__}" "f2bzmq manual"',
        ".SH NAME",
        f"{roff(program)} \\- run the cluster from one place: its bans, nodes, keys and allowlist",
        ".SH SYNOPSIS",
        ".nf",
        roff(f"{program} [OPTIONS] COMMAND [ARGUMENTS]"),
        ".fi",
        ".SH DESCRIPTION",
        roff(parser.description or ""),
        ".PP",
        roff(
            "Each command asks the first hub of [general] hubs that answers, on its report "
            "port, encrypted with the operator's admin key; operators' decisions are recorded "
            "with who made them and why, broadcast like any ban, and reach every hub."
        ),
        ".PP",
        f"The command is also {bold('python3 -m f2bzmq cluster')}, and "
        f"{bold('fail2ban-cluster.py')} in a clone of the source.",
        ".SH COMMANDS",
    ]
    for name, sub in commands.choices.items():
        own = [action for action in sub._actions if action.dest not in COMMON]
        usage = " ".join([program, name, *(_synopsis(action) for action in own)])
        lines += [".TP", bold(usage), roff(COMMANDS[name])]
        options = [action for action in own if action.option_strings and action.help]
        if options:
            lines.append(".RS")
            for action in options:
                lines += [".TP", option_line(action), roff(action.help)]
            lines.append(".RE")
    lines.append(".SH OPTIONS")
    for action in parser._actions:
        if action.option_strings and action.help:
            lines += [".TP", option_line(action), roff(action.help)]
    lines.append(".SH FILES")
    for path, text in CONSOLE_FILES:
        lines += [".TP", italic(path), roff(text)]
    lines.append(".SH EXIT STATUS")
    for code, text in CONSOLE_EXIT_STATUS:
        lines += [".TP", bold(code), roff(text)]
    pages = [(f"f2bzmq-{role}", 1) for role in ROLES] + [("fail2ban-client", 1)]
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
    (folder / "f2bzmq-cluster.1").write_text(console_manpage(), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
