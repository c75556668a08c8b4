"""The policy checks at the size of the limits: the shadow search on
70,000 rules."""
import time

from ipqd.policy._lint import shadowed
from ipqd.policy.model import Match, Position, RangeMatch, Rule


def rule(index: int, match: Match) -> Rule:
    return Rule(f"r{index}", match, "accept", position=Position("p.yaml", index + 1, 5))


def test_the_search_stays_fast_on_large_policies():
    # One catch-all, then 70,000 rules it shadows: 71 s when every earlier
    # rule was gathered as a candidate for every later one.
    catch_all = (rule(0, Match()),)
    tcp = frozenset({6})
    later = tuple(rule(i, Match(proto=tcp, dport=RangeMatch(((i % 65536, i % 65536),))))
                  for i in range(1, 70_001))
    started = time.monotonic()
    assert len(list(shadowed(catch_all + later))) == 70_000
    # The same rules without the catch-all: each port once, then 4,464 again.
    assert len(list(shadowed(later))) == 70_000 - 65_536
    assert time.monotonic() - started < 10
