"""The hub's admission rules without a socket: a report in, the replies and updates out."""

import json
import logging

import pytest

from f2bzmq import protocol
from f2bzmq.admission import Admission
from f2bzmq.config import config_from
from f2bzmq.detection import Detection
from f2bzmq.legacy import LEGACY_NAK
from f2bzmq.protocol import (
    BAN,
    CLUSTER,
    EVENT,
    PROTOCOL,
    UNBAN,
    BanEvent,
    Decision,
    FailureCount,
    FailureReport,
)
from f2bzmq.state import BanTable

NOW = 1_795_000_000.0
TOKEN = "s3cret"
PEER = "192.0.2.200"  # an old monitor's address


def hub(authorized=("node1", "node2"), **publisher: str) -> Admission:
    """A hub's core holding these node keys, with 10.9.0.0/16 in its allowlist."""
    settings = {"allowlist": "127.0.0.0/8 10.9.0.0/16", "legacy_token": TOKEN, **publisher}
    admission = Admission(config_from({"publisher": settings}), BanTable("hub", 600))
    admission.authorized = frozenset(authorized)
    return admission


def ban(ip="192.0.2.10", node="node1", action=BAN, when=NOW) -> bytes:
    return BanEvent.new(node, "sshd", action, ip, when, 600 if action == BAN else None).encode()


def judge(admission: Admission, frames: list[bytes], user="node1", now=NOW):
    """What the hub says of one report: each answer as (id, "ACK", outcome) or
    (id, "NAK", reason, retry), in the order of its reply messages, and the updates to
    broadcast as (sequence number, address)."""
    replies, updates = admission.handle_report(frames, user, now)
    said = []
    for reply in replies:
        answers, problems = protocol.decode_reply(reply)
        assert problems == []
        for a in answers:
            said.append((a.id, "ACK", a.outcome) if a.stored else (a.id, "NAK", a.reason, a.retry))
    return said, [(update.seq, update.event.ip) for update in updates]


def report(*bodies: bytes) -> list[bytes]:
    return [PROTOCOL, EVENT, *bodies]


def event_id(body: bytes) -> str:
    return json.loads(body)["id"]


BODY = ban()
NOT_AN_ADDRESS = (
    "ip '0.0.0.0/0; reboot' is not an address: "
    "'0.0.0.0/0; reboot' does not appear to be an IPv4 or IPv6 network"
)


@pytest.mark.parametrize(
    "body, user, answer",
    [
        (ban(), "node1", ("ACK", "banned")),
        (ban(node="web7"), None, ("ACK", "banned")),  # a hub without keys: any name
        (ban(action=UNBAN), "node1", ("ACK", "redundant")),
        (ban(when=NOW - 700), "node1", ("ACK", "expired")),
        (ban(node="node2"), "node1", ("NAK", "node 'node2' reported with the key of 'node1'")),
        (ban(node="node3"), "node3", ("NAK", "this node's key has been withdrawn")),
        (ban("10.9.1.2"), "node1", ("NAK", "10.9.1.2 is in the hub's allowlist")),
        (ban("10.9.1.0/24"), "node1", ("NAK", "10.9.1.0/24 is in the hub's allowlist")),
        (ban("::ffff:10.9.1.2"), "node1", ("NAK", "10.9.1.2 is in the hub's allowlist")),
        (ban("10.9.1.2", action=UNBAN), "node1", ("ACK", "redundant")),
        (
            BODY.replace(b"192.0.2.10", b"192.0.2.0/20"),
            "node1",
            ("NAK", "network 192.0.0.0/20 is wider than the allowed /24"),
        ),
        (BODY.replace(b"192.0.2.10", b"0.0.0.0/0; reboot"), "node1", ("NAK", NOT_AN_ADDRESS)),
    ],
    ids=[
        "new ban",
        "no keys",
        "unban of nothing",
        "ban already over",
        "another node's name",
        "withdrawn key",
        "allowlisted",
        "network over the allowlist",
        "allowlisted, IPv4-mapped",
        "unban of an allowlisted address",
        "network too wide",
        "not an address",
    ],
)
def test_each_event_is_answered_by_the_hubs_rules(body, user, answer):
    admission = hub()
    said, updates = judge(admission, report(body), user)
    retry = (False,) if answer[0] == "NAK" else ()
    assert said == [(event_id(body), *answer, *retry)]
    banned = [json.loads(body)["ip"]] if answer == ("ACK", "banned") else []
    assert updates == [(1, ip) for ip in banned]
    assert [ip for _, ip in admission.table.bans] == banned


@pytest.mark.parametrize(
    "ip, reason",
    [
        ("0.0.0.0", "0.0.0.0 is a special-purpose address (unspecified)"),
        ("169.254.169.254", "169.254.169.254 is a special-purpose address (link-local)"),
        ("fe80::/64", "fe80::/64 holds a special-purpose address (link-local)"),
        ("ff02::1", "ff02::1 is a special-purpose address (multicast)"),
        ("224.0.0.0/24", "224.0.0.0/24 holds a special-purpose address (multicast)"),
        (
            "255.255.255.255",
            "255.255.255.255 is a special-purpose address (reserved and broadcast)",
        ),
        ("127.0.0.1", "127.0.0.1 is a special-purpose address (loopback)"),
        ("192.0.2.53", "192.0.2.53 is a hub's address"),
        ("192.0.2.0/24", "192.0.2.0/24 holds a hub's address (192.0.2.53)"),
        ("2001:db8::53", "2001:db8::53 is a hub's address"),
        ("::ffff:192.0.2.53", "192.0.2.53 is a hub's address"),
        ("198.51.100.7", "198.51.100.7 is the address of node node2"),
        (
            "198.51.100.0/28",
            "198.51.100.0/28 holds the address of node node2 (::ffff:198.51.100.7)",
        ),
        ("10.9.0.1", "10.9.0.1 is in the hub's allowlist"),
        ("198.51.100.8", None),
        ("192.0.3.1", None),
    ],
)
def test_the_shipped_allowlist_keeps_special_hub_and_node_addresses_out(ip, reason):
    admission = hub(allowlist="special-purpose hubs nodes 10.9.0.0/16")
    admission.set_addresses(["192.0.2.53", "2001:db8::53"], {"node2": ["::ffff:198.51.100.7"]})
    said, _ = judge(admission, report(ban(ip)))
    assert said[0][2] == ("banned" if reason is None else reason)
    assert judge(admission, report(ban(ip, action=UNBAN)))[0][0][1] == "ACK"


def test_an_allowlist_without_the_words_keeps_only_its_networks():
    admission = hub(allowlist="10.9.0.0/16")
    admission.set_addresses(["192.0.2.53"], {"node2": ["198.51.100.7"]})
    for ip in ("0.0.0.0", "192.0.2.53", "198.51.100.7"):
        assert judge(admission, report(ban(ip)))[0][0][2] == "banned"


@pytest.mark.parametrize(
    "frames, named, reason",
    [
        ([PROTOCOL, EVENT], "", "expected 1-100 event bodies"),
        (report(*(ban(f"192.0.2.{n}") for n in range(1, 102))), "", "expected 1-100 event bodies"),
        ([PROTOCOL, protocol.ACK, BODY], event_id(BODY), "expected 1-100 event bodies"),
        ([b"F2BZMQ9", EVENT, BODY], event_id(BODY), "unknown protocol 'F2BZMQ9', expected F2BZMQ1"),
        ([PROTOCOL], "", "message has too few frames"),
    ],
    ids=["no events", "101 events", "another kind", "another protocol", "one frame"],
)
def test_a_report_that_cannot_be_read_gets_one_nak_and_changes_nothing(frames, named, reason):
    admission = hub()
    assert judge(admission, frames) == ([(named, "NAK", reason, False)], [])
    assert admission.table.sequence == 0 and admission.table.seen == {}
    assert admission.counters == {"reports": 1, "accepted": 0, "refused": 1, "duplicates": 0}


def test_each_event_of_a_report_is_judged_on_its_own():
    admission = hub()
    good, other, allowlisted = ban("198.51.100.1"), ban("198.51.100.2"), ban("10.9.0.1")
    forged = ban("198.51.100.3", node="node2")
    unreadable = b'{"id": "' + b"ab" * 16 + b'", "node": 5}'
    said, updates = judge(admission, report(good, unreadable, other, forged, good, allowlisted))
    assert said == [
        (event_id(good), "ACK", "banned"),
        (event_id(other), "ACK", "banned"),
        (event_id(good), "ACK", "duplicate"),
        ("ab" * 16, "NAK", "missing field 'action'", False),
        (event_id(forged), "NAK", "node 'node2' reported with the key of 'node1'", False),
        (event_id(allowlisted), "NAK", "10.9.0.1 is in the hub's allowlist", False),
    ]
    assert updates == [(1, "198.51.100.1"), (2, "198.51.100.2")]
    assert admission.counters == {"reports": 1, "accepted": 2, "refused": 3, "duplicates": 1}


def test_a_flooding_node_is_told_to_retry_later_and_the_others_are_not():
    admission = hub(rate_limit="0.1", rate_burst="5")
    said = [judge(admission, report(ban(f"198.51.100.{n}")))[0][0] for n in range(1, 9)]
    assert [answer[1:] for answer in said] == [("ACK", "banned")] * 5 + [
        ("NAK", "rate limit: node node1 sends more than 0.1 events/s", True)
    ] * 3
    assert admission.table.sequence == 5  # a throttled event never reaches the table
    node2 = [judge(admission, report(ban(f"203.0.113.{n}", "node2")), "node2") for n in range(5)]
    assert [said[0][1:] for said, _ in node2] == [("ACK", "banned")] * 5
    # One token back after 10 s at 0.1 events/s, and one only.
    later = [judge(admission, report(ban(f"198.51.100.{n}")), now=NOW + 10)[0] for n in (9, 10)]
    assert [said[0][1] for said in later] == ["ACK", "NAK"]


def test_at_the_shipped_limits_a_real_attack_goes_through_paced_and_a_flood_then_waits():
    """The README's promise, at the defaults (rate_burst 20,000, rate_peak 2,000/s,
    rate_limit 50/s): one node's 20,000 new bans are taken at 2,000 a second, so an
    attack of 10,000 is in within 5 s; past the burst the node is held to 50 a second."""
    admission = hub()
    addresses = (f"100.{64 + n // 65536}.{(n >> 8) & 255}.{n & 255}" for n in range(40_000))

    def offer(count: int, second: int) -> int:
        """Offer `count` new bans in reports of 100 at NOW + second; how many are taken."""
        taken = 0
        for _ in range(count // 100):
            bodies = [ban(next(addresses)) for _ in range(100)]
            said, _ = judge(admission, report(*bodies), now=NOW + second)
            taken += sum(answer[1] == "ACK" for answer in said)
        return taken

    assert [offer(3000, second) for second in range(10)] == [2000] * 10
    assert admission.table.sequence == 20_000
    assert offer(3000, 10) == 500  # what 10 s at 50 a second gave back
    assert offer(1000, 11) == 50
    node2 = [judge(admission, report(ban("203.0.113.1", "node2")), "node2", NOW + 11)]
    assert node2[0][0][0][1] == "ACK"  # the others are not held back


def test_an_event_the_rules_refuse_costs_no_token():
    """The bucket pays for what may reach the table: a node refused by a rule is not
    throttled on top of it."""
    admission = hub(rate_limit="0.1", rate_burst="2")
    for _ in range(5):
        judge(admission, report(ban("10.9.0.1")))
        judge(admission, report(ban(node="node2")))
    said = [judge(admission, report(ban(f"198.51.100.{n}")))[0][0][1] for n in (1, 2, 3)]
    assert said == ["ACK", "ACK", "NAK"]


def test_a_node_without_keys_is_throttled_by_the_name_it_reports():
    admission = hub(authorized=(), rate_limit="0.1", rate_burst="1")
    first, second = (
        judge(admission, report(ban(ip, "web7")), None)[0][0]
        for ip in ("198.51.100.1", "198.51.100.2")
    )
    assert (first[1], second[1:]) == (
        "ACK",
        ("NAK", "rate limit: node web7 sends more than 0.1 events/s", True),
    )
    assert judge(admission, report(ban(node="web8")), None)[0][0][1] == "ACK"


def test_the_core_keeps_the_figures_of_what_it_took():
    admission = hub()
    judge(admission, report(ban("198.51.100.1", when=NOW - 0.004)), now=NOW)
    judge(admission, report(ban("198.51.100.1", "node2", when=NOW - 2)), "node2", now=NOW + 1)
    duplicate = ban("198.51.100.2", when=NOW + 2)
    judge(admission, report(duplicate, duplicate, ban("10.9.0.1")), now=NOW + 2)
    assert admission.counters == {"reports": 3, "accepted": 3, "refused": 1, "duplicates": 1}
    assert admission.last_report == {"node1": NOW + 2, "node2": NOW + 1}
    delays = admission.accept_delays
    assert delays.count == 3 and delays.sum == pytest.approx(0.004 + 3 + 0)
    assert [count for _, count in delays.as_dict()["buckets"]][:3] == [1, 2, 2]


def test_a_key_withdrawn_after_its_node_connected_speaks_no_more():
    admission = hub()
    assert judge(admission, report(ban("198.51.100.1")))[0][0][1] == "ACK"
    admission.authorized = frozenset({"node2"})  # what the hub read again on SIGHUP
    said, updates = judge(admission, report(ban("198.51.100.2")))
    assert said[0][1:] == ("NAK", "this node's key has been withdrawn", False) and updates == []


# Old monitors: one string frame; the reply is the report without its token, or NAK.


@pytest.mark.parametrize(
    "request_, authorized, reply, why",
    [
        (f"{TOKEN}|oldweb|sshd|Ban|198.51.100.22", ("node1",), "oldweb|sshd|Ban|198.51.100.22", ""),
        (f"{TOKEN}|oldweb|sshd|UnBan|198.51.100.22", (), "oldweb|sshd|UnBan|198.51.100.22", ""),
        (f"{TOKEN}|node1|sshd|Ban|198.51.100.22", (), "node1|sshd|Ban|198.51.100.22", ""),
        (
            f"{TOKEN}|node1|sshd|Ban|198.51.100.22",
            ("node1",),
            "NAK",
            "node node1 has a key: it must use it",
        ),
        ("wrong|oldweb|sshd|Ban|198.51.100.22", (), "NAK", "wrong token"),
        (f"{TOKEN}|oldweb|sshd|Ban|10.9.3.4", (), "NAK", "10.9.3.4 is in the hub's allowlist"),
        (
            f"{TOKEN}|oldweb|sshd|Ban|::ffff:127.0.0.1",
            (),
            "NAK",
            "127.0.0.1 is in the hub's allowlist",
        ),
        (f"{TOKEN}|oldweb|sshd;reboot|Ban|198.51.100.22", (), "NAK", "jail"),
    ],
    ids=[
        "ban",
        "unban",
        "a node name without a key",
        "a node with a key",
        "wrong token",
        "allowlisted",
        "allowlisted, IPv4-mapped",
        "odd jail",
    ],
)
def test_old_reports_are_held_to_the_same_rules(request_, authorized, reply, why, caplog):
    admission = hub(authorized)
    with caplog.at_level(logging.WARNING, "f2bzmq.admission"):
        answer, updates = admission.handle_legacy([request_.encode()], PEER, NOW)
    assert answer == reply.encode()
    if reply == "NAK":
        assert answer == LEGACY_NAK and updates == [] and admission.table.seen == {}
        (line,) = caplog.messages
        assert line.startswith(f"refused a legacy report from {PEER}: ") and why in line
        assert admission.counters["refused"] == 1
    elif "|Ban|" in request_:
        (update,) = updates
        assert (update.seq, update.event.ip, update.event.bantime) == (1, "198.51.100.22", None)
    else:
        assert updates == []  # nothing was banned
    assert admission.counters["reports"] == 0  # "reports" counts the native endpoint's


def legacy(admission: Admission, name: str, ip: str, peer=PEER, action="Ban") -> bytes:
    request = f"{TOKEN}|{name}|sshd|{action}|{ip}".encode()
    return admission.handle_legacy([request], peer, NOW)[0]


def test_old_monitors_are_throttled_by_their_address_not_the_name_they_send():
    """The name is the sender's word: a made-up one must not buy a fresh bucket. A
    throttled old monitor gets no answer yet (None): it waits, and loses nothing."""
    admission = hub(authorized=(), rate_limit="0.1", rate_burst="3")
    replies = [legacy(admission, "oldweb", f"198.51.100.{n}") for n in range(30, 35)]
    assert replies[:3] == [f"oldweb|sshd|Ban|198.51.100.{n}".encode() for n in range(30, 33)]
    assert replies[3:] == [None, None]
    assert legacy(admission, "other", "198.51.100.36") is None
    assert admission.legacy_ready_at(PEER, NOW) == NOW + 10  # a token at 0.1 events/s
    assert legacy(admission, "other", "198.51.100.36", peer="192.0.2.201") is not None
    # One host holds a whole IPv6 /64: it is one sender.
    v6 = [legacy(admission, "v6web", f"198.51.100.{n}", peer=f"2001:db8::{n}") for n in range(4)]
    assert v6.count(None) == 1


def test_made_up_names_neither_grow_the_hub_nor_refill_a_keyed_nodes_bucket():
    admission = hub(rate_limit="0.1", rate_burst="2")
    node1 = [judge(admission, report(ban(f"198.51.100.{n}")))[0][0][1] for n in (1, 2, 3)]
    assert node1 == ["ACK", "ACK", "NAK"]
    for n in range(3000):
        legacy(admission, f"made-up-{n}", "203.0.113.9", peer=f"10.{n >> 8}.{n & 255}.1")
    assert len(admission.last_report) <= 1000 and "node1" in admission.last_report
    assert len(admission.legacy_buckets.buckets) <= 10_000
    assert judge(admission, report(ban("198.51.100.4")))[0][0][1] == "NAK"


def test_an_old_monitor_cannot_lift_a_keyed_nodes_ban_even_when_foreign_unbans_are_allowed():
    admission = hub(allow_foreign_unban="true")
    admission.table.allow_foreign_unban = True  # what the publisher sets from the setting
    judge(admission, report(ban("198.51.100.1")))
    assert legacy(admission, "oldweb", "198.51.100.2") != LEGACY_NAK
    legacy(admission, "oldweb2", "198.51.100.1", action="Unban")
    legacy(admission, "oldweb2", "198.51.100.2", action="Unban")
    assert [ip for _, ip in admission.table.bans] == ["198.51.100.1"]
    unban = ban("198.51.100.1", "node2", UNBAN)
    assert judge(admission, report(unban), "node2")[1] == [(4, "198.51.100.1")]


def test_refusals_are_logged_once_a_minute_per_sender_whatever_the_reason(caplog):
    admission = hub()
    with caplog.at_level(logging.WARNING, "f2bzmq.admission"):
        judge(admission, report(ban(node="node1")), "node2")
        judge(admission, report(ban("10.9.0.1", node="node2")), "node2")  # another reason
        judge(admission, report(ban("10.9.0.1")), "node1")
        judge(admission, report(ban("10.9.0.1", node="web7")), None)
        for peer in (PEER, PEER, "192.0.2.201"):
            admission.handle_legacy([b"wrong|oldweb|sshd|Ban|198.51.100.1"], peer, NOW)
    assert caplog.messages == [
        "refused a report from node2: node 'node1' reported with the key of 'node2'",
        "refused a report from node1: 10.9.0.1 is in the hub's allowlist",
        "refused a report: 10.9.0.1 is in the hub's allowlist",
        f"refused a legacy report from {PEER}: wrong token",
        "refused a legacy report from 192.0.2.201: wrong token",
    ]
    assert admission.counters["refused"] == 7


# Re-reports: bans a node sends again (after a log rotation, to a hub rebuilding its
# table) pay only for what the hub did not know, and never take a fresh event's token.

THROTTLED = ("NAK", "rate limit: node node1 sends more than 0.1 events/s", True)


def test_a_ban_the_hub_knows_costs_no_token_however_often_it_comes():
    admission = hub(rate_limit="0.1", rate_burst="2")
    known = [ban("198.51.100.1"), ban("198.51.100.2")]
    assert [judge(admission, report(b))[0][0][1] for b in known] == ["ACK", "ACK"]
    again = [ban("198.51.100.1") for _ in range(5)] + [ban("198.51.100.2") for _ in range(5)]
    said = [judge(admission, rereport(b))[0][0][1:] for b in again]
    assert said == [("ACK", "extended")] * 10
    duplicate = judge(admission, report(known[0]))[0][0][1:]
    assert duplicate == ("ACK", "duplicate")
    assert judge(admission, report(ban("198.51.100.3")))[0][0][1:] == THROTTLED  # burst spent


def test_rereports_leave_a_tenth_of_the_burst_to_fresh_events():
    admission = hub(rate_limit="0.1", rate_burst="20")
    lost = [rereport(ban(f"198.51.100.{n}")) for n in range(1, 21)]  # all news to this hub
    said = [judge(admission, frames)[0][0][1] for frames in lost]
    assert said == ["ACK"] * 18 + ["NAK"] * 2  # two tokens left for what the log says
    fresh = [judge(admission, report(ban(f"203.0.113.{n}")))[0][0][1] for n in (1, 2, 3)]
    assert fresh == ["ACK", "ACK", "NAK"]


def test_a_hub_that_cannot_store_asks_for_every_event_again_later():
    admission = hub()
    admission.unavailable = "the hub cannot store events now: database or disk is full"
    said, updates = judge(admission, report(ban("198.51.100.1"), ban("198.51.100.2")))
    assert [answer[1:] for answer in said] == [("NAK", admission.unavailable, True)] * 2
    assert updates == [] and admission.table.seen == {}


def rereport(*bodies: bytes) -> list[bytes]:
    return [PROTOCOL, protocol.REREPORT, *bodies]


# Cluster jails: failure reports in, the bans they decide out, by the same rules.


def detecting_hub(**detect: str) -> Admission:
    """A hub with the cluster jail [detect:sshd] (these keys, the rest at their defaults)."""
    config = config_from(
        {
            "publisher": {"allowlist": "127.0.0.0/8 10.9.0.0/16"},
            "detect:sshd": {"enabled": "true", **detect},
        }
    )
    table = BanTable("hub", 600)
    detection = Detection(config.cluster_jails, 600, config.publisher.dbpurgeage)
    admission = Admission(config, table, detection)
    admission.authorized = frozenset({"node1", "node2", "node3"})
    return admission


def failures(node="node1", ip="192.0.2.7", count=2, when=NOW, jail="sshd") -> bytes:
    return FailureReport.new(node, [FailureCount(jail, ip, count, when, when)]).encode()


def test_failure_reports_are_counted_and_the_ban_they_decide_is_broadcast():
    admission = detecting_hub()
    first = failures("node1", count=3)
    assert judge(admission, report(first), "node1") == ([(event_id(first), "ACK", "counted")], [])
    assert judge(admission, report(first), "node1")[0] == [(event_id(first), "ACK", "duplicate")]
    said, updates = judge(admission, report(failures("node2")), "node2")
    assert said[0][1:] == ("ACK", "counted") and updates == [(1, "192.0.2.7")]
    (active,) = admission.table.bans.values()
    assert (active.event.node, active.event.bantime) == (CLUSTER, 600)


@pytest.mark.parametrize(
    "body, user, reason",
    [
        (failures("node2"), "node1", "node 'node2' reported with the key of 'node1'"),
        (failures(CLUSTER), None, "'cluster' names the cluster's own bans, never a node"),
        (
            failures("node1", ip="0.0.0.0/0"),
            "node1",
            "network 0.0.0.0/0 is wider than the allowed /24",
        ),
    ],
)
def test_failure_reports_are_held_to_the_nodes_rules(body, user, reason):
    said, updates = judge(detecting_hub(), report(body), user)
    assert said == [(event_id(body), "NAK", reason, False)] and updates == []


def test_no_node_may_report_a_ban_in_the_clusters_name():
    body = ban(node=CLUSTER)
    said, _ = judge(hub(authorized=(CLUSTER,)), report(body), None)
    assert said == [
        (event_id(body), "NAK", "'cluster' names the cluster's own bans, never a node", False)
    ]


def test_failures_of_allowlisted_addresses_count_for_nothing():
    admission = detecting_hub()
    for node in ("node1", "node2", "node3"):
        judge(admission, report(failures(node, ip="10.9.0.5", count=5)), node)
    assert admission.table.bans == {} and admission.detection.status()["failures"] == 0


def test_failures_of_an_address_an_operator_holds_count_for_nothing():
    """A ban the hold would refuse is no ban: counted, it would lengthen the next one."""
    admission = detecting_hub()
    hold = Decision.new("alice", "unban", NOW - 1, ip="192.0.2.7", hold=3600)
    admission.holds.add(hold)
    for node in ("node1", "node2", "node3"):
        judge(admission, report(failures(node, count=5)), node)
    assert admission.table.bans == {} and admission.detection.status()["failures"] == 0
    assert not admission.detection.history


def test_a_hub_without_cluster_jails_acks_failure_reports_and_counts_nothing():
    body = failures()
    assert judge(hub(), report(body)) == ([(event_id(body), "ACK", "ignored")], [])


def test_a_nodes_ban_of_an_address_banned_before_gets_the_clusters_longer_ban():
    admission = detecting_hub(**{"bantime.increment": "true"})
    earlier = NOW - 5000
    judge(admission, report(ban("192.0.2.7", "node1", when=earlier)), "node1", earlier)
    judge(
        admission, report(ban("192.0.2.7", "node1", UNBAN, earlier + 600)), "node1", earlier + 600
    )
    said, updates = judge(admission, report(ban("192.0.2.7", "node2")), "node2")
    assert said[0][1:] == ("ACK", "banned")
    # node2's own ban, then the cluster's twice as long in its place: an unban and a ban.
    assert updates == [(3, "192.0.2.7"), (4, "192.0.2.7"), (5, "192.0.2.7")]
    active = admission.table.bans[("sshd", "192.0.2.7")]
    assert (active.event.node, active.event.bantime) == (CLUSTER, 1200)
    assert admission.detection.status()["escalations"] == 1


def test_an_old_monitors_ban_counts_in_the_address_history_as_a_nodes():
    """A cluster that still has fail2ban-zmq-tools monitors: their bans lengthen the next
    ban of an address, and are lengthened, as keyed nodes' are."""
    admission = detecting_hub(**{"bantime.increment": "true"})
    admission.legacy_token = TOKEN
    earlier = NOW - 5000
    judge(admission, report(ban("192.0.2.7", "node1", when=earlier)), "node1", earlier)
    judge(
        admission, report(ban("192.0.2.7", "node1", UNBAN, earlier + 600)), "node1", earlier + 600
    )
    request = f"{TOKEN}|oldweb|sshd|Ban|192.0.2.7".encode()
    answer, updates = admission.handle_legacy([request], PEER, NOW)
    assert answer == b"oldweb|sshd|Ban|192.0.2.7"  # echoed, as the old hub did
    # The old monitor's ban, then the cluster's twice as long in its place.
    assert [(u.seq, u.event.node, u.event.action) for u in updates] == [
        (3, "oldweb", "ban"),
        (4, "hub", "unban"),  # the hub lifts it to ban it again, longer
        (5, CLUSTER, "ban"),
    ]
    active = admission.table.bans[("sshd", "192.0.2.7")]
    assert (active.event.node, active.event.bantime) == (CLUSTER, 1200)


def test_a_node_unbanning_early_lets_the_failures_count_again():
    admission = detecting_hub()
    judge(admission, report(ban("192.0.2.7", "node1")), "node1")
    judge(admission, report(failures("node2", count=5)), "node2")
    assert admission.detection.status()["failures"] == 0  # found while banned
    judge(admission, report(ban("192.0.2.7", "node1", UNBAN, when=NOW + 10)), "node1", NOW + 10)
    judge(admission, report(failures("node2", count=3, when=NOW + 20)), "node2", NOW + 20)
    _, updates = judge(
        admission, report(failures("node3", count=2, when=NOW + 21)), "node3", NOW + 21
    )
    assert updates == [(3, "192.0.2.7")]
