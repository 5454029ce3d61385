"""Wire protocol v1: the ban event, its strict validation, and the message frames.

Every message is a multipart ZeroMQ message whose first frame is PROTOCOL (or
PACKED) and second frame names the message kind; bodies are strict JSON objects.
The hub sends its update stream twice: under PROTOCOL as it is, and under PACKED
with each list of events zlib-compressed, which is what subscribers take. Nothing
here touches a socket, so every rule is tested without one.
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
import time
import uuid
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field

PROTOCOL = b"F2BZMQ1"
# The update stream again (the same messages, heartbeats included), each update's list
# of events zlib-compressed: a fifth of the bytes for the hub to encrypt and send to
# every subscriber. A PUB/SUB topic matches a prefix; neither name is a prefix of the
# other, so a SUB gets one stream: subscribers from before it keep the plain one.
PACKED = b"F2BZMQZ1"

# Message kinds (second frame).
EVENT = b"event"  # monitor -> publisher: [PROTOCOL, EVENT, event, event, …]
ACK = b"ack"  # publisher -> monitor: [PROTOCOL, ACK, {"id": …}, …], one per event ACKed
NAK = b"nak"  # publisher -> monitor: [PROTOCOL, NAK, {"id": …, "reason": …}, …]
UPDATE = b"update"  # PUB: [PROTOCOL, UPDATE, {"publisher": …, "seq": n}, [event n, event n+1, …]]
HUGZ = b"hugz"  # PUB heartbeat: [PROTOCOL, HUGZ, {"publisher": …, "seq": n}]; PACKED alike
SNAPSHOT_REQUEST = b"icanhaz"  # subscriber -> publisher: [PROTOCOL, SNAPSHOT_REQUEST, {}]
SNAPSHOT_PART = b"snapshot"  # publisher -> subscriber: [PROTOCOL, SNAPSHOT_PART, header, [events]]

BAN = "ban"
UNBAN = "unban"
PERMANENT = -1

MAX_BODY = 4096  # bytes of one event's JSON; a real event is about 250
# Events per update message, all in one frame (a JSON array): the hub's fan-out (a copy
# and, with CURVE, an encryption per frame and subscriber connection) and the nodes'
# receiving are paid per frame, so a burst goes out in few of them.
MAX_UPDATE_EVENTS = 100
MAX_UPDATE = MAX_UPDATE_EVENTS * (MAX_BODY + 1) + 2  # bytes of that frame at most
# The packed stream's updates carry up to a hub's whole pass (1000 events): the fan-out
# is paid per message, and there the bytes are few. Even packed, the largest possible
# (4 MB of events that do not compress) fits the frames a node takes.
MAX_PACKED_EVENTS = 1000
MAX_PACKED = MAX_PACKED_EVENTS * (MAX_BODY + 1) + 2  # bytes of that array inflated, at most
# Events per report, a frame each: a monitor sends what waits in its outbox in few
# messages and the hub answers each report with one ACK message, since the hub pays
# (and with CURVE encrypts) per message. One event per report is the common case.
MAX_REPORT_EVENTS = 100
MAX_REPORT = 48 * 1024  # bytes of a report's event frames together; a single one may be more
MAX_NAME = 64
# fail2ban refuses jail names it can't use in a command line or a chain name; we
# are stricter still: letters, digits and ._- only, so a name is never a path or a flag.
# fullmatch, never match + "$": "$" also matches before a final newline.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_ID = re.compile(r"[0-9a-f]{32}")
_IPV4_MAPPED = ipaddress.ip_network("::ffff:0:0/96")
_FIELDS = {"id", "node", "jail", "action", "ip", "time", "bantime"}
_REQUIRED = {"id", "node", "jail", "action", "ip", "time"}
_JSON = json.JSONDecoder(parse_constant=lambda name: _refuse_constant(name))


@dataclass(frozen=True)
class NetworkLimits:
    """Whether CIDR networks may be banned, and the widest each family may be."""

    allow: bool = True
    min_prefix_v4: int = 24  # no network wider than a /24 (256 addresses)
    min_prefix_v6: int = 48


ANY_NETWORK = NetworkLimits(True, 0, 0)  # for events already accepted under the operator's limits


class ProtocolError(ValueError):
    """A message that breaks the protocol; the text is the reason sent back in a NAK."""


@dataclass(frozen=True)
class BanEvent:
    """One ban or unban of an address in a jail, as reported by one node."""

    id: str
    node: str
    jail: str
    action: str
    ip: str
    time: float
    bantime: int | None = None  # seconds; PERMANENT for ever; None when the origin didn't know
    # The JSON body, once encoded or as received when it needed no change: the hub stores,
    # broadcasts and hands out in snapshots the same bytes, so encodes each event once.
    wire: bytes | None = field(default=None, compare=False, repr=False)

    @classmethod
    def new(
        cls,
        node: str,
        jail: str,
        action: str,
        ip: str,
        when: float | None = None,
        bantime: int | None = None,
        networks: NetworkLimits = NetworkLimits(),
    ) -> BanEvent:
        """Make a validated event with a fresh unique id."""
        event = cls(uuid.uuid4().hex, node, jail, action, ip, when or time.time(), bantime)
        return event.validated(networks)

    def validated(self, networks: NetworkLimits = NetworkLimits()) -> BanEvent:
        """Check every field; return the event with its address in canonical form."""
        if not isinstance(self.id, str) or not _ID.fullmatch(self.id):
            raise ProtocolError("id must be 32 lowercase hex digits")
        check_name(self.node, "node")
        check_name(self.jail, "jail")
        if self.action not in (BAN, UNBAN):
            raise ProtocolError(f"action must be {BAN!r} or {UNBAN!r}")
        ip = canonical_address(self.ip, networks)
        if isinstance(self.time, bool) or not isinstance(self.time, (int, float)):
            raise ProtocolError("time must be a number")
        if not 0 < self.time < 2**33:
            raise ProtocolError("time is out of range")
        if self.bantime is not None and (
            isinstance(self.bantime, bool)
            or not isinstance(self.bantime, int)
            or not (self.bantime == PERMANENT or 0 < self.bantime < 2**31)
        ):
            raise ProtocolError("bantime must be a positive number of seconds or -1")
        if self.action == UNBAN and self.bantime is not None:
            raise ProtocolError("an unban has no bantime")
        if ip == self.ip and type(self.time) is float:
            return self
        time_ = float(self.time)
        return BanEvent(self.id, self.node, self.jail, self.action, ip, time_, self.bantime)

    def expiry(self, default_bantime: int) -> float | None:
        """When this ban ends (unix time), or None for a permanent ban."""
        bantime = default_bantime if self.bantime is None else self.bantime
        return None if bantime == PERMANENT else self.time + bantime

    def encode(self) -> bytes:
        if self.wire is not None:
            return self.wire
        body = {
            "id": self.id,
            "node": self.node,
            "jail": self.jail,
            "action": self.action,
            "ip": self.ip,
            "time": self.time,
        }
        if self.bantime is not None:
            body["bantime"] = self.bantime
        wire = json.dumps(body, separators=(",", ":")).encode()
        object.__setattr__(self, "wire", wire)  # frozen: a cache, not a change of value
        return wire

    @classmethod
    def decode(cls, data: bytes, networks: NetworkLimits = NetworkLimits()) -> BanEvent:
        """Parse and validate an event body; raise ProtocolError with the reason."""
        event, checked = cls._from_object(decode_object(data, MAX_BODY), networks)
        if checked is event:  # the bytes say exactly what the event says
            object.__setattr__(event, "wire", bytes(data))
        return checked

    @classmethod
    def from_object(cls, body: object, networks: NetworkLimits = NetworkLimits()) -> BanEvent:
        """Validate one already parsed event (an item of an update or a snapshot part)."""
        if not isinstance(body, dict):
            raise ProtocolError("an event must be a JSON object")
        return cls._from_object(body, networks)[1]

    @classmethod
    def _from_object(cls, body: dict, networks: NetworkLimits) -> tuple[BanEvent, BanEvent]:
        """The event as given and as validated (the same object when nothing changed)."""
        unknown = set(body) - _FIELDS
        if unknown:
            raise ProtocolError(f"unknown field {sorted(unknown)[0]!r}")
        missing = _REQUIRED - set(body)
        if missing:
            raise ProtocolError(f"missing field {sorted(missing)[0]!r}")
        event = cls(
            body["id"],
            body["node"],
            body["jail"],
            body["action"],
            body["ip"],
            body["time"],
            body.get("bantime"),
        )
        return event, event.validated(networks)

    def describe(self) -> str:
        """fail2ban-style text: '[sshd] Ban 192.0.2.10 from node1'."""
        verb = "Ban" if self.action == BAN else "Unban"
        return f"[{self.jail}] {verb} {self.ip} from {self.node}"


def check_name(value: object, field: str) -> str:
    """A node or jail name: letters, digits and ._- only, at most 64 characters."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ProtocolError(f"{field} must be 1-{MAX_NAME} letters, digits or ._- characters")
    return value


def canonical_address(value: object, networks: NetworkLimits = NetworkLimits()) -> str:
    """Parse an address with ipaddress; networks only in CIDR form and only within the limits."""
    if not isinstance(value, str) or not 2 <= len(value) <= 49:
        raise ProtocolError("ip must be an IPv4 or IPv6 address")
    if "%" in value:
        # A zone index is free text to ipaddress, and a scoped address can't be banned.
        raise ProtocolError(f"ip {value!r} has a zone index")
    if _plain_ipv4(value) is not None:
        return value  # the common case, without ipaddress's cost
    try:
        if "/" not in value:
            address = ipaddress.ip_address(value)
            mapped = getattr(address, "ipv4_mapped", None)
            # fail2ban bans ::ffff:a.b.c.d as a.b.c.d: the allowlists must see it that way.
            return str(mapped or address)
        network = ipaddress.ip_network(value, strict=False)
    except ValueError as error:
        raise ProtocolError(f"ip {value!r} is not an address: {error}") from None
    if network.num_addresses == 1:
        address = network.network_address
        return str(getattr(address, "ipv4_mapped", None) or address)
    if not networks.allow:
        raise ProtocolError("networks are not allowed here")
    widest = networks.min_prefix_v4 if network.version == 4 else networks.min_prefix_v6
    if network.prefixlen < widest:
        raise ProtocolError(f"network {network} is wider than the allowed /{widest}")
    if network.version == 6 and network.overlaps(_IPV4_MAPPED):
        raise ProtocolError(f"network {network} holds IPv4-mapped addresses: write it in IPv4")
    return str(network)


def _plain_ipv4(value: str) -> int | None:
    """The address as an int when `value` is a canonical dotted quad, else None."""
    try:
        packed = socket.inet_pton(socket.AF_INET, value)
    except (OSError, ValueError):  # ValueError: an embedded NUL
        return None
    # inet_pton refuses leading zeros and short forms; the round trip makes sure.
    if socket.inet_ntop(socket.AF_INET, packed) != value:
        return None
    return int.from_bytes(packed, "big")


class Allowlist:
    """Networks never to ban, as integer ranges per family: checked on every event, so cheap."""

    def __init__(self, networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> None:
        self.networks = list(networks)
        self.ranges: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
        for net in self.networks:
            self.ranges[net.version].append((int(net.network_address), int(net.broadcast_address)))

    def covers(self, ip: str) -> bool:
        """True when an allowlisted network holds the address or overlaps the banned network."""
        first = _plain_ipv4(ip)
        if first is not None:
            ranges, last = self.ranges[4], first
        else:
            network = ipaddress.ip_network(ip, strict=False)
            ranges = self.ranges[network.version]
            first, last = int(network.network_address), int(network.broadcast_address)
        for low, high in ranges:  # noqa: SIM110 - a plain loop: any() + generator costs 2x
            if first <= high and low <= last:
                return True
        return False


def peek_id(data: bytes) -> str:
    """The id of a body that failed validation, if it has a well-formed one, for the NAK."""
    try:
        body = decode_object(data, MAX_BODY)
    except ProtocolError:
        return ""
    event_id = body.get("id")
    return event_id if isinstance(event_id, str) and _ID.fullmatch(event_id) else ""


def decode_object(data: bytes, limit: int) -> dict:
    """Strict JSON object of at most `limit` bytes."""
    return _decode_json(data, limit, dict, "a JSON object")


def decode_list(data: bytes, limit: int) -> list:
    """Strict JSON array of at most `limit` bytes (a snapshot part)."""
    return _decode_json(data, limit, list, "a JSON array")


def _decode_json(data: bytes, limit: int, kind: type, name: str):
    if len(data) > limit:
        raise ProtocolError(f"body is larger than {limit} bytes")
    try:
        body = _JSON.decode(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise ProtocolError(f"body is not JSON: {str(error)[:80]}") from None
    if not isinstance(body, kind):
        raise ProtocolError(f"body must be {name}")
    return body


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


def encode_object(body: dict) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


# The two bodies the hub writes for every event, without json.dumps: their values are
# a validated 32-hex id, a fixed outcome word, a uuid hex and an int.
def ack_body(event_id: str, outcome: str) -> bytes:
    return f'{{"id":"{event_id}","outcome":"{outcome}"}}'.encode()


def stream_header(instance: str, sequence: int) -> bytes:
    return f'{{"publisher":"{instance}","seq":{int(sequence)}}}'.encode()


def event_list(events: Iterable[BanEvent]) -> bytes:
    """Events as one JSON array frame, each in the bytes it was stored with."""
    return b"[" + b",".join(event.encode() for event in events) + b"]"


def pack(body: bytes) -> bytes:
    """An update's list of events as the PACKED stream carries it."""
    return zlib.compress(body, 1)  # level 1: 5x smaller on events, at 1 us an event


def unpack(data: bytes, limit: int) -> bytes:
    """A PACKED frame inflated, refused whole when it would pass `limit` bytes (a frame of
    a few kB can inflate to gigabytes), is not zlib, or is cut short or followed by more."""
    inflater = zlib.decompressobj()
    try:
        body = inflater.decompress(data, limit + 1)
    except zlib.error as error:
        raise ProtocolError(f"packed body does not inflate: {error}") from None
    if len(body) > limit:
        raise ProtocolError(f"packed body inflates past {limit} bytes")
    if not inflater.eof:
        raise ProtocolError("packed body is cut short")
    if inflater.unused_data:
        raise ProtocolError("packed body has bytes after its end")
    return body


def split_message(frames: list[bytes], name: bytes = PROTOCOL) -> tuple[bytes, list[bytes]]:
    """Check the protocol frame (PROTOCOL, or `name` on the PACKED stream); return the
    kind and the remaining frames."""
    if len(frames) < 2:
        raise ProtocolError("message has too few frames")
    if frames[0] != name:
        shown = frames[0][:20].decode("ascii", "replace")
        raise ProtocolError(f"unknown protocol {shown!r}, expected {name.decode()}")
    return frames[1], frames[2:]
