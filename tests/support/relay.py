"""A relay daemon on its own loopback address, for the tests and the benchmarks."""

from __future__ import annotations

import shutil
from pathlib import Path

from f2bzmq.control import ControlError, ask
from f2bzmq.keys import HUB
from f2bzmq.lab import RoleProcess, tail, wait_until, write_config


class LabRelay:
    """A relay in root/NAME following the hub at 127.0.0.1 (the lab's), listening on
    `address` with the hub's ports, with a keys_dir of its own: the hub's public key, the
    key pair it serves with (the hub's, unless `server_key` names another in `keys`), its
    own node key NAME (which the hub must hold in keys/nodes/), and in nodes/ the keys of
    the nodes it `admits`. `sections` go over the lab's configuration."""

    def __init__(
        self,
        root: Path,
        ports: list[int],
        keys: Path,
        admits: list[str],
        name: str = "relay1",
        address: str = "127.0.0.11",
        server_key: str = HUB,
        **sections: dict,
    ) -> None:
        self.name = name
        self.address = address
        self.directory = root / name
        self.directory.mkdir(parents=True, exist_ok=True)
        self.keys_dir = self.directory / "keys"
        (self.keys_dir / "nodes").mkdir(parents=True, exist_ok=True)
        for key in (f"{HUB}.key", f"{server_key}.key_secret", f"{name}.key_secret"):
            shutil.copy2(keys / key, self.keys_dir / key)
        for node in admits:
            shutil.copy2(keys / f"{node}.key", self.keys_dir / "nodes" / f"{node}.key")
        values = {section: dict(keys_) for section, keys_ in sections.items()}
        values.setdefault("relay", {}).update(bind=address, server_key=server_key)
        self.config = self.directory / "fail2ban-cluster.conf"
        write_config(self.config, name, ports, self.directory, self.keys_dir, **values)
        self.process = RoleProcess("relay", self.config, self.directory)

    def start(self, timeout: float = 20) -> None:
        """Start it and wait until its copy of the hub's table is whole."""
        self.process.start()
        if not wait_until(self.whole, timeout, 0.05):
            raise AssertionError(f"relay {self.name} did not get a whole copy:\n{self.log()}")

    def status(self) -> dict:
        return ask(self.process.control_socket(), timeout=2.0)

    def whole(self) -> bool:
        try:
            return self.status()["Copy"] == "whole"
        except ControlError:
            return False

    def log_text(self) -> str:
        path = self.directory / "relay.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def log(self) -> str:
        """The end of its log and output, for an assertion's message."""
        return tail(self.log_text() + self.process.log_text(), 40)
