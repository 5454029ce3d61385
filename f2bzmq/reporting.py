"""What the node's fail2ban did, as events in the monitor's outbox.

New lines of fail2ban.log become events, stored in one commit with the log position
after them. The failures fail2ban finds in the jails a cluster jail counts wait a moment
in the failure window and go as failure reports, with the log position after them: while
they wait, the position stored stays before their lines. After a rotation every ban
fail2ban holds is stored again, in case lines were lost, and so it is for a hub that lost
its state. Sending the outbox to the hubs is the monitor's part.

When the outbox can't be written (a full disk), the events of the lines read wait in
memory and no more lines are read: once a write works again, the monitor goes on where
it stopped; killed meanwhile, it reads those lines again from the position stored.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Callable

from . import protocol
from .config import Config
from .fail2ban_client import Fail2banClient, Fail2banError
from .failwindow import FailureWindow
from .logparse import BanReporter, Kind, LogRecord
from .outbox import Outbox
from .protocol import BanEvent, FailureReport, ProtocolError
from .runtime import NOTICE, RateLimitedLog, batched_logging
from .tail import LogFollower, LogPosition

log = logging.getLogger("f2bzmq.monitor")

BANTIME_CACHE = 60.0  # seconds a jail's bantime read from fail2ban stays trusted
STORE_RETRY = 1.0  # seconds between attempts to store events when the outbox can't be written


class LogReporter:
    """fail2ban.log in, the node's bans and unbans into the outbox."""

    def __init__(self, config: Config, outbox: Outbox, wake: Callable[[], None]) -> None:
        self.node = config.node
        self.outbox = outbox
        self.outbox_max = config.monitor.outbox_max
        self.networks = config.network_limits()
        self.judge = BanReporter(
            set(config.monitor.ignore_jails) | config.sync_jails(), config.detect_jails()
        )
        self.failures = FailureWindow(config.monitor.failure_window)
        self.failures_reported = 0  # failures stored in failure reports since start
        self.fail2ban = Fail2banClient(
            config.general.fail2ban_socket,
            client_program=config.general.fail2ban_client,
        )
        self.bantimes: dict[str, tuple[int | None, float]] = {}  # jail -> (bantime, read at)
        saved = outbox.position()
        self.follower = LogFollower(
            config.monitor.logpath,
            position=None if saved is None else LogPosition.from_json(saved),
            wake=wake,
            from_end=config.monitor.start_at == "end",
        )
        self.rotations_seen = 0  # a rotation found at start-up counts too
        self.refusals = RateLimitedLog(log)
        self.reported = 0  # events stored since start
        # Events read, and the log position after them, that the outbox could not store yet.
        self.unstored: tuple[list[BanEvent | FailureReport], str] | None = None
        self.retry_at: float | None = None  # when to try storing again (time.monotonic())
        # Called after each thousand lines: reading a long backlog is not being stuck.
        self.progress: Callable[[], None] = lambda: None

    def read(self, stored: Callable[[], None]) -> None:
        """Turn new log lines into events, stored with the new log position in one commit;
        `stored` is called after each commit that added events, to send them at once."""
        self.retry_at = None  # set again by a write that fails
        if self.unstored is not None and not self.store(*self.unstored, stored):
            return
        for _ in range(10000):
            self.progress()
            lines = self.follower.read_lines()
            events = []
            for record in self.judge.feed_lines(lines):
                if record.kind is Kind.FOUND:
                    self.failures.add(record.jail, record.ip, record.time or time.time())
                    continue
                event = self.make_event(record)
                if event is not None:
                    events.append(event)
            # While failures wait in their window, the position stored stays before them.
            waiting = self.failures.counts and not self.failures.due(time.monotonic())
            if (events or (lines and not waiting)) and not self.store(
                events, self.follower.position().to_json(), stored
            ):
                return
            if not self.follower.has_more():
                break
        if self.follower.rotations != self.rotations_seen:
            try:
                self.report_current_bans("log rotated")
            except sqlite3.Error:
                self.retry_at = time.monotonic() + STORE_RETRY
                return  # the rotation is seen again at the next read
            self.rotations_seen = self.follower.rotations

    def store_failures(self, stored: Callable[[], None]) -> None:
        """The failure window is due: its reports into the outbox with the log position."""
        if self.unstored is None and self.failures.due(time.monotonic()):
            self.store([], self.follower.position().to_json(), stored)

    def failures_deadline(self) -> float | None:
        """When store_failures() has something to do (monotonic), or None."""
        return None if self.unstored is not None else self.failures.deadline()

    def store(
        self, items: list[BanEvent | FailureReport], position: str, stored: Callable[[], None]
    ) -> bool:
        """Events, and every failure waiting in the window, with the log position after
        them into the outbox; False (and they wait here) when it can't be written."""
        reports = [
            FailureReport.new(self.node, counts) for counts in self.failures.take(time.monotonic())
        ]
        # The failures first: fail2ban logs them before the ban they lead to, and the hub
        # counts a failure found once the address is banned for nothing.
        items = reports + items
        try:
            self.outbox.add(items, position)
        except sqlite3.Error:
            self.unstored = (items, position)
            self.retry_at = time.monotonic() + STORE_RETRY
            return False
        self.unstored = None
        if items:
            stored()  # first: the rest is bookkeeping
            self.trim_outbox()
        with batched_logging():  # a line per event, written at once
            for item in items:
                if isinstance(item, FailureReport):
                    self.failures_reported += item.total()
                    log.debug("failures queued for the cluster: %s", describe_failures(item))
                else:
                    log.log(NOTICE, "%s: queued for the cluster", item.describe())
                    self.reported += 1
        return True

    def report_current_bans(
        self,
        why: str,
        targets: Sequence[str] | None = None,
        states: Mapping[str, str] = MappingProxyType({}),
    ) -> bool:
        """Report every ban fail2ban holds again, to `targets` (every hub: None), in the
        outbox's re-report lane, with the hub `states` they are for. After a rotation: a
        line written between copytruncate's copy and its truncation is in no file, and
        fail2ban drops a line logged while flushlogs swaps its handler. To a hub with a new
        state: it lost its table. A hub records a ban it knows as nothing new. False when
        fail2ban can't list its bans; sqlite3.Error when the outbox can't take them."""
        try:
            jails = [jail for jail in self.fail2ban.jails() if jail not in self.judge.ignore_jails]
            bans = [(jail, *ban) for jail in jails for ban in self.fail2ban.banned_with_time(jail)]
        except (Fail2banError, OSError) as error:
            self.refusals.warning(
                "list bans", "%s, and fail2ban can't list its bans to report: %s", why, error
            )
            return False
        events = []
        for jail, ip, start, bantime in bans:
            try:
                events.append(
                    BanEvent.new(self.node, jail, protocol.BAN, ip, start, bantime, self.networks)
                )
            except ProtocolError as error:
                self.refusals.warning(str(error), "[%s] %s not reported: %s", jail, ip, error)
        self.outbox.add_rereports(events, targets or self.outbox.targets, states)
        self.trim_outbox()
        log.info("%s: reporting the %d bans fail2ban holds again", why, len(events))
        return True

    def trim_outbox(self) -> None:
        try:
            dropped = self.outbox.trim(self.outbox_max)
        except sqlite3.Error:
            return  # the outbox can't be written: nothing was added to it either
        if dropped:
            log.warning(
                "outbox full (%d events): dropped the %d oldest, unbans first; "
                "are the hubs reachable?",
                self.outbox_max,
                dropped,
            )

    def make_event(self, record: LogRecord) -> BanEvent | None:
        action = protocol.BAN if record.kind is Kind.BAN else protocol.UNBAN
        bantime = None
        if action == protocol.BAN:
            bantime = record.bantime if record.bantime is not None else self.bantime(record.jail)
        try:
            return BanEvent.new(
                self.node, record.jail, action, record.ip, record.time, bantime, self.networks
            )
        except ProtocolError as error:
            self.refusals.warning(
                str(error), "[%s] %s not reported: %s", record.jail, record.ip, error
            )
            return None

    def bantime(self, jail: str) -> int | None:
        """The jail's bantime from fail2ban, cached; None when fail2ban can't say."""
        now = time.monotonic()
        cached = self.bantimes.get(jail)
        if cached is not None and now - cached[1] < BANTIME_CACHE:
            return cached[0]
        try:
            value = int(self.fail2ban.bantime(jail))
            value = value if value == protocol.PERMANENT or value > 0 else None
        except (Fail2banError, OSError, ValueError) as error:
            self.refusals.warning("bantime", "cannot read the bantime of [%s]: %s", jail, error)
            value = None
        self.bantimes[jail] = (value, now)
        return value

    def close(self) -> None:
        self.follower.stop()
        self.fail2ban.close()


def describe_failures(report: FailureReport, most: int = 5) -> str:
    """'[sshd] 192.0.2.7 x3, [sshd] 198.51.100.4 x1' (the first few of a report)."""
    shown = [f"[{item.jail}] {item.ip} x{item.failures}" for item in report.failures[:most]]
    more = len(report.failures) - most
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")
