"""Operators' decisions on the hub: what an operator may decide, and what each decision does.

A console asks; `Operators.make_*` checks the request against the hub's rules (an address,
within the network limits, not in the allowlist, not held, a jail the cluster knows) and
makes decisions, each with a fresh id; `Operators.apply` does what a decision says to the
ban table, the holds and the allowlist, whether it was made here or handed over by a peer
hub, and returns what to broadcast. Decisions are the hub's audit log: they are stored
with the table in one commit, and replayed at start for what the table does not hold (the
holds, the operators' allowlist, the keys removed). Nothing here touches a socket, the
disk or a clock.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .addresses import Allowlist
from .holds import Holds
from .protocol import (
    ANY_NETWORK,
    BAN,
    UNBAN,
    BanEvent,
    Decision,
    NetworkLimits,
    ProtocolError,
    canonical_address,
    is_operator_origin,
)
from .runtime import clock
from .state import BanTable, Update

MAX_HOLD = 366 * 86400  # seconds: a longer hold is the allowlist's job


class DecisionError(ProtocolError):
    """A request the hub refuses; the text is the one line the console shows."""


@dataclass
class Applied:
    """What one decision did."""

    updates: list[Update] = field(default_factory=list)  # to broadcast
    lifted: list[tuple[str, str]] = field(default_factory=list)  # (jail, address) unbanned
    outcome: str = ""  # for the console: banned, extended, lifted, refused: why, …
    holds_changed: bool = False
    allowlist_changed: bool = False
    accept: tuple[str, str] | None = None  # (node, key) to write into nodes/
    remove: str | None = None  # node whose key leaves nodes/


class Operators:
    """The operators' side of the hub's state: their decisions' rules and effects."""

    def __init__(
        self,
        table: BanTable,
        networks: NetworkLimits,
        allowlist: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network],
        default_bantime: int,
    ) -> None:
        self.table = table  # the cluster's bans, shared with admission
        self.networks = networks  # how wide an operator's banned network may be
        self.configured = list(allowlist)  # [publisher] allowlist
        self.added: dict[str, Decision] = {}  # network -> the decision that allowlisted it
        self.default_bantime = default_bantime
        self.holds = Holds()
        self.removed: dict[str, str] = {}  # z85 key -> node, of nodes an operator removed
        self.known: set[str] = set()  # ids of the decisions in the log
        self.bans: dict[tuple[str, str], Decision] = {}  # (jail, address) -> operator's ban
        self.allowlist = Allowlist(self.configured)  # both lists together
        # Why the hub never bans an address (its learned allowlist: special-purpose
        # ranges, the hubs', the nodes'), None if it may: the shell sets it.
        self.never_banned: Callable[[str], str | None] = lambda ip: None

    # Requests: check them, make decisions.

    def make_bans(
        self,
        operator: str,
        items: list[tuple[str, int | None]],
        jail: str,
        reason: str,
        known_jails: set[str],
        now: float,
    ) -> tuple[list[Decision], list[tuple[str, str]]]:
        """Decisions to ban each address, and the addresses refused with the reason."""
        check_jail(jail, known_jails)
        decisions, refused = [], []
        for text, bantime in items:
            try:
                ip = canonical_address(text, self.networks)
                self.check_bannable(jail, ip, now)
            except ProtocolError as error:
                refused.append((text, str(error)))
                continue
            decisions.append(
                Decision.new(
                    operator,
                    "ban",
                    now,
                    ip=ip,
                    jail=jail,
                    bantime=self.default_bantime if bantime is None else bantime,
                    reason=reason,
                )
            )
        return decisions, refused

    def check_bannable(self, jail: str, ip: str, now: float) -> None:
        if self.allowlist.covers(ip):
            raise DecisionError(f"{ip} is in the hub's allowlist")
        reason = self.never_banned(ip)
        if reason is not None:
            raise DecisionError(reason)
        held = self.holds.holding(jail, ip, now)
        if held is not None:
            hold, operator = held
            raise DecisionError(
                f"{ip} is held by {operator} until {clock(hold.until)}: "
                f"`unban {hold.ip} --hold 0` ends the hold"
            )

    def make_unban(
        self,
        operator: str,
        text: str,
        jail: str | None,
        hold: float,
        reason: str,
        known_jails: set[str],
        now: float,
    ) -> Decision:
        ip = address(text)
        if jail is not None:
            check_jail(jail, known_jails)
        if hold > MAX_HOLD:
            raise DecisionError("a hold is at most a year: the allowlist keeps an address longer")
        return Decision.new(operator, "unban", now, ip=ip, jail=jail, hold=hold, reason=reason)

    def make_allow(self, operator: str, text: str, reason: str, now: float) -> Decision:
        ip = address(text)
        if ip in self.added or any(str(net) == ip for net in self.configured):
            raise DecisionError(f"{ip} is in the allowlist already")
        return Decision.new(operator, "allow", now, ip=ip, reason=reason)

    def make_disallow(self, operator: str, text: str, reason: str, now: float) -> Decision:
        ip = address(text)
        if any(str(net) == ip for net in self.configured):
            raise DecisionError(
                f"{ip} is in [publisher] allowlist of fail2ban-cluster.conf: change it there"
            )
        if ip not in self.added:
            raise DecisionError(f"{ip} is not in the allowlist")
        return Decision.new(operator, "disallow", now, ip=ip, reason=reason)

    # Decisions: what each does, here or on a peer hub.

    def apply(self, decision: Decision, now: float) -> Applied:
        """Do what a decision says (once: a decision seen before does nothing) and log it."""
        if decision.id in self.known:
            return Applied(outcome="known")
        self.known.add(decision.id)
        self.table.journal.append(("decision", decision))
        applied = getattr(self, f"_{decision.verb}")(decision, now)
        return applied

    def _ban(self, decision: Decision, now: float) -> Applied:
        jail, ip = decision.jail or "", decision.ip or ""
        try:  # a peer's decision meets this hub's rules too
            self.check_bannable(jail, ip, now)
        except DecisionError as error:
            self.table.journal.append(("ended", jail, ip, decision.time))
            return Applied(outcome=f"refused: {error}")
        origin, bantime = decision.origin, decision.bantime
        event = BanEvent(decision.id, origin, jail, BAN, ip, decision.time, bantime)
        event = event.validated(ANY_NETWORK)
        outcome, update = self.table.apply(event, now)
        active = self.table.bans.get((jail, ip))
        if active is not None and decision.origin in active.origins:  # a peer's table had it too
            self.bans[(jail, ip)] = decision
        return Applied([update] if update else [], outcome=outcome.value)

    def _unban(self, decision: Decision, now: float) -> Applied:
        applied = self._lift(decision, decision.jail)
        self.holds.add(decision)
        applied.holds_changed = True
        applied.outcome = f"lifted {len(applied.lifted)}"
        return applied

    def _allow(self, decision: Decision, now: float) -> Applied:
        self.added[decision.ip or ""] = decision
        self._renew_allowlist()
        applied = self._lift(decision, None)
        applied.allowlist_changed = True
        applied.outcome = f"allowlisted, lifted {len(applied.lifted)}"
        return applied

    def _disallow(self, decision: Decision, now: float) -> Applied:
        self.added.pop(decision.ip or "", None)
        self._renew_allowlist()
        return Applied(outcome="taken out", allowlist_changed=True)

    def _accept(self, decision: Decision, now: float) -> Applied:
        self.removed.pop(decision.key or "", None)
        return Applied(outcome="accepted", accept=(decision.node or "", decision.key or ""))

    def _remove(self, decision: Decision, now: float) -> Applied:
        if decision.key:
            self.removed[decision.key] = decision.node or ""
        return Applied(outcome="removed", remove=decision.node)

    def _lift(self, decision: Decision, jail: str | None) -> Applied:
        """Every origin of every ban of `jail` (every jail: None) that overlaps the
        decision's address or network: its ban ends in the cluster at once."""
        applied = Applied()
        lifting = Allowlist([ipaddress.ip_network(decision.ip or "", strict=False)])
        keys = [key for key in self.table.bans if jail in (None, key[0]) and lifting.covers(key[1])]
        for key in sorted(keys):
            ban_jail, ip = key
            event_id = hashlib.md5(f"{decision.id} {ban_jail} {ip}".encode()).hexdigest()
            unban = BanEvent(event_id, decision.origin, ban_jail, UNBAN, ip, decision.time)
            update = self.table.lift(ban_jail, ip, unban.validated(ANY_NETWORK))
            if update is not None:
                applied.updates.append(update)
            applied.lifted.append(key)
            if self.bans.pop(key, None) is not None:
                self.table.journal.append(("ended", ban_jail, ip, decision.time))
        return applied

    def set_configured(
        self, allowlist: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]
    ) -> None:
        """[publisher] allowlist read again (a reload)."""
        self.configured = list(allowlist)
        self._renew_allowlist()

    def _renew_allowlist(self) -> None:
        added = [ipaddress.ip_network(ip, strict=False) for ip in self.added]
        self.allowlist = Allowlist([*self.configured, *added])

    def restore(self, decisions: Iterable[Decision], now: float) -> None:
        """At start: the log replayed for what the ban table does not hold itself."""
        for decision in decisions:
            self.known.add(decision.id)
            if decision.verb == "ban":
                key = (decision.jail or "", decision.ip or "")
                active = self.table.bans.get(key)
                if active is not None and decision.origin in active.origins:
                    self.bans[key] = decision
            elif decision.verb == "unban":
                self.holds.add(decision)
            elif decision.verb == "allow":
                self.added[decision.ip or ""] = decision
            elif decision.verb == "disallow":
                self.added.pop(decision.ip or "", None)
            elif decision.verb == "accept":
                self.removed.pop(decision.key or "", None)
            elif decision.key:
                self.removed[decision.key] = decision.node or ""
        self.holds.current(now)
        self._renew_allowlist()

    def allowlist_rows(self) -> list[dict]:
        """The allowlist as `allowlist` shows it: the configuration's, then the operators'."""
        rows = [{"network": str(net), "source": "configuration"} for net in self.configured]
        for ip, decision in self.added.items():
            rows.append(
                {
                    "network": ip,
                    "source": f"operator {decision.operator}",
                    "since": decision.time,
                    "reason": decision.reason,
                }
            )
        return rows


def address(text: str) -> str:
    """An address or network to lift or allowlist: any width."""
    return canonical_address(text, ANY_NETWORK)


def check_jail(jail: str, known: set[str]) -> None:
    if jail not in known:
        names = ", ".join(sorted(known)) or "none"
        raise DecisionError(f"unknown jail {jail!r}: the cluster knows {names}")


def ban_rows(
    table: BanTable,
    operators: Operators,
    nodes: set[str],
    applied_by: dict[str, int],
    now: float,
    jail: str | None = None,
    node: str | None = None,
    network: str | None = None,
) -> list[dict]:
    """Every cluster ban `bans` lists, with its origins and how each got there: a node's
    report, an operator's decision, or a node the hub no longer accepts, whose ban ends when
    its time is up ("expiry"). `applied_by`: node -> the last sequence it applied of this
    hub's state; `network` keeps the bans that overlap it."""
    within = Allowlist([ipaddress.ip_network(network, strict=False)]) if network else None
    rows = []
    for (ban_jail, ip), active in table.bans.items():
        if jail is not None and ban_jail != jail:
            continue
        if node is not None and node not in active.origins:
            continue
        if within is not None and not within.covers(ip):
            continue
        origins = []
        for origin, expiry in active.origins.items():
            entry = {"node": origin, "until": expiry}
            if is_operator_origin(origin):
                decision = operators.bans.get((ban_jail, ip))
                entry["source"] = "operator"
                if decision is not None:
                    entry["operator"] = decision.operator
                    entry["reason"] = decision.reason
            else:
                entry["source"] = "report" if origin in nodes else "expiry"
            origins.append(entry)
        expiries = [origin["until"] for origin in origins]
        applied = [
            name
            for name, sequence in sorted(applied_by.items())
            if sequence >= active.seq and name not in active.origins
        ]
        rows.append(
            {
                "jail": ban_jail,
                "ip": ip,
                "since": active.event.time,
                "until": None if None in expiries else max(expiries, default=None),
                "origins": origins,
                "applied": applied,
            }
        )
    rows.sort(key=lambda row: (row["since"], row["jail"], row["ip"]))
    return rows
