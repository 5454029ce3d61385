"""Nothing lost: the cluster converges exactly after a hub, a subscriber, a monitor or a node dies.

Each test runs real fail2ban-servers and the three daemons on 127.0.0.1 (`f2bzmq.lab`), breaks
one of them while bans flow, and ends when every node's sync jail, as the real fail2ban-client
reports it, holds exactly what the cluster bans. Attackers come from the benchmark range
198.18.0.0/15, never a real host.
"""

from __future__ import annotations

import ipaddress
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from f2bzmq.lab import Cluster, Fail2banServer, Hub, Node, process_alive, wait_until
from tests.support.state import hub_bans, hub_sequence, outbox_depth, read_only

BENCHMARK = ipaddress.ip_network("198.18.0.0/15")
BLOCK = 4096  # addresses per block: each group of attackers has a block of its own

# Generous bounds: a 2-core machine runs three fail2ban-servers and seven daemons here.
CONVERGE_TIMEOUT = 120
STEP_TIMEOUT = 60

NO_ACTION = re.compile(r"(?m)^action = .*$")
# The hub logs "NOTICE  [sshd] Ban ip from node" for a report it broadcasts, and
# "DEBUG   [sshd] Ban ip from node: outcome" for one it does not (duplicate, extended, …).
HUB_BAN = re.compile(
    r"(?P<level>NOTICE|DEBUG)\s+\[sshd\] Ban (?P<ip>\S+) from [^\s:]+(?:: (?P<outcome>\w+))?$"
)


def attackers(block: int, count: int) -> list[str]:
    """`count` addresses of block `block` of the benchmark range, the same on every run."""
    start = int(BENCHMARK.network_address) + block * BLOCK
    assert 0 < count < BLOCK and start + BLOCK <= int(BENCHMARK.broadcast_address)
    return [str(ipaddress.ip_address(start + offset)) for offset in range(1, count + 1)]


def quiet_jails(server: Fail2banServer, sshd_bantime: int = 600, sshd_action: bool = False) -> str:
    """The lab's jails without actions: fail2ban bans and logs the same, but runs no shell.

    The dummy action costs a shell per ban, which turns a burst of 2,000 bans (and the 4,000
    cluster bans they cause) into half a minute of process spawning on a small machine.
    `sshd_action` keeps it in sshd, for a test that needs fail2ban's flush of that jail.
    """
    sync = f"[{server.sync_jail}]"
    sshd, cluster = server.default_jails(sshd_bantime, 86400).split(sync)
    if not sshd_action:
        sshd = NO_ACTION.sub("action =", sshd)
    return sshd + sync + NO_ACTION.sub("action =", cluster)


def jail_set(node: Node, jail: str) -> set[str]:
    """The jail's bans through fail2ban's socket: cheap enough to poll while waiting."""
    with node.fail2ban.client() as client:
        return set(client.banned(jail))


def wait_holding(cluster: Cluster, node: Node, jail: str, ips: list[str]) -> None:
    """Wait until the jail holds at least `ips` (a step in a test, not its verdict)."""
    if not wait_until(lambda: set(ips) <= jail_set(node, jail), STEP_TIMEOUT, 0.1):
        missing = set(ips) - jail_set(node, jail)
        raise AssertionError(
            f"{node.name}/{jail} lacks {len(missing)} of {len(ips)}, e.g. {sorted(missing)[:5]}\n"
            + cluster.diagnostics()
        )


def wait_converged(
    cluster: Cluster, expected: dict[str, set[str]], timeout: float = CONVERGE_TIMEOUT
) -> None:
    """Wait until every node's sync jail, by the real fail2ban-client, is exactly its set."""
    assert set(expected) == set(cluster.nodes), "name the expected set of every node"
    found: dict[str, set[str]] = {}

    def converged() -> bool:
        for name in expected:
            found[name] = set(cluster[name].fail2ban.banned("cluster"))
        return found == expected

    if wait_until(converged, timeout, 0.5):
        return
    report = []
    for name, wanted in expected.items():
        missing, extra = wanted - found[name], found[name] - wanted
        if missing or extra:
            report.append(
                f"{name}/cluster: {len(found[name])} banned, {len(wanted)} expected; "
                f"missing {len(missing)} e.g. {sorted(missing)[:5]}, "
                f"extra {len(extra)} e.g. {sorted(extra)[:5]}"
            )
    raise AssertionError(
        f"no exact convergence within {timeout:g}s:\n" + "\n".join(report) + "\n"
        f"{cluster.diagnostics()}"
    )


def wait_outboxes_drained(cluster: Cluster) -> None:
    def drained() -> bool:
        return all(outbox_depth(node) == 0 for node in cluster.nodes.values())

    if not wait_until(drained, STEP_TIMEOUT, 0.2):
        depths = {name: outbox_depth(node) for name, node in cluster.nodes.items()}
        raise AssertionError(f"outboxes not drained: {depths}\n{cluster.diagnostics()}")


def hub_reports(hub: Hub) -> dict[str, Counter]:
    """Per address, how often the hub logged each outcome of a ban report ("broadcast")."""
    seen: dict[str, Counter] = {}
    for line in hub.log_text().splitlines():
        match = HUB_BAN.search(line)
        if match is not None:
            outcome = "broadcast" if match["level"] == "NOTICE" else match["outcome"]
            seen.setdefault(match["ip"], Counter())[outcome] += 1
    return seen


def sync_unbans(cluster: Cluster) -> dict[str, list[str]]:
    """Per node, the first addresses its subscriber ever lifted from the sync jail, if any.

    The final sets can't show a ban lifted and applied again on the way; these lines can.
    """
    lifted = {}
    for name, node in cluster.nodes.items():
        lines = node.log_text("subscriber").splitlines()
        ips = [line.split()[-1] for line in lines if "[cluster] Unban " in line]
        if ips:
            lifted[name] = ips[:5]
    return lifted


def kill_fail2ban(server: Fail2banServer) -> None:
    """SIGKILL the fail2ban-server: no Unban, no Flush, nothing written on the way out."""
    pid = int(server.pidfile.read_text().strip())
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: not process_alive(pid), 15), f"fail2ban-server {pid} survived"


def test_hub_killed_in_a_burst_of_2000_bans_loses_none_and_repeats_none(tmp_path):
    with Cluster(tmp_path, size=3, fail2ban={"jails": quiet_jails}) as cluster:
        hub = cluster.hub
        from_node1, from_node2 = attackers(1, 1000), attackers(2, 1000)
        cluster["node1"].fail2ban.attack(*from_node1)
        cluster["node2"].fail2ban.attack(*from_node2)

        # Kill it once both nodes' reports are flowing in.
        def both_reporting() -> bool:
            origins = Counter(node for _, _, node in hub_bans(hub))
            return origins["node1"] >= 50 and origins["node2"] >= 50

        assert wait_until(both_reporting, STEP_TIMEOUT, 0.02), cluster.diagnostics()
        hub.publisher.stop(signal.SIGKILL)
        time.sleep(2)
        hub.publisher.start()

        everyone = set(from_node1) | set(from_node2)
        expected = {"node1": set(from_node2), "node2": set(from_node1), "node3": everyone}
        wait_converged(cluster, expected)
        wait_outboxes_drained(cluster)
        recovered = re.findall(r"publisher hub started: .*; (\d+) active bans", hub.log_text())
        assert len(recovered) == 2 and int(recovered[1]) < len(everyone), "the burst was over"
        bans = hub_bans(hub)
        origins = [("sshd", ip, "node1") for ip in from_node1]
        origins += [("sshd", ip, "node2") for ip in from_node2]
        assert sorted(bans) == sorted(origins)
        # One broadcast per address across the crash: nothing was sent twice. (The hub's log
        # can't tell: it logs a report before the commit that a kill -9 may cut short.)
        assert hub_sequence(hub) == len(everyone)
        assert sync_unbans(cluster) == {}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["stopped", "killed"])
def test_a_subscriber_away_during_1000_bans_and_200_unbans_catches_up_exactly(tmp_path, sig):
    with Cluster(tmp_path, size=3, fail2ban={"jails": quiet_jails}) as cluster:
        node1, node3 = cluster["node1"], cluster["node3"]
        # node3 holds these when it goes away; they are lifted meanwhile, so it must drop them.
        held = attackers(3, 100)
        node1.fail2ban.attack(*held)
        wait_converged(cluster, {"node1": set(), "node2": set(held), "node3": set(held)})

        node3.subscriber.stop(sig)
        fresh = attackers(4, 1000)
        node1.fail2ban.attack(*fresh)
        wait_holding(cluster, node1, "sshd", held + fresh)
        with node1.fail2ban.client() as client:
            client.unban("sshd", held)
            client.unban("sshd", fresh[:100])
            client.unban("sshd", fresh[100:200])
        remaining = set(fresh[200:])
        wait_converged(cluster, {"node1": set(), "node2": remaining, "node3": set(held)})

        node3.subscriber.start()
        wait_converged(cluster, {"node1": set(), "node2": remaining, "node3": remaining})


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["stopped", "killed"])
def test_bans_made_while_the_monitor_is_away_are_reported_once(tmp_path, sig):
    with Cluster(tmp_path, size=3, fail2ban={"jails": quiet_jails}) as cluster:
        node1, hub = cluster["node1"], cluster.hub
        before = attackers(5, 100)
        node1.fail2ban.attack(*before)
        wait_converged(cluster, {"node1": set(), "node2": set(before), "node3": set(before)})

        # Stop it while it reports a burst, then ban more while it is away.
        during, meanwhile = attackers(6, 300), attackers(7, 300)
        node1.fail2ban.attack(*during)
        assert wait_until(lambda: len(hub_bans(hub)) > len(before), STEP_TIMEOUT, 0.01)
        node1.monitor.stop(sig)
        node1.fail2ban.attack(*meanwhile)
        wait_holding(cluster, node1, "sshd", before + during + meanwhile)
        reported = {ip for _, ip, _ in hub_bans(hub)}
        assert not reported & set(meanwhile), "the monitor reported while it was away"

        reports_before, events_before = hub_traffic(hub)
        node1.monitor.start()
        everyone = set(before) | set(during) | set(meanwhile)
        wait_converged(cluster, {"node1": set(), "node2": everyone, "node3": everyone})
        wait_outboxes_drained(cluster)
        reports = hub_reports(hub)
        assert set(reports) == everyone
        # A resent event (its ACK was lost with the monitor) is a harmless "duplicate"; a log
        # line read twice would be a new event, logged "extended" or broadcast again.
        twice = {ip: dict(c) for ip, c in reports.items() if c["broadcast"] != 1 or c["extended"]}
        assert twice == {}
        assert hub_sequence(hub) == len(everyone)
        assert sync_unbans(cluster) == {}
        # The lines that waited for the monitor went out several events to a report.
        reports, events = hub_traffic(hub)
        assert events - events_before >= len(meanwhile)
        assert reports - reports_before < events - events_before


def hub_traffic(hub: Hub) -> tuple[int, int]:
    """Report messages the hub received, and the events in them it stored or knew."""
    events = status_figure(hub, "Events accepted") + status_figure(hub, "Duplicates dropped")
    return status_figure(hub, "Reports received"), events


def status_figure(hub: Hub, name: str) -> int:
    """A number the hub's `status` shows."""
    command = [sys.executable, "-m", "f2bzmq", "publisher", "-c", str(hub.config), "status"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=True)
    match = re.search(rf"{re.escape(name)}: (\d+)", done.stdout)
    assert match is not None, done.stdout
    return int(match.group(1))


def test_restarting_fail2ban_with_500_bans_changes_nothing_elsewhere(tmp_path):
    def jails(server: Fail2banServer) -> str:
        # sshd keeps its dummy action: its flush is what fail2ban logs as "Flush ticket(s)".
        return quiet_jails(server, sshd_action=True)

    with Cluster(tmp_path, size=3, fail2ban={"jails": jails}) as cluster:
        node1, node2 = cluster["node1"], cluster["node2"]
        held = attackers(8, 500)
        from_node2 = attackers(9, 20)  # node1's own sync jail holds these
        node1.fail2ban.attack(*held)
        node2.fail2ban.attack(*from_node2)
        expected = {
            "node1": set(from_node2),
            "node2": set(held),
            "node3": set(held) | set(from_node2),
        }
        wait_converged(cluster, expected)

        node1.fail2ban.restart()
        fail2ban_log = node1.fail2ban.log

        def restored() -> bool:
            return fail2ban_log.read_text().count("NOTICE  [sshd] Restore Ban ") == len(held)

        assert wait_until(restored, STEP_TIMEOUT, 0.2), node1.fail2ban.log.read_text()[-3000:]
        text = fail2ban_log.read_text()
        assert "[sshd] Flush ticket(s) with " in text
        assert text.count("NOTICE  [sshd] Unban ") == len(held)
        # A ban after the restart: once it is everywhere, the monitor has read past the storm.
        marker = attackers(10, 1)
        node1.fail2ban.attack(*marker)
        expected["node2"] |= set(marker)
        expected["node3"] |= set(marker)
        wait_converged(cluster, expected)
        assert jail_set(node1, "sshd") == set(held) | set(marker)
        assert "Unban" not in cluster.hub.log_text()
        assert sync_unbans(cluster) == {}


def test_a_ban_whose_origin_died_is_lifted_everywhere_when_its_time_is_up(tmp_path):
    def jails(server: Fail2banServer) -> str:
        return quiet_jails(server, sshd_bantime=3 if server.name == "node1" else 600)

    with Cluster(tmp_path, size=3, fail2ban={"jails": jails}) as cluster:
        node1, node2, node3, hub = cluster["node1"], cluster["node2"], cluster["node3"], cluster.hub
        short = attackers(11, 5)
        node1.fail2ban.attack(*short)
        # Kill node1 as soon as the hub has its bans, well within their 3 seconds.
        reported = {("sshd", ip, "node1") for ip in short}
        assert wait_until(lambda: set(hub_bans(hub)) == reported, STEP_TIMEOUT, 0.02)
        node1.monitor.stop(signal.SIGKILL)
        kill_fail2ban(node1.fail2ban)
        assert "Unban" not in node1.fail2ban.log.read_text(), "node1 lived to lift its bans"
        with read_only(hub.directory / "state" / "publisher.sqlite3") as db:
            expiry = db.execute("SELECT MAX(expiry) FROM bans").fetchone()[0]

        def banned_then_lifted(node: Node) -> bool:
            log = node.log_text("subscriber")
            return not jail_set(node, "cluster") and all(
                f"[cluster] Ban {ip}\n" in log and f"[cluster] Unban {ip}\n" in log for ip in short
            )

        def lifted() -> bool:
            return banned_then_lifted(node2) and banned_then_lifted(node3)

        assert wait_until(lifted, expiry - time.time() + 15, 0.1), cluster.diagnostics()
        # The hub writes a pass's log lines after it has broadcast them.
        logged = lambda: all(f"[sshd] Unban {ip}: ban time is up" in hub.log_text() for ip in short)  # noqa: E731
        assert wait_until(logged, 15), hub.log_text()[-2000:]

        # node1 comes back: its expired bans stay gone, and it takes the cluster's bans again.
        node1.fail2ban.start()
        node1.monitor.start()
        marker = attackers(12, 1)
        node2.fail2ban.attack(*marker)
        wait_converged(cluster, {"node1": set(marker), "node2": set(), "node3": set(marker)})
        assert jail_set(node1, "sshd") == set()
        assert hub_bans(hub) == [("sshd", marker[0], "node2")]
