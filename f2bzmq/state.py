"""The cluster's ban table: which addresses are banned in which jail, by whom, until when.

`BanTable` is pure (events in, broadcasts out) so the publisher's rules are tested
without sockets; `StateStore` keeps it in SQLite so a publisher killed at any
moment loses nothing it has ACKed.
"""

from __future__ import annotations

import heapq
import itertools
import os
import sqlite3
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum

from .protocol import ANY_NETWORK, BAN, CLUSTER, UNBAN, BanEvent, Decision, is_operator_origin
from .runtime import bound_wal, empty_wal, private_database, rollback

# Event ids the table remembers, to know a resent event: a monitor resends only what a hub
# has not ACKed, at most its in_flight events and within seconds (or once the hub is back),
# so the latest 50,000 (about 7 MB) are plenty, and a flooding node can't make the hub keep
# a day of its ids. Past it, the oldest tenth is forgotten at once: one DELETE per batch.
MAX_SEEN = 50_000


class Outcome(str, Enum):
    """What applying one reported event did to the table."""

    BANNED = "banned"  # new in the cluster: broadcast
    UNBANNED = "unbanned"  # the last origin lifted it: broadcast
    EXTENDED = "extended"  # already banned; this origin's ban was recorded, nothing to broadcast
    REDUNDANT = "redundant"  # changes nothing (unban of what isn't banned by that node)
    EXPIRED = "expired"  # a ban whose time was already up when it arrived
    DUPLICATE = "duplicate"  # the same event id was seen before


@dataclass(frozen=True)
class Update:
    """One broadcast change with its sequence number."""

    seq: int
    event: BanEvent
    # What the hub's log says of it instead of the event's own words; "" for nothing.
    note: str | None = field(default=None, compare=False)


@dataclass
class ActiveBan:
    """One (jail, address) the cluster bans, and each origin node's expiry (None = permanent)."""

    event: BanEvent  # the ban that started it: what snapshots hand out
    origins: dict[str, float | None] = field(default_factory=dict)
    seq: int = 0  # the update that broadcast it (0: before the hub's last start)


class BanTable:
    """Active bans, the broadcast sequence number and the ids of the events that changed them."""

    def __init__(
        self,
        publisher: str,
        default_bantime: int,
        dedupe_window: float = 86400.0,
        max_seen: int = MAX_SEEN,
    ):
        self.publisher = publisher  # node name used for the unbans the table itself decides
        self.default_bantime = default_bantime
        self.dedupe_window = dedupe_window
        self.instance = uuid.uuid4().hex  # changes when the state is lost: subscribers resync
        self.sequence = 0
        self.bans: dict[tuple[str, str], ActiveBan] = {}
        self.seen: dict[str, float] = {}  # event id -> when, oldest first
        self.max_seen = max_seen
        self.journal: list[tuple] = []  # changes not yet persisted, in order
        self.expiries: list[tuple[float, str, str, str]] = []  # heap; stale entries skipped
        self.next_forget = 0.0  # when to prune `seen` next
        self.allow_foreign_unban = False  # may a node lift a ban it did not report?

    def changes(self, event: BanEvent, now: float) -> bool:
        """Whether apply() would change anything but the ids seen: what a sender's rate limit
        pays for. A ban reported again (after a rotation, to a hub that rebuilds its table)
        that the table holds with the same expiry costs nothing."""
        if event.id in self.seen:
            return False
        active = self.bans.get((event.jail, event.ip))
        if event.action == BAN:
            expiry = event.expiry(self.default_bantime)
            if expiry is not None and expiry <= now:
                return False
            if active is None or event.node not in active.origins:
                return True
            return _later(expiry, active.origins[event.node])
        if active is None:
            return False
        return event.node in active.origins or self.allow_foreign_unban

    def apply(
        self, event: BanEvent, now: float, protected: frozenset[str] = frozenset()
    ) -> tuple[Outcome, Update | None]:
        """Record a validated event from a node; return what it did and what to broadcast.
        A foreign unban (allow_foreign_unban) never lifts the ban of a `protected` origin.
        Only an event that changes the table is remembered: sent again, a no-op is a no-op
        again, and a node sending no-ops at full speed must not fill the memory and disk."""
        if event.id in self.seen:
            return Outcome.DUPLICATE, None
        key = (event.jail, event.ip)
        active = self.bans.get(key)
        if event.action == BAN:
            expiry = event.expiry(self.default_bantime)
            if expiry is not None and expiry <= now:
                return Outcome.EXPIRED, None
            if active is None:
                self._remember(event.id, now)
                active = self.bans[key] = ActiveBan(event)
                self._set_origin(key, event.node, expiry)
                self.journal.append(("origin", event, event.node, expiry))
                update = self._broadcast(event)
                active.seq = update.seq
                return Outcome.BANNED, update
            previous = active.origins.get(event.node, 0.0)
            if event.node not in active.origins or _later(expiry, previous):
                self._remember(event.id, now)
                self._set_origin(key, event.node, expiry)
                self.journal.append(("origin", active.event, event.node, expiry))
            return Outcome.EXTENDED, None
        if active is None:
            return Outcome.REDUNDANT, None
        if event.node in active.origins:
            self._remember(event.id, now)
            return self._lift(key, event.node, event)
        lifted = [
            node
            for node in active.origins
            if node not in protected and node != CLUSTER and not is_operator_origin(node)
        ]
        if not self.allow_foreign_unban or not lifted:
            return Outcome.REDUNDANT, None
        self._remember(event.id, now)
        for node in lifted[:-1]:
            self._lift(key, node, event)
        return self._lift(key, lifted[-1], event)

    def _remember(self, event_id: str, now: float) -> None:
        self.seen[event_id] = now
        self.journal.append(("seen", event_id, now))
        if len(self.seen) > self.max_seen:
            excess = len(self.seen) - self.max_seen + max(1, self.max_seen // 10)
            for oldest in list(itertools.islice(self.seen, excess)):
                del self.seen[oldest]
                self.journal.append(("forget", oldest))

    def lift(self, jail: str, ip: str, event: BanEvent) -> Update | None:
        """An operator's unban: every origin's ban of (jail, ip) ends at once; the unban
        `event` is broadcast (None: the cluster did not ban it)."""
        key = (jail, ip)
        active = self.bans.get(key)
        if active is None:
            return None
        for node in list(active.origins)[:-1]:
            self._lift(key, node, event)
        return self._lift(key, next(iter(active.origins)), event)[1]

    def take_decision(self, event: BanEvent, now: float, note: str) -> list[Update]:
        """A ban the cluster decided (origin CLUSTER, see detection.py), with the hub's log
        line for it. Where a node's ban holds the address, the cluster's joins it as an origin
        and takes its place in the stream and in snapshots, as an unban and a ban in one
        update, so that every node holds it, the banning node too (its subscriber skips its
        own node's bans) and subscribers of every release alike."""
        key = (event.jail, event.ip)
        active = self.bans.get(key)
        if active is None or active.event.node == CLUSTER or event.id in self.seen:
            _, update = self.apply(event, now)
            return [] if update is None else [Update(update.seq, update.event, note)]
        expiry = event.expiry(self.default_bantime)
        if expiry is not None and expiry <= now:
            return []
        self.seen[event.id] = now
        self.journal.append(("seen", event.id, now))
        active.event = event
        self._set_origin(key, CLUSTER, expiry)
        # Every origin's row names the ban that started it; the cluster's is the one loaded.
        self.journal.append(("origin", event, CLUSTER, expiry))
        unban = BanEvent.new(self.publisher, event.jail, UNBAN, event.ip, now, networks=ANY_NETWORK)
        unbanned, banned = self._broadcast(unban), self._broadcast(event)
        return [Update(unbanned.seq, unban, ""), Update(banned.seq, event, note)]

    def expire(self, now: float) -> list[Update]:
        """Drop origins whose ban time is up; broadcast an unban where none is left."""
        updates = []
        while self.expiries and self.expiries[0][0] <= now:
            ends, jail, ip, node = heapq.heappop(self.expiries)
            active = self.bans.get((jail, ip))
            if active is None or active.origins.get(node, 0.0) != ends:
                continue  # lifted or prolonged since: a stale heap entry
            unban = BanEvent.new(self.publisher, jail, UNBAN, ip, now, networks=ANY_NETWORK)
            _, update = self._lift((jail, ip), node, unban)
            if update is not None:
                updates.append(update)
        if self.seen and now >= self.next_forget:
            self.next_forget = now + 60
            for event_id, seen_at in list(self.seen.items()):
                if seen_at + self.dedupe_window <= now:
                    del self.seen[event_id]
                    self.journal.append(("forget", event_id))
        return updates

    def next_expiry(self) -> float | None:
        """The earliest time any origin's ban ends, for the publisher's timer."""
        while self.expiries:
            ends, jail, ip, node = self.expiries[0]
            active = self.bans.get((jail, ip))
            if active is not None and active.origins.get(node, 0.0) == ends:
                return ends
            heapq.heappop(self.expiries)
        return None

    def _set_origin(self, key: tuple[str, str], node: str, expiry: float | None) -> None:
        self.bans[key].origins[node] = expiry
        if expiry is not None:
            heapq.heappush(self.expiries, (expiry, key[0], key[1], node))

    def snapshot(self) -> tuple[int, list[BanEvent]]:
        """The sequence number and every active ban, for a (re)connecting subscriber."""
        return self.sequence, [active.event for active in self.bans.values()]

    def _lift(self, key: tuple[str, str], node: str, event: BanEvent):
        active = self.bans[key]
        del active.origins[node]
        self.journal.append(("drop", key[0], key[1], node))
        if active.origins:
            return Outcome.EXTENDED, None
        del self.bans[key]
        return Outcome.UNBANNED, self._broadcast(event)

    def _broadcast(self, event: BanEvent) -> Update:
        self.sequence += 1
        self.journal.append(("sequence", self.sequence))
        return Update(self.sequence, event)


def _later(expiry: float | None, previous: float | None) -> bool:
    if previous is None:
        return False
    return expiry is None or expiry > previous


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS bans (
    jail TEXT NOT NULL, ip TEXT NOT NULL, node TEXT NOT NULL,
    event TEXT NOT NULL, expiry REAL,
    PRIMARY KEY (jail, ip, node));
CREATE TABLE IF NOT EXISTS seen (id TEXT PRIMARY KEY, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS decisions (
    row INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, verb TEXT NOT NULL,
    jail TEXT, ip TEXT, until REAL, body TEXT NOT NULL);
"""
# Days a decision is kept once it no longer matters (a ban over, a hold ended): the audit
# log's reach. Allowlist and node decisions always matter: they are kept.
DECISION_RETENTION = 30 * 86400.0


_STATEMENTS = {  # journal entry -> the table it changes, and how
    "seen": ("seen", "INSERT OR REPLACE INTO seen VALUES (?, ?)"),
    "forget": ("seen", "DELETE FROM seen WHERE id = ?"),
    "origin": ("bans", "INSERT OR REPLACE INTO bans VALUES (?, ?, ?, ?, ?)"),
    "drop": ("bans", "DELETE FROM bans WHERE jail = ? AND ip = ? AND node = ?"),
    "decision": ("decisions", "INSERT OR IGNORE INTO decisions VALUES (NULL, ?, ?, ?, ?, ?, ?)"),
    # An operator's ban lifted before its time: it matters no longer.
    "ended": (
        "decisions",
        "UPDATE decisions SET until = ?3 WHERE verb = 'ban' AND jail = ?1 AND ip = ?2 "
        "AND (until IS NULL OR until > ?3)",
    ),
    "meta": ("meta", "INSERT OR REPLACE INTO meta VALUES (?, ?)"),
}


class StateStore:
    """SQLite home of a BanTable; `commit` writes the table's journal in one transaction."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        private_database(self.path)
        self.db = sqlite3.connect(self.path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        # FULL: an ACK is sent only after the commit reached the disk.
        self.db.execute("PRAGMA synchronous=FULL")
        bound_wal(self.db)
        self.db.executescript(_SCHEMA)
        self.created = False  # load() made a new state: the hub is young
        self.written = False  # since the last tidy()

    def load(self, publisher: str, default_bantime: int, dedupe_window: float) -> BanTable:
        table = BanTable(publisher, default_bantime, dedupe_window)
        meta = dict(self.db.execute("SELECT key, value FROM meta"))
        if "instance" in meta:
            table.instance = meta["instance"]
            table.sequence = int(meta.get("sequence", "0"))
        else:
            self.db.execute("INSERT INTO meta VALUES ('instance', ?)", (table.instance,))
            self.created = True
        rows = self.db.execute("SELECT jail, ip, node, event, expiry FROM bans ORDER BY rowid")
        for jail, ip, node, text, expiry in rows:
            active = table.bans.get((jail, ip))
            if active is None or node == CLUSTER:  # the cluster's ban stands for the others
                event = BanEvent.decode(text.encode(), ANY_NETWORK)
                if active is None:
                    active = table.bans[(jail, ip)] = ActiveBan(event)
                active.event = event
            table._set_origin((jail, ip), node, expiry)
        table.seen = dict(self.db.execute("SELECT id, at FROM seen ORDER BY at"))
        return table

    def young_until(self) -> float | None:
        """When the rebuild of a young state ends (unix time), or None: not young."""
        row = self.db.execute("SELECT value FROM meta WHERE key = 'young_until'").fetchone()
        return None if row is None else float(row[0])

    def set_young_until(self, until: float | None) -> None:
        """Keep a young state young across a restart of the hub, or say it is rebuilt."""
        if until is None:
            self.db.execute("DELETE FROM meta WHERE key = 'young_until'")
        else:
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('young_until', ?)", (repr(until),))

    def commit(self, table: BanTable, also: Callable[[], None] | None = None) -> bool:
        """Persist every change since the last commit, atomically; `also` writes other
        changes of the same batch (the cluster jails' counts) in the same transaction.
        False when there was nothing to write (and so nothing was tried)."""
        if not table.journal and also is None:
            return False
        try:
            with self.db:
                self.db.execute("BEGIN")
                self._write(table.journal)
                if also is not None:
                    also()
        except sqlite3.Error:
            rollback(self.db)  # a COMMIT that failed (a full disk) may leave it open
            raise
        table.journal.clear()
        self.written = True
        return True

    def probe(self, now: float) -> None:
        """Write one row of its own: raises sqlite3.Error while the store can't be written.
        (A row that changes: SQLite writes nothing for an update to the same value; the
        write-ahead log emptied first: the pages a failed batch left there would take it.)"""
        empty_wal(self.db)
        try:
            with self.db:
                self.db.execute("BEGIN")
                self.db.execute("INSERT OR REPLACE INTO meta VALUES ('probed', ?)", (repr(now),))
        except sqlite3.Error:
            rollback(self.db)
            raise
        self.written = True

    def tidy(self) -> None:
        """Give back the write-ahead log's space while the hub is idle."""
        if self.written:
            empty_wal(self.db)
            self.written = False

    def _write(self, journal: Iterable[tuple]) -> None:
        """The journal as few statements: changes to each table keep their order, runs of
        the same statement go in one executemany (the tables don't depend on each other,
        and the transaction makes the whole batch one change)."""
        runs: dict[str, list[tuple[str, list[tuple]]]] = {
            "seen": [],
            "bans": [],
            "decisions": [],
            "meta": [],
        }
        sequence = None  # only the last one of a batch needs writing
        for change in journal:
            what = change[0]
            if what == "sequence":
                sequence = change[1]
                continue
            if what == "origin":
                event, node, expiry = change[1:]
                row = (event.jail, event.ip, node, event.encode().decode(), expiry)
            elif what == "decision":
                decision = change[1]
                body = decision.encode().decode()
                until = decision.until()
                row = (decision.id, decision.verb, decision.jail, decision.ip, until, body)
            else:
                row = change[1:]
            table, statement = _STATEMENTS[what]
            if runs[table] and runs[table][-1][0] == statement:
                runs[table][-1][1].append(row)
            else:
                runs[table].append((statement, [row]))
        for statement, rows in runs["seen"] + runs["bans"] + runs["decisions"] + runs["meta"]:
            self.db.executemany(statement, rows)
        if sequence is not None:
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('sequence', ?)", (str(sequence),))

    def decisions(self, since: int = 0, limit: int | None = None) -> list[tuple[int, Decision]]:
        """The operators' decisions after log row `since`, in the order they were taken."""
        rows = self.db.execute(
            "SELECT row, body FROM decisions WHERE row > ? ORDER BY row LIMIT ?",
            (since, -1 if limit is None else limit),
        )
        return [(row, Decision.decode(body.encode())) for row, body in rows]

    def prune_decisions(self, now: float, retention: float = DECISION_RETENTION) -> int:
        """Forget the decisions that stopped mattering `retention` seconds ago."""
        with self.db:
            done = self.db.execute(
                "DELETE FROM decisions WHERE until IS NOT NULL AND until < ?", (now - retention,)
            )
        return done.rowcount

    def meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def close(self) -> None:
        self.db.close()
