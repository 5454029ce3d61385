"""Per-sender token buckets: a sender that floods the hub is slowed, the others are not."""

from __future__ import annotations


class TokenBuckets:
    """`rate` events per second on average per key, bursts of up to `burst`.

    Keys may come from the network (an old monitor's address), so their number is
    bounded; making room never refills a bucket that still owes tokens, unless every
    bucket does: then the oldest quarter goes, and with them what they owed.
    """

    def __init__(self, rate: float, burst: int, max_keys: int = 100_000) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self.buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def allow(self, key: str, now: float, cost: float = 1.0) -> bool:
        """Take `cost` tokens (at most a burst) from key's bucket; False when it has fewer."""
        tokens, at = self.buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        cost = min(cost, float(self.burst))
        allowed = tokens >= cost
        if allowed:
            tokens -= cost
        if key not in self.buckets and len(self.buckets) >= self.max_keys:
            self._make_room(now)
        self.buckets[key] = (tokens, now)
        return allowed

    def ready_at(self, key: str, now: float, cost: float = 1.0) -> float:
        """When key's bucket holds `cost` tokens (at most a burst) again: `now` if it does."""
        tokens, at = self.buckets.get(key, (float(self.burst), now))
        return max(now, at + (min(cost, float(self.burst)) - tokens) / self.rate)

    def _make_room(self, now: float) -> None:
        # A bucket that has filled up again is the same as none at all: forget those.
        full = self.burst - 1e-9
        self.buckets = {
            key: (tokens, at)
            for key, (tokens, at) in self.buckets.items()
            if tokens + (now - at) * self.rate < full
        }
        if len(self.buckets) >= self.max_keys:
            oldest = list(self.buckets)[: max(1, self.max_keys // 4)]
            for key in oldest:
                del self.buckets[key]
