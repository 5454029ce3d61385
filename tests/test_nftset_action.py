"""The f2bzmq-nftset action inside a real fail2ban-server, against the real nftables.

Every fail2ban-server here runs in a network namespace made for the test, so the
action's tables exist only there; the host's firewall is never touched. What the
tests check is what nft lists inside the namespace (and, for one test, whether a TCP
connection over a veth pair between two namespaces gets through). A wrapper around
nft keeps a copy of every script the action runs, to show what never reached nft.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from f2bzmq.fail2ban_client import Fail2banClient, Fail2banError
from f2bzmq.lab import CLIENT_PROGRAM, Fail2banServer, process_alive, wait_until
from tests.support.netns import Namespaces, netns_holds

TABLE = "f2bzmq"
SERVER_ADDRESS, PEER_ADDRESS = "10.250.0.1", "10.250.0.2"  # exist only inside the namespaces
PORT = 8080

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and nftables need root"),
    pytest.mark.skipif(shutil.which("nft") is None, reason="nft (nftables) is not installed"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="ip (iproute2) is not installed"),
]


class Namespace:
    """A network namespace of our own; delete() ends what runs in it and removes it."""

    def __init__(self, role: str) -> None:
        self._namespaces = Namespaces("f2bzmq-test")
        self.name = self._namespaces.add(role)

    def argv(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *args]

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(*args), capture_output=True, text=True, timeout=60, check=check
        )

    def holds(self, pid: int) -> bool:
        """True when process pid lives in this namespace (and so not in the host's)."""
        return netns_holds(self.name, pid)

    def delete(self) -> None:
        """End whatever still runs inside (SIGTERM, then SIGKILL), then remove the namespace."""
        self._namespaces.close()


class NamespacedServer:
    """A lab fail2ban-server in a namespace of its own, and what nft lists there; every
    other attribute is the lab server's (socket, log, config, client(), …)."""

    def __init__(self, server: Fail2banServer, namespace: Namespace, recorder: Path) -> None:
        self.server = server
        self.namespace = namespace
        self.recorder = recorder  # the nft wrapper the jails use
        self.record = recorder.with_name("nft-scripts.txt")  # every script it ran

    def __getattr__(self, name: str):
        return getattr(self.server, name)

    def elements(self, name: str, table: str = TABLE) -> set[str]:
        """The elements of set `name`, as nft lists them; none while there is no such set
        (the action makes its table when fail2ban starts the jail, a moment after ping)."""
        done = self.namespace.run("nft", "-j", "list", "set", "inet", table, name, check=False)
        if done.returncode != 0:
            return set()
        found: set[str] = set()
        for item in json.loads(done.stdout)["nftables"]:
            for element in item.get("set", {}).get("elem", []):
                found.add(element_text(element))
        return found

    def tables(self) -> list[str]:
        return self.namespace.run("nft", "list", "tables").stdout.split()


def element_text(element: object) -> str:
    """An element of nft's JSON ("192.0.2.1", {"prefix": …}, {"elem": {"val": …}}) as text."""
    if isinstance(element, str):
        return element
    if isinstance(element, dict) and "elem" in element:
        return element_text(element["elem"]["val"])
    if isinstance(element, dict) and "prefix" in element:
        return f"{element['prefix']['addr']}/{element['prefix']['len']}"
    return json.dumps(element)


JAILS = """\
[DEFAULT]
backend = polling

[cluster]
enabled = true
filter = f2bzmq-cluster
logpath = {log}
bantime = 86400
action = f2bzmq-nftset.py[nftables="{nft}"{options}]

[expiring]
enabled = true
filter = f2bzmq-cluster
logpath = {log}
bantime = 2
action = f2bzmq-nftset.py[table=f2bzmq-expiring, nftables="{nft}"]
"""


def write_recorder(directory: Path) -> Path:
    """An nft wrapper that appends each script to nft-scripts.txt before nft runs it."""
    record = directory / "nft-scripts.txt"
    record.touch()
    recorder = directory / "nft-recorder"
    recorder.write_text(f'#!/bin/sh\ntee -a "{record}" | nft "$@"\n')
    recorder.chmod(0o755)
    return recorder


@contextlib.contextmanager
def namespaced_server(
    root: Path, options: str = "", more_jails: str = ""
) -> Iterator[NamespacedServer]:
    """A fail2ban-server in a namespace of its own; everything gone on every way out.

    `options` go to the cluster jail's action; `more_jails` is a template like JAILS."""
    recorder = write_recorder(root)
    namespace = Namespace("f2b")
    try:
        server = Fail2banServer(
            root,
            "node",
            jails=lambda server: (JAILS + more_jails).format(
                log=server.sync_log, nft=recorder, options=options
            ),
            netns=namespace.name,
        )
        try:
            server.start()
            # The lab started it through `ip netns exec`; prove it before any test goes on.
            pid = int(server.pidfile.read_text())
            if not namespace.holds(pid):
                raise RuntimeError(f"fail2ban-server {pid} is not in {namespace.name}")
            yield NamespacedServer(server, namespace, recorder)
        finally:
            server.stop()
    finally:
        namespace.delete()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NamespacedServer]:
    with namespaced_server(tmp_path_factory.mktemp("nftset")) as running:
        yield running


@pytest.fixture
def client(server: NamespacedServer) -> Iterator[Fail2banClient]:
    with Fail2banClient(str(server.socket), timeout=120) as connected:
        yield connected
        connected.command("unban", "--all")


def wait_for(condition, timeout: float, what: str, interval: float = 0.05) -> float:
    """Seconds until condition() held; fail the test with `what` if it never did."""
    started = time.monotonic()
    assert wait_until(condition, timeout, interval), f"{what} within {timeout:g} s"
    return time.monotonic() - started


def test_the_action_runs_only_inside_the_namespace(server: NamespacedServer) -> None:
    assert server.namespace.holds(int(server.pidfile.read_text()))
    assert "f2bzmq" in server.tables() and "f2bzmq-expiring" in server.tables()


def test_banip_and_unbanip_of_addresses_and_networks(
    server: NamespacedServer, client: Fail2banClient
) -> None:
    expected = {
        "addr4": "192.0.2.10",
        "addr6": "2001:db8::10",
        "net4": "198.51.100.0/24",
        "net6": "2001:db8:1::/48",
    }
    assert client.ban("cluster", list(expected.values())) == 4
    wait_for(
        lambda: all(ip in server.elements(name) for name, ip in expected.items()),
        20,
        "every ban in its set",
    )
    assert client.unban("cluster", list(expected.values())) == 4
    wait_for(
        lambda: not any(server.elements(name) for name in expected),
        20,
        "every set empty after the unbans",
    )


def test_networks_are_merged_for_the_interval_set(
    server: NamespacedServer, client: Fail2banClient
) -> None:
    # Two halves and a network inside one of them: nft's interval set takes no overlaps.
    client.ban("cluster", ["203.0.113.0/25", "203.0.113.0/26"])
    client.ban("cluster", ["203.0.113.128/25"])
    wait_for(lambda: server.elements("net4") == {"203.0.113.0/24"}, 20, "one merged /24")
    client.unban("cluster", ["203.0.113.128/25"])
    wait_for(lambda: server.elements("net4") == {"203.0.113.0/25"}, 20, "the /25 that is left")


def test_a_single_ban_is_enforced_within_a_short_delay(
    server: NamespacedServer, client: Fail2banClient
) -> None:
    client.ban("cluster", ["192.0.2.20"])
    # Polling nft takes a few milliseconds itself; the bound is loose for busy machines.
    delay = wait_for(lambda: "192.0.2.20" in server.elements("addr4"), 2, "the ban", 0.002)
    print(f"single ban in the set {delay * 1000:.0f} ms after banip returned")


def test_ten_thousand_bans_all_reach_the_sets(
    server: NamespacedServer, client: Fail2banClient
) -> None:
    v4 = [f"10.{i // 65536}.{i // 256 % 256}.{i % 256}" for i in range(9000)]
    v6 = [f"2001:db8:2::{i:x}" for i in range(1, 1001)]
    addresses = v4 + v6
    started = time.monotonic()
    for batch in range(0, len(addresses), 1000):
        assert client.ban("cluster", addresses[batch : batch + 1000]) == 1000
    wait_for(
        lambda: server.elements("addr4") == set(v4) and server.elements("addr6") == set(v6),
        120,
        "10,000 bans in the sets",
        0.2,
    )
    print(f"10,000 bans in the sets {time.monotonic() - started:.2f} s after the first banip")
    for batch in range(0, len(addresses), 1000):
        client.unban("cluster", addresses[batch : batch + 1000])
    wait_for(
        lambda: not server.elements("addr4") and not server.elements("addr6"),
        120,
        "every set empty after 10,000 unbans",
        0.2,
    )


def test_hostile_addresses_never_reach_nft(
    server: NamespacedServer, client: Fail2banClient
) -> None:
    hostile = [
        "192.0.2.30 }; delete table inet pwned",
        "192.0.2.31; flush ruleset",
        "attacker.invalid",
        "fe80::1%lo",
        "{ 192.0.2.32 }",
    ]
    for text in hostile:
        with contextlib.suppress(Fail2banError):  # fail2ban itself may refuse some
            client.command("set", "cluster", "banip", text)
    # Changes are applied in order: once this one is in, the others were dealt with.
    client.ban("cluster", ["192.0.2.33"])
    wait_for(lambda: "192.0.2.33" in server.elements("addr4"), 20, "the marker ban")
    assert TABLE in server.tables()
    scripts = server.record.read_text()
    for marker in ("pwned", "flush ruleset", "attacker", "%lo", "192.0.2.30", "192.0.2.31"):
        assert marker not in scripts, marker
    assert "192.0.2.32" not in scripts
    assert "nftset: refused" in server.log.read_text()


def test_networks_wider_than_the_floor_never_reach_nft(
    server: NamespacedServer, client: Fail2banClient
) -> None:
    """At the shipped floors, /24 and /48: a /0 would block every address there is."""
    earlier = len(server.record.read_text())
    for wide in ("0.0.0.0/0", "::/0", "10.0.0.0/8", "198.51.100.0/23", "2001:db8::/32"):
        with contextlib.suppress(Fail2banError):  # fail2ban itself may refuse some
            client.command("set", "cluster", "banip", wide)
    client.ban("cluster", ["198.51.100.0/24", "2001:db8:5::/48"])
    wait_for(lambda: server.elements("net6") == {"2001:db8:5::/48"}, 20, "the /48 in its set")
    assert server.elements("net4") == {"198.51.100.0/24"}
    scripts = server.record.read_text()[earlier:]
    # fail2ban passes 0.0.0.0/0 and ::/0 on as 0.0.0.0 and ::, the unspecified addresses.
    for wide in (" 0.0.0.0", " ::", "10.0.0.0/8", "198.51.100.0/23", "2001:db8::/32"):
        assert wide not in scripts, wide
    log = server.log.read_text()
    assert "nftset: refused 10.0.0.0/8, a network wider than min_prefix_v4 = /24" in log
    assert "nftset: refused 2001:db8::/32, a network wider than min_prefix_v6 = /48" in log
    assert "nftset: refused 0.0.0.0, the unspecified address (or a /0)" in log


@pytest.mark.parametrize(
    "options, reason",
    [
        (', blocktype="drop; flush ruleset"', "is not an nft verdict"),
        (", blocktype=accept", "is not an nft verdict that blocks"),
        (', blocktype="counter jump elsewhere"', "is not an nft verdict that blocks"),
        (", min_prefix_v4=0", "min_prefix_v4 '0' must be a prefix length 8..32"),
        (", min_prefix_v6=8", "min_prefix_v6 '8' must be a prefix length 16..128"),
        (', port="22 }; flush ruleset"', "is not a number, a range or a service name"),
        (', table="f2bzmq }"', "must be letters, digits, _ or -"),
        (", colour=red", "unknown option(s) colour"),
    ],
)
def test_an_option_nft_could_misread_stops_fail2ban_before_any_nft_run(
    tmp_path: Path, options: str, reason: str
) -> None:
    with pytest.raises(RuntimeError, match="did not start"), namespaced_server(tmp_path, options):
        pass
    assert reason in (tmp_path / "node" / "fail2ban-client.out").read_text()
    assert (tmp_path / "nft-scripts.txt").read_text() == ""


def test_expired_bans_leave_the_set(server: NamespacedServer, client: Fail2banClient) -> None:
    # fail2ban's own actions thread lifts these, not the socket thread.
    client.ban("expiring", ["192.0.2.40", "2001:db8::40"])
    wait_for(
        lambda: "192.0.2.40" in server.elements("addr4", "f2bzmq-expiring"),
        20,
        "the short ban",
    )
    wait_for(
        lambda: (
            not server.elements("addr4", "f2bzmq-expiring")
            and not server.elements("addr6", "f2bzmq-expiring")
        ),
        30,
        "the expired bans gone",
        0.2,
    )


def test_unban_all_empties_the_sets_and_stop_deletes_the_table(tmp_path: Path) -> None:
    with namespaced_server(tmp_path) as server, server.client() as client:
        client.ban("cluster", ["192.0.2.50", "2001:db8::50", "198.51.100.0/24"])
        wait_for(lambda: "192.0.2.50" in server.elements("addr4"), 20, "the bans")
        assert client.command("unban", "--all") == 3
        assert server.elements("addr4") == server.elements("addr6") == set()
        assert server.elements("net4") == set()
        assert TABLE in server.tables()
        client.ban("cluster", ["192.0.2.51"])
        wait_for(lambda: "192.0.2.51" in server.elements("addr4"), 20, "the ban after the flush")
        client.command("stop", "cluster")
        wait_for(lambda: TABLE not in server.tables(), 20, "the table deleted at jail stop")
        assert "f2bzmq-expiring" in server.tables()


def test_two_jails_cannot_share_a_table(tmp_path: Path) -> None:
    second = (
        "\n[second]\nenabled = true\nfilter = f2bzmq-cluster\nlogpath = {log}\n"
        'action = f2bzmq-nftset.py[nftables="{nft}"]\n'
    )
    with namespaced_server(tmp_path, more_jails=second) as server, server.client() as client:
        # fail2ban starts the jails' actions in parallel: either may get the table first.
        refusal = re.compile(r"belongs to jail (\S+)'s action; give jail (\S+) a table")
        wait_for(lambda: refusal.search(server.log.read_text()), 20, "one jail refused")
        owner, refused = refusal.search(server.log.read_text()).groups()
        assert {owner, refused} == {"cluster", "second"}
        client.ban(owner, ["192.0.2.70"])
        client.ban(refused, ["192.0.2.71"])
        wait_for(lambda: "192.0.2.70" in server.elements("addr4"), 20, "the owner's ban")
        client.command("stop", refused)
        client.ban(owner, ["192.0.2.72"])
        wait_for(lambda: "192.0.2.72" in server.elements("addr4"), 20, "a ban after the stop")
        assert server.elements("addr4") == {"192.0.2.70", "192.0.2.72"}


def test_after_fail2ban_was_killed_its_restored_bans_are_enforced_again(tmp_path: Path) -> None:
    with namespaced_server(tmp_path) as server:
        with server.client() as client:
            client.ban("cluster", ["192.0.2.80", "2001:db8::80"])
        wait_for(lambda: "192.0.2.80" in server.elements("addr4"), 20, "the bans")
        time.sleep(1.5)  # fail2ban writes bans to its database a moment later
        os.kill(int(server.pidfile.read_text()), signal.SIGKILL)
        wait_until(lambda: not process_alive(int(server.pidfile.read_text())), 10)
        # The table this jail left is taken over, with the bans fail2ban restores.
        server.start()
        wait_for(
            lambda: (
                server.elements("addr4") == {"192.0.2.80"}
                and server.elements("addr6") == {"2001:db8::80"}
            ),
            30,
            "the restored bans",
        )
        assert "belongs to" not in server.log.read_text()


def test_reload_keeps_the_bans_and_applies_new_options(tmp_path: Path) -> None:
    with namespaced_server(tmp_path) as server, server.client() as client:
        client.ban("cluster", ["192.0.2.60", "2001:db8::60"])
        wait_for(lambda: "192.0.2.60" in server.elements("addr4"), 20, "the bans")
        (server.config / "jail.conf").write_text(
            JAILS.format(
                log=server.sync_log,
                nft=server.recorder,
                options=', blocktype=drop, port="22,80:90"',
            )
        )
        done = subprocess.run(
            [CLIENT_PROGRAM, "-c", str(server.config), "reload"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr

        def rules() -> str:
            return server.namespace.run("nft", "list", "chain", "inet", TABLE, "input").stdout

        wait_for(lambda: "drop" in rules(), 20, "the new blocktype")
        assert "dport { 22, 80-90 } drop" in rules()
        assert server.elements("addr4") == {"192.0.2.60"}
        assert server.elements("addr6") == {"2001:db8::60"}
        assert sorted(client.banned("cluster")) == ["192.0.2.60", "2001:db8::60"]


@pytest.fixture(scope="module")
def peer(server: NamespacedServer) -> Iterator[Namespace]:
    """A second namespace joined to the server's by a veth pair, and a TCP listener."""
    peer = Namespace("peer")
    listener = None
    try:
        subprocess.run(
            [
                "ip", "link", "add", "veth0", "netns", server.namespace.name,
                "type", "veth", "peer", "name", "veth1", "netns", peer.name,
            ],
            check=True,
            capture_output=True,
        )  # fmt: skip
        for namespace, device, address in (
            (server.namespace, "veth0", SERVER_ADDRESS),
            (peer, "veth1", PEER_ADDRESS),
        ):
            namespace.run("ip", "addr", "add", f"{address}/24", "dev", device)
            namespace.run("ip", "link", "set", device, "up")
            namespace.run("ip", "link", "set", "lo", "up")
        listener = subprocess.Popen(
            server.namespace.argv(sys.executable, "-c", LISTENER, SERVER_ADDRESS, str(PORT)),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: connect(peer) == "connected", 20, "the listener reachable")
        yield peer
    finally:
        if listener is not None:
            listener.kill()
            listener.wait(10)
        peer.delete()  # takes veth1 and so veth0 with it


# Accepts connections for at most 10 minutes; the fixture kills it long before.
LISTENER = """
import socket, sys, time
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind((sys.argv[1], int(sys.argv[2])))
server.listen(64)
server.settimeout(1)
deadline = time.monotonic() + 600
while time.monotonic() < deadline:
    try:
        server.accept()[0].close()
    except socket.timeout:
        pass
"""

CONNECT = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2).close()
    print("connected")
except ConnectionRefusedError:
    print("refused")
except OSError as error:
    print(type(error).__name__)
"""


def connect(peer: Namespace) -> str:
    """What a TCP connection from the peer to the listener gets: connected, refused, …"""
    done = peer.run(sys.executable, "-c", CONNECT, SERVER_ADDRESS, str(PORT))
    return done.stdout.strip()


def test_a_banned_peer_cannot_connect(
    server: NamespacedServer, client: Fail2banClient, peer: Namespace
) -> None:
    assert connect(peer) == "connected"
    client.ban("cluster", [PEER_ADDRESS])
    wait_for(lambda: connect(peer) == "refused", 20, "the connection refused", 0.01)
    client.unban("cluster", [PEER_ADDRESS])
    wait_for(lambda: connect(peer) == "connected", 20, "the connection accepted again", 0.01)
