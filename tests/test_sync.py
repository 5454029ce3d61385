"""The stream-sync core: every transition of following one hub's update stream, as tables.

Each step gives the core one input at a time `now` and names what the shell must then
do and which notices it logs; each scenario ends with the view's addresses, the
sequence and whether the view counts (synced).
"""

from __future__ import annotations

import pytest

from f2bzmq.jails import LocalPolicy, desired_bans
from f2bzmq.protocol import BanEvent, SnapshotPart
from f2bzmq.sync import (
    SNAPSHOT_TIMEOUT,
    ClusterView,
    Gap,
    HubSync,
    NewState,
    Outcome,
    OutOfStep,
    PartMissing,
    Rebuilt,
    Silent,
    SnapshotLate,
    SnapshotTaken,
    Young,
)

TIMEOUT = 5.0  # the heartbeat timeout of every core here
OLD, NEW = "0" * 32, "f" * 32  # a hub's state, and the one it has after losing it


def event(n: int) -> BanEvent:
    """n > 0 bans 192.0.2.n, n < 0 lifts that ban."""
    if n > 0:
        return BanEvent.new("node1", "sshd", "ban", f"192.0.2.{n}", bantime=600)
    return BanEvent.new("node1", "sshd", "unban", f"192.0.2.{-n}")


YOUNG = "young"  # the last item of an input: the hub's state is young


def feed(core: HubSync, given: tuple, now: float) -> Outcome:
    """One input, written as a tuple: ("update", state, first seq, n…), ("hugz", state,
    seq), ("part", state, seq, n…) with an optional ("part", …, {"number", "last"}),
    ("tick",), ("refresh",) or ("start",); any but the last three may end with YOUNG."""
    kind, *rest = given
    young = bool(rest) and rest[-1] == YOUNG
    rest = rest[:-1] if young else rest
    if kind == "start":
        return core.start(now)
    if kind == "tick":
        return core.on_tick(now)
    if kind == "refresh":
        return core.refresh(now)
    if kind == "hugz":
        return core.on_heartbeat(rest[0], rest[1], now, young)
    if kind == "update":
        state, first, *changes = rest
        return core.on_update(state, first, [event(n) for n in changes], now, young)
    state, seq, *bans = rest
    where = bans.pop() if bans and isinstance(bans[-1], dict) else {}
    part = SnapshotPart(
        state, seq, where.get("number", 0), where.get("last", True), [event(n) for n in bans], young
    )
    return core.on_snapshot_part(part, now)


FLAGS = ("replaced", "left_out", "reconnect_updates", "renew_snapshot_socket", "ask_snapshot")


def shell_does(outcome: Outcome) -> str:
    """The outcome in words: "apply 3 4, ask_snapshot"; "" when there is nothing to do."""
    words = [flag for flag in FLAGS if getattr(outcome, flag)]
    if outcome.applied:
        words.insert(0, "apply " + " ".join(str(sequence) for sequence, _ in outcome.applied))
    return ", ".join(words)


def addresses(view: ClusterView) -> set[int]:
    return {int(ip.rsplit(".", 1)[1]) for _, ip in view.bans}


ASK, REPLACED = "ask_snapshot", "replaced"
RENEW_ASK = "renew_snapshot_socket, ask_snapshot"
SILENT = "left_out, reconnect_updates, ask_snapshot"
SYNCED = [  # the start: a snapshot of OLD at sequence 2 that bans .1 and .2
    (0, ("start",), ASK, []),
    (0.5, ("part", OLD, 2, 1, 2), REPLACED, [SnapshotTaken(2, 2)]),
]

# name: (steps of (now, input, what the shell does, notices), (view, sequence, synced) after)
SCENARIOS = {
    "start: ask for the table; no heartbeat counts before it comes": (
        [
            (0, ("start",), ASK, []),
            (3, ("tick",), "", []),
            (9, ("hugz", OLD, 2), "", []),
            (9.5, ("part", OLD, 2, 1, 2), REPLACED, [SnapshotTaken(2, 2)]),
        ],
        ({1, 2}, 2, True),
    ),
    "in-order updates are applied one by one": (
        [
            *SYNCED,
            (1, ("update", OLD, 3, 3), "apply 3", []),
            (2, ("update", OLD, 4, 4, -1), "apply 4 5", []),
            (3, ("hugz", OLD, 5), "", []),
        ],
        ({2, 3, 4}, 5, True),
    ),
    "a duplicate, or what the snapshot held, is not applied again": (
        [
            *SYNCED,
            (1, ("update", OLD, 2, -2), "", []),
            (1, ("update", OLD, 3, 3), "apply 3", []),
            (1, ("update", OLD, 3, 3), "", []),
            (1, ("update", OLD, 3, -3, 4), "apply 4", []),
        ],
        ({1, 2, 3, 4}, 4, True),
    ),
    "a gap asks for a snapshot; what comes meanwhile is replayed after it": (
        [
            *SYNCED,
            (1, ("update", OLD, 5, 5), ASK, [Gap(3, 4)]),
            (1, ("update", OLD, 6, 6), "", []),
            (1, ("hugz", OLD, 6), "", []),
            (2, ("part", OLD, 4, 1, 2, 3, 4), REPLACED, [SnapshotTaken(6, 6)]),
        ],
        ({1, 2, 3, 4, 5, 6}, 6, True),
    ),
    "waiting updates replay in order, without what the snapshot held or another state's": (
        [
            *SYNCED,
            (1, ("update", OLD, 4, 4), ASK, [Gap(3, 3)]),
            (1, ("update", OLD, 6, 6), "", []),
            (1, ("update", OLD, 5, 5), "", []),
            (1, ("update", NEW, 7, 7), "", []),
            (1, ("update", OLD, 3, -1), "", []),
            (2, ("part", OLD, 4, 1, 2, 3, 4), REPLACED, [SnapshotTaken(6, 6)]),
        ],
        ({1, 2, 3, 4, 5, 6}, 6, True),
    ),
    "a hole among the waiting updates ends the replay; the next update finds it": (
        [
            *SYNCED,
            (1, ("update", OLD, 4, 4), ASK, [Gap(3, 3)]),
            (1, ("update", OLD, 6, 6), "", []),
            (2, ("part", OLD, 3, 1, 2, 3), REPLACED, [SnapshotTaken(4, 4)]),
            (3, ("update", OLD, 7, 7), ASK, [Gap(5, 6)]),
        ],
        ({1, 2, 3, 4}, 4, True),  # the view still counts while it catches up
    ),
    "a heartbeat ahead of the view, or behind it, asks for a snapshot": (
        [
            *SYNCED,
            (1, ("hugz", OLD, 2), "", []),
            (2, ("hugz", OLD, 4), ASK, [OutOfStep(2, 4)]),
            (3, ("hugz", OLD, 9), "", []),  # a snapshot is under way
            (3, ("part", OLD, 4, 1, 2, 3), REPLACED, [SnapshotTaken(3, 4)]),
            (4, ("hugz", OLD, 3), ASK, [OutOfStep(4, 3)]),
        ],
        ({1, 2, 3}, 4, True),
    ),
    "a new state id on a heartbeat: its table replaces the old": (
        [
            *SYNCED,
            (1, ("hugz", NEW, 0), ASK, [NewState(NEW)]),
            (2, ("part", NEW, 0), REPLACED, [SnapshotTaken(0, 0)]),
        ],
        (set(), 0, True),
    ),
    "a new state id on an update: kept and replayed on the new table": (
        [
            *SYNCED,
            (1, ("update", NEW, 1, 7), ASK, [NewState(NEW)]),
            (1, ("update", OLD, 3, 3), "", []),
            (2, ("part", NEW, 0), REPLACED, [SnapshotTaken(1, 1)]),
        ],
        ({7}, 1, True),
    ),
    "a snapshot counts once whole; a part that never came: the whole table again": (
        [
            (0, ("start",), ASK, []),
            (1, ("part", OLD, 5, 1, 2, {"number": 0, "last": False}), "", []),
            (1, ("part", OLD, 5, 5, 6, {"number": 2}), RENEW_ASK, [PartMissing(1, 2)]),
            (2, ("part", OLD, 5, 3, {"number": 1, "last": False}), RENEW_ASK, [PartMissing(0, 1)]),
            (3, ("part", OLD, 5, 1, 2, {"number": 0, "last": False}), "", []),
            (3, ("part", OLD, 5, 3, {"number": 1, "last": False}), "", []),
            (3, ("part", OLD, 5, 5, 6, {"number": 2}), REPLACED, [SnapshotTaken(5, 5)]),
        ],
        ({1, 2, 3, 5, 6}, 5, True),
    ),
    "snapshot parts nobody waits for are ignored": (
        [*SYNCED, (1, ("part", OLD, 9, 9), "", [])],
        ({1, 2}, 2, True),
    ),
    "heartbeats stop: the view is kept but no longer counts": (
        [
            *SYNCED,
            (2, ("hugz", OLD, 2), "", []),
            (7, ("tick",), "", []),
            (7.5, ("tick",), SILENT, [Silent(5.5, False)]),
            (8, ("tick",), "", []),
        ],
        ({1, 2}, 2, False),
    ),
    "heartbeats resume: the view counts again after a snapshot": (
        [
            *SYNCED,
            (1, ("hugz", OLD, 2), "", []),
            (6.5, ("tick",), SILENT, [Silent(5.5, False)]),
            (12, ("hugz", OLD, 3), "", []),
            (12, ("update", OLD, 4, 4), "", []),
            (12.5, ("part", OLD, 3, 1, 2, 3), REPLACED, [SnapshotTaken(4, 4)]),
            (17, ("tick",), "", []),
        ],
        ({1, 2, 3, 4}, 4, True),
    ),
    "snapshots come but the update stream never did: said in the notice": (
        [
            (0, ("start",), ASK, []),
            (0.5, ("part", OLD, 0), REPLACED, [SnapshotTaken(0, 0)]),
            (6, ("tick",), SILENT, [Silent(5.5, True)]),
        ],
        (set(), 0, False),
    ),
    "a young new state: the view keeps its bans, adds the new state's, drops its unbans": (
        [
            *SYNCED,
            (1, ("hugz", NEW, 0, YOUNG), ASK, [NewState(NEW)]),
            (2, ("part", NEW, 0, 3, YOUNG), REPLACED, [Young(NEW, 2), SnapshotTaken(3, 0)]),
            (3, ("update", NEW, 1, 4, YOUNG), "apply 1", []),
            (3, ("update", NEW, 2, -1, YOUNG), "apply 2", []),
            (4, ("hugz", NEW, 2, YOUNG), "", []),
        ],
        ({2, 3, 4}, 2, True),
    ),
    "a young state rebuilt: a fresh snapshot replaces what the view held": (
        [
            *SYNCED,
            (1, ("hugz", NEW, 0, YOUNG), ASK, [NewState(NEW)]),
            (2, ("part", NEW, 0, 3, YOUNG), REPLACED, [Young(NEW, 2), SnapshotTaken(3, 0)]),
            (3, ("update", NEW, 1, 2, YOUNG), "apply 1", []),  # reported again: confirmed
            (4, ("hugz", NEW, 1), ASK, [Rebuilt(NEW)]),
            (4, ("update", NEW, 2, 5), "", []),
            (5, ("part", NEW, 1, 2, 3), REPLACED, [SnapshotTaken(3, 2)]),
        ],
        ({2, 3, 5}, 2, True),
    ),
    "a young state seen on an update grows up the same way": (
        [
            *SYNCED,
            (1, ("update", NEW, 1, 3, YOUNG), ASK, [NewState(NEW)]),
            (2, ("part", NEW, 0, YOUNG), REPLACED, [Young(NEW, 2), SnapshotTaken(3, 1)]),
            (3, ("update", NEW, 2, 4), ASK, [Rebuilt(NEW)]),
            (4, ("part", NEW, 2, 3, 4), REPLACED, [SnapshotTaken(2, 2)]),
        ],
        ({3, 4}, 2, True),
    ),
    "a gap in a young state: its snapshot keeps what the view held": (
        [
            *SYNCED,
            (1, ("hugz", NEW, 0, YOUNG), ASK, [NewState(NEW)]),
            (2, ("part", NEW, 0, YOUNG), REPLACED, [Young(NEW, 2), SnapshotTaken(2, 0)]),
            (3, ("update", NEW, 2, 3, YOUNG), ASK, [Gap(1, 1)]),
            (4, ("part", NEW, 2, 1, 3, YOUNG), REPLACED, [SnapshotTaken(3, 2)]),
        ],
        ({1, 2, 3}, 2, True),
    ),
    "the hub silent, then back young: the view before its silence is held": (
        [
            *SYNCED,
            (1, ("hugz", OLD, 2), "", []),
            (6.5, ("tick",), SILENT, [Silent(5.5, False)]),
            (7, ("hugz", NEW, 0, YOUNG), "", []),
            (8, ("part", NEW, 0, YOUNG), REPLACED, [Young(NEW, 2), SnapshotTaken(2, 0)]),
        ],
        ({1, 2}, 0, True),
    ),
    "a young state met at start holds nothing": (
        [
            (0, ("start",), ASK, []),
            (0.5, ("part", NEW, 0, 3, YOUNG), REPLACED, [SnapshotTaken(1, 0)]),
        ],
        ({3}, 0, True),
    ),
    "a refresh asks for the table though nothing is amiss; updates meanwhile wait": (
        [
            *SYNCED,
            (60, ("refresh",), ASK, []),
            (60.1, ("update", OLD, 3, 3), "", []),
            (60.2, ("refresh",), "", []),  # one under way: not asked again
            (60.5, ("part", OLD, 2, 1, 2), REPLACED, [SnapshotTaken(3, 3)]),  # .3 replayed
        ],
        ({1, 2, 3}, 3, True),
    ),
    "no refresh before the first snapshot": (
        [
            (0, ("start",), ASK, []),
            (1, ("refresh",), "", []),
            (1.5, ("part", OLD, 2, 1, 2), REPLACED, [SnapshotTaken(2, 2)]),
        ],
        ({1, 2}, 2, True),
    ),
    "a snapshot that does not come is asked for again on a fresh socket": (
        [
            (0, ("start",), ASK, []),
            (SNAPSHOT_TIMEOUT, ("tick",), "", []),
            (10.5, ("tick",), "renew_snapshot_socket, ask_snapshot", [SnapshotLate()]),
            (20, ("tick",), "", []),
            (21, ("tick",), "renew_snapshot_socket, ask_snapshot", [SnapshotLate()]),
            (21.5, ("part", OLD, 2, 1, 2), REPLACED, [SnapshotTaken(2, 2)]),
        ],
        ({1, 2}, 2, True),
    ),
}


@pytest.mark.parametrize(("steps", "after"), SCENARIOS.values(), ids=SCENARIOS.keys())
def test_stream_transitions(steps: list, after: tuple) -> None:
    core = HubSync(TIMEOUT, now=0.0)
    for number, (now, given, does, notices) in enumerate(steps):
        outcome = feed(core, given, now)
        assert (shell_does(outcome), outcome.notices) == (does, notices), f"step {number}"
    assert (addresses(core.view), core.sequence, core.synced) == after


def test_applied_updates_are_the_events_in_the_view() -> None:
    core = HubSync(TIMEOUT, now=0.0)
    feed(core, ("start",), 0)
    feed(core, ("part", OLD, 2, 1), 0)
    events = [event(3), event(-1)]
    outcome = core.on_update(OLD, 3, events, 1)
    assert outcome.applied == [(3, events[0]), (4, events[1])]
    assert list(core.view.bans.values()) == [events[0]]


def test_nothing_waits_once_a_snapshot_is_whole() -> None:
    """Updates kept during a snapshot, replayed or not, and its parts are let go."""
    core = HubSync(TIMEOUT, now=0.0)
    for now, given, _, _ in SYNCED:
        feed(core, given, now)
    feed(core, ("update", OLD, 5, 5), 1)
    feed(core, ("update", OLD, 7, 7), 1)
    feed(core, ("part", OLD, 4, 1, 2, {"last": False}), 2)
    feed(core, ("part", OLD, 4, 3, 4, {"number": 1}), 2)
    assert core.sequence == 5
    assert (core.buffered, core.snapshot_parts, core.snapshot_asked) == ([], [], None)


def test_two_hubs_disagreeing_the_node_bans_what_any_synced_one_bans() -> None:
    """Each hub has its own core; the jails take the union of the views that count."""
    one, two = HubSync(TIMEOUT, now=0.0), HubSync(TIMEOUT, now=0.0)
    for core, state, bans in ((one, OLD, (1, 2)), (two, NEW, (2, 3))):
        feed(core, ("start",), 0)
        feed(core, ("part", state, 5, *bans), 0)
    policy = LocalPolicy("node2", "cluster", {}, [])

    def banned() -> set[int]:
        views = [core.view for core in (one, two) if core.synced]
        return {int(ip.rsplit(".", 1)[1]) for ip in desired_bans(views, policy)["cluster"]}

    assert banned() == {1, 2, 3}
    feed(two, ("update", NEW, 6, -2), 1)  # one hub lifts a ban the other still holds
    assert banned() == {1, 2, 3}
    feed(one, ("hugz", OLD, 5), 4)
    feed(one, ("tick",), 8)
    assert shell_does(feed(two, ("tick",), 8)) == SILENT  # two is silent since 1
    assert banned() == {1, 2}  # only the hub still heard decides
    feed(two, ("part", NEW, 6, 3, 4), 9)
    assert banned() == {1, 2, 3, 4}


def test_held_bans_whose_time_is_up_leave_the_view() -> None:
    """At unix time `clock`: a held ban of 600 s from NOW - 500 ends at NOW + 100."""
    core = HubSync(TIMEOUT, now=0.0)
    now = 1_795_000_000.0
    old = [
        BanEvent.new("node1", "sshd", "ban", "192.0.2.1", now - 500, 600),
        BanEvent.new("node1", "sshd", "ban", "192.0.2.2", now - 500, -1),  # permanent
        BanEvent.new("node1", "sshd", "ban", "192.0.2.3", now - 500),  # the hub's default
    ]
    core.start(0)
    core.on_snapshot_part(SnapshotPart(OLD, 3, 0, True, old), 0)
    core.on_heartbeat(NEW, 0, 1, young=True)
    core.on_snapshot_part(SnapshotPart(NEW, 0, 0, True, [], True), 1)
    assert len(core.held) == 3 and core.expire_held(now + 99).dropped == []
    outcome = core.expire_held(now + 100)
    assert [(e.action, e.ip) for e in outcome.dropped] == [("unban", "192.0.2.1")]
    assert addresses(core.view) == {2, 3} and set(core.held) == {
        ("sshd", "192.0.2.2"),
        ("sshd", "192.0.2.3"),
    }
