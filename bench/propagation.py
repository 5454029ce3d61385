"""Propagation latency: from fail2ban's Ban line on node1 to the ban in force on node2.

Runs a hub and two real fail2ban nodes on 127.0.0.1 (the lab), makes node1's
fail2ban ban COUNT addresses one at a time, INTERVAL seconds apart, and measures
three ends for each, from node1's fail2ban.log `[sshd] Ban ip` line:

- banned: node2's fail2ban.log `[cluster] Ban ip`, written when node2's fail2ban
  took the subscriber's command, before it runs the jail's action;
- listed: node2's fail2ban lists the address in `get cluster banip`; a thread here
  asks node2's fail2ban socket every POLL seconds while a ban is on its way, so
  the poll interval (plus one call) bounds this figure's resolution;
- applied: the subscriber's banip call returned (node2's subscriber log
  `[cluster] Ban ip`, written just after).

node1 lifts each ban HOLD seconds after node2 listed it, as fail2ban does when a
ban ends, so the jails stay small, the unbans travel the same way, and node2's
sync jail must be empty at the end. SUBSCRIBERS adds simulated nodes listening to
the hub (the fan-out of a bigger cluster; see scale.py). In the same run it times
the naive way of applying one ban on another server: one `fail2ban-client set
cluster banip IP` process per address; and the floor of the apply step, node2's
fail2ban alone: one `set cluster banip IP` on a connection kept open (what the
subscriber sends), FLOOR of them INTERVAL apart, with the same action.

    python3 bench/propagation.py --count 1000 --interval 0.05 --json result.json

A benchmark, not a test: it prints figures and never fails on speed; it exits
non-zero only when the run went wrong (a ban never arrived, a process died).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import BenchError, report, spread, stop_on_sigterm, table
from throughput import SubscriberSwarm, Workers, join_swarm

from f2bzmq.fail2ban_client import Fail2banClient
from f2bzmq.lab import CLIENT_PROGRAM, Cluster, make_keys, wait_until

# fail2ban's "[jail] Ban ip" lines, and the hub's "[jail] Ban ip from node".
STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) .*\] Ban (\S+)(?: from \S+)?$", re.M)
ORIGIN_JAIL = "sshd"
SYNC_JAIL = "cluster"
ARRIVAL_TIMEOUT = 120.0  # seconds every ban (and every unban) has to arrive
# --action: the sync jail's action line ("dummy" forks a shell per ban, like the stock
# shell actions; "none" leaves fail2ban only its list: f2bzmq's share of the way).
SYNC_ACTIONS = {"dummy": "dummy", "none": ""}


def stamps(text: str, jail: str) -> dict[str, float]:
    """ip -> time of the first `[jail] Ban ip` line."""
    found: dict[str, float] = {}
    for match in STAMP.finditer(text):
        if f"[{jail}] Ban " not in match.group(0):
            continue
        when = time.mktime(time.strptime(match.group(1), "%Y-%m-%d %H:%M:%S"))
        found.setdefault(match.group(3), when + int(match.group(2)) / 1000)
    return found


class BanWatch:
    """A thread asking a fail2ban socket `get JAIL banip` while bans are awaited.

    `seen[ip]` is the time of the first answer that listed ip: at most one poll
    interval plus one call after fail2ban listed it. Between bans it sleeps, so its
    cost to fail2ban and to the machine stays small.
    """

    def __init__(self, socket_path: str, jail: str, interval: float, lifetime: float) -> None:
        self.client = Fail2banClient(socket_path)
        self.ends = time.monotonic() + lifetime  # it stops by itself at the latest then
        self.jail = jail
        self.interval = interval
        self.awaited: set[str] = set()
        self.seen: dict[str, float] = {}
        self.calls = 0
        self.call_seconds = 0.0
        self.error: Exception | None = None
        self.changed = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self.run, daemon=True)

    def expect(self, ip: str) -> None:
        with self.changed:
            self.awaited.add(ip)
            self.changed.notify()

    def listed_before(self, moment: float) -> dict[str, float]:
        """ip -> when it was seen, for the addresses seen by `moment`."""
        with self.changed:
            return {ip: when for ip, when in self.seen.items() if when <= moment}

    def run(self) -> None:
        try:
            while time.monotonic() < self.ends:
                with self.changed:
                    self.changed.wait_for(lambda: self.awaited or self.stopping, 1.0)
                    if self.stopping:
                        return
                    awaited = set(self.awaited)
                if not awaited:
                    continue
                asked = time.perf_counter()
                listed = awaited.intersection(self.client.banned(self.jail))
                now = time.time()
                self.calls += 1
                self.call_seconds += time.perf_counter() - asked
                with self.changed:
                    for ip in listed:
                        self.seen[ip] = now
                    self.awaited -= listed
                time.sleep(self.interval)
        except Exception as error:  # reported by stop(): the run is void
            self.error = error

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.changed:
            self.stopping = True
            self.changed.notify()
        self.thread.join(10)
        self.client.close()
        if self.error is not None:
            raise BenchError(f"polling node2's fail2ban failed: {self.error}")


def addresses(count: int) -> list[str]:
    """COUNT addresses of 198.18.0.0/16, the benchmarking range."""
    return [f"198.18.{i // 250}.{i % 250 + 1}" for i in range(count)]


def run(
    count: int = 1000,
    interval: float = 0.05,
    hold: float = 1.0,
    poll: float = 0.001,
    naive: int = 20,
    subscribers: int = 0,
    directory: str | None = None,
    action: str = "dummy",
    origin_action: str = "dummy",
    floor: int = 200,
) -> dict:
    """Ban `count` addresses on node1, `interval` s apart; figures of their way to node2."""
    root = Path(tempfile.mkdtemp(prefix="f2bzmq-propagation-", dir=directory))
    try:
        return measure(
            root, count, interval, hold, poll, naive, subscribers, action, origin_action, floor
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


def measure(
    root: Path,
    count: int,
    interval: float,
    hold: float,
    poll: float,
    naive: int,
    subscribers: int,
    action: str = "dummy",
    origin_action: str = "dummy",
    floor: int = 200,
) -> dict:
    def jails(server) -> str:
        return server.default_jails(
            3600, 86400, SYNC_ACTIONS[action], action=SYNC_ACTIONS[origin_action]
        )

    cluster = Cluster(
        root,
        size=2,
        fail2ban={"jails": jails},
        general={"loglevel": "INFO"},
    )
    simulated = [f"sim{i}" for i in range(1, subscribers + 1)]
    make_keys(cluster.keys_dir, simulated)
    with cluster, Workers() as workers:
        node1, node2 = cluster["node1"], cluster["node2"]
        if simulated:
            endpoint = f"tcp://127.0.0.1:{cluster.ports[1]}"
            swarm = SubscriberSwarm(workers, simulated, cluster.keys_dir, endpoint)
            join_swarm(swarm, None)
            swarm.start(0)
        ips = addresses(count)
        result = ban_all(node1, node2, ips, interval, hold, poll)
        origin = stamps(node1.fail2ban.log.read_text(), ORIGIN_JAIL)
        stored = stamps(cluster.hub.log_text(), ORIGIN_JAIL)
        banned = stamps(node2.fail2ban.log.read_text(), SYNC_JAIL)
        applied = stamps(node2.log_text("subscriber"), SYNC_JAIL)
        missing = [ip for ip in ips if not all(ip in s for s in (origin, stored, banned, applied))]
        if missing:
            raise BenchError(f"{len(missing)} bans left no log line, e.g. {missing[0]}")
        naive_ms = naive_bans(node2, naive)
        floor_ms = floor_bans(node2, floor, interval)
    seen = result.pop("seen")
    stored_ms = [(stored[ip] - origin[ip]) * 1000 for ip in ips]
    banned_ms = [(banned[ip] - origin[ip]) * 1000 for ip in ips]
    listed_ms = [(seen[ip] - origin[ip]) * 1000 for ip in ips]
    applied_ms = [(applied[ip] - origin[ip]) * 1000 for ip in ips]
    naive_spread = spread(naive_ms)
    return {
        "bans": count,
        "interval_s": interval,
        "hold_s": hold,
        "nodes": 2 + subscribers,
        "sync_action": action,
        "origin_action": origin_action,
        "simulated_subscribers": subscribers,
        "stored_ms": spread(stored_ms),
        "banned_ms": spread(banned_ms),
        "listed_ms": spread(listed_ms),
        "applied_ms": spread(applied_ms),
        **result,
        "naive_fail2ban_client_ms": naive_spread,
        "floor_banip_ms": spread(floor_ms),
        "speedup_vs_naive": naive_spread["p50"] / max(spread(applied_ms)["p50"], 1e-9),
    }


def ban_all(node1, node2, ips, interval, hold, poll) -> dict:
    """Ban each address on node1 on schedule, lift it `hold` s after node2 listed it."""
    lifetime = len(ips) * interval + hold + 3 * ARRIVAL_TIMEOUT
    watch = BanWatch(str(node2.fail2ban.socket), SYNC_JAIL, poll, lifetime)
    origin = Fail2banClient(str(node1.fail2ban.socket))
    watch.start()
    try:
        started = time.monotonic()
        lifted: set[str] = set()
        for number, ip in enumerate(ips):
            time.sleep(max(0.0, started + number * interval - time.monotonic()))
            watch.expect(ip)
            origin.ban(ORIGIN_JAIL, [ip])
            if hold > 0:
                lift(origin, watch, lifted, time.time() - hold)
        if not wait_until(lambda: not watch.awaited, ARRIVAL_TIMEOUT, 0.05):
            raise BenchError(f"{len(watch.awaited)} bans never reached node2's jail")
        if hold > 0:
            time.sleep(hold)
            lift(origin, watch, lifted, time.time())
            if not wait_until(lambda: not node2.fail2ban.banned(SYNC_JAIL), ARRIVAL_TIMEOUT, 0.2):
                raise BenchError("node1's unbans did not all reach node2's jail")
    finally:
        origin.close()
        watch.stop()
    return {
        "seen": watch.listed_before(time.time()),
        "poll": {
            "interval_ms": poll * 1000,
            "calls": watch.calls,
            "mean_call_ms": 1000 * watch.call_seconds / max(1, watch.calls),
        },
        "unbans_arrived": hold > 0,
    }


def lift(origin: Fail2banClient, watch: BanWatch, lifted: set[str], before: float) -> None:
    """Unban on node1 every address node2 listed before `before`."""
    due = sorted(set(watch.listed_before(before)) - lifted)
    if due:
        origin.unban(ORIGIN_JAIL, due)
        lifted.update(due)


def naive_bans(node, runs: int) -> list[float]:
    """Milliseconds of one `fail2ban-client set cluster banip IP` process each."""
    times = []
    for number in range(1, runs + 1):
        started = time.perf_counter()
        subprocess.run(
            [
                CLIENT_PROGRAM,
                "-s",
                str(node.fail2ban.socket),
                "set",
                SYNC_JAIL,
                "banip",
                f"198.19.{number // 250}.{number % 250 + 1}",
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=60,
            check=True,
        )
        times.append((time.perf_counter() - started) * 1000)
    return times


def floor_bans(node, runs: int, interval: float) -> list[float]:
    """Milliseconds of one `set cluster banip IP` each on an open connection to node's
    fail2ban, `interval` apart as in the run (each lifted after, untimed)."""
    times = []
    with Fail2banClient(str(node.fail2ban.socket)) as client:
        for number in range(runs):
            ip = f"198.19.{128 + number // 250}.{number % 250 + 1}"  # above the naive run's
            time.sleep(interval)
            started = time.perf_counter()
            client.ban(SYNC_JAIL, [ip])
            times.append((time.perf_counter() - started) * 1000)
            client.unban(SYNC_JAIL, [ip])
    return times


def text(result: dict) -> str:
    """The table of one run."""
    rows = []
    for label, key in (
        ("f2bzmq: node1 Ban line -> stored by the hub (ms)", "stored_ms"),
        ("f2bzmq: node1 Ban line -> node2 fail2ban's Ban line (ms)", "banned_ms"),
        ("f2bzmq: node1 Ban line -> listed on node2 (ms)", "listed_ms"),
        ("f2bzmq: node1 Ban line -> banip returned on node2 (ms)", "applied_ms"),
        ("naive: one fail2ban-client process per ban (ms)", "naive_fail2ban_client_ms"),
        ("floor: node2's fail2ban alone, banip on an open connection (ms)", "floor_banip_ms"),
    ):
        figures = result[key]
        rows.append([label, figures["p50"], figures["p90"], figures["p99"], figures["max"]])
    poll = result["poll"]
    origin = result.get("origin_action", "dummy")
    shared = " (on this one machine its shell runs on the cores the hub and node2 need)"
    out = table(["what", "p50", "p90", "p99", "max"], rows)
    out += (
        f"\n{result['bans']} bans {result['interval_s'] * 1000:g} ms apart, each lifted"
        f" {result['hold_s']:g} s after it arrived; {result['nodes']} nodes"
        f" ({result['simulated_subscribers']} of them simulated listeners);"
        f" node2's sync jail action: {result['sync_action']}; node1's sshd jail action:"
        f" {origin}{shared if origin == 'dummy' else ''}"
        f"\n'listed' polls node2's fail2ban every {poll['interval_ms']:g} ms while a ban is"
        f" awaited ({poll['calls']} calls, {poll['mean_call_ms']:.2f} ms each): resolution"
        f" {poll['interval_ms'] + poll['mean_call_ms']:.1f} ms (fail2ban answers one command"
        f" at a time: a poll waits for a ban's action); log stamps have 1 ms"
        f"\nthe naive figure is the apply step alone; naive / f2bzmq p50:"
        f" {result['speedup_vs_naive']:.1f}x"
        f"\nthe floor is the apply step's own cost in fail2ban; banip returned p50 minus"
        f" floor p50: {result['applied_ms']['p50'] - result['floor_banip_ms']['p50']:.1f} ms"
        " (derived: roughly f2bzmq's share of the way)"
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000, help="bans (default 1000)")
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between bans")
    parser.add_argument("--hold", type=float, default=1.0, help="seconds before node1 unbans")
    parser.add_argument("--poll", type=float, default=0.001, help="seconds between polls")
    parser.add_argument("--naive", type=int, default=20, help="fail2ban-client runs to time")
    parser.add_argument("--floor", type=int, default=200, help="banip calls of the floor")
    parser.add_argument("--subscribers", type=int, default=0, help="simulated extra nodes")
    parser.add_argument(
        "--action",
        choices=sorted(SYNC_ACTIONS),
        default="dummy",
        help="node2's sync jail action (dummy: a shell per ban; none: fail2ban's list only)",
    )
    parser.add_argument(
        "--origin-action",
        choices=sorted(SYNC_ACTIONS),
        default="dummy",
        help="node1's sshd jail action, the one that bans first (dummy: a shell per ban)",
    )
    parser.add_argument("--dir", help="where the nodes live (default: a temp folder)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    if not 1 <= args.count <= 60000 or args.naive < 1 or not 0 <= args.subscribers <= 1000:
        parser.error("--count must be 1..60000, --naive at least 1, --subscribers 0..1000")
    if not 1 <= args.floor <= 10000 or args.naive > 30000:
        parser.error("--floor must be 1..10000, --naive at most 30000")
    if args.interval < 0 or args.hold < 0 or args.poll <= 0:
        parser.error("--interval and --hold must be >= 0, --poll > 0")
    stop_on_sigterm()
    try:
        result = run(
            args.count,
            args.interval,
            args.hold,
            args.poll,
            args.naive,
            args.subscribers,
            args.dir,
            args.action,
            args.origin_action,
            args.floor,
        )
    except BenchError as error:
        print(f"propagation: {error}", file=sys.stderr)
        return 1
    report("propagation", result, text(result), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
