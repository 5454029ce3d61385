"""The monitor's outbox: durable, per hub, in order, bounded; and how it goes out."""

import sqlite3

import pytest

from f2bzmq.delivery import FRESH, REREPORT, reports
from f2bzmq.outbox import Outbox
from f2bzmq.protocol import MAX_REPORT, BanEvent, FailureCount, FailureReport

HUBS = ["tcp://10.0.0.1:5690", "tcp://10.0.0.2:5690"]


def event(ip, action="ban"):
    return BanEvent.new("node1", "sshd", action, ip, bantime=600 if action == "ban" else None)


def test_each_hub_gets_every_event_in_order_until_it_acks(tmp_path):
    outbox = Outbox(tmp_path / "o.sqlite3", HUBS)
    events = [event(f"192.0.2.{i}") for i in range(1, 6)]
    outbox.add(events, position='{"offset": 10}')
    for hub in HUBS:
        assert [body for _, _, body in outbox.pending(hub, 10)] == [e.encode() for e in events]
    assert outbox.ack(HUBS[0], [events[0].id]) == 1
    assert outbox.ack(HUBS[0], [events[0].id]) == 0
    rows = outbox.pending(HUBS[0], 2)
    assert [body for _, _, body in rows] == [events[1].encode(), events[2].encode()]
    assert [body for _, _, body in outbox.pending(HUBS[0], 10, after=rows[-1][0])] == [
        e.encode() for e in events[3:]
    ]
    assert (outbox.depth(HUBS[0]), outbox.depth(HUBS[1]), outbox.depth()) == (4, 5, 5)
    # Many ACKs in one go, an unknown id among them.
    assert outbox.ack(HUBS[1], [events[0].id, events[1].id, "not-an-event"]) == 2
    assert [body for _, _, body in outbox.pending(HUBS[1], 10)] == [e.encode() for e in events[2:]]
    assert (outbox.depth(HUBS[0]), outbox.depth(HUBS[1]), outbox.depth()) == (4, 3, 4)


def test_events_and_position_survive_a_restart_and_a_removed_hub_is_forgotten(tmp_path):
    path = tmp_path / "o.sqlite3"
    outbox = Outbox(path, HUBS)
    outbox.add([event("192.0.2.1")], position='{"offset": 99}')
    outbox.close()
    again = Outbox(path, HUBS[1:])
    assert again.position() == '{"offset": 99}'
    assert again.depth(HUBS[0]) == 0 and again.depth(HUBS[1]) == 1


def test_trim_drops_the_oldest_unbans_first(tmp_path):
    outbox = Outbox(tmp_path / "o.sqlite3", HUBS)
    bans = [event(f"192.0.2.{i}") for i in range(1, 5)]
    unbans = [event(f"198.51.100.{i}", "unban") for i in range(1, 4)]
    outbox.add([bans[0], unbans[0], bans[1], unbans[1], bans[2], unbans[2], bans[3]])
    assert outbox.trim(5) == 2
    left = {body for _, _, body in outbox.pending(HUBS[0], 100)}
    assert left == {e.encode() for e in [*bans, unbans[2]]}
    assert outbox.trim(2) == 3
    assert [body for _, _, body in outbox.pending(HUBS[1], 100)] == [b.encode() for b in bans[2:]]
    assert outbox.trim(2) == 0


def test_waiting_events_go_out_in_reports_bounded_by_count_and_bytes():
    small = [(n, f"id{n}", b"x" * 250) for n in range(1, 251)]
    grouped = list(reports(small))
    assert [len(report) for report in grouped] == [100, 100, 50]
    assert [row for report in grouped for row in report] == small  # in order, none lost
    big = [(n, f"id{n}", b"x" * 4096) for n in range(1, 31)]
    grouped = list(reports(big))
    assert all(sum(len(r[2]) for r in report) <= MAX_REPORT for report in grouped)
    assert [row for report in grouped for row in report] == big
    assert len(grouped) == 3  # 12 of 4 KB fit in 48 KB
    assert list(reports([])) == []


def test_rereports_wait_in_their_own_lane_once_per_ban_and_hub(tmp_path):
    outbox = Outbox(tmp_path / "o.sqlite3", HUBS)
    fresh = [event("192.0.2.1")]
    outbox.add(fresh, position='{"offset": 1}')
    first = [event("198.51.100.1"), event("198.51.100.2")]
    outbox.add_rereports(first, HUBS[1:], {HUBS[1]: "a" * 32})
    assert outbox.hub_state(HUBS[1]) == "a" * 32 and outbox.hub_state(HUBS[0]) is None
    again = [event("198.51.100.1")]  # a later rotation: replaces the one still waiting
    outbox.add_rereports(again, HUBS)
    lanes = {
        (hub, lane): [body for _, _, body in outbox.pending(hub, 10, lane=lane)]
        for hub in HUBS
        for lane in (FRESH, REREPORT)
    }
    assert lanes == {
        (HUBS[0], FRESH): [fresh[0].encode()],
        (HUBS[0], REREPORT): [again[0].encode()],
        (HUBS[1], FRESH): [fresh[0].encode()],
        (HUBS[1], REREPORT): [first[1].encode(), again[0].encode()],
    }
    assert outbox.depth(HUBS[1], REREPORT) == 2 and outbox.depth(HUBS[1]) == 3
    # The node lifts a ban: a re-report of it, still waiting, would bring it back.
    outbox.add([event("198.51.100.1", "unban")], position='{"offset": 2}')
    assert [body for _, _, body in outbox.pending(HUBS[1], 10, lane=REREPORT)] == [
        first[1].encode()
    ]
    assert outbox.depth(HUBS[0], REREPORT) == 0


def test_trim_drops_rereports_before_anything_the_log_said(tmp_path):
    outbox = Outbox(tmp_path / "o.sqlite3", HUBS)
    outbox.add([event("192.0.2.1"), event("192.0.2.2", "unban")])
    outbox.add_rereports([event(f"198.51.100.{n}") for n in range(1, 4)], HUBS)
    assert outbox.trim(3) == 2
    assert outbox.depth(HUBS[0], REREPORT) == 1 and outbox.depth(HUBS[0], FRESH) == 2


def test_a_write_the_disk_refuses_changes_nothing_and_says_why(tmp_path):
    """A full disk, as SQLite reports it when the file may not grow (max_page_count)."""
    outbox = Outbox(tmp_path / "o.sqlite3", HUBS)
    outbox.add([event("192.0.2.1")], position='{"offset": 1}')
    pages = outbox.db.execute("PRAGMA page_count").fetchone()[0]
    outbox.db.execute(f"PRAGMA max_page_count={pages}")
    many = [event(f"198.51.{n // 250}.{n % 250}") for n in range(2000)]
    with pytest.raises(sqlite3.OperationalError, match="full"):
        outbox.add(many, position='{"offset": 2}')
    assert outbox.failure == "database or disk is full" and not outbox.db.in_transaction
    assert (outbox.depth(), outbox.position()) == (1, '{"offset": 1}')
    outbox.db.execute(f"PRAGMA max_page_count={10**6}")
    outbox.add(many, position='{"offset": 2}')
    assert outbox.failure is None and outbox.depth() == 2001


def test_an_outbox_from_before_the_lanes_keeps_its_events(tmp_path):
    path = tmp_path / "o.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL, "
        "target TEXT NOT NULL, body BLOB NOT NULL, UNIQUE (id, target));"
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
    )
    waiting = event("192.0.2.1")
    old.execute(
        "INSERT INTO outbox (id, target, body) VALUES (?, ?, ?)",
        (waiting.id, HUBS[0], waiting.encode()),
    )
    old.commit()
    old.close()
    outbox = Outbox(path, HUBS)
    assert [body for _, _, body in outbox.pending(HUBS[0], 10)] == [waiting.encode()]
    assert outbox.pending(HUBS[0], 10, lane=REREPORT) == []


def test_the_outbox_is_readable_by_its_owner_only(tmp_path):
    """Made under the usual umask 022 (or left 0644 by an older version), it is 0600."""
    path = tmp_path / "o.sqlite3"
    path.touch(mode=0o644)
    outbox = Outbox(path, HUBS)
    outbox.add([event("192.0.2.1")])
    files = sorted(tmp_path.iterdir())
    assert [file.name for file in files] == ["o.sqlite3", "o.sqlite3-shm", "o.sqlite3-wal"]
    assert {file.stat().st_mode & 0o777 for file in files} == {0o600}
    outbox.close()


def test_trim_drops_failure_reports_before_any_ban_or_unban(tmp_path):
    outbox = Outbox(tmp_path / "o.sqlite3", HUBS)
    failures = [
        FailureReport.new("node1", [FailureCount("sshd", f"192.0.2.{i}", 1, 1.0, 1.0)])
        for i in range(3)
    ]
    ban, unban = event("198.51.100.1"), event("198.51.100.2", "unban")
    outbox.add([failures[0], ban, failures[1], unban, failures[2]])
    assert outbox.trim(3) == 2
    left = [body for _, _, body in outbox.pending(HUBS[0], 100)]
    assert left == [ban.encode(), unban.encode(), failures[2].encode()]
    assert outbox.trim(2) == 1
    assert outbox.trim(1) == 1
    assert [body for _, _, body in outbox.pending(HUBS[0], 100)] == [ban.encode()]


def test_once_a_backlog_is_out_the_file_gives_its_space_back(tmp_path):
    path = tmp_path / "o.sqlite3"
    outbox = Outbox(path, HUBS)
    events = [event(f"10.0.{n // 250}.{n % 250 + 1}") for n in range(5000)]
    outbox.add(events, position='{"offset": 5000}')
    outbox.tidy()  # events still wait: nothing to give back
    full = path.stat().st_size
    assert full > 2_000_000
    for hub in HUBS:
        assert outbox.ack(hub, [e.id for e in events]) == len(events)
    outbox.tidy()
    assert path.stat().st_size < full / 10
    wal = tmp_path / "o.sqlite3-wal"
    assert not wal.exists() or wal.stat().st_size == 0
    assert outbox.position() == '{"offset": 5000}'
    outbox.add([event("192.0.2.1")])
    assert outbox.depth() == 1
