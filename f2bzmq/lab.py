"""A whole cluster on one machine: real fail2ban-servers and the three daemons on 127.0.0.1.

Used by the demo (`python3 -m f2bzmq demo`); the tests and benchmarks build on it, with
helpers of their own in tests/support. A `Fail2banServer` runs the distribution's
fail2ban-server with its own configuration directory, so no system path is touched and
several "nodes" run side by side; a `Cluster` adds a hub and, per node, a monitor and a
subscriber, each its own process started the way an operator would (`run` with a private
configuration file).

    with Cluster(root, size=3) as cluster:
        cluster["node1"].fail2ban.attack("192.0.2.7")
        cluster["node2"].fail2ban.wait_banned("cluster", "192.0.2.7")
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from .config import load_config
from .control import ControlError, ask
from .fail2ban_client import Fail2banClient
from .keys import HUB, keygen

STOCK_FILTERS = Path("/etc/fail2ban/filter.d")
STOCK_ACTIONS = Path("/etc/fail2ban/action.d")
PROJECT_ACTIONS = Path(__file__).resolve().parent.parent / "etc" / "fail2ban" / "action.d"
CLIENT_PROGRAM = "fail2ban-client"

# The project's no-op filter for the sync jail: bans arrive only through "set <jail> banip".
SYNC_FILTER = "f2bzmq-cluster"
SYNC_FILTER_TEXT = "[Definition]\nfailregex =\nignoreregex =\n"

# Unix socket paths are limited to 107 bytes; keep a margin.
MAX_SOCKET_PATH = 100


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll condition() until it holds or timeout seconds pass; False means it never held."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def stays(condition: Callable[[], bool], seconds: float, interval: float = 0.2) -> bool:
    """condition() holds every time it is looked at for `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not condition():
            return False
        time.sleep(interval)
    return True


def process_alive(pid: int) -> bool:
    """True while pid runs; a zombie counts as gone, since nobody may reap a daemon's child."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def run_command(*command: str, timeout: float = 30) -> str:
    """Run a command (never through a shell); its output, or an error that shows it."""
    done = subprocess.run(
        command,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def is_fail2ban_server(pid: int) -> bool:
    """Guard against killing an unrelated process that reused a stale pid."""
    try:
        return b"fail2ban-server" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


class Fail2banServer:
    """One real fail2ban-server with private socket, pid file, log, database and jails."""

    def __init__(
        self,
        root: Path,
        name: str = "node",
        jails: str | Callable[[Fail2banServer], str] | None = None,
        sshd_maxretry: int = 2,
        bantime: int = 600,
        sync_jail: str = "cluster",
        sync_bantime: int = 86400,
        netns: str | None = None,
    ) -> None:
        self.name = name
        # A network namespace (`ip netns`) to run in, so a real ban action changes only its
        # firewall; the socket and log are files, so every other call works from outside.
        self.netns = netns
        self.directory = Path(root) / name  # everything of this server lives here
        self.config = self.directory / "config"
        self.log = self.directory / "fail2ban.log"
        self.auth_log = self.directory / "auth.log"
        self.sync_log = self.directory / "empty.log"
        self.db = self.directory / "fail2ban.sqlite3"
        self.pidfile = self.directory / "fail2ban.pid"
        self.client_output = self.directory / "fail2ban-client.out"
        self.sshd_maxretry = sshd_maxretry
        self.sync_jail = sync_jail
        self._short_dir: Path | None = None  # private socket dir when directory is too deep
        self.socket = self.directory / "fail2ban.sock"
        if len(os.fsencode(self.socket)) > MAX_SOCKET_PATH:
            self._short_dir = Path(tempfile.mkdtemp(prefix="f2b"))
            self.socket = self._short_dir / "fail2ban.sock"
        self._pid: int | None = None
        self._attacks = 0
        self._write_config(
            jails(self) if callable(jails) else jails or self.default_jails(bantime, sync_bantime)
        )

    def default_jails(
        self, bantime: int, sync_bantime: int, sync_action: str = "dummy", action: str = "dummy"
    ) -> str:
        """sshd watching auth_log, and the sync jail fed only by commands; dummy actions
        (an action "" leaves its jail without any: fail2ban only keeps the list)."""
        if sync_action == "dummy":
            sync_action = f"dummy[target={self.directory / (self.sync_jail + '.dummy')}]"
        if action == "dummy":
            action = f"dummy[target={self.directory / 'sshd.dummy'}]"
        return (
            "[DEFAULT]\n"
            "backend = polling\n"
            "\n"
            "[sshd]\n"
            "enabled = true\n"
            "filter = sshd\n"
            f"logpath = {self.auth_log}\n"
            f"maxretry = {self.sshd_maxretry}\n"
            "findtime = 600\n"
            f"bantime = {bantime}\n"
            f"action = {action}\n"
            "\n"
            f"[{self.sync_jail}]\n"
            "enabled = true\n"
            f"filter = {SYNC_FILTER}\n"
            f"logpath = {self.sync_log}\n"
            f"bantime = {sync_bantime}\n"
            f"action = {sync_action}\n"
        )

    def _write_config(self, jails: str) -> None:
        filters = self.config / "filter.d"
        filters.mkdir(parents=True, exist_ok=True)
        for stock in sorted(STOCK_FILTERS.iterdir()):
            link = filters / stock.name
            if not link.is_symlink():
                link.symlink_to(stock)
        (filters / f"{SYNC_FILTER}.conf").write_text(SYNC_FILTER_TEXT)
        # fail2ban's own actions and the project's Python actions (f2bzmq-nftset.py).
        actions = self.config / "action.d"
        actions.mkdir(exist_ok=True)
        for source in [*sorted(STOCK_ACTIONS.iterdir()), *sorted(PROJECT_ACTIONS.glob("*.py"))]:
            link = actions / source.name
            if not link.is_symlink():
                link.symlink_to(source)
        (self.config / "fail2ban.conf").write_text(
            "[Definition]\n"
            "loglevel = INFO\n"
            f"logtarget = {self.log}\n"
            "syslogsocket = auto\n"
            f"socket = {self.socket}\n"
            f"pidfile = {self.pidfile}\n"
            f"dbfile = {self.db}\n"
            "dbpurgeage = 1d\n"
            "allowipv6 = auto\n"
        )
        (self.config / "jail.conf").write_text(jails)
        # fail2ban refuses to start a jail whose log file does not exist.
        self.auth_log.touch()
        self.sync_log.touch()

    def start(self, timeout: float = 15) -> None:
        """Start the server and wait until it answers ping; on failure leave nothing running."""
        self.socket.parent.mkdir(mode=0o700, exist_ok=True)
        with self.client_output.open("ab") as output:
            # Output goes to a file, not a pipe: the daemon could inherit a pipe and keep it open.
            # "-x" removes a stale socket left by a killed server; the path is private to us.
            started = subprocess.run(
                [*self._netns_prefix(), CLIENT_PROGRAM, "-c", str(self.config), "-x", "start"],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=output,
                timeout=timeout,
                check=False,
            )
        with self.client() as client:
            answered = started.returncode == 0 and wait_until(client.ping, timeout)
        if not answered:
            self.stop()
            raise RuntimeError(
                f"fail2ban-server {self.name} did not start (exit {started.returncode}); "
                f"see {self.client_output} and {self.log}"
            )
        self._pid = self._read_pid()

    def stop(self, timeout: float = 15) -> None:
        """Stop the server and wait until its process is gone, killing it if it lingers."""
        pid = self._pid or self._read_pid()
        self._pid = None
        if self.socket.exists():
            # On a timeout the kill below takes over.
            with contextlib.suppress(subprocess.TimeoutExpired):
                subprocess.run(
                    [CLIENT_PROGRAM, "-s", str(self.socket), "stop"],
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    timeout=timeout,
                    check=False,
                )
        if pid is not None and not wait_until(lambda: not process_alive(pid), timeout):
            if is_fail2ban_server(pid):
                os.kill(pid, signal.SIGKILL)
            if not wait_until(lambda: not process_alive(pid), 5):
                raise RuntimeError(f"fail2ban-server {self.name} (pid {pid}) survived SIGKILL")
        if self._short_dir is not None:
            shutil.rmtree(self._short_dir, ignore_errors=True)

    def restart(self) -> None:
        """Stop and start again with the same paths, database and jails."""
        self.stop()
        self.start()

    def __enter__(self) -> Fail2banServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def client(self) -> Fail2banClient:
        """A client of f2bzmq's own talking to this server; the caller closes it."""
        return Fail2banClient(str(self.socket))

    def banned(self, jail: str) -> list[str]:
        """What the server itself reports, through the real fail2ban-client, not our code."""
        return run_command(
            CLIENT_PROGRAM, "-s", str(self.socket), "get", jail, "banip", timeout=15
        ).split()

    def attack(self, *ips: str, count: int | None = None) -> None:
        """Append sshd failures from each ip to auth_log: by default just enough for a ban."""
        stamp = time.strftime("%b %d %H:%M:%S")
        lines = []
        for ip in ips:
            # A pid of its own per attacker: fail2ban's sshd filter ties one pid's lines together.
            self._attacks += 1
            pid = 1000 + self._attacks
            line = f"{stamp} host sshd[{pid}]: Failed password for root from {ip} port 50000 ssh2\n"
            lines.append(line * (self.sshd_maxretry if count is None else count))
        with self.auth_log.open("a") as log:
            log.write("".join(lines))

    def wait_banned(self, jail: str, ip: str, present: bool = True, timeout: float = 20) -> None:
        """Wait until ip is (or, with present=False, is no longer) banned in jail."""
        found: list[str] = []

        def settled() -> bool:
            found[:] = self.banned(jail)
            return (ip in found) == present

        if not wait_until(settled, timeout, interval=0.2):
            state = "banned" if present else "unbanned"
            raise AssertionError(
                f"{ip} not {state} in {self.name}/{jail} within {timeout:g}s; banned: {found}"
            )

    def _netns_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns] if self.netns else []

    def _read_pid(self) -> int | None:
        try:
            return int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None


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
    """One daemon (`python3 -m f2bzmq ROLE -c CONF run`) with its output in a file."""

    def __init__(self, role: str, config: Path, directory: Path) -> None:
        self.role = role
        self.config = config
        self.output = directory / f"{role}.out"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with self.output.open("ab") as output:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "f2bzmq", self.role, "-c", str(self.config), "run"],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                env=child_environment(),
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

    def ready(self) -> bool:
        """The daemon answers `status` on its control socket, and a subscriber has a
        snapshot of every hub: what the daemon says of itself, not what its log says."""
        try:
            status = ask(self.control_socket(), timeout=1.0)
        except ControlError:
            return False
        if self.role == "subscriber":
            return all(hub["synced"] for hub in status["Hubs"].values())
        return True

    def control_socket(self) -> Path:
        """Where the daemon answers: ROLE.sock in the run_dir its configuration names."""
        return load_config(str(self.config)).control_path(self.role)

    def log_text(self) -> str:
        return self.output.read_text(errors="replace") if self.output.exists() else ""


def child_environment() -> dict[str, str]:
    """This interpreter's environment, with this package importable even if not installed."""
    package_parent = str(Path(__file__).resolve().parent.parent)
    paths = [package_parent, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(paths))


def make_keys(directory: Path, nodes: list[str]) -> Path:
    """The hub key pair, a key pair per node, and every node's public key in nodes/."""
    if not (directory / f"{HUB}.key_secret").exists():
        keygen(HUB, directory)
    for node in nodes:
        if not (directory / f"{node}.key_secret").exists():
            public, _ = keygen(node, directory)
            (directory / "nodes").mkdir(exist_ok=True)
            shutil.copy(public, directory / "nodes" / public.name)
    (directory / "nodes").mkdir(exist_ok=True)
    return directory


def short_run_dir(wanted: Path) -> Path:
    """`wanted`, or a short private folder when control sockets there would be too long."""
    if len(os.fsencode(str(wanted / "subscriber.sock"))) <= MAX_SOCKET_PATH:
        return wanted
    short = Path(tempfile.mkdtemp(prefix="f2brun"))
    atexit.register(shutil.rmtree, short, ignore_errors=True)
    return short


def write_config(
    path: Path, node: str, ports: list[int], directory: Path, keys_dir: Path, **extra: dict
) -> None:
    """A node's fail2ban-cluster.conf: everything private to `directory`, CURVE keys in keys_dir."""
    run_dir = str(short_run_dir(directory / "run"))
    sections: dict[str, dict[str, str]] = {
        "general": {
            "node": node,
            "keys_dir": str(keys_dir),
            "hubs": "127.0.0.1",
            "report_port": str(ports[0]),
            "publish_port": str(ports[1]),
            "snapshot_port": str(ports[2]),
            "state_dir": str(directory / "state"),
            "run_dir": run_dir,
            "logtarget": str(directory / "{role}.log"),
            "loglevel": "DEBUG",
        },
        "monitor": {"start_at": "beginning", "ack_timeout": "2"},
        # Every file of the lab's hub in its own folder, beside the nodes' files.
        "publisher": {
            "heartbeat_interval": "0.5",
            "state_dir": str(directory / "state"),
            "run_dir": run_dir,
        },
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
    """A publisher in its own folder, listening on its own loopback address."""

    def __init__(
        self,
        root: Path,
        ports: list[int],
        name: str = "hub",
        address: str = "127.0.0.1",
        keys_dir: Path | None = None,
        **extra,
    ) -> None:
        self.name = name
        self.address = address
        self.ports = ports  # report, publish and snapshot port
        self.directory = root / name
        self.directory.mkdir(parents=True, exist_ok=True)
        self.config = self.directory / "fail2ban-cluster.conf"
        sections = {section: dict(values) for section, values in extra.items()}
        sections.setdefault("publisher", {})["bind"] = address
        self.keys_dir = keys_dir or make_keys(root / "keys", [])
        write_config(self.config, name, ports, self.directory, self.keys_dir, **sections)
        self.publisher = RoleProcess("publisher", self.config, self.directory)

    def log_text(self) -> str:
        path = self.directory / "publisher.log"
        return path.read_text(errors="replace") if path.exists() else ""


class Node:
    """One server of the cluster: its fail2ban-server, monitor and subscriber."""

    def __init__(
        self,
        root: Path,
        name: str,
        ports: list[int],
        fail2ban: dict | None = None,
        keys_dir: Path | None = None,
        **extra,
    ) -> None:
        self.name = name
        self.fail2ban = Fail2banServer(root, name, **(fail2ban or {}))
        self.directory = self.fail2ban.directory
        self.config = self.directory / "fail2ban-cluster.conf"
        sections = {section: dict(values) for section, values in extra.items()}
        sections.setdefault("general", {})["fail2ban_socket"] = str(self.fail2ban.socket)
        sections.setdefault("monitor", {})["logpath"] = str(self.fail2ban.log)
        keys_dir = keys_dir or make_keys(root / "keys", [name])
        write_config(self.config, name, ports, self.directory, keys_dir, **sections)
        self.monitor = RoleProcess("monitor", self.config, self.directory)
        self.subscriber = RoleProcess("subscriber", self.config, self.directory)

    def start(self) -> None:
        self.fail2ban.start()
        self.monitor.start()
        self.subscriber.start()

    def stop(self) -> None:
        """Stop every process of the node, even if one of them refuses to stop."""
        errors = []
        for stop in (self.monitor.stop, self.subscriber.stop, self.fail2ban.stop):
            try:
                stop()
            except Exception as error:  # keep stopping the others
                errors.append(error)
        if errors:
            raise errors[0]

    def log_text(self, role: str) -> str:
        path = self.directory / f"{role}.log"
        return path.read_text(errors="replace") if path.exists() else ""


class Cluster:
    """`hubs` publishers and `size` nodes named node1..nodeN; cleans up everything on exit.

    Hubs share the ports and differ by loopback address (127.0.0.1, 127.0.0.2, …), the
    way redundant hubs on different servers share one configuration. `fail2ban` holds
    keyword arguments for every node's Fail2banServer (e.g. `jails`, `bantime`), or makes
    them from the node's name (e.g. its `netns`); the other keyword arguments are
    configuration sections: `subscriber={"batch_size": "50"}`.
    """

    def __init__(
        self,
        root: Path,
        size: int = 3,
        hubs: int = 1,
        fail2ban: dict | Callable[[str], dict] | None = None,
        **extra: dict,
    ) -> None:
        self.ports = free_ports(3)
        names = [f"node{i}" for i in range(1, size + 1)]
        self.keys_dir = make_keys(root / "keys", names)
        addresses = [f"127.0.0.{i}" for i in range(1, hubs + 1)]
        sections = {section: dict(values) for section, values in extra.items()}
        sections.setdefault("general", {})["hubs"] = " ".join(addresses)
        self.hubs = [
            Hub(root, self.ports, f"hub{i + 1}" if i else "hub", address, self.keys_dir, **sections)
            for i, address in enumerate(addresses)
        ]
        self.hub = self.hubs[0]
        self.nodes = {
            name: Node(
                root,
                name,
                self.ports,
                fail2ban(name) if callable(fail2ban) else fail2ban,
                self.keys_dir,
                **sections,
            )
            for name in names
        }

    def __enter__(self) -> Cluster:
        try:
            for hub in self.hubs:
                hub.publisher.start()
            for node in self.nodes.values():
                node.start()
            self.wait_ready()
        except BaseException:
            self.__exit__()
            raise
        return self

    def wait_ready(self, timeout: float = 30) -> None:
        """Every daemon answers on its control socket and every subscriber has a snapshot of
        every hub."""
        daemons = [hub.publisher for hub in self.hubs]
        for node in self.nodes.values():
            daemons += [node.monitor, node.subscriber]
        if not wait_until(lambda: all(daemon.ready() for daemon in daemons), timeout, 0.1):
            raise AssertionError("the cluster did not come up:\n" + self.diagnostics())

    def __exit__(self, *exc_info: object) -> None:
        errors = []
        for node in self.nodes.values():
            try:
                node.stop()
            except Exception as error:  # keep cleaning up the others
                errors.append(error)
        for hub in self.hubs:
            try:
                hub.publisher.stop()
            except Exception as error:
                errors.append(error)
        if errors:
            raise errors[0]

    def __getitem__(self, name: str) -> Node:
        return self.nodes[name]

    def diagnostics(self) -> str:
        """Every daemon's log tail, for a failing assertion's message."""
        parts = [f"--- {hub.name} publisher ---\n{tail(hub.log_text())}" for hub in self.hubs]
        for node in self.nodes.values():
            for role in ("monitor", "subscriber"):
                parts.append(f"--- {node.name} {role} ---\n{tail(node.log_text(role))}")
                out = getattr(node, role).log_text()
                if out.strip():
                    parts.append(f"--- {node.name} {role} output ---\n{tail(out)}")
        return "\n".join(parts)


def tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.splitlines()[-lines:])
