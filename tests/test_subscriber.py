"""The subscriber's reactor in this process, built from settings without a file: it must
carry out what its stream-sync core decides (ask for snapshots, a fresh SUB after
silence) against a hub the test plays with the wire codec, and a real fail2ban-server.
Then the subscriber daemon in a cluster: what it does with a ban lifted by hand."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zmq

from f2bzmq import protocol
from f2bzmq.config import config_from
from f2bzmq.lab import Cluster, Fail2banServer, free_ports, run_command, stays, wait_until
from f2bzmq.protocol import BanEvent
from f2bzmq.subscriber import Subscriber

HEARTBEAT_TIMEOUT = 1.0
STATE = "ab" * 16  # the played hub's state id


class PlayedHub:
    """A hub's update stream (XPUB: it sees each SUB subscribe) and snapshot ROUTER."""

    def __init__(
        self,
        context: zmq.Context,
        publish_port: int,
        snapshot_port: int,
        address: str = "127.0.0.1",
    ) -> None:
        self.updates = context.socket(zmq.XPUB)
        self.updates.xpub_verbose = True  # every subscription, also a resubscribing SUB's
        self.snapshots = context.socket(zmq.ROUTER)
        for sock, port in ((self.updates, publish_port), (self.snapshots, snapshot_port)):
            sock.linger = 0
            sock.bind(f"tcp://{address}:{port}")
        self.sequence = 0
        self.table: dict[str, BanEvent] = {}  # ip -> the ban in force
        self.subscriptions = 0
        self.snapshot_requests = 0
        self.presences = 0
        self.takes_presence = False  # what its snapshots say: a hub before presences
        self.beating = True
        self.next_hugz = 0.0

    def change(self, event: BanEvent, publish: bool = True) -> None:
        """The next update; publish=False loses it on the way, as a full queue would."""
        self.sequence += 1
        if event.action == protocol.BAN:
            self.table[event.ip] = event
        else:
            del self.table[event.ip]
        if publish:
            self.updates.send_multipart(
                protocol.encode_update(STATE, self.sequence, [event], packed=True)
            )

    def serve(self) -> None:
        """Note subscriptions, answer snapshot requests, send a heartbeat when it is due."""
        while self.updates.poll(0):
            if self.updates.recv()[:1] == b"\x01":
                self.subscriptions += 1
        while self.snapshots.poll(0):
            peer, *request = self.snapshots.recv_multipart()
            if protocol.is_presence(request):
                protocol.decode_presence(request)
                self.presences += 1
                continue
            protocol.decode_snapshot_request(request)
            self.snapshot_requests += 1
            table = list(self.table.values())
            presence = self.takes_presence
            for part in protocol.encode_snapshot(STATE, self.sequence, table, presence=presence):
                self.snapshots.send_multipart([peer, *part])
        if self.beating and time.monotonic() >= self.next_hugz:
            self.updates.send_multipart(protocol.encode_heartbeat(STATE, self.sequence, True))
            self.next_hugz = time.monotonic() + HEARTBEAT_TIMEOUT / 5


def ban(ip: str, node: str = "node1") -> BanEvent:
    return BanEvent.new(node, "sshd", "ban", ip, bantime=600)


def test_the_reactor_follows_its_core_through_a_gap_and_silence(
    tmp_path: Path, own_signals: None
) -> None:
    _, publish_port, snapshot_port = free_ports(3)
    context = zmq.Context()
    hub = PlayedHub(context, publish_port, snapshot_port)
    hub.change(ban("192.0.2.1"))
    hub.change(ban("192.0.2.2"))
    hub.change(ban("192.0.2.3", node="node2"))  # the node's own report: not applied back
    with Fail2banServer(tmp_path, "node2") as server, server.client() as fail2ban:
        config = config_from(
            {
                "general": {
                    "node": "node2",
                    "publish_port": str(publish_port),
                    "snapshot_port": str(snapshot_port),
                    "insecure": "true",
                    "fail2ban_socket": str(server.socket),
                },
                "subscriber": {"heartbeat_timeout": str(HEARTBEAT_TIMEOUT)},
            }
        )
        subscriber = Subscriber(config)
        reactor = threading.Thread(target=subscriber.run)
        reactor.start()

        def settle(condition: Callable[[], bool], what: str) -> None:
            """Play the hub until condition() holds."""

            def served() -> bool:
                hub.serve()
                return condition()

            assert wait_until(served, 10, interval=0.02), what

        def jail_holds(*last_octets: int) -> None:
            wanted = {f"192.0.2.{n}" for n in last_octets}
            settle(lambda: set(fail2ban.banned("cluster")) == wanted, f"the jail holds {wanted}")

        def asked(snapshots: int, subscriptions: int) -> None:
            settle(
                lambda: (hub.snapshot_requests, hub.subscriptions) == (snapshots, subscriptions),
                f"{snapshots} snapshot requests and {subscriptions} subscriptions",
            )

        try:
            jail_holds(1, 2)
            asked(1, 1)
            hub.change(ban("192.0.2.4"))
            jail_holds(1, 2, 4)
            hub.change(ban("192.0.2.5"), publish=False)
            hub.change(ban("192.0.2.6"))  # a gap: only a snapshot brings .5
            jail_holds(1, 2, 4, 5, 6)
            asked(2, 1)
            hub.beating = False
            hub.change(BanEvent.new("node1", "sshd", "unban", "192.0.2.1"), publish=False)
            jail_holds(2, 4, 5, 6)  # after the silence: a fresh SUB and a snapshot
            hub.beating = True
            asked(3, 2)
            hub.change(ban("192.0.2.7"))  # through the fresh SUB
            jail_holds(2, 4, 5, 6, 7)
        finally:
            subscriber.signals.stopping = True
            subscriber.wakeup.wake()
            reactor.join(10)
            context.destroy(linger=0)
        assert not reactor.is_alive()
        assert set(server.banned("cluster")) == {f"192.0.2.{n}" for n in (2, 4, 5, 6, 7)}
        followed = subscriber.status()["Hubs"].values()
        assert [(link["synced"], link["sequence"]) for link in followed] == [(True, 8)]


@contextlib.contextmanager
def following(
    tmp_path: Path,
    hubs: list[PlayedHub],
    ports: list[int],
    jails: Callable[[Fail2banServer], str] | None = None,
    **sections: dict[str, str],
) -> Iterator[tuple[Subscriber, Fail2banServer, Callable]]:
    """node2's fail2ban (the lab's jails, or `jails`) and its subscriber's reactor following
    `hubs` at the shipped defaults (but the heartbeat timeout), `sections` over them; and
    settle(condition, what), which plays the hubs until condition() holds."""
    with Fail2banServer(tmp_path, "node2", jails=jails) as server:
        values = {
            "general": {
                "node": "node2",
                "publish_port": str(ports[0]),
                "snapshot_port": str(ports[1]),
                "insecure": "true",
                "fail2ban_socket": str(server.socket),
            },
            "subscriber": {"heartbeat_timeout": str(HEARTBEAT_TIMEOUT)},
        }
        for section, keys in sections.items():
            values.setdefault(section, {}).update(keys)
        subscriber = Subscriber(config_from(values))
        reactor = threading.Thread(target=subscriber.run)
        reactor.start()

        def settle(condition: Callable[[], bool], what: str, timeout: float = 10) -> None:
            def served() -> bool:
                for hub in hubs:
                    hub.serve()
                return condition()

            assert wait_until(served, timeout, interval=0.02), what

        try:
            yield subscriber, server, settle
        finally:
            subscriber.signals.stopping = True
            subscriber.wakeup.wake()
            reactor.join(10)
        assert not reactor.is_alive()


@pytest.fixture
def played_hub() -> Iterator[tuple[PlayedHub, list[int]]]:
    """A hub the test plays, and its publish and snapshot ports."""
    _, publish_port, snapshot_port = free_ports(3)
    context = zmq.Context()
    try:
        yield PlayedHub(context, publish_port, snapshot_port), [publish_port, snapshot_port]
    finally:
        context.destroy(linger=0)


def test_an_ipv4_compatible_address_stays_banned_through_full_reconciles(
    tmp_path: Path, own_signals: None, played_hub: tuple[PlayedHub, list[int]]
) -> None:
    """The event says ::a00:5, fail2ban lists ::10.0.0.5: one address, never lifted and
    set again by a reread, and lifted by its unban."""
    hub, ports = played_hub
    hub.change(ban("::a00:5"))
    settings = {"subscriber": {"resync_interval": "1"}}
    with following(tmp_path, [hub], ports, **settings) as (subscriber, server, settle):
        settle(lambda: server.banned("cluster") == ["::10.0.0.5"], "the ban")
        rereads = subscriber.next_resync
        settle(lambda: subscriber.next_resync > rereads + 1.5, "two full reconciles")
        hub.change(BanEvent.new("node1", "sshd", "unban", "::a00:5"))
        settle(lambda: server.banned("cluster") == [], "the unban")
        rereads = subscriber.next_resync
        settle(lambda: subscriber.next_resync > rereads + 1.5, "two more full reconciles")
        assert (subscriber.jails.banned, subscriber.jails.unbanned) == (1, 1)
        assert server.banned("cluster") == []


def test_a_hub_upgraded_in_place_is_heard_to_take_presences_within_the_probe(
    tmp_path: Path, own_signals: None, played_hub: tuple[PlayedHub, list[int]]
) -> None:
    """A hub that did not take presences comes back upgraded before the heartbeat timeout:
    no gap, no silence, no new state would make the subscriber ask for its table again,
    and without it the node would never tell it where it stands nor get the operators'
    holds. It asks again every PROBE_EVERY resync intervals, and once the hub says so,
    it sends presences and asks no more."""
    hub, ports = played_hub
    hub.change(ban("192.0.2.1"))
    settings = {"subscriber": {"resync_interval": "1"}}  # a probe every 12 s
    with following(tmp_path, [hub], ports, **settings) as (subscriber, server, settle):
        settle(lambda: server.banned("cluster") == ["192.0.2.1"], "the ban")
        assert hub.snapshot_requests == 1 and hub.presences == 0
        hub.takes_presence = True  # upgraded, in place
        settle(lambda: hub.presences > 0, "a presence", timeout=12 * 1 + 10)
        assert hub.snapshot_requests == 2
        hub.change(ban("192.0.2.2"))
        settle(lambda: server.banned("cluster") == ["192.0.2.1", "192.0.2.2"], "the next ban")
        presences = hub.presences
        settle(lambda: hub.presences > presences + 2, "presences every 2 s")
        assert hub.snapshot_requests == 2  # no more probes: it says it takes them


def test_special_ranges_the_hubs_and_the_jails_ignoreip_are_never_banned(
    tmp_path: Path,
    own_signals: None,
    played_hub: tuple[PlayedHub, list[int]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`set banip` bypasses fail2ban's ignoreip, and a hub relays what its own rules let
    through: the node itself refuses them, each for its reason, at the shipped defaults
    (but an empty allowlist, so the rest must hold on their own)."""
    hub, ports = played_hub
    refused = {
        "169.254.1.1": "a special-purpose address (link-local)",
        "224.0.0.0/24": "a special-purpose address (multicast)",
        "fe80::1": "a special-purpose address (link-local)",
        "255.255.255.255": "a special-purpose address (reserved and broadcast)",
        "0.0.0.0": "a special-purpose address (unspecified)",
        "127.0.0.1": "the address of a hub",  # before loopback: the hub listens there
    }
    for number, ip in enumerate(refused, start=3):  # one origin each: each is logged
        hub.change(ban(ip, node=f"node{number}"))
    hub.change(ban("192.0.2.1"))
    hub.change(ban("192.0.2.99"))
    hub.change(ban("198.51.100.7"))  # in the snapshot, before the node read its ignoreip

    def ignoring(server: Fail2banServer) -> str:
        jails = server.default_jails(600, 86400)
        return jails.replace("[cluster]\n", "[cluster]\nignoreip = 198.51.100.0/24 host.invalid\n")

    settings = {"subscriber": {"allowlist": "", "resync_interval": "1"}}
    with following(tmp_path, [hub], ports, ignoring, **settings) as (subscriber, server, settle):
        settle(lambda: set(server.banned("cluster")) == {"192.0.2.1", "192.0.2.99"}, "two bans")
        with server.client() as fail2ban:
            fail2ban.command("set", "cluster", "addignoreip", "192.0.2.99")
        settle(lambda: server.banned("cluster") == ["192.0.2.1"], "a new ignoreip, honoured")
        hub.change(ban("198.51.100.8", node="node9"))
        hub.change(ban("192.0.2.2"))
        settle(lambda: set(server.banned("cluster")) == {"192.0.2.1", "192.0.2.2"}, "updates")
        assert subscriber.jails.unbanned == 1
    lines = [record.getMessage() for record in caplog.records]
    refused["198.51.100.8"] = "in the ignoreip of [cluster]"
    for number, (ip, reason) in enumerate(refused.items(), start=3):
        assert f"refused [sshd] Ban {ip} from node{number}: {reason}" in lines, lines
    said = "[cluster] ignoreip host.invalid is no address or network: cluster bans do not honour it"
    assert lines.count(said) == 1


def test_refusals_are_logged_once_a_minute_per_sender(
    tmp_path: Path, own_signals: None, caplog: pytest.LogCaptureFixture
) -> None:
    """Each hub's malformed messages, and each origin's refused bans, get a line of their
    own: one sender's flood hides no other's refusals, and fills no disk."""
    _, publish_port, snapshot_port = free_ports(3)
    context = zmq.Context()
    addresses = ("127.0.0.1", "127.0.0.2")
    hubs = [PlayedHub(context, publish_port, snapshot_port, address) for address in addresses]
    general = {"hubs": " ".join(addresses)}
    try:
        with following(tmp_path, hubs, [publish_port, snapshot_port], general=general) as (
            subscriber,
            _,
            settle,
        ):
            settle(lambda: all(hub.subscriptions for hub in hubs), "both hubs followed")
            for hub in hubs:
                for number in range(3):
                    header = protocol.stream_header(STATE, hub.sequence + 1)
                    hub.updates.send_multipart([protocol.PACKED, protocol.UPDATE, header, b"x"])
                    hub.change(ban(f"127.0.0.{10 + number}", node=f"node{3 + number % 2}"))
            settle(lambda: subscriber.refused == 6, "every malformed message refused")
            settle(lambda: [link.sync.sequence for link in subscriber.links] == [3, 3], "bans")
    finally:
        context.destroy(linger=0)
    lines = [record.getMessage() for record in caplog.records]
    for address in addresses:
        said = [
            line for line in lines if line.startswith(f"ignored a message from tcp://{address}:")
        ]
        assert len(said) == 1, lines
    for origin in ("node3", "node4"):
        said = [
            line for line in lines if line.startswith("refused ") and f" from {origin}: " in line
        ]
        assert len(said) == 1, lines


def subscriber_status(node) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "f2bzmq", "subscriber", "-c", str(node.config), "status"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_a_ban_lifted_by_hand_stays_lifted_until_the_cluster_bans_it_anew(tmp_path: Path) -> None:
    """`fail2ban-client set cluster unbanip IP` on a node is kept across the subscriber's
    resyncs and restarts, shown in status, and ends when the cluster bans the address anew.
    (A ban fail2ban ended by itself comes back: test_cluster.)"""
    by_hand, other = "192.0.2.51", "192.0.2.52"
    # Resyncs every second, not every 5 minutes.
    with Cluster(tmp_path, size=2, subscriber={"resync_interval": "1"}) as cluster:
        node1, node2 = cluster["node1"], cluster["node2"]
        node1.fail2ban.attack(by_hand, other)
        for ip in (by_hand, other):
            node2.fail2ban.wait_banned("cluster", ip)
        run_command(
            "fail2ban-client",
            "-s",
            str(node2.fail2ban.socket),
            "set",
            "cluster",
            "unbanip",
            by_hand,
        )

        def shown() -> bool:
            done = subscriber_status(node2)
            return f"|  `- cluster: {by_hand}" in done.stdout.splitlines() and done.returncode == 0

        assert wait_until(shown, 10, 0.3), subscriber_status(node2).stdout
        hand_line = f"[cluster] {by_hand} was unbanned here by hand: kept unbanned here until"
        assert hand_line in node2.log_text("subscriber")

        assert stays(lambda: by_hand not in node2.fail2ban.banned("cluster"), 2)

        node2.subscriber.stop()  # a restart keeps the unban by hand
        node2.subscriber.start()
        assert wait_until(node2.subscriber.ready, 20, 0.1)
        assert stays(lambda: by_hand not in node2.fail2ban.banned("cluster"), 3)
        assert shown()
        assert node2.fail2ban.banned("cluster") == [other]

        # The cluster lifts the ban and bans the address anew: applied again.
        with node1.fail2ban.client() as client:
            client.unban("sshd", [by_hand])
        assert wait_until(lambda: "no longer bans it" in node2.log_text("subscriber"), 10)
        node1.fail2ban.attack(by_hand)
        node2.fail2ban.wait_banned("cluster", by_hand)
        assert wait_until(
            lambda: "|- Unbanned here by hand: none" in subscriber_status(node2).stdout, 10
        )
