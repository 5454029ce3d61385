"""A hub under attack: its memory and CPU, and a legitimate node's propagation, per flood.

Runs a real publisher on 127.0.0.1 at the shipped defaults (CURVE, INFO logging, its
old-format endpoints and a metrics port on, a table of 20,000 bans), and measures a
legitimate node the way a subscriber sees it: node1 reports a new ban every 20 ms, and
the time until node2's update stream carries it is its propagation. First with no one
else talking (the quiet baseline), then beside each flood, one at a time:

- U (no key): 5,000 idle TCP connections to the report port (and how long a node's new
  connection then takes to be answered); random-key CURVE handshakes as fast as a few
  processes make them; messages of 60,000 frames to the old report port, and of
  60,000 frames and 100 MB to the old update port;
- U with the old token: reports under made-up names, as fast as a REQ socket goes;
- N (node3's key): reports of no-op events at full speed; new bans at full speed (what
  the rate limit lets through); refused reports it never reads the replies of;
  snapshot requests from sockets that never read; a message of 2,000 frames of 60 kB
  to the report port; a subscription of 10 MB;
- L (the host): 1,000 idle connections to the metrics port.

For each: the hub's resident memory (before, peak, after; the peak is the kernel's
high-water mark, reset before each flood), its CPU, and node1's propagation p50/p99
beside the quiet one. The attackers run at the lowest CPU priority: on a deployment
they are other machines, here they share the hub's cores.

    python3 bench/hostile.py --seconds 10 --json hostile.json

A benchmark, not a test: it prints figures and never fails on speed; it exits non-zero
only when a run went wrong (the hub died, node1's ban never arrived).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import zmq
import zmq.auth
from common import (
    BenchError,
    cpu_seconds,
    memory_kb,
    report,
    spread,
    stop_on_sigterm,
    table,
    thread_cpu_seconds,
)
from throughput import node_socket

from f2bzmq import protocol
from f2bzmq.keys import HUB
from f2bzmq.lab import Hub, free_ports, make_keys
from f2bzmq.protocol import BanEvent
from f2bzmq.state import StateStore
from tests.support.hub import start_hub

SPAWN = multiprocessing.get_context("spawn")  # no child inherits a ZeroMQ context
INTERVAL = 0.02  # seconds between node1's bans
TABLE = 20_000  # bans the hub holds before the runs: what a snapshot costs
TOKEN = "bench-token"
JAIL = "sshd"
SETTLE = 2.0  # seconds after a flood before the next, for the hub to close what it left


# --- attackers, each in a process of its own --------------------------------------------------


def attack(name: str, spec: dict, stop, done) -> None:
    """A child process: run the named flood until `stop` is set; `done` counts what it sent."""
    os.nice(19)
    context = zmq.Context()
    try:
        FLOODS[name][1](context, spec, stop, done)
    except (zmq.ZMQError, OSError):
        pass  # a peer the hub cut off: that is the hub defending itself
    finally:
        if name == "subscription of 10 MB":
            os._exit(
                0
            )  # an XSUB keeps its subscription in a trie, a node per byte: closing recurses
        context.destroy(linger=0)


def idle_connections(context, spec, stop, done) -> None:
    held = []
    for _ in range(spec["connections"]):
        with contextlib.suppress(OSError):
            held.append(socket.create_connection(("127.0.0.1", spec["ports"][0]), timeout=1))
            done.value += 1
    stop.wait()
    for sock in held:
        sock.close()


def metrics_connections(context, spec, stop, done) -> None:
    held = []
    for _ in range(1000):
        with contextlib.suppress(OSError):
            held.append(socket.create_connection(("127.0.0.1", spec["metrics"]), timeout=1))
            done.value += 1
    stop.wait()
    for sock in held:
        sock.close()


def curve_handshakes(context, spec, stop, done) -> None:
    hub_key = zmq.auth.load_certificate(Path(spec["keys"]) / f"{HUB}.key")[0]
    while not stop.is_set():
        socks = []
        for _ in range(50):
            sock = context.socket(zmq.DEALER)
            sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
            sock.curve_serverkey = hub_key
            sock.linger = 0
            sock.connect(f"tcp://127.0.0.1:{spec['ports'][0]}")
            socks.append(sock)
        time.sleep(0.05)
        for sock in socks:
            sock.close()
        done.value += len(socks)


def legacy_frames(context, spec, stop, done) -> None:
    sock = context.socket(zmq.DEALER)
    sock.linger = 0
    sock.rcvtimeo = 30_000
    sock.connect(spec["legacy_report"])
    listener = context.socket(zmq.XSUB)
    listener.linger = 0
    listener.connect(spec["legacy_publish"])
    while not stop.is_set():
        sock.send_multipart([b"x" * 4000] * spec["frames"])
        listener.send_multipart([b"\x02" + b"x" * 4000] * spec["frames"])
        listener.send(b"\x02" + b"y" * 100_000_000)
        sock.recv_multipart()
        done.value += 3


def legacy_names(context, spec, stop, done) -> None:
    sock = context.socket(zmq.REQ)
    sock.linger = 0
    sock.rcvtimeo = 30_000
    sock.connect(spec["legacy_report"])
    n = 0
    while not stop.is_set():
        n += 1
        sock.send(f"{TOKEN}|made-up-{n}|sshd|Unban|203.0.113.{n % 250 + 1}".encode())
        sock.recv()
        done.value += 1


def report_loop(context, spec, stop, done, bodies: Callable[[int], list[bytes]], deaf=False):
    """node3 sending reports of 100 events as fast as its socket takes them; reading the
    replies unless `deaf`."""
    sock = node_socket(context, zmq.DEALER, Path(spec["keys"]), "node3")
    sock.connect(f"tcp://127.0.0.1:{spec['ports'][0]}")
    if deaf:
        sock.rcvhwm = 1
    sock.sndtimeo = 100
    n = 0
    while not stop.is_set():
        with contextlib.suppress(zmq.Again):
            sock.send_multipart(protocol.encode_report(bodies(n)))
            n += 1
            done.value += 100
        if not deaf:
            while sock.poll(0):
                sock.recv_multipart()


def no_ops(context, spec, stop, done) -> None:
    def bodies(n: int) -> list[bytes]:  # unbans of what no one banned
        return [
            BanEvent.new("node3", JAIL, protocol.UNBAN, f"203.0.113.{k % 250 + 1}").encode()
            for k in range(100)
        ]

    report_loop(context, spec, stop, done, bodies)


def new_bans(context, spec, stop, done) -> None:
    def bodies(n: int) -> list[bytes]:  # 100 addresses of 100.64.0.0/10 never banned yet
        return [
            BanEvent.new(
                "node3", JAIL, protocol.BAN, _address(n * 100 + k, 100), bantime=600
            ).encode()
            for k in range(100)
        ]

    report_loop(context, spec, stop, done, bodies)


def deaf_reports(context, spec, stop, done) -> None:
    forged = [BanEvent.new("n" * 64, JAIL, protocol.BAN, "198.51.100.1").encode()] * 100
    report_loop(context, spec, stop, done, lambda n: forged, deaf=True)


def snapshot_requests(context, spec, stop, done) -> None:
    socks = []
    for _ in range(20):
        sock = node_socket(context, zmq.DEALER, Path(spec["keys"]), "node3")
        sock.rcvhwm = 1  # reads nothing
        sock.connect(f"tcp://127.0.0.1:{spec['ports'][2]}")
        socks.append(sock)
    while not stop.is_set():
        for sock in socks:
            with contextlib.suppress(zmq.Again):
                sock.send_multipart(protocol.encode_snapshot_request(), zmq.NOBLOCK)
                done.value += 1
        time.sleep(0.01)


def native_frames(context, spec, stop, done) -> None:
    sock = node_socket(context, zmq.DEALER, Path(spec["keys"]), "node3")
    sock.rcvtimeo = 30_000
    sock.connect(f"tcp://127.0.0.1:{spec['ports'][0]}")
    while not stop.is_set():
        sock.send_multipart([protocol.PROTOCOL, protocol.EVENT] + [b"x" * 60_000] * 2000)
        sock.recv_multipart()
        done.value += 1


def big_subscription(context, spec, stop, done) -> None:
    sock = node_socket(context, zmq.XSUB, Path(spec["keys"]), "node3")
    sock.connect(f"tcp://127.0.0.1:{spec['ports'][1]}")
    while not stop.wait(1.0):
        sock.send(b"\x01" + b"y" * 10_000_000)
        done.value += 1
    stop.wait()


# name -> (who may do it, the attacker, processes)
FLOODS: dict[str, tuple[str, Callable, int]] = {
    "idle connections": ("U", idle_connections, 1),
    "CURVE handshakes": ("U", curve_handshakes, 2),
    "old ports: 60,000 frames, 100 MB": ("U", legacy_frames, 1),
    "old port: made-up names": ("U+token", legacy_names, 1),
    "no-op reports": ("N", no_ops, 1),
    "new bans at full speed": ("N", new_bans, 1),
    "replies never read": ("N", deaf_reports, 1),
    "snapshot requests, never read": ("N", snapshot_requests, 1),
    "report of 2,000 frames of 60 kB": ("N", native_frames, 1),
    "subscription of 10 MB": ("N", big_subscription, 1),
    "idle metrics connections": ("L", metrics_connections, 1),
}


# --- the hub and the legitimate node ---------------------------------------------------------


def hub_with_table(root: Path, keys: Path, spec: dict) -> Hub:
    """A hub at the shipped defaults whose table holds TABLE bans of node4 (no key needed)."""
    state = root / "hub" / "state"
    state.mkdir(parents=True)
    store = StateStore(state / "publisher.sqlite3")
    table_ = store.load("hub", 600, 86400)
    now = time.time()
    for n in range(TABLE):
        event = BanEvent.new("node4", JAIL, protocol.BAN, f"198.18.{n // 250}.{n % 250 + 1}", now)
        table_.apply(event, now)
    store.commit(table_)
    store.close()
    publisher = {
        "legacy_report_bind": spec["legacy_report"],
        "legacy_publish_bind": spec["legacy_publish"],
        "legacy_token": TOKEN,
        "metrics": str(spec["metrics"]),
        "heartbeat_interval": "1",  # the lab's is shorter; this is the shipped one
    }
    return start_hub(root, keys, spec["ports"], general={"loglevel": "INFO"}, publisher=publisher)


class LegitimateNode:
    """node1 reporting, node2 listening on the packed stream, as a subscriber does."""

    def __init__(self, keys: Path, ports: list[int]) -> None:
        self.context = zmq.Context()
        self.reports = node_socket(self.context, zmq.DEALER, keys, "node1")
        self.reports.connect(f"tcp://127.0.0.1:{ports[0]}")
        self.updates = node_socket(self.context, zmq.SUB, keys, "node2")
        self.updates.setsockopt(zmq.SUBSCRIBE, protocol.PACKED)
        self.updates.connect(f"tcp://127.0.0.1:{ports[1]}")
        self.count = 0
        if not self.updates.poll(15_000):
            raise BenchError("node2 heard nothing from the hub")

    def propagation(self, seconds: float) -> list[float]:
        """Milliseconds from node1's report to node2's update, one ban every INTERVAL."""
        latencies = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.count += 1
            ip = _address(self.count)
            event = BanEvent.new("node1", JAIL, protocol.BAN, ip, bantime=600)
            sent = time.perf_counter()
            self.reports.send_multipart([protocol.PROTOCOL, protocol.EVENT, event.encode()])
            if not self._wait_for(ip, 10.0):
                raise BenchError(f"node1's ban of {ip} did not reach node2 within 10 s")
            latencies.append((time.perf_counter() - sent) * 1000)
            while self.reports.poll(0):
                self.reports.recv_multipart()  # the ACKs
            time.sleep(max(0.0, INTERVAL - (time.perf_counter() - sent)))
        return latencies

    def _wait_for(self, ip: str, timeout: float) -> bool:
        needle = f'"ip":"{ip}"'.encode()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.updates.poll(100):
                continue
            frames = self.updates.recv_multipart()
            if frames[1] == protocol.UPDATE and needle in protocol.unpack(
                frames[3], protocol.MAX_PACKED
            ):
                return True
        return False

    def close(self) -> None:
        self.context.destroy(linger=0)


def _address(number: int, first: int = 10) -> str:
    """The number-th address of 10.0.0.0/8 (node1's), or of 100.64.0.0/10 (node3's)."""
    second = number >> 16 & 255 if first == 10 else 64 + (number >> 16 & 63)
    return f"{first}.{second}.{number >> 8 & 255}.{number & 255}"


def new_connection_ms(keys: Path, ports: list[int]) -> float:
    """How long a node's new connection takes to have its first report ACKed."""
    context = zmq.Context()
    try:
        sock = node_socket(context, zmq.DEALER, keys, "node1")
        sock.rcvtimeo = 30_000
        started = time.perf_counter()
        sock.connect(f"tcp://127.0.0.1:{ports[0]}")
        event = BanEvent.new("node1", JAIL, protocol.BAN, "192.0.2.99", bantime=600)
        sock.send_multipart([protocol.PROTOCOL, protocol.EVENT, event.encode()])
        sock.recv_multipart()
        return (time.perf_counter() - started) * 1000
    except zmq.Again:
        return float("inf")
    finally:
        context.destroy(linger=0)


def reset_peak(pid: int) -> None:
    """Reset the kernel's high-water mark of the process's resident memory (VmHWM)."""
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")


def run_flood(name, spec, hub, node, seconds) -> dict:
    pid = hub.publisher.process.pid
    stop, done = SPAWN.Event(), SPAWN.Value("q", 0)
    processes = [
        SPAWN.Process(target=attack, args=(name, spec, stop, done), daemon=True)
        for _ in range(FLOODS[name][2])
    ]
    reset_peak(pid)
    before = memory_kb(pid)["VmRSS"]  # read after the reset: the peak is at least this
    for process in processes:
        process.start()
    try:
        time.sleep(min(1.0, seconds / 2))  # the flood under way
        connect_ms = new_connection_ms(Path(spec["keys"]), spec["ports"])
        cpu, per_thread, started = cpu_seconds(pid), thread_cpu_seconds(pid), time.monotonic()
        latencies = node.propagation(seconds)
        elapsed = time.monotonic() - started
        cpu_percent = (cpu_seconds(pid) - cpu) / elapsed * 100
        threads = {
            name: (seconds_ - per_thread.get(name, 0.0)) / elapsed * 100
            for name, seconds_ in thread_cpu_seconds(pid).items()
        }
        peak = memory_kb(pid)["VmHWM"]
    finally:
        stop.set()
        for process in processes:
            process.join(10)
            if process.is_alive():
                process.kill()
    time.sleep(min(SETTLE, 2 * seconds))
    if not hub.publisher.alive():
        raise BenchError(f"the hub died under '{name}'")
    return {
        "who": FLOODS[name][0],
        "sent": done.value,
        "rss_before_mb": before / 1024,
        "rss_peak_mb": peak / 1024,
        "rss_after_mb": memory_kb(pid)["VmRSS"] / 1024,
        "cpu_percent": cpu_percent,
        "cpu_percent_per_thread": threads,
        "new_connection_ms": connect_ms,
        "propagation_ms": spread(latencies),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="per flood (10)")
    parser.add_argument("--connections", type=int, default=5000, help="idle ones (5000)")
    parser.add_argument("--frames", type=int, default=60_000, help="of a message (60000)")
    parser.add_argument("--only", help="comma-separated floods to run (default all)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    stop_on_sigterm()
    floods = list(FLOODS)
    if args.only:
        floods = [name for name in floods if any(word in name for word in args.only.split(","))]
    root = Path(tempfile.mkdtemp(prefix="f2bzmq-hostile-"))
    hub = None
    try:
        ports = free_ports(6)
        keys = make_keys(root / "keys", ["node1", "node2", "node3"])
        spec = {
            "ports": ports[:3],
            "keys": str(keys),
            "legacy_report": f"tcp://127.0.0.1:{ports[3]}",
            "legacy_publish": f"tcp://127.0.0.1:{ports[4]}",
            "metrics": ports[5],
            "connections": args.connections,
            "frames": args.frames,
        }
        hub = hub_with_table(root, keys, spec)
        node = LegitimateNode(keys, spec["ports"])
        try:
            node.propagation(1.0)  # connections up, caches warm
            pid = hub.publisher.process.pid
            cpu, started = cpu_seconds(pid), time.monotonic()
            quiet = node.propagation(args.seconds)
            results = {
                "quiet": {
                    "rss_mb": memory_kb(pid)["VmRSS"] / 1024,
                    "cpu_percent": (cpu_seconds(pid) - cpu) / (time.monotonic() - started) * 100,
                    "new_connection_ms": new_connection_ms(keys, spec["ports"]),
                    "propagation_ms": spread(quiet),
                }
            }
            for name in floods:
                results[name] = run_flood(name, spec, hub, node, args.seconds)
        finally:
            node.close()
    finally:
        if hub is not None:
            hub.publisher.stop()
        shutil.rmtree(root, ignore_errors=True)
    print_results(results, args)
    return 0


def print_results(results: dict, args: argparse.Namespace) -> None:
    quiet = results["quiet"]
    p50, p99 = quiet["propagation_ms"]["p50"], quiet["propagation_ms"]["p99"]
    rows = [
        [
            "quiet",
            "",
            f"{quiet['rss_mb']:.0f}",
            "",
            f"{quiet['cpu_percent']:.0f}",
            f"{quiet['new_connection_ms']:.1f}",
            f"{p50:.1f}",
            f"{p99:.1f}",
        ]
    ]
    for name, figures in results.items():
        if name == "quiet":
            continue
        spread_ = figures["propagation_ms"]
        rows.append(
            [
                f"{name} ({figures['who']})",
                f"{figures['sent']}",
                f"{figures['rss_before_mb']:.0f} / {figures['rss_peak_mb']:.0f}"
                f" / {figures['rss_after_mb']:.0f}",
                f"{figures['rss_peak_mb'] - figures['rss_before_mb']:+.0f}",
                f"{figures['cpu_percent']:.0f}",
                f"{figures['new_connection_ms']:.1f}",
                f"{spread_['p50']:.1f} ({spread_['p50'] / p50:.1f}x)",
                f"{spread_['p99']:.1f} ({spread_['p99'] / p99:.1f}x)",
            ]
        )
    headers = [
        "flood (who)",
        "sent",
        "hub RSS MB before/peak/after",
        "peak - before",
        "hub CPU %",
        "new conn. ms",
        "node1 -> node2 p50 ms",
        "p99 ms",
    ]
    text = table(headers, rows)
    text += (
        f"\n{args.seconds:g} s per flood, node1 banning every {INTERVAL * 1000:.0f} ms;"
        f" the hub holds {TABLE} bans; attackers at the lowest CPU priority"
    )
    report("hostile", {"floods": results}, text, args.json)


if __name__ == "__main__":
    sys.exit(main())
