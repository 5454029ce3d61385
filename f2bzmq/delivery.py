"""The monitor's delivery window to one hub: which outbox rows go now, what the hub's
answers mean, when to wait and when to start the link afresh; and what the monitor
knows of the hub's state (`Greeting`).

Outbox rows, answers and `now` go in; reports to send and decisions come out. Nothing
here touches a socket, the outbox or a clock. The monitor keeps a window per hub. Every
event stays in the outbox until its hub has answered it, so what a window forgets (at a
reset) is read from the outbox and sent again: a duplicate costs the hub nothing, it drops
event ids it has seen.

Rows come in two lanes, each with its cursor: FRESH (what the log said) and REREPORT
(bans the node holds, reported again). Re-reports only take the room fresh events leave,
and a retry NAK of one pauses only its lane: a rebuild never delays a new ban.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from .protocol import MAX_REPORT, MAX_REPORT_EVENTS, Answer, Welcome

FRESH = 0  # the outbox's lanes
REREPORT = 1

RETRY_PAUSE = 1.0  # seconds a retry NAK (the hub throttles this node) stops the sending
MAX_BACKOFF = 30.0  # seconds: the longest wait before sending again to a silent hub
# A send that would block finds no connection to queue on: a hub that refused this node's
# CURVE key leaves its DEALER without one until the reset. Trying again this often costs
# an outbox read per hub; the reset after ack_timeout is what ends it.
BLOCKED_PAUSE = 0.1

Row = tuple[int, str, bytes]  # an outbox row: (row number, event id, event body)


def reports(rows: Iterable[Row]) -> Iterator[list[Row]]:
    """Outbox rows, in order, grouped into reports of at most MAX_REPORT_EVENTS events and
    MAX_REPORT bytes (a single event of up to MAX_BODY is always a report of its own)."""
    report: list[Row] = []
    size = 0
    for row in rows:
        if report and (len(report) == MAX_REPORT_EVENTS or size + len(row[2]) > MAX_REPORT):
            yield report
            report, size = [], 0
        report.append(row)
        size += len(row[2])
    if report:
        yield report


@dataclass
class Answered:
    """What one batch of a hub's answers means."""

    leave: list[str] = field(default_factory=list)  # out of the outbox: ACKed or refused for good
    refused: list[Answer] = field(default_factory=list)  # refused for good: dropped
    throttled: list[Answer] = field(default_factory=list)  # retry NAKs: sent again after a pause
    # NAKs of no event in flight: a whole report refused (a hub older than batched reports
    # takes one event a report) or a stale answer. The events stay in flight and go again
    # at the reset after ack_timeout.
    stray: list[Answer] = field(default_factory=list)
    delays: list[float] = field(default_factory=list)  # seconds from send to answer, per event

    @property
    def acked(self) -> int:
        return len(self.leave) - len(self.refused)


@dataclass(frozen=True)
class Reset:
    """The hub left events waiting past ack_timeout: a new link, the events again, later."""

    waited: float  # seconds the oldest of them has waited
    blocked: bool  # some could not even be sent: the link has no connection
    until: float  # nothing is sent before: the backoff


class DeliveryWindow:
    """The events in flight to one hub and the rules that move them."""

    def __init__(self, size: int, ack_timeout: float) -> None:
        self.size = size  # events in flight at most, per lane
        self.ack_timeout = ack_timeout
        # event id -> (outbox row, sent at), both lanes, in the order sent
        self.in_flight: dict[str, tuple[int, float]] = {}
        self.rereports: set[str] = set()  # the ids in flight of the re-report lane
        self.cursor = 0  # the last fresh row taken: the next ones are read past it
        self.rereport_cursor = 0  # the same for the re-report lane
        self.paused_until = 0.0  # nothing is sent before: a retry NAK, a backoff, a blocked send
        self.rereports_paused_until = 0.0  # no re-report is sent before: a retry NAK of one
        self.blocked_since: float | None = None  # the first send that would block, unanswered
        self.failures = 0  # resets since the hub last answered: the backoff doubles with each

    def room(self, now: float, lane: int = FRESH) -> int:
        """How many outbox rows of a lane past its cursor to read for take(): none while
        paused or full. Fresh rows count only the fresh ones in flight; re-reports get
        what room all the others leave."""
        if now < self.paused_until:
            return 0
        if lane == FRESH:
            return max(0, self.size - (len(self.in_flight) - len(self.rereports)))
        if now < self.rereports_paused_until:
            return 0
        return max(0, self.size - len(self.in_flight))

    def lane_cursor(self, lane: int) -> int:
        return self.cursor if lane == FRESH else self.rereport_cursor

    def _move_cursor(self, lane: int, row: int) -> None:
        if lane == FRESH:
            self.cursor = row
        else:
            self.rereport_cursor = row

    def take(self, rows: Sequence[Row], now: float, lane: int = FRESH) -> list[list[Row]]:
        """The reports to send now of a lane's outbox rows past its cursor (at most `room`),
        in flight from now on. A row still in flight after a rewind is not sent twice."""
        rows = rows[: self.room(now, lane)]
        if rows:
            self._move_cursor(lane, max(self.lane_cursor(lane), rows[-1][0]))
        fresh = [row for row in rows if row[1] not in self.in_flight]
        for row, event_id, _ in fresh:
            self.in_flight[event_id] = (row, now)
            if lane == REREPORT:
                self.rereports.add(event_id)
        return list(reports(fresh))

    def unsent(self, left: Sequence[list[Row]], now: float, lane: int = FRESH) -> None:
        """These reports of the last take() did not leave (the send would have blocked):
        taken again after BLOCKED_PAUSE, or after the reset if the hub stays unreachable."""
        rows = [row for report in left for row in report]
        if not rows:
            return
        for _, event_id, _ in rows:
            self.in_flight.pop(event_id, None)
            self.rereports.discard(event_id)
        first = min(row for row, _, _ in rows)
        self._move_cursor(lane, min(self.lane_cursor(lane), first - 1))
        if self.blocked_since is None:
            self.blocked_since = now
        self.paused_until = max(self.paused_until, now + BLOCKED_PAUSE)

    def on_answers(self, answers: Iterable[Answer], now: float) -> Answered:
        """The hub's answers: which events leave the outbox, which go again, what to log."""
        answered = Answered()
        for answer in answers:
            sent = self.in_flight.pop(answer.id, None)
            if sent is None:
                if not answer.stored:
                    answered.stray.append(answer)
                continue
            row, sent_at = sent
            rereport = answer.id in self.rereports
            self.rereports.discard(answer.id)
            answered.delays.append(now - sent_at)
            if answer.stored:
                answered.leave.append(answer.id)
            elif answer.retry:
                answered.throttled.append(answer)
                if rereport:
                    self.rereport_cursor = min(self.rereport_cursor, row - 1)
                    self.rereports_paused_until = now + RETRY_PAUSE
                else:
                    self.cursor = min(self.cursor, row - 1)
                    self.paused_until = max(self.paused_until, now + RETRY_PAUSE)
            else:
                answered.refused.append(answer)
                answered.leave.append(answer.id)
        if answered.delays:  # the hub hears this node
            self.failures = 0
            self.blocked_since = None
        return answered

    def on_tick(self, now: float) -> Reset | None:
        """A Reset when events have waited past ack_timeout: the caller starts a new link,
        and every event goes again from the oldest once the backoff is over."""
        since = self._waiting_since()
        if since is None or now - since <= self.ack_timeout:
            return None
        self.failures += 1
        backoff = min(MAX_BACKOFF, 0.5 * 2 ** (self.failures - 1))
        reset = Reset(now - since, self.blocked_since is not None, now + backoff)
        self.in_flight.clear()
        self.rereports.clear()
        self.cursor = self.rereport_cursor = 0
        self.blocked_since = None
        self.paused_until = reset.until
        return reset

    def restart(self, now: float) -> None:
        """The hub has just accepted this node's key: whatever waits goes now, from the oldest,
        without the backoff its silence toward an unknown key built up."""
        self.in_flight.clear()
        self.rereports.clear()
        self.cursor = self.rereport_cursor = 0
        self.blocked_since = None
        self.failures = 0
        self.paused_until = self.rereports_paused_until = now

    def next_deadline(self, now: float) -> float | None:
        """When on_tick or room may next say something new; None: only new rows or answers."""
        deadlines = []
        since = self._waiting_since()
        if since is not None:
            deadlines.append(since + self.ack_timeout)
        for paused in (self.paused_until, self.rereports_paused_until):
            if paused > now:
                deadlines.append(paused)
        return min(deadlines, default=None)

    def _waiting_since(self) -> float | None:
        """When the oldest event still unanswered was sent, or first failed to be."""
        # An id enters in_flight once, when it is sent, so the first is the oldest: no
        # scan of up to `in_flight` events on every turn of the loop.
        oldest = next(iter(self.in_flight.values()), None)
        times = [] if oldest is None else [oldest[1]]
        if self.blocked_since is not None:
            times.append(self.blocked_since)
        return min(times, default=None)


# How soon a monitor learns that a hub came back with a new state, when it has nothing
# to report: a hello is one small message each way.
HELLO_INTERVAL = 2.0
# A hello unanswered this long (the hub is away) is sent again: one waits in the socket's
# queue at most, however long the hub stays away.
HELLO_RETRY = 10.0

ADOPT = "adopt"  # a welcome from a hub met for the first time: remember its state
REREPORT_BANS = "rereport"  # the hub names a new state: report every ban the node holds to it


class Greeting:
    """What the monitor knows of one hub's state: the hellos it sends and what a welcome
    means. A hub that names a state other than the one this node last reported to has lost
    its table, and gets every ban the node holds again."""

    def __init__(self, known: str | None) -> None:
        self.known = known  # the hub state this node's bans were last reported to (outbox)
        self.state: str | None = None  # the state the hub named in its last welcome
        self.young = False  # and whether it is being rebuilt
        self.welcomed = False  # the hub answers hellos: it takes re-reports as such
        self.sent_at: float | None = None  # the hello not yet answered
        self.next_hello = 0.0

    def hello_due(self, now: float) -> bool:
        if self.sent_at is not None:
            return now - self.sent_at >= HELLO_RETRY
        return now >= self.next_hello

    def hello_sent(self, now: float) -> None:
        self.sent_at = now

    def hello_soon(self) -> None:
        """Say hello at once: a new link (the old queue is gone), or a rebuild done."""
        self.sent_at = None
        self.next_hello = 0.0

    def next_deadline(self) -> float:
        return self.sent_at + HELLO_RETRY if self.sent_at is not None else self.next_hello

    def on_welcome(self, welcome: Welcome, now: float) -> str | None:
        """What to do about a hub's welcome: ADOPT its state, REREPORT_BANS, or nothing.

        A hub met for the first time that is not young has lost nothing: its state is
        adopted, and the node reports nothing it did not read in the log (`start_at`)."""
        self.welcomed = True
        self.sent_at = None
        self.next_hello = now + HELLO_INTERVAL
        self.state, self.young = welcome.publisher, welcome.young
        if welcome.publisher == self.known:
            return None
        if self.known is None and not welcome.young:
            return ADOPT
        return REREPORT_BANS

    def on_pending(self, now: float) -> None:
        """The hub does not accept this node's key yet: say hello again in a while."""
        self.sent_at = None
        self.next_hello = now + HELLO_INTERVAL

    def reported(self, state: str) -> None:
        """The node's bans for `state` are in the outbox (or nothing needed reporting)."""
        self.known = state
