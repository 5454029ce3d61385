"""Cluster jails: a hub counting the failures of many nodes, and how soon the failure that
passes a cluster jail's threshold has the attacker banned on every node.

Three parts, each with real processes on 127.0.0.1 and CURVE on every connection:

- ingest: a real publisher with the cluster jail [detect:sshd] (its defaults: 5 failures
  within 10m from 2 nodes), and NODES simulated monitors (DEALERs with their own node
  keys, in this process) each reporting RATE failures a second the way the monitor does:
  every FAILURE_WINDOW one failure report, counting per address what the window saw, the
  addresses drawn at random from a botnet of BOTNET. With a million, each address fails
  about once in 20 s: the hub counts (and remembers, up to its bound) and bans few, and the
  run measures what failures cost; with fewer (--botnet 100000) most pass the threshold
  within seconds and it measures the bans too (throughput.py has the hub's ban rate). For
  SECONDS; then the backlog is drained. Figures: failures a second offered and ACKed (an
  ACK means stored on disk), each report's ACK delay (a hub that falls behind makes it grow
  without bound), how long the backlog took to drain, the hub's CPU, and its main
  thread's CPU time per failure (on a busy machine the hub gets less than a core: this
  says what a core of its own would ingest), the bans it decided. In the same run, the
  naive way: every failure line its own report body (no window), at the same rate, for
  NAIVE_SECONDS.
- latency: a hub and three real fail2ban nodes (local maxretry 3, the pyinotify backend so
  fail2ban reads each line as it comes) with [detect:sshd] maxretry 3; for each of COUNT
  addresses, a failure on node2 and node3, then, INTERVAL apart, the one on node1 that
  passes the threshold. From node1's fail2ban.log `[sshd] Found ip` line (its own
  millisecond stamp) to the address listed by `get cluster banip` on node2 and on node3
  (polled every POLL while awaited), the later of the two. The naive figure: the nodes'
  own fail2ban, which never bans an address it saw failing once.
- monitor: a real monitor following a fail2ban.log this benchmark writes RATE `Found` lines
  a second into (addresses of a pool of 2,000), for MONITOR_SECONDS: its CPU, against the
  same lines in a jail no cluster jail counts (read and parsed, not reported).

    python3 bench/detection.py --json result.json
    python3 bench/detection.py --nodes 5 --rate 200 --seconds 2 --count 10   # a small run

A benchmark, not a test: it prints figures and never fails on speed; it exits non-zero
only when the run went wrong (a report never answered, a ban never arrived).
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import zmq
from common import (
    BenchError,
    cpu_seconds,
    report,
    spread,
    stop_on_sigterm,
    table,
    thread_cpu_seconds,
)
from propagation import SYNC_ACTIONS, BanWatch
from throughput import node_socket, receive

from f2bzmq import protocol
from f2bzmq.control import ControlError, ask
from f2bzmq.delivery import reports
from f2bzmq.lab import Cluster, Hub, RoleProcess, free_ports, make_keys, wait_until, write_config
from f2bzmq.protocol import FailureCount, FailureReport

DETECT = {"detect:sshd": {"enabled": "true"}}
QUIET = {"loglevel": "INFO"}
SETUP_TIMEOUT = 60.0  # seconds for every connection to be up
DRAIN_TIMEOUT = 120.0  # seconds the hub has to answer every report after the last send
ARRIVAL_TIMEOUT = 60.0  # seconds every ban has to reach every node
FOUND = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) .*\[sshd\] Found (\S+) - ", re.M)
SYNC_BAN = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) .*\[cluster\] Ban (\S+)$", re.M)
DECIDED = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) .*\[sshd\] Ban (\S+) \(cluster", re.M
)


def stamp(match: re.Match) -> float:
    seconds = time.mktime(time.strptime(match.group(1), "%Y-%m-%d %H:%M:%S"))
    return seconds + int(match.group(2)) / 1000


def botnet_address(number: int) -> str:
    """The number-th address of 10.0.0.0/8."""
    return f"10.{number >> 16 & 255}.{number >> 8 & 255}.{number & 255}"


def hub_status(hub: Hub) -> dict:
    try:
        return ask(hub.publisher.control_socket(), timeout=10)
    except ControlError as error:
        raise BenchError(f"the hub does not answer status: {error}") from None


# --- ingest ------------------------------------------------------------------------------


class Reporters:
    """NODES simulated monitors: a DEALER each, with its own key."""

    def __init__(self, context: zmq.Context, names: list[str], keys_dir: Path, endpoint: str):
        self.names = names
        self.dealers = []
        for name in names:
            sock = node_socket(context, zmq.DEALER, keys_dir, name)
            sock.sndhwm = sock.rcvhwm = 0  # the backlog shows in the ACK delays, never lost
            sock.connect(endpoint)
            self.dealers.append(sock)
        self.poller = zmq.Poller()
        for sock in self.dealers:
            self.poller.register(sock, zmq.POLLIN)
        self.sent_at: dict[str, float] = {}  # report id -> when it left
        self.failures_of: dict[str, int] = {}  # report id -> the failures it counts
        self.delays: list[float] = []  # ms from a report's send to its ACK
        self.acked = 0  # failures ACKed
        self.refused = ""

    def greet(self) -> None:
        """A hello each, answered: every CURVE handshake is done before the clock starts."""
        for sock in self.dealers:
            sock.send_multipart(protocol.encode_hello())
        answered, deadline = 0, time.monotonic() + SETUP_TIMEOUT
        while answered < len(self.dealers):
            if time.monotonic() > deadline:
                raise BenchError("the hub did not welcome every simulated monitor")
            for sock, _ in self.poller.poll(100):
                if protocol.is_welcome(receive(sock)):
                    answered += 1

    def send(self, number: int, bodies: list[tuple[FailureReport, bytes]]) -> None:
        """One node's report bodies, in reports of up to 100 as the monitor sends them."""
        sock = self.dealers[number]
        rows = [(0, failure.id, body) for failure, body in bodies]
        now = time.perf_counter()
        for failure, _ in bodies:
            self.sent_at[failure.id] = now
            self.failures_of[failure.id] = failure.total()
        for batch in reports(rows):
            sock.send_multipart(protocol.encode_report(body for _, _, body in batch))

    def answers(self, timeout_ms: int) -> None:
        for sock, _ in self.poller.poll(timeout_ms):
            while True:
                try:
                    frames = receive(sock)
                except zmq.Again:
                    break
                now = time.perf_counter()
                for body in frames[2:]:
                    answer = json.loads(body)
                    sent = self.sent_at.pop(answer["id"], None)
                    if sent is None:
                        continue
                    self.delays.append((now - sent) * 1000)
                    if frames[1] == protocol.ACK:
                        self.acked += self.failures_of.pop(answer["id"])
                    else:
                        self.refused = self.refused or answer.get("reason", "?")

    def close(self) -> None:
        for sock in self.dealers:
            sock.close(linger=0)


def attack(
    reporters: Reporters,
    rate: float,
    seconds: float,
    window: float,
    botnet: int,
    per_line: bool,
    rng: random.Random,
) -> dict:
    """Every node reports `rate` failures a second for `seconds`: a report per `window`
    (counts per address), or with `per_line` a body per failure; then the drain."""
    nodes = len(reporters.dealers)
    per_tick = rate * window
    owed = [0.0] * nodes
    sent = 0
    acked_before = reporters.acked
    started = time.monotonic()
    tick = 0
    while True:
        due = started + tick * window
        now = time.monotonic()
        if now >= started + seconds:
            break
        if now < due:
            reporters.answers(max(1, int((due - now) * 1000)))
            continue
        when = float(int(time.time()))  # fail2ban's Found lines have whole seconds
        for number, name in enumerate(reporters.names):
            owed[number] += per_tick
            count = int(owed[number])
            owed[number] -= count
            if not count:
                continue
            drawn = [botnet_address(rng.randrange(botnet)) for _ in range(count)]
            if per_line:
                made = [
                    FailureReport.new(name, [FailureCount("sshd", ip, 1, when, when)])
                    for ip in drawn
                ]
            else:
                counted = collections.Counter(drawn)
                items = [FailureCount("sshd", ip, n, when, when) for ip, n in counted.items()]
                made = [
                    FailureReport.new(name, items[i : i + protocol.MAX_FAILURE_ITEMS])
                    for i in range(0, len(items), protocol.MAX_FAILURE_ITEMS)
                ]
            reporters.send(number, [(failure, failure.encode()) for failure in made])
            sent += count
        tick += 1
    sending = time.monotonic() - started
    acked_while_sending = reporters.acked - acked_before
    drain_started = time.monotonic()
    while reporters.sent_at and time.monotonic() - drain_started < DRAIN_TIMEOUT:
        reporters.answers(100)
    if reporters.sent_at:
        raise BenchError(f"{len(reporters.sent_at)} failure reports never answered")
    if reporters.refused:
        raise BenchError(f"the hub refused a failure report: {reporters.refused}")
    return {
        "offered_per_s": sent / sending,
        "acked_per_s_while_sending": acked_while_sending / sending,
        "failures": sent,
        "drain_s": time.monotonic() - drain_started,
        "seconds": sending,
    }


def main_thread_seconds(pid: int) -> float:
    """CPU time of a daemon's own thread (the one named after its program)."""
    threads = thread_cpu_seconds(pid)
    return max(seconds for name, seconds in threads.items() if not name.startswith("ZMQ"))


def ingest(
    root: Path,
    nodes: int,
    rate: float,
    seconds: float,
    window: float,
    botnet: int,
    naive_seconds: float,
) -> dict:
    names = [f"sim{i}" for i in range(1, nodes + 1)]
    keys_dir = make_keys(root / "keys", names)
    ports = free_ports(3)
    hub = Hub(root, ports, keys_dir=keys_dir, general=QUIET, **DETECT)
    context = zmq.Context()
    hub.publisher.start()
    reporters = None
    try:
        if not wait_until(hub.publisher.ready, SETUP_TIMEOUT, 0.1):
            raise BenchError("the hub did not start")
        reporters = Reporters(context, names, keys_dir, f"tcp://127.0.0.1:{ports[0]}")
        reporters.greet()
        pid = hub.publisher.process.pid
        rng = random.Random(7)
        ways = {}
        for way, per_line, duration in (
            ("windowed", False, seconds),
            ("naive", True, naive_seconds),
        ):
            cpu, main, wall = cpu_seconds(pid), main_thread_seconds(pid), time.monotonic()
            figures = attack(reporters, rate, duration, window, botnet, per_line, rng)
            figures["hub_cpu_cores"] = (cpu_seconds(pid) - cpu) / (time.monotonic() - wall)
            main_us = (main_thread_seconds(pid) - main) * 1e6 / figures["failures"]
            figures["hub_main_thread_us_per_failure"] = main_us
            figures["failures_per_s_by_a_core"] = 1e6 / main_us
            figures["ack_ms"] = spread(reporters.delays)
            figures["reports"] = len(reporters.delays)
            reporters.delays = []
            ways[way] = figures
            if way == "windowed":
                counted = hub_status(hub)
        windowed, naive = ways["windowed"], ways["naive"]
    finally:
        if reporters is not None:
            reporters.close()
        context.destroy(linger=0)
        hub.publisher.stop()
    return {
        "nodes": nodes,
        "rate_per_node": rate,
        "window_s": window,
        "botnet": botnet,
        **windowed,
        "failures_counted": counted["Failures counted"],
        "cluster_bans": counted["Cluster detections"],
        "naive": naive,
    }


# --- latency -----------------------------------------------------------------------------


def latency(
    root: Path, count: int, interval: float, poll: float, action: str, lead: int = 3
) -> dict:
    def jails(server):
        text = server.default_jails(3600, 86400, SYNC_ACTIONS[action])
        return text.replace("backend = polling", "backend = pyinotify")

    # Bans long enough that none is lifted during the run: no unban competes with the bans.
    detect = {"detect:sshd": {"enabled": "true", "maxretry": "3", "bantime": "1h"}}
    cluster = Cluster(
        root / "latency",
        size=3,
        fail2ban={"jails": jails, "sshd_maxretry": 3},
        general=QUIET,
        **detect,
    )
    ips = [f"198.18.{n // 250}.{n % 250 + 1}" for n in range(count)]
    lifetime = count * interval + 3 * ARRIVAL_TIMEOUT
    with cluster:
        node1, node2, node3 = (cluster[f"node{i}"] for i in (1, 2, 3))
        watches = [
            BanWatch(str(n.fail2ban.socket), "cluster", poll, lifetime) for n in (node2, node3)
        ]
        for watch in watches:
            watch.start()
        try:
            started = time.monotonic()
            for number in range(count + lead):
                time.sleep(max(0.0, started + number * interval - time.monotonic()))
                if number < count:  # its first two failures, on node2 and node3
                    node2.fail2ban.attack(ips[number], count=1)
                    node3.fail2ban.attack(ips[number], count=1)
                if number >= lead:  # the one that passes the threshold, on node1
                    ip = ips[number - lead]
                    for watch in watches:
                        watch.expect(ip)
                    node1.fail2ban.attack(ip, count=1)
            if not wait_until(lambda: not any(w.awaited for w in watches), ARRIVAL_TIMEOUT, 0.05):
                raise BenchError("some cluster bans never reached node2 and node3")
        finally:
            for watch in watches:
                watch.stop()
        seen = [watch.listed_before(time.time()) for watch in watches]
        found = {m.group(3): stamp(m) for m in FOUND.finditer(node1.fail2ban.log.read_text())}
        decided = {m.group(3): stamp(m) for m in DECIDED.finditer(cluster.hub.log_text())}
        banned = [
            {m.group(3): stamp(m) for m in SYNC_BAN.finditer(n.fail2ban.log.read_text())}
            for n in (node2, node3)
        ]
        local_bans = sum(len(n.fail2ban.banned("sshd")) for n in cluster.nodes.values())
    logged = [found, decided, *banned]
    missing = [ip for ip in ips if any(ip not in stamps for stamps in logged)]
    if missing:
        raise BenchError(
            f"{len(missing)} addresses left no Found or decision line, e.g. {missing[0]}"
        )
    listed_ms = [(max(s[ip] for s in seen) - found[ip]) * 1000 for ip in ips]
    decided_ms = [(decided[ip] - found[ip]) * 1000 for ip in ips]
    banned_ms = [(max(b[ip] for b in banned) - found[ip]) * 1000 for ip in ips]
    return {
        "count": count,
        "interval_s": interval,
        "poll_ms": poll * 1000,
        "sync_action": action,
        "decided_ms": spread(decided_ms),
        "banned_ms": spread(banned_ms),
        "listed_ms": spread(listed_ms),
        "naive_local_bans": local_bans,
    }


# --- monitor -----------------------------------------------------------------------------


def monitor_cpu(root: Path, rate: float, seconds: float) -> dict:
    keys_dir = make_keys(root / "monitor-keys", ["mon1"])
    ports = free_ports(3)
    # Not young: the monitor adopts its state and never asks fail2ban (there is none here).
    hub = Hub(
        root / "monitor",
        ports,
        keys_dir=keys_dir,
        general=QUIET,
        publisher={"rebuild_window": "0"},
        **DETECT,
    )
    folder = root / "monitor" / "mon1"
    folder.mkdir(parents=True)
    log = folder / "fail2ban.log"
    log.touch()
    config = folder / "fail2ban-cluster.conf"
    write_config(
        config,
        "mon1",
        ports,
        folder,
        keys_dir,
        general={**QUIET, "fail2ban_socket": str(folder / "no-fail2ban.sock")},
        monitor={"logpath": str(log), "start_at": "end"},
        **DETECT,
    )
    monitor = RoleProcess("monitor", config, folder)
    pool = [f"100.64.{n // 250}.{n % 250 + 1}" for n in range(2000)]
    figures = {}
    hub.publisher.start()
    monitor.start()
    try:
        if not wait_until(lambda: hub.publisher.ready() and monitor.ready(), SETUP_TIMEOUT, 0.1):
            raise BenchError("the hub or the monitor did not start")
        written = 0
        for jail in ("nginx", "sshd"):  # a jail no cluster jail counts, then one it does
            pid = monitor.process.pid
            cpu, wall = cpu_seconds(pid), time.monotonic()
            written += write_found(log, jail, rate, seconds, pool)
            if jail == "sshd":
                reported = wait_reported(monitor, written, rate * seconds)
            time.sleep(0.2)  # the monitor's last reads
            figures[jail] = (cpu_seconds(pid) - cpu) / (time.monotonic() - wall)
    finally:
        monitor.stop()
        hub.publisher.stop()
    per_thousand = 1000 / rate
    return {
        "rate": rate,
        "seconds": seconds,
        "lines": written,
        "reports_acked": reported["Events ACKed"],
        "cpu_percent_per_1000": 100 * figures["sshd"] * per_thousand,
        "baseline_cpu_percent_per_1000": 100 * figures["nginx"] * per_thousand,
    }


def wait_reported(monitor: RoleProcess, lines: int, expected: float) -> dict:
    """The monitor's status once it reported the `expected` failures of the counted jail's
    lines and its outbox is empty."""
    found: dict = {}

    def done() -> bool:
        found.update(ask(monitor.control_socket()))
        return found["Failures reported"] == expected and not found["Outbox depth"]

    if not wait_until(done, ARRIVAL_TIMEOUT, 0.05):
        raise BenchError(
            f"the monitor reported {found.get('Failures reported')} of {lines} failures"
        )
    return found


def write_found(log: Path, jail: str, rate: float, seconds: float, pool: list[str]) -> int:
    """`rate` Found lines a second of `jail` for `seconds`, in a write every 10 ms, as
    fail2ban writes them (each line at once, appended)."""
    rng = random.Random(3)
    chunk = rate * 0.01
    owed, written = 0.0, 0
    started = time.monotonic()
    with log.open("a", buffering=1) as out:
        for tick in range(int(seconds * 100)):
            time.sleep(max(0.0, started + tick * 0.01 - time.monotonic()))
            owed += chunk
            lines = int(owed)
            owed -= lines
            stamp_ = time.strftime("%Y-%m-%d %H:%M:%S")
            text = "".join(
                f"{stamp_},000 fail2ban.filter         [999]: INFO    [{jail}] Found "
                f"{rng.choice(pool)} - {stamp_}\n"
                for _ in range(lines)
            )
            out.write(text)
            written += lines
    return written


# --- the run -----------------------------------------------------------------------------


PARTS = ("ingest", "latency", "monitor")


def run(args: argparse.Namespace) -> dict:
    root = Path(tempfile.mkdtemp(prefix="f2bzmq-detection-", dir=args.dir))
    result: dict = {}
    try:
        if "ingest" in args.parts:
            result["ingest"] = ingest(
                root,
                args.nodes,
                args.rate,
                args.seconds,
                args.window,
                args.botnet,
                args.naive_seconds,
            )
        if "latency" in args.parts:
            result["latency"] = latency(root, args.count, args.interval, args.poll, args.action)
        if "monitor" in args.parts:
            result["monitor"] = monitor_cpu(root, args.monitor_rate, args.monitor_seconds)
        return result
    finally:
        shutil.rmtree(root, ignore_errors=True)


def text(result: dict) -> str:
    """The tables of the parts that ran."""
    parts = []
    if "ingest" in result:
        parts.append(ingest_text(result["ingest"]))
    if "latency" in result:
        parts.append(latency_text(result["latency"]))
    if "monitor" in result:
        mon = result["monitor"]
        parts.append(
            f"monitor: {mon['rate']:g} Found lines/s for {mon['seconds']:g} s:"
            f" {mon['cpu_percent_per_1000']:.1f} % of a core per 1,000 failures/s"
            f" ({mon['reports_acked']} reports ACKed); the same lines in a jail no cluster"
            f" jail counts: {mon['baseline_cpu_percent_per_1000']:.1f} %"
            "\nsettings off the shipped defaults: [detect:sshd] enabled; the hub's"
            " rebuild_window 0 (not young: the monitor adopts its state without a fail2ban)"
        )
    return "\n\n".join(parts)


def ingest_text(ingested: dict) -> str:
    naive = ingested["naive"]
    rows = [
        [
            label,
            way["offered_per_s"],
            way["acked_per_s_while_sending"],
            way["ack_ms"]["p50"],
            way["ack_ms"]["p99"],
            way["ack_ms"]["max"],
            way["drain_s"],
            way["hub_cpu_cores"] * 100,
            way["hub_main_thread_us_per_failure"],
            way["failures_per_s_by_a_core"],
        ]
        for label, way in (
            (f"f2bzmq: a report per {ingested['window_s'] * 1000:g} ms window", ingested),
            ("naive: a report body per failure line", naive),
        )
    ]
    out = (
        f"ingest: {ingested['nodes']} nodes x {ingested['rate_per_node']:g} failures/s, "
        f"addresses from a botnet of {ingested['botnet']}\n"
    )
    out += table(
        [
            "way",
            "offered/s",
            "ACKed/s",
            "ACK p50 ms",
            "p99",
            "max",
            "drain s",
            "hub CPU %",
            "us/failure",
            "a core's /s",
        ],
        rows,
    )
    return out + (
        f"\n{ingested['reports']} reports; the hub counted {ingested['failures_counted']}"
        f" failures and banned {ingested['cluster_bans']} addresses"
    )


def latency_text(lat: dict) -> str:
    keys = ("p50", "p90", "p99", "max")
    out = "latency: the Found line that passes the threshold -> …\n"
    out += table(
        ["to", "p50 ms", "p90", "p99", "max"],
        [
            ["the hub's decision (its log line)", *(lat["decided_ms"][k] for k in keys)],
            ["node2's and node3's fail2ban log the Ban", *(lat["banned_ms"][k] for k in keys)],
            ["listed on node2 and node3", *(lat["listed_ms"][k] for k in keys)],
        ],
    )
    return out + (
        f"\n{lat['count']} attacks {lat['interval_s'] * 1000:g} ms apart, sync jail action"
        f" {lat['sync_action']}, polled every {lat['poll_ms']:g} ms; naive: the nodes' own"
        f" fail2ban (maxretry 3) banned {lat['naive_local_bans']} of them"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=50, help="simulated monitors (ingest)")
    parser.add_argument("--rate", type=float, default=1000, help="failures/s of each node")
    parser.add_argument("--seconds", type=float, default=10, help="seconds of the attack")
    parser.add_argument("--window", type=float, default=0.025, help="the monitors' window")
    parser.add_argument("--botnet", type=int, default=1_000_000, help="attacking addresses")
    parser.add_argument("--naive-seconds", type=float, default=3, help="seconds of the naive way")
    parser.add_argument("--count", type=int, default=200, help="attacks timed (latency)")
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between attacks")
    parser.add_argument("--poll", type=float, default=0.001, help="seconds between polls")
    parser.add_argument(
        "--action",
        choices=sorted(SYNC_ACTIONS),
        default="dummy",
        help="the sync jails' action (latency)",
    )
    parser.add_argument("--monitor-rate", type=float, default=1000, help="Found lines/s")
    parser.add_argument("--monitor-seconds", type=float, default=10, help="seconds of them")
    parser.add_argument(
        "--parts", default=",".join(PARTS), help=f"which parts to run (default {','.join(PARTS)})"
    )
    parser.add_argument("--dir", help="where the processes live (default: a temp folder)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    args.parts = [part.strip() for part in args.parts.split(",") if part.strip()]
    if not args.parts or set(args.parts) - set(PARTS):
        parser.error(f"--parts: choose among {','.join(PARTS)}")
    if not (1 <= args.nodes <= 500 and 1 <= args.count <= 5000 and args.botnet >= 1):
        parser.error("--nodes must be 1..500, --count 1..5000, --botnet at least 1")
    if min(args.rate, args.seconds, args.window, args.monitor_rate, args.monitor_seconds) <= 0:
        parser.error("rates, seconds and the window must be positive")
    stop_on_sigterm()
    try:
        result = run(args)
    except BenchError as error:
        print(f"detection: {error}", file=sys.stderr)
        return 1
    report("detection", result, text(result), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
