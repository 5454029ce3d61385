"""The entry scripts as an operator uses them: start, status, stop, run, and their errors."""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "fail2ban-cluster.conf"
    write_config(path, "hub", free_ports(3), tmp_path, make_keys(tmp_path / "keys", []))
    yield path
    publisher(path, "stop")


def test_help_explains_every_command():
    for role in ("monitor", "publisher", "subscriber"):
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
        return done.returncode == 0 and "|- Sequence number: 0" in done.stdout

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
    run_dir = config.parent / "run"
    run_dir.mkdir()
    (run_dir / "publisher.pid").write_text(f"{dead.pid}\n")
    started = publisher(config, "start")
    assert started.returncode == 0, started.stderr
    assert (run_dir / "publisher.pid").read_text().strip() != str(dead.pid)


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
        f"fail2ban-publisher: {bad}: [publisher] heartbeat_interval: 'soon' is not a float\n"
    )


def test_run_stops_cleanly_on_sigterm(config):
    process = subprocess.Popen(
        [sys.executable, SCRIPT, "-c", str(config), "run"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        pidfile = config.parent / "run" / "publisher.pid"
        assert wait_until(pidfile.exists, 15, 0.05)
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(5)
    assert not pidfile.exists()
