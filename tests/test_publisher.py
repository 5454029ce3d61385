"""The publisher over real ZeroMQ sockets: ACK/NAK, broadcasts with sequence numbers, snapshots."""

import contextlib
import json
import logging
import signal
import sqlite3
import time

import pytest
import zmq

from f2bzmq import protocol
from f2bzmq.config import config_from
from f2bzmq.lab import free_ports, make_keys
from f2bzmq.protocol import BanEvent
from f2bzmq.publisher import Publisher
from tests.support.nodeclient import NodeClient


def ban(ip="192.0.2.10", node="node1", bantime=600):
    return BanEvent.new(node, "sshd", "ban", ip, bantime=bantime)


def test_a_new_ban_is_acked_and_broadcast_with_a_sequence_number(peer):
    event = ban()
    assert peer.report(event.encode()) == (protocol.ACK, {"id": event.id, "outcome": "banned"})
    header, update = peer.next_update()
    assert header["seq"] == 1 and update == event


def test_every_update_and_heartbeat_goes_out_plain_and_packed(peer):
    """Subscribers take the packed stream; one from before it keeps the plain one."""
    packed = NodeClient(peer.ports, peer.keys_dir, "node2", stream=protocol.PACKED)
    try:
        assert packed.updates.recv_multipart()[:2] == [protocol.PACKED, protocol.HUGZ]
        events = [ban(f"192.0.2.{n}") for n in range(1, 31)]
        acks, _ = peer.report(*(event.encode() for event in events))
        assert acks == protocol.ACK
        for client in (peer, packed):
            got = [client.next_update() for _ in events]
            assert [update for _, update in got] == events
            assert [header["seq"] for header, _ in got] == list(range(1, 31))
    finally:
        packed.close()


def test_duplicates_and_known_bans_are_acked_but_not_broadcast(peer):
    first = ban()
    peer.report(first.encode())
    assert peer.report(first.encode())[1]["outcome"] == "duplicate"
    node2 = NodeClient(peer.ports, peer.keys_dir, "node2")
    assert node2.report(ban(node="node2").encode())[1]["outcome"] == "extended"
    node2.close()
    second = ban("198.51.100.1")
    peer.report(second.encode())
    assert peer.next_update()[1] == first
    header, update = peer.next_update()
    assert (header["seq"], update) == (2, second)


@pytest.mark.parametrize(
    "frames, reason",
    [
        ([ban().encode().replace(b'"id":"', b'"id":"zz')], "id must be 32"),
        ([ban().encode().replace(b"192.0.2.10", b"0.0.0.0/0; reboot")], "not an address"),
        ([b"not json"], "not JSON"),
        ([], "expected 1-100 event bodies"),
        ([b"{" + b" " * 10000 + b"}"], "larger than"),
    ],
)
def test_invalid_reports_get_a_nak_with_the_reason_and_change_nothing(peer, frames, reason):
    kind, body = peer.report(*frames)
    assert kind == protocol.NAK and reason in body["reason"] and body["retry"] is False
    good = ban()
    assert peer.report(good.encode())[1]["outcome"] == "banned"
    assert peer.next_update()[0]["seq"] == 1


def test_the_hub_stores_and_relays_one_encoding_and_refuses_a_field_given_twice(peer):
    event = ban("192.0.2.77")
    canonical = event.encode()
    padded = canonical.replace(b",", b"," + b" " * 500)  # 3 kB of blanks, within MAX_BODY
    twice = ban("192.0.2.78").encode()[:-1] + b',"ip":"192.0.2.79"}'
    kind, body = peer.report(twice)
    assert kind == protocol.NAK and "field 'ip' is given twice" in body["reason"]
    assert peer.report(padded)[1]["outcome"] == "banned"
    while (frames := peer.updates.recv_multipart())[1] != protocol.UPDATE:
        pass
    assert frames[3] == b"[" + canonical + b"]"
    snapshots = peer.secure(peer.context.socket(zmq.DEALER))
    snapshots.rcvtimeo = 10000
    snapshots.connect(peer.snapshots_endpoint)
    snapshots.send_multipart(protocol.encode_snapshot_request())
    assert snapshots.recv_multipart()[3] == b"[" + canonical + b"]"


def report_many(peer, bodies):
    """Send one report of several events; the reply messages, by kind, until every event
    was answered."""
    peer.reports.send_multipart([protocol.PROTOCOL, protocol.EVENT, *bodies])
    replies = {}
    answered = 0
    while answered < len(bodies):
        _, kind, *answers = peer.reports.recv_multipart()
        assert kind not in replies  # one message of each kind
        replies[kind] = [json.loads(answer) for answer in answers]
        answered += len(answers)
    return replies


def test_a_report_of_many_events_gets_one_ack_message(peer):
    events = [ban(f"198.51.100.{i}") for i in range(1, 51)]
    replies = report_many(peer, [event.encode() for event in events])
    assert replies == {protocol.ACK: [{"id": event.id, "outcome": "banned"} for event in events]}
    received = [peer.next_update() for _ in events]
    assert [header["seq"] for header, _ in received] == list(range(1, 51))
    assert [update for _, update in received] == events


def test_each_event_of_a_report_is_judged_on_its_own(peer):
    good, other = ban("198.51.100.1"), ban("198.51.100.2")
    forged = ban("198.51.100.3", node="node2")  # node1's key may not report for node2
    broken = ban("198.51.100.4").encode().replace(b"198.51.100.4", b"0.0.0.0/0; reboot")
    bodies = [good.encode(), broken, other.encode(), forged.encode(), good.encode()]
    replies = report_many(peer, bodies)
    assert replies[protocol.ACK] == [
        {"id": good.id, "outcome": "banned"},
        {"id": other.id, "outcome": "banned"},
        {"id": good.id, "outcome": "duplicate"},
    ]
    refused = replies[protocol.NAK]
    assert [nak["id"] for nak in refused] == [json.loads(broken)["id"], forged.id]
    assert "not an address" in refused[0]["reason"] and "key of" in refused[1]["reason"]
    assert [peer.next_update()[1] for _ in range(2)] == [good, other]
    header, snapshot = peer.snapshot()
    assert header["seq"] == 2 and sorted(e.ip for e in snapshot) == [good.ip, other.ip]


def test_a_report_of_too_many_events_is_refused_whole(peer):
    events = [ban(f"198.51.100.{i}") for i in range(1, protocol.MAX_REPORT_EVENTS + 2)]
    kind, body = peer.report(*(event.encode() for event in events))
    assert kind == protocol.NAK and "expected 1-100 event bodies" in body["reason"]
    header, snapshot = peer.snapshot()
    assert header["seq"] == 0 and snapshot == []


def test_a_message_of_very_many_frames_gets_one_nak_and_the_hub_goes_on(hub, peer):
    peer.reports.send_multipart([protocol.PROTOCOL, protocol.EVENT] + [b""] * 200000)
    _, kind, body = peer.reports.recv_multipart()
    assert kind == protocol.NAK and "expected 1-100 event bodies" in json.loads(body)["reason"]
    good = ban()
    assert peer.report(good.encode())[1]["outcome"] == "banned"
    assert hub.publisher.alive()


def test_wrong_protocol_frame_is_refused(peer):
    peer.reports.send_multipart([b"F2BZMQ9", protocol.EVENT, ban().encode()])
    _, kind, body = peer.reports.recv_multipart()
    assert kind == protocol.NAK and "unknown protocol 'F2BZMQ9'" in json.loads(body)["reason"]


def test_snapshot_has_every_active_ban_and_survives_kill_9(hub, peer):
    events = [ban(f"10.0.{i // 250}.{i % 250 + 1}") for i in range(1200)]
    for event in events:
        peer.reports.send_multipart([protocol.PROTOCOL, protocol.EVENT, event.encode()])
    acks = [peer.reports.recv_multipart() for _ in events]
    assert {json.loads(body)["outcome"] for _, _, body in acks} == {"banned"}
    header, snapshot = peer.snapshot()
    assert header["seq"] == 1200 and sorted(e.ip for e in snapshot) == sorted(e.ip for e in events)

    # Everything ACKed is on disk: a crash right after changes nothing.
    hub.publisher.stop(signal.SIGKILL)
    hub.publisher.start()
    again, snapshot = peer.snapshot()
    assert again["seq"] == 1200 and again["publisher"] == header["publisher"]
    assert len(snapshot) == 1200


def test_expired_bans_are_lifted_and_broadcast(peer):
    peer.report(ban(bantime=1).encode())
    peer.next_update()
    header, update = peer.next_update()
    assert (header["seq"], update.action, update.ip) == (2, "unban", "192.0.2.10")


@pytest.mark.parametrize("stream", [protocol.PROTOCOL, protocol.PACKED])
def test_a_burst_goes_out_in_few_messages_with_consecutive_sequence_numbers(hub, peer, stream):
    node = NodeClient(peer.ports, peer.keys_dir, "node2", stream=stream)
    assert node.updates.recv_multipart()[1] == protocol.HUGZ  # joined
    events = [ban(f"198.51.{i // 250}.{i % 250 + 1}") for i in range(1500)]
    # All in flight at once, in reports of 100, waiting for the hub together: stopped,
    # it finds them all on waking and takes up to 1000 events in one pass.
    hub.publisher.process.send_signal(signal.SIGSTOP)
    try:
        for first in range(0, len(events), 100):
            report = [event.encode() for event in events[first : first + 100]]
            peer.reports.send_multipart([protocol.PROTOCOL, protocol.EVENT, *report])
        time.sleep(0.2)
    finally:
        hub.publisher.process.send_signal(signal.SIGCONT)
    acked = sum(len(peer.reports.recv_multipart()) - 2 for _ in range(15))
    assert acked == len(events)
    most = protocol.MAX_PACKED_EVENTS if stream == protocol.PACKED else protocol.MAX_UPDATE_EVENTS
    sizes, received = [], []
    while len(received) < len(events):
        frames = node.updates.recv_multipart()
        if frames[1] != protocol.UPDATE:
            continue
        assert len(frames) == 4
        body = (
            protocol.unpack(frames[3], protocol.MAX_PACKED)
            if stream == protocol.PACKED
            else frames[3]
        )
        items = json.loads(body)
        assert 1 <= len(items) <= most
        sizes.append(len(items))
        first = json.loads(frames[2])["seq"]
        received += [(first + i, BanEvent.from_object(item)) for i, item in enumerate(items)]
    node.close()
    assert [seq for seq, _ in received] == list(range(1, len(events) + 1))
    assert sorted(event.ip for _, event in received) == sorted(event.ip for event in events)
    assert len(sizes) < len(events) / 10  # many events shared a message
    if stream == protocol.PACKED:
        assert max(sizes) > protocol.MAX_UPDATE_EVENTS  # more than the plain stream takes


# The shell built in this process from settings, without a file: its sockets are real,
# its store is SQLite on disk, and the loop's steps are called by hand.


def built_hub(tmp_path, ports, keys_dir=None, **publisher) -> Publisher:
    general = {"node": "hub", "state_dir": str(tmp_path / "state")}
    publisher["state_dir"] = general["state_dir"]
    general.update(zip(("report_port", "publish_port", "snapshot_port"), map(str, ports)))
    if keys_dir is None:
        general["insecure"] = "true"
    else:
        general["keys_dir"] = str(keys_dir)
    return Publisher(config_from({"general": general, "publisher": publisher}))


def stored_bans(tmp_path) -> list[tuple[str, str]]:
    """(node, address) of every ban in the hub's database, read over a connection of its own."""
    with contextlib.closing(sqlite3.connect(tmp_path / "state" / "publisher.sqlite3")) as db:
        return sorted(db.execute("SELECT node, ip FROM bans"))


@contextlib.contextmanager
def hub_and_dealers(tmp_path, count: int = 1):
    """A built hub and `count` DEALERs connected to its report port, in that order."""
    ports = free_ports(3)
    hub = built_hub(tmp_path, ports)
    context = zmq.Context()
    dealers = []
    try:
        for _ in range(count):
            dealer = context.socket(zmq.DEALER)
            dealer.linger = 0
            dealer.connect(f"tcp://127.0.0.1:{ports[0]}")
            dealers.append(dealer)
        yield hub, dealers
    finally:
        for dealer in dealers:
            dealer.close()
        context.term()
        hub.close()


def test_a_built_hub_answers_a_batch_once_it_is_stored(tmp_path, own_signals):
    with hub_and_dealers(tmp_path) as (hub, (dealer,)):
        events = [ban("198.51.100.1"), ban("198.51.100.2", node="web7"), ban("127.0.0.1")]
        dealer.send_multipart(protocol.encode_report(event.encode() for event in events))
        assert hub.collector.poll(5000)
        hub.handle_reports()
        replies = [protocol.decode_reply(dealer.recv_multipart())[0] for _ in range(2)]
        assert [[(a.stored, a.outcome or a.reason) for a in answers] for answers in replies] == [
            [(True, "banned"), (True, "banned")],
            [(False, "127.0.0.1 is in the hub's allowlist")],
        ]
        assert stored_bans(tmp_path) == [("node1", "198.51.100.1"), ("web7", "198.51.100.2")]
        assert hub.status()["Events accepted"] == 2 and hub.status()["Updates broadcast"] == 2


def test_a_built_hub_takes_old_reports_through_its_core_and_store(tmp_path, own_signals, caplog):
    ports = free_ports(4)
    old_endpoint = f"tcp://127.0.0.1:{ports[3]}"
    hub = built_hub(tmp_path, ports[:3], legacy_report_bind=old_endpoint)
    context = zmq.Context()
    old = context.socket(zmq.REQ)
    old.linger = 0
    old.connect(old_endpoint)
    try:
        with caplog.at_level(logging.INFO):
            old.send(b"oldweb|sshd|Ban|198.51.100.3")
            # The hub speaks ZMTP itself there: the greeting takes a few rounds first.
            for _ in range(100):
                if hub.legacy.reports.socket.poll(100):
                    hub.legacy.handle_reports()
                if old.poll(100):
                    break
            assert old.recv() == b"oldweb|sshd|Ban|198.51.100.3"
        assert stored_bans(tmp_path) == [("oldweb", "198.51.100.3")]
        assert "[sshd] Ban 198.51.100.3 from oldweb (legacy report)" in caplog.messages
    finally:
        old.close()
        context.term()
        hub.close()


def test_a_built_hub_gives_its_core_the_node_keys_it_reads_again(tmp_path, own_signals):
    keys = make_keys(tmp_path / "keys", ["node1", "node2"])
    hub = built_hub(tmp_path, free_ports(3), keys)
    try:
        assert hub.admission.authorized == {"node1", "node2"}
        (keys / "nodes" / "node1.key").unlink()
        hub.reload_keys()
        assert hub.admission.authorized == {"node2"}
    finally:
        hub.close()


def test_a_pass_stores_the_light_reports_before_a_flooding_nodes(tmp_path, own_signals):
    """node web1 sends 100 events, web2 one, both waiting when the pass starts: web2's ban
    is stored, broadcast and ACKed first, with a commit of its own (see passes)."""
    # web1 connects and sends first: read first
    with hub_and_dealers(tmp_path, 2) as (hub, (flooding, light)):
        many = [ban(f"198.51.100.{n}", node="web1") for n in range(1, 101)]
        flooding.send_multipart(protocol.encode_report(event.encode() for event in many))
        assert hub.collector.poll(5000)
        light.send_multipart(protocol.encode_report([ban("203.0.113.7", node="web2").encode()]))
        time.sleep(0.5)  # both in the hub's queue before its pass
        hub.handle_reports()
        for dealer in (flooding, light):
            assert dealer.poll(5000)
            (answer, *_), _ = protocol.decode_reply(dealer.recv_multipart())
            assert answer.stored
        with contextlib.closing(sqlite3.connect(tmp_path / "state" / "publisher.sqlite3")) as db:
            order = [node for (node,) in db.execute("SELECT node FROM bans ORDER BY rowid")]
        assert order == ["web2"] + ["web1"] * 100


def test_a_built_hub_whose_store_is_full_says_so_until_a_batch_is_stored(tmp_path, own_signals):
    """SQLite's own page limit makes the store full (as a full disk would): the batch gets
    retry NAKs and the table stays as stored; the hub's own small write at each retry
    fits where a batch does not, so it lets reports in again but the problem stays until
    a batch is stored."""

    def send(events: list[BanEvent]) -> list[tuple[bool, bool]]:
        dealer.send_multipart(protocol.encode_report(event.encode() for event in events))
        assert hub.collector.poll(5000)
        hub.handle_reports()
        assert dealer.poll(5000)
        answers, _ = protocol.decode_reply(dealer.recv_multipart())
        return sorted({(answer.stored, answer.retry) for answer in answers})

    def problem() -> str:
        return "\n".join(hub.status()["problems"])

    many = [ban(f"198.51.100.{n}", node=f"web{n % 7}") for n in range(1, 101)]
    with hub_and_dealers(tmp_path) as (hub, (dealer,)):
        assert send([ban("192.0.2.1")]) == [(True, False)]
        (pages,) = hub.store.db.execute("PRAGMA page_count").fetchone()
        hub.store.db.execute(f"PRAGMA max_page_count = {pages}")
        assert send(many) == [(False, True)]
        assert "cannot write the ban table" in problem() and "retry NAKs" in problem()
        assert stored_bans(tmp_path) == [("node1", "192.0.2.1")]
        hub.store_retry = 0.0  # its retry is due: the probe's one row fits
        hub.handle_ready({})
        assert hub.admission.unavailable is None
        assert "cannot write the ban table" in problem() and "trying again" in problem()
        assert send(many) == [(False, True)]  # a batch still does not
        assert "retry NAKs" in problem()
        hub.store.db.execute("PRAGMA max_page_count = 1000000")
        hub.store_retry = 0.0
        hub.handle_ready({})
        assert send(many) == [(True, False)]
        assert problem() == "" and len(stored_bans(tmp_path)) == 101
