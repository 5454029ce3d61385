"""The node side: follow the hub's updates and keep the local sync jail equal to the cluster.

`desired_bans` and `wants_address` are pure; `Subscriber` is one poll loop over one
SUB socket (`updates`) and one DEALER (`snapshots`) per hub, plus fail2ban's socket.
Each hub's stream rules (catching up from a snapshot at start, after a gap in sequence
numbers, and after the hub's heartbeats stopped) live in its `sync.HubSync` core; this
module carries out what the core decides and reconciles the jail with what the cluster bans.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path

import zmq

from . import protocol
from .addresses import Allowlist
from .config import Config
from .control import ControlSocket
from .fail2ban_client import Fail2banClient, Fail2banError
from .keys import Security
from .metrics import DelayHistogram, counter, gauge, histogram
from .protocol import BanEvent, ProtocolError
from .runtime import (
    NOTICE,
    RateLimitedLog,
    StopSignals,
    Wakeup,
    batched_logging,
    clock,
    drain,
)
from .sync import (
    SNAPSHOT_TIMEOUT,
    ClusterView,
    Gap,
    HubSync,
    NewState,
    Notice,
    Outcome,
    OutOfStep,
    Silent,
    SnapshotLate,
    SnapshotTaken,
)

log = logging.getLogger("f2bzmq.subscriber")

RETRY_INTERVAL = 2.0  # fail2ban unreachable: try again this often
MAX_TRACKED = 100000  # origin times kept for the delay histogram while fail2ban is away
COMMAND_SECONDS = 0.25  # about how long one banip/unbanip command may keep fail2ban busy
FIRST_BATCH = 50  # addresses of a jail's first command, before anything was measured
BATCH_GROWTH = 4  # a command carries at most this many times the addresses of the last


class BatchSizer:
    """Addresses per banip/unbanip command of each jail: as many as fail2ban ran in about
    COMMAND_SECONDS in that jail's last commands, at most ``limit``.

    fail2ban answers one command at a time and runs the jail's action for each address
    before it answers: stock shell actions cost it ~10 ms an address, a set action or
    none a tenth of a millisecond. A fixed size either blocks fail2ban (and its 10-s
    client timeout) for seconds with the first or wastes round trips with the second.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.last: dict[str, int] = {}  # jail -> addresses of its last command
        self.per_address: dict[str, float] = {}  # jail -> seconds an address, smoothed

    def size(self, jail: str) -> int:
        last = self.last.get(jail)
        if last is None:
            return min(self.limit, FIRST_BATCH)
        fits = int(COMMAND_SECONDS / max(self.per_address[jail], 1e-6))
        return max(1, min(self.limit, last * BATCH_GROWTH, fits))

    def reset(self) -> None:
        """Measure again from FIRST_BATCH: after a failed command (a timeout, or fail2ban
        restarted, maybe with slower actions) the old figures no longer hold."""
        self.last.clear()
        self.per_address.clear()

    def observe(self, jail: str, count: int, seconds: float) -> None:
        """A command of ``count`` addresses took ``seconds``."""
        cost = seconds / count
        old = self.per_address.get(jail)
        self.per_address[jail] = cost if old is None else (old + cost) / 2
        self.last[jail] = count


class LocalPolicy:
    """This node's rules: which jail a cluster ban goes to, and what it never bans."""

    def __init__(self, node: str, sync_jail: str, jail_map: dict[str, str], allowlist) -> None:
        self.node = node
        self.sync_jail = sync_jail
        self.jail_map = jail_map
        self.allowlist = Allowlist(allowlist)

    def local_jail(self, cluster_jail: str) -> str:
        return self.jail_map.get(cluster_jail, self.sync_jail)

    def allowed(self, ip: str) -> bool:
        """True when the allowlist covers the address or overlaps the network."""
        return self.allowlist.covers(ip)

    def wants(self, event: BanEvent) -> bool:
        """A cluster ban this node applies: not its own report and not allowlisted."""
        return event.node != self.node and not self.allowed(event.ip)

    def local_jails(self) -> set[str]:
        return {self.sync_jail, *self.jail_map.values()}


def desired_bans(views: Iterable[ClusterView], policy: LocalPolicy) -> dict[str, set[str]]:
    """Local jail -> addresses it must ban, from every hub's view."""
    wanted: dict[str, set[str]] = {jail: set() for jail in policy.local_jails()}
    for view in views:
        for event in view.bans.values():
            if policy.wants(event):
                wanted[policy.local_jail(event.jail)].add(event.ip)
    return wanted


def wants_address(
    views: Iterable[ClusterView], policy: LocalPolicy, local_jail: str, ip: str
) -> bool:
    """desired_bans for one address: O(hubs × its jails), not O(every ban)."""
    for view in views:
        for jail in view.jails_of.get(ip, ()):
            if policy.local_jail(jail) == local_jail and policy.wants(view.bans[(jail, ip)]):
                return True
    return False


class HubLink:
    """The sockets to one hub, and the core that follows its update stream."""

    def __init__(
        self, context: zmq.Context, publish: str, snapshot: str, security: Security, sync: HubSync
    ) -> None:
        self.security = security
        self.publish_endpoint = publish
        self.snapshot_endpoint = snapshot
        self.context = context
        self.sync = sync
        self.updates = self._updates_socket()
        self.snapshots = self._snapshot_socket()

    def _updates_socket(self) -> zmq.Socket:
        sock = self.context.socket(zmq.SUB)
        self.security.client(sock)
        sock.maxmsgsize = protocol.MAX_NODE_FRAME
        sock.rcvhwm = 1_000_000
        sock.linger = 0
        sock.setsockopt(zmq.SUBSCRIBE, protocol.PACKED)
        sock.connect(self.publish_endpoint)
        return sock

    def _snapshot_socket(self) -> zmq.Socket:
        sock = self.context.socket(zmq.DEALER)
        self.security.client(sock)
        sock.maxmsgsize = protocol.MAX_NODE_FRAME
        sock.linger = 0
        sock.connect(self.snapshot_endpoint)
        return sock

    def sockets(self) -> tuple[zmq.Socket, zmq.Socket]:
        return self.updates, self.snapshots

    def execute(self, outcome: Outcome) -> None:
        """The core's socket actions: a fresh SUB, a fresh DEALER, a snapshot request."""
        if outcome.reconnect_updates:
            self.updates.close()
            self.updates = self._updates_socket()
        if outcome.ask_snapshot:
            if outcome.renew_snapshot_socket:
                self.snapshots.close()
                self.snapshots = self._snapshot_socket()
            self.snapshots.send_multipart(protocol.encode_snapshot_request())

    def close(self) -> None:
        self.updates.close()
        self.snapshots.close()


class Subscriber:
    """The node's reactor: hub updates in, fail2ban banip/unbanip out."""

    def __init__(self, config: Config, control_path: Path | None = None) -> None:
        self.config = config
        self.policy = LocalPolicy(
            config.node,
            config.general.sync_jail,
            config.general.jail_map,
            config.subscriber.allowlist,
        )
        self.batches = BatchSizer(config.subscriber.batch_size)
        self.networks = config.network_limits()
        self.heartbeat_timeout = config.subscriber.heartbeat_timeout
        self.fail2ban = Fail2banClient(
            config.general.fail2ban_socket,
            client_program=config.general.fail2ban_client,
        )
        self.refusals = RateLimitedLog(log)
        security = Security.for_role(config, "subscriber")
        self.context = zmq.Context()
        now = time.monotonic()
        self.links = [
            HubLink(self.context, publish, snapshot, security, HubSync(self.heartbeat_timeout, now))
            for publish, snapshot in zip(
                config.endpoints("publish_port"), config.endpoints("snapshot_port")
            )
        ]
        self.applied: dict[str, set[str]] | None = None  # what fail2ban has; None = unknown
        self.pending = False  # the jails may differ from the cluster: reconcile
        # (cluster jail, address) changed by updates since the last reconcile; None after a
        # snapshot, a hub lost or an error: then compare everything.
        self.touched: set[tuple[str, str]] | None = None
        self.next_retry = 0.0
        self.resync_interval = config.subscriber.resync_interval
        self.next_resync = time.monotonic() + self.resync_interval
        self.fail2ban_ok = False  # the last call to fail2ban succeeded
        self.fail2ban_error: str | None = None  # why the last call failed, until one succeeds
        self.counters = {"banned": 0, "unbanned": 0, "refused": 0}
        self.origin_times: dict[str, float] = {}  # ip -> its update's origin time, until applied
        self.apply_delays = DelayHistogram()  # the origin's Ban line -> fail2ban's banip returned
        self.started = time.monotonic()
        self.control = control_path and ControlSocket(self.context, control_path, self.status)
        self.wakeup = Wakeup()
        self.signals = StopSignals(self.wakeup)

    def run(self) -> None:
        log.log(
            NOTICE,
            "subscriber %s started: hubs %s, sync jail %s",
            self.config.node,
            " ".join(link.publish_endpoint for link in self.links),
            self.policy.sync_jail,
        )
        poller = zmq.Poller()
        poller.register(self.wakeup.read_fd, zmq.POLLIN)
        if self.control:
            poller.register(self.control.socket, zmq.POLLIN)
        for link in self.links:
            poller.register(link.updates, zmq.POLLIN)
            poller.register(link.snapshots, zmq.POLLIN)
            self.follow(link, link.sync.start(time.monotonic()))
        while not self.signals.stopping:
            ready = dict(poller.poll(self._timeout_ms()))
            if self.wakeup.read_fd in ready:
                self.wakeup.drain()
            if self.control and self.control.socket in ready:
                self.control.handle()
            now = time.monotonic()
            for link in self.links:
                before = link.sockets()
                if link.updates in ready:
                    self.handle_updates(link, now)
                if link.snapshots in ready:
                    self.handle_snapshot(link, now)
                self.follow(link, link.sync.on_tick(now))
                for old, new in zip(before, link.sockets()):
                    if new is not old:
                        poller.unregister(old)
                        poller.register(new, zmq.POLLIN)
            if now >= self.next_resync:
                # fail2ban may have lost or expired bans behind our back (a restart
                # without its database, the sync jail's own bantime): read it again.
                self.next_resync = now + self.resync_interval
                self.applied = None
                self.touched = None
                self.pending = True
            if self.pending and now >= self.next_retry:
                self.reconcile()
        self.close()

    def _timeout_ms(self) -> int:
        if self.pending:
            return max(1, int((self.next_retry - time.monotonic()) * 1000))
        return int(min(self.heartbeat_timeout / 2, 1.0) * 1000)

    def handle_updates(self, link: HubLink, now: float) -> None:
        """Take every waiting message, each whole or not at all."""
        for frames in drain(link.updates, 10000, max_frames=5):  # an update has 4
            try:
                message = protocol.decode_stream(frames, self.networks)
            except ProtocolError as error:
                self.counters["refused"] += 1
                self.refusals.warning("update", "ignored a message from the hub: %s", error)
                continue
            if message.heartbeat:
                outcome = link.sync.on_heartbeat(message.publisher, message.seq, now)
            else:
                outcome = link.sync.on_update(message.publisher, message.seq, message.events, now)
            self.follow(link, outcome)

    def handle_snapshot(self, link: HubLink, now: float) -> None:
        for frames in drain(link.snapshots, 1000, max_frames=5):  # a part has 4
            try:
                # (One shared configuration keeps the hub's and the nodes' network limits
                # the same.)
                part = protocol.decode_snapshot_part(frames, self.networks)
            except ProtocolError as error:
                self.counters["refused"] += 1
                self.refusals.warning("snapshot", "ignored a snapshot part: %s", error)
                continue
            self.follow(link, link.sync.on_snapshot_part(part, now))

    def follow(self, link: HubLink, outcome: Outcome) -> None:
        """Do what the hub's core decided: tell the jails, log, move the sockets."""
        for sequence, event in outcome.applied:
            log.debug("update %d: %s", sequence, event.describe())
            if self.touched is not None:
                self.touched.add((event.jail, event.ip))
            if event.action == protocol.BAN and len(self.origin_times) < MAX_TRACKED:
                self.origin_times.setdefault(event.ip, event.time)
            self.pending = True
        if outcome.replaced or outcome.left_out:
            self.touched = None  # compare every ban
        if outcome.replaced:
            self.pending = True
        for notice in outcome.notices:
            log_notice(notice, link, self.refusals)
        link.execute(outcome)

    def reconcile(self) -> None:
        """Make each local jail hold exactly what the cluster bans, in bounded batches."""
        synced = [link.sync.view for link in self.links if link.sync.synced]
        if not synced:
            # Knowing nothing of the cluster is no reason to lift what the jail holds.
            self.pending = False
            return
        try:
            if self.applied is None:
                self.applied = {
                    jail: set(self.fail2ban.banned(jail)) for jail in self.policy.local_jails()
                }
                self.touched = None
            for jail, (add, remove) in self.plan(synced).items():
                self._apply(jail, add, ban=True)
                self._apply(jail, remove, ban=False)
        except (Fail2banError, OSError) as error:
            if self.fail2ban_error is None:
                log.error("fail2ban is not reachable: %s; retrying", error)
            self.fail2ban_ok = False
            self.fail2ban_error = str(error)
            self.applied = None  # fail2ban may have restarted: read its jails again
            self.batches.reset()
            self.next_retry = time.monotonic() + RETRY_INTERVAL
            return
        if not self.fail2ban_ok:
            log.info("fail2ban is reachable at %s", self.config.general.fail2ban_socket)
        self.fail2ban_ok = True
        self.fail2ban_error = None
        self.pending = False
        self.touched = set()
        self.origin_times.clear()

    def plan(self, synced: list[ClusterView]) -> dict[str, tuple[list[str], list[str]]]:
        """Local jail -> (addresses to ban, to unban): every ban after a snapshot or an
        error, else only the addresses updates touched, so one update costs O(1) and
        not O(every ban in the cluster)."""
        if self.touched is None:
            wanted = desired_bans(synced, self.policy)
            return {
                jail: (sorted(addresses - have), sorted(have - addresses))
                for jail, addresses in wanted.items()
                for have in (self.applied[jail],)
            }
        plan: dict[str, tuple[list[str], list[str]]] = {}
        local = {(self.policy.local_jail(cluster_jail), ip) for cluster_jail, ip in self.touched}
        for jail, ip in sorted(local):
            want = wants_address(synced, self.policy, jail, ip)
            if want != (ip in self.applied[jail]):
                plan.setdefault(jail, ([], []))[0 if want else 1].append(ip)
        return plan

    def _apply(self, jail: str, addresses: list[str], ban: bool) -> None:
        start = 0
        while start < len(addresses):
            batch = addresses[start : start + self.batches.size(jail)]
            start += len(batch)
            began = time.monotonic()
            (self.fail2ban.ban if ban else self.fail2ban.unban)(jail, batch)
            self.batches.observe(jail, len(batch), time.monotonic() - began)
            if ban:
                self.applied[jail].update(batch)
                self.counters["banned"] += len(batch)
                now = time.time()
                for ip in batch:
                    origin = self.origin_times.pop(ip, None)
                    if origin is not None:
                        self.apply_delays.observe(now - origin)
            else:
                self.applied[jail].difference_update(batch)
                self.counters["unbanned"] += len(batch)
            verb = "Ban" if ban else "Unban"
            with batched_logging():  # a line per address, written at once
                for ip in batch:
                    log.log(NOTICE, "[%s] %s %s", jail, verb, ip)

    def status(self) -> dict:
        now = time.monotonic()
        in_jails = {jail: len(ips) for jail, ips in (self.applied or {}).items()}
        snapshots = sum(link.sync.snapshots_received for link in self.links)
        return {
            "role": "subscriber",
            "node": self.config.node,
            "fail2ban": "reachable" if self.fail2ban_ok else "NOT reachable (yet)",
            "Banned in local jails": in_jails,
            "Bans applied": self.counters["banned"],
            "Unbans applied": self.counters["unbanned"],
            "Snapshots received": snapshots,
            "Messages refused": self.counters["refused"],
            "Hubs": {
                link.publish_endpoint: {
                    "synced": link.sync.synced,
                    "sequence": link.sync.sequence,
                    "cluster bans": len(link.sync.view.bans),
                    "last heard": f"{now - link.sync.heard:.1f} s ago",
                    "last snapshot": clock(_epoch(link.sync.last_snapshot, now)),
                }
                for link in self.links
            },
            "problems": self.problems(now),
            "metrics": {
                "bans_applied": counter("banip calls made", self.counters["banned"]),
                "unbans_applied": counter("unbanip calls made", self.counters["unbanned"]),
                "snapshots": counter("snapshots received", snapshots),
                "messages_refused": counter("hub messages refused", self.counters["refused"]),
                "local_bans": gauge("addresses in the local jails", in_jails, "jail"),
                "fail2ban_up": gauge("1 when fail2ban answered", int(self.fail2ban_ok)),
                "hub_synced": gauge(
                    "1 when the hub's view is current",
                    {link.publish_endpoint: int(link.sync.synced) for link in self.links},
                    "hub",
                ),
                "hub_sequence": gauge(
                    "last sequence applied",
                    {link.publish_endpoint: link.sync.sequence for link in self.links},
                    "hub",
                ),
                "apply_delay_seconds": histogram(
                    "origin's Ban line -> banned in the local fail2ban", self.apply_delays
                ),
            },
        }

    def problems(self, now: float) -> list[str]:
        """What makes the subscriber unhealthy: fail2ban away, or no hub to follow."""
        found = []
        if self.fail2ban_error is not None:
            found.append(f"fail2ban is not reachable: {self.fail2ban_error}")
        starting = now - self.started < self.heartbeat_timeout + SNAPSHOT_TIMEOUT
        if not starting and not any(link.sync.synced for link in self.links):
            found.append("no hub is synced: cluster bans are not being applied")
        return found

    def close(self) -> None:
        for link in self.links:
            link.close()
        if self.control:
            self.control.close()
        self.context.term()
        self.fail2ban.close()
        self.wakeup.close()
        log.log(NOTICE, "subscriber %s stopped", self.config.node)


# Said after "no heartbeat from …" when the hub's snapshots come but its update stream never did.
OLD_HUB_HINT = (
    " (its snapshots come, its packed update stream never did: a hub older"
    " than this node, so upgrade hubs first, or its publish port blocked?)"
)


def log_notice(notice: Notice, link: HubLink, refusals: RateLimitedLog) -> None:
    """Log a notice of a hub's core in the words operators grep for."""
    hub = link.publish_endpoint
    if isinstance(notice, NewState):
        log.info("hub %s has new state %s: resync", hub, notice.state_id[:8])
    elif isinstance(notice, Gap):
        refusals.warning(
            f"gap {hub}",
            "missed updates from %s (%d to %d): resync",
            hub,
            notice.first,
            notice.last,
        )
    elif isinstance(notice, OutOfStep):
        refusals.warning(
            f"gap {hub}",
            "missed updates from %s (at %d, hub at %d): resync",
            hub,
            notice.at,
            notice.hub_at,
        )
    elif isinstance(notice, SnapshotTaken):
        log.info(
            "snapshot from %s: %d bans at sequence %d",
            link.snapshot_endpoint,
            notice.bans,
            notice.sequence,
        )
    elif isinstance(notice, SnapshotLate):
        log.warning("no snapshot from %s yet: asking again", link.snapshot_endpoint)
    elif isinstance(notice, Silent):
        refusals.warning(
            f"silent {hub}",
            "no heartbeat from %s for %.0f s%s: resync when it is back",
            hub,
            notice.seconds,
            OLD_HUB_HINT if notice.stream_never_came else "",
        )


def _epoch(moment: float | None, now: float) -> float | None:
    """A time.monotonic() moment as a unix time, for people to read."""
    return None if moment is None else time.time() - (now - moment)
