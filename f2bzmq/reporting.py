"""What the node's fail2ban did, as events in the monitor's outbox.

New lines of fail2ban.log become events, stored in one commit with the log position
after them; after a rotation every ban fail2ban holds is stored again, in case lines
were lost. Sending the outbox to the hubs is the monitor's part.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from . import protocol
from .config import Config
from .fail2ban_client import Fail2banClient, Fail2banError
from .logparse import BanReporter, Kind, LogRecord
from .outbox import Outbox
from .protocol import BanEvent, ProtocolError
from .runtime import NOTICE, RateLimitedLog, batched_logging
from .tail import LogFollower, LogPosition

log = logging.getLogger("f2bzmq.monitor")

BANTIME_CACHE = 60.0  # seconds a jail's bantime read from fail2ban stays trusted


class LogReporter:
    """fail2ban.log in, the node's bans and unbans into the outbox."""

    def __init__(self, config: Config, outbox: Outbox, wake: Callable[[], None]) -> None:
        self.node = config.node
        self.outbox = outbox
        self.outbox_max = config.monitor.outbox_max
        self.networks = config.network_limits()
        self.judge = BanReporter(set(config.monitor.ignore_jails) | config.sync_jails())
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

    def read(self, stored: Callable[[], None]) -> None:
        """Turn new log lines into events, stored with the new log position in one commit;
        `stored` is called after each commit that added events, to send them at once."""
        for _ in range(10000):
            lines = self.follower.read_lines()
            records = self.judge.feed_lines(lines)
            events = [self.make_event(record) for record in records]
            events = [event for event in events if event is not None]
            if lines or events:
                self.outbox.add(events, self.follower.position().to_json())
            if events:
                stored()  # first: the rest of the loop is bookkeeping
                self.trim_outbox()
            with batched_logging():  # a line per event, written at once
                for event in events:
                    log.log(NOTICE, "%s: queued for the cluster", event.describe())
            self.reported += len(events)
            if not self.follower.has_more():
                break
        if self.follower.rotations != self.rotations_seen:
            self.rotations_seen = self.follower.rotations
            self.report_current_bans()

    def report_current_bans(self) -> None:
        """After a rotation, report every ban fail2ban holds: a line written between
        copytruncate's copy and its truncation is in no file, and fail2ban drops a line
        logged while flushlogs swaps its handler. The hub records a known ban as nothing new."""
        try:
            jails = [jail for jail in self.fail2ban.jails() if jail not in self.judge.ignore_jails]
            bans = [(jail, *ban) for jail in jails for ban in self.fail2ban.banned_with_time(jail)]
        except (Fail2banError, OSError) as error:
            log.warning("log rotated, and fail2ban can't list its bans to check: %s", error)
            return
        events = []
        for jail, ip, start, bantime in bans:
            try:
                events.append(
                    BanEvent.new(self.node, jail, protocol.BAN, ip, start, bantime, self.networks)
                )
            except ProtocolError as error:
                self.refusals.warning(str(error), "[%s] %s not reported: %s", jail, ip, error)
        self.outbox.add(events)
        self.trim_outbox()
        log.info(
            "log rotated: reported the %d bans fail2ban holds, in case lines were lost",
            len(events),
        )

    def trim_outbox(self) -> None:
        dropped = self.outbox.trim(self.outbox_max)
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
