"""The hub's admission rules: which reported events the cluster takes, and what they change.

A report comes in as its frames with the name of the key that sent it (or an old
monitor's request with its address) and the time; out come the replies to send and
the updates to broadcast. In between: the wire's checks, the hub's own rules (a key
speaks for its own node only, a withdrawn key for nobody, the allowlist is never
banned), each sender's rate limit, then the ban table. Failure reports go to the cluster
jails (`detection`), and the bans they decide, like the longer bans a node's ban gets from
its address's history, pass the same rules into the same table. Nothing here touches a socket
or the disk: the publisher stores the table before it sends a reply, so an ACK still
means stored, and every rule is tested without a process.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable

from . import legacy, protocol
from .addresses import SPECIAL_PURPOSE, Allowlist, special_purpose
from .config import Config, HubAllowlist
from .detection import Decision, Detection
from .holds import Holds
from .keys import ADMIN_USER, HUB
from .metrics import DelayHistogram
from .protocol import CLUSTER, BanEvent, FailureReport, ProtocolError
from .ratelimit import TokenBuckets
from .runtime import RateLimitedLog, clock
from .state import BanTable, Outcome, Update

log = logging.getLogger("f2bzmq.admission")

# The share of a node's burst that re-reported bans (after a rotation, to a hub rebuilding
# its table) may not take: what is left for the node's new bans and unbans, so a rebuild
# of thousands never makes a fresh ban wait.
FRESH_RESERVE = 0.1


MAX_NODES = 1000  # names without a key the hub remembers (and `status` lists)


def legacy_sender(peer: str | None) -> str:
    """Whose bucket an old monitor's report is paid from: its address, an IPv6 one by its
    /64, which one host can fill with addresses."""
    if peer and ":" in peer:
        try:
            return f"{ipaddress.IPv6Network((peer, 64), strict=False)}"
        except ValueError:
            pass
    return peer or "an unknown address"


def _network(address: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """An address as the one-address network bans are compared with: ::ffff:a.b.c.d is
    a.b.c.d, as fail2ban and the wire have it."""
    parsed = ipaddress.ip_address(address.partition("%")[0])
    return ipaddress.ip_network(getattr(parsed, "ipv4_mapped", None) or parsed)


class TryLater(ProtocolError):
    """A refusal for now, not for good: the monitor keeps the event and sends it again."""


class Admission:
    """The hub's rules for every reported event, and what it counts of them."""

    def __init__(self, config: Config, table: BanTable, detection: Detection | None = None) -> None:
        self.table = table  # the cluster's bans: where an admitted event goes
        self.detection = detection  # the cluster jails; None when none is configured
        self.networks = config.network_limits()  # how wide a banned network may be
        # Never banned, whoever asks: the configured networks, the operators' (`operated`,
        # which the shell sets from their decisions), and if the setting says so the
        # special-purpose ranges and the hubs' and nodes' addresses, which the shell tells
        # (`set_addresses`), in `allowlist`, one look-up for them all.
        self.hub_addresses: tuple[str, ...] = ()
        self.node_addresses: dict[str, tuple[str, ...]] = {}  # node name -> its addresses
        self.operated = Allowlist([])
        self.set_allowlist(config.publisher.allowlist)
        self.holds = Holds()  # what operators lifted and hold: not banned again meanwhile
        rate, burst, peak = (
            config.publisher.rate_limit,
            config.publisher.rate_burst,
            config.publisher.rate_peak,
        )
        self.buckets = TokenBuckets(rate, burst, peak=peak)  # per node name: one per key
        # Per address of old monitors, apart: a name they send is not proof of anything,
        # and made-up names must not cost a keyed node its bucket.
        self.legacy_buckets = TokenBuckets(rate, burst, max_keys=10_000, peak=peak)
        self.reserve = FRESH_RESERVE * burst  # tokens re-reports leave
        # Why the hub can't take events now (its store fails): each gets a retry NAK.
        self.unavailable: str | None = None
        self.legacy_token = config.publisher.legacy_token  # old monitors' secret; "": none
        # The names of the node keys the hub accepts now: the publisher reads them from
        # its authenticator at start and on SIGHUP; none without keys.
        self.authorized: frozenset[str] = frozenset()
        self.refusals = RateLimitedLog(log)
        # reports: messages from monitors, each of one or more events
        self.counters = {"reports": 0, "accepted": 0, "refused": 0, "duplicates": 0}
        # node name -> when it last reported; past MAX_NODES names the first-seen name
        # without a key (old monitors, a hub without keys) makes room, keyed nodes stay.
        self.last_report: dict[str, float] = {}
        self.accept_delays = DelayHistogram()  # the origin's Ban line -> admitted here

    def handle_report(
        self, frames: list[bytes], user: str | None, now: float
    ) -> tuple[list[list[bytes]], list[Update]]:
        """One report of the native endpoint (the frames after the peer's identity), sent
        with the key of node `user` (None without keys). Each event is judged on its own:
        the reply messages, one ACK for every event taken and one NAK for every event
        refused, and what to broadcast once the table is stored."""
        self.counters["reports"] += 1
        try:
            bodies = protocol.decode_report(frames)
        except ProtocolError as error:
            event_id = protocol.peek_id(frames[-1]) if len(frames) == 3 else ""
            return protocol.encode_replies([], [self._refuse(event_id, error, user)]), []
        acks: list[bytes] = []
        naks: list[bytes] = []
        updates: list[Update] = []
        keep = self.reserve if protocol.is_rereport(frames) else 0.0
        for body in bodies:
            try:
                event = protocol.decode_body(body, self.networks)
                if isinstance(event, FailureReport):
                    counted, decided = self._count(event, user, now)
                    acks.append(protocol.ack_body(event.id, counted))
                    updates.extend(decided)
                    continue
                self._authorize(event, user, now)
                outcome, update = self._admit(event, user or event.node, now, keep)
            except ProtocolError as error:
                naks.append(self._refuse(protocol.peek_id(body), error, user))
                continue
            acks.append(protocol.ack_body(event.id, outcome.value))
            if update is not None:
                updates.append(update)
            updates.extend(self._follow(event, outcome, now))
        return protocol.encode_replies(acks, naks), updates

    def handle_legacy(
        self, request: list[bytes], peer: str, now: float
    ) -> tuple[bytes | None, list[Update]]:
        """One old monitor's request (the frames after its envelope) from address `peer`:
        the reply (the report echoed, or the old NAK) and what to broadcast once stored:
        its ban or unban, and what the cluster jails decide of it, as of a node's.
        No reply (None) when the sender is past its rate limit: an old monitor never sends
        a refused report again, so it waits for its answer instead (REQ sends one request
        at a time), and the shell asks again at `legacy_ready_at`."""
        try:
            report = legacy.parse_report(request, self.legacy_token, self.networks, now)
            event = report.event
            if event.node in self.authorized:
                # A node with a key reports through the encrypted endpoint: its name can't
                # be borrowed on the plain one.
                raise ProtocolError(f"node {event.node} has a key: it must use it")
            self._authorize(event, None, now)
            outcome, update = self._admit(
                event, legacy_sender(peer), now, buckets=self.legacy_buckets
            )
        except TryLater as error:
            self.refusals.warning(
                f"legacy:{peer}", "holding a legacy report from %s: %s", peer, error
            )
            return None, []
        except ProtocolError as error:
            self.counters["refused"] += 1
            # Keyed by the peer's address, not by the reason: that holds the sender's text.
            self.refusals.warning(
                f"legacy:{peer}", "refused a legacy report from %s: %s", peer, error
            )
            return legacy.LEGACY_NAK, []
        decided = self._follow(event, outcome, now)
        return report.echo, decided if update is None else [update, *decided]

    def legacy_ready_at(self, peer: str, now: float) -> float:
        """When an old monitor at `peer`, held back by its rate limit or by a store that
        fails, may be heard again."""
        if self.unavailable is not None:
            return now + legacy.STORE_WAIT
        return self.legacy_buckets.ready_at(legacy_sender(peer), now)

    def never_banned(self, ip: str) -> str | None:
        """Why no ban may name `ip` (the allowlist and all it learned), or None."""
        return self._never_banned(ip) if self.allowlist.covers(ip) else None

    def set_allowlist(self, setting: HubAllowlist) -> None:
        """[publisher] allowlist, at start and when a reload reads it again; the shell then
        tells the addresses it names (`set_addresses`)."""
        self.setting = setting
        self.configured = Allowlist(setting.networks)
        self.special = Allowlist(net for net, _ in SPECIAL_PURPOSE if setting.special_purpose)
        self.set_addresses((), {})

    def set_operated(self, allowlist: Allowlist) -> None:
        """The networks operators allowlisted (`allowlist add`), as their decisions stand."""
        self.operated = allowlist
        self.set_addresses(self.hub_addresses, self.node_addresses)

    def set_addresses(self, hubs: Iterable[str], nodes: dict[str, Iterable[str]]) -> None:
        """The hubs' own addresses and where each node connects from, as the shell learns
        them: each kept out of bans as far as the allowlist setting names it."""
        self.hub_addresses = tuple(hubs) if self.setting.hubs else ()
        self.node_addresses = (
            {node: tuple(addresses) for node, addresses in nodes.items()}
            if self.setting.nodes
            else {}
        )
        learned = [*self.hub_addresses, *(a for ips in self.node_addresses.values() for a in ips)]
        self.allowlist = Allowlist(
            [
                *self.configured.networks,
                *self.operated.networks,
                *self.special.networks,
                *map(_network, learned),
            ]
        )

    def _never_banned(self, ip: str) -> str:
        """Why the allowlist holds `ip`, for the NAK and the log."""
        if self.configured.covers(ip) or self.operated.covers(ip):
            return f"{ip} is in the hub's allowlist"
        verb = "holds" if "/" in ip else "is"
        kind = special_purpose(ip) if self.setting.special_purpose else None
        if kind:
            return f"{ip} {verb} a special-purpose address ({kind})"
        learned = [(address, "a hub's address") for address in self.hub_addresses]
        for node, addresses in self.node_addresses.items():
            learned += [(address, f"the address of node {node}") for address in addresses]
        for address, whose in learned:
            network = _network(address)
            if Allowlist([network]).covers(ip):
                which = "" if ip == str(network.network_address) else f" ({address})"
                return f"{ip} {verb} {whose}{which}"
        return f"{ip} is in the hub's allowlist"

    def _count(
        self, report: FailureReport, user: str | None, now: float
    ) -> tuple[str, list[Update]]:
        """A failure report into the cluster jails: the ACK's outcome, and the bans decided."""
        self._authorize_node(report.node, user)
        if self.unavailable is not None:
            raise TryLater(self.unavailable)
        last = self.last_report
        last[report.node] = now
        if len(last) > MAX_NODES:
            self._forget_a_name()
        if self.detection is None:
            return "ignored", []  # no cluster jail here: the monitor drops it all the same
        holds, allowlist = self.holds, self.allowlist

        def exempt(jail: str, ip: str) -> bool:
            return allowlist.covers(ip) or holds.holding(jail, ip, now) is not None

        decisions = self.detection.on_failures(report, now, exempt)
        if decisions is None:
            return Outcome.DUPLICATE.value, []
        return "counted", [
            update for decision in decisions for update in self.decide(decision, now)
        ]

    def _follow(self, event: BanEvent, outcome: Outcome, now: float) -> list[Update]:
        """What a node's ban or unban, taken into the table, means to the cluster jails: the
        longer ban its address's history asks for; failures counted again once it is lifted."""
        if self.detection is None or not self.detection.counts(event.jail):
            return []
        if event.action == protocol.BAN:
            if outcome in (Outcome.BANNED, Outcome.EXTENDED):
                decision = self.detection.on_ban(event, now)
                if decision is not None:
                    return self.decide(decision, now)
        elif outcome is Outcome.UNBANNED:
            keys = self.detection.table_keys(event.jail, event.ip)
            if not any(key in self.table.bans for key in keys):
                self.detection.on_lifted(event.jail, event.ip, now)
        return []

    def decide(self, decision: Decision, now: float) -> list[Update]:
        """A ban the cluster decided, by the hub's rules into the table."""
        event = decision.event()
        try:
            self._authorize(event, None, now, decided=True)
        except ProtocolError as error:
            self.refusals.warning(
                f"decision {decision.jail}", "%s: not banned: %s", decision.describe(), error
            )
            return []
        return self.table.take_decision(event, now, decision.describe())

    def _authorize_node(self, node: str, user: str | None) -> None:
        """Whether `user`'s key may speak for `node`: raise ProtocolError saying why not."""
        if node == CLUSTER:
            raise ProtocolError(f"{CLUSTER!r} names the cluster's own bans, never a node")
        if protocol.is_operator_origin(node):
            raise ProtocolError("names starting with 'operator.' are the operators'")
        if user is not None:
            if user == HUB or user.startswith(ADMIN_USER):
                raise ProtocolError("only node keys report bans")
            if user not in self.authorized:
                raise ProtocolError("this node's key has been withdrawn")
            if node != user:
                raise ProtocolError(f"node {node!r} reported with the key of {user!r}")

    def _authorize(
        self, event: BanEvent, user: str | None, now: float, decided: bool = False
    ) -> None:
        """Who may report what (`decided`: the cluster's own ban, which no node reports):
        raise ProtocolError saying why not."""
        if not decided:
            self._authorize_node(event.node, user)
        if event.action == protocol.BAN:
            if self.allowlist.covers(event.ip):
                raise ProtocolError(self._never_banned(event.ip))
            held = self.holds.holding(event.jail, event.ip, now)
            if held is not None:
                hold, operator = held
                raise ProtocolError(
                    f"{event.ip} is held by operator {operator} until {clock(hold.until)}"
                )

    def _admit(
        self,
        event: BanEvent,
        sender: str,
        now: float,
        keep: float = 0.0,
        buckets: TokenBuckets | None = None,
    ) -> tuple[Outcome, Update | None]:
        """An authorized event into the table, paid for from `sender`'s bucket if it changes
        anything there (leaving `keep` tokens in it). An old monitor (`buckets` the legacy
        ones) never lifts a keyed node's ban."""
        if self.unavailable is not None:
            raise TryLater(self.unavailable)
        changes = self.table.changes(event, now)
        if buckets is None:
            if changes and not self.buckets.allow(sender, now, keep=keep):
                rate = self.buckets.rate
                raise TryLater(f"rate limit: node {event.node} sends more than {rate:g} events/s")
            outcome, update = self.table.apply(event, now)
        else:
            if changes and not buckets.allow(sender, now, keep=keep):
                raise TryLater(f"rate limit: {sender} sends more than {buckets.rate:g} events/s")
            outcome, update = self.table.apply(event, now, self.authorized)
        last = self.last_report
        last[event.node] = now
        if len(last) > MAX_NODES:
            self._forget_a_name()
        if outcome is Outcome.DUPLICATE:
            self.counters["duplicates"] += 1
        else:
            self.counters["accepted"] += 1
            self.accept_delays.observe(now - event.time)
        if update is None:
            log.debug("%s: %s", event.describe(), outcome.value)
        return outcome, update

    def _forget_a_name(self) -> None:
        """The first-seen name without a key goes: made-up names can't grow the status."""
        for name in self.last_report:
            if name not in self.authorized:
                del self.last_report[name]
                return

    def _refuse(self, event_id: str, error: ProtocolError, user: str | None) -> bytes:
        """A NAK body with the reason, logged at a bounded rate."""
        self.counters["refused"] += 1
        who = f" from {user}" if user else ""
        # Keyed by node, never by the reason: a hostile peer chooses the reason's text.
        self.refusals.warning(f"report {user}", "refused a report%s: %s", who, error)
        return protocol.nak_body(event_id, str(error), isinstance(error, TryLater))
