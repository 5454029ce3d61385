"""The hub: takes reports from monitors, keeps the cluster's ban table, broadcasts changes.

One poll loop over three sockets, after zguide's Clone server: `collector`
(ROUTER) takes events and answers ACK/NAK, `broadcaster` (PUB) sends updates and
heartbeats, `snapshots` (ROUTER) hands the whole table to subscribers that
(re)connect or saw a gap. `legacy` adds fail2ban-zmq-tools' format when configured.
What to make of a report is the admission core's to say (`admission.py`), with the
cluster jails' counts (`detection.py`), whether the
state is young and who hands it over the rebuild core's (`rebuild.py`); this shell moves
the bytes, stores each batch before it answers, and keeps the timers. A batch it can't
store (a full disk) is answered with retry NAKs: the monitors keep those events.

The report port is also the admin channel: an admin key's requests are the desk's to
answer (`desk.py`), its decisions the operators' core's to apply (`decisions.py`), each
stored before the answer; peer hubs read each other's decisions there (`replication.py`).
Keys the hub does not know get in on that port only, as nodes asking to join
(`roster.py`), and hear nothing but that they wait. Subscribers tell the hub where they
stand on the snapshot port, and hear the operators' holds there (`holds.py`).
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import socket
import sqlite3
import time
from pathlib import Path

import zmq

from . import passes, protocol
from .admission import Admission
from .collection import Collector
from .config import Config, ConfigError
from .control import ControlSocket
from .decisions import Applied, Operators
from .desk import Desk, HubView
from .detection import Detection, DetectionStore
from .health import (
    Descriptors,
    DiskSpace,
    RefusedKeys,
    descriptors_problem,
    disk_problem,
    disk_space,
    open_descriptors,
    silence_problem,
)
from .keys import REPORT_DOMAIN, Security, fingerprint, write_public
from .legacy import LegacyEndpoints
from .metrics import counter, gauge, histogram
from .protocol import Decision, Presence, ProtocolError
from .rebuild import Handed, Handover, Rebuild
from .reload import LOGLEVEL, reread
from .replication import PULL_ROWS, Cursor, Replication, log_answer
from .roster import Roster
from .runtime import (
    NOTICE,
    RateLimitedLog,
    StopSignals,
    Wakeup,
    batched_logging,
    clock,
    drain,
    log_lines,
    log_problems,
    raise_file_limit,
    release_memory,
    send_frames,
    try_send_frames,
)
from .sdnotify import Notifier
from .snapshots import SnapshotQueue
from .state import StateStore, Update

log = logging.getLogger("f2bzmq.publisher")

# A report's frames: the peer's identity, the protocol, the kind and its events. One
# more event is kept of a longer message, so that what is kept is refused whole.
MAX_REPORT_FRAMES = protocol.MAX_REPORT_EVENTS + 4
MAX_REQUEST_FRAMES = 8  # of a snapshot request (the identity and three), likewise
# Replies libzmq queues per report peer (each up to 100 answers, at most about 21 kB);
# the hub keeps what does not fit, up to REPLY_BACKLOG bytes a peer, and sends it as the
# peer reads: an honest burst loses no ACK, a node that never reads holds 6 MB at most.
REPLY_HWM = 100
REPLY_BACKLOG = 4 * 1024 * 1024
REPLY_BACKLOG_TOTAL = 64 * 1024 * 1024  # all peers together
REQUEST_HWM = 100
HANDSHAKE_IVL = 10_000  # ms a connection has to finish its handshake
MIN_FILE_LIMIT = 8192  # open files below which the hub warns at start
LISTEN_BACKLOG = 4096  # connections the kernel queues until libzmq accepts them (libzmq: 100)
MAX_SUBSCRIPTION = 1024  # bytes of a subscription a PUB takes; a node subscribes to 9
# Snapshot parts queued per peer (each up to SNAPSHOT_EVENTS events, about 130 kB): the
# rest of a snapshot is sent as the peer reads, so one that does not read holds this many.
SNAPSHOT_HWM = 4
# The two update streams: (packed, events per message).
_STREAMS = ((False, protocol.MAX_UPDATE_EVENTS), (True, protocol.MAX_PACKED_EVENTS))
# What a reload changes at once; any other key of [general] and [publisher] needs a restart.
LIVE_KEYS = frozenset(
    {
        LOGLEVEL,
        ("publisher", "allowlist"),
        ("publisher", "allow_foreign_unban"),
        ("publisher", "heartbeat_interval"),
        ("publisher", "node_silence"),
        ("publisher", "relays"),
    }
)
# Seconds between attempts to store again after the store failed (a full disk): meanwhile
# every event gets a retry NAK, and each failed attempt costs a reload of the table.
STORE_RETRY = 2.0
TIDY_INTERVAL = 5.0  # seconds between checks that the store's write-ahead log can be emptied
PRUNE_INTERVAL = 3600.0  # seconds between two prunings of the operators' decisions
CUT_OFF_DELAY = 0.2  # seconds the answer to a removal has to leave before every link is cut
FORGET_INTERVAL = 5.0  # seconds between sweeps of the cluster jails' stale counts


class Publisher:
    """The hub's reactor: sockets, the store and timers around the admission core."""

    def __init__(self, config: Config, control_path: Path | None = None) -> None:
        self.config = config
        self.heartbeat_interval = config.publisher.heartbeat_interval
        self.file_limit = raise_file_limit()  # connections are descriptors, strangers' too
        state_dir = Path(config.publisher.state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        self.store = StateStore(state_dir / "publisher.sqlite3")
        # The core's table: the shell stores, expires and snapshots it.
        self.table = self.load_table()
        self.admission = Admission(config, self.table)  # what every report is judged by
        self.operators = self.load_operators()  # the operators' decisions: holds, allowlist
        self.roster = Roster()  # nodes asking to join, and what each accepted node says
        self.unbelieved: set[str] = set()  # relays logged as not in [publisher] relays
        self.desk = Desk(self.table, self.operators, self.roster)  # the admin channel's verbs
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
        # Every hub's report endpoint (ours too, until it answers with our state): their
        # operators' decisions are read there.
        reports = config.endpoints("report_port")
        cursors = {peer: Cursor.from_text(self.store.meta(f"peer {peer}")) for peer in reports}
        self.replication = Replication(reports, self.table.instance, cursors)
        self.log_sockets: dict[str, zmq.Socket] = {}  # peer report endpoint -> DEALER
        self.cut_off_at: float | None = None  # when to cut every link: a key went away
        self.next_prune = 0.0
        self.store_error: str | None = None  # why the last commit failed, until one succeeds
        self.store_retry = 0.0  # when to try storing again
        self.snapshot_queue = SnapshotQueue()  # who gets the table next, part by part
        self.replies = ReplyBacklog()  # replies to report peers whose queue was full
        self.refusals = RateLimitedLog(log)  # of snapshot requests; the core logs reports'
        self.broadcasts = 0  # updates published
        self.started = time.time()
        self.last_heard: float | None = None  # the last message of any node's monitor
        self.security = Security.for_role(config, "publisher")
        # The cluster jails' counts and ban histories, in the ban table's database.
        self.detection_store = DetectionStore(self.store.db)
        self.detection = self.load_detection()
        self.admission.detection = self.detection
        # Two I/O threads: a stranger's CURVE handshakes (a few scalar multiplications
        # each, before the authenticator can say no) then hold up only part of the nodes'
        # traffic, and the fan-out to many subscribers uses both cores.
        self.context = zmq.Context(io_threads=2)
        # The authenticator must run before the first bind, on the sockets' context.
        self.auth = self.security.authenticator(self.context)
        try:
            if self.auth is not None:
                self.admission.authorized = frozenset(self.auth.names)
            # Addresses no ban may name, as far as [publisher] allowlist says: the hubs',
            # from the configuration, and the nodes', from the authenticator as they connect.
            self.hub_addresses = resolve(hub_hosts(config))
            self.addresses_seen = -1  # the authenticator's generation the core has
            self.learn_addresses()
            if self.auth is not None:
                self.auth.removed = frozenset(key.encode() for key in self.operators.removed)
            self.bind_sockets()
            # fail2ban-zmq-tools' format, when configured
            self.legacy = LegacyEndpoints(
                self.context,
                config.publisher,
                self.admission.handle_legacy,
                self.finish_batch,
                self.admission.legacy_ready_at,
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
        self.control = control_path and ControlSocket(
            self.context, control_path, self.status, self.reload
        )
        if self.control:
            self.poller.register(self.control.socket, zmq.POLLIN)
        self.next_hugz = 0.0
        self.next_tidy = 0.0
        self.notifier = Notifier()  # systemd's, when the daemon runs under its unit
        self.garbage = Collector()  # its full collections: see collection
        self.next_forget = 0.0

    def load_table(self):
        table = self.store.load(self.config.node, self.config.publisher.default_bantime, 86400.0)
        table.allow_foreign_unban = self.config.publisher.allow_foreign_unban
        return table

    def load_operators(self) -> Operators:
        """The operators' state over the table: the decisions the store holds, replayed.
        Admission takes its holds and its allowlist from it."""
        publisher = self.config.publisher
        operators = Operators(
            self.table,
            self.config.network_limits(),
            publisher.allowlist.networks,
            publisher.default_bantime,
        )
        operators.restore((decision for _, decision in self.store.decisions()), time.time())
        self.admission.holds = operators.holds
        self.admission.set_operated(operators.allowlist)
        operators.never_banned = self.admission.never_banned
        return operators

    def load_detection(self) -> Detection | None:
        """The cluster jails, with the counts and histories stored; None without any."""
        if not self.config.cluster_jails:
            return None
        settings = self.config.publisher
        secret = b"" if self.security.insecure else self.security.own.secret
        detection = Detection(
            self.config.cluster_jails, settings.default_bantime, settings.dbpurgeage, secret
        )
        replayed = self.detection_store.load(detection, time.time())
        log.info(
            "cluster jails %s: %d failure reports within findtime counted again, %d ban histories",
            ", ".join(sorted(detection.jails)),
            replayed,
            len(detection.history),
        )
        return detection

    def bind_sockets(self, patience: float = 0.0) -> None:
        bind = functools.partial(hub_socket, self.context, self.security, patience=patience)
        binds = self.config.binds
        # The report port takes admin keys and keys asking to join too (REPORT_DOMAIN).
        self.collector = bind(zmq.ROUTER, binds("report_port"), REPLY_HWM, domain=REPORT_DOMAIN)
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
            "%d active bans, sequence %d%s",
            self.config.node,
            " ".join(self.config.binds("report_port")),
            " ".join(self.config.binds("publish_port")),
            " ".join(self.config.binds("snapshot_port")),
            len(self.table.bans),
            self.table.sequence,
            self.young_note(),
        )
        if self.file_limit < MIN_FILE_LIMIT:
            log.warning(
                "open files are limited to %d (hard limit): that many idle connections of "
                "a stranger stop the hub from taking new ones; raise it (LimitNOFILE=)",
                self.file_limit,
            )
        self.notifier.ready(f"sequence {self.table.sequence}, {len(self.table.bans)} bans")
        while not self.signals.stopping:
            now = time.time()
            self.notifier.tick(time.monotonic())
            self.ask_peers(now)
            self.read_peer_logs(now)
            ready = dict(self.poller.poll(self.poll_timeout(now)))
            self.garbage.tick(time.monotonic(), not ready)
            if self.wakeup.read_fd in ready:
                self.wakeup.drain()
            if self.signals.reload:
                self.signals.reload = False
                self.reload()
                continue
            if self.auth is not None and self.auth.generation != self.addresses_seen:
                self.learn_addresses()
            with batched_logging():  # a line per ban, written once per pass
                self.handle_ready(ready)
        self.close()

    def young_note(self) -> str:
        if not self.rebuild.young:
            return ""
        return f"; a new state, young until {clock(self.rebuild.until)}: rebuilt by the nodes" + (
            f" and the peer hubs {' '.join(self.handover.asked)}" if self.handover.asked else ""
        )

    def poll_timeout(self, now: float) -> int:
        """Milliseconds until the next timer: a heartbeat, an expiry, the end of the young
        state, a peer hub's answer due, trying the store again, a held old report's turn,
        or soon while a snapshot or replies wait for a peer to read (its queue empties as
        it does)."""
        # An expiry waits while the store fails (flush_ttl does nothing then).
        expiry = self.table.next_expiry() if self.admission.unavailable is None else None
        timers = [self.next_hugz, expiry or now + 3600]
        timers += [t for t in (self.rebuild.until, self.handover.next_deadline()) if t]
        timers += [t for t in (self.replication.next_deadline(), self.cut_off_at) if t]
        if self.admission.unavailable is not None:
            timers.append(self.store_retry)
        keepalive = self.notifier.wait(time.monotonic())
        if keepalive is not None:
            timers.append(now + keepalive)
        deadline = min(timers)
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
        if self.legacy.reports and self.legacy.reports.socket in ready:
            self.last_heard = time.time()
        self.legacy.handle(ready)
        if self.control and self.control.socket in ready:
            self.control.handle()
        for peer, sock in list(self.peer_sockets.items()):
            if sock in ready and self.peer_sockets.get(peer) is sock:  # not closed meanwhile
                self.handle_handover(peer, sock)
        for peer, sock in list(self.log_sockets.items()):
            if sock in ready:
                self.handle_peer_log(peer, sock)
        now = time.time()
        if self.cut_off_at is not None and now >= self.cut_off_at:
            self.cut_off_at = None
            self.reconnect_everyone()
        if now >= self.next_prune:
            self.next_prune = now + PRUNE_INTERVAL
            self.prune_decisions(now)
        if self.admission.unavailable is not None and now >= self.store_retry:
            self.retry_store(now)
        self.flush_ttl(now)
        if self.detection is not None and now >= self.next_forget:
            self.next_forget = now + FORGET_INTERVAL
            self.detection.expire(now)
            if self.detection.journal and self.admission.unavailable is None:
                self.commit()
        self.grow_up(self.rebuild.on_tick(now))
        if now >= self.next_hugz:
            self.send_hugz(now)
        if now >= self.next_tidy:
            self.next_tidy = now + TIDY_INTERVAL
            if not ready:  # nothing came in this pass: the hub is idle
                self.store.tidy()

    def handle_reports(self) -> None:
        """Take the waiting reports (see passes), then store, broadcast and answer them:
        the light peers' batch first, then the others'."""
        turn = passes.Pass()
        messages: list[tuple[bytes, list[bytes], str | None, str]] = []
        oversized = False
        for frames in drain(self.collector, passes.LIMIT, copy=False, max_frames=MAX_REPORT_FRAMES):
            oversized = oversized or len(frames) == MAX_REPORT_FRAMES
            peer, body = frames[0].bytes, [frame.bytes for frame in frames[1:]]
            last = frames[-1]  # the sender's key and address; the frames themselves go
            user_id = last.get("User-Id") if self.auth is not None else None
            messages.append((peer, body, user_id, last.get("Peer-Address") or ""))
            # A hello or an admin request takes a turn; a report counts its events (a
            # message refused whole counts one).
            one = protocol.is_hello(body) or protocol.is_admin(body)
            size = sum(map(len, body))
            if not turn.take(peer, 1 if one else len(body) - 2, size):
                break  # the rest waits for the next pass
        requests: list[tuple[bytes, list[bytes], str, str]] = []  # admin channel, after these
        for batch in turn.split([message[0] for message in messages]):
            if batch:
                self.take_reports([messages[index] for index in batch], requests)
        for peer, body, kind, name in requests:
            self.answer_peer([peer, *self.handle_admin(body, kind, name)])
        if oversized:
            release_memory()  # what libzmq held of a message too long to be a report

    def take_reports(
        self,
        messages: list[tuple[bytes, list[bytes], str | None, str]],
        requests: list[tuple[bytes, list[bytes], str, str]],
    ) -> None:
        """One batch of a pass: its reports into the table, committed in one transaction,
        then broadcast and answered; its admin requests added to `requests`."""
        replies: list[list[bytes]] = []
        updates: list[Update] = []
        now = time.time()
        for peer, body, user_id, address in messages:
            # Who the authenticator let in (None without keys): a node, an admin, a peer
            # hub, a key asking to join; `user` is what admission knows it by.
            kind, name = self.identify_user(user_id)
            if self.auth is None:
                user = None
            elif kind in ("node", "withdrawn"):
                user = name
            else:
                user = user_id  # an admin's or a hub's: admission refuses
            if kind == "pending":
                if protocol.is_hello(body):
                    # Answered at once or not at all: a stranger's reply never waits in
                    # the backlog the nodes' ACKs share.
                    send_or_drop(
                        self.collector, [peer, *self.handle_join(body, name, address, now)]
                    )
                continue  # a stranger hears nothing else, not even a NAK
            if protocol.is_admin(body):
                requests.append((peer, body, kind, name))
                continue
            if kind == "node":  # not a peer hub's pull, an operator or a stranger
                self.last_heard = now
            if protocol.is_hello(body):
                replies.append([peer, *self.handle_hello(body, user, address, now)])
                continue
            answers, changes = self.admission.handle_report(body, user, now)
            replies.extend([peer, *answer] for answer in answers)
            updates.extend(changes)
        self.finish_batch(replies, updates)

    def identify(self, frame: zmq.Frame) -> tuple[str, str]:
        """(kind, name) of a message's sender, see NodeAuthenticator.identify; without keys
        every peer is a node whose name is the one its events give."""
        return self.identify_user(frame.get("User-Id") if self.auth is not None else None)

    def identify_user(self, user_id: str | None) -> tuple[str, str]:
        """identify() of the User-Id a message's frame gave."""
        if self.auth is None:
            return "node", ""
        return self.auth.identify(user_id)

    def handle_hello(
        self, body: list[bytes], user: str | None, address: str, now: float
    ) -> list[bytes]:
        """A monitor asks for the state id (and may say it rebuilt this state): welcome."""
        try:
            rebuilt = protocol.decode_hello(body)
        except ProtocolError as error:
            self.refusals.warning(f"hello {user}", "refused a hello from %s: %s", user, error)
            return protocol.encode_replies([], [protocol.nak_body("", str(error))])[0]
        if user is not None and user in self.admission.authorized:
            self.roster.on_hello(user, protocol.hello_sender(body)[1], address, now)
        instance, authorized = self.table.instance, self.admission.authorized
        self.grow_up(self.rebuild.on_hello(user, rebuilt, instance, authorized))
        return protocol.encode_welcome(instance, self.table.sequence, self.rebuild.young)

    def handle_join(self, body: list[bytes], key: str, address: str, now: float) -> list[bytes]:
        """A hello from a key the hub does not accept: the node is listed as pending, and
        told so with its key's fingerprint, to compare with the one it printed."""
        try:
            node, version = protocol.hello_sender(body)
        except ProtocolError:
            node, version = None, None
        key_print = fingerprint(key)
        if self.roster.on_join(key, key_print, node, address, version, now):
            # A line per new key, at most one a minute per address: strangers can knock.
            self.refusals.warning(
                f"join {address}",
                "node %s asks to join from %s, key %s: `nodes accept %s` admits it",
                node or "(unnamed)",
                address or "?",
                key_print,
                node or f"NAME --fingerprint {key_print}",
            )
        return protocol.encode_pending(key_print)

    def handle_admin(self, body: list[bytes], kind: str, name: str) -> list[bytes]:
        """One request of the admin channel, answered once what it changed is stored."""
        try:
            request = protocol.decode_admin(body)
        except ProtocolError as error:
            return protocol.encode_error(str(error))
        if request.verb == "decisions" and (kind in ("hub", "admin") or self.auth is None):
            return protocol.encode_result(self.decisions_since(request.args.get("since", 0)))
        if self.auth is None:
            return protocol.encode_error("the admin channel needs keys: this hub runs insecure")
        if kind != "admin":
            return protocol.encode_error(
                "only an admin key (keys_dir/admins/ on the hub) may use the admin channel"
            )
        now = time.time()
        answered = self.desk.handle(request, name, self.view(), now)
        if answered.applied:
            if not self.commit():
                return protocol.encode_error(
                    f"the hub cannot store decisions now: {self.store_error}"
                )
            self.carry_out(answered.applied, now)
        return protocol.encode_result(answered.result)

    def view(self) -> HubView:
        nodes = {} if self.auth is None else {k.decode(): n for k, n in self.auth.nodes.items()}
        general = self.config.general
        return HubView(
            nodes=nodes,
            state=self.table.instance,
            sequence=self.table.sequence,
            last_report=dict(self.admission.last_report),
            jails=set(general.jail_map) | set(general.jail_map.values()),
            sync_jail=general.sync_jail,
            name=self.config.node,
            hub_key="" if self.auth is None else self.security.own.public.decode(),
            refusals={}
            if self.auth is None
            else {key.decode(): seen for key, seen in dict(self.auth.refused_lately).items()},
        )

    def decisions_since(self, since: int) -> dict:
        rows = self.store.decisions(since, PULL_ROWS + 1)
        return log_answer(self.table.instance, rows[:PULL_ROWS], len(rows) > PULL_ROWS)

    def carry_out(self, applied: list[tuple[Decision, Applied]], now: float) -> None:
        """What stored decisions do beyond the table: broadcast, push the holds, renew the
        allowlist, write and delete node keys; each logged."""
        updates = [update for _, done in applied for update in done.updates]
        self.broadcast(updates)
        for update in updates:
            log.log(NOTICE, "%s", update.event.describe())
        holds = allowlist = False
        for decision, done in applied:
            log.log(NOTICE, "%s: %s", decision.describe(), done.outcome)
            holds |= done.holds_changed
            allowlist |= done.allowlist_changed
            if done.accept is not None:
                self.write_node_key(*done.accept)
            if done.remove is not None:
                self.delete_node_key(done.remove, decision.key)
        if allowlist:
            self.admission.set_operated(self.operators.allowlist)
        detection = self.detection
        lifted = {key for _, done in applied for key in done.lifted}
        for jail, ip in lifted if detection is not None else ():
            keys = detection.table_keys(jail, ip) if detection.counts(jail) else []
            if keys and not any(key in self.table.bans for key in keys):
                detection.on_lifted(jail, ip, now)  # failures count again from now
        if holds:
            self.push_holds(now)
        if any(done.accept or done.remove for _, done in applied):
            self.reload_keys(answering=True)

    def write_node_key(self, node: str, key: str) -> None:
        if self.auth is None:
            return
        try:
            write_public(self.security.nodes_dir / f"{node}.key", key)
        except OSError as error:
            log.error("cannot write the key of node %s: %s", node, error)
            return
        self.roster.accepted(node, key)

    def delete_node_key(self, node: str, key: str | None) -> None:
        if self.auth is None:
            return
        path = self.security.nodes_dir / f"{node}.key"
        if key is not None and self.auth.nodes.get(key.encode()) == node:
            try:
                path.unlink(missing_ok=True)  # hubs sharing keys_dir: the first one did it
            except OSError as error:
                log.error("cannot delete %s: %s", path, error)
        self.auth.removed = frozenset(k.encode() for k in self.operators.removed)
        self.roster.removed(node, [key] if key else [])

    def prune_decisions(self, now: float) -> None:
        try:
            pruned = self.store.prune_decisions(now)
        except sqlite3.Error as error:
            log.warning("cannot prune the decisions in %s: %s", self.store.path, error)
            return
        if pruned:
            log.info("forgot %d decisions that stopped mattering a month ago", pruned)

    def finish_batch(
        self,
        replies: list[list[bytes]],
        updates: list[Update],
        note: str = "",
    ) -> bool:
        """Commit a drained batch, then broadcast what changed and ACK it: ACK means stored.
        A batch that can't be stored is not in the table either: its events are refused
        for now, and their monitors send them again. False then."""
        stored = self.commit()
        if not stored:
            replies = [self.retry_later(reply) for reply in replies]
            updates = []
        # The nodes wait for the broadcast, a monitor's ACK only frees its outbox; the log
        # lines come last, as nobody waits for them.
        self.broadcast(updates)
        for reply in replies:
            self.answer_peer(reply)
        # Logged only now that it is stored: a crash can't leave a ban in the log twice.
        lines = []
        for update in updates:
            if update.note is None:
                lines.append(update.event.describe() + note)
            elif update.note:  # the cluster's own ban, in its own words
                lines.append(update.note)
            else:  # the unban that makes room for it in the stream
                log.debug("%s: the cluster's ban takes its place", update.event.describe())
        log_lines(log, NOTICE, lines)
        return stored

    def answer_peer(self, reply: list[bytes]) -> None:
        """A reply to a report peer, never blocking: kept while its queue is full (in order
        behind what waits for it already)."""
        backlog = self.replies
        if reply[0] in backlog.peers or not send_or_drop(self.collector, reply):
            backlog.keep(reply)

    def commit(self) -> bool:
        """Store the table's changes; False when the store failed, and then the table is
        what the store holds (the changes are undone) and reports get retry NAKs for a
        while. Logged when it starts failing and when it works again, not for each batch."""
        detection = self.detection
        also = None
        if detection is not None and detection.journal:
            journal = detection.journal
            also = functools.partial(self.detection_store.write, journal)
        try:
            wrote = self.store.commit(self.table, also)
        except sqlite3.Error as error:
            self.store_failed(error)
            # The table has no undo: take it back as the store has it, the counts too.
            self.table = self.admission.table = self.load_table()
            self.operators = self.load_operators()
            self.desk = Desk(self.table, self.operators, self.roster)
            self.detection = self.admission.detection = self.load_detection()
            return False
        if also is not None:
            journal.clear()
        if wrote:  # a batch with nothing to write says nothing of the store
            self.store_works()
        return True

    def store_failed(self, error: sqlite3.Error) -> None:
        """Reports get retry NAKs until a write works again, tried every STORE_RETRY s."""
        if self.store_error is None:
            log.error(
                "cannot write the ban table %s: %s; reports get retry NAKs (their "
                "monitors keep them) until it can, trying every %g s",
                self.store.path,
                error,
                STORE_RETRY,
            )
        self.store_error = str(error)
        self.admission.unavailable = f"the hub cannot store events now: {error}"
        self.store_retry = time.time() + STORE_RETRY

    def store_works(self) -> None:
        if self.store_error is not None:
            log.log(NOTICE, "the ban table %s can be written again", self.store.path)
            self.store_error = None
        self.admission.unavailable = None

    def retry_store(self, now: float) -> None:
        """Reports are taken again once a write of the store's own works (if a batch
        tried instead, each failure would cost a reload of the table). The problem ends
        only when a batch is stored: a small write may fit where a batch does not."""
        try:
            self.store.probe(now)
        except sqlite3.Error as error:
            self.store_failed(error)
            return
        self.admission.unavailable = None

    def retry_later(self, reply: list[bytes]) -> list[bytes]:
        """A reply to a batch that was not stored: its ACKs become retry NAKs (refusals
        stay)."""
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
            sock = self.security.dealer(self.context, peer, protocol.MAX_NODE_FRAME)
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

    def reload(self) -> dict:
        """SIGHUP or `publisher reload`: the configuration and node keys read again."""
        try:
            self.config, reloaded = reread(self.config, "publisher", LIVE_KEYS, log)
        except ConfigError as error:
            return {"failed": str(error)}
        settings = self.config.publisher
        self.heartbeat_interval = settings.heartbeat_interval
        self.unbelieved.clear()  # a relay still not named is logged again
        self.admission.set_allowlist(settings.allowlist)
        self.operators.set_configured(settings.allowlist.networks)
        self.admission.set_operated(self.operators.allowlist)
        # The hubs' names resolved again (a blocking look-up: here only, not per decision).
        self.hub_addresses = resolve(hub_hosts(self.config))
        self.learn_addresses()
        self.table.allow_foreign_unban = settings.allow_foreign_unban
        if self.auth is not None:
            self.reload_keys()
            reloaded.keys = f"{len(self.auth.names)} node keys accepted"
        else:
            reloaded.keys = "none (insecure = true)"
        log.log(NOTICE, "reloaded %s: %s", self.config.path, reloaded.describe())
        return reloaded.as_dict()

    def reload_keys(self, answering: bool = False) -> None:
        """SIGHUP, or an operator accepted or removed a node: read nodes/ again; if a key went
        away (or a node's key was replaced), cut every connection so it can't stay; once the
        answer has left when `answering` an operator. A replaced key counts: its name is
        accepted still, but a connection made with the old key must not outlive it (the
        User-Id names the node, not the key)."""
        self.learn_addresses()
        if self.auth is None:
            log.info("SIGHUP: insecure mode, no keys to reload")
            return
        before = dict(self.auth.nodes)
        count = self.auth.reload()
        self.admission.authorized = frozenset(self.auth.names)
        gone = sorted({name for key, name in before.items() if self.auth.nodes.get(key) != name})
        log.log(NOTICE, "reloaded node keys: %d accepted", count)
        if gone and answering:
            self.cut_off_at = time.time() + CUT_OFF_DELAY
            log.log(NOTICE, "keys withdrawn for %s: reconnecting everyone", ", ".join(gone))
        elif gone:
            self.reconnect_everyone()
            log.log(NOTICE, "keys withdrawn for %s: reconnecting everyone", ", ".join(gone))

    def reconnect_everyone(self) -> None:
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
        """Take the snapshot requests waiting, each to wait its turn in the snapshot queue,
        and the subscribers' presence."""
        now = time.time()
        oversized = False
        for frames in drain(self.snapshots, 100, copy=False, max_frames=MAX_REQUEST_FRAMES):
            oversized = oversized or len(frames) == MAX_REQUEST_FRAMES
            peer, body = frames[0].bytes, [frame.bytes for frame in frames[1:]]
            if protocol.is_presence(body):
                self.handle_presence(peer, body, frames[-1], now)
                continue
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
        queue.start(self.table, now, self.rebuild.young)
        for peer in list(queue.sending):
            while peer in queue.sending:
                try:
                    if not try_send_frames(self.snapshots, [peer, *queue.next_part(peer)]):
                        break  # its queue is full: the rest when it has read some
                except zmq.ZMQError:  # EHOSTUNREACH: the peer is gone
                    queue.gone(peer)
                    break
                queue.sent(peer)

    def handle_presence(self, peer: bytes, body: list[bytes], last: zmq.Frame, now: float) -> None:
        """A subscriber says where it stands; it gets the holds if it lacks this hub's."""
        kind, node = self.identify(last)
        try:
            presence = protocol.decode_presence(body)
        except ProtocolError as error:
            self.refusals.warning("presence", "refused a presence from %s: %s", node, error)
            return
        if kind != "node" or not node:
            return
        if presence.node is not None:
            self.take_relayed(node, presence, now)
            return
        self.roster.on_presence(node, presence, last.get("Peer-Address") or "", peer, now)
        holds = self.operators.holds
        if presence.holds != holds.digest(now):
            # Not waited for: a full queue misses these, and the next presence asks again.
            send_or_drop(self.snapshots, [peer, *protocol.encode_holds(holds.current(now))])

    def take_relayed(self, relay: str, presence: Presence, now: float) -> None:
        """A relay's word for a node behind it, as Roster.on_relayed judges it; a relay the
        configuration does not name is logged once (until a reload)."""
        relays = self.config.publisher.relays
        if self.roster.on_relayed(relay, presence, relays, self.admission.authorized, now):
            return
        if relay not in self.unbelieved:  # names of accepted keys only: a bounded set
            self.unbelieved.add(relay)
            log.warning(
                "ignoring where %s says the nodes behind it stand: name it in [publisher] "
                "relays to list them through it",
                relay,
            )

    def push_holds(self, now: float) -> None:
        """Every subscriber heard lately gets the holds at once: an address its node's own
        jail banned is lifted there within a second of the unban."""
        message = protocol.encode_holds(self.operators.holds.current(now))
        for _, peer in self.roster.subscribers(now):
            send_or_drop(self.snapshots, [peer, *message])

    def read_peer_logs(self, now: float) -> None:
        """Ask each peer hub for the decisions it logged past the last one we have."""
        for peer, since, afresh in self.replication.to_ask(now):
            sock = self.log_sockets.get(peer)
            if sock is None or afresh:
                if sock is not None:
                    self.poller.unregister(sock)
                    sock.close(linger=0)
                sock = self.security.dealer(self.context, peer, protocol.MAX_NODE_FRAME)
                self.log_sockets[peer] = sock
                self.poller.register(sock, zmq.POLLIN)
            try_send_frames(sock, protocol.encode_admin("decisions", since=since))

    def handle_peer_log(self, peer: str, sock: zmq.Socket) -> None:
        """A peer's decisions: applied as ours, stored with where we stand in its log."""
        now = time.time()
        for frames in drain(sock, 10, max_frames=4):
            try:
                result = protocol.decode_result(frames)
            except ProtocolError as error:
                self.refusals.warning("peer log", "ignored an answer of %s: %s", peer, error)
                continue
            pulled = self.replication.on_answer(peer, result, now)
            if pulled is None:
                if peer not in self.replication.cursors:  # our own address
                    self.poller.unregister(sock)
                    sock.close(linger=0)
                    del self.log_sockets[peer]
                    return
                continue
            applied = [(d, self.operators.apply(d, now)) for d in pulled.decisions]
            self.table.journal.append(("meta", f"peer {peer}", pulled.cursor.to_text()))
            if not self.commit():  # read again from where the store stands
                stored = Cursor.from_text(self.store.meta(f"peer {peer}"))
                self.replication.cursors[peer] = stored
                return
            self.carry_out([(d, done) for d, done in applied if done.outcome != "known"], now)

    def status(self) -> dict:
        counters, nodes = self.admission.counters, self.admission.last_report
        per_jail: dict[str, int] = {}
        for jail, _ in self.table.bans:
            per_jail[jail] = per_jail.get(jail, 0) + 1
        now = time.time()
        descriptors = open_descriptors()
        space = disk_space(os.path.dirname(self.store.path))
        refused = self.refused_keys()
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
            "Last heard from a node": None
            if self.last_heard is None
            else f"{now - self.last_heard:.1f} s ago",
            "Reports received": counters["reports"],
            "Events accepted": counters["accepted"],
            "Events refused": counters["refused"],
            "Duplicates dropped": counters["duplicates"],
            "Updates broadcast": self.broadcasts,
            "Unknown keys refused": refused.total if refused else 0,
            "File descriptors": f"{descriptors.used} of {descriptors.limit or 'unlimited'}",
            "Operators' holds": len(self.operators.holds.current(now)),
            "Nodes asking to join": len(self.roster.pending),
            **self.detection_status(),
            "problems": self.problems(now, descriptors, space),
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
                "keys_refused": counter(
                    "handshakes refused for an unknown key", refused.total if refused else 0
                ),
                "seconds_since_node_heard": gauge(
                    "seconds since a node's monitor was last heard (since start: none yet)",
                    now - (self.last_heard or self.started),
                ),
                "open_fds": gauge("open file descriptors", descriptors.used),
                "max_fds": gauge("file descriptor limit (0: none)", descriptors.limit),
                "state_free_bytes": gauge(
                    "free bytes of the ban table's file system", space.free if space else 0
                ),
                "accept_delay_seconds": histogram(
                    "origin's Ban line -> stored by the hub", self.admission.accept_delays
                ),
                **self.detection_metrics(),
            },
        }

    def detection_status(self) -> dict:
        if self.detection is None:
            return {}
        counted = self.detection.status()
        return {
            "Cluster jails": ", ".join(sorted(self.detection.jails)),
            "Failure reports received": counted["reports"],
            "Failures counted": counted["failures"],
            "Addresses watched": counted["watched"],
            "Cluster detections": counted["detections"],
            "Escalations": counted["escalations"],
            "Ban histories": counted["history"],
        }

    def detection_metrics(self) -> dict:
        if self.detection is None:
            return {}
        counted = self.detection.status()
        return {
            "failure_reports": counter("failure reports taken", counted["reports"]),
            "failures_counted": counter("failures counted in a cluster jail", counted["failures"]),
            "addresses_watched": gauge(
                "addresses with failures within findtime", counted["watched"]
            ),
            "cluster_detections": counter(
                "bans decided by cluster-wide failure counts", counted["detections"]
            ),
            "escalations": counter(
                "node bans lengthened by their address's ban history", counted["escalations"]
            ),
            "ban_histories": gauge("addresses with a ban history", counted["history"]),
        }

    def refused_keys(self) -> RefusedKeys | None:
        return self.auth.refused if self.auth is not None else None

    def problems(self, now: float, descriptors: Descriptors, space: DiskSpace | None) -> list[str]:
        found = []
        if self.store_error is not None:
            waiting = self.admission.unavailable is not None
            found.append(
                f"cannot write the ban table {self.store.path}: {self.store_error}; "
                + ("reports get retry NAKs until it can" if waiting else "trying again")
            )
        refused = self.refused_keys()
        silence = self.config.publisher.node_silence
        found += [
            silence_problem(self.last_heard, self.started, now, silence),
            descriptors_problem(descriptors),
            disk_problem("storing reports", os.path.dirname(self.store.path), space),
            refused.problem(now) if refused else None,
        ]
        return [problem for problem in found if problem] + log_problems()

    def close(self) -> None:
        self.notifier.stopping()
        self.commit()
        self.store.close()
        peers = [*self.peer_sockets.values(), *self.log_sockets.values()]
        for sock in (self.collector, self.broadcaster, self.snapshots, *peers):
            sock.close()
        if self.control:
            self.control.close()
        self.legacy.close()
        if self.auth is not None:
            self.auth.stop()  # its ZAP socket would keep the context from terminating
        self.context.term()
        self.wakeup.close()
        self.notifier.close()
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
    domain: str = "",
) -> zmq.Socket:
    """A bound hub socket; `patience` seconds of retries while a closed one frees its port."""
    sock = context.socket(kind)
    sock.linger = 1000
    # A connection that has not finished its handshake by then is dropped: a stranger's
    # idle connections hold descriptors for 10 s, not libzmq's default 30.
    sock.handshake_ivl = HANDSHAKE_IVL
    sock.backlog = LISTEN_BACKLOG
    security.server(sock, domain)
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
