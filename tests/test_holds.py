"""What a node does about the operators' holds, without fail2ban: ignoreip entries added
while a hold lasts and taken out after (only its own), each unban lifted once; and what a
relay hands on of its hub's holds, and to whom."""

import pytest

from f2bzmq import holds as holds_module
from f2bzmq.holds import LocalHolds, RelayedHolds
from f2bzmq.protocol import Hold, encode_holds, holds_digest

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


RECENT = 6.0  # seconds a relay counts a subscriber as heard
PACE = 1.0  # seconds between two presences of one subscriber that a relay passes on


def relayed(*holds: Hold) -> tuple[list[bytes], str]:
    """The hub's holds message and its digest."""
    return encode_holds(list(holds)), holds_digest(list(holds))


@pytest.mark.parametrize(
    "before, presence, gets",
    [
        (None, "", False),  # nothing from the hub yet: nothing to hand on
        ((HELD,), "", True),  # a subscriber without holds gets the hub's
        ((HELD,), "stale", True),  # one with other holds too
        ((HELD,), holds_digest([HELD]), False),  # one that has them does not
        ((), "", False),  # no holds, and the node has none
        ((), "stale", True),  # an empty list ends the holds the node had
    ],
)
def test_a_relay_hands_the_hubs_holds_to_a_subscriber_that_lacks_them(before, presence, gets):
    relay = RelayedHolds(RECENT, PACE)
    if before is not None:
        relay.on_holds(*relayed(*before), len(before), NOW)
    assert relay.on_presence(b"node2", presence, NOW) is gets
    assert relay.listeners(NOW) == [b"node2"]


def test_a_change_of_the_hubs_holds_goes_to_the_subscribers_heard_lately_once():
    relay = RelayedHolds(RECENT, PACE)
    relay.on_presence(b"gone", "", NOW - RECENT - 1)
    relay.on_presence(b"node2", "", NOW - 1)
    relay.on_presence(b"node3", "", NOW)
    message, digest = relayed(HELD)
    assert relay.on_holds(message, digest, 1, NOW) == [b"node2", b"node3"]
    assert (relay.message, relay.digest, relay.count) == (message, digest, 1)
    assert relay.on_holds(message, digest, 1, NOW) == []  # the same list again: no one
    relay.on_presence(b"node2", "", NOW + RECENT)  # heard again: the later time counts
    assert relay.listeners(NOW + RECENT + 0.5) == [b"node2"]
    assert relay.on_holds(*relayed(HELD, SSHD), 2, NOW + RECENT + 0.5) == [b"node2"]


def test_a_relay_remembers_a_bounded_number_of_subscribers(monkeypatch):
    monkeypatch.setattr(holds_module, "MAX_REGION", 3)
    relay = RelayedHolds(RECENT, PACE)
    for number in range(5):
        relay.on_presence(bytes([number]), "", NOW)
        relay.pass_on(f"web{number}", NOW)
    assert relay.listeners(NOW) == [b"\x02", b"\x03", b"\x04"]
    assert list(relay.passed) == ["web2", "web3", "web4"]
    assert relay.listeners(NOW + RECENT + 1) == []


def test_a_relay_without_the_hubs_holds_yet_asks_for_them_whatever_they_are():
    """Its presence carries a digest no list has, not the empty list's (""): the hub
    answers even with no holds, and a subscriber still holding ended ones hears so."""
    relay = RelayedHolds(RECENT, PACE)
    assert relay.digest not in ("", holds_digest([HELD]))
    assert not relay.on_presence(b"node2", "stale", NOW)  # nothing to hand on yet
    assert relay.on_holds(*relayed(), 0, NOW) == [b"node2"]  # the hub's empty list
    assert relay.on_presence(b"node2", "stale", NOW)


@pytest.mark.parametrize(
    "moments, passed",
    [
        ([0.0], [True]),
        ([0.0, 0.5, 1.0], [True, False, True]),  # a presence in a loop: one a PACE
        ([0.0, 0.1, 0.2, 0.3, 1.2], [True, False, False, False, True]),
    ],
)
def test_a_relay_passes_a_subscribers_presence_on_at_its_pace(moments, passed):
    relay = RelayedHolds(RECENT, PACE)
    result = []
    for moment in moments:
        connection = bytes([len(result)])  # a node asking on a new connection each time
        relay.on_presence(connection, "", NOW + moment)
        result.append(relay.pass_on("node2", NOW + moment))
    assert result == passed
    assert relay.pass_on("node3", NOW + moments[-1])  # each node at its own pace
