"""fail2ban action: a jail's bans in nftables sets, many addresses per `nft` run.

Install as /etc/fail2ban/action.d/f2bzmq-nftset.py and name it with its ".py" in a jail:

    action = f2bzmq-nftset.py[blocktype=drop]

Stock nftables actions start a shell and `nft` for each ban, one after the other in
fail2ban's thread: a few milliseconds a ban, so 10,000 synced bans take a
minute or more. Here ban() and unban() only record the change; a flusher thread hands
all changes recorded meanwhile to one `nft -f -` transaction, `delay` seconds after the
first of them but no sooner than `interval` after the previous run began, or as soon
as `batchsize` are waiting. A lone ban is in the firewall `delay` plus one nft run
(about 10 ms) after fail2ban calls ban(); during a burst, within `interval` plus one
nft run (about 50 ms), while nft runs at most 25 times a second instead of once a ban.

At start the action makes `table inet <table>` its own: sets addr4/addr6 for
addresses, net4/net6 (interval sets) for networks, and chain <chain> hooked at
<chain_hook> whose rules send every packet from those sets to <blocktype>, or, with
<port>, only packets to those ports of <protocol>. At stop it deletes the table. A
table that another jail's action or another program made is left alone: the jail's
action does not start, and fail2ban's log says which table to name instead.

The options and their defaults are in DEFAULTS below; `fail2ban-client reload` applies
changed options and keeps every ban.

Addresses and options are checked before they reach nft: an address is written back
in the canonical form `ipaddress` gives it, and anything that is neither an address
nor a network (a host name, text with spaces, a zone index), a network wider than
`min_prefix_v4`/`min_prefix_v6`, or the unspecified address (what fail2ban makes of a
/0), is refused and logged. `blocktype` is a verdict that
blocks (drop or reject), never one that lets a banned address in.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import subprocess
import threading
import time
from typing import Union

from fail2ban.server.action import ActionBase

# nft names: no spaces, quotes, braces or semicolons, so a name cannot end a command.
NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,31}")
# The verdicts that block, as nft writes them: "drop", "reject", "reject with tcp reset",
# "reject with icmpx type admin-prohibited", each optionally counted. Nothing else: accept,
# continue, jump, goto or queue would let a banned address in, or hand it to other rules.
BLOCKTYPE = re.compile(
    r"(counter )?(drop|reject( with (tcp reset|(icmp|icmpv6|icmpx) type [a-z-]{1,40}))?)"
)
PORT = re.compile(r"(\d{1,5})(?:[:-](\d{1,5}))?|([a-z][a-z0-9-]{0,31})")
DEFAULTS = {
    "table": "f2bzmq",  # a second jail with this action needs a table of its own
    "chain": "input",
    "chain_hook": "input",
    "chain_priority": "-1",  # before the stock chains (priority filter = 0)
    "blocktype": "reject",  # or drop, "reject with icmpx type admin-prohibited", …
    "port": "",  # empty: every port and protocol; else e.g. "22,80:90,https"
    "min_prefix_v4": "24",  # no network wider than this is banned (a /0 would block the world)
    "min_prefix_v6": "48",
    "protocol": "tcp",  # with a port: tcp, udp, sctp or dccp, comma-separated
    "batchsize": "1000",  # run nft at once when this many changes wait…
    "delay": "0.005",  # …else this many seconds after the first of them,
    "interval": "0.04",  # …and this many after the previous run began (a burst's pace)
    "nftables": "nft",  # the nft program
    "timeout": "60",  # seconds one nft run may take
}
OWNER = re.compile(r'^\s*comment "f2bzmq-nftset, jail ([A-Za-z0-9._-]*)"', re.M)
PROTOCOLS = frozenset({"tcp", "udp", "sctp", "dccp"})
HOOKS = frozenset({"prerouting", "input", "forward", "output", "postrouting"})
SETS = {(4, False): "addr4", (6, False): "addr6", (4, True): "net4", (6, True): "net6"}
SELECTOR = {4: "ip", 6: "ip6"}
TYPES = {4: "ipv4_addr", 6: "ipv6_addr"}
PER_LINE = 500  # elements per "add element" line: short error messages, small parser state
RETRY_MAX = 60.0  # seconds between attempts while nft keeps failing


NETWORKS = (ipaddress.IPv4Network, ipaddress.IPv6Network)
Target = Union[
    ipaddress.IPv4Address, ipaddress.IPv6Address, ipaddress.IPv4Network, ipaddress.IPv6Network
]


def parse_target(text: object) -> Target | None:
    """The address (or network, if wider than one address) fail2ban banned, or None."""
    text = str(text)
    # ipaddress accepts a zone index ("fe80::1%eth0"); nft does not, and a ban is global.
    if not text or len(text) > 64 or "%" in text:
        return None
    try:
        if "/" not in text:
            return ipaddress.ip_address(text)  # the common case, ten times faster
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None
    if network.prefixlen == network.max_prefixlen:
        return network.network_address
    return network


def parse_ports(port: str) -> list[str]:
    """fail2ban's port list ("22,80:90,https") as nft set elements ("22", "80-90", "https")."""
    elements = []
    for item in port.replace(" ", "").split(","):
        if not item:
            continue
        match = PORT.fullmatch(item)
        if match is None:
            raise ValueError(f"port {item!r} is not a number, a range or a service name")
        low, high, service = match.groups()
        if service:
            elements.append(service)
            continue
        if not 0 < int(low) <= int(high or low) <= 65535:
            raise ValueError(f"port {item!r} is out of range 1..65535")
        elements.append(f"{int(low)}-{int(high)}" if high else str(int(low)))
    return elements


def element_lines(verb: str, table: str, name: str, elements: list[str]) -> list[str]:
    """`add element inet TABLE SET { a, b, … }` lines of at most PER_LINE elements."""
    return [
        f"{verb} element inet {table} {name} {{ {', '.join(elements[i : i + PER_LINE])} }}"
        for i in range(0, len(elements), PER_LINE)
    ]


class NftSetAction(ActionBase):
    """Keeps the jail's bans in nft sets; batches changes into one nft transaction.

    fail2ban calls ban() and unban() from two threads: its actions thread (bans found
    in logs, expired bans) and its socket thread (`set <jail> banip|unbanip`). Both
    only take `_lock` for a moment and never wait for nft; the flusher thread is the
    only one that runs nft for them. `_nft_lock` keeps one nft run at a time, so a
    flush() or stop() is never overtaken by a batch computed before it.
    """

    def __init__(self, jail, name, **options):
        super().__init__(jail, name)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # a change, a stop, or a rebuild to do
        self._nft_lock = threading.Lock()
        self._wanted = set()  # every address and network fail2ban bans now
        self._dirty = set()  # addresses banned or unbanned since the last nft run
        self._nets_dirty = set()  # IP versions whose network set must be refilled
        self._rebuild = False  # replace the whole table (start, reload, after a failure)
        self._first_change = None  # monotonic time of the oldest change not yet in nft
        self._last_run = 0.0  # monotonic time the last nft run began
        self._running = False
        self._flusher = None
        self._failures = 0  # nft runs failed in a row: the retry interval doubles with each
        self._started = False  # the table is ours: stop(), flush() and batches may touch it
        self._apply(self._parse(options))

    def _parse(self, given):
        """Defaults overridden by the jail's options, checked; ValueError names a wrong one."""
        unknown = sorted(set(given) - set(DEFAULTS))
        if unknown:
            raise ValueError(
                f"unknown option(s) {', '.join(unknown)}; known: {', '.join(DEFAULTS)}"
            )
        options = {key: str(value).strip() for key, value in {**DEFAULTS, **given}.items()}
        for key in ("table", "chain"):
            if not NAME.fullmatch(options[key]):
                raise ValueError(f"{key} {options[key]!r} must be letters, digits, _ or -")
        if options["chain_hook"] not in HOOKS:
            raise ValueError(f"chain_hook {options['chain_hook']!r} must be one of {sorted(HOOKS)}")
        blocktype = " ".join(options["blocktype"].split())
        if not BLOCKTYPE.fullmatch(blocktype):
            raise ValueError(
                f"blocktype {options['blocktype']!r} is not an nft verdict that blocks: "
                "drop, reject, or reject with tcp reset or an icmp, icmpv6 or icmpx type"
            )
        floors = {}
        for key, narrowest, widest in (("min_prefix_v4", 32, 8), ("min_prefix_v6", 128, 16)):
            value = options[key]
            if not value.isdigit() or not widest <= int(value) <= narrowest:
                raise ValueError(f"{key} {value!r} must be a prefix length {widest}..{narrowest}")
            floors[4 if key.endswith("v4") else 6] = int(value)
        protocols = [p for p in options["protocol"].replace(" ", "").split(",") if p]
        if not protocols or not set(protocols) <= PROTOCOLS:
            raise ValueError(f"protocol {options['protocol']!r} must be among {sorted(PROTOCOLS)}")
        ports = parse_ports(options["port"])
        batchsize, delay = int(options["batchsize"]), float(options["delay"])
        interval, timeout = float(options["interval"]), float(options["timeout"])
        if batchsize < 1 or not (0 <= delay <= 10 and 0 <= interval <= 10 and 0 < timeout <= 3600):
            raise ValueError(
                "batchsize must be >= 1, delay and interval 0..10 s, timeout 0..3600 s"
            )
        match = f"meta l4proto {{ {', '.join(protocols)} }} th dport {{ {', '.join(ports)} }} "
        return {
            "table": options["table"],
            "chain": options["chain"],
            "chain_hook": options["chain_hook"],
            "chain_priority": int(options["chain_priority"]),
            "blocktype": blocktype,
            "floors": floors,
            "match": match if ports else "",
            "batchsize": batchsize,
            "delay": delay,
            "interval": interval,
            "timeout": timeout,
            "nftables": options["nftables"],
        }

    def _apply(self, parsed):
        for key, value in parsed.items():
            setattr(self, key, value)

    # fail2ban's hooks

    def start(self):
        """Replace the table with one holding the bans known so far; start the flusher."""
        self._claim(self.table)
        self._started = True
        with self._changed:
            self._running = True
            self._rebuild = True
        self._flush()
        self._flusher = threading.Thread(
            target=self._run, name=f"f2b/nftset.{self._jail.name}", daemon=True
        )
        self._flusher.start()

    def stop(self):
        """Stop the flusher and delete the table."""
        if not self._started:
            return  # start() refused the table: it is not ours to delete
        self._started = False
        with self._changed:
            self._running = False
            self._changed.notify_all()
        if self._flusher is not None:
            self._flusher.join(self.timeout + 5)
            self._flusher = None
        with self._nft_lock:
            self._nft(f"table inet {self.table} {{}}\ndelete table inet {self.table}\n")
            self._logSys.info("[%s] nftset: table inet %s deleted", self._jail.name, self.table)

    def ban(self, aInfo):
        self._change(aInfo["ip"], banned=True)

    def unban(self, aInfo):
        self._change(aInfo["ip"], banned=False)

    def flush(self):
        """Unban everything at once (fail2ban's `unban --all`, jail stop): empty the sets."""
        with self._nft_lock:
            with self._changed:
                self._wanted.clear()
                self._dirty.clear()
                self._nets_dirty.clear()
                self._first_change = None
            if not self._started:
                return True
            script = "".join(f"flush set inet {self.table} {name}\n" for name in SETS.values())
            if not self._nft(script):
                self._schedule_rebuild()
        return True  # fail2ban need not unban each address through unban()

    def clearAllParams(self):
        """Nothing to clear; its presence makes fail2ban's reload keep and reload() this action."""

    def reload(self, **options):
        """The jail's options after `fail2ban-client reload`: rebuild the table, keep the bans."""
        parsed = self._parse(options)
        with self._nft_lock:
            previous = self.table
            if self._started and parsed["table"] != previous:
                self._claim(parsed["table"])
            self._apply(parsed)
            if self._started and previous != self.table:
                self._nft(f"table inet {previous} {{}}\ndelete table inet {previous}\n")
            # Before the lock is free: no batch may go to a table that is not made yet.
            self._schedule_rebuild()

    def _claim(self, table):
        """Make the table ours, or raise if another jail's action (or anyone else) holds it.

        `create table` fails when the table exists, so of two jails starting at once with
        the same table only one gets it; the comment says which jail has it. A table this
        jail left behind (fail2ban was killed) is taken over.
        """
        if self._nft(f"create table inet {table} {{ {self._comment()}; }}\n", quiet=True):
            return
        try:
            listed = subprocess.run(
                [self.nftables, "-t", "list", "table", "inet", table],
                capture_output=True,
                text=True,
                timeout=self.timeout,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            return  # nft cannot run at all: the table rebuild says why, and retries
        if listed.returncode != 0:
            return  # no table after all: the rebuild makes it
        found = OWNER.search(listed.stdout)
        if found and self._comment() == f'comment "f2bzmq-nftset, jail {found.group(1)}"':
            return
        holder = f"jail {found.group(1)}'s action" if found else "another program"
        raise RuntimeError(
            f"table inet {table} belongs to {holder}; give jail {self._jail.name} "
            "a table of its own: f2bzmq-nftset.py[table=...]"
        )

    def _comment(self):
        """The table's comment: which jail's action made it."""
        name = re.sub(r"[^A-Za-z0-9._-]", "_", self._jail.name)[:64]
        return f'comment "f2bzmq-nftset, jail {name}"'

    # the batching

    def _change(self, ip, banned):
        target = parse_target(ip)
        if target is None:
            self._logSys.error(
                "[%s] nftset: refused %r, which is neither an address nor a network",
                self._jail.name,
                str(ip)[:100],
            )
            return
        if banned and not self._narrow_enough(target):
            self._logSys.error(
                "[%s] nftset: refused %s, a network wider than min_prefix_v%d = /%d",
                self._jail.name,
                target,
                target.version,
                self.floors[target.version],
            )
            return
        if banned and target.is_unspecified:
            # fail2ban hands a ban of 0.0.0.0/0 (or ::/0) to its actions as 0.0.0.0 (::).
            self._logSys.error(
                "[%s] nftset: refused %s, the unspecified address (or a /0)",
                self._jail.name,
                target,
            )
            return
        with self._changed:
            if banned:
                self._wanted.add(target)
            else:
                self._wanted.discard(target)
            if isinstance(target, NETWORKS):
                self._nets_dirty.add(target.version)
            else:
                self._dirty.add(target)
            if self._first_change is None:
                self._first_change = time.monotonic()
                self._changed.notify()
            elif len(self._dirty) == self.batchsize:
                self._changed.notify()

    def _schedule_rebuild(self):
        with self._changed:
            self._rebuild = True
            if self._first_change is None:
                self._first_change = time.monotonic()
            self._changed.notify()

    def _run(self):
        """The flusher: wait for a change, give the batch `delay` to fill, run nft."""
        while True:
            with self._changed:
                while self._running and self._first_change is None:
                    self._changed.wait()
                if not self._running:
                    return
                deadline = self._next_run()
                # While nft fails, a full batch waits for the retry like everything else.
                while self._running and (self._failures or len(self._dirty) < self.batchsize):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._changed.wait(remaining)
                if not self._running:
                    return
            self._flush()

    def _next_run(self):
        """When the pending changes go to nft, unless `batchsize` of them wait sooner."""
        if self._failures:
            return self._first_change + min(RETRY_MAX, 2.0 ** (self._failures - 1))
        return max(self._first_change + self.delay, self._last_run + self.interval)

    def _flush(self):
        """One nft transaction for every change recorded so far."""
        with self._nft_lock:
            with self._changed:
                rebuild, self._rebuild = self._rebuild, False
                dirty, self._dirty = self._dirty, set()
                nets_dirty, self._nets_dirty = self._nets_dirty, set()
                self._first_change = None
                if not (rebuild or dirty or nets_dirty):
                    return  # flush() took the changes
                if rebuild:
                    script = self._table_script(self._wanted)
                else:
                    script = self._changes_script(dirty, nets_dirty)
            started = self._last_run = time.monotonic()
            if self._nft(script):
                self._failures = 0
                # A rebuild is rare and worth a line in fail2ban's log; batches are not.
                self._logSys.log(
                    logging.INFO if rebuild else logging.DEBUG,
                    "[%s] nftset: %s %d in %.1f ms",
                    self._jail.name,
                    f"table inet {self.table} made, bans:" if rebuild else "changes applied:",
                    len(self._wanted) if rebuild else len(dirty) + len(nets_dirty),
                    (time.monotonic() - started) * 1000,
                )
            else:
                self._failures += 1
                # The next attempt replaces the whole table, whatever broke it.
                self._schedule_rebuild()

    def _changes_script(self, dirty, nets_dirty):
        """Add the banned, delete the unbanned, refill changed network sets (under _lock)."""
        added = {4: [], 6: []}
        deleted = {4: [], 6: []}
        for address in dirty:
            (added if address in self._wanted else deleted)[address.version].append(str(address))
        lines = []
        for version in (4, 6):
            name = SETS[version, False]
            lines += element_lines("add", self.table, name, added[version])
            # nft 1.0.6 has no "destroy element": adding first makes the delete succeed
            # whether or not the address is still in the set.
            lines += element_lines("add", self.table, name, deleted[version])
            lines += element_lines("delete", self.table, name, deleted[version])
        for version in sorted(nets_dirty):
            name = SETS[version, True]
            lines.append(f"flush set inet {self.table} {name}")
            lines += element_lines("add", self.table, name, self._networks(version))
        return "".join(line + "\n" for line in lines)

    def _narrow_enough(self, target):
        """An address, or a network no wider than the floor of its family."""
        return not isinstance(target, NETWORKS) or target.prefixlen >= self.floors[target.version]

    def _networks(self, version):
        """The banned networks of one IP version, merged so no two overlap (interval sets);
        none wider than the floor, should a reload have raised it."""
        networks = [
            target
            for target in self._wanted
            if isinstance(target, NETWORKS)
            and target.version == version
            and self._narrow_enough(target)
        ]
        return [str(network) for network in ipaddress.collapse_addresses(networks)]

    def _table_script(self, wanted):
        """Replace the table, atomically, with one holding every ban in `wanted`."""
        addresses = {4: [], 6: []}
        for target in wanted:
            if not isinstance(target, NETWORKS):
                addresses[target.version].append(str(target))
        sets, rules = [], []
        for (version, network), name in SETS.items():
            flags = " flags interval;" if network else ""
            sets.append(f"  set {name} {{ type {TYPES[version]};{flags} }}")
            rules.append(f"    {SELECTOR[version]} saddr @{name} {self.match}{self.blocktype}")
        lines = [
            f"table inet {self.table} {{}}",
            f"delete table inet {self.table}",
            f"table inet {self.table} {{",
            f"  {self._comment()}",
            *sets,
            f"  chain {self.chain} {{",
            f"    type filter hook {self.chain_hook} priority {self.chain_priority};",
            "    policy accept;",
            *rules,
            "  }",
            "}",
        ]
        for version in (4, 6):
            lines += element_lines("add", self.table, SETS[version, False], addresses[version])
            lines += element_lines("add", self.table, SETS[version, True], self._networks(version))
        return "".join(line + "\n" for line in lines)

    def _nft(self, script, quiet=False):
        """Run one nft transaction (argv, no shell); False (and an error logged) if it failed."""
        try:
            done = subprocess.run(
                [self.nftables, "-f", "-"],
                input=script,
                capture_output=True,
                text=True,
                timeout=self.timeout,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            if not quiet:
                self._logSys.error(
                    "[%s] nftset: %s failed: %s", self._jail.name, self.nftables, error
                )
            return False
        if done.returncode != 0:
            if quiet:
                return False
            self._logSys.error(
                "[%s] nftset: %s -f - failed (exit %d): %s",
                self._jail.name,
                self.nftables,
                done.returncode,
                " ".join(done.stderr.split())[:300],
            )
            return False
        return True


Action = NftSetAction
