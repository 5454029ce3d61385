"""Who may talk to the hub, and what it refuses: keys, spoofing, allowlist, rate limit, SIGHUP."""

import contextlib
import os
import signal
import stat

import pytest
import zmq

from f2bzmq import protocol
from f2bzmq.keys import KeyFileError, keygen, load_secret
from f2bzmq.lab import Cluster, Hub, free_ports, wait_until
from f2bzmq.protocol import BanEvent
from tests.support.hub import start_hub
from tests.support.nodeclient import NodeClient

SILENCE = 3000  # ms a shut-out client waits to prove it hears nothing


def ban(ip="198.51.100.10", node="node1", jail="sshd"):
    return BanEvent.new(node, jail, "ban", ip, bantime=600)


def client(hub, keys, node="node1", **options) -> NodeClient:
    peer = NodeClient(hub.ports, keys, node, **options)
    for sock in (peer.reports, peer.updates):
        sock.rcvtimeo = SILENCE
    return peer


def test_keygen_writes_a_secret_only_its_owner_reads(tmp_path):
    public, secret = keygen("web1", tmp_path)
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    assert len(load_secret(secret).secret) == 40
    with pytest.raises(KeyFileError, match="exists already"):
        keygen("web1", tmp_path)
    os.chmod(secret, 0o640)
    with pytest.raises(KeyFileError, match=f"can be read by other users: chmod 600 {secret}"):
        load_secret(secret)


def test_hub_refuses_to_start_with_an_unsafe_or_missing_key(tmp_path, keys):
    os.chmod(keys / "hub.key_secret", 0o644)
    hub = Hub(tmp_path, free_ports(3), keys_dir=keys)
    hub.publisher.start()
    assert hub.publisher.process.wait(15) == 1
    assert "can be read by other users: chmod 600" in hub.publisher.log_text()
    os.remove(keys / "hub.key_secret")
    hub.publisher.start()
    assert hub.publisher.process.wait(15) == 1
    assert "No such file or directory; make one with `f2bzmq keygen`" in hub.publisher.log_text()


def test_an_authorised_node_reports_and_hears(hub, keys):
    peer = client(hub, keys)
    try:
        assert peer.updates.recv_multipart()[1] == protocol.HUGZ
        assert peer.report(ban().encode())[1]["outcome"] == "banned"
        assert peer.next_update()[1].ip == "198.51.100.10"
    finally:
        peer.close()


@pytest.mark.parametrize("who", ["no key", "unknown key", "wrong hub key"])
def test_strangers_can_neither_report_nor_listen(hub, keys, tmp_path, who):
    if who == "no key":
        stranger = client(hub, None)
    elif who == "unknown key":
        stranger_keys = tmp_path / "stranger"
        keygen("node1", stranger_keys)  # a node's name, but not its key
        stranger = client(hub, stranger_keys, hub_key=keys / "hub.key")
    else:
        fake = tmp_path / "fake"
        keygen("hub", fake)
        stranger = client(hub, keys, hub_key=fake / "hub.key")
    witness = client(hub, keys, "node2")
    try:
        assert witness.updates.recv_multipart()[1] == protocol.HUGZ
        # The send itself may time out: the refused handshake left no connection to queue on.
        with contextlib.suppress(zmq.Again):
            stranger.reports.send_multipart([protocol.PROTOCOL, protocol.EVENT, ban().encode()])
        with pytest.raises(zmq.Again):
            stranger.reports.recv_multipart()
        with pytest.raises(zmq.Again):
            stranger.updates.recv_multipart()
        # Nothing reached the table: the witness's snapshot is empty, its stream only heartbeats.
        assert witness.snapshot() == (witness.snapshot()[0], [])
        assert witness.snapshot()[0]["seq"] == 0
    finally:
        stranger.close()
        witness.close()


def test_a_node_cannot_report_in_another_nodes_name(hub, keys):
    peer = client(hub, keys, "node2")
    try:
        kind, body = peer.report(ban(node="node1").encode())
        assert kind == protocol.NAK
        assert body["reason"] == "node 'node1' reported with the key of 'node2'"
    finally:
        peer.close()


def test_a_node_cannot_lift_another_nodes_ban_unless_allowed(tmp_path, keys):
    ports = free_ports(3)
    for allowed, outcome in (("false", "redundant"), ("true", "unbanned")):
        hub = start_hub(tmp_path, keys, ports, publisher={"allow_foreign_unban": allowed})
        node1, node2 = client(hub, keys, "node1"), client(hub, keys, "node2")
        try:
            ip = "198.51.100.11" if allowed == "false" else "198.51.100.12"
            node1.report(ban(ip).encode())
            unban = BanEvent.new("node2", "sshd", "unban", ip)
            assert node2.report(unban.encode())[1]["outcome"] == outcome
        finally:
            node1.close()
            node2.close()
            hub.publisher.stop()


def test_the_hubs_allowlist_is_never_banned(tmp_path, keys):
    hub = start_hub(tmp_path, keys, publisher={"allowlist": "127.0.0.0/8 10.9.0.0/16"})
    peer = client(hub, keys)
    try:
        for ip, reason in (
            ("10.9.1.2", "10.9.1.2 is in the hub's allowlist"),
            ("10.9.1.0/24", "10.9.1.0/24 is in the hub's allowlist"),
            ("127.0.0.1", "127.0.0.1 is in the hub's allowlist"),
        ):
            event = ban(ip)
            assert peer.report(event.encode()) == (
                protocol.NAK,
                {"id": event.id, "reason": reason, "retry": False},
            )
        assert peer.report(ban("10.8.1.2").encode())[1]["outcome"] == "banned"
        assert peer.snapshot()[0]["seq"] == 1
    finally:
        peer.close()
        hub.publisher.stop()


def test_a_flooding_node_is_throttled_and_the_others_are_not(tmp_path, keys):
    hub = start_hub(tmp_path, keys, publisher={"rate_limit": "0.1", "rate_burst": "5"})
    flooder, quiet = client(hub, keys, "node1"), client(hub, keys, "node2")
    try:
        replies = [flooder.report(ban(f"198.51.100.{i}").encode()) for i in range(1, 9)]
        assert [kind for kind, _ in replies] == [protocol.ACK] * 5 + [protocol.NAK] * 3
        assert replies[-1][1]["retry"] is True
        assert replies[-1][1]["reason"] == "rate limit: node node1 sends more than 0.1 events/s"
        quiet_replies = [quiet.report(ban(f"203.0.113.{i}", "node2").encode()) for i in range(5)]
        assert [kind for kind, _ in quiet_replies] == [protocol.ACK] * 5
    finally:
        flooder.close()
        quiet.close()
        hub.publisher.stop()


def test_a_withdrawn_key_is_shut_out_on_sighup(hub, keys):
    node1, node2 = client(hub, keys, "node1"), client(hub, keys, "node2")
    try:
        assert node1.report(ban("198.51.100.1").encode())[0] == protocol.ACK
        os.remove(keys / "nodes" / "node1.key")
        hub.publisher.process.send_signal(signal.SIGHUP)
        assert wait_until(lambda: "keys withdrawn for node1" in hub.log_text(), 15, 0.05)
        node1.reports.send_multipart(
            [protocol.PROTOCOL, protocol.EVENT, ban("198.51.100.2").encode()]
        )
        with pytest.raises(zmq.Again):
            node1.reports.recv_multipart()
        # node2 reconnects by itself and goes on.
        node2.reports.rcvtimeo = 15000
        assert node2.report(ban("198.51.100.3", "node2").encode())[1]["outcome"] == "banned"
        assert sorted(e.ip for e in node2.snapshot()[1]) == ["198.51.100.1", "198.51.100.3"]
    finally:
        node1.close()
        node2.close()


def test_insecure_mode_works_and_warns(tmp_path):
    with Cluster(tmp_path, size=2, general={"insecure": "true"}) as cluster:
        cluster["node1"].fail2ban.attack("198.51.100.7")
        cluster["node2"].fail2ban.wait_banned("cluster", "198.51.100.7")
        for text in (cluster.hub.log_text(), cluster["node2"].log_text("subscriber")):
            assert "insecure = true: plain TCP without encryption or authentication" in text
