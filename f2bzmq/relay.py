"""The relay: one hub's update stream and table for a region's subscribers, so the hub
serves a few relays instead of every node.

Upstream a relay is a node: its own key in the hub's nodes/, a SUB and a snapshot DEALER
following the hub's stream (`subscriber.HubLink` and `mirror.Mirror`, whose HubSync tells
when its copy is whole), and hellos to the hub's report port, so a hub that lost its
state counts the relay among the nodes that have rebuilt it (a relay holds no bans of its
own). Downstream it is a hub: a PUB fed by ZeroMQ's own proxy (`forwarder.Forwarder`),
which passes the hub's messages on byte for byte, and a ROUTER that answers snapshot
requests from the copy; both with the hub's key pair (or the relay's own, `server_key`),
open only to the node keys in the relay's own keys_dir/nodes/.

The operators' holds take the way a subscriber's presence takes: the relay tells the hub
where its copy stands (a presence that says it is a relay) and gets the hub's holds on
its snapshot connection; its own subscribers tell the relay, and get that message,
unchanged, when they lack it (`holds.RelayedHolds`), or at once when the hub's changes.
Their presences go on to the hub in the names their keys have here, paced, so that the
hub's `nodes` knows where they stand: to a hub whose snapshots say it takes them (a relay
this one follows does not), which believes only the relays its configuration names.

The relay's heartbeats are the hub's, forwarded: when the hub is silent, so is the relay,
and its nodes see the silence or the new state themselves. Requests that come while the
copy is not whole wait until it is (a hub's restart: the relay's nodes all ask at once,
and the relay asks the hub once).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from pathlib import Path

import zmq

from . import __version__, protocol
from .collection import Collector
from .config import Config
from .control import ControlSocket
from .delivery import Greeting
from .forwarder import Forwarder
from .handshake import key_problem, log_key_change
from .holds import RelayedHolds
from .keys import Security
from .metrics import counter, gauge
from .mirror import Mirror
from .protocol import ANY_NETWORK, Presence, ProtocolError
from .publisher import hub_socket, send_or_drop
from .roster import CONNECTED, PRESENCE_INTERVAL
from .runtime import (
    NOTICE,
    RateLimitedLog,
    StopSignals,
    Wakeup,
    Watched,
    clock,
    drain,
    log_problems,
    send_frames,
    try_send_frames,
)
from .sdnotify import Notifier
from .subscriber import HubLink, log_notice
from .sync import SNAPSHOT_TIMEOUT, Outcome

log = logging.getLogger("f2bzmq.relay")


class Relay:
    """The relay's reactor: the hub's stream followed and forwarded, snapshots answered."""

    def __init__(self, config: Config, control_path: Path | None = None) -> None:
        self.config = config
        self.heartbeat_timeout = config.relay.heartbeat_timeout
        upstream = [config.relayed()]
        publish, snapshot, report = (
            config.endpoints(port, upstream)[0]
            for port in ("publish_port", "snapshot_port", "report_port")
        )
        self.upstream = publish
        self.report_endpoint = report
        self.refusals = RateLimitedLog(log)
        self.refused = 0  # messages from the hub that failed to decode, and bad requests
        # Upstream a node (its key, the hub's public key), downstream a hub.
        self.client_security = Security.for_role(config, "subscriber")
        self.server_security = Security.for_role(config, "relay", config.relay.server_key)
        self.context = zmq.Context()
        now = time.monotonic()
        self.started = now
        self.mirror = Mirror(self.heartbeat_timeout, now)
        # The hub's holds, for the region's subscribers; their presences, for the hub.
        self.holds = RelayedHolds(CONNECTED, PRESENCE_INTERVAL / 2)
        # The authenticator must run before the first bind, on the sockets' context.
        self.auth = self.server_security.authenticator(self.context)
        try:
            self.bind_sockets()
        except BaseException:
            if self.auth is not None:
                self.auth.stop()
            self.context.destroy(linger=0)
            raise
        self.link = HubLink(self.context, publish, snapshot, self.client_security, self.mirror.sync)
        self.forwarder = Forwarder(self.context, publish, self.client_security, self.stream)
        self.greeting = Greeting(None)  # what the hub's welcomes said of its state
        self.greeter = self._greeter_socket()
        self.answered_frames: list[list] = []  # the parts of the copy, as frames to share
        self.answered_parts: list[list[bytes]] | None = None
        self.said_whole = False  # the log says the copy is whole
        self.control = control_path and ControlSocket(
            self.context, control_path, self.status, self.reload
        )
        self.notifier = Notifier()  # systemd's, when the daemon runs under its unit
        self.garbage = Collector()  # its full collections: see collection
        self.wakeup = Wakeup()
        self.signals = StopSignals(self.wakeup)

    def bind_sockets(self, patience: float = 0.0) -> None:
        """The downstream PUB and ROUTER; `patience`: seconds a closed one may take to
        free its port."""
        bind = functools.partial(hub_socket, self.context, self.server_security, patience=patience)
        hwm = self.config.relay.send_hwm
        self.stream = bind(zmq.PUB, self.config.relay_binds("publish_port"), hwm)
        self.snapshots = bind(zmq.ROUTER, self.config.relay_binds("snapshot_port"), hwm)

    def reload_keys(self) -> None:
        """SIGHUP: read nodes/ again; if a key went away, cut every node's connection so
        that it can't stay (the others reconnect by themselves)."""
        if self.auth is None:
            log.info("SIGHUP: insecure mode, no keys to reload")
            return
        before = dict(self.auth.nodes)
        count = self.auth.reload()
        # A replaced key counts: a connection made with the old one must not outlive it.
        removed = {name for key, name in before.items() if self.auth.nodes.get(key) != name}
        log.log(NOTICE, "reloaded node keys: %d accepted", count)
        if not removed:
            return
        log.log(NOTICE, "keys withdrawn for %s: reconnecting everyone", ", ".join(sorted(removed)))
        self.forwarder.stop()
        self.poller.unregister(self.snapshots)
        for sock in (self.stream, self.snapshots):
            sock.close(linger=0)
        self.bind_sockets(patience=10.0)
        self.poller.register(self.snapshots, zmq.POLLIN)
        self.forwarder.downstream = self.stream
        self.forwarder.start()

    def _greeter_socket(self) -> zmq.Socket:
        return self.client_security.dealer(
            self.context, self.report_endpoint, protocol.MAX_HUB_FRAME
        )

    def run(self) -> None:
        log.log(
            NOTICE,
            "relay %s started: following %s; updates on %s, snapshots on %s",
            self.config.node,
            self.upstream,
            " ".join(self.config.relay_binds("publish_port")),
            " ".join(self.config.relay_binds("snapshot_port")),
        )
        self.forwarder.start()
        self.poller = poller = zmq.Poller()
        poller.register(self.wakeup.read_fd, zmq.POLLIN)
        poller.register(self.snapshots, zmq.POLLIN)
        if self.control:
            poller.register(self.control.socket, zmq.POLLIN)
        # The link may replace a socket (and the greeter) wherever an outcome is followed.
        watched = Watched(poller, lambda: (*self.link.sockets(), self.greeter))
        self.follow(self.mirror.start(time.monotonic()))
        watched.update()
        self.notifier.ready(f"following {self.upstream}")
        while not self.signals.stopping:
            self.notifier.tick(time.monotonic())
            ready = dict(poller.poll(self._timeout_ms()))
            self.garbage.tick(time.monotonic(), not ready)
            if self.wakeup.read_fd in ready:
                self.wakeup.drain()
            if self.signals.reload:
                self.signals.reload = False
                self.reload()
                continue
            if self.control and self.control.socket in ready:
                self.control.handle()
            now = time.monotonic()
            link = self.link
            if link.updates_watch.socket in ready or link.snapshots_watch.socket in ready:
                # Read, or they stay readable and the poll never waits again.
                for state in link.handshakes():
                    log_key_change(log, self.upstream, state, self.client_security)
            if self.link.updates in ready:
                self.handle_updates(now)
            if self.link.snapshots in ready:
                self.handle_snapshot(now)
            if self.greeter in ready:
                self.handle_welcome(now)
            if self.snapshots in ready:
                self.handle_requests(now)
            self.follow(self.mirror.on_tick(now))
            self.answer(self.mirror.due(now))
            self.say_hello(now)
            if self.link.takes_presence and now >= self.link.next_presence:
                self.send_presence(now)
            watched.update()
        self.close()

    def _timeout_ms(self) -> int:
        now = time.monotonic()
        wait = min(self.heartbeat_timeout / 2, 1.0, self.greeting.next_deadline() - now)
        keepalive = self.notifier.wait(now)
        if keepalive is not None:
            wait = min(wait, keepalive)
        return max(1, int(wait * 1000))

    def reload(self) -> dict:
        """SIGHUP or `relay reload`: the keys of the nodes it admits read again. Its other
        settings and its own keys are held by its sockets: they take a restart."""
        self.reload_keys()
        keys = "none (insecure = true)"
        if self.auth is not None:
            keys = f"{len(self.auth.names)} node keys accepted"
        return {"Applied": "the nodes' keys", "Needs a restart": "any other change", "Keys": keys}

    # Upstream: the hub's stream and snapshots, into the copy.

    def handle_updates(self, now: float) -> None:
        """Every waiting message, each whole or not at all; the forwarder passed it on already."""
        for frames in drain(self.link.updates, 10000, max_frames=5):
            try:
                # The nodes check the network limits: the copy holds what the hub holds.
                message = protocol.decode_stream(frames, ANY_NETWORK)
            except ProtocolError as error:
                self.refused += 1
                self.refusals.warning("update", "ignored a message from the hub: %s", error)
                continue
            if message.heartbeat:
                outcome = self.mirror.on_heartbeat(
                    message.publisher, message.seq, now, message.young
                )
            else:
                outcome = self.mirror.on_update(
                    message.publisher, message.seq, message.events, now, message.young
                )
            self.follow(outcome)

    def handle_snapshot(self, now: float) -> None:
        sock = self.link.snapshots
        for frames in drain(sock, 1000, max_frames=5):
            if protocol.is_holds(frames):
                self.take_holds(frames, now)
                continue
            try:
                part = protocol.decode_snapshot_part(frames, ANY_NETWORK)
            except ProtocolError as error:
                self.refused += 1
                self.refusals.warning("snapshot", "ignored a snapshot part: %s", error)
                continue
            self.link.heard_part(part)
            self.follow(self.mirror.on_snapshot_part(part, now))
            if self.link.snapshots is not sock:  # a part was missing: a new socket asks again
                break

    def take_holds(self, frames: list[bytes], now: float) -> None:
        """The hub's holds: checked, kept as they came, and handed to the region's
        subscribers heard lately if they changed."""
        try:
            digest, holds = protocol.decode_holds(frames)
        except ProtocolError as error:
            self.refused += 1
            self.refusals.warning("holds", "ignored the holds from the hub: %s", error)
            return
        # One copy of the hub's bytes, shared by every send (libzmq counts references): a
        # node that asks again and again and never reads queues references, not copies.
        shared = [*frames[:-1], zmq.Frame(frames[-1])]
        peers = self.holds.on_holds(shared, digest, len(holds), now)
        if peers:
            log.info("the hub's holds changed: %d, to %d subscribers", len(holds), len(peers))
        for peer in peers:
            send_or_drop(self.snapshots, [peer, *shared])

    def send_presence(self, now: float) -> None:
        """Where the copy stands, and which of the hub's holds the relay has."""
        sync = self.mirror.sync
        whole = self.mirror.whole(now)
        presence = Presence(
            sync.state_id, sync.sequence, whole, __version__, (), self.holds.digest, relay=True
        )
        self.link.tell(presence, now)

    def follow(self, outcome: Outcome) -> None:
        """Do what the copy's core decided: log, move the sockets (the forwarder's SUB with
        the copy's, when the hub went silent or sent a frame too large)."""
        for notice in outcome.notices:
            log_notice(notice, self.link, self.refusals)
        self.link.execute(outcome)
        if outcome.reconnect_updates:
            self.forwarder.renew()
        whole = self.mirror.whole(time.monotonic())
        if self.said_whole != whole:
            self.said_whole = whole
            if not self.said_whole:
                log.info("the copy of %s is not whole: snapshot requests wait", self.upstream)
                return
            log.log(
                NOTICE,
                "the copy of %s is whole: %d bans at sequence %d%s",
                self.upstream,
                len(self.mirror.table()),
                self.mirror.sync.sequence,
                f"; answering {len(self.mirror.waiting)} waiting requests"
                if self.mirror.waiting
                else "",
            )

    def handle_welcome(self, now: float) -> None:
        """The hub's answer to a hello: a relay reports no bans, so any state it names is
        one this relay has nothing more to report to (a young hub need not wait for it)."""
        for frames in drain(self.greeter, 100, max_frames=3):
            if not protocol.is_welcome(frames):
                continue  # a NAK of a hello: the hub says why in its own log
            try:
                welcome = protocol.decode_welcome(frames)
            except ProtocolError as error:
                self.refusals.warning("welcome", "ignored a welcome: %s", error)
                continue
            if self.greeting.on_welcome(welcome, now) is not None:
                self.greeting.reported(welcome.publisher)
                if welcome.young:
                    self.greeting.hello_soon()

    def say_hello(self, now: float) -> None:
        if not self.greeting.hello_due(now):
            return
        if self.greeting.sent_at is not None:
            # Unanswered: a refused handshake leaves a DEALER that never reconnects.
            self.greeter.close()
            self.greeter = self._greeter_socket()
        try_send_frames(self.greeter, protocol.encode_hello(self.greeting.known))
        self.greeting.hello_sent(now)

    # Downstream: the region's snapshot requests.

    def handle_requests(self, now: float) -> None:
        peers = []
        for message in drain(self.snapshots, 1000, copy=False, max_frames=8):
            frames = [frame.bytes for frame in message]
            peer, body = frames[0], frames[1:]
            if protocol.is_presence(body):
                self.handle_presence(peer, body, message[-1], now)
                continue
            try:
                protocol.decode_snapshot_request(body)
            except ProtocolError as error:
                self.refused += 1
                self.refusals.warning("request", "refused a snapshot request: %s", error)
                continue
            peers += self.mirror.on_request(peer, now)
        self.answer(peers)

    def handle_presence(self, peer: bytes, body: list[bytes], last: zmq.Frame, now: float) -> None:
        """A subscriber of the region says where it stands: it gets the hub's holds if it
        lacks them, and the hub hears where the node stands, from the relay, in the name
        its key has here (without keys, no name: the hub hears nothing of it)."""
        try:
            presence = protocol.decode_presence(body)
            if presence.node is not None:
                raise ProtocolError("a node's presence speaks for itself")
        except ProtocolError as error:
            self.refused += 1
            self.refusals.warning("presence", "refused a presence: %s", error)
            return
        if self.holds.on_presence(peer, presence.holds, now):
            # Not waited for: a full queue misses it, and the next presence asks again.
            send_or_drop(self.snapshots, [peer, *self.holds.message])
        if self.auth is None or presence.relay or not self.link.takes_relayed:
            # Without keys no names; a relay following this one is listed through no one;
            # a hub before RELAYED (or a relay this one follows) would refuse them.
            return
        kind, node = self.auth.identify(last.get("User-Id"))
        if kind == "node" and self.holds.pass_on(node, now):
            told = dataclasses.replace(presence, node=node)
            try_send_frames(self.link.snapshots, protocol.encode_presence(told))

    def answer(self, peers: list[bytes]) -> None:
        """The copy to each peer. Its parts are encoded once, and each large frame is shared
        by every send (libzmq counts references): only the encryption is per node."""
        if not peers:
            return
        parts = self.mirror.parts()
        if parts is not self.answered_parts:
            self.answered_parts = parts
            self.answered_frames = [[*part[:-1], zmq.Frame(part[-1])] for part in parts]
        for peer in peers:
            for part in self.answered_frames:
                send_frames(self.snapshots, [peer, *part])
        log.debug(
            "sent %d snapshots of %d parts at sequence %d",
            len(peers),
            len(parts),
            self.mirror.sync.sequence,
        )

    def status(self) -> dict:
        now = time.monotonic()
        mirror, sync = self.mirror, self.mirror.sync
        forwarded = self.forwarder.statistics()
        bans = len(mirror.table())
        return {
            "role": "relay",
            "node": self.config.node,
            "Following": self.upstream,
            "Copy": "whole" if mirror.whole(now) else "not whole: snapshot requests wait",
            "Hub state": f"{sync.state_id[:8]}{' (young)' if sync.young else ''}"
            if sync.state_id
            else "not known yet",
            "Sequence number": sync.sequence,
            "Currently banned": bans,
            "Last heard": f"{now - sync.heard:.1f} s ago",
            "Snapshots received": sync.snapshots_received,
            "Snapshots served": mirror.served,
            "Requests waiting": len(mirror.waiting),
            "Requests dropped": mirror.dropped,
            "Operators' holds": self.holds.count,
            "Subscribers heard": len(self.holds.listeners(now)),
            "Frames forwarded": forwarded["messages"],
            "Messages refused": self.refused,
            "problems": self.problems(now),
            "metrics": {
                "synced": gauge(
                    "1 when the copy of the hub's table is whole", int(mirror.whole(now))
                ),
                "sequence": gauge("sequence number of the copy", sync.sequence),
                "bans": gauge("bans in the copy", bans),
                "snapshots_received": counter("snapshots from the hub", sync.snapshots_received),
                "snapshots_served": counter("snapshots handed out", mirror.served),
                "requests_waiting": gauge("snapshot requests waiting", len(mirror.waiting)),
                "requests_dropped": counter("snapshot requests given up", mirror.dropped),
                "holds": gauge("operators' holds passed on", self.holds.count),
                "forwarded_frames": counter("frames forwarded", forwarded["messages"]),
                "forwarded_bytes": counter("bytes forwarded", forwarded["bytes"]),
                "messages_refused": counter("messages refused", self.refused),
            },
        }

    def problems(self, now: float) -> list[str]:
        """What makes the relay unhealthy: a copy not whole for long, or no forwarding."""
        found = []
        broken = self.mirror.broken_since
        if broken is not None and now - broken > self.heartbeat_timeout + SNAPSHOT_TIMEOUT:
            found.append(
                f"the copy of {self.upstream} has not been whole for {now - broken:.0f} s "
                f"(last heard {clock(time.time() - (now - self.mirror.sync.heard))}): "
                "snapshot requests wait"
            )
        if not self.forwarder.alive:
            found.append(f"the forwarder of {self.upstream} stopped: {self.forwarder.error}")
        security = self.client_security
        problem = key_problem(self.link.key.state, security.public_key, security.node)
        if problem is not None:
            found.append(f"{self.upstream}: {problem}")
        return found + log_problems()

    def close(self) -> None:
        self.notifier.stopping()
        self.forwarder.stop()
        self.link.close()
        self.greeter.close()
        self.stream.close()
        self.snapshots.close()
        if self.control:
            self.control.close()
        if self.auth is not None:
            self.auth.stop()  # its ZAP socket would keep the context from terminating
        self.context.term()
        self.wakeup.close()
        self.notifier.close()
        log.log(NOTICE, "relay %s stopped", self.config.node)
