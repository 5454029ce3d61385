"""The admin channel's messages, decisions, presence and holds: each encoded and decoded in
pairs, and every malformed one refused with the reason."""

import json

import pytest

from f2bzmq import protocol
from f2bzmq.protocol import Decision, Hold, Presence, ProtocolError

STATE = "cd" * 16
KEY = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"


def body(frames):
    return json.loads(frames[-1])


def test_an_admin_request_round_trips_and_leaves_out_what_is_not_given():
    frames = protocol.encode_admin("unban", ip="192.0.2.1", jail=None, hold=60)
    assert body(frames) == {"verb": "unban", "ip": "192.0.2.1", "hold": 60}
    assert protocol.is_admin(frames)
    request = protocol.decode_admin(frames)
    assert (request.verb, request.args) == ("unban", {"ip": "192.0.2.1", "hold": 60.0})
    items = [["192.0.2.1", None], ["198.51.100.0/24", -1]]
    assert protocol.decode_admin(protocol.encode_admin("ban", items=items)).args == {
        "items": [("192.0.2.1", None), ("198.51.100.0/24", -1)]
    }


def admin(text: bytes) -> list[bytes]:
    return [protocol.PROTOCOL, protocol.ADMIN, text]


@pytest.mark.parametrize(
    "frames, reason",
    [
        (admin(b'{"verb": "shutdown"}'), "unknown verb 'shutdown'"),
        (admin(b'{"ip": "192.0.2.1"}'), "unknown verb 'None'"),
        (admin(b'{"verb": "unban"}'), "unban: missing field 'ip'"),
        (admin(b'{"verb": "unban", "ip": "192.0.2.1", "x": 1}'), "unban: unknown field 'x'"),
        (admin(b'{"verb": "unban", "ip": 7}'), "unban: ip must be 1-49 printable"),
        (admin(b'{"verb": "unban", "ip": "1.2.3.4", "hold": -1}'), "hold must be a number"),
        (admin(b'{"verb": "unban", "ip": "1.2.3.4", "hold": true}'), "hold must be a number"),
        (admin(b'{"verb": "bans", "jail": "a b"}'), "bans: jail jail must be 1-64"),
        (admin(b'{"verb": "ban", "items": []}'), "items must list 1-500 addresses"),
        (admin(b'{"verb": "ban", "items": [["1.2.3.4"]]}'), "each item must be"),
        (admin(b'{"verb": "ban", "items": [["1.2.3.4", 0]]}'), "a bantime must be whole"),
        (admin(b'{"verb": "ban", "items": [["1.2.3.4", null]], "reason": "a\\nb"}'), "reason"),
        (admin(b'{"verb": "decisions", "since": -1}'), "since must be a whole number"),
        (admin(b'{"verb": "decisions", "state": "x"}'), "state must be a state id"),
        (admin(b"[]"), "JSON object"),
        ([protocol.PROTOCOL, protocol.ADMIN], "expected an admin request"),
    ],
)
def test_admin_requests_are_refused_with_the_field_that_is_wrong(frames, reason):
    with pytest.raises(ProtocolError, match=reason):
        protocol.decode_admin(frames)


def test_results_and_errors_round_trip():
    assert protocol.decode_result(protocol.encode_result({"bans": [], "n": 1})) == {
        "bans": [],
        "n": 1,
    }
    assert protocol.decode_result(protocol.encode_error("no")) == {"error": "no"}
    with pytest.raises(ProtocolError, match="expected a result"):
        protocol.decode_result([protocol.PROTOCOL, protocol.ACK, b"{}"])


DECISIONS = [
    Decision.new("alice", "ban", 1e9, ip="192.0.2.1", jail="sshd", bantime=600, reason="scan"),
    Decision.new("alice", "ban", 1e9, ip="2001:db8::/48", jail="cluster", bantime=-1),
    Decision.new("bob", "unban", 1e9, ip="192.0.2.0/24", hold=3600.0),
    Decision.new("bob", "unban", 1e9, ip="192.0.2.1", jail="sshd"),
    Decision.new("alice", "allow", 1e9, ip="203.0.113.0/24", reason="office"),
    Decision.new("alice", "disallow", 1e9, ip="203.0.113.0/24"),
    Decision.new("alice", "accept", 1e9, node="web3", key=KEY),
    Decision.new("alice", "remove", 1e9, node="web3", key=KEY),
    Decision.new("alice", "remove", 1e9, node="web4"),
]


@pytest.mark.parametrize("decision", DECISIONS, ids=[d.verb for d in DECISIONS])
def test_decisions_round_trip(decision):
    assert Decision.decode(decision.encode()) == decision
    assert decision.origin == f"operator.{decision.operator}"


def test_until_when_a_decision_matters():
    ban, permanent, held, lifted, allow = DECISIONS[0], DECISIONS[1], *DECISIONS[2:5]
    assert (ban.until(), permanent.until(), held.until(), lifted.until(), allow.until()) == (
        1e9 + 600,
        None,
        1e9 + 3600,
        1e9,
        None,
    )


def decision(**changes) -> bytes:
    fields = {
        "id": "ab" * 16,
        "operator": "alice",
        "verb": "ban",
        "time": 1e9,
        "ip": "192.0.2.1",
        "jail": "sshd",
        "bantime": 600,
    }
    fields.update(changes)
    return json.dumps({k: v for k, v in fields.items() if v is not None}).encode()


@pytest.mark.parametrize(
    "data, reason",
    [
        (decision(verb="delete"), "unknown decision 'delete'"),
        (decision(extra=1), "unknown field 'extra'"),
        (decision(bantime=None), "missing field 'bantime'"),
        (decision(verb="unban", bantime=None, hold=5, node="x"), "unknown field 'node'"),
        (decision(ip="192.0.2.01"), "is not an address|canonical"),
        (decision(ip="192.0.2.1/24"), "not in canonical form"),
        (decision(operator="operator.x" + "x" * 50), "at most 55"),
        (decision(operator="a b"), "operator must be"),
        (decision(id="x"), "id must be 32"),
        (decision(time=True), "time must be a number"),
        (decision(bantime=0), "a bantime must be whole seconds"),
        (decision(verb="accept", bantime=None, ip=None, jail=None, node="w", key="short"), "key"),
        (decision(reason="x" * 201), "a reason is at most 200"),
    ],
)
def test_malformed_decisions_are_refused(data, reason):
    with pytest.raises(ProtocolError, match=reason):
        Decision.decode(data)


def test_a_hello_names_its_node_and_version_and_older_hellos_name_none():
    frames = protocol.encode_hello(STATE, "web3", "0.1.0")
    assert protocol.decode_hello(frames) == STATE
    assert protocol.hello_sender(frames) == ("web3", "0.1.0")
    assert protocol.hello_sender(protocol.encode_hello()) == (None, None)
    odd = [protocol.PROTOCOL, protocol.HELLO, b'{"node": "a b", "version": "x y"}']
    assert protocol.hello_sender(odd) == (None, None)


def test_pending_round_trips():
    frames = protocol.encode_pending("SHA256:abc")
    assert protocol.is_pending(frames) and protocol.decode_pending(frames) == "SHA256:abc"
    with pytest.raises(ProtocolError):
        protocol.decode_pending([protocol.PROTOCOL, protocol.PENDING, b"{}"])


def test_presence_round_trips_and_later_keys_are_ignored():
    presence = Presence(STATE, 7, True, "0.1.0", ("sshd", "cluster"), "ef" * 16)
    assert protocol.decode_presence(protocol.encode_presence(presence)) == presence
    before = Presence(None, 0, False, None, (), "")
    assert protocol.decode_presence(protocol.encode_presence(before)) == before
    later = b'{"publisher": null, "seq": 0, "synced": false, "more": 1}'
    assert protocol.decode_presence([protocol.PROTOCOL, protocol.PRESENCE, later]) == before
    # A relay says so; a node's presence reads as before the key, for hubs that predate it.
    relay = Presence(STATE, 7, True, "0.1.0", (), "", relay=True)
    assert protocol.decode_presence(protocol.encode_presence(relay)) == relay
    assert b"relay" not in protocol.encode_presence(presence)[-1]
    told = Presence(STATE, 7, True, "0.1.0", ("sshd",), "", node="web1")  # a relay's word
    frames = protocol.encode_presence(told)
    assert frames[1] == protocol.RELAYED and protocol.is_presence(frames)
    assert protocol.decode_presence(frames) == told
    # Only a relayed presence names a node: in a node's own, the key is one it doesn't know.
    named = b'{"publisher": null, "seq": 0, "synced": false, "node": "web1"}'
    assert protocol.decode_presence([protocol.PROTOCOL, protocol.PRESENCE, named]) == before
    with pytest.raises(ProtocolError, match="node must be"):
        protocol.decode_presence([protocol.PROTOCOL, protocol.RELAYED, later])


@pytest.mark.parametrize(
    "text, reason",
    [
        (b'{"seq": -1, "synced": true}', "seq must be a whole number"),
        (b'{"seq": 1, "synced": 1}', "synced must be true or false"),
        (b'{"seq": 1, "synced": true, "publisher": "x"}', "must be a state id"),
        (b'{"seq": 1, "synced": true, "jails": ["a b"]}', "jail must be"),
        (b'{"seq": 1, "synced": true, "jails": "sshd"}', "at most 200 jails"),
        (b'{"seq": 1, "synced": true, "holds": 5}', "holds must be a digest"),
        (b'{"seq": 1, "synced": true, "relay": 1}', "relay must be true or false"),
    ],
)
def test_malformed_presence_is_refused(text, reason):
    with pytest.raises(ProtocolError, match=reason):
        protocol.decode_presence([protocol.PROTOCOL, protocol.PRESENCE, text])


def test_holds_round_trip_with_their_digest():
    holds = [
        Hold("ab" * 16, "192.0.2.1", "sshd", 1e9, 1e9 + 60),
        Hold("cd" * 16, "198.51.100.0/24", None, 1e9, 1e9),
    ]
    frames = protocol.encode_holds(holds)
    assert protocol.is_holds(frames)
    assert protocol.decode_holds(frames) == (protocol.holds_digest(holds), holds)
    assert protocol.holds_digest(holds) == protocol.holds_digest(holds[::-1])
    assert protocol.holds_digest([]) == ""
    ended = [holds[0], Hold("cd" * 16, "198.51.100.0/24", None, 1e9, 1e9 - 0)]
    assert protocol.holds_digest(ended) == protocol.holds_digest(holds)
    shorter = [Hold("ab" * 16, "192.0.2.1", "sshd", 1e9, 1e9 + 30), holds[1]]
    assert protocol.holds_digest(shorter) != protocol.holds_digest(holds)


@pytest.mark.parametrize(
    "item, reason",
    [
        ({"id": "x", "ip": "192.0.2.1", "time": 1, "until": 2}, "id must be"),
        ({"id": "ab" * 16, "ip": "nope", "time": 1, "until": 2}, "not an address"),
        ({"id": "ab" * 16, "ip": "192.0.2.1", "time": 2, "until": 1}, "out of range"),
        ({"id": "ab" * 16, "ip": "192.0.2.1", "time": 1, "until": "2"}, "must be numbers"),
        ({"id": "ab" * 16, "ip": "192.0.2.1", "time": 1, "until": 2, "x": 1}, "unknown field"),
        ({"id": "ab" * 16, "ip": "192.0.2.1", "jail": "a b", "time": 1, "until": 2}, "jail"),
    ],
)
def test_malformed_holds_are_refused_whole(item, reason):
    frames = [protocol.PROTOCOL, protocol.HOLDS, json.dumps({"holds": [item]}).encode()]
    with pytest.raises(ProtocolError, match=reason):
        protocol.decode_holds(frames)


def test_a_snapshot_says_whether_its_hub_takes_presence():
    (part,) = protocol.encode_snapshot(STATE, 0, [], presence=True)
    decoded = protocol.decode_snapshot_part(part)
    assert decoded.presence and not decoded.relayed  # a relay's
    (part,) = protocol.encode_snapshot(STATE, 0, [], presence=True, relayed=True)
    decoded = protocol.decode_snapshot_part(part)
    assert decoded.presence and decoded.relayed  # a hub's
    (part,) = protocol.encode_snapshot(STATE, 0, [])
    decoded = protocol.decode_snapshot_part(part)
    assert not decoded.presence and not decoded.relayed
    assert b"presence" not in part[2] and b"relayed" not in part[2]
