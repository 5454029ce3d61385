"""The hub's cluster jails: failures counted across every node, the bans they decide, and
each address's ban history, which lengthens its next ban anywhere in the cluster.

`Detection` is pure: failure reports, the nodes' own bans and `now` go in, `Decision`s
come out (the publisher turns each into a ban event of origin `protocol.CLUSTER` and
commits it through the ban table like any other). fail2ban's rules, per cluster jail:
an address banned when `maxretry` failures fall within `findtime`, here counted over
every node and coming from at least `min_nodes` of them; failures found while the address
is banned, or before its ban, count for nothing; a ban forgets the failures before it; the
ban after `n` earlier ones (within `dbpurgeage`) lasts what `bantime.increment` says
(`escalation`), and a node's own ban that is shorter gets the cluster's longer one added.

Two hubs given the same reports decide the same bans: a decision's id and time come from
the cluster jail, the address, which ban of it this is and the failures' own times (from
the nodes' logs), never from a hub's clock or the order reports arrived in, and the random
part of `bantime.rndtime` comes from the id. `DetectionStore` keeps the failure reports
within `findtime` (replayed at start, so a restarted hub forgets no count: a report is
ACKed once stored, and its monitor keeps it no longer) and the ban history, in the hub's
database, in the same transaction as the ban table.
"""

from __future__ import annotations

import hashlib
import math
import sqlite3
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from .config import ClusterJail
from .escalation import Increment, shared_random
from .protocol import (
    ANY_NETWORK,
    BAN,
    CLUSTER,
    PERMANENT,
    BanEvent,
    FailureReport,
    ProtocolError,
    decode_object,
)

# Bounds for an attack from a large botnet: beyond them the oldest go first.
MAX_WATCHED = 100_000  # addresses with failures counted at once (about 300 bytes each)
MAX_HISTORY = 200_000  # (cluster jail, address) ban histories (about 200 bytes each)
# Failure reports kept (to replay at start, and to know one sent again): 50 nodes under an
# attack make 2,000 a second, of about 1 kB; findtime's worth would be gigabytes.
MAX_REPORTS = 100_000
SKEW = 5.0  # seconds a node's clock may run ahead of the hub's before its times are clamped


@dataclass(frozen=True)
class Decision:
    """A ban the cluster decides: a failure count that passed a cluster jail's threshold,
    or a node's ban that its ban history lengthens."""

    id: str
    jail: str  # the cluster jail
    ip: str
    time: float  # the ban's start: the last failure counted, or the node's ban
    bantime: int  # seconds, or PERMANENT
    number: int  # which ban of the address in the cluster this is: 1 for the first
    failures: Mapping[str, int] = field(default_factory=dict)  # node -> failures counted
    span: float = 0.0  # seconds from the first failure counted to the last
    escalates: str | None = None  # the node whose own ban this one lengthens

    def event(self) -> BanEvent:
        return BanEvent(self.id, CLUSTER, self.jail, BAN, self.ip, self.time, self.bantime)

    def describe(self) -> str:
        """fail2ban-style: '[sshd] Ban 192.0.2.7 (cluster: 7 failures from web1, web3, web4
        in 2m)', with the ban's number and time when it is not the first."""
        again = f"ban {self.number}, {duration(self.bantime)}"
        if self.escalates is not None:
            why = f"{again}, after {self.escalates}'s own"
        else:
            total = sum(self.failures.values())
            nodes = ", ".join(sorted(self.failures))
            why = f"{total} failures from {nodes} in {duration(self.span)}"
            if self.number > 1:
                why += f"; {again}"
        return f"[{self.jail}] Ban {self.ip} (cluster: {why})"


def duration(seconds: float) -> str:
    """A time as fail2ban's MyTime.seconds2str writes it: '45s', '2m', '1h 30m', '2d 7h 15m';
    'permanent' for -1."""
    if seconds == PERMANENT:
        return "permanent"
    s = int(seconds)
    if s >= 31536000:
        days = round(s / 86400)
        parts = [(days // 365, "y"), (days % 365 // 7, "w"), (days % 365 % 7, "d")]
    elif s >= 604800:
        hours = round(s / 3600)
        parts = [(hours // 168, "w"), (hours % 168 // 24, "d"), (hours % 24, "h")]
    elif s >= 86400:
        minutes = round(s / 60)
        parts = [(minutes // 1440, "d"), (minutes % 1440 // 60, "h"), (minutes % 60, "m")]
    elif s >= 3595:
        tens = round(s / 10)
        parts = [(tens // 360, "h"), (tens % 360 // 6, "m")]
    else:
        parts = [(s // 60, "m"), (s % 60, "s")]
    text = " ".join(f"{value}{unit}" for value, unit in parts if value)
    return text or "0s"


def decision_id(jail: str, ip: str, number: int, start: float) -> str:
    """The id of the `number`th ban of `ip` in cluster jail `jail`, starting at `start`: the
    same on every hub that decides it, so subscribers and peer hubs take it once."""
    text = f"{jail}\0{ip}\0{number}\0{int(start)}".encode()
    return hashlib.blake2b(text, digest_size=16, person=b"f2bzmq-decision").hexdigest()


@dataclass
class Episode:
    """The ban history of an address in a cluster jail: how many times it was banned, when
    the last ban started and when it ends (None: never)."""

    count: int
    last: float
    until: float | None

    def banned_at(self, moment: float) -> bool:
        return self.until is None or moment < self.until


class Tally:
    """The failures of one address within findtime, (last, count, first, node) in the order
    counted, and their sums. An attack counts a failure each, mostly of addresses seen once:
    made and added to cheaply."""

    __slots__ = ("entries", "total", "nodes", "newest", "oldest")

    def __init__(self, node: str, last: float, count: int, first: float) -> None:
        self.entries = [(last, count, first, node)]
        self.total = count
        self.nodes = {node: count}  # failures counted per node
        self.newest = self.oldest = last

    def add(self, node: str, last: float, count: int, first: float) -> None:
        before = self.entries[-1]
        if before[3] == node and before[0] == last:  # the same node, the same second
            self.entries[-1] = (last, before[1] + count, min(first, before[2]), node)
        else:
            self.entries.append((last, count, first, node))
        self.total += count
        self.nodes[node] = self.nodes.get(node, 0) + count
        if last > self.newest:
            self.newest = last
        elif last < self.oldest:
            self.oldest = last

    def prune(self, before: float) -> None:
        """Forget the failures found before `before`."""
        if self.oldest >= before:
            return
        self.entries = [entry for entry in self.entries if entry[0] >= before]
        self.total, self.nodes = 0, {}
        for _, count, _, node in self.entries:
            self.total += count
            self.nodes[node] = self.nodes.get(node, 0) + count
        self.oldest = min((entry[0] for entry in self.entries), default=math.inf)

    def span(self) -> tuple[float, float]:
        """The first and the last failure's time."""
        return min(entry[2] for entry in self.entries), self.newest


class Detection:
    """Failure counts per (cluster jail, address) and node, ban histories, and decisions."""

    def __init__(
        self,
        jails: Mapping[str, ClusterJail],
        default_bantime: int,
        history_age: float,
        secret: bytes = b"",
    ) -> None:
        self.jails = dict(jails)  # cluster jail name -> its settings
        self.increments: dict[str, Increment] = {
            name: jail.bantime_increment() for name, jail in jails.items()
        }
        # local jail -> the cluster jail counting it
        self.local = {local: name for name, jail in jails.items() for local in jail.jails}
        self.default_bantime = default_bantime  # of node bans that did not say how long
        self.history_age = history_age  # dbpurgeage: earlier bans older than this don't count
        self.secret = secret  # the hubs' shared secret, for bantime.rndtime
        self.longest = max((jail.findtime for jail in jails.values()), default=0)
        # (cluster jail, ip) -> its failures, least recently counted first
        self.watched: OrderedDict[tuple[str, str], Tally] = OrderedDict()
        # (cluster jail, ip) -> its bans, least recently banned first
        self.history: OrderedDict[tuple[str, str], Episode] = OrderedDict()
        self.seen: OrderedDict[str, float] = OrderedDict()  # failure report id -> taken at
        self.journal: list[tuple] = []  # changes not yet stored, in order
        self.counters = {
            "reports": 0,  # failure reports taken
            "failures": 0,  # failures they counted in a cluster jail
            "duplicates": 0,  # failure reports taken before
            "detections": 0,  # bans decided by failure counts
            "escalations": 0,  # node bans lengthened by their address's history
        }

    def counts(self, jail: str) -> bool:
        """Whether a cluster jail counts the failures or the bans of local jail `jail`."""
        return jail in self.local

    def table_keys(self, jail: str, ip: str) -> list[tuple[str, str]]:
        """The ban table's keys under which the cluster jail counting `jail` may ban `ip`:
        its own (the cluster's bans) and its local jails' (the nodes' bans)."""
        name = jail if jail in self.jails else self.local[jail]
        return [(name, ip), *((local, ip) for local in self.jails[name].jails if local != name)]

    def on_failures(
        self, report: FailureReport, now: float, exempt: Callable[[str, str], bool] | None = None
    ) -> list[Decision] | None:
        """Count a node's failure report; the bans it decides, or None if it was taken before.
        `exempt(jail, ip)`: what the cluster jail may not ban (the hub's allowlist, an
        operator's hold), not even counted: a ban refused must not lengthen the next one."""
        if report.id in self.seen:
            self.counters["duplicates"] += 1
            return None
        self.seen[report.id] = now
        self.journal.append(("report", report, now))
        self.counters["reports"] += 1
        decisions = []
        local, node = self.local, report.node
        for jail, ip, count, first, last in report.failures:  # a failure each in an attack
            name = local.get(jail)
            if name is None or (exempt is not None and exempt(name, ip)):
                continue
            if last > now:  # a node's clock ahead: fail2ban takes such a failure as of now
                last, first = now, min(first, now)
            decision = self._count(name, node, ip, count, first, last, now)
            if decision is not None:
                decisions.append(decision)
        return decisions

    def replay(self, report: FailureReport, taken_at: float, now: float) -> None:
        """A failure report stored before a restart: counted again, deciding nothing (what
        it decided then is in the history)."""
        self.seen[report.id] = taken_at
        for jail, ip, count, first, last in report.failures:
            name = self.local.get(jail)
            if name is not None:
                last = min(last, taken_at)
                self._count(name, report.node, ip, count, min(first, last), last, now, False)

    def _count(
        self,
        name: str,
        node: str,
        ip: str,
        count: int,
        first: float,
        last: float,
        now: float,
        decide: bool = True,
    ) -> Decision | None:
        jail = self.jails[name]
        if last < now - jail.findtime:
            return None
        key = (name, ip)
        if key in self.history:  # rare: an address banned before
            episode = self._episode(key, now)
            if episode is not None and episode.banned_at(last):
                return None  # found while banned or before the ban: that ban has them
        self.counters["failures"] += count
        tally = self.watched.get(key)
        if tally is None:
            tally = self.watched[key] = Tally(node, last, count, first)
            if len(self.watched) > MAX_WATCHED:
                self.watched.popitem(last=False)
        else:
            self.watched.move_to_end(key)
            tally.add(node, last, count, first)
            tally.prune(now - jail.findtime)
        if not decide or tally.total < jail.maxretry or len(tally.nodes) < jail.min_nodes:
            return None
        del self.watched[key]
        earlier = self._earlier(name, ip, now)
        start, end = tally.span()
        number = earlier + 1
        decision_id_ = decision_id(name, ip, number, end)
        rnd = shared_random(decision_id_, self.secret)
        bantime = self.increments[name].bantime(jail.bantime, earlier, rnd)
        self._record(key, end, bantime)
        self.counters["detections"] += 1
        return Decision(
            decision_id_, name, ip, end, bantime, number, dict(tally.nodes), end - start
        )

    def on_ban(self, event: BanEvent, now: float) -> Decision | None:
        """A node's own ban of a local jail a cluster jail counts, taken into the ban table:
        a new ban of the address or more of the same one; the cluster's longer ban when the
        address's history makes this one longer than the node's."""
        name = self.local.get(event.jail)
        if name is None or event.node == CLUSTER:
            return None
        key = (name, event.ip)
        node_bantime = self.default_bantime if event.bantime is None else event.bantime
        ends = None if node_bantime == PERMANENT else event.time + node_bantime
        episode = self._episode(key, now)
        if episode is not None and episode.banned_at(event.time):
            # The same ban: another node's, or one reported again.
            if episode.until is not None and (ends is None or ends > episode.until):
                episode.until = ends
                self.journal.append(("history", key, episode))
            return None
        earlier = self._earlier(name, event.ip, now)
        self.watched.pop(key, None)  # fail2ban forgets an address's failures when it bans it
        self._record(key, event.time, node_bantime)
        if earlier == 0 or not self.increments[name].enabled:
            return None
        number = earlier + 1
        decision_id_ = decision_id(name, event.ip, number, event.time)
        rnd = shared_random(decision_id_, self.secret)
        bantime = self.increments[name].bantime(self.jails[name].bantime, earlier, rnd)
        if node_bantime == PERMANENT or (bantime != PERMANENT and bantime <= node_bantime):
            return None  # the node's own ban is as long
        self._record(key, event.time, bantime, again=True)
        self.counters["escalations"] += 1
        return Decision(
            decision_id_, name, event.ip, event.time, bantime, number, escalates=event.node
        )

    def on_lifted(self, jail: str, ip: str, now: float) -> None:
        """The cluster no longer bans `ip` in `jail` (a node's unban lifted it before its time):
        failures found from now on count again."""
        name = jail if jail in self.jails else self.local.get(jail)
        episode = self.history.get((name, ip)) if name is not None else None
        if episode is not None and episode.banned_at(now):
            episode.until = now
            self.journal.append(("history", (name, ip), episode))

    def expire(self, now: float) -> None:
        """Forget failures past their findtime, reports past every findtime and histories
        past dbpurgeage whose ban is over."""
        while self.watched:
            key, tally = next(iter(self.watched.items()))
            if tally.newest >= now - self.jails[key[0]].findtime:
                break
            del self.watched[key]
        before = now - self.longest - SKEW
        if self.seen and (len(self.seen) > MAX_REPORTS or next(iter(self.seen.values())) < before):
            while self.seen and (
                len(self.seen) > MAX_REPORTS or next(iter(self.seen.values())) < before
            ):
                self.seen.popitem(last=False)
            # The rows of the reports still remembered stay, and the ones after them.
            self.journal.append(("forget reports", next(iter(self.seen.values()), now)))
        while self.history:
            key, episode = next(iter(self.history.items()))
            if episode.last >= now - self.history_age or episode.banned_at(now):
                break
            del self.history[key]
            self.journal.append(("forget history", key))

    def _episode(self, key: tuple[str, str], now: float) -> Episode | None:
        """The address's history, if its last ban is recent enough to count or still on."""
        episode = self.history.get(key)
        if episode is None:
            return None
        if episode.last < now - self.history_age and not episode.banned_at(now):
            return None
        return episode

    def _earlier(self, name: str, ip: str, now: float) -> int:
        """How many bans of `ip` came before, in this cluster jail or, with
        bantime.overalljails, in every one (fail2ban sums them)."""
        names = self.jails if self.increments[name].overalljails else (name,)
        return sum(
            episode.count
            for other in names
            if (episode := self._episode((other, ip), now)) is not None
        )

    def _record(
        self, key: tuple[str, str], start: float, bantime: int, again: bool = False
    ) -> None:
        """A new ban of the address (or, `again`, the cluster's longer one of the same)."""
        until = None if bantime == PERMANENT else start + bantime
        episode = self.history.get(key)
        if again and episode is not None:
            episode.until = until if episode.until is not None and until is not None else None
        else:
            count = episode.count if episode is not None and self._episode(key, start) else 0
            episode = Episode(count + 1, start, until)
        self.history[key] = episode
        self.history.move_to_end(key)
        if len(self.history) > MAX_HISTORY:
            old, _ = self.history.popitem(last=False)
            self.journal.append(("forget history", old))
        self.journal.append(("history", key, episode))

    def status(self) -> dict[str, int]:
        return {**self.counters, "watched": len(self.watched), "history": len(self.history)}


_SCHEMA = """
CREATE TABLE IF NOT EXISTS failure_reports (
    id TEXT PRIMARY KEY, at REAL NOT NULL, body BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS failure_reports_at ON failure_reports (at);
CREATE TABLE IF NOT EXISTS ban_history (
    jail TEXT NOT NULL, ip TEXT NOT NULL, count INTEGER NOT NULL, last REAL NOT NULL, until REAL,
    PRIMARY KEY (jail, ip));
"""


class DetectionStore:
    """The detection's reports and histories in the hub's database (its connection): written
    in the ban table's transaction (`write`), read back at start (`load`)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.db.executescript(_SCHEMA)

    def load(self, detection: Detection, now: float) -> int:
        """The histories, then the reports within the longest findtime, counted again; how
        many reports were replayed. A report that no longer decodes (a cluster jail gone, a
        changed limit) is skipped."""
        rows = self.db.execute("SELECT jail, ip, count, last, until FROM ban_history ORDER BY last")
        for jail, ip, count, last, until in rows:
            if jail in detection.jails:
                detection.history[(jail, ip)] = Episode(count, last, until)
        replayed = 0
        since = now - detection.longest - SKEW
        reports = self.db.execute(
            "SELECT at, body FROM failure_reports WHERE at >= ? ORDER BY at", (since,)
        )
        for at, body in reports:
            try:
                report = FailureReport.from_object(decode_object(body, len(body)), ANY_NETWORK)
            except ProtocolError:
                continue
            detection.replay(report, at, now)
            replayed += 1
        return replayed

    def write(self, journal: Iterable[tuple]) -> None:
        """The detection's changes, inside the caller's transaction."""
        reports, history, forget = [], {}, []
        forget_before = None  # reports taken before this go, once the new ones are in
        for change in journal:
            what = change[0]
            if what == "report":
                report, at = change[1], change[2]
                reports.append((report.id, at, report.encode()))
            elif what == "history":
                key, episode = change[1], change[2]
                history[key] = (*key, episode.count, episode.last, episode.until)
            elif what == "forget history":
                history.pop(change[1], None)
                forget.append(change[1])
            else:  # "forget reports"
                forget_before = change[1]
        self.db.executemany("INSERT OR IGNORE INTO failure_reports VALUES (?, ?, ?)", reports)
        if forget_before is not None:
            self.db.execute("DELETE FROM failure_reports WHERE at < ?", (forget_before,))
        self.db.executemany("DELETE FROM ban_history WHERE jail = ? AND ip = ?", forget)
        self.db.executemany(
            "INSERT OR REPLACE INTO ban_history VALUES (?, ?, ?, ?, ?)", history.values()
        )
