"""recidive counts this server's own detections, not the cluster's bans in the sync jail:
the shipped jail.d snippet's filter line, in a real fail2ban-server with Debian's
recidive filter reading that server's own log."""

from __future__ import annotations

import configparser
from pathlib import Path

from f2bzmq.lab import Fail2banServer, run_command, wait_until

SNIPPET = Path(__file__).resolve().parent.parent / "etc/fail2ban/jail.d/f2bzmq-cluster.conf"
CLUSTER_BAN, LOCAL_BAN = "192.0.2.81", "192.0.2.82"


def shipped_recidive_filter() -> str:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(SNIPPET)
    return parser["recidive"]["filter"]


def jails(server: Fail2banServer) -> str:
    """The lab's sshd and sync jails; recidive with the shipped filter line, and beside it,
    for comparison, recidive as it is without the snippet."""
    text = server.default_jails(600, 86400)
    for name, filter_line in (
        ("recidive", shipped_recidive_filter()),
        ("recidive-stock", 'recidive[_jailname="recidive-stock"]'),
    ):
        text += (
            f"\n[{name}]\nenabled = true\nfilter = {filter_line}\nlogpath = {server.log}\n"
            "maxretry = 2\nfindtime = 1d\nbantime = 1w\n"
            f"action = dummy[target={server.directory / (name + '.dummy')}]\n"
        )
    return text


def test_recidive_counts_local_bans_and_not_the_clusters(tmp_path):
    server = Fail2banServer(tmp_path, "node2", jails=jails)
    server.log.touch()  # recidive's log: fail2ban checks every jail's log exists first
    with server:
        socket = str(server.socket)

        def client(*command: str) -> None:
            run_command("fail2ban-client", "-s", socket, *command)

        for _ in range(2):  # the cluster banned it twice, as the subscriber applies it
            client("set", "cluster", "banip", CLUSTER_BAN)
            client("set", "cluster", "unbanip", CLUSTER_BAN)
        for _ in range(2):  # this server detected it twice
            server.attack(LOCAL_BAN)
            server.wait_banned("sshd", LOCAL_BAN)
            client("set", "sshd", "unbanip", LOCAL_BAN)
        server.wait_banned("recidive", LOCAL_BAN)
        # Without the snippet, the cluster's bans would have counted:
        server.wait_banned("recidive-stock", CLUSTER_BAN)
        assert CLUSTER_BAN not in server.banned("recidive")
        assert wait_until(lambda: f"[recidive] Ban {LOCAL_BAN}" in server.log.read_text(), 5)
