"""Reading the configuration again in a running daemon (SIGHUP, `ROLE reload`).

A daemon takes at once the changed keys it can apply without dropping a connection or
a file (each role lists them); every other changed key of its sections is named as
needing a restart, and keeps its running value until then, so `status` and the
daemon always agree. Nothing here reads a file: `plan_reload` compares two parsed
configurations.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

from .config import Config, ConfigError, load_config
from .keys import KeyFileError, Security
from .protocol import ProtocolError

# Every role can change its log level at once.
LOGLEVEL = ("general", "loglevel")


@dataclass
class Reloaded:
    """What a reload did: keys applied, keys that wait for a restart, the keys' fate."""

    applied: list[tuple[str, str]] = field(default_factory=list)
    restart: list[tuple[str, str]] = field(default_factory=list)
    keys: str = "unchanged"

    def describe(self) -> str:
        parts = [
            f"applied {_names(self.applied)}" if self.applied else "no setting changed",
            f"needs a restart: {_names(self.restart)}" if self.restart else "",
            f"keys: {self.keys}",
        ]
        return "; ".join(part for part in parts if part)

    def as_dict(self) -> dict:
        """The answer to `reload` on the control socket, as the command prints it."""
        return {
            "Applied": _names(self.applied) or "nothing changed",
            "Needs a restart": _names(self.restart) or "nothing",
            "Keys": self.keys,
        }


def _names(keys: list[tuple[str, str]]) -> str:
    return ", ".join(f"[{section}] {key}" for section, key in keys)


def plan_reload(
    running: Config, read: Config, role: str, live: frozenset[tuple[str, str]]
) -> tuple[Config, Reloaded]:
    """The configuration to run with now (the running one, with the changed keys of
    `live` taken from `read`), and what changed. Only [general] and the role's own
    section matter to a role."""
    reloaded = Reloaded()
    sections = {}
    for section in ("general", role):
        old, new = running.section(section), read.section(section)
        taken = {}
        for key in dataclasses.fields(old):
            if getattr(old, key.name) == getattr(new, key.name):
                continue
            if (section, key.name) in live:
                reloaded.applied.append((section, key.name))
                taken[key.name] = getattr(new, key.name)
            else:
                reloaded.restart.append((section, key.name))
        sections[section] = dataclasses.replace(old, **taken)
    return dataclasses.replace(running, **sections), reloaded


def reread(
    running: Config, role: str, live: frozenset[tuple[str, str]], logger: logging.Logger
) -> tuple[Config, Reloaded]:
    """The running configuration with what `role` may change at once read from its file
    again (plan_reload), the log level set. A broken file raises ConfigError, logged:
    the running settings stay."""
    try:
        read = load_config(running.path)
    except ConfigError as error:
        logger.error("reload: %s; the running settings stay", error)
        raise
    config, reloaded = plan_reload(running, read, role, live)
    set_loglevel(config.general.loglevel)
    return config, reloaded


def set_loglevel(level: int) -> None:
    """The daemon's log level from now on (setup_logging's, without a new handler)."""
    logging.getLogger().setLevel(level)
    logging.getLogger("watchdog").setLevel(max(level, logging.WARNING))


def node_keys(security: Security, config: Config, role: str) -> str:
    """A node's key pair and the hub's key read again. Its sockets hold them: a change
    takes a restart."""
    if security.insecure:
        return "none (insecure = true)"
    try:
        read = Security.for_role(config, role)
    except (KeyFileError, ProtocolError) as error:
        return f"cannot be read ({error}); the running ones stay"
    if (read.own, read.hub_public) == (security.own, security.hub_public):
        return "unchanged"
    return "changed: restart to use them"
