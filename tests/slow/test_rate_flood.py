"""A flood of 1,000,000 distinct sources through a rate kept per source:
the table never tracks more than its bound, and its memory stops growing
once it is full."""
import gc
import tracemalloc

from ipqd.decision.rate_table import RateTable
from ipqd.policy.model import RATE_KEYS_DEFAULT, Rate


class Source:
    """What the key reader reads of a packet view."""
    __slots__ = ("family", "src")

    def __init__(self, src: int):
        self.family = 4
        self.src = src


def test_a_million_sources_stay_within_the_bound():
    table = RateTable(Rate(20.0, 40, per=(("src", 32, 128),), keys=RATE_KEYS_DEFAULT))
    gc.collect()
    tracemalloc.start()
    try:
        now = 0.0
        full_at = None
        for n in range(1_000_000):
            source = Source(0x0A000000 + n)
            assert table.available(now, source)         # every new source starts full
            table.take(now, source)
            now += 1e-6
            if n == 2 * RATE_KEYS_DEFAULT:
                gc.collect()
                full_at = tracemalloc.get_traced_memory()[0]
        gc.collect()
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(table) == RATE_KEYS_DEFAULT
    assert table.evicted == 1_000_000 - RATE_KEYS_DEFAULT
    # memory once full is memory at the end: nothing grows with the sources seen
    # (the peak: the dict's table resized once more, over its deleted slots)
    assert current <= full_at * 1.05, (full_at, current)
    assert peak <= full_at * 1.5, (full_at, peak)
    # about 350 bytes a key (tracemalloc's count): the docs promise at most 500
    assert current / RATE_KEYS_DEFAULT < 500, current / RATE_KEYS_DEFAULT
