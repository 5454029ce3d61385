"""Per-node token buckets: a node that floods the hub is slowed, the others are not."""

from __future__ import annotations


class TokenBuckets:
    """`rate` events per second on average per key, bursts of up to `burst`."""

    def __init__(self, rate: float, burst: int, max_keys: int = 100_000) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys  # a bound, since keys come from the network
        self.buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def allow(self, key: str, now: float, keep: float = 0.0) -> bool:
        """Take one token from key's bucket; False when it is empty, or would hold fewer
        than `keep` tokens after (what a lower-priority sender must leave for the others)."""
        tokens, at = self.buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        allowed = tokens >= 1.0 + keep
        if allowed:
            tokens -= 1.0
        if key not in self.buckets and len(self.buckets) >= self.max_keys:
            self.buckets.clear()
        self.buckets[key] = (tokens, now)
        return allowed
