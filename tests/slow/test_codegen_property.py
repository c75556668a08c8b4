"""The generated decision function decides as the rule-by-rule reference,
for any policy and any queued packet it answers (the rest it leaves to the
compiled matcher, which tests/slow/test_compiler_property.py checks)."""
from __future__ import annotations

import os
import sys

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipqd.decision.codegen import build_decider
from ipqd.decision.compiler import compile_policy
from ipqd.policy.model import Default, Policy
from policy_strategies import policies
from reference import Reference

# The packet strategies and key helpers of the pure tests.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "pure"))
from test_codegen import key_of, view_of  # noqa: E402
from test_verdict_cache import queued  # noqa: E402

SETTINGS = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@SETTINGS
@given(policies(max_rules=40, address_bias=True) | policies(max_rules=12),
       st.lists(queued(), min_size=1, max_size=30), st.booleans())
def test_generated_function_matches_reference(policy, packets, quiet):
    if quiet:       # no logging: the function answers for most rules
        policy = Policy(path=policy.path, rules=tuple(
            r.__class__(**{**{f: getattr(r, f) for f in r.__dataclass_fields__}, "log": False})
            for r in policy.rules), default=Default(action=policy.default.action, log=False))
    matcher = compile_policy(policy)
    decider = build_decider(policy, matcher.fields)
    reference = Reference(policy)
    for packet in packets:
        key = key_of(matcher.fields, packet)
        got = decider.decide(key) if key is not None else None
        if got is None:
            continue
        index, action = reference.decide(view_of(packet, matcher.fields))
        assert (got.rule_index, got.accept) == (index, action == "accept"), \
            (packet, policy.rules[:index + 1])
