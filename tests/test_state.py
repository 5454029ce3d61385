"""The ban table's rules and its SQLite home."""

import random
import sqlite3

from f2bzmq.protocol import BAN, CLUSTER, UNBAN, BanEvent
from f2bzmq.state import BanTable, Outcome, StateStore

NOW = 1_795_000_000.0


def ev(node, action, ip="192.0.2.10", jail="sshd", when=NOW, bantime=600):
    return BanEvent.new(node, jail, action, ip, when, bantime if action == BAN else None)


def test_first_ban_is_broadcast_with_the_next_sequence():
    table = BanTable("hub", 600)
    outcome, update = table.apply(ev("node1", BAN), NOW)
    assert outcome is Outcome.BANNED
    assert update.seq == 1 and update.event.node == "node1"
    assert table.snapshot()[0] == 1


def test_same_ban_from_another_node_is_acked_not_broadcast():
    table = BanTable("hub", 600)
    table.apply(ev("node1", BAN), NOW)
    assert table.apply(ev("node2", BAN), NOW) == (Outcome.EXTENDED, None)
    assert table.sequence == 1


def test_unban_is_broadcast_only_when_the_last_origin_lifts_it():
    table = BanTable("hub", 600)
    table.apply(ev("node1", BAN), NOW)
    table.apply(ev("node2", BAN), NOW)
    assert table.apply(ev("node1", UNBAN), NOW) == (Outcome.EXTENDED, None)
    outcome, update = table.apply(ev("node2", UNBAN), NOW)
    assert outcome is Outcome.UNBANNED and update.seq == 2 and update.event.action == UNBAN
    assert table.snapshot() == (2, [])


def test_unban_by_a_node_that_did_not_ban_changes_nothing():
    table = BanTable("hub", 600)
    table.apply(ev("node1", BAN), NOW)
    assert table.apply(ev("node2", UNBAN), NOW) == (Outcome.REDUNDANT, None)
    assert len(table.bans) == 1


def test_duplicate_ids_are_dropped():
    table = BanTable("hub", 600)
    event = ev("node1", BAN)
    table.apply(event, NOW)
    assert table.apply(event, NOW) == (Outcome.DUPLICATE, None)


def test_a_ban_already_over_when_it_arrives_is_not_broadcast():
    table = BanTable("hub", 600)
    assert table.apply(ev("node1", BAN, when=NOW - 700), NOW) == (Outcome.EXPIRED, None)


def test_expiry_lifts_the_ban_when_the_longest_origin_ends():
    table = BanTable("hub", 600)
    table.apply(ev("node1", BAN, bantime=60), NOW)
    table.apply(ev("node2", BAN, bantime=120), NOW)
    assert table.next_expiry() == NOW + 60
    assert table.expire(NOW + 61) == []
    (update,) = table.expire(NOW + 121)
    assert update.event.action == UNBAN and update.event.node == "hub" and update.seq == 2
    assert table.bans == {}


def test_permanent_bans_never_expire_and_unknown_bantime_uses_the_default():
    table = BanTable("hub", 100)
    table.apply(ev("node1", BAN, ip="192.0.2.1", bantime=-1), NOW)
    table.apply(ev("node1", BAN, ip="192.0.2.2", bantime=None), NOW)
    (update,) = table.expire(NOW + 10**6)
    assert update.event.ip == "192.0.2.2"
    assert [e.ip for e in table.snapshot()[1]] == ["192.0.2.1"]


def test_a_commit_says_whether_it_wrote_and_a_probe_always_writes(tmp_path):
    store = StateStore(tmp_path / "state.sqlite3")
    table = store.load("hub", 600, 86400)
    assert store.commit(table) is False  # nothing to write: says nothing of the store
    table.apply(ev("node1", BAN, ip="192.0.2.1"), NOW)
    assert store.commit(table) is True
    store.probe(NOW)
    store.probe(NOW + 1)
    assert store.meta("probed") == repr(NOW + 1)


def test_store_keeps_everything_that_was_committed(tmp_path):
    store = StateStore(tmp_path / "state.sqlite3")
    table = store.load("hub", 600, 86400)
    first = ev("node1", BAN, ip="192.0.2.1")
    table.apply(first, NOW)
    table.apply(ev("node2", BAN, ip="192.0.2.1", bantime=-1), NOW)
    table.apply(ev("node1", BAN, ip="2001:db8::7"), NOW)
    table.apply(ev("node1", UNBAN, ip="2001:db8::7"), NOW)
    store.commit(table)
    table.apply(ev("node1", BAN, ip="198.51.100.9"), NOW)  # never committed
    store.close()

    again = StateStore(tmp_path / "state.sqlite3").load("hub", 600, 86400)
    assert again.instance == table.instance
    assert again.sequence == 3
    assert set(again.bans) == {("sshd", "192.0.2.1")}
    assert again.bans[("sshd", "192.0.2.1")].origins == {"node1": NOW + 600, "node2": None}
    assert again.bans[("sshd", "192.0.2.1")].event == first
    assert again.apply(first, NOW) == (Outcome.DUPLICATE, None)


def test_a_new_store_has_a_new_instance(tmp_path):
    one = StateStore(tmp_path / "a.sqlite3").load("hub", 600, 86400)
    two = StateStore(tmp_path / "b.sqlite3").load("hub", 600, 86400)
    assert one.instance != two.instance


def test_a_prolonged_ban_is_not_lifted_at_its_first_end():
    table = BanTable("hub", 600)
    table.apply(ev("node1", BAN, bantime=60), NOW)
    table.apply(ev("node1", BAN, when=NOW + 30, bantime=7200), NOW + 30)  # Increase Ban
    assert table.expire(NOW + 61) == []
    assert table.next_expiry() == NOW + 30 + 7200
    (update,) = table.expire(NOW + 30 + 7200)
    assert update.event.action == UNBAN


def test_a_ban_unbanned_early_leaves_no_timer_behind():
    table = BanTable("hub", 600)
    table.apply(ev("node1", BAN, bantime=60), NOW)
    table.apply(ev("node1", UNBAN), NOW + 1)
    assert table.next_expiry() is None
    assert table.expire(NOW + 61) == []


def test_foreign_unban_lifts_every_origin_only_when_allowed():
    table = BanTable("hub", 600)
    table.apply(ev("node1", BAN), NOW)
    table.apply(ev("node2", BAN), NOW)
    assert table.apply(ev("node3", UNBAN), NOW) == (Outcome.REDUNDANT, None)
    table.allow_foreign_unban = True
    outcome, update = table.apply(ev("node3", UNBAN), NOW)
    assert outcome is Outcome.UNBANNED and update.event.node == "node3"
    assert table.bans == {} and table.next_expiry() is None


def test_a_foreign_unban_leaves_protected_origins_banned():
    """An old monitor's unban (allow_foreign_unban) lifts old monitors' bans, not a keyed node's."""
    table = BanTable("hub", 600)
    table.allow_foreign_unban = True
    table.apply(ev("node1", BAN), NOW)
    table.apply(ev("oldweb", BAN), NOW)
    keyed = frozenset({"node1", "node2"})
    assert table.apply(ev("oldweb2", UNBAN), NOW, keyed) == (Outcome.EXTENDED, None)
    assert list(table.bans[("sshd", "192.0.2.10")].origins) == ["node1"]
    assert table.apply(ev("oldweb2", UNBAN), NOW, keyed) == (Outcome.REDUNDANT, None)
    outcome, _ = table.apply(ev("node2", UNBAN), NOW)
    assert outcome is Outcome.UNBANNED


def test_a_foreign_unban_never_lifts_the_clusters_or_an_operators_ban():
    """allow_foreign_unban lets nodes lift each other's bans; a cluster jail's decision and
    an operator's ban are lifted by their own means (expiry, `unban`), never by a node."""
    table = BanTable("hub", 600)
    table.allow_foreign_unban = True
    table.apply(ev("cluster", BAN), NOW)
    table.apply(ev("operator.alice", BAN), NOW)
    table.apply(ev("node1", BAN), NOW)
    assert table.apply(ev("node2", UNBAN), NOW) == (Outcome.EXTENDED, None)
    assert sorted(table.bans[("sshd", "192.0.2.10")].origins) == ["cluster", "operator.alice"]
    assert table.apply(ev("node2", UNBAN), NOW) == (Outcome.REDUNDANT, None)


def test_only_events_that_change_the_table_are_remembered():
    table = BanTable("hub", 600)
    first = ev("node1", BAN)
    table.apply(first, NOW)
    no_ops = [
        ev("node1", BAN),  # the same ban again, no later
        ev("node2", UNBAN),  # lifts nothing of node2's
        ev("node1", BAN, ip="192.0.2.11", when=NOW - 700),  # over already
    ]
    assert [table.apply(e, NOW)[0] for e in no_ops] == [
        Outcome.EXTENDED,
        Outcome.REDUNDANT,
        Outcome.EXPIRED,
    ]
    assert list(table.seen) == [first.id]
    assert table.apply(first, NOW)[0] is Outcome.DUPLICATE
    assert table.apply(no_ops[1], NOW)[0] is Outcome.REDUNDANT  # a no-op again
    assert table.apply(ev("node2", BAN), NOW)[0] is Outcome.EXTENDED  # a second origin
    assert len(table.seen) == 2


def test_the_remembered_ids_are_bounded_oldest_first(tmp_path):
    store = StateStore(tmp_path / "state.sqlite3")
    table = store.load("hub", 600, 86400)
    table.max_seen = 100
    events = [ev("node1", BAN, ip=f"192.0.2.{n}") for n in range(1, 251)]
    for n, event in enumerate(events):
        table.apply(event, NOW + n)
    store.commit(table)
    assert len(table.seen) <= 100 and events[-1].id in table.seen
    assert events[0].id not in table.seen
    again = store.load("hub", 600, 86400)
    assert list(again.seen) == list(table.seen)
    store.close()


def test_a_reloaded_store_equals_the_table_after_random_batches(tmp_path):
    """Bans and unbans of a few addresses by a few nodes, committed in batches of every size:
    the same address banned, lifted and banned again in one batch must come back as the
    table had it (the store groups the batch's statements per table)."""
    rng = random.Random(7)
    store = StateStore(tmp_path / "state.sqlite3")
    table = store.load("hub", 600, 86400)
    for batch in range(60):
        for _ in range(rng.choice([1, 2, 5, 20, 80])):
            node = rng.choice(["node1", "node2", "node3"])
            ip = f"192.0.2.{rng.randrange(1, 6)}"
            action = rng.choice([BAN, BAN, UNBAN])
            table.apply(ev(node, action, ip=ip, bantime=rng.choice([600, -1])), NOW + batch)
        store.commit(table)
        reloaded = StateStore(tmp_path / "state.sqlite3")
        again = reloaded.load("hub", 600, 86400)
        reloaded.close()
        assert again.sequence == table.sequence
        assert {key: ban.origins for key, ban in again.bans.items()} == {
            key: ban.origins for key, ban in table.bans.items()
        }
        assert {key: ban.event for key, ban in again.bans.items()} == {
            key: ban.event for key, ban in table.bans.items()
        }
        assert again.seen == table.seen


def test_changes_says_whether_an_event_is_news_to_the_table():
    """What a node's rate limit pays for: every event apply() would record as more than
    an id seen. A ban reported again with the same expiry is no news."""
    table = BanTable("hub", 600)
    first = ev("node1", BAN)
    table.apply(first, NOW)
    cases = [
        ("a new ban", ev("node1", BAN, ip="192.0.2.11"), True),
        ("the same event again", first, False),
        ("the same ban re-reported", ev("node1", BAN), False),
        ("the same ban, ending later", ev("node1", BAN, when=NOW + 60), True),
        ("the same ban, ending sooner", ev("node1", BAN, when=NOW - 60), False),
        ("the ban from another node", ev("node2", BAN), True),
        ("a ban already over", ev("node1", BAN, ip="192.0.2.12", when=NOW - 700), False),
        ("its origin's unban", ev("node1", UNBAN), True),
        ("another node's unban", ev("node2", UNBAN), False),
        ("an unban of nothing", ev("node1", UNBAN, ip="192.0.2.13"), False),
    ]
    for name, event, news in cases:
        assert table.changes(event, NOW) is news, name
    table.allow_foreign_unban = True
    assert table.changes(ev("node2", UNBAN), NOW) is True
    assert table.journal and table.sequence == 1  # asking changed nothing


def test_a_new_store_is_young_until_it_says_otherwise(tmp_path):
    store = StateStore(tmp_path / "s.sqlite3")
    store.load("hub", 600, 86400)
    assert store.created and store.young_until() is None
    store.set_young_until(NOW + 300)
    store.close()
    again = StateStore(tmp_path / "s.sqlite3")
    table = again.load("hub", 600, 86400)
    assert not again.created and again.young_until() == NOW + 300  # kept across a restart
    again.set_young_until(None)
    assert again.young_until() is None and table.instance


def test_a_commit_the_disk_refuses_leaves_the_store_as_it_was(tmp_path):
    """SQLite says "database or disk is full" the way it does on a full disk when the file
    may not grow (max_page_count); the table is then reloaded from what the store holds."""
    store = StateStore(tmp_path / "s.sqlite3")
    table = store.load("hub", 600, 86400)
    table.apply(ev("node1", BAN), NOW)
    store.commit(table)
    pages = store.db.execute("PRAGMA page_count").fetchone()[0]
    store.db.execute(f"PRAGMA max_page_count={pages}")
    for n in range(300):
        table.apply(ev("node1", BAN, ip=f"198.51.100.{n % 250}", jail=f"j{n // 250}"), NOW)
    try:
        store.commit(table)
    except sqlite3.OperationalError as error:
        assert "full" in str(error)
    else:
        raise AssertionError("the commit should not fit")
    assert not store.db.in_transaction
    reloaded = store.load("hub", 600, 86400)
    assert (len(reloaded.bans), reloaded.sequence) == (1, 1)
    store.db.execute(f"PRAGMA max_page_count={10**6}")  # space again
    reloaded.apply(ev("node1", BAN, ip="198.51.100.1"), NOW)
    store.commit(reloaded)
    assert len(store.load("hub", 600, 86400).bans) == 2


def cluster_ban(ip="192.0.2.10", bantime=2400, when=NOW, jail="sshd"):
    event = BanEvent.new(CLUSTER, jail, BAN, ip, when, bantime)
    return event


def test_a_cluster_ban_of_a_new_address_is_an_ordinary_broadcast_with_its_log_line():
    table = BanTable("hub", 600)
    (update,) = table.take_decision(cluster_ban(), NOW, "[sshd] Ban 192.0.2.10 (cluster: …)")
    assert (update.seq, update.event.node, update.note) == (
        1,
        CLUSTER,
        "[sshd] Ban 192.0.2.10 (cluster: …)",
    )
    assert table.take_decision(cluster_ban(), NOW, "again") == []  # another id, same ban: no news


def test_a_cluster_ban_takes_the_place_of_a_nodes_ban_in_the_stream_and_in_snapshots(tmp_path):
    """node1's own ban is not applied on node1 (its subscriber skips its own node): the
    cluster's longer ban, which every node must hold, goes out as an unban and a ban."""
    store = StateStore(tmp_path / "state.sqlite3")
    table = store.load("hub", 600, 86400)
    table.apply(ev("node1", BAN), NOW)
    decided = cluster_ban()
    unban, ban = table.take_decision(decided, NOW + 1, "note")
    assert (unban.seq, unban.event.action, unban.note) == (2, UNBAN, "")
    assert (ban.seq, ban.event, ban.note) == (3, decided, "note")
    assert table.snapshot() == (3, [decided])
    assert table.bans[("sshd", "192.0.2.10")].origins == {"node1": NOW + 600, CLUSTER: NOW + 2400}
    store.commit(table)
    again = StateStore(tmp_path / "state.sqlite3").load("hub", 600, 86400)
    assert again.snapshot() == (3, [decided])
    # node1's ban ends first: the cluster's stays, and nothing is broadcast.
    assert table.expire(NOW + 601) == []
    assert [u.event.action for u in table.expire(NOW + 2401)] == [UNBAN]


def test_a_nodes_unban_lifts_its_own_ban_not_the_clusters():
    table = BanTable("hub", 600)
    table.apply(ev("node1", BAN), NOW)
    table.take_decision(cluster_ban(), NOW, "note")
    assert table.apply(ev("node1", UNBAN), NOW + 5) == (Outcome.EXTENDED, None)
    assert ("sshd", "192.0.2.10") in table.bans
