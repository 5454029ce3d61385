"""Run real fail2ban-server processes with private socket, pid file, log, database and jails.

Tests check f2bzmq against the real thing: a Fail2banServer starts the Debian
fail2ban-server with its own configuration directory, so no root-owned path is
touched and several servers ("nodes") can run side by side.

    with Fail2banServer(tmp_path, "node1") as server:
        server.attack("192.0.2.7")
        server.wait_banned("sshd", "192.0.2.7")
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from f2bzmq.fail2ban import Fail2banClient

STOCK_FILTERS = Path("/etc/fail2ban/filter.d")
STOCK_ACTIONS = Path("/etc/fail2ban/action.d")
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


def process_alive(pid: int) -> bool:
    """True while pid runs; a zombie counts as gone, since nobody may reap a daemon's child."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


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
        jails: str | None = None,
        sshd_maxretry: int = 2,
        bantime: int = 600,
        sync_jail: str = "cluster",
        sync_bantime: int = 86400,
    ) -> None:
        self.name = name
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
            jails if jails is not None else self.default_jails(bantime, sync_bantime)
        )

    def default_jails(self, bantime: int, sync_bantime: int) -> str:
        """sshd watching auth_log, and the sync jail fed only by commands; both dummy actions."""
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
            f"action = dummy[target={self.directory / 'sshd.dummy'}]\n"
            "\n"
            f"[{self.sync_jail}]\n"
            "enabled = true\n"
            f"filter = {SYNC_FILTER}\n"
            f"logpath = {self.sync_log}\n"
            f"bantime = {sync_bantime}\n"
            f"action = dummy[target={self.directory / (self.sync_jail + '.dummy')}]\n"
        )

    def _write_config(self, jails: str) -> None:
        filters = self.config / "filter.d"
        filters.mkdir(parents=True, exist_ok=True)
        for stock in sorted(STOCK_FILTERS.iterdir()):
            link = filters / stock.name
            if not link.is_symlink():
                link.symlink_to(stock)
        (filters / f"{SYNC_FILTER}.conf").write_text(SYNC_FILTER_TEXT)
        actions = self.config / "action.d"
        if not actions.is_symlink():
            actions.symlink_to(STOCK_ACTIONS)
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
                [CLIENT_PROGRAM, "-c", str(self.config), "-x", "start"],
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
        done = subprocess.run(
            [CLIENT_PROGRAM, "-s", str(self.socket), "get", jail, "banip"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=15,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"fail2ban-client get {jail} banip failed: {done.stderr.strip()}")
        return done.stdout.split()

    def attack(self, ip: str, count: int | None = None) -> None:
        """Append sshd failures from ip to auth_log: by default just enough for a ban."""
        stamp = time.strftime("%b %d %H:%M:%S")
        # A pid of its own per attack: fail2ban's sshd filter ties lines of one sshd pid together.
        self._attacks += 1
        pid = 1000 + self._attacks
        line = f"{stamp} host sshd[{pid}]: Failed password for root from {ip} port 50000 ssh2\n"
        with self.auth_log.open("a") as log:
            log.write(line * (self.sshd_maxretry if count is None else count))

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

    def _read_pid(self) -> int | None:
        try:
            return int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
