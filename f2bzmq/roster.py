"""Who is in the cluster: the nodes a hub accepts, the ones asking to join, and what each
node's daemons last told the hub.

A node joins with a key the hub does not know: its monitor's hellos (or `join`) name it,
and the hub lists it as pending with its key's fingerprint and address until an operator
accepts it (after comparing the fingerprint the node printed) or removes it. `Roster`
keeps these requests, each monitor's hellos and each subscriber's presence, and says who
may be accepted or removed; the shell writes and deletes the key files. Nothing here
touches a socket, the disk or a clock.
"""

from __future__ import annotations

from collections.abc import Container, Iterable
from dataclasses import dataclass, field

from .protocol import Presence

MAX_PENDING = 100  # join requests kept; the oldest goes when a new key comes past it
# A monitor says hello every 2 s, a subscriber its presence every PRESENCE_INTERVAL: a
# node not heard for three of them is no longer connected.
PRESENCE_INTERVAL = 2.0
CONNECTED = 3 * PRESENCE_INTERVAL


class RosterError(ValueError):
    """An accept or remove that can't be done; the text is the console's one line."""


@dataclass
class JoinRequest:
    """A key the hub does not accept yet, as the node that holds it presents itself."""

    key: str  # z85
    fingerprint: str
    name: str | None  # from its hello (a monitor from before names gives none)
    address: str
    version: str | None
    first: float
    last: float


@dataclass
class Heard:
    """What one accepted node's daemons last said to this hub."""

    monitor: float | None = None  # its monitor's last hello
    monitor_version: str | None = None
    subscriber: float | None = None  # its subscriber's last presence
    presence: Presence | None = None
    peer: bytes | None = None  # the subscriber's snapshot connection, for pushes
    address: str = ""
    via: str | None = None  # the relay its subscriber follows, which told its presence


@dataclass
class Roster:
    """Join requests and what the accepted nodes say, for `nodes` and `nodes pending`."""

    pending: dict[str, JoinRequest] = field(default_factory=dict)  # z85 key -> request
    heard: dict[str, Heard] = field(default_factory=dict)  # node -> what it said

    def on_join(
        self,
        key: str,
        fingerprint: str,
        name: str | None,
        address: str,
        version: str | None,
        now: float,
    ) -> bool:
        """A hello from a key the hub does not accept: True when it is new."""
        request = self.pending.get(key)
        if request is not None:
            request.name = name or request.name
            request.address = address or request.address
            request.version = version or request.version
            request.last = now
            return False
        while len(self.pending) >= MAX_PENDING:
            del self.pending[min(self.pending, key=lambda k: self.pending[k].last)]
        self.pending[key] = JoinRequest(key, fingerprint, name, address, version, now, now)
        return True

    def on_hello(self, node: str, version: str | None, address: str, now: float) -> None:
        heard = self.heard.setdefault(node, Heard())
        heard.monitor = now
        heard.monitor_version = version or heard.monitor_version
        heard.address = address or heard.address

    def on_presence(
        self, node: str, presence: Presence, address: str, peer: bytes, now: float
    ) -> None:
        heard = self.heard.setdefault(node, Heard())
        heard.subscriber, heard.presence, heard.peer, heard.via = now, presence, peer, None
        heard.address = address or heard.address

    def on_relayed(
        self,
        relay: str,
        presence: Presence,
        relays: Iterable[str],
        accepted: Container[str],
        now: float,
    ) -> bool:
        """Node `relay` tells of the subscriber of node `presence.node`, which follows it:
        False when this hub does not believe it. Only the relays the hub's configuration
        names (`relays`) are believed, each for another node whose key the hub accepts
        (made-up names can't grow the roster), of a node that is no relay itself. What
        the node told this hub itself lately counts first. The node gets the holds from
        the relay, so none are pushed to it from here."""
        node = presence.node
        if relay not in relays:
            return False
        if node is None or node == relay or node not in accepted or presence.relay:
            return True  # believed, and of no node the hub lists through a relay
        heard = self.heard.setdefault(node, Heard())
        if heard.via is None and heard.peer is not None and _recent(heard.subscriber, now):
            return True
        heard.subscriber, heard.presence, heard.peer, heard.via = now, presence, None, relay
        return True

    def subscribers(self, now: float) -> list[tuple[str, bytes]]:
        """(node, snapshot connection) of each subscriber heard lately."""
        return [
            (node, heard.peer)
            for node, heard in sorted(self.heard.items())
            if heard.peer is not None and _recent(heard.subscriber, now)
        ]

    def accept(
        self, name: str, fingerprint: str | None, nodes: dict[str, str]
    ) -> tuple[str, str | None]:
        """The key to accept as node `name`, and the key it replaces (a new key of a known
        node). `nodes`: z85 key -> name of the keys accepted now."""
        asking = [r for r in self.pending.values() if r.name == name]
        if fingerprint is not None:
            asking = [r for r in self.pending.values() if r.fingerprint == fingerprint]
            if not asking:
                raise RosterError(f"no key with fingerprint {fingerprint} asks to join")
            if asking[0].name not in (None, name):
                raise RosterError(f"the key {fingerprint} asks to join as {asking[0].name}")
        if not asking:
            raise RosterError(f"no node {name} asks to join (see `nodes pending`)")
        if len(asking) > 1:
            raise RosterError(
                f"{len(asking)} keys ask to join as {name}: compare the fingerprints and "
                "name the one to accept with --fingerprint"
            )
        key = asking[0].key
        if key in nodes:
            raise RosterError(f"that key is node {nodes[key]}'s already")
        replaced = next((k for k, n in nodes.items() if n == name), None)
        return key, replaced

    def accepted(self, name: str, key: str) -> None:
        """The key is node `name`'s now: it asks no more, nor does any other key for `name`."""
        self.pending = {k: r for k, r in self.pending.items() if k != key and r.name != name}

    def remove(self, name: str, nodes: dict[str, str]) -> list[str]:
        """The keys to shut out as node `name`: its accepted key, and any asking in its name."""
        keys = [key for key, node in nodes.items() if node == name]
        keys += [key for key, request in self.pending.items() if request.name == name]
        if not keys:
            raise RosterError(f"no node {name} (see `nodes` and `nodes pending`)")
        return keys

    def removed(self, name: str, keys: list[str]) -> None:
        for key in keys:
            self.pending.pop(key, None)
        self.heard.pop(name, None)

    def pending_rows(self) -> list[dict]:
        return [
            {
                "node": request.name,
                "fingerprint": request.fingerprint,
                "address": request.address,
                "version": request.version,
                "first": request.first,
                "last": request.last,
            }
            for request in sorted(self.pending.values(), key=lambda r: r.first)
        ]

    def node_rows(
        self,
        nodes: dict[str, str],
        fingerprints: dict[str, str],
        last_report: dict[str, float],
        state: str,
        sequence: int,
        now: float,
    ) -> list[dict]:
        """Every accepted node: key fingerprint, address, whether its monitor and its
        subscriber are connected, synced with this hub's state, how many updates behind,
        its last report, its version."""
        rows = []
        for key, name in sorted(nodes.items(), key=lambda item: item[1]):
            heard = self.heard.get(name, Heard())
            presence = heard.presence
            follows = presence is not None and presence.publisher == state
            subscriber = _recent(heard.subscriber, now)
            rows.append(
                {
                    "node": name,
                    "fingerprint": fingerprints.get(key, ""),
                    "address": heard.address,
                    "monitor": _recent(heard.monitor, now),
                    "subscriber": subscriber,
                    "relay": bool(presence and presence.relay),
                    "via": heard.via if subscriber else None,
                    "synced": bool(subscriber and follows and presence.synced),
                    "lag": sequence - presence.seq if subscriber and follows else None,
                    "last_report": last_report.get(name),
                    "version": (presence.version if presence else None) or heard.monitor_version,
                }
            )
        return rows

    def applied(self, state: str, now: float) -> dict[str, int]:
        """Node -> the last sequence of `state` its subscriber applied, of those heard lately
        (a relay applies none)."""
        return {
            node: heard.presence.seq
            for node, heard in self.heard.items()
            if heard.presence is not None
            and not heard.presence.relay
            and heard.presence.publisher == state
            and heard.presence.synced
            and _recent(heard.subscriber, now)
        }

    def jails(self) -> set[str]:
        """The jails the nodes' fail2bans have, as their subscribers said."""
        return {jail for h in self.heard.values() if h.presence for jail in h.presence.jails}


def _recent(moment: float | None, now: float) -> bool:
    return moment is not None and now - moment <= CONNECTED
