"""A stranger or one bad node against a running hub: it must not starve, bloat or split the
cluster. Each test attacks a real publisher on 127.0.0.1 the way the attack was first tried,
at the shipped defaults, and checks the outcome with generous timeouts, never a speed."""

from __future__ import annotations

import shutil
import signal

import pytest
import zmq

from f2bzmq import protocol
from f2bzmq.keys import keygen
from f2bzmq.lab import wait_until
from f2bzmq.protocol import BanEvent
from tests.support.nodeclient import NodeClient

SILENCE = 3000  # ms a cut-off client waits to show it hears nothing


def ban(ip: str, node: str = "node1") -> BanEvent:
    return BanEvent.new(node, "sshd", "ban", ip, bantime=600)


def test_a_replaced_key_is_cut_off_on_sighup(hub, keys, tmp_path):
    """A leaked key stays usable if the hub, told of its replacement, keeps its connection."""
    old = NodeClient(hub.ports, keys, "node1")
    try:
        assert old.updates.recv_multipart()[1] == protocol.HUGZ
        assert old.report(ban("198.51.100.1").encode())[0] == protocol.ACK
        fresh = tmp_path / "fresh"
        keygen("node1", fresh)
        shutil.copy(fresh / "node1.key", keys / "nodes" / "node1.key")
        hub.publisher.process.send_signal(signal.SIGHUP)
        assert wait_until(lambda: "keys withdrawn for node1" in hub.log_text(), 15)
        for sock in (old.reports, old.updates):
            sock.rcvtimeo = SILENCE
        while old.updates.poll(0):
            old.updates.recv_multipart()  # what was sent before the cut
        old.reports.send_multipart(
            [protocol.PROTOCOL, protocol.EVENT, ban("198.51.100.2").encode()]
        )
        with pytest.raises(zmq.Again):
            old.reports.recv_multipart()
        with pytest.raises(zmq.Again):
            old.updates.recv_multipart()
        new = NodeClient(hub.ports, fresh, "node1", hub_key=keys / "hub.key")
        try:
            new.reports.rcvtimeo = 15000
            assert new.report(ban("198.51.100.3").encode())[1]["outcome"] == "banned"
            assert sorted(e.ip for e in new.snapshot()[1]) == ["198.51.100.1", "198.51.100.3"]
        finally:
            new.close()
    finally:
        old.close()
