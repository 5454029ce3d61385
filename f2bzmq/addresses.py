"""Addresses as sets of integers: the allowlists every ban is checked against, cheaply.

Nothing here parses the wire (`protocol.canonical_address` does that); this module
answers "does this range hold that address?" for addresses already in canonical form,
and names the special-purpose ranges no ban may touch.
"""

from __future__ import annotations

import bisect
import ipaddress
import socket
from collections.abc import Iterable
from typing import Union

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

# Ranges that are never an attacker's address, and whose ban cuts a node off from
# itself or its own network segment: a ban of 0.0.0.0 or 224.0.0.0/4 reaches every
# node's firewall, one of 169.254.169.254 its cloud's metadata service. Private ranges
# (10.0.0.0/8, …) and the documentation ranges are not here: attackers live there too.
SPECIAL_PURPOSE: tuple[tuple[Network, str], ...] = tuple(
    (ipaddress.ip_network(network), name)
    for network, name in (
        ("0.0.0.0/8", "unspecified"),  # "this network", 0.0.0.0 among it (RFC 791)
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),  # and the clouds' metadata service
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved and broadcast"),  # (RFC 1112) with the broadcast 255.255.255.255
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("fe80::/10", "link-local"),
        ("ff00::/8", "multicast"),
    )
)


def special_purpose(ip: str) -> str | None:
    """The kind of special-purpose range ("loopback", …) that holds the address, or that
    the banned network overlaps; None for an address a ban may name."""
    network = ipaddress.ip_network(ip, strict=False)
    for special, name in SPECIAL_PURPOSE:
        if special.version == network.version and special.overlaps(network):
            return name
    return None


def plain_ipv4(value: str) -> int | None:
    """The address as an int when `value` is a canonical dotted quad, else None."""
    try:
        packed = socket.inet_pton(socket.AF_INET, value)
    except (OSError, ValueError):  # ValueError: an embedded NUL
        return None
    # inet_pton refuses leading zeros and short forms; the round trip makes sure.
    if socket.inet_ntop(socket.AF_INET, packed) != value:
        return None
    return int.from_bytes(packed, "big")


class Allowlist:
    """Networks never to ban, as sorted, merged integer ranges per family: checked on every
    ban, so a look-up is a bisection, however many networks (nodes, hubs) it holds."""

    def __init__(self, networks: Iterable[Network]) -> None:
        self.networks = list(networks)
        spans: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
        for net in self.networks:
            spans[net.version].append((int(net.network_address), int(net.broadcast_address)))
        self.lows: dict[int, list[int]] = {}
        self.highs: dict[int, list[int]] = {}
        for version, ranges in spans.items():
            merged: list[list[int]] = []
            for low, high in sorted(ranges):
                if merged and low <= merged[-1][1] + 1:
                    merged[-1][1] = max(merged[-1][1], high)
                else:
                    merged.append([low, high])
            self.lows[version] = [low for low, _ in merged]
            self.highs[version] = [high for _, high in merged]

    def covers(self, ip: str) -> bool:
        """True when an allowlisted network holds the address or overlaps the banned network."""
        first = plain_ipv4(ip)
        if first is not None:
            version, last = 4, first
        else:
            network = ipaddress.ip_network(ip, strict=False)
            version = network.version
            first, last = int(network.network_address), int(network.broadcast_address)
        # The last range starting at or before the ban's end is the only one that can
        # overlap it: the ones before it end before it starts.
        index = bisect.bisect_right(self.lows[version], last) - 1
        return index >= 0 and self.highs[version][index] >= first
