"""Operators' decisions reach every hub: each hub reads its peers' logs of decisions.

An operator's decision is taken by one hub and logged there, each log row numbered. Every
hub asks every other hub of `[general] hubs` for the rows past the last one it has of that
hub's state, about once a second, and applies them as its own (a decision it has already
is skipped, so one taken here, or read through a third hub, comes back harmlessly). A hub
that lost its state asks from row 0, and so does every peer of a hub whose state is new:
nothing an operator decided is lost while one hub holds it. `Replication` says whom to ask
for what and what an answer means; the shell owns the sockets and the store.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .protocol import Decision, ProtocolError

PULL_INTERVAL = 1.0  # seconds between two asks of a peer whose log had nothing new
PULL_TIMEOUT = 10.0  # seconds an ask may go unanswered before it is made again afresh
PULL_ROWS = 500  # decisions per answer; a peer with more says so and is asked again at once


@dataclass
class Cursor:
    """Where this hub stands in one peer's log: the peer's state and the last row taken."""

    state: str | None = None
    row: int = 0

    def to_text(self) -> str:
        return f"{self.state or '-'} {self.row}"

    @classmethod
    def from_text(cls, text: str | None) -> Cursor:
        try:
            state, row = (text or "").split()
            return cls(None if state == "-" else state, int(row))
        except ValueError:
            return cls()


@dataclass(frozen=True)
class Pulled:
    """A peer's answer: its decisions to apply, and the cursor to store with them."""

    peer: str
    decisions: list[Decision]
    cursor: Cursor


class Replication:
    """The peers' logs as this hub reads them."""

    def __init__(self, peers: Iterable[str], state: str, cursors: dict[str, Cursor]) -> None:
        self.state = state  # our own state id: a peer answering with it is ourselves
        self.cursors = {peer: cursors.get(peer, Cursor()) for peer in peers}
        self.asked: dict[str, float] = {}  # peer -> when the ask in flight was sent
        self.next_ask: dict[str, float] = {peer: 0.0 for peer in self.cursors}

    def to_ask(self, now: float) -> list[tuple[str, int, bool]]:
        """(peer, row to read past, whether to ask on a fresh socket) of each peer due now."""
        due = []
        for peer, cursor in self.cursors.items():
            asked = self.asked.get(peer)
            if asked is not None and now - asked <= PULL_TIMEOUT:
                continue
            if asked is None and now < self.next_ask[peer]:
                continue
            due.append((peer, cursor.row, asked is not None))
            self.asked[peer] = now
        return due

    def on_answer(self, peer: str, result: dict, now: float) -> Pulled | None:
        """A peer's answer; None when there is nothing to store (ourselves, a new state)."""
        if peer not in self.cursors or self.asked.pop(peer, None) is None:
            return None
        state = result.get("state")
        if state == self.state:  # our own address among the hubs
            del self.cursors[peer]
            del self.next_ask[peer]
            return None
        cursor = self.cursors[peer]
        if not isinstance(state, str) or "error" in result:
            self.next_ask[peer] = now + PULL_TIMEOUT  # an older hub, or one that refuses
            return None
        if state != cursor.state:
            # A peer met for the first time, or one that lost its state: its whole log.
            self.cursors[peer] = Cursor(state, 0)
            self.next_ask[peer] = now
            return Pulled(peer, [], self.cursors[peer])
        try:
            rows = [(int(row), Decision.from_object(body)) for row, body in result["decisions"]]
            last = max([cursor.row, *(row for row, _ in rows)])
        except (KeyError, TypeError, ValueError, ProtocolError):
            self.next_ask[peer] = now + PULL_TIMEOUT
            return None
        self.cursors[peer] = Cursor(state, last)
        self.next_ask[peer] = now if result.get("more") else now + PULL_INTERVAL
        return Pulled(peer, [decision for _, decision in rows], self.cursors[peer])

    def next_deadline(self) -> float | None:
        times = [asked + PULL_TIMEOUT for asked in self.asked.values()]
        times += [when for peer, when in self.next_ask.items() if peer not in self.asked]
        return min(times, default=None)


def log_answer(state: str, rows: list[tuple[int, Decision]], more: bool) -> dict:
    """The answer to `decisions`: rows of the log past the asked one, and whether more wait."""
    return {
        "state": state,
        "decisions": [[row, decision.to_object()] for row, decision in rows],
        "more": more,
    }
