"""Wire protocol v1: the ban event, its strict validation, and every message's frames.

Every message is a multipart ZeroMQ message whose first frame is PROTOCOL (or
PACKED) and second frame names the message kind; bodies are strict JSON objects.
Each kind has its encoder and its decoder here, side by side, and a decoder checks
everything a peer could get wrong before the caller sees a value. The hub sends its
update stream twice: under PROTOCOL as it is, and under PACKED with each list of
events zlib-compressed, which is what subscribers take. Nothing here touches a
socket, so every rule is tested without one.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from .addresses import plain_ipv4

PROTOCOL = b"F2BZMQ1"
# The update stream again (the same messages, heartbeats included), each update's list
# of events zlib-compressed: a fifth of the bytes for the hub to encrypt and send to
# every subscriber. A PUB/SUB topic matches a prefix; neither name is a prefix of the
# other, so a SUB gets one stream: subscribers from before it keep the plain one.
PACKED = b"F2BZMQZ1"

# Message kinds (second frame).
EVENT = b"event"  # monitor -> hub, a report: [PROTOCOL, EVENT, event, event, …]
ACK = b"ack"  # hub -> monitor: [PROTOCOL, ACK, {"id", "outcome"}, …], one per event stored
NAK = b"nak"  # hub -> monitor: [PROTOCOL, NAK, {"id", "reason", "retry"}, …]
UPDATE = b"update"  # PUB: [PROTOCOL, UPDATE, {"publisher": …, "seq": n}, [event n, event n+1, …]]
HUGZ = b"hugz"  # PUB heartbeat: [PROTOCOL, HUGZ, {"publisher": …, "seq": n}]; PACKED alike
SNAPSHOT_REQUEST = b"icanhaz"  # node -> hub: [PROTOCOL, SNAPSHOT_REQUEST, {}]
SNAPSHOT = b"snapshot"  # hub -> node, a part: [PROTOCOL, SNAPSHOT, header, [events]]
# A monitor's bans sent again (after a log rotation, or to a hub with a new state): [PROTOCOL,
# REREPORT, event, …], judged like a report, but a hub never lets them delay fresh events.
REREPORT = b"rereport"
HELLO = b"hello"  # monitor -> hub: [PROTOCOL, HELLO, {"rebuilt", "node", "version"}]; may be {}
WELCOME = b"welcome"  # hub -> monitor: [PROTOCOL, WELCOME, {"publisher", "seq", "young"}]
# hub -> a monitor whose key it does not accept yet: [PROTOCOL, PENDING, {"fingerprint"}]
PENDING = b"pending"
# The admin channel, on the report port with an admin key (or the hub key, between hubs):
ADMIN = b"admin"  # console -> hub: [PROTOCOL, ADMIN, {"verb": …, …}]
RESULT = b"result"  # hub -> console: [PROTOCOL, RESULT, {…}], or {"error": "one line"}
# subscriber -> hub on its snapshot DEALER, every few seconds: where it stands
PRESENCE = b"presence"
# relay -> hub on the snapshot socket: a presence of a node behind the relay, in its name.
# A kind of its own: a hub from before it refuses it instead of reading the relay's own.
RELAYED = b"relayed"
HOLDS = b"holds"  # hub -> subscriber on the snapshot socket: the operators' lifts and holds

BAN = "ban"
UNBAN = "unban"
PERMANENT = -1
# The origin of the bans the hubs decide themselves (cluster-wide failure counts, escalated
# ban times): an ordinary node name on the wire, so subscribers of every release take these
# bans like any other, and one that no node may have (the configuration, keygen and the hub
# refuse it), so every node applies them, the ones that saw the failures too.
CLUSTER = "cluster"

MAX_BODY = 4096  # bytes of one event's JSON; a real event is about 250
# A failure report (see FailureReport) counts up to MAX_FAILURE_ITEMS (jail, address) pairs
# of one node in one body of up to MAX_FAILURE_BODY bytes: an attack's lines go to the hubs
# as few bodies, which the hub decodes and stores as one each.
MAX_FAILURE_ITEMS = 100
MAX_FAILURE_BODY = 24 * 1024  # the longest names and addresses: 17 kB
MAX_FAILURES = 10**6  # failures one item may count
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
SNAPSHOT_EVENTS = 500  # events per snapshot part: about 130 kB
MAX_HEADER = 256  # bytes of an update's, heartbeat's or snapshot part's header
MAX_ANSWER = 4096  # bytes of one ACK or NAK body a monitor reads
# libzmq's maxmsgsize bounds each frame a socket takes; a peer sending a larger one
# is disconnected. The hub takes reports and requests, a node takes the hub's stream
# and snapshot parts: the largest possible packed update (MAX_PACKED of events that do
# not compress) and a snapshot part of SNAPSHOT_EVENTS events of MAX_BODY fit.
MAX_HUB_FRAME = 64 * 1024
MAX_NODE_FRAME = 4 * 1024 * 1024
MAX_NAME = 64
# fail2ban refuses jail names it can't use in a command line or a chain name; we
# are stricter still: letters, digits and ._- only, so a name is never a path or a flag.
# fullmatch, never match + "$": "$" also matches before a final newline.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_ID = re.compile(r"[0-9a-f]{32}")
_IPV4_MAPPED = ipaddress.ip_network("::ffff:0:0/96")
_FIELDS = {"id", "node", "jail", "action", "ip", "time", "bantime"}
_REQUIRED = {"id", "node", "jail", "action", "ip", "time"}
_JSON = json.JSONDecoder(
    parse_constant=lambda name: _refuse_constant(name),
    object_pairs_hook=lambda pairs: _unique_fields(pairs),
)


@dataclass(frozen=True)
class NetworkLimits:
    """Whether CIDR networks may be banned, and the widest each family may be."""

    allow: bool = True
    min_prefix_v4: int = 24  # no network wider than a /24 (256 addresses)
    min_prefix_v6: int = 48


ANY_NETWORK = NetworkLimits(True, 0, 0)  # for events already accepted under the operator's limits
# The widest networks a hub may be set to accept ([general] min_prefix_v4/v6 go no lower):
# what a node decodes the hub's messages with. A node with stricter limits refuses the
# single ban in its own rules, so one ban never costs it a whole update or snapshot part.
WIRE_LIMITS = NetworkLimits(True, 8, 16)


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
    # The canonical JSON body, once encoded: the hub stores, broadcasts and hands out in
    # snapshots the same bytes, so encodes each event once.
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
        """The one canonical encoding: json.dumps of the fields in this order, without
        blanks. Written without json.dumps (a fifth of its cost): in a validated event no
        character of any field needs escaping, and json writes a float with repr()."""
        if self.wire is not None:
            return self.wire
        bantime = "" if self.bantime is None else f',"bantime":{self.bantime}'
        wire = (
            f'{{"id":"{self.id}","node":"{self.node}","jail":"{self.jail}",'
            f'"action":"{self.action}","ip":"{self.ip}","time":{self.time!r}{bantime}}}'
        ).encode()
        object.__setattr__(self, "wire", wire)  # frozen: a cache, not a change of value
        return wire

    @classmethod
    def decode(cls, data: bytes, networks: NetworkLimits = NetworkLimits()) -> BanEvent:
        """Parse and validate an event body; raise ProtocolError with the reason.

        The event keeps no received bytes: what the hub stores and relays is its canonical
        encoding, so blanks, escapes or a field order of the sender's choosing never
        reach the other nodes (kilobytes of blanks would be paid in every snapshot)."""
        return cls._from_object(decode_object(data, MAX_BODY), networks)

    @classmethod
    def from_object(cls, body: object, networks: NetworkLimits = NetworkLimits()) -> BanEvent:
        """Validate one already parsed event (an item of an update or a snapshot part)."""
        if not isinstance(body, dict):
            raise ProtocolError("an event must be a JSON object")
        return cls._from_object(body, networks)

    @classmethod
    def _from_object(cls, body: dict, networks: NetworkLimits) -> BanEvent:
        """The event of a parsed body, validated."""
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
        return event.validated(networks)

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
    if plain_ipv4(value) is not None:
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


class FailureCount(NamedTuple):
    """How often a node's fail2ban found one address failing in one of its jails, and the
    times of the first and the last of those failures (fail2ban's "Found" lines)."""

    jail: str
    ip: str
    failures: int
    first: float
    last: float


@dataclass(frozen=True)
class FailureReport:
    """A node's failure counts of a short while, for the hubs' cluster-wide detection: a body
    of its own kind in a report, with an id of its own, ACKed like an event. A hub older than
    this kind refuses it (an unknown field) and the monitor drops it, as it should.

    Wire: {"id": 32 hex, "node": name, "failures": [[jail, ip, count, first, last], …]}."""

    id: str
    node: str
    failures: tuple[FailureCount, ...]
    wire: bytes | None = field(default=None, compare=False, repr=False)  # as received

    @classmethod
    def new(cls, node: str, failures: Iterable[FailureCount]) -> FailureReport:
        return cls(uuid.uuid4().hex, node, tuple(failures))

    def encode(self) -> bytes:
        if self.wire is not None:
            return self.wire
        items = [list(item) for item in self.failures]
        return encode_object({"id": self.id, "node": self.node, "failures": items})

    @classmethod
    def from_object(cls, body: dict, networks: NetworkLimits = NetworkLimits()) -> FailureReport:
        unknown = set(body) - {"id", "node", "failures"}
        if unknown:
            raise ProtocolError(f"unknown field {sorted(unknown)[0]!r}")
        event_id, items = body.get("id"), body.get("failures")
        if not isinstance(event_id, str) or not _ID.fullmatch(event_id):
            raise ProtocolError("id must be 32 lowercase hex digits")
        node = check_name(body.get("node"), "node")
        if not isinstance(items, list) or not 1 <= len(items) <= MAX_FAILURE_ITEMS:
            raise ProtocolError(f"failures must be a list of 1-{MAX_FAILURE_ITEMS} items")
        return cls(event_id, node, tuple(_failure_count(item, networks) for item in items))

    def total(self) -> int:
        return sum(item.failures for item in self.failures)


def _failure_count(item: object, networks: NetworkLimits) -> FailureCount:
    """One [jail, ip, count, first, last] item, checked like an event's fields. An attack
    is a failure each: the common case (int or float times, a jail name seen before) costs
    a few type checks."""
    if type(item) is not list or len(item) != 5:
        raise ProtocolError("a failure is [jail, ip, count, first, last]")
    jail, ip, count, first, last = item
    if jail not in _JAILS_SEEN:
        check_name(jail, "jail")
        if len(_JAILS_SEEN) < 1000:
            _JAILS_SEEN.add(jail)
    if type(count) is not int or not 1 <= count <= MAX_FAILURES:
        raise ProtocolError(f"a failure count must be 1-{MAX_FAILURES}")
    if type(first) not in (int, float) or type(last) not in (int, float):
        raise ProtocolError("a failure's times must be numbers")
    if not 0 < first <= last < 2**33:
        if first > last:
            raise ProtocolError("a failure's first time is after its last")
        raise ProtocolError("a failure's time is out of range")
    return FailureCount(jail, canonical_address(ip, networks), count, float(first), float(last))


_JAILS_SEEN: set[str] = set()  # valid jail names met in failure reports, for the check above


def decode_body(data: bytes, networks: NetworkLimits = NetworkLimits()) -> BanEvent | FailureReport:
    """One body of a report: a ban event, or a failure report (it has "failures")."""
    body = decode_object(data, MAX_FAILURE_BODY)
    if "failures" in body:
        report = FailureReport.from_object(body, networks)
        object.__setattr__(report, "wire", bytes(data))  # the hub stores it as it came
        return report
    if len(data) > MAX_BODY:
        raise ProtocolError(f"body is larger than {MAX_BODY} bytes")
    return BanEvent._from_object(body, networks)  # its canonical encoding, not these bytes


def peek_id(data: bytes) -> str:
    """The id of a body that failed validation, if it has a well-formed one, for the NAK."""
    try:
        body = decode_object(data, MAX_FAILURE_BODY)
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


def _unique_fields(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object whose every name is given once: of two "ip" fields, a reader that
    takes the first and one that takes the last would see two different events."""
    body = dict(pairs)
    if len(body) != len(pairs):
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                raise ValueError(f"field {name[:40]!r} is given twice")
            seen.add(name)
    return body


def encode_object(body: dict) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


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


def split_message(frames: Sequence[bytes], name: bytes = PROTOCOL) -> tuple[bytes, list[bytes]]:
    """Check the protocol frame (PROTOCOL, or `name` on the PACKED stream); return the
    kind and the remaining frames."""
    if len(frames) < 2:
        raise ProtocolError("message has too few frames")
    if frames[0] != name:
        shown = frames[0][:20].decode("ascii", "replace")
        raise ProtocolError(f"unknown protocol {shown!r}, expected {name.decode()}")
    return frames[1], list(frames[2:])


# Reports: a monitor's events to a hub, each judged on its own.


def encode_report(bodies: Iterable[bytes], rereport: bool = False) -> list[bytes]:
    return [PROTOCOL, REREPORT if rereport else EVENT, *bodies]


def decode_report(frames: Sequence[bytes]) -> list[bytes]:
    """The event bodies of a report or a re-report; ProtocolError when it can't be taken
    at all."""
    kind, bodies = split_message(frames)
    if kind not in (EVENT, REREPORT) or not 1 <= len(bodies) <= MAX_REPORT_EVENTS:
        raise ProtocolError(f"expected 1-{MAX_REPORT_EVENTS} {EVENT.decode()} bodies")
    return bodies


def is_rereport(frames: Sequence[bytes]) -> bool:
    """A report of bans the node sent before (see REREPORT), once decode_report took it."""
    return len(frames) > 1 and frames[1] == REREPORT


# Greetings: a monitor learns each hub's state id, even with nothing to report, so it can
# report its node's bans again to a hub that lost its table.


def encode_hello(
    rebuilt: str | None = None, node: str | None = None, version: str | None = None
) -> list[bytes]:
    """`rebuilt`: the hub state this node has re-reported every ban it holds to, if any;
    `node` and `version`: who says hello, for a hub that does not know the key yet and for
    its list of nodes (hubs before them ignore both)."""
    body = {"rebuilt": rebuilt, "node": node, "version": version}
    return [PROTOCOL, HELLO, encode_object({k: v for k, v in body.items() if v is not None})]


def is_hello(frames: Sequence[bytes]) -> bool:
    return len(frames) > 1 and frames[0] == PROTOCOL and frames[1] == HELLO


def decode_hello(frames: Sequence[bytes]) -> str | None:
    """The state id the node says it has rebuilt, or None; ProtocolError if not a hello.
    Keys this version does not know are ignored, so a later monitor can say more."""
    rebuilt = _hello_body(frames).get("rebuilt")
    if rebuilt is not None and (not isinstance(rebuilt, str) or not _ID.fullmatch(rebuilt)):
        raise ProtocolError("a hello's rebuilt must be a state id")
    return rebuilt


def hello_sender(frames: Sequence[bytes]) -> tuple[str | None, str | None]:
    """The node name and version a hello gives (monitors before them give neither); each
    None when absent or malformed: a hello is answered all the same."""
    body = _hello_body(frames)
    node, version = body.get("node"), body.get("version")
    try:
        node = None if node is None else check_name(node, "node")
    except ProtocolError:
        node = None
    return node, _version_or_none(version)


def _hello_body(frames: Sequence[bytes]) -> dict:
    kind, rest = split_message(frames)
    if kind != HELLO or len(rest) != 1:
        raise ProtocolError("expected a hello with one body")
    return decode_object(rest[0], MAX_HEADER)


@dataclass(frozen=True)
class Welcome:
    """A hub's answer to a hello: its state id, last sequence, and whether that state is
    young (new and not yet rebuilt by the nodes and its peers)."""

    publisher: str
    seq: int
    young: bool


def encode_welcome(instance: str, sequence: int, young: bool) -> list[bytes]:
    return [PROTOCOL, WELCOME, stream_header(instance, sequence, young)]


def is_welcome(frames: Sequence[bytes]) -> bool:
    return len(frames) > 1 and frames[0] == PROTOCOL and frames[1] == WELCOME


def decode_welcome(frames: Sequence[bytes]) -> Welcome:
    kind, rest = split_message(frames)
    if kind != WELCOME or len(rest) != 1:
        raise ProtocolError("expected a welcome with one header")
    header = decode_object(rest[0], MAX_HEADER)
    publisher, sequence = _header(header, "welcome")
    return Welcome(publisher, sequence, _young(header))


# Replies: a hub's answer to a report, one ACK message for the events it stored and one
# NAK message for the events it refused.


@dataclass(frozen=True)
class Answer:
    """What a hub said of one event: stored (with the outcome) or refused (with the reason)."""

    id: str  # "" when the hub could not tell which event it refuses
    stored: bool
    outcome: str = ""  # a state.Outcome value, when stored
    reason: str = ""  # why not, when refused
    retry: bool = False  # refused for now (the hub throttles this node): send again later


# The two bodies the hub writes for every event, without json.dumps: their values are
# a validated 32-hex id and a fixed outcome word.
def ack_body(event_id: str, outcome: str) -> bytes:
    return f'{{"id":"{event_id}","outcome":"{outcome}"}}'.encode()


def nak_body(event_id: str, reason: str, retry: bool = False) -> bytes:
    return encode_object({"id": event_id, "reason": reason, "retry": retry})


def encode_replies(acks: Sequence[bytes], naks: Sequence[bytes]) -> list[list[bytes]]:
    """The reply messages to one report: an ACK message and a NAK message, each if needed."""
    return [[PROTOCOL, kind, *bodies] for kind, bodies in ((ACK, acks), (NAK, naks)) if bodies]


def decode_reply(frames: Sequence[bytes]) -> tuple[list[Answer], list[str]]:
    """The answers in one reply message, and why each unreadable body was skipped;
    ProtocolError when the message is not a reply at all."""
    kind, bodies = split_message(frames)
    if kind not in (ACK, NAK) or not bodies:
        raise ProtocolError("expected an ack or a nak")
    answers, problems = [], []
    for data in bodies[:MAX_REPORT_EVENTS]:
        try:
            body = decode_object(data, MAX_ANSWER)
        except ProtocolError as error:
            problems.append(str(error))
            continue
        event_id = body.get("id")
        if not isinstance(event_id, str) or not _ID.fullmatch(event_id):
            event_id = ""
        if kind == ACK:
            answers.append(Answer(event_id, True, outcome=str(body.get("outcome", ""))[:40]))
        else:
            reason = str(body.get("reason", "no reason given"))[:200]
            answers.append(Answer(event_id, False, reason=reason, retry=body.get("retry") is True))
    return answers, problems


# The update stream: updates and heartbeats, each naming the hub's state and a sequence.


@dataclass(frozen=True)
class StreamMessage:
    """An update (its events numbered from `seq` on) or a heartbeat (no events; `seq` is
    the hub's last sequence), from the hub state `publisher`."""

    publisher: str  # the hub state's id: a new one means the hub lost its state
    seq: int
    events: list[BanEvent]
    young: bool = False  # that state is new and still being rebuilt: it may lack bans

    @property
    def heartbeat(self) -> bool:
        return not self.events


def stream_header(instance: str, sequence: int, young: bool = False) -> bytes:
    # Without json.dumps: the values are a uuid hex and an int. "young" only when it is:
    # decoders before it ignore a key they do not know, and the common header stays short.
    extra = ',"young":true' if young else ""
    return f'{{"publisher":"{instance}","seq":{int(sequence)}{extra}}}'.encode()


def encode_update(
    instance: str, first: int, events: Iterable[BanEvent], packed: bool, young: bool = False
) -> list:
    """One update message of up to MAX_UPDATE_EVENTS (plain) or MAX_PACKED_EVENTS events."""
    body = event_list(events)
    header = stream_header(instance, first, young)
    if packed:
        return [PACKED, UPDATE, header, pack(body)]
    return [PROTOCOL, UPDATE, header, body]


def encode_heartbeat(
    instance: str, sequence: int, packed: bool, young: bool = False
) -> list[bytes]:
    return [PACKED if packed else PROTOCOL, HUGZ, stream_header(instance, sequence, young)]


def decode_stream(
    frames: Sequence[bytes], networks: NetworkLimits = NetworkLimits(), stream: bytes = PACKED
) -> StreamMessage:
    """An update or heartbeat of `stream`, all or nothing: an update taken in part would
    look like a gap, and a gap costs a snapshot."""
    kind, rest = split_message(frames, stream)
    if kind not in (UPDATE, HUGZ):
        raise ProtocolError(f"unexpected {kind[:20]!r} on the update stream")
    if not rest:
        raise ProtocolError("header lacks publisher or seq")
    header = decode_object(rest[0], MAX_HEADER)
    publisher, sequence = _header(header, "header")
    young = _young(header)
    if kind == HUGZ:
        return StreamMessage(publisher, sequence, [], young)
    if len(rest) != 2:
        raise ProtocolError("an update has a header and one list of events")
    if stream == PACKED:
        body, limit, most = unpack(rest[1], MAX_PACKED), MAX_PACKED, MAX_PACKED_EVENTS
    else:
        body, limit, most = rest[1], MAX_UPDATE, MAX_UPDATE_EVENTS
    items = decode_list(body, limit)
    if not 1 <= len(items) <= most:
        raise ProtocolError(f"an update has 1-{most} events")
    events = [BanEvent.from_object(item, networks) for item in items]
    return StreamMessage(publisher, sequence, events, young)


def _header(header: dict, what: str) -> tuple[str, int]:
    """The hub state id and the sequence number of a stream or snapshot header."""
    publisher, sequence = header.get("publisher"), header.get("seq")
    if not isinstance(publisher, str) or type(sequence) is not int:
        raise ProtocolError(f"{what} lacks publisher or seq")
    if not _ID.fullmatch(publisher) or sequence < 0:
        raise ProtocolError(f"{what} has a malformed publisher or seq")
    return publisher, sequence


def _young(header: dict) -> bool:
    return header.get("young") is True


# Snapshots: a node asks a hub for its whole table, the hub answers in parts.


def encode_snapshot_request() -> list[bytes]:
    return [PROTOCOL, SNAPSHOT_REQUEST, b"{}"]


def decode_snapshot_request(frames: Sequence[bytes]) -> None:
    """Nothing to return: a request carries no field; ProtocolError when it is not one."""
    kind, _ = split_message(frames)
    if kind != SNAPSHOT_REQUEST:
        raise ProtocolError(f"expected {SNAPSHOT_REQUEST.decode()}")


@dataclass(frozen=True)
class SnapshotPart:
    """One part of a hub's table at sequence `seq`; the table is whole after the `last` one."""

    publisher: str
    seq: int
    number: int
    last: bool
    events: list[BanEvent]
    young: bool = False  # see StreamMessage
    presence: bool = False  # the hub takes PRESENCE messages on its snapshot port
    relayed: bool = False  # and RELAYED ones (a hub does, a relay does not)


def encode_snapshot(
    instance: str,
    sequence: int,
    events: Sequence[BanEvent],
    young: bool = False,
    presence: bool = False,
    relayed: bool = False,
) -> Iterator[list]:
    """The parts of a snapshot of `events` at `sequence`; an empty table is one empty part.
    `presence`: the hub says in each header that it takes PRESENCE messages, so a subscriber
    sends them to no hub before them; `relayed`: RELAYED ones too, so a relay sends them to
    a hub that takes them, and not to another relay."""
    starts = range(0, len(events), SNAPSHOT_EVENTS) or [0]
    for number, start in enumerate(starts):
        last = number == len(starts) - 1
        part = events[start : start + SNAPSHOT_EVENTS]
        yield encode_snapshot_part(instance, sequence, number, last, part, young, presence, relayed)


def encode_snapshot_part(
    instance: str,
    sequence: int,
    number: int,
    last: bool,
    events: Iterable[BanEvent],
    young: bool = False,
    presence: bool = False,
    relayed: bool = False,
) -> list[bytes]:
    """Part `number` of a snapshot at `sequence` (SNAPSHOT_EVENTS events at most), from a
    hub whose table is still `young` (rebuilt after it lost its state). `presence` and
    `relayed`: see encode_snapshot."""
    header = {"publisher": instance, "seq": sequence, "part": number, "last": last}
    if young:
        header["young"] = True
    if presence:
        header["presence"] = True
    if relayed:
        header["relayed"] = True
    return [PROTOCOL, SNAPSHOT, encode_object(header), event_list(events)]


def decode_snapshot_part(
    frames: Sequence[bytes], networks: NetworkLimits = NetworkLimits()
) -> SnapshotPart:
    """A part, whole or not at all: a part with one event missing would read as "the
    cluster lifted that ban"."""
    kind, rest = split_message(frames)
    if kind != SNAPSHOT or len(rest) != 2:
        raise ProtocolError("expected a snapshot part")
    header = decode_object(rest[0], MAX_HEADER)
    publisher, sequence = _header(header, "snapshot header")
    number, last = header.get("part", 0), header.get("last")
    if isinstance(number, bool) or not isinstance(number, int) or not isinstance(last, bool):
        raise ProtocolError("snapshot header lacks part or last")
    items = decode_list(rest[1], MAX_NODE_FRAME)
    events = [BanEvent.from_object(item, networks) for item in items]
    takes, relayed = header.get("presence") is True, header.get("relayed") is True
    return SnapshotPart(publisher, sequence, number, last, events, _young(header), takes, relayed)


# The admin channel: operators' requests and the hub's results, on the report port. The
# request's fields are checked here by type and size; what they mean (an address within
# the limits, a jail the cluster knows) is the operator core's to judge.

OPERATOR_PREFIX = "operator."  # an operator's origin in the ban table and on the wire
MAX_OPERATOR = MAX_NAME - len(OPERATOR_PREFIX)  # characters of an admin key's name
MAX_REASON = 200  # characters of an operator's reason
MAX_ADMIN_ITEMS = 500  # addresses in one ban request: an import goes in several
MAX_RESULT = 64 * 1024 * 1024  # bytes of one result a console takes
MAX_VERSION = 32
_Z85 = re.compile(r"[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}")
_VERSION = re.compile(r"[0-9A-Za-z.+~_-]{1,32}")


def operator_origin(operator: str) -> str:
    """The ban table's origin name of an operator's bans: `operator.alice`. A valid node
    name on the wire (subscribers of every release take it), reserved: no node has it."""
    return OPERATOR_PREFIX + operator


def is_operator_origin(node: str) -> bool:
    return node.startswith(OPERATOR_PREFIX)


def check_operator(value: object) -> str:
    name = check_name(value, "operator")
    if len(name) > MAX_OPERATOR:
        raise ProtocolError(f"an operator's name has at most {MAX_OPERATOR} characters")
    return name


def check_reason(value: object) -> str:
    if not isinstance(value, str) or len(value) > MAX_REASON or not value.isprintable():
        raise ProtocolError(f"a reason is at most {MAX_REASON} printable characters")
    return value


def check_public_key(value: object) -> str:
    """A CURVE public key as its z85 text (40 characters), the way NODE.key writes it."""
    if not isinstance(value, str) or not _Z85.fullmatch(value):
        raise ProtocolError("a key must be 40 characters of z85 text")
    return value


def _version_or_none(value: object) -> str | None:
    return value if isinstance(value, str) and _VERSION.fullmatch(value) else None


def _text(limit: int) -> Callable[[object], object]:
    def check(value: object) -> str:
        if not isinstance(value, str) or not 1 <= len(value) <= limit or not value.isprintable():
            raise ProtocolError(f"must be 1-{limit} printable characters")
        return value

    return check


def _whole(low: int, high: int) -> Callable[[object], object]:
    def check(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ProtocolError(f"must be a whole number in {low}..{high}")
        return value

    return check


def _seconds(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 2**31:
        raise ProtocolError("must be a number of seconds")
    return float(value)


def _bantime(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError("a bantime must be whole seconds, -1 for ever, or null")
    if not (value == PERMANENT or 0 < value < 2**31):
        raise ProtocolError("a bantime must be whole seconds, -1 for ever, or null")
    return value


def _ban_items(value: object) -> list[tuple[str, int | None]]:
    """[[address, bantime or null], …]: what one ban request bans."""
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_ADMIN_ITEMS:
        raise ProtocolError(f"must list 1-{MAX_ADMIN_ITEMS} addresses")
    items = []
    for item in value:
        if not isinstance(item, list) or len(item) != 2:
            raise ProtocolError("each item must be [address, bantime]")
        items.append((_text(49)(item[0]), _bantime(item[1])))
    return items


def _name_of(field: str) -> Callable[[object], object]:
    return lambda value: check_name(value, field)


def _state_id(value: object) -> str:
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise ProtocolError("must be a state id")
    return value


_IP_FIELD = _text(49)
# verb -> (required fields, every field's check)
ADMIN_VERBS: dict[str, tuple[set[str], dict[str, Callable[[object], object]]]] = {
    "bans": (
        set(),
        {
            "jail": _name_of("jail"),
            "node": _name_of("node"),
            "ip": _IP_FIELD,
            "offset": _whole(0, 2**31),
        },
    ),
    "ban": ({"items"}, {"items": _ban_items, "jail": _name_of("jail"), "reason": check_reason}),
    "unban": (
        {"ip"},
        {"ip": _IP_FIELD, "jail": _name_of("jail"), "hold": _seconds, "reason": check_reason},
    ),
    "nodes": (set(), {}),
    "pending": (set(), {}),
    "accept": (
        {"node"},
        {"node": _name_of("node"), "fingerprint": _text(100), "reason": check_reason},
    ),
    "remove": ({"node"}, {"node": _name_of("node"), "reason": check_reason}),
    "allowlist": (set(), {}),
    "allow": ({"ip"}, {"ip": _IP_FIELD, "reason": check_reason}),
    "disallow": ({"ip"}, {"ip": _IP_FIELD, "reason": check_reason}),
    # A peer hub, or `history`: the decisions after row `since` of the hub's log.
    "decisions": (set(), {"since": _whole(0, 2**62), "state": _state_id}),
}


@dataclass(frozen=True)
class AdminRequest:
    """One operator request: a verb of ADMIN_VERBS and its checked fields."""

    verb: str
    args: dict


def encode_admin(verb: str, **args: object) -> list[bytes]:
    body = {"verb": verb, **{key: value for key, value in args.items() if value is not None}}
    return [PROTOCOL, ADMIN, encode_object(body)]


def is_admin(frames: Sequence[bytes]) -> bool:
    return len(frames) > 1 and frames[0] == PROTOCOL and frames[1] == ADMIN


def decode_admin(frames: Sequence[bytes]) -> AdminRequest:
    """A request whole, or ProtocolError saying which field is wrong."""
    kind, rest = split_message(frames)
    if kind != ADMIN or len(rest) != 1:
        raise ProtocolError("expected an admin request with one body")
    body = decode_object(rest[0], MAX_HUB_FRAME)
    verb = body.pop("verb", None)
    if verb not in ADMIN_VERBS:
        raise ProtocolError(f"unknown verb {str(verb)[:20]!r}")
    required, checks = ADMIN_VERBS[verb]
    unknown = set(body) - set(checks)
    if unknown:
        raise ProtocolError(f"{verb}: unknown field {sorted(unknown)[0]!r}")
    missing = required - set(body)
    if missing:
        raise ProtocolError(f"{verb}: missing field {sorted(missing)[0]!r}")
    args = {}
    for key, value in body.items():
        try:
            args[key] = checks[key](value)
        except ProtocolError as error:
            raise ProtocolError(f"{verb}: {key} {error}") from None
    return AdminRequest(verb, args)


def encode_result(body: dict) -> list[bytes]:
    return [PROTOCOL, RESULT, json.dumps(body, separators=(",", ":"), default=str).encode()]


def encode_error(reason: str) -> list[bytes]:
    return encode_result({"error": reason})


def decode_result(frames: Sequence[bytes]) -> dict:
    """The hub's result; {"error": …} when it refused the request."""
    kind, rest = split_message(frames)
    if kind != RESULT or len(rest) != 1:
        raise ProtocolError("expected a result with one body")
    return decode_object(rest[0], MAX_RESULT)


# Operator decisions: what the hub that took one stores (the audit log), applies like an
# event, and hands to its peer hubs, which apply it the same way.

DECISION_VERBS = ("ban", "unban", "allow", "disallow", "accept", "remove")
_DECISION_FIELDS = {
    "ban": ({"ip", "jail", "bantime"}, set()),
    "unban": ({"ip"}, {"jail", "hold"}),
    "allow": ({"ip"}, set()),
    "disallow": ({"ip"}, set()),
    "accept": ({"node", "key"}, set()),
    "remove": ({"node"}, {"key"}),
}  # verb -> (its fields required, its fields optional)
_DECISION_COMMON = {"id", "operator", "verb", "time", "reason"}


@dataclass(frozen=True)
class Decision:
    """One decision of an operator: ban or unban an address (an unban may hold it for a
    while), add a network to the hub's allowlist or take it out, accept or remove a node."""

    id: str
    operator: str  # the admin key's name
    verb: str
    time: float
    ip: str | None = None  # ban, unban, allow, disallow: canonical address or network
    jail: str | None = None  # ban; unban: None lifts it in every jail
    bantime: int | None = None  # ban: seconds, PERMANENT for ever
    hold: float = 0.0  # unban: seconds no ban of it is taken again
    node: str | None = None  # accept, remove
    key: str | None = None  # accept: the node's public key, z85
    reason: str = ""

    @classmethod
    def new(cls, operator: str, verb: str, when: float, **fields: object) -> Decision:
        """A checked decision with a fresh id."""
        return cls(uuid.uuid4().hex, operator, verb, when, **fields).validated()

    @property
    def origin(self) -> str:
        return operator_origin(self.operator)

    def validated(self) -> Decision:
        if not isinstance(self.id, str) or not _ID.fullmatch(self.id):
            raise ProtocolError("id must be 32 lowercase hex digits")
        check_operator(self.operator)
        if self.verb not in DECISION_VERBS:
            raise ProtocolError(f"unknown decision {str(self.verb)[:20]!r}")
        if isinstance(self.time, bool) or not isinstance(self.time, (int, float)):
            raise ProtocolError("time must be a number")
        if not 0 < self.time < 2**33:
            raise ProtocolError("time is out of range")
        check_reason(self.reason)
        required, optional = _DECISION_FIELDS[self.verb]
        fields = ("ip", "jail", "bantime", "node", "key")
        present = {name for name in fields if getattr(self, name) is not None}
        present |= {"hold"} if self.hold else set()
        if present - required - optional:
            raise ProtocolError(f"a {self.verb} has no {sorted(present - required - optional)[0]}")
        if required - present:
            raise ProtocolError(f"a {self.verb} needs {sorted(required - present)[0]}")
        if self.ip is not None and canonical_address(self.ip, ANY_NETWORK) != self.ip:
            raise ProtocolError(f"ip {self.ip!r} is not in canonical form")
        if self.jail is not None:
            check_name(self.jail, "jail")
        if self.bantime is not None:
            _bantime(self.bantime)
        _seconds(self.hold)
        if self.node is not None:
            check_name(self.node, "node")
        if self.key is not None:
            check_public_key(self.key)
        return self

    def until(self) -> float | None:
        """Until when it matters, for the log's pruning: a ban until its expiry (None: for
        ever), an unban as long as its hold; the others always."""
        if self.verb == "ban":
            return None if self.bantime == PERMANENT else self.time + self.bantime
        if self.verb == "unban":
            return self.time + self.hold
        return None

    def to_object(self) -> dict:
        body = {"id": self.id, "operator": self.operator, "verb": self.verb, "time": self.time}
        for name in ("ip", "jail", "bantime", "node", "key"):
            if getattr(self, name) is not None:
                body[name] = getattr(self, name)
        if self.hold:
            body["hold"] = self.hold
        if self.reason:
            body["reason"] = self.reason
        return body

    def encode(self) -> bytes:
        return encode_object(self.to_object())

    @classmethod
    def from_object(cls, body: object) -> Decision:
        if not isinstance(body, dict):
            raise ProtocolError("a decision must be a JSON object")
        verb = body.get("verb")
        if verb not in _DECISION_FIELDS:
            raise ProtocolError(f"unknown decision {str(verb)[:20]!r}")
        required, optional = _DECISION_FIELDS[verb]
        unknown = set(body) - _DECISION_COMMON - required - optional
        if unknown:
            raise ProtocolError(f"unknown field {sorted(unknown)[0]!r}")
        missing = ({"id", "operator", "time"} | required) - set(body)
        if missing:
            raise ProtocolError(f"missing field {sorted(missing)[0]!r}")
        fields = {name: body[name] for name in body if name not in ("id", "operator", "verb")}
        return cls(body["id"], body["operator"], verb, **fields).validated()

    @classmethod
    def decode(cls, data: bytes) -> Decision:
        return cls.from_object(decode_object(data, MAX_BODY))

    def describe(self) -> str:
        """A log line's words: 'operator alice: unban 192.0.2.10 in every jail, hold 1h'."""
        what = {
            "ban": f"ban {self.ip} in {self.jail} for {self.bantime} s",
            "unban": f"unban {self.ip} in {self.jail or 'every jail'}"
            + (f", held {self.hold:g} s" if self.hold else ""),
            "allow": f"allowlist add {self.ip}",
            "disallow": f"allowlist remove {self.ip}",
            "accept": f"accept node {self.node}",
            "remove": f"remove node {self.node}",
        }[self.verb]
        return f"operator {self.operator}: {what}" + (f" ({self.reason})" if self.reason else "")


# Enrolment: a monitor whose key the hub does not accept yet hears why.


def encode_pending(fingerprint: str) -> list[bytes]:
    return [PROTOCOL, PENDING, encode_object({"fingerprint": fingerprint})]


def is_pending(frames: Sequence[bytes]) -> bool:
    return len(frames) > 1 and frames[0] == PROTOCOL and frames[1] == PENDING


def decode_pending(frames: Sequence[bytes]) -> str:
    """The fingerprint of this node's key as the hub computed it."""
    kind, rest = split_message(frames)
    if kind != PENDING or len(rest) != 1:
        raise ProtocolError("expected a pending answer with one body")
    fingerprint = decode_object(rest[0], MAX_HEADER).get("fingerprint")
    return _text(100)(fingerprint)


# Presence: each subscriber tells each hub where it stands, so the hub can list its nodes
# (connected, synced, how far behind) and send it the operators' holds it lacks.

MAX_PRESENCE_JAILS = 200  # jail names a node lists


@dataclass(frozen=True)
class Presence:
    publisher: str | None  # the hub state the node follows, None before a snapshot
    seq: int  # the last sequence it applied
    synced: bool
    version: str | None
    jails: tuple[str, ...]  # the node's fail2ban jails
    holds: str  # the digest of the holds it has of this hub; "" for none
    # A relay's: it applies no ban, it passes the stream and the holds to its region.
    relay: bool = False
    # The node behind a relay this presence is of (a RELAYED message); None: the sender's.
    node: str | None = None


def encode_presence(presence: Presence) -> list[bytes]:
    body = {
        "publisher": presence.publisher,
        "seq": presence.seq,
        "synced": presence.synced,
        "version": presence.version,
        "jails": list(presence.jails[:MAX_PRESENCE_JAILS]),
        "holds": presence.holds,
    }
    if presence.relay:
        body["relay"] = True  # only then: a presence reads as before the key
    if presence.node is None:
        return [PROTOCOL, PRESENCE, encode_object(body)]
    body["node"] = presence.node
    return [PROTOCOL, RELAYED, encode_object(body)]


def is_presence(frames: Sequence[bytes]) -> bool:
    """A presence or a relayed one (the frames after the sender's identity)."""
    return len(frames) > 1 and frames[0] == PROTOCOL and frames[1] in (PRESENCE, RELAYED)


def decode_presence(frames: Sequence[bytes]) -> Presence:
    """A presence, or a relayed one (`node` set). Keys this version does not know are
    ignored, so a later subscriber can say more."""
    kind, rest = split_message(frames)
    if kind not in (PRESENCE, RELAYED) or len(rest) != 1:
        raise ProtocolError("expected a presence with one body")
    body = decode_object(rest[0], MAX_HUB_FRAME)
    publisher, seq, synced = body.get("publisher"), body.get("seq"), body.get("synced")
    if publisher is not None:
        _state_id(publisher)
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
        raise ProtocolError("a presence's seq must be a whole number")
    if not isinstance(synced, bool):
        raise ProtocolError("a presence's synced must be true or false")
    jails = body.get("jails", [])
    if not isinstance(jails, list) or len(jails) > MAX_PRESENCE_JAILS:
        raise ProtocolError(f"a presence lists at most {MAX_PRESENCE_JAILS} jails")
    holds = body.get("holds", "")
    if not isinstance(holds, str) or len(holds) > 64:
        raise ProtocolError("a presence's holds must be a digest")
    relay = body.get("relay", False)
    if not isinstance(relay, bool):
        raise ProtocolError("a presence's relay must be true or false")
    node = check_name(body.get("node"), "node") if kind == RELAYED else None
    names = tuple(check_name(jail, "jail") for jail in jails)
    version = _version_or_none(body.get("version"))
    return Presence(publisher, seq, synced, version, names, holds, relay, node)


# Holds: an operator's unban as the nodes apply it to their own jails.

MAX_HOLDS = 10000  # lifts and holds a hub keeps and sends at once


@dataclass(frozen=True)
class Hold:
    """Lift `ip` (an address or a network) once from a node's own jails (`jail`, or every
    jail when None), and keep it from being banned there again until `until` (at `time`,
    the moment of the unban, when there is no hold)."""

    id: str
    ip: str
    jail: str | None
    time: float
    until: float

    def to_object(self) -> dict:
        body = {"id": self.id, "ip": self.ip, "time": self.time, "until": self.until}
        if self.jail is not None:
            body["jail"] = self.jail
        return body

    @classmethod
    def from_object(cls, body: object) -> Hold:
        if not isinstance(body, dict):
            raise ProtocolError("a hold must be a JSON object")
        unknown = set(body) - {"id", "ip", "jail", "time", "until"}
        if unknown:
            raise ProtocolError(f"unknown field {sorted(unknown)[0]!r}")
        if not isinstance(body.get("id"), str) or not _ID.fullmatch(body["id"]):
            raise ProtocolError("a hold's id must be 32 lowercase hex digits")
        ip = canonical_address(body.get("ip"), ANY_NETWORK)
        jail = body.get("jail")
        if jail is not None:
            check_name(jail, "jail")
        moments = [body.get("time"), body.get("until")]
        for moment in moments:
            if isinstance(moment, bool) or not isinstance(moment, (int, float)):
                raise ProtocolError("a hold's time and until must be numbers")
        if not 0 < moments[0] <= moments[1] < 2**33:
            raise ProtocolError("a hold's time and until are out of range")
        return cls(body["id"], ip, jail, float(moments[0]), float(moments[1]))


def holds_digest(holds: Iterable[Hold]) -> str:
    """What a node and a hub compare to tell whether the node has the hub's holds."""
    text = ",".join(sorted(f"{hold.id}:{hold.until!r}" for hold in holds))
    return hashlib.sha256(text.encode()).hexdigest()[:32] if text else ""


def encode_holds(holds: Sequence[Hold]) -> list[bytes]:
    body = {"digest": holds_digest(holds), "holds": [hold.to_object() for hold in holds]}
    return [PROTOCOL, HOLDS, encode_object(body)]


def is_holds(frames: Sequence[bytes]) -> bool:
    return len(frames) > 1 and frames[0] == PROTOCOL and frames[1] == HOLDS


def decode_holds(frames: Sequence[bytes]) -> tuple[str, list[Hold]]:
    """Every hold of the hub, whole or not at all, and their digest."""
    kind, rest = split_message(frames)
    if kind != HOLDS or len(rest) != 1:
        raise ProtocolError("expected holds with one body")
    body = decode_object(rest[0], MAX_NODE_FRAME)
    items = body.get("holds")
    if not isinstance(items, list) or len(items) > MAX_HOLDS:
        raise ProtocolError(f"holds must be a list of at most {MAX_HOLDS}")
    holds = [Hold.from_object(item) for item in items]
    return holds_digest(holds), holds
