"""A whole f2bzmq cluster on 127.0.0.1: one hub, N nodes, real fail2ban and real daemons.

Each role runs as its own process through the shipped entry script (`run`), with a
private configuration file, so a test sees exactly what an operator would run.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from f2bserver import Fail2banServer, wait_until

REPO = Path(__file__).resolve().parent.parent


def free_ports(count: int) -> list[int]:
    """Ports the kernel has just handed out on loopback, so parallel runs don't collide."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class RoleProcess:
    """One daemon (`fail2ban-<role>.py -c CONF run`) with its output in a file."""

    def __init__(self, role: str, config: Path, directory: Path) -> None:
        self.role = role
        self.config = config
        self.output = directory / f"{role}.out"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with self.output.open("ab") as output:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    str(REPO / f"fail2ban-{self.role}.py"),
                    "-c",
                    str(self.config),
                    "run",
                ],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
            )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int | None:
        """Stop with sig (SIGKILL to simulate a crash); return the exit code."""
        if self.process is None:
            return None
        process, self.process = self.process, None
        if process.poll() is None:
            process.send_signal(sig)
            try:
                return process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
                raise AssertionError(f"{self.role} did not stop on signal {sig}") from None
        return process.returncode

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_text(self) -> str:
        return self.output.read_text(errors="replace") if self.output.exists() else ""


def write_config(path: Path, node: str, ports: list[int], directory: Path, **extra: dict) -> None:
    """A node's fail2ban-cluster.conf: everything private to `directory`."""
    sections: dict[str, dict[str, str]] = {
        "general": {
            "node": node,
            "hubs": "127.0.0.1",
            "report_port": str(ports[0]),
            "publish_port": str(ports[1]),
            "snapshot_port": str(ports[2]),
            "state_dir": str(directory / "state"),
            "run_dir": str(directory / "run"),
            "logtarget": str(directory / "{role}.log"),
            "loglevel": "DEBUG",
        },
        "monitor": {"start_at": "beginning", "ack_timeout": "2"},
        "publisher": {"heartbeat_interval": "0.5"},
        "subscriber": {"heartbeat_timeout": "3"},
    }
    for section, values in extra.items():
        sections.setdefault(section, {}).update(values)
    text = "".join(
        f"[{section}]\n" + "".join(f"{key} = {value}\n" for key, value in values.items())
        for section, values in sections.items()
    )
    path.write_text(text)


class Hub:
    """The publisher, in its own folder."""

    def __init__(self, root: Path, ports: list[int], **extra: dict) -> None:
        self.directory = root / "hub"
        self.directory.mkdir(parents=True, exist_ok=True)
        self.config = self.directory / "fail2ban-cluster.conf"
        write_config(self.config, "hub", ports, self.directory, **extra)
        self.publisher = RoleProcess("publisher", self.config, self.directory)

    def log_text(self) -> str:
        path = self.directory / "publisher.log"
        return path.read_text(errors="replace") if path.exists() else ""


class Node:
    """One server of the cluster: its fail2ban-server, monitor and subscriber."""

    def __init__(self, root: Path, name: str, ports: list[int], **extra: dict) -> None:
        self.name = name
        self.fail2ban = Fail2banServer(root, name)
        self.directory = self.fail2ban.directory
        self.config = self.directory / "fail2ban-cluster.conf"
        extra.setdefault("general", {})["fail2ban_socket"] = str(self.fail2ban.socket)
        extra.setdefault("monitor", {})["logpath"] = str(self.fail2ban.log)
        write_config(self.config, name, ports, self.directory, **extra)
        self.monitor = RoleProcess("monitor", self.config, self.directory)
        self.subscriber = RoleProcess("subscriber", self.config, self.directory)

    def start(self) -> None:
        self.fail2ban.start()
        self.monitor.start()
        self.subscriber.start()

    def stop(self) -> None:
        try:
            self.monitor.stop()
            self.subscriber.stop()
        finally:
            self.fail2ban.stop()

    def log_text(self, role: str) -> str:
        path = self.directory / f"{role}.log"
        return path.read_text(errors="replace") if path.exists() else ""


class Cluster:
    """A hub and `size` nodes named node1..nodeN; a context manager that cleans up everything."""

    def __init__(self, root: Path, size: int = 3, **extra: dict) -> None:
        self.ports = free_ports(3)
        self.hub = Hub(root, self.ports, **extra)
        self.nodes = {
            f"node{i}": Node(root, f"node{i}", self.ports, **extra) for i in range(1, size + 1)
        }

    def __enter__(self) -> Cluster:
        try:
            self.hub.publisher.start()
            for node in self.nodes.values():
                node.start()
            self.wait_ready()
        except BaseException:
            self.__exit__()
            raise
        return self

    def wait_ready(self, timeout: float = 30) -> None:
        """Every subscriber has its first snapshot and every daemon is alive."""

        def ready() -> bool:
            return all(
                "snapshot from" in node.log_text("subscriber") for node in self.nodes.values()
            )

        if not wait_until(ready, timeout, 0.1):
            raise AssertionError("the cluster did not come up:\n" + self.diagnostics())

    def __exit__(self, *exc_info: object) -> None:
        errors = []
        for node in self.nodes.values():
            try:
                node.stop()
            except Exception as error:  # keep cleaning up the others
                errors.append(error)
        self.hub.publisher.stop()
        if errors:
            raise errors[0]

    def __getitem__(self, name: str) -> Node:
        return self.nodes[name]

    def diagnostics(self) -> str:
        """Every daemon's log tail, for a failing assertion's message."""
        parts = [f"--- hub publisher ---\n{tail(self.hub.log_text())}"]
        for node in self.nodes.values():
            for role in ("monitor", "subscriber"):
                parts.append(f"--- {node.name} {role} ---\n{tail(node.log_text(role))}")
                out = getattr(node, role).log_text()
                if out.strip():
                    parts.append(f"--- {node.name} {role} output ---\n{tail(out)}")
        return "\n".join(parts)


def tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.splitlines()[-lines:])


def pids_of(pattern: str) -> list[int]:
    """PIDs whose command line contains pattern (for leak checks)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if pattern.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found
