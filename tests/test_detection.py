"""The cluster jails' rules, as tables: failures counted across nodes within findtime, the
threshold and min_nodes, what a ban forgets, escalation from the ban history, what two
hubs decide alike, and what a restarted hub remembers (its store, in SQLite)."""

import sqlite3
from dataclasses import replace

import pytest

from f2bzmq.config import ClusterJail, config_from
from f2bzmq.detection import (
    MAX_WATCHED,
    Decision,
    Detection,
    DetectionStore,
    decision_id,
    duration,
)
from f2bzmq.protocol import BAN, CLUSTER, UNBAN, BanEvent, FailureCount, FailureReport

T = 1_800_000_000.0  # the test's "now" at the start
IP = "192.0.2.7"


def jail(**keys: str) -> ClusterJail:
    """A cluster jail [detect:sshd] with these keys, the rest at their defaults."""
    values = {"enabled": "true"}
    for key, value in keys.items():
        values[key.replace("bantime_", "bantime.")] = value
    return config_from({"detect:sshd": values}).cluster_jails["sshd"]


def detection(*jails: tuple[str, ClusterJail], age: float = 86400.0) -> Detection:
    return Detection(dict(jails) or {"sshd": jail()}, default_bantime=600, history_age=age)


def report(node: str, *items: tuple, report_id: str | None = None) -> FailureReport:
    """items: (jail, ip, count, time) — or (ip, count, time) in jail sshd."""
    counts = []
    for item in items:
        jail_name, ip, count, when = item if len(item) == 4 else ("sshd", *item)
        counts.append(FailureCount(jail_name, ip, count, when, when))
    made = FailureReport.new(node, counts)
    return made if report_id is None else replace(made, id=report_id)


def ban(node: str, when: float, bantime: int | None = 600, jail_name: str = "sshd") -> BanEvent:
    return BanEvent.new(node, jail_name, BAN, IP, when, bantime)


def summary(decisions: list[Decision] | None) -> list[tuple] | None:
    if decisions is None:
        return None
    return [(d.ip, d.bantime, d.number, dict(d.failures)) for d in decisions]


# (failures of one address in sshd: (node, count, seconds after T), …) -> the step at which
# the ban is decided (index), or None. Defaults: maxretry 5, findtime 10m, min_nodes 2.
THRESHOLDS = [
    ("two failures on each of five nodes", [(f"n{i}", 2, i) for i in range(5)], 2),
    ("one failure on each of two nodes", [("n1", 1, 0), ("n2", 1, 1)], None),
    ("a thousand failures from one node", [("n1", 1000, 0)], None),
    ("a thousand from one node, then one more node", [("n1", 1000, 0), ("n2", 1, 5)], 1),
    ("five from one node and none elsewhere", [("n1", 1, i) for i in range(5)], None),
    ("four, then the fifth from another node", [("n1", 4, 0), ("n2", 1, 9)], 1),
    ("spread wider than findtime", [("n1", 2, 0), ("n2", 2, 300), ("n3", 1, 700)], None),
    ("within findtime of each other", [("n1", 2, 0), ("n2", 2, 300), ("n3", 1, 590)], 2),
]


@pytest.mark.parametrize(
    "failures, decided_at", [row[1:] for row in THRESHOLDS], ids=[row[0] for row in THRESHOLDS]
)
def test_thresholds(failures, decided_at):
    hub = detection()
    decided = []
    for step, (node, count, after) in enumerate(failures):
        decisions = hub.on_failures(report(node, (IP, count, T + after)), T + after)
        decided += [step] * len(decisions)
    assert decided == ([] if decided_at is None else [decided_at])


@pytest.mark.parametrize(
    "keys, failures, decided",
    [
        ({"maxretry": "3", "min_nodes": "3"}, [("n1", 2), ("n2", 2)], False),
        ({"maxretry": "3", "min_nodes": "3"}, [("n1", 1), ("n2", 1), ("n3", 1)], True),
        ({"min_nodes": "1"}, [("n1", 5)], True),
        ({"maxretry": "10"}, [("n1", 4), ("n2", 5)], False),
    ],
)
def test_maxretry_and_min_nodes(keys, failures, decided):
    hub = detection(("sshd", jail(**keys)))
    made = [d for node, count in failures for d in hub.on_failures(report(node, (IP, count, T)), T)]
    assert bool(made) == decided


def test_the_decision_names_its_nodes_counts_and_time():
    hub = detection()
    hub.on_failures(report("web1", (IP, 3, T)), T)
    hub.on_failures(report("web3", (IP, 1, T + 60)), T + 60)
    (decided,) = hub.on_failures(report("web4", (IP, 3, T + 120)), T + 120)
    assert decided.failures == {"web1": 3, "web3": 1, "web4": 3}
    assert decided.time == T + 120  # the last failure counted: what fail2ban's ban starts at
    assert decided.bantime == 600 and decided.number == 1
    assert decided.describe() == (
        "[sshd] Ban 192.0.2.7 (cluster: 7 failures from web1, web3, web4 in 2m)"
    )
    event = decided.event()
    assert (event.node, event.jail, event.action, event.ip) == (CLUSTER, "sshd", BAN, IP)
    assert event.validated() is event  # an ordinary ban event, for subscribers of every release
    assert hub.status()["detections"] == 1 and hub.status()["failures"] == 7


def test_failures_of_other_jails_and_exempt_addresses_count_for_nothing():
    hub = detection()
    for node in ("n1", "n2", "n3"):
        assert hub.on_failures(report(node, ("nginx", IP, 5, T)), T) == []
        exempt = lambda jail, ip: ip == "10.0.0.1"  # noqa: E731
        assert hub.on_failures(report(node, ("10.0.0.1", 5, T)), T, exempt) == []
    assert hub.status()["failures"] == 0 and not hub.watched


def test_a_report_taken_twice_counts_once():
    hub = detection()
    first = report("n1", (IP, 4, T), report_id="a" * 32)
    assert hub.on_failures(first, T) == []
    assert hub.on_failures(first, T + 1) is None  # the monitor sent it again: no ACK came
    assert hub.on_failures(report("n2", (IP, 1, T)), T) != []
    assert hub.status()["duplicates"] == 1


def test_a_ban_forgets_the_failures_and_failures_while_banned_count_for_nothing():
    hub = detection()
    hub.on_failures(report("n1", (IP, 3, T)), T)
    assert hub.on_failures(report("n2", (IP, 2, T)), T)  # banned until T + 600
    # Found while the ban reached the firewalls, or later while it lasts: nothing.
    assert hub.on_failures(report("n3", (IP, 5, T + 1)), T + 1) == []
    assert hub.on_failures(report("n4", (IP, 5, T + 300)), T + 300) == []
    # Once it is over, the next attack starts from zero.
    assert hub.on_failures(report("n1", (IP, 4, T + 601)), T + 601) == []
    assert len(hub.on_failures(report("n2", (IP, 1, T + 602)), T + 602)) == 1


def test_a_nodes_own_ban_forgets_the_failures_counted():
    hub = detection()
    hub.on_failures(report("n1", (IP, 2, T)), T)
    hub.on_failures(report("n2", (IP, 2, T)), T)
    assert hub.on_ban(ban("n1", T + 1, bantime=5), T + 1) is None  # its first ban
    assert hub.on_failures(report("n3", (IP, 1, T + 7)), T + 7) == []  # 1, not 5


def test_an_unban_before_its_time_lets_failures_count_again():
    hub = detection()
    hub.on_ban(ban("n1", T), T)
    assert hub.on_failures(report("n2", (IP, 5, T + 10)), T + 10) == []
    hub.on_lifted("sshd", IP, T + 20)  # an operator lifted it on n1
    hub.on_failures(report("n2", (IP, 3, T + 30)), T + 30)
    assert hub.on_failures(report("n3", (IP, 2, T + 31)), T + 31)


# Escalation: bans of one address, each (who, seconds after T, the node's own bantime), with
# bantime.increment on and the cluster jail's bantime of 600: the cluster's ban time after
# each (None: the node's own ban stands).
ESCALATIONS = [
    (
        "three cluster detections",
        [("cluster", 0, None), ("cluster", 1000, None), ("cluster", 4000, None)],
        [600, 1200, 2400],
    ),
    (
        "a node's own ban between two detections",
        [("cluster", 0, None), ("n1", 1000, 600), ("cluster", 4000, None)],
        [600, 1200, 2400],
    ),
    (
        "a node's first ban is its own",
        [("n1", 0, 600), ("n2", 1000, 600)],
        [None, 1200],
    ),
    (
        "a node's long ban is not shortened",
        [("n1", 0, 600), ("n2", 1000, 86400)],
        [None, None],
    ),
    (
        "two nodes banning at once are one ban",
        [("n1", 0, 600), ("n2", 10, 600), ("n3", 1000, 600)],
        [None, None, 1200],
    ),
    (
        "a permanent ban of a node",
        [("n1", 0, 600), ("n2", 1000, -1)],
        [None, None],
    ),
]


@pytest.mark.parametrize(
    "bans, bantimes", [row[1:] for row in ESCALATIONS], ids=[row[0] for row in ESCALATIONS]
)
def test_escalation(bans, bantimes):
    hub = detection(("sshd", jail(bantime_increment="true")))
    got = []
    for who, after, bantime in bans:
        now = T + after
        if who == "cluster":
            hub.on_failures(report("x1", (IP, 3, now)), now)
            (decided,) = hub.on_failures(report("x2", (IP, 2, now)), now)
        else:
            decided = hub.on_ban(ban(who, now, bantime), now)
        got.append(None if decided is None else decided.bantime)
    assert got == bantimes


def test_an_escalation_says_whose_ban_it_lengthens():
    hub = detection(("sshd", jail(bantime_increment="true")))
    hub.on_ban(ban("web1", T), T)
    decided = hub.on_ban(ban("web2", T + 1000), T + 1000)
    assert decided.escalates == "web2" and decided.number == 2
    assert decided.describe() == "[sshd] Ban 192.0.2.7 (cluster: ban 2, 20m, after web2's own)"
    assert decided.event().time == T + 1000  # from the node's ban, not from the hub's clock
    assert hub.status()["escalations"] == 1


def test_history_older_than_dbpurgeage_counts_for_nothing():
    hub = detection(("sshd", jail(bantime_increment="true")), age=3600)
    hub.on_ban(ban("n1", T), T)
    assert hub.on_ban(ban("n2", T + 3000), T + 3000).bantime == 1200
    assert hub.on_ban(ban("n3", T + 9000), T + 9000) is None  # 1h after: a first ban again
    hub.expire(T + 20000)
    assert not hub.history


def test_overalljails_counts_the_bans_of_every_cluster_jail():
    on = jail(bantime_increment="true", bantime_overalljails="true")
    hub = detection(("sshd", on), ("web", replace(on, jails=["nginx"])))
    hub.on_ban(ban("n1", T, jail_name="nginx"), T)
    decided = hub.on_ban(ban("n1", T + 1000), T + 1000)
    assert decided is not None and decided.bantime == 1200
    alone = detection(
        ("sshd", jail(bantime_increment="true")), ("web", replace(on, jails=["nginx"]))
    )
    alone.on_ban(ban("n1", T, jail_name="nginx"), T)
    assert alone.on_ban(ban("n1", T + 1000), T + 1000) is None


def test_two_hubs_given_the_same_reports_in_another_order_decide_the_same_ban():
    reports = [report(f"n{i}", (IP, 2, T + i)) for i in range(3)]
    decisions = []
    for order in (reports, [reports[1], reports[0], reports[2]]):
        hub = detection(("sshd", jail(bantime_increment="true", bantime_rndtime="1h")))
        made = [d for i, r in enumerate(order) for d in hub.on_failures(r, T + 10 + i)]
        decisions += made
    first, second = decisions
    assert first.id == second.id == decision_id("sshd", IP, 1, T + 2)
    assert first.event() == second.event()


def test_a_nodes_clock_ahead_of_the_hubs_is_taken_as_now():
    hub = detection()
    hub.on_failures(report("n1", (IP, 3, T + 3600)), T)
    (decided,) = hub.on_failures(report("n2", (IP, 2, T)), T)
    assert decided.time == T


def test_stale_counts_are_forgotten_and_watched_addresses_are_bounded():
    hub = detection()
    hub.on_failures(report("n1", (IP, 1, T)), T)
    hub.expire(T + 599)
    assert hub.watched
    hub.expire(T + 601)
    assert not hub.watched
    for start in range(0, MAX_WATCHED + 10, 200):
        items = [
            (f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}", 1, T)
            for n in range(start, start + 200)
        ]
        hub.on_failures(report("n1", *items), T)
    assert len(hub.watched) == MAX_WATCHED


@pytest.mark.parametrize(
    "seconds, text",
    [
        (0, "0s"),
        (59, "59s"),
        (120, "2m"),
        (3590, "59m 50s"),
        (3600, "1h"),
        (5400, "1h 30m"),
        (86400 * 2 + 3600 * 7 + 60 * 15, "2d 7h 15m"),
        (86400 * 8, "1w 1d"),
        (-1, "permanent"),
    ],
)
def test_durations_read_like_fail2bans(seconds, text):
    assert duration(seconds) == text


def stored(hub: Detection, db: sqlite3.Connection, store: DetectionStore) -> None:
    with db:
        db.execute("BEGIN")
        store.write(hub.journal)
    hub.journal.clear()


def test_a_restarted_hub_forgets_no_count_within_findtime_and_no_history(tmp_path):
    db = sqlite3.connect(tmp_path / "hub.sqlite3", isolation_level=None)
    store = DetectionStore(db)
    settings = ("sshd", jail(bantime_increment="true"))
    hub = detection(settings)
    hub.on_ban(ban("n9", T - 5000), T - 5000)  # an earlier ban: history
    hub.on_failures(report("n1", (IP, 3, T)), T)
    hub.on_failures(report("n1", ("198.51.100.1", 1, T - 700)), T)  # past findtime already
    stored(hub, db, store)

    again = detection(settings)
    assert store.load(again, T + 100) == 2
    assert again.history.keys() == hub.history.keys()
    (decided,) = again.on_failures(report("n2", (IP, 2, T + 100)), T + 100)
    assert decided.number == 2 and decided.bantime == 1200
    assert decided.failures == {"n1": 3, "n2": 2}
    stored(again, db, store)

    # What it decided is history: the reports before it count for nothing when replayed,
    # and neither does a failure found while that ban lasts.
    third = detection(settings)
    store.load(third, T + 200)
    assert not third.watched
    assert third.on_failures(report("n3", (IP, 1, T + 200)), T + 200) == []
    assert not third.watched


def test_the_store_forgets_reports_past_findtime(tmp_path):
    db = sqlite3.connect(tmp_path / "hub.sqlite3", isolation_level=None)
    store = DetectionStore(db)
    hub = detection()
    hub.on_failures(report("n1", (IP, 1, T)), T)
    stored(hub, db, store)
    hub.expire(T + 700)
    stored(hub, db, store)
    assert db.execute("SELECT COUNT(*) FROM failure_reports").fetchone() == (0,)


def test_the_reports_kept_are_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr("f2bzmq.detection.MAX_REPORTS", 3)
    db = sqlite3.connect(tmp_path / "hub.sqlite3", isolation_level=None)
    store = DetectionStore(db)
    hub = detection()
    for n in range(5):
        hub.on_failures(report("n1", (f"198.51.100.{n}", 1, T + n)), T + n)
    hub.expire(T + 5)
    stored(hub, db, store)
    assert len(hub.seen) == 3
    assert db.execute("SELECT COUNT(*) FROM failure_reports").fetchone() == (3,)


def test_decision_ids_differ_by_jail_address_number_and_time():
    ids = {
        decision_id("sshd", IP, 1, T),
        decision_id("web", IP, 1, T),
        decision_id("sshd", "192.0.2.8", 1, T),
        decision_id("sshd", IP, 2, T),
        decision_id("sshd", IP, 1, T + 1),
    }
    assert len(ids) == 5
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    assert decision_id("sshd", IP, 1, T + 0.9) == decision_id("sshd", IP, 1, T)


def test_an_unban_event_is_not_a_ban():
    hub = detection(("sshd", jail(bantime_increment="true")))
    unban = BanEvent.new("n1", "sshd", UNBAN, IP, T)
    assert hub.counts("sshd") and not hub.counts("nginx")
    assert hub.table_keys("sshd", IP) == [("sshd", IP)]
    assert unban.action == UNBAN
