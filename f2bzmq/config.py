"""fail2ban-cluster.conf: one INI file for every role, read the way fail2ban reads jail.conf.

fail2ban-cluster.conf, then fail2ban-cluster.d/*.conf, fail2ban-cluster.local, and
fail2ban-cluster.d/*.local (each folder in name order): a later file's key wins. As in
fail2ban, a comment is a line that starts with '#' or ';', or the rest of a line from a
' ;'; times take fail2ban's units (10m, 1h, 1d, 1w, or seconds).

Every key is declared once below with its default and its parser, so a typo or a
wrong value stops start-up with one line naming the file, section and key.
"""

from __future__ import annotations

import configparser
import dataclasses
import glob
import ipaddress
import logging
import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Union

from .addresses import SPECIAL_PURPOSE
from .escalation import DEFAULT_FORMULA, Increment, check_formula, parse_factor, parse_multipliers
from .oldkeys import rename_old_keys
from .protocol import (
    CLUSTER,
    MAX_OPERATOR,
    WIRE_LIMITS,
    NetworkLimits,
    ProtocolError,
    check_name,
    check_operator,
)

DEFAULT_PATHS = ("/etc/fail2ban-cluster/fail2ban-cluster.conf", "fail2ban-cluster.conf")
MAX_SOCKET_PATH = 107  # sockaddr_un.sun_path less its terminating NUL


class ConfigError(Exception):
    """A configuration mistake; str() is the one line to show the operator."""


def _text(value: str) -> str:
    if not value:
        raise ValueError("must not be empty")
    return value


def _folder(value: str) -> str:
    """A folder, or empty for the default the key's comment names."""
    return value


def _name(value: str) -> str:
    try:
        return check_name(value, "value")
    except ProtocolError:
        raise ValueError("must be 1-64 letters, digits or ._- characters") from None


def _node(value: str) -> str:
    name = _name(value or socket.gethostname().split(".")[0])
    if name == CLUSTER:
        raise ValueError(
            f"{CLUSTER!r} names the bans the hubs decide themselves: give this server another name"
        )
    return name


def _operator(value: str) -> str:
    """An admin key's name, or empty: the console then takes the user's."""
    try:
        return value and check_operator(value)
    except ProtocolError:
        raise ValueError(f"must be 1-{MAX_OPERATOR} letters, digits or ._- characters") from None


def _number(kind: type, low: float, high: float) -> Callable[[str], float]:
    def parse(value: str):
        try:
            number = kind(value)
        except ValueError:
            raise ValueError(f"{value!r} is not a {kind.__name__}") from None
        if not low <= number <= high:
            raise ValueError(f"{value} is out of range {low}..{high}")
        return number

    return parse


# fail2ban's time units (MyTime.str2seconds): a unit follows its number, with or without
# a space, in any case. A month is a twelfth of a year of 365.25 days.
_DAY = 24 * 60 * 60
_YEAR = (365 * 3 + 366) * _DAY / 4
_TIME_UNITS = (
    (re.compile(r"days?|da|dd?"), _DAY),
    (re.compile(r"weeks?|wee?|ww?"), 7 * _DAY),
    (re.compile(r"months?|mon?"), _YEAR / 12),
    (re.compile(r"years?|yea?|yy?"), _YEAR),
    (re.compile(r"seconds?|sec?|ss?"), 1),
    (re.compile(r"minutes?|min?|mm?"), 60),
    (re.compile(r"hours?|hou?|hh?"), 60 * 60),
)
_TIME_TOKEN = re.compile(r"\s*(?:(\d+(?:\.\d*)?|\.\d+)|([A-Za-z]+)|([-+*/()]))")


def seconds(value: str) -> float:
    """A time as fail2ban writes it, in seconds: `600`, `10m`, `1h 30m` (or `1h30m`: terms
    written one after another add up), `1d-6h`, `2*1w`, `-1`. fail2ban evaluates the text
    as a Python expression once the units are replaced; this takes the same arithmetic
    (+ - * / and parentheses on numbers with units) without eval."""
    tokens = []
    position = 0
    text = value.strip()
    while position < len(text):
        match = _TIME_TOKEN.match(text, position)
        if not match:
            raise ValueError(f"{value!r} is not a time (e.g. 600, 10m, 1h, 1d, 1w)")
        tokens.append(match.groups())
        position = match.end()
    parser = _TimeExpression(tokens, value)
    result = parser.sum()
    if parser.position != len(tokens):
        parser.fail()
    return result


class _TimeExpression:
    """Recursive descent over (number, unit, operator) tokens; see seconds()."""

    def __init__(self, tokens: list[tuple[str | None, str | None, str | None]], text: str):
        self.tokens = tokens
        self.text = text
        self.position = 0

    def fail(self):
        raise ValueError(f"{self.text!r} is not a time (e.g. 600, 10m, 1h, 1d, 1w)")

    def peek(self, kind: int) -> str | None:
        if self.position < len(self.tokens):
            return self.tokens[self.position][kind]
        return None

    def sum(self) -> float:
        total = self.product()
        while True:
            operator = self.peek(2)
            if operator in ("+", "-"):
                self.position += 1
                term = self.product()
                total = total + term if operator == "+" else total - term
            elif self.peek(0) is not None:  # "1h 30m", "1h30m": one term after another adds
                total += self.product()
            else:
                return total

    def product(self) -> float:
        result = self.unary()
        while self.peek(2) in ("*", "/"):
            operator = self.peek(2)
            self.position += 1
            factor = self.unary()
            if operator == "*":
                result *= factor
            elif factor == 0:
                raise ValueError(f"{self.text!r} divides by zero")
            else:
                result /= factor
        return result

    def unary(self) -> float:
        operator = self.peek(2)
        if operator in ("+", "-"):
            self.position += 1
            return self.unary() if operator == "+" else -self.unary()
        if operator == "(":
            self.position += 1
            result = self.sum()
            if self.peek(2) != ")":
                self.fail()
            self.position += 1
            return result
        number = self.peek(0)
        if number is None:
            self.fail()
        self.position += 1
        result = float(number) if "." in number else int(number)
        unit = self.peek(1)
        if unit is not None:
            self.position += 1
            for pattern, factor in _TIME_UNITS:
                if pattern.fullmatch(unit.lower()):
                    return result * factor
            raise ValueError(f"{self.text!r}: {unit!r} is not a time unit (s, m, h, d, w, mo, y)")
        return result


def _duration(kind: type, low: float, high: float) -> Callable[[str], float]:
    """A time in fail2ban's format (see seconds()), as kind (int or float) seconds."""

    def parse(value: str):
        total = seconds(value)
        if kind is int:
            if total != int(total):
                raise ValueError(f"{value!r} is not a whole number of seconds")
            total = int(total)
        else:
            total = float(total)
        if not low <= total <= high:
            given = value if value.strip().lstrip("-").isdigit() else f"{value} ({total:g} s)"
            raise ValueError(f"{given} is out of range {low:g}..{high:g} seconds")
        return total

    return parse


def _optional_duration(value: str) -> int | None:
    """A time in fail2ban's format, or empty for none (bantime.maxtime, bantime.rndtime)."""
    return None if not value else _duration(int, 1, 2**31 - 1)(value)


def _bantime(value: str) -> int:
    """A cluster ban's time: seconds in fail2ban's format, or -1 for permanent."""
    seconds = _duration(int, -1, 2**31 - 1)(value)
    if seconds == 0:
        raise ValueError("must be at least 1 second, or -1 for permanent")
    return seconds


def _bool(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "yes", "true", "on"):
        return True
    if lowered in ("0", "no", "false", "off"):
        return False
    raise ValueError(f"{value!r} is not true or false")


def _words(value: str) -> list[str]:
    return value.replace(",", " ").split()


_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,62})(?:\.[A-Za-z0-9-]{1,63})*$")


def _hosts(value: str) -> list[str]:
    hosts = _words(value)
    if not hosts:
        raise ValueError("names no host")
    for host in hosts:
        if host == "*":
            continue
        try:
            ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            if not _HOSTNAME.match(host):
                raise ValueError(f"{host!r} is not a host name or address") from None
    return hosts


Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


def _followed(value: str) -> list[str]:
    """Hosts to follow instead of [general] hubs; empty: the hubs."""
    if not value.strip():
        return []
    hosts = _hosts(value)
    if "*" in hosts:
        raise ValueError("'*' is not a host to follow")
    return hosts


def _one_host(value: str) -> str:
    """One host name or address; empty: the first of [general] hubs."""
    if not value:
        return ""
    hosts = _hosts(value)
    if len(hosts) != 1 or hosts[0] == "*":
        raise ValueError("names one hub or relay to follow, not several")
    return hosts[0]


def _networks(value: str) -> list[Network]:
    networks = []
    for word in _words(value):
        try:
            networks.append(ipaddress.ip_network(word, strict=False))
        except ValueError:
            raise ValueError(f"{word!r} is not an address or CIDR network") from None
    return networks


@dataclass(frozen=True)
class HubAllowlist:
    """`[publisher] allowlist`: networks, and the words standing for addresses the hub
    learns: the special-purpose ranges, the hubs' own addresses, where nodes connect from."""

    networks: tuple[Network, ...] = ()
    special_purpose: bool = False
    hubs: bool = False
    nodes: bool = False


_ALLOWLIST_WORDS = {"special-purpose", "hubs", "nodes"}


def _hub_allowlist(value: str) -> HubAllowlist:
    words = {word for word in _words(value) if word in _ALLOWLIST_WORDS}
    networks = [word for word in _words(value) if word not in _ALLOWLIST_WORDS]
    try:
        parsed = tuple(_networks(" ".join(networks)))
    except ValueError as error:
        raise ValueError(f"{error} (nor special-purpose, hubs or nodes)") from None
    return HubAllowlist(parsed, "special-purpose" in words, "hubs" in words, "nodes" in words)


def _names(value: str) -> list[str]:
    return [_name(word) for word in _words(value)]


def _jail_map(value: str) -> dict[str, str]:
    mapping = {}
    for line in value.replace(",", "\n").splitlines():
        if not line.strip():
            continue
        cluster_jail, sep, local_jail = line.partition("=")
        if not sep:
            raise ValueError(f"{line.strip()!r} is not 'cluster_jail = local_jail'")
        mapping[_name(cluster_jail.strip())] = _name(local_jail.strip())
    return mapping


def _loglevel(value: str) -> int:
    level = logging.getLevelName(value.upper())
    if not isinstance(level, int):
        raise ValueError(f"{value!r} is not one of DEBUG, INFO, NOTICE, WARNING, ERROR")
    return level


_ENDPOINT = re.compile(r"^tcp://(\*|\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):([0-9]{1,5})$")


def _endpoints(value: str) -> list[str]:
    """ZeroMQ tcp:// endpoints to bind, e.g. tcp://10.0.0.5:5678; empty: none (off)."""
    endpoints = _words(value)
    for endpoint in endpoints:
        match = _ENDPOINT.match(endpoint)
        if not match or not 1 <= int(match[2]) <= 65535:
            raise ValueError(f"{endpoint!r} is not a tcp://HOST:PORT endpoint")
        if match[1] != "*":
            _hosts(match[1])
    return endpoints


MAX_LEGACY_TOKEN = 256


def _legacy_token(value: str) -> str:
    if "|" in value:
        raise ValueError("must not contain '|', the old protocol's field separator")
    if len(value) > MAX_LEGACY_TOKEN or not value.isprintable():
        raise ValueError(f"must be at most {MAX_LEGACY_TOKEN} printable characters")
    return value


def _logtarget(value: str) -> str:
    if value.upper() in ("AUTO", "STDERR", "SYSLOG"):
        return value.upper()
    if not os.path.isabs(value):
        raise ValueError("must be AUTO, STDERR, SYSLOG or an absolute file path")
    return value


def _listen(value: str) -> tuple[str, int] | None:
    """`[role] metrics`: empty is off; PORT listens on 127.0.0.1; HOST:PORT or [V6]:PORT."""
    if not value:
        return None
    host, sep, port = value.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", value
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address to listen on") from None
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{port!r} is not a port number")
    return host, int(port)


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        if value not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
        return value

    return parse


def _key(default: str, parse: Callable[[str], Any], name: str | None = None) -> Any:
    """A key of fail2ban-cluster.conf: its default as the shipped file writes it, and the
    parser that turns a value into the attribute (or raises ValueError saying why not);
    `name` when the key's name is not the attribute's (fail2ban's "bantime.increment")."""
    return field(metadata={"default": default, "parse": parse, "name": name})


def key_name(key: Any) -> str:
    """The name a key has in the file."""
    return key.metadata["name"] or key.name


@dataclass(frozen=True)
class GeneralSettings:
    """[general]: what every role on every server shares."""

    node: str = _key("", _node)
    hubs: list[str] = _key("127.0.0.1", _hosts)
    report_port: int = _key("5690", _number(int, 1, 65535))
    publish_port: int = _key("5691", _number(int, 1, 65535))
    snapshot_port: int = _key("5692", _number(int, 1, 65535))
    state_dir: str = _key("/var/lib/fail2ban-cluster", _text)
    run_dir: str = _key("/run/fail2ban-cluster", _text)
    logtarget: str = _key("AUTO", _logtarget)
    loglevel: int = _key("INFO", _loglevel)
    fail2ban_socket: str = _key("/var/run/fail2ban/fail2ban.sock", _text)
    fail2ban_client: str = _key("fail2ban-client", _text)
    sync_jail: str = _key("cluster", _name)
    jail_map: dict[str, str] = _key("", _jail_map)
    keys_dir: str = _key("/etc/fail2ban-cluster/keys", _text)
    insecure: bool = _key("false", _bool)
    min_prefix_v4: int = _key("24", _number(int, WIRE_LIMITS.min_prefix_v4, 32))
    min_prefix_v6: int = _key("48", _number(int, WIRE_LIMITS.min_prefix_v6, 128))


@dataclass(frozen=True)
class MonitorSettings:
    """[monitor]: following fail2ban.log and reporting to the hubs."""

    logpath: str = _key("/var/log/fail2ban.log", _text)
    ignore_jails: list[str] = _key("", _names)
    ack_timeout: float = _key("5", _duration(float, 0.1, 3600))
    in_flight: int = _key("100", _number(int, 1, 100000))
    outbox_max: int = _key("100000", _number(int, 100, 10**8))
    start_at: str = _key("end", _choice("end", "beginning"))
    failure_window: float = _key("0.025", _duration(float, 0, 60))
    metrics: tuple[str, int] | None = _key("", _listen)


@dataclass(frozen=True)
class PublisherSettings:
    """[publisher]: the hub's ports, rules and limits."""

    bind: list[str] = _key("127.0.0.1", _hosts)
    default_bantime: int = _key("10m", _duration(int, -1, 2**31 - 1))
    heartbeat_interval: float = _key("1", _duration(float, 0.05, 3600))
    send_hwm: int = _key("1000", _number(int, 10, 10**7))
    allow_networks: bool = _key("true", _bool)
    allowlist: HubAllowlist = _key("127.0.0.0/8 ::1/128 special-purpose hubs nodes", _hub_allowlist)
    rate_limit: float = _key("50", _number(float, 0.1, 10**6))
    rate_burst: int = _key("20000", _number(int, 1, 10**7))
    rate_peak: float = _key("2000", _number(float, 1, 10**7))
    allow_foreign_unban: bool = _key("false", _bool)
    rebuild_window: float = _key("5m", _duration(float, 0, 86400))
    node_silence: float = _key("1m", _duration(float, 1, 86400))
    relays: list[str] = _key("", _names)  # node keys whose word for their region's nodes counts
    # The hub's own folders (it runs as its own user); empty: "publisher" in [general]'s.
    state_dir: str = _key("", _folder)
    run_dir: str = _key("", _folder)
    dbpurgeage: float = _key("1d", _duration(float, 60, 2**31 - 1))
    legacy_report_bind: list[str] = _key("", _endpoints)
    legacy_publish_bind: list[str] = _key("", _endpoints)
    legacy_token: str = _key("", _legacy_token)
    metrics: tuple[str, int] | None = _key("", _listen)


@dataclass(frozen=True)
class SubscriberSettings:
    """[subscriber]: applying the cluster's bans to this node's fail2ban."""

    allowlist: list[Network] = _key("127.0.0.0/8 ::1/128", _networks)
    special_ranges: list[Network] = _key(
        " ".join(str(network) for network, _ in SPECIAL_PURPOSE), _networks
    )
    batch_size: int = _key("2000", _number(int, 1, 10000))
    heartbeat_timeout: float = _key("5", _duration(float, 0.1, 3600))
    resync_interval: float = _key("5m", _duration(float, 1, 86400))
    follow: list[str] = _key("", _followed)
    follow_key: str = _key("hub", _name)
    metrics: tuple[str, int] | None = _key("", _listen)


@dataclass(frozen=True)
class RelaySettings:
    """[relay]: forwarding one hub's update stream to a region's subscribers, with snapshots."""

    follow: str = _key("", _one_host)
    bind: list[str] = _key("127.0.0.1", _hosts)
    server_key: str = _key("hub", _name)
    heartbeat_timeout: float = _key("5", _duration(float, 0.1, 3600))
    send_hwm: int = _key("1000", _number(int, 10, 10**7))
    metrics: tuple[str, int] | None = _key("", _listen)


@dataclass(frozen=True)
class ConsoleSettings:
    """[console]: the cluster console, on a hub or an operator's machine."""

    admin: str = _key("", _operator)


@dataclass(frozen=True)
class ClusterJail:
    """[detect:NAME]: a cluster jail, which counts the failures the nodes' fail2ban find in
    its local jails, cluster-wide, and bans on every node what passes its threshold, with
    fail2ban's keys and meanings; [detect] holds the defaults of every one."""

    enabled: bool = _key("false", _bool)
    jails: list[str] = _key("", _names)  # the local jails it counts; empty: its own name
    maxretry: int = _key("5", _number(int, 1, 10**6))
    findtime: int = _key("10m", _duration(int, 1, 2**31 - 1))
    bantime: int = _key("10m", _bantime)
    min_nodes: int = _key("2", _number(int, 1, 10**4))
    increment: bool = _key("false", _bool, "bantime.increment")
    factor: float = _key("1", parse_factor, "bantime.factor")
    formula: str = _key(DEFAULT_FORMULA, check_formula, "bantime.formula")
    multipliers: tuple[int, ...] = _key("", parse_multipliers, "bantime.multipliers")
    maxtime: int | None = _key("", _optional_duration, "bantime.maxtime")
    rndtime: int | None = _key("", _optional_duration, "bantime.rndtime")
    overalljails: bool = _key("false", _bool, "bantime.overalljails")

    def bantime_increment(self) -> Increment:
        return Increment(
            self.increment,
            self.factor,
            self.multipliers,
            self.maxtime,
            self.rndtime,
            self.overalljails,
        )


SECTIONS = {
    "general": GeneralSettings,
    "monitor": MonitorSettings,
    "publisher": PublisherSettings,
    "subscriber": SubscriberSettings,
    "console": ConsoleSettings,
    "detect": ClusterJail,
    "relay": RelaySettings,
}
CLUSTER_JAIL = "detect:"  # a cluster jail's section: [detect:sshd]

# (section, key) -> (default, parser), in the order of the classes above. The shipped
# fail2ban-cluster.conf documents each; a [detect:NAME] section takes [detect]'s keys.
SCHEMA: dict[tuple[str, str], tuple[str, Callable[[str], Any]]] = {
    (section, key_name(key)): (key.metadata["default"], key.metadata["parse"])
    for section, settings in SECTIONS.items()
    for key in fields(settings)
}


@dataclass(frozen=True)
class Config:
    """Every parsed setting, a frozen object per section, read as attributes:
    `config.publisher.rate_limit`."""

    path: str
    general: GeneralSettings
    monitor: MonitorSettings
    publisher: PublisherSettings
    subscriber: SubscriberSettings
    console: ConsoleSettings
    detect: ClusterJail  # the defaults of the cluster jails
    relay: RelaySettings
    cluster_jails: dict[str, ClusterJail] = field(default_factory=dict)  # [detect:NAME]s, enabled
    warnings: tuple[str, ...] = ()  # deprecated keys read; the daemon logs them at start

    def section(self, name: str) -> Any:
        """A section's settings by name: the role's own (`metrics`) for a role's daemon."""
        return getattr(self, name)

    @property
    def node(self) -> str:
        return self.general.node

    def endpoints(self, port_key: str, hosts: list[str] | None = None) -> list[str]:
        """tcp:// endpoints of every hub (or of `hosts`) for one of the three ports."""
        port = getattr(self.general, port_key)
        return [tcp_endpoint(host, port) for host in hosts or self.general.hubs]

    def followed(self) -> list[str]:
        """The hosts whose update streams the subscriber follows: relays, or the hubs."""
        return self.subscriber.follow or self.general.hubs

    def relayed(self) -> str:
        """The hub (or relay) whose stream the relay forwards: its own, or the first hub."""
        return self.relay.follow or self.general.hubs[0]

    def relay_binds(self, port_key: str) -> list[str]:
        port = getattr(self.general, port_key)
        return [tcp_endpoint(host, port) for host in self.relay.bind]

    def binds(self, port_key: str) -> list[str]:
        port = getattr(self.general, port_key)
        return [tcp_endpoint(host, port) for host in self.publisher.bind]

    def state_path(self, name: str) -> Path:
        """A file of the node's roles in [general] state_dir (the hub's: [publisher])."""
        return Path(self.general.state_dir) / name

    def run_dir(self, role: str) -> Path:
        """Where a role keeps its PID file, control socket and last exit: [general] run_dir,
        but the hub, which runs as a user of its own, in a folder of its own."""
        return Path(self.publisher.run_dir if role == "publisher" else self.general.run_dir)

    def control_path(self, role: str) -> Path:
        """The role's control socket, where `status` asks the running daemon."""
        return self.run_dir(role) / f"{role}.sock"

    def network_limits(self) -> NetworkLimits:
        return NetworkLimits(
            self.publisher.allow_networks, self.general.min_prefix_v4, self.general.min_prefix_v6
        )

    def sync_jails(self) -> set[str]:
        """Local jails the subscriber writes into: the monitor must not report them back."""
        return {self.general.sync_jail, *self.general.jail_map.values()}

    def detect_jails(self) -> dict[str, str]:
        """Local jail -> the cluster jail that counts its failures: the monitor reports the
        failures of these jails only."""
        return {local: name for name, jail in self.cluster_jails.items() for local in jail.jails}


def tcp_endpoint(host: str, port: int) -> str:
    bare = host.strip("[]")
    if ":" in bare:
        return f"tcp://[{bare}]:{port}"
    return f"tcp://{bare}:{port}"


def find_config(path: str | None) -> str:
    """The file to read: the one given, else the first default that exists."""
    if path is not None:
        return path
    for candidate in DEFAULT_PATHS:
        if os.path.exists(candidate):
            return candidate
    raise ConfigError(
        f"no configuration file: looked for {' and '.join(DEFAULT_PATHS)}; use -c PATH"
    )


# Relative paths in these keys are taken from the configuration file's folder, so a
# daemon (whose working directory is /) finds the same files as the command that started it.
PATH_KEYS = {
    ("general", "state_dir"),
    ("general", "run_dir"),
    ("publisher", "state_dir"),
    ("publisher", "run_dir"),
    ("general", "fail2ban_socket"),
    ("general", "keys_dir"),
    ("monitor", "logpath"),
}


def config_files(path: str) -> list[str]:
    """The files to read, in fail2ban's order (its ConfigReader.read): path, then NAME.d/*.conf,
    NAME.local, NAME.d/*.local beside it, each folder in name order; only those that exist
    but path itself, which must."""
    base = str(Path(path).with_suffix(""))
    # glob, like fail2ban: no hidden files (an editor's .#name.conf lock, say).
    drop_ins = glob.escape(base + ".d")
    files = sorted(glob.glob(f"{drop_ins}/*.conf")) + [base + ".local"]
    files += sorted(glob.glob(f"{drop_ins}/*.local"))
    return [path] + [file for file in files if os.path.isfile(file)]


def load_config(path: str) -> Config:
    """Read path, its drop-ins and .local overrides; raise ConfigError naming file, section, key."""
    raw: dict[tuple[str, str], tuple[str, str]] = {}  # (section, key) -> (value, where it is set)
    warnings: list[str] = []
    for file in config_files(path):
        found = {key: (value, _where(file, *key)) for key, value in _read_ini(file).items()}
        try:
            warnings += rename_old_keys(found)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        raw.update(found)
    return build_config(raw, path, tuple(warnings))


def build_config(
    raw: dict[tuple[str, str], tuple[str, str]], path: str, warnings: tuple[str, ...] = ()
) -> Config:
    """Parse every key (value as written, where it is set), defaults for the rest. Tests
    build a daemon's settings with it without a file: `config_from({...})`."""
    raw = dict(raw)
    sections = {}
    for section, settings in SECTIONS.items():
        sections[section] = _section(raw, path, section, settings)
    sections["publisher"] = _hub_folders(sections["general"], sections["publisher"])
    names = sorted({section for section, _ in raw if section.startswith(CLUSTER_JAIL)})
    cluster_jails = {}
    for section in names:
        jail = _section(raw, path, section, ClusterJail, inherit=sections["detect"])
        if jail.enabled:
            name = section[len(CLUSTER_JAIL) :]
            cluster_jails[name] = replace(jail, jails=jail.jails or [name])
    if raw:
        _, where = next(iter(raw.values()))
        raise ConfigError(f"{where}: unknown key")
    _check_cluster_jails(cluster_jails, sections["general"], path)
    return Config(path, warnings=warnings, cluster_jails=cluster_jails, **sections)


def _section(
    raw: dict[tuple[str, str], tuple[str, str]],
    path: str,
    section: str,
    settings: type,
    inherit: Any = None,
) -> Any:
    """One section's settings, taking its keys out of `raw`: the value set in the section,
    else `inherit`'s (the [detect] defaults of a cluster jail), else the default."""
    values = {}
    for key in fields(settings):
        name = key_name(key)
        if (section, name) not in raw and inherit is not None:
            values[key.name] = getattr(inherit, key.name)
            continue
        value, where = raw.pop((section, name), (key.metadata["default"], None))
        where = where or _where(path, section, name)
        try:
            if _HASH_COMMENT.search(value):
                raise ValueError(
                    "'#' starts a comment only at the start of a line; "
                    "put the comment on a line of its own or after ' ;', as in fail2ban"
                )
            parsed = key.metadata["parse"](value.strip())
            if (section, name) in PATH_KEYS and parsed:
                parsed = str(Path(path).resolve().parent / parsed)
            if key.name == "run_dir" and parsed:
                _check_run_dir(parsed, section)
        except ValueError as error:
            raise ConfigError(f"{where}: {error}") from None
        values[key.name] = parsed
    return settings(**values)


def _check_cluster_jails(
    cluster_jails: dict[str, ClusterJail], general: GeneralSettings, path: str
) -> None:
    """A local jail feeds one cluster jail at most, and never a sync jail (its bans come
    from the cluster)."""
    fed: dict[str, str] = {}
    sync = {general.sync_jail, *general.jail_map.values()}
    for name, jail in cluster_jails.items():
        where = _where(path, CLUSTER_JAIL + name, "jails")
        for local in jail.jails:
            if local in sync:
                raise ConfigError(
                    f"{where}: {local} is a sync jail: its bans come from the cluster"
                )
            if local in fed:
                raise ConfigError(
                    f"{where}: {local} is counted by [{CLUSTER_JAIL}{fed[local]}] already"
                )
            fed[local] = name


def config_from(values: dict[str, dict[str, str]], path: str = "fail2ban-cluster.conf") -> Config:
    """Settings as a file with these sections and keys would give: `{"publisher": {...}}`."""
    raw = {
        (section, key): (value, _where(path, section, key))
        for section, keys in values.items()
        for key, value in keys.items()
    }
    return build_config(raw, path)


def _hub_folders(general: GeneralSettings, publisher: PublisherSettings) -> PublisherSettings:
    """The hub's folders when not set: "publisher" in [general] state_dir and run_dir."""
    return dataclasses.replace(
        publisher,
        state_dir=publisher.state_dir or str(Path(general.state_dir) / "publisher"),
        run_dir=publisher.run_dir or str(Path(general.run_dir) / "publisher"),
    )


def _check_run_dir(run_dir: str, section: str) -> None:
    """The longest control socket path in the folder must fit a unix socket: the node's
    roles share [general] run_dir (subscriber.sock the longest), the hub has its own."""
    name = "publisher.sock" if section == "publisher" else "subscriber.sock"
    longest = len(os.fsencode(str(Path(run_dir) / name)))
    if longest > MAX_SOCKET_PATH:
        raise ValueError(
            f"too long for the daemons' control sockets ({longest} bytes with "
            f"/{name}; at most {MAX_SOCKET_PATH})"
        )


def _where(file: str, section: str, key: str) -> str:
    return f"{file}: [{section}] {key}"


# A '#' after a blank, which fail2ban takes as part of the value (its inline comments start
# with ';'): meant as a comment, it would give a value like "10.0.0.5  # the hub".
_HASH_COMMENT = re.compile(r"\s#")


def _read_ini(file: str) -> dict[tuple[str, str], str]:
    # What fail2ban's parser takes (SafeConfigParserWithIncludes): lines starting with '#' or
    # ';' are comments, and ';' after a blank starts one within a line.
    parser = configparser.ConfigParser(
        interpolation=None, default_section="__none__", inline_comment_prefixes=(";",)
    )
    try:
        with open(file, encoding="utf-8") as handle:
            parser.read_file(handle)
    except OSError as error:
        raise ConfigError(f"{file}: cannot read: {error.strerror}") from None
    except (configparser.Error, UnicodeDecodeError) as error:
        first = str(error).splitlines()[0]
        raise ConfigError(f"{file}: not a valid INI file: {first}") from None
    known_sections = {section for section, _ in SCHEMA}
    found = {}
    for section in parser.sections():
        if section.startswith(CLUSTER_JAIL):
            try:
                _name(section[len(CLUSTER_JAIL) :])
            except ValueError as error:
                raise ConfigError(f"{file}: [{section}]: the cluster jail's name {error}") from None
        elif section not in known_sections:
            raise ConfigError(f"{file}: [{section}]: unknown section")
        for key, value in parser.items(section):
            if section.startswith(CLUSTER_JAIL) and (CLUSTER_JAIL[:-1], key) not in SCHEMA:
                raise ConfigError(f"{_where(file, section, key)}: unknown key")
            found[(section, key)] = value
    return found
