"""The verdict cache: packets that differ only in fields no rule reads get one verdict.

The compiler knows which packet fields the policy reads (`Matcher.fields`).
Two packets that agree on all of them, and on the metadata a rule can test,
get the same decision, unless a rate-limited rule took part in it (a token
bucket changes with time) or the decision is logged (a log line needs the
whole packet view). So the worker keeps, per compiled policy, a dict from
exactly those fields to the verdict, and a packet whose key is in it skips
the packet view and the matcher. A new policy starts with an empty cache.

Only "plain" packets get a key: IPv4 without options or IPv6 without
extension headers, not fragmented, copied whole, carrying TCP, UDP, ICMP,
ICMPv6 or a protocol without ports, with headers that `ipqd.packet.parse`
would accept. For those the fields read here are exactly the ones `parse`
would put in the view (tests/test_verdict_cache.py checks it against
`parse`); anything else returns None and takes the full path, which stays
the reference. Pure: no I/O.
"""
from __future__ import annotations

import struct
from operator import itemgetter
from typing import Callable, Dict, Optional

from ipqd.nfqueue import NF_ACCEPT
from ipqd.packet import IPV6_EXT_HEADERS, L4_FIELDS, PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP, \
    PROTO_TCP, PROTO_UDP, PROTO_UDPLITE

# Entries kept before the cache starts over; a miss costs one full decision.
CACHE_SIZE = 65536

_V4 = struct.Struct("!BxHxxHxBxxII")      # ver_ihl total frag proto src dst
_V6 = struct.Struct("!4xHBx16s16s")       # plen nxt src dst (as bytes)
_PORTS = struct.Struct("!HH")
_UDP_LEN = struct.Struct("!4xH")
_FAMILY_OF_NFPROTO = {2: 4, 10: 6}        # nfgenmsg family -> IP version

# The payload fields `payload_fields` returns, in tuple order (PacketView names).
PAYLOAD_FIELDS = ("proto", "src", "dst", "sport", "dport", "tcp_flags",
                  "icmp_type", "icmp_code", "length")
# What a plain packet's own protocol leaves empty: sport..icmp_code.
_NO_L4 = (None, None, None, None, None)
_UNCACHED_PROTOS = frozenset({PROTO_SCTP, PROTO_UDPLITE})     # rare: the full path


def payload_fields(buf, start: int, end: int, version: int, want_l4: bool) -> Optional[tuple]:
    """The PAYLOAD_FIELDS of the plain IP packet in buf[start:end], as `parse`
    would read them (L4 fields only when `want_l4`), or None when the packet
    is not plain (see the module's docstring). IPv6 addresses stay bytes: a
    key needs them equal, not numeric."""
    size = end - start
    if version == 4:
        if size < 20 or buf[start] != 0x45:
            return None
        _vi, total, frag, proto, src, dst = _V4.unpack_from(buf, start)
        if total != size or frag & 0x3FFF:
            return None
        l4 = start + 20
    elif version == 6:
        if size < 40 or buf[start] >> 4 != 6:
            return None
        plen, proto, src, dst = _V6.unpack_from(buf, start)
        total = 40 + plen
        if total != size:
            return None
        l4 = start + 40
    else:
        return None
    room = total - (l4 - start)
    if proto == PROTO_TCP:
        if room < 20:
            return None
        header = (buf[l4 + 12] >> 4) * 4
        if header < 20 or header > room:
            return None
        if not want_l4:
            return (proto, src, dst, None, None, None, None, None, total)
        sport, dport = _PORTS.unpack_from(buf, l4)
        return (proto, src, dst, sport, dport, buf[l4 + 13], None, None, total)
    if proto == PROTO_UDP:
        if room < 8:
            return None
        length = _UDP_LEN.unpack_from(buf, l4)[0]
        if length < 8 or length > room:
            return None
        if not want_l4:
            return (proto, src, dst, None, None, None, None, None, total)
        sport, dport = _PORTS.unpack_from(buf, l4)
        return (proto, src, dst, sport, dport, None, None, None, total)
    if (proto == PROTO_ICMP and version == 4) or (proto == PROTO_ICMPV6 and version == 6):
        if room < (8 if version == 4 else 4):
            return None
        if not want_l4:
            return (proto, src, dst, None, None, None, None, None, total)
        return (proto, src, dst, None, None, None, buf[l4], buf[l4 + 1], total)
    if proto in _UNCACHED_PROTOS or (version == 6 and proto in IPV6_EXT_HEADERS):
        return None
    return (proto, src, dst) + _NO_L4 + (total,)


# The metadata of a packet a key can hold, in the order of
# `ipqd.queue_socket.packet_summary`'s tuple (queue, family, id, hook, mark,
# indev, outdev, uid, gid, ...): the policy field each answers.
_META_POSITION = {"ct_state": 0, "hook": 3, "mark": 4, "in": 5, "out": 6, "uid": 7, "gid": 8}


class KeyMaker:
    """Builds cache keys for one compiled policy: only the fields it reads.

    Keys from a packet summary (the receive path) and from a decoded Packet
    (the full path, to store what it decided) are built the same way, so a
    stored verdict is found again.
    """

    def __init__(self, fields: frozenset):
        self.want_l4 = not fields.isdisjoint(L4_FIELDS)
        wanted = [i for i, name in enumerate(PAYLOAD_FIELDS)
                  if name in fields or name == "proto"]
        self._payload = itemgetter(*wanted)
        # The family is always in the key (index 1); the queue stands for ct_state.
        self._meta = itemgetter(1, *sorted(_META_POSITION[f] for f in fields
                                           if f in _META_POSITION))
        self.names = "in" in fields or "out" in fields

    def from_summary(self, summary: tuple, buf, ifname: Callable) -> Optional[tuple]:
        """The key of a packet summary whose payload lies in `buf`, or None."""
        version = _FAMILY_OF_NFPROTO.get(summary[1])
        if version is None:
            return None
        found = payload_fields(buf, summary[9], summary[10], version, self.want_l4)
        if found is None:
            return None
        if self.names:      # names, not indexes: an interface can be renamed
            return (self._meta(summary), self._payload(found),
                    ifname(summary[5]), ifname(summary[6]))
        return (self._meta(summary), self._payload(found))

    def from_packet(self, packet, ifname: Callable) -> Optional[tuple]:
        """The key of a decoded Packet (nfqueue.Packet), or None."""
        payload = packet.payload
        if payload is None or packet.cap_len is not None:
            return None
        summary = (packet.queue, packet.family, packet.packet_id, packet.hook, packet.mark,
                   packet.indev, packet.outdev, packet.uid, packet.gid, 0, len(payload))
        return self.from_summary(summary, payload, ifname)


class CachedVerdict:
    """What a cache hit needs: the verdict, its mark, and whom to count."""
    __slots__ = ("verdict", "mark", "rule_index", "accept", "batchable")

    def __init__(self, verdict: int, mark: Optional[int], rule_index: int):
        self.verdict = verdict
        self.mark = mark
        self.rule_index = rule_index          # -1: the default
        accept = self.accept = verdict == NF_ACCEPT
        self.batchable = accept and mark is None      # may go in a batch verdict


class VerdictCache:
    """A bounded dict of keys to CachedVerdict, with its own counters."""

    def __init__(self, size: int = CACHE_SIZE):
        self.size = size
        self.entries: Dict[tuple, CachedVerdict] = {}
        self.hits = 0
        self.misses = 0
        self.flushes = 0

    def store(self, key: tuple, entry: CachedVerdict) -> None:
        entries = self.entries
        if len(entries) >= self.size:
            # Starting over is O(1) per packet on average, unlike keeping an LRU order.
            entries.clear()
            self.flushes += 1
        entries[key] = entry

    def carry_counts(self, old: "VerdictCache") -> None:
        """Keep the totals of the cache this one replaces (a reload), not its entries."""
        self.hits, self.misses, self.flushes = old.hits, old.misses, old.flushes

    def stats(self) -> Dict[str, int]:
        return {"cache_hits": self.hits, "cache_misses": self.misses,
                "cache_entries": len(self.entries), "cache_flushes": self.flushes}
