"""`ipqd diff` is complete and every witness is real: for random pairs of
policies and random packets, a packet the two decide differently lies in a
reported region, and each region's witness, built into bytes and parsed as
the daemon does, is decided differently by the two compiled policies."""
from __future__ import annotations

import random
from dataclasses import replace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipqd.decision.compiler import compile_policy
from ipqd.decision.described import build_packet
from ipqd.decision.packet import PacketMeta, parse
from ipqd.policy import regions
from ipqd.policy.model import IPV6_EXT_HEADERS
from policy_strategies import policies, random_policy, views
from reference import Reference

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
_L4 = {6: 20, 17: 8, 136: 8, 132: 12, 1: 8, 58: 8}


def real(view) -> bool:
    """A view the kernel can queue and explain can describe: a hook, no
    extension header as IPv6's protocol, ICMP of its own family, and at
    least as long as its headers."""
    if view.hook is None:
        return False
    if view.malformed:
        return True
    if (view.family, view.proto) in ((6, 1), (4, 58)):
        return False
    if view.family == 6 and view.proto in IPV6_EXT_HEADERS:
        return False
    header = 20 if view.family == 4 else (40 if view.fragment == "none" else 48)
    return view.length >= header + _L4.get(view.proto, 0)


def effect(policy, view):
    reference = Reference(policy)
    index, action = reference.decide(view)
    logged = tuple(policy.rules[j].name for j in reference.logged)     # `action: log` rules
    if index < 0:
        mark, log = policy.default.set_mark, policy.default.log
    else:
        rule = policy.rules[index]
        mark, log = rule.set_mark, rule.log if rule.log is not None else policy.default.log
    return action, mark if action == "accept" else None, log, logged


def decided(policy, matcher, text):
    payload, meta = build_packet(text, PacketMeta(hook=1))
    d = matcher.decide(parse(payload, meta, matcher.fields))
    if d.rule is None:
        return d.action, d.mark, policy.default.log, d.log_rules
    return d.action, d.mark, d.log, d.log_rules


def conditional(policy, outcome) -> bool:
    """Whether a rule that may decide first matches on more than headers (a
    rate, a time window, a cgroup): its witness is decided otherwise only
    under that condition."""
    return any(policy.rules[i].action != "log" or regions.may_pass(replace(
        policy.rules[i], action="accept")) for i in outcome.rated)


def tracked(policy):
    """The policy as the loader makes it: conntrack on when a rule reads ct_state."""
    reads = any(rule.match.ct_state is not None for rule in policy.rules)
    return replace(policy, queue=replace(policy.queue, conntrack=reads))


def given_to(old, new, view) -> bool:
    """Whether the daemon running either policy could give it this view: a
    ct_state with conntrack, none without."""
    both = {old.queue.conntrack, new.queue.conntrack}
    return len(both) == 2 or (view.ct_state is not None) == both.pop()


def check(old, new, packets):
    old, new = tracked(old), tracked(new)
    space, changes = regions.diff(old, new)
    for view in packets:
        if not real(view) or not given_to(old, new, view) or effect(old, view) == effect(new, view):
            continue
        atoms = space.atoms_of(view)
        assert atoms is not None, view
        assert any(space.holds(c.cube, atoms) for c in changes), (view, old, new)
    before, after = compile_policy(old), compile_policy(new)
    for change in changes:
        text = space.witness(change.cube)
        if text is None or conditional(old, change.old) or conditional(new, change.new):
            continue                    # malformed, or decided by more than headers
        assert decided(old, before, text) != decided(new, after, text), (text, old, new)


@SETTINGS
@given(policies(max_rules=6), policies(max_rules=6), st.lists(views(), min_size=1, max_size=40))
def test_diff_is_complete_and_its_witnesses_real(old, new, packets):
    check(old, new, packets)


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.lists(views(), min_size=1, max_size=40))
def test_a_changed_copy_of_a_policy(seed, packets):
    """A policy and the same with one rule moved, dropped or changed: small
    differences, as real changes are."""
    rng = random.Random(seed)
    old = random_policy(rng, rng.randint(1, 10))
    rules = list(old.rules)
    i = rng.randrange(len(rules))
    what = rng.randrange(3)
    if what == 0:
        rules.insert(rng.randrange(len(rules)), rules.pop(i))
    elif what == 1:
        del rules[i]
    else:
        rules[i] = replace(random_policy(rng, 1).rules[0], name=rules[i].name)
    new = replace(old, rules=tuple(rules))
    check(old, new, packets)


def test_identical_policies_have_no_change():
    rng = random.Random(7)
    for _ in range(20):
        policy = random_policy(rng, rng.randint(0, 15))
        assert regions.diff(policy, policy)[1] == []


def test_the_property_meets_packets_decided_differently():
    """The universe is small enough that random pairs disagree on drawn
    packets often: the completeness check above is not vacuous."""
    rng = random.Random(11)
    from hypothesis import find
    met = 0
    for _ in range(40):
        old, new = random_policy(rng, rng.randint(1, 8)), random_policy(rng, rng.randint(1, 8))
        view = find(views(), lambda v: real(v) and not v.malformed)
        met += effect(old, view) != effect(new, view)
    assert met >= 5


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.lists(views(), min_size=1, max_size=40))
def test_reach_finds_a_packet_for_every_rule_that_decides_one(seed, packets):
    """A rule some drawn packet reaches has a witness (or only malformed
    packets reach it); every witness is decided by that rule."""
    rng = random.Random(seed)
    policy = tracked(random_policy(rng, rng.randint(1, 10)))
    matcher = compile_policy(policy)
    reached = {Reference(policy).decide(v)[0] for v in packets
               if real(v) and given_to(policy, policy, v)}
    for index in range(len(policy.rules)):
        space, cube, _ = regions.reach(policy.rules, index, conntrack=policy.queue.conntrack)
        if cube is None:
            assert index not in reached
            continue
        text = space.witness(cube)
        if text is not None and not regions.may_pass(policy.rules[index]):
            # (a rule with a cgroup or a time window is not decided by headers alone)
            payload, meta = build_packet(text, PacketMeta(hook=1))
            assert matcher.decide(parse(payload, meta, matcher.fields)).rule_index == index


def with_rates(rng, policy):
    """Some rules given a rate (the same rates by name in both policies of a pair)."""
    from ipqd.policy.model import Rate
    rules = tuple(replace(r, rate=Rate(1.0, 1, "1/second")) if int(r.name[1:]) % 3 == 0 and
                  rng.random() < 0.7 else r for r in policy.rules)
    return replace(policy, rules=rules)


def effect_when(policy, view, within: bool):
    """The effect with every rated rule within its rate, or every one past it."""
    from reference import matches
    for rule in policy.rules:
        if rule.rate is not None and not within:
            continue
        if matches(rule.match, view):
            log = rule.log if rule.log is not None else policy.default.log
            return rule.action, rule.set_mark if rule.action == "accept" else None, log
    d = policy.default
    return d.action, d.set_mark if d.action == "accept" else None, d.log


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.lists(views(), min_size=1, max_size=40))
def test_rates_are_compared_within_and_past_them(seed, packets):
    """With rated rules, a packet the two decide differently with every
    rated rule within its rate, or with every one past it, lies in a region."""
    rng = random.Random(seed)
    old = tracked(with_rates(rng, random_policy(rng, rng.randint(1, 8))))
    new = tracked(with_rates(rng, random_policy(rng, rng.randint(1, 8))))
    space, changes = regions.diff(old, new)
    for view in packets:
        if not real(view) or not given_to(old, new, view):
            continue
        if any(effect_when(old, view, w) != effect_when(new, view, w) for w in (True, False)):
            atoms = space.atoms_of(view)
            assert any(space.holds(c.cube, atoms) for c in changes), (view, old, new)
