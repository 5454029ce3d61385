"""Command lines of the roles: `fail2ban-<role>.py [-c CONF] start|stop|restart|status|run`."""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .config import DEFAULT_PATHS, ConfigError, find_config, load_config

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
    "relay": (
        "Forward one hub's update stream to a region's subscribers and answer their "
        "snapshot requests from a copy of its ban table, so the hub serves a few relays "
        "instead of every node."
    ),
}

VERBS = {
    "run": "run in the foreground until SIGTERM or Ctrl-C (for systemd and containers)",
    "start": "start as a daemon with a PID file",
    "stop": "stop the daemon and wait until it has exited",
    "restart": "stop, then start",
    "reload": "read the configuration and keys again; say what needs a restart (as SIGHUP)",
    "status": "show what the running daemon reports; exit 3 when it is not running",
    "keygen": "keygen NAME [--dir DIR]: make a CURVE key pair (default DIR: keys_dir)",
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
    parser.add_argument("name", nargs="?", help="with keygen: hub, or the node's name")
    parser.add_argument("--dir", help="with keygen: where to write the key files")
    return parser


def keygen_main(name: str | None, directory: str | None, config_path: str | None) -> int:
    """Write NAME.key and NAME.key_secret and say where each must go."""
    from .keys import HUB, HUB_USER, KeyFileError, give_to_hub_user, keygen
    from .protocol import ProtocolError

    if not name:
        print("keygen needs a NAME: hub, or a node's name", file=sys.stderr)
        return 2
    try:
        if directory is None:
            directory = load_config(find_config(config_path)).general.keys_dir
        public, secret = keygen(name, directory)
        owner = give_to_hub_user(secret) if name == HUB else None
    except (ConfigError, KeyFileError, ProtocolError, OSError) as error:
        print(f"keygen: {error}", file=sys.stderr)
        return 1
    owned = f", owned by {owner}, the publisher's user" if owner else ""
    print(f"wrote {public} (public) and {secret} (secret, mode 0600{owned})")
    if name == HUB:
        print(
            f"copy {public.name} to keys_dir on every server; {secret.name} to the hubs only, "
            f"where it must be {HUB_USER}'s, the publisher's user (chown {HUB_USER})"
        )
    else:
        print(
            f"keep {secret.name} on {name} only; copy {public.name} into keys_dir/nodes/ "
            "on every hub, then reload the publisher (SIGHUP)"
        )
    return 0


def factory(role: str):
    """The reactor class of a role, imported late so `--help` stays fast."""
    if role == "monitor":
        from .monitor import Monitor

        return Monitor
    if role == "publisher":
        from .publisher import Publisher

        return Publisher
    if role == "relay":
        from .relay import Relay

        return Relay
    from .subscriber import Subscriber

    return Subscriber


def main(role: str, argv: list[str] | None = None) -> int:
    args = build_parser(role).parse_args(argv)
    if args.command == "keygen":
        return keygen_main(args.name, args.dir, args.config)
    try:
        config = load_config(find_config(args.config))
    except ConfigError as error:
        print(f"fail2ban-{role}: {error}", file=sys.stderr)
        return 2
    # Imported here, like the reactors: the parsers (--help, the manual pages made from
    # them at build time) need nothing beyond the standard library.
    from .daemon import RoleControl

    control = RoleControl(role, config, factory(role))
    if args.command == "run":
        return control.run(foreground=True)
    return getattr(control, args.command)()


def umbrella_main(argv: list[str]) -> int:
    """`python3 -m f2bzmq ROLE …`, `python3 -m f2bzmq cluster …` or `python3 -m f2bzmq demo`."""
    usage = (
        "usage: python3 -m f2bzmq {monitor|publisher|subscriber|relay} [-c PATH] COMMAND\n"
        "       python3 -m f2bzmq cluster [-c PATH] COMMAND …   (the cluster console)\n"
        "       python3 -m f2bzmq keygen NAME [--dir DIR]\n"
        "       python3 -m f2bzmq demo"
    )
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    if argv[0] in ROLES:
        return main(argv[0], argv[1:])
    if argv[0] == "keygen":
        parser = argparse.ArgumentParser(prog="python3 -m f2bzmq keygen")
        parser.add_argument("name", help="hub, or the node's name")
        parser.add_argument("--dir", help="where to write the key files (default: keys_dir)")
        parser.add_argument("-c", "--config", metavar="PATH")
        args = parser.parse_args(argv[1:])
        return keygen_main(args.name, args.dir, args.config)
    if argv[0] == "cluster":
        from .console import main as console_main

        return console_main(argv[1:])
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


def cluster_main() -> None:
    from .console import main as console_main

    sys.exit(console_main())


def relay_main() -> None:
    sys.exit(main("relay"))
