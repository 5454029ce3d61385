"""fail2ban-zmq-tools' wire format on the hub, so a cluster migrates one node at a time.

An old monitor sends one string frame over REQ, `[token|]hostname|jail|action|ip`, and
takes the same string without the token back as ACK, or `NAK`. An old subscriber reads
`hostname|jail|Ban|ip` (or `Unban`) frames from PUB with an empty prefix and skips its
own hostname. `parse_report` and `format_update` hold the format's rules without a
socket; the hub's admission core judges each old report by them and by the rules every
report meets; `LegacyEndpoints` puts the sockets on the publisher's poll loop. The old
format has no encryption: its sockets are plain and belong on trusted interfaces.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import zmq

from .config import PublisherSettings
from .protocol import BAN, UNBAN, BanEvent, NetworkLimits, ProtocolError
from .runtime import RateLimitedLog, drain, try_send_frames
from .state import Update
from .zmtp import Message, ZmtpError, ZmtpPeer, frame
from .zmtp import message as message_bytes

log = logging.getLogger("f2bzmq.legacy")

LEGACY_NAK = b"NAK"  # the old hub's refusal: no reason, just the word
MAX_REPORT = 512  # bytes: a token (at most 256), two names of 64, an action and an address
MAX_FRAME = 4096  # bytes of a frame; a peer that sends more is cut off (no reply at all)
_ACTIONS = {"ban": BAN, "unban": UNBAN}  # the old hub took any case: Ban, Unban, UnBan


@dataclass(frozen=True)
class LegacyReport:
    """An old monitor's report as a native event, and the reply that ACKs it."""

    event: BanEvent
    echo: bytes  # the report without its token: what the old hub sent back


def parse_report(
    frames: list[bytes], token: str, networks: NetworkLimits, now: float
) -> LegacyReport:
    """Validate one old request (the frames after its envelope); raise ProtocolError why not."""
    if len(frames) != 1:
        raise ProtocolError(f"{len(frames)} frames, expected one")
    if len(frames[0]) > MAX_REPORT:
        raise ProtocolError(f"report is larger than {MAX_REPORT} bytes")
    try:
        text = frames[0].decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("report is not UTF-8 text") from None
    fields = text.split("|")
    expected = "token|hostname|jail|action|ip" if token else "hostname|jail|action|ip"
    if len(fields) != expected.count("|") + 1:
        raise ProtocolError(f"{len(fields)} fields, expected {expected}")
    if token:
        if not hmac.compare_digest(fields[0].encode(), token.encode()):
            raise ProtocolError("wrong token")
        fields = fields[1:]
    hostname, jail, action, ip = fields
    if action.lower() not in _ACTIONS:
        raise ProtocolError("action must be Ban or Unban")
    # bantime None: the old format has none, so the hub's default_bantime applies.
    event = BanEvent.new(hostname, jail, _ACTIONS[action.lower()], ip, now, networks=networks)
    return LegacyReport(event, "|".join(fields).encode())


def format_update(event: BanEvent) -> bytes:
    """A broadcast as old subscribers read it: hostname|jail|Ban|ip or hostname|jail|Unban|ip."""
    verb = "Ban" if event.action == BAN else "Unban"
    return f"{event.node}|{event.jail}|{verb}|{event.ip}".encode()


HANDSHAKE_TIMEOUT = 10.0  # seconds a connection has to greet and say READY
IDLE_TIMEOUT = 600.0  # seconds a connection may stay without a message (an old monitor
# makes one per report; an old subscriber's SUB sends nothing once subscribed: exempt)
MAX_REPORT_FRAMES = 4  # frames kept of an old monitor's message: envelope and report fit
MAX_SUBSCRIPTION = 256  # bytes of an old subscriber's subscription
MAX_SUBSCRIPTIONS = 16  # subscriptions kept per old subscriber
# Connections per endpoint, and per peer address: a few each for old monitors (one per
# report, closed when answered) and old subscribers; a stranger can't hold them all.
MAX_CONNECTIONS = 1024
MAX_PER_ADDRESS = 32
RECEIVE_HWM = 16  # chunks of up to 8 kB queued per connection before libzmq stops reading
# Chunks read per pass of the hub: each is parsed here in Python (a stranger's message of
# 60,000 frames is 240 MB of them), and the nodes' reports wait for the pass to end.
CHUNKS_PER_PASS = 64
# Messages queued per old subscriber, each one pass of the hub's updates in the old format
# (at most 1,000 of about 60 bytes): old subscribers can't see a drop, let alone recover.
LEGACY_SEND_HWM = 256
# Reports held while their senders are past the rate limit: an old monitor waits for its
# answer (REQ sends one request at a time) and never sends a refused report again, so a
# burst of it is held, not refused. Past this many, the old NAK.
MAX_HELD = 1000
STORE_WAIT = 1.0  # seconds an old report waits when the hub could not store it


@dataclass
class Connection:
    """One plain peer on a STREAM socket."""

    zmtp: ZmtpPeer
    address: str
    opened: float
    last: float  # when it last sent a whole message
    subscriptions: set[bytes] = field(default_factory=set)


@dataclass
class Held:
    """An old monitor's report: judged now, or held until its sender's rate limit allows."""

    ident: bytes  # its connection
    delimited: bool  # sent by REQ: the reply goes behind an empty frame too
    message: Message
    address: str
    until: float = 0.0


class PlainPeers:
    """A STREAM socket and the ZMTP connections on it: bytes in, whole messages out, each
    connection's state bounded (zmtp.py), and the number of connections too."""

    def __init__(
        self,
        context: zmq.Context,
        endpoints: list[str],
        peer: Callable[[], ZmtpPeer],
        send_hwm: int,
    ) -> None:
        self.new_peer = peer
        self.socket = context.socket(zmq.STREAM)
        self.socket.linger = 1000
        self.socket.rcvhwm = RECEIVE_HWM
        self.socket.sndhwm = send_hwm
        self.connections: dict[bytes, Connection] = {}  # STREAM routing id -> connection
        self.per_address: Counter[str] = Counter()
        self.refusals = RateLimitedLog(log)
        for endpoint in endpoints:
            try:
                self.socket.bind(endpoint)
            except zmq.ZMQError as error:
                self.socket.close(linger=0)
                raise RuntimeError(f"cannot bind legacy endpoint {endpoint}: {error}") from None

    def receive(self, now: float) -> Iterator[tuple[bytes, Connection, Message]]:
        """Every whole message waiting, with its connection; opens and closes connections."""
        for frames in drain(self.socket, CHUNKS_PER_PASS, copy=False, max_frames=2):
            ident, data = frames[0].bytes, frames[-1].bytes
            connection = self.connections.get(ident)
            if connection is None:
                if not data:  # a connection opened
                    self._open(ident, frames[-1].get("Peer-Address") or "?", now)
                continue
            if not data:  # the peer closed it
                self._forget(ident)
                continue
            try:
                messages = connection.zmtp.feed(data)
            except ZmtpError as error:
                log.debug("closed a legacy connection from %s: %s", connection.address, error)
                self.close(ident)
                continue
            if connection.zmtp.replies:
                self.send(ident, bytes(connection.zmtp.replies))
                connection.zmtp.replies.clear()
            for message in messages:
                connection.last = now
                yield ident, connection, message

    def send(self, ident: bytes, data: bytes) -> bool:
        """Queue bytes for a connection, without blocking: False if its queue is full."""
        return try_send_frames(self.socket, [ident, data])

    def close(self, ident: bytes) -> None:
        self._forget(ident)
        self.send(ident, b"")  # an empty message asks libzmq to close the connection

    def expire(self, now: float) -> None:
        """Close connections that never finished their handshake, and idle ones."""
        for ident, connection in list(self.connections.items()):
            greeting = not connection.zmtp.ready and connection.opened + HANDSHAKE_TIMEOUT <= now
            idle = connection.last + IDLE_TIMEOUT <= now and not connection.subscriptions
            if greeting or idle:
                self.close(ident)

    def _open(self, ident: bytes, address: str, now: float) -> None:
        if len(self.connections) >= MAX_CONNECTIONS or self.per_address[address] >= MAX_PER_ADDRESS:
            self.refusals.warning(
                f"connections {address}", "refused a legacy connection from %s: too many", address
            )
            self.send(ident, b"")
            return
        connection = Connection(self.new_peer(), address, now, now)
        self.connections[ident] = connection
        self.per_address[address] += 1
        self.send(ident, connection.zmtp.hello())

    def _forget(self, ident: bytes) -> None:
        connection = self.connections.pop(ident, None)
        if connection is not None:
            self.per_address[connection.address] -= 1
            if not self.per_address[connection.address]:
                del self.per_address[connection.address]


class LegacyEndpoints:
    """The hub's plain endpoints in the old format; each is None when its key is empty.

    Only a shell: the hub's admission core judges each request (`judge`, given the
    request, the peer's address and the time), and the hub's `commit` stores a batch and
    broadcasts what changed; the replies go out after it. The endpoints speak ZMTP
    themselves on STREAM sockets (zmtp.py), so no message of a stranger is kept whole.
    """

    def __init__(
        self,
        context: zmq.Context,
        settings: PublisherSettings,
        judge: Callable[[list[bytes], str, float], tuple[bytes | None, list[Update]]],
        commit: Callable[[zmq.Socket | None, list[list[bytes]], list[Update], str], None],
        ready_at: Callable[[str, float], float],
    ) -> None:
        self.judge = judge
        self.commit = commit
        self.ready_at = ready_at  # when a sender held back by its rate limit may go on
        self.held: list[Held] = []  # reports waiting for their sender's turn, oldest first
        report_binds = settings.legacy_report_bind
        publish_binds = settings.legacy_publish_bind
        # Old monitors use REQ; the hub answers many of them from its one poll loop.
        self.reports = report_binds and PlainPeers(
            context,
            report_binds,
            lambda: ZmtpPeer(b"ROUTER", _MONITORS, MAX_FRAME, MAX_REPORT_FRAMES),
            LEGACY_SEND_HWM,
        )
        # Every broadcast of the hub in the old format; old subscribers subscribe to "".
        self.broadcaster = publish_binds and PlainPeers(
            context,
            publish_binds,
            lambda: ZmtpPeer(b"PUB", _SUBSCRIBERS, MAX_SUBSCRIPTION, 1),
            LEGACY_SEND_HWM,
        )
        self.dropped = RateLimitedLog(log)
        self.next_expiry = 0.0
        if report_binds or publish_binds:
            log.warning(
                "legacy endpoints (fail2ban-zmq-tools format) open WITHOUT encryption: "
                "reports on %s, updates on %s; bind them to trusted interfaces only",
                " ".join(report_binds) or "(off)",
                " ".join(publish_binds) or "(off)",
            )
        if report_binds and not settings.legacy_token:
            log.warning(
                "legacy_token is empty: anyone who reaches %s can ban and unban",
                " ".join(report_binds),
            )

    def sockets(self) -> list[zmq.Socket]:
        return [peers.socket for peers in (self.reports, self.broadcaster) if peers]

    def register(self, poller: zmq.Poller) -> None:
        for sock in self.sockets():
            poller.register(sock, zmq.POLLIN)

    def handle(self, ready: dict) -> None:
        """What the poll found on the legacy sockets, and the connections' timers."""
        now = time.time()
        if self.held:
            self.handle_held(now)
        if self.reports and self.reports.socket in ready:
            self.handle_reports(now)
        if self.broadcaster and self.broadcaster.socket in ready:
            self.handle_subscriptions(now)
        if now >= self.next_expiry:
            self.next_expiry = now + 1.0
            for peers in (self.reports, self.broadcaster):
                if peers:
                    peers.expire(now)

    def handle_reports(self, now: float | None = None) -> None:
        """Answer every waiting old report, once the accepted ones are committed; broadcast.
        A report past its sender's rate limit is held and answered when its turn comes."""
        now = time.time() if now is None else now
        requests = [
            Held(ident, message.frames[:1] == [b""], message, connection.address)
            for ident, connection, message in self.reports.receive(now)
        ]
        self._answer(requests, now)

    def _answer(self, requests: list[Held], now: float) -> None:
        replies: list[tuple[Held, bytes]] = []
        updates: list[Update] = []
        for held in requests:
            frames = held.message.frames
            request = frames[1:] if held.delimited else frames  # REQ's envelope: b"" first
            if held.message.dropped:
                request = [*request, b""]  # what it held beyond is refused all the same
            reply, judged = self.judge(request, held.address, now)
            if reply is None and len(self.held) < MAX_HELD:
                held.until = self.ready_at(held.address, now)
                self.held.append(held)
                continue
            replies.append((held, reply or LEGACY_NAK))
            updates.extend(judged)
        if not replies:
            return
        if not self.commit([], updates, " (legacy report)"):
            # Not stored (a full disk): an old monitor never sends a report again, so
            # each waits for its answer, judged anew once the hub can store again.
            room = max(0, MAX_HELD - len(self.held))
            for held, _ in replies[:room]:
                held.until = now + STORE_WAIT
                self.held.append(held)
            replies = [(held, LEGACY_NAK) for held, _ in replies[room:]]
        for held, reply in replies:
            data = message_bytes([b"", reply] if held.delimited else [reply])
            self.reports.send(held.ident, data)

    def handle_held(self, now: float) -> None:
        """Judge again the held reports whose senders' turn has come, oldest first."""
        due = [held for held in self.held if held.until <= now]
        if not due:
            return
        self.held = [held for held in self.held if held.until > now]
        live = self.reports.connections
        self._answer([held for held in due if held.ident in live], now)

    def wait_seconds(self, now: float) -> float | None:
        """How soon a held report may be answered; None when none is held."""
        if not self.held:
            return None
        return max(0.0, min(held.until for held in self.held) - now)

    def handle_subscriptions(self, now: float) -> None:
        """Old subscribers' subscriptions: a message of \x01 + prefix, or \x00 + prefix to
        cancel (ZMTP 3.0), or the SUBSCRIBE and CANCEL commands (ZMTP 3.1)."""
        for _, connection, message in self.broadcaster.receive(now):
            body = message.frames[0] if message.frames else b""
            if body[:1] in (b"\x00", b"\x01"):
                self._subscribe(connection, body[:1] == b"\x01", body[1:])
        for connection in self.broadcaster.connections.values():
            for name, data in connection.zmtp.commands:
                if name in (b"SUBSCRIBE", b"CANCEL"):
                    self._subscribe(connection, name == b"SUBSCRIBE", data)
            connection.zmtp.commands.clear()

    @staticmethod
    def _subscribe(connection: Connection, subscribe: bool, prefix: bytes) -> None:
        if not subscribe:
            connection.subscriptions.discard(prefix)
        elif len(connection.subscriptions) < MAX_SUBSCRIPTIONS:
            connection.subscriptions.add(prefix)

    def broadcast(self, events: list[BanEvent]) -> None:
        """A pass's updates to every old subscriber, in one message each: those that match
        its subscriptions, the way PUB filters by prefix."""
        if not self.broadcaster or not events:
            return
        updates = [format_update(event) for event in events]
        framed = b"".join(frame(update) for update in updates)
        for ident, connection in list(self.broadcaster.connections.items()):
            subscriptions = connection.subscriptions
            if not subscriptions or not connection.zmtp.ready:
                continue
            if b"" in subscriptions:
                data = framed
            else:
                data = b"".join(
                    frame(update)
                    for update in updates
                    if any(update.startswith(prefix) for prefix in subscriptions)
                )
            if data and not self.broadcaster.send(ident, data):
                self.dropped.warning(
                    f"behind {connection.address}",
                    "an old subscriber at %s does not keep up: updates dropped",
                    connection.address,
                )

    def close(self) -> None:
        for sock in self.sockets():
            sock.close()


_MONITORS = frozenset({b"REQ", b"DEALER"})  # what old monitors connect with
_SUBSCRIBERS = frozenset({b"SUB", b"XSUB"})
