"""Operators' unbans as the cluster keeps them: lifted from the nodes' own jails, and held.

An operator's unban lifts an address (or a network) in the cluster's table and, on every
node, in the node's own jails, where its fail2ban banned it; with a hold, the hub refuses
to ban it again and each node's fail2ban ignores it (`ignoreip`) until the hold ends, so
an address its own jail would catch again stays out too. `Holds` is the hub's list, which
it sends to every subscriber; `LocalHolds` is what one node does about it; `RelayedHolds`,
how a relay hands the hub's list on to the subscribers behind it. Nothing here touches a
socket, fail2ban or a clock.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

from .addresses import Allowlist
from .protocol import MAX_HOLDS, Decision, Hold, holds_digest

# Seconds an unban without a hold stays in the list the nodes get: a subscriber that was
# reconnecting when it was made still lifts it from its node's jails.
LIFT_MEMORY = 300.0
# Subscribers a relay remembers having heard at most (a region's nodes, one snapshot
# connection each); past it the one heard longest ago is forgotten, and asks again.
MAX_REGION = 100_000


class Holds:
    """The hub's lifts and holds: the list every subscriber gets, and the check that keeps
    a held address from being banned again."""

    def __init__(self) -> None:
        self.entries: dict[str, Hold] = {}  # decision id -> its hold, oldest first
        self.operators: dict[str, str] = {}  # decision id -> who decided, for refusals
        self._ranges: list[tuple[Allowlist, Hold]] | None = None  # active holds, cached
        self._digest: str | None = None  # of current(), cached: every presence compares it

    def add(self, decision: Decision) -> Hold:
        """An operator's unban: a later one of the same address and jail ends the earlier
        hold (`unban IP --hold 0` lifts a hold)."""
        for old_id, old in list(self.entries.items()):
            if old.ip == decision.ip and old.jail == decision.jail and old.until > decision.time:
                self.entries[old_id] = Hold(old.id, old.ip, old.jail, old.time, decision.time)
        hold = Hold(
            decision.id,
            decision.ip or "",
            decision.jail,
            decision.time,
            decision.time + decision.hold,
        )
        self.entries[decision.id] = hold
        self.operators[decision.id] = decision.operator
        while len(self.entries) > MAX_HOLDS:
            oldest = next(iter(self.entries))
            del self.entries[oldest]
            self.operators.pop(oldest, None)
        self._ranges = self._digest = None
        return hold

    def holding(self, jail: str, ip: str, now: float) -> tuple[Hold, str] | None:
        """The active hold (and its operator) that keeps `ip` from being banned in `jail`."""
        if not self.entries:
            return None
        if self._ranges is None:
            self._ranges = [(Allowlist([_network(h.ip)]), h) for h in self.entries.values()]
        for ranges, hold in self._ranges:
            if hold.until > now and hold.jail in (None, jail) and ranges.covers(ip):
                return hold, self.operators.get(hold.id, "?")
        return None

    def current(self, now: float) -> list[Hold]:
        """What the nodes must know now: holds not yet over and recent lifts; the rest is
        forgotten."""
        for hold_id, hold in list(self.entries.items()):
            if hold.until <= now and hold.time + LIFT_MEMORY <= now:
                del self.entries[hold_id]
                self.operators.pop(hold_id, None)
                self._ranges = self._digest = None
        return list(self.entries.values())

    def digest(self, now: float) -> str:
        """holds_digest(current(now)), computed once per change."""
        holds = self.current(now)
        if self._digest is None:
            self._digest = holds_digest(holds)
        return self._digest

    def next_change(self, now: float) -> float | None:
        """When current() next drops an entry or a hold ends."""
        moments = [hold.until for hold in self.entries.values() if hold.until > now]
        moments += [hold.time + LIFT_MEMORY for hold in self.entries.values()]
        return min((moment for moment in moments if moment > now), default=None)


def _network(ip: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(ip, strict=False)


@dataclass
class HoldPlan:
    """What a node does about the holds, in this order: fail2ban ignores the held addresses
    first, then the unbanned ones are lifted from its jails, then ended holds are let go."""

    ignore: list[tuple[str, str]] = field(default_factory=list)  # (jail, address) to addignoreip
    lift: list[tuple[list[str], Hold]] = field(default_factory=list)  # (jails, hold) to lift once
    unignore: list[tuple[str, str]] = field(default_factory=list)  # (jail, address) to delignoreip
    # (jail, address) added once, whose hold ended, that fail2ban no longer has (a reload)
    forget: list[tuple[str, str]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.ignore or self.lift or self.unignore or self.forget)


class LocalHolds:
    """One node's view of the holds of every hub it follows, and what its own jails (every
    fail2ban jail but the sync jails, which follow the cluster's table) must do about them.
    Only the ignoreip entries this node added are ever taken out again: `added` is kept on
    disk by the shell, so a hold that ends while the subscriber is stopped is let go at its
    next start, and an address the jail's configuration ignores stays ignored."""

    def __init__(self, sync_jails: Iterable[str], added: dict[str, set[str]] | None = None):
        self.sync_jails = set(sync_jails)
        self.hubs: dict[str, dict[str, Hold]] = {}  # hub -> hold id -> hold
        self.digests: dict[str, str] = {}  # hub -> the digest of its holds
        self.lifted: set[str] = set()  # hold ids this subscriber has lifted
        self.added: dict[str, set[str]] = {j: set(a) for j, a in (added or {}).items()}

    def on_holds(self, hub: str, holds: list[Hold]) -> bool:
        """A hub's whole list; True when it differs from what that hub said before."""
        digest = holds_digest(holds)
        if self.digests.get(hub) == digest:
            return False
        self.hubs[hub] = {hold.id: hold for hold in holds}
        self.digests[hub] = digest
        return True

    def digest(self, hub: str) -> str:
        return self.digests.get(hub, "")

    def holds(self) -> dict[str, Hold]:
        """Every hub's holds together: a hold any hub tells of counts."""
        merged: dict[str, Hold] = {}
        for holds in self.hubs.values():
            for hold_id, hold in holds.items():
                known = merged.get(hold_id)
                if known is None or hold.until < known.until:  # a hold ended early on one
                    merged[hold_id] = hold
        return merged

    def plan(self, now: float, jails: Iterable[str], ignored: dict[str, set[str]]) -> HoldPlan:
        """`jails`: the node's fail2ban jails; `ignored`: each one's ignoreip list now."""
        own = sorted(set(jails) - self.sync_jails)
        plan = HoldPlan()
        wanted: set[tuple[str, str]] = set()
        for hold in sorted(self.holds().values(), key=lambda h: (h.time, h.id)):
            targets = own if hold.jail is None else [j for j in own if j == hold.jail]
            if hold.until > now:
                wanted.update((jail, hold.ip) for jail in targets)
            if hold.id not in self.lifted and targets:
                plan.lift.append((targets, hold))
        for jail, ip in sorted(wanted):
            if ip not in ignored.get(jail, set()):
                plan.ignore.append((jail, ip))
        for jail, addresses in sorted(self.added.items()):
            for ip in sorted(addresses):
                if (jail, ip) in wanted:
                    continue
                present = ip in ignored.get(jail, set())
                (plan.unignore if present else plan.forget).append((jail, ip))
        return plan

    def done(self, plan: HoldPlan) -> None:
        """The shell carried out `plan` (or the part of it listed): remember what it added,
        took out and lifted."""
        for jail, ip in plan.ignore:
            self.added.setdefault(jail, set()).add(ip)
        for jail, ip in plan.unignore + plan.forget:
            self.added.get(jail, set()).discard(ip)
        self.added = {jail: ips for jail, ips in self.added.items() if ips}
        self.lifted.update(hold.id for _, hold in plan.lift)
        listed = set(self.holds())
        self.lifted &= listed  # a lift the hubs no longer list can't come back

    def next_change(self, now: float) -> float | None:
        """When a hold ends: its ignoreip entries go then."""
        return min((h.until for h in self.holds().values() if h.until > now), default=None)


class RelayedHolds:
    """What a relay passes on of its hub's holds: the hub's last holds message as it came
    (the hub's bytes, which a relay never re-encodes), and the region's subscribers heard
    lately, each by its snapshot connection. A subscriber gets the message when its
    presence shows it lacks it, and every one heard lately when the hub's list changes:
    the hub pushes a change to the relay at once, so the region has it at once too. A
    node's presence goes on to the hub at most once every `pace` seconds, however many
    connections it sends them on, so a node that sends them in a loop makes the relay
    send the hub no more than an honest one. Presences, and the message, are the
    caller's to validate."""

    def __init__(self, recent: float, pace: float) -> None:
        self.recent = recent  # seconds a subscriber counts as heard after its presence
        self.pace = pace
        self.message: list[bytes] | None = None  # the hub's holds message; None before one
        # Of its holds. Before the first, no digest at all (an empty list's is ""): the
        # relay's presence then never matches the hub's, which answers with its list.
        self.digest = "-"
        self.count = 0  # holds in it, for status
        self.heard: dict[bytes, float] = {}  # snapshot connection -> last presence, oldest first
        self.passed: dict[str, float] = {}  # node -> last presence passed on, oldest first

    def on_holds(self, message: list[bytes], digest: str, count: int, now: float) -> list[bytes]:
        """The hub's whole list: the connections to hand it to (none if it is unchanged)."""
        if self.message is not None and digest == self.digest:
            return []
        self.message, self.digest, self.count = message, digest, count
        return self.listeners(now)

    def on_presence(self, peer: bytes, digest: str, now: float) -> bool:
        """A subscriber's presence, with the digest of the holds it has: True when it is to
        get the hub's message now."""
        self.heard.pop(peer, None)  # to the end: the order is that of the last presence
        self.heard[peer] = now
        while len(self.heard) > MAX_REGION:
            del self.heard[next(iter(self.heard))]
        return self.message is not None and digest != self.digest

    def pass_on(self, node: str, now: float) -> bool:
        """Whether the presence just heard from `node` goes on to the hub."""
        last = self.passed.pop(node, None)
        if last is not None and now - last < self.pace:
            self.passed[node] = last
            return False
        self.passed[node] = now
        while len(self.passed) > MAX_REGION:
            del self.passed[next(iter(self.passed))]
        return True

    def listeners(self, now: float) -> list[bytes]:
        """The connections of the subscribers heard lately; the others are forgotten."""
        for peer, when in list(self.heard.items()):
            if now - when <= self.recent:
                break
            del self.heard[peer]  # heard the longest ago first: the rest are more recent
        return list(self.heard)
