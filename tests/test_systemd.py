"""The shipped systemd units are valid for systemd itself (systemd-analyze verify), and
the daemons speak systemd's notification protocol the units ask for (Type=notify,
WatchdogSec=)."""

import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from f2bzmq.config import load_config
from f2bzmq.control import ask
from f2bzmq.keys import HUB_USER
from f2bzmq.lab import child_environment, free_ports, make_keys, write_config

WATCHDOG = 0.5  # seconds: a keep-alive every 0.25 s

UNITS = sorted((Path(__file__).resolve().parent.parent / "systemd").glob("*.service"))


@pytest.mark.parametrize("unit", UNITS, ids=[unit.name for unit in UNITS])
def test_unit_verifies(tmp_path, unit):
    analyze = shutil.which("systemd-analyze")
    role = unit.stem.removeprefix("fail2ban-")
    program = shutil.which(f"f2bzmq-{role}")
    if analyze is None or program is None:
        pytest.skip("needs systemd-analyze and f2bzmq installed")
    text = unit.read_text()
    assert f"ExecStart=/usr/bin/f2bzmq-{role} " in text and " run\n" in text
    # The unit names the Debian package's path (tests/test_debian_package.py verifies it
    # installed); here, verify it against wherever the program is on this machine.
    copy = tmp_path / unit.name
    copy.write_text(text.replace(f"/usr/bin/f2bzmq-{role}", program))
    done = subprocess.run(
        [analyze, "verify", "--man=no", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"SYSTEMD_LOG_LEVEL": "warning", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0 and done.stderr.strip() == "", done.stderr


def test_there_is_a_unit_per_role():
    assert [unit.name for unit in UNITS] == [
        "fail2ban-monitor.service",
        "fail2ban-publisher.service",
        "fail2ban-relay.service",
        "fail2ban-subscriber.service",
    ]


def notify_socket(tmp_path: Path, role: str) -> tuple[socket.socket, str]:
    """A unix datagram socket playing systemd's: abstract for the publisher (systemd's
    own names start with '@'), a file for the others."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if role == "publisher":
        name = f"@f2bzmq-test-{os.getpid()}-{role}"
        listener.bind("\0" + name[1:])
    else:
        name = str(tmp_path / f"{role}.notify")
        listener.bind(name)
    return listener, name


def messages(listener: socket.socket, seconds: float) -> list[str]:
    """Every datagram waiting, and those received within `seconds`."""
    found = []
    deadline = time.monotonic() + seconds
    while select.select([listener], [], [], max(0.0, deadline - time.monotonic()))[0]:
        found.append(listener.recv(4096).decode())
    return found


def test_each_daemon_says_ready_when_it_serves_then_keeps_the_watchdog_fed_until_frozen(
    tmp_path,
):
    """Type=notify: READY=1 once `status` gets an answer, WATCHDOG=1 every half of
    WATCHDOG_USEC from the loop, none while the process is stopped (SIGSTOP), again
    after SIGCONT, and STOPPING=1 on SIGTERM."""
    ports = free_ports(3)
    keys = make_keys(tmp_path / "keys", ["node1"])
    config = tmp_path / "fail2ban-cluster.conf"
    write_config(config, "node1", ports, tmp_path, keys)
    daemons = {}
    try:
        for role in ("publisher", "monitor", "subscriber"):
            listener, name = notify_socket(tmp_path, role)
            environment = dict(
                child_environment(), NOTIFY_SOCKET=name, WATCHDOG_USEC=str(int(WATCHDOG * 1e6))
            )
            process = subprocess.Popen(
                [sys.executable, "-m", "f2bzmq", role, "-c", str(config), "run"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=environment,
            )
            daemons[role] = (process, listener)
        control = load_config(str(config))
        for role, (_, listener) in daemons.items():
            assert select.select([listener], [], [], 20)[0], f"{role}: no READY=1 within 20 s"
            first = listener.recv(4096).decode()
            assert first.splitlines()[0] == "READY=1", (role, first)
            ask(control.control_path(role), timeout=2.0)  # it serves: status answers at once
        time.sleep(3 * WATCHDOG)
        for role, (_, listener) in daemons.items():
            fed = messages(listener, 0)
            assert fed.count("WATCHDOG=1") >= 2, (role, fed)
        for process, _ in daemons.values():
            os.kill(process.pid, signal.SIGSTOP)
        try:
            for _, listener in daemons.values():
                messages(listener, 0.05)  # what was on its way
            time.sleep(3 * WATCHDOG)
            for role, (_, listener) in daemons.items():
                assert messages(listener, 0) == [], f"{role} fed the watchdog while frozen"
        finally:
            for process, _ in daemons.values():
                os.kill(process.pid, signal.SIGCONT)
        time.sleep(3 * WATCHDOG)
        for role, (process, listener) in daemons.items():
            assert "WATCHDOG=1" in messages(listener, 0), f"{role} did not feed it again"
            process.send_signal(signal.SIGTERM)
        for role, (process, listener) in daemons.items():
            assert process.wait(15) == 0, role
            assert "STOPPING=1" in messages(listener, 0.1), role
    finally:
        for process, listener in daemons.values():
            if process.poll() is None:
                process.kill()
                process.wait(5)
            listener.close()


def unit_setting(unit: Path, key: str) -> str:
    found = [
        line.split("=", 1)[1]
        for line in unit.read_text().splitlines()
        if line.startswith(f"{key}=")
    ]
    assert len(found) == 1, (unit.name, key, found)
    return found[0]


def test_the_units_give_each_role_the_folders_its_configuration_names():
    """systemd makes (and, for the hub's user, owns) the folders the shipped configuration
    names: the hub's apart from the node's roles, which run as root."""
    shipped = load_config(str(UNITS[0].parent.parent / "fail2ban-cluster.conf"))
    for unit in UNITS:
        role = unit.stem.removeprefix("fail2ban-")
        state = shipped.publisher.state_dir if role == "publisher" else shipped.general.state_dir
        assert f"/var/lib/{unit_setting(unit, 'StateDirectory')}" == state
        assert Path(f"/run/{unit_setting(unit, 'RuntimeDirectory')}") == shipped.run_dir(role)
        assert unit_setting(unit, "Type") == "notify"
        assert int(unit_setting(unit, "WatchdogSec")) > 0
        assert unit_setting(unit, "ExecReload").endswith(" reload")
        assert int(unit_setting(unit, "LimitNOFILE")) >= 4096
    hub = UNITS[1]
    assert (unit_setting(hub, "User"), unit_setting(hub, "Group")) == (HUB_USER, HUB_USER)
    assert "LogsDirectory=" not in hub.read_text()  # its log is the journal
