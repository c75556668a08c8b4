"""The one token bucket: a rule's rate in the matcher and the decision log's rate."""
from ipqd.decision.token_bucket import TokenBucket
from ipqd.policy.model import Rate


def takes(bucket: TokenBucket, now: float, count: int) -> int:
    return sum(bucket.take(now) for _ in range(count))


def test_starts_full_and_refills_at_its_rate_up_to_the_burst():
    bucket = TokenBucket(Rate(4, 5))
    assert takes(bucket, 100.0, 8) == 5
    assert not bucket.available(100.0)
    assert takes(bucket, 100.5, 8) == 2                 # 0.5 s at 4/s
    assert takes(bucket, 200.0, 8) == 5                 # a long pause saves up only the burst
    assert bucket.spent == 12


def test_looking_spends_nothing():
    bucket = TokenBucket(Rate(1, 1))
    assert bucket.available(5.0) and bucket.available(5.0)
    assert bucket.take(5.0) and not bucket.take(5.0)


def test_a_clock_that_goes_back_refills_nothing():
    bucket = TokenBucket(Rate(10, 2))
    assert takes(bucket, 50.0, 2) == 2
    assert not bucket.available(49.0) and not bucket.take(49.0)
    assert bucket.take(50.1)


def test_a_successor_resumes_its_predecessors_level_less_what_it_took_meanwhile():
    old, new = TokenBucket(Rate(1, 10)), TokenBucket(Rate(1, 10))
    assert takes(old, 10.0, 7) == 7                     # 3 left at 10.0
    assert takes(new, 10.5, 2) == 2                     # before the state arrives
    new.resume(old.tokens, old.stamp)
    assert round(new.level(10.5), 6) == 1.5             # 3 + 0.5 refilled - 2 taken
    fresh = TokenBucket(Rate(1, 10))
    fresh.resume(old.tokens, old.stamp)                 # nothing taken: the predecessor's level
    assert round(fresh.level(11.0), 6) == 4.0
