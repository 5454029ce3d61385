"""Fan-out to thousands of subscribers, with and without relays: how fast a ban reaches
all of them, what the hub spends, and how long until every one is synced again after
the hub restarts.

Each setup is N subscribers and R relays (R = 0: every subscriber follows the hub):

- a real publisher on 127.0.0.1 (CURVE, its table preloaded with TABLE bans), and R
  real relay daemons on 127.0.0.11, .12, …, each followed by N / R subscribers;
- N simulated subscribers, many per process, each the real subscriber's link to the
  stream it follows: `subscriber.HubLink` (a SUB and a snapshot DEALER with its own node
  key, CURVE) driven by the real core, `sync.HubSync`, which decides when to ask for a
  snapshot, when to give one up, when the stream is silent. Left out: fail2ban, and the
  checking of each event (a subscriber counts the events of updates and snapshots; the
  subscribers of a process parse each update once for all of them);
- propagation: BANS bans reported to the hub INTERVAL apart, from the report to each
  subscriber's receipt: p50/p99 over every delivery, and over the bans of the time
  until the last subscriber had one; the hub's (and the relays') CPU and memory;
- restart: the hub stopped, kept down DOWN seconds (past the subscribers' heartbeat
  timeout, so each of them has noticed and asked for a snapshot: the worst case), and
  started again; the time from its start until every subscriber is synced again: its
  core in step with the hub's state and sequence, holding the whole table from a
  snapshot taken since.

In the same run, for each setup, the floor: the same subscribers (the same processes'
code, keys and cores) with bare libzmq servers in the same places, which send
pre-encoded messages (heartbeats, one update per ban, the table's snapshot parts)
without a ban table, a key check or any work per request but the send, and a bare
relay being libzmq's proxy plus a ROUTER that answers once its upstream is heard again.
The naive way for relays is the setup without them: every subscriber on the hub, each
asking it for a snapshot at once.

    python3 bench/fanout.py --setups 1000:0,10000:10,10000:0 --json result.json

Simulated subscribers share the machine's cores with the hub and the relays: on a
deployment each is another machine. Raises the open-file limit it needs (root may).
A benchmark, not a test: it prints figures and never fails on speed; it exits non-zero
only when a run went wrong (a ban never reached a subscriber, one never resynced).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import select
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import zmq
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
from throughput import Workers, split

from f2bzmq import protocol
from f2bzmq.keys import HUB, Security
from f2bzmq.lab import Hub, free_ports, make_keys, tail, wait_until
from f2bzmq.protocol import BanEvent, SnapshotPart
from f2bzmq.publisher import LISTEN_BACKLOG as BACKLOG
from f2bzmq.subscriber import HubLink
from f2bzmq.sync import HubSync
from tests.support.nodeclient import NodeClient
from tests.support.relay import LabRelay

JAIL = "sshd"
BANTIME = 86400
# The hub's settings that differ from the shipped defaults: the bench's one node reports
# the whole table and every ban (no rate limit for it), and a hub whose state is new is
# rebuilt at once (the bench's node is the only one that reports).
HUB_SETTINGS = {
    "rate_limit": "1000000",
    "rate_burst": "10000000",
    "rebuild_window": "0",
    "default_bantime": str(BANTIME),
}
PER_PROCESS = 500  # simulated subscribers per process: a poll over 1,000 sockets costs ~1 ms
# Seconds between the cores' clock ticks in a simulated subscribers' process: their
# timeouts are seconds long (a subscriber ticks every 1 s at the most).
TICK = 0.25
SETUP_TIMEOUT = 300.0  # seconds for every subscriber to be synced at the start
RESYNC_TIMEOUT = 180.0  # seconds every subscriber has to be synced again after the restart
ARRIVAL_TIMEOUT = 60.0  # seconds the last ban has to reach every subscriber
# libzmq sockets of a simulated subscriber, as of the real one's HubLink: its SUB and its
# DEALER, and for each a handshake monitor, two PAIRs (libzmq's, which sends the events,
# and the link's, which reads them). A renewal closes a socket and its monitor's and opens
# three more at once; the closed ones count against the context's max_sockets until
# libzmq's reaper frees them, so the budget is twice what a subscriber holds.
SOCKETS_PER_SUBSCRIBER = 6
SOCKETS_SPARE = 64
# Descriptors: a server holds two connections per follower (its PUB's and ROUTER's); a
# simulated subscriber two connections and a mailbox (an eventfd) per socket, twice for
# the sockets a renewal closes before libzmq reaps them; and room for the rest
# (libraries, logs, the processes' pipes).
FILES_PER_FOLLOWER = 2
FILES_PER_SUBSCRIBER = 2 + 2 * SOCKETS_PER_SUBSCRIBER
FILES_SPARE = 1024
# A placeholder for each event of an update: the cores' view needs one, the bench checks
# no event (the subscribers' CPU would be the figure otherwise).
PARSED_KEPT = 256  # updates parsed once for all the followers of a process (recent ones)
PLACEHOLDER = BanEvent("0" * 32, "bench", JAIL, protocol.BAN, "192.0.2.1", 1.0)


def addresses(first: int, count: int) -> list[str]:
    """count addresses of 10.0.0.0/8 from the first-th: every ban of a run its own."""
    return [f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}" for n in range(first, first + count)]


def files_needed(setups: list[tuple[int, int]]) -> int:
    """Open files the busiest process of the run needs: a hub or a relay with its
    followers, or a process of simulated subscribers (every child inherits the limit)."""
    busiest = max(subscribers if relays == 0 else math.ceil(subscribers / relays)
                  for subscribers, relays in setups)  # fmt: skip
    simulated = FILES_PER_SUBSCRIBER * min(PER_PROCESS, max(n for n, _ in setups))
    return max(FILES_PER_FOLLOWER * busiest, simulated) + FILES_SPARE


def raise_file_limit(needed: int) -> int:
    """Raise this process's open-file limit (its children's too) to `needed`, up to the
    hard limit; a BenchError that says so when the hard limit is lower."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise BenchError(
            f"the run needs {needed:,} open files in one process and the hard limit is"
            f" {hard:,}: raise it (ulimit -Hn {needed}, or LimitNOFILE=) or run fewer"
            " subscribers per hub or relay"
        )
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# --- simulated subscribers ------------------------------------------------------------


class Follower:
    """One simulated subscriber: a real link and core, and what the bench notes of it."""

    def __init__(self, link: HubLink) -> None:
        self.link = link
        self.counted = 0  # events in the parts of the snapshot under way
        self.table: int | None = None  # events of the last whole snapshot
        self.snapshot_at = 0.0  # when it was taken (wall clock)
        self.synced_at: float | None = None  # when it was synced again after the restart


def follow(names, endpoints, keys_dir, heartbeat_timeout, conn) -> None:
    """A child process: a subscriber per name, following (publish, snapshot) endpoints[i]."""
    context = zmq.Context()
    try:
        Followers(context, names, endpoints, keys_dir, heartbeat_timeout, conn).run()
    except (BenchError, zmq.ZMQError, OSError) as error:
        conn.send({"error": f"subscribers {names[0]}..: {error}"})
    except EOFError:
        pass  # the parent is gone
    finally:
        context.destroy(linger=0)


class Followers:
    """The simulated subscribers of one process, and the parent's commands.

    A zmq.Poller over a thousand sockets costs a millisecond a call, and a call per
    message that trickles in would make the simulation the slowest part of the run: the
    sockets' ZMQ_FDs are in an epoll set instead, so a wake-up costs what is ready. A
    ZMQ_FD only says "look again": each socket is read until it has nothing, checked
    after every send, and all of them again at every tick, so none is left unread.
    """

    def __init__(self, context, names, endpoints, keys_dir, heartbeat_timeout, conn) -> None:
        # Past the context's max_sockets, libzmq refuses a new socket with EMFILE ("Too
        # many open files") however many descriptors are free.
        context.max_sockets = 2 * SOCKETS_PER_SUBSCRIBER * len(names) + SOCKETS_SPARE
        self.conn = conn
        now = time.monotonic()
        self.followers = []
        for name, (publish, snapshot) in zip(names, endpoints):
            security = Security(keys_dir, name, "subscriber", False)
            link = HubLink(context, publish, snapshot, security, HubSync(heartbeat_timeout, now))
            self.followers.append(Follower(link))
        self.epoll = select.epoll()
        self.epoll.register(conn.fileno(), select.EPOLLIN)
        self.owner: dict[int, tuple[Follower, zmq.Socket]] = {}  # ZMQ_FD -> whose socket
        self.received: dict[int, list[float]] = {}  # sequence -> when each subscriber had it
        self.recording = False
        self.watch: tuple | None = None  # (state, sequence, bans, since): the resync looked for
        self.restarted: float | None = None  # when the hub started again
        self.parsed: dict[tuple[bytes, bytes], tuple] = {}  # see parse_update

    def attach(self, follower: Follower, before: tuple = ()) -> None:
        """Watch the follower's sockets (in place of `before`, already closed)."""
        fds = {sock.FD: sock for sock in follower.link.sockets()}
        for fd in before:
            if fd not in fds and self.owner.pop(fd, None) is not None:
                with contextlib.suppress(OSError):  # closed already
                    self.epoll.unregister(fd)
        for fd, sock in fds.items():
            # A number in use before may be a new socket's: the kernel dropped the closed
            # one from the set, or libzmq has not closed it yet.
            try:
                self.epoll.register(fd, select.EPOLLIN)
            except FileExistsError:
                self.epoll.modify(fd, select.EPOLLIN)
            self.owner[fd] = (follower, sock)

    def execute(self, follower: Follower, outcome) -> None:
        """What the subscriber's shell does with an outcome: its link's socket actions."""
        if outcome.ask_snapshot or outcome.reconnect_updates:
            before = tuple(sock.FD for sock in follower.link.sockets())
            old = follower.link.sockets()
            if outcome.ask_snapshot:
                follower.counted = 0
            follower.link.execute(outcome)
            if follower.link.sockets() != old:
                self.attach(follower, before)
            self.pending.append(follower)  # a send may have taken the FD's signal
        if self.restarted is not None and follower.synced_at is None and self.in_step(follower):
            follower.synced_at = time.time()

    def in_step(self, follower: Follower) -> bool:
        """In step with the hub again: since it restarted, and from a snapshot taken
        since it stopped (a relay's copy is whole until the relay notices the silence)."""
        sync = follower.link.sync
        state, sequence, bans, since = self.watch
        return (
            time.time() >= self.restarted
            and sync.synced
            and sync.snapshot_asked is None
            and (sync.state_id, sync.sequence, follower.table) == (state, sequence, bans)
            and follower.snapshot_at > since
        )

    def read(self, follower: Follower, sock: zmq.Socket, now: float) -> None:
        """Every message waiting on one of the follower's sockets, each stamped when it is
        read (a pass over 500 followers can take longer than a ban's trip)."""
        link = follower.link
        while not sock.closed and sock.EVENTS & zmq.POLLIN:
            if sock is link.updates:
                self.read_updates(follower, now)
            elif sock is link.snapshots:
                self.read_snapshot(follower, now)
            elif sock is link.updates_watch.socket or sock is link.snapshots_watch.socket:
                link.handshakes()  # as the subscriber's loop: a refusal renews at the next ask
            else:
                return  # replaced meanwhile

    def read_updates(self, follower: Follower, now: float) -> None:
        link = follower.link
        for frames in drain(link.updates):
            wall = time.time()
            state, sequence, young, count = self.parse_update(frames)
            if count is None:
                outcome = link.sync.on_heartbeat(state, sequence, now, young)
            else:
                if self.recording:
                    for number in range(sequence, sequence + count):
                        self.received.setdefault(number, []).append(wall)
                events = [PLACEHOLDER] * count
                outcome = link.sync.on_update(state, sequence, events, now, young)
            self.execute(follower, outcome)
            if outcome.reconnect_updates:
                return  # that socket is gone

    def parse_update(self, frames: list[bytes]) -> tuple[str, int, bool, int | None]:
        """An update's or a heartbeat's (state, sequence, young, events or None). Every
        follower of a process gets the same bytes: parsed once for all of them, as the
        simulation's own cost is not what the bench measures."""
        key = (frames[2], frames[3] if len(frames) > 3 else b"")
        parsed = self.parsed.get(key)
        if parsed is None:
            header = json.loads(frames[2])
            count = None
            if frames[1] != protocol.HUGZ:
                count = protocol.unpack(frames[3], protocol.MAX_PACKED).count(b"{")
            parsed = (header["publisher"], header["seq"], header.get("young", False), count)
            if len(self.parsed) >= PARSED_KEPT:
                self.parsed.clear()
            self.parsed[key] = parsed
        return parsed

    def read_snapshot(self, follower: Follower, now: float) -> None:
        link = follower.link
        for frames in drain(link.snapshots):
            wall = time.time()
            header = json.loads(frames[2])
            if link.sync.snapshot_asked is not None:
                follower.counted += frames[3].count(b"{")
            part = SnapshotPart(
                header["publisher"],
                header["seq"],
                header["part"],
                header["last"],
                [],
                header.get("young", False),
            )
            outcome = link.sync.on_snapshot_part(part, now)
            if outcome.replaced:
                follower.table, follower.snapshot_at = follower.counted, wall
            self.execute(follower, outcome)
            if outcome.renew_snapshot_socket:
                return  # that socket is gone

    def command(self) -> bool:
        """The parent's word; False to stop."""
        command, *arguments = self.conn.recv()
        followers = self.followers
        if command == "stop":
            return False
        if command == "synced":
            self.conn.send(sum(1 for f in followers if f.link.sync.synced and f.table is not None))
        elif command == "record":
            self.received, self.recording = {}, True
        elif command == "received":
            self.recording = False
            self.conn.send(self.received)
        elif command == "watch":
            self.watch, self.restarted = tuple(arguments), None
            for follower in followers:
                follower.synced_at = None
        elif command == "restarted":
            (self.restarted,) = arguments
        elif command == "resynced":
            self.conn.send([follower.synced_at for follower in followers])
        elif command == "cpu":
            self.conn.send(time.process_time())  # every thread of the process
        elif command == "behind":
            (sequence,) = arguments
            self.conn.send(sum(1 for f in followers if f.link.sync.sequence != sequence))
        return True

    def run(self) -> None:
        now = time.monotonic()
        self.pending: list[Follower] = []
        for follower in self.followers:
            self.attach(follower)
            self.execute(follower, follower.link.sync.start(now))
        conn = self.conn.fileno()
        next_tick = now + TICK
        while True:
            events = self.epoll.poll(max(0.001, next_tick - time.monotonic()))
            now = time.monotonic()
            for fd, _ in events:
                if fd == conn:
                    if not self.command():
                        return
                    continue
                follower, sock = self.owner.get(fd, (None, None))
                if follower is not None:
                    self.read(follower, sock, now)
            tick = now >= next_tick
            if tick:
                next_tick = now + TICK
                for follower in self.followers:
                    self.execute(follower, follower.link.sync.on_tick(now))
            # Sockets sent on, and at each tick all of them: a ZMQ_FD signals only changes.
            checked = self.followers if tick else self.pending
            self.pending = []
            for follower in checked:
                for sock in follower.link.sockets():
                    self.read(follower, sock, now)


def drain(sock: zmq.Socket, limit: int = 1000):
    """The messages waiting on sock, at most `limit`, without blocking."""
    for _ in range(limit):
        try:
            yield sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return


class Swarm:
    """N simulated subscribers in processes of PER_PROCESS; `endpoints[i]` is what the
    i-th follows."""

    def __init__(
        self,
        workers: Workers,
        names: list[str],
        endpoints: list[tuple[str, str]],
        keys_dir: Path,
        heartbeat_timeout: float,
    ):
        self.workers = workers
        self.count = len(names)
        parts = max(1, math.ceil(len(names) / PER_PROCESS))
        self.pipes = [
            workers.start(follow, names_, endpoints_, keys_dir, heartbeat_timeout)
            for names_, endpoints_ in zip(split(names, parts), split(endpoints, parts))
        ]

    def ask(self, *command, timeout: float = 60.0) -> list:
        self.tell(*command)
        return [self.workers.expect(pipe, timeout) for pipe in self.pipes]

    def tell(self, *command) -> None:
        for pipe in self.pipes:
            try:
                pipe.send(command)
            except OSError:  # the process ended: it said why
                self.workers.expect(pipe, 1.0)
                raise BenchError("a simulated subscribers' process ended") from None

    def wait_synced(self, timeout: float) -> float:
        """Seconds until every subscriber has a snapshot (they all asked at once)."""
        started = time.monotonic()
        while sum(self.ask("synced")) < self.count:
            if time.monotonic() - started > timeout:
                raise BenchError(f"only {sum(self.ask('synced'))} of {self.count} synced")
            time.sleep(0.2)
        return time.monotonic() - started

    def cpu_seconds(self) -> float:
        """CPU time the simulated subscribers' processes used so far, in all."""
        return sum(self.ask("cpu"))

    def received(self) -> dict[int, list[float]]:
        merged: dict[int, list[float]] = {}
        for part in self.ask("received", timeout=120):
            for sequence, times in part.items():
                merged.setdefault(sequence, []).extend(times)
        return merged

    def wait_resynced(self, since: float, timeout: float) -> list[float]:
        """Seconds from `since` until each subscriber was synced again."""
        deadline = time.monotonic() + timeout
        while True:
            times = [t for part in self.ask("resynced") for t in part]
            if all(t is not None for t in times):
                return [t - since for t in times]
            if time.monotonic() > deadline:
                missing = sum(1 for t in times if t is None)
                raise BenchError(f"{missing} of {len(times)} subscribers not synced again")
            time.sleep(0.2)


# --- bare servers: the floor ------------------------------------------------------------


def bare_server(
    keys_dir, publish, snapshot, upstream, state, sequence, table, heartbeat, timeout, conn
) -> None:
    """A child process: a hub (upstream None) or a relay of libzmq alone. It binds a PUB
    and a ROUTER with the hub's key and no key check. A hub sends a heartbeat every
    `heartbeat` seconds and, on the parent's word, the update of the next ban; it closes
    its sockets on "down" and binds them again on "up" (a restart without a process's
    start). A relay forwards its upstream's PUB with zmq.proxy. Each request gets the
    table's parts at once (a relay's: once its upstream is heard within `timeout`)."""
    context = zmq.Context()
    try:
        _bare_server(
            context, keys_dir, publish, snapshot, upstream, state, sequence, table, heartbeat,
            timeout, conn,
        )  # fmt: skip
    except (zmq.ZMQError, OSError) as error:
        conn.send({"error": f"bare server {publish}: {error}"})
    except EOFError:
        pass
    finally:
        context.destroy(linger=0)


def _bare_server(
    context, keys_dir, publish, snapshot, upstream, state, sequence, table, heartbeat, timeout, conn
) -> None:
    context.max_sockets = 64
    hub_public, hub_secret = zmq.auth.load_certificate(Path(keys_dir) / f"{HUB}.key_secret")

    def server(kind: int, endpoint: str) -> zmq.Socket:
        sock = context.socket(kind)
        sock.curve_publickey, sock.curve_secretkey, sock.curve_server = hub_public, hub_secret, True
        sock.linger = 0
        sock.sndhwm = 100000
        sock.backlog = BACKLOG  # as the hub's and the relays'
        for _ in range(500):  # libzmq frees a closed listener's port a moment later
            try:
                sock.bind(endpoint)
                return sock
            except zmq.ZMQError as error:
                if error.errno != zmq.EADDRINUSE:
                    raise
                time.sleep(0.01)
        raise BenchError(f"cannot bind {endpoint}")

    def client(endpoint: str) -> zmq.Socket:
        sock = context.socket(zmq.SUB)
        public, secret = zmq.auth.load_certificate(Path(keys_dir) / "bench.key_secret")
        sock.curve_publickey, sock.curve_secretkey = public, secret
        sock.curve_serverkey = hub_public
        sock.linger = 0
        sock.setsockopt(zmq.SUBSCRIBE, protocol.PACKED)
        sock.connect(endpoint)
        return sock

    events = [
        BanEvent(f"{n:032x}", "bench", JAIL, protocol.BAN, ip, time.time(), BANTIME)
        for n, ip in enumerate(addresses(0, table))
    ]

    def encoded(sequence: int) -> list[list]:
        """The table's parts at `sequence`, each large frame shared by every send."""
        parts = protocol.encode_snapshot(state, sequence, events)
        return [[*part[:-1], zmq.Frame(part[-1])] for part in parts]

    parts = encoded(sequence)
    poller = zmq.Poller()
    poller.register(conn.fileno(), zmq.POLLIN)
    stream, answers = server(zmq.PUB, publish), server(zmq.ROUTER, snapshot)
    poller.register(answers, zmq.POLLIN)
    heard = None  # a relay's: its upstream, as its own SUB hears it
    if upstream is not None:
        forwarded = client(upstream)
        threading.Thread(target=forward, args=(forwarded, stream), daemon=True).start()
        heard = client(upstream)
        poller.register(heard, zmq.POLLIN)
    waiting: list[bytes] = []
    last_heard = 0.0
    next_hugz = 0.0
    conn.send("ready")
    while True:
        now = time.monotonic()
        if upstream is None and stream is not None and now >= next_hugz:
            stream.send_multipart(protocol.encode_heartbeat(state, sequence, True))
            next_hugz = now + heartbeat
        for sock, _ in poller.poll(100):
            if sock == conn.fileno():
                command, *_ = conn.recv()
                if command == "stop":
                    return
                if command == "down":
                    poller.unregister(answers)
                    stream.close()
                    answers.close()
                    stream = answers = None
                    waiting = []
                elif command == "up":
                    stream, answers = server(zmq.PUB, publish), server(zmq.ROUTER, snapshot)
                    poller.register(answers, zmq.POLLIN)
                    next_hugz = 0.0
                else:  # "publish": the next ban's update (the table's count stays)
                    sequence += 1
                    event = BanEvent(f"{sequence:032x}", "bench", JAIL, "ban", "10.255.0.1", 1.0)
                    stream.send_multipart(protocol.encode_update(state, sequence, [event], True))
                    parts = encoded(sequence)
            elif sock is heard:
                while heard.poll(0):
                    upstream_at = json.loads(heard.recv_multipart()[2])["seq"]
                    if upstream_at != sequence:
                        sequence = upstream_at
                        parts = encoded(sequence)
                last_heard = time.monotonic()
            elif sock is answers:
                while answers.poll(0):
                    waiting.append(answers.recv_multipart()[0])
        if upstream is None or time.monotonic() - last_heard < timeout:
            for peer in waiting:
                for part in parts:
                    answers.send(peer, zmq.SNDMORE)
                    for frame in part[:-1]:
                        answers.send(frame, zmq.SNDMORE)
                    answers.send(part[-1], copy=False)
            waiting = []


def forward(upstream: zmq.Socket, downstream: zmq.Socket) -> None:
    """libzmq's proxy, until the process ends (its context's end ends it)."""
    with contextlib.suppress(zmq.ZMQError):
        zmq.proxy(upstream, downstream)


class BareServers:
    """The floor's servers: a bare hub and, for relays, bare relays following it."""

    def __init__(
        self, workers, keys_dir, ports, relays, state, sequence, table, heartbeat, timeout
    ):
        self.workers, self.keys_dir, self.ports = workers, keys_dir, ports
        self.state, self.sequence, self.table = state, sequence, table
        self.heartbeat, self.timeout = heartbeat, timeout
        self.hub = self.start("127.0.0.1", None)
        self.relays = [
            self.start(relay_address(number), f"tcp://127.0.0.1:{ports[1]}")
            for number in range(relays)
        ]

    def start(self, address: str, upstream: str | None):
        pipe = self.workers.start(
            bare_server,
            self.keys_dir,
            f"tcp://{address}:{self.ports[1]}",
            f"tcp://{address}:{self.ports[2]}",
            upstream,
            self.state,
            self.sequence,
            self.table,
            self.heartbeat,
            self.timeout,
        )
        if self.workers.expect(pipe, 30) != "ready":
            raise BenchError("a bare server did not start")
        return pipe

    def publish(self) -> None:
        self.sequence += 1
        self.hub.send(("publish",))

    def stop_hub(self) -> None:
        self.hub.send(("down",))

    def start_hub(self) -> None:
        self.hub.send(("up",))


def relay_address(number: int) -> str:
    return f"127.0.0.{11 + number}"


def followed(names: list[str], relays: int, ports: list[int]) -> list[tuple[str, str]]:
    """(publish, snapshot) endpoint each subscriber follows: the hub's, or its relay's
    (relay n admits the n-th of `relays` slices of the names)."""
    if relays == 0:
        return [(f"tcp://127.0.0.1:{ports[1]}", f"tcp://127.0.0.1:{ports[2]}")] * len(names)
    endpoints = []
    for number, admitted in enumerate(split(names, relays)):
        host = relay_address(number)
        endpoints += [(f"tcp://{host}:{ports[1]}", f"tcp://{host}:{ports[2]}")] * len(admitted)
    return endpoints


def latencies(received: dict[int, list[float]], sent: dict[int, float], count: int) -> dict:
    """Per delivery and per ban (until the last subscriber), in ms; deliveries missing."""
    every, last, missing = [], [], 0
    for sequence, at in sent.items():
        times = received.get(sequence, [])
        missing += count - len(times)
        if times:
            every += [(t - at) * 1000 for t in times]
            last.append((max(times) - at) * 1000)
    if not every:
        raise BenchError("no ban reached a subscriber")
    return {"every_ms": spread(every), "last_ms": spread(last), "missing": missing}


class Processes:
    """CPU and memory of the daemons measured (the hub, the relays) between two marks."""

    def __init__(self, pids: dict[str, int], started: str | None = None) -> None:
        """`started`: the process that just started; its CPU counts from its start."""
        self.pids = pids
        self.cpu = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self.threads = {name: io_and_python(pid) for name, pid in self.pids.items()}
        self.since = time.monotonic()
        if started is not None:
            self.cpu[started] = 0.0
            self.threads[started] = (0.0, 0.0)

    def figures(self) -> dict:
        seconds = max(1e-9, time.monotonic() - self.since)
        found = {}
        for name, pid in self.pids.items():
            memory = memory_kb(pid)
            io, python = io_and_python(pid)
            found[name] = {
                "cpu_percent": 100 * (cpu_seconds(pid) - self.cpu[name]) / seconds,
                # libzmq's I/O thread (CURVE, sending), and the Python threads (the loop,
                # the key checker).
                "io_thread_percent": 100 * (io - self.threads[name][0]) / seconds,
                "python_percent": 100 * (python - self.threads[name][1]) / seconds,
                "rss_kb": memory.get("VmRSS"),
                "peak_rss_kb": memory.get("VmHWM"),
            }
        return found


class Usage:
    """The simulated subscribers' share of the machine between two moments."""

    def __init__(self, swarm: Swarm) -> None:
        self.swarm = swarm
        self.cpu = swarm.cpu_seconds()
        self.since = time.monotonic()

    def percent(self) -> float:
        """CPU in % of one core since the start."""
        seconds = max(1e-9, time.monotonic() - self.since)
        return 100 * (self.swarm.cpu_seconds() - self.cpu) / seconds


def io_and_python(pid: int) -> tuple[float, float]:
    """CPU seconds of a process's libzmq I/O threads, and of the rest (its Python threads)."""
    io = python = 0.0
    for name, seconds in thread_cpu_seconds(pid).items():
        if name.startswith("ZMQbg/IO"):
            io += seconds
        else:
            python += seconds
    return io, python


def summary(processes: dict) -> dict:
    """The hub's figures, and the relays' added up (CPU) and at most (memory)."""
    relays = [figures for name, figures in processes.items() if name != "hub"]
    result = {"hub": processes["hub"]}
    if relays:
        result["relays"] = {
            "count": len(relays),
            "cpu_percent": sum(r["cpu_percent"] for r in relays),
            "peak_rss_kb": max(r["peak_rss_kb"] for r in relays),
        }
    return result


def wait_in_step(swarm: Swarm, sequence: int) -> None:
    """Every subscriber's core at `sequence`: every ban of the run arrived."""
    deadline = time.monotonic() + ARRIVAL_TIMEOUT
    while True:
        behind = sum(swarm.ask("behind", sequence))
        if behind == 0:
            return
        if time.monotonic() > deadline:
            raise BenchError(f"{behind} subscribers never had every ban of the run")
        time.sleep(0.2)


def propagate(swarm: Swarm, count: int, interval: float, first: int, send) -> dict[int, float]:
    """`count` bans `interval` apart, each by send(n); sequence -> when it was sent."""
    swarm.tell("record")
    time.sleep(0.5)  # the word reaches every process before the first ban
    sent = {}
    started = time.monotonic()
    for n in range(count):
        pause = started + n * interval - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        sent[first + n] = time.time()
        send(n)
    return sent


def measure(root: Path, subscribers: int, relays: int, options: dict, bare: bool) -> dict:
    """One setup, with f2bzmq's daemons or (bare) the floor's servers."""
    names = [f"sub{n}" for n in range(subscribers)]
    relay_names = [f"relay{n}" for n in range(relays)]
    folder = root / ("floor" if bare else "f2bzmq") / f"{subscribers}-{relays}"
    folder.mkdir(parents=True)
    keys = make_keys(root / "keys", [*names, *relay_names, "bench"])
    ports = free_ports(3)
    timeout = options["heartbeat_timeout"]
    bans, table_size = options["bans"], options["table"]
    with Workers() as workers:
        if bare:
            state = "b" * 32
            servers = BareServers(
                workers, keys, ports, relays, state, 0, table_size, options["heartbeat"], timeout
            )
            daemons = None
        else:
            servers = None
            daemons = F2bzmq(folder, keys, ports, names, relays, options)
        try:
            if daemons:
                state, first = daemons.state, daemons.sequence + 1
            else:
                first = 1
            swarm = Swarm(workers, names, followed(names, relays, ports), keys, timeout)
            start_seconds = swarm.wait_synced(SETUP_TIMEOUT)
            processes = Processes(daemons.pids() if daemons else {})
            followers = Usage(swarm)
            if daemons:
                sent = propagate(swarm, bans, options["interval"], first, daemons.report)
            else:
                sent = propagate(
                    swarm, bans, options["interval"], first, lambda n: servers.publish()
                )
            last = first + bans - 1
            wait_in_step(swarm, last)
            propagation = latencies(swarm.received(), sent, subscribers)
            propagation["subscribers_cpu_percent"] = followers.percent()
            during = summary(processes.figures()) if daemons else None
            # The restart: down past the subscribers' heartbeat timeout, then up again.
            stopped = time.time()
            swarm.tell("watch", state, last, table_size + (bans if daemons else 0), stopped)
            if daemons:
                daemons.stop_hub()
            else:
                servers.stop_hub()
            time.sleep(max(0.0, stopped + options["down"] - time.time()))
            restarted = time.time()
            swarm.tell("restarted", restarted)
            followers = Usage(swarm)
            if daemons:
                daemons.start_hub()
                hub_start = time.time() - restarted  # until it answers `status`
                processes = Processes(daemons.pids(), started="hub")
                processes.since -= time.time() - restarted
            else:
                servers.start_hub()
            resync = swarm.wait_resynced(restarted, RESYNC_TIMEOUT)
            resync_cpu = followers.percent()
            after = summary(processes.figures()) if daemons else None
            swarm.tell("stop")
        except BenchError as error:
            if daemons:
                raise BenchError(f"{error}\n{daemons.logs()}") from None
            raise
        finally:
            if daemons:
                daemons.stop()
    result = {
        "subscribers": subscribers,
        "relays": relays,
        "start_sync_s": start_seconds,
        "propagation": propagation,
        "resync_s": spread(resync),
        "resync_subscribers_cpu_percent": resync_cpu,
    }
    if daemons:
        result["hub_start_s"] = hub_start
        result["during_propagation"] = during
        result["during_resync"] = after
    return result


class F2bzmq:
    """The hub and the relays of a setup, real daemons; the bench's node reports bans."""

    def __init__(self, folder, keys, ports, names, relays, options) -> None:
        self.hub = Hub(
            folder,
            ports,
            keys_dir=keys,
            general={"loglevel": "INFO"},
            publisher={"heartbeat_interval": str(options["heartbeat"]), **HUB_SETTINGS},
        )
        self.relays: list[LabRelay] = []
        self.client: NodeClient | None = None
        try:
            self.start_hub()
            self.client = NodeClient(ports, keys, node="bench")
            self.client.updates.close()  # the bench's node listens to nothing
            self.preload(options["table"])
            header, _ = self.client.snapshot()
            self.state, self.sequence = header["publisher"], header["seq"]
            for number, admitted in enumerate(split(names, relays) if relays else []):
                relay = LabRelay(
                    folder,
                    ports,
                    keys,
                    admitted,
                    name=f"relay{number}",
                    address=relay_address(number),
                    general={"loglevel": "INFO"},
                    relay={"heartbeat_timeout": str(options["heartbeat_timeout"])},
                )
                self.relays.append(relay)
                relay.start(timeout=60)
        except BaseException:
            self.stop()
            raise

    def start_hub(self) -> None:
        self.hub.publisher.start()
        if not wait_until(self.hub.publisher.ready, 60, 0.05):
            raise BenchError(f"the hub did not start:\n{tail(self.hub.log_text())}")

    def stop_hub(self) -> None:
        self.hub.publisher.stop()

    def preload(self, count: int) -> None:
        """The hub's table: `count` bans, reported in reports of 100."""
        for start in range(0, count, protocol.MAX_REPORT_EVENTS):
            ips = addresses(1_000_000 + start, min(protocol.MAX_REPORT_EVENTS, count - start))
            events = [BanEvent.new("bench", JAIL, "ban", ip, None, BANTIME) for ip in ips]
            self.client.reports.send_multipart(
                [protocol.PROTOCOL, protocol.EVENT, *(event.encode() for event in events)]
            )
            _, kind, *_ = self.client.reports.recv_multipart()
            if kind != protocol.ACK:
                raise BenchError("the hub refused the table's bans")

    def report(self, number: int) -> None:
        (ip,) = addresses(number, 1)
        event = BanEvent.new("bench", JAIL, "ban", ip, None, BANTIME)
        kind, body = self.client.report(event.encode())
        if kind != protocol.ACK:
            raise BenchError(f"the hub refused a ban: {body}")

    def pids(self) -> dict[str, int]:
        found = {"hub": self.hub.publisher.process.pid}
        for relay in self.relays:
            found[relay.name] = relay.process.process.pid
        return found

    def logs(self) -> str:
        parts = [f"--- hub ---\n{tail(self.hub.log_text())}"]
        parts += [f"--- {relay.name} ---\n{relay.log()}" for relay in self.relays]
        return "\n".join(parts)

    def stop(self) -> None:
        """Every daemon, each killed if it does not stop in time (a loaded machine)."""
        if self.client is not None:
            self.client.close()
        for process in [*(relay.process for relay in self.relays), self.hub.publisher]:
            try:
                process.stop()
            except AssertionError as error:
                print(f"fanout: {error}: killed", file=sys.stderr)


def run(
    setups: list[tuple[int, int]],
    table: int = 1000,
    bans: int = 100,
    interval: float = 0.2,
    heartbeat: float = 1.0,
    heartbeat_timeout: float = 5.0,
    down: float = 6.0,
    floor: bool = True,
    directory: str | None = None,
) -> dict:
    """Every setup (subscribers, relays) with f2bzmq, then its floor."""
    options = {
        "table": table,
        "bans": bans,
        "interval": interval,
        "heartbeat": heartbeat,
        "heartbeat_timeout": heartbeat_timeout,
        "down": down,
    }
    load = os.getloadavg()  # the machine's load before the run: other work on its cores
    limit = raise_file_limit(files_needed(setups))
    root = Path(tempfile.mkdtemp(prefix="f2bzmq-fanout-", dir=directory))
    results = []
    try:
        for subscribers, relays in setups:
            found = {"f2bzmq": measure(root, subscribers, relays, options, bare=False)}
            if floor:
                found["floor"] = measure(root, subscribers, relays, options, bare=True)
            results.append(found)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {**options, "file_limit": limit, "load": load, "setups": results}


def ms(figures: dict) -> str:
    return f"{figures['p50']:.1f} / {figures['p99']:.1f}"


def usage(cpu_percent: float, kb: int) -> str:
    return f"{cpu_percent:.0f} % / {kb / 1024:.0f} MB"


def setup_name(result: dict) -> str:
    relays = result["relays"]
    where = "one hub" if relays == 0 else f"{relays} relays"
    return f"{result['subscribers']:,} subscribers, {where}"


def text(result: dict) -> str:
    """The tables of one run: each setup, then each target beside the naive way and the floor."""
    rows = []
    for found in result["setups"]:
        ours, floor = found["f2bzmq"], found.get("floor")
        during, after = ours["during_propagation"], ours["during_resync"]
        relays = during.get("relays")
        rows.append(
            [
                setup_name(ours),
                ms(ours["propagation"]["every_ms"]),
                ms(ours["propagation"]["last_ms"]),
                f"{ours['resync_s']['p50']:.1f} / {ours['resync_s']['max']:.1f}",
                usage(during["hub"]["cpu_percent"], during["hub"]["rss_kb"]),
                usage(after["hub"]["cpu_percent"], after["hub"]["peak_rss_kb"]),
                "" if not relays else usage(relays["cpu_percent"], relays["peak_rss_kb"]),
                f"{ours['propagation']['subscribers_cpu_percent']:.0f} / "
                f"{ours['resync_subscribers_cpu_percent']:.0f} %",
                "" if not floor else ms(floor["propagation"]["last_ms"]),
                "" if not floor else f"{floor['resync_s']['max']:.1f}",
            ]
        )
    headers = [
        "setup",
        "every ms p50/p99",
        "to all ms p50/p99",
        "resync s p50/all",
        "hub CPU/RSS",
        "hub resync CPU/peak",
        "relays CPU/peak",
        "subscribers CPU",
        "floor to all p50/p99",
        "floor resync s",
    ]
    out = table(headers, rows)
    out += (
        f"\n{result['bans']} bans {result['interval'] * 1000:g} ms apart to a table of"
        f" {result['table']:,}; the hub down {result['down']:g} s (heartbeat every"
        f" {result['heartbeat']:g} s, subscribers' and relays' timeout"
        f" {result['heartbeat_timeout']:g} s); load before the run"
        f" {' '.join(f'{x:.2f}' for x in result['load'])}; open files {result['file_limit']}"
        f"; the hub's settings off the shipped defaults:"
        f" {', '.join(f'{key} {value}' for key, value in HUB_SETTINGS.items())}"
        "\nevery: each delivery, report -> the subscriber's receipt; to all: per ban, until"
        " the last subscriber had it; resync: from the hub's start until each subscriber"
        " is in step again (p50 / the last); CPU in % of one core over the phase"
        " (subscribers': the simulated ones, all their processes, propagation / resync)"
    )
    targets = target_rows(result)
    if targets:
        out += "\n\n" + table(["target", "f2bzmq", "naive, same run", "floor", "target"], targets)
    return out


TARGETS = {(1000, 0): (100.0, 10.0), (10000, "relays"): (200.0, 30.0)}


def target_rows(result: dict) -> list[list[str]]:
    """Each setup with a target (1,000 on one hub; 10,000 through relays) or with relays,
    beside the same subscribers on one hub (the naive way for relays) and its floor."""
    by_setup = {(f["f2bzmq"]["subscribers"], f["f2bzmq"]["relays"]): f for f in result["setups"]}
    rows = []
    for (subscribers, relays), found in by_setup.items():
        targets = TARGETS.get((subscribers, relays if relays == 0 else "relays"))
        if targets is None and relays == 0:
            continue
        ours, floor = found["f2bzmq"], found.get("floor")
        naive = by_setup.get((subscribers, 0)) if relays else None
        runs = (ours, naive and naive["f2bzmq"], floor)
        for what, figure, unit, target in (
            ("p99 to all", lambda run: run["propagation"]["last_ms"]["p99"], "ms", 0),
            ("all resynced", lambda run: run["resync_s"]["max"], "s", 1),
        ):
            rows.append(
                [
                    f"{setup_name(ours)}: {what}",
                    *(f"{figure(run):.1f} {unit}" if run else "" for run in runs),
                    f"< {targets[target]:g} {unit}" if targets else "",
                ]
            )
    return rows


def parse_setups(value: str) -> list[tuple[int, int]]:
    setups = []
    for item in value.split(","):
        subscribers, _, relays = item.partition(":")
        setups.append((int(subscribers), int(relays or 0)))
    return setups


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--setups",
        default="1000:0,10000:10,10000:0",
        help="SUBSCRIBERS:RELAYS, comma-separated (1000:0,10000:10,10000:0)",
    )
    parser.add_argument("--table", type=int, default=1000, help="bans in the hub's table (1000)")
    parser.add_argument("--bans", type=int, default=100, help="bans to propagate (100)")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between bans (0.2)")
    parser.add_argument("--heartbeat", type=float, default=1.0, help="hub heartbeat (1 s)")
    parser.add_argument(
        "--heartbeat-timeout", type=float, default=5.0, help="subscribers' and relays' (5 s)"
    )
    parser.add_argument("--down", type=float, default=6.0, help="seconds the hub is down (6)")
    parser.add_argument("--no-floor", action="store_true", help="skip the bare servers' runs")
    parser.add_argument("--dir", help="where the daemons live (default: a temp folder)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    try:
        setups = parse_setups(args.setups)
    except ValueError:
        parser.error("--setups takes SUBSCRIBERS:RELAYS pairs, e.g. 1000:0,10000:10")
    if not all(1 <= n <= 100_000 and 0 <= r <= min(n, 200) for n, r in setups):
        parser.error("each setup needs 1..100000 subscribers and at most 200 relays")
    if args.down <= args.heartbeat_timeout:
        parser.error("--down must be longer than --heartbeat-timeout: the subscribers must notice")
    if args.table < 1 or args.bans < 1 or args.interval <= 0:
        parser.error("--table and --bans must be at least 1, --interval positive")
    stop_on_sigterm()
    try:
        result = run(
            setups,
            args.table,
            args.bans,
            args.interval,
            args.heartbeat,
            args.heartbeat_timeout,
            args.down,
            not args.no_floor,
            args.dir,
        )
    except BenchError as error:
        print(f"fanout: {error}", file=sys.stderr)
        return 1
    report("fanout", result, text(result), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
