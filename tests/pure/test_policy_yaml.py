"""Hostile and broken YAML: always a clean positioned PolicyError, quickly."""
from __future__ import annotations

import time

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from ipqd.errors import PolicyErrors
from ipqd.policy.loader import loads
from ipqd.policy.model import Policy


def first_error(text: str) -> str:
    started = time.monotonic()
    with pytest.raises(PolicyErrors) as caught:
        loads(text, "p.yaml")
    assert time.monotonic() - started < 2
    return str(caught.value.errors[0])


@pytest.mark.parametrize("nesting", [
    "rules:\n" + "".join("  " * i + "  a:\n" for i in range(1000)),
    "rules:\n" + "".join("  " * i + "  -\n" for i in range(1000)),
    "rules: " + "{a: " * 10000 + "}" * 10000,
    "rules: " + "[{a: " * 5000 + "}]" * 5000,
])
def test_deep_nesting_is_refused_without_recursion_error(nesting):
    assert "nested too deeply" in first_error("version: 1\n" + nesting) \
        or "nesting depth" in first_error("version: 1\n" + nesting)


def test_alias_without_anchor():
    assert first_error("version: 1\nx: *a\n") == (
        "p.yaml:2:4: YAML aliases (*a) are not allowed in a policy: write the values out, "
        "or name them once in `sets:`")


def test_merge_key_needs_an_alias_and_is_refused():
    text = "version: 1\nbase: &b {action: accept}\nrules:\n  - <<: *b\n"
    assert first_error(text).startswith("p.yaml:2:7: YAML anchors (&b) are not allowed")


@pytest.mark.parametrize("tag", ["!!python/object:os.system", "!!python/name:os.system",
                                 "!!binary", "!!set", "!!str", "!custom"])
def test_every_tag_is_refused(tag):
    with pytest.raises(PolicyErrors) as raised:
        loads(f"version: 1\nrules:\n  - {{action: {tag} accept}}\n", "p.yaml")
    at_tag = [str(e) for e in raised.value.errors if str(e).startswith("p.yaml:3:14:")]
    assert len(at_tag) == 1 and at_tag[0].startswith("p.yaml:3:14: YAML tags like ")


def test_quoted_negation_is_a_string_not_a_tag():
    policy = loads("version: 1\nhooks: []\ndefault: {action: accept}\n"
                   "rules:\n  - {proto: tcp, dport: '!22', action: accept}\n", "p.yaml")
    assert policy.rules[0].match.dport.negate


def test_reader_error_has_a_position():
    assert first_error("version: 1\nx: \x07\n") .startswith("p.yaml:2:4: ")


_scalars = st.one_of(st.text(max_size=12), st.integers(), st.booleans(), st.none())
_values = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=20)
_keys = st.sampled_from(["version", "queue", "hooks", "default", "logging", "sets", "rules",
                         "num", "chain", "action", "src", "dport", "proto", "rate", "name"])


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_keys, _values, max_size=7))
def test_any_data_loads_or_fails_cleanly(data):
    text = yaml.safe_dump(data)
    try:
        assert isinstance(loads(text, "p.yaml"), Policy)
    except PolicyErrors as e:
        assert e.errors and all(p.line >= 1 and p.column >= 1 for p in e.errors)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_any_text_loads_or_fails_cleanly(text):
    try:
        loads(text, "p.yaml")
    except PolicyErrors as e:
        assert e.errors and all(p.line >= 1 and p.column >= 1 for p in e.errors)
