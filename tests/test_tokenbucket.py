"""The one token bucket, with time passed in as plain numbers."""

from chatd.tokenbucket import TokenBucket, refill


def test_bucket_refills_at_rate_up_to_burst():
    bucket = TokenBucket(1.0, 2.0, now=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [True, True, False]
    assert bucket.take(0.5) is False
    assert bucket.take(1.0) is True
    assert bucket.take(100.0) and bucket.take(100.0)
    assert not bucket.take(100.0)  # never more than the burst saved up


def test_bucket_counts_its_refusals_until_they_are_taken():
    bucket = TokenBucket(1.0, 1.0, now=0.0)
    assert bucket.take(0.0)
    assert not bucket.take(0.1) and not bucket.take(0.2)
    assert bucket.refused == 2
    assert bucket.take(5.0)  # a success does not forget them: the caller decides
    assert bucket.take_refused() == 2
    assert bucket.refused == 0 and bucket.take_refused() == 0


def test_refill_is_the_buckets_arithmetic():
    bucket = TokenBucket(3.0, 10.0, now=0.0)
    for _ in range(10):
        bucket.take(0.0)
    bucket.take(1.5)  # 4.5 tokens back, one spent
    assert bucket.tokens == refill(0.0, 0.0, 1.5, 3.0, 10.0) - 1.0 == 3.5
    assert refill(2.0, 10.0, 1000.0, 3.0, 10.0) == 10.0


def test_bounded_log_leaves_out_a_flood_and_says_how_much():
    from chatd.log import BoundedLog

    written = []

    class Logger:
        def warning(self, event, **fields):
            written.append((event, fields))

    now = [0.0]
    bounded = BoundedLog(Logger(), {"datagram_dropped": "warning"}, per_second=1.0, burst=2.0,
                         clock=lambda: now[0])
    assert "datagram_dropped" in bounded and "user_joined" not in bounded
    for i in range(10):
        bounded("datagram_dropped", name=f"n{i}")  # "name" is a field like any other
    assert written == [("datagram_dropped", {"name": "n0"}), ("datagram_dropped", {"name": "n1"})]
    now[0] = 1.0
    bounded("datagram_dropped", name="later")
    assert written[-1] == ("datagram_dropped", {"name": "later", "suppressed_since_last": 8})


def test_bounded_log_bounds_a_kind_it_was_not_told_of_instead_of_failing():
    """A new kind of event someone forgot to list must not raise in the middle of applying a
    room's step (the datagrams of that step would never go out)."""
    from chatd.log import BoundedLog

    written = []

    class Logger:
        def info(self, event, **fields):
            written.append((event, fields))

    bounded = BoundedLog(Logger(), {}, per_second=1.0, burst=2.0, clock=lambda: 0.0)
    for _ in range(5):
        bounded("something_new", x=1)
    assert written == [("something_new", {"x": 1})] * 2
