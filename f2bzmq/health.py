"""What makes a daemon unhealthy, in words an operator acts on: the rules, without I/O.

Each rule takes figures the daemon measured (and `now`) and returns the problem for
`status` to list, or None. The two measurements every daemon may make, its open file
descriptors and the free space of a folder, are here too, each a system call or two.
"""

from __future__ import annotations

import os
import resource
from collections import deque
from dataclasses import dataclass

from .runtime import clock

MIB = 1024 * 1024
# A file system is nearly full below 64 MiB free, or below a tenth of a smaller one: a
# hub's busy write-ahead log takes about 1.5 MiB, 10,000 bans 3 MB.
DISK_LOW = 64 * MIB
# Descriptors are nearly used up when fewer than a tenth of the limit, or 10, are free:
# each connection of a node takes one, and past the limit connections are refused.
DESCRIPTORS_SPARE = 10
REFUSED_WINDOW = 600.0  # seconds refused handshakes are remembered for `status`


@dataclass(frozen=True)
class Descriptors:
    used: int
    limit: int  # the soft limit (ulimit -n, the unit's LimitNOFILE=); 0: unknown


def open_descriptors() -> Descriptors:
    """This process's open file descriptors and its limit."""
    try:
        used = len(os.listdir("/proc/self/fd")) - 1  # less the one listdir held
    except OSError:
        used = 0
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return Descriptors(used, 0 if soft == resource.RLIM_INFINITY else soft)


def descriptors_problem(descriptors: Descriptors) -> str | None:
    used, limit = descriptors.used, descriptors.limit
    if not limit or limit - used >= max(DESCRIPTORS_SPARE, limit // 10):
        return None
    return (
        f"{used} of {limit} file descriptors in use: new connections will be refused "
        "(raise LimitNOFILE= in the unit, or ulimit -n)"
    )


@dataclass(frozen=True)
class DiskSpace:
    free: int  # bytes this user may still write
    size: int


def disk_space(folder: str) -> DiskSpace | None:
    """The free space of folder's file system; None when it can't be read (no folder)."""
    try:
        found = os.statvfs(folder)
    except OSError:
        return None
    return DiskSpace(found.f_bavail * found.f_frsize, found.f_blocks * found.f_frsize)


def disk_problem(what: str, folder: str, space: DiskSpace | None) -> str | None:
    """`what` is kept in `folder`: is its file system nearly full?"""
    if space is None or space.free >= min(DISK_LOW, space.size // 10):
        return None
    return (
        f"the file system of {folder} is nearly full: {space.free / MIB:.1f} MiB free of "
        f"{space.size / MIB:.0f} MiB; {what} stops when it is full"
    )


def silence_problem(
    last_heard: float | None, started: float, now: float, silence: float
) -> str | None:
    """A hub that has heard no node for `silence` seconds (monitors say hello every 2 s)."""
    since = started if last_heard is None else last_heard
    if now - since < silence:
        return None
    heard = "since it started" if last_heard is None else f"since {clock(last_heard)}"
    return (
        f"no node heard for {now - since:.0f} s ({heard}): are the monitors running, can "
        "they reach this hub's report port, does keys_dir/nodes hold their keys?"
    )


class RefusedKeys:
    """CURVE handshakes refused because the client's key is unknown, as the authenticator
    counts them (in its thread): how many, and which of them are recent."""

    def __init__(self, window: float = REFUSED_WINDOW) -> None:
        self.window = window
        self.total = 0
        self.times: deque[float] = deque(maxlen=10000)  # a flood must not grow it

    def refused(self, now: float) -> None:
        self.total += 1
        self.times.append(now)

    def problem(self, now: float) -> str | None:
        recent = [moment for moment in list(self.times) if now - moment < self.window]
        if not recent:
            return None
        return (
            f"{len(recent)} connection(s) with an unknown key refused in the last "
            f"{self.window / 60:.0f} min, the last at {clock(recent[-1])}: a node whose key "
            "is not in keys_dir/nodes (copy it there and reload), or a stranger"
        )


def logpath_problems(logpath: str, exists: bool, target: str | None) -> list[str]:
    """The monitor follows `logpath` (which `exists` or not); fail2ban says it writes to
    `target` (None: fail2ban could not be asked). Both paths are resolved (realpath)."""
    if target is not None and not target.startswith("/"):
        return [
            f"fail2ban logs to {target}, not to a file: set logtarget = {logpath} in "
            "fail2ban.local, or the monitor reports none of its bans"
        ]
    if target is not None and target != logpath:
        return [
            f"fail2ban writes its log to {target}, not to [monitor] logpath = {logpath}: "
            "the monitor reports none of its bans"
        ]
    if not exists:
        return [
            f"fail2ban's log {logpath} does not exist: nothing is reported until it does "
            "(is [monitor] logpath fail2ban's logtarget?)"
        ]
    return []
