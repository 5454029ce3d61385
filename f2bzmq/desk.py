"""The hub's answers to the console: each verb of the admin channel.

A request comes in with the operator who sent it (the admin key's name) and `now`; out come
the result to send once the hub has stored what changed, and what each decision did
(`Applied`: updates to broadcast, holds to push, keys to write). Listings are read from the
ban table, the operators' state and the roster; decisions go through `Operators`, the same
way a peer hub's do. Nothing here touches a socket, the disk or a clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .decisions import Applied, Operators, address, ban_rows
from .keys import fingerprint
from .protocol import AdminRequest, Decision, ProtocolError
from .roster import Roster, RosterError
from .state import BanTable


@dataclass
class HubView:
    """What the shell knows that the desk lists: the keys it accepts, its state."""

    nodes: dict[str, str]  # z85 key -> node name, accepted now
    state: str  # the hub's state id
    sequence: int
    last_report: dict[str, float]  # node -> when it last reported
    jails: set[str]  # the jails the cluster knows besides the table's and the nodes'
    sync_jail: str  # an operator's ban goes there unless it names a jail
    name: str  # the hub's node name
    hub_key: str  # the hubs' public key (z85), which a joining node needs; "" without keys
    refusals: dict[str, tuple[float, int]]  # z85 key -> (last refused, how often), lately


@dataclass
class Answered:
    result: dict
    applied: list[tuple[Decision, Applied]] = field(default_factory=list)


BANS_PAGE = 5000  # bans per answer of `bans`: the console asks for the next page


class Desk:
    """The admin channel's verbs."""

    def __init__(self, table: BanTable, operators: Operators, roster: Roster) -> None:
        self.table = table
        self.operators = operators
        self.roster = roster

    def handle(self, request: AdminRequest, operator: str, view: HubView, now: float) -> Answered:
        """The result of one request; a refusal becomes {"error": …}."""
        try:
            return getattr(self, f"_{request.verb}")(request.args, operator, view, now)
        except (ProtocolError, RosterError) as error:
            return Answered({"error": str(error)})

    def known_jails(self, view: HubView) -> set[str]:
        jails = {jail for jail, _ in self.table.bans} | self.roster.jails() | view.jails
        return jails | {view.sync_jail}

    def _apply(self, decisions: list[Decision], now: float) -> list[tuple[Decision, Applied]]:
        return [(decision, self.operators.apply(decision, now)) for decision in decisions]

    def _bans(self, args: dict, operator: str, view: HubView, now: float) -> Answered:
        network = args.get("ip")
        if network is not None:
            network = address(network)
        rows = ban_rows(
            self.table,
            self.operators,
            set(view.nodes.values()),
            self.roster.applied(view.state, now),
            now,
            jail=args.get("jail"),
            node=args.get("node"),
            network=network,
        )
        offset = args.get("offset", 0)
        page = rows[offset : offset + BANS_PAGE]
        more = offset + len(page) < len(rows)
        return Answered({"bans": page, "total": len(rows), "more": more, **_header(view)})

    def _ban(self, args: dict, operator: str, view: HubView, now: float) -> Answered:
        jail = args.get("jail") or view.sync_jail
        decisions, refused = self.operators.make_bans(
            operator, args["items"], jail, args.get("reason", ""), self.known_jails(view), now
        )
        applied = self._apply(decisions, now)
        outcomes: dict[str, int] = {}
        for _, done in applied:
            outcomes[done.outcome] = outcomes.get(done.outcome, 0) + 1
        for decision, done in applied:
            if done.outcome.startswith("refused: "):
                refused.append((decision.ip or "", done.outcome.removeprefix("refused: ")))
        result = {
            "jail": jail,
            "banned": outcomes.get("banned", 0),
            "already": outcomes.get("extended", 0) + outcomes.get("expired", 0),
            "refused": [{"ip": ip, "reason": reason} for ip, reason in refused],
        }
        return Answered(result, applied)

    def _unban(self, args: dict, operator: str, view: HubView, now: float) -> Answered:
        decision = self.operators.make_unban(
            operator,
            args["ip"],
            args.get("jail"),
            args.get("hold", 0.0),
            args.get("reason", ""),
            self.known_jails(view),
            now,
        )
        applied = self._apply([decision], now)
        lifted = applied[0][1].lifted
        result = {
            "ip": decision.ip,
            "lifted": [{"jail": jail, "ip": ip} for jail, ip in lifted],
            "held_until": decision.time + decision.hold if decision.hold else None,
        }
        return Answered(result, applied)

    def _allowlist(self, args: dict, operator: str, view: HubView, now: float) -> Answered:
        return Answered({"allowlist": self.operators.allowlist_rows()})

    def _allow(self, args: dict, operator: str, view: HubView, now: float) -> Answered:
        decision = self.operators.make_allow(operator, args["ip"], args.get("reason", ""), now)
        applied = self._apply([decision], now)
        lifted = applied[0][1].lifted
        return Answered({"ip": decision.ip, "lifted": [list(key) for key in lifted]}, applied)

    def _disallow(self, args: dict, operator: str, view: HubView, now: float) -> Answered:
        decision = self.operators.make_disallow(operator, args["ip"], args.get("reason", ""), now)
        return Answered({"ip": decision.ip}, self._apply([decision], now))

    def _nodes(self, args: dict, operator: str, view: HubView, now: float) -> Answered:
        fingerprints = {key: fingerprint(key) for key in view.nodes}
        rows = self.roster.node_rows(
            view.nodes, fingerprints, view.last_report, view.state, view.sequence, now
        )
        return Answered({"nodes": rows, **_header(view)})

    def _pending(self, args: dict, operator: str, view: HubView, now: float) -> Answered:
        rows = self.roster.pending_rows()
        refused = [
            {
                "fingerprint": fingerprint(key),
                "node": self.operators.removed.get(key),
                "last": last,
                "count": count,
            }
            for key, (last, count) in sorted(view.refusals.items(), key=lambda i: -i[1][0])
            if key not in self.roster.pending
        ]
        result = {"pending": rows, "refused": refused, "hub_key": view.hub_key}
        return Answered({**result, **_header(view)})

    def _accept(self, args: dict, operator: str, view: HubView, now: float) -> Answered:
        name = args["node"]
        key, replaced = self.roster.accept(name, args.get("fingerprint"), view.nodes)
        decision = Decision.new(
            operator, "accept", now, node=name, key=key, reason=args.get("reason", "")
        )
        result = {"node": name, "fingerprint": fingerprint(key), "replaced": replaced is not None}
        return Answered(result, self._apply([decision], now))

    def _remove(self, args: dict, operator: str, view: HubView, now: float) -> Answered:
        name = args["node"]
        keys = self.roster.remove(name, view.nodes)
        decisions = [
            Decision.new(operator, "remove", now, node=name, key=key, reason=args.get("reason", ""))
            for key in keys
        ]
        return Answered({"node": name, "keys": len(keys)}, self._apply(decisions, now))


def _header(view: HubView) -> dict:
    return {"hub": view.name, "state": view.state, "sequence": view.sequence}
