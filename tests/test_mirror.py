"""The relay's core: when its copy of a hub's table is whole, which requests it answers
and when, and that an answer is the hub's table as the hub would give it. As tables: each
step gives the core one input `now` and names the peers answered and whether the copy is
whole after it. The stream inputs are test_sync's."""

from __future__ import annotations

import json

import pytest
from test_sync import NEW, OLD, YOUNG, feed

from f2bzmq import mirror, protocol
from f2bzmq.mirror import Mirror
from f2bzmq.sync import SNAPSHOT_TIMEOUT

TIMEOUT = 5.0
SYNCED = [(0, ("start",), [], False), (0.5, ("part", OLD, 2, 1, 2), [], True)]


def step(core: Mirror, given: tuple, now: float) -> list[str]:
    """One input: ("ask", peer) is a snapshot request; any other is test_sync's input to
    the stream core. The peers answered: at once, or waiting ones now due."""
    if given[0] == "ask":
        answered = core.on_request(given[1].encode(), now)
    else:
        feed(core, given, now)
        answered = []
    return [peer.decode() for peer in answered + core.due(now)]


# name: steps of (now, input, peers answered, whole after)
SCENARIOS = {
    "before the first snapshot a request waits; the snapshot answers it": [
        (0, ("start",), [], False),
        (0.1, ("ask", "a"), [], False),
        (0.2, ("hugz", OLD, 2), [], False),
        (0.5, ("part", OLD, 2, 1, 2), ["a"], True),
    ],
    "a whole copy answers at once, and stays whole in order": [
        *SYNCED,
        (1, ("ask", "a"), ["a"], True),
        (1, ("update", OLD, 3, 3), [], True),
        (2, ("hugz", OLD, 3), [], True),
        (2, ("ask", "b"), ["b"], True),
    ],
    "a part that is not the last leaves the copy as it was": [
        (0, ("start",), [], False),
        (0.1, ("part", OLD, 2, 1, {"number": 0, "last": False}), [], False),
        (0.2, ("ask", "a"), [], False),
        (0.3, ("part", OLD, 2, 2, {"number": 1, "last": True}), ["a"], True),
    ],
    "a gap: requests wait for the hub's snapshot, then all are answered": [
        *SYNCED,
        (1, ("update", OLD, 5, 5), [], False),
        (1.1, ("ask", "a"), [], False),
        (1.2, ("ask", "b"), [], False),
        (1.3, ("hugz", OLD, 5), [], False),
        (1.5, ("part", OLD, 4, 1, 2, 3, 4), ["a", "b"], True),
    ],
    "a heartbeat out of step: the same": [
        *SYNCED,
        (1, ("hugz", OLD, 3), [], False),
        (1.1, ("ask", "a"), [], False),
        (1.5, ("part", OLD, 3, 1, 2, 3), ["a"], True),
    ],
    "a silent hub: not whole, and its heartbeat alone does not make it whole": [
        *SYNCED,
        (6, ("tick",), [], False),
        (7, ("ask", "a"), [], False),
        (8, ("hugz", OLD, 2), [], False),
        (8.5, ("part", OLD, 2, 1, 2), ["a"], True),
    ],
    "a copy the hub has not confirmed for half the timeout waits for its next word": [
        *SYNCED,
        (3.1, ("ask", "a"), [], False),
        (3.5, ("hugz", OLD, 2), ["a"], True),
        (6.1, ("tick",), [], False),
    ],
    "a new state: requests wait for its snapshot": [
        *SYNCED,
        (1, ("hugz", NEW, 0, YOUNG), [], False),
        (1.1, ("ask", "a"), [], False),
        (1.5, ("part", NEW, 0, YOUNG), ["a"], True),
    ],
    "a request that waited longer than its subscriber waits is dropped": [
        (0, ("start",), [], False),
        (1, ("ask", "a"), [], False),
        (1 + SNAPSHOT_TIMEOUT + 0.1, ("tick",), [], False),
        (12, ("ask", "a"), [], False),
        (12.5, ("part", OLD, 2, 1, 2), ["a"], True),
    ],
    "a socket that asks twice while waiting is answered once": [
        (0, ("start",), [], False),
        (1, ("ask", "a"), [], False),
        (2, ("ask", "a"), [], False),
        (2.5, ("part", OLD, 2, 1, 2), ["a"], True),
        (3, ("tick",), [], True),
    ],
}


@pytest.mark.parametrize("name", SCENARIOS)
def test_when_requests_are_answered(name):
    core = Mirror(TIMEOUT, 0)
    for now, given, answered, whole in SCENARIOS[name]:
        assert (step(core, given, now), core.whole(now)) == (answered, whole), (now, given)


def test_requests_dropped_are_counted_and_answers_too():
    core = Mirror(TIMEOUT, 0)
    for now, given, _, _ in SCENARIOS[
        "a request that waited longer than its subscriber waits is dropped"
    ]:
        step(core, given, now)
    assert (core.served, core.dropped, core.waiting) == (1, 1, {})


def test_at_most_max_waiting_requests_wait(monkeypatch):
    monkeypatch.setattr(mirror, "MAX_WAITING", 2)
    core = Mirror(TIMEOUT, 0)
    core.start(0)
    for peer in (b"a", b"b", b"c", b"a"):
        core.on_request(peer, 1)
    assert list(core.waiting) == [b"a", b"b"] and core.dropped == 1
    feed(core, ("part", OLD, 2, 1, 2), 2)
    assert core.due(2) == [b"a", b"b"]


def test_broken_since_says_how_long_the_copy_is_not_whole():
    core = Mirror(TIMEOUT, 0)
    assert core.broken_since == 0
    feed(core, ("start",), 0)
    feed(core, ("part", OLD, 2, 1, 2), 1)
    assert core.broken_since is None
    feed(core, ("update", OLD, 9, 9), 3)
    assert core.broken_since == 3


def answer(core: Mirror) -> tuple[list[dict], set[str]]:
    """The headers of the parts the core hands out, and the addresses in them."""
    headers, addresses = [], set()
    for frames in core.parts():
        assert frames[:2] == [protocol.PROTOCOL, protocol.SNAPSHOT]
        part = protocol.decode_snapshot_part(frames)
        headers.append(json.loads(frames[2]))
        addresses |= {event.ip.rsplit(".", 1)[1] for event in part.events}
    return headers, addresses


def test_the_answer_is_the_hubs_table_as_the_hub_gives_it():
    core = Mirror(TIMEOUT, 0)
    feed(core, ("start",), 0)
    feed(core, ("part", OLD, 2, 1, 2), 0.5)
    feed(core, ("update", OLD, 3, 3, -1), 1)
    # The hub's header, and the relay's word that it takes presence (for the hub's holds).
    header = {"publisher": OLD, "seq": 4, "part": 0, "last": True, "presence": True}
    assert answer(core) == ([header], {"2", "3"})
    assert core.parts() is core.parts()  # encoded once while nothing changes
    first = core.parts()
    feed(core, ("hugz", OLD, 4), 2)
    assert core.parts() is first
    feed(core, ("update", OLD, 5, 5), 2)
    assert answer(core)[1] == {"2", "3", "5"}


def test_a_young_states_answer_holds_its_bans_only_and_says_it_is_young():
    """The subscriber keeps what it held of the state the hub lost (HubSync's `held`);
    the relay hands out the hub's young table, flagged young, as the hub would."""
    core = Mirror(TIMEOUT, 0)
    feed(core, ("start",), 0)
    feed(core, ("part", OLD, 2, 1, 2), 0.5)
    feed(core, ("hugz", NEW, 1, YOUNG), 1)
    feed(core, ("part", NEW, 1, 2, YOUNG), 1.5)
    assert set(core.sync.held) == {("sshd", "192.0.2.1")}
    assert answer(core) == (
        [{"publisher": NEW, "seq": 1, "part": 0, "last": True, "young": True, "presence": True}],
        {"2"},
    )
    feed(core, ("hugz", NEW, 1), 2)  # rebuilt: the hub's table is asked for again
    assert not core.whole(2)
    feed(core, ("part", NEW, 1, 2), 2.5)
    header = {"publisher": NEW, "seq": 1, "part": 0, "last": True, "presence": True}
    assert answer(core) == ([header], {"2"})


def test_a_large_table_goes_in_the_hubs_parts():
    core = Mirror(TIMEOUT, 0)
    core.start(0)
    events = [
        protocol.BanEvent.new("node1", "sshd", "ban", f"10.0.{n >> 8}.{n & 255}", bantime=600)
        for n in range(protocol.SNAPSHOT_EVENTS + 1)
    ]
    core.on_snapshot_part(protocol.SnapshotPart(OLD, 9, 0, True, events), 1)
    parts = [protocol.decode_snapshot_part(frames) for frames in core.parts()]
    assert [(p.seq, p.number, p.last, len(p.events)) for p in parts] == [
        (9, 0, False, protocol.SNAPSHOT_EVENTS),
        (9, 1, True, 1),
    ]
