"""The node's reactor: follow every hub's update stream and keep the local jails equal to
what the cluster bans.

`Subscriber` is one poll loop over one SUB socket (`updates`) and one DEALER
(`snapshots`) per hub, plus fail2ban's socket. Each hub's stream rules live in its
`sync.HubSync` core, what the jails must hold and the applying in `jails.LocalJails`:
this module moves bytes between them and logs what they report.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import zmq

from . import protocol
from .config import Config
from .control import ControlSocket
from .fail2ban_client import Fail2banClient
from .jails import LocalJails, LocalPolicy
from .keys import Security
from .metrics import counter, gauge, histogram
from .protocol import ProtocolError
from .runtime import NOTICE, RateLimitedLog, StopSignals, Wakeup, clock, drain, log_problems
from .sync import (
    SNAPSHOT_TIMEOUT,
    Gap,
    HubSync,
    NewState,
    Notice,
    Outcome,
    OutOfStep,
    Rebuilt,
    Silent,
    SnapshotLate,
    SnapshotTaken,
    Young,
)

log = logging.getLogger("f2bzmq.subscriber")


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
        policy = LocalPolicy(
            config.node,
            config.general.sync_jail,
            config.general.jail_map,
            config.subscriber.allowlist,
        )
        fail2ban = Fail2banClient(
            config.general.fail2ban_socket, client_program=config.general.fail2ban_client
        )
        self.jails = LocalJails(policy, fail2ban, config.subscriber.batch_size)
        self.networks = config.network_limits()
        self.heartbeat_timeout = config.subscriber.heartbeat_timeout
        self.refusals = RateLimitedLog(log)
        self.refused = 0  # hub messages that failed to decode
        # The hubs, or the relays this node follows instead ([subscriber] follow).
        security = Security.for_role(config, "subscriber", config.subscriber.follow_key)
        followed = config.followed()
        self.context = zmq.Context()
        now = time.monotonic()
        self.links = [
            HubLink(self.context, publish, snapshot, security, HubSync(self.heartbeat_timeout, now))
            for publish, snapshot in zip(
                config.endpoints("publish_port", followed),
                config.endpoints("snapshot_port", followed),
            )
        ]
        self.resync_interval = config.subscriber.resync_interval
        self.next_resync = now + self.resync_interval
        self.next_expiry = now  # when held bans of young hubs are next checked
        self.started = now
        self.control = control_path and ControlSocket(self.context, control_path, self.status)
        self.wakeup = Wakeup()
        self.signals = StopSignals(self.wakeup)

    def run(self) -> None:
        log.log(
            NOTICE,
            "subscriber %s started: hubs %s, sync jail %s",
            self.config.node,
            " ".join(link.publish_endpoint for link in self.links),
            self.jails.policy.sync_jail,
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
            if now >= self.next_expiry:
                self.next_expiry = now + 1.0
                for link in self.links:
                    if link.sync.held:
                        self.follow(link, link.sync.expire_held(time.time()))
            if now >= self.next_resync:
                self.next_resync = now + self.resync_interval
                self.jails.reread()
            if self.jails.pending and now >= self.jails.next_retry:
                self.jails.reconcile([link.sync.view for link in self.links if link.sync.synced])
        self.close()

    def _timeout_ms(self) -> int:
        if self.jails.pending:
            return max(1, int((self.jails.next_retry - time.monotonic()) * 1000))
        return int(min(self.heartbeat_timeout / 2, 1.0) * 1000)

    def handle_updates(self, link: HubLink, now: float) -> None:
        """Take every waiting message, each whole or not at all."""
        for frames in drain(link.updates, 10000, max_frames=5):  # an update has 4
            try:
                message = protocol.decode_stream(frames, self.networks)
            except ProtocolError as error:
                self.refused += 1
                self.refusals.warning("update", "ignored a message from the hub: %s", error)
                continue
            if message.heartbeat:
                outcome = link.sync.on_heartbeat(message.publisher, message.seq, now, message.young)
            else:
                outcome = link.sync.on_update(
                    message.publisher, message.seq, message.events, now, message.young
                )
            self.follow(link, outcome)

    def handle_snapshot(self, link: HubLink, now: float) -> None:
        for frames in drain(link.snapshots, 1000, max_frames=5):  # a part has 4
            try:
                # (One shared configuration keeps the hub's and the nodes' network limits
                # the same.)
                part = protocol.decode_snapshot_part(frames, self.networks)
            except ProtocolError as error:
                self.refused += 1
                self.refusals.warning("snapshot", "ignored a snapshot part: %s", error)
                continue
            self.follow(link, link.sync.on_snapshot_part(part, now))

    def follow(self, link: HubLink, outcome: Outcome) -> None:
        """Do what the hub's core decided: tell the jails, log, move the sockets."""
        for sequence, event in outcome.applied:
            log.debug("update %d: %s", sequence, event.describe())
            self.jails.take_update(event)
        for event in outcome.dropped:
            log.debug("held ban's time is up: %s", event.describe())
            self.jails.take_update(event)
        if outcome.replaced:
            self.jails.compare_all()
            self.jails.pending = True
        elif outcome.left_out:
            self.jails.compare_all()  # at the next reconcile something else brings about
        for notice in outcome.notices:
            log_notice(notice, link, self.refusals)
        link.execute(outcome)

    def status(self) -> dict:
        now = time.monotonic()
        in_jails = self.jails.sizes()
        snapshots = sum(link.sync.snapshots_received for link in self.links)
        return {
            "role": "subscriber",
            "node": self.config.node,
            "fail2ban": "reachable" if self.jails.ok else "NOT reachable (yet)",
            "Banned in local jails": in_jails,
            "Bans applied": self.jails.banned,
            "Unbans applied": self.jails.unbanned,
            "Snapshots received": snapshots,
            "Messages refused": self.refused,
            "Hubs": {
                link.publish_endpoint: {
                    "synced": link.sync.synced,
                    "young": link.sync.young,
                    "held": len(link.sync.held),
                    "sequence": link.sync.sequence,
                    "cluster bans": len(link.sync.view.bans),
                    "last heard": f"{now - link.sync.heard:.1f} s ago",
                    "last snapshot": clock(_epoch(link.sync.last_snapshot, now)),
                }
                for link in self.links
            },
            "problems": self.problems(now),
            "metrics": {
                "bans_applied": counter("banip calls made", self.jails.banned),
                "unbans_applied": counter("unbanip calls made", self.jails.unbanned),
                "snapshots": counter("snapshots received", snapshots),
                "messages_refused": counter("hub messages refused", self.refused),
                "local_bans": gauge("addresses in the local jails", in_jails, "jail"),
                "fail2ban_up": gauge("1 when fail2ban answered", int(self.jails.ok)),
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
                    "origin's Ban line -> banned in the local fail2ban", self.jails.apply_delays
                ),
            },
        }

    def problems(self, now: float) -> list[str]:
        """What makes the subscriber unhealthy: fail2ban away, or no hub to follow."""
        found = []
        if self.jails.error is not None:
            found.append(f"fail2ban is not reachable: {self.jails.error}")
        starting = now - self.started < self.heartbeat_timeout + SNAPSHOT_TIMEOUT
        if not starting and not any(link.sync.synced for link in self.links):
            found.append("no hub is synced: cluster bans are not being applied")
        return found + log_problems()

    def close(self) -> None:
        for link in self.links:
            link.close()
        if self.control:
            self.control.close()
        self.context.term()
        self.jails.fail2ban.close()
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
    elif isinstance(notice, Young):
        log.log(
            NOTICE,
            "hub %s lost its state; its new state %s is young: keeping the %d bans it had "
            "until it is rebuilt",
            hub,
            notice.state_id[:8],
            notice.held,
        )
    elif isinstance(notice, Rebuilt):
        log.info("hub %s has rebuilt state %s: resync", hub, notice.state_id[:8])
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
