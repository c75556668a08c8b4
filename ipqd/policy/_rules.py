"""One rule: a YAML mapping -> `Rule`, with the checks that span its fields.

Each field has a parser in `MATCH_FIELDS` or `RULE_FIELDS`. Parsers report
their own problems and return None when the value cannot be used; checks
that involve two fields (ports need a port protocol, an IPv4 address on an
ipv6 rule, ...) run once every field has been read.
"""
from __future__ import annotations

import grp
import pwd
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

import yaml

from ipqd.errors import InvalidValue
from ipqd.policy import _values as values
from ipqd.policy._rate import parse_rule_rate
from ipqd.policy._time import parse_time
from ipqd.policy._nodes import (Where, boolean, choice, describe, fields, is_scalar, scalars,
                                text, words)
from ipqd.policy._values import one_of, suggest
from ipqd.policy.model import (
    ACTIONS, CT_STATES, FAMILIES, FRAGMENTS, HOOKS, PORT_PROTOCOLS, PROTO_ICMP, PROTO_ICMPV6,
    PROTO_TCP, PROTOCOL_NAMES, REJECT_WITH, RULE_ACTIONS, AddrMatch, DynamicSet, IfaceMatch,
    Match, Position, RangeMatch, Rate, Rule,
)

ID_MAX = 0xFFFFFFFE                 # (uid_t)-1 means "no id" to the kernel
IFNAMSIZ = 16                       # names are at most 15 bytes plus NUL
_IFACE = re.compile(r"^[^/\s:]{1,%d}$" % (IFNAMSIZ - 1))

SET_KINDS = {"address": "addresses", "port": "ports"}


@dataclass
class SetDef:
    """A named list from `sets:`; `values` are networks or (low, high) ports.

    `kind` is None for a set whose items were wrong: uses of it say nothing more.
    """
    name: str
    kind: str
    values: tuple
    node: yaml.Node
    where: Where
    dynamic: Optional[DynamicSet] = None    # a set whose entries change at run time


@dataclass
class ParsedRule:
    """A rule as read; `rule` is None when some field was wrong (already reported)."""
    name: str
    rule: Optional[Rule]
    keys: Dict[str, yaml.Node]      # field -> its key node, for later messages
    where: Where
    name_node: yaml.Node


@dataclass
class _Context:
    where: Where
    sets: Dict[str, SetDef]
    used_sets: Set[str]
    proto: Optional[frozenset] = None
    failed: Set[str] = field(default_factory=set)

    def set_values(self, node: yaml.Node, reference: str, kind: str,
                   field: str) -> Optional[tuple]:
        name = reference[1:]
        self.used_sets.add(name)
        found = self.sets.get(name)
        if found is None:
            hint = suggest(name, self.sets)
            if hint:
                # the set meant is then used, not unused: one typo, one message
                self.used_sets.add(hint.split("'")[1])
                hint = hint.replace("'", "'@", 1)
            self.where.error(node, f"unknown set '@{name}'{hint or ' (define it under sets:)'}")
            return None
        if found.kind is None:                  # its own problem is already reported
            return None
        if found.kind != kind:
            self.where.error(node, f"{field} needs {SET_KINDS[kind]}, but set '@{name}' "
                                   f"holds {SET_KINDS[found.kind]}")
            return None
        return found.values

    def requires(self, key: yaml.Node, allowed: frozenset, needs: str) -> bool:
        """True when every protocol the rule matches carries field `key`."""
        if "proto" in self.failed:
            return False
        field = key.value
        if self.proto is None:
            first = needs.split(",")[0].split(" ")[0]
            self.where.error(key, f"{field} needs proto {needs}: add e.g. 'proto: {first}'")
            return False
        others = sorted(PROTOCOL_NAMES.get(p, str(p)) for p in self.proto - allowed)
        if others:
            self.where.error(key, f"{field} needs proto {needs}, but the rule also matches "
                                  f"proto {one_of(others)}: split the rule")
            return False
        return True


# --- the match fields -----------------------------------------------------------

def _negated(ctx: _Context, node: yaml.Node, items: List[yaml.ScalarNode],
             field: str) -> Tuple[Optional[bool], List[str]]:
    """Whether the field is negated, and each item's text without its '!'."""
    flags = [item.value.strip().startswith("!") for item in items]
    if any(flags) and not all(flags):
        ctx.where.error(node, f"{field} mixes negated and plain values: negate every item "
                              "(to match none of them) or none")
        return None, []
    texts = [item.value.strip()[1:].strip() if neg else item.value.strip()
             for item, neg in zip(items, flags)]
    return all(flags), texts


def _family(ctx, key, node):
    word = text(ctx.where, node, "family", "ipv4 or ipv6")
    if word is None:
        return None
    word = word.strip().lower()
    if word not in FAMILIES:
        hint = suggest(word, FAMILIES) or " (expected ipv4 or ipv6; leave family out for both)"
        ctx.where.error(node, f"unknown family '{word}'{hint}")
        return None
    return FAMILIES[word]


def _proto(ctx, key, node):
    items = scalars(ctx.where, node, "proto", "a protocol name or number, or a list of them")
    if items is None:
        return None
    out = set()
    for item in items:
        try:
            out.add(values.parse_protocol(item.value))
        except InvalidValue as e:
            ctx.where.error(item, e.message)
            return None
    ctx.proto = frozenset(out)
    return ctx.proto


def _addresses(ctx, key, node):
    field = key.value
    items = scalars(ctx.where, node, field, "an address, a network, a list or a set")
    if items is None:
        return None
    negate, texts = _negated(ctx, node, items, field)
    if negate is None:
        return None
    networks, dynamic, ok = [], [], True
    for item, written in zip(items, texts):
        if written.startswith("@"):
            found = ctx.set_values(item, written, "address", field)
            ok = ok and found is not None
            networks.extend(found or ())
            if found is not None and ctx.sets[written[1:]].dynamic is not None:
                dynamic.append(written[1:])
            continue
        try:
            network, warning = values.parse_network(written)
        except InvalidValue as e:
            ctx.where.error(item, e.message)
            ok = False
            continue
        if warning:
            ctx.where.warn(item, warning)
        networks.append(network)
    return AddrMatch(tuple(dict.fromkeys(networks)), negate,
                     tuple(dict.fromkeys(dynamic))) if ok else None


def _ranges(ctx, key, node, what, low, high, example, set_kind=None, names=None):
    """A RangeMatch from numbers, `a-b` ranges, `@sets` and names, maybe negated."""
    field = key.value
    expected = f"a {what}, a range, or a list of them"
    items = scalars(ctx.where, node, field, expected)
    if items is None:
        return None
    negate, texts = _negated(ctx, node, items, field)
    if negate is None:
        return None
    ranges, ok = [], True
    for item, written in zip(items, texts):
        if set_kind and written.startswith("@"):
            found = ctx.set_values(item, written, set_kind, field)
            ok = ok and found is not None
            ranges.extend(found or ())
            continue
        if names and written and not written[0].isdigit():
            number = names(ctx, item, written)
            ok = ok and number is not None
            ranges.append((number, number))
            continue
        try:
            ranges.append(values.parse_range(written, what, low, high, example))
        except InvalidValue as e:
            ctx.where.error(item, e.message)
            ok = False
    return RangeMatch(tuple(dict.fromkeys(ranges)), negate) if ok else None


def _ports(ctx, key, node):
    if not ctx.requires(key, PORT_PROTOCOLS, "tcp, udp, sctp or udplite"):
        return None
    return _ranges(ctx, key, node, "port", 0, 65535, "22 or 1024-65535", set_kind="port")


def _user(ctx, node, name):
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        ctx.where.error(node, f"unknown user '{name}' (give a uid number, or a user in /etc/passwd)")
        return None


def _group(ctx, node, name):
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        ctx.where.error(node, f"unknown group '{name}' (give a gid number, or a group in /etc/group)")
        return None


def _uid(ctx, key, node):
    return _ranges(ctx, key, node, "uid", 0, ID_MAX, "1000 or 1000-1999", names=_user)


def _gid(ctx, key, node):
    return _ranges(ctx, key, node, "gid", 0, ID_MAX, "100 or 100-199", names=_group)


def _interfaces(ctx, key, node):
    field = key.value
    items = scalars(ctx.where, node, field, "an interface name or glob, or a list of them")
    if items is None:
        return None
    negate, texts = _negated(ctx, node, items, field)
    if negate is None:
        return None
    ok = True
    for item, name in zip(items, texts):
        if not _IFACE.match(name):
            ctx.where.error(item, f"'{name}' is not an interface name "
                                  f"(at most {IFNAMSIZ - 1} characters, no '/', ':' or spaces)")
            ok = False
    return IfaceMatch(tuple(dict.fromkeys(texts)), negate) if ok else None


def _hook(ctx, key, node):
    return words(ctx.where, node, "hook", HOOKS)


def _ct_state(ctx, key, node):
    return words(ctx.where, node, "ct_state", {s: s for s in CT_STATES})


def _fragment(ctx, key, node):
    return words(ctx.where, node, "fragment", {f: f for f in FRAGMENTS})


def _single_icmp(proto: frozenset) -> Optional[int]:
    return next(iter(proto)) if len(proto) == 1 else None


def _icmp_type(ctx, key, node):
    if not ctx.requires(key, values.ICMP_PROTOCOLS, "icmp or icmpv6"):
        return None
    items = scalars(ctx.where, node, "icmp_type", "an ICMP type name or number, or a list")
    if items is None:
        return None
    out, proto = set(), _single_icmp(ctx.proto)
    for item in items:
        try:
            out.add(values.parse_icmp_type(item.value, proto))
        except InvalidValue as e:
            ctx.where.error(item, e.message)
            return None
    return frozenset(out)


def _icmp_code(ctx, key, node):
    if not ctx.requires(key, values.ICMP_PROTOCOLS, "icmp or icmpv6"):
        return None
    items = scalars(ctx.where, node, "icmp_code", "a number 0-255, or a list")
    if items is None:
        return None
    out = set()
    for item in items:
        number = values.parse_number(item.value)
        if number is None or number > 255:
            ctx.where.error(item, f"icmp_code must be a number from 0 to 255, not '{item.value}'")
            return None
        out.add(number)
    return frozenset(out)


def _tcp_flags(ctx, key, node):
    if not ctx.requires(key, frozenset((PROTO_TCP,)), "tcp"):
        return None
    items = scalars(ctx.where, node, "tcp_flags", "flags such as 'syn,!ack'")
    if items is None:
        return None
    flags = [word for item in items for word in item.value.split(",")]
    try:
        return values.parse_tcp_flags(flags)
    except InvalidValue as e:
        ctx.where.error(node, e.message)
        return None


def _mark(ctx, key, node):
    written = text(ctx.where, node, "mark", "a number or number/mask, e.g. 0x10/0xff")
    if written is None:
        return None
    try:
        return values.parse_mark(written)
    except InvalidValue as e:
        ctx.where.error(node, e.message)
        return None


def _length(ctx, key, node):
    written = text(ctx.where, node, "length", "a number or a range, e.g. 64-1500")
    if written is None:
        return None
    try:
        return values.parse_range(written, "length", 0, 65535, "64 or 64-1500")
    except InvalidValue as e:
        ctx.where.error(node, e.message)
        return None


_CGROUP_PATH = re.compile(r"^[^/\s]+(/[^/\s]+)*$")
_UNIT = re.compile(r"^[A-Za-z0-9:_.\\@-]+$")


def _cgroup(ctx, key, node):
    items = scalars(ctx.where, node, key.value, "a cgroup path such as system.slice/nginx.service, "
                                                 "or a list of them")
    if items is None:
        return None
    out = set()
    for item in items:
        path = item.value.strip().strip("/")
        if not _CGROUP_PATH.match(path) or any(part in (".", "..") for part in path.split("/")):
            ctx.where.error(item, f"'{item.value}' is not a cgroup path (write it from the "
                                  "cgroup v2 root, e.g. system.slice/nginx.service)")
            return None
        out.add(path)
    return frozenset(out)


def _unit(ctx, key, node):
    items = scalars(ctx.where, node, "unit", "a systemd unit such as nginx.service, or a list")
    if items is None:
        return None
    out = set()
    for item in items:
        name = item.value.strip()
        if not _UNIT.match(name) or name.startswith("."):
            ctx.where.error(item, f"'{item.value}' is not a systemd unit name "
                                  "(e.g. nginx.service)")
            return None
        if "." not in name:
            name += ".service"
        if not name.endswith((".service", ".scope")):
            ctx.where.error(item, f"unit '{name}': only services and scopes run processes "
                                  "(write e.g. nginx.service, or use cgroup: for a slice)")
            return None
        out.add("system.slice/" + name)     # where systemd runs system units
    return frozenset(out)


def _malformed(ctx, key, node):
    return boolean(ctx.where, node, "malformed")


# Family and proto come first: the fields after them are read in their light.
MATCH_FIELDS = {
    "family": _family,
    "proto": _proto,
    "src": _addresses,
    "dst": _addresses,
    "sport": _ports,
    "dport": _ports,
    "in": _interfaces,
    "out": _interfaces,
    "hook": _hook,
    "icmp_type": _icmp_type,
    "icmp_code": _icmp_code,
    "tcp_flags": _tcp_flags,
    "ct_state": _ct_state,
    "uid": _uid,
    "gid": _gid,
    "mark": _mark,
    "length": _length,
    "fragment": _fragment,
    "cgroup": _cgroup,
    "unit": _unit,
    "malformed": _malformed,
}


# --- what the rule does ---------------------------------------------------------

def parse_action(where: Where, node: yaml.Node, actions=ACTIONS) -> Optional[str]:
    word = text(where, node, "action", one_of(actions))
    if word is None:
        return None
    if word.strip().lower() not in actions:
        hint = suggest(word.strip().lower(), actions) or f" (expected {one_of(actions)})"
        if word.strip().lower() == "log":
            hint = " (a default decides: write action: accept, drop or reject, and log: true)"
        where.error(node, f"unknown action '{word}'{hint}")
        return None
    return word.strip().lower()


def parse_rule_action(where: Where, node: yaml.Node) -> Optional[str]:
    return parse_action(where, node, RULE_ACTIONS)


def parse_reject_with(where: Where, node: yaml.Node) -> Optional[str]:
    return choice(where, node, "reject_with", REJECT_WITH)


def check_reject(where: Where, keys: Dict[str, yaml.Node], done: dict,
                 proto: Optional[frozenset], default: bool = False) -> bool:
    """reject_with and set_mark against the action (rule or default); `proto`
    is the rule's (None: any protocol). False when something was reported."""
    action = done.get("action")
    ok = True
    if action == "log" and done.get("log") is False:
        where.error(keys["log"], "log: false contradicts action log (a log rule only logs): "
                                 "remove one of them")
        ok = False
    if action in ("drop", "reject", "log") and done.get("set_mark") is not None:
        why = "a log rule decides nothing" if action == "log" else \
            f"a {_DONE[action]} packet keeps no mark"
        where.error(keys["set_mark"], f"set_mark only works with action accept ({why})")
        ok = False
    kind = done.get("reject_with")
    if kind is None or action is None:
        return ok
    if action != "reject":
        where.error(keys["reject_with"], f"reject_with only works with action reject, "
                                         f"not {action} (write 'action: reject')")
        return False
    if kind == "tcp-reset" and default:
        where.error(keys["reject_with"], "reject_with tcp-reset cannot answer every protocol "
                                         "the default decides: leave reject_with out (TCP then "
                                         "gets a reset, the rest port-unreachable)")
        return False
    if kind == "tcp-reset" and proto != frozenset((PROTO_TCP,)):
        where.error(keys["reject_with"], "reject_with tcp-reset needs proto tcp (only TCP has a "
                                         "reset): add 'proto: tcp', or reject with an ICMP "
                                         "error such as port-unreachable")
        return False
    return ok


_DONE = {"drop": "dropped", "reject": "rejected"}


def parse_set_mark(where: Where, node: yaml.Node) -> Optional[int]:
    written = text(where, node, "set_mark", "a number, e.g. 0x10")
    if written is None:
        return None
    try:
        return values.parse_u32(written, "set_mark")
    except InvalidValue as e:
        where.error(node, e.message)
        return None




def parse_rate(where: Where, node: yaml.Node) -> Optional[Rate]:
    written = text(where, node, "rate", "text such as 10/second")
    if written is None:
        return None
    try:
        return values.parse_rate(written)
    except InvalidValue as e:
        where.error(node, e.message)
        return None


RULE_FIELDS = {
    "name": lambda where, node: node.value,          # read before the others
    "comment": lambda where, node: text(where, node, "comment", "text"),
    "action": parse_rule_action,
    "log": lambda where, node: boolean(where, node, "log"),
    "set_mark": parse_set_mark,
    "rate": parse_rule_rate,
    "offload": lambda where, node: boolean(where, node, "offload"),
    "reject_with": parse_reject_with,
    "time": parse_time,
}
ALL_FIELDS = list(RULE_FIELDS) + list(MATCH_FIELDS)


# --- one rule ---------------------------------------------------------------------

def rule_name(where: Where, node: yaml.MappingNode, index: int) -> Tuple[str, yaml.Node]:
    """The rule's name (or rule-N) and the node to report name problems at."""
    for key, value in node.value:
        if is_scalar(key) and key.value == "name":
            if is_scalar(value) and value.value.strip() and "\n" not in value.value:
                return value.value.strip(), value
            where.error(value, f"rule {index}: name must be a short text, not {describe(value)}")
            return f"rule-{index}", value
    return f"rule-{index}", node


def parse_rule(file: Where, node: yaml.Node, index: int, sets: Dict[str, SetDef],
               used_sets: Set[str], shared: Dict[tuple, object]) -> Optional[ParsedRule]:
    """The rule at `node` (index is 1-based over every file), or None when not a mapping.

    `shared` holds the values of the rules read before: a value equal to one
    of them is replaced by it, so a large policy keeps one `proto: udp` or
    `dport: 53` for all its rules, not one each.
    """
    if not isinstance(node, yaml.MappingNode):
        file.error(node, f"rule {index} must be a mapping of fields, not {describe(node)}")
        return None
    name, name_node = rule_name(file, node, index)
    where = file.within(f'rule "{name}": ')
    items = _fields(where, node)
    keys = {field: key for key, field, _ in items}
    ctx = _Context(where, sets, used_sets)

    found = {field: value for _, field, value in items}
    matched = {}
    for field, parse in MATCH_FIELDS.items():
        if field in found:
            matched[field] = parse(ctx, keys[field], found[field])
            if matched[field] is None:
                ctx.failed.add(field)
    done = {field: RULE_FIELDS[field](where, found[field])
            for field in RULE_FIELDS if field in found and field != "name"}

    if "action" not in found:
        where.error(node, "missing 'action' (add action: accept or action: drop)")
    _check_families(ctx, keys, found, matched)
    consistent = "proto" in ctx.failed or check_reject(where, keys, done, matched.get("proto"))
    consistent = _check_cgroup(ctx, keys, matched) and consistent
    if not consistent or ctx.failed or None in done.values() or "action" not in found:
        return ParsedRule(name, None, keys, where, name_node)
    def one(value):
        return shared.setdefault((type(value), value), value)

    if "unit" in matched:           # a unit is its cgroup path
        matched["cgroup"] = matched.pop("unit") | matched.get("cgroup", frozenset())
    match = Match(**{("in_" if f == "in" else f): one(v) for f, v in matched.items()})
    rule = Rule(name=name, match=match, action=one(done["action"]),
                set_mark=done.get("set_mark"), log=done.get("log"), rate=done.get("rate"),
                offload=done.get("offload", True), reject_with=done.get("reject_with"),
                time=done.get("time"),
                position=Position(file.path, node.start_mark.line + 1,
                                  node.start_mark.column + 1))
    return ParsedRule(name, rule, keys, where, name_node)


def _check_cgroup(ctx: _Context, keys, matched) -> bool:
    """cgroup and unit rules read what the kernel tells of locally sent packets only."""
    field = next((f for f in ("cgroup", "unit") if f in keys), None)
    if field is None or "hook" in ctx.failed:
        return True
    hooks = matched.get("hook")
    if hooks is None or hooks != frozenset({HOOKS["output"]}):
        ctx.where.error(keys[field], f"{field} needs hook: output: the kernel tells a packet's "
                                     "cgroup only for packets this host sends (add "
                                     "'hook: output')")
        return False
    return True


def _fields(where: Where, node: yaml.MappingNode):
    return fields(where, node, ALL_FIELDS, "a rule",
                  listing="a rule field; see docs/policy.md") or []


def _families_of(match) -> frozenset:
    return match.families if match is not None else frozenset()


def _check_families(ctx: _Context, keys, found, matched) -> None:
    """Fields that pin the rule to different IP families never match together."""
    family = matched.get("family")
    proto = matched.get("proto")
    proto_family = None
    if proto and proto <= {PROTO_ICMP}:
        proto_family = 4
    elif proto and proto <= {PROTO_ICMPV6}:
        proto_family = 6
    proto_text = "proto icmp" if proto_family == 4 else "proto icmpv6"

    if family and proto_family and family != proto_family:
        ctx.where.error(keys["proto"], f"{proto_text} is IPv{proto_family} only but the rule "
                                       f"says family ipv{family}, so the rule can never match")
        return
    for field in ("src", "dst"):
        networks = _families_of(matched.get(field))
        if not networks or len(networks) > 1:
            continue
        (only,) = networks
        if family and family != only:
            reason = f"the rule says family ipv{family}"
        elif proto_family and proto_family != only:
            reason = f"{proto_text} is IPv{proto_family} only"
        else:
            continue
        ctx.where.error(found[field], f"{field} holds only IPv{only} networks but {reason}, "
                                      "so the rule can never match")
        return
    src, dst = _families_of(matched.get("src")), _families_of(matched.get("dst"))
    if src and dst and not src & dst:
        ctx.where.error(found["dst"], f"dst holds only IPv{min(dst)} networks but src holds "
                                      f"only IPv{min(src)} ones, so the rule can never match")
