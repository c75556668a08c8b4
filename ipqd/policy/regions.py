"""Regions of packet space: which packets a rule, a policy's first match or
a change between two policies covers, computed exactly from the rules.

The space. Each packet field a rule can test (the policy's words: family,
proto, src, ..., malformed) is an `Axis` cut into atoms: pieces no rule
tells apart (port ranges between the boundaries the rules use, address
ranges between their networks' ends, the classes of marks and TCP flags
that every mask test answers alike, ...), plus an atom "absent" where a
packet may lack the field. A `Space` is built from every Match in play, so
each Match field is exactly a union of atoms. A region is a list of cubes;
a cube holds one set of atoms per axis, as a bit mask (an int), and is the
product of those sets: intersection and difference are bit operations.

Not every product is a packet: ports exist only on the port protocols and
not on later fragments, ICMP types only on ICMP of the packet's family,
addresses only of its family, and no packet is shorter than its headers.
So the whole space is a union of `shapes`, cubes in which every
combination is a packet that `ipqd explain` can describe (and malformed
ones, which it cannot); every region is cut from them.

A policy's first match is `partition`: each shape split rule by rule into
the cubes each rule decides and what is left for the default. `diff`
partitions each cube of one policy by the other and keeps the cubes whose
outcome differs. A rule with a rate may or may not match (it depends on
its tokens): it does not take its cube; the cube's outcome lists it as one
that may decide first.

Exact except where named (`Space.approximate`): interface names matched by
glob patterns are compared on sample names (a literal name is exact). Pure.
"""
from __future__ import annotations

import bisect
import ipaddress
from fnmatch import fnmatchcase
from typing import Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

from ipqd.errors import RegionsTooLarge as TooLarge
from ipqd.policy._values import TCP_FLAGS
from ipqd.policy.model import (CT_STATES, FRAGMENTS, HOOK_NAMES, IPV6_EXT_HEADERS,
                               NF_INET_LOCAL_IN, PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP,
                               PROTO_UDP, PROTO_UDPLITE, PROTOCOL_NAMES, Match, Policy, Rule)

__all__ = ["Space", "Outcome", "Change", "TooLarge", "partition", "diff", "reach", "needed",
           "effects", "MAX_CUBES"]

# Work past which a comparison stops (TooLarge) rather than run for hours:
# cubes looked at or made while splitting, over the whole computation
# (about 2 s a million; two policies of 1,000 rules take about 1.5 million).
MAX_CUBES = 20_000_000
ABSENT = None
_BITS = {4: 32, 6: 128}
# Witness addresses, where a region allows them: documentation ranges
# (RFC 5737, RFC 3849), so a witness never names a real host by chance.
_EXAMPLES = tuple(tuple(int(ipaddress.ip_address(a)) for a in pair) for pair in
                  (("192.0.2.1", "2001:db8::1"), ("198.51.100.1", "2001:db8::2")))


# ---- axes ---------------------------------------------------------------------

class Axis:
    """One field: its atoms, and a Match value or a packet value as atoms."""
    name = ""
    attr = ""                   # the Match attribute (in_ for `in`)

    def __init__(self):
        self.count = 0          # atoms, absent included
        self.absent = 0         # the bit of the atom "absent", 0 when a packet always has it

    def full(self, absent: bool = True) -> int:
        mask = (1 << self.count) - 1
        return mask if absent else mask & ~self.absent

    def test(self, value) -> int:
        raise NotImplementedError

    def atom_of(self, value) -> Optional[int]:
        """The bit of the atom holding a packet's value (None: absent)."""
        raise NotImplementedError

    def pick(self, mask: int):
        """A value in the atoms of `mask` (ABSENT when only absent is there)."""
        raise NotImplementedError


def _bits_of(mask: int) -> Iterator[int]:
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


class _Intervals(Axis):
    """A number in [0, top]; atoms are the ranges between the cuts."""

    def __init__(self, name: str, attr: str, top: int, cuts: Iterable[int], absent: bool):
        super().__init__()
        self.name, self.attr, self.top = name, attr, top
        self.starts = sorted({0} | {c for c in cuts if 0 < c <= top})
        n = len(self.starts)
        self.count = n + (1 if absent else 0)
        self.absent = (1 << n) if absent else 0

    @staticmethod
    def cuts_of(ranges: Iterable[Tuple[int, int]]) -> List[int]:
        out = []
        for low, high in ranges:
            out += [low, high + 1]
        return out

    def span(self, i: int) -> Tuple[int, int]:
        high = self.starts[i + 1] - 1 if i + 1 < len(self.starts) else self.top
        return self.starts[i], high

    def ranges_mask(self, ranges: Iterable[Tuple[int, int]]) -> int:
        mask = 0
        for low, high in ranges:
            first = bisect.bisect_right(self.starts, low) - 1
            last = bisect.bisect_right(self.starts, high) - 1
            mask |= ((1 << (last + 1)) - 1) & ~((1 << first) - 1)
        return mask

    def test(self, value) -> int:
        if hasattr(value, "ranges"):                        # RangeMatch
            inside = self.ranges_mask(value.ranges)
            return self.full(False) & ~inside if value.negate else inside
        if isinstance(value, tuple):                        # length: (low, high)
            return self.ranges_mask([value])
        return self.ranges_mask((v, v) for v in value)      # a set of numbers

    def atom_of(self, value) -> Optional[int]:
        if value is None:
            return self.absent.bit_length() - 1 if self.absent else None
        return bisect.bisect_right(self.starts, value) - 1

    def pick(self, mask: int, at_least: int = 0, prefer: Optional[int] = None):
        if prefer is not None and mask & (1 << self.atom_of(prefer)):
            return prefer
        for i in _bits_of(mask & self.full(False)):
            low, high = self.span(i)
            if high >= at_least:
                return max(low, at_least)
        return ABSENT

    def describe(self, mask: int) -> str:
        parts = []
        for i in _bits_of(mask & self.full(False)):
            low, high = self.span(i)
            if parts and parts[-1][1] + 1 == low:
                parts[-1] = (parts[-1][0], high)
            else:
                parts.append((low, high))
        shown = PROTOCOL_NAMES if self.name == "proto" else {}
        text = ",".join(shown.get(lo, str(lo)) if lo == hi else f"{lo}-{hi}" for lo, hi in parts)
        return text + ("," if text and mask & self.absent else "") + \
            ("none" if mask & self.absent else "")


class _Addresses(Axis):
    """`src`, `dst`: an address of the packet's family; atoms are ranges of
    one family between the ends of the networks the rules name."""

    def __init__(self, name: str, networks: Iterable):
        super().__init__()
        self.name = self.attr = name
        cuts: Dict[int, set] = {4: {0}, 6: {0}}
        for net in networks:
            cuts[net.version] |= {int(net.network_address), int(net.broadcast_address) + 1}
        self.axes = {}
        self.atoms: List[Tuple[int, int, int]] = []         # (version, low, high)
        self.family_mask = {}
        for version in (4, 6):
            top = (1 << _BITS[version]) - 1
            starts = sorted(c for c in cuts[version] if c <= top)
            first = len(self.atoms)
            for i, low in enumerate(starts):
                high = starts[i + 1] - 1 if i + 1 < len(starts) else top
                self.atoms.append((version, low, high))
            self.axes[version] = (first, starts)
            self.family_mask[version] = ((1 << len(self.atoms)) - 1) & ~((1 << first) - 1)
        self.count = len(self.atoms) + 1
        self.absent = 1 << len(self.atoms)

    def test(self, value) -> int:
        inside = 0
        for net in value.networks:
            first, starts = self.axes[net.version]
            lo = bisect.bisect_right(starts, int(net.network_address)) - 1
            hi = bisect.bisect_right(starts, int(net.broadcast_address)) - 1
            inside |= ((1 << (first + hi + 1)) - 1) & ~((1 << (first + lo)) - 1)
        if not value.negate:
            return inside
        families = 0
        for version in value.families:
            families |= self.family_mask[version]
        return families & ~inside

    def atom_of(self, value, family: Optional[int] = None) -> Optional[int]:
        if value is None or family is None:
            return self.absent.bit_length() - 1
        first, starts = self.axes[family]
        return first + bisect.bisect_right(starts, value) - 1

    def pick(self, mask: int, prefer: Sequence[int] = ()):
        """An address of the atoms: one of `prefer` when inside (documentation
        addresses read as examples), else a range's second address (10.0.0.0/8's
        first is 10.0.0.0: the second is more plainly a host)."""
        atoms = [self.atoms[i] for i in _bits_of(mask & ~self.absent)]
        for version, low, high in atoms:
            for address in prefer:
                if low <= address <= high and (address > 0xFFFFFFFF) == (version == 6):
                    return version, address
        for version, low, high in atoms:
            return version, (low + 1 if high > low else low)
        return ABSENT

    def describe(self, mask: int) -> str:
        """Networks and ranges, or `not ...` the rest of the family when shorter."""
        families = [v for v in (4, 6) if mask & self.family_mask[v]]
        if len(families) == 1:
            rest = self.family_mask[families[0]] & ~mask
            if rest:
                plain, other = self._text(mask & ~self.absent), self._text(rest)
                if len(other) + 4 < len(plain):
                    return "not " + other + (",none" if mask & self.absent else "")
        return self._text(mask & ~self.absent) + (",none" if mask & self.absent else "")

    def _text(self, mask: int) -> str:
        parts = []
        for i in _bits_of(mask & ~self.absent):
            version, low, high = self.atoms[i]
            if parts and parts[-1][0] == version and parts[-1][2] + 1 == low:
                parts[-1] = (version, parts[-1][1], high)
            else:
                parts.append((version, low, high))
        words = []
        for version, low, high in parts:
            cls = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
            nets = list(ipaddress.summarize_address_range(cls(low), cls(high)))
            words += [str(n) for n in nets] if len(nets) <= 3 else [f"{cls(low)}-{cls(high)}"]
        return ",".join(words)


class _Names(Axis):
    """A value out of a few words (hook, ct_state, fragment, family, malformed)."""

    def __init__(self, name: str, attr: str, values: Sequence, absent: bool, shown=None):
        super().__init__()
        self.name, self.attr = name, attr
        self.values = list(values)
        self.index = {v: i for i, v in enumerate(self.values)}
        self.shown = shown or {}
        self.count = len(self.values) + (1 if absent else 0)
        self.absent = (1 << len(self.values)) if absent else 0

    def test(self, value) -> int:
        if isinstance(value, (frozenset, set, tuple, list)):
            return sum(1 << self.index[v] for v in value if v in self.index)
        return 1 << self.index[value]

    def atom_of(self, value) -> Optional[int]:
        if value is None:
            return self.absent.bit_length() - 1 if self.absent else None
        return self.index.get(value)

    def pick(self, mask: int):
        for i in _bits_of(mask & self.full(False)):
            return self.values[i]
        return ABSENT

    def describe(self, mask: int) -> str:
        words = [str(self.shown.get(self.values[i], self.values[i]))
                 for i in _bits_of(mask & self.full(False))]
        return ",".join(words + (["none"] if mask & self.absent else []))


class _Masked(Axis):
    """`tcp_flags`, `mark`: (value & mask) == wanted. Atoms are the classes
    of values every test answers alike, found by splitting ternary terms
    (value, care bits) test by test; each class keeps its terms."""

    def __init__(self, name: str, width: int, tests: Iterable[Tuple[int, int]], absent: bool):
        super().__init__()
        self.name = self.attr = name
        self.tests = sorted(set(tests))
        terms = [(0, 0)]
        for value, mask in self.tests:
            split = []
            for tv, tm in terms:
                if (tv ^ value) & tm & mask:
                    split.append((tv, tm))                  # wholly outside the test
                    continue
                free, fv, fm = mask & ~tm, tv, tm
                while free:
                    bit = free & -free
                    free ^= bit
                    split.append((fv | (~value & bit), fm | bit))     # differs at `bit`
                    fv, fm = fv | (value & bit), fm | bit
                split.append((fv, fm))                      # inside the test
            terms = split
            if len(terms) > 4096:
                raise TooLarge(f"too many {name} masks to compare exactly")
        self.classes: List[List[Tuple[int, int]]] = []
        self.by_answers: Dict[tuple, int] = {}
        for tv, tm in terms:
            answers = self._answers(tv)
            if answers not in self.by_answers:
                self.by_answers[answers] = len(self.classes)
                self.classes.append([])
            self.classes[self.by_answers[answers]].append((tv, tm))
        self.count = len(self.classes) + (1 if absent else 0)
        self.absent = (1 << len(self.classes)) if absent else 0

    def _answers(self, value: int) -> tuple:
        return tuple((value & m) == v for v, m in self.tests)

    def test(self, value) -> int:
        wanted = (value.value, value.mask)
        i = self.tests.index(wanted)
        return sum(1 << c for answers, c in self.by_answers.items() if answers[i])

    def atom_of(self, value) -> Optional[int]:
        if value is None:
            return self.absent.bit_length() - 1 if self.absent else None
        return self.by_answers[self._answers(value)]

    def pick(self, mask: int, prefer: Sequence[int] = ()):
        classes = [i for i in _bits_of(mask & self.full(False))]
        if not classes:
            return ABSENT
        for value in prefer:
            if self.by_answers[self._answers(value)] in classes:
                return value
        return self.classes[classes[0]][0][0]

    def describe(self, mask: int) -> str:
        """Each class as the tests it passes (`0x10/0xff`; TCP flags by name,
        `syn,!ack`), the class that passes none as `not ...` them all."""
        words = self._words(mask & self.full(False))
        return ",".join(words + (["none"] if mask & self.absent else []))

    def _words(self, mask: int) -> List[str]:
        words = []
        for c in _bits_of(mask):
            answers = next(a for a, i in self.by_answers.items() if i == c)
            passed = [self._test_text(v, m) for (v, m), yes in zip(self.tests, answers) if yes]
            words.append("&".join(passed) if passed else
                         "not " + "|".join(self._test_text(v, m) for v, m in self.tests))
        return words

    def _test_text(self, value: int, mask: int) -> str:
        if self.name != "tcp_flags":
            return f"{value:#x}/{mask:#x}"
        return ",".join(("" if value & bit else "!") + name
                        for name, bit in TCP_FLAGS.items() if mask & bit)


class _Interfaces(Axis):
    """`in`, `out`: names, or no interface. Literal names are atoms of their
    own; glob patterns are compared on sample names that match them (and
    one that matches nothing), so with a glob the answer is approximate."""

    def __init__(self, name: str, attr: str, patterns: Iterable[str]):
        super().__init__()
        self.name, self.attr = name, attr
        self.patterns = sorted(set(patterns))
        self.globs = [p for p in self.patterns if any(c in p for c in "*?[")]
        samples = [p for p in self.patterns if p not in self.globs] + ["ipqd-none0"]
        for glob in self.globs:
            samples += [_instance(glob, ""), _instance(glob, "x"), _instance(glob, "0")]
        self.names: List[str] = []
        self.by_answers: Dict[tuple, int] = {}
        for sample in samples:
            answers = self._answers(sample)
            if answers not in self.by_answers:
                self.by_answers[answers] = len(self.names)
                self.names.append(sample)
        self.count = len(self.names) + 1
        self.absent = 1 << len(self.names)

    def _answers(self, name: str) -> tuple:
        return tuple(fnmatchcase(name, p) for p in self.patterns)

    def test(self, value) -> int:
        inside = 0
        for i, sample in enumerate(self.names):
            if any(fnmatchcase(sample, p) for p in value.patterns):
                inside |= 1 << i
        return self.full(False) & ~inside if value.negate else inside

    def atom_of(self, value) -> Optional[int]:
        if value is None:
            return self.absent.bit_length() - 1
        return self.by_answers.get(self._answers(value))

    def pick(self, mask: int):
        for i in _bits_of(mask & self.full(False)):
            return self.names[i]
        return ABSENT

    def describe(self, mask: int) -> str:
        words = [self.names[i] for i in _bits_of(mask & self.full(False))]
        return ",".join(words + (["none"] if mask & self.absent else []))


def _instance(glob: str, fill: str) -> str:
    """A name `glob` matches: `*` as `fill`, `?` as x, a class as its first member."""
    out, i = [], 0
    while i < len(glob):
        c = glob[i]
        if c == "*":
            out.append(fill)
        elif c == "?":
            out.append("x")
        elif c == "[":
            end = glob.find("]", i + 2)
            if end < 0:
                out.append(c)
            else:
                body = glob[i + 1:end]
                if body.startswith("!"):
                    out.append("~" if "~" not in body else "#")
                else:
                    out.append(body[0])
                i = end
        else:
            out.append(c)
        i += 1
    return "".join(out)


# ---- the space ----------------------------------------------------------------

# The protocols whose packets carry more than their IP header, and how many
# bytes of it `ipqd explain` writes (ipqd.decision.described).
_PORTS = {PROTO_TCP: 20, PROTO_UDP: 8, PROTO_UDPLITE: 8, PROTO_SCTP: 12}
_ICMP_OF = {4: PROTO_ICMP, 6: PROTO_ICMPV6}
L4 = ("sport", "dport", "tcp_flags", "icmp_type", "icmp_code")
FIELDS = ("family", "proto", "src", "dst", "sport", "dport", "in", "out", "hook", "icmp_type",
          "icmp_code", "tcp_flags", "ct_state", "uid", "gid", "mark", "length", "fragment",
          "malformed")


class Space:
    """The atoms of every field for a set of Matches, and the shapes.
    `conntrack`: whether packets carry a ct_state (True: always, as with
    queue.conntrack; False: never; None: either, when it is not known)."""

    def __init__(self, matches: Iterable[Match], conntrack: Optional[bool] = None):
        matches = list(matches)
        self.conntrack = conntrack

        def values(attr):
            return [getattr(m, attr) for m in matches if getattr(m, attr) is not None]

        def ranges(attr):
            return _Intervals.cuts_of(r for v in values(attr) for r in v.ranges)

        def members(attr):
            return [x for v in values(attr) for x in v] + [x + 1 for v in values(attr) for x in v]

        special = [p for p in _PORTS] + [PROTO_ICMP, PROTO_ICMPV6] + sorted(IPV6_EXT_HEADERS)
        axes = [
            _Names("family", "family", (4, 6), absent=True, shown={4: "ipv4", 6: "ipv6"}),
            _Intervals("proto", "proto", 255, members("proto") + special + [p + 1 for p in special],
                       absent=True),
            _Addresses("src", [n for v in values("src") for n in v.networks]),
            _Addresses("dst", [n for v in values("dst") for n in v.networks]),
            _Intervals("sport", "sport", 65535, ranges("sport"), absent=True),
            _Intervals("dport", "dport", 65535, ranges("dport"), absent=True),
            _Interfaces("in", "in_", [p for v in values("in_") for p in v.patterns]),
            _Interfaces("out", "out", [p for v in values("out") for p in v.patterns]),
            _Names("hook", "hook", sorted(HOOK_NAMES), absent=False, shown=HOOK_NAMES),
            _Intervals("icmp_type", "icmp_type", 255, members("icmp_type"), absent=True),
            _Intervals("icmp_code", "icmp_code", 255, members("icmp_code"), absent=True),
            _Masked("tcp_flags", 8, [(v.value, v.mask) for v in values("tcp_flags")], absent=True),
            _Names("ct_state", "ct_state", CT_STATES, absent=True),
            _Intervals("uid", "uid", 0xFFFFFFFF, ranges("uid"), absent=True),
            _Intervals("gid", "gid", 0xFFFFFFFF, ranges("gid"), absent=True),
            _Masked("mark", 32, [(v.value, v.mask) for v in values("mark")], absent=False),
            _Intervals("length", "length", 65535, _Intervals.cuts_of(values("length")),
                       absent=True),
            _Names("fragment", "fragment", FRAGMENTS, absent=True),
            _Names("malformed", "malformed", (False, True), absent=False),
        ]
        self.axes = axes
        self.index = {axis.name: i for i, axis in enumerate(axes)}
        self.approximate = [f"{axis.name} (glob patterns {', '.join(axis.globs)} are compared on "
                            f"sample names: {', '.join(axis.names)})"
                            for axis in axes if isinstance(axis, _Interfaces) and axis.globs]
        self._constraints: Dict[int, tuple] = {}
        self.shapes = self._shapes()

    def axis(self, name: str) -> Axis:
        return self.axes[self.index[name]]

    def constraint(self, match: Match) -> Tuple[Tuple[int, int], ...]:
        """(axis number, atoms) for each field `match` tests, malformed always."""
        key = id(match)
        found = self._constraints.get(key)
        if found is None or found[0] is not match:
            out = []
            for i, axis in enumerate(self.axes):
                value = getattr(match, axis.attr)
                if axis.name == "malformed":
                    out.append((i, axis.test(value)))
                elif value is not None:
                    out.append((i, axis.test(value)))
            found = self._constraints[key] = (match, tuple(out))
        return found[1]

    def _cube(self, **masks) -> tuple:
        ct = self.axis("ct_state")
        if self.conntrack is not None:
            masks["ct_state"] = ct.full(False) if self.conntrack else ct.absent
        return tuple(masks[a.name] if a.name in masks else a.full() for a in self.axes)

    def _shapes(self) -> List[tuple]:
        """Cubes whose every combination is a packet (see the module's docstring)."""
        ax = self.axis
        shapes = []
        proto = ax("proto")
        for family in (4, 6):
            src = ax("src").family_mask[family]
            dst = ax("dst").family_mask[family]
            for fragment in FRAGMENTS:
                header = 20 if family == 4 else (40 if fragment == "none" else 48)
                groups: Dict[tuple, int] = {}           # (L4 fields present, min length) -> protos
                for p_atom in range(proto.count - 1):
                    low, high = proto.span(p_atom)
                    if family == 6 and low == high and low in IPV6_EXT_HEADERS:
                        continue            # walked past: never an IPv6 packet's proto
                    if low != high or low not in _PORTS and low not in (PROTO_ICMP, PROTO_ICMPV6):
                        groups[((), header)] = groups.get(((), header), 0) | 1 << p_atom
                        continue
                    p = low
                    if p == _ICMP_OF[10 - family]:
                        # ICMP of the other family: no transport fields read, and
                        # explain refuses to describe it (its witness is None)
                        groups[((), header)] = groups.get(((), header), 0) | 1 << p_atom
                        continue
                    l4 = _PORTS.get(p, 8)
                    if fragment == "not-first":
                        present: tuple = ()
                    elif p in _PORTS:
                        present = ("sport", "dport") + (("tcp_flags",) if p == PROTO_TCP else ())
                    elif p == _ICMP_OF[family]:
                        present = ("icmp_type", "icmp_code")
                    else:
                        present = ()
                    key = (present, header + l4)
                    groups[key] = groups.get(key, 0) | 1 << p_atom
                for (present, shortest), protos in groups.items():
                    masks = {"family": 1 << (family == 6), "proto": protos, "src": src,
                             "dst": dst, "fragment": ax("fragment").test(fragment),
                             "malformed": 1, "hook": ax("hook").full(),
                             "length": ax("length").ranges_mask([(shortest, 65535)])}
                    for name in L4:
                        masks[name] = ax(name).full(False) if name in present else \
                            ax(name).absent
                    shapes.append(self._cube(**masks))
        # Malformed: what was read before the fault may be there or not; no
        # transport header. Not describable, but decided (rules with malformed: true).
        l4_absent = {name: ax(name).absent for name in L4}
        for family in (4, 6):
            shapes.append(self._cube(
                family=1 << (family == 6), malformed=2, hook=ax("hook").full(),
                src=ax("src").family_mask[family] | ax("src").absent,
                dst=ax("dst").family_mask[family] | ax("dst").absent, **l4_absent))
        shapes.append(self._cube(family=ax("family").absent, malformed=2,
                                 src=ax("src").absent, dst=ax("dst").absent,
                                 hook=ax("hook").full(), **l4_absent))
        return _joined(shapes)

    # -- a packet, as atoms ---------------------------------------------------

    def atoms_of(self, view) -> Optional[tuple]:
        """The atom bit of each field of a packet view (None: a name no
        sample stands for, see `approximate`)."""
        out = []
        for axis in self.axes:
            if axis.name in ("src", "dst"):
                atom = axis.atom_of(getattr(view, axis.name), view.family)
            elif axis.name == "in":
                atom = axis.atom_of(view.indev)
            elif axis.name == "out":
                atom = axis.atom_of(view.outdev)
            elif axis.name == "malformed":
                atom = axis.atom_of(bool(view.malformed))
            else:
                atom = axis.atom_of(getattr(view, axis.name))
            if atom is None:
                return None
            out.append(1 << atom)
        return tuple(out)

    def holds(self, cube: tuple, atoms: tuple) -> bool:
        return all(c & a for c, a in zip(cube, atoms))

    # -- a cube, for people ---------------------------------------------------

    def shape_of(self, cube: tuple) -> tuple:
        """The shape a cube was cut from."""
        return next(s for s in self.shapes if all(c & ~w == 0 for c, w in zip(cube, s)))

    def describe(self, cube: tuple, shape: tuple) -> str:
        """The fields in which a cube is narrower than its shape:
        `proto tcp, dport 23`; `any packet` when none."""
        words = []
        for axis, mask, whole in zip(self.axes, cube, shape):
            if mask != whole and axis.name != "malformed":
                words.append(f"{axis.name} {axis.describe(mask)}")
        return ", ".join(words) if words else "any packet"

    def witness(self, cube: tuple, conntrack: bool = False) -> Optional[str]:
        """A packet of the cube in explain's description; None for a
        malformed one (which no description makes). With `conntrack`, a
        packet with a ct_state where the cube allows one (as the daemon
        gives every packet then)."""
        def pick(name, *args, **kwargs):
            i = self.index[name]
            return self.axes[i].pick(cube[i], *args, **kwargs)

        if not cube[self.index["malformed"]] & 1:
            return None
        family, fragment = pick("family"), pick("fragment")
        fragments = self.axis("fragment")
        if cube[self.index["fragment"]] & fragments.test("none"):
            fragment = "none"
        proto = self._proto(cube[self.index["proto"]], family)
        src, dst = pick("src", _EXAMPLES[0]), pick("dst", _EXAMPLES[1])
        if ABSENT in (family, proto, fragment, src, dst):
            return None
        sport, dport = pick("sport", prefer=40000), pick("dport")
        cls = ipaddress.IPv4Address if family == 4 else ipaddress.IPv6Address
        ends = []
        for (_, address), port in ((src, sport), (dst, dport)):
            text = str(cls(address))
            if port is not ABSENT:
                text = f"{text}:{port}" if family == 4 else f"[{text}]:{port}"
            ends.append(text)
        words = [PROTOCOL_NAMES.get(proto, str(proto)), ends[0], "->", ends[1]]
        flags = pick("tcp_flags", prefer=(0x02, 0x10, 0x12, 0x18))
        if flags is not ABSENT:
            names = [n for n, bit in TCP_FLAGS.items() if flags & bit]
            words.append(",".join(names) if names else "none")
        for name, key in (("icmp_type", "type"), ("icmp_code", "code")):
            value = pick(name)
            if value is not ABSENT:
                words.append(f"{key}={value}")
        shortest = self._shortest(family, proto, fragment)
        length = pick("length", shortest)
        if length is ABSENT:
            return None
        if length != shortest:
            words.append(f"len={length}")
        mark = pick("mark", prefer=(0,))
        if mark:
            words.append(f"mark={mark:#x}")
        for name in ("uid", "gid", "ct_state", "in", "out"):
            i = self.index[name]
            absent = self.axes[i].absent
            concrete = conntrack and name == "ct_state" and cube[i] & ~absent
            value = ABSENT if cube[i] & absent and not concrete else pick(name)   # fewest words
            if value is not ABSENT:
                words.append(f"{'ct' if name == 'ct_state' else name}={value}")
        hooks = cube[self.index["hook"]]
        inputs = hooks & (1 << self.axis("hook").index[NF_INET_LOCAL_IN])
        hook = self.axis("hook").pick(inputs or hooks)
        if hook != NF_INET_LOCAL_IN:
            words.append(f"hook={HOOK_NAMES[hook]}")
        if fragment != "none":
            words.append(f"frag={fragment}")
        return " ".join(words)

    def _proto(self, mask: int, family: Optional[int]):
        """A protocol of the atoms, not an IPv6 extension header's number."""
        axis = self.axis("proto")
        familiar = (PROTO_TCP, PROTO_UDP, _ICMP_OF.get(family)) + tuple(PROTOCOL_NAMES)
        for p in familiar:                  # the familiar ones first, then by number
            if p is not None and mask & (1 << axis.atom_of(p)) and \
                    p != _ICMP_OF[10 - family] and not (family == 6 and p in IPV6_EXT_HEADERS):
                return p
        for i in _bits_of(mask & axis.full(False)):
            low, high = axis.span(i)
            for p in range(low, high + 1):
                if p == _ICMP_OF[10 - family] or family == 6 and p in IPV6_EXT_HEADERS:
                    continue
                return p
        return ABSENT

    @staticmethod
    def _shortest(family: int, proto: int, fragment: str) -> int:
        header = 20 if family == 4 else (40 if fragment == "none" else 48)
        if proto in _PORTS:
            return header + _PORTS[proto]
        if proto in (PROTO_ICMP, PROTO_ICMPV6):
            return header + 8
        return header


# ---- first match --------------------------------------------------------------

class Outcome(NamedTuple):
    """What decides the packets of a cube: the rules with a rate that may
    decide first (while within their rate), then the rule (or the default,
    index -1) that decides otherwise. Each entry is a rule index."""
    rated: Tuple[int, ...]
    final: int


def may_pass(rule: Rule) -> bool:
    """Whether a packet inside the rule's match may still go on to the next
    rules: an `action: log` rule always lets it (logged), and whether a rule
    with a rate, a time window or a cgroup matches is not a header's to say
    (its tokens, the clock, the sending socket). The regions show such a
    rule as one that may decide first."""
    return rule.rate is not None or rule.time is not None or bool(rule.match.cgroup) \
        or rule.action == "log"


def _condition(rule: Rule):
    """What, besides the headers, a rule's matching depends on (effects)."""
    if rule.rate is None and rule.time is None and not rule.match.cgroup:
        return None
    return (rule.name, rule.rate, rule.time, rule.match.cgroup)


class _Budget:
    def __init__(self, limit: int):
        self.left = limit

    def spend(self, n: int = 1) -> None:
        self.left -= n
        if self.left < 0:
            raise TooLarge("the regions are too many to compute exactly")


def _split(cube: tuple, constraint) -> Tuple[Optional[tuple], List[tuple]]:
    """(cube ∩ constraint or None, the pieces of cube outside it, disjoint)."""
    inside = list(cube)
    for i, mask in constraint:
        inside[i] &= mask
        if not inside[i]:
            return None, [cube]
    outside = []
    current = list(cube)
    for i, mask in constraint:
        rest = current[i] & ~mask
        if rest:
            piece = list(current)
            piece[i] = rest
            outside.append(tuple(piece))
        current[i] &= mask
    return tuple(inside), outside


def partition(space: Space, rules: Sequence[Rule], cubes: Iterable[tuple],
              budget: Optional[_Budget] = None,
              constraints: Optional[list] = None) -> Iterator[Tuple[tuple, Outcome]]:
    """Each cube split into disjoint cubes, each with the Outcome of a
    first-match walk over `rules` (`constraints`: theirs, when at hand)."""
    budget = budget or _Budget(MAX_CUBES)
    if constraints is None:
        constraints = [space.constraint(rule.match) for rule in rules]
    for start in cubes:
        remaining = [(start, ())]
        joined_at = JOIN_AT
        for index, (rule, constraint) in enumerate(zip(rules, constraints)):
            if not remaining:
                break
            budget.spend(len(remaining))        # the scan itself, not only the new cubes
            after = []
            for cube, rated in remaining:
                inside, outside = _split(cube, constraint)
                if inside is None:
                    after.append((cube, rated))
                    continue
                budget.spend(1 + len(outside))
                if may_pass(rule):
                    after.append((inside, rated + (index,)))
                else:
                    yield inside, Outcome(rated, index)
                after += [(piece, rated) for piece in outside]
            remaining = after
            if len(remaining) >= joined_at:
                # what is left is carved into many pieces by rules that share
                # most fields: joined again, the next rules scan fewer
                remaining = _rejoined(remaining, budget)
                joined_at = max(JOIN_AT, 2 * len(remaining))
        for cube, rated in remaining:
            yield cube, Outcome(rated, -1)


JOIN_AT = 64        # pieces left before they are joined again


def _rejoined(remaining: List[Tuple[tuple, tuple]], budget: _Budget) -> List[Tuple[tuple, tuple]]:
    by_rated: Dict[tuple, List[tuple]] = {}
    for cube, rated in remaining:
        by_rated.setdefault(rated, []).append(cube)
    return [(cube, rated) for rated, cubes in by_rated.items()
            for cube in _joined(cubes, budget)]


def effects(policy: Policy, outcome: Outcome) -> tuple:
    """What an outcome does to a packet: for each rule that may decide, in
    order, (action, mark, log, rate); the same effect twice in a row counts once."""
    out = []
    for index in outcome.rated + (outcome.final,):
        # a mark is only set on what is accepted (as the compiler decides)
        if index < 0:
            d = policy.default
            effect = (d.action, d.set_mark if d.action == "accept" else None, d.log, None)
        else:
            rule = policy.rules[index]
            log = rule.log if rule.log is not None else policy.default.log
            effect = (rule.action, rule.set_mark if rule.action == "accept" else None,
                      log or rule.action == "log", _condition(rule))
        out.append(effect)
    # A rated rule just before the final one that does what it does changes
    # nothing, within its rate or past it (and then the one before it, ...).
    while len(out) > 1 and out[-2][:3] == out[-1][:3]:
        del out[-2]
    return tuple(out)


class Change(NamedTuple):
    cube: tuple
    shape: tuple
    old: Outcome
    new: Outcome


def diff(old: Policy, new: Policy, limit: int = MAX_CUBES) -> Tuple[Space, List[Change]]:
    """Every cube of packet space that `old` and `new` treat differently
    (verdict, mark or log), merged where outcomes agree. Raises TooLarge."""
    # ct_state is there when both track connections, never when neither does
    both = {old.queue.conntrack, new.queue.conntrack}
    space = Space([r.match for r in old.rules] + [r.match for r in new.rules],
                  both.pop() if len(both) == 1 else None)
    budget = _Budget(limit)
    changes = []
    theirs = [space.constraint(rule.match) for rule in new.rules]
    for shape in space.shapes:
        for cube, before in partition(space, old.rules, [shape], budget):
            for piece, after in partition(space, new.rules, [cube], budget, theirs):
                if effects(old, before) != effects(new, after):
                    changes.append(Change(piece, shape, before, after))
    return space, _merged(changes, budget)


def _merged(changes: List[Change], budget: _Budget) -> List[Change]:
    """Cubes of the same shape and outcomes joined where they can be."""
    groups: Dict[tuple, List[tuple]] = {}
    for c in changes:
        groups.setdefault((c.shape, c.old, c.new), []).append(c.cube)
    out = []
    for (shape, old, new), cubes in groups.items():
        out += [Change(cube, shape, old, new) for cube in _joined(cubes, budget)]
    return out


def _joined(cubes: List[tuple], budget: Optional[_Budget] = None) -> List[tuple]:
    """Disjoint cubes, two that differ in one field only joined into one,
    until none can be: the same packets in fewer cubes."""
    budget = budget or _Budget(MAX_CUBES)
    merged = True
    while merged and len(cubes) > 1:
        merged = False
        joined: List[Optional[tuple]] = list(cubes)
        for axis in range(len(cubes[0])):
            seen: Dict[tuple, int] = {}
            for n, cube in enumerate(joined):
                if cube is None:
                    continue
                key = cube[:axis] + cube[axis + 1:]
                budget.spend()
                other = seen.get(key)
                if other is None:
                    seen[key] = n
                    continue
                a = joined[other]
                joined[other] = a[:axis] + (a[axis] | cube[axis],) + a[axis + 1:]
                joined[n] = None
                merged = True
        cubes = [c for c in joined if c is not None]
    return cubes


def reach(rules: Sequence[Rule], index: int, space: Optional[Space] = None,
          limit: int = MAX_CUBES,
          conntrack: Optional[bool] = None) -> Tuple[Space, Optional[tuple], List[int]]:
    """A cube of packets rule `index` decides (earlier rules with a rate
    taken as spent), or None when no packet reaches it; and the earlier
    rules without a rate that share packets with it (together they take all
    its packets when the cube is None). `space`: one made from at least
    these rules. Raises TooLarge past `limit` cubes."""
    space = space or Space((r.match for r in rules[:index + 1]), conntrack)
    target = space.constraint(rules[index].match)
    budget = _Budget(limit)
    cubes = []
    for shape in space.shapes:
        inside, _ = _split(shape, target)
        if inside is not None:
            cubes.append(inside)
    overlapping = []
    for i, rule in enumerate(rules[:index]):
        if may_pass(rule):
            continue
        constraint = space.constraint(rule.match)
        after = []
        hit = False
        for cube in cubes:
            inside, outside = _split(cube, constraint)
            budget.spend(1 + len(outside))
            if inside is not None:
                hit = True
            after += outside if inside is not None else [cube]
        if hit:
            overlapping.append(i)
        cubes = after
        if not cubes:
            break
    return space, (_witnessed(space, cubes) if cubes else None), overlapping


def needed(rules: Sequence[Rule], index: int, earlier: List[int], space: Space,
           limit: int = MAX_CUBES) -> List[int]:
    """Of the `earlier` rules that together take all of rule `index`'s
    packets (`reach`), those it needs: each dropped in turn, latest first,
    when the others still take them all (a ct_state rule may share packets
    with it without being needed). Stops trimming past `limit` cubes."""
    kept = list(earlier)
    for i in reversed(earlier):
        if len(kept) == 1:
            break
        others = [rules[k] for k in kept if k != i]
        try:
            _, cube, _ = reach(others + [rules[index]], len(others), space, limit)
        except TooLarge:
            break
        if cube is None:
            kept.remove(i)
    return kept


def _witnessed(space: Space, cubes: List[tuple]) -> tuple:
    """The first cube with a witness, else the first."""
    return next((c for c in cubes if space.witness(c) is not None), cubes[0])
