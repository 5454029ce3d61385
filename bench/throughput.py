"""Hub throughput: events per second one hub stores durably and broadcasts to every node.

Runs a real publisher on 127.0.0.1 (CURVE on every socket, its ban table in SQLite
with synchronous=FULL, in a folder on the file system the output names) and:

- MONITORS simulated monitors, each a DEALER with its own node key sending events
  the way the monitor does (what its window has room for, in reports of up to 100
  events [F2BZMQ1, event, body, …]; WINDOW in flight, ACK by id), spread over up
  to 10 processes. The default window, 1000, is a monitor with `in_flight = 1000`
  (its default of 100 makes this a measure of round trips on a loaded machine);
  the hub's rate limit is lifted;
- SUBSCRIBERS update connections, each a SUB with its own node key on the packed
  update stream subscribers take, spread over a few processes; each inflates and
  counts the updates it receives and the gaps in their sequence numbers. They run at
  the lowest CPU priority: on a deployment they are 200 other machines, here they
  share the hub's cores, and the hub's work comes first.

Every event bans a distinct address, so every event must become one update at
every subscriber. The figures: events ACKed per second (an ACK means committed to
disk), events per second until the slowest subscriber counted every update, and
the loss (must be zero), the bytes per event on the wire (packed, and what the
plain stream would have sent), and, as an upper bound, the rate the CPU of the
hub's busiest thread allows (it leaves out waits such as each commit's fsync):
here the simulated subscribers take most of the cores. In the same run, the naive
way the old tool reported: a fresh ZeroMQ context and REQ socket per event and one
round trip each, against the same hub's fail2ban-zmq-tools endpoint with every
subscriber connected, timed on a sample and extrapolated as if MONITORS such
monitors added up perfectly.

    python3 bench/throughput.py --events 50000 --monitors 10 --subscribers 200 --json r.json

A benchmark, not a test: it prints figures and never fails on speed; it exits
non-zero only when the run went wrong (a process died, the hub never answered).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
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
    storage,
    table,
    thread_cpu_seconds,
)

from f2bzmq import protocol
from f2bzmq.delivery import reports
from f2bzmq.keys import HUB
from f2bzmq.lab import Hub, free_ports, make_keys, tail
from f2bzmq.protocol import BanEvent
from tests.support.nodeclient import NodeClient

SPAWN = multiprocessing.get_context("spawn")  # no child inherits a ZeroMQ context
MORE = int(zmq.SNDMORE)
NOBLOCK = int(zmq.NOBLOCK)
BANTIME = 3600
JAIL = "sshd"
MAX_EVENTS = 100_000  # the bench's send_hwm: every update fits a lagging subscriber's queue
STATS_INTERVAL_MS = 20  # the longest a subscriber process waits for its next message
SINK_PAUSE = 0.003  # seconds a simulated subscriber process lets messages gather
SETUP_TIMEOUT = 120.0  # seconds for every connection to be up
WINDOW = 1000  # events in flight per simulated monitor: its in_flight (see the docstring)
# The hub's settings that differ from the shipped defaults (besides the old-format report
# port the naive way uses); the table says so.
HUB_SETTINGS = {
    "rate_limit": "1000000",
    "rate_burst": "10000000",
    "rate_peak": "10000000",
    # No heartbeat during the run: every message a subscriber counts is an update.
    "heartbeat_interval": "3600",
    # Deep queues: the run measures delivery, not the drop-and-snapshot recovery
    # a subscriber that lags by more than the default 1000 messages goes through.
    "send_hwm": str(MAX_EVENTS),
}


def event_address(number: int) -> str:
    """The number-th address of 10.0.0.0/8: every event of a run bans its own address."""
    return f"10.{number >> 16 & 255}.{number >> 8 & 255}.{number & 255}"


def setup_address(number: int, reporter: bool = False) -> str:
    """Addresses of the events that only bring connections up: 198.18.0.0/16 for the bench
    node, 198.19.0.0/16 for the monitors (a ban of an address already banned by another
    node is no news, so no update)."""
    return f"198.{19 if reporter else 18}.{number >> 8 & 255}.{number & 255}"


def node_socket(context: zmq.Context, kind: int, keys_dir: Path, name: str) -> zmq.Socket:
    """A node's CURVE client socket: its own key pair, and the hub's public key."""
    sock = context.socket(kind)
    sock.curve_publickey, sock.curve_secretkey = zmq.auth.load_certificate(
        keys_dir / f"{name}.key_secret"
    )
    sock.curve_serverkey = zmq.auth.load_certificate(keys_dir / f"{HUB}.key")[0]
    sock.linger = 0
    return sock


def receive(sock: zmq.Socket) -> list[bytes]:
    """Every part of one waiting message (zmq.Again when none waits), as bytes."""
    frame = sock.recv(NOBLOCK, copy=False)
    frames = [frame]
    while frame.more:
        frame = sock.recv(NOBLOCK, copy=False)
        frames.append(frame)
    return [part.bytes for part in frames]


def split(items: list, parts: int) -> list[list]:
    """items in `parts` nearly equal slices, none empty."""
    size = math.ceil(len(items) / parts)
    return [items[i : i + size] for i in range(0, len(items), size)]


# --- simulated monitors -------------------------------------------------------------------


def in_child(who: str, work, conn, *args) -> None:
    """Run work(context, *args, conn) in a child process with its own context; send the
    parent its figures, or why it failed."""
    context = zmq.Context()
    try:
        conn.send(work(context, *args, conn))
    except (BenchError, zmq.ZMQError, OSError) as error:
        conn.send({"error": f"{who}: {error}"})
    except EOFError:
        pass  # the parent is gone
    finally:
        context.destroy(linger=0)


def report_events(monitors, keys_dir, endpoint, count, window, conn) -> None:
    """A child process: `monitors` [(index, node name)] each report `count` bans, pipelined."""
    in_child(
        f"monitors {monitors[0][1]}..",
        _report_events,
        conn,
        monitors,
        keys_dir,
        endpoint,
        count,
        window,
    )


def _report_events(context, monitors, keys_dir, endpoint, count, window, conn) -> dict:
    dealers, bodies, ids = [], [], []
    for index, name in monitors:
        sock = node_socket(context, zmq.DEALER, keys_dir, name)
        sock.sndhwm = sock.rcvhwm = 0  # the window bounds the queues
        sock.connect(endpoint)
        dealers.append(sock)
        events = [
            BanEvent.new(name, JAIL, protocol.BAN, event_address(index * count + k), None, BANTIME)
            for k in range(count)
        ]
        bodies.append([event.encode() for event in events])
        ids.append([event.id for event in events])
    poller = zmq.Poller()
    numbers = {}
    for number, sock in enumerate(dealers):
        poller.register(sock, zmq.POLLIN)
        numbers[sock] = number

    # One event each first: the CURVE handshake and the hub's key check are done before "go".
    for (index, name), sock in zip(monitors, dealers):
        event = BanEvent.new(name, JAIL, protocol.BAN, setup_address(index, True), None, BANTIME)
        sock.send_multipart([protocol.PROTOCOL, protocol.EVENT, event.encode()])
    answered = 0
    deadline = time.monotonic() + SETUP_TIMEOUT
    while answered < len(dealers):
        if time.monotonic() > deadline:
            raise BenchError("the hub did not answer the first events")
        for sock, _ in poller.poll(100):
            if receive(sock)[1] != protocol.ACK:
                raise BenchError("the hub refused a first event")
            answered += 1
    conn.send("ready")
    command, timeout = conn.recv()
    if command != "go":
        return {}

    sent = [0] * len(dealers)
    replied = [0] * len(dealers)
    sent_at: dict[str, float] = {}
    latencies: list[float] = []
    acked = refused = 0
    first_refusal = ""
    total = count * len(dealers)
    cpu = time.process_time()
    started = time.time()
    finished = started
    deadline = time.monotonic() + timeout
    while acked + refused < total and time.monotonic() < deadline:
        for d, sock in enumerate(dealers):
            room = min(count - sent[d], window - (sent[d] - replied[d]))
            if room > 0:
                waiting = [(k, ids[d][k], bodies[d][k]) for k in range(sent[d], sent[d] + room)]
                for report in reports(waiting):
                    sock.send(protocol.PROTOCOL, MORE)
                    sock.send(protocol.EVENT, MORE)
                    for _, _, body in report[:-1]:
                        sock.send(body, MORE)
                    sock.send(report[-1][2])
                    now = time.perf_counter()
                    for _, event_id, _ in report:
                        sent_at[event_id] = now
                sent[d] += room
        for sock, _ in poller.poll(100):
            d = numbers[sock]
            while True:
                try:
                    _, kind, *answers = receive(sock)
                except zmq.Again:
                    break
                now = time.perf_counter()
                replied[d] += len(answers)
                for body in answers:
                    answer = json.loads(body)
                    latencies.append((now - sent_at.pop(answer.get("id"), now)) * 1000)
                    if kind == protocol.ACK:
                        acked += 1
                    else:
                        refused += 1
                        first_refusal = first_refusal or str(answer.get("reason"))
            finished = time.time()
    return {
        "acked": acked,
        "refused": refused,
        "first_refusal": first_refusal,
        "started": started,
        "finished": finished,
        "ack_ms": latencies,
        "cpu_seconds": time.process_time() - cpu,
    }


# --- simulated subscribers ----------------------------------------------------------------


def count_updates(names, keys_dir, endpoint, conn) -> None:
    """A child process: a SUB per node name, each counting the updates the hub sends it.

    Each socket is read until it has heard the hub (joined) and passed the sequence
    number the parent names; from there every update with a later sequence number
    counts, and a message that does not start where the previous one ended is a gap.
    The hub sends up to 1000 updates per message in one packed frame, so counting costs little.
    """
    in_child(f"subscribers {names[0]}..", _count_updates, conn, names, keys_dir, endpoint)


class Tally:
    """What one subscriber heard: the last sequence number, updates past the marker, gaps."""

    def __init__(self) -> None:
        self.last: int | None = None
        self.count = 0
        self.gaps = 0
        self.messages = 0  # update messages past the marker
        self.wire_bytes = 0  # their packed lists of events
        self.plain_bytes = 0  # the same inflated

    def take(self, frames: list[bytes], marker: int | None) -> None:
        first = json.loads(frames[2])["seq"]
        if frames[1] != protocol.UPDATE:
            self.last = first if self.last is None else self.last
            return
        # Inflated as a subscriber does, then counted, not parsed: the bench's events hold no
        # "{" but the one they start with, so this is exact and costs the sink little.
        body = protocol.unpack(frames[3], protocol.MAX_PACKED)
        events = body.count(b"{")
        if marker is not None and self.last is not None and first != self.last + 1:
            self.gaps += 1
        self.last = first + events - 1
        if marker is not None:
            self.count += max(0, self.last - max(first - 1, marker))
            self.messages += 1
            self.wire_bytes += len(frames[3])
            self.plain_bytes += len(body)


def _count_updates(context, names, keys_dir, endpoint, conn) -> dict:
    os.nice(19)  # the measuring yields to the hub measured (see the module's docstring)
    numbers = {}
    poller = zmq.Poller()
    for name in names:
        sock = node_socket(context, zmq.SUB, keys_dir, name)
        sock.rcvhwm = 0  # a burst waits in memory here, never dropped
        sock.setsockopt(zmq.SUBSCRIBE, protocol.PACKED)
        sock.connect(endpoint)
        poller.register(sock, zmq.POLLIN)
        numbers[sock] = len(numbers)
    tallies = [Tally() for _ in names]

    def read(timeout_ms: int, marker: int | None) -> None:
        # A sink that only counts should cost little: polling 50 sockets costs as much as
        # reading a message, so let a few milliseconds of messages gather between polls.
        time.sleep(SINK_PAUSE)
        for sock, _ in poller.poll(timeout_ms):
            tally = tallies[numbers[sock]]
            for _ in range(10000):
                try:
                    tally.take(receive(sock), marker)
                except zmq.Again:
                    break

    marker: int | None = None
    told = False
    deadline = time.monotonic() + SETUP_TIMEOUT
    while marker is None or any(t.last is None or t.last < marker for t in tallies):
        if time.monotonic() > deadline:
            silent = sum(1 for t in tallies if t.last is None)
            raise BenchError(f"{silent} subscribers heard nothing from the hub")
        read(20, marker)
        if not told and all(t.last is not None for t in tallies):
            conn.send("joined")
            told = True
        if conn.poll(0):
            command, marker = conn.recv()
            if command != "start":
                return {}
    conn.send("counting")
    cpu = time.process_time()
    command, total, timeout = conn.recv()
    if command != "expect":
        return {}
    done: list[float | None] = [None] * len(tallies)
    deadline = time.monotonic() + timeout
    while None in done and time.monotonic() < deadline:
        read(STATS_INTERVAL_MS, marker)
        for i, tally in enumerate(tallies):
            if done[i] is None and tally.count >= total:
                done[i] = time.time()
    read(200, marker)  # anything more than expected shows as extra
    return {
        "counts": [tally.count for tally in tallies],
        "gaps": sum(tally.gaps for tally in tallies),
        "messages": sum(tally.messages for tally in tallies),
        "wire_bytes": sum(tally.wire_bytes for tally in tallies),
        "plain_bytes": sum(tally.plain_bytes for tally in tallies),
        "done": done,
        "cpu_seconds": time.process_time() - cpu,
    }


# --- the parent -------------------------------------------------------------------------


class Workers:
    """The benchmark's child processes, each with a pipe; close() ends every one of them."""

    def __init__(self) -> None:
        self.children: list[tuple[multiprocessing.Process, object]] = []

    def start(self, target, *args):
        parent, child = SPAWN.Pipe()
        process = SPAWN.Process(target=target, args=(*args, child), daemon=True)
        process.start()
        child.close()
        self.children.append((process, parent))
        return parent

    @staticmethod
    def expect(conn, timeout: float):
        """The next message from a child; a BenchError if it failed, died or said nothing."""
        try:
            ready = conn.poll(timeout)
            message = conn.recv() if ready else None
        except EOFError:
            raise BenchError("a benchmark process died") from None
        if not ready:
            raise BenchError(f"a benchmark process said nothing for {timeout:g} s")
        if isinstance(message, dict) and "error" in message:
            raise BenchError(message["error"])
        return message

    def close(self) -> None:
        for _, conn in self.children:
            conn.close()  # a child waiting on its pipe sees EOF and ends
        for process, _ in self.children:
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join(5)
        self.children.clear()

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class SubscriberSwarm:
    """COUNT simulated subscribers of a running hub, in a few processes (also used by scale).

    `start(marker)` returns once every socket heard the hub and passed sequence `marker`;
    `counts(total)` waits until each counted `total` updates after the marker.
    """

    def __init__(self, workers: Workers, names: list[str], keys_dir: Path, endpoint: str):
        processes = max(1, min(4, math.ceil(len(names) / 50)))
        self.workers = workers
        self.pipes = [
            workers.start(count_updates, chunk, keys_dir, endpoint)
            for chunk in split(names, processes)
        ]
        self.joined: set[int] = set()

    def all_joined(self) -> bool:
        for number, pipe in enumerate(self.pipes):
            if number not in self.joined and pipe.poll(0):
                if self.workers.expect(pipe, 0) != "joined":
                    raise BenchError("a subscriber process went wrong while joining")
                self.joined.add(number)
        return len(self.joined) == len(self.pipes)

    def start(self, marker: int) -> None:
        for pipe in self.pipes:
            pipe.send(("start", marker))
        for pipe in self.pipes:
            if self.workers.expect(pipe, SETUP_TIMEOUT) != "counting":
                raise BenchError("a subscriber process did not start counting")

    def counts(self, total: int, timeout: float) -> tuple[list[int], list[float | None], int]:
        """Updates each subscriber counted, when it had `total`, and frames left over;
        `cpu_seconds` is then what the counting cost these processes."""
        for pipe in self.pipes:
            pipe.send(("expect", total, timeout))
        counts, done, gaps = [], [], 0
        self.cpu_seconds = 0.0
        self.messages = self.wire_bytes = self.plain_bytes = 0
        for pipe in self.pipes:
            result = self.workers.expect(pipe, timeout + 30)
            counts += result["counts"]
            done += result["done"]
            gaps += result["gaps"]
            self.cpu_seconds += result["cpu_seconds"]
            self.messages += result["messages"]
            self.wire_bytes += result["wire_bytes"]
            self.plain_bytes += result["plain_bytes"]
        return counts, done, gaps


def join_swarm(swarm: SubscriberSwarm, client: NodeClient | None) -> None:
    """Wait until every simulated subscriber hears the hub.

    With a client, the hub sends no heartbeats to hear: the client reports bans of
    its own until each subscriber heard an update. Without one, the heartbeats do.
    """
    deadline = time.monotonic() + SETUP_TIMEOUT
    number = 1
    while not swarm.all_joined():
        if time.monotonic() > deadline:
            raise BenchError("the simulated subscribers did not all connect")
        if client is None:
            time.sleep(0.05)
            continue
        acknowledge(client, client.node, setup_address(number))
        number += 1
        time.sleep(0.02)
        drain_updates(client)


def drain_updates(client: NodeClient) -> None:
    """Read the bench node's updates as they come: none is dropped at its HWM."""
    while client.updates.poll(0):
        client.updates.recv_multipart()


def marker(client: NodeClient) -> int:
    """Report one more ban; its sequence number: the subscribers count what follows it."""
    ip = setup_address(60000)
    acknowledge(client, client.node, ip)
    deadline = time.monotonic() + SETUP_TIMEOUT
    while time.monotonic() < deadline:
        try:
            header, event = client.next_update()
        except zmq.Again:
            break
        if event.ip == ip:
            return header["seq"]
    raise BenchError("the bench node never saw its own marker update")


def acknowledge(client: NodeClient, node: str, ip: str) -> None:
    """Report one ban and insist on its ACK."""
    event = BanEvent.new(node, JAIL, protocol.BAN, ip, None, BANTIME)
    try:
        kind, body = client.report(event.encode())
    except zmq.Again:
        raise BenchError("the hub did not answer within 10 s") from None
    if kind != protocol.ACK:
        raise BenchError(f"the hub refused a bench event: {body}")


def naive_round_trips(endpoint: str, count: int, client: NodeClient) -> list[float]:
    """The old tool's way: a context, a REQ socket and one round trip per event (ms each)."""
    times = []
    for number in range(count):
        message = f"legacy-monitor|{JAIL}|Ban|100.64.{number >> 8 & 255}.{number & 255}".encode()
        started = time.perf_counter()
        context = zmq.Context()
        try:
            sock = context.socket(zmq.REQ)
            sock.linger = 0
            sock.rcvtimeo = 10000
            sock.connect(endpoint)
            sock.send(message)
            reply = sock.recv()
        except zmq.Again:
            raise BenchError("the hub's legacy endpoint did not answer") from None
        finally:
            context.destroy(linger=0)
        times.append((time.perf_counter() - started) * 1000)
        drain_updates(client)
        if reply != message:
            raise BenchError(f"the hub refused a legacy report: {reply!r}")
    return times


def stop_hub(hub: Hub, ports: list[int], keys_dir: Path) -> None:
    """SIGTERM the hub, and wake its poll loop with a message until it has stopped.

    The hub reads a SIGTERM taken by one of its other threads (the key checker) only
    when its loop next wakes up, and without heartbeats nothing else would wake it.
    """
    process = hub.publisher.process
    if process is not None and process.poll() is None:
        process.send_signal(signal.SIGTERM)
        client = NodeClient(ports, keys_dir, node="bench")
        try:
            for _ in range(150):
                if process.poll() is not None:
                    break
                client.reports.send_multipart([protocol.PROTOCOL, protocol.EVENT, b"{}"])
                time.sleep(0.1)
        finally:
            client.close()
    hub.publisher.stop()


def run(
    events: int = 50000,
    monitors: int = 10,
    subscribers: int = 200,
    window: int = WINDOW,
    naive: int = 200,
    loglevel: str = "INFO",
    directory: str | None = None,
) -> dict:
    """Measure one hub with `monitors` reporting `events` in all and `subscribers` listening."""
    root = Path(tempfile.mkdtemp(prefix="f2bzmq-throughput-", dir=directory))
    try:
        return measure(root, events, monitors, subscribers, window, naive, loglevel)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def measure(
    root: Path,
    events: int,
    monitors: int,
    subscribers: int,
    window: int,
    naive: int,
    loglevel: str,
) -> dict:
    per_monitor = events // monitors
    total = per_monitor * monitors
    timeout = 60 + total / 200
    monitor_names = [f"monitor{i}" for i in range(1, monitors + 1)]
    subscriber_names = [f"sub{i}" for i in range(1, subscribers + 1)]
    keys_dir = make_keys(root / "keys", [*monitor_names, *subscriber_names, "bench"])
    ports = free_ports(4)
    hub = Hub(
        root,
        ports,
        keys_dir=keys_dir,
        general={"loglevel": loglevel},
        publisher={**HUB_SETTINGS, "legacy_report_bind": f"tcp://127.0.0.1:{ports[3]}"},
    )
    hub.publisher.start()
    try:
        with Workers() as workers:
            client = NodeClient(ports, keys_dir, node="bench")
            try:
                acknowledge(client, "bench", setup_address(0))
                pid = hub.publisher.process.pid
                swarm = SubscriberSwarm(
                    workers, subscriber_names, keys_dir, f"tcp://127.0.0.1:{ports[1]}"
                )
                reporters = [
                    workers.start(
                        report_events,
                        chunk,
                        keys_dir,
                        f"tcp://127.0.0.1:{ports[0]}",
                        per_monitor,
                        window,
                    )
                    for chunk in split(list(enumerate(monitor_names)), min(monitors, 10))
                ]
                for pipe in reporters:
                    if workers.expect(pipe, SETUP_TIMEOUT) != "ready":
                        raise BenchError("a monitor process did not get ready")
                join_swarm(swarm, client)
                swarm.start(marker(client))
                # The naive way meets the same hub, with every subscriber to broadcast to.
                naive_ms = naive_round_trips(f"tcp://127.0.0.1:{ports[3]}", naive, client)
                client.updates.close()  # the bench node's own SUB must not lag behind
                cpu_before = cpu_seconds(pid)
                threads_before = thread_cpu_seconds(pid)
                for pipe in reporters:
                    pipe.send(("go", timeout))
                results = [workers.expect(pipe, timeout + 30) for pipe in reporters]
                counts, done, gaps = swarm.counts(naive + total, timeout)
                counts = [count - naive for count in counts]  # the naive reports' updates
                hub_cpu = cpu_seconds(pid) - cpu_before
                hub_threads = {
                    name: seconds - threads_before.get(name, 0.0)
                    for name, seconds in thread_cpu_seconds(pid).items()
                }
                hub_memory = memory_kb(pid)
            finally:
                client.close()
    except BenchError as error:
        raise BenchError(f"{error}\n--- hub log ---\n{tail(hub.log_text())}") from None
    finally:
        stop_hub(hub, ports, keys_dir)
    setup = {
        "events": total,
        "monitors": monitors,
        "subscribers": subscribers,
        "window": window,
        "loglevel": loglevel,
        "storage": storage(root),
    }
    return {
        **setup,
        **figures(total, monitors, results, (counts, done, gaps), naive_ms),
        "hub": hub_figures(hub_cpu, hub_threads, hub_memory, results, done, total),
        # The hub's fan-out is paid per message: how many updates each carried on average.
        "events_per_update_message": sum(counts) / max(1, swarm.messages),
        # And per byte (encrypted, sent and read by every subscriber): packed, and plain.
        "update_bytes_per_event": {
            "packed": swarm.wire_bytes / max(1, sum(counts)),
            "plain": swarm.plain_bytes / max(1, sum(counts)),
        },
        "cpu_seconds": {
            "hub": hub_cpu,
            "simulated_monitors": sum(result["cpu_seconds"] for result in results),
            "simulated_subscribers": swarm.cpu_seconds,
        },
    }


def figures(
    total: int,
    monitors: int,
    results: list[dict],
    received: tuple[list[int], list[float | None], int],
    naive_ms: list[float],
) -> dict:
    """Rates, ACK delays, loss and the naive comparison, from what the processes reported."""
    counts, done, gaps = received
    if not any(result["ack_ms"] for result in results):
        raise BenchError("the hub answered none of the events")
    started = min(result["started"] for result in results)
    acked_at = max(result["finished"] for result in results)
    acked = sum(result["acked"] for result in results)
    refused = sum(result["refused"] for result in results)
    finished = sorted(when for when in done if when is not None)
    delivered = total / (finished[-1] - started) if len(finished) == len(done) else 0.0
    naive_mean = sum(naive_ms) / len(naive_ms)
    naive_all = monitors * 1000 / naive_mean
    loss = {
        "unacked": total - acked - refused,
        "refused": refused,
        "subscribers_short": sum(1 for count in counts if count < total),
        "updates_missing": sum(max(0, total - count) for count in counts),
        "updates_extra": sum(max(0, count - total) for count in counts),
        "sequence_gaps": gaps,
    }
    refusals = [result["first_refusal"] for result in results if result["refused"]]
    return {
        "ingest_events_per_s": acked / (acked_at - started),
        "delivered_events_per_s": delivered,
        "seconds": (finished[-1] if finished else acked_at) - started,
        "ack_ms": spread([ms for result in results for ms in result["ack_ms"]]),
        # Half the subscribers had every update this fast (the slowest one: delivered).
        "median_subscriber_updates_per_s": (
            total / (finished[len(finished) // 2] - started) if finished else 0.0
        ),
        "loss": loss,
        "first_refusal": refusals[0] if refusals else None,
        "zero_loss": not any(loss.values()),
        "naive": {
            "sample": len(naive_ms),
            "round_trip_ms": spread(naive_ms),
            "events_per_s_one_monitor": 1000 / naive_mean,
            "events_per_s_all_monitors": naive_all,
        },
        # Both ACK only what is stored: f2bzmq while fanning out, the naive way meanwhile too.
        "speedup_vs_naive": acked / (acked_at - started) / naive_all,
    }


def merge_python_threads(threads: dict[str, float]) -> dict[str, float]:
    """libzmq's threads by name; every other thread (reactor, key checker) as one."""
    merged: dict[str, float] = {}
    for name, seconds in threads.items():
        key = name if name.startswith("ZMQbg") else "Python threads"
        merged[key] = merged.get(key, 0.0) + seconds
    return merged


def hub_figures(
    cpu: float,
    threads: dict[str, float],
    memory: dict,
    results: list[dict],
    done: list,
    events: int,
) -> dict:
    """The hub's share of a core over the run (in all, and per thread), its memory at the end,
    and the rate its busiest thread allows: what it would reach with a core per thread."""
    started = min(result["started"] for result in results)
    ended = max([result["finished"] for result in results] + [d for d in done if d])
    seconds = max(1e-9, ended - started)
    busiest = max(threads.values(), default=0.0)
    return {
        "alone_events_per_s": events / busiest if busiest > 0 else 0.0,
        "cpu_percent": 100 * cpu / seconds,
        # The Python thread runs the reactor; ZMQbg/IO/0 encrypts and writes for every peer.
        "thread_cpu_percent": {
            name: 100 * used / seconds for name, used in merge_python_threads(threads).items()
        },
        "rss_kb": memory.get("VmRSS"),
        "peak_rss_kb": memory.get("VmHWM"),
    }


def text(result: dict) -> str:
    """The table of one run."""
    naive = result["naive"]
    rows = [
        ["f2bzmq: events ACKed (stored) /s", result["ingest_events_per_s"]],
        ["f2bzmq: events delivered to every subscriber /s", result["delivered_events_per_s"]],
        [
            "f2bzmq hub alone, at most (its busiest thread's CPU) /s",
            result["hub"]["alone_events_per_s"],
        ],
        ["naive: REQ per event, one monitor /s", naive["events_per_s_one_monitor"]],
        [
            f"naive: x {result['monitors']} monitors, if they added up /s",
            naive["events_per_s_all_monitors"],
        ],
    ]
    out = table(["what", "value"], rows)
    ack = result["ack_ms"]
    loss = result["loss"]
    busy = sorted(result["hub"]["thread_cpu_percent"].items(), key=lambda item: -item[1])
    threads = ", ".join(f"{name} {percent:.0f} %" for name, percent in busy[:3])
    cpu = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in result["cpu_seconds"].items())
    out += (
        f"\n{result['events']} events from {result['monitors']} monitors (window"
        f" {result['window']}), {result['subscribers']} subscriber connections, CURVE;"
        f" hub log level {result['loglevel']}, state on {result['storage']}"
        f"\nevent -> ACK ms (mostly time queued behind full windows): p50 {ack['p50']:.2f}"
        f" p90 {ack['p90']:.2f} p99 {ack['p99']:.2f}"
        f" max {ack['max']:.2f}; hub CPU {result['hub']['cpu_percent']:.0f} % ({threads}),"
        f" RSS {result['hub']['rss_kb'] / 1024:.1f} MB;"
        f" {result['events_per_update_message']:.1f} events per update message,"
        f" {result['update_bytes_per_event']['packed']:.0f} bytes an event packed"
        f" ({result['update_bytes_per_event']['plain']:.0f} plain)"
        f"\nloss: {'none' if result['zero_loss'] else json.dumps(loss)}"
        f"{'' if not result['first_refusal'] else ' (' + result['first_refusal'] + ')'};"
        f" ACKed / naive: {result['speedup_vs_naive']:.1f}x"
        f"\nCPU used in {result['seconds']:.1f} s: {cpu} (they share this machine's cores)"
        f"\nthe hub's settings off the shipped defaults:"
        f" {', '.join(f'{key} {value}' for key, value in HUB_SETTINGS.items())},"
        " legacy_report_bind (the naive way's)"
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50000, help="events in all (50000)")
    parser.add_argument("--monitors", type=int, default=10, help="reporting monitors (10)")
    parser.add_argument("--subscribers", type=int, default=200, help="update connections (200)")
    parser.add_argument(
        "--window", type=int, default=WINDOW, help=f"events in flight per monitor ({WINDOW})"
    )
    parser.add_argument("--naive", type=int, default=200, help="naive round trips to time")
    parser.add_argument("--loglevel", default="INFO", help="the hub's log level (INFO)")
    parser.add_argument("--dir", help="where the hub keeps its state (default: a temp folder)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    if not 1 <= args.monitors <= args.events <= MAX_EVENTS:
        parser.error(f"need 1 <= --monitors <= --events <= {MAX_EVENTS} (the hub's send_hwm)")
    if not 1 <= args.subscribers <= 1000 or args.window < 1 or args.naive < 1:
        parser.error("--subscribers must be 1..1000, --window and --naive at least 1")
    stop_on_sigterm()
    try:
        result = run(
            args.events,
            args.monitors,
            args.subscribers,
            args.window,
            args.naive,
            args.loglevel,
            args.dir,
        )
    except BenchError as error:
        print(f"throughput: {error}", file=sys.stderr)
        return 1
    report("throughput", result, text(result), args.json)
    return 0 if result["zero_loss"] else 1


if __name__ == "__main__":
    sys.exit(main())
