"""The cluster console against a real hub and three real fail2ban nodes: what `bans` shows,
an operator's ban and unban (with a hold) on every node, an import of 1,000 addresses and
its export, a node enrolled and removed without copying a file, the allowlist changed
live. Every command runs as an operator runs it: `python3 -m f2bzmq cluster …`."""

from __future__ import annotations

import json
import shlex
import shutil
import time

import pytest

from f2bzmq import protocol
from f2bzmq.console import build_parser, join_command
from f2bzmq.keys import keygen, load_public
from f2bzmq.lab import Cluster, Hub, Node, free_ports, make_keys, wait_until
from f2bzmq.protocol import BanEvent
from tests.support.console import console, ok
from tests.support.nodeclient import NodeClient

ADMIN = "alice"


def no_sync_action(server) -> str:
    """The sync jail keeps its list without running an action per ban, as with
    f2bzmq-nftset: fail2ban's own pace is not what these tests measure."""
    return server.default_jails(600, 86400, sync_action="")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Cluster:
    root = tmp_path_factory.mktemp("console")
    cluster = Cluster(root, size=3, fail2ban={"jails": no_sync_action}, console={"admin": ADMIN})
    keygen(ADMIN, cluster.keys_dir / "admins")  # on the hub: admitted at its first request
    with cluster:
        yield cluster


def banned(cluster: Cluster, node: str, jail: str) -> set[str]:
    with cluster[node].fail2ban.client() as client:
        return set(client.banned(jail))


def everywhere(cluster: Cluster, ip: str) -> dict[str, bool]:
    """Whether each node's fail2ban bans ip in its sync jail or its sshd jail."""
    return {
        name: ip in banned(cluster, name, "cluster") | banned(cluster, name, "sshd")
        for name in cluster.nodes
    }


def find(bans: list[dict], ip: str) -> dict | None:
    return next((ban for ban in bans if ban["ip"] == ip), None)


def test_bans_show_origins_and_an_operator_bans_and_lifts_everywhere(site):
    hub = site.hub.config
    attacker, other = "192.0.2.21", "198.51.100.21"
    site["node1"].fail2ban.attack(attacker)
    assert wait_until(lambda: all(everywhere(site, attacker).values()), 20), site.diagnostics()

    def listed() -> dict | None:
        found = find(json.loads(ok(hub, "bans", "--json")), attacker)
        return found if found and found["applied"] == ["node2", "node3"] else None

    assert wait_until(listed, 15, 0.5)
    ban = listed()
    assert ban["jail"] == "sshd" and ban["until"] > ban["since"] > time.time() - 60
    assert [(o["node"], o["source"]) for o in ban["origins"]] == [("node1", "report")]
    assert find(json.loads(ok(hub, "bans", "--json", "--node", "node2")), attacker) is None
    assert find(json.loads(ok(hub, "bans", "--json", "--ip", "192.0.2.0/24")), attacker)
    assert "node1 (report)" in ok(hub, "bans", "--jail", "sshd")

    # An operator's ban reaches every node, its origin node1 too.
    assert "Banned 198.51.100.21 in cluster" in ok(hub, "ban", other, "--reason", "web scan")
    assert wait_until(lambda: all(everywhere(site, other).values()), 10)
    assert "alice (operator: web scan)" in ok(hub, "bans", "--ip", other)

    # A false positive is gone everywhere with one command, node1's own sshd jail included,
    # within a second, and it stays gone while node1 detects it again.
    began = time.monotonic()
    out = ok(hub, "unban", attacker, "--hold", "1m", "--reason", "our monitoring")
    answered = time.monotonic()
    assert "Lifted 192.0.2.21 in sshd" in out and "Held until" in out
    assert wait_until(lambda: not any(everywhere(site, attacker).values()), 5, 0.02)
    lifted = time.monotonic()
    print(f"unban: answered in {answered - began:.2f} s, gone in {lifted - began:.2f} s")
    # Within a second of the hub's answer: the console's own start (a Python process, CURVE)
    # is not the cluster's.
    assert lifted - answered < 1.0, "not gone within a second"
    node1 = site["node1"].fail2ban
    site["node1"].fail2ban.attack(attacker)
    ignored = f"[sshd] Ignore {attacker} by ip"
    assert wait_until(lambda: ignored in node1.log.read_text(), 15), "node1 saw it again"
    for _ in range(10):
        assert not any(everywhere(site, attacker).values())
        time.sleep(0.2)
    assert find(json.loads(ok(hub, "bans", "--json")), attacker) is None

    # Ending the hold gives fail2ban back its own say.
    ok(hub, "unban", attacker, "--hold", "0")
    with node1.client() as client:
        assert wait_until(lambda: attacker not in client.ignored("sshd"), 10)
    node1.attack(attacker)
    assert wait_until(lambda: all(everywhere(site, attacker).values()), 20)


def test_an_import_of_1000_addresses_lands_everywhere_and_its_export_round_trips(site, tmp_path):
    hub = site.hub.config
    addresses = [f"198.18.{n // 250}.{n % 250 + 1}" for n in range(1000)]
    lines = ["# a blocklist", *(f"{ip} 1h" if n % 2 else ip for n, ip in enumerate(addresses))]
    blocklist = tmp_path / "blocklist.txt"
    blocklist.write_text("\n".join(lines) + "\n")
    out = ok(hub, "import", str(blocklist), "--bantime", "2h")
    assert "1000 banned, 0 banned already, 0 refused" in out

    def landed() -> bool:
        return all(set(addresses) <= banned(site, node, "cluster") for node in site.nodes)

    assert wait_until(landed, 60, 0.5), site.diagnostics()

    exported = ok(hub, "export")
    left = dict(line.split() for line in exported.splitlines())
    assert set(addresses) <= set(left)
    assert all(0 < int(left[ip]) <= 7200 for ip in addresses)
    assert {int(left[ip]) <= 3600 for ip in addresses} == {True, False}  # each line's own time
    (tmp_path / "export.txt").write_text(exported)

    assert "Lifted" in ok(hub, "unban", "198.18.0.0/15")
    assert wait_until(lambda: not banned(site, "node2", "cluster") & set(addresses), 30, 0.5)
    assert f"Imported {len(left)} addresses" in ok(hub, "import", "-", stdin=exported)
    assert wait_until(landed, 60, 0.5)
    again = dict(line.split() for line in ok(hub, "export").splitlines())
    assert set(again) == set(left)


def test_a_hub_key_that_begins_with_a_dash_is_taken_as_printed():
    """About one key in 85 begins with "-" (z85): printed with "=", it is no option."""
    key = "-F+o3vOevK2nSAV[uL5-Tb:hI?3Tn$w5ia38r0n("
    args = build_parser().parse_args(shlex.split(join_command(key))[1:])
    assert (args.command, args.hub_key) == ("join", key)
    with pytest.raises(SystemExit):  # the form it was printed in before
        build_parser().parse_args(["join", "--hub-key", key])


def test_a_node_joins_is_accepted_and_removed_without_a_file_copied(site, tmp_path):
    hub = site.hub.config
    own_keys = tmp_path / "node4-keys"  # nothing of the cluster's in it
    root = site.hub.directory.parent
    node4 = Node(root, "node4", site.ports, {"jails": no_sync_action}, keys_dir=own_keys)
    # The command `nodes pending` prints, as a new node's operator pastes it.
    said = ok(hub, "nodes", "pending").rsplit("A new node asks with: ", 1)[1].strip()
    assert said == join_command(load_public(site.keys_dir / "hub.key").decode())
    out = ok(node4.config, *shlex.split(said)[1:])
    printed = out.split("key ", 1)[1].split()[0]
    assert "pending" in out and printed.startswith("SHA256:")
    node4.start()
    try:
        pending = json.loads(ok(hub, "nodes", "pending", "--json"))
        assert [(p["node"], p["fingerprint"]) for p in pending] == [("node4", printed)]
        assert node4.fail2ban.banned("cluster") == []

        assert f"Accepted node node4, key {printed}" in ok(hub, "nodes", "accept", "node4")
        assert (site.keys_dir / "nodes" / "node4.key").exists()
        assert wait_until(lambda: "198.51.100.21" in node4.fail2ban.banned("cluster"), 30)
        node4.fail2ban.attack("192.0.2.44")
        assert wait_until(lambda: "192.0.2.44" in banned(site, "node2", "cluster"), 30)

        def listed() -> dict:
            rows = {row["node"]: row for row in json.loads(ok(hub, "nodes", "--json"))}
            return rows

        # Each subscriber says where it stands every 2 s: the lag catches up by then.
        assert wait_until(lambda: listed()["node4"]["lag"] == 0, 15, 0.5)
        row = listed()["node4"]
        assert row["monitor"] and row["subscriber"] and row["synced"]
        assert row["fingerprint"] == printed and row["version"] and row["last_report"]
        assert all(listed()[name]["synced"] for name in site.nodes)

        assert "Removed node node4" in ok(hub, "nodes", "remove", "node4")
        assert not (site.keys_dir / "nodes" / "node4.key").exists()
        node4.fail2ban.attack("192.0.2.45")
        node4.fail2ban.wait_banned("sshd", "192.0.2.45")
        time.sleep(2)
        assert "192.0.2.45" not in banned(site, "node2", "cluster")
        assert all(row["node"] != "node4" for row in json.loads(ok(hub, "nodes", "--json")))
        # Its daemons knock with the removed key: refused, and listed so.
        refused = f"{printed}  node4"
        assert wait_until(lambda: refused in ok(hub, "nodes", "pending"), 15, 0.5)
    finally:
        node4.stop()


def test_the_allowlist_changes_without_a_restart(site):
    hub = site.hub.config
    pid = site.hub.publisher.process.pid
    ok(hub, "allowlist", "add", "203.0.113.0/24", "--reason", "the office")
    assert "203.0.113.0/24  operator alice" in ok(hub, "allowlist")
    node1 = site["node1"].fail2ban
    node1.attack("203.0.113.5")
    node1.wait_banned("sshd", "203.0.113.5")
    refused = "203.0.113.5 is in the hub's allowlist"
    assert wait_until(lambda: refused in site.hub.log_text(), 15)
    assert "203.0.113.5" not in banned(site, "node2", "cluster")

    ok(hub, "allowlist", "remove", "203.0.113.0/24")
    node1.attack("203.0.113.6")
    assert wait_until(lambda: "203.0.113.6" in banned(site, "node2", "cluster"), 20)
    assert site.hub.publisher.process.pid == pid and site.hub.publisher.alive()
    assert "allowlist add 203.0.113.0/24 (the office)" in ok(hub, "history")


def test_a_node_key_cannot_use_the_admin_channel(site):
    node1 = NodeClient(site.ports, site.keys_dir, "node1")
    try:
        node1.reports.send_multipart(protocol.encode_admin("unban", ip="192.0.2.21"))
        assert protocol.decode_result(node1.reports.recv_multipart()) == {
            "error": "only an admin key (keys_dir/admins/ on the hub) may use the admin channel"
        }
    finally:
        node1.close()


@pytest.mark.parametrize(
    "args, code, error",
    [
        (["ban", "not-an-address"], 2, "ip 'not-an-address' is not an address"),
        (["ban", "10.0.0.0/8"], 2, "network 10.0.0.0/8 is wider than the allowed /24"),
        (["ban", "192.0.2.9", "--jail", "nosuch"], 1, "unknown jail 'nosuch'"),
        (["ban", "192.0.2.9", "--bantime", "soon"], 2, "--bantime: 'soon' is not a time"),
        (["ban", "127.0.0.1"], 1, "127.0.0.1 is in the hub's allowlist"),
        (["unban", "192.0.2.9", "--jail", "nosuch"], 1, "unknown jail 'nosuch'"),
        (["import", "/nonexistent"], 2, "/nonexistent: No such file or directory"),
        (["nodes", "accept", "node9"], 1, "no node node9 asks to join"),
        (["nodes", "remove"], 2, "nodes remove needs a NAME"),
        (["allowlist", "remove", "127.0.0.0/8"], 1, "change it there"),
        (["--admin", "bob", "bans"], 1, "no admin key"),
        (["--hub", "127.0.0.9", "--timeout", "0.5", "bans"], 1, "no hub answered within 0.5 s"),
    ],
)
def test_every_mistake_is_one_line_and_an_exit_code(site, args, code, error):
    done = console(site.hub.config, *args)
    assert done.returncode == code, (done.stdout, done.stderr)
    assert done.stderr.count("\n") == 1 and error in done.stderr, done.stderr
    assert done.stderr.startswith("fail2ban-cluster: ")


def test_decisions_reach_the_other_hub_even_one_that_lost_its_state(tmp_path):
    keys = make_keys(tmp_path / "keys", ["node1"])
    keygen(ADMIN, keys / "admins")
    ports = free_ports(3)
    sections = {"general": {"hubs": "127.0.0.1 127.0.0.2"}, "console": {"admin": ADMIN}}
    hubs = [
        Hub(tmp_path, ports, name, address, keys, **sections)
        for name, address in (("hub1", "127.0.0.1"), ("hub2", "127.0.0.2"))
    ]
    first, second = hubs

    def on(hub: Hub, *args: str) -> str:
        return ok(hub.config, "--hub", hub.address, *args)

    def bans(hub: Hub) -> set[str]:
        return {ban["ip"] for ban in json.loads(on(hub, "bans", "--json"))}

    def refuses_held(hub: Hub) -> bool:
        node1 = NodeClient(ports, keys, "node1", address=hub.address)
        try:
            event = BanEvent.new("node1", "sshd", "ban", "192.0.2.32", bantime=600)
            kind, body = node1.report(event.encode())
        finally:
            node1.close()
        return kind == protocol.NAK and "held by operator alice" in body["reason"]

    for hub in hubs:
        hub.publisher.start()
    try:
        assert wait_until(lambda: all(hub.publisher.ready() for hub in hubs), 15)
        on(first, "ban", "192.0.2.31", "--reason", "seen on hub1")
        on(first, "unban", "192.0.2.32", "--hold", "1h")
        on(first, "allowlist", "add", "203.0.113.0/24")
        assert wait_until(lambda: bans(second) == {"192.0.2.31"}, 10, 0.3)
        # The ban may come first in the peer's table (a young hub takes it), the decision
        # that says who and why with the peer's log of decisions.
        assert wait_until(lambda: "alice (operator: seen on hub1)" in on(second, "bans"), 10, 0.3)
        assert "203.0.113.0/24  operator alice" in on(second, "allowlist")
        assert refuses_held(second)

        # Made while the second hub is away, which then comes back without its state.
        second.publisher.stop()
        on(first, "ban", "192.0.2.33")
        shutil.rmtree(second.directory / "state")
        second.publisher.start()
        assert wait_until(second.publisher.ready, 15)
        assert wait_until(lambda: bans(second) == {"192.0.2.31", "192.0.2.33"}, 15, 0.3)
        assert "203.0.113.0/24  operator alice" in on(second, "allowlist")
        assert refuses_held(second)
        history = on(second, "history")
        assert [line.split(None, 3)[3] for line in history.splitlines()[1:]] == [
            "ban 192.0.2.31 in cluster for 600 s (seen on hub1)",
            "unban 192.0.2.32 in every jail, held 3600 s",
            "allowlist add 203.0.113.0/24",
            "ban 192.0.2.33 in cluster for 600 s",
        ]
    finally:
        for hub in hubs:
            hub.publisher.stop()
