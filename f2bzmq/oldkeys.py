"""fail2ban-zmq-tools' fail2ban-cluster.conf keys, read as f2bzmq's while a cluster migrates.

An old file keeps working: each old key is read under the name that replaces it (or
ignored when nothing means it any more), and each gives a warning naming its successor,
which the daemon logs at start.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass


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


def rename_old_keys(found: dict[tuple[str, str], tuple[str, str]]) -> list[str]:
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
            raise ValueError(f"{where}: {error}") from None
        if new in renamed and renamed[new][0] != converted:
            earlier, _, other = renamed[new]
            raise ValueError(
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
