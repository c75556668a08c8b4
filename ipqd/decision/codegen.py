"""A decision function generated for each compiled policy: a cache key in, a verdict out.

The verdict cache's key reader (ipqd.decision.verdict_cache) reads, in one
struct call per message layout, exactly the fields the policy reads. For a
key the cache does not hold, `build_decider` gives a function that decides
from the key alone, without the Packet object, the packet view or the
compiled matcher's scan: Python source written for this policy (which
fields its rules test, where the key holds them) and compiled once per
load. `Decider.source` is that source (`ipqd explain --show-code`).

How it decides: the rules of each (family, protocol) are numbered as in
the policy, bit i standing for rule i. Each field the bucket's rules test
there splits its values into intervals within which every rule's test on
it answers the same: a sorted table of interval starts for addresses
(bisect), a list indexed by value for ports, tcp flags and ICMP type and
code, giving the interval's number. Each interval has the bits of the
rules whose test passes there (rules that do not test the field pass); the
lowest bit of the AND over the fields is the first rule that can match on
those fields. The answer depends only on the intervals' numbers, so it is
remembered by them (a bounded dict, cleared when full): a packet costs a
few lookups and one dict get, the same at 10 rules as at 10,000, and
only a combination of intervals not seen before pays the ANDs.

Fenced: the function answers only where its answer is the compiled
matcher's. A rule that tests any field not specialized here (interfaces,
hook, ct_state, mark, length, owner, fragment, and any match kind added
later), or has a rate, logs, offloads, sets anything this module does not
know of, or has another action than accept and drop, is answered None when
it is the first candidate: the full path then decides the packet with the
rule's compiled matcher. Rules earlier than the candidate were ruled out
on fields this module reads exactly, so they cannot match.
Pure: no I/O.
"""
from __future__ import annotations

import dataclasses
import struct
from bisect import bisect_right
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ipqd.decision.compiler import match_families, offload_states
from ipqd.decision.verdict_cache import CachedVerdict, KeyMaker, VerdictCache, key_kind, \
    key_positions
from ipqd.policy.model import PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, Policy
from ipqd.policy.offload import layout as offload_layout
from ipqd.wire import nfqueue as nfq
from ipqd.wire.nfnetlink import NFPROTO_IPV4, NFPROTO_IPV6
from ipqd.wire.nfqueue import NF_ACCEPT, NF_DROP

# The fields the generated code tests itself; family and proto pick the bucket.
SPECIALIZED = frozenset({"family", "proto", "src", "dst", "sport", "dport", "tcp_flags",
                         "icmp_type", "icmp_code"})
# Rule and default attributes whose meaning is known here: any other one
# that is not at its default value makes the rule (or default) unanswerable.
_KNOWN_RULE = frozenset({"name", "match", "action", "set_mark", "log", "rate", "position",
                         "offload"})
_KNOWN_DEFAULT = frozenset({"action", "log", "set_mark"})
# The fields a packet carries, by the kind of its transport header.
_CARRIED = {"tcp": ("sport", "dport", "tcp_flags"), "udp": ("sport", "dport"),
            "icmp": ("icmp_type", "icmp_code"), "other": ()}
_NFPROTO = {4: NFPROTO_IPV4, 6: NFPROTO_IPV6}
_BITS = {4: 32, 6: 128}
_L4 = frozenset({"sport", "dport", "tcp_flags", "icmp_type", "icmp_code"})
# Combinations of intervals remembered per bucket before it starts over.
MEMO_SIZE = 65536

Decide = Callable[[tuple], Optional[CachedVerdict]]


class Decider:
    """The generated function (`decide`: key -> fresh CachedVerdict or None)
    and its source."""
    __slots__ = ("decide", "source", "answerable", "fields")

    def __init__(self, decide: Decide, source: str, answerable: int, fields: frozenset):
        self.decide = decide
        self.source = source
        self.answerable = answerable        # rules it can answer for without the matcher
        self.fields = fields

    def decide_packet(self, payload: bytes, family: int, hook: Optional[int] = None,
                      indev: Optional[str] = None, outdev: Optional[str] = None,
                      mark: int = 0) -> Optional[CachedVerdict]:
        """The function's answer for an IP packet (`family` 4 or 6), read as
        the daemon reads it: from a queue message like the kernel's, by the
        verdict cache's key reader (ipqd explain). None: the full path."""
        packet = nfq.Packet(0, _NFPROTO[family], 1, 0x0800 if family == 4 else 0x86DD,
                            hook or 0)
        packet.payload = payload
        packet.mark = mark
        names = {1: indev, 2: outdev}
        packet.indev = 1 if indev is not None else None
        packet.outdev = 2 if outdev is not None else None
        try:
            data = bytearray(nfq.encode_packet(packet))
        except ValueError:          # too long for a queue message: never queued so
            return None
        n = len(data) - (-len(payload) % 4)     # the kernel's message ends with the payload
        struct.pack_into("=I", data, 0, n)
        keys = KeyMaker(self.fields, VerdictCache(), batch=False, ifname=names.get)
        keys.take([data[:n] + bytes(256)], [n])     # room after it, as a receive buffer has
        found = list(keys.round.misses.values())
        return self.decide(found[0]) if found else None


def decider_for(policy: Policy, fields: frozenset) -> Decider:
    """The decision function the daemon's worker uses for `policy` (whose
    compiled matcher reads `fields`)."""
    offload = offload_layout(policy.queue.offload, {hook.chain for hook in policy.hooks})
    return build_decider(policy, fields, offloading=bool(offload and offload.hooks))


def build_decider(policy: Policy, fields: frozenset, offloading: bool = False) -> Decider:
    """The decision function of `policy` for keys of a reader of `fields`
    (Matcher.fields). `offloading`: decisions that could offload their flow
    are left to the full path."""
    rules = policy.rules
    offload = _offload_by_rule(policy) if offloading else [frozenset()] * len(rules)
    final = [_final(i, rule, policy, offload[i]) for i, rule in enumerate(rules)]
    default = _final_default(policy, offloading)
    names: Dict[str, object] = {"FINAL": tuple(final), "DEFAULT": default,
                                "bisect": bisect_right, "from_bytes": int.from_bytes,
                                "MISS": object(), "MEMO_SIZE": MEMO_SIZE}
    lines: List[str] = []
    dispatch: List[str] = []
    inline: Dict[Tuple[int, int], List[str]] = {}     # (NFPROTO, proto) -> the bucket's body
    for family in (4, 6):
        members = [i for i, rule in enumerate(rules)
                   if not rule.match.malformed and family in match_families(rule.match)]
        protos = {p for i in members if rules[i].match.proto is not None
                  for p in rules[i].match.proto}
        protos |= {PROTO_TCP, PROTO_UDP, PROTO_ICMP if family == 4 else PROTO_ICMPV6}
        for proto in sorted(protos) + [None]:
            kind = "other" if proto is None else key_kind(family, proto)
            if kind is None:
                continue                    # no key for it: the full path
            listed = [i for i in members if rules[i].match.proto is None
                      or (proto is not None and proto in rules[i].match.proto)]
            name = f"_{family}_{'other' if proto is None else proto}"
            function = _bucket(name, family, kind, listed, rules, fields, names)
            lines += function
            if kind in ("udp", "tcp", "icmp") and len(function) > 3:
                inline[_NFPROTO[family], proto] = function[1:-1]
            dispatch.append(f"    ({_NFPROTO[family]}, {'None' if proto is None else proto}): "
                            f"{name},")
    at_proto = key_positions(fields, "other")["proto"]
    source = "\n".join(
        [f"# The decision function of {policy.path}: a key of the verdict cache's reader",
         "# in, a fresh CachedVerdict out, or None: the full path decides.", ""]
        + lines
        + ["BUCKETS = {"] + dispatch + ["}", "",
           "def decide(key, buckets=BUCKETS):",
           "    # The buckets of UDP, TCP and ICMP written out, the others called.",
           f"    family, proto = key[0], key[{at_proto}]"]
        + _inlined(inline)
        + ["    bucket = buckets.get((family, proto))",
           "    if bucket is None:",
           "        bucket = buckets.get((family, None))",
           "        if bucket is None:",
           "            return None",
           "    return bucket(key)", ""])
    code = compile(source, f"<decider of {policy.path}>", "exec")
    exec(code, names)
    return Decider(names["decide"], source, sum(entry is not None for entry in final), fields)


def _inlined(inline: Dict[Tuple[int, int], List[str]]) -> List[str]:
    """The bodies of `inline`'s buckets inside decide, UDP over IPv4 first."""
    out: List[str] = []
    order = sorted(inline, key=lambda fp: (fp[0] != NFPROTO_IPV4, fp[1] != PROTO_UDP, fp))
    for family, proto in order:
        out.append(f"    if proto == {proto} and family == {family}:")
        out += ["    " + line for line in inline[family, proto]]
    return out


# ---- what the function may answer ------------------------------------------

def _offload_by_rule(policy: Policy) -> Sequence[frozenset]:
    if policy.queue.offload.mode == "off":
        return [frozenset()] * len(policy.rules)
    return offload_states(policy.rules, policy.default)[0]


def _unknown_set(obj, known: frozenset) -> bool:
    """Whether `obj` (a dataclass) sets an attribute this module does not know."""
    for field in dataclasses.fields(obj):
        if field.name in known:
            continue
        if field.default is not dataclasses.MISSING:
            expected = field.default
        elif field.default_factory is not dataclasses.MISSING:
            expected = field.default_factory()
        else:
            return True
        if getattr(obj, field.name) != expected:
            return True
    return False


def _verdict(action: str, mark: Optional[int], index: int) -> Optional[CachedVerdict]:
    if action == "accept":
        return CachedVerdict(NF_ACCEPT, mark, index, fresh=True)
    if action == "drop":
        return CachedVerdict(NF_DROP, None, index, fresh=True)
    return None


def _final(index: int, rule, policy: Policy, offload: frozenset) -> Optional[CachedVerdict]:
    """The answer for rule `index` as the first candidate, or None (the full path)."""
    logs = rule.log if rule.log is not None else policy.default.log
    if (not rule.match.fields() <= SPECIALIZED or rule.rate is not None or logs or offload
            or _unknown_set(rule, _KNOWN_RULE) or rule.match.dynamic_sets()):
        return None
    return _verdict(rule.action, rule.set_mark if rule.action == "accept" else None, index)


def _final_default(policy: Policy, offloading: bool) -> Optional[CachedVerdict]:
    default = policy.default
    if default.log or _unknown_set(default, _KNOWN_DEFAULT):
        return None
    if offloading and policy.queue.offload.mode != "off" \
            and offload_states(policy.rules, default)[1]:
        return None
    return _verdict(default.action, default.set_mark if default.action == "accept" else None, -1)


# ---- tables -----------------------------------------------------------------

def _complement(intervals: List[Tuple[int, int]], top: int) -> List[Tuple[int, int]]:
    out, at = [], 0
    for lo, hi in intervals:
        if lo > at:
            out.append((at, lo - 1))
        at = max(at, hi + 1)
    if at <= top:
        out.append((at, top))
    return out


def _merged(intervals) -> List[Tuple[int, int]]:
    out: List[List[int]] = []
    for lo, hi in sorted(intervals):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return [(lo, hi) for lo, hi in out]


def _interval_table(passing: Dict[int, List[Tuple[int, int]]], wild: int,
                    top: int) -> Tuple[List[int], List[int]]:
    """(starts, masks): values from starts[k] to the next start pass the
    tests of the rules in masks[k] (`wild`: rules that do not test)."""
    toggles: Dict[int, int] = {}
    for bit, intervals in passing.items():
        for lo, hi in intervals:
            toggles[lo] = toggles.get(lo, 0) ^ bit
            if hi < top:
                toggles[hi + 1] = toggles.get(hi + 1, 0) ^ bit
    starts = sorted(set(toggles) | {0})
    shared: Dict[int, int] = {}             # equal masks: one object
    masks, mask = [], wild
    for start in starts:
        mask ^= toggles.get(start, 0)
        masks.append(shared.setdefault(mask, mask))
    return starts, masks


def _direct(starts: List[int], masks: List[int], size: int) -> List[int]:
    """The table as a list indexed by value (for small domains)."""
    table: List[int] = []
    for k, start in enumerate(starts):
        end = starts[k + 1] if k + 1 < len(starts) else size
        table.extend([masks[k]] * (end - start))
    return table


def _blocks(starts: List[int], numbers: List[int]) -> List[Optional[int]]:
    """For each IPv4 /16 block, its interval number when the whole block
    lies in one interval, else None."""
    out: List[Optional[int]] = [None] * 65536
    for k, start in enumerate(starts):
        end = starts[k + 1] - 1 if k + 1 < len(starts) else 0xFFFFFFFF
        first, last = (start + 0xFFFF) >> 16, ((end + 1) >> 16) - 1    # blocks wholly inside
        if first <= last:
            out[first:last + 1] = [numbers[k]] * (last - first + 1)
    return out


def _address_intervals(addr, family: int) -> List[Tuple[int, int]]:
    if addr.dynamic:        # any address may be in the set: a candidate everywhere
        return [(0, (1 << _BITS[family]) - 1)]
    inside = _merged((int(n.network_address), int(n.broadcast_address))
                     for n in addr.networks if n.version == family)
    return _complement(inside, (1 << _BITS[family]) - 1) if addr.negate else inside


def _range_intervals(match, top: int) -> List[Tuple[int, int]]:
    inside = _merged((max(0, lo), min(top, hi)) for lo, hi in match.ranges if lo <= hi)
    return _complement(inside, top) if match.negate else inside


def _bucket(name: str, family: int, kind: str, listed: List[int], rules, fields: frozenset,
            names: Dict[str, object]) -> List[str]:
    """The source of one bucket's function, its tables put in `names`."""
    carried = set(_CARRIED[kind])
    # A rule testing a transport field this kind of packet does not carry
    # cannot match (the field is None, negated or not).
    listed = [i for i in listed if rules[i].match.fields() & _L4 <= carried]
    at = key_positions(fields, kind)
    everyone = 0
    for i in listed:
        everyone |= 1 << i
    reads: List[str] = []           # statements that find each field's interval number
    tables: List[str] = []          # the name of each field's masks, by interval number

    def field(attr: str, masks: List[int], read: str) -> None:
        ids: Dict[int, int] = {}            # equal masks: one interval number
        numbers = [ids.setdefault(mask, len(ids)) for mask in masks]
        names[f"M{name}_{attr}"] = tuple(ids)
        tables.append(f"M{name}_{attr}")
        reads.extend(read.format(n=f"n{len(tables) - 1}").split("\n"))
        return numbers

    for attr in ("src", "dst"):
        testing = [i for i in listed if getattr(rules[i].match, attr) is not None]
        if not testing:
            continue
        passing = {1 << i: _address_intervals(getattr(rules[i].match, attr), family)
                   for i in testing}
        starts, masks = _interval_table(passing, everyone & ~_bits(testing),
                                        (1 << _BITS[family]) - 1)
        # bisect gives 1.. for values >= 0: the numbers start with a spare.
        if family == 4:
            # IPv4: first a list by the top 16 bits, for the /16 blocks that
            # lie in one interval; bisect for the others (None there).
            value = f"key[{at[attr]}]"
            read = (f"    {{n}} = B{name}_{attr}[{value} >> 16]\n"
                    f"    if {{n}} is None:\n"
                    f"        {{n}} = N{name}_{attr}[bisect(S{name}_{attr}, {value})]")
        else:
            value = f"from_bytes(key[{at[attr]}], 'big')"
            read = f"    {{n}} = N{name}_{attr}[bisect(S{name}_{attr}, {value})]"
        numbers = field(attr, masks, read)
        names[f"S{name}_{attr}"] = starts
        names[f"N{name}_{attr}"] = tuple([0] + numbers)
        if family == 4:
            names[f"B{name}_{attr}"] = _blocks(starts, numbers)
    for attr, where in (("sport", "word0"), ("dport", "dport")):
        testing = [i for i in listed if getattr(rules[i].match, attr) is not None]
        if not testing or attr not in carried:
            continue
        passing = {1 << i: _range_intervals(getattr(rules[i].match, attr), 65535)
                   for i in testing}
        starts, masks = _interval_table(passing, everyone & ~_bits(testing), 65535)
        numbers = field(attr, masks, f"    {{n}} = N{name}_{attr}[key[{at[where]}]]")
        names[f"N{name}_{attr}"] = _direct(starts, numbers, 65536)
    small = []
    if "tcp_flags" in carried:
        small.append(("tcp_flags", f"key[{at.get('tcp_flags')}]",
                      lambda m, v: v & m.tcp_flags.mask == m.tcp_flags.value))
    small += [(attr, read, lambda m, v, attr=attr: v in getattr(m, attr))
              for attr, read in (("icmp_type", f"key[{at.get('word0')}] >> 8"),
                                 ("icmp_code", f"key[{at.get('word0')}] & 255"))
              if attr in carried]
    for attr, read, passes in small:
        testing = [i for i in listed if getattr(rules[i].match, attr) is not None]
        if not testing:
            continue
        by_test: Dict[object, int] = {}      # a policy repeats its tests: each once
        for i in testing:
            test = getattr(rules[i].match, attr)
            by_test[test] = by_test.get(test, 0) | 1 << i
        samples = {test: rules[next(i for i in testing
                                    if getattr(rules[i].match, attr) == test)].match
                   for test in by_test}
        wild = everyone & ~_bits(testing)
        masks = []
        for value in range(256):
            mask = wild
            for test, bits in by_test.items():
                if passes(samples[test], value):
                    mask |= bits
            masks.append(mask)
        numbers = field(attr, masks, f"    {{n}} = N{name}_{attr}[{read}]")
        names[f"N{name}_{attr}"] = tuple(numbers)
    if not reads:
        names[f"ALL{name}"] = everyone
        return [f"def {name}(key):",
                f"    return FINAL[(ALL{name} & -ALL{name}).bit_length() - 1] "
                f"if ALL{name} else DEFAULT", ""]
    numbers = ", ".join(f"n{k}" for k in range(len(tables)))
    names[f"MEMO{name}"] = {}
    anded = " & ".join(f"{table}[n{k}]" for k, table in enumerate(tables))
    memo = f"MEMO{name}"
    return ([f"def {name}(key):"] + reads
            + [f"    found = {memo}.get(({numbers},), MISS)",
               "    if found is not MISS:",
               "        return found",
               f"    m = {anded}",
               "    found = FINAL[(m & -m).bit_length() - 1] if m else DEFAULT",
               f"    if len({memo}) >= MEMO_SIZE:",
               f"        {memo}.clear()",
               f"    {memo}[({numbers},)] = found",
               "    return found", ""])


def _bits(indexes) -> int:
    out = 0
    for i in indexes:
        out |= 1 << i
    return out
