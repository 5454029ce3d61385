"""Who gets the hub's table, and when: snapshots handed out part by part, never queued whole.

A subscriber asks for the table when it starts, sees a gap or hears nothing. A node that
asked again and again without reading made the hub build and queue the whole table per
request (60 requests took it from 97 MB to 1.36 GB in 2.5 s). Here a request waits its
turn; each node has at most PER_NODE snapshots under way and a bucket of them; and a
snapshot goes out only as fast as its peer takes it: the shell sends a part when the
peer's queue has room for it (a few parts), so a peer that does not read holds that much
and no more. Nothing here touches a socket: requests, the table and `now` go in; which
part goes to whom comes out.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from . import protocol
from .protocol import BanEvent
from .ratelimit import TokenBuckets
from .state import BanTable

PER_NODE = 2  # snapshots under way per node: its subscriber, and one renewed socket
WAITING_PER_NODE = 4  # requests of one node waiting for a turn; more are refused
MAX_SENDING = 64  # snapshots under way at once, all nodes together
MAX_WAITING = 1000  # requests waiting, all nodes together
MAX_WAIT = 30.0  # seconds a request waits at most: by then its subscriber has asked anew
# Snapshot parts a node may have sent to it, per second and at once: every part is read
# from the table, encoded and sent (about 0.1 ms), and no node may have the hub do that
# in a loop. A table of 100,000 bans is 200 parts: ten such snapshots at once, then two a
# second, 8 % of a core; a small table's snapshot costs one part.
RATE = 400.0
BURST = 2000


@dataclass
class Snapshot:
    """The table as it was at one sequence number, in parts of SNAPSHOT_EVENTS events."""

    instance: str
    sequence: int
    events: list[BanEvent]
    young: bool = False  # the hub's state is young: see protocol.StreamMessage

    @property
    def parts(self) -> int:
        return max(1, -(-len(self.events) // protocol.SNAPSHOT_EVENTS))

    def part(self, number: int) -> list[bytes]:
        start = number * protocol.SNAPSHOT_EVENTS
        events = self.events[start : start + protocol.SNAPSHOT_EVENTS]
        last = number == self.parts - 1
        return protocol.encode_snapshot_part(
            self.instance,
            self.sequence,
            number,
            last,
            events,
            self.young,
            presence=True,
            relayed=True,
        )


@dataclass
class Sending:
    """A snapshot under way to one peer."""

    node: str
    snapshot: Snapshot
    next_part: int = 0


class SnapshotQueue:
    """The requests waiting and the snapshots under way, each keyed by its peer's identity."""

    def __init__(self) -> None:
        self.waiting: dict[bytes, tuple[str, float]] = {}  # peer -> (node, asked at), in order
        self.sending: dict[bytes, Sending] = {}
        self.waiting_per_node: Counter[str] = Counter()
        self.sending_per_node: Counter[str] = Counter()
        self.buckets = TokenBuckets(RATE, BURST, max_keys=10_000)
        self.latest: Snapshot | None = None  # shared by every snapshot started at its sequence

    def ask(self, peer: bytes, node: str, now: float) -> str | None:
        """A request from `peer`, sent with node's key: None when it is taken (or is one under
        way already), else why not."""
        if peer in self.waiting or peer in self.sending:
            return None
        if self.waiting_per_node[node] >= WAITING_PER_NODE:
            return f"{WAITING_PER_NODE} snapshot requests of node {node} wait already"
        if len(self.waiting) >= MAX_WAITING:
            return f"{MAX_WAITING} snapshot requests wait already"
        self.waiting[peer] = (node, now)
        self.waiting_per_node[node] += 1
        return None

    def start(self, table: BanTable, now: float, young: bool = False) -> None:
        """Start the waiting requests whose turn it is, oldest first; `young`: the table is
        still being rebuilt."""
        for peer, (node, asked) in list(self.waiting.items()):
            if asked + MAX_WAIT <= now:
                self._unwait(peer, node)
            elif len(self.sending) >= MAX_SENDING:
                return
            elif self.sending_per_node[node] < PER_NODE:
                snapshot = self._snapshot(table, young)
                if self.buckets.allow(node, now, snapshot.parts):
                    self._unwait(peer, node)
                    self.sending[peer] = Sending(node, snapshot)
                    self.sending_per_node[node] += 1

    def next_part(self, peer: bytes) -> list[bytes]:
        sending = self.sending[peer]
        return sending.snapshot.part(sending.next_part)

    def sent(self, peer: bytes) -> None:
        """The part next_part() gave went out: the snapshot is done after its last."""
        sending = self.sending[peer]
        sending.next_part += 1
        if sending.next_part >= sending.snapshot.parts:
            self.gone(peer)

    def gone(self, peer: bytes) -> None:
        """The snapshot to `peer` is over: sent whole, or the peer disconnected."""
        sending = self.sending.pop(peer, None)
        if sending is not None:
            self.sending_per_node[sending.node] -= 1
            if not self.sending_per_node[sending.node]:
                del self.sending_per_node[sending.node]

    def wait_seconds(self, now: float) -> float | None:
        """How soon to look again: soon while a snapshot is under way (its peer's queue
        empties as it reads), at the next token while requests wait, else never."""
        if self.sending:
            return 0.01
        if not self.waiting:
            return None
        parts = 1 if self.latest is None else self.latest.parts
        ready = min(self.buckets.ready_at(node, now, parts) for node, _ in self.waiting.values())
        return max(0.01, ready - now)

    def _unwait(self, peer: bytes, node: str) -> None:
        del self.waiting[peer]
        self.waiting_per_node[node] -= 1
        if not self.waiting_per_node[node]:
            del self.waiting_per_node[node]

    def _snapshot(self, table: BanTable, young: bool) -> Snapshot:
        latest = self.latest
        now_is = (table.instance, table.sequence, young)
        if latest is None or (latest.instance, latest.sequence, latest.young) != now_is:
            sequence, events = table.snapshot()
            latest = self.latest = Snapshot(table.instance, sequence, events, young)
        return latest
