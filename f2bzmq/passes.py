"""How much of the waiting reports one pass of the hub takes before it commits and answers.

A pass reads reports in the order libzmq hands them out (each peer's in turn), stores
them with one commit (one fsync ACKs them all), then answers and broadcasts them. Every
report read in a pass waits for the whole pass, so a pass must stay short even when a
peer sends as fast as it can, refused or not: it takes at most `limit` events in all,
and at most `share` of one peer's. libzmq hands out the peers' reports in turn, so the
others' come in the first few turns, and the pass then ends instead of going on with
the one peer's (a node flooding, even refused, made node1's reports wait for passes of
20-50 ms; with the share, 2-3 ms). What a pass leaves waits in libzmq's queues for the
next one.

Within a pass, the reports of the peers that sent little in it (at most `light` events)
are stored and published first, with a commit of their own, and the others' after: a
node reporting one ban then waits for its own report's work, not for a flooding node's
hundred events (a second commit, an fsync, only in a pass that has both).
"""

from __future__ import annotations

from collections.abc import Sequence

LIMIT = 1000  # events a pass takes in all
SHARE = 100  # events a pass takes of one peer's (a full report)
LIGHT = 10  # events of one peer's in a pass up to which its reports go first
# Bytes a pass holds at most: it reads every message before handling any (for the light
# peers' turn), and 1,000 messages of two 64-kB frames would be 128 MB. A pass of 1,000
# events in full reports is about 200 kB.
BYTES = 4 << 20


class Pass:
    """One pass: `take()` each message read, and end the pass when it says so."""

    def __init__(
        self, limit: int = LIMIT, share: int = SHARE, light: int = LIGHT, size: int = BYTES
    ) -> None:
        self.limit = limit
        self.share = share
        self.light = light
        self.size = size
        self.taken = 0
        self.held = 0  # bytes of the messages taken
        self.shares: dict[bytes, int] = {}  # events taken of each peer

    def take(self, peer: bytes, events: int, size: int = 0) -> bool:
        """Count a message of `events` events and `size` bytes from `peer` (at least one
        event: a hello or a refused message takes a turn too); False when the pass ends
        with it."""
        events = max(1, events)
        self.taken += events
        self.held += size
        share = self.shares[peer] = self.shares.get(peer, 0) + events
        return self.taken < self.limit and share <= self.share and self.held < self.size

    def split(self, peers: Sequence[bytes]) -> tuple[list[int], list[int]]:
        """The messages read (by their peers, in order) as two batches of indexes, each
        in the order read: the light peers' first, then the others' (either may be
        empty). A peer's messages all go in one batch, so they keep their order."""
        light = self.light
        first: list[int] = []
        then: list[int] = []
        for index, peer in enumerate(peers):
            (first if self.shares.get(peer, 0) <= light else then).append(index)
        return first, then
