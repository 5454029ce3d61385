"""Where this node stands in one hub's update stream: the zguide Clone client's rules.

Nothing here touches a socket, a clock or a log. `HubSync` takes what one hub sends
(updates, heartbeats, snapshot parts) and the passing of time, each with `now`, and
returns an `Outcome`: what the shell must do (ask for a snapshot, reconnect), the
updates now in the hub's view, and notices for the shell to log.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Union

from . import protocol
from .protocol import BanEvent, SnapshotPart

SNAPSHOT_TIMEOUT = 10.0  # seconds a whole snapshot may take before it is asked for again


@dataclass
class ClusterView:
    """What one hub says the cluster bans: (jail, address) -> the ban event."""

    bans: dict[tuple[str, str], BanEvent] = field(default_factory=dict)
    jails_of: dict[str, set[str]] = field(default_factory=dict)  # address -> jails banning it

    def apply(self, event: BanEvent) -> None:
        key = (event.jail, event.ip)
        if event.action == protocol.BAN:
            if key not in self.bans:
                self.bans[key] = event
                self.jails_of.setdefault(event.ip, set()).add(event.jail)
        elif self.bans.pop(key, None) is not None:
            jails = self.jails_of[event.ip]
            jails.discard(event.jail)
            if not jails:
                del self.jails_of[event.ip]


# Notices: what happened, for the shell to log.


@dataclass(frozen=True)
class NewState:
    """The hub names a state other than the one this node follows: it lost or replaced
    its table, so the sequence numbers start over."""

    state_id: str


@dataclass(frozen=True)
class Young:
    """The hub's state is new and still being rebuilt: the `held` bans of its state before
    stay in the view until it is rebuilt or their time is up."""

    state_id: str
    held: int


@dataclass(frozen=True)
class Rebuilt:
    """The young state is rebuilt: a fresh snapshot replaces the view and what it held."""

    state_id: str


@dataclass(frozen=True)
class Gap:
    """Updates `first` to `last` never came."""

    first: int
    last: int


@dataclass(frozen=True)
class OutOfStep:
    """A heartbeat says the hub's last sequence is `hub_at`; this node is at `at`."""

    at: int
    hub_at: int


@dataclass(frozen=True)
class SnapshotTaken:
    """The view is the hub's table now: `bans` of them at `sequence`, replays included."""

    bans: int
    sequence: int


@dataclass(frozen=True)
class SnapshotLate:
    """The snapshot asked for did not come whole within SNAPSHOT_TIMEOUT."""


@dataclass(frozen=True)
class PartMissing:
    """Part `came` of the snapshot came where part `expected` should have: that one never
    came (the shell refused it), so the answer is given up and asked for again."""

    expected: int
    came: int


@dataclass(frozen=True)
class Silent:
    """Nothing from the hub for `seconds`. `stream_never_came`: its snapshots did, its
    update stream never did (a hub older than the packed stream, or its port blocked)."""

    seconds: float
    stream_never_came: bool


Notice = Union[
    NewState, Young, Rebuilt, Gap, OutOfStep, SnapshotTaken, SnapshotLate, PartMissing, Silent
]


@dataclass
class Outcome:
    """What one input changed and what the shell must do about it. Only on_tick asks for
    fresh sockets: while the shell reads a socket's messages, it stays."""

    # Updates now in the view, in order, with their sequence numbers.
    applied: list[tuple[int, BanEvent]] = field(default_factory=list)
    # Held bans whose time is up, out of the view: reconcile their addresses.
    dropped: list[BanEvent] = field(default_factory=list)
    # A snapshot replaced the view: compare every ban now.
    replaced: bool = False
    # The view no longer counts until the next snapshot: compare every ban.
    left_out: bool = False
    # A fresh SUB: libzmq drops a connection for good after an oversized frame.
    reconnect_updates: bool = False
    ask_snapshot: bool = False
    # Before asking, a fresh DEALER: parts of the answer given up must not mix in.
    renew_snapshot_socket: bool = False
    notices: list[Notice] = field(default_factory=list)


class HubSync:
    """One hub's update stream as this node follows it: the hub's view, its state id and
    sequence, and the snapshot under way. A gap, a new state id or the hub's silence
    asks for a snapshot; updates that come meanwhile wait and are replayed after it.

    A hub never speaks for a state it lost: when it names a new state that is young (not
    yet rebuilt by the nodes and its peers), the view keeps the bans it had (`held`) and
    adds the young state's, until that state is rebuilt (then a fresh snapshot replaces
    the view) or a held ban's time is up."""

    def __init__(self, heartbeat_timeout: float, now: float) -> None:
        self.heartbeat_timeout = heartbeat_timeout
        self.view = ClusterView()
        self.state_id: str | None = None  # the hub state the view belongs to
        self.sequence = 0  # last sequence applied
        self.synced = False  # a snapshot has been applied since the last loss of contact
        self.heard = now  # the hub's last message on the stream, or its last snapshot
        self.streamed = False  # heard anything on the update stream, ever
        self.snapshot_asked: float | None = None  # when the snapshot under way was asked
        self.snapshot_parts: list[BanEvent] = []  # of the parts taken, in order
        self.parts_taken = 0  # the next part must bear this number
        # Updates that came during a snapshot: (hub state id, sequence, event).
        self.buffered: list[tuple[str, int, BanEvent]] = []
        self.snapshots_received = 0
        self.last_snapshot: float | None = None  # `now` of the last whole snapshot
        self.young = False  # the state followed is young
        # Bans of the state before a young one that the young one has not confirmed yet.
        self.held: dict[tuple[str, str], BanEvent] = {}

    def start(self, now: float) -> Outcome:
        """Nothing is known of the hub yet: ask for its table."""
        outcome = Outcome()
        self._ask(outcome, now)
        return outcome

    def on_heartbeat(
        self, state_id: str, sequence: int, now: float, young: bool = False
    ) -> Outcome:
        """A heartbeat names the hub's state and its last sequence: both must match ours."""
        outcome = Outcome()
        self._hear(now)
        if self.snapshot_asked is not None:
            return outcome
        if state_id != self.state_id:
            outcome.notices.append(NewState(state_id))
            self._ask(outcome, now)
        elif self.young and not young:
            self._rebuilt(outcome, now)
        elif sequence != self.sequence:
            outcome.notices.append(OutOfStep(self.sequence, sequence))
            self._ask(outcome, now)
        return outcome

    def on_update(
        self,
        state_id: str,
        sequence: int,
        events: Sequence[BanEvent],
        now: float,
        young: bool = False,
    ) -> Outcome:
        """Events numbered from `sequence` on: applied in order, or kept while resyncing."""
        outcome = Outcome()
        self._hear(now)
        if self.snapshot_asked is None and state_id == self.state_id and self.young and not young:
            self._rebuilt(outcome, now)
        for offset, event in enumerate(events):
            self._take(outcome, state_id, sequence + offset, event, now)
        return outcome

    def _take(
        self, outcome: Outcome, state_id: str, sequence: int, event: BanEvent, now: float
    ) -> None:
        if self.snapshot_asked is not None:
            self.buffered.append((state_id, sequence, event))
            return
        if state_id != self.state_id:
            outcome.notices.append(NewState(state_id))
            self._ask(outcome, now)
            self.buffered.append((state_id, sequence, event))
            return
        if sequence <= self.sequence:
            return  # had it already
        if sequence != self.sequence + 1:
            outcome.notices.append(Gap(self.sequence + 1, sequence - 1))
            self._ask(outcome, now)
            self.buffered.append((state_id, sequence, event))
            return
        self.sequence = sequence
        self.view.apply(event)
        self.held.pop((event.jail, event.ip), None)  # the young state says it now
        outcome.applied.append((sequence, event))

    def _rebuilt(self, outcome: Outcome, now: float) -> None:
        """The young state followed is rebuilt: ask for the table it has now."""
        outcome.notices.append(Rebuilt(self.state_id or ""))
        self._ask(outcome, now)

    def expire_held(self, clock: float) -> Outcome:
        """Held bans whose time is up at unix time `clock` leave the view."""
        outcome = Outcome()
        for key, event in list(self.held.items()):
            if event.bantime is None or event.bantime == protocol.PERMANENT:
                continue  # kept until the state is rebuilt: when it ends is the hub's to say
            if event.time + event.bantime <= clock:
                del self.held[key]
                lifted = dataclasses.replace(event, action=protocol.UNBAN, bantime=None, wire=None)
                self.view.apply(lifted)
                outcome.dropped.append(lifted)
        return outcome

    def on_snapshot_part(self, part: SnapshotPart, now: float) -> Outcome:
        """Gather the parts, in order; the last one replaces the view with the hub's table.

        Every part must come: a table without one of them would read as "the cluster
        lifted those bans". A part the shell refused is malformed (the shell decodes with
        the widest network limits any hub may have, and the node's own rules refuse single
        bans later, in jails.LocalPolicy), so the answer is given up and asked for again.
        """
        outcome = Outcome()
        if self.snapshot_asked is None:
            return outcome  # an answer nobody waits for
        if part.number != self.parts_taken:
            outcome.notices.append(PartMissing(self.parts_taken, part.number))
            self._ask(outcome, now)
            return outcome
        self.parts_taken += 1
        self.snapshot_parts.extend(part.events)
        if part.last:
            self._finish_snapshot(outcome, part.publisher, part.seq, now, part.young)
        return outcome

    def _finish_snapshot(
        self, outcome: Outcome, state_id: str, sequence: int, now: float, young: bool = False
    ) -> None:
        """Replace the view with the snapshot, then replay the updates that came after it.
        A young state's snapshot keeps what the view held besides."""
        moved = state_id != self.state_id  # to a new state, from the one the view is of
        if not young:
            self.held = {}
        elif moved:
            self.held = {**self.held, **self.view.bans}
        self.view = ClusterView()
        for event in self.snapshot_parts:
            self.view.apply(event)
        for key in [key for key in self.held if key in self.view.bans]:
            del self.held[key]
        for event in self.held.values():
            self.view.apply(event)
        if young and moved and self.held:
            outcome.notices.append(Young(state_id, len(self.held)))
        self.young = young
        self.state_id = state_id
        self.sequence = sequence
        for buffered_state, number, event in sorted(self.buffered, key=lambda item: item[1]):
            if buffered_state == self.state_id and number == self.sequence + 1:
                self.view.apply(event)
                self.held.pop((event.jail, event.ip), None)
                self.sequence = number
        self.buffered = []
        self.snapshot_parts = []
        self.parts_taken = 0
        self.snapshot_asked = None
        self.synced = True
        self.heard = now
        self.snapshots_received += 1
        self.last_snapshot = now
        outcome.replaced = True
        outcome.notices.append(SnapshotTaken(len(self.view.bans), self.sequence))

    def on_tick(self, now: float) -> Outcome:
        """Silence past the heartbeat timeout, or a snapshot that never came: ask again."""
        outcome = Outcome()
        if self.snapshot_asked is not None:
            if now - self.snapshot_asked > SNAPSHOT_TIMEOUT:
                outcome.notices.append(SnapshotLate())
                self._ask(outcome, now)
            return outcome
        if now - self.heard > self.heartbeat_timeout:
            never_came = self.snapshots_received > 0 and not self.streamed
            outcome.notices.append(Silent(now - self.heard, never_came))
            # Its view may be stale: the other hubs decide until it sends a snapshot.
            self.synced = False
            outcome.left_out = True
            outcome.reconnect_updates = True
            self._ask(outcome, now)
        return outcome

    def refresh(self, now: float) -> Outcome:
        """Ask for the table again though nothing is amiss (the shell does so now and then
        of a hub whose snapshots did not say it takes presences: one upgraded in place,
        and back within the heartbeat timeout, gave no other cause to ask). Not before a
        snapshot was taken, nor while one is under way."""
        outcome = Outcome()
        if self.synced and self.snapshot_asked is None:
            self._ask(outcome, now)
        return outcome

    def _hear(self, now: float) -> None:
        self.heard = now
        self.streamed = True

    def _ask(self, outcome: Outcome, now: float) -> None:
        """Ask for the whole table; an answer asked for before is given up."""
        outcome.ask_snapshot = True
        outcome.renew_snapshot_socket = self.snapshot_asked is not None
        self.snapshot_parts = []
        self.parts_taken = 0
        self.snapshot_asked = now
