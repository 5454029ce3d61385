"""start / stop / restart / status / run for one role, with a PID file and python-daemon.

`start` forks a daemon and waits on a pipe until the daemon says it is up (or why it
is not), so a port already in use is reported on the terminal, not only in a log.
Every ZeroMQ context is made after the fork: one made before it hangs the daemon.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import daemon

from .config import Config
from .control import RELOAD, ControlError, ask
from .metrics import MetricsExporter
from .runtime import clock, setup_logging
from .sdnotify import Notifier

log = logging.getLogger("f2bzmq")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_NOT_RUNNING = 3  # LSB: program is not running
START_TIMEOUT = 20.0


class RoleControl:
    """Runs and controls one role's daemon: `factory(config, control_path)` builds its reactor."""

    def __init__(self, role: str, config: Config, factory: Callable) -> None:
        self.role = role
        self.config = config
        self.factory = factory
        run_dir = config.run_dir(role)
        self.pidfile = run_dir / f"{role}.pid"
        self.exitfile = run_dir / f"{role}.exit"  # why the daemon last stopped on an error
        self.control = config.control_path(role)

    def setup_logging(self, foreground: bool) -> None:
        """The role's log, then the configuration's warnings (old key names) into it."""
        setup_logging(
            self.role,
            self.config.general.logtarget,
            self.config.general.loglevel,
            foreground,
        )
        for warning in self.config.warnings:
            log.warning("%s", warning)

    def running_pid(self) -> int | None:
        """The PID in the PID file if that process is alive and is this role's daemon; a
        stale file, or one naming another process, is removed.

        The file is read without following a symlink, and `stop` signals only a process
        whose command line is this role's: a PID reused by another program, or written
        there by someone else, is never signalled (nor 0 and -1, which kill(2) reads as
        "my process group" and "every process")."""
        try:
            fd = os.open(self.pidfile, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as error:
            if error.errno == errno.ELOOP:  # a symlink in its place: no PID file of ours
                self._remove_pidfile()
            return None
        with os.fdopen(fd) as handle:
            text = handle.read(32).strip()
        pid = int(text) if text.isdigit() else 0
        if pid <= 0 or not is_role_daemon(pid, self.role):
            self._remove_pidfile()
            return None
        return pid

    def _remove_pidfile(self) -> None:
        with contextlib.suppress(OSError):  # `status` run by a user who may not remove it
            self.pidfile.unlink(missing_ok=True)

    def write_pidfile(self) -> None:
        """This process's PID in a new file: never written through a symlink or into a file
        someone else made there (O_EXCL after the unlink: a race fails, it is not followed)."""
        self.pidfile.unlink(missing_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        with os.fdopen(os.open(self.pidfile, flags, 0o644), "w") as handle:
            handle.write(f"{os.getpid()}\n")

    def run(self, foreground: bool = True) -> int:
        """Run the role's loop in this process until SIGTERM or SIGINT."""
        self.setup_logging(foreground)
        pid = self.running_pid()
        if pid is not None and pid != os.getpid():
            print(f"fail2ban-{self.role} is already running (pid {pid})", file=sys.stderr)
            return EXIT_FAILED
        self.pidfile.parent.mkdir(parents=True, exist_ok=True)
        try:
            reactor, exporter = self.build()
        except Exception as error:
            log.error("cannot start the %s: %s", self.role, error)
            self.record_exit(f"cannot start: {error}")
            if foreground:
                print(f"fail2ban-{self.role}: cannot start: {error}", file=sys.stderr)
            return EXIT_FAILED
        self.write_pidfile()
        # Under a unit of Type=notify: READY=1 when the loop starts, WATCHDOG=1 from it.
        reactor.notifier = Notifier.from_environment()
        try:
            reactor.garbage.start(time.monotonic())
            return self.run_reactor(reactor)
        finally:
            reactor.garbage.stop()
            if exporter:
                exporter.close()
            self.pidfile.unlink(missing_ok=True)

    def run_reactor(self, reactor) -> int:
        """The daemon's loop until it stops; an error that ends it is logged with its
        traceback in the daemon's own log and kept for `status`."""
        try:
            reactor.run()
        except Exception as error:
            log.exception("the %s stopped on an error: %s", self.role, describe(error))
            self.record_exit(describe(error))
            return EXIT_FAILED
        self.exitfile.unlink(missing_ok=True)
        return EXIT_OK

    def record_exit(self, reason: str) -> None:
        """Keep why the daemon stopped, so `status` can tell a crash loop from a stop."""
        try:
            self.exitfile.write_text(f"{clock(time.time())}: {reason}\n")
        except OSError as error:
            log.error("cannot write %s: %s", self.exitfile, error)

    def last_exit(self) -> str | None:
        try:
            return self.exitfile.read_text().strip() or None
        except OSError:
            return None

    def build(self) -> tuple[object, MetricsExporter | None]:
        """The role's reactor, and its Prometheus endpoint when `[role] metrics` asks for one."""
        listen = self.config.section(self.role).metrics
        exporter = MetricsExporter(self.role, listen, self.control) if listen else None
        try:
            return self.factory(self.config, self.control), exporter
        except Exception:
            if exporter:
                exporter.close()
            raise

    def start(self) -> int:
        pid = self.running_pid()
        if pid is not None:
            print(f"fail2ban-{self.role} is already running (pid {pid})", file=sys.stderr)
            return EXIT_FAILED
        self.pidfile.parent.mkdir(parents=True, exist_ok=True)
        read_fd, write_fd = os.pipe()
        if os.fork() == 0:
            os.close(read_fd)
            self._daemonize(write_fd)
        os.close(write_fd)
        message = _read_all(read_fd, START_TIMEOUT)
        if message.startswith("ok "):
            print(f"fail2ban-{self.role} started (pid {message.split()[1]})")
            return EXIT_OK
        reason = message.strip() or "the daemon exited during start-up; see its log"
        print(f"fail2ban-{self.role}: cannot start: {reason}", file=sys.stderr)
        return EXIT_FAILED

    def _daemonize(self, ready_fd: int) -> None:
        """In the forked child: detach, build the reactor, report on the pipe, run."""
        code = EXIT_FAILED
        try:
            with daemon.DaemonContext(
                files_preserve=[ready_fd], detach_process=True, umask=0o022, working_directory="/"
            ):
                self.setup_logging(foreground=False)
                try:
                    reactor, exporter = self.build()
                    self.write_pidfile()
                except Exception as error:
                    log.error("cannot start the %s: %s", self.role, error)
                    self.record_exit(f"cannot start: {error}")
                    os.write(ready_fd, f"{error}\n".encode())
                    os._exit(EXIT_FAILED)
                os.write(ready_fd, f"ok {os.getpid()}\n".encode())
                os.close(ready_fd)
                try:
                    code = self.run_reactor(reactor)
                finally:
                    if exporter:
                        exporter.close()
                    self.pidfile.unlink(missing_ok=True)
        finally:
            os._exit(code)

    def stop(self, timeout: float = 30.0) -> int:
        pid = self.running_pid()
        if pid is None:
            print(f"fail2ban-{self.role} is not running")
            return EXIT_OK
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                self.pidfile.unlink(missing_ok=True)
                print(f"fail2ban-{self.role} stopped")
                return EXIT_OK
            time.sleep(0.05)
        print(
            f"fail2ban-{self.role} (pid {pid}) did not stop within {timeout:.0f} s", file=sys.stderr
        )
        return EXIT_FAILED

    def reload(self) -> int:
        """Ask the running daemon to read its configuration and keys again; print what it
        applied and what needs a restart."""
        pid = self.running_pid()
        if pid is None:
            print(f"fail2ban-{self.role} is not running")
            return EXIT_NOT_RUNNING
        try:
            done = ask(self.control, RELOAD)
        except ControlError as error:
            print(f"fail2ban-{self.role} (pid {pid}) did not reload: {error}", file=sys.stderr)
            return EXIT_FAILED
        if "failed" in done:
            print(
                f"fail2ban-{self.role} (pid {pid}) did not reload: {done['failed']}; "
                "it runs on with the settings it had",
                file=sys.stderr,
            )
            return EXIT_FAILED
        items = [(key, value) for key, value in done.items() if key != "pid"]
        lines = [f"fail2ban-{self.role} (pid {pid}) reloaded {self.config.path}"]
        for index, (key, value) in enumerate(items):
            lines.append(f"{'`-' if index == len(items) - 1 else '|-'} {key}: {value}")
        print("\n".join(lines))
        return EXIT_OK

    def restart(self) -> int:
        code = self.stop()
        return code if code != EXIT_OK else self.start()

    def status(self) -> int:
        """Ask the running daemon; exit 3 when it is not running, 1 when it is unhealthy."""
        pid = self.running_pid()
        if pid is None:
            last = self.last_exit()
            print(f"fail2ban-{self.role} is not running" + (f": last exit {last}" if last else ""))
            return EXIT_NOT_RUNNING
        try:
            status = ask(self.control)
        except ControlError as error:
            print(f"fail2ban-{self.role} is running (pid {pid}) but not healthy: {error}")
            return EXIT_FAILED
        print(format_status(self.role, pid, status))
        return EXIT_FAILED if status.get("problems") else EXIT_OK


def describe(error: BaseException) -> str:
    """An error in one line, with its type: "OperationalError: database or disk is full"."""
    return f"{type(error).__name__}: {error}".splitlines()[0]


def is_role_daemon(pid: int, role: str) -> bool:
    """True when process `pid` runs this role of f2bzmq, by its command line: one of the
    entry scripts (fail2ban-ROLE.py, f2bzmq-ROLE, fail2ban-ROLE) or `-m f2bzmq ROLE`."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except FileNotFoundError:
        return False  # gone
    except OSError:
        return True  # alive but hidden from us (hidepid): as before, trust the file
    scripts = {f"fail2ban-{role}.py", f"fail2ban-{role}", f"f2bzmq-{role}"}
    if any(Path(arg).name in scripts for arg in argv[:2]):
        return True
    return any(argv[i : i + 3] == ["-m", "f2bzmq", role] for i in range(len(argv)))


def format_status(role: str, pid: int, status: dict) -> str:
    """fail2ban-client style tree of the daemon's own figures, in the daemon's order."""
    lines = [f"Status of fail2ban-{role} (pid {pid}, node {status.get('node')})"]
    hidden = ("role", "node", "pid", "time", "problems", "metrics")
    problems = status.get("problems") or []
    items = [(k, v) for k, v in status.items() if k not in hidden]
    items.append(("Health", "OK" if not problems else f"{len(problems)} problem(s)"))
    for index, (key, value) in enumerate(items):
        last = index == len(items) - 1
        branch, pad = ("`-", "   ") if last else ("|-", "|  ")
        if isinstance(value, dict) and value:
            lines.append(f"{branch} {key}:")
            for number, (sub, subvalue) in enumerate(value.items()):
                inner = "`-" if number == len(value) - 1 else "|-"
                lines.append(f"{pad}{inner} {sub}: {_flat(subvalue)}")
        else:
            lines.append(f"{branch} {key}: {_flat(value)}")
    for number, problem in enumerate(problems):
        lines.append(f"   {'`-' if number == len(problems) - 1 else '|-'} {problem}")
    return "\n".join(lines)


def _flat(value) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {_flat(v)}" for k, v in value.items()) or "none"
    if value is None:
        return "never"
    return str(value)


def _read_all(fd: int, timeout: float) -> str:
    """Read the daemon's start-up word until it closes the pipe or the time is up."""
    import select

    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            try:
                chunk = os.read(fd, 4096)
            except OSError as error:
                if error.errno == errno.EINTR:
                    continue
                break
            if not chunk:
                break
            chunks.append(chunk)
            if b"\n" in chunk:
                break
    finally:
        os.close(fd)
    return b"".join(chunks).decode("utf-8", "replace")
