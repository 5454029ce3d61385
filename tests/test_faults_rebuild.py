"""Losing a hub's state or rotating a big log loses nothing and delays nothing.

A hub that comes back without its state is young: subscribers keep what they hold, the
monitors report their node's bans again and a peer hub hands over its table. Re-reports
go in a lane of their own that never delays a fresh ban. Real fail2ban-servers, real
daemons at the shipped rate limits, the real logrotate; attackers from 198.18.0.0/15.
"""

from __future__ import annotations

import re
import shutil
import threading
import time
from pathlib import Path

from f2bzmq.control import ControlError, ask
from f2bzmq.lab import Cluster, Hub, Node, wait_until
from tests.support.logrotate import logrotate
from tests.support.state import hub_bans, outbox_depth
from tests.test_faults import (
    STEP_TIMEOUT,
    attackers,
    jail_set,
    quiet_jails,
    sync_unbans,
    wait_converged,
)

SAMPLE_EVERY = 0.1  # seconds between two looks at every node's sync jail
# Seconds watched after a hub is rebuilt: each subscriber hears it in a heartbeat (every
# 0.5 s in the lab) and replaces what it held with a fresh snapshot of the hub's table.
SETTLE = 2.0


class Watch(threading.Thread):
    """Looks at every node's sync jail every SAMPLE_EVERY seconds and keeps any moment one
    of them lacked a ban it is expected to hold."""

    def __init__(self, cluster: Cluster, expected: dict[str, set[str]]) -> None:
        super().__init__(daemon=True)
        self.cluster = cluster
        self.expected = expected
        self.lacked: list[tuple[float, str, list[str]]] = []  # (when, node, a few lacking)
        self.samples = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        clients = {name: self.cluster[name].fail2ban.client() for name in self.expected}
        try:
            while not self.stopping.wait(SAMPLE_EVERY):
                for name, client in clients.items():
                    missing = self.expected[name] - set(client.banned("cluster"))
                    if missing:
                        self.lacked.append((time.time(), name, sorted(missing)[:3]))
                self.samples += 1
        finally:
            for client in clients.values():
                client.close()

    def __enter__(self) -> Watch:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stopping.set()
        self.join(10)


def ban(node: Node, ips: list[str]) -> None:
    """Bans made by the node's own fail2ban, logged as fail2ban logs any ban."""
    with node.fail2ban.client() as client:
        for start in range(0, len(ips), 500):
            client.ban("sshd", ips[start : start + 500])


def outbox_waiting(node: Node) -> int:
    """Events the node's monitor says wait in its outbox."""
    try:
        return ask(node.monitor.control_socket(), timeout=5)["Outbox depth"]
    except ControlError:
        return -1


def hub_state(hub: Hub) -> str:
    try:
        return ask(hub.publisher.control_socket(), timeout=5)["State"]
    except ControlError:
        return "not answering"


def replace_disk(hub: Hub) -> None:
    """The hub stops and comes back without its state folder, as with a new disk."""
    hub.publisher.stop()
    shutil.rmtree(hub.directory / "state")
    hub.publisher.start()


def held_by_nodes(held: dict[str, list[str]]) -> tuple[dict[str, set[str]], set[tuple]]:
    """What each node's sync jail must hold (every other node's bans), and the hub's rows."""
    expected = {
        name: {ip for other, ips in held.items() if other != name for ip in ips} for name in held
    }
    rows = {("sshd", ip, name) for name, ips in held.items() for ip in ips}
    return expected, rows


def wait_rebuilt(cluster: Cluster, hub: Hub, rows: set[tuple]) -> None:
    def rebuilt() -> bool:
        return hub_state(hub) == "rebuilt" and set(hub_bans(hub)) == rows

    if not wait_until(rebuilt, STEP_TIMEOUT, 0.2):
        raise AssertionError(
            f"{hub.name} not rebuilt: {hub_state(hub)}, {len(hub_bans(hub))} of {len(rows)} "
            f"bans\n{cluster.diagnostics()}"
        )


def test_a_hub_that_lost_its_state_is_rebuilt_and_no_node_lifts_a_ban(tmp_path: Path):
    with Cluster(tmp_path, size=3, fail2ban={"jails": quiet_jails}) as cluster:
        held = {"node1": attackers(13, 100), "node2": attackers(14, 300)}
        held["node3"] = attackers(15, 400)
        for name, ips in held.items():
            ban(cluster[name], ips)
        expected, rows = held_by_nodes(held)
        wait_converged(cluster, expected)

        with Watch(cluster, expected) as watch:
            replace_disk(cluster.hub)
            wait_rebuilt(cluster, cluster.hub, rows)
            log = cluster.hub.log_text()
            assert "rebuilt: all 3 nodes reported their bans again" in log
            time.sleep(SETTLE)
            wait_converged(cluster, expected)
        assert watch.samples >= 10 and watch.lacked == []
        assert sync_unbans(cluster) == {}


def test_two_hubs_each_replaced_in_turn_lose_nothing(tmp_path: Path):
    with Cluster(tmp_path, size=3, hubs=2, fail2ban={"jails": quiet_jails}) as cluster:
        held = {"node1": attackers(16, 100), "node2": attackers(17, 200)}
        held["node3"] = attackers(18, 300)
        for name, ips in held.items():
            ban(cluster[name], ips)
        expected, rows = held_by_nodes(held)
        wait_converged(cluster, expected)
        for hub in cluster.hubs:
            wait_rebuilt(cluster, hub, rows)

        with Watch(cluster, expected) as watch:
            for number, hub in enumerate(cluster.hubs):
                peer = cluster.hubs[1 - number]
                replace_disk(hub)
                wait_rebuilt(cluster, hub, rows)
                assert f"{peer.address}:{cluster.ports[2]} handed over its table" in hub.log_text()
            time.sleep(SETTLE)
            wait_converged(cluster, expected)
        assert watch.samples >= 10 and watch.lacked == []
        assert sync_unbans(cluster) == {}


def test_fresh_bans_reach_every_node_within_a_second_while_5000_are_reported_again(tmp_path):
    """Five rotations of a log whose node holds 5,000 bans: each makes the monitor report
    all 5,000 again. A ban made meanwhile must not wait behind them."""
    with Cluster(tmp_path, size=3, fail2ban={"jails": quiet_jails}) as cluster:
        node1 = cluster["node1"]
        held = attackers(19, 4000) + attackers(20, 1000)
        ban(node1, held)
        wait_converged(cluster, {"node1": set(), "node2": set(held), "node3": set(held)})
        rotate = logrotate(tmp_path, node1.fail2ban.log, "    copytruncate\n", 10, 60)
        others = [cluster["node2"].fail2ban.client(), cluster["node3"].fail2ban.client()]
        delays: list[float] = []
        fresh = attackers(21, 15)
        try:
            for rotation in range(5):
                rotate()
                # The first ban once the monitor has stored the 5,000 again: behind them all
                # if it waited in line.
                waiting = lambda: outbox_waiting(node1) >= 4000  # noqa: E731
                assert wait_until(waiting, 10, 0.01), cluster.diagnostics()
                for ip in fresh[rotation * 3 : rotation * 3 + 3]:
                    made = time.monotonic()
                    ban(node1, [ip])
                    arrived = wait_until(
                        lambda ip=ip: all(ip in client.banned("cluster") for client in others),
                        10,
                        0.02,
                    )
                    assert arrived, cluster.diagnostics()
                    delays.append(time.monotonic() - made)
                    time.sleep(0.2)
        finally:
            for client in others:
                client.close()
        # Known to the hub, they cost no rate limit: all ACKed at once, not at 50 a second.
        assert wait_until(lambda: outbox_depth(node1) == 0, 15, 0.2), outbox_waiting(node1)
        reported = re.findall(r"log rotated: reporting the (\d+) bans", node1.log_text("monitor"))
        assert len(reported) == 5 and all(int(count) >= len(held) for count in reported)
        print("fresh bans on node2 and node3 after", [round(delay, 3) for delay in delays])
        assert max(delays) < 1.0, [round(delay, 3) for delay in delays]
        everyone = set(held) | set(fresh)
        wait_converged(cluster, {"node1": set(), "node2": everyone, "node3": everyone})
        assert sync_unbans(cluster) == {}
        assert jail_set(node1, "sshd") == everyone
