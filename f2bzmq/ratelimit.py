"""Per-sender token buckets: a sender that floods the hub is slowed, the others are not."""

from __future__ import annotations

INFINITE = float("inf")


class TokenBuckets:
    """`rate` events per second on average per key, bursts of up to `burst`, and within a
    burst never more than `peak` a second (a second bucket of `peak` tokens).

    The peak keeps a node's burst (a real attack of 10,000 bans, or a flood) from reaching
    every node's fail2ban at once, in front of the other nodes' bans. Keys may come from
    the network (an old monitor's address), so their number is bounded; making room never
    refills a bucket that still owes tokens, unless every bucket does: then the oldest
    quarter goes, and with them what they owed.
    """

    def __init__(
        self, rate: float, burst: int, max_keys: int = 100_000, peak: float = INFINITE
    ) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.peak = peak
        self.max_keys = max_keys
        self.buckets: dict[str, tuple[float, float, float]] = {}  # key -> (tokens, quick, at)

    def allow(self, key: str, now: float, cost: float = 1.0, keep: float = 0.0) -> bool:
        """Take `cost` tokens (at most a burst) from key's buckets; False when either has
        fewer, or the long-run one would hold fewer than `keep` after (what a lower-priority
        sender must leave for the others); then neither gives any."""
        tokens, quick, at = self.buckets.get(key, (self.burst, self.peak, now))
        # On every event: comparisons, not min(), which costs a call each.
        elapsed = now - at
        if elapsed > 0:  # (an infinite peak times no time would be NaN)
            tokens += elapsed * self.rate
            if tokens > self.burst:
                tokens = self.burst
            quick += elapsed * self.peak
            if quick > self.peak:
                quick = self.peak
        if cost != 1.0:
            cost = min(cost, self.burst, self.peak)
        allowed = tokens >= cost + keep and quick >= cost
        if allowed:
            tokens -= cost
            quick -= cost
        if key not in self.buckets and len(self.buckets) >= self.max_keys:
            self._make_room(now)
        self.buckets[key] = (tokens, quick, now)
        return allowed

    def ready_at(self, key: str, now: float, cost: float = 1.0) -> float:
        """When key's buckets hold `cost` tokens (at most a burst) again: `now` if they do."""
        tokens, quick, at = self.buckets.get(key, (self.burst, self.peak, now))
        cost = min(cost, self.burst, self.peak)
        later = (cost - tokens) / self.rate
        if self.peak != INFINITE:
            later = max(later, (cost - quick) / self.peak)
        return max(now, at + later)

    def _make_room(self, now: float) -> None:
        # A bucket that has filled up again is the same as none at all: forget those.
        self.buckets = {
            key: (tokens, quick, at)
            for key, (tokens, quick, at) in self.buckets.items()
            if tokens + (now - at) * self.rate < self.burst - 1e-9
            or quick + (now - at) * self.peak < self.peak - 1e-9
        }
        if len(self.buckets) >= self.max_keys:
            oldest = list(self.buckets)[: max(1, self.max_keys // 4)]
            for key in oldest:
                del self.buckets[key]
