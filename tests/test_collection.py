"""When a daemon makes its full garbage collections: the rule as a table, then a process."""

import json
import subprocess
import sys
import textwrap

import pytest

from f2bzmq.collection import IDLE_EVERY, MAX_WAIT, due

T0 = 1000.0  # a monotonic clock


@pytest.mark.parametrize(
    ("waited", "idle", "promoted", "collect"),
    [
        # A daemon that has time collects now and then, not at every idle poll.
        (IDLE_EVERY, True, 1, True),
        (IDLE_EVERY - 0.1, True, 1, False),
        # A busy one waits for an idle moment...
        (IDLE_EVERY, False, 50, False),
        (MAX_WAIT - 1, False, 50, False),
        # ... but not for ever (a flood that lasts).
        (MAX_WAIT, False, 50, True),
        # Nothing reached the old generation since the last one: nothing to look for.
        (IDLE_EVERY, True, 0, False),
        (MAX_WAIT * 10, False, 0, False),
    ],
)
def test_when_a_full_collection_is_due(waited, idle, promoted, collect):
    assert due(T0, T0 + waited, idle, promoted) is collect


PROGRAM = textwrap.dedent(
    """
    import gc, json
    from f2bzmq.collection import Collector, IDLE_EVERY

    garbage = Collector()
    garbage.tick(0.0, True)  # not started: CPython's own collections, untouched
    before = {"threshold": gc.get_threshold(), "full": garbage.full}
    garbage.start(0.0)
    frozen = gc.get_freeze_count()
    full_at_start = gc.get_stats()[2]["collections"]
    # Objects that survive young collections, and a cycle that only a full one frees.
    keep = [[n] for n in range(200_000)]
    class Node: pass
    a, b = Node(), Node()
    a.other, b.other = b, a
    del a, b
    automatic = gc.get_stats()[2]["collections"] - full_at_start
    promoted = gc.get_count()[2]
    garbage.tick(1.0, False)  # busy and soon: none
    busy = garbage.full
    garbage.tick(IDLE_EVERY + 1, True)  # idle, and its time: one
    full, old_after, threshold = garbage.full, gc.get_count()[2], gc.get_threshold()
    garbage.stop()
    print(json.dumps({
        "stopped": {"threshold": gc.get_threshold(), "frozen": gc.get_freeze_count()},
        "before": before, "frozen": frozen, "threshold": threshold,
        "automatic": automatic, "promoted": promoted, "busy": busy,
        "full": full, "old_after": old_after,
    }))
    """
)


def test_a_started_collector_takes_the_full_collections_over():
    output = subprocess.run(
        [sys.executable, "-c", PROGRAM], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    seen = json.loads(output)
    assert seen["before"]["full"] == 0
    assert seen["before"]["threshold"][2] < 1000  # CPython's default, before start()
    assert seen["frozen"] > 1000  # the modules and all that the process held at start
    assert seen["threshold"][2] >= 2**30  # CPython no longer starts full collections...
    assert seen["promoted"] > 0 and seen["automatic"] == 0
    assert seen["busy"] == 0  # ... nor does the collector while the daemon is busy
    assert seen["full"] == 1  # but does once idle
    assert seen["old_after"] == 0
    # stop() gives CPython its own collections back, and unfreezes what start() froze.
    assert seen["stopped"] == {"threshold": seen["before"]["threshold"], "frozen": 0}
