"""A hub that lost its state rebuilds it before it speaks for the cluster.

A hub that starts without its table (a new disk, a deleted state folder) makes a new
state id, and its state is *young*: it says so in every header, subscribers keep the bans
they hold instead of taking its empty table, monitors report again every ban their node
holds, and a peer hub hands over its table. `Rebuild` says when that is over; `Handover`
asks the peers. Nothing here touches a socket, the store or a clock.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .protocol import BanEvent, SnapshotPart

HANDOVER_TIMEOUT = 10.0  # seconds a peer has to hand over its whole table before it is asked again


class Rebuild:
    """Whether the hub's state is young, and what ends its youth: every node has reported
    its bans again, a peer that is not young itself handed over its table, or the rebuild
    window is over."""

    def __init__(self, young_until: float | None) -> None:
        self.until = young_until  # unix time the window ends; None: not young
        self.rebuilt: set[str] = set()  # nodes that reported every ban they hold to this state

    @property
    def young(self) -> bool:
        return self.until is not None

    def on_hello(
        self, node: str | None, rebuilt: str | None, instance: str, expected: Iterable[str]
    ) -> str | None:
        """A monitor's hello: `rebuilt` names the state it has reported its bans to. The
        reason youth ends, when it does: `expected` (the node keys the hub accepts) have all
        said so. Without keys no node can be told from another: only the window ends it."""
        if not self.young or node is None or rebuilt != instance:
            return None
        self.rebuilt.add(node)
        expected = set(expected)
        if expected and expected <= self.rebuilt:
            return self._end(f"all {len(expected)} nodes reported their bans again")
        return None

    def on_handover(self, peer: str, peer_young: bool) -> str | None:
        """A peer's whole table is in ours: a young peer's may lack bans, so only a rebuilt
        peer's ends youth."""
        if not self.young or peer_young:
            return None
        return self._end(f"{peer} handed over its table")

    def on_tick(self, now: float) -> str | None:
        if self.until is not None and now >= self.until:
            return self._end("the rebuild window is over")
        return None

    def _end(self, reason: str) -> str:
        self.until = None
        self.rebuilt.clear()
        return reason


@dataclass(frozen=True)
class Handed:
    """A peer's whole table: its bans, and whether the peer's state was young itself."""

    peer: str
    events: list[BanEvent]
    young: bool


class Handover:
    """Snapshots asked of the peer hubs (every hub of `[general] hubs`; the hub's own
    address among them answers with its own state id and is left out)."""

    def __init__(self, peers: Iterable[str], instance: str) -> None:
        self.instance = instance  # our own state id: an answer naming it came from us
        self.asked: dict[str, float | None] = {peer: None for peer in peers}  # peer -> when
        self.parts: dict[str, list[BanEvent]] = {}

    @property
    def done(self) -> bool:
        return not self.asked

    def to_ask(self, now: float) -> list[str]:
        """Peers to ask now: never asked, or no whole answer within HANDOVER_TIMEOUT. The
        shell asks on a fresh socket, so the parts of an answer given up can't mix in."""
        due = [
            peer
            for peer, asked in self.asked.items()
            if asked is None or now - asked > HANDOVER_TIMEOUT
        ]
        for peer in due:
            self.asked[peer] = now
            self.parts[peer] = []
        return due

    def on_part(self, peer: str, part: SnapshotPart) -> Handed | None:
        """Gather a peer's parts; its whole table once the last one is in."""
        if peer not in self.asked:
            return None
        if part.publisher == self.instance:
            self.stop(peer)  # our own address
            return None
        self.parts[peer].extend(part.events)
        if not part.last:
            return None
        events = self.parts[peer]
        self.stop(peer)
        return Handed(peer, events, part.young)

    def stop(self, peer: str | None = None) -> None:
        """Ask `peer` (every peer: None) no more."""
        for name in [peer] if peer is not None else list(self.asked):
            self.asked.pop(name, None)
            self.parts.pop(name, None)

    def next_deadline(self) -> float | None:
        times = [asked + HANDOVER_TIMEOUT for asked in self.asked.values() if asked is not None]
        return min(times, default=None)
