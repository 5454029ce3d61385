"""Who is in the cluster, without a socket: join requests, accepting and removing, and what
`nodes` lists of each node from its monitor's hellos and its subscriber's presence."""

import dataclasses

import pytest

from f2bzmq.protocol import Presence
from f2bzmq.roster import CONNECTED, MAX_PENDING, Roster, RosterError

NOW = 1_000_000.0
STATE = "ab" * 16
KEY1, KEY2, KEY3 = "1" * 40, "2" * 40, "3" * 40


def asking(*requests: tuple[str, str | None]) -> Roster:
    """A roster where each (key, name) asked to join."""
    roster = Roster()
    for key, name in requests:
        roster.on_join(key, f"SHA256:{key[0]}", name, "10.0.0.7", "0.1.0", NOW)
    return roster


@pytest.mark.parametrize(
    "requests, nodes, name, fingerprint, outcome",
    [
        ([(KEY1, "web3")], {}, "web3", None, (KEY1, None)),
        ([(KEY1, "web3")], {}, "web3", "SHA256:1", (KEY1, None)),
        ([(KEY1, None)], {}, "web3", "SHA256:1", (KEY1, None)),  # a monitor that names none
        ([(KEY1, "web3")], {KEY2: "web3"}, "web3", None, (KEY1, KEY2)),  # a new key of web3
        ([], {}, "web3", None, "no node web3 asks to join"),
        ([(KEY1, "web3"), (KEY2, "web3")], {}, "web3", None, "2 keys ask to join as web3"),
        ([(KEY1, "web3"), (KEY2, "web3")], {}, "web3", "SHA256:2", (KEY2, None)),
        ([(KEY1, "web3")], {}, "web3", "SHA256:9", "no key with fingerprint SHA256:9"),
        ([(KEY1, "web4")], {}, "web3", "SHA256:1", "asks to join as web4"),
        ([(KEY1, "web3")], {KEY1: "web1"}, "web3", None, "that key is node web1's already"),
    ],
)
def test_who_may_be_accepted(requests, nodes, name, fingerprint, outcome):
    roster = asking(*requests)
    if isinstance(outcome, str):
        with pytest.raises(RosterError, match=outcome):
            roster.accept(name, fingerprint, nodes)
    else:
        assert roster.accept(name, fingerprint, nodes) == outcome


def test_an_accepted_node_and_any_other_key_in_its_name_ask_no_more():
    roster = asking((KEY1, "web3"), (KEY2, "web3"), (KEY3, "web4"))
    roster.accepted("web3", KEY1)
    assert list(roster.pending) == [KEY3]


@pytest.mark.parametrize(
    "requests, nodes, name, keys",
    [
        ([], {KEY1: "web3"}, "web3", [KEY1]),
        ([(KEY2, "web3")], {KEY1: "web3"}, "web3", [KEY1, KEY2]),
        ([(KEY2, "web3")], {}, "web3", [KEY2]),
        ([], {KEY1: "web1"}, "web3", "no node web3"),
    ],
)
def test_who_is_removed(requests, nodes, name, keys):
    roster = asking(*requests)
    if isinstance(keys, str):
        with pytest.raises(RosterError, match=keys):
            roster.remove(name, nodes)
    else:
        assert roster.remove(name, nodes) == keys
        roster.removed(name, keys)
        assert not roster.pending


def test_join_requests_are_bounded_and_a_request_again_only_updates_it():
    roster = Roster()
    for n in range(MAX_PENDING + 5):
        assert roster.on_join(f"{n:040d}", "fp", f"n{n}", "", None, NOW + n)
    assert len(roster.pending) == MAX_PENDING
    assert f"{0:040d}" not in roster.pending  # the oldest went first
    key = f"{MAX_PENDING:040d}"
    assert not roster.on_join(key, "fp", None, "10.0.0.9", "0.2", NOW + 500)
    request = roster.pending[key]
    assert (request.name, request.address, request.version, request.last) == (
        f"n{MAX_PENDING}",
        "10.0.0.9",
        "0.2",
        NOW + 500,
    )


def presence(seq: int, synced: bool = True, state: str = STATE) -> Presence:
    return Presence(state, seq, synced, "0.1.0", ("sshd", "cluster"), "")


@pytest.mark.parametrize(
    "hello, seen, what, expected",
    [
        (0, (0, presence(10)), "synced lag", (True, True, True, 2)),
        (0, (0, presence(10, synced=False)), "synced lag", (True, True, False, 2)),
        (0, (0, presence(10, state="cd" * 16)), "synced lag", (True, True, False, None)),
        (CONNECTED + 1, (CONNECTED + 1, presence(12)), "gone", (False, False, False, None)),
        (0, None, "no subscriber", (True, False, False, None)),
    ],
)
def test_what_nodes_lists_of_a_node(hello, seen, what, expected):
    roster = Roster()
    roster.on_hello("web1", "0.1.0", "10.0.0.1", NOW - hello)
    if seen is not None:
        roster.on_presence("web1", seen[1], "10.0.0.1", b"peer", NOW - seen[0])
    (row,) = roster.node_rows({KEY1: "web1"}, {KEY1: "SHA256:x"}, {"web1": NOW - 5}, STATE, 12, NOW)
    assert (row["monitor"], row["subscriber"], row["synced"], row["lag"]) == expected, what
    assert (row["node"], row["fingerprint"], row["address"], row["version"]) == (
        "web1",
        "SHA256:x",
        "10.0.0.1",
        "0.1.0",
    )
    assert row["last_report"] == NOW - 5


def test_subscribers_heard_lately_get_pushes_and_their_jails_are_known():
    roster = Roster()
    roster.on_presence("web1", presence(1), "", b"one", NOW)
    roster.on_presence("web2", presence(1), "", b"two", NOW - CONNECTED - 1)
    assert roster.subscribers(NOW) == [("web1", b"one")]
    assert roster.jails() == {"sshd", "cluster"}
    assert roster.applied(STATE, NOW) == {"web1": 1}


def test_a_relay_is_listed_as_one_and_applies_no_ban():
    roster = Roster()
    relay = Presence(STATE, 12, True, "0.1.0", (), "", relay=True)
    roster.on_presence("relay1", relay, "10.1.0.7", b"relay", NOW)
    roster.on_presence("web1", presence(12), "", b"one", NOW)
    nodes = {KEY1: "relay1", "K2": "web1"}
    rows = roster.node_rows(nodes, {}, {}, STATE, 12, NOW)
    assert [(r["node"], r["relay"], r["synced"]) for r in rows] == [
        ("relay1", True, True),
        ("web1", False, True),
    ]
    assert roster.applied(STATE, NOW) == {"web1": 12}  # "applied by" names nodes only
    assert roster.subscribers(NOW) == [("relay1", b"relay"), ("web1", b"one")]  # holds go to both


def relayed(seq: int, node: str = "web2", relay: bool = False) -> Presence:
    """A relay's word for `node`."""
    return dataclasses.replace(presence(seq), node=node, relay=relay)


ACCEPTED = {"relay1", "relay2", "web1", "web2"}


@pytest.mark.parametrize(
    "sender, told, believed, listed",
    [
        ("relay1", relayed(10), True, "relay1"),
        ("relay2", relayed(10), False, None),  # a relay the configuration does not name
        ("web1", relayed(10), False, None),  # a node speaking for another
        ("relay1", relayed(10, node="web9"), True, None),  # a name the hub does not accept
        ("relay1", relayed(10, node="relay1"), True, None),  # for itself: it says so itself
        ("relay1", relayed(10, relay=True), True, None),  # a relay behind it: listed by none
    ],
)
def test_whose_word_for_a_node_behind_a_relay_the_hub_takes(sender, told, believed, listed):
    roster = Roster()
    assert roster.on_relayed(sender, told, ["relay1"], ACCEPTED, NOW) is believed
    heard = roster.heard.get(told.node)
    assert (heard.via if heard else None) == listed
    if heard is None:
        assert told.node not in roster.heard  # nothing kept of a name not believed


def test_a_node_behind_a_relay_is_listed_by_the_relays_word():
    roster = Roster()
    roster.on_relayed("relay1", relayed(10), ["relay1"], ACCEPTED, NOW)
    (row,) = roster.node_rows({KEY1: "web2"}, {}, {}, STATE, 12, NOW)
    assert (row["subscriber"], row["via"], row["synced"], row["lag"]) == (True, "relay1", True, 2)
    assert roster.applied(STATE, NOW) == {"web2": 10}  # it applies the bans
    assert roster.subscribers(NOW) == []  # its holds come from the relay
    # What the node tells this hub itself counts first while it is recent.
    roster.on_presence("web2", presence(12), "", b"own", NOW)
    roster.on_relayed("relay1", relayed(3), ["relay1"], ACCEPTED, NOW + 1)
    (row,) = roster.node_rows({KEY1: "web2"}, {}, {}, STATE, 12, NOW + 1)
    assert (row["via"], row["lag"]) == (None, 0)
    roster.on_relayed("relay1", relayed(11), ["relay1"], ACCEPTED, NOW + CONNECTED + 1)
    (row,) = roster.node_rows({KEY1: "web2"}, {}, {}, STATE, 12, NOW + CONNECTED + 1)
    assert (row["via"], row["lag"]) == ("relay1", 1)
    assert roster.subscribers(NOW + CONNECTED + 1) == []
