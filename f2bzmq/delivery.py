"""The monitor's delivery window to one hub: which outbox rows go now, what the hub's
answers mean, when to wait and when to start the link afresh.

Outbox rows, answers and `now` go in; reports to send and decisions come out. Nothing
here touches a socket, the outbox or a clock. The monitor keeps a window per hub. Every
event stays in the outbox until its hub has answered it, so what a window forgets (at a
reset) is read from the outbox and sent again: a duplicate costs the hub nothing, it drops
event ids it has seen.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from .protocol import MAX_REPORT, MAX_REPORT_EVENTS, Answer

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
        self.size = size  # events in flight at most
        self.ack_timeout = ack_timeout
        self.in_flight: dict[str, tuple[int, float]] = {}  # event id -> (outbox row, sent at)
        self.cursor = 0  # the last outbox row taken: the next ones are read past it
        self.paused_until = 0.0  # nothing is sent before: a retry NAK, a backoff, a blocked send
        self.blocked_since: float | None = None  # the first send that would block, unanswered
        self.failures = 0  # resets since the hub last answered: the backoff doubles with each

    def room(self, now: float) -> int:
        """How many outbox rows past `cursor` to read for take(): none while paused or full."""
        if now < self.paused_until:
            return 0
        return max(0, self.size - len(self.in_flight))

    def take(self, rows: Sequence[Row], now: float) -> list[list[Row]]:
        """The reports to send now of the outbox rows past `cursor` (at most `room`), in
        flight from now on. A row still in flight after a rewind is not sent twice."""
        rows = rows[: self.room(now)]
        if rows:
            self.cursor = max(self.cursor, rows[-1][0])
        fresh = [row for row in rows if row[1] not in self.in_flight]
        for row, event_id, _ in fresh:
            self.in_flight[event_id] = (row, now)
        return list(reports(fresh))

    def unsent(self, left: Sequence[list[Row]], now: float) -> None:
        """These reports of the last take() did not leave (the send would have blocked):
        taken again after BLOCKED_PAUSE, or after the reset if the hub stays unreachable."""
        rows = [row for report in left for row in report]
        if not rows:
            return
        for _, event_id, _ in rows:
            self.in_flight.pop(event_id, None)
        self.cursor = min(self.cursor, min(row for row, _, _ in rows) - 1)
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
            answered.delays.append(now - sent_at)
            if answer.stored:
                answered.leave.append(answer.id)
            elif answer.retry:
                answered.throttled.append(answer)
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
        self.cursor = 0
        self.blocked_since = None
        self.paused_until = reset.until
        return reset

    def next_deadline(self, now: float) -> float | None:
        """When on_tick or room may next say something new; None: only new rows or answers."""
        deadlines = []
        since = self._waiting_since()
        if since is not None:
            deadlines.append(since + self.ack_timeout)
        if self.paused_until > now:
            deadlines.append(self.paused_until)
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
