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

import ipaddress
import json
import re
import time
import uuid
import zlib
from collections.abc import Iterable, Iterator, Sequence
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
HELLO = b"hello"  # monitor -> hub: [PROTOCOL, HELLO, {"rebuilt": state id}]; the body may be {}
WELCOME = b"welcome"  # hub -> monitor: [PROTOCOL, WELCOME, {"publisher", "seq", "young"}]

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
    event, checked = BanEvent._from_object(body, networks)
    if checked is event:
        object.__setattr__(event, "wire", bytes(data))
    return checked


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


def encode_hello(rebuilt: str | None = None) -> list[bytes]:
    """`rebuilt`: the hub state this node has re-reported every ban it holds to, if any."""
    body = b"{}" if rebuilt is None else encode_object({"rebuilt": rebuilt})
    return [PROTOCOL, HELLO, body]


def is_hello(frames: Sequence[bytes]) -> bool:
    return len(frames) > 1 and frames[0] == PROTOCOL and frames[1] == HELLO


def decode_hello(frames: Sequence[bytes]) -> str | None:
    """The state id the node says it has rebuilt, or None; ProtocolError if not a hello.
    Keys this version does not know are ignored, so a later monitor can say more."""
    kind, rest = split_message(frames)
    if kind != HELLO or len(rest) != 1:
        raise ProtocolError("expected a hello with one body")
    rebuilt = decode_object(rest[0], MAX_HEADER).get("rebuilt")
    if rebuilt is not None and (not isinstance(rebuilt, str) or not _ID.fullmatch(rebuilt)):
        raise ProtocolError("a hello's rebuilt must be a state id")
    return rebuilt


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


def encode_snapshot(
    instance: str, sequence: int, events: Sequence[BanEvent], young: bool = False
) -> Iterator[list]:
    """The parts of a snapshot of `events` at `sequence`; an empty table is one empty part."""
    starts = range(0, len(events), SNAPSHOT_EVENTS) or [0]
    for number, start in enumerate(starts):
        last = number == len(starts) - 1
        header = {"publisher": instance, "seq": sequence, "part": number, "last": last}
        if young:
            header["young"] = True
        body = event_list(events[start : start + SNAPSHOT_EVENTS])
        yield [PROTOCOL, SNAPSHOT, encode_object(header), body]


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
    return SnapshotPart(publisher, sequence, number, last, events, _young(header))
