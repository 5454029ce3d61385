"""The hub: takes reports from monitors, keeps the cluster's ban table, broadcasts changes.

One poll loop over three sockets, after zguide's Clone server: `collector`
(ROUTER) takes events and answers ACK/NAK, `broadcaster` (PUB) sends updates and
heartbeats, `snapshots` (ROUTER) hands the whole table to subscribers that
(re)connect or saw a gap. `legacy` adds fail2ban-zmq-tools' format when configured.
What to make of a report is the admission core's to say (`admission.py`); this shell
moves the bytes, stores each batch before it answers, and keeps the timers.
"""

from __future__ import annotations

import collections
import functools
import logging
import socket
import time
from pathlib import Path

import zmq

from . import protocol
from .admission import Admission
from .config import Config
from .control import ControlSocket
from .keys import Security
from .legacy import LegacyEndpoints
from .metrics import counter, gauge, histogram
from .protocol import ProtocolError
from .runtime import (
    NOTICE,
    RateLimitedLog,
    StopSignals,
    Wakeup,
    batched_logging,
    clock,
    drain,
    raise_file_limit,
    release_memory,
    send_frames,
    try_send_frames,
)
from .snapshots import SnapshotQueue
from .state import StateStore, Update

log = logging.getLogger("f2bzmq.publisher")

# A report's frames: the peer's identity, the protocol, the kind and its events. One
# more event is kept of a longer message, so that what is kept is refused whole.
MAX_REPORT_FRAMES = protocol.MAX_REPORT_EVENTS + 4
MAX_REQUEST_FRAMES = 8  # of a snapshot request (the identity and three), likewise
DRAIN_LIMIT = 1000  # events taken per commit (in as many reports): one fsync ACKs them all
# Events of one peer a pass takes (one full report): libzmq hands out the peers' reports
# in turn, so the others' are read within the first few; the pass then ends instead of
# going on with the one peer's (a node flooding, even refused, made node1's reports wait
# for passes of 20-50 ms; now 2-3 ms).
FAIR_SHARE = 100
# Replies libzmq queues per report peer (each up to 100 answers, at most about 21 kB);
# the hub keeps what does not fit, up to REPLY_BACKLOG bytes a peer, and sends it as the
# peer reads: an honest burst loses no ACK, a node that never reads holds 6 MB at most.
REPLY_HWM = 100
REPLY_BACKLOG = 4 * 1024 * 1024
REPLY_BACKLOG_TOTAL = 64 * 1024 * 1024  # all peers together
REQUEST_HWM = 100
HANDSHAKE_IVL = 10_000  # ms a connection has to finish its handshake
MIN_FILE_LIMIT = 8192  # open files below which the hub warns at start
LISTEN_BACKLOG = 1024  # connections the kernel queues until libzmq accepts them (100)
MAX_SUBSCRIPTION = 1024  # bytes of a subscription a PUB takes; a node subscribes to 9
# Snapshot parts queued per peer (each up to SNAPSHOT_EVENTS events, about 130 kB): the
# rest of a snapshot is sent as the peer reads, so one that does not read holds this many.
SNAPSHOT_HWM = 4
# The two update streams: (packed, events per message).
_STREAMS = ((False, protocol.MAX_UPDATE_EVENTS), (True, protocol.MAX_PACKED_EVENTS))


class Publisher:
    """The hub's reactor: sockets, the store and timers around the admission core."""

    def __init__(self, config: Config, control_path: Path | None = None) -> None:
        self.config = config
        self.heartbeat_interval = config.publisher.heartbeat_interval
        self.file_limit = raise_file_limit()  # connections are descriptors, strangers' too
        state_dir = config.state_path("")
        state_dir.mkdir(parents=True, exist_ok=True)
        self.store = StateStore(config.state_path("publisher.sqlite3"))
        # The core's table: the shell stores, expires and snapshots it.
        self.table = self.store.load(config.node, config.publisher.default_bantime, 86400.0)
        self.table.allow_foreign_unban = config.publisher.allow_foreign_unban
        self.admission = Admission(config, self.table)  # what every report is judged by
        self.snapshot_queue = SnapshotQueue()  # who gets the table next, part by part
        self.replies = ReplyBacklog()  # replies to report peers whose queue was full
        self.refusals = RateLimitedLog(log)  # of snapshot requests; the core logs reports'
        self.broadcasts = 0  # updates published
        self.security = Security.for_role(config, "publisher")
        # Two I/O threads: a stranger's CURVE handshakes (a few scalar multiplications
        # each, before the authenticator can say no) then hold up only part of the nodes'
        # traffic, and the fan-out to many subscribers uses both cores.
        self.context = zmq.Context(io_threads=2)
        # The authenticator must run before the first bind, on the sockets' context.
        self.auth = self.security.authenticator(self.context)
        if self.auth is not None:
            self.admission.authorized = frozenset(self.auth.names)
        # Addresses no ban may name, as far as [publisher] allowlist says: the hubs', from
        # the configuration, and the nodes', from the authenticator as they connect.
        self.hub_addresses = resolve(hub_hosts(config))
        self.addresses_seen = -1  # the authenticator's generation the core has
        self.learn_addresses()
        self.bind_sockets()
        # fail2ban-zmq-tools' format, when configured
        self.legacy = LegacyEndpoints(
            self.context,
            config.publisher,
            self.admission.handle_legacy,
            self.finish_batch,
            self.admission.legacy_ready_at,
        )
        self.wakeup = Wakeup()
        self.signals = StopSignals(self.wakeup)
        self.poller = zmq.Poller()
        self.poller.register(self.wakeup.read_fd, zmq.POLLIN)
        self.register_sockets()
        self.legacy.register(self.poller)
        self.control = control_path and ControlSocket(self.context, control_path, self.status)
        if self.control:
            self.poller.register(self.control.socket, zmq.POLLIN)
        self.next_hugz = 0.0

    def bind_sockets(self, patience: float = 0.0) -> None:
        bind = functools.partial(hub_socket, self.context, self.security, patience=patience)
        binds = self.config.binds
        self.collector = bind(zmq.ROUTER, binds("report_port"), REPLY_HWM)
        self.broadcaster = bind(zmq.PUB, binds("publish_port"), self.config.publisher.send_hwm)
        self.snapshots = bind(zmq.ROUTER, binds("snapshot_port"), SNAPSHOT_HWM)
        # A full queue raises Again instead of dropping; a peer gone, EHOSTUNREACH.
        self.collector.router_mandatory = True
        self.snapshots.router_mandatory = True

    def register_sockets(self) -> None:
        self.poller.register(self.collector, zmq.POLLIN)
        self.poller.register(self.snapshots, zmq.POLLIN)

    def run(self) -> None:
        log.log(
            NOTICE,
            "publisher %s started: reports on %s, updates on %s, snapshots on %s; "
            "%d active bans, sequence %d",
            self.config.node,
            " ".join(self.config.binds("report_port")),
            " ".join(self.config.binds("publish_port")),
            " ".join(self.config.binds("snapshot_port")),
            len(self.table.bans),
            self.table.sequence,
        )
        if self.file_limit < MIN_FILE_LIMIT:
            log.warning(
                "open files are limited to %d (hard limit): that many idle connections of "
                "a stranger stop the hub from taking new ones; raise it (LimitNOFILE=)",
                self.file_limit,
            )
        while not self.signals.stopping:
            ready = dict(self.poller.poll(self.poll_timeout(time.time())))
            if self.wakeup.read_fd in ready:
                self.wakeup.drain()
            if self.signals.reload:
                self.signals.reload = False
                self.reload_keys()
                continue
            if self.auth is not None and self.auth.generation != self.addresses_seen:
                self.learn_addresses()
            with batched_logging():  # a line per ban, written once per pass
                self.handle_ready(ready)
        self.close()

    def poll_timeout(self, now: float) -> int:
        """Milliseconds until the next timer: a heartbeat, an expiry, a held old report's
        turn, or soon while a snapshot or replies wait for a peer to read (its queue
        empties as it does)."""
        deadline = min(self.next_hugz, self.table.next_expiry() or now + 3600)
        wait = 0.01 if self.replies.peers else self.snapshot_queue.wait_seconds(now)
        for then in (wait, self.legacy.wait_seconds(now)):
            if then is not None:
                deadline = min(deadline, now + then)
        return max(0, int((deadline - now) * 1000)) + 1

    def learn_addresses(self) -> None:
        """Give the core the hubs' addresses and where each node has connected from."""
        nodes = {}
        if self.auth is not None:
            self.addresses_seen = self.auth.generation
            nodes = self.auth.node_addresses()
        self.admission.set_addresses(self.hub_addresses, nodes)

    def handle_ready(self, ready: dict) -> None:
        if self.collector in ready:
            self.handle_reports()
        if self.snapshots in ready:
            self.handle_snapshots()
        if self.snapshot_queue.waiting or self.snapshot_queue.sending:
            self.send_snapshot_parts(time.time())
        if self.replies.peers:
            self.replies.flush(self.collector)
        self.legacy.handle(ready)
        if self.control and self.control.socket in ready:
            self.control.handle()
        now = time.time()
        self.flush_ttl(now)
        if now >= self.next_hugz:
            self.send_hugz(now)

    def handle_reports(self) -> None:
        """Take the waiting reports, commit them in one transaction, then answer and broadcast."""
        replies: list[list[bytes]] = []
        updates: list[Update] = []
        now = time.time()
        taken = 0
        shares: dict[bytes, int] = {}  # events taken of each peer in this pass
        oversized = False
        for frames in drain(self.collector, DRAIN_LIMIT, copy=False, max_frames=MAX_REPORT_FRAMES):
            oversized = oversized or len(frames) == MAX_REPORT_FRAMES
            peer, body = frames[0].bytes, [frame.bytes for frame in frames[1:]]
            # The node name the authenticator gave this peer's key (None without keys).
            user = frames[-1].get("User-Id") if self.auth is not None else None
            answers, changes = self.admission.handle_report(body, user, now)
            replies.extend([peer, *answer] for answer in answers)
            updates.extend(changes)
            events = max(1, len(body) - 2)
            taken += events
            share = shares[peer] = shares.get(peer, 0) + events
            if taken >= DRAIN_LIMIT or share > FAIR_SHARE:
                # The rest waits for the next pass: a pass stays short, and one peer's
                # reports (a flood, even refused) never make the others wait a long one.
                break
        self.finish_batch(self.collector, replies, updates)
        if oversized:
            release_memory()  # what libzmq held of a message too long to be a report

    def finish_batch(
        self,
        sock: zmq.Socket | None,
        replies: list[list[bytes]],
        updates: list[Update],
        note: str = "",
    ) -> None:
        """Commit a drained batch, then ACK it and broadcast what changed: ACK means stored."""
        self.store.commit(self.table)
        backlog = self.replies
        for reply in replies:
            if reply[0] in backlog.peers or not send_or_drop(sock, reply):
                backlog.keep(reply)
        self.broadcast(updates)  # before the log lines: the nodes wait, the log doesn't
        for update in updates:
            # Logged only now that it is stored: a crash can't leave a ban in the log twice.
            log.log(NOTICE, "%s%s", update.event.describe(), note)

    def reload_keys(self) -> None:
        """SIGHUP: read nodes/ again; if a key went away, cut every connection so it can't stay.
        A node whose key was replaced counts: its name is accepted still, but a connection
        made with the old key must not outlive it (the User-Id names the node, not the key)."""
        self.hub_addresses = resolve(hub_hosts(self.config))
        self.learn_addresses()
        if self.auth is None:
            log.info("SIGHUP: insecure mode, no keys to reload")
            return
        before = dict(self.auth.nodes)
        count = self.auth.reload()
        self.admission.authorized = frozenset(self.auth.names)
        removed = {name for key, name in before.items() if self.auth.nodes.get(key) != name}
        log.log(NOTICE, "reloaded node keys: %d accepted", count)
        if removed:
            log.log(
                NOTICE, "keys withdrawn for %s: reconnecting everyone", ", ".join(sorted(removed))
            )
            for sock in (self.collector, self.broadcaster, self.snapshots):
                if sock is not self.broadcaster:
                    self.poller.unregister(sock)
                sock.close(linger=0)
            self.bind_sockets(patience=10.0)
            self.register_sockets()

    def broadcast(self, updates: list[Update]) -> None:
        """Publish updates in order, each run of consecutive sequence numbers in as few
        messages as each stream takes: PUB sends a stream only to its subscribers."""
        start = 0
        for end in range(1, len(updates) + 1):
            if end < len(updates) and updates[end].seq == updates[end - 1].seq + 1:
                continue
            run = updates[start:end]
            for packed, size in _STREAMS:
                for first in range(0, len(run), size):
                    self._publish(run[first : first + size], packed)
            start = end
        self.legacy.broadcast([update.event for update in updates])
        self.broadcasts += len(updates)

    def _publish(self, updates: list[Update], packed: bool) -> None:
        events = (update.event for update in updates)
        message = protocol.encode_update(self.table.instance, updates[0].seq, events, packed)
        send_frames(self.broadcaster, message)

    def flush_ttl(self, now: float) -> None:
        """Lift bans whose time is up, even when their origin never reports the Unban."""
        expiry = self.table.next_expiry()
        if expiry is None or expiry > now:
            return
        updates = self.table.expire(now)
        self.store.commit(self.table)
        for update in updates:
            log.log(NOTICE, "[%s] Unban %s: ban time is up", update.event.jail, update.event.ip)
        self.broadcast(updates)

    def send_hugz(self, now: float) -> None:
        """Heartbeat with the current sequence, so silence means a dead link and a gap shows."""
        for packed in (False, True):
            message = protocol.encode_heartbeat(self.table.instance, self.table.sequence, packed)
            send_frames(self.broadcaster, message)
        self.next_hugz = now + self.heartbeat_interval

    def handle_snapshots(self) -> None:
        """Take the snapshot requests waiting: each waits its turn in the snapshot queue."""
        now = time.time()
        oversized = False
        for frames in drain(self.snapshots, 100, copy=False, max_frames=MAX_REQUEST_FRAMES):
            oversized = oversized or len(frames) == MAX_REQUEST_FRAMES
            peer = frames[0].bytes
            # Without keys every connection counts as a node of its own.
            node = frames[-1].get("User-Id") if self.auth is not None else f"peer {peer.hex()}"
            try:
                protocol.decode_snapshot_request([frame.bytes for frame in frames[1:]])
            except ProtocolError as error:
                self.refusals.warning("snapshot", "refused a snapshot request: %s", error)
                continue
            refused = self.snapshot_queue.ask(peer, node, now)
            if refused:
                self.refusals.warning(f"snapshot {node}", "refused a snapshot request: %s", refused)
        if oversized:
            release_memory()

    def send_snapshot_parts(self, now: float) -> None:
        """Start the snapshots whose turn it is; give each peer the parts it has room for."""
        queue = self.snapshot_queue
        queue.start(self.table, now)
        for peer in list(queue.sending):
            while peer in queue.sending:
                try:
                    if not try_send_frames(self.snapshots, [peer, *queue.next_part(peer)]):
                        break  # its queue is full: the rest when it has read some
                except zmq.ZMQError:  # EHOSTUNREACH: the peer is gone
                    queue.gone(peer)
                    break
                queue.sent(peer)

    def status(self) -> dict:
        counters, nodes = self.admission.counters, self.admission.last_report
        per_jail: dict[str, int] = {}
        for jail, _ in self.table.bans:
            per_jail[jail] = per_jail.get(jail, 0) + 1
        return {
            "role": "publisher",
            "node": self.config.node,
            "Sequence number": self.table.sequence,
            "Currently banned": len(self.table.bans),
            "Banned per jail": per_jail,
            "Nodes (last report)": {node: clock(seen) for node, seen in nodes.items()},
            "Reports received": counters["reports"],
            "Events accepted": counters["accepted"],
            "Events refused": counters["refused"],
            "Duplicates dropped": counters["duplicates"],
            "Updates broadcast": self.broadcasts,
            "problems": [],
            "metrics": {
                "sequence": gauge("sequence number of the last update", self.table.sequence),
                "bans": gauge("active cluster bans per jail", per_jail, "jail"),
                "nodes": gauge("nodes that have reported", len(nodes)),
                "reports_received": counter(
                    "report messages, of one or more events", counters["reports"]
                ),
                "events_accepted": counter("events stored", counters["accepted"]),
                "events_refused": counter("events refused", counters["refused"]),
                "duplicates": counter("events already known", counters["duplicates"]),
                "updates_broadcast": counter("updates published", self.broadcasts),
                "accept_delay_seconds": histogram(
                    "origin's Ban line -> stored by the hub", self.admission.accept_delays
                ),
            },
        }

    def close(self) -> None:
        self.store.commit(self.table)
        self.store.close()
        for sock in (self.collector, self.broadcaster, self.snapshots):
            sock.close()
        if self.control:
            self.control.close()
        self.legacy.close()
        if self.auth is not None:
            self.auth.stop()  # its ZAP socket would keep the context from terminating
        self.context.term()
        self.wakeup.close()
        log.log(
            NOTICE, "publisher %s stopped at sequence %d", self.config.node, self.table.sequence
        )


def send_or_drop(sock: zmq.Socket, frames: list) -> bool:
    """Send on a ROUTER with ROUTER_MANDATORY without blocking: False when the peer's
    queue is full; a message for a peer gone is dropped (True)."""
    try:
        return try_send_frames(sock, frames)
    except zmq.ZMQError:  # EHOSTUNREACH
        return True


class ReplyBacklog:
    """Replies a report peer had no room for, in order, bounded in bytes per peer and in
    all: a node that never reads its ACKs costs the hub at most REPLY_BACKLOG."""

    def __init__(self) -> None:
        self.peers: dict[bytes, collections.deque[list[bytes]]] = {}
        self.sizes: collections.Counter[bytes] = collections.Counter()
        self.dropped = RateLimitedLog(log)

    def keep(self, reply: list[bytes]) -> None:
        peer, size = reply[0], sum(map(len, reply))
        if self.sizes[peer] + size > REPLY_BACKLOG or (
            sum(self.sizes.values()) + size > REPLY_BACKLOG_TOTAL
        ):
            self.dropped.warning("backlog", "a monitor does not read its replies: some dropped")
            return
        self.peers.setdefault(peer, collections.deque()).append(reply)
        self.sizes[peer] += size

    def flush(self, sock: zmq.Socket) -> None:
        """Send what each peer has room for now."""
        for peer, waiting in list(self.peers.items()):
            while waiting and send_or_drop(sock, waiting[0]):
                self.sizes[peer] -= sum(map(len, waiting.popleft()))
            if not waiting:
                del self.peers[peer], self.sizes[peer]


def hub_hosts(config: Config) -> list[str]:
    """The hubs' names and addresses: [general] hubs and where this hub listens."""
    binds = [host for host in config.publisher.bind if host != "*"]
    return list(dict.fromkeys([*config.general.hubs, *binds]))


def resolve(hosts: list[str]) -> list[str]:
    """Every address of these host names (an address stands for itself)."""
    found: dict[str, None] = {}
    for host in hosts:
        try:
            infos = socket.getaddrinfo(host.strip("[]"), None, proto=socket.IPPROTO_TCP)
        except OSError as error:
            log.warning("cannot resolve hub %s to keep it out of bans: %s", host, error)
            continue
        found.update((info[4][0], None) for info in infos)
    return list(found)


def hub_socket(
    context: zmq.Context,
    security: Security,
    kind: int,
    endpoints: list[str],
    send_hwm: int,
    patience: float = 0.0,
) -> zmq.Socket:
    """A bound hub socket; `patience` seconds of retries while a closed one frees its port."""
    sock = context.socket(kind)
    sock.linger = 1000
    # A connection that has not finished its handshake by then is dropped: a stranger's
    # idle connections hold descriptors for 10 s, not libzmq's default 30.
    sock.handshake_ivl = HANDSHAKE_IVL
    sock.backlog = LISTEN_BACKLOG
    security.server(sock)
    # Past its high-water mark a PUB drops silently (sequence numbers make a drop
    # visible to subscribers, a high mark makes it rare), a ROUTER drops what exceeds
    # a peer's queue.
    sock.sndhwm = send_hwm
    if kind == zmq.PUB:
        # What a PUB reads are subscriptions, a topic each: libzmq would keep a
        # frame of any size a node's SUB sends before looking at it.
        sock.maxmsgsize = MAX_SUBSCRIPTION
    else:
        sock.maxmsgsize = protocol.MAX_HUB_FRAME
        # Requests queued per peer before libzmq stops reading its connection: a monitor
        # has at most its in_flight events out, and the hub takes 1,000 a pass; a node
        # that sends faster waits for TCP instead of filling the hub (each report may
        # be 48 kB: 1,000 of them were 48 MB).
        sock.rcvhwm = REQUEST_HWM
    for endpoint in endpoints:
        deadline = time.monotonic() + patience
        while True:
            try:
                sock.bind(endpoint)
                break
            except zmq.ZMQError as error:
                if error.errno != zmq.EADDRINUSE or time.monotonic() >= deadline:
                    sock.close(linger=0)
                    raise RuntimeError(f"cannot bind {endpoint}: {error}") from None
                time.sleep(0.02)  # libzmq releases a closed listener asynchronously
    return sock
