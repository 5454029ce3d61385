"""The hub's admission rules: which reported events the cluster takes, and what they change.

A report comes in as its frames with the name of the key that sent it (or an old
monitor's request with its address) and the time; out come the replies to send and
the updates to broadcast. In between: the wire's checks, the hub's own rules (a key
speaks for its own node only, a withdrawn key for nobody, the allowlist is never
banned), each sender's rate limit, then the ban table. Nothing here touches a socket
or the disk: the publisher stores the table before it sends a reply, so an ACK still
means stored, and every rule is tested without a process.
"""

from __future__ import annotations

import logging

from . import legacy, protocol
from .addresses import Allowlist
from .config import Config
from .holds import Holds
from .keys import ADMIN_USER, HUB
from .metrics import DelayHistogram
from .protocol import BanEvent, ProtocolError
from .ratelimit import TokenBuckets
from .runtime import RateLimitedLog, clock
from .state import BanTable, Outcome, Update

log = logging.getLogger("f2bzmq.admission")

# The share of a node's burst that re-reported bans (after a rotation, to a hub rebuilding
# its table) may not take: what is left for the node's new bans and unbans, so a rebuild
# of thousands never makes a fresh ban wait.
FRESH_RESERVE = 0.1


class TryLater(ProtocolError):
    """A refusal for now, not for good: the monitor keeps the event and sends it again."""


class Admission:
    """The hub's rules for every reported event, and what it counts of them."""

    def __init__(self, config: Config, table: BanTable) -> None:
        self.table = table  # the cluster's bans: where an admitted event goes
        self.networks = config.network_limits()  # how wide a banned network may be
        self.allowlist = Allowlist(config.publisher.allowlist)  # never banned, whoever asks
        self.holds = Holds()  # what operators lifted and hold: not banned again meanwhile
        self.buckets = TokenBuckets(config.publisher.rate_limit, config.publisher.rate_burst)
        self.reserve = FRESH_RESERVE * config.publisher.rate_burst  # tokens re-reports leave
        # Why the hub can't take events now (its store fails): each gets a retry NAK.
        self.unavailable: str | None = None
        self.legacy_token = config.publisher.legacy_token  # old monitors' secret; "": none
        # The names of the node keys the hub accepts now: the publisher reads them from
        # its authenticator at start and on SIGHUP; none without keys.
        self.authorized: frozenset[str] = frozenset()
        self.refusals = RateLimitedLog(log)
        # reports: messages from monitors, each of one or more events
        self.counters = {"reports": 0, "accepted": 0, "refused": 0, "duplicates": 0}
        self.last_report: dict[str, float] = {}  # node name -> when it last reported
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
                event = BanEvent.decode(body, self.networks)
                self._authorize(event, user, now)
                outcome, update = self._admit(event, user or event.node, now, keep)
            except ProtocolError as error:
                naks.append(self._refuse(protocol.peek_id(body), error, user))
                continue
            acks.append(protocol.ack_body(event.id, outcome.value))
            if update is not None:
                updates.append(update)
        return protocol.encode_replies(acks, naks), updates

    def handle_legacy(
        self, request: list[bytes], peer: str, now: float
    ) -> tuple[bytes, Update | None]:
        """One old monitor's request (the frames after its envelope) from address `peer`:
        the reply (the report echoed, or the old NAK) and what to broadcast once stored."""
        try:
            report = legacy.parse_report(request, self.legacy_token, self.networks, now)
            event = report.event
            if event.node in self.authorized:
                # A node with a key reports through the encrypted endpoint: its name can't
                # be borrowed on the plain one.
                raise ProtocolError(f"node {event.node} has a key: it must use it")
            self._authorize(event, None, now)
            _, update = self._admit(event, event.node, now)
        except ProtocolError as error:
            self.counters["refused"] += 1
            # Keyed by the peer's address, not by the reason: that holds the sender's text.
            self.refusals.warning(
                f"legacy:{peer}", "refused a legacy report from %s: %s", peer, error
            )
            return legacy.LEGACY_NAK, None
        return report.echo, update

    def _authorize(self, event: BanEvent, user: str | None, now: float) -> None:
        """Who may report what: raise ProtocolError saying why not."""
        if user is not None:
            if user == HUB or user.startswith(ADMIN_USER):
                raise ProtocolError("only node keys report bans")
            if user not in self.authorized:
                raise ProtocolError("this node's key has been withdrawn")
            if event.node != user:
                raise ProtocolError(f"node {event.node!r} reported with the key of {user!r}")
        if protocol.is_operator_origin(event.node):
            raise ProtocolError("names starting with 'operator.' are the operators'")
        if event.action == protocol.BAN:
            if self.allowlist.covers(event.ip):
                raise ProtocolError(f"{event.ip} is in the hub's allowlist")
            held = self.holds.holding(event.jail, event.ip, now)
            if held is not None:
                hold, operator = held
                raise ProtocolError(
                    f"{event.ip} is held by operator {operator} until {clock(hold.until)}"
                )

    def _admit(
        self, event: BanEvent, sender: str, now: float, keep: float = 0.0
    ) -> tuple[Outcome, Update | None]:
        """An authorized event into the table, paid for from `sender`'s bucket if it changes
        anything there (leaving `keep` tokens in it)."""
        if self.unavailable is not None:
            raise TryLater(self.unavailable)
        if self.table.changes(event, now) and not self.buckets.allow(sender, now, keep):
            rate = self.buckets.rate
            raise TryLater(f"rate limit: node {event.node} sends more than {rate:g} events/s")
        outcome, update = self.table.apply(event, now)
        self.last_report[event.node] = now
        if outcome is Outcome.DUPLICATE:
            self.counters["duplicates"] += 1
        else:
            self.counters["accepted"] += 1
            self.accept_delays.observe(now - event.time)
        if update is None:
            log.debug("%s: %s", event.describe(), outcome.value)
        return outcome, update

    def _refuse(self, event_id: str, error: ProtocolError, user: str | None) -> bytes:
        """A NAK body with the reason, logged at a bounded rate."""
        self.counters["refused"] += 1
        who = f" from {user}" if user else ""
        # Keyed by node, never by the reason: a hostile peer chooses the reason's text.
        self.refusals.warning(f"report {user}", "refused a report%s: %s", who, error)
        return protocol.nak_body(event_id, str(error), isinstance(error, TryLater))
