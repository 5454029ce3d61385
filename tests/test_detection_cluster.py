"""Cluster jails end to end: real fail2ban-servers, each with its own sshd filter on a written
auth log and a local maxretry of 3, their monitors and subscribers, and real hubs.

An attacker who spreads its tries over the nodes stays under every node's maxretry: the
hubs count them together and every node bans it. The shipped defaults of a cluster jail
([detect:sshd] with `enabled = true` only): 5 failures within 10m, from at least 2 nodes.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

from f2bzmq.lab import Cluster, wait_until
from f2bzmq.protocol import CLUSTER
from tests.support.nodeclient import NodeClient

ATTACKER = "192.0.2.66"
USER = "198.51.100.5"  # one typo on each of two servers
LONER = "203.0.113.9"  # hammers one node only
NODES = {"fail2ban": {"sshd_maxretry": 3}}
DETECT = {"detect:sshd": {"enabled": "true"}}


def status(config, role: str = "publisher") -> dict[str, str]:
    """`ROLE status` as its `|- Key: value` lines say it."""
    command = [sys.executable, "-m", "f2bzmq", role, "-c", str(config), "status"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    return dict(re.findall(r"^\|- ([^:]+): (.*)$", done.stdout, re.M))


def wait_banned_everywhere(cluster: Cluster, ip: str, timeout: float = 30) -> None:
    nodes = list(cluster.nodes.values())
    if not wait_until(lambda: all(ip in n.fail2ban.banned("cluster") for n in nodes), timeout, 0.2):
        raise AssertionError(f"{ip} not banned on every node\n{cluster.diagnostics()}")


def wait_lifted_everywhere(cluster: Cluster, ip: str, timeout: float = 30) -> None:
    nodes = list(cluster.nodes.values())
    if not wait_until(
        lambda: all(ip not in n.fail2ban.banned("cluster") for n in nodes), timeout, 0.2
    ):
        raise AssertionError(f"{ip} still banned somewhere\n{cluster.diagnostics()}")


def cluster_bans(node, ip: str) -> int:
    """How many times the node's fail2ban banned `ip` in its sync jail, as its log says."""
    return node.fail2ban.log.read_text().count(f"[cluster] Ban {ip}\n")


def test_an_attack_spread_over_five_nodes_is_banned_on_all_five(tmp_path):
    with Cluster(tmp_path, size=5, **NODES, **DETECT) as cluster:
        nodes = list(cluster.nodes.values())
        nodes[0].fail2ban.attack(USER, count=1)
        nodes[1].fail2ban.attack(USER, count=1)
        nodes[2].fail2ban.attack(LONER, count=1000)
        for node in nodes:
            node.fail2ban.attack(ATTACKER, count=2)
        wait_banned_everywhere(cluster, ATTACKER)

        line = f"[sshd] Ban {ATTACKER} (cluster: "
        assert wait_until(lambda: line in cluster.hub.log_text(), 15), cluster.hub.log_text()[
            -2000:
        ]
        said = cluster.hub.log_text().split(line)[1].split("\n")[0]
        assert re.fullmatch(r"\d+ failures from (node\d, )+node\d in \d+s\)", said), said
        for node in nodes:  # none banned it on its own
            assert ATTACKER not in node.fail2ban.banned("sshd")
            assert f"[sshd] Ban {ATTACKER}" not in node.fail2ban.log.read_text()

        # node3 banned LONER itself, at its third failure, and reported it like any ban;
        # its 1,000 failures came from one node and make no cluster ban.
        third = cluster["node3"]
        reported = lambda: int(status(third.config, "monitor")["Failures reported"])  # noqa: E731
        assert wait_until(lambda: reported() == 1000 + 2, 30), reported()  # and ATTACKER's 2
        assert LONER in third.fail2ban.banned("sshd")
        hub = status(cluster.hub.config)
        assert hub["Cluster detections"] == "1", hub
        assert int(hub["Failures counted"]) >= 10 and hub["Cluster jails"] == "sshd"
        assert f"Ban {LONER} (cluster" not in cluster.hub.log_text()
        # One typo on each of two nodes is a user, not an attack.
        for node in nodes:
            assert USER not in node.fail2ban.banned("cluster") + node.fail2ban.banned("sshd")


def with_time(node, ip: str) -> int:
    """The ban time `fail2ban-client get cluster banip --with-time` shows for ip."""
    with node.fail2ban.client() as client:
        for line in client.command("get", "cluster", "banip", "--with-time"):
            if line.startswith(ip + " "):
                return int(re.search(r" \+ (-?\d+) = ", line).group(1))
    raise AssertionError(f"{ip} not banned on {node.name}")


def test_the_third_ban_of_an_address_is_escalated_on_every_node(tmp_path):
    """bantime.increment, across the cluster: the first ban (the cluster's) 4 s, the second
    (node1's own, 4 s) lengthened to 8 s everywhere, the third (the cluster's) 16 s."""
    detect = {"detect:sshd": {"enabled": "true", "bantime": "4", "bantime.increment": "true"}}

    def jails(server):
        # The nodes' own sshd forgets a failure after 3 s: each step starts afresh there.
        return server.default_jails(4, 86400).replace("findtime = 600", "findtime = 3")

    nodes = {"fail2ban": {"sshd_maxretry": 3, "jails": jails}}
    with Cluster(tmp_path, size=3, **nodes, **detect) as cluster:
        every = list(cluster.nodes.values())

        def spread_attack() -> None:
            for node in every:
                node.fail2ban.attack(ATTACKER, count=2)

        spread_attack()
        wait_banned_everywhere(cluster, ATTACKER)
        assert [with_time(node, ATTACKER) for node in every] == [4, 4, 4]
        wait_lifted_everywhere(cluster, ATTACKER)

        every[0].fail2ban.attack(ATTACKER, count=3)  # node1 bans it itself: its second ban
        wait_banned_everywhere(cluster, ATTACKER)
        assert [with_time(node, ATTACKER) for node in every] == [8, 8, 8]
        assert "after node1's own" in cluster.hub.log_text()
        wait_lifted_everywhere(cluster, ATTACKER)

        spread_attack()
        wait_banned_everywhere(cluster, ATTACKER)
        assert [with_time(node, ATTACKER) for node in every] == [16, 16, 16]
        hub = status(cluster.hub.config)
        # Three bans, each made longer than the one before it: the cluster's (detections)
        # or a node's own lengthened (escalations). Which one made the third depends on
        # whether a node's own sshd, on a busy host, counted 3 failures within its 3 s.
        counted = int(hub["Cluster detections"]), int(hub["Escalations"])
        assert counted[0] >= 1 and counted[1] >= 1 and sum(counted) == 3, hub
        assert re.search(
            rf"\[sshd\] Ban {ATTACKER} \(cluster: .*ban 3, 16s", cluster.hub.log_text()
        )


def test_two_hubs_one_killed_mid_attack_ban_once_everywhere(tmp_path):
    """hub1 counts node1's and node2's failures and is killed; hub2 bans at node3's. Back,
    hub1 still has its counts (stored before it ACKed them), takes node3's report, which
    node3 kept for it, and decides the same ban: every node bans the attacker once."""
    with Cluster(tmp_path, size=3, hubs=2, **NODES, **DETECT) as cluster:
        hub1, hub2 = cluster.hubs
        cluster["node1"].fail2ban.attack(ATTACKER, count=2)
        cluster["node2"].fail2ban.attack(ATTACKER, count=2)
        for hub in (hub1, hub2):
            counted = lambda hub=hub: status(hub.config).get("Failures counted") == "4"  # noqa: E731
            assert wait_until(counted, 30, 0.2), status(hub.config)
        hub1.publisher.stop(signal.SIGKILL)
        cluster["node3"].fail2ban.attack(ATTACKER, count=2)
        wait_banned_everywhere(cluster, ATTACKER)

        hub1.publisher.start()
        # 5 or 6: node3's two failures may reach a hub in one report or in two, and the
        # hub decides at the fifth. The ban event is the same either way (checked below).
        decided = rf"\[sshd\] Ban {ATTACKER} \(cluster: [56] failures from node1, node2, node3"
        assert wait_until(lambda: re.search(decided, hub1.log_text()), 30), hub1.log_text()[-2000:]
        assert re.search(decided, hub2.log_text())
        cluster.wait_ready()
        # The same decision on both hubs: the same ban event, id and all.
        snapshots = []
        for hub in (hub1, hub2):
            node = NodeClient(cluster.ports, cluster.keys_dir, address=hub.address)
            try:
                snapshots.append([e for e in node.snapshot()[1] if e.node == CLUSTER])
            finally:
                node.close()
        assert snapshots[0] == snapshots[1] and len(snapshots[0]) == 1
        # hub1's ban was on the nodes' update streams before its log line: give their
        # subscribers a moment to have acted on it, had they been going to.
        time.sleep(1.0)
        for node in cluster.nodes.values():
            assert cluster_bans(node, ATTACKER) == 1, node.fail2ban.log.read_text()[-2000:]
            assert f"[cluster] Unban {ATTACKER}" not in node.fail2ban.log.read_text()
            assert ATTACKER not in node.fail2ban.banned("sshd")
