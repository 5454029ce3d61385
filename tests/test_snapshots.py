"""Who gets the hub's table and when, without a socket: requests in, parts out."""

from f2bzmq import protocol, snapshots
from f2bzmq.protocol import BanEvent
from f2bzmq.snapshots import SnapshotQueue
from f2bzmq.state import BanTable

NOW = 1_795_000_000.0


def table(bans: int) -> BanTable:
    table = BanTable("hub", 600)
    for n in range(bans):
        ip = f"198.18.{n // 250}.{n % 250 + 1}"
        table.apply(BanEvent.new("node1", "sshd", "ban", ip, NOW, 600), NOW)
    return table


def parts(queue: SnapshotQueue, peer: bytes) -> list[list[bytes]]:
    """Every part of the snapshot under way to `peer`, as if its queue never filled."""
    sent = []
    while peer in queue.sending:
        sent.append(queue.next_part(peer))
        queue.sent(peer)
    return sent


def test_a_snapshot_goes_out_part_by_part_and_whole():
    bans = table(1200)
    queue = SnapshotQueue()
    assert queue.ask(b"peer-a", "node1", NOW) is None
    queue.start(bans, NOW)
    got = [protocol.decode_snapshot_part(part) for part in parts(queue, b"peer-a")]
    assert [(p.number, p.last, len(p.events)) for p in got] == [
        (0, False, 500),
        (1, False, 500),
        (2, True, 200),
    ]
    assert {p.seq for p in got} == {1200}
    assert queue.wait_seconds(NOW) is None


def test_the_table_is_taken_when_the_snapshot_starts_and_kept_for_it():
    bans = table(600)
    queue = SnapshotQueue()
    queue.ask(b"peer-a", "node1", NOW)
    queue.start(bans, NOW)
    first = protocol.decode_snapshot_part(queue.next_part(b"peer-a"))
    queue.sent(b"peer-a")
    bans.apply(BanEvent.new("node1", "sshd", "ban", "198.51.100.1", NOW, 600), NOW)
    rest = [protocol.decode_snapshot_part(part) for part in parts(queue, b"peer-a")]
    assert [p.seq for p in (first, *rest)] == [600, 600]
    assert len(first.events) + sum(len(p.events) for p in rest) == 600


def test_a_node_gets_two_snapshots_at_a_time_and_a_bucket_of_them():
    bans = table(10)
    queue = SnapshotQueue()
    peers = [f"peer-{n}".encode() for n in range(6)]
    refused = [queue.ask(peer, "node1", NOW) for peer in peers]
    assert refused[:4] == [None] * 4
    assert refused[4] == "4 snapshot requests of node node1 wait already"
    assert queue.ask(peers[0], "node1", NOW) is None  # asked already: one under way
    queue.start(bans, NOW)
    assert list(queue.sending) == peers[:2] and list(queue.waiting) == peers[2:4]
    assert queue.ask(b"other", "node2", NOW) is None
    queue.start(bans, NOW)
    assert list(queue.sending) == [*peers[:2], b"other"]  # node2 waits for node1 by no one
    for peer in list(queue.sending):
        parts(queue, peer)
    queue.start(bans, NOW)
    assert list(queue.sending) == peers[2:4]


def test_a_node_asking_in_a_loop_is_served_at_the_bucket_rate():
    """The bucket counts parts: the hub's work is reading and sending them."""
    bans = table(20_000)  # 40 parts a snapshot
    queue = SnapshotQueue()
    served = 0
    for n in range(1000):
        now = NOW + n * 0.01  # a hundred requests a second for ten seconds
        queue.ask(f"peer-{n}".encode(), "node1", now)
        queue.start(bans, now)
        for peer in list(queue.sending):
            parts(queue, peer)
            served += 1
    most = (snapshots.BURST + 10 * snapshots.RATE) / 40
    assert most - 2 <= served <= most
    assert len(queue.waiting) <= snapshots.WAITING_PER_NODE
    assert 0 < queue.wait_seconds(NOW + 10) <= 40 / snapshots.RATE
    assert queue.ask(b"small", "node2", NOW + 10) is None  # another node has its own bucket
    queue.start(bans, NOW + 10)
    assert b"small" in queue.sending


def test_a_gone_peer_frees_its_turn_and_old_requests_lapse():
    bans = table(10)
    queue = SnapshotQueue()
    for peer in (b"a", b"b", b"c"):
        queue.ask(peer, "node1", NOW)
    queue.start(bans, NOW)
    queue.gone(b"a")  # disconnected with its snapshot half sent
    queue.start(bans, NOW + snapshots.MAX_WAIT + 1)
    assert list(queue.sending) == [b"b"] and not queue.waiting  # c gave up long ago
