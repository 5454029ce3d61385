"""Parse fail2ban.log lines and decide which of them are bans to share with the cluster.

Pure code: strings in, records out. The monitor feeds it lines from the log; the
rules about what must not be reported (restored bans, unbans written while
fail2ban stops or flushes a jail, the sync jail's own bans) live here so they
can be tested without a file or a socket.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from enum import Enum


class Kind(str, Enum):
    """What a fail2ban.log line says happened."""

    BAN = "ban"
    FOUND = "found"  # a failure: what the cluster's detection counts
    RESTORE_BAN = "restore_ban"
    UNBAN = "unban"
    REPEAL_BAN = "repeal_ban"
    REBAN = "reban"
    INCREASE_BAN = "increase_ban"
    ALREADY_BANNED = "already_banned"
    FLUSH = "flush"
    JAIL_STARTED = "jail_started"
    JAIL_STOPPED = "jail_stopped"
    JAIL_RELOADED = "jail_reloaded"
    SERVER_STARTING = "server_starting"
    SERVER_STOPPING = "server_stopping"
    JAIL_RESTARTING = "jail_restarting"
    LOGFILE_REMOVED = "logfile_removed"


@dataclass(frozen=True)
class LogRecord:
    """One meaningful fail2ban.log line."""

    kind: Kind
    jail: str | None = None
    ip: str | None = None
    # From the line's own timestamp (None in the syslog form); a failure's is the failure's
    # own time, which the line names.
    time: float | None = None
    bantime: int | None = None  # seconds, -1 permanent; only Increase Ban says it


# "2026-11-23 10:13:40,972 fail2ban.actions        [17048]: NOTICE  [sshd] Ban 10.250.0.100"
# The syslog/journal form has no timestamp of ours and may carry a syslog prefix instead.
_TIMESTAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)(?:[,.](\d{1,6}))?\s")
_JAIL = r"\[(?P<jail>[^\]\s]{1,64})\]"
_ADDR = r"(?P<ip>[0-9A-Fa-f:.]+(?:/\d{1,3})?)"
_LEVEL = r"(?:(?:NOTICE|INFO|WARNING|WARN|ERROR|DEBUG|CRITICAL|HEAVYDEBUG)\s+)?"
_HEAD = r"(?:^|\s|:)" + _LEVEL + _JAIL + r"\s+"

_JAIL_LINES: list[tuple[Kind, re.Pattern[str]]] = [
    # "[sshd] Found 192.0.2.7 - 2026-11-23 10:13:40": first, the most frequent line of an
    # attack. Not "Found 192.0.2.7, bad - …", which an earlier failure's ban count adds.
    (
        Kind.FOUND,
        re.compile(
            _HEAD + r"Found\s+" + _ADDR + r" - (?P<when>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\s*$"
        ),
    ),
    (Kind.BAN, re.compile(_HEAD + r"Ban\s+" + _ADDR + r"\s*$")),
    (Kind.RESTORE_BAN, re.compile(_HEAD + r"Restore Ban\s+" + _ADDR + r"\s*$")),
    (Kind.UNBAN, re.compile(_HEAD + r"Unban\s+" + _ADDR + r"\s*$")),
    (Kind.REPEAL_BAN, re.compile(_HEAD + r"Repeal Ban\s+" + _ADDR + r"\s*$")),
    (Kind.REBAN, re.compile(_HEAD + r"Reban\s+" + _ADDR + r"(?:,\s.*)?$")),
    (
        Kind.INCREASE_BAN,
        re.compile(_HEAD + r"Increase Ban\s+" + _ADDR + r"\s+\(\d+\s+#\s+(?P<span>[^)]*?)\s+->"),
    ),
    (Kind.ALREADY_BANNED, re.compile(_HEAD + _ADDR + r"\s+already banned\s*$")),
    (Kind.FLUSH, re.compile(_HEAD + r"Flush ticket\(s\) with\s+\S+")),
]
_JAIL_STATE = re.compile(r"\sJail '(?P<jail>[^'\s]{1,64})' (?P<what>started|stopped|reloaded)\s*$")
_JAIL_RESTARTING = re.compile(r"\s(?:Reload|Restart) jail '(?P<jail>[^'\s]{1,64})'")
_LOGFILE_REMOVED = re.compile(r"\sRemoved logfile: ")
_SERVER_STARTING = re.compile(r"\s(?:Starting Fail2ban v|Start Fail2ban v)\S+\s*$")
_SERVER_STOPPING = re.compile(r"\s(?:Shutdown in progress\.\.\.|Stopping all jails)\s*$")
_SPAN = re.compile(r"^(?:(?P<days>\d+) days?, )?(?P<h>\d+):(?P<m>\d\d):(?P<s>\d\d)$")


def parse_line(line: str) -> LogRecord | None:
    """Return what a fail2ban.log line says, or None for any line that is not one we know."""
    if len(line) > 4096:
        return None
    stamp = _line_time(line)
    for kind, pattern in _JAIL_LINES:
        match = pattern.search(line)
        if match is None:
            continue
        ip = match.group("ip") if "ip" in pattern.groupindex else None
        if ip is not None and not is_address(ip):
            return None
        bantime = _span_seconds(match.group("span")) if kind is Kind.INCREASE_BAN else None
        if kind is Kind.INCREASE_BAN and bantime is None:
            return None
        if kind is Kind.FOUND:
            stamp = _local_seconds(match.group("when"))
            if stamp is None:
                return None
        return LogRecord(kind, match.group("jail"), ip, stamp, bantime)
    match = _JAIL_STATE.search(line)
    if match is not None:
        kind = {
            "started": Kind.JAIL_STARTED,
            "stopped": Kind.JAIL_STOPPED,
            "reloaded": Kind.JAIL_RELOADED,
        }[match.group("what")]
        return LogRecord(kind, match.group("jail"), time=stamp)
    match = _JAIL_RESTARTING.search(line)
    if match is not None:
        return LogRecord(Kind.JAIL_RESTARTING, match.group("jail"), time=stamp)
    if _LOGFILE_REMOVED.search(line):
        return LogRecord(Kind.LOGFILE_REMOVED, time=stamp)
    if _SERVER_STARTING.search(line):
        return LogRecord(Kind.SERVER_STARTING, time=stamp)
    if _SERVER_STOPPING.search(line):
        return LogRecord(Kind.SERVER_STOPPING, time=stamp)
    return None


def is_address(text: str) -> bool:
    """True for an IPv4 or IPv6 address, or a network written in CIDR form."""
    try:
        # The common case in C: inet_pton takes exactly what ipaddress takes for IPv4
        # (four decimal octets, no leading zeros) at a twentieth of the cost.
        socket.inet_pton(socket.AF_INET, text)
        return True
    except OSError:
        pass
    try:
        if "/" in text:
            ipaddress.ip_network(text, strict=False)
        else:
            ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _line_time(line: str) -> float | None:
    match = _TIMESTAMP.match(line)
    if match is None:
        return None
    seconds = _local_seconds(match.group(1))
    if seconds is None:
        return None
    fraction = match.group(2) or "0"
    return seconds + int(fraction) / 10 ** len(fraction)


@functools.lru_cache(maxsize=256)
def _local_seconds(text: str) -> float | None:
    """'2026-11-23 10:13:40' as a Unix time. Cached: strptime costs half of parsing a line,
    and a burst writes thousands of lines within the same few seconds."""
    try:
        parsed = time.strptime(text, "%Y-%m-%d %H:%M:%S")
    except ValueError:
        return None
    # fail2ban writes local time without a zone, as the machine's clock shows it.
    return time.mktime(parsed)


def _span_seconds(span: str) -> int | None:
    """'2:00:00', '1 day, 0:00:00' or 'permanent' (fail2ban's timedelta text) as seconds."""
    if span == "permanent":
        return -1
    match = _SPAN.match(span)
    if match is None:
        return None
    days = int(match.group("days") or 0)
    return ((days * 24 + int(match.group("h"))) * 60 + int(match.group("m"))) * 60 + int(
        match.group("s")
    )


class BanReporter:
    """Decides which parsed lines are bans or unbans this node should report.

    fail2ban writes the same ``Unban`` line for an expired ban, a manual unban and
    every ticket it lifts while stopping or flushing a jail; only the first two may
    reach the cluster, or a restart of fail2ban on one node would unban the
    address everywhere. A stop is announced by "Shutdown in progress" (the whole
    server), "Flush ticket(s)" or "Reload/Restart jail" (one jail), or, for
    `fail2ban-client stop JAIL` with actions that can't flush, only by "Removed
    logfile" (which names no jail: every Unban is held back until a jail says it
    stopped or started). Each ends at the next sign of life.
    """

    def __init__(
        self, ignore_jails: Collection[str] = (), detect_jails: Collection[str] = ()
    ) -> None:
        self.ignore_jails = frozenset(ignore_jails)
        # Jails whose failures a cluster jail counts; the others' are never reported.
        self.detect_jails = frozenset(detect_jails)
        self.server_stopping = False  # between "Shutdown in progress" and the next start
        self.flushing: set[str] = set()  # jails whose Unban lines come from a flush
        self.some_jail_stopping = False  # a log file was removed: a jail may be stopping

    def feed(self, record: LogRecord) -> LogRecord | None:
        """Take one record in log order; return it (as BAN, UNBAN or FOUND) when it must be
        reported."""
        kind = record.kind
        if kind is Kind.FOUND:
            # Says nothing about a flush or a stop: fail2ban finds failures while it bans.
            return record if record.jail in self.detect_jails else None
        if kind is Kind.SERVER_STOPPING:
            self.server_stopping = True
            return None
        if kind is Kind.SERVER_STARTING:
            self.server_stopping = False
            self.some_jail_stopping = False
            self.flushing.clear()
            return None
        if kind is Kind.LOGFILE_REMOVED:
            self.some_jail_stopping = True
            return None
        if record.jail is None:
            return None
        if kind in (Kind.FLUSH, Kind.JAIL_RESTARTING):
            self.flushing.add(record.jail)
            return None
        if kind in (Kind.JAIL_STARTED, Kind.JAIL_STOPPED, Kind.JAIL_RELOADED):
            self.some_jail_stopping = False
        if kind is not Kind.UNBAN:
            # Any other line of that jail means the flush is over.
            self.flushing.discard(record.jail)
        if record.jail in self.ignore_jails:
            return None
        if kind in (Kind.BAN, Kind.INCREASE_BAN):
            return LogRecord(Kind.BAN, record.jail, record.ip, record.time, record.bantime)
        if kind in (Kind.UNBAN, Kind.REPEAL_BAN):
            if self.server_stopping or self.some_jail_stopping or record.jail in self.flushing:
                return None
            return LogRecord(Kind.UNBAN, record.jail, record.ip, record.time)
        return None

    def feed_lines(self, lines: Iterable[str]) -> list[LogRecord]:
        """Parse and judge a run of lines; return the records to report, in order."""
        reports = []
        for line in lines:
            record = parse_line(line)
            if record is None:
                continue
            report = self.feed(record)
            if report is not None:
                reports.append(report)
        return reports
