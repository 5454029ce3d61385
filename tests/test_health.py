"""Health that tells the truth: each problem a daemon can have makes `status` exit 1 and
name it, on a real daemon, and goes away when its cause does. The rules themselves are
tables at the end."""

from __future__ import annotations

import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from f2bzmq import health, protocol
from f2bzmq.control import ask
from f2bzmq.health import Descriptors, DiskSpace
from f2bzmq.keys import HUB
from f2bzmq.lab import (
    Cluster,
    RoleProcess,
    free_ports,
    make_keys,
    run_command,
    wait_until,
    write_config,
)
from tests.support import disk
from tests.support.hub import running_hub
from tests.support.nodeclient import NodeClient


def status(daemon: RoleProcess) -> subprocess.CompletedProcess:
    """`ROLE status`, as an operator or a monitoring system runs it."""
    return subprocess.run(
        [sys.executable, "-m", "f2bzmq", daemon.role, "-c", str(daemon.config), "status"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def says(daemon: RoleProcess, problem: str, timeout: float = 15) -> str:
    """Wait until `status` exits 1 and lists `problem` under Health; its output."""

    def listed() -> bool:
        done = status(daemon)
        return done.returncode == 1 and any(
            problem in line for line in done.stdout.splitlines() if line.startswith("   ")
        )

    assert wait_until(listed, timeout, 0.2), status(daemon).stdout
    return status(daemon).stdout


def healthy(daemon: RoleProcess, timeout: float = 15) -> None:
    assert wait_until(lambda: status(daemon).returncode == 0, timeout, 0.2), status(daemon).stdout


def test_a_hub_that_hears_no_node_says_so_until_one_says_hello(tmp_path, keys):
    with running_hub(tmp_path, keys, publisher={"node_silence": "3"}) as hub:
        healthy(hub.publisher)
        says(hub.publisher, "s (since it started): are the monitors running, can they reach")
        node = NodeClient(hub.ports, keys)
        try:
            node.reports.send_multipart(protocol.encode_hello())
            assert protocol.is_welcome(node.reports.recv_multipart())
            # Asked straight away (a status command alone may take seconds on a busy host).
            control = hub.publisher.control_socket()
            assert wait_until(lambda: ask(control)["problems"] == [], 2.5, 0.05)
            said = says(hub.publisher, "no node heard for ")
            assert "s (since it started)" not in said
        finally:
            node.close()


def test_a_hub_says_when_it_refuses_an_unknown_key(tmp_path, keys):
    stranger = make_keys(tmp_path / "stranger", ["web9"])
    with running_hub(tmp_path, keys) as hub:
        healthy(hub.publisher)
        node = NodeClient(hub.ports, stranger, node="web9", hub_key=keys / f"{HUB}.key")
        try:
            node.reports.send_multipart(protocol.encode_hello())  # never answered
            said = says(hub.publisher, "connection(s) with an unknown key refused in the last")
        finally:
            node.close()
    assert "a node whose key is not in keys_dir/nodes (copy it there and reload)" in said
    assert "|- Unknown keys refused: " in said


def test_a_hub_near_its_file_descriptor_limit_says_so(tmp_path, keys):
    with running_hub(tmp_path, keys) as hub:
        healthy(hub.publisher)
        pid = hub.publisher.process.pid
        used = len(list(Path(f"/proc/{pid}/fd").iterdir()))
        soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        # A few to spare, for the control socket's connection that asks.
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (used + 5, hard))
        try:
            said = says(hub.publisher, f"of {used + 5} file descriptors in use: new connections")
        finally:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        assert "raise LimitNOFILE= in the unit, or ulimit -n" in said
        healthy(hub.publisher)


@pytest.mark.skipif(
    disk.missing_requirements() is not None, reason=str(disk.missing_requirements())
)
def test_a_hub_whose_disk_is_nearly_full_says_so(tmp_path, keys):
    tmpfs = disk.small_tmpfs(tmp_path / "hub" / "state", "8m")
    with tmpfs as state, running_hub(tmp_path, keys) as hub:
        healthy(hub.publisher)
        disk.fill(state)
        said = says(hub.publisher, f"the file system of {state} is nearly full: ")
        assert "MiB free of 8 MiB; storing reports stops when it is full" in said
        disk.free(state)
        healthy(hub.publisher)


def test_a_monitor_warns_at_start_and_in_status_when_its_log_file_is_missing(tmp_path, keys):
    missing = tmp_path / "fail2ban.log"
    config = tmp_path / "fail2ban-cluster.conf"
    write_config(config, "node1", free_ports(3), tmp_path, keys, monitor={"logpath": str(missing)})
    monitor = RoleProcess("monitor", config, tmp_path)
    monitor.start()
    try:
        said = says(monitor, f"fail2ban's log {missing} does not exist: nothing is reported")
        assert "(is [monitor] logpath fail2ban's logtarget?)" in said
        warning = f"WARNING fail2ban's log {missing} does not exist"
        assert warning in (tmp_path / "monitor.log").read_text()
        missing.touch()
        healthy(monitor)
    finally:
        monitor.stop()


def test_a_monitor_says_when_fail2ban_writes_its_log_elsewhere(tmp_path):
    with Cluster(tmp_path, size=1) as cluster:
        node = cluster["node1"]
        healthy(node.monitor)
        elsewhere = node.directory / "elsewhere.log"
        socket = str(node.fail2ban.socket)
        run_command("fail2ban-client", "-s", socket, "set", "logtarget", str(elsewhere))
        said = says(node.monitor, f"fail2ban writes its log to {elsewhere}, not to [monitor] ")
        assert f"logpath = {node.fail2ban.log}: the monitor reports none of its bans" in said
        assert f"|- fail2ban writes to: {elsewhere}" in said
        run_command("fail2ban-client", "-s", socket, "set", "logtarget", str(node.fail2ban.log))
        healthy(node.monitor)


def test_a_subscriber_says_within_seconds_that_fail2ban_is_gone(tmp_path):
    with Cluster(tmp_path, size=1) as cluster:
        node = cluster["node1"]
        healthy(node.subscriber)
        node.fail2ban.stop()
        stopped = time.monotonic()
        control = node.subscriber.control_socket()

        def gone() -> bool:
            return any(
                problem.startswith("fail2ban is not reachable: cannot connect to fail2ban at ")
                for problem in ask(control)["problems"]
            )

        assert wait_until(gone, 10, 0.05)
        assert time.monotonic() - stopped < 3  # pinged every second, no ban needed
        says(node.subscriber, "fail2ban is not reachable: cannot connect to fail2ban at ")
        node.fail2ban.start()
        healthy(node.subscriber)


MIB = health.MIB


@pytest.mark.parametrize(
    ("used", "limit", "problem"),
    [
        (30, 1024, False),
        (922, 1024, False),  # 102 free: a tenth
        (923, 1024, True),
        (36, 45, True),  # fewer than 10 free, whatever the limit
        (30, 40, False),
        (60000, 65536, True),
        (30, 0, False),  # no limit
    ],
)
def test_descriptors_are_nearly_used_up_with_less_than_a_tenth_or_ten_free(used, limit, problem):
    found = health.descriptors_problem(Descriptors(used, limit))
    assert (found is not None) == problem, found


@pytest.mark.parametrize(
    ("free", "size", "problem"),
    [
        (64 * MIB, 100_000 * MIB, False),
        (64 * MIB - 1, 100_000 * MIB, True),
        (1 * MIB, 8 * MIB, False),  # a tenth of a small one
        (MIB // 2, 8 * MIB, True),
        (0, 8 * MIB, True),
    ],
)
def test_a_disk_is_nearly_full_below_64_mib_or_a_tenth_free(free, size, problem):
    found = health.disk_problem("storing", "/state", DiskSpace(free, size))
    assert (found is not None) == problem, found
    assert health.disk_problem("storing", "/state", None) is None  # no folder yet


@pytest.mark.parametrize(
    ("last_heard", "now", "problem"),
    [
        (None, 1059.0, None),
        (None, 1060.0, "no node heard for 60 s (since it started)"),
        (1100.0, 1159.0, None),
        (1100.0, 1161.0, "no node heard for 61 s (since "),
    ],
)
def test_a_hub_is_silent_when_no_node_was_heard_for_node_silence(last_heard, now, problem):
    found = health.silence_problem(last_heard, 1000.0, now, 60.0)
    assert found == problem if problem is None else problem in found


def test_refused_keys_are_a_problem_for_ten_minutes():
    refused = health.RefusedKeys()
    assert refused.problem(1000.0) is None
    refused.refused(1000.0)
    refused.refused(1300.0)
    assert refused.problem(1300.0).startswith("2 connection(s) with an unknown key refused")
    assert refused.problem(1601.0).startswith("1 connection(s)")
    assert refused.problem(1900.0) is None
    assert refused.total == 2


@pytest.mark.parametrize(
    ("exists", "target", "problem"),
    [
        (True, "/var/log/fail2ban.log", None),
        (True, None, None),  # fail2ban away: the subscriber says so
        (False, None, "fail2ban's log /var/log/fail2ban.log does not exist"),
        (False, "/var/log/fail2ban.log", "fail2ban's log /var/log/fail2ban.log does not exist"),
        (True, "/var/log/f2b.log", "fail2ban writes its log to /var/log/f2b.log, not to "),
        (False, "/var/log/f2b.log", "fail2ban writes its log to /var/log/f2b.log, not to "),
        (True, "SYSTEMD-JOURNAL", "fail2ban logs to SYSTEMD-JOURNAL, not to a file: set "),
    ],
)
def test_the_monitor_follows_the_log_fail2ban_writes(exists, target, problem):
    found = health.logpath_problems("/var/log/fail2ban.log", exists, target)
    assert (found == []) if problem is None else (len(found) == 1 and problem in found[0])
