"""Burst apply: COUNT addresses banned cluster-wide at once, until every node enforces them.

For each action of the sync jail (none, dummy, nftables-multiport, f2bzmq-nftset) it
runs a hub and NODES+1 real fail2ban nodes (the lab), injects COUNT ban events into
the hub as node1 would report them (a real node connection, CURVE keys, pipelined),
and times, from the first event sent, until every other node's fail2ban lists all of
them (`get cluster banip`) and, for the nftables actions, until the node's nft set
holds them all. In the same run it measures, for each action:

- the floor: the time fail2ban itself needs to run the action COUNT times, from batched
  `set cluster banip` commands over the socket into a fresh server (1,000 a command)
  until `get cluster banip` lists all (and until the set holds all);
- the naive way: one `fail2ban-client set cluster banip IP` process per address, timed
  on a sample of addresses and extrapolated to COUNT.

Every fail2ban-server runs in a network namespace the benchmark makes (and removes),
so the nftables actions change only those namespaces' firewalls.

    python3 bench/burst.py --count 200 --json result.json

A benchmark, not a test: it prints figures and never fails on speed; it exits
non-zero only when a run went wrong (a ban never arrived, a process failed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from common import BenchError, report, stop_on_sigterm, table

from f2bzmq import protocol
from f2bzmq.delivery import reports
from f2bzmq.fail2ban_client import Fail2banClient, Fail2banError
from f2bzmq.lab import CLIENT_PROGRAM, Cluster, Fail2banServer, wait_until
from f2bzmq.protocol import BanEvent
from tests.support.netns import Namespaces, netns_holds
from tests.support.nodeclient import NodeClient

JAIL = "cluster"
REPORTER = "node1"  # the node whose reports are injected; its own subscriber ignores them
BANTIME = 86400
COMMAND_BATCH = 1000  # addresses per `set cluster banip` of the floor
WINDOW = 500  # events sent before their ACKs are read, so no reply is ever dropped
# The hub's settings that differ from the shipped defaults: the injected reports are never
# told to wait (the table says so).
HUB_SETTINGS = {"rate_limit": "1000000", "rate_burst": "1000000", "rate_peak": "1000000"}

# action name -> (the jail's action line, the nft table and set holding its bans, or None)
ACTIONS: dict[str, tuple[Callable[[Fail2banServer], str], tuple[str, str] | None]] = {
    "none": (lambda server: "", None),
    "dummy": (lambda server: f"dummy[target={server.directory / 'cluster.dummy'}]", None),
    "nftables-multiport": (
        lambda server: 'nftables-multiport[name=cluster, port="22,80,443", protocol=tcp]',
        ("f2b-table", "addr-set-cluster"),
    ),
    "f2bzmq-nftset": (lambda server: "f2bzmq-nftset.py", ("f2bzmq", "addr4")),
}


def sync_jail(action: str) -> Callable[[Fail2banServer], str]:
    """A lab server's jails: only the sync jail, fed by commands, with `action`."""

    def jails(server: Fail2banServer) -> str:
        return (
            "[DEFAULT]\nbackend = polling\n\n"
            f"[{JAIL}]\nenabled = true\nfilter = f2bzmq-cluster\n"
            f"logpath = {server.sync_log}\nbantime = {BANTIME}\n"
            f"action = {ACTIONS[action][0](server)}\n"
        )

    return jails


def check_isolated(server: Fail2banServer) -> None:
    """The server runs in its namespace, so its actions touch no other firewall."""
    pid = int(server.pidfile.read_text())
    if not netns_holds(server.netns, pid):
        raise BenchError(f"fail2ban-server {server.name} (pid {pid}) is not in its namespace")


def drop_actions(server: Fail2banServer) -> None:
    """Remove the sync jail's actions, so stopping the server does not unban every address
    one action run at a time (the namespace and its firewall go away anyway)."""
    with contextlib.suppress(Fail2banError), server.client() as client:
        for name in client.command("get", JAIL, "actions"):
            client.command("set", JAIL, "delaction", name)


def set_size(namespace: str, where: tuple[str, str]) -> int:
    """How many elements nft lists in the set (0 while the table or set does not exist)."""
    table_name, set_name = where
    done = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            namespace,
            "nft",
            "-j",
            "list",
            "set",
            "inet",
            table_name,
            set_name,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        return 0
    items = json.loads(done.stdout)["nftables"]
    return sum(len(item.get("set", {}).get("elem", [])) for item in items)


def lists_all(client: Fail2banClient, wanted: set[str]) -> bool:
    banned = client.banned(JAIL)
    return len(banned) >= len(wanted) and wanted <= set(banned)


def addresses(count: int, second_octet: int) -> list[str]:
    """COUNT distinct addresses of the benchmarking range 198.18.0.0/15."""
    return [f"198.{second_octet}.{i // 256}.{i % 256}" for i in range(count)]


def poll_interval(count: int) -> float:
    """Listing 10,000 bans costs fail2ban and nft some milliseconds: poll less often."""
    return 0.05 + count / 50000


def inject(cluster: Cluster, ips: list[str]) -> None:
    """Report a ban of each address to the hub as node1's monitor would, in reports of up
    to 100, pipelined; every one must be ACKed."""
    node = NodeClient(cluster.ports, cluster.keys_dir, node=REPORTER)
    try:
        for start in range(0, len(ips), WINDOW):
            events = [
                BanEvent.new(REPORTER, "sshd", protocol.BAN, ip, bantime=BANTIME)
                for ip in ips[start : start + WINDOW]
            ]
            for report in reports([(0, event.id, event.encode()) for event in events]):
                bodies = [body for _, _, body in report]
                node.reports.send_multipart([protocol.PROTOCOL, protocol.EVENT, *bodies])
            answered = 0
            while answered < len(events):
                _, kind, *answers = node.reports.recv_multipart()
                if kind != protocol.ACK:
                    reason = answers[0].decode(errors="replace")
                    raise BenchError(f"the hub refused an event: {reason}")
                answered += len(answers)
    finally:
        node.close()


def cluster_run(root: Path, action: str, args: argparse.Namespace) -> dict:
    """Inject COUNT bans; seconds until each node lists them all, and holds them in nft."""
    namespaces = Namespaces("f2bzmq-bench")
    try:
        cluster = Cluster(
            root,
            size=args.nodes + 1,
            fail2ban=lambda node: {"jails": sync_jail(action), "netns": namespaces.add(node)},
            general={"loglevel": "INFO"},
            publisher=HUB_SETTINGS,
        )
        with cluster:
            for node in cluster.nodes.values():
                check_isolated(node.fail2ban)
            try:
                return measure_cluster(cluster, action, args)
            finally:
                for node in cluster.nodes.values():
                    drop_actions(node.fail2ban)
    finally:
        namespaces.close()


def measure_cluster(cluster: Cluster, action: str, args: argparse.Namespace) -> dict:
    ips = addresses(args.count, 18)
    wanted = set(ips)
    nodes = [node for name, node in cluster.nodes.items() if name != REPORTER]
    clients = {node.name: Fail2banClient(str(node.fail2ban.socket), timeout=120) for node in nodes}
    listed: dict[str, float] = {}
    enforced: dict[str, float] = {}
    firewall = ACTIONS[action][1]
    interval = poll_interval(args.count)
    try:
        started = time.monotonic()
        inject(cluster, ips)
        injected = time.monotonic() - started

        def every_node_lists() -> bool:
            for name, client in clients.items():
                if name not in listed and lists_all(client, wanted):
                    listed[name] = time.monotonic() - started
            return len(listed) == len(clients)

        if not wait_until(every_node_lists, args.timeout, interval):
            missing = sorted(set(clients) - set(listed))
            raise BenchError(f"{action}: {missing} did not list all bans in {args.timeout:g} s")
        if firewall is not None:

            def every_set_holds() -> bool:
                for node in nodes:
                    if node.name not in enforced and set_size(node.fail2ban.netns, firewall) >= len(
                        wanted
                    ):
                        enforced[node.name] = time.monotonic() - started
                return len(enforced) == len(nodes)

            if not wait_until(every_set_holds, args.timeout, interval):
                raise BenchError(f"{action}: an nft set never held all bans")
    finally:
        for client in clients.values():
            client.close()
    return {
        "injected_s": injected,
        "listed_s": listed,
        "enforced_s": enforced or None,
        "all_listed_s": max(listed.values()),
        "all_enforced_s": max(enforced.values()) if enforced else None,
    }


@contextlib.contextmanager
def fresh_server(root: Path, action: str) -> Iterator[Fail2banServer]:
    namespaces = Namespaces("f2bzmq-bench")
    try:
        server = Fail2banServer(
            root, "floor", jails=sync_jail(action), netns=namespaces.add("floor")
        )
        try:
            server.start()
            check_isolated(server)
            yield server
        finally:
            drop_actions(server)
            server.stop()
    finally:
        namespaces.close()


def floor_and_naive(root: Path, action: str, args: argparse.Namespace) -> dict:
    """fail2ban alone: COUNT bans in batched commands; then one process per address."""
    ips = addresses(args.count, 19)
    wanted = set(ips)
    firewall = ACTIONS[action][1]
    interval = poll_interval(args.count)
    with (
        fresh_server(root, action) as server,
        Fail2banClient(str(server.socket), timeout=args.timeout) as client,
    ):
        started = time.monotonic()
        for start in range(0, len(ips), COMMAND_BATCH):
            client.ban(JAIL, ips[start : start + COMMAND_BATCH])
        if not wait_until(lambda: lists_all(client, wanted), args.timeout, interval):
            raise BenchError(f"{action}: the fresh server did not list all bans")
        listed = time.monotonic() - started
        enforced = None
        if firewall is not None:
            if not wait_until(
                lambda: set_size(server.netns, firewall) >= len(wanted), args.timeout, interval
            ):
                raise BenchError(f"{action}: the fresh server's nft set never held all bans")
            enforced = time.monotonic() - started

        sample = [f"198.19.255.{i}" for i in range(1, args.sample + 1)]
        started = time.monotonic()
        for ip in sample:
            subprocess.run(
                [CLIENT_PROGRAM, "-s", str(server.socket), "set", JAIL, "banip", ip],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=60,
                check=True,
            )
        per_address = (time.monotonic() - started) / len(sample)
        if not set(sample) <= set(client.banned(JAIL)):
            raise BenchError(f"{action}: a fail2ban-client banip did not ban")
    return {
        "floor_listed_s": listed,
        "floor_enforced_s": enforced,
        "naive_sample": len(sample),
        "naive_ms_per_address": per_address * 1000,
        "naive_extrapolated_s": per_address * args.count,
    }


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10000, help="bans (default 10000)")
    parser.add_argument("--nodes", type=int, default=2, help="nodes that apply (default 2)")
    parser.add_argument(
        "--actions",
        default=",".join(ACTIONS),
        help=f"comma-separated subset of {','.join(ACTIONS)} (default all)",
    )
    parser.add_argument(
        "--sample", type=int, help="fail2ban-client runs to time (default count/20, 10..50)"
    )
    parser.add_argument(
        "--timeout", type=float, help="seconds a step may take (default 60 + count/20)"
    )
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    stop_on_sigterm()
    actions = [name.strip() for name in args.actions.split(",") if name.strip()]
    unknown = sorted(set(actions) - set(ACTIONS))
    if unknown or not actions:
        parser.error(f"--actions: unknown {unknown}; choose among {','.join(ACTIONS)}")
    if not 1 <= args.count <= 65000 or not 1 <= args.nodes <= 8:
        parser.error("--count must be 1..65000 and --nodes 1..8")
    args.sample = args.sample or min(50, max(10, args.count // 20))
    args.timeout = args.timeout or 60 + args.count / 20
    missing = missing_requirements()
    if missing:
        print(f"burst: {missing}", file=sys.stderr)
        return 2

    results: dict[str, dict] = {}
    root = Path(tempfile.mkdtemp(prefix="f2bzmq-burst-"))
    try:
        for action in actions:
            began = time.monotonic()
            results[action] = {
                **cluster_run(root / action / "cluster", action, args),
                **floor_and_naive(root / action / "floor", action, args),
            }
            print(f"# {action}: {time.monotonic() - began:.0f} s", file=sys.stderr, flush=True)
    except BenchError as error:
        print(f"burst: {error}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(root, ignore_errors=True)

    rows = [
        [
            action,
            seconds(result["injected_s"]),
            seconds(result["all_listed_s"]),
            seconds(result["all_enforced_s"]),
            seconds(result["floor_listed_s"]),
            seconds(result["floor_enforced_s"]),
            seconds(result["naive_extrapolated_s"]),
            f"{result['naive_ms_per_address']:.1f}",
        ]
        for action, result in results.items()
    ]
    headers = [
        "sync jail action",
        "hub ACKed (s)",
        "cluster: listed (s)",
        "in nft (s)",
        "floor: listed (s)",
        "in nft (s)",
        "naive (s)",
        "naive ms/ban",
    ]
    text = table(headers, rows)
    text += (
        f"\n{args.count} bans injected into the hub at once, applied by {args.nodes} node(s);"
        " times from the first event sent until the hub has ACKed them all, the slowest node"
        " lists them all (`get cluster banip`), its nft set holds them all."
        "\nfloor: the same bans as `set cluster banip` commands of"
        f" {COMMAND_BATCH} straight into a fresh fail2ban with that action."
        f"\nnaive: one fail2ban-client process per address, timed on {args.sample} addresses"
        f" and extrapolated to {args.count}."
        f"\nthe hub's settings off the shipped defaults:"
        f" {', '.join(f'{key} {value}' for key, value in HUB_SETTINGS.items())};"
        f" the injected reports keep {WINDOW} events in flight; the lab's timers"
        " (heartbeat_interval 0.5, ack_timeout 2, heartbeat_timeout 3, start_at beginning)"
    )
    result = {"count": args.count, "nodes": args.nodes, "sample": args.sample, "actions": results}
    report("burst", result, text, args.json)
    return 0


def missing_requirements() -> str | None:
    """Why the benchmark cannot run here: it makes network namespaces for fail2ban."""
    if os.geteuid() != 0:
        return "needs root (network namespaces for the nodes' fail2ban)"
    for program in ("ip", "nft", CLIENT_PROGRAM):
        if shutil.which(program) is None:
            return f"{program} is not installed"
    return None


if __name__ == "__main__":
    sys.exit(main())
