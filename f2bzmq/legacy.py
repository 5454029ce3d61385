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
from collections.abc import Callable
from dataclasses import dataclass

import zmq

from .config import PublisherSettings
from .protocol import BAN, UNBAN, BanEvent, NetworkLimits, ProtocolError
from .runtime import drain
from .state import Update

log = logging.getLogger("f2bzmq.legacy")

LEGACY_NAK = b"NAK"  # the old hub's refusal: no reason, just the word
MAX_REPORT = 512  # bytes: a token (at most 256), two names of 64, an action and an address
MAX_FRAME = 4096  # bytes of a frame; ZeroMQ drops a peer that sends more (no reply at all)
DRAIN_LIMIT = 1000  # reports taken per commit, as on the native endpoint
LEGACY_SEND_HWM = 100000  # messages queued per old subscriber: one ban each
ZAP_DOMAIN = b"f2bzmq-legacy"  # how the authenticator's log names these plain connections
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


def split_envelope(frames: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    """A ROUTER message: the envelope to reply with and the request.

    A REQ peer puts an empty delimiter after its identity, and reads only what follows
    the delimiter of the reply; a peer without one gets its reply without one.
    """
    if len(frames) >= 2 and frames[1] == b"":
        return frames[:2], frames[2:]
    return frames[:1], frames[1:]


class LegacyEndpoints:
    """The hub's plain sockets in the old format; each is None when its key is empty.

    Only a shell: the hub's admission core judges each request (`judge`, given the
    request, the peer's address and the time), and the hub's `commit` stores a batch,
    then sends its replies on the socket it names and broadcasts what changed.
    """

    def __init__(
        self,
        context: zmq.Context,
        settings: PublisherSettings,
        judge: Callable[[list[bytes], str, float], tuple[bytes, Update | None]],
        commit: Callable[[zmq.Socket, list[list[bytes]], list[Update], str], None],
    ) -> None:
        self.context = context  # the hub's: its authenticator sees these connections too
        self.judge = judge
        self.commit = commit
        report_binds = settings.legacy_report_bind
        publish_binds = settings.legacy_publish_bind
        # ROUTER, not REP: old monitors use REQ, and a ROUTER lets the hub's one poll loop
        # answer many of them without blocking.
        self.reports = self._socket(zmq.ROUTER, report_binds) if report_binds else None
        # Every broadcast of the hub in the old format; old subscribers subscribe to "".
        self.broadcaster = self._socket(zmq.PUB, publish_binds) if publish_binds else None
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

    def _socket(self, kind: int, endpoints: list[str]) -> zmq.Socket:
        """A plain socket on the hub's context: old clients know no CURVE.

        With a ZAP domain, libzmq asks the hub's authenticator about each plain (NULL)
        connection too; pyzmq's authenticator admits NULL when it has no address lists,
        so old clients get in here while the CURVE sockets still refuse them.
        """
        sock = self.context.socket(kind)
        sock.linger = 1000
        sock.zap_domain = ZAP_DOMAIN
        if kind == zmq.PUB:
            # Old subscribers can't see a drop, let alone recover from one: a deep queue.
            sock.sndhwm = LEGACY_SEND_HWM
        else:
            sock.maxmsgsize = MAX_FRAME
        for endpoint in endpoints:
            try:
                sock.bind(endpoint)
            except zmq.ZMQError as error:
                sock.close(linger=0)
                raise RuntimeError(f"cannot bind legacy endpoint {endpoint}: {error}") from None
        return sock

    def register(self, poller: zmq.Poller) -> None:
        if self.reports is not None:
            poller.register(self.reports, zmq.POLLIN)

    def handle_reports(self) -> None:
        """Answer every waiting old report, once the accepted ones are committed; broadcast."""
        replies: list[list[bytes]] = []
        updates: list[Update] = []
        now = time.time()
        # An old report is one frame behind its envelope: a longer message is cut, not kept.
        for frames in drain(self.reports, DRAIN_LIMIT, copy=False, max_frames=16):
            envelope, request = split_envelope([frame.bytes for frame in frames])
            reply, update = self.judge(request, frames[-1].get("Peer-Address"), now)
            replies.append([*envelope, reply])
            if update is not None:
                updates.append(update)
        self.commit(self.reports, replies, updates, " (legacy report)")

    def broadcast(self, event: BanEvent) -> None:
        if self.broadcaster is not None:
            self.broadcaster.send(format_update(event))

    def close(self) -> None:
        for sock in (self.reports, self.broadcaster):
            if sock is not None:
                sock.close()
