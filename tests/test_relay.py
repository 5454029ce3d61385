"""The relay with real daemons: a hub, a relay, and nodes with real fail2ban-servers whose
subscribers follow the relay. What it forwards is the hub's own bytes, what it hands out
the hub's table; its nodes converge after the hub restarts (and after it lost its
state), after the relay restarts, and after a gap; an operator's unban and hold reach
them as they reach the hub's own nodes; and nobody gets past it without a key it admits."""

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
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from f2bzmq import protocol
from f2bzmq.config import ConfigError, config_from
from f2bzmq.control import ask
from f2bzmq.keys import keygen
from f2bzmq.lab import Node, free_ports, make_keys, run_command, wait_until
from f2bzmq.protocol import BanEvent
from tests.support.console import ok
from tests.support.hub import running_hub
from tests.support.nodeclient import NodeClient
from tests.support.relay import LabRelay

SILENCE = 3000  # ms a shut-out client waits to prove it hears nothing
TIMEOUT = "3"  # heartbeat timeout of the relay and of the nodes (the lab's)


def ban(ip: str, node: str = "node1") -> BanEvent:
    return BanEvent.new(node, "sshd", "ban", ip, bantime=600)


@pytest.fixture
def keys(tmp_path):
    """The hub's key pair, node1's, node2's and relay1's, all three in the hub's nodes/."""
    return make_keys(tmp_path / "keys", ["node1", "node2", "relay1"])


@pytest.fixture
def relay(tmp_path, keys, hub) -> Iterator[LabRelay]:
    """relay1 on 127.0.0.11, following the hub and admitting node2 only."""
    relay = LabRelay(tmp_path, hub.ports, keys, ["node2"], relay={"heartbeat_timeout": TIMEOUT})
    try:
        relay.start()
        yield relay
    finally:
        relay.process.stop()


@contextlib.contextmanager
def region(tmp_path, keys, hub, relay, node2: dict | None = None) -> Iterator[dict[str, Node]]:
    """node1 following the hub, node2 following the relay (with `node2` settings of its
    subscriber), each with fail2ban, a monitor and a subscriber, all ready."""
    nodes = {
        "node1": Node(tmp_path, "node1", hub.ports, keys_dir=keys),
        "node2": Node(
            tmp_path,
            "node2",
            hub.ports,
            keys_dir=keys,
            subscriber={"follow": relay.address, **(node2 or {})},
        ),
    }
    try:
        for node in nodes.values():
            node.start()
        daemons = [role for node in nodes.values() for role in (node.monitor, node.subscriber)]
        assert wait_until(lambda: all(d.ready() for d in daemons), 30, 0.1), relay.log()
        yield nodes
    finally:
        for node in nodes.values():
            node.stop()


def following(node: Node) -> dict:
    """What node's subscriber says of the one stream it follows (the relay's)."""
    (link,) = ask(node.subscriber.control_socket())["Hubs"].values()
    return link


def served(relay: LabRelay) -> int:
    return relay.status()["Snapshots served"]


def test_config_follow_keys():
    config = config_from({"general": {"hubs": "10.0.0.5 10.0.0.6"}})
    assert config.followed() == ["10.0.0.5", "10.0.0.6"] and config.relayed() == "10.0.0.5"
    config = config_from(
        {
            "general": {"hubs": "10.0.0.5 10.0.0.6"},
            "subscriber": {"follow": "10.1.0.7, 10.1.0.8"},
            "relay": {"follow": "10.0.0.6", "bind": "10.1.0.7"},
        }
    )
    assert config.followed() == ["10.1.0.7", "10.1.0.8"] and config.relayed() == "10.0.0.6"
    assert config.endpoints("snapshot_port", config.followed())[0] == "tcp://10.1.0.7:5692"
    assert config.relay_binds("publish_port") == ["tcp://10.1.0.7:5691"]
    for section, value, error in (
        ("relay", "10.0.0.5 10.0.0.6", "names one hub or relay to follow, not several"),
        ("subscriber", "*", "'*' is not a host to follow"),
    ):
        with pytest.raises(ConfigError, match=re.escape(f"[{section}] follow: {error}")):
            config_from({section: {"follow": value}})


def next_messages(client: NodeClient, count: int) -> list[list[bytes]]:
    """The next `count` messages from the first update on, as bytes."""
    messages: list[list[bytes]] = []
    for _ in range(100):
        frames = client.updates.recv_multipart()
        if messages or frames[1] == protocol.UPDATE:
            messages.append(frames)
        if len(messages) == count:
            return messages
    raise AssertionError("no update came")


def test_the_relay_forwards_the_hubs_bytes_and_hands_out_its_table(hub, keys, relay):
    direct = NodeClient(hub.ports, keys, "node1")
    relayed = NodeClient(hub.ports, keys, "node2", address=relay.address)
    try:
        for client in (direct, relayed):
            client.updates.setsockopt(zmq.SUBSCRIBE, protocol.PACKED)  # both streams
            # Both subscriptions are in place once a heartbeat of each stream came.
            heard = set()
            while heard != {protocol.PROTOCOL, protocol.PACKED}:
                frames = client.updates.recv_multipart()
                assert frames[1] == protocol.HUGZ
                heard.add(frames[0])
        assert direct.report(ban("192.0.2.1").encode())[0] == protocol.ACK
        # The update in both streams and the heartbeats after it: the same bytes, in order.
        expected = next_messages(direct, 4)
        assert next_messages(relayed, 4) == expected
        assert {frames[0] for frames in expected} == {protocol.PROTOCOL, protocol.PACKED}
        direct.report(ban("192.0.2.2").encode(), ban("192.0.2.3").encode())
        direct.report(BanEvent.new("node1", "sshd", "unban", "192.0.2.2").encode())
        # The hub is young (a new state that no node has rebuilt yet): so is the answer.
        header, events = direct.snapshot()
        young = {"part": 0, "last": True, "young": True}
        # Both say that they take their subscribers' presence (for the operators' holds);
        # the hub also takes what relays pass on of theirs, a relay does not.
        assert header == {
            "publisher": header["publisher"],
            "seq": 4,
            **young,
            "presence": True,
            "relayed": True,
        }
        del header["relayed"]
        assert wait_until(lambda: relayed.snapshot()[0] == header, 5, 0.05)
        assert sorted(e.ip for e in relayed.snapshot()[1]) == sorted(e.ip for e in events)
        assert relay.status()["Frames forwarded"] > 0
    finally:
        direct.close()
        relayed.close()


def test_a_node_behind_a_relay_converges_after_the_hub_restarts(tmp_path, keys, hub, relay):
    with region(tmp_path, keys, hub, relay) as nodes:
        node1, node2 = nodes["node1"], nodes["node2"]
        node1.fail2ban.attack("192.0.2.1")
        node2.fail2ban.wait_banned("cluster", "192.0.2.1")
        before = served(relay)
        hub.publisher.stop()
        node1.fail2ban.attack("192.0.2.2")  # waits in node1's outbox
        # The relay forwards the hub's silence: node2 sees it, and asks the relay.
        assert wait_until(lambda: not following(node2)["synced"], 15, 0.1)
        assert wait_until(lambda: not relay.whole(), 5, 0.1)
        hub.publisher.start()
        node2.fail2ban.wait_banned("cluster", "192.0.2.2")
        assert wait_until(lambda: following(node2)["synced"], 15, 0.1)
        assert "192.0.2.1" in node2.fail2ban.banned("cluster")
        assert served(relay) > before  # node2's snapshot came from the relay
        assert relay.status()["Snapshots received"] >= 2

        # The hub's state lost: young until every node whose key it holds has rebuilt it,
        # the relay among them (it has no bans to report, and says so).
        hub.publisher.stop()
        shutil.rmtree(hub.directory / "state")
        hub.publisher.start()

        def rebuilt() -> bool:
            return ask(hub.publisher.control_socket())["State"] == "rebuilt"

        assert wait_until(hub.publisher.ready, 15, 0.1)
        assert wait_until(rebuilt, 20, 0.2), hub.log_text()[-3000:]
        assert wait_until(lambda: following(node2)["synced"], 15, 0.1)
        assert sorted(node2.fail2ban.banned("cluster")) == ["192.0.2.1", "192.0.2.2"]


def test_a_node_behind_a_relay_converges_after_the_relay_restarts(tmp_path, keys, hub, relay):
    with region(tmp_path, keys, hub, relay) as nodes:
        node1, node2 = nodes["node1"], nodes["node2"]
        node1.fail2ban.attack("192.0.2.1")
        node2.fail2ban.wait_banned("cluster", "192.0.2.1")
        relay.process.stop()
        node1.fail2ban.attack("192.0.2.2")
        node1.fail2ban.wait_banned("sshd", "192.0.2.2")
        run_command(
            "fail2ban-client",
            "-s",
            str(node1.fail2ban.socket),
            "set",
            "sshd",
            "unbanip",
            "192.0.2.1",
        )
        assert wait_until(lambda: not following(node2)["synced"], 15, 0.1)
        relay.start()
        node2.fail2ban.wait_banned("cluster", "192.0.2.2")
        node2.fail2ban.wait_banned("cluster", "192.0.2.1", present=False)
        assert wait_until(lambda: following(node2)["synced"], 15, 0.1)
        assert served(relay) >= 1


def test_a_node_behind_a_relay_converges_after_a_gap(tmp_path, keys, hub, relay):
    """The relay is away for less than node2's heartbeat timeout: node2 sees no silence,
    only the sequence numbers it missed, and takes the relay's snapshot."""
    with region(tmp_path, keys, hub, relay, node2={"heartbeat_timeout": "60"}) as nodes:
        node2 = nodes["node2"]
        reporter = NodeClient(hub.ports, keys, "node1")
        try:
            assert reporter.report(ban("192.0.2.1").encode())[0] == protocol.ACK
            node2.fail2ban.wait_banned("cluster", "192.0.2.1")
            relay.process.stop()
            assert reporter.report(ban("192.0.2.2").encode())[0] == protocol.ACK
            relay.start()
            assert reporter.report(ban("192.0.2.3").encode())[0] == protocol.ACK
            node2.fail2ban.wait_banned("cluster", "192.0.2.2")
            node2.fail2ban.wait_banned("cluster", "192.0.2.3")
            assert served(relay) >= 1
        finally:
            reporter.close()


def test_an_operators_unban_and_hold_reach_a_node_behind_a_relay(tmp_path):
    """node2's own sshd jail bans an address (the cluster has it from node2's monitor); an
    operator lifts it with a hold. node2's subscriber follows the relay, and hears the
    hub's holds from it: the ban goes from node2's own jail and its fail2ban ignores the
    address until the hold ends, as on a node that follows the hub."""
    keys = make_keys(tmp_path / "keys", ["node1", "node2", "relay1"])
    keygen("alice", keys / "admins")  # an operator, admitted at the first request
    attacker = "192.0.2.41"
    sections = {"console": {"admin": "alice"}, "publisher": {"relays": "relay1"}}
    with running_hub(tmp_path, keys, **sections) as hub:
        relay = LabRelay(tmp_path, hub.ports, keys, ["node2"], relay={"heartbeat_timeout": TIMEOUT})
        try:
            relay.start()
            with region(tmp_path, keys, hub, relay) as nodes:
                node1, node2 = nodes["node1"].fail2ban, nodes["node2"].fail2ban
                node2.attack(attacker)
                banned_here = wait_until(lambda: attacker in node2.banned("sshd"), 20)
                assert banned_here, node2.log.read_text()
                assert wait_until(lambda: attacker in node1.banned("cluster"), 10), hub.log_text()
                out = ok(hub.config, "unban", attacker, "--hold", "1h", "--reason", "ours")
                assert "Lifted 192.0.2.41 in sshd" in out

                def held() -> bool:
                    with node2.client() as client:
                        return attacker in client.ignored("sshd")

                assert wait_until(lambda: attacker not in node2.banned("sshd"), 10), relay.log()
                assert wait_until(held, 10), nodes["node2"].log_text("subscriber")
                assert attacker not in node1.banned("cluster")
                assert relay.status()["Operators' holds"] == 1
                assert relay.status()["Subscribers heard"] == 1
                # Pushed by the hub and on by the relay as the hold came, not at a presence.
                assert "the hub's holds changed: 1, to 1 subscribers" in relay.log_text()
                # The hub lists the relay as one; it applies no ban of its own.
                listed = json.loads(ok(hub.config, "nodes", "--json"))
                rows = {row["node"]: row for row in listed}
                assert rows["relay1"]["relay"] and rows["relay1"]["synced"], rows
                assert not rows["node1"]["relay"] and rows["node1"]["via"] is None
                # node2's subscriber, as the relay tells of it.
                assert (rows["node2"]["via"], rows["node2"]["synced"]) == ("relay1", True), rows
                assert "via relay1" in ok(hub.config, "nodes")
                # The hold ends: node2's fail2ban has its own say again.
                ok(hub.config, "unban", attacker, "--hold", "0")
                assert wait_until(lambda: not held(), 10), nodes["node2"].log_text("subscriber")
        finally:
            relay.process.stop()


@pytest.mark.parametrize(
    "who", ["no key", "unknown key", "a key only the hub admits", "wrong relay key"]
)
def test_strangers_can_neither_listen_to_a_relay_nor_reach_the_hub_through_it(
    hub, keys, relay, tmp_path, who
):
    node, folder, server = "node2", keys, keys / "hub.key"
    if who == "no key":
        folder = None
    elif who == "unknown key":
        folder = tmp_path / "stranger"
        keygen("node2", folder)  # node2's name, not its key
    elif who == "a key only the hub admits":
        node = "node1"
    else:
        fake = tmp_path / "fake"
        keygen("hub", fake)
        server = fake / "hub.key"
    stranger = NodeClient(hub.ports, folder, node, address=relay.address, hub_key=server)
    witness = NodeClient(hub.ports, keys, "node2", address=relay.address)
    snapshots = stranger.secure(stranger.context.socket(zmq.DEALER))
    snapshots.linger = 0
    snapshots.sndtimeo = SILENCE
    snapshots.connect(stranger.snapshots_endpoint)
    try:
        assert witness.updates.recv_multipart()[1] == protocol.HUGZ
        with contextlib.suppress(zmq.Again):  # a refused handshake leaves nothing to queue on
            snapshots.send_multipart(protocol.encode_snapshot_request())
            # A report sent where the relay listens goes nowhere either.
            report = ban("192.0.2.9", node)
            snapshots.send_multipart([protocol.PROTOCOL, protocol.EVENT, report.encode()])
        heard = zmq.Poller()
        heard.register(stranger.updates, zmq.POLLIN)
        heard.register(snapshots, zmq.POLLIN)
        assert heard.poll(SILENCE) == []  # no update, no heartbeat, no snapshot
        assert witness.snapshot()[0]["seq"] == 0
        assert relay.status()["Snapshots served"] == 1  # the witness's
    finally:
        stranger.close()
        witness.close()


def test_nothing_a_node_sends_a_relay_goes_to_the_hub(hub, keys, relay):
    """The relay's PUB takes no message from its nodes, and its ROUTER answers snapshot
    requests and takes presences only: a report, subscriptions, junk or a presence in
    another's name from an admitted node stop there."""
    node2 = NodeClient(hub.ports, keys, "node2", address=relay.address)
    try:
        junk = node2.context.socket(zmq.XSUB)
        node2.secure(junk).connect(f"tcp://{relay.address}:{hub.ports[1]}")
        junk.send(b"\x01" + b"x" * 1000)  # a subscription the hub never sees
        junk.send(b"not a subscription")
        dealer = node2.secure(node2.context.socket(zmq.DEALER))
        dealer.rcvtimeo = SILENCE
        dealer.connect(node2.snapshots_endpoint)
        dealer.send_multipart(
            [protocol.PROTOCOL, protocol.EVENT, ban("192.0.2.9", "node2").encode()]
        )
        with pytest.raises(zmq.Again):
            dealer.recv_multipart()
        assert node2.snapshot()[0]["seq"] == 0
        assert relay.status()["Messages refused"] == 1
        # A presence goes on in the name of the key that sent it, never in another's.
        fake = protocol.Presence(None, 0, True, None, (), "", node="node1")
        dealer.send_multipart(protocol.encode_presence(fake))
        assert wait_until(lambda: relay.status()["Messages refused"] == 2, 5, 0.05)
        # Its own presence goes on, and a hub whose [publisher] relays does not name the
        # relay takes no word of it; nor does it from a node that speaks for another.
        own = protocol.Presence(None, 0, False, None, (), "")
        dealer.send_multipart(protocol.encode_presence(own))
        direct = NodeClient(hub.ports, keys, "node1")
        try:
            speaker = direct.secure(direct.context.socket(zmq.DEALER))
            speaker.connect(direct.snapshots_endpoint)
            speaker.send_multipart(protocol.encode_presence(fake))
            assert direct.snapshot()[0]["seq"] == 0
            said = [f"ignoring where {name} says the nodes" for name in ("relay1", "node1")]
            assert wait_until(lambda: all(s in hub.log_text() for s in said), 10), hub.log_text()
        finally:
            direct.close()
    finally:
        node2.close()


def test_a_key_withdrawn_from_a_relay_is_shut_out_on_sighup(hub, keys, relay):
    node2 = NodeClient(hub.ports, keys, "node2", address=relay.address)
    node2.updates.rcvtimeo = SILENCE
    try:
        assert node2.updates.recv_multipart()[1] == protocol.HUGZ
        (relay.keys_dir / "nodes" / "node2.key").unlink()
        relay.process.process.send_signal(signal.SIGHUP)
        assert wait_until(lambda: "keys withdrawn for node2" in relay.log_text(), 15, 0.05)
        with pytest.raises(zmq.Again):
            for _ in range(100):  # what was queued before the cut, then nothing
                node2.updates.recv_multipart()
        assert relay.status()["Copy"] == "whole"
    finally:
        node2.close()


def test_a_relay_the_hub_does_not_know_gets_nothing(tmp_path, hub, keys):
    keygen("relay2", keys)  # a key pair, but not in the hub's nodes/
    relay = LabRelay(
        tmp_path, hub.ports, keys, ["node2"], name="relay2", relay={"heartbeat_timeout": TIMEOUT}
    )
    relay.process.start()
    node2 = NodeClient(hub.ports, keys, "node2", address=relay.address)
    node2.updates.rcvtimeo = SILENCE
    try:
        assert wait_until(lambda: relay.process.ready(), 15, 0.1)
        with pytest.raises(zmq.Again):
            node2.updates.recv_multipart()
        assert not relay.whole()
        assert relay.status()["Snapshots received"] == 0
    finally:
        node2.close()
        relay.process.stop()


def test_status_and_metrics_like_the_other_roles(tmp_path, hub, keys):
    pytest.importorskip("prometheus_client")
    (port,) = free_ports(1)
    relay = LabRelay(tmp_path, hub.ports, keys, ["node2"], relay={"metrics": str(port)})
    try:
        relay.start()
        script = str(Path(__file__).resolve().parent.parent / "fail2ban-relay.py")
        done = subprocess.run(
            [sys.executable, script, "-c", str(relay.config), "status"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        lines = done.stdout.splitlines()
        assert lines[0].startswith("Status of fail2ban-relay (pid ")
        assert "|- Copy: whole" in lines and "`- Health: OK" in lines
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
            scraped = answer.read().decode().splitlines()
        for line in ('f2bzmq_up{role="relay"} 1.0', "f2bzmq_relay_synced 1.0"):
            assert line in scraped
    finally:
        relay.process.stop()


def test_an_idle_relay_waits_in_its_poll(relay):
    """Its sockets' handshake monitors are read: an unread one stays readable, and the
    relay's loop would spin on a core instead of waiting for the next message."""
    pid = relay.process.process.pid

    def cpu_seconds() -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    before = cpu_seconds()
    time.sleep(3)
    # Heartbeats and a few wake-ups a second: hundredths of a second. A spinning loop
    # takes all three.
    assert cpu_seconds() - before < 0.5
