"""The entry scripts as an operator uses them: start, status, stop, run, and their errors."""

import logging
import os
import platform
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from f2bzmq.collection import Collector
from f2bzmq.config import config_from, load_config
from f2bzmq.daemon import EXIT_FAILED, EXIT_NOT_RUNNING, RoleControl
from f2bzmq.lab import free_ports, make_keys, wait_until, write_config

REPO = Path(__file__).resolve().parent.parent
SCRIPT = str(REPO / "fail2ban-publisher.py")


def publisher(config: Path, *verb: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, SCRIPT, "-c", str(config), *verb],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def run_dir_of(config: Path) -> Path:
    return Path(load_config(str(config)).general.run_dir)


def run_in_foreground(config: Path) -> subprocess.Popen:
    """`publisher run`, once its PID file says it is up."""
    process = subprocess.Popen(
        [sys.executable, SCRIPT, "-c", str(config), "run"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    if not wait_until((run_dir_of(config) / "publisher.pid").exists, 15, 0.05):
        process.kill()
        process.wait(5)
        raise AssertionError("the publisher wrote no PID file within 15 s")
    return process


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "fail2ban-cluster.conf"
    write_config(path, "hub", free_ports(3), tmp_path, make_keys(tmp_path / "keys", []))
    yield path
    publisher(path, "stop")


def test_help_explains_every_command():
    for role in ("monitor", "publisher", "subscriber", "relay"):
        done = subprocess.run(
            [sys.executable, str(REPO / f"fail2ban-{role}.py"), "--help"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        for verb in ("run", "start", "stop", "restart", "status"):
            assert f"  {verb} " in done.stdout


def test_start_status_stop(config):
    started = publisher(config, "start")
    assert started.returncode == 0, started.stderr
    assert started.stdout.startswith("fail2ban-publisher started (pid ")
    pid = int(started.stdout.split("pid ")[1].rstrip(")\n"))
    assert os.path.exists(f"/proc/{pid}")

    again = publisher(config, "start")
    assert again.returncode == 1
    assert f"already running (pid {pid})" in again.stderr

    def reports() -> bool:
        done = publisher(config, "status")
        return done.returncode == 0 and "|- Sequence number: 0" in done.stdout.splitlines()

    assert wait_until(reports, 15, 0.2), publisher(config, "status").stdout

    stopped = publisher(config, "stop")
    assert (stopped.returncode, stopped.stdout) == (0, "fail2ban-publisher stopped\n")
    assert not os.path.exists(f"/proc/{pid}") or "Z" in Path(f"/proc/{pid}/stat").read_text()
    status = publisher(config, "status")
    assert (status.returncode, status.stdout) == (3, "fail2ban-publisher is not running\n")
    log = (config.parent / "publisher.log").read_text()
    assert "publisher hub stopped at sequence 0" in log


def test_stale_pid_file_is_replaced(config):
    dead = subprocess.Popen(["true"])
    dead.wait()
    run_dir = run_dir_of(config)
    run_dir.mkdir(exist_ok=True)
    (run_dir / "publisher.pid").write_text(f"{dead.pid}\n")
    started = publisher(config, "start")
    assert started.returncode == 0, started.stderr
    assert (run_dir / "publisher.pid").read_text().strip() != str(dead.pid)


def test_state_and_log_files_are_not_for_other_users(config, tmp_path):
    log = tmp_path / "publisher.log"
    log.write_text("an older line\n")
    log.chmod(0o644)  # as a daemon under umask 022 left it
    started = publisher(config, "start")
    assert started.returncode == 0, started.stderr
    state = tmp_path / "state"
    files = [f"publisher.sqlite3{suffix}" for suffix in ("", "-wal", "-shm")]
    assert wait_until(lambda: all((state / name).exists() for name in files), 15, 0.05)
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in state.iterdir()}
    assert modes == dict.fromkeys(files, 0o600)
    assert stat.S_IMODE(log.stat().st_mode) == 0o640
    assert publisher(config, "stop").returncode == 0
    log.unlink()
    assert publisher(config, "start").returncode == 0
    assert stat.S_IMODE(log.stat().st_mode) == 0o640


def test_the_pid_file_is_never_written_through_a_symlink(config, tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    run_dir = run_dir_of(config)
    run_dir.mkdir(exist_ok=True)
    (run_dir / "publisher.pid").symlink_to(victim)
    started = publisher(config, "start")
    assert started.returncode == 0, started.stderr
    assert victim.read_text() == "precious\n"
    pidfile = run_dir / "publisher.pid"
    assert not pidfile.is_symlink()
    assert pidfile.read_text() == started.stdout.split("pid ")[1].rstrip(")\n") + "\n"


def test_stop_signals_only_its_own_daemon(config):
    """A PID file naming another process (a PID reused, or written there by someone else)."""
    other = subprocess.Popen(["sleep", "60"])
    try:
        run_dir = run_dir_of(config)
        run_dir.mkdir(exist_ok=True)
        (run_dir / "publisher.pid").write_text(f"{other.pid}\n")
        assert publisher(config, "stop").stdout == "fail2ban-publisher is not running\n"
        assert other.poll() is None
        assert not (run_dir / "publisher.pid").exists()
        started = publisher(config, "start")
        assert started.returncode == 0, started.stderr
        assert publisher(config, "stop").returncode == 0
        assert other.poll() is None
    finally:
        other.kill()
        other.wait(5)


def test_start_says_why_it_failed(config, tmp_path):
    port = int(
        next(line for line in config.read_text().splitlines() if "report_port" in line).split()[-1]
    )
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        failed = publisher(config, "start")
    assert failed.returncode == 1
    assert "cannot start: cannot bind tcp://127.0.0.1:" in failed.stderr
    assert "Address already in use" in failed.stderr


def test_config_mistake_is_one_line_naming_file_section_and_key(tmp_path):
    bad = tmp_path / "fail2ban-cluster.conf"
    bad.write_text("[publisher]\nheartbeat_interval = soon\n")
    done = publisher(bad, "run")
    assert done.returncode == 2
    assert done.stderr == (
        f"fail2ban-publisher: {bad}: [publisher] heartbeat_interval: 'soon' is not a time "
        "(e.g. 600, 10m, 1h, 1d, 1w)\n"
    )


def test_run_stops_cleanly_on_sigterm(config):
    process = run_in_foreground(config)
    try:
        pidfile = run_dir_of(config) / "publisher.pid"
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(5)
    assert not pidfile.exists()


def test_status_asks_the_daemon_and_says_when_it_does_not_answer(config):
    started = publisher(config, "start")
    assert started.returncode == 0, started.stderr
    pid = int(started.stdout.split("pid ")[1].rstrip(")\n"))
    done = publisher(config, "status")
    assert done.returncode == 0, done.stdout
    assert done.stdout.splitlines()[-1] == "`- Health: OK"
    socket_file = run_dir_of(config) / "publisher.sock"
    assert socket_file.stat().st_mode & 0o077 == 0  # only its owner may ask

    os.kill(pid, signal.SIGSTOP)  # alive, holding its PID file, answering nothing
    try:
        stuck = publisher(config, "status")
    finally:
        os.kill(pid, signal.SIGCONT)
    assert stuck.returncode == 1
    assert stuck.stdout == (
        f"fail2ban-publisher is running (pid {pid}) but not healthy: "
        f"the daemon did not answer on {socket_file} within 5 s\n"
    )
    assert publisher(config, "status").returncode == 0
    assert publisher(config, "stop").returncode == 0
    assert not socket_file.exists()


def test_run_dir_too_long_for_a_control_socket_is_a_config_error(tmp_path):
    bad = tmp_path / "fail2ban-cluster.conf"
    bad.write_text(f"[general]\nrun_dir = /{'r' * 100}\n")
    done = publisher(bad, "run")
    assert done.returncode == 2
    assert done.stderr.startswith(f"fail2ban-publisher: {bad}: [general] run_dir: too long for ")


def test_sigterm_taken_by_another_thread_still_stops_the_daemon_at_once(config):
    """The kernel may hand a process's SIGTERM to any of its threads (zmq's, the key
    checker's). With heartbeats an hour apart nothing else would wake the hub's poll."""
    import ctypes

    slow = config.with_suffix(".local")
    slow.write_text("[publisher]\nheartbeat_interval = 3600\n")
    process = run_in_foreground(config)
    try:
        threads = [int(tid) for tid in os.listdir(f"/proc/{process.pid}/task")]
        others = [tid for tid in threads if tid != process.pid]
        assert others, "the hub runs zmq and authenticator threads"
        # tgkill(tgid, tid, sig) sends to that one thread
        sys_tgkill = {"x86_64": 234, "aarch64": 131}.get(platform.machine())
        if sys_tgkill is None:
            pytest.skip(f"tgkill's syscall number on {platform.machine()} is not listed here")
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.syscall(sys_tgkill, process.pid, others[-1], signal.SIGTERM) == 0
        assert process.wait(10) == 0
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(5)


class FailingReactor:
    """A role's loop that ends on an error nobody caught, as a full disk once did."""

    def __init__(self, config, control_path) -> None:
        self.garbage = Collector()

    def run(self) -> None:
        raise sqlite3.OperationalError("database or disk is full")


def test_a_daemon_stopped_by_an_error_says_why_in_its_log_and_in_status(tmp_path, capsys):
    config = config_from(
        {
            "general": {
                "run_dir": str(tmp_path / "run"),
                "logtarget": str(tmp_path / "{role}.log"),
                "insecure": "true",
            }
        }
    )
    control = RoleControl("monitor", config, FailingReactor)
    root = logging.getLogger()
    saved = list(root.handlers)
    try:
        assert control.run(foreground=True) == EXIT_FAILED
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
            handler.close()
        for handler in saved:
            root.addHandler(handler)
    log = (tmp_path / "monitor.log").read_text()
    assert (
        "ERROR   the monitor stopped on an error: OperationalError: database or disk is full" in log
    )
    assert 'raise sqlite3.OperationalError("database or disk is full")' in log  # the traceback
    capsys.readouterr()
    assert control.status() == EXIT_NOT_RUNNING
    said = capsys.readouterr().out.strip()
    assert said.startswith("fail2ban-monitor is not running: last exit 20")
    assert said.endswith(": OperationalError: database or disk is full")
    assert not control.pidfile.exists()


def test_reload_applies_what_it_can_names_what_needs_a_restart_and_keeps_a_broken_file_out(
    config,
):
    started = publisher(config, "start")
    assert started.returncode == 0, started.stderr
    pid = int(started.stdout.split("pid ")[1].rstrip(")\n"))
    same = publisher(config, "reload")
    assert same.returncode == 0, same.stderr
    assert same.stdout.splitlines() == [
        f"fail2ban-publisher (pid {pid}) reloaded {config}",
        "|- Applied: nothing changed",
        "|- Needs a restart: nothing",
        "`- Keys: 0 node keys accepted",
    ]

    local = config.with_suffix(".local")
    local.write_text("[general]\nreport_port = 1\n[publisher]\nnode_silence = 1\n")
    shutil.copy(make_keys(config.parent / "other-keys", ["web1"]) / "web1.key", keys_of(config))
    changed = publisher(config, "reload")
    assert changed.returncode == 0, changed.stderr
    assert changed.stdout.splitlines()[1:] == [
        "|- Applied: [publisher] node_silence",
        "|- Needs a restart: [general] report_port",
        "`- Keys: 1 node keys accepted",
    ]

    # Applied: a second without a node is now too long for the hub.
    def silent() -> bool:
        done = publisher(config, "status")
        return done.returncode == 1 and "no node heard for " in done.stdout

    assert wait_until(silent, 10, 0.2), publisher(config, "status").stdout

    local.write_text("[publisher]\nnode_silence = soon\n")
    broken = publisher(config, "reload")
    assert broken.returncode == 2
    assert broken.stderr == (
        f"fail2ban-publisher: {local}: [publisher] node_silence: 'soon' is not a time "
        "(e.g. 600, 10m, 1h, 1d, 1w)\n"
    )
    os.kill(pid, signal.SIGHUP)  # systemctl reload's way, or an admin's: refused the same
    log = config.parent / "publisher.log"
    assert wait_until(lambda: "reload: " in log.read_text(), 10)
    assert f"ERROR   reload: {local}: [publisher] node_silence: 'soon' is not a time" in (
        log.read_text()
    )
    assert f"NOTICE  reloaded {config}: applied [publisher] node_silence; needs a restart: " in (
        log.read_text()
    )
    local.unlink()  # every command reads the file, not only reload
    assert publisher(config, "status").returncode == 1  # running, with node_silence 1 still
    assert publisher(config, "stop").returncode == 0
    assert publisher(config, "reload").returncode == EXIT_NOT_RUNNING


def keys_of(config: Path) -> Path:
    return Path(load_config(str(config)).general.keys_dir) / "nodes"
