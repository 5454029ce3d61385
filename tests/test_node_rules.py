"""What a node never bans, whatever its hubs relay: bans past its own network limits,
its allowlist, the special-purpose ranges, its hubs' addresses and what its fail2ban's
jails ignore. A real hub takes node1's reports (sent by hand); node2 runs a real
fail2ban-server and a real subscriber at the shipped defaults."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

from f2bzmq import protocol
from f2bzmq.control import ask
from f2bzmq.lab import Node, free_ports, make_keys, wait_until
from f2bzmq.protocol import BanEvent, NetworkLimits
from tests.support.hub import running_hub
from tests.support.nodeclient import NodeClient

HUB_LIMITS = NetworkLimits(True, 16, 32)  # a hub more lenient than the nodes' default /24


def ban(ip: str) -> BanEvent:
    return BanEvent.new("node1", "sshd", "ban", ip, bantime=600, networks=HUB_LIMITS)


@contextlib.contextmanager
def node2(root: Path, ports: list[int], keys: Path, **sections: dict) -> Iterator[Node]:
    """node2's fail2ban-server and subscriber, once the subscriber has a snapshot."""
    node = Node(root, "node2", ports, keys_dir=keys, **sections)
    node.fail2ban.start()
    try:
        node.subscriber.start()
        assert wait_until(node.subscriber.ready, 20), node.log_text("subscriber")
        yield node
    finally:
        node.subscriber.stop()
        node.fail2ban.stop()


def report(peer: NodeClient, *events: BanEvent) -> None:
    """One report of these events; every one stored by the hub."""
    peer.reports.send_multipart(
        [protocol.PROTOCOL, protocol.EVENT, *(event.encode() for event in events)]
    )
    _, kind, *bodies = peer.reports.recv_multipart()
    assert kind == protocol.ACK and len(bodies) == len(events), bodies
    assert all(json.loads(body)["outcome"] == "banned" for body in bodies)


def test_a_ban_past_the_nodes_network_limit_costs_it_no_other_ban(tmp_path: Path) -> None:
    """The hub takes /16s, node2 only up to /24: in a snapshot part and in an update
    beside other bans, node2 refuses the /16 alone, once in its log per origin and minute."""
    keys = make_keys(tmp_path / "keys", ["node1", "node2"])
    ports = free_ports(3)
    with running_hub(tmp_path, keys, ports, general={"min_prefix_v4": "16"}) as hub:
        peer = NodeClient(hub.ports, keys)
        try:
            report(peer, ban("10.20.0.0/16"), ban("192.0.2.5"))  # one snapshot part
            with node2(tmp_path, ports, keys) as node:
                node.fail2ban.wait_banned("cluster", "192.0.2.5")
                report(peer, ban("10.30.0.0/16"), ban("192.0.2.6"))  # one update message
                node.fail2ban.wait_banned("cluster", "192.0.2.6")
                assert sorted(node.fail2ban.banned("cluster")) == ["192.0.2.5", "192.0.2.6"]
                status = ask(node.subscriber.control_socket())
                assert [hub["synced"] for hub in status["Hubs"].values()] == [True]
                assert status["Snapshots received"] == 1  # no gap: sequence numbers stay whole
                assert status["Messages refused"] == 0
                log = node.log_text("subscriber")
        finally:
            peer.close()
    refused = [line for line in log.splitlines() if " refused [sshd] Ban " in line]
    assert len(refused) == 1, refused
    assert refused[0].endswith(
        "refused [sshd] Ban 10.20.0.0/16 from node1: wider than this node's limit of /24"
    )
