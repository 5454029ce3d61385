"""fail2ban-zmq-tools' format on the hub: old monitors and old subscribers beside native nodes.

The old clients here are written from the old protocol, not from our code: a REQ socket
that sends one string frame and reads one reply, and a SUB socket with an empty
subscription that reads string frames.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from f2bzmq.config import ConfigError, load_config
from f2bzmq.lab import Cluster, Hub, free_ports, make_keys, wait_until
from f2bzmq.legacy import MAX_FRAME, format_update, parse_report
from f2bzmq.protocol import BAN, UNBAN, BanEvent, NetworkLimits, ProtocolError
from tests.support.hub import start_hub
from tests.support.nodeclient import NodeClient

TOKEN = "s3cret-token"
TIMEOUT = 5000  # ms an old client waits for a reply


class OldMonitor:
    """fail2ban-zmq-tools' monitor on the wire: REQ, one string frame out, one string back."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.context = zmq.Context()
        self.sock = self._connect()

    def _connect(self) -> zmq.Socket:
        sock = self.context.socket(zmq.REQ)
        sock.rcvtimeo = TIMEOUT
        sock.linger = 0
        sock.connect(self.endpoint)
        return sock

    def request(self, *frames) -> str | None:
        """The reply to one request; None when none came (the stuck REQ is replaced)."""
        self.sock.send_multipart([f.encode() if isinstance(f, str) else f for f in frames])
        try:
            return self.sock.recv_string()
        except zmq.Again:
            self.sock.close()
            self.sock = self._connect()
            return None

    def close(self) -> None:
        self.context.destroy(linger=0)


class OldSubscriber:
    """fail2ban-zmq-tools' subscriber on the wire: SUB with an empty prefix, string frames."""

    def __init__(self, endpoint: str) -> None:
        self.context = zmq.Context()
        self.sock = self.context.socket(zmq.SUB)
        self.sock.rcvtimeo = 15000
        self.sock.linger = 0
        self.events = self.sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self.sock.setsockopt_string(zmq.SUBSCRIBE, "")
        self.sock.connect(endpoint)

    def wait_connected(self) -> None:
        """Until the hub has our subscription: a SUB hears nothing published before that."""
        self.events.rcvtimeo = 15000
        assert recv_monitor_message(self.events)["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED
        self.sock.poll(200)  # the subscription follows the handshake on the same connection

    def receive(self) -> str:
        return self.sock.recv_string()

    def close(self) -> None:
        self.sock.disable_monitor()
        self.context.destroy(linger=0)


def endpoint(port: int) -> str:
    return f"tcp://127.0.0.1:{port}"


def legacy_hub(root: Path, keys: Path, ports: list[int], **publisher) -> Hub:
    """A started hub with both legacy endpoints on ports[3] and ports[4]."""
    options = {
        "legacy_report_bind": endpoint(ports[3]),
        "legacy_publish_bind": endpoint(ports[4]),
        **publisher,
    }
    return start_hub(root, keys, ports[:3], publisher=options)


def table(peer: NodeClient) -> tuple[int, list[tuple[str, str, str]]]:
    """The hub's sequence number and bans, through a native node's snapshot."""
    header, events = peer.snapshot()
    return header["seq"], sorted((e.node, e.jail, e.ip) for e in events)


# The format's rules, without a socket.


def test_a_report_becomes_a_native_event_and_its_echo_is_the_ack():
    limits = NetworkLimits()
    report = parse_report([b"s3cret|web1.example.org|sshd|Ban|192.0.2.7"], "s3cret", limits, 1e9)
    assert report.echo == b"web1.example.org|sshd|Ban|192.0.2.7"
    # No bantime: the hub's default_bantime applies.
    expected = BanEvent(report.event.id, "web1.example.org", "sshd", BAN, "192.0.2.7", 1e9, None)
    assert report.event == expected
    for action in ("Unban", "UnBan", "unban"):
        report = parse_report([f"web1|sshd|{action}|2001:DB8::1".encode()], "", limits, 1e9)
        assert (report.event.action, report.event.ip) == (UNBAN, "2001:db8::1")
        assert report.echo == f"web1|sshd|{action}|2001:DB8::1".encode()


@pytest.mark.parametrize(
    "frames, token, reason",
    [
        ([b"web1|sshd|Ban|192.0.2.7"], "s3cret", "4 fields, expected token|hostname"),
        ([b"guess|web1|sshd|Ban|192.0.2.7"], "s3cret", "wrong token"),
        ([b"s3cret|web1|sshd|Ban|192.0.2.7"], "", "5 fields, expected hostname|"),
        ([b"web1|sshd|Kick|192.0.2.7"], "", "action must be Ban or Unban"),
        ([b"web1|../sshd|Ban|192.0.2.7"], "", "jail must be"),
        ([b"web 1|sshd|Ban|192.0.2.7"], "", "node must be"),
        ([b"web1|sshd|Ban|192.0.2.7 "], "", "not an address"),
        ([b"web1|sshd|Ban|0.0.0.0/0"], "", "wider than the allowed /24"),
        ([b"web1|sshd|Ban|" + b"1" * 600], "", "larger than 512 bytes"),
        ([b"web1|sshd|Ban|\xff"], "", "not UTF-8"),
        ([b"web1|sshd", b"Ban|192.0.2.7"], "", "2 frames, expected one"),
        ([], "", "0 frames"),
    ],
)
def test_malformed_reports_are_refused_with_a_reason(frames, token, reason):
    with pytest.raises(ProtocolError) as raised:
        parse_report(frames, token, NetworkLimits(), 1e9)
    assert reason in str(raised.value)


def test_updates_are_written_the_old_way():
    ban = BanEvent.new("node1", "sshd", BAN, "192.0.2.7", bantime=600)
    unban = BanEvent.new("hub", "sshd", UNBAN, "192.0.2.7")
    assert format_update(ban) == b"node1|sshd|Ban|192.0.2.7"
    assert format_update(unban) == b"hub|sshd|Unban|192.0.2.7"


# Old clients and native nodes in one real cluster.


def test_an_old_monitors_ban_reaches_native_nodes(tmp_path):
    port = free_ports(1)[0]
    options = {"legacy_report_bind": endpoint(port), "legacy_token": TOKEN}
    with Cluster(tmp_path, size=2, publisher=options) as cluster:
        old = OldMonitor(endpoint(port))
        try:
            reply = old.request(f"{TOKEN}|oldweb|sshd|Ban|198.51.100.20")
            assert reply == "oldweb|sshd|Ban|198.51.100.20"
            for node in ("node1", "node2"):
                cluster[node].fail2ban.wait_banned("cluster", "198.51.100.20")
            line = "[sshd] Ban 198.51.100.20 from oldweb (legacy report)"
            assert wait_until(lambda: line in cluster.hub.log_text(), 15)
            assert TOKEN not in cluster.hub.log_text()

            assert old.request(f"{TOKEN}|oldweb|sshd|Unban|198.51.100.20") == (
                "oldweb|sshd|Unban|198.51.100.20"
            )
            for node in ("node1", "node2"):
                cluster[node].fail2ban.wait_banned("cluster", "198.51.100.20", present=False)
        finally:
            old.close()


def test_a_native_ban_and_unban_reach_an_old_subscriber(tmp_path):
    port = free_ports(1)[0]
    old = OldSubscriber(endpoint(port))  # connects by itself once the hub listens
    try:
        with Cluster(tmp_path, size=1, publisher={"legacy_publish_bind": endpoint(port)}) as c:
            old.wait_connected()
            node1 = c["node1"]
            node1.fail2ban.attack("198.51.100.21")
            assert old.receive() == "node1|sshd|Ban|198.51.100.21"
            with node1.fail2ban.client() as client:
                client.unban("sshd", ["198.51.100.21"])
            assert old.receive() == "node1|sshd|Unban|198.51.100.21"
    finally:
        old.close()


# One hub with both legacy endpoints and a token, for the refusals.


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("legacy")
    keys = make_keys(root / "keys", ["node1"])
    ports = free_ports(5)
    hub = legacy_hub(root, keys, ports, legacy_token=TOKEN)
    peer = NodeClient(ports[:3], keys)
    old = OldMonitor(endpoint(ports[3]))
    try:
        yield hub, peer, old, ports
    finally:
        old.close()
        peer.close()
        hub.publisher.stop()


@pytest.mark.parametrize(
    "frames",
    [
        ["wrong|oldweb|sshd|Ban|198.51.100.22"],
        ["oldweb|sshd|Ban|198.51.100.22"],  # no token
        [f"{TOKEN}|oldweb|sshd|Ban"],
        [f"{TOKEN}|oldweb|sshd|Ban|198.51.100.22|extra"],
        [f"{TOKEN}|oldweb|sshd|Kick|198.51.100.22"],
        [f"{TOKEN}|oldweb|sshd|Restore Ban|198.51.100.22"],
        [f"{TOKEN}|oldweb|sshd|Ban|198.51.100.300"],
        [f"{TOKEN}|oldweb|sshd|Ban|0.0.0.0/0"],
        [f"{TOKEN}|oldweb|sshd|Ban|127.0.0.1"],  # in the hub's allowlist
        [f"{TOKEN}|oldweb|sshd|Ban|::ffff:127.0.0.1"],  # the same, IPv4-mapped
        [f"{TOKEN}|oldweb\n|sshd|Ban|198.51.100.22"],
        [f"{TOKEN}|oldweb|sshd;reboot|Ban|198.51.100.22"],
        [f"{TOKEN}|oldweb|../../etc|Ban|198.51.100.22"],
        [f"{TOKEN}|$(reboot)|sshd|Ban|198.51.100.22"],
        [f"{TOKEN}|oldweb|sshd|Ban|198.51.100.22;rm -rf /"],
        [f"{TOKEN}|node1|sshd|Ban|198.51.100.22"],  # a node with a key speaks for itself
        [f"{TOKEN}||||"],
        [""],
        [f"{TOKEN}|oldweb|sshd|Ban|" + "1" * 3000],
        [b"\xff\xfe\x00\x01" * 10],
        [f"{TOKEN}|oldweb|sshd", "Ban|198.51.100.22"],
    ],
    ids=lambda frames: repr(frames)[:40],
)
def test_refused_reports_get_nak_and_change_nothing(hub, frames):
    _, peer, old, _ = hub
    before = table(peer)
    assert old.request(*frames) == "NAK"
    assert table(peer) == before
    # Still serving: an unban of what nobody banned is ACKed and changes nothing either.
    assert (
        old.request(f"{TOKEN}|oldweb|sshd|Unban|203.0.113.99") == "oldweb|sshd|Unban|203.0.113.99"
    )
    assert table(peer) == before


def test_a_frame_over_the_size_cap_drops_the_peer_and_the_endpoint_goes_on(hub):
    hub_, peer, old, ports = hub
    assert old.request("x" * (MAX_FRAME + 1)) is None
    assert old.request(f"{TOKEN}|oldweb|sshd|Ban|198.51.100.23") == "oldweb|sshd|Ban|198.51.100.23"
    assert ("oldweb", "sshd", "198.51.100.23") in table(peer)[1]
    assert hub_.publisher.alive()


def test_plain_clients_get_in_on_the_legacy_endpoint_only(hub):
    _, _, old, ports = hub
    plain = NodeClient(ports[:3], None)  # a native client without keys
    plain.reports.rcvtimeo = 2000
    try:
        event = BanEvent.new("node1", "sshd", BAN, "198.51.100.24", bantime=600)
        with pytest.raises(zmq.Again):
            plain.report(event.encode())
        assert old.request(f"{TOKEN}|oldweb|sshd|Unban|198.51.100.24") is not None
    finally:
        plain.close()


# Expiry, rate limit, bind errors, old key names and the default, each on a hub of its own.


def test_old_bans_get_the_default_bantime_and_expiry_unbans_go_out_the_old_way(tmp_path):
    ports = free_ports(5)
    hub = legacy_hub(tmp_path, make_keys(tmp_path / "keys", []), ports, default_bantime="1")
    old, listener = OldMonitor(endpoint(ports[3])), OldSubscriber(endpoint(ports[4]))
    try:
        listener.wait_connected()
        assert old.request("oldweb|sshd|Ban|198.51.100.25") == "oldweb|sshd|Ban|198.51.100.25"
        assert listener.receive() == "oldweb|sshd|Ban|198.51.100.25"
        assert listener.receive() == "hub|sshd|Unban|198.51.100.25"
        # The hub writes a pass's log lines after it has sent what they tell of.
        assert wait_until(lambda: "Unban 198.51.100.25: ban time is up" in hub.log_text(), 15)
        assert "legacy_token is empty: anyone who reaches" in hub.log_text()
    finally:
        old.close()
        listener.close()
        hub.publisher.stop()


def test_the_rate_limit_holds_for_old_monitors_by_address(tmp_path):
    """An old monitor never sends a refused report again: past its rate limit it waits for
    its answer instead, and another name from the same address is the same sender."""
    ports = free_ports(5)
    keys = make_keys(tmp_path / "keys", [])
    hub = legacy_hub(tmp_path, keys, ports, rate_limit="1", rate_burst="3")
    old = OldMonitor(endpoint(ports[3]))
    try:
        started = time.monotonic()
        replies = [old.request(f"oldweb|sshd|Ban|198.51.100.{i}") for i in range(30, 35)]
        replies.append(old.request("other|sshd|Ban|198.51.100.36"))
        assert replies == [f"oldweb|sshd|Ban|198.51.100.{i}" for i in range(30, 35)] + [
            "other|sshd|Ban|198.51.100.36"
        ]
        assert time.monotonic() - started >= 2.5  # three waited a second each
        line = "holding a legacy report from 127.0.0.1: rate limit: 127.0.0.1 sends more than 1"
        assert wait_until(lambda: line in hub.log_text(), 15)
    finally:
        old.close()
        hub.publisher.stop()


def test_a_legacy_endpoint_that_cannot_be_bound_stops_start_up(tmp_path):
    ports = free_ports(5)
    taken = socket.socket()
    taken.bind(("127.0.0.1", ports[3]))
    taken.listen()
    try:
        hub = Hub(
            tmp_path,
            ports[:3],
            keys_dir=make_keys(tmp_path / "keys", []),
            publisher={"legacy_report_bind": endpoint(ports[3])},
        )
        hub.publisher.start()
        assert hub.publisher.process.wait(15) == 1
        assert f"cannot bind legacy endpoint {endpoint(ports[3])}" in hub.publisher.log_text()
    finally:
        taken.close()


def test_legacy_endpoints_work_in_insecure_mode(tmp_path):
    ports = free_ports(5)
    hub = Hub(
        tmp_path,
        ports[:3],
        keys_dir=make_keys(tmp_path / "keys", []),
        general={"insecure": "true"},
        publisher={"legacy_report_bind": endpoint(ports[3])},
    )
    hub.publisher.start()
    old = OldMonitor(endpoint(ports[3]))
    try:
        assert old.request("oldweb|sshd|Ban|198.51.100.26") == "oldweb|sshd|Ban|198.51.100.26"
    finally:
        old.close()
        hub.publisher.stop()


OLD_FILE = """\
[monitor]
pidfile = /var/run/fail2ban-monitor.pid
zmqreplyserver = tcp://hub.example.org:5678
fail2banlogpath = /var/log/fail2ban.log
auth = true
authtoken = {token}

[subscriber]
pidfile = /var/run/fail2ban-subscriber.pid
zmqpublisherurl = tcp://hub.example.org:5680
zmqprefixfilter = ""
subscriberaction = log

[publisher]
pidfile = /var/run/fail2ban-publisher.pid
broadcasterbindurl = tcp://*:5680   # address to which subscribers will connect
replybindurl = tcp://*:5678      # address to which Monitors will send messages
auth = true
authtoken = {token}
"""


def test_an_old_configuration_file_loads_with_a_warning_per_old_key(tmp_path):
    path = tmp_path / "fail2ban-cluster.conf"
    path.write_text(OLD_FILE.format(token=TOKEN))
    config = load_config(str(path))
    assert config.general.hubs == ["hub.example.org"]
    assert config.monitor.logpath == "/var/log/fail2ban.log"
    assert config.publisher.legacy_report_bind == ["tcp://*:5678"]
    assert config.publisher.legacy_publish_bind == ["tcp://*:5680"]
    assert config.publisher.legacy_token == TOKEN
    warnings = "\n".join(config.warnings)
    assert len(config.warnings) == 14
    for old, new in (
        ("[monitor] zmqreplyserver", "read as [general] hubs = hub.example.org"),
        ("[monitor] fail2banlogpath", "read as [monitor] logpath = /var/log/fail2ban.log"),
        ("[publisher] replybindurl", "read as [publisher] legacy_report_bind = tcp://*:5678"),
        ("[publisher] broadcasterbindurl", "read as [publisher] legacy_publish_bind"),
        ("[publisher] authtoken", "read as [publisher] legacy_token = (hidden)"),
        ("[monitor] authtoken", "is ignored: the monitor proves who it is with its CURVE key"),
        ("[subscriber] pidfile", "is ignored: PID files are [general] run_dir/ROLE.pid"),
    ):
        assert f"{path}: {old} is a fail2ban-zmq-tools key" in warnings
        assert new in warnings, new
    assert "the old port is not used" in warnings
    assert TOKEN not in warnings


def test_old_keys_yield_to_new_ones_and_their_mistakes_name_the_old_key(tmp_path):
    path = tmp_path / "fail2ban-cluster.conf"
    path.write_text("[publisher]\nauth = false\nauthtoken = x\nreplybindurl = tcp://*:1\n")
    (tmp_path / "fail2ban-cluster.local").write_text(
        "[publisher]\nlegacy_report_bind = tcp://10.0.0.5:5678\n"
    )
    config = load_config(str(path))
    assert config.publisher.legacy_token == ""  # the old hub asked for no token
    assert config.publisher.legacy_report_bind == ["tcp://10.0.0.5:5678"]
    assert any("authtoken is a fail2ban-zmq-tools key and is ignored" in w for w in config.warnings)
    (tmp_path / "fail2ban-cluster.local").unlink()
    for text, error in (
        ("[monitor]\nzmqreplyserver = tcp://*:5678\n", "[monitor] zmqreplyserver: 'tcp://*:5678'"),
        ("[publisher]\nreplybindurl = tcp://*:99999\n", "[publisher] replybindurl: 'tcp://*:9"),
        (
            "[monitor]\nzmqreplyserver = tcp://a:1\n[subscriber]\nzmqpublisherurl = tcp://b:2\n",
            "[subscriber] zmqpublisherurl: gives [general] hubs = 'b', but [monitor]",
        ),
    ):
        path.write_text(text)
        with pytest.raises(ConfigError) as raised:
            load_config(str(path))
        assert str(raised.value).startswith(f"{path}: {error}"), str(raised.value)


@pytest.mark.parametrize(
    "key, value, error",
    [
        ("legacy_report_bind", "127.0.0.1:5678", "is not a tcp://HOST:PORT endpoint"),
        ("legacy_report_bind", "tcp://127.0.0.1", "is not a tcp://HOST:PORT endpoint"),
        ("legacy_publish_bind", "tcp://127.0.0.1:0", "is not a tcp://HOST:PORT endpoint"),
        ("legacy_publish_bind", "tcp://-host:5680", "'-host' is not a host name"),
        ("legacy_token", "a|b", "must not contain '|'"),
    ],
)
def test_legacy_settings_are_checked_at_start_up(tmp_path, key, value, error):
    path = tmp_path / "fail2ban-cluster.conf"
    path.write_text(f"[publisher]\n{key} = {value}\n")
    with pytest.raises(ConfigError) as raised:
        load_config(str(path))
    assert str(raised.value).startswith(f"{path}: [publisher] {key}: ")
    assert error in str(raised.value)


def test_old_key_names_work_and_their_warnings_are_in_the_daemons_log(tmp_path):
    ports = free_ports(4)
    hub = Hub(
        tmp_path,
        ports[:3],
        keys_dir=make_keys(tmp_path / "keys", []),
        publisher={"replybindurl": endpoint(ports[3]), "auth": "true", "authtoken": TOKEN},
    )
    hub.publisher.start()
    old = OldMonitor(endpoint(ports[3]))
    try:
        reply = old.request(f"{TOKEN}|oldweb|sshd|Ban|198.51.100.27")
        assert reply == "oldweb|sshd|Ban|198.51.100.27"
        log = hub.log_text()
        assert (
            f"[publisher] replybindurl is a fail2ban-zmq-tools key: read as "
            f"[publisher] legacy_report_bind = {endpoint(ports[3])}" in log
        )
        assert "[publisher] authtoken is a fail2ban-zmq-tools key" in log
        assert "legacy endpoints (fail2ban-zmq-tools format) open WITHOUT encryption" in log
        assert TOKEN not in log
    finally:
        old.close()
        hub.publisher.stop()


def listening_ports(pid: int) -> set[int]:
    """TCP ports a process listens on, from /proc: its socket inodes in LISTEN state."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = str(fd.readlink()) if fd.is_symlink() else ""
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table_file in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table_file).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_legacy_endpoints_are_off_by_default(tmp_path):
    config = load_config(str(Path(__file__).resolve().parent.parent / "fail2ban-cluster.conf"))
    for key in ("legacy_report_bind", "legacy_publish_bind"):
        assert getattr(config.publisher, key) == []
    ports = free_ports(3)
    hub = start_hub(tmp_path, make_keys(tmp_path / "keys", []), ports)
    try:
        assert listening_ports(hub.publisher.process.pid) == set(ports)
        assert "legacy" not in hub.log_text().lower()
    finally:
        hub.publisher.stop()
