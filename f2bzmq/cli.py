"""Command lines of the roles: `fail2ban-<role>.py [-c CONF] start|stop|restart|status|run`."""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .config import DEFAULT_PATHS, ConfigError, find_config, load_config
from .daemon import RoleControl

ROLES = {
    "monitor": (
        "Follow fail2ban.log on this node and report every Ban and Unban to the hub(s). "
        "Events wait in a durable outbox until the hub ACKs them."
    ),
    "publisher": (
        "The hub: accept reports from monitors, keep the cluster's ban table and "
        "broadcast each change, with snapshots for nodes that (re)connect."
    ),
    "subscriber": (
        "Apply the cluster's bans to this node's fail2ban, in its sync jail, "
        "through fail2ban's own socket."
    ),
}

VERBS = {
    "run": "run in the foreground until SIGTERM or Ctrl-C (for systemd and containers)",
    "start": "start as a daemon with a PID file",
    "stop": "stop the daemon and wait until it has exited",
    "restart": "stop, then start",
    "status": "show what the running daemon reports; exit 3 when it is not running",
}


def build_parser(role: str) -> argparse.ArgumentParser:
    verbs = "\n".join(f"  {verb:<8} {text}" for verb, text in VERBS.items())
    parser = argparse.ArgumentParser(
        prog=f"fail2ban-{role}",
        description=ROLES[role],
        epilog=f"commands:\n{verbs}\n\nconfiguration: -c PATH, else {' or '.join(DEFAULT_PATHS)}; "
        "a .local file beside it overrides it.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "-c", "--config", metavar="PATH", help="fail2ban-cluster.conf to read (see below)"
    )
    parser.add_argument("--version", action="version", version=f"f2bzmq {__version__}")
    parser.add_argument("command", choices=list(VERBS), metavar="command", help="|".join(VERBS))
    return parser


def factory(role: str):
    """The reactor class of a role, imported late so `--help` stays fast."""
    if role == "monitor":
        from .monitor import Monitor

        return Monitor
    if role == "publisher":
        from .publisher import Publisher

        return Publisher
    from .subscriber import Subscriber

    return Subscriber


def main(role: str, argv: list[str] | None = None) -> int:
    args = build_parser(role).parse_args(argv)
    try:
        config = load_config(find_config(args.config))
    except ConfigError as error:
        print(f"fail2ban-{role}: {error}", file=sys.stderr)
        return 2
    control = RoleControl(role, config, factory(role))
    if args.command == "run":
        return control.run(foreground=True)
    return getattr(control, args.command)()


def umbrella_main(argv: list[str]) -> int:
    """`python3 -m f2bzmq ROLE …` or `python3 -m f2bzmq demo`."""
    usage = "usage: python3 -m f2bzmq {monitor|publisher|subscriber} [-c PATH] COMMAND | demo"
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    if argv[0] in ROLES:
        return main(argv[0], argv[1:])
    if argv[0] == "demo":
        from .demo import main as demo_main

        return demo_main(argv[1:])
    print(f"f2bzmq: unknown command {argv[0]!r}\n{usage}", file=sys.stderr)
    return 2


def monitor_main() -> None:
    sys.exit(main("monitor"))


def publisher_main() -> None:
    sys.exit(main("publisher"))


def subscriber_main() -> None:
    sys.exit(main("subscriber"))
