"""The hub: takes reports from monitors, keeps the cluster's ban table, broadcasts changes.

One poll loop over three sockets, after zguide's Clone server: `collector`
(ROUTER) takes events and answers ACK/NAK, `broadcaster` (PUB) sends updates and
heartbeats, `snapshots` (ROUTER) hands the whole table to subscribers that
(re)connect or saw a gap. `legacy` adds fail2ban-zmq-tools' format when configured.
What to make of a report is the admission core's to say (`admission.py`), whether the
state is young and who hands it over the rebuild core's (`rebuild.py`); this shell moves
the bytes, stores each batch before it answers, and keeps the timers. A batch it can't
store (a full disk) is answered with retry NAKs: the monitors keep those events.
"""

from __future__ import annotations

import functools
import logging
import sqlite3
import time
from pathlib import Path

import zmq

from . import legacy, protocol
from .admission import Admission
from .config import Config
from .control import ControlSocket
from .keys import Security
from .legacy import LegacyEndpoints
from .metrics import counter, gauge, histogram
from .protocol import ProtocolError
from .rebuild import Handed, Handover, Rebuild
from .runtime import (
    NOTICE,
    RateLimitedLog,
    StopSignals,
    Wakeup,
    batched_logging,
    clock,
    drain,
    log_problems,
    send_frames,
    try_send_frames,
)
from .state import StateStore, Update

log = logging.getLogger("f2bzmq.publisher")

# A report's frames: the peer's identity, the protocol, the kind and its events. One
# more event is kept of a longer message, so that what is kept is refused whole.
MAX_REPORT_FRAMES = protocol.MAX_REPORT_EVENTS + 4
DRAIN_LIMIT = 1000  # events taken per commit (in as many reports): one fsync ACKs them all
REPLY_HWM = 10 * DRAIN_LIMIT  # replies queued per peer (an ACK is about 80 bytes an event)
# The two update streams: (packed, events per message).
_STREAMS = ((False, protocol.MAX_UPDATE_EVENTS), (True, protocol.MAX_PACKED_EVENTS))
# Seconds between attempts to store again after the store failed (a full disk): meanwhile
# every event gets a retry NAK, and each failed attempt costs a reload of the table.
STORE_RETRY = 2.0
TIDY_INTERVAL = 5.0  # seconds between checks that the store's write-ahead log can be emptied
BACKLOG = 4096  # connections a bound socket lets wait for libzmq to accept them


class Publisher:
    """The hub's reactor: sockets, the store and timers around the admission core."""

    def __init__(self, config: Config, control_path: Path | None = None) -> None:
        self.config = config
        self.heartbeat_interval = config.publisher.heartbeat_interval
        state_dir = config.state_path("")
        state_dir.mkdir(parents=True, exist_ok=True)
        self.store = StateStore(config.state_path("publisher.sqlite3"))
        # The core's table: the shell stores, expires and snapshots it.
        self.table = self.load_table()
        self.admission = Admission(config, self.table)  # what every report is judged by
        # A new state is young until the nodes and a peer hub have rebuilt it.
        young_until = self.store.young_until()
        if self.store.created:
            young_until = time.time() + config.publisher.rebuild_window
            self.store.set_young_until(young_until)
        self.rebuild = Rebuild(young_until)
        # The other hubs' snapshot endpoints, asked for their tables while young.
        peers = config.endpoints("snapshot_port") if young_until is not None else []
        self.handover = Handover(peers, self.table.instance)
        self.peer_sockets: dict[str, zmq.Socket] = {}  # peer endpoint -> DEALER
        self.store_error: str | None = None  # why the last commit failed, until one succeeds
        self.store_retry = 0.0  # when to try storing again
        self.refusals = RateLimitedLog(log)  # of snapshot requests; the core logs reports'
        self.broadcasts = 0  # updates published
        self.security = Security.for_role(config, "publisher")
        self.context = zmq.Context()
        # The authenticator must run before the first bind, on the sockets' context.
        self.auth = self.security.authenticator(self.context)
        try:
            if self.auth is not None:
                self.admission.authorized = frozenset(self.auth.names)
            self.bind_sockets()
            # fail2ban-zmq-tools' format, when configured
            self.legacy = LegacyEndpoints(
                self.context, config.publisher, self.admission.handle_legacy, self.finish_batch
            )
        except BaseException:
            # A port in use, say: without this, pyzmq 24's authenticator thread (Debian 12)
            # would keep the process alive after the error, and systemd would see it running.
            if self.auth is not None:
                self.auth.stop()
            self.context.destroy(linger=0)
            self.store.close()
            raise
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
        self.next_tidy = 0.0

    def load_table(self):
        table = self.store.load(self.config.node, self.config.publisher.default_bantime, 86400.0)
        table.allow_foreign_unban = self.config.publisher.allow_foreign_unban
        return table

    def bind_sockets(self, patience: float = 0.0) -> None:
        hwm, binds = self.config.publisher.send_hwm, self.config.binds
        bind = functools.partial(hub_socket, self.context, self.security, hwm, patience)
        self.collector = bind(zmq.ROUTER, binds("report_port"))
        self.broadcaster = bind(zmq.PUB, binds("publish_port"))
        self.snapshots = bind(zmq.ROUTER, binds("snapshot_port"))

    def register_sockets(self) -> None:
        self.poller.register(self.collector, zmq.POLLIN)
        self.poller.register(self.snapshots, zmq.POLLIN)

    def run(self) -> None:
        log.log(
            NOTICE,
            "publisher %s started: reports on %s, updates on %s, snapshots on %s; "
            "%d active bans, sequence %d%s",
            self.config.node,
            " ".join(self.config.binds("report_port")),
            " ".join(self.config.binds("publish_port")),
            " ".join(self.config.binds("snapshot_port")),
            len(self.table.bans),
            self.table.sequence,
            self.young_note(),
        )
        while not self.signals.stopping:
            now = time.time()
            self.ask_peers(now)
            timers = [self.next_hugz, self.table.next_expiry() or now + 3600]
            timers += [t for t in (self.rebuild.until, self.handover.next_deadline()) if t]
            if self.admission.unavailable is not None:
                timers.append(self.store_retry)
            deadline = min(timers)
            ready = dict(self.poller.poll(max(0, int((deadline - now) * 1000)) + 1))
            if self.wakeup.read_fd in ready:
                self.wakeup.drain()
            if self.signals.reload:
                self.signals.reload = False
                self.reload_keys()
                continue
            with batched_logging():  # a line per ban, written once per pass
                self.handle_ready(ready)
        self.close()

    def young_note(self) -> str:
        if not self.rebuild.young:
            return ""
        return f"; a new state, young until {clock(self.rebuild.until)}: rebuilt by the nodes" + (
            f" and the peer hubs {' '.join(self.handover.asked)}" if self.handover.asked else ""
        )

    def handle_ready(self, ready: dict) -> None:
        if self.collector in ready:
            self.handle_reports()
        if self.snapshots in ready:
            self.handle_snapshots()
        if self.legacy.reports in ready:
            self.legacy.handle_reports()
        if self.control and self.control.socket in ready:
            self.control.handle()
        for peer, sock in list(self.peer_sockets.items()):
            if sock in ready and self.peer_sockets.get(peer) is sock:  # not closed meanwhile
                self.handle_handover(peer, sock)
        now = time.time()
        if self.admission.unavailable is not None and now >= self.store_retry:
            self.admission.unavailable = None  # the next batch tries the store again
        self.flush_ttl(now)
        self.grow_up(self.rebuild.on_tick(now))
        if now >= self.next_hugz:
            self.send_hugz(now)
        if now >= self.next_tidy:
            self.next_tidy = now + TIDY_INTERVAL
            if not ready:  # nothing came in this pass: the hub is idle
                self.store.tidy()

    def handle_reports(self) -> None:
        """Take the waiting reports, commit them in one transaction, then answer and broadcast."""
        replies: list[list[bytes]] = []
        updates: list[Update] = []
        now = time.time()
        taken = 0
        for frames in drain(self.collector, DRAIN_LIMIT, copy=False, max_frames=MAX_REPORT_FRAMES):
            peer, body = frames[0].bytes, [frame.bytes for frame in frames[1:]]
            # The node name the authenticator gave this peer's key (None without keys).
            user = frames[-1].get("User-Id") if self.auth is not None else None
            if protocol.is_hello(body):
                replies.append([peer, *self.handle_hello(body, user)])
                taken += 1
                continue
            answers, changes = self.admission.handle_report(body, user, now)
            replies.extend([peer, *answer] for answer in answers)
            updates.extend(changes)
            taken += max(1, len(body) - 2)
            if taken >= DRAIN_LIMIT:
                break  # the rest waits for the next pass: a pass stays short
        self.finish_batch(self.collector, replies, updates)

    def handle_hello(self, body: list[bytes], user: str | None) -> list[bytes]:
        """A monitor asks for the state id (and may say it rebuilt this state): welcome."""
        try:
            rebuilt = protocol.decode_hello(body)
        except ProtocolError as error:
            self.refusals.warning(f"hello {user}", "refused a hello from %s: %s", user, error)
            return protocol.encode_replies([], [protocol.nak_body("", str(error))])[0]
        instance, authorized = self.table.instance, self.admission.authorized
        self.grow_up(self.rebuild.on_hello(user, rebuilt, instance, authorized))
        return protocol.encode_welcome(instance, self.table.sequence, self.rebuild.young)

    def finish_batch(
        self, sock: zmq.Socket, replies: list[list[bytes]], updates: list[Update], note: str = ""
    ) -> None:
        """Commit a drained batch, then ACK it and broadcast what changed: ACK means stored.
        A batch that can't be stored is not in the table either: its events are refused
        for now, and their monitors send them again."""
        if not self.commit():
            replies = [self.retry_later(sock, reply) for reply in replies]
            updates = []
        for reply in replies:
            send_frames(sock, reply)
        self.broadcast(updates)  # before the log lines: the nodes wait, the log doesn't
        for update in updates:
            # Logged only now that it is stored: a crash can't leave a ban in the log twice.
            log.log(NOTICE, "%s%s", update.event.describe(), note)

    def commit(self) -> bool:
        """Store the table's changes; False when the store failed, and then the table is
        what the store holds (the changes are undone) and reports get retry NAKs for a
        while. Logged when it starts failing and when it works again, not for each batch."""
        try:
            self.store.commit(self.table)
        except sqlite3.Error as error:
            reason = f"the hub cannot store events now: {error}"
            if self.store_error is None:
                log.error(
                    "cannot write the ban table %s: %s; reports get retry NAKs (their "
                    "monitors keep them) until it can, trying every %g s",
                    self.store.path,
                    error,
                    STORE_RETRY,
                )
            self.store_error = str(error)
            self.admission.unavailable = reason
            self.store_retry = time.time() + STORE_RETRY
            # The table has no undo: take it back as the store has it.
            self.table = self.admission.table = self.load_table()
            return False
        if self.store_error is not None:
            log.log(NOTICE, "the ban table %s can be written again", self.store.path)
            self.store_error = None
        return True

    def retry_later(self, sock: zmq.Socket, reply: list[bytes]) -> list[bytes]:
        """A reply to a batch that was not stored: its ACKs become retry NAKs (refusals
        stay); an old monitor's echo becomes its NAK."""
        if sock is not self.collector:
            return [*reply[:-1], legacy.LEGACY_NAK]
        peer, *message = reply
        if message[1] != protocol.ACK:
            return reply
        answers, _ = protocol.decode_reply(message)
        reason = self.admission.unavailable or "the hub cannot store events now"
        naks = [protocol.nak_body(answer.id, reason, retry=True) for answer in answers]
        return [peer, *protocol.encode_replies([], naks)[0]]

    def grow_up(self, reason: str | None) -> None:
        """The young state is rebuilt, for `reason` (None: not yet): say so from now on."""
        if reason is None:
            return
        self.handover.stop()
        for sock in self.peer_sockets.values():
            self.poller.unregister(sock)
            sock.close(linger=0)
        self.peer_sockets.clear()
        try:
            self.store.set_young_until(None)
        except sqlite3.Error as error:  # a restart finds the window over anyway
            log.warning("cannot note in %s that the state is rebuilt: %s", self.store.path, error)
        log.log(NOTICE, "state %s rebuilt: %s", self.table.instance[:8], reason)

    def ask_peers(self, now: float) -> None:
        """While young, ask each peer hub for its table (again if no whole answer came)."""
        for peer in self.handover.to_ask(now):
            old = self.peer_sockets.pop(peer, None)
            if old is not None:
                self.poller.unregister(old)
                old.close(linger=0)
            sock = self.context.socket(zmq.DEALER)
            self.security.client(sock)
            sock.linger = 0
            sock.maxmsgsize = protocol.MAX_NODE_FRAME
            sock.connect(peer)
            try_send_frames(sock, protocol.encode_snapshot_request())
            self.peer_sockets[peer] = sock
            self.poller.register(sock, zmq.POLLIN)

    def handle_handover(self, peer: str, sock: zmq.Socket) -> None:
        """Parts of a peer's table; once whole, its bans go into ours like reports."""
        for frames in drain(sock, 1000, max_frames=5):
            try:
                part = protocol.decode_snapshot_part(frames, self.admission.networks)
            except ProtocolError as error:
                self.refusals.warning("handover", "ignored a part from %s: %s", peer, error)
                continue
            handed = self.handover.on_part(peer, part)
            if peer not in self.handover.asked:
                self.poller.unregister(sock)
                sock.close(linger=0)
                del self.peer_sockets[peer]
            if handed is not None:
                self.take_handover(handed)
            if peer not in self.peer_sockets:
                return

    def take_handover(self, handed: Handed) -> None:
        now = time.time()
        updates = []
        for event in handed.events:
            if event.action == protocol.BAN:
                _, update = self.table.apply(event, now)
                if update is not None:
                    updates.append(update)
        if not self.commit():
            self.handover.asked[handed.peer] = None  # ask again once the store works
            return
        self.broadcast(updates)
        log.log(
            NOTICE,
            "took %d bans from %s's table (%d new here)",
            len(handed.events),
            handed.peer,
            len(updates),
        )
        self.grow_up(self.rebuild.on_handover(handed.peer, handed.young))

    def reload_keys(self) -> None:
        """SIGHUP: read nodes/ again; if a key went away, cut every connection so it can't stay."""
        if self.auth is None:
            log.info("SIGHUP: insecure mode, no keys to reload")
            return
        before = set(self.auth.names)
        count = self.auth.reload()
        self.admission.authorized = frozenset(self.auth.names)
        removed = before - self.auth.names
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
        for update in updates:
            self.legacy.broadcast(update.event)
        self.broadcasts += len(updates)

    def _publish(self, updates: list[Update], packed: bool) -> None:
        events = (update.event for update in updates)
        instance, young = self.table.instance, self.rebuild.young
        message = protocol.encode_update(instance, updates[0].seq, events, packed, young)
        send_frames(self.broadcaster, message)

    def flush_ttl(self, now: float) -> None:
        """Lift bans whose time is up, even when their origin never reports the Unban."""
        expiry = self.table.next_expiry()
        if expiry is None or expiry > now or self.admission.unavailable is not None:
            return
        updates = self.table.expire(now)
        if not self.commit():
            return
        for update in updates:
            log.log(NOTICE, "[%s] Unban %s: ban time is up", update.event.jail, update.event.ip)
        self.broadcast(updates)

    def send_hugz(self, now: float) -> None:
        """Heartbeat with the current sequence, so silence means a dead link and a gap shows."""
        table, young = self.table, self.rebuild.young
        for packed in (False, True):
            message = protocol.encode_heartbeat(table.instance, table.sequence, packed, young)
            send_frames(self.broadcaster, message)
        self.next_hugz = now + self.heartbeat_interval

    def handle_snapshots(self) -> None:
        for frames in drain(self.snapshots, 100, max_frames=8):
            peer, body = frames[0], frames[1:]
            try:
                protocol.decode_snapshot_request(body)
            except ProtocolError as error:
                self.refusals.warning("snapshot", "refused a snapshot request: %s", error)
                continue
            self.send_snapshot(peer)

    def send_snapshot(self, peer: bytes) -> None:
        sequence, events = self.table.snapshot()
        young = self.rebuild.young
        for part in protocol.encode_snapshot(self.table.instance, sequence, events, young):
            send_frames(self.snapshots, [peer, *part])
        log.debug("sent a snapshot of %d bans at sequence %d", len(events), sequence)

    def status(self) -> dict:
        counters, nodes = self.admission.counters, self.admission.last_report
        per_jail: dict[str, int] = {}
        for jail, _ in self.table.bans:
            per_jail[jail] = per_jail.get(jail, 0) + 1
        return {
            "role": "publisher",
            "node": self.config.node,
            "State": f"young, rebuilding until {clock(self.rebuild.until)}"
            if self.rebuild.young
            else "rebuilt",
            "Sequence number": self.table.sequence,
            "Currently banned": len(self.table.bans),
            "Banned per jail": per_jail,
            "Nodes (last report)": {node: clock(seen) for node, seen in nodes.items()},
            "Reports received": counters["reports"],
            "Events accepted": counters["accepted"],
            "Events refused": counters["refused"],
            "Duplicates dropped": counters["duplicates"],
            "Updates broadcast": self.broadcasts,
            "problems": self.problems(),
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

    def problems(self) -> list[str]:
        found = []
        if self.store_error is not None:
            found.append(
                f"cannot write the ban table {self.store.path}: {self.store_error}; "
                "reports get retry NAKs until it can"
            )
        return found + log_problems()

    def close(self) -> None:
        self.commit()
        self.store.close()
        for sock in (self.collector, self.broadcaster, self.snapshots, *self.peer_sockets.values()):
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


def hub_socket(
    context: zmq.Context,
    security: Security,
    send_hwm: int,
    patience: float,
    kind: int,
    endpoints: list[str],
) -> zmq.Socket:
    """A bound hub socket; `patience` seconds of retries while a closed one frees its port."""
    sock = context.socket(kind)
    sock.linger = 1000
    # Connections waiting to be accepted: after a restart every node reconnects at once,
    # and past libzmq's default of 100 the kernel drops them, each to retry 1, 3, 7 s
    # later. The kernel caps it at net.core.somaxconn.
    sock.backlog = BACKLOG
    security.server(sock)
    if kind == zmq.PUB:
        # PUB drops silently past the high-water mark; sequence numbers make a
        # drop visible to subscribers, a high mark makes it rare.
        sock.sndhwm = send_hwm
    else:
        sock.maxmsgsize = protocol.MAX_HUB_FRAME
        sock.router_mandatory = False
        # A ROUTER drops what exceeds a peer's queue: room for many drained batches
        # of ACKs, so a burst never loses one while libzmq's I/O thread catches up.
        sock.sndhwm = REPLY_HWM
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
