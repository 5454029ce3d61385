"""The monitor's failure window as a table: the first failure after a quiet while goes at
once, the ones after it together once the interval is over, counted per (jail, address)."""

import pytest

from f2bzmq.failwindow import FailureWindow
from f2bzmq.protocol import MAX_FAILURE_ITEMS, FailureCount

T = 1_800_000_000.0  # failure times (unix)

# Steps: ("add", jail, ip, failure time) or ("take", now) -> expected items (jail, ip, count,
# first, last) or ("due", now) -> expected bool; the interval is 0.025 s, monotonic from 100.
STEPS = [
    ("quiet: the first is due at once", [("add", "sshd", "a", T), ("due", 100.0, True)]),
    (
        "one report per interval under load",
        [
            ("add", "sshd", "a", T),
            ("take", 100.0, [("sshd", "a", 1, T, T)]),
            ("add", "sshd", "a", T + 1),
            ("due", 100.01, False),
            ("add", "sshd", "a", T),
            ("add", "sshd", "b", T + 2),
            ("add", "nginx", "a", T + 1),
            ("due", 100.025, True),
            (
                "take",
                100.025,
                [
                    ("sshd", "a", 2, T, T + 1),
                    ("sshd", "b", 1, T + 2, T + 2),
                    ("nginx", "a", 1, T + 1, T + 1),
                ],
            ),
        ],
    ),
    ("nothing waits, nothing is due", [("due", 100.0, False), ("take", 100.0, [])]),
    (
        "an early take (a ban stored) restarts the interval",
        [
            ("add", "sshd", "a", T),
            ("take", 100.0, [("sshd", "a", 1, T, T)]),
            ("add", "sshd", "a", T),
            ("take", 100.001, [("sshd", "a", 1, T, T)]),
            ("add", "sshd", "a", T),
            ("due", 100.02, False),
            ("due", 100.027, True),
        ],
    ),
]


@pytest.mark.parametrize("steps", [row[1] for row in STEPS], ids=[row[0] for row in STEPS])
def test_window(steps):
    window = FailureWindow(0.025)
    for step in steps:
        if step[0] == "add":
            window.add(*step[1:])
        elif step[0] == "due":
            assert window.due(step[1]) is step[2], step
        else:
            taken = [item for chunk in window.take(step[1]) for item in chunk]
            assert taken == [FailureCount(*item) for item in step[2]], step


def test_many_addresses_go_in_reports_of_the_most_a_body_holds():
    window = FailureWindow(0.025)
    for n in range(MAX_FAILURE_ITEMS * 2 + 1):
        window.add("sshd", f"10.0.{n // 256}.{n % 256}", T)
    assert [len(chunk) for chunk in window.take(0.0)] == [MAX_FAILURE_ITEMS] * 2 + [1]
    assert window.found == MAX_FAILURE_ITEMS * 2 + 1
    assert window.deadline() is None
