"""A relay's copy of one hub's table: is it whole, and what may the relay hand out.

A relay follows one hub's update stream with `sync.HubSync`, as a subscriber does, and
answers its region's snapshot requests from that copy, so that a hub's restart costs the
hub one snapshot per relay instead of one per node. `Mirror` holds the rules:

- the copy is *whole* while the hub's stream is followed in order: a snapshot taken, no
  gap, no new state and no silence since (each of those asks the hub for a new snapshot),
  and the hub heard within half the heartbeat timeout: a node that asks because the hub
  went silent must not get the relay's stale word for it;
- a request is answered only from a whole copy; until then it waits, and a request that
  waited longer than a subscriber waits for its answer (`sync.SNAPSHOT_TIMEOUT`) is
  dropped: that subscriber has asked again on a new socket;
- an answer is the hub's table as the hub would give it: the hub's state id, sequence
  and young flag, and the hub's bans only (not those HubSync keeps of a state the hub
  lost, which are the subscriber's own to keep);
- it is encoded once per change of the copy, however many ask; its header says that the
  relay takes its subscribers' presence (for the hub's holds, `holds.RelayedHolds`).

Nothing here touches a socket or a clock: `now` comes in with every input.
"""

from __future__ import annotations

from collections.abc import Sequence

from . import protocol
from .protocol import BanEvent, SnapshotPart
from .sync import SNAPSHOT_TIMEOUT, HubSync, Outcome

# Requests waiting for the copy at most, one per asking socket: a node's subscriber has
# one per hub it follows. Past it, a request is dropped (its subscriber asks again).
MAX_WAITING = 100_000


class Mirror:
    """One hub's table as a relay holds it, and the snapshot requests waiting for it."""

    def __init__(self, heartbeat_timeout: float, now: float) -> None:
        self.sync = HubSync(heartbeat_timeout, now)  # the hub's stream, as a subscriber follows it
        self.waiting: dict[bytes, float] = {}  # asking socket -> when it asked
        self.served = 0  # snapshots handed out
        self.dropped = 0  # requests given up: waited too long, or too many waiting
        self.broken_since: float | None = now  # since when the copy is not whole, if it is not
        self._parts: list[list[bytes]] | None = None  # the answer, while the copy is unchanged

    def whole(self, now: float) -> bool:
        """The copy is the hub's table at its sequence, and the hub said so lately: it may
        be handed out."""
        sync = self.sync
        return (
            sync.synced
            and sync.snapshot_asked is None
            and sync.state_id is not None
            and now - sync.heard <= sync.heartbeat_timeout / 2
        )

    # The hub's stream: HubSync decides, the copy's answer is encoded again when it changed.

    def start(self, now: float) -> Outcome:
        return self._follow(self.sync.start(now), now)

    def on_heartbeat(
        self, state_id: str, sequence: int, now: float, young: bool = False
    ) -> Outcome:
        return self._follow(self.sync.on_heartbeat(state_id, sequence, now, young), now)

    def on_update(
        self,
        state_id: str,
        sequence: int,
        events: Sequence[BanEvent],
        now: float,
        young: bool = False,
    ) -> Outcome:
        return self._follow(self.sync.on_update(state_id, sequence, events, now, young), now)

    def on_snapshot_part(self, part: SnapshotPart, now: float) -> Outcome:
        return self._follow(self.sync.on_snapshot_part(part, now), now)

    def on_tick(self, now: float) -> Outcome:
        """Requests that waited too long go; the hub's silence is HubSync's to judge."""
        for peer, asked in list(self.waiting.items()):
            if now - asked > SNAPSHOT_TIMEOUT:
                del self.waiting[peer]
                self.dropped += 1
        return self._follow(self.sync.on_tick(now), now)

    def _follow(self, outcome: Outcome, now: float) -> Outcome:
        if outcome.applied or outcome.replaced or outcome.dropped:
            self._parts = None
        if self.whole(now):
            self.broken_since = None
        elif self.broken_since is None:
            self.broken_since = now
        return outcome

    # The region's requests.

    def on_request(self, peer: bytes, now: float) -> list[bytes]:
        """A node asks for the table: the peers to answer now (this one, if the copy is
        whole); otherwise it waits for `due`."""
        if self.whole(now):
            self.served += 1
            return [peer]
        if peer not in self.waiting and len(self.waiting) >= MAX_WAITING:
            self.dropped += 1
            return []
        self.waiting[peer] = now  # asked again on the same socket: the later one counts
        return []

    def due(self, now: float) -> list[bytes]:
        """The waiting peers to answer now that the copy is whole (none while it is not)."""
        if not self.waiting or not self.whole(now):
            return []
        peers = list(self.waiting)
        self.waiting.clear()
        self.served += len(peers)
        return peers

    def table(self) -> list[BanEvent]:
        """The hub's bans in the copy: without those HubSync holds of a state the hub lost."""
        held = self.sync.held
        return [event for key, event in self.sync.view.bans.items() if key not in held]

    def parts(self) -> list[list[bytes]]:
        """The snapshot parts of the copy, as the hub would send them; the same list until
        the copy changes."""
        if self._parts is None:
            sync = self.sync
            self._parts = list(
                protocol.encode_snapshot(
                    sync.state_id or "", sync.sequence, self.table(), sync.young, presence=True
                )
            )
        return self._parts
