"""The monitor's durable outbox: events wait on disk until every publisher ACKed them.

The log position is stored in the same SQLite transaction as the events made from
the lines before it, so a monitor killed at any point neither loses a line nor
reports one twice.

Events wait in two lanes. FRESH holds what the log said, in order. REREPORT holds
bans the node holds, reported again (after a log rotation, or to a hub that lost its
state): at most one row per ban and hub, sent only when the fresh lane leaves room, and
dropped when a fresh event about the same address comes, so a stale re-report can't
bring back a ban the node has lifted since.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence

from .delivery import FRESH, REREPORT
from .protocol import BanEvent, FailureReport
from .runtime import bound_wal, empty_wal, private_database, rollback

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL, target TEXT NOT NULL, body BLOB NOT NULL,
    UNIQUE (id, target));
CREATE INDEX IF NOT EXISTS outbox_target ON outbox (target, seq);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
# Added to an outbox made before the lanes: the lane, and for a re-report its "jail ip".
_LANES = """
ALTER TABLE outbox ADD COLUMN lane INTEGER NOT NULL DEFAULT 0;
ALTER TABLE outbox ADD COLUMN subject TEXT;
"""
_LANE_INDEXES = """
CREATE INDEX IF NOT EXISTS outbox_lane ON outbox (target, lane, seq);
CREATE INDEX IF NOT EXISTS outbox_subject ON outbox (subject) WHERE subject IS NOT NULL;
"""


# Free pages (4 kB each: 1 MiB) past which an outbox that has sent everything is compacted.
SHRINK_PAGES = 256


def subject(event: BanEvent) -> str:
    return f"{event.jail} {event.ip}"


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
        bound_wal(self.db)
        self.db.executescript(_SCHEMA)
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(outbox)")}
        if "lane" not in columns:
            self.db.executescript(_LANES)
        self.db.executescript(_LANE_INDEXES)
        self.failure: str | None = None  # why the last write failed (a full disk), until one works
        self.written = False  # since the last tidy()
        # A publisher removed from the configuration will never ACK: forget its rows.
        marks = ",".join("?" * len(self.targets))
        if self.db.execute(
            f"SELECT 1 FROM outbox WHERE target NOT IN ({marks}) LIMIT 1", self.targets
        ).fetchone():
            with self._writing():
                self.db.execute(f"DELETE FROM outbox WHERE target NOT IN ({marks})", self.targets)

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """One transaction, all or nothing; sqlite3.Error (say, the disk is full) leaves the
        outbox as it was, and `failure` says why until a write succeeds."""
        try:
            with self.db:
                self.db.execute("BEGIN")
                yield
        except sqlite3.Error as error:
            self.failure = str(error)
            rollback(self.db)
            raise
        self.failure = None
        self.written = True

    def tidy(self) -> None:
        """Once every event is out, give back the write-ahead log's space, and the file's
        own once a backlog has come and gone (a hub away for hours: SQLite keeps the
        pages its rows held for reuse, megabytes for good unless compacted)."""
        if self.written and not self.depth():
            empty_wal(self.db)
            self.written = False
            if self.db.execute("PRAGMA freelist_count").fetchone()[0] > SHRINK_PAGES:
                try:
                    self.db.execute("VACUUM")
                except sqlite3.Error:  # no room for the copy: after the next backlog
                    rollback(self.db)
                empty_wal(self.db)

    def add(self, events: Sequence[BanEvent | FailureReport], position: str | None = None) -> None:
        """Store new events and failure reports (and the log position after them) in one
        transaction, in the fresh lane; a re-report about the same address waiting for a hub
        is stale now."""
        rows = [(e.id, t, e.encode()) for e in events for t in self.targets]
        stale = [(subject(e),) for e in events if isinstance(e, BanEvent)]
        with self._writing():
            if stale:
                self.db.executemany("DELETE FROM outbox WHERE subject = ?", stale)
            self.db.executemany(
                "INSERT OR IGNORE INTO outbox (id, target, body) VALUES (?, ?, ?)", rows
            )
            if position is not None:
                self.db.execute("INSERT OR REPLACE INTO meta VALUES ('position', ?)", (position,))

    def add_rereports(
        self, bans: Sequence[BanEvent], targets: Sequence[str], states: Mapping[str, str] = {}
    ) -> None:
        """Bans the node holds, for `targets` again, in the re-report lane (each replacing
        one of the same address still waiting there), and with them the hub states they
        are for (see hub_state), in one transaction."""
        rows = [(e.id, t, e.encode(), subject(e)) for e in bans for t in targets]
        with self._writing():
            self.db.executemany(
                "DELETE FROM outbox WHERE subject = ? AND target = ?",
                [(subject, target) for _, target, _, subject in rows],
            )
            self.db.executemany(
                "INSERT OR IGNORE INTO outbox (id, target, body, lane, subject) "
                f"VALUES (?, ?, ?, {REREPORT}, ?)",
                rows,
            )
            for target, state in states.items():
                self.db.execute(
                    "INSERT OR REPLACE INTO meta VALUES (?, ?)", (f"state {target}", state)
                )

    def hub_state(self, target: str) -> str | None:
        """The state of the hub at `target` this node last reported its bans to (or first
        met): a hub naming another one lost its table."""
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (f"state {target}",))
        found = row.fetchone()
        return None if found is None else found[0]

    def trim(self, limit: int) -> int:
        """Keep at most `limit` events: drop re-reports first (fail2ban can tell them again),
        then the oldest failure reports, then the oldest unbans, then the oldest bans.

        Failures only matter within a cluster jail's findtime, which a backlog this deep has
        outlasted; an unban lost costs little (the hub lifts the ban when its time is up); a
        ban lost leaves an attacker free elsewhere. Returns how many events were dropped.
        """
        excess = self.depth() - limit
        if excess <= 0:
            return 0
        dropped = 0
        with self._writing():
            for lane, action in (
                (REREPORT, b""),
                (FRESH, b'"failures":'),
                (FRESH, b'"action":"unban"'),
                (FRESH, b""),
            ):
                if dropped >= excess:
                    break
                ids = [
                    row[0]
                    for row in self.db.execute(
                        "SELECT id FROM outbox WHERE lane = ? AND instr(body, ?) > 0 "
                        "GROUP BY id ORDER BY MIN(seq) LIMIT ?",
                        (lane, action, excess - dropped),
                    )
                ]
                self.db.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in ids])
                dropped += len(ids)
        return dropped

    def pending(
        self, target: str, limit: int, after: int = 0, lane: int = FRESH
    ) -> list[tuple[int, str, bytes]]:
        """Up to `limit` (row, event id, body) of a lane waiting for `target`, oldest first,
        past row `after`."""
        return self.db.execute(
            "SELECT seq, id, body FROM outbox WHERE target = ? AND lane = ? AND seq > ? "
            "ORDER BY seq LIMIT ?",
            (target, lane, after, limit),
        ).fetchall()

    def ack(self, target: str, event_ids: Iterable[str]) -> int:
        """The publisher at `target` has these events: forget them there, in one transaction
        (a commit each was most of the monitor's cost of a burst). Returns how many it had."""
        if isinstance(event_ids, str):
            raise TypeError("Outbox.ack takes a list of event ids, not one id")
        with self._writing():
            before = self.db.total_changes
            self.db.executemany(
                "DELETE FROM outbox WHERE id = ? AND target = ?",
                [(event_id, target) for event_id in event_ids],
            )
            return self.db.total_changes - before

    def depth(self, target: str | None = None, lane: int | None = None) -> int:
        if target is None:
            return self.db.execute("SELECT COUNT(DISTINCT id) FROM outbox").fetchone()[0]
        if lane is None:
            query = "SELECT COUNT(*) FROM outbox WHERE target = ?"
            return self.db.execute(query, (target,)).fetchone()[0]
        query = "SELECT COUNT(*) FROM outbox WHERE target = ? AND lane = ?"
        return self.db.execute(query, (target, lane)).fetchone()[0]

    def position(self) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = 'position'").fetchone()
        return None if row is None else row[0]

    def close(self) -> None:
        self.db.close()
