"""The operators' rules on the hub, without a socket: what each decision may be and what it
does to the ban table, the holds and the allowlist; what the desk answers each verb."""

import ipaddress
import re

import pytest

from f2bzmq.decisions import DecisionError, Operators, ban_rows
from f2bzmq.desk import Desk, HubView
from f2bzmq.holds import LIFT_MEMORY
from f2bzmq.protocol import AdminRequest, BanEvent, Decision, NetworkLimits, holds_digest
from f2bzmq.roster import Roster
from f2bzmq.state import BanTable

NOW = 1_000_000.0
JAILS = {"cluster", "sshd"}


def hub(*bans: tuple[str, str, str]) -> Operators:
    """A hub's table holding each (node, jail, address) ban, and its operators' state."""
    table = BanTable("hub", 600)
    for node, jail, ip in bans:
        table.apply(BanEvent.new(node, jail, "ban", ip, NOW - 10, 600), NOW - 10)
    allowlist = [ipaddress.ip_network("127.0.0.0/8")]
    return Operators(table, NetworkLimits(), allowlist, 600)


def lift(operators: Operators, ip: str, jail: str | None = None, hold: float = 0.0, when=NOW):
    decision = operators.make_unban("alice", ip, jail, hold, "", JAILS, when)
    return decision, operators.apply(decision, when)


def test_an_operators_ban_is_an_origin_of_its_own_and_broadcast_once():
    operators = hub()
    decisions, refused = operators.make_bans(
        "alice", [("192.0.2.1", None), ("192.0.2.2", 60)], "cluster", "scan", JAILS, NOW
    )
    assert refused == []
    done = [operators.apply(decision, NOW) for decision in decisions]
    assert [d.outcome for d in done] == ["banned", "banned"]
    (update,) = done[0].updates
    assert (update.event.node, update.event.ip, update.event.bantime) == (
        "operator.alice",
        "192.0.2.1",
        600,
    )
    assert operators.table.bans[("cluster", "192.0.2.2")].origins == {"operator.alice": NOW + 60}
    assert operators.apply(decisions[0], NOW).outcome == "known"  # a peer hands it back
    assert ("decision", decisions[0]) in operators.table.journal


def test_an_operators_ban_meets_what_the_hub_learned_it_must_never_ban():
    """The hub's allowlist beyond its configured networks (special-purpose ranges, hubs,
    nodes' addresses), which the shell hands over as `never_banned`: an operator's ban and
    a peer hub's decision of one are refused like a node's report."""
    operators = hub()
    learned = {"10.0.0.5": "10.0.0.5 is the address of node web2"}
    operators.never_banned = learned.get
    decisions, refused = operators.make_bans(
        "alice", [("10.0.0.5", None), ("198.51.100.1", None)], "cluster", "", JAILS, NOW
    )
    assert [d.ip for d in decisions] == ["198.51.100.1"]
    assert refused == [("10.0.0.5", "10.0.0.5 is the address of node web2")]
    peer = Decision.new("bob", "ban", NOW, jail="cluster", ip="10.0.0.5", bantime=600)
    assert operators.apply(peer, NOW).outcome.startswith("refused: 10.0.0.5 is the address")
    assert ("cluster", "10.0.0.5") not in operators.table.bans


@pytest.mark.parametrize(
    "ip, jail, refusal",
    [
        ("192.0.2.1", "nosuch", "unknown jail 'nosuch': the cluster knows cluster, sshd"),
    ],
)
def test_a_ban_in_a_jail_the_cluster_does_not_know_is_refused_whole(ip, jail, refusal):
    with pytest.raises(DecisionError, match=refusal):
        hub().make_bans("alice", [(ip, None)], jail, "", JAILS, NOW)


@pytest.mark.parametrize(
    "ip, refusal",
    [
        ("nope", "'nope' is not an address"),
        ("10.0.0.0/8", "wider than the allowed /24"),
        ("127.0.0.5", "127.0.0.5 is in the hub's allowlist"),
        ("192.0.2.7", "192.0.2.7 is held by alice until .*: `unban 192.0.2.0/24 --hold 0`"),
    ],
)
def test_each_address_of_a_ban_is_refused_alone_with_the_reason(ip, refusal):
    operators = hub()
    lift(operators, "192.0.2.0/24", hold=3600)
    decisions, refused = operators.make_bans(
        "alice", [(ip, None), ("198.51.100.1", None)], "cluster", "", JAILS, NOW
    )
    assert [d.ip for d in decisions] == ["198.51.100.1"]
    ((what, why),) = refused
    assert what == ip
    assert re.search(refusal, why), why


def test_an_unban_lifts_every_origin_of_every_overlapping_ban_in_the_jails_named():
    operators = hub(
        ("node1", "sshd", "192.0.2.1"),
        ("node2", "sshd", "192.0.2.1"),
        ("node1", "nginx", "192.0.2.1"),
        ("node1", "sshd", "192.0.2.0/24"),
        ("node1", "sshd", "198.51.100.1"),
    )
    _, done = lift(operators, "192.0.2.1", "sshd")
    assert done.lifted == [("sshd", "192.0.2.0/24"), ("sshd", "192.0.2.1")]
    assert [u.event.action for u in done.updates] == ["unban", "unban"]
    assert {u.event.node for u in done.updates} == {"operator.alice"}
    assert set(operators.table.bans) == {("nginx", "192.0.2.1"), ("sshd", "198.51.100.1")}
    _, everywhere = lift(operators, "192.0.2.0/24")
    assert everywhere.lifted == [("nginx", "192.0.2.1")]
    _, nothing = lift(operators, "203.0.113.1")
    assert (nothing.lifted, nothing.updates, nothing.holds_changed) == ([], [], True)


def test_an_unban_of_the_same_event_on_two_hubs_broadcasts_the_same_ids():
    first, second = hub(("node1", "sshd", "192.0.2.1")), hub(("node1", "sshd", "192.0.2.1"))
    decision, done = lift(first, "192.0.2.1")
    assert [u.event.id for u in second.apply(decision, NOW).updates] == [
        u.event.id for u in done.updates
    ]


@pytest.mark.parametrize(
    "hold, jail, later, banned_jail, held",
    [
        (3600, None, 10, "sshd", True),
        (3600, None, 3599, "cluster", True),
        (3600, None, 3600, "sshd", False),  # over
        (3600, "sshd", 10, "sshd", True),
        (3600, "sshd", 10, "nginx", False),  # another jail
        (0, None, 1, "sshd", False),  # a lift only
    ],
)
def test_a_hold_keeps_an_address_from_being_banned_again_until_it_ends(
    hold, jail, later, banned_jail, held
):
    operators = hub()
    decision, _ = lift(operators, "192.0.2.1", jail, hold)
    found = operators.holds.holding(banned_jail, "192.0.2.1", NOW + later)
    assert (found is not None) == held
    if held:
        assert found == (operators.holds.entries[decision.id], "alice")


def test_a_later_unban_of_the_same_address_ends_the_hold_and_the_list_forgets_old_lifts():
    operators = hub()
    first, _ = lift(operators, "192.0.2.1", hold=3600)
    second, _ = lift(operators, "192.0.2.1", when=NOW + 5)  # unban --hold 0
    holds = {hold.id: hold for hold in operators.holds.current(NOW + 6)}
    assert holds[first.id].until == NOW + 5 and holds[second.id].until == NOW + 5
    assert operators.holds.holding("sshd", "192.0.2.1", NOW + 6) is None
    assert operators.holds.digest(NOW + 6) == holds_digest(list(holds.values()))
    assert operators.holds.next_change(NOW + 6) == NOW + LIFT_MEMORY
    assert operators.holds.current(NOW + 5 + LIFT_MEMORY) == []
    assert operators.holds.digest(NOW + 5 + LIFT_MEMORY) == ""


def test_the_allowlist_takes_networks_lifts_what_they_cover_and_gives_back_only_its_own():
    operators = hub(("node1", "sshd", "203.0.113.5"), ("node1", "sshd", "192.0.2.1"))
    allow = operators.make_allow("alice", "203.0.113.0/24", "office", NOW)
    done = operators.apply(allow, NOW)
    assert done.allowlist_changed and done.lifted == [("sshd", "203.0.113.5")]
    assert operators.allowlist.covers("203.0.113.9")
    with pytest.raises(DecisionError, match="in the allowlist already"):
        operators.make_allow("alice", "203.0.113.0/24", "", NOW)
    with pytest.raises(DecisionError, match="127.0.0.0/8 is in .publisher. allowlist of"):
        operators.make_disallow("alice", "127.0.0.0/8", "", NOW)
    with pytest.raises(DecisionError, match="198.51.100.0/24 is not in the allowlist"):
        operators.make_disallow("alice", "198.51.100.0/24", "", NOW)
    assert [row["source"] for row in operators.allowlist_rows()] == [
        "configuration",
        "operator alice",
    ]
    operators.apply(operators.make_disallow("alice", "203.0.113.0/24", "", NOW), NOW)
    assert not operators.allowlist.covers("203.0.113.9")


def test_a_hub_that_restarts_replays_its_log_for_holds_allowlist_and_removed_keys():
    operators = hub()
    ban = operators.make_bans("alice", [("192.0.2.9", None)], "cluster", "why", JAILS, NOW)[0][0]
    log = [
        ban,
        Decision.new("alice", "unban", NOW, ip="192.0.2.1", hold=3600.0),
        Decision.new("alice", "allow", NOW, ip="203.0.113.0/24"),
        Decision.new("alice", "allow", NOW, ip="198.51.100.0/24"),
        Decision.new("alice", "disallow", NOW, ip="198.51.100.0/24"),
        Decision.new("alice", "remove", NOW, node="web3", key="a" * 40),
        Decision.new("alice", "remove", NOW, node="web4", key="b" * 40),
        Decision.new("alice", "accept", NOW, node="web4", key="b" * 40),
    ]
    operators.apply(ban, NOW)
    again = Operators(operators.table, NetworkLimits(), [], 600)
    again.restore(log, NOW + 1)
    assert again.known == {d.id for d in log}
    assert again.bans == {("cluster", "192.0.2.9"): ban}
    assert again.holds.holding("sshd", "192.0.2.1", NOW + 1) is not None
    assert [row["network"] for row in again.allowlist_rows()] == ["203.0.113.0/24"]
    assert again.removed == {"a" * 40: "web3"}


def test_bans_list_each_origin_and_how_it_got_there():
    operators = hub(("node1", "sshd", "192.0.2.1"), ("gone", "sshd", "192.0.2.1"))
    decisions, _ = operators.make_bans(
        "alice", [("192.0.2.1", None), ("198.51.100.1", -1)], "sshd", "scan", JAILS, NOW
    )
    for decision in decisions:
        operators.apply(decision, NOW)
    table = operators.table
    rows = ban_rows(table, operators, {"node1", "node2"}, {"node2": table.sequence}, NOW)
    first, second = rows
    assert [(o["node"], o["source"]) for o in first["origins"]] == [
        ("node1", "report"),
        ("gone", "expiry"),
        ("operator.alice", "operator"),
    ]
    assert first["origins"][2]["reason"] == "scan" and first["until"] == NOW + 600
    assert first["applied"] == ["node2"] and second["until"] is None
    only = ban_rows(table, operators, set(), {}, NOW, node="gone")
    assert [row["ip"] for row in only] == ["192.0.2.1"]
    assert ban_rows(table, operators, set(), {}, NOW, network="198.51.100.0/24")[0]["ip"] == (
        "198.51.100.1"
    )
    assert ban_rows(table, operators, set(), {}, NOW, jail="nginx") == []


def view(**changes) -> HubView:
    fields = dict(
        nodes={},
        state="ab" * 16,
        sequence=0,
        last_report={},
        jails=set(),
        sync_jail="cluster",
        name="hub",
        hub_key="k" * 40,
        refusals={"r" * 40: (NOW - 5, 3)},
    )
    fields.update(changes)
    return HubView(**fields)


def test_the_desk_answers_each_verb_and_turns_refusals_into_errors():
    operators = hub(("node1", "sshd", "192.0.2.1"))
    desk = Desk(operators.table, operators, Roster())

    def ask(verb, **args):
        return desk.handle(AdminRequest(verb, args), "alice", view(), NOW)

    banned = ask("ban", items=[("198.51.100.1", None), ("127.0.0.1", None)], reason="r")
    assert banned.result["jail"] == "cluster" and banned.result["banned"] == 1
    assert banned.result["refused"] == [
        {"ip": "127.0.0.1", "reason": "127.0.0.1 is in the hub's allowlist"}
    ]
    assert ask("ban", items=[("198.51.100.1", None)]).result["already"] == 1
    assert ask("ban", items=[("1.2.3.4", None)], jail="nosuch").result == {
        "error": "unknown jail 'nosuch': the cluster knows cluster, sshd"
    }
    assert [b["ip"] for b in ask("bans").result["bans"]] == ["192.0.2.1", "198.51.100.1"]
    assert [b["ip"] for b in ask("bans", offset=1).result["bans"]] == ["198.51.100.1"]
    unban = ask("unban", ip="192.0.2.1", hold=60.0)
    assert unban.result["lifted"] == [{"jail": "sshd", "ip": "192.0.2.1"}]
    assert unban.result["held_until"] == NOW + 60
    pending = ask("pending").result
    assert pending["hub_key"] == "k" * 40 and pending["pending"] == []
    assert [(r["node"], r["count"]) for r in pending["refused"]] == [(None, 3)]
    assert ask("accept", node="web9").result == {
        "error": "no node web9 asks to join (see `nodes pending`)"
    }
    assert ask("remove", node="web9").result == {
        "error": "no node web9 (see `nodes` and `nodes pending`)"
    }
