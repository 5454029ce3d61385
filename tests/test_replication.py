"""How a hub reads its peers' logs of decisions, without a socket: whom to ask for what,
and what each answer means (ourselves, a peer's new state, more to read, a timeout)."""

from f2bzmq.protocol import Decision
from f2bzmq.replication import PULL_INTERVAL, PULL_TIMEOUT, Cursor, Replication, log_answer

OURS, THEIRS, NEW = "a" * 32, "b" * 32, "c" * 32
PEERS = ["tcp://10.0.0.5:5690", "tcp://10.0.0.6:5690"]
HERE, THERE = PEERS


def decisions(count: int, after: int = 0) -> list[tuple[int, Decision]]:
    """Log rows after row `after`."""
    return [
        (row, Decision.new("alice", "allow", 1e9, ip=f"192.0.2.{row}"))
        for row in range(after + 1, after + count + 1)
    ]


def test_a_peer_is_asked_from_its_stored_row_and_answers_move_the_cursor():
    replication = Replication(PEERS, OURS, {THERE: Cursor(THEIRS, 7)})
    assert replication.to_ask(0.0) == [(HERE, 0, False), (THERE, 7, False)]
    assert replication.to_ask(1.0) == []  # in flight
    assert replication.on_answer(HERE, log_answer(OURS, [], False), 1.0) is None
    assert HERE not in replication.cursors  # ourselves: never asked again
    rows = decisions(2, after=7)
    pulled = replication.on_answer(THERE, log_answer(THEIRS, rows, False), 1.0)
    assert pulled.decisions == [d for _, d in rows] and pulled.cursor == Cursor(THEIRS, 9)
    assert replication.to_ask(1.0 + PULL_INTERVAL - 0.1) == []
    assert replication.to_ask(1.0 + PULL_INTERVAL) == [(THERE, 9, False)]


def test_more_rows_are_read_at_once():
    replication = Replication([THERE], OURS, {THERE: Cursor(THEIRS, 0)})
    replication.to_ask(0.0)
    replication.on_answer(THERE, log_answer(THEIRS, decisions(2), True), 0.5)
    assert replication.to_ask(0.5) == [(THERE, 2, False)]


def test_a_peer_with_a_new_state_is_read_from_its_first_row():
    replication = Replication([THERE], OURS, {THERE: Cursor(THEIRS, 40)})
    replication.to_ask(0.0)
    pulled = replication.on_answer(THERE, log_answer(NEW, decisions(1), False), 0.5)
    assert pulled.decisions == [] and pulled.cursor == Cursor(NEW, 0)
    assert replication.to_ask(0.5) == [(THERE, 0, False)]


def test_an_unanswered_ask_is_made_again_on_a_fresh_socket_and_odd_answers_wait():
    replication = Replication([THERE], OURS, {})
    replication.to_ask(0.0)
    assert replication.next_deadline() == PULL_TIMEOUT
    assert replication.to_ask(PULL_TIMEOUT + 0.1) == [(THERE, 0, True)]
    assert replication.on_answer(THERE, {"error": "an older hub"}, PULL_TIMEOUT + 1) is None
    assert replication.to_ask(PULL_TIMEOUT + 2) == []
    assert replication.on_answer(THERE, log_answer(THEIRS, [], False), 99) is None  # not asked


def test_a_cursor_is_stored_as_text():
    assert Cursor.from_text(Cursor(THEIRS, 12).to_text()) == Cursor(THEIRS, 12)
    assert Cursor.from_text(None) == Cursor() == Cursor.from_text("garbage")
