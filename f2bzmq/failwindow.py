"""The monitor's failure window: fail2ban's "Found" lines, counted per (jail, address)
over a short while, so an attack reaches the hubs as a few failure reports, not a report
per line.

The first failure after a quiet while goes at once (a failure may be the one that makes
the cluster ban); the ones after it wait until `interval` has passed since the last report
left, then go together: under an attack, one report per interval at most, each counting
every address the node saw failing meanwhile. Records and `now` in, counts out; nothing
here touches the outbox or a clock.
"""

from __future__ import annotations

from collections.abc import Iterator

from .protocol import MAX_FAILURE_ITEMS, FailureCount


class FailureWindow:
    """Failures found and not yet reported, and when they are due."""

    def __init__(self, interval: float) -> None:
        self.interval = interval  # seconds at least between two reports, under load
        self.counts: dict[tuple[str, str], list] = {}  # (jail, ip) -> [count, first, last]
        self.last_taken = float("-inf")  # when the last report was made (monotonic)
        self.found = 0  # failures added since start, for `status`

    def add(self, jail: str, ip: str, when: float) -> None:
        """One failure of `ip` in `jail` at `when` (the failure's own time, unix)."""
        self.found += 1
        counted = self.counts.get((jail, ip))
        if counted is None:
            self.counts[(jail, ip)] = [1, when, when]
            return
        counted[0] += 1
        if when < counted[1]:
            counted[1] = when
        if when > counted[2]:
            counted[2] = when

    def deadline(self) -> float | None:
        """When the waiting failures are due (monotonic); None when none wait."""
        return self.last_taken + self.interval if self.counts else None

    def due(self, now: float) -> bool:
        deadline = self.deadline()
        return deadline is not None and now >= deadline

    def take(self, now: float) -> list[list[FailureCount]]:
        """Every waiting failure as the items of reports (MAX_FAILURE_ITEMS each), in the order
        first found; the window starts again from `now`. Also before the interval is over:
        when a ban is stored, the failures read before it go in the same commit."""
        items = [
            FailureCount(jail, ip, count, first, last)
            for (jail, ip), (count, first, last) in self.counts.items()
        ]
        self.counts.clear()
        if items:
            self.last_taken = now
        return list(_chunks(items, MAX_FAILURE_ITEMS))


def _chunks(items: list[FailureCount], size: int) -> Iterator[list[FailureCount]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
