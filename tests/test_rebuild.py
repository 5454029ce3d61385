"""A hub rebuilding a state it lost: when its youth ends, and how peers hand over tables."""

from __future__ import annotations

import pytest

from f2bzmq.protocol import BanEvent, SnapshotPart
from f2bzmq.rebuild import HANDOVER_TIMEOUT, Handed, Handover, Rebuild

NOW = 1_795_000_000.0
OURS, PEERS = "a" * 32, "b" * 32  # state ids
NODES = ("node1", "node2")


def ban(n: int) -> BanEvent:
    return BanEvent.new("node1", "sshd", "ban", f"192.0.2.{n}", NOW, 600)


# name: (steps of (input, the reason youth ends or None), young after)
YOUTH = {
    "every node reports its bans to this state: rebuilt": (
        [
            (("hello", "node1", OURS), None),
            (("hello", "node1", OURS), None),
            (("hello", "node2", OURS), "all 2 nodes reported their bans again"),
        ],
        False,
    ),
    "a hello for another state, or none, or without a key, does not count": (
        [
            (("hello", "node1", PEERS), None),
            (("hello", "node2", None), None),
            (("hello", None, OURS), None),
            (("hello", "node1", OURS), None),
        ],
        True,
    ),
    "a peer hands over its table: rebuilt": (
        [(("handover", "tcp://10.0.0.6:5692", False), "tcp://10.0.0.6:5692 handed over its table")],
        False,
    ),
    "a young peer's table may lack bans: still young": (
        [(("handover", "tcp://10.0.0.6:5692", True), None)],
        True,
    ),
    "the window ends it, and nothing after": (
        [
            (("tick", NOW + 299), None),
            (("tick", NOW + 300), "the rebuild window is over"),
            (("hello", "node1", OURS), None),
            (("handover", "tcp://10.0.0.6:5692", False), None),
            (("tick", NOW + 900), None),
        ],
        False,
    ),
}


@pytest.mark.parametrize(("steps", "young"), YOUTH.values(), ids=YOUTH.keys())
def test_what_ends_a_young_state(steps: list, young: bool) -> None:
    rebuild = Rebuild(NOW + 300)
    for number, ((kind, *args), reason) in enumerate(steps):
        if kind == "hello":
            said = rebuild.on_hello(args[0], args[1], OURS, NODES)
        elif kind == "handover":
            said = rebuild.on_handover(*args)
        else:
            said = rebuild.on_tick(args[0])
        assert said == reason, f"step {number}"
    assert rebuild.young is young


def test_a_state_that_is_not_young_stays_so_and_without_keys_only_the_window_counts() -> None:
    rebuilt = Rebuild(None)
    assert not rebuilt.young and rebuilt.on_tick(NOW + 10**6) is None
    assert rebuilt.on_hello("node1", OURS, OURS, NODES) is None
    insecure = Rebuild(NOW + 300)
    assert insecure.on_hello("node1", OURS, OURS, ()) is None and insecure.young


def part(state: str, *bans: int, last: bool = True, young: bool = False) -> SnapshotPart:
    return SnapshotPart(state, 7, 0, last, [ban(n) for n in bans], young)


def test_peers_are_asked_once_and_again_after_the_timeout_and_our_own_address_drops_out() -> None:
    handover = Handover(["tcp://10.0.0.5:5692", "tcp://10.0.0.6:5692"], OURS)
    assert handover.to_ask(NOW) == ["tcp://10.0.0.5:5692", "tcp://10.0.0.6:5692"]
    assert handover.to_ask(NOW + 1) == [] and handover.next_deadline() == NOW + HANDOVER_TIMEOUT
    assert handover.on_part("tcp://10.0.0.5:5692", part(OURS, 1)) is None  # that was us
    assert list(handover.asked) == ["tcp://10.0.0.6:5692"]
    assert handover.to_ask(NOW + HANDOVER_TIMEOUT + 0.1) == ["tcp://10.0.0.6:5692"]
    assert handover.on_part("tcp://10.0.0.6:5692", part(PEERS, 1, 2, last=False)) is None
    handed = handover.on_part("tcp://10.0.0.6:5692", part(PEERS, 3, young=True))
    assert handed == Handed("tcp://10.0.0.6:5692", handed.events, True)
    assert [event.ip for event in handed.events] == ["192.0.2.1", "192.0.2.2", "192.0.2.3"]
    assert handover.done and handover.next_deadline() is None
    assert handover.on_part("tcp://10.0.0.6:5692", part(PEERS, 4)) is None  # too late


def test_asking_again_starts_the_parts_afresh_and_stop_ends_it_all() -> None:
    handover = Handover(["tcp://10.0.0.6:5692"], OURS)
    handover.to_ask(NOW)
    handover.on_part("tcp://10.0.0.6:5692", part(PEERS, 1, last=False))
    handover.to_ask(NOW + HANDOVER_TIMEOUT + 1)
    handed = handover.on_part("tcp://10.0.0.6:5692", part(PEERS, 2))
    assert [event.ip for event in handed.events] == ["192.0.2.2"]
    other = Handover(["tcp://10.0.0.6:5692", "tcp://10.0.0.7:5692"], OURS)
    other.stop()
    assert other.done and other.to_ask(NOW) == []
