"""The ban time of the cluster's own bans in the local fail2ban.

A ban the hubs decide (origin `protocol.CLUSTER`: a cluster jail's detection, or a ban
lengthened by the address's history) carries the time the cluster gave it, which may be
far from the sync jail's `bantime` (a mere upper bound for the other bans: the hub lifts
them). fail2ban's `banip` gives every address the jail's time, and no command sets one
address's; but fail2ban lengthens a ticket that `banip` names again while it is banned
to the jail's time from then (BanManager.addBanTicket), and keeps that time for the ticket
alone. So the subscriber bans as usual, then sets the jail's bantime to the cluster ban's,
names the addresses again and sets the jail's own back: `fail2ban-client get cluster banip
--with-time` shows the cluster's time, and the ban ends with it should the hubs be gone.

The pure part is here: which addresses need a longer time in which local jail. Meanwhile
the other tickets of the jail are judged by the borrowed bantime: fail2ban looks at them
only when one is due, and the two commands are a millisecond apart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from .protocol import CLUSTER, PERMANENT, BanEvent

Key = tuple[str, str]  # (local jail, address)
LONGEST = 2**31 - 1  # seconds: the longest finite ban time an event can carry


def longer(bantime: int, than: int | None) -> bool:
    """Whether a ban of `bantime` seconds (PERMANENT: for ever) outlasts one of `than`."""
    if than is None:
        return True
    if than == PERMANENT:
        return False
    return bantime == PERMANENT or bantime > than


def lengthen_to(bantime: int) -> list[int]:
    """The jail bantimes to borrow, in turn, to give a held ticket `bantime`. A ticket without
    a time of its own is judged by the borrowed one too, so naming it again with a permanent
    one changes nothing (for ever is not longer than for ever): it first gets the longest
    finite time, of its own, then the permanent one."""
    return [LONGEST, PERMANENT] if bantime == PERMANENT else [bantime]


def cluster_bantimes(
    bans: Iterable[BanEvent], local_jail: Callable[[str], str], wants: Callable[[BanEvent], bool]
) -> dict[Key, int]:
    """(local jail, address) -> the longest time of the cluster's own bans of it this node
    applies, from the bans of every synced hub's view."""
    found: dict[Key, int] = {}
    for event in bans:
        if event.node != CLUSTER or event.bantime is None or not wants(event):
            continue
        key = (local_jail(event.jail), event.ip)
        if longer(event.bantime, found.get(key)):
            found[key] = event.bantime
    return found


class BanTimes:
    """What this node's fail2ban was told of the cluster's bans' times."""

    def __init__(self) -> None:
        self.given: dict[Key, int] = {}  # (local jail, address) -> the time it got

    def plan(
        self, wanted: Mapping[Key, int], held: Callable[[str, str], bool]
    ) -> dict[str, dict[int, list[str]]]:
        """Local jail -> bantime -> the addresses it holds that must get that longer time."""
        plan: dict[str, dict[int, list[str]]] = {}
        for (jail, ip), bantime in sorted(wanted.items()):
            if held(jail, ip) and longer(bantime, self.given.get((jail, ip))):
                plan.setdefault(jail, {}).setdefault(bantime, []).append(ip)
        return plan

    def gave(self, jail: str, ips: Iterable[str], bantime: int) -> None:
        for ip in ips:
            self.given[(jail, ip)] = bantime

    def keep(self, held: Callable[[str, str], bool]) -> None:
        """Forget the addresses fail2ban no longer holds (unbanned, or lost)."""
        self.given = {key: bantime for key, bantime in self.given.items() if held(*key)}
