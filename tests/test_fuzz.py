"""Fuzz: 100,000 hostile messages at a running publisher, and 100,000 at a running subscriber.

The security issue asks that a broken or hostile peer can neither crash a daemon, nor get
anything banned, nor flood its log: random bytes, oversized frames, wrong frame counts, bad
JSON, huge strings, networks like 0.0.0.0/0, shell metacharacters and ../ in names and
addresses, unknown protocol versions, events in another node's name and sequence-number
games. Valid events sent in between must still go through, exactly.

Every message comes from a seeded `random.Random`, so a failure replays with the same input.
A hostile message that would be a valid ban but for what makes it hostile names a decoy
address (TEST-NET-2, TEST-NET-3, 2001:db8:dead::/48); valid bans name the benchmark range
198.18.0.0/15. A decoy that is ACKed, broadcast, put in a snapshot or banned is a message
that got through.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import json
import random
import re
import socket
import time
import zlib
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zmq
import zmq.auth
from zmq.utils.monitor import recv_monitor_message

from f2bzmq import protocol
from f2bzmq.lab import (
    Fail2banServer,
    Hub,
    RoleProcess,
    free_ports,
    make_keys,
    tail,
    wait_until,
    write_config,
)
from f2bzmq.protocol import MAX_HUB_FRAME as HUB_MAX_FRAME
from f2bzmq.protocol import MAX_NODE_FRAME as NODE_MAX_FRAME
from f2bzmq.protocol import BanEvent
from tests.support.hub import running_hub

SEED = 20251123
HOSTILE_MESSAGES = 100_000  # per daemon, as the security issue asks
TIME_LIMIT = 90.0  # seconds per daemon on a 2-core machine
MAX_REFUSAL_LINES = HOSTILE_MESSAGES // 500  # logged refusals: at most 0.2 % of the messages
MAX_WARNING_LINES = HOSTILE_MESSAGES // 100  # all of the subscriber's warnings: at most 1 %

VALID = ipaddress.ip_network("198.18.0.0/15")
DECOYS_V4 = [ipaddress.ip_network("203.0.113.0/24"), ipaddress.ip_network("198.51.100.0/24")]
DECOYS_V6 = ipaddress.ip_network("2001:db8:dead::/48")

P = protocol.PROTOCOL
PACKED = protocol.PACKED
SHIPPED_LIMITS = protocol.NetworkLimits()  # a hub's network limits at the shipped defaults
METACHARACTERS = [";", "|", "&&", "`", "$(", ")", ">", "<", "'", '"', "\\", "\n", "\r", "\t"]
METACHARACTERS += [" ", "\x00", "*", "?", "~", "#", "{", "}", "!", "%", "/"]
PAYLOADS = ["reboot", "rm -rf /", "$(reboot)", "`id`", "id>x", "-j ACCEPT", "--help"]
PAYLOADS += ["../../etc/passwd", "\u202egnp.exe", "%s%n", "\n2025-01-01 NOTICE [sshd] Ban 1.2.3.4"]
ZONE_PAYLOADS = ["$(reboot)", "`id`", ";reboot", "a b", "\n", "\r", "x|y", "-j", "\t", "a&&b"]


def encode(body: object) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


class Hostile:
    """Seeded hostile values, bodies and frames, as a broken or compromised peer sends them."""

    def __init__(
        self, seed: int, sender: str, limits: protocol.NetworkLimits = SHIPPED_LIMITS
    ) -> None:
        self.rng = random.Random(seed)
        self.sender = sender  # the node a well-formed event claims to come from
        # Networks past these are hostile: the hub's limits for a report; for a node, the
        # widest any hub may relay (narrower ones are bans the node judges one by one).
        self.limits = limits
        # Drawn once: address arithmetic would cost more than the rest of a message.
        self.decoys = {
            4: [str(ip) for network in DECOYS_V4 for ip in network.hosts()],
            6: [str(DECOYS_V6[self.rng.getrandbits(80)]) for _ in range(1000)],
        }

    def pick(self, weights: dict[str, int]) -> str:
        return self.rng.choices(list(weights), list(weights.values()))[0]

    def decoy(self, version: int | None = None) -> str:
        return self.rng.choice(self.decoys[version or self.rng.choice((4, 4, 6))])

    def event_id(self) -> str:
        return f"{self.rng.getrandbits(128):032x}"

    def event(self, **changes: object) -> dict:
        """A well-formed ban of a decoy, then `changes`: what makes it hostile."""
        body = {
            "id": self.event_id(),
            "node": self.sender,
            "jail": "sshd",
            "action": "ban",
            "ip": self.decoy(),
            "time": round(time.time() - self.rng.random() * 10, 3),
            "bantime": self.rng.choice((600, 3600, -1)),
        }
        body.update(changes)
        return body

    def random_bytes(self, longest: int = 300) -> bytes:
        return self.rng.randbytes(self.rng.randrange(0, longest))

    # --- values no event may carry -------------------------------------------------------

    def address(self) -> object:
        r = self.rng
        a, b, c = r.randrange(256), r.randrange(256), r.randrange(1, 255)
        choice = r.randrange(8)
        if choice == 0:  # wider than any ban may be
            v4, v6 = self.limits.min_prefix_v4, self.limits.min_prefix_v6
            return r.choice(
                [
                    "0.0.0.0/0",
                    "::/0",
                    "0/0",
                    f"{r.choice(['0.0.0.0', '10.0.0.0', self.decoy(4)])}/{r.randrange(0, v4)}",
                    f"{r.choice(['::', '2001:db8::', self.decoy(6)])}/{r.randrange(0, v6)}",
                ]
            )
        if choice == 1:  # shell metacharacters and paths around an address
            meta, payload, decoy = r.choice(METACHARACTERS), r.choice(PAYLOADS), self.decoy()
            return r.choice(
                [f"{decoy}{meta}{payload}", f"{payload}{meta}{decoy}", f"{decoy}{meta}"]
                + [f"{meta}{decoy}", f"{decoy}/../../etc/passwd", "../" * r.randrange(1, 9)]
            )
        if choice == 2:  # an IPv6 zone index is no place for a command either
            return f"{self.decoy(6)}%{r.choice(ZONE_PAYLOADS)}"
        if choice == 3:  # not an address at all
            return r.choice(
                [
                    f"{a}.{b}.{c}.{r.randrange(256, 1000)}",
                    f"{a}.{b}.{c}",
                    f"{a}.{b}.{c}.1.2",
                    f"0{a}.{b}.{c}.1",
                    "0x7f.0.0.1",
                    str(r.getrandbits(32)),
                    "localhost",
                    "example.com",
                    f"{self.decoy(4)}/33",
                    f"{self.decoy(6)}/129",
                    "1.2.3.4/",
                    "/24",
                    "1.2.3.4//24",
                    "::g",
                    ":::",
                    "1:2:3:4:5:6:7:8:9",
                    "\u0661.\u0662.\u0663.\u0664",
                    "\uff11.\uff12.\uff13.\uff14",
                    "",
                    " ",
                ]
            )
        if choice == 4:  # too long for any address
            return self.decoy() + r.choice([" ", "0", "/", "."]) * r.randrange(50, 3000)
        if choice == 5:  # invisible and control characters
            return self.decoy() + r.choice(["\u200b", "\x00", "\x1b[2J", "\ufeff", "\u202e"])
        if choice == 6:  # not a string
            return r.choice([None, 1, 1.5, True, [], {}, [self.decoy()], {"ip": self.decoy()}])
        return f"{self.decoy()}\n"

    def allowlisted(self) -> str:
        """The cluster's own loopback, as such or in IPv4-mapped IPv6 form."""
        r = self.rng
        a, b, c = r.randrange(256), r.randrange(256), r.randrange(1, 255)
        return r.choice(
            [f"127.{a}.{b}.{c}", "::1", f"127.0.0.0/{r.randrange(24, 33)}"] + self.mapped(a, b, c)
        )

    def mapped(self, a: int, b: int, c: int) -> list[str]:
        """127.a.b.c written so that only fail2ban sees it is the loopback."""
        return [
            f"::ffff:127.{a}.{b}.{c}",
            f"::ffff:7f{a:02x}:{b:02x}{c:02x}",
            "::ffff:127.0.0.1/128",
        ]

    def name(self) -> object:
        """A node or jail name fail2ban and a shell must never see."""
        r = self.rng
        base = r.choice(["sshd", "node1", "recidive", "nginx-http-auth"])
        choice = r.randrange(8)
        if choice == 0:
            return r.choice(["..", ".", "../", f"../{base}", f"{base}/../../etc", f"/etc/{base}"])
        if choice == 1:
            meta, payload = r.choice(METACHARACTERS), r.choice(PAYLOADS)
            return r.choice([f"{base}{meta}{payload}", f"{meta}{base}", f"{base}{meta}"])
        if choice == 2:
            return r.choice([f"-{base}", f"--{base}", "--help", "-x"])
        if choice == 3:  # a line break slips past a regular expression ending in "$"
            return f"{base}\n"
        if choice == 4:
            return base + "x" * r.randrange(61, 3000)
        if choice == 5:
            return r.choice([f"{base}\u00e9", "\uff53\uff53\uff48\uff44", f"{base}\u200b"])
        if choice == 6:
            return r.choice(["", " ", "\t"])
        return r.choice([None, 1, True, [base], {"name": base}])

    def bad_id(self) -> object:
        good = self.event_id()
        return self.rng.choice(
            [
                "ABCDEF" + good[6:],
                good[:31],
                good + "0",
                good + "\n",
                "g" + good[1:],
                "../" + good[3:],
                "-" + good[1:],
                good[:16] + " " + good[17:],
                "",
                None,
                int(good, 16),
            ]
        )

    def bad_fields(self) -> tuple[str, dict, str | None]:
        """What makes an event hostile: a label, fields to change, and a field to leave out."""
        r = self.rng
        field = r.choice(["ip", "ip", "ip", "jail", "jail", "node", "id", "action", "time"])
        field = r.choice([field, field, "bantime", "unknown field", "missing field"])
        if field == "ip":
            return field, {"ip": self.address()}, None
        if field in ("jail", "node"):
            return field, {field: self.name()}, None
        if field == "id":
            return field, {"id": self.bad_id()}, None
        if field == "action":
            action = ["BAN", "Ban", "ban ", " ban", "ban\n", "unban\n", "flush", "banip", ""]
            action += [None, 1, True, ["ban"], "ban;reboot", "restart"]
            if r.random() < 0.2:
                return field, {"action": "unban", "bantime": r.choice((600, -1))}, None
            return field, {"action": r.choice(action)}, None
        if field == "time":
            times = [-1, 0, 2**33, 2**64, 1e308, -1e308, "now", "1700000000", True, None, []]
            return field, {"time": r.choice(times + [float("inf"), float("nan"), {}])}, None
        if field == "bantime":
            return field, {"bantime": r.choice([0, -2, 2**31, 2**63, 1.5, "600", True, []])}, None
        if field == "unknown field":
            key = r.choice(["cmd", "exec", "__proto__", "IP", "ip ", "node\n", "constructor"])
            key = r.choice([key, r.randbytes(8).hex(), "x" * r.randrange(1, 200)])
            return field, {key: r.choice(PAYLOADS + [None, 1, {"a": []}])}, None
        return field, {}, r.choice(["id", "node", "jail", "action", "ip", "time"])

    # --- event bodies ------------------------------------------------------------------

    def body(self, limit: int = protocol.MAX_BODY, huge: int = 12) -> tuple[str, bytes]:
        """An event body that must be refused, and what kind of hostile it is; `huge`
        weighs the bodies past `limit` (megabytes past an update's limit)."""
        r = self.rng
        category = self.pick({"field": 55, "json": 20, "deep json": 3, "shape": 10, "huge": huge})
        if category == "field":
            label, changes, missing = self.bad_fields()
            body = self.event(**changes)
            body.pop(missing or "", None)
            if body.get("action") == "unban" and "bantime" not in changes:
                del body["bantime"]
            return f"field {label}", encode(body)
        good = encode(self.event())
        if category == "json":
            choice = r.randrange(10)
            text = [
                lambda: good[: r.randrange(len(good))],
                lambda: good + r.choice([b"x", b"{}", b",", b"\x00", b" {", b"]"]),
                lambda: good.replace(b'"ban"', b'"b\xffn"'),
                lambda: good.decode().encode("utf-16"),
                lambda: b"\xef\xbb\xbf" + good,
                lambda: re.sub(
                    rb'"time":[^,}]+', b'"time":' + r.choice([b"NaN", b"-Infinity"]), good
                ),
                lambda: good.replace(b'"', b"'"),
                lambda: good[:-1] + r.choice([b',"ip":"0.0.0.0/0"}', b',"jail":"../x"}', b",}"]),
                lambda: re.sub(rb'"time":[^,}]+', b'"time":1' + b"0" * 3500, good),
                lambda: r.choice([b"", b" ", b"\n", b"/*x*/" + good, self.random_bytes()]),
            ][choice]()
            return "bad json", text
        if category == "deep json":  # nesting that a recursive parser does not survive
            unit = r.choice([b"[", b'{"a":', b'[{"a":'])
            most = min(limit, 1 << 17) // len(unit)  # far past any recursion limit
            return "deep json", unit * r.randrange(most // 2, most + 1)
        if category == "shape":
            shapes = [b"null", b"true", b"1", b'"ban"', b"[]", b"[" + good + b"]", b"{}"]
            return "not an object", r.choice(shapes + [b'{"event":' + good + b"}"])
        size = int((limit + 1) * (60000 / (limit + 1)) ** r.random())
        if r.random() < 0.3:
            size = r.randrange(100, limit)
        field = r.choice(["ip", "jail", "node", "id", "action", "padding"])
        if field == "padding":
            return "huge string", b" " * max(size, limit + 1 - len(good)) + good
        return "huge string", encode(self.event(**{field: r.choice("A1./ %$") * size}))

    # --- frames for the publisher's report port ----------------------------------------

    def protocol_frame(self) -> bytes:
        r = self.rng
        while True:
            frame = r.choice(
                [b"F2BZMQ0", b"F2BZMQ2", b"F2BZMQ10", b"F2BZMQ1 ", b"F2BZMQ1\x00", b"f2bzmq1"]
                + [b"F2BZMQ", b"", b"F2BZMQ1" * 2, b"\xff" * 7, self.random_bytes(64)]
                + [b"F2BZMQ" + bytes([r.randrange(256)]), b"ZMQ1"]
            )
            if frame != P:
                return frame

    def kind_frame(self, not_these: tuple[bytes, ...]) -> bytes:
        r = self.rng
        kinds = [protocol.EVENT, protocol.ACK, protocol.NAK, protocol.UPDATE, protocol.HUGZ]
        kinds += [protocol.SNAPSHOT_REQUEST, protocol.SNAPSHOT, b"EVENT", b"event "]
        kinds += [b"event\x00", b"", b"Event", b"update\n", self.random_bytes(40)]
        while True:
            kind = r.choice(kinds)
            if kind not in not_these:
                return kind

    def report(self, banned: list[str]) -> tuple[str, list[bytes], bool]:
        """A hostile report: its category, its frames, and whether it goes to the snapshot port."""
        r = self.rng
        event = protocol.EVENT
        category = self.pick(
            {
                "random bytes": 8,
                "frame count": 8,
                "protocol version": 7,
                "message kind": 7,
                "wrong node": 8,
                "allowlisted": 3,
                "snapshot port": 4,
                "body": 55,
            }
        )
        if category == "body":
            category, body = self.body()
            return category, [P, event, body], False
        if category == "random bytes":
            return category, [self.random_bytes() for _ in range(r.randrange(1, 6))], False
        decoy = encode(self.event())
        if category == "frame count":
            if r.random() < 0.1:  # frames under maxmsgsize one by one, but not together
                big = [b"x" * r.randrange(20000, 60000)] * r.randrange(2, 5)
                return category, [P, event, *big], False
            # A report carries 1-100 events, each judged alone: several bodies are hostile
            # only when each is, or when there are too many (then none is looked at).
            hostile = [self.body()[1] for _ in range(r.randrange(2, 6))]
            too_many = protocol.MAX_REPORT_EVENTS + r.randrange(1, 40)
            frames = r.choice(
                [
                    [P],
                    [P, event],
                    [P, event, *hostile],
                    [P, event, hostile[0], b""],
                    [P, event, b"", hostile[0]],
                    [P, event] + [decoy] * too_many,
                    [event, decoy],
                    [decoy],
                    [b""],
                    [P, b"", event, decoy],
                    [P, event, hostile[0], self.random_bytes()],
                ]
            )
            return category, frames, False
        if category == "protocol version":
            return category, [self.protocol_frame(), event, decoy], False
        if category == "message kind":
            return category, [P, self.kind_frame((event,)), decoy], False
        if category == "wrong node":
            node = r.choice(["node2", "hub", "node3", "node10", "NODE1", "node1.example"])
            body = self.event(node=node)
            if banned and r.random() < 0.3:  # lift a valid ban in another node's name
                body = self.event(node=node, action="unban", ip=r.choice(banned))
                del body["bantime"]
            return category, [P, event, encode(body)], False
        if category == "allowlisted":
            return category, [P, event, encode(self.event(ip=self.allowlisted()))], False
        frames = r.choice(  # category "snapshot port": anything but a snapshot request
            [
                [self.random_bytes()],
                [P],
                [self.protocol_frame(), protocol.SNAPSHOT_REQUEST, b"{}"],
                [P, self.kind_frame((protocol.SNAPSHOT_REQUEST,)), b"{}"],
                [P, event, decoy],
                [self.random_bytes(), self.random_bytes()],
            ]
        )
        return category, frames, True

    def oversized_report(self) -> list[bytes]:
        """A report with a frame the hub's maxmsgsize refuses."""
        r = self.rng
        over = HUB_MAX_FRAME + r.randrange(1, 10000)
        padded = b" " * over + encode(self.event())
        return r.choice(
            [
                [P, protocol.EVENT, padded],
                [P, protocol.EVENT, b"x" * r.randrange(over, 1 << 20)],
                [b"F" * over],
                [P, protocol.EVENT + b"x" * over, encode(self.event())],
            ]
        )

    # --- frames for a subscriber's update stream ---------------------------------------

    def update(self, hub: FakeHub) -> tuple[str, list[bytes]]:
        """A hostile message on the update stream; hub says what the next sequence is."""
        r = self.rng
        update, hugz = protocol.UPDATE, protocol.HUGZ
        category = self.pick(
            {
                "random bytes": 6,
                "frame count": 7,
                "protocol version": 6,
                "message kind": 6,
                "header": 9,
                "sequence": 8,
                "packing": 6,
                "body": 52,
            }
        )
        if category == "random bytes":
            first = r.choice([P, P + self.random_bytes(8), self.random_bytes(16)])
            return category, [first] + [self.random_bytes() for _ in range(r.randrange(0, 5))]
        if category == "sequence":
            return self.sequence_game(hub)
        header = hub.header(hub.sequence + 1)  # the place a hostile update would take
        if category == "packing":
            return category, [PACKED, update, header, self.bad_packing()]
        if category == "body":
            category, body = self.body(protocol.MAX_PACKED, huge=2)
            # An update's events are one JSON array, taken all or none: a valid decoy beside
            # the hostile one must not be banned either.
            valid = [encode(self.event()) for _ in range(r.choice([0, 0, 1, 5]))]
            return category, [P, update, header, b"[" + b",".join([*valid, body]) + b"]"]
        decoy = encode([self.event()])
        if category == "frame count":
            frames = r.choice(
                [
                    [P],
                    [P, update],
                    [P, update, header],
                    [P, hugz],
                    [P, update, header, decoy, decoy],
                    [P, update, header, encode([self.event()] * (protocol.MAX_PACKED_EVENTS + 1))],
                    [P, update, header, b"[]"],
                    [P, update, header, decoy, b""],
                    [P, update] + [header] * r.randrange(3, 40),
                    [P, update, decoy],
                    [update, header, decoy],
                    [P, hugz, header, decoy],
                ]
            )
            return category, frames
        if category == "protocol version":
            first = r.choice([P + b"x", P + b"0", P + b"\x00", P + b" ", P + P])
            return category, [
                r.choice([first, first, self.protocol_frame()]),
                update,
                header,
                decoy,
            ]
        if category == "message kind":
            return category, [P, self.kind_frame((update, hugz)), header, decoy]
        return category, [P, r.choice([update, hugz]), self.bad_header(hub), decoy]  # "header"

    def bad_packing(self) -> bytes:
        """An update's events as no hub packs them: each must be refused whole."""
        r = self.rng
        events = encode([self.event() for _ in range(r.randrange(1, 5))])
        packed = protocol.pack(events)
        return r.choice(
            [
                lambda: events,  # not packed at all
                lambda: self.random_bytes(),
                lambda: b"\x78\x01" + self.random_bytes(),  # a zlib header, then noise
                lambda: packed[: r.randrange(1, len(packed))],
                lambda: packed + b"x",
                lambda: r.choice(self.bombs),
            ]
        )()

    @functools.cached_property
    def bombs(self) -> list[bytes]:
        """Frames of a few kB that inflate past a node's limit: blanks, and decoy bans
        that would be valid but for the blanks before them."""
        limit = protocol.MAX_PACKED
        decoys = encode([self.event() for _ in range(3)])
        return [
            zlib.compress(b" " * (limit + 1), 9),
            zlib.compress(b" " * (20 << 20), 9),
            zlib.compress(b"[" + b" " * limit + decoys[1:], 9),
        ]

    def bad_header(self, hub: FakeHub) -> bytes:
        r = self.rng
        following, instance = hub.sequence + 1, hub.instance
        return r.choice(
            [
                lambda: r.choice([b"", b"not json", b"[]", b"{}", b"null", b"[" * 200]),
                lambda: encode(r.choice([{"publisher": instance}, {"seq": following}])),
                lambda: encode({"publisher": r.choice([1, None, [instance]]), "seq": following}),
                lambda: encode(
                    {
                        "publisher": instance,
                        "seq": r.choice([str(following), float(following), None, [following]]),
                    }
                ),
                lambda: b'{"publisher":"%s","seq":NaN}' % instance.encode(),
                lambda: encode({"publisher": instance * r.randrange(9, 200), "seq": following}),
                lambda: b"\xff" + hub.header(following),
                lambda: hub.header(following)[:-1],
            ]
        )()

    def sequence_game(self, hub: FakeHub) -> tuple[str, list[bytes]]:
        """Gaps, repeats and another hub state's numbers: resyncs, never a ban."""
        r = self.rng
        current, update, hugz = hub.sequence, protocol.UPDATE, protocol.HUGZ
        body = self.event()
        if hub.banned and r.random() < 0.3:  # lift a valid ban out of turn
            body = self.event(action="unban", ip=r.choice(hub.banned))
            del body["bantime"]
        event = encode([body])
        other = f"{r.getrandbits(128):032x}"
        choice = r.randrange(6)
        if choice == 0:
            return "sequence gap", [P, hugz, hub.header(current + r.randrange(1, 10**6))]
        if choice == 1:
            return "sequence behind", [P, hugz, hub.header(current - r.randrange(1, current + 10))]
        if choice == 2:
            return "sequence repeat", [P, update, hub.header(r.randrange(-10, current + 1)), event]
        if choice == 3:
            far = current + r.randrange(10**6, 2**62)
            return "sequence far ahead", [P, update, hub.header(far), event]
        if choice == 4:
            return "other state", [P, update, hub.header(current + 1, other), event]
        return "other state", [P, hugz, hub.header(r.randrange(0, current + 2), other)]

    def snapshot_part(self, hub: FakeHub) -> list[bytes]:
        """A snapshot part a subscriber must ignore whole (every event in it is hostile)."""
        r = self.rng
        header = encode({"publisher": hub.instance, "seq": hub.sequence, "part": 0, "last": True})
        events = [self.body()[1] for _ in range(r.randrange(1, 4))]
        items = b"[" + b",".join(e for e in events if e[:1] == b"{" and e[-1:] == b"}") + b"]"
        if r.random() < 0.1:  # nesting that a recursive parser does not survive
            return [P, protocol.SNAPSHOT, header, b"[" * r.randrange(1000, 100000)]
        return r.choice(
            [
                [P, protocol.SNAPSHOT, header, b"not json"],
                [P, protocol.SNAPSHOT, header, b'{"a":1}'],
                [P, protocol.SNAPSHOT, header],
                [P, protocol.SNAPSHOT, b"{", b"[]"],
                [P, protocol.SNAPSHOT, header, encode([self.event(ip="0.0.0.0/0")])],
                [P, protocol.SNAPSHOT, header, items if items != b"[]" else b"[1]"],
                [self.protocol_frame(), protocol.SNAPSHOT, header, b"[]"],
                [P, protocol.NAK, header, b"[]"],
                [self.random_bytes()],
            ]
        )


def curve_client(sock: zmq.Socket, keys_dir: Path, node: str) -> zmq.Socket:
    """A node's CURVE client settings, as the monitor and the subscriber make them."""
    sock.curve_publickey, sock.curve_secretkey = zmq.auth.load_certificate(
        keys_dir / f"{node}.key_secret"
    )
    sock.curve_serverkey = zmq.auth.load_certificate(keys_dir / "hub.key")[0]
    sock.linger = 0
    return sock


def valid_addresses() -> Iterator[str]:
    for offset in range(1, VALID.num_addresses - 1):
        yield str(VALID.network_address + offset)


def count_lines(text: str, needle: str) -> int:
    return sum(needle in line for line in text.splitlines())


def examples(found: dict[str, list[str]]) -> str:
    return "\n".join(
        f"  {category}: {len(items)}, e.g. {items[:3]}" for category, items in found.items()
    )


# --- the publisher ---------------------------------------------------------------------

REPORT_VALID_EVERY = 200  # a valid ban after every 199 hostile reports
REPORT_WINDOW = 400  # reports awaiting a reply; a ROUTER drops replies past its HWM of 1,000
OVERSIZED_REPORTS = 20  # each on a socket of its own, since the hub cuts the connection


class ReportRun:
    """node1's reports on a running hub, node2's view of the broadcasts, and what came back."""

    def __init__(self, hub: Hub, context: zmq.Context, ports: list[int], keys_dir: Path) -> None:
        self.hub = hub
        self.context = context
        self.keys_dir = keys_dir
        self.report_endpoint = f"tcp://127.0.0.1:{ports[0]}"
        self.snapshot_endpoint = f"tcp://127.0.0.1:{ports[2]}"
        self.reports = curve_client(context.socket(zmq.DEALER), keys_dir, "node1")
        self.reports.connect(self.report_endpoint)
        self.updates = curve_client(context.socket(zmq.SUB), keys_dir, "node2")
        self.updates.rcvhwm = 0
        self.updates.setsockopt(zmq.SUBSCRIBE, P)
        self.updates.connect(f"tcp://127.0.0.1:{ports[1]}")
        self.junk = curve_client(context.socket(zmq.DEALER), keys_dir, "node2")
        self.junk.connect(self.snapshot_endpoint)
        # (category, ACK bodies due, NAK bodies due, frames sent) of each report awaiting
        # its replies, in order; NAKs due None: only a NAK, of one body or of one a body.
        self.waiting: deque[tuple[str, list[dict], int | None, list[bytes]]] = deque()
        self.valid: list[BanEvent] = []
        self.valid_ips: list[str] = []  # the same, for hostile unbans to aim at
        self.broadcast: list[tuple[int, BanEvent | bytes]] = []
        self.sent: Counter[str] = Counter()
        self.got_through: dict[str, list[str]] = defaultdict(list)
        self.valid_refused: list[str] = []
        self.throttled = 0
        self.cut_off = 0  # oversized reports after which the hub dropped the connection

    def send(
        self,
        frames: list[bytes],
        category: str,
        event: BanEvent | None = None,
        refused: int = 0,
    ) -> None:
        """Send a report: hostile only (no `event`), or one valid `event` (new when the
        category is "valid", else a duplicate) beside `refused` hostile bodies."""
        self.reports.send_multipart(frames)
        self.sent[category] += 1
        if event is None:
            self.waiting.append((category, [], None, frames))
        else:
            outcome = "duplicate" if category == "replay" else "banned"
            self.waiting.append((category, [{"id": event.id, "outcome": outcome}], refused, frames))

    def take_reply(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.reports.poll(100):
            if not self.hub.publisher.alive():
                categories = Counter(category for category, *_ in self.waiting)
                raise AssertionError(
                    f"the publisher died with {len(self.waiting)} reports unanswered "
                    f"({dict(categories)}):\n{tail(self.hub.publisher.log_text(), 12)}"
                )
            assert time.monotonic() < deadline, f"no reply in {timeout:g}s to {self.waiting[0]}"
        category, acks, naks, sent = self.waiting.popleft()
        if acks:
            kind, bodies, frames = self.reply()
            if kind != protocol.ACK or bodies != acks:
                self.valid_refused.append(f"{category} {sent!r:.160}: {frames!r:.200}")
                return
            if naks == 0:
                return
            assert self.reports.poll(timeout * 1000), f"no NAK in {timeout:g}s to {sent!r:.160}"
        kind, bodies, frames = self.reply()
        refused = kind == protocol.NAK and bool(bodies) and naks in (None, len(bodies))
        if not refused or not all(isinstance(body.get("reason"), str) for body in bodies):
            self.got_through[category].append(f"{sent!r:.160} -> {frames!r:.120}")
        elif any(body.get("retry") for body in bodies):
            self.throttled += 1

    def reply(self) -> tuple[bytes, list[dict], list[bytes]]:
        """The next reply message: its kind and bodies (kind b"?" when malformed)."""
        frames = self.reports.recv_multipart()
        try:
            if len(frames) < 3 or frames[0] != P:
                raise ValueError("not a reply")
            return frames[1], [json.loads(frame) for frame in frames[2:]], frames
        except ValueError:
            return b"?", [], frames

    def drain_updates(self) -> None:
        while self.updates.poll(0):
            frames = self.updates.recv_multipart()
            if frames[1:2] == [protocol.UPDATE]:
                first = json.loads(frames[2])["seq"]
                items = json.loads(frames[3]) if len(frames) == 4 else [None]
                for offset, item in enumerate(items or [None]):
                    try:
                        update = BanEvent.from_object(item, protocol.ANY_NETWORK)
                    except protocol.ProtocolError:
                        update = item
                    self.broadcast.append((first + offset, update))

    def oversized(self, frames: list[bytes]) -> None:
        """Send on a socket of its own and wait for the hub to cut it off."""
        sock = curve_client(self.context.socket(zmq.DEALER), self.keys_dir, "node1")
        monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        try:
            sock.connect(self.report_endpoint)
            events = []

            def seen(event: int) -> bool:
                while monitor.poll(0):
                    events.append(recv_monitor_message(monitor)["event"])
                return event in events

            assert wait_until(lambda: seen(zmq.EVENT_HANDSHAKE_SUCCEEDED), 10, 0.005)
            sock.send_multipart(frames)
            if wait_until(lambda: seen(zmq.EVENT_DISCONNECTED), 10, 0.005):
                self.cut_off += 1
            if sock.poll(0):
                self.got_through["oversized frame"].append(repr(sock.recv_multipart())[:160])
        finally:
            sock.disable_monitor()
            monitor.close(linger=0)
            sock.close(linger=0)
        self.sent["oversized frame"] += 1

    def snapshot(self) -> tuple[dict, list[BanEvent]]:
        """What the hub's snapshot port says, as node2 asks for it."""
        sock = curve_client(self.context.socket(zmq.DEALER), self.keys_dir, "node2")
        try:
            sock.connect(self.snapshot_endpoint)
            sock.send_multipart([P, protocol.SNAPSHOT_REQUEST, b"{}"])
            events: list[BanEvent] = []
            while True:
                assert sock.poll(15000), "the hub did not answer a snapshot request"
                _, kind, header, body = sock.recv_multipart()
                assert kind == protocol.SNAPSHOT
                for item in json.loads(body):
                    events.append(BanEvent.decode(encode(item), protocol.ANY_NETWORK))
                if json.loads(header)["last"]:
                    return json.loads(header), events
        finally:
            sock.close(linger=0)


def send_outsiders(context: zmq.Context, ports: list[int], keys_dir: Path, hostile: Hostile) -> int:
    """Peers without a known key, or without CURVE at all: none may get a word in."""
    endpoint = f"tcp://127.0.0.1:{ports[0]}"
    strangers = []
    unknown = context.socket(zmq.DEALER)
    unknown.curve_publickey, unknown.curve_secretkey = zmq.curve_keypair()
    unknown.curve_serverkey = zmq.auth.load_certificate(keys_dir / "hub.key")[0]
    strangers.append(unknown)
    strangers.append(context.socket(zmq.DEALER))  # plain ZMTP to a CURVE server
    sent = 0
    for sock in strangers:
        sock.linger = 0
        sock.sndhwm = 0
        sock.connect(endpoint)
        for _ in range(100):
            # Once the hub refused the handshake there is no peer left, and a send would block.
            with contextlib.suppress(zmq.Again):
                sock.send_multipart([P, protocol.EVENT, encode(hostile.event())], zmq.NOBLOCK)
                sent += 1
    greeting = b"\xff" + bytes(8) + b"\x7f\x03\x00CURVE" + bytes(15) + bytes(32)  # ZMTP 3.0
    for _ in range(100):  # then bytes that are not ZMTP, or not even a greeting
        garbage = hostile.rng.choice([b"", greeting]) + hostile.random_bytes(2000)
        with socket.create_connection(("127.0.0.1", ports[0]), timeout=5) as raw:
            with contextlib.suppress(ConnectionError):  # the hub may hang up first
                raw.sendall(garbage)
            sent += 1
    time.sleep(0.5)
    for sock in strangers:
        assert not sock.poll(0), "the hub answered a peer without a known key"
        sock.close(linger=0)
    return sent


@pytest.fixture
def hub(tmp_path: Path, keys: Path) -> Iterator[Hub]:
    """The shared fixture's hub, but not about throttling: a limit no run reaches."""
    limits = {"rate_limit": "1000000", "rate_burst": "10000000", "rate_peak": "10000000"}
    with running_hub(tmp_path, keys, publisher=limits) as hub:
        yield hub


def test_publisher_takes_100000_hostile_reports(hub: Hub) -> None:
    hub_, ports, keys = hub, hub.ports, hub.keys_dir
    context = zmq.Context()
    run = ReportRun(hub_, context, ports, keys)
    hostile = Hostile(SEED, "node1")
    addresses = valid_addresses()
    oversized_at = set(range(0, HOSTILE_MESSAGES, HOSTILE_MESSAGES // OVERSIZED_REPORTS))
    try:
        # A SUB socket only gets what is published after it joined: wait for a heartbeat.
        assert run.updates.poll(15000), "no heartbeat from the hub"
        started = time.monotonic()
        deadline = started + TIME_LIMIT
        for number in range(HOSTILE_MESSAGES):
            if number % (REPORT_VALID_EVERY - 1) == 0:
                event = BanEvent.new("node1", "sshd", "ban", next(addresses), bantime=3600)
                run.valid.append(event)
                run.valid_ips.append(event.ip)
                run.send([P, protocol.EVENT, event.encode()], "valid", event)
            if number in oversized_at:
                run.oversized(hostile.oversized_report())
                continue
            if number % 1000 == 500:  # a valid event among hostile ones in one report
                event = BanEvent.new("node1", "sshd", "ban", next(addresses), bantime=3600)
                run.valid.append(event)
                run.valid_ips.append(event.ip)
                hostile_bodies = [hostile.body()[1] for _ in range(hostile.rng.randrange(1, 4))]
                bodies = [*hostile_bodies, event.encode()]
                hostile.rng.shuffle(bodies)
                run.send([P, protocol.EVENT, *bodies], "mixed", event, len(hostile_bodies))
            if number % 5000 == 2500 and run.valid:  # a replay is a duplicate, not a new ban
                event = hostile.rng.choice(run.valid)
                run.send([P, protocol.EVENT, event.encode()], "replay", event)
            category, frames, to_snapshot_port = hostile.report(run.valid_ips)
            if to_snapshot_port:
                run.junk.send_multipart(frames)
                run.sent[category] += 1
            else:
                run.send(frames, category)
            while len(run.waiting) >= REPORT_WINDOW:
                run.take_reply()
            if number % 2000 == 0:
                run.drain_updates()
                assert hub_.publisher.alive(), (
                    f"the publisher died at message {number} ({category}):\n"
                    f"{tail(hub_.log_text())}\n{tail(hub_.publisher.log_text())}"
                )
                assert time.monotonic() < deadline, f"only {number} messages in {TIME_LIMIT:g}s"
        while run.waiting:
            run.take_reply()
        elapsed = time.monotonic() - started
        outsiders = send_outsiders(context, ports, keys, hostile)

        valid_ips = sorted(event.ip for event in run.valid)

        def all_broadcast() -> bool:
            run.drain_updates()
            return len(run.broadcast) >= len(valid_ips)

        wait_until(all_broadcast, 15)
        time.sleep(1.5)  # three heartbeats: time enough for anything else to show up
        run.drain_updates()
        header, snapshot = run.snapshot()
        log = hub_.log_text()
        hostile_sent = sum(n for category, n in run.sent.items() if category != "valid")
        print(
            f"\npublisher: {hostile_sent} hostile and {len(valid_ips)} valid reports in "
            f"{elapsed:.1f}s, {(hostile_sent + len(valid_ips)) / elapsed:,.0f} messages/s; "
            f"{outsiders} from outsiders; {run.cut_off}/{run.sent['oversized frame']} oversized "
            f"cut off; log: {count_lines(log, 'refused a report')} 'refused a report' and "
            f"{count_lines(log, 'refused a snapshot request')} 'refused a snapshot request' "
            f"lines\n  categories: {dict(sorted(run.sent.items()))}"
        )

        assert hub_.publisher.alive(), tail(hub_.publisher.log_text())
        assert hostile_sent >= HOSTILE_MESSAGES
        assert not run.got_through, "hostile reports the hub did not NAK:\n" + examples(
            run.got_through
        )
        assert not run.valid_refused, f"valid reports not ACKed: {run.valid_refused[:5]}"
        assert run.throttled == 0, "the rate limit is set far above this test"
        assert run.cut_off == run.sent["oversized frame"], "an oversized frame was taken"
        broadcast = [update for _, update in run.broadcast]
        assert sorted(getattr(u, "ip", repr(u)) for u in broadcast) == valid_ips, (
            f"broadcast {len(broadcast)} updates for {len(valid_ips)} valid bans; not valid: "
            f"{[u for u in broadcast if getattr(u, 'ip', None) not in set(valid_ips)][:5]}"
        )
        assert [seq for seq, _ in run.broadcast] == list(range(1, len(valid_ips) + 1))
        assert header["seq"] == len(valid_ips)
        assert sorted(event.ip for event in snapshot) == valid_ips
        assert not run.junk.poll(0), "the hub answered a hostile snapshot request"
        banned = re.findall(r"NOTICE\s+\[[^\]]*\] Ban (\S+) from", log)
        assert sorted(banned) == valid_ips, "the hub logged a Ban of a hostile report"
        refusals = count_lines(log, "refused a")
        assert refusals <= MAX_REFUSAL_LINES, (
            f"{refusals} 'refused a …' lines for {hostile_sent} hostile messages, e.g.\n"
            + "\n".join([line for line in log.splitlines() if "refused a" in line][:10:2])
        )
    finally:
        context.destroy(linger=0)


# --- the subscriber --------------------------------------------------------------------

UPDATE_VALID_EVERY = 250  # a valid update after every 249 hostile messages
BURST = 1000  # messages between checks that the subscriber keeps up
HUGZ_INTERVAL = 0.25
JUNK_SNAPSHOT_SHARE = 0.3  # snapshot answers that start with a hostile part
OVERSIZED_UPDATES = 3  # at the end: libzmq does not reconnect a SUB after one of them


class FakeHub:
    """The test plays the hub: updates on an XPUB, snapshots on a ROUTER, with the hub's keys.

    It keeps the ban table its valid updates describe, so that every snapshot it serves (at
    start, and after each gap the hostile messages cause) is the truth at its sequence.
    """

    def __init__(
        self, context: zmq.Context, ports: list[int], keys_dir: Path, hostile: Hostile
    ) -> None:
        public, secret = zmq.auth.load_certificate(keys_dir / "hub.key_secret")
        self.hostile = hostile
        self.updates = context.socket(zmq.XPUB)  # XPUB: the test sees the subscriber join
        self.snapshots = context.socket(zmq.ROUTER)
        for sock, port in ((self.updates, ports[1]), (self.snapshots, ports[2])):
            sock.curve_server = True
            sock.curve_publickey, sock.curve_secretkey = public, secret
            sock.linger = 0
            sock.bind(f"tcp://127.0.0.1:{port}")
        self.updates.sndhwm = 0  # the test paces itself; nothing valid may be dropped here
        self.poller = zmq.Poller()
        self.poller.register(self.updates, zmq.POLLIN)
        self.poller.register(self.snapshots, zmq.POLLIN)
        self.instance = f"{hostile.rng.getrandbits(128):032x}"  # this hub state's identity
        self.sequence = 0
        self.table: dict[str, BanEvent] = {}  # ip -> the valid ban in force
        self.subscriptions = 0
        self.snapshots_served = 0
        self.bad_requests = 0
        self.next_hugz = 0.0
        self.packed = True  # False: a hub from before the packed stream

    @property
    def banned(self) -> list[str]:
        return list(self.table)

    def header(self, sequence: int, instance: str | None = None) -> bytes:
        return encode({"publisher": instance or self.instance, "seq": sequence})

    def publish(self, frames: list[bytes]) -> None:
        """Send on the packed stream, as a hub does: a message written for the plain one
        (P, or something that starts with it, first) with its list of events packed."""
        if self.packed and frames[0].startswith(P):
            frames = [PACKED + frames[0][len(P) :], *frames[1:]]
            if len(frames) > 3:
                frames[3] = protocol.pack(frames[3])
        self.updates.send_multipart(frames)

    def update(self, event: BanEvent, record: bool = True) -> None:
        """A valid update with the next sequence; record=False for one no snapshot holds."""
        self.sequence += 1
        if record and event.action == protocol.BAN:
            self.table[event.ip] = event
        elif record:
            del self.table[event.ip]
        self.publish([P, protocol.UPDATE, self.header(self.sequence), protocol.event_list([event])])

    def serve(self, timeout: float = 0.0) -> None:
        """Answer snapshot requests, note subscriptions, send heartbeats that are due."""
        deadline = time.monotonic() + timeout
        while True:
            now = time.monotonic()
            if now >= self.next_hugz:
                self.publish([P, protocol.HUGZ, self.header(self.sequence)])
                self.next_hugz = now + HUGZ_INTERVAL
            wait = max(0.0, min(deadline, self.next_hugz) - now)
            ready = dict(self.poller.poll(int(wait * 1000)))
            while self.updates in ready and self.updates.poll(0):
                if self.updates.recv()[:1] == b"\x01":
                    self.subscriptions += 1
            while self.snapshots in ready and self.snapshots.poll(0):
                self.answer(self.snapshots.recv_multipart())
            if time.monotonic() >= deadline:
                return

    def answer(self, request: list[bytes]) -> None:
        identity, body = request[0], request[1:]
        if body[:2] != [P, protocol.SNAPSHOT_REQUEST]:
            self.bad_requests += 1
            return
        if self.hostile.rng.random() < JUNK_SNAPSHOT_SHARE:
            self.snapshots.send_multipart([identity, *self.hostile.snapshot_part(self)])
        events = list(self.table.values())
        parts = [events[i : i + 500] for i in range(0, len(events), 500)] or [[]]
        for number, part in enumerate(parts):
            header = {
                "publisher": self.instance,
                "seq": self.sequence,
                "part": number,
                "last": number == len(parts) - 1,
            }
            body = b"[" + b",".join(event.encode() for event in part) + b"]"
            self.snapshots.send_multipart([identity, P, protocol.SNAPSHOT, encode(header), body])
        self.snapshots_served += 1


class LogFollower:
    """What a daemon appended to its log since the last look."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""

    def new_lines(self) -> list[str]:
        try:
            with self.path.open("rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        return [line.decode(errors="replace") for line in lines]


APPLIED = re.compile(r"DEBUG\s+update (\d+): |snapshot from \S+ \d+ bans at sequence (\d+)")


class SubscriberWatch:
    """How far the subscriber has followed the update stream, from its DEBUG log."""

    def __init__(self, subscriber: RoleProcess, log: Path) -> None:
        self.subscriber = subscriber
        self.log = LogFollower(log)
        self.sequence = -1

    def caught_up(self, sequence: int) -> bool:
        for line in self.log.new_lines():
            found = APPLIED.search(line)
            if found:
                self.sequence = int(found.group(1) or found.group(2))
        return self.sequence >= sequence

    def wait(
        self,
        hub: FakeHub,
        condition: Callable[[], bool],
        timeout: float,
        what: str,
        explain: Callable[[], str] = str,
    ) -> None:
        """Serve the subscriber until condition() holds; it must stay alive meanwhile."""
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.subscriber.alive(), "the subscriber died:\n" + tail(
                self.log.path.read_text(errors="replace") + self.subscriber.log_text(), 40
            )
            assert time.monotonic() < deadline, f"{what} within {timeout:g}s {explain()}"
            hub.serve(0.02)


def sync_jail_with_shell_action(server: Fail2banServer) -> str:
    """The sync jail only, with the lab's dummy action: each ban runs a shell with the address."""
    return (
        "[cluster]\n"
        "enabled = true\n"
        "filter = f2bzmq-cluster\n"
        f"logpath = {server.sync_log}\n"
        "bantime = 86400\n"
        f"action = dummy[target={server.directory / 'cluster.dummy'}]\n"
    )


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[Fail2banServer, RoleProcess, list[int], Path]]:
    """node2's fail2ban-server and subscriber; the test binds the hub's ports itself."""
    ports = free_ports(3)
    keys = make_keys(tmp_path / "keys", ["node2"])
    server = Fail2banServer(tmp_path, "node2", jails=sync_jail_with_shell_action)
    config = server.directory / "fail2ban-cluster.conf"
    write_config(
        config,
        "node2",
        ports,
        server.directory,
        keys,
        general={"fail2ban_socket": str(server.socket)},
    )
    subscriber = RoleProcess("subscriber", config, server.directory)
    with server:
        try:
            yield server, subscriber, ports, keys
        finally:
            subscriber.stop()


def test_subscriber_takes_100000_hostile_updates(
    node: tuple[Fail2banServer, RoleProcess, list[int], Path],
) -> None:
    server, subscriber, ports, keys = node
    context = zmq.Context()
    hostile = Hostile(SEED + 1, "node1", protocol.WIRE_LIMITS)
    hub = FakeHub(context, ports, keys, hostile)
    watch = SubscriberWatch(subscriber, server.directory / "subscriber.log")
    addresses = valid_addresses()
    expected: set[str] = set()  # what the sync jail must hold: node1's valid bans
    ever_banned: set[str] = set()
    unbanned: set[str] = set()
    sent: Counter[str] = Counter()
    try:
        subscriber.start()
        watch.wait(hub, lambda: subscriber.ready() and hub.subscriptions > 0, 20, "no start")
        started = time.monotonic()
        deadline = started + TIME_LIMIT
        valid_slots = 0
        checkpoint = 0
        for number in range(1, HOSTILE_MESSAGES + 1):
            if number % (UPDATE_VALID_EVERY - 1) == 1:
                send_valid_update(hub, hostile, valid_slots, addresses, expected, unbanned, sent)
                ever_banned |= expected
                valid_slots += 1
            category, frames = hostile.update(hub)
            while not frames[0].startswith((P, PACKED)):  # filtered by the subscription
                hub.publish(frames)
                sent["filtered by the subscription"] += 1
                category, frames = hostile.update(hub)
            hub.publish(frames)
            sent[category] += 1
            if number % 100 == 0:
                hub.serve()
            if number % BURST == 0:
                # At most two bursts in flight: the subscriber keeps up, and a death shows soon.
                watch.wait(hub, lambda c=checkpoint: watch.caught_up(c), 30, "no progress")
                checkpoint = hub.sequence
                assert time.monotonic() < deadline, f"only {number} messages in {TIME_LIMIT:g}s"

        jail: set[str] = set()

        def converged() -> bool:
            """Cheap to poll: fail2ban's socket, through f2bzmq's client."""
            if not watch.caught_up(hub.sequence):
                return False
            with server.client() as client:
                jail.clear()
                jail.update(client.banned("cluster"))
            return jail == expected

        def difference() -> str:
            return (
                f"(subscriber at {watch.sequence}, hub at {hub.sequence}): "
                f"banned but hostile {sorted(jail - expected)[:10]}, "
                f"valid but missing {sorted(expected - jail)[:10]}"
            )

        watch.wait(hub, converged, 30, "the sync jail did not converge", difference)
        elapsed = time.monotonic() - started
        hub.serve(1.0)
        # The verdict comes from the real fail2ban-client, not from our own code.
        assert set(server.banned("cluster")) == expected

        # Last, frames over the subscriber's maxmsgsize: libzmq drops the connection for good,
        # so the valid ban after them can only come through a snapshot.
        subscriptions = hub.subscriptions
        for _ in range(OVERSIZED_UPDATES):
            header = hub.header(hub.sequence + 1)
            oversized = hostile.rng.randbytes(NODE_MAX_FRAME + 1)  # packing can't shrink it
            hub.publish([PACKED, protocol.UPDATE, header, oversized])
            sent["oversized frame"] += 1
        send_valid_update(hub, hostile, 0, addresses, expected, unbanned, sent)
        ever_banned |= expected
        watch.wait(hub, converged, 30, "no recovery after oversized frames", difference)
        assert set(server.banned("cluster")) == expected
        resubscribed = hub.subscriptions > subscriptions

        log = (server.directory / "subscriber.log").read_text(errors="replace")
        dummy = (server.directory / "cluster.dummy").read_text(errors="replace")
        hostile_sent = sum(
            n for category, n in sent.items() if not category.startswith(("valid", "filtered"))
        )
        warnings = count_lines(log, " WARNING ")
        ignored = count_lines(log, "ignored a ")
        valid_sent = sum(n for category, n in sent.items() if category.startswith("valid"))
        print(
            f"\nsubscriber: {hostile_sent} hostile and {valid_sent} valid updates in "
            f"{elapsed:.1f}s, {(hostile_sent + valid_sent) / elapsed:,.0f} messages/s; "
            f"{hub.snapshots_served} snapshots served; {len(expected)} bans; "
            f"update stream back after oversized frames: {resubscribed}; log: {warnings} "
            f"warnings, {ignored} 'ignored a …', "
            f"{count_lines(log, 'missed updates')} 'missed updates'\n"
            f"  categories: {dict(sorted(sent.items()))}"
        )

        assert subscriber.alive()
        assert hostile_sent >= HOSTILE_MESSAGES
        assert hub.bad_requests == 0, "the subscriber sent a malformed snapshot request"
        logged_bans = set(re.findall(r"NOTICE\s+\[cluster\] Ban (\S+)", log))
        assert logged_bans <= ever_banned, f"banned at some point: {logged_bans - ever_banned}"
        logged_unbans = set(re.findall(r"NOTICE\s+\[cluster\] Unban (\S+)", log))
        assert logged_unbans <= unbanned, f"unbanned at some point: {logged_unbans - unbanned}"
        shell_bans = {line[1:] for line in dummy.splitlines() if line.startswith("+")}
        assert shell_bans <= ever_banned, f"the ban action ran for {shell_bans - ever_banned}"
        assert ignored <= MAX_REFUSAL_LINES, (
            f"{ignored} 'ignored a …' lines for {hostile_sent} hostile messages, e.g.\n"
            + "\n".join([line for line in log.splitlines() if "ignored a " in line][:10:2])
        )
        assert warnings <= MAX_WARNING_LINES, f"{warnings} warnings"
    finally:
        context.destroy(linger=0)


def send_valid_update(
    hub: FakeHub,
    hostile: Hostile,
    slot: int,
    addresses: Iterator[str],
    expected: set[str],
    unbanned: set[str],
    sent: Counter[str],
) -> None:
    """Mostly node1's bans of fresh addresses; now and then one the node must not apply."""
    r = hostile.rng
    kinds = {1: "too wide", 3: "allowlisted", 6: "own node", 8: "unban", 9: "mapped loopback"}
    kind = kinds.get(slot % 10)
    if kind == "too wide":
        # A hub whose limit is /16 relays it; the node's own limit is the shipped /24.
        network = f"10.{slot % 256}.{r.randrange(0, 256, 16)}.0/20"
        hub.update(BanEvent.new("node1", "sshd", "ban", network, networks=protocol.WIRE_LIMITS))
    elif kind == "allowlisted":
        fresh = f"127.0.{slot % 256}.{slot // 256 + 1}"
        ip = next(ip for ip in r.sample([fresh, "::1", "127.0.0.0/24"], 3) if ip not in hub.table)
        hub.update(BanEvent.new("node1", "sshd", "ban", ip))
    elif kind == "own node":
        hub.update(BanEvent.new("node2", "sshd", "ban", next(addresses)))
    elif kind == "unban" and expected:
        ip = sorted(expected)[r.randrange(len(expected))]
        hub.update(BanEvent.new("node1", "sshd", "unban", ip))
        expected.discard(ip)
        unbanned.add(ip)
    elif kind == "mapped loopback":
        # A hub refuses it, so no snapshot holds it: a node may refuse it as well (then it
        # sees a gap) or take it as the loopback it is, but never ban it.
        ip = r.choice(hostile.mapped(0, 0, r.randrange(1, 255)))
        event = BanEvent(hostile.event_id(), "node1", "sshd", "ban", ip, time.time())
        hub.update(event, record=False)
    else:
        kind = "ban"
        event = BanEvent.new("node1", "sshd", "ban", next(addresses), bantime=3600)
        hub.update(event)
        expected.add(event.ip)
    sent[f"valid {kind}"] += 1


def test_a_subscriber_says_why_a_hub_older_than_it_sends_no_updates(
    node: tuple[Fail2banServer, RoleProcess, list[int], Path],
) -> None:
    """That hub's snapshots come, its plain update stream is not what the node takes: the
    node still converges from a snapshot each heartbeat timeout, and its log says why."""
    server, subscriber, ports, keys = node
    context = zmq.Context()
    hub = FakeHub(context, ports, keys, Hostile(SEED, "node1"))
    hub.packed = False
    hub.update(BanEvent.new("node1", "sshd", "ban", "198.18.0.1", bantime=3600))
    log = server.directory / "subscriber.log"

    def serve_until(condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + 30
        while not condition():
            text = log.read_text(errors="replace") if log.exists() else ""
            assert subscriber.alive() and time.monotonic() < deadline, f"{what}\n{tail(text)}"
            hub.serve(0.1)

    try:
        subscriber.start()
        serve_until(lambda: server.banned("cluster") == ["198.18.0.1"], "no first snapshot")
        served = hub.snapshots_served
        hub.update(BanEvent.new("node1", "sshd", "ban", "198.18.0.2", bantime=3600))
        serve_until(lambda: len(server.banned("cluster")) == 2, "the later ban never came")
        assert hub.snapshots_served > served  # by a snapshot: the update itself went unheard
        text = log.read_text(errors="replace")
        assert "its packed update stream never did" in text and "upgrade hubs first" in text
    finally:
        context.destroy(linger=0)
