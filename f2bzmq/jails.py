"""What this node's jails must hold, and making fail2ban hold it.

`LocalPolicy`, `desired_bans`, `wants_address` and `BatchSizer` are pure rules;
`LocalJails` compares the jails with the synced hubs' views and applies the difference
through fail2ban's socket, many addresses per banip/unbanip command, and gives the
cluster's own bans their time (`bantimes`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from . import protocol
from .addresses import Allowlist
from .bantimes import BanTimes, cluster_bantimes, lengthen_to
from .fail2ban_client import Fail2banClient, Fail2banError
from .metrics import DelayHistogram
from .protocol import BanEvent
from .runtime import NOTICE, batched_logging
from .sync import ClusterView

log = logging.getLogger(__name__)

RETRY_INTERVAL = 2.0  # fail2ban unreachable: try again this often
MAX_TRACKED = 100000  # origin times kept for the delay histogram while fail2ban is away
COMMAND_SECONDS = 0.25  # about how long one banip/unbanip command may keep fail2ban busy
FIRST_BATCH = 50  # addresses of a jail's first command, before anything was measured
BATCH_GROWTH = 4  # a command carries at most this many times the addresses of the last


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


class LocalPolicy:
    """This node's rules: which jail a cluster ban goes to, and what it never bans."""

    def __init__(self, node: str, sync_jail: str, jail_map: dict[str, str], allowlist) -> None:
        self.node = node
        self.sync_jail = sync_jail
        self.jail_map = jail_map
        self.allowlist = Allowlist(allowlist)

    def local_jail(self, cluster_jail: str) -> str:
        return self.jail_map.get(cluster_jail, self.sync_jail)

    def allowed(self, ip: str) -> bool:
        """True when the allowlist covers the address or overlaps the network."""
        return self.allowlist.covers(ip)

    def wants(self, event: BanEvent) -> bool:
        """A cluster ban this node applies: not its own report and not allowlisted."""
        return event.node != self.node and not self.allowed(event.ip)

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


class LocalJails:
    """The local fail2ban's jails, kept equal to what the synced hubs' views ban."""

    def __init__(self, policy: LocalPolicy, fail2ban: Fail2banClient, batch_size: int) -> None:
        self.policy = policy
        self.fail2ban = fail2ban
        self.batches = BatchSizer(batch_size)
        self.applied: dict[str, set[str]] | None = None  # what fail2ban has; None = unknown
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
        self.apply_delays = DelayHistogram()  # the origin's Ban line -> fail2ban's banip returned

    def take_update(self, event: BanEvent) -> None:
        """An update changed this ban in a hub's view: reconcile its address."""
        if self.touched is not None:
            self.touched.add((event.jail, event.ip))
        if event.action == protocol.BAN and len(self.origin_times) < MAX_TRACKED:
            self.origin_times.setdefault(event.ip, event.time)
        self.pending = True

    def compare_all(self) -> None:
        """The next reconcile compares every ban, not only the ones updates touched."""
        self.touched = None

    def reread(self) -> None:
        """Read the jails from fail2ban again and compare everything: it may have lost or
        expired bans behind our back (a restart without its database, the jail's bantime)."""
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
                self.applied = {
                    jail: set(self.fail2ban.banned(jail)) for jail in self.policy.local_jails()
                }
                self.configured_bantimes = {
                    jail: bantime
                    for jail, bantime in self.configured_bantimes.items()
                    if jail in self.lent
                }
                self.touched = None
            for jail, (add, remove) in self.plan(synced).items():
                self._apply(jail, add, ban=True)
                self._apply(jail, remove, ban=False)
            self._give_bantimes(synced)
        except (Fail2banError, OSError) as error:
            if self.error is None:
                log.error("fail2ban is not reachable: %s; retrying", error)
            self.ok = False
            self.error = str(error)
            self.applied = None  # fail2ban may have restarted: read its jails again
            self.batches.reset()
            self.next_retry = time.monotonic() + RETRY_INTERVAL
            return
        if not self.ok:
            log.info("fail2ban is reachable at %s", self.fail2ban.socket_path)
        self.ok = True
        self.error = None
        self.pending = False
        self.touched = set()
        self.origin_times.clear()

    def plan(self, synced: list[ClusterView]) -> dict[str, tuple[list[str], list[str]]]:
        """Local jail -> (addresses to ban, to unban): every ban after a snapshot or an
        error, else only the addresses updates touched, so one update costs O(1) and
        not O(every ban in the cluster)."""
        if self.touched is None:
            wanted = desired_bans(synced, self.policy)
            return {
                jail: (sorted(addresses - have), sorted(have - addresses))
                for jail, addresses in wanted.items()
                for have in (self.applied[jail],)
            }
        plan: dict[str, tuple[list[str], list[str]]] = {}
        local = {(self.policy.local_jail(cluster_jail), ip) for cluster_jail, ip in self.touched}
        for jail, ip in sorted(local):
            want = wants_address(synced, self.policy, jail, ip)
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
            (self.fail2ban.ban if ban else self.fail2ban.unban)(jail, batch)
            self.batches.observe(jail, len(batch), time.monotonic() - began)
            if ban:
                self.applied[jail].update(batch)
                self.banned += len(batch)
                now = time.time()
                for ip in batch:
                    origin = self.origin_times.pop(ip, None)
                    if origin is not None:
                        self.apply_delays.observe(now - origin)
            else:
                self.applied[jail].difference_update(batch)
                self.unbanned += len(batch)
            verb = "Ban" if ban else "Unban"
            with batched_logging():  # a line per address, written at once
                for ip in batch:
                    log.log(NOTICE, "[%s] %s %s", jail, verb, ip)

    def sizes(self) -> dict[str, int]:
        """Local jail -> addresses it holds, as far as this node knows."""
        return {jail: len(ips) for jail, ips in (self.applied or {}).items()}
