"""Fixtures shared by the test files: keys, a running hub and a node talking to it, and a
running three-node cluster. A file that needs another kind builds it with tests/support."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from f2bzmq import protocol
from f2bzmq.lab import Cluster, Hub, make_keys
from tests.support.hub import running_hub
from tests.support.nodeclient import NodeClient


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    """The hub's key pair and those of node1 and node2, both authorised."""
    return make_keys(tmp_path / "keys", ["node1", "node2"])


@pytest.fixture
def hub(tmp_path: Path, keys: Path) -> Iterator[Hub]:
    """A running publisher with the lab's settings."""
    with running_hub(tmp_path, keys) as hub:
        yield hub


@pytest.fixture
def peer(hub: Hub) -> Iterator[NodeClient]:
    """node1 as the hub sees it, already on the update stream."""
    peer = NodeClient(hub.ports, hub.keys_dir)
    try:
        # A SUB socket only gets what is published after it has joined: wait for a heartbeat.
        assert peer.updates.recv_multipart()[1] == protocol.HUGZ
        yield peer
    finally:
        peer.close()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A hub and node1..node3, each with fail2ban, a monitor and a subscriber, all ready."""
    with Cluster(tmp_path, size=3) as running:
        yield running


@pytest.fixture
def own_signals() -> Iterator[None]:
    """A reactor built in the test process takes SIGTERM, SIGINT, SIGHUP and the signal
    wake-up fd for its loop: give them back to pytest afterwards."""
    numbers = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    handlers = {number: signal.getsignal(number) for number in numbers}
    wakeup_fd = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(wakeup_fd)
    yield
    signal.set_wakeup_fd(wakeup_fd)
    for number, handler in handlers.items():
        signal.signal(number, handler)
