"""What a hub or a monitor has committed to its SQLite file, read without ever writing."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from f2bzmq.lab import Hub, Node


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[sqlite3.Connection]:
    """A read-only look at a daemon's SQLite file; the daemon may be writing meanwhile."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        yield db
    finally:
        db.close()


def hub_bans(hub: Hub) -> list[tuple[str, str, str]]:
    """(jail, ip, origin node) of every active ban the hub has committed to its state."""
    with read_only(hub.directory / "state" / "publisher.sqlite3") as db:
        return db.execute("SELECT jail, ip, node FROM bans").fetchall()


def hub_sequence(hub: Hub) -> int:
    """The hub's committed sequence number: how many changes it has broadcast."""
    with read_only(hub.directory / "state" / "publisher.sqlite3") as db:
        row = db.execute("SELECT value FROM meta WHERE key = 'sequence'").fetchone()
    return 0 if row is None else int(row[0])


def outbox_depth(node: Node) -> int:
    """Rows waiting in the monitor's outbox, one per event and hub not yet ACKed."""
    with read_only(node.directory / "state" / "monitor.sqlite3") as db:
        return db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
