"""Event validation and encoding: every rule, no socket."""

import json
import random
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
    from f2bzmq.subscriber import MAX_MESSAGE

    noise = random.Random(1).randbytes(protocol.MAX_PACKED)
    assert len(protocol.pack(noise)) <= MAX_MESSAGE


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

    allowlist = protocol.Allowlist(
        ipaddress.ip_network(n) for n in ("127.0.0.0/8", "10.1.0.0/16", "2001:db8::/32")
    )
    assert allowlist.covers("127.0.0.1")
    assert allowlist.covers("10.1.255.255")
    assert not allowlist.covers("10.2.0.0")
    assert allowlist.covers("10.0.0.0/15")  # a wider ban would hold the allowlisted range
    assert allowlist.covers("2001:db8::5")
    assert not allowlist.covers("2001:db9::5")
