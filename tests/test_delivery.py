"""The monitor's delivery window to one hub: outbox rows, answers and `now` in, decisions out."""

import pytest

from f2bzmq.delivery import (
    ADOPT,
    BLOCKED_PAUSE,
    FRESH,
    HELLO_INTERVAL,
    HELLO_RETRY,
    MAX_BACKOFF,
    REREPORT,
    REREPORT_BANS,
    RETRY_PAUSE,
    DeliveryWindow,
    Greeting,
    Reset,
)
from f2bzmq.protocol import MAX_REPORT_EVENTS, Answer, Welcome

T0 = 1000.0  # a monotonic clock
ACK_TIMEOUT = 5.0


def eid(number: int) -> str:
    return f"{number:032x}"


def rows(*numbers: int) -> list[tuple[int, str, bytes]]:
    return [(number, eid(number), b"x" * 250) for number in numbers]


def ack(number: int) -> Answer:
    return Answer(eid(number), True, outcome="banned")


def nak(number: int, retry: bool = False) -> Answer:
    return Answer(eid(number), False, reason="no", retry=retry)


def window_with(*numbers: int, size: int = 10, at: float = T0) -> DeliveryWindow:
    window = DeliveryWindow(size, ACK_TIMEOUT)
    window.take(rows(*numbers), at)
    return window


def sent(reports: list) -> list[int]:
    return [row for report in reports for row, _, _ in report]


def test_rows_go_out_in_reports_up_to_the_room_left_and_the_cursor_follows():
    window = DeliveryWindow(3, ACK_TIMEOUT)
    assert (window.room(T0), window.cursor) == (3, 0)
    assert window.take(rows(4, 5, 7, 9), T0) == [rows(4, 5, 7)]  # one report, 3 at most
    assert (window.room(T0), window.cursor, list(window.in_flight)) == (
        0,
        7,
        [eid(4), eid(5), eid(7)],
    )
    assert window.take(rows(9), T0) == []  # full: nothing taken, the cursor stays
    assert window.cursor == 7
    window.on_answers([ack(4)], T0 + 0.1)
    assert window.room(T0 + 0.1) == 1
    assert window.take(rows(9), T0 + 0.1) == [rows(9)]
    assert window.in_flight[eid(9)] == (9, T0 + 0.1)


def test_a_burst_goes_out_in_reports_of_at_most_max_report_events():
    window = DeliveryWindow(1000, ACK_TIMEOUT)
    reports = window.take(rows(*range(1, 251)), T0)
    assert [len(report) for report in reports] == [MAX_REPORT_EVENTS, MAX_REPORT_EVENTS, 50]
    assert sent(reports) == list(range(1, 251)) and window.cursor == 250


# What one answer does to a window with events 1 and 2 in flight since T0, at T0 + 0.25:
# (answer, ids out of the outbox, refused, throttled, stray, left in flight, room, cursor).
ANSWERS = [
    ("ACK", ack(1), [1], [], [], [], [2], 9, 2),
    ("NAK", nak(1), [1], [1], [], [], [2], 9, 2),
    ("retry NAK", nak(1, retry=True), [], [], [1], [], [2], 0, 0),
    ("retry NAK of the last", nak(2, retry=True), [], [], [2], [], [1], 0, 1),
    (
        "NAK of a whole report",
        Answer("", False, reason="expected 1-100"),
        [],
        [],
        [],
        [""],
        [1, 2],
        8,
        2,
    ),
    ("NAK of no event in flight", nak(9), [], [], [], [9], [1, 2], 8, 2),
    ("ACK of no event in flight", ack(9), [], [], [], [], [1, 2], 8, 2),
]


@pytest.mark.parametrize(
    "answer, leave, refused, throttled, stray, in_flight, room, cursor",
    [case[1:] for case in ANSWERS],
    ids=[case[0] for case in ANSWERS],
)
def test_what_an_answer_does(answer, leave, refused, throttled, stray, in_flight, room, cursor):
    window = window_with(1, 2)
    now = T0 + 0.25
    answered = window.on_answers([answer], now)
    assert answered.leave == [eid(n) for n in leave]
    assert [a.id for a in answered.refused] == [eid(n) for n in refused]
    assert [a.id for a in answered.throttled] == [eid(n) for n in throttled]
    assert [a.id for a in answered.stray] == [eid(n) if n else "" for n in stray]
    assert answered.acked == len(leave) - len(refused)
    assert answered.delays == ([0.25] if leave or throttled else [])
    assert list(window.in_flight) == [eid(n) for n in in_flight]
    assert (window.room(now), window.cursor) == (room, cursor)


def test_a_retry_nak_pauses_then_sends_the_event_again_but_not_those_still_in_flight():
    window = window_with(1, 2, 3)
    answered = window.on_answers([nak(2, retry=True)], T0 + 0.1)
    assert [a.id for a in answered.throttled] == [eid(2)] and answered.leave == []
    assert window.next_deadline(T0 + 0.1) == T0 + 0.1 + RETRY_PAUSE
    assert window.room(T0 + 0.1 + RETRY_PAUSE - 0.01) == 0
    later = T0 + 0.1 + RETRY_PAUSE
    # The outbox gives what lies past the cursor: 2 again, 3 (in flight) and a new 4.
    assert window.take(rows(2, 3, 4), later) == [rows(2, 4)]
    assert window.cursor == 4
    # In the order sent, which is how the window finds the oldest at a glance.
    assert list(window.in_flight.items()) == [
        (eid(1), (1, T0)),
        (eid(3), (3, T0)),
        (eid(2), (2, later)),
        (eid(4), (4, later)),
    ]


def test_answers_in_one_batch_each_count():
    window = window_with(1, 2, 3, 4)
    answered = window.on_answers([ack(1), nak(2), ack(3), nak(4, retry=True)], T0 + 1)
    assert answered.leave == [eid(1), eid(2), eid(3)]
    assert answered.acked == 2 and len(answered.refused) == 1 and len(answered.throttled) == 1
    assert window.in_flight == {} and window.cursor == 3


def test_no_answer_within_ack_timeout_resets_the_link_after_a_doubling_backoff():
    window = window_with(1, 2)
    window.take(rows(3), T0 + 1)
    assert window.next_deadline(T0 + 1) == T0 + ACK_TIMEOUT  # the oldest decides
    assert window.on_tick(T0 + ACK_TIMEOUT) is None
    now = T0 + ACK_TIMEOUT + 0.01
    assert window.on_tick(now) == Reset(pytest.approx(ACK_TIMEOUT + 0.01), False, now + 0.5)
    assert (window.in_flight, window.cursor, window.room(now)) == ({}, 0, 0)
    assert window.on_tick(now + 100) is None  # nothing in flight: nothing to wait for
    backoffs = []
    for _ in range(8):
        now = window.paused_until
        assert sent(window.take(rows(1, 2, 3), now)) == [1, 2, 3]  # all again, from the oldest
        reset = window.on_tick(now + ACK_TIMEOUT + 0.01)
        backoffs.append(reset.until - (now + ACK_TIMEOUT + 0.01))
    assert backoffs == pytest.approx([1, 2, 4, 8, 16, MAX_BACKOFF, MAX_BACKOFF, MAX_BACKOFF])


def test_any_answer_of_an_event_in_flight_ends_the_backoff_series():
    window = window_with(1)
    window.on_tick(T0 + ACK_TIMEOUT + 1)
    now = window.paused_until
    window.take(rows(1), now)
    window.on_tick(now + ACK_TIMEOUT + 1)
    assert window.failures == 2
    now = window.paused_until
    window.take(rows(1, 2), now)
    window.on_answers([nak(1, retry=True)], now + 0.1)
    assert window.failures == 0
    reset = window.on_tick(now + ACK_TIMEOUT + 1)  # 2 still unanswered
    assert reset.until == now + ACK_TIMEOUT + 1 + 0.5


def test_reports_the_socket_could_not_take_are_taken_again_after_a_pause():
    window = DeliveryWindow(10, ACK_TIMEOUT)
    reports = window.take(rows(*range(1, 151)), T0)
    assert sent(reports) == list(range(1, 11)) and window.cursor == 10
    window.unsent(reports, T0)
    assert (window.in_flight, window.cursor, window.blocked_since) == ({}, 0, T0)
    assert window.room(T0 + BLOCKED_PAUSE - 0.01) == 0
    assert window.next_deadline(T0) == T0 + BLOCKED_PAUSE
    assert sent(window.take(rows(*range(1, 151)), T0 + BLOCKED_PAUSE)) == list(range(1, 11))


def test_only_the_reports_left_unsent_go_back():
    window = DeliveryWindow(500, ACK_TIMEOUT)
    reports = window.take(rows(*range(1, 251)), T0)
    window.unsent(reports[1:], T0)  # the first report left, the other two did not
    assert list(window.in_flight) == [eid(n) for n in range(1, 101)]
    assert (window.cursor, window.blocked_since) == (100, T0)


def test_a_link_that_stays_blocked_is_reset_even_with_nothing_in_flight():
    window = DeliveryWindow(10, ACK_TIMEOUT)
    for now in (T0, T0 + 1, T0 + 2.5, T0 + ACK_TIMEOUT):
        assert window.room(now) == 10
        window.unsent(window.take(rows(1, 2), now), now)
        assert window.in_flight == {} and window.room(now) == 0
        assert window.on_tick(now) is None
        assert window.next_deadline(now) == min(now + BLOCKED_PAUSE, T0 + ACK_TIMEOUT)
    assert window.blocked_since == T0  # the first failure counts
    now = T0 + ACK_TIMEOUT + 0.05
    assert window.on_tick(now) == Reset(pytest.approx(ACK_TIMEOUT + 0.05), True, now + 0.5)
    assert window.blocked_since is None and window.cursor == 0


def test_an_answer_ends_the_blocked_state():
    window = window_with(1)
    window.unsent(window.take(rows(2), T0 + 1), T0 + 1)
    assert window.blocked_since == T0 + 1
    window.on_answers([ack(1)], T0 + 2)
    assert window.blocked_since is None
    assert window.next_deadline(T0 + 2) is None


def test_an_idle_window_has_no_deadline():
    window = DeliveryWindow(10, ACK_TIMEOUT)
    assert window.next_deadline(T0) is None and window.on_tick(T0 + 3600) is None
    window.take(rows(1), T0)
    window.on_answers([ack(1)], T0 + 0.01)
    assert window.next_deadline(T0 + 0.01) is None and window.on_tick(T0 + 3600) is None


# Two lanes: fresh events (what the log said) and re-reports (bans the node holds, again).


def test_rereports_take_only_the_room_fresh_events_leave_and_fresh_ones_never_wait():
    window = DeliveryWindow(4, ACK_TIMEOUT)
    assert sent(window.take(rows(1, 2, 3), T0, REREPORT)) == [1, 2, 3]
    assert (window.rereport_cursor, window.cursor) == (3, 0)
    assert window.room(T0, REREPORT) == 1 and window.room(T0, FRESH) == 4
    assert sent(window.take(rows(10, 11, 12), T0, FRESH)) == [10, 11, 12]
    assert window.room(T0, REREPORT) == 0  # the window is full: re-reports wait
    assert window.room(T0, FRESH) == 1  # a new ban still goes at once
    window.on_answers([ack(1), ack(2), ack(10)], T0 + 0.01)
    assert (window.room(T0 + 0.01, REREPORT), window.room(T0 + 0.01, FRESH)) == (1, 2)


def test_a_throttled_rereport_pauses_its_lane_only():
    window = DeliveryWindow(10, ACK_TIMEOUT)
    window.take(rows(1, 2), T0, REREPORT)
    window.take(rows(5), T0, FRESH)
    answered = window.on_answers([nak(2, retry=True)], T0 + 0.1)
    assert [a.id for a in answered.throttled] == [eid(2)]
    assert (window.rereport_cursor, window.cursor) == (1, 5)
    assert window.room(T0 + 0.1, REREPORT) == 0 and window.room(T0 + 0.1, FRESH) == 9
    assert window.next_deadline(T0 + 0.1) == T0 + 0.1 + RETRY_PAUSE
    assert sent(window.take(rows(2, 3), T0 + 0.1 + RETRY_PAUSE, REREPORT)) == [2, 3]
    # A throttled fresh event pauses both: the hub wants this node to slow down.
    window.on_answers([nak(5, retry=True)], T0 + 2)
    assert window.room(T0 + 2.5, REREPORT) == 0 and window.room(T0 + 2.5, FRESH) == 0


def test_a_reset_sends_both_lanes_again_from_their_oldest():
    window = DeliveryWindow(10, ACK_TIMEOUT)
    window.take(rows(1), T0, REREPORT)
    window.take(rows(2), T0, FRESH)
    window.unsent([rows(2)], T0, FRESH)
    assert window.cursor == 1 and window.rereport_cursor == 1
    reset = window.on_tick(T0 + ACK_TIMEOUT + 1)
    assert reset is not None and (window.cursor, window.rereport_cursor) == (0, 0)
    assert window.in_flight == {} and window.rereports == set()


# What the monitor knows of a hub's state: (known before, welcome, what to do).
STATE, OTHER = "a" * 32, "b" * 32
WELCOMES = [
    ("the state the node reported to", STATE, Welcome(STATE, 5, False), None),
    ("a hub met for the first time", None, Welcome(STATE, 5, False), ADOPT),
    ("a new hub, young: it wants every ban", None, Welcome(STATE, 0, True), REREPORT_BANS),
    ("a hub that lost its state", OTHER, Welcome(STATE, 0, True), REREPORT_BANS),
    ("a hub that lost it, rebuilt by now", OTHER, Welcome(STATE, 9, False), REREPORT_BANS),
]


@pytest.mark.parametrize(
    "known, welcome, does", [case[1:] for case in WELCOMES], ids=[case[0] for case in WELCOMES]
)
def test_what_a_welcome_means(known, welcome, does):
    greeting = Greeting(known)
    assert greeting.on_welcome(welcome, T0) == does
    assert (greeting.state, greeting.young, greeting.welcomed) == (STATE, welcome.young, True)


def test_hellos_go_every_interval_and_once_at_most_while_the_hub_is_away():
    greeting = Greeting(STATE)
    assert greeting.hello_due(T0)
    greeting.hello_sent(T0)
    assert not greeting.hello_due(T0 + HELLO_RETRY - 0.01)  # unanswered: one waits
    assert greeting.next_deadline() == T0 + HELLO_RETRY and greeting.hello_due(T0 + HELLO_RETRY)
    greeting.on_welcome(Welcome(STATE, 1, False), T0 + 1)
    assert not greeting.hello_due(T0 + 1 + HELLO_INTERVAL - 0.01)
    assert greeting.hello_due(T0 + 1 + HELLO_INTERVAL)
    greeting.hello_sent(T0 + 4)
    greeting.hello_soon()  # a new link: the hello queued on the old one is gone
    assert greeting.hello_due(T0 + 4)
    greeting.reported(OTHER)
    assert greeting.on_welcome(Welcome(OTHER, 1, False), T0 + 5) is None
