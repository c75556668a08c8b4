"""`rate:` of a rule: `10/second burst 20`, or a mapping that keeps the
rate per key: `{limit: 20/second, burst: 40, per: [src/24/64, dport], keys: 100000}`.

Parsed here so that the rule parser only names the field.
"""
from __future__ import annotations

import re
from dataclasses import replace
from typing import Optional, Tuple

import yaml

from ipqd.errors import InvalidValue
from ipqd.policy import _values as values
from ipqd.policy._nodes import Where, fields, is_scalar, scalars, text
from ipqd.policy._values import suggest
from ipqd.policy.model import RATE_KEY_FIELDS, RATE_KEYS_DEFAULT, RATE_KEYS_MAX, Rate

RATE_FIELDS = ("limit", "burst", "per", "keys")
_PER = re.compile(r"^(src|dst)(?:/(\d+)(?:/(\d+))?)?$")
# IPv6's prefix when only IPv4's is written: a host is given a /64.
IPV6_PREFIX_DEFAULT = 64


def parse_rule_rate(where: Where, node: yaml.Node) -> Optional[Rate]:
    if is_scalar(node):
        written = text(where, node, "rate", "text such as 10/second")
        try:
            return values.parse_rate(written)
        except InvalidValue as e:
            where.error(node, e.message)
            return None
    if not isinstance(node, yaml.MappingNode):
        where.error(node, "rate must be text such as 10/second, or a mapping such as "
                          "{limit: 10/second, per: src}")
        return None
    before = len(where.problems)
    found = fields(where, node, RATE_FIELDS, "rate")
    if found is None or len(where.problems) > before:
        return None
    items = {name: (key, value) for key, name, value in found}
    if "limit" not in items:
        where.error(node, "rate: missing 'limit' (add e.g. 'limit: 20/second')")
        return None
    rate = _limit(where, items["limit"][1])
    burst = _number(where, items["burst"][1], "burst", 1, 10**9) if "burst" in items else None
    per = _per(where, items["per"][1]) if "per" in items else ()
    keys = _number(where, items["keys"][1], "keys", 1, RATE_KEYS_MAX) if "keys" in items else None
    if rate is None or per is None or ("burst" in items and burst is None) or \
            ("keys" in items and keys is None):
        return None
    if keys is not None and not per:
        where.error(items["keys"][0], "rate: keys only works with per (the number of "
                                      "keys tracked): add e.g. 'per: src'")
        return None
    text_form = rate.text + (f" burst {burst}" if burst is not None else "")
    if per:
        text_form += " per " + ",".join(_per_text(p) for p in per)
    return replace(rate, burst=burst if burst is not None else rate.burst, text=text_form,
                   per=per, keys=(keys or RATE_KEYS_DEFAULT) if per else 0)


def _limit(where: Where, node: yaml.Node) -> Optional[Rate]:
    written = text(where, node, "limit", "text such as 20/second")
    if written is None:
        return None
    if "burst" in written:
        where.error(node, "rate: write the burst as 'burst: N' beside limit, not in it")
        return None
    try:
        return values.parse_rate(written)
    except InvalidValue as e:
        where.error(node, "rate: " + e.message.replace("rate '", "limit '"))
        return None


def _number(where: Where, node: yaml.Node, field: str, low: int, high: int) -> Optional[int]:
    written = text(where, node, field, f"a number from {low} to {high}")
    number = values.parse_number(written) if written is not None else None
    if number is None or not low <= number <= high:
        if written is not None:
            where.error(node, f"rate: {field} must be a number from {low} to {high}, "
                              f"not '{written}'")
        return None
    return number


def _per(where: Where, node: yaml.Node) -> Optional[Tuple[Tuple[str, int, int], ...]]:
    items = scalars(where, node, "per", "src, dst, sport, dport, src/24, src/24/64, "
                                        "or a list of them")
    if items is None:
        return None
    out, seen = [], set()
    for item in items:
        word = item.value.strip().lower()
        parsed = _per_word(where, item, word)
        if parsed is None:
            return None
        if parsed[0] in seen:
            where.error(item, f"rate: per names {parsed[0]} twice")
            return None
        seen.add(parsed[0])
        out.append(parsed)
    order = {f: i for i, f in enumerate(RATE_KEY_FIELDS)}
    return tuple(sorted(out, key=lambda p: order[p[0]]))


def _per_word(where: Where, node: yaml.Node, word: str) -> Optional[Tuple[str, int, int]]:
    if word in ("sport", "dport"):
        return word, 0, 0
    found = _PER.match(word)
    if found is None:
        base = word.split("/")[0]
        hint = suggest(base, RATE_KEY_FIELDS) or \
            " (expected src, dst, sport or dport; addresses may take /prefix lengths)"
        where.error(node, f"rate: unknown per '{word}'{hint}")
        return None
    field, v4, v6 = found.groups()
    v4 = 32 if v4 is None else int(v4)
    v6 = (128 if found.group(2) is None else IPV6_PREFIX_DEFAULT) if v6 is None else int(v6)
    if not 0 <= v4 <= 32 or not 0 <= v6 <= 128:
        where.error(node, f"rate: per '{word}': an IPv4 prefix is 0-32 and an IPv6 one "
                          "0-128 (write e.g. src/24 or src/24/64)")
        return None
    return field, v4, v6


def _per_text(part: Tuple[str, int, int]) -> str:
    field, v4, v6 = part
    if field in ("sport", "dport") or (v4, v6) == (32, 128):
        return field
    return f"{field}/{v4}/{v6}"
