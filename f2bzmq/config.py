"""fail2ban-cluster.conf: one INI file for every role, overridden by a .local beside it.

Every key is declared once below with its default and its parser, so a typo or a
wrong value stops start-up with one line naming the file, section and key.
"""

from __future__ import annotations

import configparser
import ipaddress
import logging
import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .control import MAX_SOCKET_PATH, control_path
from .metrics import parse_listen
from .protocol import NetworkLimits, ProtocolError, check_name

DEFAULT_PATHS = ("/etc/fail2ban-cluster/fail2ban-cluster.conf", "fail2ban-cluster.conf")


class ConfigError(Exception):
    """A configuration mistake; str() is the one line to show the operator."""


def _text(value: str) -> str:
    if not value:
        raise ValueError("must not be empty")
    return value


def _name(value: str) -> str:
    try:
        return check_name(value, "value")
    except ProtocolError:
        raise ValueError("must be 1-64 letters, digits or ._- characters") from None


def _node(value: str) -> str:
    return _name(value or socket.gethostname().split(".")[0])


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


def _networks(value: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    networks = []
    for word in _words(value):
        try:
            networks.append(ipaddress.ip_network(word, strict=False))
        except ValueError:
            raise ValueError(f"{word!r} is not an address or CIDR network") from None
    return networks


def _jail_names(value: str) -> list[str]:
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


# (section, key) -> (default, parser). The shipped fail2ban-cluster.conf documents each.
SCHEMA: dict[tuple[str, str], tuple[str, Callable[[str], object]]] = {
    ("general", "node"): ("", _node),
    ("general", "hubs"): ("127.0.0.1", _hosts),
    ("general", "report_port"): ("5690", _number(int, 1, 65535)),
    ("general", "publish_port"): ("5691", _number(int, 1, 65535)),
    ("general", "snapshot_port"): ("5692", _number(int, 1, 65535)),
    ("general", "state_dir"): ("/var/lib/fail2ban-cluster", _text),
    ("general", "run_dir"): ("/run/fail2ban-cluster", _text),
    ("general", "logtarget"): ("AUTO", _logtarget),
    ("general", "loglevel"): ("INFO", _loglevel),
    ("general", "fail2ban_socket"): ("/var/run/fail2ban/fail2ban.sock", _text),
    ("general", "fail2ban_client"): ("fail2ban-client", _text),
    ("general", "sync_jail"): ("cluster", _name),
    ("general", "jail_map"): ("", _jail_map),
    ("general", "keys_dir"): ("/etc/fail2ban-cluster/keys", _text),
    ("general", "insecure"): ("false", _bool),
    ("general", "min_prefix_v4"): ("24", _number(int, 8, 32)),
    ("general", "min_prefix_v6"): ("48", _number(int, 16, 128)),
    ("monitor", "logpath"): ("/var/log/fail2ban.log", _text),
    ("monitor", "ignore_jails"): ("", _jail_names),
    ("monitor", "ack_timeout"): ("5", _number(float, 0.1, 3600)),
    ("monitor", "in_flight"): ("100", _number(int, 1, 100000)),
    ("monitor", "outbox_max"): ("100000", _number(int, 100, 10**8)),
    ("monitor", "start_at"): ("end", lambda v: _choice(v, ("end", "beginning"))),
    ("publisher", "bind"): ("127.0.0.1", _hosts),
    ("publisher", "default_bantime"): ("600", _number(int, -1, 2**31 - 1)),
    ("publisher", "heartbeat_interval"): ("1", _number(float, 0.05, 3600)),
    ("publisher", "send_hwm"): ("1000", _number(int, 10, 10**7)),
    ("publisher", "allow_networks"): ("true", _bool),
    ("publisher", "allowlist"): ("127.0.0.0/8 ::1/128", _networks),
    ("publisher", "rate_limit"): ("50", _number(float, 0.1, 10**6)),
    ("publisher", "rate_burst"): ("1000", _number(int, 1, 10**7)),
    ("publisher", "allow_foreign_unban"): ("false", _bool),
    ("publisher", "legacy_report_bind"): ("", _endpoints),
    ("publisher", "legacy_publish_bind"): ("", _endpoints),
    ("publisher", "legacy_token"): ("", _legacy_token),
    ("subscriber", "allowlist"): ("127.0.0.0/8 ::1/128", _networks),
    ("subscriber", "batch_size"): ("2000", _number(int, 1, 10000)),
    ("subscriber", "heartbeat_timeout"): ("5", _number(float, 0.1, 3600)),
    ("subscriber", "resync_interval"): ("300", _number(float, 1, 86400)),
    ("monitor", "metrics"): ("", parse_listen),
    ("publisher", "metrics"): ("", parse_listen),
    ("subscriber", "metrics"): ("", parse_listen),
}


def _choice(value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
    return value


@dataclass(frozen=True)
class Config:
    """Parsed settings; `get(section, key)` returns the parsed value."""

    path: str
    values: dict[tuple[str, str], object]
    warnings: tuple[str, ...] = ()  # deprecated keys read; the daemon logs them at start

    def get(self, section: str, key: str):
        return self.values[(section, key)]

    @property
    def node(self) -> str:
        return self.values[("general", "node")]

    def endpoints(self, port_key: str) -> list[str]:
        """tcp:// endpoints of every hub for one of the three ports."""
        port = self.values[("general", port_key)]
        return [tcp_endpoint(host, port) for host in self.values[("general", "hubs")]]

    def binds(self, port_key: str) -> list[str]:
        port = self.values[("general", port_key)]
        return [tcp_endpoint(host, port) for host in self.values[("publisher", "bind")]]

    def state_path(self, name: str) -> Path:
        return Path(self.values[("general", "state_dir")]) / name

    def network_limits(self) -> NetworkLimits:
        return NetworkLimits(
            self.values[("publisher", "allow_networks")],
            self.values[("general", "min_prefix_v4")],
            self.values[("general", "min_prefix_v6")],
        )

    def sync_jails(self) -> set[str]:
        """Local jails the subscriber writes into: the monitor must not report them back."""
        return {
            self.values[("general", "sync_jail")],
            *self.values[("general", "jail_map")].values(),
        }


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
    ("general", "fail2ban_socket"),
    ("general", "keys_dir"),
    ("monitor", "logpath"),
}


def load_config(path: str) -> Config:
    """Read path and its optional .local override; raise ConfigError naming file, section, key."""
    raw: dict[tuple[str, str], tuple[str, str]] = {}  # (section, key) -> (value, where it is set)
    warnings: list[str] = []
    local = str(Path(path).with_suffix(".local"))
    for file, required in ((path, True), (local, False)):
        if not required and not os.path.exists(file):
            continue
        found = {key: (value, _where(file, *key)) for key, value in _read_ini(file).items()}
        warnings += _rename_old_keys(found)
        raw.update(found)
    values = {}
    for (section, key), (default, parse) in SCHEMA.items():
        value, where = raw.pop((section, key), (default, _where(path, section, key)))
        try:
            values[(section, key)] = parse(value.strip())
            if (section, key) in PATH_KEYS:
                values[(section, key)] = str(Path(path).resolve().parent / values[(section, key)])
            if (section, key) == ("general", "run_dir"):
                _check_run_dir(values[(section, key)])
        except ValueError as error:
            raise ConfigError(f"{where}: {error}") from None
    if raw:
        _, where = next(iter(raw.values()))
        raise ConfigError(f"{where}: unknown key")
    return Config(path, values, tuple(warnings))


def _check_run_dir(run_dir: str) -> None:
    """The longest control socket path, run_dir/subscriber.sock, must fit a unix socket."""
    longest = len(os.fsencode(str(control_path(Path(run_dir), "subscriber"))))
    if longest > MAX_SOCKET_PATH:
        raise ValueError(
            f"too long for the daemons' control sockets ({longest} bytes with "
            f"/subscriber.sock; at most {MAX_SOCKET_PATH})"
        )


def _where(file: str, section: str, key: str) -> str:
    return f"{file}: [{section}] {key}"


@dataclass(frozen=True)
class OldKey:
    """A key of fail2ban-zmq-tools' fail2ban-cluster.conf, and what f2bzmq makes of it."""

    new: tuple[str, str] | None  # (section, key) it is read as; None: ignored, nothing means it
    note: str  # what differs from the old meaning, or what replaces it
    convert: Callable[[str], str] = str.strip
    secret: bool = False  # keep the value out of the warning, and so out of the logs


_OLD_URL = re.compile(r"^tcp://(\[[^]]+\]|[^:/\s]+):([0-9]+)$")


def _old_endpoint(value: str) -> str:
    """An old tcp:// URL, without the "# comment" the old shipped file wrote after it."""
    return re.sub(r"\s+#.*$", "", value).strip()


def _old_hub(value: str) -> str:
    """The host of an old monitor's or subscriber's URL of the publisher."""
    url = _old_endpoint(value)
    match = _OLD_URL.match(url)
    if not match or match[1] == "*":
        raise ValueError(f"{url!r} is not a tcp://HOST:PORT URL of a publisher")
    return match[1].strip("[]")


_BY_KEY = "the monitor proves who it is with its CURVE key in [general] keys_dir"

# (section, old key) -> what it becomes; section "*" stands for any section. An old file
# keeps working while a cluster migrates, and every old key logs a warning naming its
# successor. The old [publisher] auth is read together with authtoken in _rename_old_keys.
OLD_KEYS: dict[tuple[str, str], OldKey] = {
    ("monitor", "zmqreplyserver"): OldKey(
        ("general", "hubs"),
        "the monitor reports to that host on [general] report_port, with CURVE keys; "
        "the old port is not used",
        _old_hub,
    ),
    ("subscriber", "zmqpublisherurl"): OldKey(
        ("general", "hubs"),
        "the subscriber listens to that host on [general] publish_port and snapshot_port, "
        "with CURVE keys; the old port is not used",
        _old_hub,
    ),
    ("*", "fail2banlogpath"): OldKey(("monitor", "logpath"), "same meaning"),
    ("publisher", "replybindurl"): OldKey(
        ("publisher", "legacy_report_bind"),
        "old monitors keep reporting there, unencrypted",
        _old_endpoint,
    ),
    ("publisher", "broadcasterbindurl"): OldKey(
        ("publisher", "legacy_publish_bind"),
        "old subscribers keep listening there, unencrypted",
        _old_endpoint,
    ),
    ("publisher", "authtoken"): OldKey(
        ("publisher", "legacy_token"), "old monitors must send it", secret=True
    ),
    ("publisher", "auth"): OldKey(
        None, "old monitors must send a token exactly when legacy_token is set"
    ),
    ("monitor", "auth"): OldKey(None, _BY_KEY),
    ("monitor", "authtoken"): OldKey(None, _BY_KEY),
    ("*", "pidfile"): OldKey(None, "PID files are [general] run_dir/ROLE.pid"),
    ("subscriber", "zmqprefixfilter"): OldKey(
        None, "the subscriber takes every update of its hubs"
    ),
    ("subscriber", "subscriberaction"): OldKey(
        None, "the subscriber bans in [general] sync_jail through fail2ban's socket"
    ),
}


def _rename_old_keys(found: dict[tuple[str, str], tuple[str, str]]) -> list[str]:
    """Read one file's fail2ban-zmq-tools keys as f2bzmq keys, in place; return the warnings."""
    warnings = []
    # The old publisher asked for its token only when auth was exactly "true".
    auth = found.get(("publisher", "auth"))
    if auth is not None and auth[0].strip() != "true" and ("publisher", "authtoken") in found:
        _, where = found.pop(("publisher", "authtoken"))
        warnings.append(
            f"{where} is a fail2ban-zmq-tools key and is ignored: auth is not true, "
            "so old monitors send no token and [publisher] legacy_token stays empty"
        )
    renamed: dict[tuple[str, str], tuple[str, str, str]] = {}  # new key -> value, where, old key
    for (section, key), (value, where) in list(found.items()):
        old = OLD_KEYS.get((section, key)) or OLD_KEYS.get(("*", key))
        if old is None:
            continue
        del found[(section, key)]
        new = old.new
        if new is None:
            warnings.append(f"{where} is a fail2ban-zmq-tools key and is ignored: {old.note}")
            continue
        successor = f"[{new[0]}] {new[1]}"
        if new in found:
            warnings.append(
                f"{where} is a fail2ban-zmq-tools key and is ignored: {successor} is set"
            )
            continue
        try:
            converted = old.convert(value)
        except ValueError as error:
            raise ConfigError(f"{where}: {error}") from None
        if new in renamed and renamed[new][0] != converted:
            earlier, _, other = renamed[new]
            raise ConfigError(
                f"{where}: gives {successor} = {converted!r}, but {other} gives {earlier!r}: "
                f"set {successor} instead of both"
            )
        renamed[new] = (converted, where, f"[{section}] {key}")
        shown = "(hidden)" if old.secret else converted
        warnings.append(
            f"{where} is a fail2ban-zmq-tools key: read as {successor} = {shown} "
            f"({old.note}); rename it to {new[1]} in [{new[0]}]"
        )
    found.update({key: (value, where) for key, (value, where, _) in renamed.items()})
    return warnings


def _read_ini(file: str) -> dict[tuple[str, str], str]:
    parser = configparser.ConfigParser(interpolation=None, default_section="__none__")
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
        if section not in known_sections:
            raise ConfigError(f"{file}: [{section}]: unknown section")
        for key, value in parser.items(section):
            found[(section, key)] = value
    return found
