"""When a pass of the hub's report drain ends: the messages it read in, go on or end."""

import pytest

from f2bzmq.passes import BYTES, LIGHT, LIMIT, SHARE, Pass

A, B, C = b"node-a", b"node-b", b"node-c"


def run(messages: list[tuple[bytes, int]], **limits) -> int:
    """How many of `messages` (peer, events) a pass reads."""
    turn = Pass(**limits)
    for number, (peer, events) in enumerate(messages, 1):
        if not turn.take(peer, events):
            return number
    return len(messages)


@pytest.mark.parametrize(
    ("messages", "limits", "read"),
    [
        # One report of a peer, whatever its size up to a share: the pass goes on.
        ([(A, 1), (B, 1)], {}, 2),
        ([(A, SHARE), (B, 1)], {}, 2),
        # A peer past its share ends the pass with that message; the others' come first
        # in libzmq's turns, so they are in.
        ([(A, 60), (B, 1), (A, 60), (B, 1)], {}, 3),
        ([(A, SHARE + 1), (B, 1)], {}, 1),
        # A hello, a refused message or an empty report still takes a turn.
        ([(A, 0)] * 150, {"share": 100}, 101),
        ([(A, 0)] * (SHARE + 50), {}, SHARE + 1),
        # The pass as a whole: `limit` events, from however many peers.
        ([(A, 100), (B, 100), (C, 100)], {"limit": 250}, 3),
        ([(A, 10), (B, 10), (C, 10)], {"limit": 20}, 2),
        ([(bytes([n % 256, n // 256]), 1) for n in range(LIMIT + 5)], {}, LIMIT),
    ],
)
def test_when_a_pass_ends(messages, limits, read):
    assert run(messages, **limits) == read


def test_shares_are_counted_per_peer():
    turn = Pass()
    assert turn.take(A, SHARE)
    assert turn.take(B, SHARE)  # B's own share, not A's
    assert not turn.take(A, 1)
    assert turn.shares == {A: SHARE + 1, B: SHARE}
    assert turn.taken == 2 * SHARE + 1


@pytest.mark.parametrize(
    ("messages", "first", "then"),
    [
        # Nothing heavy, or nothing light: one batch, in the order read.
        ([(A, 1), (B, 1)], [0, 1], []),
        ([(A, SHARE)], [], [0]),
        # A flooding peer's report waits for the light ones read after it.
        ([(A, SHARE), (B, 1), (C, LIGHT)], [1, 2], [0]),
        ([(A, LIGHT + 1), (B, 1)], [1], [0]),
        # A peer's messages stay together, in order, in the batch its total puts it in.
        ([(A, LIGHT), (B, 1), (A, 1)], [1], [0, 2]),
        ([(A, 2), (B, SHARE), (A, 2)], [0, 2], [1]),
    ],
)
def test_light_peers_go_first(messages, first, then):
    turn = Pass()
    for peer, events in messages:
        assert turn.take(peer, events)
    assert turn.split([peer for peer, _ in messages]) == (first, then)


def test_a_pass_holds_a_bounded_number_of_bytes():
    """It reads every message before handling one: messages of one event each but large
    ones (two 64-kB frames) end it once it holds BYTES, whoever sent them."""
    turn = Pass()
    peers = [bytes([n]) for n in range(100)]
    read = 0
    for peer in peers * 10:
        read += 1
        if not turn.take(peer, 1, 2 * 65536):
            break
    assert read == BYTES // (2 * 65536) and turn.held >= BYTES
    assert Pass().take(A, SHARE, 200 * SHARE)  # a full report of 100 events: 20 kB
