"""Event validation and encoding: every rule, no socket."""

import json
import random
import re
import zlib

import pytest

from f2bzmq import protocol
from f2bzmq.protocol import BanEvent, NetworkLimits, ProtocolError


def event_body(**changes) -> bytes:
    body = {
        "id": "0123456789abcdef0123456789abcdef",
        "node": "node1",
        "jail": "sshd",
        "action": "ban",
        "ip": "192.0.2.10",
        "time": 1795000000.5,
        "bantime": 600,
    }
    body.update(changes)
    return json.dumps({k: v for k, v in body.items() if v is not ...}).encode()


def test_round_trip():
    event = BanEvent.new("node1", "sshd", "ban", "2001:DB8::1", 1795000000.0, 600)
    assert event.ip == "2001:db8::1"
    assert BanEvent.decode(event.encode()) == event
    assert len(event.id) == 32


def test_networks_are_canonical_optional_and_limited():
    assert BanEvent.decode(event_body(ip="10.0.0.7/24")).ip == "10.0.0.0/24"
    assert BanEvent.decode(event_body(ip="10.0.0.7/32")).ip == "10.0.0.7"
    assert BanEvent.decode(event_body(ip="2001:db8::/48")).ip == "2001:db8::/48"
    with pytest.raises(ProtocolError, match="networks are not allowed"):
        BanEvent.decode(event_body(ip="10.0.0.0/24"), NetworkLimits(allow=False))
    assert (
        BanEvent.decode(event_body(ip="10.0.0.9/32"), NetworkLimits(allow=False)).ip == "10.0.0.9"
    )
    for wide, limit in (("0.0.0.0/0", "/24"), ("10.0.0.0/23", "/24"), ("::/0", "/48")):
        with pytest.raises(ProtocolError, match=f"wider than the allowed {limit}"):
            BanEvent.decode(event_body(ip=wide))
    assert (
        BanEvent.decode(event_body(ip="10.0.0.0/8"), NetworkLimits(True, 8, 32)).ip == "10.0.0.0/8"
    )


@pytest.mark.parametrize(
    "changes, reason",
    [
        ({"ip": "not-an-ip"}, "not an address"),
        ({"ip": "192.0.2.10; reboot"}, "not an address"),
        ({"ip": 3232235521}, "ip must be"),
        ({"jail": "../etc"}, "jail must be"),
        ({"jail": "sshd; rm -rf /"}, "jail must be"),
        ({"jail": "-s"}, "jail must be"),
        ({"jail": "x" * 65}, "jail must be"),
        ({"jail": "sshd\n"}, "jail must be"),
        ({"id": "0123456789abcdef0123456789abcdef\n"}, "id must be"),
        ({"ip": "2001:db8::1%$(reboot)"}, "zone index"),
        ({"ip": "fe80::1%eth0"}, "zone index"),
        ({"ip": "::ffff:10.0.0.0/120"}, "IPv4-mapped"),
        ({"node": ""}, "node must be"),
        ({"node": "node\n1"}, "node must be"),
        ({"action": "flush"}, "action must be"),
        ({"id": "short"}, "id must be"),
        ({"time": "now"}, "time must be"),
        ({"time": True}, "time must be"),
        ({"time": -5}, "out of range"),
        ({"bantime": 0}, "bantime"),
        ({"bantime": 1.5}, "bantime"),
        ({"bantime": -2}, "bantime"),
        ({"action": "unban"}, "an unban has no bantime"),
        ({"extra": 1}, "unknown field 'extra'"),
        ({"jail": ...}, "missing field 'jail'"),
    ],
)
def test_invalid_events_are_refused_with_a_reason(changes, reason):
    with pytest.raises(ProtocolError, match=reason):
        BanEvent.decode(event_body(**changes))


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"\xff\xfe", "not JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"time": NaN}', "not JSON"),
        (b"{" + b" " * 5000 + b"}", "larger than"),
    ],
)
def test_bodies_that_are_not_json_objects(data, reason):
    with pytest.raises(ProtocolError, match=reason):
        BanEvent.decode(data)


def test_one_encoding_whatever_the_sender_wrote():
    """Blanks, escapes and field order are the sender's choice; what is stored and relayed
    is json.dumps of the fields in one order, so padding can't amplify every snapshot."""
    canonical = BanEvent.decode(event_body()).encode()
    assert canonical == event_body().replace(b" ", b"")
    body = json.loads(event_body())
    for sent in (
        event_body().replace(b", ", b"," + b" " * 150),
        json.dumps(dict(reversed(body.items()))).encode(),
        event_body().replace(b'"sshd"', b'"\\u0073shd"'),
        event_body(time=1795000000.50, bantime=600),
    ):
        assert BanEvent.decode(sent).encode() == canonical


def test_the_encoding_is_json_dumps_of_the_validated_fields():
    rng = random.Random(12)
    for _ in range(2000):
        ip = rng.choice(["192.0.2.", "2001:db8::", "10.1.0.0/", "::ffff:10.0.0."])
        ip += str(rng.choice([8, 24, 32]))
        action, bantime = rng.choice([("ban", 600), ("ban", -1), ("ban", None), ("unban", None)])
        when = rng.choice([1795000000.0, 1795000000.123456, rng.uniform(1, 2**33 - 1), 7])
        limits = NetworkLimits(True, 8, 16)
        event = BanEvent.new("node-1.a_b", "sshd", action, ip, when, bantime, limits)
        body = {"id": event.id, "node": event.node, "jail": event.jail, "action": action}
        body.update(ip=event.ip, time=event.time)
        if bantime is not None:
            body["bantime"] = bantime
        assert event.encode() == json.dumps(body, separators=(",", ":")).encode()


@pytest.mark.parametrize("field", ["ip", "id", "node", "action"])
def test_a_field_given_twice_is_refused(field):
    """Of two "ip" fields one reader takes the first, another the last."""
    twice = event_body()[:-1] + json.dumps({field: "x"}).replace("{", ",").encode()
    with pytest.raises(ProtocolError, match=f"field '{field}' is given twice"):
        BanEvent.decode(twice)
    header = b'{"publisher":"' + b"ab" * 16 + b'","seq":1,"seq":2}'
    with pytest.raises(ProtocolError, match="field 'seq' is given twice"):
        protocol.decode_stream([protocol.PACKED, protocol.HUGZ, header])


def test_ipv4_mapped_addresses_are_written_as_ipv4():
    """fail2ban bans ::ffff:127.0.0.1 as 127.0.0.1: allowlists must see the IPv4 form."""
    assert BanEvent.decode(event_body(ip="::ffff:127.0.0.1")).ip == "127.0.0.1"
    assert BanEvent.decode(event_body(ip="::ffff:7f00:1/128")).ip == "127.0.0.1"


def test_deeply_nested_json_is_refused_not_fatal():
    with pytest.raises(ProtocolError, match="not JSON"):
        BanEvent.decode(b"[" * 3000)


def test_split_message_checks_the_protocol_frame():
    assert protocol.split_message([protocol.PROTOCOL, protocol.EVENT, b"{}"]) == (
        protocol.EVENT,
        [b"{}"],
    )
    with pytest.raises(ProtocolError, match="unknown protocol 'F2BZMQ9'"):
        protocol.split_message([b"F2BZMQ9", protocol.EVENT, b"{}"])
    with pytest.raises(ProtocolError, match="too few frames"):
        protocol.split_message([protocol.PROTOCOL])
    assert protocol.split_message([protocol.PACKED, protocol.HUGZ], protocol.PACKED)[0] == b"hugz"
    with pytest.raises(ProtocolError, match="expected F2BZMQZ1"):
        protocol.split_message([protocol.PROTOCOL, protocol.HUGZ], protocol.PACKED)


def test_the_largest_packed_update_fits_a_nodes_frame_even_if_nothing_compresses():
    from f2bzmq.protocol import MAX_NODE_FRAME

    noise = random.Random(1).randbytes(protocol.MAX_PACKED)
    assert len(protocol.pack(noise)) <= MAX_NODE_FRAME


def test_the_two_update_streams_never_match_each_others_subscription():
    assert not protocol.PACKED.startswith(protocol.PROTOCOL)
    assert not protocol.PROTOCOL.startswith(protocol.PACKED)


def test_a_packed_list_of_events_inflates_to_the_same_bytes_and_is_smaller():
    events = [BanEvent.decode(event_body(ip=f"192.0.2.{n}")) for n in range(1, 101)]
    body = protocol.event_list(events)
    packed = protocol.pack(body)
    assert protocol.unpack(packed, protocol.MAX_UPDATE) == body
    assert len(packed) < len(body) / 3


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"[]", "does not inflate"),
        (b"\x78\x01garbage", "does not inflate"),
        (protocol.pack(b"[" + b" " * 500 + b"]")[:-6], "cut short"),
        (protocol.pack(b"[]") + b"x", "bytes after its end"),
        (protocol.pack(b" " * 1001), "inflates past 1000 bytes"),
        (zlib.compress(b" " * (1 << 20), 9), "inflates past 1000 bytes"),  # 1 kB -> 1 MB
    ],
)
def test_packed_bodies_that_do_not_inflate_within_the_limit_are_refused(data, reason):
    with pytest.raises(ProtocolError, match=reason):
        protocol.unpack(data, 1000)
    assert protocol.unpack(protocol.pack(b" " * 1000), 1000) == b" " * 1000


def test_expiry():
    event = BanEvent.decode(event_body())
    assert event.expiry(default_bantime=60) == 1795000000.5 + 600
    assert BanEvent.decode(event_body(bantime=...)).expiry(60) == 1795000000.5 + 60
    assert BanEvent.decode(event_body(bantime=-1)).expiry(60) is None


def test_describe_reads_like_fail2ban():
    assert BanEvent.decode(event_body()).describe() == "[sshd] Ban 192.0.2.10 from node1"


@pytest.mark.parametrize(
    "text",
    ["01.2.3.4", "1.2.3", "1.2.3.4\x00", "1.2.3.4 ", "0x1.2.3.4", "1.2.3.256", "1.2.3.4\n"],
)
def test_odd_ipv4_spellings_are_refused_as_ipaddress_refuses_them(text):
    with pytest.raises(ProtocolError, match="ip "):
        BanEvent.decode(event_body(ip=text))


def test_allowlist_covers_addresses_and_overlapping_networks():
    import ipaddress

    from f2bzmq.addresses import Allowlist

    allowlist = Allowlist(
        ipaddress.ip_network(n) for n in ("127.0.0.0/8", "10.1.0.0/16", "2001:db8::/32")
    )
    assert allowlist.covers("127.0.0.1")
    assert allowlist.covers("10.1.255.255")
    assert not allowlist.covers("10.2.0.0")
    assert allowlist.covers("10.0.0.0/15")  # a wider ban would hold the allowlisted range
    assert allowlist.covers("2001:db8::5")
    assert not allowlist.covers("2001:db9::5")


# Every message kind: what its encoder writes, its decoder reads back, and what a
# decoder refuses.

STATE = "ab" * 16  # a hub state id


def events(count: int) -> list[BanEvent]:
    return [BanEvent.decode(event_body(id=f"{n:032x}", ip=f"192.0.2.{n}")) for n in range(count)]


def test_a_report_round_trips_and_holds_1_to_100_events():
    bodies = [event.encode() for event in events(3)]
    assert protocol.decode_report(protocol.encode_report(bodies)) == bodies
    for frames, reason in [
        ([protocol.PROTOCOL, protocol.EVENT], "expected 1-100 event bodies"),
        (protocol.encode_report([b"{}"] * 101), "expected 1-100 event bodies"),
        ([protocol.PROTOCOL, protocol.ACK, b"{}"], "expected 1-100 event bodies"),
        ([b"F2BZMQ2", protocol.EVENT, b"{}"], "unknown protocol"),
    ]:
        with pytest.raises(ProtocolError, match=reason):
            protocol.decode_report(frames)


def test_replies_carry_outcomes_and_reasons_with_the_retry_flag():
    ids = [f"{n:032x}" for n in range(3)]
    messages = protocol.encode_replies(
        [protocol.ack_body(ids[0], "banned")],
        [protocol.nak_body(ids[1], "rate limit", retry=True), protocol.nak_body(ids[2], "bad")],
    )
    assert [message[1] for message in messages] == [protocol.ACK, protocol.NAK]
    answers = [a for message in messages for a in protocol.decode_reply(message)[0]]
    assert answers == [
        protocol.Answer(ids[0], True, outcome="banned"),
        protocol.Answer(ids[1], False, reason="rate limit", retry=True),
        protocol.Answer(ids[2], False, reason="bad", retry=False),
    ]
    assert protocol.encode_replies([], []) == []


def test_a_reply_body_that_cannot_be_read_is_skipped_with_its_reason():
    message = [protocol.PROTOCOL, protocol.NAK, b"nope", b'{"id": 5, "retry": "yes"}']
    answers, problems = protocol.decode_reply(message)
    assert answers == [protocol.Answer("", False, reason="no reason given", retry=False)]
    assert problems == ["body is not JSON: Expecting value: line 1 column 1 (char 0)"]
    with pytest.raises(ProtocolError, match="expected an ack or a nak"):
        protocol.decode_reply([protocol.PROTOCOL, protocol.UPDATE, b"{}"])
    with pytest.raises(ProtocolError, match="expected an ack or a nak"):
        protocol.decode_reply([protocol.PROTOCOL, protocol.ACK])


@pytest.mark.parametrize("packed", [False, True])
def test_updates_and_heartbeats_round_trip_on_both_streams(packed):
    stream = protocol.PACKED if packed else protocol.PROTOCOL
    batch = events(5)
    message = protocol.encode_update(STATE, 7, batch, packed)
    assert message[0] == stream
    decoded = protocol.decode_stream(message, stream=stream)
    assert (decoded.publisher, decoded.seq, decoded.events, decoded.heartbeat) == (
        STATE,
        7,
        batch,
        False,
    )
    hugz = protocol.decode_stream(protocol.encode_heartbeat(STATE, 9, packed), stream=stream)
    assert (hugz.publisher, hugz.seq, hugz.events, hugz.heartbeat) == (STATE, 9, [], True)


@pytest.mark.parametrize(
    "frames, reason",
    [
        ([protocol.PACKED, protocol.ACK, b"{}"], "unexpected b'ack'"),
        ([protocol.PACKED, protocol.HUGZ], "header lacks publisher or seq"),
        ([protocol.PACKED, protocol.HUGZ, b'{"publisher": "ab"}'], "lacks publisher or seq"),
        ([protocol.PACKED, protocol.HUGZ, b'{"publisher": 1, "seq": 1}'], "lacks publisher"),
        ([protocol.PACKED, protocol.HUGZ, b'{"publisher": "x", "seq": 1}'], "malformed"),
        ([protocol.PACKED, protocol.HUGZ, protocol.stream_header(STATE, -1)], "malformed"),
        (
            [protocol.PACKED, protocol.HUGZ, b'{"publisher": "%s", "seq": true}' % STATE.encode()],
            "lacks publisher or seq",
        ),
        ([protocol.PACKED, protocol.UPDATE, protocol.stream_header(STATE, 1)], "one list"),
        (
            [protocol.PACKED, protocol.UPDATE, protocol.stream_header(STATE, 1), b"[]"],
            "does not inflate",
        ),
        (
            [
                protocol.PACKED,
                protocol.UPDATE,
                protocol.stream_header(STATE, 1),
                protocol.pack(b"[]"),
            ],
            "an update has 1-1000 events",
        ),
        (
            protocol.encode_update(STATE, 1, [], True)[:3] + [protocol.pack(b'[{"id": 1}]')],
            "unknown field|missing field|id must be",
        ),
    ],
)
def test_stream_messages_are_refused_whole_with_a_reason(frames, reason):
    with pytest.raises(ProtocolError, match=reason):
        protocol.decode_stream(frames)


def test_an_update_with_one_network_past_the_limits_is_refused_whole():
    wide = BanEvent.decode(event_body(ip="10.0.0.0/16"), NetworkLimits(True, 8, 32))
    message = protocol.encode_update(STATE, 1, [*events(2), wide], packed=True)
    with pytest.raises(ProtocolError, match="wider than the allowed /24"):
        protocol.decode_stream(message)
    assert len(protocol.decode_stream(message, NetworkLimits(True, 8, 32)).events) == 3


def test_a_snapshot_goes_in_parts_of_500_and_an_empty_one_is_one_empty_part():
    table = events(256) + events(256) + events(256)  # 768 events
    parts = [protocol.decode_snapshot_part(m) for m in protocol.encode_snapshot(STATE, 4, table)]
    assert [(p.number, p.last, len(p.events)) for p in parts] == [(0, False, 500), (1, True, 268)]
    assert all(p.publisher == STATE and p.seq == 4 for p in parts)
    assert [e for p in parts for e in p.events] == table
    (empty,) = [protocol.decode_snapshot_part(m) for m in protocol.encode_snapshot(STATE, 0, [])]
    assert (empty.number, empty.last, empty.events) == (0, True, [])


@pytest.mark.parametrize(
    "frames, reason",
    [
        ([protocol.PROTOCOL, protocol.SNAPSHOT, b"{}"], "expected a snapshot part"),
        ([protocol.PROTOCOL, protocol.UPDATE, b"{}", b"[]"], "expected a snapshot part"),
        ([protocol.PROTOCOL, protocol.SNAPSHOT, b"{", b"[]"], "not JSON"),
        (
            [protocol.PROTOCOL, protocol.SNAPSHOT, protocol.stream_header(STATE, 0), b"[]"],
            "lacks part or last",
        ),
        (
            [
                protocol.PROTOCOL,
                protocol.SNAPSHOT,
                json.dumps({"publisher": STATE, "seq": 0, "part": 0, "last": True}).encode(),
                b'[{"a": 1}]',
            ],
            "unknown field 'a'",
        ),
    ],
)
def test_snapshot_parts_are_refused_whole_with_a_reason(frames, reason):
    with pytest.raises(ProtocolError, match=reason):
        protocol.decode_snapshot_part(frames)


def test_a_snapshot_request_is_the_one_word():
    protocol.decode_snapshot_request(protocol.encode_snapshot_request())
    with pytest.raises(ProtocolError, match="expected icanhaz"):
        protocol.decode_snapshot_request([protocol.PROTOCOL, protocol.EVENT, b"{}"])


def test_a_rereport_is_a_report_the_hub_can_tell_apart():
    bodies = [event.encode() for event in events(2)]
    message = protocol.encode_report(bodies, rereport=True)
    assert message[1] == protocol.REREPORT and protocol.decode_report(message) == bodies
    assert protocol.is_rereport(message)
    assert not protocol.is_rereport(protocol.encode_report(bodies))


def test_hello_and_welcome_round_trip_and_a_hello_may_say_more_later():
    assert protocol.decode_hello(protocol.encode_hello()) is None
    assert protocol.decode_hello(protocol.encode_hello(STATE)) == STATE
    later = [protocol.PROTOCOL, protocol.HELLO, b'{"rebuilt": "%s", "more": 1}' % STATE.encode()]
    assert protocol.decode_hello(later) == STATE
    for frames, reason in [
        ([protocol.PROTOCOL, protocol.HELLO, b'{"rebuilt": "x"}'], "must be a state id"),
        ([protocol.PROTOCOL, protocol.HELLO], "expected a hello"),
        ([protocol.PROTOCOL, protocol.HELLO, b"[]"], "JSON object"),
    ]:
        with pytest.raises(ProtocolError, match=reason):
            protocol.decode_hello(frames)
    assert protocol.is_hello(protocol.encode_hello()) and not protocol.is_hello([b"x", b"hello"])
    for young in (False, True):
        welcome = protocol.encode_welcome(STATE, 12, young)
        assert protocol.is_welcome(welcome)
        assert protocol.decode_welcome(welcome) == protocol.Welcome(STATE, 12, young)
    with pytest.raises(ProtocolError, match="welcome lacks publisher"):
        protocol.decode_welcome([protocol.PROTOCOL, protocol.WELCOME, b"{}"])


@pytest.mark.parametrize("packed", [False, True])
def test_a_young_state_says_so_in_every_header_and_older_decoders_read_on(packed):
    """A hub rebuilding a lost state marks its updates, heartbeats and snapshot parts
    young; the key is left out otherwise, and a header's unknown keys are ignored."""
    stream = protocol.PACKED if packed else protocol.PROTOCOL
    update = protocol.encode_update(STATE, 3, events(1), packed, young=True)
    hugz = protocol.encode_heartbeat(STATE, 3, packed, young=True)
    assert json.loads(update[2]) == {"publisher": STATE, "seq": 3, "young": True}
    assert protocol.decode_stream(update, stream=stream).young
    assert protocol.decode_stream(hugz, stream=stream).young
    assert not protocol.decode_stream(
        protocol.encode_heartbeat(STATE, 3, packed), stream=stream
    ).young
    assert b"young" not in protocol.stream_header(STATE, 3)
    (part,) = protocol.encode_snapshot(STATE, 0, [], young=True)
    assert protocol.decode_snapshot_part(part).young
    (part,) = protocol.encode_snapshot(STATE, 0, [])
    assert not protocol.decode_snapshot_part(part).young
    odd = [stream, protocol.HUGZ, b'{"publisher": "%s", "seq": 1, "young": 1}' % STATE.encode()]
    assert not protocol.decode_stream(odd, stream=stream).young  # only true means young


# Failure reports: a body of their own kind in a report, for the cluster jails.


def failure_body(**changes) -> bytes:
    body = {
        "id": "0123456789abcdef0123456789abcdef",
        "node": "node1",
        "failures": [["sshd", "192.0.2.7", 3, 1795000000, 1795000002.5]],
    }
    body.update(changes)
    return json.dumps({k: v for k, v in body.items() if v is not ...}).encode()


def test_a_failure_report_round_trips_and_keeps_the_bytes_it_came_in():
    counts = [protocol.FailureCount("sshd", "2001:DB8::7", 2, 1795000000.0, 1795000001.0)]
    report = protocol.FailureReport.new("web1", counts)
    decoded = protocol.decode_body(report.encode())
    assert decoded == protocol.FailureReport(
        report.id, "web1", (counts[0]._replace(ip="2001:db8::7"),)
    )
    assert decoded.total() == 2
    data = failure_body()
    assert protocol.decode_body(data).encode() == data
    assert protocol.decode_body(event_body()) == BanEvent.decode(event_body())


def test_a_report_of_the_most_failures_with_the_longest_names_fits_a_body_and_a_report():
    address = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    counts = [
        protocol.FailureCount("j" * 64, address, 10**6, 1795000000.123456, 1795000001.123456)
        for _ in range(protocol.MAX_FAILURE_ITEMS)
    ]
    data = protocol.FailureReport.new("n" * 64, counts).encode()
    assert len(data) <= protocol.MAX_FAILURE_BODY <= protocol.MAX_REPORT
    assert len(protocol.decode_body(data).failures) == protocol.MAX_FAILURE_ITEMS


@pytest.mark.parametrize(
    "changes, reason",
    [
        ({"extra": 1}, "unknown field 'extra'"),
        ({"node": "no de"}, "node must be"),
        ({"id": "x"}, "id must be"),
        ({"failures": []}, "failures must be a list of 1-100"),
        ({"failures": [["sshd", "192.0.2.7", 1, 1, 1]] * 101}, "failures must be a list"),
        ({"failures": [["sshd", "192.0.2.7", 1, 1]]}, "a failure is [jail, ip, count"),
        ({"failures": [["../x", "192.0.2.7", 1, 1, 1]]}, "jail must be"),
        ({"failures": [["sshd", "192.0.2.7; id", 1, 1, 1]]}, "is not an address"),
        ({"failures": [["sshd", "0.0.0.0/0", 1, 1, 1]]}, "wider than the allowed /24"),
        ({"failures": [["sshd", "192.0.2.7", 0, 1, 1]]}, "count must be 1-1000000"),
        ({"failures": [["sshd", "192.0.2.7", True, 1, 1]]}, "count must be 1-1000000"),
        ({"failures": [["sshd", "192.0.2.7", 1.5, 1, 1]]}, "count must be 1-1000000"),
        ({"failures": [["sshd", "192.0.2.7", 1, "1", 1]]}, "times must be numbers"),
        ({"failures": [["sshd", "192.0.2.7", 1, -1, 1]]}, "time is out of range"),
        ({"failures": [["sshd", "192.0.2.7", 1, 5, 4]]}, "first time is after its last"),
    ],
)
def test_failure_reports_are_refused_with_a_reason(changes, reason):
    with pytest.raises(ProtocolError, match=re.escape(reason)):
        protocol.decode_body(failure_body(**changes))


def test_an_event_body_is_no_longer_than_before_and_a_failure_body_may_be():
    big_event = event_body(jail="j" * 64, padding="x" * 5000)
    with pytest.raises(ProtocolError, match="larger than 4096"):
        protocol.decode_body(big_event)
    with pytest.raises(ProtocolError, match="larger than 24576"):
        protocol.decode_body(b" " * 30000)
    assert protocol.peek_id(failure_body(failures="x" * 6000)) == "0123456789abcdef0123456789abcdef"


def test_a_hub_before_failure_reports_refuses_them_as_an_unknown_field():
    with pytest.raises(ProtocolError, match="unknown field 'failures'"):
        BanEvent.decode(failure_body())
