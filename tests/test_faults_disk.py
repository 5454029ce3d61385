"""A full disk stops no daemon: it says so, serves what it can, and catches up by itself.

Each test puts one daemon's state folder (its SQLite file) and its log on a small tmpfs
of its own, lets the cluster settle, fills the tmpfs up, makes bans, and then gives the
space back. Real fail2ban-servers and real daemons; attackers from 198.18.0.0/15.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from f2bzmq.control import ControlError, ask
from f2bzmq.lab import Cluster, Node, RoleProcess, stays, wait_until
from tests.support import disk
from tests.support.state import outbox_depth
from tests.test_faults import STEP_TIMEOUT, attackers, jail_set, quiet_jails, wait_converged

pytestmark = pytest.mark.skipif(
    disk.missing_requirements() is not None, reason=str(disk.missing_requirements())
)

SIZE = "2m"  # the tmpfs: a SQLite file of a few dozen kB, its WAL and a log fit


def status(daemon: RoleProcess) -> dict:
    try:
        return ask(daemon.control_socket(), timeout=5)
    except ControlError as error:
        raise AssertionError(f"the {daemon.role} does not answer: {error}") from None


def problems(daemon: RoleProcess) -> str:
    return "\n".join(status(daemon)["problems"])


def logs_into(config: Path, folder: Path) -> None:
    """The daemons of this configuration log into folder (the tmpfs) from their next start."""
    text = config.read_text()
    config.write_text(re.sub(r"(?m)^logtarget = .*$", f"logtarget = {folder}/{{role}}.log", text))


def settled_wal(folder: Path, name: str) -> bool:
    """The daemon has given back its write-ahead log's space: the next write needs more."""
    wal = folder / f"{name}-wal"
    return not wal.exists() or wal.stat().st_size == 0


def ban(node: Node, *ips: str) -> None:
    with node.fail2ban.client() as client:
        client.ban("sshd", list(ips))


def test_a_monitor_with_a_full_disk_keeps_running_says_so_and_delivers_afterwards(tmp_path):
    cluster = Cluster(tmp_path, size=3, fail2ban={"jails": quiet_jails})
    node1, node2 = cluster["node1"], cluster["node2"]
    state = node1.directory / "state"
    logs_into(node1.config, state)  # node1's subscriber logs there too
    with disk.small_tmpfs(state, SIZE), cluster:
        before, during, elsewhere = attackers(22, 20), attackers(23, 30), attackers(24, 60)
        ban(node1, *before)
        wait_converged(cluster, {"node1": set(), "node2": set(before), "node3": set(before)})
        assert wait_until(lambda: settled_wal(state, "monitor.sqlite3"), STEP_TIMEOUT, 0.2)

        assert disk.fill(state) > 0
        ban(node1, *during)
        ban(node2, *elsewhere)
        outbox = "cannot write the outbox " + str(state / "monitor.sqlite3")
        said = lambda: outbox in problems(node1.monitor)  # noqa: E731
        assert wait_until(said, STEP_TIMEOUT, 0.2), status(node1.monitor)
        assert "database or disk is full" in problems(node1.monitor)
        # node1's subscriber can't log them (a line each, more than a page), and still
        # applies what the cluster bans.
        assert wait_until(lambda: set(elsewhere) <= jail_set(node1, "cluster"), STEP_TIMEOUT)
        assert "cannot write the log " + str(state / "subscriber.log") in problems(node1.subscriber)
        assert not set(during) & jail_set(node2, "cluster")  # nothing could be reported
        assert node1.monitor.alive() and node1.subscriber.alive()

        disk.free(state)
        everyone = {*before, *during}
        expected = {
            "node1": set(elsewhere),
            "node2": everyone,
            "node3": everyone | set(elsewhere),
        }
        wait_converged(cluster, expected)
        assert wait_until(lambda: outbox_depth(node1) == 0, STEP_TIMEOUT, 0.2)
        assert wait_until(lambda: problems(node1.monitor) == "", STEP_TIMEOUT, 0.2)
        assert wait_until(lambda: problems(node1.subscriber) == "", STEP_TIMEOUT, 0.2)
        log = (state / "subscriber.log").read_text()
        assert re.search(r"WARNING \d+ log lines were lost: No space left on device", log)
        assert (state / "monitor.log").read_text().count("cannot write the outbox") <= 1


def test_a_hub_with_a_full_disk_keeps_running_says_so_and_takes_the_bans_afterwards(tmp_path):
    cluster = Cluster(tmp_path, size=3, fail2ban={"jails": quiet_jails})
    hub, node1 = cluster.hub, cluster["node1"]
    state = hub.directory / "state"
    logs_into(hub.config, state)
    with disk.small_tmpfs(state, SIZE), cluster:
        before, during = attackers(25, 20), attackers(26, 30)
        ban(node1, *before)
        wait_converged(cluster, {"node1": set(), "node2": set(before), "node3": set(before)})
        assert wait_until(lambda: settled_wal(state, "publisher.sqlite3"), STEP_TIMEOUT, 0.2)

        assert disk.fill(state) > 0
        ban(node1, *during)
        table = "cannot write the ban table " + str(state / "publisher.sqlite3")
        assert wait_until(lambda: table in problems(hub.publisher), STEP_TIMEOUT, 0.2)
        assert "database or disk is full" in problems(hub.publisher)
        # node1 sends them again after each retry NAK (1 s) and the hub tries its store
        # again every 2 s: the problem stays while the disk is full.
        assert stays(lambda: table in problems(hub.publisher), 5), status(hub.publisher)
        # The hub refuses what it can't store with a retry NAK: node1 keeps it.
        assert outbox_depth(node1) == len(during)
        assert not set(during) & jail_set(cluster["node2"], "cluster")
        assert hub.publisher.alive() and node1.monitor.alive()

        disk.free(state)
        everyone = {*before, *during}
        wait_converged(cluster, {"node1": set(), "node2": everyone, "node3": everyone})
        assert wait_until(lambda: outbox_depth(node1) == 0, STEP_TIMEOUT, 0.2)
        assert wait_until(lambda: problems(hub.publisher) == "", STEP_TIMEOUT, 0.2)
