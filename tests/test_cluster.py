"""End to end: a real ban on node1 reaches node2's and node3's fail2ban through the three roles."""

import pytest

from f2bzmq.lab import Cluster, wait_until

ATTACKER = "192.0.2.10"


def wait_banned(cluster, node, jail, ip, present=True, timeout=20):
    try:
        cluster[node].fail2ban.wait_banned(jail, ip, present, timeout)
    except AssertionError as error:
        raise AssertionError(f"{error}\n{cluster.diagnostics()}") from None


def test_ban_and_unban_on_one_node_reach_every_other_node(cluster):
    node1 = cluster["node1"]
    node1.fail2ban.attack(ATTACKER)
    wait_banned(cluster, "node1", "sshd", ATTACKER)
    wait_banned(cluster, "node2", "cluster", ATTACKER)
    wait_banned(cluster, "node3", "cluster", ATTACKER)

    with node1.fail2ban.client() as client:
        client.unban("sshd", [ATTACKER])
    wait_banned(cluster, "node2", "cluster", ATTACKER, present=False)
    wait_banned(cluster, "node3", "cluster", ATTACKER, present=False)
    # The hub writes a pass's log lines after it has broadcast them.
    assert wait_until(lambda: "[sshd] Unban 192.0.2.10 from node1" in cluster.hub.log_text(), 15)


def test_origin_does_not_get_its_own_ban_back(cluster):
    cluster["node1"].fail2ban.attack(ATTACKER)
    wait_banned(cluster, "node2", "cluster", ATTACKER)
    wait_banned(cluster, "node3", "cluster", ATTACKER)
    # node2's and node3's sync-jail bans are written to their logs as "[cluster] Ban";
    # their monitors must not report them, and node1 must not get the address back.
    assert cluster["node1"].fail2ban.banned("cluster") == []
    assert "[cluster] Ban" not in cluster.hub.log_text()


def test_restarting_fail2ban_on_one_node_changes_nothing_elsewhere(cluster):
    node1 = cluster["node1"]
    addresses = ["192.0.2.10", "198.51.100.20", "2001:db8::30"]
    for ip in addresses:
        node1.fail2ban.attack(ip)
    for ip in addresses:
        wait_banned(cluster, "node2", "cluster", ip)
        wait_banned(cluster, "node3", "cluster", ip)

    node1.fail2ban.restart()  # writes Flush + Unban for each ticket, then Restore Ban
    node1.fail2ban.wait_banned("sshd", addresses[-1])
    assert wait_for_log(node1, "monitor", "Restore Ban", present_in="fail2ban")
    # Give the monitor time to read the restart's lines, then compare: nothing changed.
    marker = "2001:db8::99"
    node1.fail2ban.attack(marker)
    wait_banned(cluster, "node2", "cluster", marker)
    wait_banned(cluster, "node3", "cluster", marker)
    for node in ("node2", "node3"):
        assert sorted(cluster[node].fail2ban.banned("cluster")) == sorted([*addresses, marker])
    assert "Unban" not in cluster.hub.log_text()


def test_a_subscriber_started_late_catches_up_from_the_snapshot(cluster):
    node3 = cluster["node3"]
    node3.subscriber.stop()
    cluster["node1"].fail2ban.attack(ATTACKER)
    wait_banned(cluster, "node2", "cluster", ATTACKER)
    assert node3.fail2ban.banned("cluster") == []
    node3.subscriber.start()
    wait_banned(cluster, "node3", "cluster", ATTACKER)


def test_allowlisted_addresses_are_never_banned(tmp_path):
    with Cluster(tmp_path, size=2, subscriber={"allowlist": "127.0.0.0/8 ::1 192.0.2.0/24"}) as c:
        c["node1"].fail2ban.attack("192.0.2.55")
        c["node1"].fail2ban.attack("198.51.100.55")
        wait_banned(c, "node2", "cluster", "198.51.100.55")
        assert "192.0.2.55" not in c["node2"].fail2ban.banned("cluster")
        assert wait_until(lambda: "[sshd] Ban 192.0.2.55 from node1" in c.hub.log_text(), 15)


def wait_for_log(node, role, text, present_in="fail2ban"):
    if present_in == "fail2ban":
        return wait_until(lambda: text in node.fail2ban.log.read_text(), 20, 0.1)
    return wait_until(lambda: text in node.log_text(role), 20, 0.1)


def test_status_of_each_role_reports_what_happened(cluster):
    import subprocess
    import sys

    cluster["node1"].fail2ban.attack(ATTACKER)
    wait_banned(cluster, "node2", "cluster", ATTACKER)
    expected = [
        ("publisher", cluster.hub.config, "|- Currently banned: 1"),
        ("monitor", cluster["node1"].config, "|- Events ACKed: 1"),
        ("subscriber", cluster["node2"].config, "|- Bans applied: 1"),
    ]
    for role, config, line in expected:
        command = [sys.executable, "-m", "f2bzmq", role, "-c", str(config), "status"]

        def shows(command=command, line=line) -> bool:
            done = subprocess.run(command, capture_output=True, text=True, timeout=30)
            return done.returncode == 0 and line in done.stdout.splitlines()

        assert wait_until(shows, 15, 0.3), subprocess.run(command, capture_output=True, text=True)


def test_a_ban_fail2ban_lost_comes_back_at_the_next_resync(tmp_path):
    # fail2ban drops the ban itself: node2's sync jail ends its bans after 3 s, long before
    # the cluster's. (An unbanip by hand is a decision the subscriber keeps: test_subscriber.)
    sync_bantime = {"sync_bantime": 3}
    fail2ban = lambda name: sync_bantime if name == "node2" else {}  # noqa: E731
    with Cluster(tmp_path, size=2, fail2ban=fail2ban, subscriber={"resync_interval": "2"}) as c:
        c["node1"].fail2ban.attack(ATTACKER)
        wait_banned(c, "node2", "cluster", ATTACKER)
        assert wait_until(lambda: ATTACKER not in c["node2"].fail2ban.banned("cluster"), 10)
        wait_banned(c, "node2", "cluster", ATTACKER)
        assert "[cluster] Unban" not in c.hub.log_text()


@pytest.mark.parametrize("command", [["restart", "sshd"], ["stop", "sshd"]])
def test_restarting_one_jail_whose_action_cannot_flush_changes_nothing_elsewhere(tmp_path, command):
    """hostsdeny has no flush: fail2ban writes a plain Unban per ticket with no Flush line."""

    def jails(server):
        text = server.default_jails(600, 86400)
        dummy = f"action = dummy[target={server.directory / 'sshd.dummy'}]"
        return text.replace(dummy, f"action = hostsdeny[file={server.directory / 'hosts.deny'}]")

    import subprocess

    addresses = ["198.18.250.1", "198.18.250.2", "198.18.250.3"]
    with Cluster(tmp_path, size=2, fail2ban={"jails": jails}) as c:
        node1 = c["node1"].fail2ban
        node1.attack(*addresses)
        for ip in addresses:
            wait_banned(c, "node2", "cluster", ip)
        subprocess.run(
            ["fail2ban-client", "-c", str(node1.config), "-s", str(node1.socket), *command],
            capture_output=True,
            timeout=60,
            check=True,
        )
        marker = "198.18.250.99"
        if command[0] == "stop":
            subprocess.run(
                [
                    "fail2ban-client",
                    "-c",
                    str(node1.config),
                    "-s",
                    str(node1.socket),
                    "reload",
                ],
                capture_output=True,
                timeout=60,
                check=True,
            )
        node1.attack(marker)
        wait_banned(c, "node2", "cluster", marker)
        assert sorted(c["node2"].fail2ban.banned("cluster")) == sorted([*addresses, marker])
        assert " Unban " not in c.hub.log_text()
