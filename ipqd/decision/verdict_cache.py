"""The verdict cache: packets that differ only in fields no rule reads get one verdict.

The compiler knows which packet fields the policy reads (`Matcher.fields`).
Two packets that agree on all of them, and on the metadata a rule can test,
get the same decision, unless a rate-limited rule took part in it (a token
bucket changes with time). So the worker keeps, per compiled policy, a dict
from exactly those fields to the verdict, and a packet whose key is in it
skips the packet view and the matcher. A logged decision is kept too, but
answered from the cache only when the log's rate would suppress its entry
(`log_gate`): an entry that is written needs the whole packet view, so that
packet takes the full path. A new policy starts with an empty cache.

Only "plain" packets get a key: IPv4 without options or IPv6 without
extension headers, not fragmented, copied whole, carrying TCP, UDP, ICMP,
ICMPv6 or a protocol without ports, with headers that `ipqd.decision.packet.parse`
would accept. For those the fields read here are exactly the ones `parse`
puts in the view (tests/pure/test_verdict_cache.py checks it against `parse`);
anything else gets no key and takes the full path, which stays the
reference. A key is read straight from the receive buffers: one struct
call per packet, in one loop over a burst (KeyMaker.take), compiled for
each message layout the kernel uses (ipqd.wire.fast_decode.AttributeLayout).

In front of that careful read sits an exact-match cache, as Open vSwitch
keeps one in front of its flow classifier: one struct call reads every
byte the careful read would look at (the message's lengths and attribute
headers, the metadata and header fields it checks or keys on), all but the
packet id, and a dict maps that tuple to the verdict the careful read led
to. Equal tuples mean the careful read would find the same key, so a hit
skips its checks. Its tuples also hold bytes that only some protocols use
(TCP's sequence number where UDP has its length), so only TCP and UDP go
in, and a flow whose read bytes change (an ICMP checksum) is simply read
carefully each time.
Pure: no I/O.
"""
from __future__ import annotations

import struct
from operator import itemgetter
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ipqd.wire.attributes import PACKET_ATTRS, READ
from ipqd.wire.fast_decode import ABSENT_VALUES, SUMMARY_FIELDS, AttributeLayout, \
    absent_position, layout_of, layout_struct
from ipqd.wire.nfnetlink import NFPROTO_IPV4 as _NFPROTO_IPV4, NFPROTO_IPV6 as _NFPROTO_IPV6
from ipqd.wire.nfqueue import NF_ACCEPT
from ipqd.decision.packet import IPV6_EXT_HEADERS
from ipqd.policy.model import (L4_FIELDS, PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP,
                               PROTO_UDP, PROTO_UDPLITE)

# Entries kept, in two generations of half as many; a miss costs one decision.
CACHE_SIZE = 65536
# Tuples the exact-match cache keeps, per message layout, before it starts
# over; a miss there costs one careful read.
EXACT_SIZE = 4096

# What a key reader takes from the IP packet, by offset from its start. Both
# families put the protocol and what follows at the same places in the read
# tuple (IPv6 reads its traffic class byte to keep step), so one code path
# checks the transport header. One 16-bit word holds the ports' first half
# or ICMP's type and code.
_IPV4 = ((0, "B", "version"), (2, "H", "total"), (6, "H", "frag"), (9, "B", "proto"),
         (12, "I", "src"), (16, "I", "dst"), (20, "H", "word0"), (22, "H", "dport"),
         (24, "H", "udp_len"), (32, "B", "tcp_offset"), (33, "B", "tcp_flags"))
_IPV6 = ((0, "B", "version"), (1, "B", "traffic_class"), (4, "H", "plen"), (6, "B", "proto"),
         (8, "16s", "src"), (24, "16s", "dst"), (40, "H", "word0"), (42, "H", "dport"),
         (44, "H", "udp_len"), (52, "B", "tcp_offset"), (53, "B", "tcp_flags"))
_V4_HEADER, _V6_HEADER = 20, 40
# Which read value answers each field, by kind of transport header.
_TCP, _UDP, _ICMP, _OTHER = range(4)
_KEY_SOURCE = (
    {"sport": "word0", "dport": "dport", "tcp_flags": "tcp_flags"},     # _TCP
    {"sport": "word0", "dport": "dport"},                               # _UDP
    {"icmp_type": "word0", "icmp_code": "word0"},                       # _ICMP
    {},                                                                 # _OTHER
)
_UNCACHED_PROTOS = frozenset({PROTO_SCTP, PROTO_UDPLITE})     # rare: the full path
# Packet metadata a key can hold: the summary field (fast_decode.SUMMARY_FIELDS)
# that answers each policy field. The queue stands for ct_state: a packet
# with NFQA_CT_INFO takes the full path, and without it the queue's
# conntrack setting decides its state.
_META_FIELD = {"ct_state": "queue", "hook": "hook",
               **{row.rule: row.field for row in PACKET_ATTRS if row.summary == READ}}
assert not set(SUMMARY_FIELDS) & {name for _, _, name in _IPV4 + _IPV6}, \
    "a key reader names the metadata and the header fields it reads alike"
_read_id = struct.Struct(">I").unpack_from      # nfqnl_msg_packet_hdr.packet_id

# The answer for an interface index: its name, or None.
IfName = Callable[[Optional[int]], Optional[str]]


class CacheRound:
    """What the cache answered since the worker last sent verdicts (it
    clears this then): per queue the highest id among the hits a batch
    verdict may cover (ids grow: the latest), the other hits as (queue, id,
    CachedVerdict), and the keys of the misses by (queue, id), under which
    the full path stores its decisions."""
    __slots__ = ("batch", "single", "misses")

    def __init__(self):
        self.batch: Dict[int, int] = {}
        self.single: List[Tuple[int, int, "CachedVerdict"]] = []
        self.misses: Dict[Tuple[int, int], tuple] = {}

    def clear(self) -> None:        # in place: the readers hold these
        self.batch.clear()
        self.single.clear()
        self.misses.clear()


class KeyMaker:
    """Reads cache keys for one compiled policy, only the fields it reads,
    and answers what its cache holds. `batch`: plain accepts may be answered
    by a batch verdict. `ifname` names an interface index, for policies that
    test interfaces."""

    def __init__(self, fields: frozenset, cache: Optional["VerdictCache"] = None,
                 batch: bool = True, ifname: IfName = lambda index: None, exact: bool = True,
                 log_gate: Optional[Callable[[], bool]] = None):
        self.fields = fields
        self.cache = cache if cache is not None else VerdictCache()
        self.batch = batch
        self.ifname = ifname
        self.exact = exact                  # the exact-match cache in front of the careful read
        # Asked on a hit of a logged decision: True (or no gate) sends the
        # packet to the full path to be logged, False answers it here
        # (DecisionLog.wants_entry, which counts it as suppressed).
        self.log_gate = log_gate
        self.round = CacheRound()
        self._readers: List[Callable] = []
        self._fast: Optional[Callable] = None      # the reader of the layout seen last

    def take(self, views: Sequence, lengths: Sequence[int]) -> List[int]:
        """Answer from the cache what it can of the datagrams views[i][:lengths[i]]:
        each hit is counted (VerdictCache.touched) and goes in `round`. Returns
        the indexes of the rest, for the full path: misses (their keys in
        round.misses), packets that are not plain, and datagrams that are
        not one ordinary packet message."""
        if self._fast is None:
            rest, strangers = [], range(len(lengths))
        else:
            rest, strangers = self._fast(views, lengths)
        if strangers:
            # Taken after the others, so their ids may be lower: a batch
            # verdict must keep the highest.
            batch = self.round.batch
            highest = dict(batch)
            rest.extend(i for i in strangers if not self._take_stranger(views[i], lengths[i]))
            rest.sort()
            for queue, packet_id in highest.items():
                if batch[queue] < packet_id:
                    batch[queue] = packet_id
        return rest

    def _take_stranger(self, buf, n: int) -> bool:
        """One datagram of another layout than the last: a known layout's
        reader takes it, or a reader learned from it. True when answered."""
        for reader in self._readers:
            rest, strangers = reader((buf,), (n,))
            if not strangers:
                self._fast = reader
                return not rest
        learned = layout_of(buf, n)
        if learned is None:
            return False
        reader = self._fast = layout_reader(learned[0], self.fields, self.cache, self.round,
                                            self.batch, self.ifname, self.exact, self.log_gate)
        self._readers.insert(0, reader)
        del self._readers[8:]
        rest, strangers = reader((buf,), (n,))
        return not rest and not strangers


def layout_reader(layout: AttributeLayout, fields: frozenset, cache: "VerdictCache",
                  answers: CacheRound, batch: bool, ifname: IfName,
                  exact: bool = True, log_gate: Optional[Callable[[], bool]] = None) -> Callable:
    """The key reader of one message layout: for each datagram, one struct
    call reads the metadata and the IP and transport headers, the key takes
    what `fields` needs, and `cache` answers it into `answers`. Returns
    (rest, strangers): the indexes left for the full path, and those of
    datagrams of another layout. Keys do not depend on the layout:
    metadata the kernel left out reads as what a decoded Packet would hold
    (mark 0, else None)."""
    plan = KeyPlan(layout, fields)
    # Interface names can change under their indexes: such keys are read
    # carefully every time.
    exact_ok = exact and not plan.names
    return _taker(plan, careful_reader(plan, ifname), exact_ok, cache, answers, batch, log_gate)


class _FamilyRead:
    """The careful read of one family in one layout: the struct that reads
    the metadata and the IP and transport header fields in one call, where
    each value lands (`index`, by name), whether ABSENT_VALUES must follow
    it (`absent`), and a key picker per kind of transport header."""
    __slots__ = ("shape", "index", "absent", "picks")

    def __init__(self, layout: AttributeLayout, header: tuple, fields: frozenset,
                 meta: List[str], used: List[str], length: str):
        named = sorted([(offset, code, field) for field, (offset, code) in layout.offsets.items()]
                       + [(layout.start + offset, code, name) for offset, code, name in header])
        index = {name: i for i, (_, _, name) in enumerate(named)}
        for field in SUMMARY_FIELDS:
            index.setdefault(field, absent_position(field, len(named)))
        self.shape = layout_struct(">", [(offset, code) for offset, code, _ in named])
        self.index = index
        # Added only when the reader takes from it (the copy costs per packet):
        # most layouts carry all the metadata a policy reads.
        self.absent = any(index[field] >= len(named) for field in meta + used)
        self.picks = tuple(_picker(index, fields, meta, sources, length)
                           for sources in _KEY_SOURCE)


def _picker(index: Dict[str, int], fields: frozenset, meta: List[str], sources: Dict[str, str],
            length: str) -> Callable:
    """What makes the key of one kind of transport header from a family's read."""
    return itemgetter(*[index[name] for name in _key_names(fields, meta, sources, length)])


def _key_names(fields: frozenset, meta: List[str], sources: Dict[str, str],
               length: str) -> List[str]:
    """The read values a key holds, in order, for one kind of transport header."""
    wanted = meta + ["proto"] + [name for name in ("src", "dst") if name in fields]
    if not fields.isdisjoint(L4_FIELDS):
        wanted += list(dict.fromkeys(sources[f] for f in sorted(fields) if f in sources))
    if "length" in fields:
        wanted.append(length)
    return wanted


def _key_meta(fields: frozenset) -> List[str]:
    """The metadata every key holds first: the family and the queue always
    (ct_state asks for the queue again), then what the policy reads."""
    return list(dict.fromkeys(["family", "queue"] + sorted(
        (_META_FIELD[f] for f in fields if f in _META_FIELD), key=SUMMARY_FIELDS.index)))


# Kinds of transport header a key can describe, by name, for key_positions.
KEY_KINDS = {"tcp": _TCP, "udp": _UDP, "icmp": _ICMP, "other": _OTHER}


def key_positions(fields: frozenset, kind: str) -> Dict[str, int]:
    """Where a key of a packet with transport header `kind` (KEY_KINDS) holds
    each value: "family" (the NFPROTO number), "proto", "src" and "dst" (an
    int for IPv4, 16 bytes for IPv6), "word0" (the source port, or ICMP's
    type << 8 | code), "dport", "tcp_flags". For a decider that answers from
    keys (ipqd.decision.codegen): keys keep this order for any layout."""
    names = _key_names(fields, _key_meta(fields), _KEY_SOURCE[KEY_KINDS[kind]], "total")
    return {name: i for i, name in enumerate(names)}


def key_kind(family: int, proto: int) -> Optional[str]:
    """The kind of transport header a key reader gives a packet of IP
    `family` (4, 6) and `proto`, or None when it gives no key."""
    if proto == PROTO_TCP:
        return "tcp"
    if proto == PROTO_UDP:
        return "udp"
    if proto == (PROTO_ICMP if family == 4 else PROTO_ICMPV6):
        return "icmp"
    return None if proto in _UNCACHED_PROTOS else "other"


def _exact_read(layout: AttributeLayout, header: tuple, fields: frozenset,
                meta: List[str]) -> struct.Struct:
    """The exact-match read of one family: the bytes the careful read
    checks or keys on, but not the packet id. Byte order does not matter
    for equality; native, so that the length compares with n."""
    # What the checks read, up to the last byte the careful read takes (a
    # buffer too short for it must fail both alike).
    wanted = {"version", "total", "plen", "frag", "proto", "udp_len", "tcp_offset", "tcp_flags"}
    wanted.update(name for name in ("src", "dst") if name in fields)
    if not fields.isdisjoint(L4_FIELDS):
        for sources in _KEY_SOURCE:
            wanted.update(sources[f] for f in fields if f in sources)
    read = dict(layout.head_fields)
    read.update(layout.offsets[field] for field in meta if field in layout.offsets)
    read.update((layout.start + offset, code) for offset, code, name in header if name in wanted)
    at = 0
    for offset, code in sorted(read.items()):
        assert offset >= at, "the exact read's fields must not overlap"
        at = offset + struct.calcsize("=" + code)
    return layout_struct("=", list(read.items()))


# Where both families' reads keep the same index.
_SHARED = ("queue", "packet_id", "indev", "outdev", "version", "proto", "udp_len", "tcp_offset")


class KeyPlan:
    """What the key reader of one message layout reads for one policy's
    fields: the metadata its keys hold, a careful read per family, and per
    family the exact-match layer's read."""

    def __init__(self, layout: AttributeLayout, fields: frozenset):
        self.layout = layout
        self.names = "in" in fields or "out" in fields
        self.meta = _key_meta(fields)
        # read besides the key: the id, and the interfaces to name them
        used = ["packet_id", "indev", "outdev"] if self.names else ["packet_id"]
        self.ipv4 = _FamilyRead(layout, _IPV4, fields, self.meta, used, "total")
        self.ipv6 = _FamilyRead(layout, _IPV6, fields, self.meta, used, "plen")
        assert all(self.ipv4.index[name] == self.ipv6.index[name] for name in _SHARED), \
            "the families must keep step"
        self.exact4 = _exact_read(layout, _IPV4, fields, self.meta)
        self.exact6 = _exact_read(layout, _IPV6, fields, self.meta)


_STRANGER = "stranger"
# A burst of at least this many datagrams, less than a quarter of them
# cache hits, turns the exact-match read off for the next burst.
_FLOOD_BURST = 8          # careful_reader's answer for a datagram of another layout


def careful_reader(plan: KeyPlan, ifname: IfName) -> Callable:
    """The careful read of one layout, the exact-match layer's reference:
    (buf, n) -> (key, queue, packet id, whether the exact layer may keep
    it, the packet's length) for a plain packet; None for a packet that gets no key (the full
    path takes it); _STRANGER for a datagram of another layout."""
    layout, names = plan.layout, plan.names
    heads, expected, payload_type = layout.heads.unpack_from, layout.expected, layout.payload_type
    payload_at = layout.payload_at
    read4, absent4, picks4 = plan.ipv4.shape.unpack_from, plan.ipv4.absent, plan.ipv4.picks
    read6, absent6, picks6 = plan.ipv6.shape.unpack_from, plan.ipv6.absent, plan.ipv6.picks
    queue, packet_id, indev, outdev, version, proto_at, udp_len, tcp_offset = \
        (plan.ipv4.index[name] for name in _SHARED)
    total, frag, plen = plan.ipv4.index["total"], plan.ipv4.index["frag"], plan.ipv6.index["plen"]

    def careful(buf, n):
        # The layout's attribute headers, the payload last and the message
        # exactly n bytes long, as the kernel sends it (stricter than
        # AttributeLayout.payload_end): its padding, n - payload_at -
        # attr_len, is 0 to 3. The payload's own length is checked against
        # the IP header below. What lies past n in the buffer is read but
        # never used; a buffer too short for the reads raises.
        found = heads(buf)
        attr_len = found[-2]
        if found[0] != n or found[-1] != payload_type or found[1:-2] != expected \
                or (n - payload_at - attr_len) & -4:
            return _STRANGER
        size = attr_len - 4
        family = buf[16]
        if family == _NFPROTO_IPV4:
            v = read4(buf) + ABSENT_VALUES if absent4 else read4(buf)
            if size < _V4_HEADER or v[version] != 0x45 or v[total] != size or v[frag] & 0x3FFF:
                return None
            room, picks, icmp, icmp_room = size - _V4_HEADER, picks4, PROTO_ICMP, 8
        elif family == _NFPROTO_IPV6:
            v = read6(buf) + ABSENT_VALUES if absent6 else read6(buf)
            if v[version] >> 4 != 6 or _V6_HEADER + v[plen] != size \
                    or v[proto_at] in IPV6_EXT_HEADERS:
                return None
            room, picks, icmp, icmp_room = size - _V6_HEADER, picks6, PROTO_ICMPV6, 4
        else:
            return _STRANGER
        # The transport header as parse would take it, or no key.
        proto = v[proto_at]
        if proto == PROTO_TCP:
            kind = _TCP if 20 <= (v[tcp_offset] >> 4) * 4 <= room else None
        elif proto == PROTO_UDP:
            kind = _UDP if 8 <= v[udp_len] <= room else None
        elif proto == icmp:
            kind = _ICMP if room >= icmp_room else None
        else:
            kind = None if proto in _UNCACHED_PROTOS else _OTHER
        if kind is None:
            return None
        key = picks[kind](v)
        if names:       # names, not indexes: an interface can be renamed
            key += (ifname(v[indev]), ifname(v[outdev]))
        return key, v[queue], v[packet_id], kind <= _UDP, size

    return careful


def _taker(plan: KeyPlan, careful: Callable, exact_ok: bool, cache: "VerdictCache",
           answers: CacheRound, batch: bool, log_gate: Optional[Callable[[], bool]]) -> Callable:
    """The reader of a burst of datagrams of one layout: the exact-match
    layer first, then the careful read, and the cache's answer."""
    touched = cache.touched                 # kept: a settle empties it in place
    hits_batch, hits_single, misses = answers.batch, answers.single, answers.misses
    read4, read6 = plan.exact4.unpack_from, plan.exact6.unpack_from
    # read bytes -> (entry, queue, the packet's length: the read holds it)
    exact_hits: Dict[tuple, Tuple[CachedVerdict, int, int]] = {}
    cache.layers.append(exact_hits)                   # emptied with the cache (invalidate)
    id_at = plan.layout.offsets["packet_id"][0]       # every packet message carries its id
    # Whether the last burst was mostly hits: a burst mostly of new flows (a
    # flood) skips the exact-match read, which finds nothing for them, in
    # the next one.
    hit_lately = [True]

    def take(views, lengths) -> Tuple[List[int], List[int]]:
        rest, strangers = [], []
        last = {}               # queue -> index of its latest batchable hit
        seen = None
        exact_now = exact_ok and hit_lately[0]
        hits = 0                # cache hits, of either layer
        # As of this burst: the young generation (a store may start another:
        # its entries are then in `older`, still found), the keys seen once.
        entries, older, once, decide = cache.entries, cache.older, cache.seen, cache.decide
        generation = cache.generation
        missed = 0
        for i, n in enumerate(lengths):
            buf = views[i]
            try:
                entry = None
                if exact_now:           # the exact-match layer, checked against the careful read
                    family = buf[16]
                    seen = read4(buf) if family == _NFPROTO_IPV4 else \
                        read6(buf) if family == _NFPROTO_IPV6 else None
                    hit = exact_hits.get(seen)
                    if hit is not None and seen[0] == n:
                        entry, queue, size = hit
                if entry is None:
                    found = careful(buf, n)
                    if found is None or found is _STRANGER:
                        (rest if found is None else strangers).append(i)
                        continue
                    key, queue, packet_id, exact_kind, size = found
                    entry = entries.get(key)
                    if entry is None and older:
                        entry = cache.recall(key)
                    if entry is None:
                        missed += 1
                        # The policy's own decision function, from the key
                        # alone; None: the full path decides.
                        entry = decide(key) if decide is not None else None
                        if entry is None:
                            misses[queue, packet_id] = key
                            rest.append(i)
                            continue
                        if key in once:                 # VerdictCache.admit, inline
                            cache.admit(key, entry)
                        else:
                            if len(once) >= generation:
                                once.clear()
                            once.add(key)
                    elif exact_kind and seen is not None:
                        if len(exact_hits) >= EXACT_SIZE:
                            exact_hits.clear()
                        exact_hits[seen] = (entry, queue, size)
                # A hit, of either layer, or a fresh decision.
                if not entry.fresh:
                    hits += 1
                if entry.log and (log_gate is None or log_gate()):
                    rest.append(i)          # its line is written: the full path, which logs
                    continue
                if not entry.hits:
                    touched.append(entry)
                entry.hits += 1
                entry.bytes += size
                if entry.batchable and batch:
                    last[queue] = i
                else:
                    hits_single.append((queue, _read_id(buf, id_at)[0], entry))
            except Exception:       # the full path is the boundary that counts
                rest.append(i)
        # The batch verdict covers up to the latest hit: its id, read once.
        for queue, i in last.items():
            hits_batch[queue] = _read_id(views[i], id_at)[0]
        cache.misses += missed
        hit_lately[0] = 4 * hits >= len(lengths) or len(lengths) < _FLOOD_BURST
        return rest, strangers

    return take


class CachedVerdict:
    """What a cache hit needs: the verdict, its mark, and whom to count.
    `fresh`: a decision a decider made for a key the cache did not hold
    (counted as decided, not as a cache hit); the cache keeps a copy."""
    __slots__ = ("verdict", "mark", "rule_index", "log", "accept", "batchable", "hits",
                 "bytes", "shadow_index", "disagrees", "fresh")

    def __init__(self, verdict: int, mark: Optional[int], rule_index: int, log: bool = False,
                 shadow_index: int = -1, disagrees: bool = False, fresh: bool = False):
        self.verdict = verdict
        self.mark = mark
        self.rule_index = rule_index          # -1: the default
        self.log = log                        # the decision is logged: see KeyMaker.log_gate
        # With a shadow policy (ipqd.decision.shadow): its rule, and whether its
        # verdict differs (then `log` is set: a disagreement is written like a decision).
        self.shadow_index = shadow_index
        self.disagrees = disagrees
        self.fresh = fresh
        self.hits = 0                         # since Engine.settle last counted them
        self.bytes = 0                        # their packets' lengths, likewise
        accept = self.accept = verdict == NF_ACCEPT
        self.batchable = accept and mark is None      # may go in a batch verdict


class VerdictCache:
    """Keys to CachedVerdict, bounded, with its own counters.

    A flood of new flows must neither make a miss dear nor push out the
    flows that hit. So a key is admitted on its second sight only (`seen`
    holds keys seen once, and starts over when full: a set of tuples, no
    entry made), and entries live in two generations: when the young one
    is full it becomes the old one and the oldest is dropped; an entry hit
    in the old generation moves back to the young one (`recall`), so a flow
    that keeps hitting is never dropped, and the cost stays O(1) per packet.

    `decide`, when set (Engine), answers a key the cache does not hold:
    a CachedVerdict marked fresh, or None for the full path."""

    def __init__(self, size: int = CACHE_SIZE,
                 decide: Optional[Callable[[tuple], Optional[CachedVerdict]]] = None):
        self.size = size
        self.generation = max(1, size // 2)
        self.entries: Dict[tuple, CachedVerdict] = {}
        self.older: Dict[tuple, CachedVerdict] = {}
        self.seen: set = set()
        self.decide = decide
        # Entries hit since the totals were last settled (Engine.settle); kept
        # here, not found from `entries`, which a flush may have emptied.
        self.touched: List[CachedVerdict] = []
        self.hits = 0
        self.misses = 0
        self.flushes = 0
        self.invalidations = 0
        # Dicts in front of `entries` that hold its entries too (the
        # exact-match layer): emptied with it when its verdicts go stale.
        self.layers: List[dict] = []

    def store(self, key: tuple, entry: CachedVerdict) -> None:
        """Keep `entry` under `key` now."""
        self._keep(key, entry)

    def admit(self, key: tuple, entry: CachedVerdict) -> None:
        """Keep `entry` under `key` if the key was seen before, else remember
        the key as seen (see the class). A decider's fresh entry, shared by
        every key it answers, is kept as a copy of its own."""
        seen = self.seen
        if key not in seen:
            if len(seen) >= self.generation:
                seen.clear()
            seen.add(key)
            return
        seen.discard(key)
        if entry.fresh:
            entry = CachedVerdict(entry.verdict, entry.mark, entry.rule_index, entry.log)
        self._keep(key, entry)

    def recall(self, key: tuple) -> Optional[CachedVerdict]:
        """The old generation's entry for `key`, moved to the young one, or None."""
        entry = self.older.get(key)
        if entry is not None:
            self._keep(key, entry)
        return entry

    def _keep(self, key: tuple, entry: CachedVerdict) -> None:
        entries = self.entries
        if len(entries) >= self.generation:
            # The young generation grows old; the old one goes (O(1) per
            # packet on average, unlike keeping an LRU order).
            self.older, self.entries = entries, {}
            entries = self.entries
            self.flushes += 1
        entries[key] = entry

    def invalidate(self) -> None:
        """Forget every verdict, in place (the readers hold these dicts): a
        dynamic set changed, and a kept verdict might no longer be the
        policy's. The hits not yet counted stay in `touched`."""
        self.entries.clear()
        self.older.clear()
        self.seen.clear()
        for layer in self.layers:
            layer.clear()
        self.invalidations += 1

    def stats(self) -> Dict[str, int]:
        return {"cache_hits": self.hits, "cache_misses": self.misses,
                "cache_entries": len(self.entries) + len(self.older),
                "cache_flushes": self.flushes}
