"""What the local jails must hold: which local jail gets what, and what it never bans."""

import dataclasses
import ipaddress
import random
import shutil
from pathlib import Path

import pytest

from f2bzmq.addresses import SPECIAL_PURPOSE
from f2bzmq.config import config_from
from f2bzmq.jails import (
    COMMAND_SECONDS,
    END_SLACK,
    FIRST_BATCH,
    BatchSizer,
    HandUnbans,
    LocalJails,
    LocalPolicy,
    cluster_bans,
    desired_bans,
    fail2ban_address,
    listed_address,
    removed_by_hand,
    wants_address,
)
from f2bzmq.lab import Fail2banServer
from f2bzmq.protocol import BanEvent, NetworkLimits
from f2bzmq.sync import ClusterView


def policy(**changes):
    values = {
        "node": "node2",
        "sync_jail": "cluster",
        "jail_map": {"sshd": "sshd-cluster"},
        "allowlist": [ipaddress.ip_network(n) for n in ("127.0.0.0/8", "::1/128", "10.1.0.0/16")],
    }
    values.update(changes)
    return LocalPolicy(**values)


def view(*events):
    result = ClusterView()
    for event in events:
        result.apply(event)
    return result


def ban(ip, jail="nginx", node="node1"):
    return BanEvent.new(node, jail, "ban", ip, bantime=600)


def test_one_address_answer_agrees_with_the_whole_computation():
    """The subscriber's per-update shortcut must never disagree with the full comparison."""
    rng = random.Random(7)
    rules = policy()
    views = [ClusterView(), ClusterView()]
    addresses = ["192.0.2.1", "192.0.2.2", "10.1.0.9", "2001:db8::1"]
    jails = ["sshd", "nginx", "postfix"]
    for _ in range(2000):
        action = rng.choice(["ban", "ban", "unban"])
        node = rng.choice(["node1", "node2", "node3"])
        bantime = 600 if action == "ban" else None
        rng.choice(views).apply(
            BanEvent.new(node, rng.choice(jails), action, rng.choice(addresses), bantime=bantime)
        )
        synced = views[: rng.choice([1, 2])]
        wanted = desired_bans(synced, rules)
        for jail in rules.local_jails():
            for ip in addresses:
                assert wants_address(synced, rules, jail, ip) == (ip in wanted[jail])


def test_mapped_jails_and_the_sync_jail():
    wanted = desired_bans([view(ban("192.0.2.1", "sshd"), ban("192.0.2.2"))], policy())
    assert wanted == {"sshd-cluster": {"192.0.2.1"}, "cluster": {"192.0.2.2"}}


def test_own_reports_and_allowlisted_addresses_are_left_out():
    events = [
        ban("192.0.2.3", node="node2"),
        ban("127.0.0.1"),
        ban("10.1.2.3"),
        ban("10.1.0.0/24"),  # inside the allowlisted 10.1.0.0/16
        ban("::1"),
        ban("2001:db8::5"),
    ]
    assert desired_bans([view(*events)], policy()) == {
        "sshd-cluster": set(),
        "cluster": {"2001:db8::5"},
    }


@pytest.mark.parametrize(
    "ip, limits, reason",
    [
        ("192.0.2.1", NetworkLimits(), None),
        ("10.1.2.3", NetworkLimits(), "in this node's allowlist"),
        ("198.51.100.0/24", NetworkLimits(), None),
        ("198.51.0.0/16", NetworkLimits(), "wider than this node's limit of /24"),
        ("198.51.0.0/16", NetworkLimits(True, 16, 48), None),
        ("2001:db8::/48", NetworkLimits(), None),
        ("2001:db8::/32", NetworkLimits(), "wider than this node's limit of /48"),
        ("198.51.100.0/24", NetworkLimits(allow=False), "networks are not allowed on this node"),
        ("198.51.100.7", NetworkLimits(allow=False), None),
    ],
)
def test_each_ban_is_judged_alone_by_the_nodes_own_limits(ip, limits, reason):
    """The hub may be more lenient than this node: the node refuses that ban, no other."""
    rules = policy(networks=limits)
    event = BanEvent.new("node1", "nginx", "ban", ip, networks=NetworkLimits(True, 8, 16))
    assert rules.refusal(event) == reason
    wanted = desired_bans([view(event, ban("192.0.2.200"))], rules)["cluster"]
    assert wanted == ({"192.0.2.200"} if reason else {ip, "192.0.2.200"})


def test_the_shipped_special_ranges_are_the_special_purpose_ones():
    shipped = config_from({}).subscriber.special_ranges
    named = [network for network, _ in SPECIAL_PURPOSE]
    assert sorted(map(str, shipped)) == sorted(map(str, named))


@pytest.mark.parametrize(
    "ip, jail, reason",
    [
        ("192.0.2.1", "nginx", None),
        ("10.1.2.3", "nginx", "in this node's allowlist"),
        ("169.254.7.7", "nginx", "a special-purpose address (link-local)"),
        ("ff02::1", "nginx", "a special-purpose address (multicast)"),
        ("100.64.0.1", "nginx", "a special-purpose address (special_ranges)"),
        ("203.0.113.5", "nginx", "the address of a hub"),
        ("203.0.113.0/24", "nginx", "the address of a hub"),
        ("198.51.100.9", "nginx", "in the ignoreip of [cluster]"),
        ("198.51.100.9", "sshd", None),  # sshd-cluster ignores something else
        ("2001:db8:5::1", "sshd", "in the ignoreip of [sshd-cluster]"),
        ("::ffff:198.51.100.9", "nginx", "in the ignoreip of [cluster]"),
    ],
)
def test_never_banned_special_ranges_hubs_and_each_jails_ignoreip(ip, jail, reason):
    special = [ipaddress.ip_network(n) for n in ("169.254.0.0/16", "ff00::/8", "100.64.0.0/10")]
    rules = policy(special_ranges=special, hubs=[ipaddress.ip_network("203.0.113.5/32")])
    assert rules.ignore("cluster", ["198.51.100.0/24", "::10.0.0.1", "host.example"]) == [
        "host.example"
    ]
    assert rules.ignore("sshd-cluster", ["2001:db8:5::/48"]) == []
    event = ban(ip, jail)
    assert rules.refusal(event) == reason
    assert rules.wants(event) is (reason is None)


def test_unban_removes_and_views_of_several_hubs_unite():
    one = view(ban("192.0.2.1"), ban("192.0.2.2"))
    one.apply(BanEvent.new("node1", "nginx", "unban", "192.0.2.1"))
    two = view(ban("198.51.100.1"))
    assert desired_bans([one, two], policy(jail_map={}))["cluster"] == {
        "192.0.2.2",
        "198.51.100.1",
    }


def test_the_same_address_from_two_jails_is_one_local_ban():
    both = view(ban("192.0.2.1", "nginx"), ban("192.0.2.1", "postfix"))
    assert desired_bans([both], policy(jail_map={}))["cluster"] == {"192.0.2.1"}
    both.apply(BanEvent.new("node1", "nginx", "unban", "192.0.2.1"))
    assert desired_bans([both], policy(jail_map={}))["cluster"] == {"192.0.2.1"}


@pytest.mark.parametrize(
    "listed, canonical",
    [
        ("192.0.2.1", "192.0.2.1"),
        ("10.0.0.0/24", "10.0.0.0/24"),
        ("::10.0.0.5", "::a00:5"),  # inet_ntop's spelling of an IPv4-compatible address
        ("::10.0.0.0/120", "::a00:0/120"),
        ("2001:db8::1", "2001:db8::1"),
        ("2001:db8::/48", "2001:db8::/48"),
        ("::1", "::1"),
        ("host.example", "host.example"),  # not an address: compared as listed
    ],
)
def test_fail2bans_spelling_and_the_canonical_one_are_one_address(listed, canonical):
    assert listed_address(listed) == canonical
    assert fail2ban_address(canonical) == listed


def test_commands_grow_while_fail2ban_is_fast_and_stay_short_with_slow_actions():
    sizes = BatchSizer(limit=2000)
    assert sizes.size("cluster") == FIRST_BATCH
    # No action: 0.1 ms an address. Sizes grow by at most 4x a command, up to the limit.
    grown = []
    for _ in range(5):
        size = sizes.size("cluster")
        grown.append(size)
        sizes.observe("cluster", size, size * 0.0001)
    assert grown == [50, 200, 800, 2000, 2000]
    # A shell action in another jail: 10 ms an address, so about 25 a command.
    sizes.observe("sshd", FIRST_BATCH, FIRST_BATCH * 0.01)
    assert sizes.size("sshd") == int(COMMAND_SECONDS / 0.01)
    assert sizes.size("cluster") == 2000  # each jail is measured on its own


def test_a_slower_command_shrinks_the_next_and_one_address_always_fits():
    sizes = BatchSizer(limit=2000)
    sizes.observe("cluster", 800, 0.08)
    fast = sizes.size("cluster")
    sizes.observe("cluster", fast, 5.0)  # fail2ban got busy
    assert sizes.size("cluster") < fast / 10
    sizes.observe("cluster", 1, 30.0)  # an action that hangs
    assert sizes.size("cluster") == 1
    assert BatchSizer(limit=10).size("cluster") == 10


def test_after_a_failed_command_sizes_are_measured_again():
    sizes = BatchSizer(limit=2000)
    for size in (50, 200, 800):
        sizes.observe("cluster", size, size * 0.0001)
    assert sizes.size("cluster") == 2000
    sizes.reset()  # fail2ban timed out, or restarted with a slower action
    assert sizes.size("cluster") == FIRST_BATCH


def test_shipped_fail2ban_snippets_load_in_a_real_fail2ban(tmp_path):
    """The jail.d and filter.d files from etc/fail2ban/ with Debian's own jail.conf."""
    shipped = Path(__file__).resolve().parent.parent / "etc" / "fail2ban"
    server = Fail2banServer(tmp_path, "node", jails=Path("/etc/fail2ban/jail.conf").read_text())
    for name in ("paths-common.conf", "paths-debian.conf"):
        (server.config / name).symlink_to(Path("/etc/fail2ban") / name)
    (server.config / "jail.d").mkdir()
    shutil.copy(shipped / "jail.d" / "f2bzmq-cluster.conf", server.config / "jail.d")
    shutil.copy(shipped / "filter.d" / "f2bzmq-cluster.conf", server.config / "filter.d")
    # Only the action is replaced: the real one would change this machine's firewall.
    (server.config / "jail.local").write_text(
        f"[cluster]\naction = dummy[target={server.directory / 'cluster.dummy'}]\n"
    )
    with server, server.client() as client:
        assert client.jails() == ["cluster"]
        assert client.bantime("cluster") == 86400
        assert client.ban("cluster", ["192.0.2.1", "2001:db8::1"]) == 2
        assert sorted(server.banned("cluster")) == ["192.0.2.1", "2001:db8::1"]


NOW = 1_000_000.0


@pytest.mark.parametrize(
    ("end", "by_hand"),
    [
        (None, True),  # a ban for ever, gone: lifted
        (NOW + 3600, True),
        (NOW + END_SLACK + 1, True),
        (NOW + END_SLACK - 1, False),  # about when it ends: fail2ban ended it
        (NOW - 10, False),
    ],
)
def test_a_ban_gone_before_its_end_was_lifted_by_hand(end, by_hand):
    gone = removed_by_hand({"192.0.2.1", "192.0.2.2"}, {"192.0.2.2"}, {"192.0.2.1": end}, NOW)
    assert gone == (["192.0.2.1"] if by_hand else [])


def test_a_ban_whose_end_is_unknown_or_still_held_was_not_lifted_by_hand():
    assert removed_by_hand({"192.0.2.1"}, set(), {}, NOW) == []
    assert removed_by_hand({"192.0.2.1"}, {"192.0.2.1"}, {"192.0.2.1": None}, NOW) == []


def test_an_unban_by_hand_stands_until_the_cluster_bans_anew_or_no_longer():
    old = dataclasses.replace(ban("192.0.2.1", jail="sshd"), time=NOW - 60)
    unbans = HandUnbans()
    unbans.add("cluster", "192.0.2.1", NOW)
    unbans.add("cluster", "192.0.2.2", NOW)
    assert unbans.settle("cluster", "192.0.2.1", [old]) is None  # the ban it lifted
    assert ("cluster", "192.0.2.1") in unbans
    anew = dataclasses.replace(old, id="f" * 32, time=NOW + 1)
    assert unbans.settle("cluster", "192.0.2.1", [old, anew]) == "the cluster bans it anew"
    assert unbans.settle("cluster", "192.0.2.2", []) == "the cluster no longer bans it"
    assert len(unbans) == 0
    assert unbans.settle("cluster", "192.0.2.3", []) is None  # none to settle


def test_the_cluster_bans_of_an_address_are_those_the_policy_puts_into_that_jail():
    rules = policy()
    views = [
        view(ban("192.0.2.1", jail="sshd"), ban("192.0.2.1", jail="nginx")),
        view(ban("192.0.2.1", jail="postfix", node="node2")),  # the node's own: not applied
    ]
    assert [event.jail for event in cluster_bans(views, rules, "sshd-cluster", "192.0.2.1")] == [
        "sshd"
    ]
    assert [event.jail for event in cluster_bans(views, rules, "cluster", "192.0.2.1")] == ["nginx"]


def test_a_ban_a_snapshot_brought_counts_its_delay_if_made_since_the_start(tmp_path):
    """A subscriber that missed an update (a gap, a hub's restart) gets the ban from a
    snapshot: how late it came is a delay like any other. A ban made before the
    subscriber started is not: its age says how long the node was away."""
    policy = LocalPolicy("node2", "cluster", {}, [])
    with Fail2banServer(tmp_path, "node2") as server, server.client() as client:
        jails = LocalJails(policy, client, batch_size=100)
        view = ClusterView()
        old = BanEvent.new("node1", "sshd", "ban", "192.0.2.8", jails.since - 3600)
        missed = BanEvent.new("node1", "sshd", "ban", "192.0.2.9", jails.since + 0.01)
        for event in (old, missed):
            view.apply(event)
            jails.take_arrival(event)
        jails.compare_all()
        jails.reconcile([view])
        assert sorted(client.banned("cluster")) == ["192.0.2.8", "192.0.2.9"]
        assert jails.apply_delays.count == 1
        assert 0 <= jails.apply_delays.sum < 60
