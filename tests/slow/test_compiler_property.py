"""The compiled matcher decides exactly as the rule-by-rule reference, for any policy."""
from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipqd.decision import compiler
from ipqd.policy.model import AddrMatch, Match, Policy, RangeMatch, Rule
from policy_strategies import NETWORKS, PORTS, assert_agrees, policies, random_policy, views

SEEDS_SMALL = st.integers(0, 1000)
SETTINGS = settings(max_examples=100, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PACKETS = st.lists(views(), min_size=1, max_size=30)


@SETTINGS
@given(policies(max_rules=12, rates=True), PACKETS, SEEDS_SMALL)
def test_compiled_matches_reference(policy, packets, seed):
    assert_agrees(policy, packets, seed)


# Big policies come from a seed: drawing 50 rules field by field through
# hypothesis is slow and its choices lean towards the simplest values.
SEEDS = st.integers(0, 2**32 - 1)
ALL_ACTIONS = ("accept", "drop", "reject", "log")


@settings(max_examples=150, deadline=None)
@given(SEEDS, PACKETS)
def test_compiled_matches_reference_up_to_50_rules(seed, packets):
    rng = random.Random(seed)
    # Moments from 2023 to 2027, seconds or hours apart: rates run dry, windows open and close.
    assert_agrees(random_policy(rng, rng.randint(0, 50), actions=ALL_ACTIONS, rates=True),
                  packets, seed, step=rng.choice([0.3, 1.0, 3917.0, 7 * 3600 + 17]),
                  start=rng.uniform(1.67e9, 1.80e9))


@settings(max_examples=100, deadline=None)
@given(SEEDS, PACKETS)
def test_compiled_matches_reference_with_address_tables_everywhere(seed, packets):
    """Every list gets an address table and few dport lists are exact."""
    rng = random.Random(seed)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(compiler, "ADDRESS_TABLE_MIN", 0)
        patch.setattr(compiler, "EXACT_PORTS_MAX", 2)
        assert_agrees(random_policy(rng, rng.randint(0, 50), address_bias=True,
                                    actions=ALL_ACTIONS, rates=True), packets)


@settings(max_examples=30, deadline=None)
@given(PACKETS, st.integers(0, 10_000))
def test_many_rules_sharing_buckets(packets, seed):
    """Hundreds of rules over the small universe: long lists, shared ports, tables."""
    rng = random.Random(seed)
    rules = []
    for i in range(300):
        rules.append(Rule(
            name=f"r{i}", action=rng.choice(["accept", "drop"]),
            match=Match(
                proto=rng.choice([None, frozenset({6}), frozenset({17}), frozenset({6, 17})]),
                dport=rng.choice([None, RangeMatch(((rng.choice(PORTS),) * 2,)),
                                  RangeMatch(((1024, 65535),), rng.random() < 0.3)]),
                src=rng.choice([None, AddrMatch((rng.choice(NETWORKS),), rng.random() < 0.2)]),
                dst=rng.choice([None, None, AddrMatch((rng.choice(NETWORKS),))]),
                hook=rng.choice([None, frozenset({1}), frozenset({3})]),
            )))
    assert_agrees(Policy(path="many.yaml", rules=tuple(rules)), packets)
