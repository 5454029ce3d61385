"""The cluster console: `fail2ban-cluster COMMAND` (installed: f2bzmq-cluster).

Run on a hub or on any machine holding an admin key, it asks a hub over the report port,
encrypted with the operator's key (keys_dir/admins/NAME.key_secret), and prints what the
hub answers, as a table or, with --json, as JSON. `join`, run on a new node with the
node's key, asks the hubs to accept it. Every mistake is one line on stderr and an exit
code: 2 for the command line, a file or the configuration, 1 when a hub refuses or can't
be reached.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from . import __version__
from .config import DEFAULT_PATHS, ConfigError, find_config, load_config, seconds, tcp_endpoint

EXIT_OK = 0
EXIT_FAILED = 1  # a hub refused, or none answered
EXIT_USAGE = 2  # the command line, a file, the configuration
PERMANENT = -1

COMMANDS = {
    "bans": "every cluster ban: jail, address, since, until, origins and how each got there, "
    "the nodes that applied it",
    "ban": "ban an address or network on every node (an operator's decision, with a reason)",
    "unban": "lift an address or network everywhere: every node's sync jail and the origin "
    "nodes' own jails; --hold keeps it from being banned again for that long",
    "import": "ban every address or network of FILE (one per line, an optional bantime "
    "after it; - for stdin)",
    "export": "the cluster's bans, one per line with the seconds left (-1: for ever), as "
    "import reads them (--json: an object of address: seconds)",
    "nodes": "the nodes: key fingerprint, address, monitor and subscriber connected, synced, "
    "lag, last report, version; nodes pending|accept NAME|remove NAME",
    "allowlist": "the hub's allowlist; allowlist add|remove CIDR changes it at once",
    "history": "the operators' decisions, as the hub logged them",
    "join": "on a new node: make its key if needed and ask the hubs to accept it",
    "keygen": "make an admin key pair in keys_dir/admins/ (NAME: the operator)",
}


class ConsoleError(Exception):
    """A one-line failure; `code` is the exit code."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fail2ban-cluster",
        description="Run the cluster from one place: its bans, its nodes and their keys, the "
        "hub's allowlist. Asks a hub with an admin key (keys_dir/admins/).",
        epilog=f"configuration: -c PATH, else {' or '.join(DEFAULT_PATHS)}; times take "
        "fail2ban's units (10m, 1h, 1d, -1). `fail2ban-cluster COMMAND --help` says more.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"f2bzmq {__version__}")
    _common(parser, suppress=False)
    commands = parser.add_subparsers(dest="command", metavar="command", required=True)

    def command(name: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=COMMANDS[name], description=COMMANDS[name])
        _common(sub, suppress=True)
        return sub

    bans = command("bans")
    bans.add_argument("--jail", help="only this jail's bans")
    bans.add_argument("--node", help="only the bans this node (or operator.NAME) reported")
    bans.add_argument("--ip", metavar="CIDR", help="only the bans that overlap this network")

    ban = command("ban")
    ban.add_argument("address", metavar="IP|CIDR")
    ban.add_argument("--jail", help="the cluster jail (default: the sync jail)")
    ban.add_argument("--bantime", metavar="TIME", help="default: the hub's default_bantime")
    ban.add_argument("--reason", default="", help="why, kept with the decision")

    unban = command("unban")
    unban.add_argument("address", metavar="IP|CIDR")
    where = unban.add_mutually_exclusive_group()
    where.add_argument("--jail", help="only in this jail (default: every jail)")
    where.add_argument("--all-jails", action="store_true", help="in every jail (the default)")
    unban.add_argument(
        "--hold", metavar="TIME", default="0", help="not banned again by the cluster that long"
    )
    unban.add_argument("--reason", default="", help="why, kept with the decision")

    load = command("import")
    load.add_argument("file", metavar="FILE", help="the list; - reads stdin")
    load.add_argument("--jail", help="the cluster jail (default: the sync jail)")
    load.add_argument("--bantime", metavar="TIME", help="for lines without one")
    load.add_argument("--reason", default="", help="why (default: import FILE)")

    dump = command("export")
    dump.add_argument("file", metavar="FILE", nargs="?", default="-", help="default: stdout")
    dump.add_argument("--jail", help="only this jail's bans")

    nodes = command("nodes")
    nodes.add_argument(
        "action", nargs="?", choices=["pending", "accept", "remove"], help="pending|accept|remove"
    )
    nodes.add_argument("name", nargs="?", metavar="NAME", help="with accept and remove")
    nodes.add_argument("--fingerprint", help="with accept: the key to accept, as the node showed")
    nodes.add_argument("--reason", default="", help="why, kept with the decision")

    allow = command("allowlist")
    allow.add_argument("action", nargs="?", choices=["add", "remove"], help="add|remove")
    allow.add_argument("network", nargs="?", metavar="CIDR")
    allow.add_argument("--reason", default="", help="why, kept with the decision")

    history = command("history")
    history.add_argument("--last", type=int, default=50, metavar="N", help="default: 50")

    join = command("join")
    join.add_argument(
        "--hub-key",
        metavar="KEY",
        help="the hubs' public key (z85), once; give it as --hub-key='KEY': a key may begin "
        "with '-'",
    )
    join.add_argument(
        "--wait", metavar="TIME", default="0", help="wait that long for an operator to accept"
    )

    keygen = command("keygen")
    keygen.add_argument("name", nargs="?", metavar="NAME", help="default: the operator")
    keygen.add_argument("--dir", help="default: keys_dir/admins")
    return parser


def _common(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """Options every command takes, before or after its name (after it, a subcommand's
    parser must not reset what was given before)."""

    def default(value: object) -> object:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument(
        "-c", "--config", metavar="PATH", default=default(None), help="the configuration to read"
    )
    parser.add_argument(
        "--json", action="store_true", default=default(False), help="print JSON, for scripts"
    )
    parser.add_argument(
        "--hub",
        metavar="HOST",
        default=default(None),
        help="ask this hub only (default: each of [general] hubs in turn until one answers)",
    )
    parser.add_argument(
        "--admin",
        metavar="NAME",
        default=default(None),
        help="the admin key keys_dir/admins/NAME.key_secret (default: [console] admin, or you)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=default(5.0),
        metavar="SECONDS",
        help="how long each hub has to answer (default: 5)",
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return Console(args).run()
    except ConsoleError as error:
        print(f"fail2ban-cluster: {error}", file=sys.stderr)
        return error.code
    except KeyboardInterrupt:
        return EXIT_FAILED


class Console:
    """One command: its configuration, its hubs, its output."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        try:
            self.config = load_config(find_config(args.config))
        except ConfigError as error:
            raise ConsoleError(str(error), EXIT_USAGE) from None
        self.operator = args.admin or self.config.console.admin or _login()

    def run(self) -> int:
        return getattr(self, f"do_{self.args.command}")()

    # Talking to the hubs.

    def endpoints(self) -> list[str]:
        if self.args.hub is None:
            return self.config.endpoints("report_port")
        return [tcp_endpoint(self.args.hub, self.config.general.report_port)]

    def ask(self, verb: str, **fields: object) -> dict:
        """One request to the first hub that answers; its result, or ConsoleError."""
        from .hubclient import HubClient, HubError

        try:
            with HubClient(self.config, self.operator, self.args.timeout) as client:
                result = client.request(self.endpoints(), verb, **fields)
        except HubError as error:
            raise ConsoleError(str(error)) from None
        if "error" in result:
            raise ConsoleError(str(result["error"]))
        return result

    def emit(self, data: object, text: str) -> int:
        print(json.dumps(data, indent=2, sort_keys=True) if self.args.json else text)
        return EXIT_OK

    # The commands.

    def do_bans(self) -> int:
        bans, header = self.all_bans(jail=self.args.jail, node=self.args.node, ip=self.args.ip)
        if self.args.json:
            return self.emit(bans, "")
        rows = [
            [
                ban["jail"],
                ban["ip"],
                _clock(ban["since"]),
                _until(ban["until"]),
                ", ".join(_origin(origin) for origin in ban["origins"]),
                " ".join(ban["applied"]) or "-",
            ]
            for ban in bans
        ]
        table = _table(["JAIL", "ADDRESS", "SINCE", "UNTIL", "ORIGIN (HOW)", "APPLIED BY"], rows)
        return self.emit(bans, f"{table}{len(bans)} bans{_on(header)}")

    def all_bans(self, **filters: object) -> tuple[list[dict], dict]:
        bans: list[dict] = []
        result: dict = {}
        for _ in range(10000):  # pages of 5,000: 50 million bans at most
            result = self.ask("bans", offset=len(bans), **filters)
            bans += result["bans"]
            if not result.get("more"):
                break
        return bans, result

    def do_ban(self) -> int:
        ip = self.address(self.args.address)
        bantime = self.bantime(self.args.bantime)
        result = self.ask(
            "ban", items=[[ip, bantime]], jail=self.args.jail, reason=self.args.reason
        )
        if result["refused"]:
            raise ConsoleError(result["refused"][0]["reason"])
        jail = result["jail"]
        text = (
            f"Banned {ip} in {jail} on every node"
            if result["banned"]
            else f"{ip} is banned in {jail} already; this ban is one more origin of it"
        )
        return self.emit(result, text)

    def do_unban(self) -> int:
        ip = self.address(self.args.address, limits=False)
        hold = self.duration(self.args.hold, "--hold")
        result = self.ask("unban", ip=ip, jail=self.args.jail, hold=hold, reason=self.args.reason)
        lifted = result["lifted"]
        if lifted:
            where = ", ".join(f"{item['ip']} in {item['jail']}" for item in lifted)
            text = f"Lifted {where}, on every node"
        else:
            text = f"{ip} is not banned in the cluster; lifted from the nodes' own jails"
        if result.get("held_until"):
            text += f"\nHeld until {_clock(result['held_until'])}: not banned again before"
        return self.emit(result, text)

    def do_import(self) -> int:
        items = list(self.read_list(self.args.file))
        if not items:
            raise ConsoleError(f"{self.args.file}: no address in it", EXIT_USAGE)
        from .protocol import MAX_ADMIN_ITEMS

        reason = self.args.reason or f"import {Path(self.args.file).name}"
        totals = {"banned": 0, "already": 0, "refused": []}
        for start in range(0, len(items), MAX_ADMIN_ITEMS):
            chunk = items[start : start + MAX_ADMIN_ITEMS]
            result = self.ask("ban", items=chunk, jail=self.args.jail, reason=reason)
            totals["banned"] += result["banned"]
            totals["already"] += result["already"]
            totals["refused"] += result["refused"]
            totals["jail"] = result["jail"]
        refused = totals["refused"]
        text = (
            f"Imported {len(items)} addresses into {totals['jail']}: {totals['banned']} banned, "
            f"{totals['already']} banned already, {len(refused)} refused"
        )
        self.emit(totals, text)
        for item in refused:
            print(f"fail2ban-cluster: refused {item['ip']}: {item['reason']}", file=sys.stderr)
        return EXIT_FAILED if refused else EXIT_OK

    def read_list(self, name: str) -> Iterator[list]:
        """[address, bantime or None] of each line: `ADDRESS [BANTIME]`; '#' starts a comment."""
        bantime = self.bantime(self.args.bantime)
        try:
            handle = sys.stdin if name == "-" else open(name, encoding="utf-8")  # noqa: SIM115
        except OSError as error:
            raise ConsoleError(f"{name}: {error.strerror}", EXIT_USAGE) from None
        with handle:
            try:
                for number, line in enumerate(handle, 1):
                    words = line.split("#", 1)[0].split()
                    if not words:
                        continue
                    if len(words) > 2:
                        raise ConsoleError(
                            f"{name}:{number}: expected ADDRESS [BANTIME]", EXIT_USAGE
                        )
                    where = f"{name}:{number}"
                    ip = self.address(words[0], where=where)
                    time_ = self.bantime(words[1], where) if len(words) == 2 else bantime
                    yield [ip, time_]
            except UnicodeDecodeError:
                raise ConsoleError(f"{name}: not a text file", EXIT_USAGE) from None

    def do_export(self) -> int:
        bans, _ = self.all_bans(jail=self.args.jail)
        now = time.time()
        left: dict[str, int] = {}
        for ban in bans:
            seconds_left = PERMANENT if ban["until"] is None else int(ban["until"] - now)
            if seconds_left != PERMANENT and seconds_left <= 0:
                continue
            known = left.get(ban["ip"])
            if known is None or known != PERMANENT and _longer(seconds_left, known):
                left[ban["ip"]] = seconds_left
        if self.args.json:
            lines = json.dumps(left, indent=2) + "\n"
        else:
            lines = "".join(f"{ip} {seconds_left}\n" for ip, seconds_left in left.items())
        if self.args.file == "-":
            sys.stdout.write(lines)
            return EXIT_OK
        try:
            Path(self.args.file).write_text(lines)
        except OSError as error:
            raise ConsoleError(f"{self.args.file}: {error.strerror}", EXIT_USAGE) from None
        print(f"Exported {len(left)} addresses to {self.args.file}", file=sys.stderr)
        return EXIT_OK

    def do_nodes(self) -> int:
        action, name = self.args.action, self.args.name
        if action in ("accept", "remove") and not name:
            raise ConsoleError(f"nodes {action} needs a NAME", EXIT_USAGE)
        if action is None and name:
            raise ConsoleError("nodes takes pending, accept NAME or remove NAME", EXIT_USAGE)
        if action == "accept":
            result = self.ask(
                "accept", node=name, fingerprint=self.args.fingerprint, reason=self.args.reason
            )
            text = f"Accepted node {name}, key {result['fingerprint']}: admitted on every hub"
            if result["replaced"]:
                text += "; its previous key is cut off"
            return self.emit(result, text)
        if action == "remove":
            result = self.ask("remove", node=name, reason=self.args.reason)
            return self.emit(result, f"Removed node {name}: cut off on every hub")
        if action == "pending":
            result = self.ask("pending")
            rows = [
                [
                    p["node"] or "(no name)",
                    p["fingerprint"],
                    p["address"] or "-",
                    p["version"] or "-",
                    _clock(p["first"]),
                    _clock(p["last"]),
                ]
                for p in result["pending"]
            ]
            headers = ["NAME", "FINGERPRINT", "ADDRESS", "VERSION", "FIRST ASKED", "LAST ASKED"]
            text = f"{_table(headers, rows)}{len(rows)} nodes ask to join{_on(result)}"
            refused = [
                [r["fingerprint"], r["node"] or "-", _clock(r["last"]), str(r["count"])]
                for r in result.get("refused", [])
            ]
            if refused:
                headers = ["REFUSED KEY", "REMOVED NODE", "LAST TRIED", "TIMES"]
                text += f"\n\n{_table(headers, refused)}{len(refused)} keys refused lately"
            if result.get("hub_key"):
                key = result["hub_key"]
                # With "=": a z85 key may begin with "-", which would read as an option.
                text += f"\nA new node asks with: {join_command(key)}"
            return self.emit(result["pending"], text)
        result = self.ask("nodes")
        rows = [
            [
                n["node"],
                n["fingerprint"][:19] + "…",
                n["address"] or "-",
                "connected" if n["monitor"] else "-",
                _subscriber(n),
                "yes" if n["synced"] else "no",
                "-" if n["lag"] is None else str(n["lag"]),
                _clock(n["last_report"]),
                n["version"] or "-",
            ]
            for n in result["nodes"]
        ]
        headers = [
            "NAME",
            "FINGERPRINT",
            "ADDRESS",
            "MONITOR",
            "SUBSCRIBER",
            "SYNCED",
            "LAG",
            "LAST REPORT",
            "VERSION",
        ]
        text = f"{_table(headers, rows)}{len(rows)} nodes{_on(result)}"
        return self.emit(result["nodes"], text)

    def do_allowlist(self) -> int:
        action, network = self.args.action, self.args.network
        if action and not network:
            raise ConsoleError(f"allowlist {action} needs a CIDR", EXIT_USAGE)
        if action is None and network:
            raise ConsoleError("allowlist takes add CIDR or remove CIDR", EXIT_USAGE)
        if action == "add":
            ip = self.address(network, limits=False)
            result = self.ask("allow", ip=ip, reason=self.args.reason)
            lifted = len(result["lifted"])
            text = f"Added {ip} to the allowlist; {lifted} cluster bans of it lifted"
            return self.emit(result, text)
        if action == "remove":
            ip = self.address(network, limits=False)
            result = self.ask("disallow", ip=ip, reason=self.args.reason)
            return self.emit(result, f"Took {ip} out of the allowlist")
        result = self.ask("allowlist")
        rows = [
            [row["network"], row["source"], _clock(row.get("since")), row.get("reason") or ""]
            for row in result["allowlist"]
        ]
        text = _table(["NETWORK", "SOURCE", "SINCE", "REASON"], rows).rstrip("\n")
        return self.emit(result["allowlist"], text)

    def do_history(self) -> int:
        decisions: list = []
        since = 0
        for _ in range(100000):  # pages of 500: 50 million decisions at most
            result = self.ask("decisions", since=since)
            decisions += result["decisions"]
            decisions = decisions[-max(1, self.args.last) :]
            if not result["decisions"] or not result.get("more"):
                break
            since = result["decisions"][-1][0]
        from .protocol import Decision

        rows = []
        for _, body in decisions:
            decision = Decision.from_object(body)
            what = decision.describe().split(": ", 1)[1]
            rows.append([_clock(decision.time), decision.operator, what])
        text = _table(["TIME", "OPERATOR", "DECISION"], rows).rstrip("\n")
        return self.emit([body for _, body in decisions], text)

    def do_join(self) -> int:
        from .hubclient import join

        wait = self.duration(self.args.wait, "--wait")
        try:
            return join(self.config, self.args.hub_key, wait, self.endpoints(), self.args.json)
        except (OSError, ValueError) as error:
            raise ConsoleError(str(error)) from None

    def do_keygen(self) -> int:
        from .keys import ADMINS, KeyFileError, keygen
        from .protocol import ProtocolError, check_operator

        name = self.args.name or self.operator
        directory = self.args.dir or Path(self.config.general.keys_dir) / ADMINS
        try:
            check_operator(name)
            public, secret = keygen(name, directory)
        except (KeyFileError, ProtocolError, OSError) as error:
            raise ConsoleError(f"keygen: {error}") from None
        text = (
            f"wrote {public} (public) and {secret} (secret, mode 0600)\n"
            f"a hub admits operator {name} as soon as {public.name} is in its keys_dir/admins/"
        )
        return self.emit({"operator": name, "public": str(public), "secret": str(secret)}, text)

    # Input.

    def address(self, text: str, where: str = "", limits: bool = True) -> str:
        """An address or network in canonical form, within the cluster's limits for a ban."""
        from .protocol import ANY_NETWORK, ProtocolError, canonical_address

        networks = self.config.network_limits() if limits else ANY_NETWORK
        try:
            return canonical_address(text, networks)
        except ProtocolError as error:
            raise ConsoleError(f"{where + ': ' if where else ''}{error}", EXIT_USAGE) from None

    def bantime(self, text: str | None, where: str = "--bantime") -> int | None:
        if text is None:
            return None
        try:
            value = seconds(text)
        except ValueError as error:
            raise ConsoleError(f"{where}: {error}", EXIT_USAGE) from None
        if value == PERMANENT:
            return PERMANENT
        if value != int(value) or not 0 < value < 2**31:
            raise ConsoleError(f"{where}: {text!r} is not a bantime (600, 10m, 1d, -1)", EXIT_USAGE)
        return int(value)

    def duration(self, text: str, what: str) -> float:
        try:
            value = seconds(text)
        except ValueError as error:
            raise ConsoleError(f"{what}: {error}", EXIT_USAGE) from None
        if value < 0:
            raise ConsoleError(f"{what}: {text!r} is negative", EXIT_USAGE)
        return float(value)


def _longer(seconds_left: int, known: int) -> bool:
    return seconds_left == PERMANENT or seconds_left > known


def _login() -> str:
    """The operator: the user who ran sudo, else the user running this."""
    return os.environ.get("SUDO_USER") or getpass.getuser()


def _table(headers: list[str], rows: list[list[str]]) -> str:
    if not rows:
        return ""
    widths = [max(len(str(row[i])) for row in [headers, *rows]) for i in range(len(headers))]
    lines = [
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip()
        for row in [headers, *rows]
    ]
    return "\n".join(lines) + "\n"


def _clock(moment: float | None) -> str:
    if moment is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(moment))


def _until(moment: float | None) -> str:
    return "for ever" if moment is None else _clock(moment)


def _origin(origin: dict) -> str:
    if origin["source"] == "operator":
        who = origin.get("operator") or origin["node"]
        reason = origin.get("reason")
        return f"{who} (operator{': ' + reason if reason else ''})"
    if origin["source"] == "expiry":
        return f"{origin['node']} (node gone: ends at its time)"
    return f"{origin['node']} (report)"


def _on(result: dict) -> str:
    hub, state = result.get("hub"), result.get("state")
    if not hub:
        return ""
    return f" (hub {hub}, state {str(state)[:8]}, sequence {result.get('sequence')})"


def _subscriber(node: dict) -> str:
    """The SUBSCRIBER column of `nodes`: how this hub hears the node's subscriber."""
    if not node["subscriber"]:
        return "-"
    if node.get("relay"):
        return "relay"
    return f"via {node['via']}" if node.get("via") else "connected"


def join_command(hub_key: str) -> str:
    """The command a new node joins with, as `nodes pending` prints it: single quotes hold
    any z85 key for the shell, and "=" keeps argparse from reading one that begins with
    "-" as an option."""
    return f"f2bzmq-cluster join --hub-key='{hub_key}'"
