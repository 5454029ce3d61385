"""A hub on its own, started for a test that talks to it directly."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from f2bzmq.lab import Hub, free_ports, wait_until


def start_hub(root: Path, keys: Path, ports: list[int] | None = None, **sections: dict) -> Hub:
    """A publisher in root/hub, with the lab's settings and `sections` over them, once it
    answers on its control socket; the caller stops it. `hub.ports` are its three ports."""
    hub = Hub(root, ports or free_ports(3), keys_dir=keys, **sections)
    hub.publisher.start()
    if not wait_until(hub.publisher.ready, 15, 0.05):
        hub.publisher.stop()
        raise AssertionError(f"the hub did not start:\n{hub.log_text()}{hub.publisher.log_text()}")
    return hub


@contextlib.contextmanager
def running_hub(
    root: Path, keys: Path, ports: list[int] | None = None, **sections: dict
) -> Iterator[Hub]:
    """start_hub(), stopped when the block ends."""
    hub = start_hub(root, keys, ports, **sections)
    try:
        yield hub
    finally:
        hub.publisher.stop()
