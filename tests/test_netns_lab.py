"""End to end through real firewalls: an attack on node1 closes node1, node2 and node3 to
the attacker, and lifting the ban on node1 opens all three again.

Each node's fail2ban runs in its own network namespace with a real ban action (see
tests/support/netlab.py); the attacker's connections, not fail2ban's logs, decide what
counts. Prints the time from the failure lines to blocked on every node (`pytest -s`);
never asserts on speed.
"""

import re
import time

import pytest

from tests.support.netlab import ATTACKER, NODES, NetnsCluster, missing_requirements

MISSING = missing_requirements()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=str(MISSING))


# The stock actions, and the project's Python action that batches bans into nftables sets:
# all three must block and unblock the same way.
@pytest.fixture(params=["nftables-multiport", "iptables-multiport", "f2bzmq-nftset.py"])
def lab(request, tmp_path):
    with NetnsCluster(tmp_path, request.param) as running:
        yield running


def test_a_ban_on_one_node_blocks_the_attacker_on_every_node_until_it_is_lifted(lab):
    opened = lab.watch(reachable=True, timeout=20)
    assert opened.settled, (
        f"the attacker cannot reach every node before any ban: {opened.reachable}"
    )

    attacked_at: list[float] = []

    def attack() -> None:
        attacked_at.append(time.time())
        lab.cluster["node1"].fail2ban.attack(ATTACKER)

    blocked = lab.watch(reachable=False, timeout=30, start=attack)
    assert blocked.settled, f"still open: {blocked.reachable}\n{lab.diagnostics()}"
    after = {node: round((since - attacked_at[0]) * 1000) for node, since in blocked.since.items()}
    print(
        f"\n{lab.action}: failure lines written on node1 -> attacker blocked on "
        + ", ".join(f"{node} after {after[node]} ms" for node in NODES)
    )
    # Blocked by the firewall, not by a listener that died: each still answers from inside.
    assert lab.listeners_alive()
    for node in NODES:
        assert lab.answers_inside(node), f"{node}'s listener stopped answering"
        assert ATTACKER in lab.firewall(node), f"{node}'s firewall does not name {ATTACKER}"
    for node in ("node2", "node3"):
        assert ATTACKER in lab.cluster[node].fail2ban.banned("cluster")
    assert ATTACKER in lab.cluster["node1"].fail2ban.banned("sshd")

    with lab.cluster["node1"].fail2ban.client() as client:
        client.unban("sshd", [ATTACKER])
    reopened = lab.watch(reachable=True, timeout=30)
    assert reopened.settled, f"still blocked: {reopened.reachable}\n{lab.diagnostics()}"
    for node in ("node2", "node3"):
        assert ATTACKER not in lab.cluster[node].fail2ban.banned("cluster")
    for node in NODES:
        assert ATTACKER not in lab.firewall(node)


def test_an_attack_spread_over_the_three_nodes_is_refused_by_every_firewall(tmp_path):
    """Two failed logins on each node's stand-in sshd: under every node's own maxretry (3),
    six together for the cluster jail ([detect:sshd] at its defaults: 5 from 2 nodes). The
    attacker's connections, not a log, tell: every node's firewall refuses it."""
    detect = {"detect:sshd": {"enabled": "true"}}
    with NetnsCluster(tmp_path, "nftables-multiport", sshd=True, sshd_maxretry=3, **detect) as lab:
        opened = lab.watch(reachable=True, timeout=20)
        assert opened.settled, f"the attacker cannot reach every node: {opened.reachable}"
        attacked_at: list[float] = []

        def attack() -> None:
            attacked_at.append(time.time())
            for node in NODES:
                lab.fail_logins(node, tries=2)

        blocked = lab.watch(reachable=False, timeout=30, start=attack)
        assert blocked.settled, f"still open: {blocked.reachable}\n{lab.diagnostics()}"
        after = {node: round((at - attacked_at[0]) * 1000) for node, at in blocked.since.items()}
        print(
            "\nfailed logins spread over three nodes -> attacker refused on "
            + ", ".join(f"{node} after {after[node]} ms" for node in NODES)
        )
        assert lab.listeners_alive()
        for node in NODES:
            assert ATTACKER in lab.firewall(node), f"{node}'s firewall does not name {ATTACKER}"
            assert ATTACKER in lab.cluster[node].fail2ban.banned("cluster")
            assert ATTACKER not in lab.cluster[node].fail2ban.banned("sshd")  # none alone
        decided = rf"\[sshd\] Ban {ATTACKER} \(cluster: [56] failures from node1, node2, node3 in"
        assert re.search(decided, lab.cluster.hub.log_text())
