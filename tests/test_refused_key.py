"""A node whose key the hub refuses (not yet added, or withdrawn) keeps running, says so in
`status` and its log with its public key, answers `stop`, and recovers by itself once the
hub takes its key: a real hub and node2's real fail2ban, monitor and subscriber."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import zmq

from f2bzmq.control import ControlError, ask
from f2bzmq.handshake import ACCEPTED, FAILED, REFUSED, UNKNOWN, KeyCheck
from f2bzmq.keys import load_public
from f2bzmq.lab import Node, RoleProcess, free_ports, make_keys, wait_until
from f2bzmq.protocol import BanEvent
from tests.support.hub import running_hub
from tests.support.nodeclient import NodeClient

HEARTBEAT_TIMEOUT = 3.0  # the lab's [subscriber] heartbeat_timeout


def status_of(daemon: RoleProcess) -> dict | None:
    try:
        return ask(daemon.control_socket(), timeout=2)
    except ControlError:
        return None


def says(daemon: RoleProcess, text: str | None) -> bool:
    """The daemon answers `status`, with `text` in a problem (None: with no problem)."""
    status = status_of(daemon)
    if status is None:
        return False
    if text is None:
        return not status["problems"]
    return any(text in problem for problem in status["problems"])


def test_a_node_whose_key_is_refused_says_so_and_recovers_by_itself(tmp_path: Path) -> None:
    keys = make_keys(tmp_path / "keys", ["node1", "node2"])
    installed, withheld = keys / "nodes" / "node2.key", tmp_path / "node2.key"
    installed.rename(withheld)
    public = load_public(withheld).decode()
    refused = f"the hub refuses this node's key {public}"
    # The report port lets an unknown key in, as a node asking to join (`nodes accept`).
    pending = f"the hub does not accept this node's key {public} yet"
    waiting = {"monitor": pending, "subscriber": refused}
    ports = free_ports(3)
    with running_hub(tmp_path, keys, ports) as hub:
        node = Node(tmp_path, "node2", ports, keys_dir=keys)
        daemons = (node.monitor, node.subscriber)
        peer = NodeClient(hub.ports, keys, "node1")
        try:
            node.start()
            assert wait_until(lambda: all(says(d, waiting[d.role]) for d in daemons), 20)
            assert refused in node.log_text("subscriber")
            assert "does not accept this node's key yet" in node.log_text("monitor")
            node.fail2ban.attack("192.0.2.7")  # node2's own ban waits in its outbox

            installed.write_bytes(withheld.read_bytes())
            hub.publisher.process.send_signal(signal.SIGHUP)
            peer.report(BanEvent.new("node1", "sshd", "ban", "198.51.100.7").encode())
            node.fail2ban.wait_banned("cluster", "198.51.100.7", timeout=40)
            assert wait_until(lambda: "192.0.2.7" in {e.ip for e in peer.snapshot()[1]}, 40)
            assert wait_until(lambda: all(says(d, None) for d in daemons), 10)

            installed.unlink()  # withdrawn while the node runs
            hub.publisher.process.send_signal(signal.SIGHUP)
            assert wait_until(lambda: all(says(d, waiting[d.role]) for d in daemons), 20)
            time.sleep(HEARTBEAT_TIMEOUT + 2)  # the subscriber's silence: a snapshot request
            assert all(says(d, waiting[d.role]) for d in daemons)
            for daemon in daemons:
                assert daemon.stop(timeout=5) == 0
        finally:
            peer.close()
            node.stop()


def test_the_hubs_answer_changes_once_per_change_of_mind() -> None:
    """Events of both sockets to a hub, in order: each change is said once."""
    check = KeyCheck()
    assert check.state == UNKNOWN
    steps = [
        (zmq.EVENT_CONNECTED, None),
        (zmq.EVENT_HANDSHAKE_FAILED_AUTH, REFUSED),
        (zmq.EVENT_DISCONNECTED, None),
        (zmq.EVENT_HANDSHAKE_FAILED_AUTH, None),  # the other socket: nothing new
        (zmq.EVENT_HANDSHAKE_SUCCEEDED, ACCEPTED),
        (zmq.EVENT_HANDSHAKE_SUCCEEDED, None),
        (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, FAILED),  # a wrong hub.key
        (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, None),
    ]
    assert [check.on_event(event) for event, _ in steps] == [said for _, said in steps]
