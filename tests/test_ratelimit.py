"""Token buckets, with time passed in: exact counts, no sleeping."""

from f2bzmq.ratelimit import TokenBuckets


def test_burst_then_the_rate():
    buckets = TokenBuckets(rate=4, burst=5)
    assert [buckets.allow("node1", 100.0) for _ in range(7)] == [True] * 5 + [False] * 2
    assert buckets.allow("node1", 100.125) is False  # half a token
    assert buckets.allow("node1", 100.25) is True
    assert [buckets.allow("node1", 110.0) for _ in range(12)].count(True) == 5  # capped at burst


def test_nodes_have_their_own_buckets():
    buckets = TokenBuckets(rate=1, burst=2)
    assert [buckets.allow("flooder", 0.0) for _ in range(3)] == [True, True, False]
    assert [buckets.allow("quiet", 0.0) for _ in range(2)] == [True, True]


def test_the_number_of_buckets_is_bounded():
    buckets = TokenBuckets(rate=1, burst=1, max_keys=3)
    for key in ("a", "b", "c", "d", "e"):
        buckets.allow(key, 0.0)
    assert len(buckets.buckets) <= 3


def test_making_room_forgets_full_buckets_only():
    """A flood of new keys must not refill the bucket of a sender that is throttled."""
    buckets = TokenBuckets(rate=1, burst=100, max_keys=3)
    assert sum(buckets.allow("flooder", 0.0) for _ in range(101)) == 100
    for n in range(50):
        buckets.allow(f"made-up-{n}", float(n))  # each full again a second later
        assert len(buckets.buckets) <= 3
    assert sum(buckets.allow("flooder", 50.0) for _ in range(100)) == 50  # not 100


def test_when_a_throttled_key_may_go_again():
    buckets = TokenBuckets(rate=4, burst=1)
    assert buckets.ready_at("node1", 50.0) == 50.0
    assert buckets.allow("node1", 50.0) and not buckets.allow("node1", 50.0)
    assert buckets.ready_at("node1", 50.1) == 50.25


def test_a_burst_is_taken_no_faster_than_the_peak():
    buckets = TokenBuckets(rate=1, burst=100, peak=10)
    assert sum(buckets.allow("node1", 0.0) for _ in range(50)) == 10
    assert sum(buckets.allow("node1", 0.5) for _ in range(50)) == 5
    assert buckets.ready_at("node1", 0.5) == 0.6
    per_second = [0] * 40
    for step in range(6, 400):  # five tries every 0.1 s for 40 s
        per_second[step // 10] += sum(buckets.allow("node1", step / 10) for _ in range(5))
    assert max(per_second) <= 11  # the peak while the burst lasts (a window edge: +1)
    assert per_second[-1] == 1  # then the rate
    assert 100 + 39 <= sum(per_second) + 15 <= 100 + 40  # the burst and 40 s at the rate
