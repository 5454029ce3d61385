"""The cluster's own bans get their own time in the local fail2ban: which addresses need a
longer time (a table), and the borrowed bantime with a real fail2ban-server, whose own
`get cluster banip --with-time` says what it holds."""

import ipaddress
import re

from f2bzmq.bantimes import BanTimes, cluster_bantimes, longer
from f2bzmq.fail2ban_client import Fail2banError
from f2bzmq.jails import LocalJails, LocalPolicy
from f2bzmq.lab import Fail2banServer, run_command
from f2bzmq.protocol import BAN, CLUSTER, PERMANENT, UNBAN, BanEvent
from f2bzmq.sync import ClusterView


def test_longer():
    assert longer(600, None) and longer(1200, 600) and longer(PERMANENT, 600)
    assert not longer(600, 600) and not longer(300, 600) and not longer(PERMANENT, PERMANENT)
    assert not longer(10**9, PERMANENT)


def ban(ip, node=CLUSTER, bantime=1200, jail="sshd"):
    return BanEvent.new(node, jail, BAN, ip, bantime=bantime)


def test_only_the_clusters_own_bans_that_this_node_applies_have_a_time_of_their_own():
    bans = [
        ban("192.0.2.1"),
        ban("192.0.2.1", bantime=2400, jail="web"),  # the longest of two wins
        ban("192.0.2.2", node="node1"),  # a node's ban: the sync jail's time stands
        ban("192.0.2.3", bantime=PERMANENT),
        ban("10.0.0.1"),  # the node's allowlist
    ]
    found = cluster_bantimes(bans, lambda jail: "cluster", lambda e: not e.ip.startswith("10."))
    assert found == {("cluster", "192.0.2.1"): 2400, ("cluster", "192.0.2.3"): PERMANENT}


def test_a_time_is_given_once_and_again_only_when_longer():
    times = BanTimes()
    wanted = {("cluster", "192.0.2.1"): 1200, ("cluster", "192.0.2.2"): 1200, ("j", "x"): 60}
    held = {("cluster", "192.0.2.1"), ("cluster", "192.0.2.2")}
    plan = times.plan(wanted, lambda jail, ip: (jail, ip) in held)
    assert plan == {"cluster": {1200: ["192.0.2.1", "192.0.2.2"]}}  # not held: not yet
    times.gave("cluster", ["192.0.2.1", "192.0.2.2"], 1200)
    assert times.plan(wanted, lambda jail, ip: (jail, ip) in held) == {}
    wanted[("cluster", "192.0.2.1")] = 2400
    assert times.plan(wanted, lambda jail, ip: True) == {
        "cluster": {2400: ["192.0.2.1"]},
        "j": {60: ["x"]},
    }
    times.keep(lambda jail, ip: ip == "192.0.2.2")  # 192.0.2.1 was unbanned
    assert times.given == {("cluster", "192.0.2.2"): 1200}


def with_time(server: Fail2banServer) -> dict[str, int]:
    """What the server itself says: address -> the ban time its ticket has."""
    text = run_command(
        "fail2ban-client", "-s", str(server.socket), "get", "cluster", "banip", "--with-time"
    )
    return {
        ip: int(seconds) for ip, seconds in re.findall(r"^(\S+)\s+\S+ \S+ \+ (-?\d+) =", text, re.M)
    }


def test_the_local_fail2ban_holds_each_cluster_ban_for_its_time_and_the_others_for_the_jails(
    tmp_path,
):
    policy = LocalPolicy("node2", "cluster", {}, [ipaddress.ip_network("127.0.0.0/8")])
    view = ClusterView()
    with Fail2banServer(tmp_path, "node2") as server, server.client() as client:
        jails = LocalJails(policy, client, batch_size=100)
        for event in (
            ban("192.0.2.1"),
            ban("192.0.2.2", bantime=PERMANENT),
            ban("192.0.2.3", node="node1", bantime=600),
        ):
            view.apply(event)
            jails.take_update(event)
        jails.reconcile([view])
        assert with_time(server) == {"192.0.2.1": 1200, "192.0.2.2": -1, "192.0.2.3": 86400}
        assert client.bantime("cluster") == 86400  # given back
        # node1's ban gives way to the cluster's longer one (an unban and a ban, one update)
        for event in (
            BanEvent.new("hub", "sshd", UNBAN, "192.0.2.3"),
            ban("192.0.2.3", bantime=4800),
        ):
            view.apply(event)
            jails.take_update(event)
        jails.reconcile([view])
        assert with_time(server)["192.0.2.3"] == 4800
        jails.reread()  # a resync compares everything: nothing is given again
        jails.reconcile([view])
        assert with_time(server) == {"192.0.2.1": 1200, "192.0.2.2": -1, "192.0.2.3": 4800}
        assert "Increase Ban" not in server.log.read_text()


class Flaky:
    """fail2ban as LocalJails uses it, whose answers fail while `down` is set."""

    socket_path = "fail2ban.sock"
    server_pid = 1

    def __init__(self) -> None:
        self.bantimes = {"cluster": 86400}
        self.banned_now: set[str] = set()
        self.down = False

    def _answer(self) -> None:
        if self.down:
            raise Fail2banError("fail2ban is busy")

    def banned(self, jail: str) -> list[str]:
        self._answer()
        return sorted(self.banned_now)

    def ban(self, jail: str, ips: list[str]) -> int:
        self._answer()
        self.banned_now.update(ips)
        if self.bantimes[jail] == 1200:
            self.down = True  # it stops answering while the bantime is lent out
        return len(ips)

    def unban(self, jail: str, ips: list[str]) -> int:
        self._answer()
        return 0

    def bantime(self, jail: str) -> int:
        self._answer()
        return self.bantimes[jail]

    def banned_with_time(self, jail: str) -> list[tuple[str, float, int]]:
        self._answer()
        return [(ip, 0.0, self.bantimes[jail]) for ip in sorted(self.banned_now)]

    def ignored(self, jail: str) -> list[str]:
        self._answer()
        return []

    def set_bantime(self, jail: str, seconds: int) -> int:
        self._answer()
        self.bantimes[jail] = seconds
        return seconds


def test_a_bantime_that_could_not_be_given_back_is_given_back_next_time():
    fail2ban = Flaky()
    policy = LocalPolicy("node2", "cluster", {}, [])
    jails = LocalJails(policy, fail2ban, batch_size=100)
    view = ClusterView()
    event = ban("192.0.2.1")
    view.apply(event)
    jails.take_update(event)
    jails.reconcile([view])
    assert jails.error == "fail2ban is busy" and fail2ban.bantimes["cluster"] == 1200
    fail2ban.down = False
    jails.reconcile([view])  # reads the jails again, the lent bantime is not mistaken for its own
    assert fail2ban.bantimes["cluster"] == 86400 and jails.error is None
