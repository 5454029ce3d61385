"""When a daemon collects cyclic garbage: while it waits, not in the middle of a burst.

CPython makes a full collection whenever its long-lived objects grew by a quarter,
whatever the process is doing, and walks every object then. In a hub whose table grew
by 16,000 bans during a flood, one took 56 ms: every report that came meanwhile waited
that long (bench/hostile.py, the others' p99 under a node's flood of new bans). So a
daemon:

- freezes what it holds once started (modules, configuration, the state it loaded):
  never garbage in practice, never walked again;
- leaves the young generations to CPython (well under a millisecond each);
- makes the full collections itself, when objects reached the old generation since the
  last one: after a poll that found nothing to do, at most every IDLE_EVERY seconds,
  and after MAX_WAIT seconds without one even if it never waits (a flood that lasts).

Reference counting still frees at once everything that is not in a cycle.
"""

from __future__ import annotations

import gc

IDLE_EVERY = 10.0  # seconds between full collections of a daemon that has time
MAX_WAIT = 300.0  # seconds a full collection waits at most for an idle moment
_NEVER = 2**31 - 1  # a threshold CPython never reaches


def due(last: float, now: float, idle: bool, promoted: int) -> bool:
    """A full collection now, the last one having been at `last` (monotonic seconds), and
    `promoted` collections of the middle generation having moved objects to the old one
    since? None of those: nothing new could be garbage in a cycle there."""
    waited = now - last
    return promoted > 0 and (waited >= MAX_WAIT or (idle and waited >= IDLE_EVERY))


class Collector:
    """The daemon's collections, from start() to stop(); inert outside them."""

    def __init__(self) -> None:
        self.started = False
        self.last = 0.0
        self.full = 0  # full collections made since start()
        self.threshold = gc.get_threshold()  # CPython's, given back by stop()

    def start(self, now: float) -> None:
        """Freeze what the daemon holds now, and take the full collections over."""
        gc.collect()
        gc.freeze()
        self.threshold = young, middle, _ = gc.get_threshold()
        gc.set_threshold(young, middle, _NEVER)
        self.started = True
        self.last = now

    def stop(self) -> None:
        """Give CPython its collections back (a loop run inside another program)."""
        if self.started:
            gc.set_threshold(*self.threshold)
            gc.unfreeze()
            self.started = False

    def tick(self, now: float, idle: bool) -> None:
        """Called once a pass of the daemon's loop; `idle` when its poll found nothing."""
        if self.started and due(self.last, now, idle, gc.get_count()[2]):
            gc.collect()
            self.last = now
            self.full += 1
