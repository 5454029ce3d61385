"""The node's reactor: follow every hub's update stream and keep the local jails equal to
what the cluster bans.

`Subscriber` is one poll loop over one SUB socket (`updates`) and one DEALER
(`snapshots`) per hub, plus fail2ban's socket. Each hub's stream rules live in its
`sync.HubSync` core, what the jails must hold and the applying in `jails.LocalJails`:
this module moves bytes between them and logs what they report. On its snapshot socket
the subscriber also tells each hub where it stands (its presence), and hears the
operators' holds there, which `holds.LocalHolds` turns into lifts and ignoreip entries
of the node's own jails.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import socket
import time
from pathlib import Path

import zmq

from . import __version__, protocol
from .addresses import Allowlist
from .collection import Collector
from .config import Config, ConfigError
from .control import ControlSocket
from .fail2ban_client import Fail2banClient, Fail2banError
from .handshake import HandshakeWatch, KeyCheck, key_problem, log_key_change
from .holds import HoldPlan, LocalHolds
from .jails import HandUnbans, LocalJails, LocalPolicy
from .keys import Security
from .metrics import counter, gauge, histogram
from .protocol import BanEvent, Hold, Presence, ProtocolError, SnapshotPart
from .reload import LOGLEVEL, node_keys, reread
from .roster import PRESENCE_INTERVAL
from .runtime import (
    NOTICE,
    RateLimitedLog,
    StopSignals,
    Wakeup,
    Watched,
    clock,
    drain,
    log_problems,
    try_send_frames,
)
from .sdnotify import Notifier
from .sync import (
    SNAPSHOT_TIMEOUT,
    Gap,
    HubSync,
    NewState,
    Notice,
    Outcome,
    OutOfStep,
    PartMissing,
    Rebuilt,
    Silent,
    SnapshotLate,
    SnapshotTaken,
    Young,
)

log = logging.getLogger("f2bzmq.subscriber")

# Seconds between pings of fail2ban: `status` says within about this long that it is gone.
PING_INTERVAL = 1.0
# What a reload changes at once; any other key of [general] and [subscriber] needs a restart.
LIVE_KEYS = frozenset(
    {
        LOGLEVEL,
        ("subscriber", "allowlist"),
        ("subscriber", "batch_size"),
        ("subscriber", "resync_interval"),
    }
)
# The ignoreip entries this node's subscriber added for the operators' holds, kept across
# its restarts so that only those are ever taken out again.
HOLDS_FILE = "subscriber-holds.json"
HOLDS_RETRY = 2.0  # seconds before fail2ban is asked again when it failed to do the holds
# A hub (or relay) whose snapshots do not say it takes presences is asked for its table
# again every PROBE_EVERY resync intervals (an hour by default): once it is upgraded, in
# place and back before the heartbeat timeout, its next snapshot says so, and the
# operators' holds reach this node from then on. A hub that predates them costs a
# snapshot an hour per node.
PROBE_EVERY = 12


class HubLink:
    """The sockets to one hub, the core that follows its update stream, and what the hub
    answers this node's key (each socket's handshakes, read from its monitor)."""

    def __init__(
        self, context: zmq.Context, publish: str, snapshot: str, security: Security, sync: HubSync
    ) -> None:
        self.security = security
        self.publish_endpoint = publish
        self.snapshot_endpoint = snapshot
        self.context = context
        self.sync = sync
        self.key = KeyCheck()
        self.updates = self._updates_socket()
        self.updates_watch = HandshakeWatch(self.updates)
        self.snapshots = self._snapshot_socket()
        self.snapshots_watch = HandshakeWatch(self.snapshots)
        self.next_presence = 0.0  # when to tell the hub where this node stands
        self.takes_presence = False  # the hub said so in a snapshot: hubs before it do not
        self.takes_relayed = False  # likewise, of what a relay passes on (a relay does not)
        self.next_probe = 0.0  # when to ask again a hub that does not say it takes them

    def heard_part(self, part: SnapshotPart) -> None:
        """What a snapshot part's header says the hub takes: one that takes presences hears
        one at once (its holds come in answer)."""
        if part.presence and not self.takes_presence:
            self.takes_presence = True
            self.next_presence = 0.0
        self.takes_relayed = part.relayed

    def tell(self, presence: Presence, now: float) -> None:
        """A presence to the hub, the next one PRESENCE_INTERVAL later. Not waited for."""
        try_send_frames(self.snapshots, protocol.encode_presence(presence))
        self.next_presence = now + PRESENCE_INTERVAL

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
        return self.security.dealer(self.context, self.snapshot_endpoint, protocol.MAX_NODE_FRAME)

    def _renew_updates(self) -> None:
        self.updates_watch.close()
        self.updates.close()
        self.updates = self._updates_socket()
        self.updates_watch = HandshakeWatch(self.updates)

    def _renew_snapshots(self) -> None:
        self.snapshots_watch.close()
        self.snapshots.close()
        self.snapshots = self._snapshot_socket()
        self.snapshots_watch = HandshakeWatch(self.snapshots)

    def sockets(self) -> tuple[zmq.Socket, ...]:
        return self.updates, self.snapshots, self.updates_watch.socket, self.snapshots_watch.socket

    def execute(self, outcome: Outcome) -> None:
        """The core's socket actions: a fresh SUB, a fresh DEALER, a snapshot request.

        A socket whose handshake the hub refused is dead for good (libzmq does not
        reconnect it): it is replaced along with each snapshot request, which the core
        paces, so the node recovers by itself once the hub knows its key. No send blocks:
        a DEALER without a connection would wait for ever, and `status` and `stop` with it.
        """
        if outcome.reconnect_updates:
            self._renew_updates()
        if outcome.ask_snapshot:
            if outcome.renew_snapshot_socket or self.snapshots_watch.refused:
                self._renew_snapshots()
            if self.updates_watch.refused:
                self._renew_updates()
            request = protocol.encode_snapshot_request()
            if not try_send_frames(self.snapshots, request):
                # Refused before its monitor said so: a fresh DEALER queues the request
                # until it connects. If even that fails, the core asks again later.
                self._renew_snapshots()
                try_send_frames(self.snapshots, request)

    def handshakes(self) -> list[str]:
        """The hub's answers to this node's key that changed, from both sockets' monitors."""
        return [
            state
            for watch in (self.updates_watch, self.snapshots_watch)
            for event in watch.events()
            if (state := self.key.on_event(event)) is not None
        ]

    def close(self) -> None:
        for watch in (self.updates_watch, self.snapshots_watch):
            watch.close()
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
            config.network_limits(),
            config.subscriber.special_ranges,
            hub_addresses(config.general.hubs),
        )
        fail2ban = Fail2banClient(
            config.general.fail2ban_socket, client_program=config.general.fail2ban_client
        )
        self.jails = LocalJails(policy, fail2ban, config.subscriber.batch_size)
        # Bans lifted by hand here, kept across restarts: a restart must not undo them.
        self.hand_unbans_file = config.state_path("subscriber-hand-unbans.json")
        self.jails.hand_unbans = load_hand_unbans(self.hand_unbans_file)
        # A connection of its own for the pings: short answers, no client program behind it.
        self.pinger = Fail2banClient(
            config.general.fail2ban_socket, timeout=2.0, client_program=None
        )
        self.next_ping = 0.0
        self.heartbeat_timeout = config.subscriber.heartbeat_timeout
        self.refusals = RateLimitedLog(log)
        self.refused = 0  # hub messages that failed to decode
        # The hubs, or the relays this node follows instead ([subscriber] follow).
        security = Security.for_role(config, "subscriber", config.subscriber.follow_key)
        self.security = security
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
        for link in self.links:
            link.next_probe = now + PROBE_EVERY * self.resync_interval
        self.next_expiry = now  # when held bans of young hubs are next checked
        self.started = now
        self.holds_path = config.state_path(HOLDS_FILE)
        self.holds = LocalHolds(policy.local_jails(), load_added(self.holds_path))
        self.holds_due = bool(self.holds.added)  # a previous run's entries: check them
        self.next_holds = 0.0  # time.monotonic() of the next try
        self.hold_wake: float | None = None  # unix time a hold ends
        self.local_jails: list[str] = []  # fail2ban's jails, as the presence tells the hubs
        self.next_jails = now
        self.control = control_path and ControlSocket(
            self.context, control_path, self.status, self.reload
        )
        self.wakeup = Wakeup()
        self.signals = StopSignals(self.wakeup)
        self.notifier = Notifier()  # systemd's, when the daemon runs under its unit
        self.garbage = Collector()  # its full collections: see collection
        self.jails.progress = lambda: self.notifier.tick(time.monotonic())

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
        # A link may replace a socket anywhere its core's outcome is followed.
        watched = [Watched(poller, link.sockets) for link in self.links]
        for link, sockets in zip(self.links, watched):
            self.follow(link, link.sync.start(time.monotonic()))
            sockets.update()
        self.notifier.ready()
        while not self.signals.stopping:
            self.notifier.tick(time.monotonic())
            if self.signals.reload:
                self.signals.reload = False
                self.reload()
            ready = dict(poller.poll(self._timeout_ms()))
            self.garbage.tick(time.monotonic(), not ready)
            if self.wakeup.read_fd in ready:
                self.wakeup.drain()
            if self.control and self.control.socket in ready:
                self.control.handle()
            now = time.monotonic()
            for link in self.links:
                if link.updates_watch.socket in ready or link.snapshots_watch.socket in ready:
                    for state in link.handshakes():
                        log_key_change(log, link.publish_endpoint, state, self.security)
                if link.updates in ready:
                    self.handle_updates(link, now)
                if link.snapshots in ready:
                    self.handle_snapshot(link, now)
                self.follow(link, link.sync.on_tick(now))
            if now >= self.next_expiry:
                self.next_expiry = now + 1.0
                for link in self.links:
                    if link.sync.held:
                        self.follow(link, link.sync.expire_held(time.time()))
            for sockets in watched:
                sockets.update()
            if now >= self.next_ping:
                self.ping_fail2ban()
                self.next_ping = time.monotonic() + PING_INTERVAL
            if now >= self.next_resync:
                self.next_resync = now + self.resync_interval
                self.jails.reread()
                self.holds_due = self.holds_due or bool(self.holds.holds() or self.holds.added)
            if self.jails.pending and now >= self.jails.next_retry:
                self.jails.reconcile([link.sync.view for link in self.links if link.sync.synced])
            if self.jails.hand_unbans_changed:
                error = store_hand_unbans(self.hand_unbans_file, self.jails.hand_unbans)
                self.jails.hand_unbans_changed = error is not None
                if error is not None:
                    self.refusals.warning(
                        "hand unbans",
                        "cannot write %s: %s; trying again",
                        self.hand_unbans_file,
                        error,
                    )
            if self.hold_wake is not None and time.time() >= self.hold_wake:
                self.holds_due = True
            if self.holds_due and now >= self.next_holds:
                self.apply_holds(now)
            if now >= self.next_jails:
                self.read_jails(now)
            for link in self.links:
                if link.takes_presence:
                    if now >= link.next_presence:
                        self.send_presence(link, now)
                elif now >= link.next_probe:
                    link.next_probe = now + PROBE_EVERY * self.resync_interval
                    self.follow(link, link.sync.refresh(now))
        self.close()

    def read_jails(self, now: float) -> None:
        """fail2ban's jails, for the hubs' list of the cluster's jails."""
        try:
            self.local_jails = self.jails.fail2ban.jails()
        except (Fail2banError, OSError):
            self.next_jails = now + HOLDS_RETRY
            return
        self.next_jails = now + self.resync_interval

    def send_presence(self, link: HubLink, now: float) -> None:
        """Where this node stands in the hub's stream, and which holds of it it has."""
        sync = link.sync
        presence = Presence(
            sync.state_id,
            sync.sequence,
            sync.synced,
            __version__,
            tuple(self.local_jails),
            self.holds.digest(link.publish_endpoint),
        )
        link.tell(presence, now)

    def apply_holds(self, now: float) -> None:
        """Make the node's own jails do what the holds say: ignore the held addresses, lift
        the unbanned ones once, let ended holds go. What was done is remembered even if
        fail2ban fails half way; the rest is tried again."""
        fail2ban = self.jails.fail2ban
        done = HoldPlan()
        try:
            jails = fail2ban.jails()
            own = [jail for jail in jails if jail not in self.holds.sync_jails]
            ignored = {jail: set(fail2ban.ignored(jail)) for jail in own}
            plan = self.holds.plan(time.time(), jails, ignored)
            done.forget = plan.forget
            for jail, ip in plan.ignore:
                fail2ban.ignore(jail, ip)
                done.ignore.append((jail, ip))
                log.log(NOTICE, "[%s] Ignore %s: an operator holds it", jail, ip)
            for targets, hold in plan.lift:
                for jail in targets:
                    self.lift(jail, hold)
                done.lift.append((targets, hold))
            for jail, ip in plan.unignore:
                fail2ban.unignore(jail, ip)
                done.unignore.append((jail, ip))
                log.log(NOTICE, "[%s] Ignore %s no more: the operator's hold is over", jail, ip)
        except (Fail2banError, OSError) as error:
            self.refusals.warning("holds", "cannot apply the operators' holds: %s", error)
            self.next_holds = now + HOLDS_RETRY
        else:
            self.holds_due = False
        before = {jail: set(ips) for jail, ips in self.holds.added.items()}
        self.holds.done(done)
        self.hold_wake = self.holds.next_change(time.time())
        if self.holds.added != before:
            save_added(self.holds_path, self.holds.added)

    def lift(self, jail: str, hold: Hold) -> None:
        """An operator's unban in one of the node's own jails: every ban it overlaps."""
        lifting = Allowlist([ipaddress.ip_network(hold.ip, strict=False)])
        covered = []
        for ip in self.jails.fail2ban.banned(jail):
            try:
                if lifting.covers(ip):
                    covered.append(ip)
            except ValueError:
                continue  # not an address: nothing an unban of ours names
        if covered:
            self.jails.fail2ban.unban(jail, covered)
        for ip in covered:
            log.log(NOTICE, "[%s] Unban %s: an operator lifted it", jail, ip)

    def _timeout_ms(self) -> int:
        now = time.monotonic()
        wait = min(self.heartbeat_timeout / 2, 1.0)
        if self.jails.pending:
            wait = min(wait, self.jails.next_retry - now)
        keepalive = self.notifier.wait(now)
        if keepalive is not None:
            wait = min(wait, keepalive)
        return max(1, int(wait * 1000))

    def reload(self) -> dict:
        """SIGHUP or `subscriber reload`: the configuration and keys read again. A new
        allowlist is applied to what the jails hold at once."""
        try:
            self.config, reloaded = reread(self.config, "subscriber", LIVE_KEYS, log)
        except ConfigError as error:
            return {"failed": str(error)}
        settings = self.config.subscriber
        self.jails.batches.limit = settings.batch_size
        if settings.resync_interval != self.resync_interval:
            self.resync_interval = settings.resync_interval
            self.next_resync = time.monotonic() + self.resync_interval
        if ("subscriber", "allowlist") in reloaded.applied:
            self.jails.policy.set_allowlist(settings.allowlist)
            self.jails.compare_all()
            self.jails.pending = True
        reloaded.keys = node_keys(self.security, self.config, "subscriber")
        log.log(NOTICE, "reloaded %s: %s", self.config.path, reloaded.describe())
        return reloaded.as_dict()

    def ping_fail2ban(self) -> None:
        """Is fail2ban there, and the same server as before? A new one (restarted) may have
        lost the bans it held: read its jails again."""
        before = self.pinger.server_pid
        try:
            self.pinger.command("ping")
        except (Fail2banError, OSError) as error:
            self.jails.unreachable(str(error))
            return
        restarted = before is not None and self.pinger.server_pid != before
        if restarted:
            log.info(
                "fail2ban was restarted (pid %s, now %s): comparing its jails with the cluster",
                before,
                self.pinger.server_pid,
            )
        if self.jails.reachable() or restarted:
            self.jails.reread(restarted)

    def handle_updates(self, link: HubLink, now: float) -> None:
        """Take every waiting message, each whole or not at all."""
        for frames in drain(link.updates, 10000, max_frames=5):  # an update has 4
            try:
                message = protocol.decode_stream(frames, protocol.WIRE_LIMITS)
            except ProtocolError as error:
                self.refused += 1
                self.refusals.warning(
                    f"update {link.publish_endpoint}",
                    "ignored a message from %s: %s",
                    link.publish_endpoint,
                    error,
                )
                continue
            if message.heartbeat:
                outcome = link.sync.on_heartbeat(message.publisher, message.seq, now, message.young)
            else:
                outcome = link.sync.on_update(
                    message.publisher, message.seq, message.events, now, message.young
                )
            self.follow(link, outcome)

    def handle_snapshot(self, link: HubLink, now: float) -> None:
        sock = link.snapshots
        for frames in drain(sock, 1000, max_frames=5):  # a part has 4
            if protocol.is_holds(frames):
                self.take_holds(link, frames)
                continue
            try:
                part = protocol.decode_snapshot_part(frames, protocol.WIRE_LIMITS)
            except ProtocolError as error:
                self.refused += 1
                self.refusals.warning(
                    f"snapshot {link.snapshot_endpoint}",
                    "ignored a snapshot part from %s: %s",
                    link.snapshot_endpoint,
                    error,
                )
                continue
            link.heard_part(part)
            self.follow(link, link.sync.on_snapshot_part(part, now))
            if link.snapshots is not sock:  # a part was missing: a new socket asks again
                break

    def take_holds(self, link: HubLink, frames: list[bytes]) -> None:
        try:
            _, holds = protocol.decode_holds(frames)
        except ProtocolError as error:
            self.refused += 1
            self.refusals.warning("holds", "ignored the holds from the hub: %s", error)
            return
        if self.holds.on_holds(link.publish_endpoint, holds):
            self.holds_due = True
            self.next_holds = 0.0

    def follow(self, link: HubLink, outcome: Outcome) -> None:
        """Do what the hub's core decided: tell the jails, log, move the sockets."""
        for sequence, event in outcome.applied:
            log.debug("update %d: %s", sequence, event.describe())
            self.jails.take_update(event)
            self.log_refusal(event)
        for event in outcome.dropped:
            log.debug("held ban's time is up: %s", event.describe())
            self.jails.take_update(event)
        if outcome.replaced:
            for event in link.sync.view.bans.values():
                self.log_refusal(event)
                self.jails.take_arrival(event)
            self.jails.compare_all()
            self.jails.pending = True
        elif outcome.left_out:
            self.jails.compare_all()  # at the next reconcile something else brings about
        for notice in outcome.notices:
            log_notice(notice, link, self.refusals)
        link.execute(outcome)

    def log_refusal(self, event: BanEvent) -> None:
        """A cluster ban this node's rules refuse, logged at most once a minute per origin."""
        policy = self.jails.policy
        if event.action != protocol.BAN or event.node == policy.node:
            return
        reason = policy.refusal(event)
        if reason is not None:
            self.refusals.warning(
                f"refused {event.node}", "refused %s: %s", event.describe(), reason
            )

    def status(self) -> dict:
        now = time.monotonic()
        in_jails = self.jails.sizes()
        snapshots = sum(link.sync.snapshots_received for link in self.links)
        return {
            "role": "subscriber",
            "node": self.config.node,
            "fail2ban": "reachable" if self.jails.ok else "NOT reachable (yet)",
            "Banned in local jails": in_jails,
            "Unbanned here by hand": {
                jail: _some(addresses)
                for jail, addresses in self.jails.hand_unbans.by_jail().items()
            },
            "Bans applied": self.jails.banned,
            "Unbans applied": self.jails.unbanned,
            "Snapshots received": snapshots,
            "Messages refused": self.refused,
            "Operators' holds": sum(
                1 for hold in self.holds.holds().values() if hold.until > time.time()
            ),
            "Hubs": {
                link.publish_endpoint: {
                    "synced": link.sync.synced,
                    "young": link.sync.young,
                    "held": len(link.sync.held),
                    "sequence": link.sync.sequence,
                    "cluster bans": len(link.sync.view.bans),
                    "last heard": f"{now - link.sync.heard:.1f} s ago",
                    "last snapshot": clock(_epoch(link.sync.last_snapshot, now)),
                    "key": link.key.state,
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
                "hand_unbans": gauge(
                    "cluster bans lifted by hand here, kept unbanned",
                    {jail: len(ips) for jail, ips in self.jails.hand_unbans.by_jail().items()},
                    "jail",
                ),
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
        for link in self.links:
            problem = key_problem(link.key.state, self.security.public_key, self.config.node)
            if problem is not None:
                found.append(f"{link.publish_endpoint}: {problem}")
        starting = now - self.started < self.heartbeat_timeout + SNAPSHOT_TIMEOUT
        if not starting and not any(link.sync.synced for link in self.links):
            found.append("no hub is synced: cluster bans are not being applied")
        return found + log_problems()

    def close(self) -> None:
        self.notifier.stopping()
        for link in self.links:
            link.close()
        if self.control:
            self.control.close()
        self.context.term()
        self.jails.fail2ban.close()
        self.pinger.close()
        self.wakeup.close()
        self.notifier.close()
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
    elif isinstance(notice, PartMissing):
        refusals.warning(
            f"snapshot {link.snapshot_endpoint}",
            "part %d of a snapshot from %s never came (part %d did): asking again",
            notice.expected,
            link.snapshot_endpoint,
            notice.came,
        )
    elif isinstance(notice, Silent):
        refusals.warning(
            f"silent {hub}",
            "no heartbeat from %s for %.0f s%s: resync when it is back",
            hub,
            notice.seconds,
            OLD_HUB_HINT if notice.stream_never_came else "",
        )


def hub_addresses(hosts: list[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """Every address the hubs' names resolve to, now, at start: a ban of one of them would
    cut this node off the cluster. A name that does not resolve is said in the log."""
    found = []
    for host in hosts:
        try:
            answers = socket.getaddrinfo(host.strip("[]"), None, proto=socket.IPPROTO_TCP)
        except OSError as error:
            log.warning(
                "cannot resolve hub %s (%s): cluster bans of it are not refused", host, error
            )
            continue
        for *_, address in answers:
            found.append(ipaddress.ip_network(address[0].partition("%")[0]))
    return found


def load_hand_unbans(path: Path) -> HandUnbans:
    """The bans lifted by hand that an earlier run stored; none if there is no file."""
    try:
        stored = json.loads(path.read_text())
        return HandUnbans(
            {(entry["jail"], entry["ip"]): float(entry["since"]) for entry in stored["unbans"]}
        )
    except FileNotFoundError:
        return HandUnbans()
    except (OSError, ValueError, KeyError, TypeError) as error:
        log.warning("cannot read %s (%s): bans lifted by hand before are forgotten", path, error)
        return HandUnbans()


def store_hand_unbans(path: Path, unbans: HandUnbans) -> str | None:
    """Write them whole, readable by their owner only, and replace the old file at once;
    why that failed, or None."""
    entries = [
        {"jail": jail, "ip": ip, "since": since} for (jail, ip), since in unbans.entries.items()
    ]
    temporary = path.with_name(path.name + ".new")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump({"unbans": entries}, handle)
        os.replace(temporary, path)
    except OSError as error:
        return error.strerror or str(error)
    return None


def _some(addresses: list[str], shown: int = 5) -> str:
    """A few addresses of a long list, for `status`."""
    more = len(addresses) - shown
    return ", ".join(addresses[:shown]) + (f" and {more} more" if more > 0 else "")


def load_added(path: Path) -> dict[str, set[str]]:
    """The ignoreip entries a previous run added, {} when there is no (readable) file."""
    try:
        data = json.loads(path.read_text())
        return {str(jail): {str(ip) for ip in ips} for jail, ips in data.items()}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, AttributeError, TypeError) as error:
        log.warning("ignored %s: %s", path, error)
        return {}


def save_added(path: Path, added: dict[str, set[str]]) -> None:
    """Written whole or not at all, readable by its owner only."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.new")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            json.dump({jail: sorted(ips) for jail, ips in sorted(added.items())}, handle)
        os.replace(temporary, path)
    except OSError as error:
        log.error("cannot write %s: %s", path, error)


def _epoch(moment: float | None, now: float) -> float | None:
    """A time.monotonic() moment as a unix time, for people to read."""
    return None if moment is None else time.time() - (now - moment)
