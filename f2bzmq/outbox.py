"""The monitor's durable outbox: events wait on disk until every publisher ACKed them.

The log position is stored in the same SQLite transaction as the events made from
the lines before it, so a monitor killed at any point neither loses a line nor
reports one twice.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable, Sequence

from .protocol import BanEvent
from .runtime import private_database

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL, target TEXT NOT NULL, body BLOB NOT NULL,
    UNIQUE (id, target));
CREATE INDEX IF NOT EXISTS outbox_target ON outbox (target, seq);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class Outbox:
    """Events not yet ACKed, one row per (event, publisher), in the order they were made."""

    def __init__(self, path: str | os.PathLike, targets: Sequence[str]):
        self.targets = list(targets)  # publisher endpoints every event must reach
        private_database(path)
        self.db = sqlite3.connect(os.fspath(path), isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        # NORMAL, not FULL: no fsync per commit. The log position is stored in the same
        # transaction as the events read before it, so a power cut can only take both
        # back together, and the monitor then reads those lines again; an outbox can't
        # be more durable than fail2ban's own log, which is not fsynced either. The fsync
        # was a third of the monitor's share of a ban's way to the other nodes.
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_SCHEMA)
        # A publisher removed from the configuration will never ACK: forget its rows.
        marks = ",".join("?" * len(self.targets))
        with self.db:
            self.db.execute(f"DELETE FROM outbox WHERE target NOT IN ({marks})", self.targets)

    def add(self, events: Iterable[BanEvent], position: str | None = None) -> None:
        """Store new events (and the log position after them) in one transaction."""
        rows = [(e.id, t, e.encode()) for e in events for t in self.targets]
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany(
                "INSERT OR IGNORE INTO outbox (id, target, body) VALUES (?, ?, ?)", rows
            )
            if position is not None:
                self.db.execute("INSERT OR REPLACE INTO meta VALUES ('position', ?)", (position,))

    def trim(self, limit: int) -> int:
        """Keep at most `limit` events: drop the oldest unbans first, then the oldest bans.

        An unban lost costs little (the hub lifts the ban when its time is up); a ban
        lost leaves an attacker free elsewhere. Returns how many events were dropped.
        """
        excess = self.depth() - limit
        if excess <= 0:
            return 0
        dropped = 0
        with self.db:
            self.db.execute("BEGIN")
            for action in (b'"action":"unban"', b'"action":"ban"'):
                if dropped >= excess:
                    break
                ids = [
                    row[0]
                    for row in self.db.execute(
                        "SELECT id FROM outbox WHERE instr(body, ?) > 0 "
                        "GROUP BY id ORDER BY MIN(seq) LIMIT ?",
                        (action, excess - dropped),
                    )
                ]
                self.db.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in ids])
                dropped += len(ids)
        return dropped

    def pending(self, target: str, limit: int, after: int = 0) -> list[tuple[int, str, bytes]]:
        """Up to `limit` (row, event id, body) waiting for `target`, oldest first, past `after`."""
        return self.db.execute(
            "SELECT seq, id, body FROM outbox WHERE target = ? AND seq > ? ORDER BY seq LIMIT ?",
            (target, after, limit),
        ).fetchall()

    def ack(self, target: str, event_ids: Iterable[str]) -> int:
        """The publisher at `target` has these events: forget them there, in one transaction
        (a commit each was most of the monitor's cost of a burst). Returns how many it had."""
        if isinstance(event_ids, str):
            raise TypeError("Outbox.ack takes a list of event ids, not one id")
        with self.db:
            self.db.execute("BEGIN")
            before = self.db.total_changes
            self.db.executemany(
                "DELETE FROM outbox WHERE id = ? AND target = ?",
                [(event_id, target) for event_id in event_ids],
            )
            return self.db.total_changes - before

    def depth(self, target: str | None = None) -> int:
        if target is None:
            return self.db.execute("SELECT COUNT(DISTINCT id) FROM outbox").fetchone()[0]
        query = "SELECT COUNT(*) FROM outbox WHERE target = ?"
        return self.db.execute(query, (target,)).fetchone()[0]

    def position(self) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = 'position'").fetchone()
        return None if row is None else row[0]

    def close(self) -> None:
        self.db.close()
