"""What a node does about the operators' holds, without fail2ban: ignoreip entries added
while a hold lasts and taken out after (only its own), each unban lifted once."""

import pytest

from f2bzmq.holds import LocalHolds
from f2bzmq.protocol import Hold

NOW = 1_000_000.0
HELD = Hold("a" * 32, "192.0.2.1", None, NOW - 10, NOW + 60)  # every jail, a minute more
SSHD = Hold("b" * 32, "198.51.100.0/24", "sshd", NOW - 10, NOW + 60)
LIFT = Hold("c" * 32, "203.0.113.5", None, NOW - 10, NOW - 10)  # no hold
JAILS = ["sshd", "nginx", "cluster"]


def node(added=None, **hubs: list[Hold]) -> LocalHolds:
    holds = LocalHolds({"cluster"}, added)
    for hub, listed in hubs.items():
        holds.on_holds(hub, listed)
    return holds


@pytest.mark.parametrize(
    "hubs, added, ignored, ignore, lift, unignore, forget",
    [
        # A hold of every jail: ignored in each own jail (never the sync jail), lifted once.
        (
            {"hub1": [HELD]},
            None,
            {},
            [("nginx", "192.0.2.1"), ("sshd", "192.0.2.1")],
            [(["nginx", "sshd"], HELD)],
            [],
            [],
        ),
        # One jail's hold; a lift alone adds no ignoreip.
        (
            {"hub1": [SSHD, LIFT]},
            None,
            {},
            [("sshd", "198.51.100.0/24")],
            [(["sshd"], SSHD), (["nginx", "sshd"], LIFT)],
            [],
            [],
        ),
        # An address the jail's configuration ignores already is not added, so never removed.
        ({"hub1": [HELD]}, None, {"sshd": {"192.0.2.1"}}, [("nginx", "192.0.2.1")], None, [], []),
        # Two hubs tell of the same hold: one entry.
        (
            {"hub1": [HELD], "hub2": [HELD]},
            None,
            {},
            [("nginx", "192.0.2.1"), ("sshd", "192.0.2.1")],
            None,
            [],
            [],
        ),
        # The hold is over (the hub no longer lists it): what this node added goes.
        (
            {"hub1": []},
            {"sshd": {"192.0.2.1"}},
            {"sshd": {"192.0.2.1"}},
            [],
            [],
            [("sshd", "192.0.2.1")],
            [],
        ),
        # ... and one fail2ban no longer has (a reload) is only forgotten.
        ({"hub1": []}, {"sshd": {"192.0.2.1"}}, {}, [], [], [], [("sshd", "192.0.2.1")]),
    ],
)
def test_what_a_node_does_about_the_holds(hubs, added, ignored, ignore, lift, unignore, forget):
    holds = node(added, **hubs)
    plan = holds.plan(NOW, JAILS, ignored)
    assert plan.ignore == ignore
    if lift is not None:
        assert plan.lift == lift
    assert (plan.unignore, plan.forget) == (unignore, forget)


def test_a_hold_ends_on_the_nodes_clock_and_each_lift_is_done_once():
    holds = node(hub1=[HELD])
    plan = holds.plan(NOW, JAILS, {})
    holds.done(plan)
    assert holds.added == {"nginx": {"192.0.2.1"}, "sshd": {"192.0.2.1"}}
    ignored = {"nginx": {"192.0.2.1"}, "sshd": {"192.0.2.1"}}
    assert not holds.plan(NOW + 1, JAILS, ignored)
    assert holds.next_change(NOW) == NOW + 60
    over = holds.plan(NOW + 60, JAILS, ignored)
    assert over.unignore == [("nginx", "192.0.2.1"), ("sshd", "192.0.2.1")] and not over.lift
    holds.done(over)
    assert holds.added == {}


def test_what_fail2ban_did_not_finish_is_tried_again():
    holds = node(hub1=[HELD])
    plan = holds.plan(NOW, JAILS, {})
    plan.ignore = plan.ignore[:1]  # fail2ban went away after the first
    plan.lift = []
    holds.done(plan)
    again = holds.plan(NOW, JAILS, {"nginx": {"192.0.2.1"}})
    assert again.ignore == [("sshd", "192.0.2.1")] and again.lift == [(["nginx", "sshd"], HELD)]


def test_a_hold_a_hub_ends_early_ends_on_the_node_too():
    ended = Hold(HELD.id, HELD.ip, HELD.jail, HELD.time, NOW)
    holds = node(hub1=[HELD], hub2=[ended])
    assert holds.holds()[HELD.id].until == NOW
    assert not holds.on_holds("hub2", [ended])  # the same list again changes nothing
    assert holds.digest("hub2") and holds.digest("hub3") == ""
