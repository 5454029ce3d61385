"""What this node's jails must hold, and making fail2ban hold it.

`LocalPolicy`, `desired_bans`, `wants_address`, `removed_by_hand`, `HandUnbans` and
`BatchSizer` are pure rules; `LocalJails` compares the jails with the synced hubs' views
and applies the difference through fail2ban's socket, many addresses per banip/unbanip
command, and gives the cluster's own bans their time (`bantimes`).

A ban lifted by hand on this node (`fail2ban-client set cluster unbanip IP`, the habit
of every fail2ban user) is never put back behind the operator's back: when the jail is
read again and an address the cluster bans is gone before its ban's end, and the same
fail2ban-server runs, someone unbanned it here. It stays unbanned here, shown in
`status`, until the cluster bans it anew (a ban made after that moment) or no longer
bans it; banning it again by hand ends it too. A ban that ended (the sync jail's
bantime) or that a fail2ban restart lost is put back, as before.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from collections.abc import Callable, Iterable
from typing import Union

from . import protocol
from .addresses import Allowlist, special_purpose
from .bantimes import BanTimes, cluster_bantimes, lengthen_to
from .fail2ban_client import Fail2banClient, Fail2banError
from .metrics import DelayHistogram
from .protocol import ANY_NETWORK, BanEvent, NetworkLimits, ProtocolError
from .runtime import NOTICE, log_lines
from .sync import ClusterView

log = logging.getLogger(__name__)

RETRY_INTERVAL = 2.0  # fail2ban unreachable: try again this often
MAX_TRACKED = 100000  # origin times kept for the delay histogram while fail2ban is away
COMMAND_SECONDS = 0.25  # about how long one banip/unbanip command may keep fail2ban busy
# fail2ban lifts a ban whose time is up within a second or so of its end (its second-precise
# start + bantime): gone within this of the end, a ban ended; gone before, it was lifted.
END_SLACK = 5.0
FIRST_BATCH = 50  # addresses of a jail's first command, before anything was measured
BATCH_GROWTH = 4  # a command carries at most this many times the addresses of the last
SHIPPED_LIMITS = NetworkLimits()  # [general] min_prefix_v4/v6 as shipped

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


class BatchSizer:
    """Addresses per banip/unbanip command of each jail: as many as fail2ban ran in about
    COMMAND_SECONDS in that jail's last commands, at most ``limit``.

    fail2ban answers one command at a time and runs the jail's action for each address
    before it answers: stock shell actions cost it ~10 ms an address, a set action or
    none a tenth of a millisecond. A fixed size either blocks fail2ban (and its 10-s
    client timeout) for seconds with the first or wastes round trips with the second.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.last: dict[str, int] = {}  # jail -> addresses of its last command
        self.per_address: dict[str, float] = {}  # jail -> seconds an address, smoothed

    def size(self, jail: str) -> int:
        last = self.last.get(jail)
        if last is None:
            return min(self.limit, FIRST_BATCH)
        fits = int(COMMAND_SECONDS / max(self.per_address[jail], 1e-6))
        return max(1, min(self.limit, last * BATCH_GROWTH, fits))

    def reset(self) -> None:
        """Measure again from FIRST_BATCH: after a failed command (a timeout, or fail2ban
        restarted, maybe with slower actions) the old figures no longer hold."""
        self.last.clear()
        self.per_address.clear()

    def observe(self, jail: str, count: int, seconds: float) -> None:
        """A command of ``count`` addresses took ``seconds``."""
        cost = seconds / count
        old = self.per_address.get(jail)
        self.per_address[jail] = cost if old is None else (old + cost) / 2
        self.last[jail] = count


def listed_address(text: str) -> str:
    """An address as fail2ban lists it, in the canonical form of the cluster's events.

    fail2ban writes addresses with inet_ntop, which spells an IPv4-compatible IPv6 address
    `::10.0.0.5` where ipaddress (and so every event) writes `::a00:5`: compared as they
    are, the two would be lifted and set again at every full reconcile. What is not an
    address at all stays as listed (and, the cluster never banning it, is lifted)."""
    try:
        return protocol.canonical_address(text, ANY_NETWORK)
    except ProtocolError:
        return text


def fail2ban_address(ip: str) -> str:
    """The text fail2ban keys a ban on (its IPAddr.ntoa: inet_ntop, then /prefix), for an
    address in canonical form: `unbanip ::a00:5` finds no `::10.0.0.5` to lift."""
    if ":" not in ip:
        return ip  # IPv4: both write dotted quads alike
    address, slash, prefix = ip.partition("/")
    try:
        packed = socket.inet_pton(socket.AF_INET6, address)
    except OSError:
        return ip
    return socket.inet_ntop(socket.AF_INET6, packed) + slash + prefix


class LocalPolicy:
    """This node's rules: which jail a cluster ban goes to, and what it never bans.

    A hub relays what its own limits let through; this node may be stricter (a narrower
    network limit, an allowlist of its own). Each ban is judged on its own here, after
    decoding: one ban this node refuses never costs it the others of an update or a
    snapshot part, nor the hub's sequence numbers. Never banned: the allowlist, the
    special-purpose ranges, the hubs' own addresses (the node would cut itself off the
    cluster) and what each local jail's ignoreip names (`set banip` does not look at it).
    """

    def __init__(
        self,
        node: str,
        sync_jail: str,
        jail_map: dict[str, str],
        allowlist: Iterable[Network],
        networks: NetworkLimits = SHIPPED_LIMITS,
        special_ranges: Iterable[Network] = (),
        hubs: Iterable[Network] = (),
    ) -> None:
        self.node = node
        self.sync_jail = sync_jail
        self.jail_map = jail_map
        self.networks = networks
        self.special_ranges = Allowlist(special_ranges)
        self.hubs = Allowlist(hubs)
        self.set_allowlist(allowlist)
        self.ignored: dict[str, Allowlist] = {}  # local jail -> its fail2ban ignoreip

    def set_allowlist(self, allowlist: Iterable[Network]) -> None:
        """The allowlist, at start or from a reload: never banned from then on."""
        self.allowlist = Allowlist(allowlist)
        # All three at once: the one check of every ban at every full reconcile.
        self.never = Allowlist(
            [*self.allowlist.networks, *self.special_ranges.networks, *self.hubs.networks]
        )

    def local_jail(self, cluster_jail: str) -> str:
        return self.jail_map.get(cluster_jail, self.sync_jail)

    def ignore(self, jail: str, entries: Iterable[str]) -> list[str]:
        """A local jail's ignoreip, as fail2ban lists it; returns the entries that are no
        address or network (host names: looking them up would block the node's loop)."""
        networks, others = [], []
        for entry in entries:
            try:
                networks.append(ipaddress.ip_network(listed_address(entry), strict=False))
            except ValueError:
                others.append(entry)
        self.ignored[jail] = Allowlist(networks)
        return others

    def wants(self, event: BanEvent) -> bool:
        """A cluster ban this node applies: not its own report and not refused."""
        return event.node != self.node and self.refusal(event) is None

    def refusal(self, event: BanEvent) -> str | None:
        """Why this node never bans the event's address, or None when it may."""
        ip = event.ip
        if self.never.covers(ip):
            if self.allowlist.covers(ip):
                return "in this node's allowlist"
            if self.hubs.covers(ip):
                return "the address of a hub"
            name = special_purpose(ip)
            return f"a special-purpose address ({name or 'special_ranges'})"
        if "/" in ip:
            if not self.networks.allow:
                return "networks are not allowed on this node"
            widest = self.networks.min_prefix_v6 if ":" in ip else self.networks.min_prefix_v4
            if int(ip.rpartition("/")[2]) < widest:
                return f"wider than this node's limit of /{widest}"
        jail = self.local_jail(event.jail)
        ignored = self.ignored.get(jail)
        if ignored is not None and ignored.covers(ip):
            return f"in the ignoreip of [{jail}]"
        return None

    def local_jails(self) -> set[str]:
        return {self.sync_jail, *self.jail_map.values()}


def desired_bans(views: Iterable[ClusterView], policy: LocalPolicy) -> dict[str, set[str]]:
    """Local jail -> addresses it must ban, from every hub's view."""
    wanted: dict[str, set[str]] = {jail: set() for jail in policy.local_jails()}
    for view in views:
        for event in view.bans.values():
            if policy.wants(event):
                wanted[policy.local_jail(event.jail)].add(event.ip)
    return wanted


def wants_address(
    views: Iterable[ClusterView], policy: LocalPolicy, local_jail: str, ip: str
) -> bool:
    """desired_bans for one address: O(hubs × its jails), not O(every ban)."""
    for view in views:
        for jail in view.jails_of.get(ip, ()):
            if policy.local_jail(jail) == local_jail and policy.wants(view.bans[(jail, ip)]):
                return True
    return False


def cluster_bans(
    views: Iterable[ClusterView], policy: LocalPolicy, local_jail: str, ip: str
) -> list[BanEvent]:
    """The cluster's bans that put `ip` into `local_jail` here, from every view."""
    return [
        view.bans[(jail, ip)]
        for view in views
        for jail in view.jails_of.get(ip, ())
        if policy.local_jail(jail) == local_jail and policy.wants(view.bans[(jail, ip)])
    ]


def removed_by_hand(
    held_before: set[str], held_now: set[str], ends: dict[str, float | None], now: float
) -> list[str]:
    """Addresses a jail held at its last reading and no longer holds, though their ban had
    not ended (`ends`: when each ends, None for ever; unknown: taken as ended): lifted by
    someone other than this subscriber, which notes its own unbans at once."""
    gone = held_before - held_now
    return sorted(
        ip for ip in gone if ip in ends and (ends[ip] is None or ends[ip] > now + END_SLACK)
    )


class HandUnbans:
    """Bans lifted by hand on this node: (local jail, address) -> when that was noticed.
    Each is kept unbanned here until the cluster bans the address anew (a ban whose time is
    after that moment) or no longer bans it."""

    def __init__(self, entries: dict[tuple[str, str], float] | None = None) -> None:
        self.entries = dict(entries or {})

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, jail: str, ip: str, now: float) -> None:
        self.entries[(jail, ip)] = now

    def settle(self, jail: str, ip: str, bans: list[BanEvent]) -> str | None:
        """The cluster's bans of the address now: why its hand-made unban ends (and it is
        forgotten), or None while it stands."""
        since = self.entries.get((jail, ip))
        if since is None:
            return None
        if not bans:
            reason = "the cluster no longer bans it"
        elif any(event.time > since for event in bans):
            reason = "the cluster bans it anew"
        else:
            return None
        del self.entries[(jail, ip)]
        return reason

    def by_jail(self) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for jail, ip in sorted(self.entries):
            found.setdefault(jail, []).append(ip)
        return found


class LocalJails:
    """The local fail2ban's jails, kept equal to what the synced hubs' views ban, but for
    the bans lifted by hand here (`hand_unbans`)."""

    def __init__(self, policy: LocalPolicy, fail2ban: Fail2banClient, batch_size: int) -> None:
        self.policy = policy
        self.fail2ban = fail2ban
        self.batches = BatchSizer(batch_size)
        self.applied: dict[str, set[str]] | None = None  # what fail2ban has; None = unknown
        # What fail2ban held at the last reading, updated by every command since, when
        # reread() asked for a new reading: what it holds then is compared with it.
        self.before: dict[str, set[str]] | None = None
        self.ends: dict[str, dict[str, float | None]] = {}  # jail -> address -> ban's end
        self.jail_bantimes: dict[str, int] = {}  # jail -> its bantime, for the bans applied
        self.read_from: int | None = None  # the fail2ban-server process of the last reading
        self.hand_unbans = HandUnbans()
        self.hand_unbans_changed = False  # for the shell to store them
        self.pending = False  # the jails may differ from the cluster: reconcile
        # (cluster jail, address) changed by updates since the last reconcile; None after a
        # snapshot, a hub lost or an error: then compare everything.
        self.touched: set[tuple[str, str]] | None = None
        self.next_retry = 0.0
        self.ok = False  # the last call to fail2ban succeeded
        self.error: str | None = None  # why the last call failed, until one succeeds
        self.banned = 0
        self.unbanned = 0
        self.bantimes = BanTimes()  # the times fail2ban was given for the cluster's own bans
        # Each local jail's own bantime, given back after one is borrowed; read again with
        # the jails (a reload may have changed it), but not while it may still be lent out:
        # a borrow whose giving back failed (fail2ban busy or gone) is given back next time.
        self.configured_bantimes: dict[str, int] = {}
        self.lent: set[str] = set()
        self.origin_times: dict[str, float] = {}  # ip -> its update's origin time, until applied
        self.since = time.time()  # bans made before: their delay says how long we were away
        self.apply_delays = DelayHistogram()  # the origin's Ban line -> fail2ban's banip returned
        self.unhonoured: set[str] = set()  # ignoreip entries said to be no address, once each
        # Called after each command: applying a burst takes many, and the daemon is not stuck.
        self.progress: Callable[[], None] = lambda: None

    def take_update(self, event: BanEvent) -> None:
        """An update changed this ban in a hub's view: reconcile its address."""
        if self.touched is not None:
            self.touched.add((event.jail, event.ip))
        self._time_apply(event)
        self.pending = True

    def take_arrival(self, event: BanEvent) -> None:
        """A ban a snapshot holds: if this subscriber missed its update (a gap, a hub's
        restart) its delay counts like an update's, as long as it was made since the
        subscriber started; the jails are compared whole anyway (compare_all)."""
        if event.time >= self.since:
            self._time_apply(event)

    def _time_apply(self, event: BanEvent) -> None:
        """Keep a ban's origin time until it is applied, for the apply-delay histogram."""
        if event.action == protocol.BAN and len(self.origin_times) < MAX_TRACKED:
            self.origin_times.setdefault(event.ip, event.time)

    def compare_all(self) -> None:
        """The next reconcile compares every ban, not only the ones updates touched."""
        self.touched = None

    def reread(self, restarted: bool = False) -> None:
        """Read the jails from fail2ban again and compare everything: it may have lost or
        expired bans behind our back (a restart without its database, the jail's bantime),
        or someone lifted one by hand. After a restart nothing was lifted by hand."""
        if self.applied is not None and not restarted:
            self.before = self.applied
        self.applied = None
        self.touched = None
        self.pending = True

    def reconcile(self, synced: list[ClusterView]) -> None:
        """Make each local jail hold exactly what the cluster bans, in bounded batches."""
        if not synced:
            # Knowing nothing of the cluster is no reason to lift what the jail holds.
            self.pending = False
            return
        try:
            if self.applied is None:
                self.read_jails(synced)
                self.configured_bantimes = {
                    jail: bantime
                    for jail, bantime in self.configured_bantimes.items()
                    if jail in self.lent
                }
            for jail, (add, remove) in self.plan(synced).items():
                self._apply(jail, add, ban=True)
                self._apply(jail, remove, ban=False)
            self._give_bantimes(synced)
        except (Fail2banError, OSError) as error:
            self.unreachable(str(error))
            self.applied = None  # fail2ban may have restarted: read its jails again
            self.before = None  # and what it held is no longer known
            self.batches.reset()
            self.next_retry = time.monotonic() + RETRY_INTERVAL
            return
        self.reachable()
        self.pending = False
        self.touched = set()
        self.origin_times.clear()

    def _read_ignoreip(self, jail: str) -> None:
        """The jail's ignoreip, read again with its bans: fail2ban's reload may change it."""
        for entry in self.policy.ignore(jail, self.fail2ban.ignored(jail)):
            if entry not in self.unhonoured:
                self.unhonoured.add(entry)
                log.warning(
                    "[%s] ignoreip %s is no address or network: cluster bans do not honour it",
                    jail,
                    entry[:100],
                )

    def unreachable(self, error: str) -> None:
        """A call to fail2ban failed (a command, or a ping): say so once, until one works."""
        if self.error is None:
            log.error("fail2ban is not reachable: %s; retrying", error)
        self.ok = False
        self.error = error

    def reachable(self) -> bool:
        """A call to fail2ban worked; True when it had not before (it may have lost bans
        meanwhile: a restart without its database)."""
        if self.ok:
            return False
        log.info("fail2ban is reachable at %s", self.fail2ban.socket_path)
        self.ok = True
        self.error = None
        return True

    def read_jails(self, synced: list[ClusterView]) -> None:
        """What fail2ban holds, with each ban's end; an address the cluster bans that the
        jail lost before its end, from the same fail2ban-server, was unbanned by hand."""
        now = time.time()
        held: dict[str, set[str]] = {}
        ends: dict[str, dict[str, float | None]] = {}
        for jail in self.policy.local_jails():
            bans = [
                (listed_address(ip), start, bantime)
                for ip, start, bantime in self.fail2ban.banned_with_time(jail)
            ]
            held[jail] = {ip for ip, _, _ in bans}
            ends[jail] = {
                ip: None if bantime < 0 else start + bantime for ip, start, bantime in bans
            }
            self.jail_bantimes[jail] = self.fail2ban.bantime(jail)
            self._read_ignoreip(jail)
        same_server = self.read_from is not None and self.read_from == self.fail2ban.server_pid
        if self.before is not None and same_server:
            for jail, before in self.before.items():
                for ip in removed_by_hand(
                    before, held.get(jail, set()), self.ends.get(jail, {}), now
                ):
                    if wants_address(synced, self.policy, jail, ip):
                        log.log(
                            NOTICE,
                            "[%s] %s was unbanned here by hand: kept unbanned here until the "
                            "cluster bans it anew",
                            jail,
                            ip,
                        )
                        self.hand_unbans.add(jail, ip, now)
                        self.hand_unbans_changed = True
        for jail, ip in list(self.hand_unbans.entries):
            if ip in held.get(jail, ()):  # banned again by hand: the cluster's again
                del self.hand_unbans.entries[(jail, ip)]
                self.hand_unbans_changed = True
        self.applied, self.ends, self.before = held, ends, None
        self.read_from = self.fail2ban.server_pid
        self.touched = None

    def wanted(self, synced: list[ClusterView], jail: str, ip: str) -> bool:
        """The cluster bans ip into jail here, and no hand-made unban stands against it."""
        if (jail, ip) in self.hand_unbans:
            reason = self.hand_unbans.settle(jail, ip, cluster_bans(synced, self.policy, jail, ip))
            if reason is None:
                return False
            log.log(NOTICE, "[%s] %s: %s, its unban by hand ends here", jail, ip, reason)
            self.hand_unbans_changed = True
        return wants_address(synced, self.policy, jail, ip)

    def plan(self, synced: list[ClusterView]) -> dict[str, tuple[list[str], list[str]]]:
        """Local jail -> (addresses to ban, to unban): every ban after a snapshot or an
        error, else only the addresses updates touched, so one update costs O(1) and
        not O(every ban in the cluster)."""
        if self.touched is None:
            wanted = desired_bans(synced, self.policy)
            for jail, ip in list(self.hand_unbans.entries):
                if not self.wanted(synced, jail, ip):
                    wanted.get(jail, set()).discard(ip)
            return {
                jail: (sorted(addresses - have), sorted(have - addresses))
                for jail, addresses in wanted.items()
                for have in (self.applied[jail],)
            }
        plan: dict[str, tuple[list[str], list[str]]] = {}
        local = {(self.policy.local_jail(cluster_jail), ip) for cluster_jail, ip in self.touched}
        for jail, ip in sorted(local):
            want = self.wanted(synced, jail, ip)
            if want != (ip in self.applied[jail]):
                plan.setdefault(jail, ([], []))[0 if want else 1].append(ip)
        return plan

    def _give_bantimes(self, synced: list[ClusterView]) -> None:
        """The cluster's own bans among those compared get their time in fail2ban (see
        bantimes.py): the jail's bantime borrowed, the addresses named again, given back."""
        applied = self.applied

        def held(jail: str, ip: str) -> bool:
            return ip in applied[jail]

        for jail in sorted(self.lent):  # a borrow that could not be given back before
            self.fail2ban.set_bantime(jail, self.configured_bantimes[jail])
            self.lent.discard(jail)
        self.bantimes.keep(held)
        if self.touched is None:
            bans = (event for view in synced for event in view.bans.values())
        else:
            touched = self.touched
            bans = (view.bans[key] for view in synced for key in touched if key in view.bans)
        wanted = cluster_bantimes(bans, self.policy.local_jail, self.policy.wants)
        for jail, groups in self.bantimes.plan(wanted, held).items():
            configured = self.configured_bantimes.get(jail)
            if configured is None:
                configured = self.configured_bantimes[jail] = self.fail2ban.bantime(jail)
            self.lent.add(jail)
            try:
                for bantime, ips in groups.items():
                    for step in lengthen_to(bantime):
                        self.fail2ban.set_bantime(jail, step)
                        self.fail2ban.ban(jail, ips)
                    self.bantimes.gave(jail, ips, bantime)
                    end = None if bantime < 0 else time.time() + bantime
                    self.ends.setdefault(jail, {}).update(dict.fromkeys(ips, end))
                    log.info("[%s] %d cluster bans for %s s", jail, len(ips), bantime)
            finally:
                self.fail2ban.set_bantime(jail, configured)
            self.lent.discard(jail)

    def _apply(self, jail: str, addresses: list[str], ban: bool) -> None:
        start = 0
        while start < len(addresses):
            batch = addresses[start : start + self.batches.size(jail)]
            start += len(batch)
            began = time.monotonic()
            if ban:
                self.fail2ban.ban(jail, batch)
            else:
                self.fail2ban.unban(jail, [fail2ban_address(ip) for ip in batch])
            self.batches.observe(jail, len(batch), time.monotonic() - began)
            self.progress()
            if ban:
                self.applied[jail].update(batch)
                self.banned += len(batch)
                now = time.time()
                bantime = self.jail_bantimes.get(jail, -1)
                end = None if bantime < 0 else now + bantime
                self.ends.setdefault(jail, {}).update(dict.fromkeys(batch, end))
                for ip in batch:
                    origin = self.origin_times.pop(ip, None)
                    if origin is not None:
                        self.apply_delays.observe(now - origin)
            else:
                self.applied[jail].difference_update(batch)
                self.unbanned += len(batch)
                ends = self.ends.get(jail, {})
                for ip in batch:
                    ends.pop(ip, None)
            verb = "Ban" if ban else "Unban"
            log_lines(log, NOTICE, [f"[{jail}] {verb} {ip}" for ip in batch])

    def sizes(self) -> dict[str, int]:
        """Local jail -> addresses it holds, as far as this node knows."""
        return {jail: len(ips) for jail, ips in (self.applied or {}).items()}
