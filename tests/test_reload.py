"""A running daemon reads its configuration again (SIGHUP, `ROLE reload`): what it can
change at once it applies, every other change is named as needing a restart."""

from __future__ import annotations

import subprocess
import sys

from f2bzmq import protocol
from f2bzmq.config import config_from
from f2bzmq.lab import Cluster, make_keys
from f2bzmq.protocol import BanEvent
from f2bzmq.reload import plan_reload
from tests.support.hub import running_hub
from tests.support.nodeclient import NodeClient

LIVE = frozenset({("general", "loglevel"), ("subscriber", "allowlist")})


def reload(role: str, config) -> list[str]:
    """`ROLE -c CONFIG reload`, which must succeed: the lines it printed."""
    done = subprocess.run(
        [sys.executable, "-m", "f2bzmq", role, "-c", str(config), "reload"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_a_reload_takes_the_live_keys_of_its_sections_and_names_the_others():
    running = config_from({"general": {"node": "web1"}})
    read = config_from(
        {
            "general": {"node": "web1", "loglevel": "DEBUG", "report_port": "7000"},
            "subscriber": {"allowlist": "10.0.0.0/8", "batch_size": "10"},
            "publisher": {"rate_limit": "5"},  # not the subscriber's: not its business
        }
    )
    config, reloaded = plan_reload(running, read, "subscriber", LIVE)
    assert reloaded.applied == [("general", "loglevel"), ("subscriber", "allowlist")]
    assert reloaded.restart == [("general", "report_port"), ("subscriber", "batch_size")]
    assert config.general.loglevel == read.general.loglevel
    assert config.subscriber.allowlist == read.subscriber.allowlist
    # What needs a restart keeps its running value: status and the daemon agree.
    assert config.general.report_port == running.general.report_port
    assert config.subscriber.batch_size == running.subscriber.batch_size
    assert reloaded.describe() == (
        "applied [general] loglevel, [subscriber] allowlist; needs a restart: "
        "[general] report_port, [subscriber] batch_size; keys: unchanged"
    )
    _, nothing = plan_reload(running, running, "subscriber", LIVE)
    assert nothing.as_dict() == {
        "Applied": "nothing changed",
        "Needs a restart": "nothing",
        "Keys": "unchanged",
    }


def test_a_subscriber_reloaded_with_a_wider_allowlist_lifts_what_it_now_covers(tmp_path):
    attacker = "192.0.2.77"
    with Cluster(tmp_path, size=2) as cluster:
        node1, node2 = cluster["node1"], cluster["node2"]
        node1.fail2ban.attack(attacker)
        node2.fail2ban.wait_banned("cluster", attacker)
        node2.config.with_suffix(".local").write_text(
            f"[subscriber]\nallowlist = 127.0.0.0/8 ::1/128 {attacker}\n"
        )
        said = reload("subscriber", node2.config)
        assert "|- Applied: [subscriber] allowlist" in said
        assert "`- Keys: unchanged" in said
        node2.fail2ban.wait_banned("cluster", attacker, present=False, timeout=10)
        assert attacker in node1.fail2ban.banned("sshd")  # node1's own ban is node1's


def test_a_hub_reloaded_without_a_network_in_its_allowlist_bans_it_again(tmp_path):
    """The allowlist a reload reads replaces the configured one in every rule that uses
    it: a node's report, and the operators' decisions, which keep only their own entries."""
    keys = make_keys(tmp_path / "keys", ["node1"])
    listed = "127.0.0.0/8 ::1/128 special-purpose hubs nodes 198.51.100.0/24"
    with running_hub(tmp_path, keys, publisher={"allowlist": listed}) as hub:
        node = NodeClient(hub.ports, keys)
        try:
            event = BanEvent.new("node1", "sshd", "ban", "198.51.100.7", bantime=600)
            kind, body = node.report(event.encode())
            assert kind == protocol.NAK and "in the hub's allowlist" in body["reason"]
            hub.config.with_suffix(".local").write_text(
                "[publisher]\nallowlist = 127.0.0.0/8 ::1/128 special-purpose hubs nodes\n"
            )
            assert "|- Applied: [publisher] allowlist" in reload("publisher", hub.config)
            event = BanEvent.new("node1", "sshd", "ban", "198.51.100.7", bantime=600)
            assert node.report(event.encode())[0] == protocol.ACK
        finally:
            node.close()
