"""The packet view: the few fields of an IP packet that rules match against.

`parse(payload, meta, needs)` reads an IPv4 or IPv6 packet (as NFQUEUE hands
it over: starting at the IP header, possibly cut at the queue's copy_range)
and returns a `PacketView`. It never raises: any fault, expected or not,
yields a view with `malformed=True` and a short `reason`.

Where dpkt is used and where it is not:
- the per-packet path (this module's `parse`) does not call dpkt. The fixed
  headers are read with precomputed `struct.Struct` formats and bounds are
  checked by hand: dpkt's `IP(buf)` decodes every layer eagerly (15-20 us a
  packet) and on hostile input either raises or leaves raw bytes behind, while
  `unpack_from` costs about 1 us for everything a policy reads. Protocol
  numbers (ipqd.policy.model) and header numbers are dpkt's constants written
  out (tests/pure/test_packet.py checks them): importing dpkt would cost
  every worker 5 MB of memory.
- `ipqd.tools.pcap` reads pcap and pcapng files with dpkt's file and block header
  classes, and `ipqd.tools.explain` builds packets from a description with dpkt
  (headers, lengths and checksums), then feeds their bytes to this `parse`.

What the view carries when the packet is not malformed: `family`, `proto`
(for IPv6 the upper-layer protocol after the extension headers), `src`/`dst`
(ints), `length` (from the IP header: the real length even when the copy was
cut), `fragment`, and, when the policy reads them, the L4 fields `sport`,
`dport`, `icmp_type`, `icmp_code`, `tcp_flags`. A field the packet does not
have is None. A malformed view keeps the IP fields read before the fault and
never carries L4 fields.

A copy cut at copy_range can end before a header the policy reads: IPv6
extension headers may take any number of bytes, so the transport header can
lie anywhere in the packet. Such a packet is not malformed (the kernel
delivers it): the view names the fields the policy reads that the copy left
out in `hidden` (policy words, e.g. {"sport", "dport", "tcp_flags"}), with a
`reason` such as "transport header past copy_range", and the matcher decides
it with the fields it has (ipqd.decision.compiler). A packet is malformed only by what
the copy shows.
"""
from __future__ import annotations

import ipaddress
import struct
from typing import NamedTuple, Optional

from ipqd.policy.model import (HIDDEN_CHAIN, HIDDEN_IP, IPV6_EXT_HEADERS, L4_FIELDS, PROTO_ICMP,
                               PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP, PROTO_UDP, PROTO_UDPLITE)

PROTO_NONE = 59             # IPv6 "no next header"
# IPv6 extension headers walked to find the upper-layer protocol.
EXT_HOPOPTS = 0
EXT_ROUTING = 43
EXT_FRAGMENT = 44
EXT_AH = 51
EXT_DSTOPTS = 60
EXT_MOBILITY = 135
assert IPV6_EXT_HEADERS == {EXT_HOPOPTS, EXT_ROUTING, EXT_FRAGMENT, EXT_AH, EXT_DSTOPTS,
                           EXT_MOBILITY}
MAX_HOP_OPTIONS = 32       # options read looking for a Jumbo Payload one
IPV6_OPT_JUMBO = 0xC2

# Compiler marker in `needs`: some rule matches malformed packets. The packet
# checks below do not depend on it; it is kept so `needs` says what is read.
MALFORMED = "malformed"

_IPV4 = struct.Struct("!BBHHHBBHII")       # ver_ihl tos len id off ttl p sum src dst
_IPV6 = struct.Struct("!IHBB")             # ver_tc_flow plen nxt hlim
_PORTS = struct.Struct("!HH")
_H = struct.Struct("!H")
_I = struct.Struct("!I")

_IPV4_MF = 0x2000
_IPV4_OFFSET = 0x1FFF
_TCP_MIN = 20
_UDP_LEN = 8
_SCTP_MIN = 12
_ICMP_MIN = 8          # RFC 792: every ICMP message starts with 8 bytes
_ICMPV6_MIN = 4        # RFC 4443 2.1: type, code, checksum
_TCP_FIELDS = frozenset({"sport", "dport", "tcp_flags"})
_PORT_FIELDS = frozenset({"sport", "dport"})
_ICMP_FIELDS = frozenset({"icmp_type", "icmp_code"})
_NOTHING: frozenset = frozenset()


class PacketMeta(NamedTuple):
    """What the kernel says about a packet besides its bytes.

    A NamedTuple: immutable, slotted and cheap to build once per packet.
    `wire_len` is the packet's real length when the copy was cut at the
    queue's copy_range; None means the payload is the whole packet.
    `family` (4 or 6, optional) is the family the link layer or the queue
    announced; an IP header of the other version is malformed.
    """
    hook: Optional[int] = None
    indev: Optional[str] = None
    outdev: Optional[str] = None
    mark: int = 0
    uid: Optional[int] = None
    gid: Optional[int] = None
    ct_state: Optional[str] = None
    wire_len: Optional[int] = None
    family: Optional[int] = None


class PacketView:
    """The fields a rule can test; None where the packet does not have one.

    `hidden`: the fields the policy reads that the copy left out (empty when
    it shows them all); their values here are None, but the packet has them.
    """

    __slots__ = ("family", "proto", "src", "dst", "sport", "dport",
                 "icmp_type", "icmp_code", "tcp_flags", "length", "fragment",
                 "malformed", "reason", "hidden",
                 "hook", "indev", "outdev", "mark", "uid", "gid", "ct_state", "cgroup")

    def __init__(self, meta: PacketMeta = PacketMeta()):
        self.family = self.proto = self.src = self.dst = None
        self.sport = self.dport = self.icmp_type = self.icmp_code = None
        self.tcp_flags = self.length = self.fragment = None
        self.malformed = False
        self.hidden = _NOTHING
        self.reason = ""
        (self.hook, self.indev, self.outdev, self.mark, self.uid, self.gid,
         self.ct_state) = meta[:7]
        self.cgroup = None      # the engine's, from the mark the output hook wrote

    @classmethod
    def build(cls, **fields) -> "PacketView":
        """A view with the given fields set directly (tests, explain)."""
        view = cls()
        for name, value in fields.items():
            setattr(view, name, value)
        return view

    @property
    def src_text(self) -> Optional[str]:
        return address_text(self.family, self.src)

    @property
    def dst_text(self) -> Optional[str]:
        return address_text(self.family, self.dst)

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.__slots__}

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self.as_dict().items()
                          if v is not None and v is not False and v != "" and v != _NOTHING)
        return f"PacketView({shown})"


def address_text(family: Optional[int], value: Optional[int]) -> Optional[str]:
    """The usual text form of an address held as an int (None stays None)."""
    if value is None or family not in (4, 6):
        return None
    if family == 4:
        return str(ipaddress.IPv4Address(value))
    return str(ipaddress.IPv6Address(value))


class _Malformed(Exception):
    """A fault found while parsing; its text becomes `PacketView.reason`."""


class _Cut(Exception):
    """The copy ends before `fields` could be read (the packet goes on)."""

    def __init__(self, fields: frozenset, reason: str):
        super().__init__(reason)
        self.fields = fields


def parse(payload: bytes, meta: PacketMeta = PacketMeta(),
          needs: Optional[frozenset] = None) -> PacketView:
    """Read `payload` (an IP packet) into a PacketView. Never raises.

    `needs` is the set of fields the policy reads (`Matcher.fields`); L4
    headers are only unpacked when one of L4_FIELDS is in it. None reads
    everything. The structural checks (header lengths, total length,
    extension chain, whether the L4 header fits) are made either way, so
    whether a packet is malformed does not depend on the policy. A copy cut
    by copy_range before a field in `needs` gives a view with `hidden` set.
    """
    view = PacketView(meta)
    try:
        if not payload:
            raise _Malformed("empty packet")
        version = payload[0] >> 4
        if version != 4 and version != 6:
            raise _Malformed(f"bad IP version {version}")
        if meta.family is not None and version != meta.family:
            raise _Malformed(f"IPv{version} header in an IPv{meta.family} packet")
        wire_len = meta.wire_len
        cut = wire_len is not None and wire_len > len(payload)
        if version == 4:
            start, end = _parse_ipv4(view, payload, cut)
        else:
            start, end = _parse_ipv6(view, payload, cut)
        if view.fragment != "not-first":
            _check_l4(view, payload, start, end, cut,
                      needs is None or not needs.isdisjoint(L4_FIELDS))
    except _Malformed as fault:
        _mark_malformed(view, str(fault))
    except _Cut as cut:
        hidden = cut.fields if needs is None else cut.fields & needs
        if hidden:              # else nothing the policy reads is missing
            view.hidden = hidden
            view.reason = str(cut)
    except Exception as error:  # the boundary: a packet never stops the caller
        _mark_malformed(view, type(error).__name__)
    return view


def transport_offset(payload: bytes) -> Optional[int]:
    """Where the transport header of `payload` starts (past IPv6's extension
    headers), or None when the IP layer is malformed or ends before it. Never
    raises. Lenient about lengths, as the copy of a packet quoted in an ICMP
    error is cut: for readers of what the view does not hold (an ICMP
    error's quoted packet, an echo's identifier)."""
    view = PacketView()
    try:
        version = payload[0] >> 4
        if version == 4:
            start = _parse_ipv4(view, payload, True)[0]
        elif version == 6:
            start = _parse_ipv6(view, payload, True)[0]
        else:
            return None
    except Exception:           # _Malformed, _Cut, IndexError: no transport header
        return None
    return start if start <= len(payload) else None


def _mark_malformed(view: PacketView, reason: str) -> None:
    view.malformed = True
    view.reason = reason
    view.sport = view.dport = view.icmp_type = view.icmp_code = view.tcp_flags = None


def _parse_ipv4(view: PacketView, data: bytes, cut: bool) -> tuple:
    """Fill the IPv4 fields; return where L4 starts and where the data ends."""
    view.family = 4
    if len(data) < 20:
        if cut:
            raise _Cut(HIDDEN_IP, "IP header past copy_range")
        raise _Malformed("truncated IPv4 header")
    ver_ihl, _tos, total, _id, off, _ttl, proto, _sum, src, dst = _IPV4.unpack_from(data)
    header = (ver_ihl & 0x0F) * 4
    view.proto, view.src, view.dst, view.length = proto, src, dst, total
    if header < 20:
        raise _Malformed(f"IPv4 header length {header} < 20")
    # Options cut off by the copy leave the transport header to _check_l4.
    if header > len(data) and not cut:
        raise _Malformed(f"IPv4 header length {header} beyond the data")
    if total < header:
        raise _Malformed(f"IPv4 total length {total} < header length {header}")
    if total > len(data) and not cut:
        raise _Malformed(f"IPv4 total length {total} beyond the {len(data)} bytes")
    if off & _IPV4_OFFSET:
        view.fragment = "not-first"
    elif off & _IPV4_MF:
        view.fragment = "first"
    else:
        view.fragment = "none"
    return header, min(total, len(data))


def _parse_ipv6(view: PacketView, data: bytes, cut: bool) -> tuple:
    """Fill the IPv6 fields, walking the extension headers to the upper layer.

    Any number of extension headers: each takes at least 8 bytes, so the
    walk is bounded by the copy, as the kernel's is by the packet.
    """
    view.family = 6
    if len(data) < 40:
        if cut:
            raise _Cut(HIDDEN_IP, "IP header past copy_range")
        raise _Malformed("truncated IPv6 header")
    _vtf, plen, nxt, _hlim = _IPV6.unpack_from(data)
    view.src = int.from_bytes(data[8:24], "big")
    view.dst = int.from_bytes(data[24:40], "big")
    total = 40 + plen
    if plen == 0 and nxt == EXT_HOPOPTS:
        total = 40 + _jumbo_length(data, cut)
    view.length = total
    if total > len(data) and not cut:
        raise _Malformed(f"IPv6 payload length {total - 40} beyond the {len(data) - 40} bytes")
    end = min(total, len(data))
    view.fragment = "none"
    offset = 40
    fragment_seen = False
    while nxt in IPV6_EXT_HEADERS:
        if offset + 8 > end:
            if cut and offset + 8 <= total:
                # A later header could still be a fragment header.
                hidden = HIDDEN_CHAIN if not fragment_seen else HIDDEN_CHAIN - {"fragment"}
                if not fragment_seen:
                    view.fragment = None
                raise _Cut(hidden, "IPv6 extension headers past copy_range")
            raise _Malformed("IPv6 extension header runs off the end")
        if nxt == EXT_FRAGMENT:
            fragment_seen = True
            nxt, length = _fragment_header(view, data, offset)
            if view.fragment == "not-first":
                view.proto = nxt  # the rest of the chain is in the first fragment
                return offset + length, end
        elif nxt == EXT_AH:
            length = (data[offset + 1] + 2) * 4
            nxt = data[offset]
        else:
            length = (data[offset + 1] + 1) * 8
            nxt = data[offset]
        offset += length
    # Past a copy cut inside the last header: _check_l4 says what that hides.
    if offset > end and not (cut and offset <= total):
        raise _Malformed("IPv6 extension header runs off the end")
    view.proto = nxt
    return offset, end


def _fragment_header(view: PacketView, data: bytes, offset: int) -> tuple:
    frag = _H.unpack_from(data, offset + 2)[0]
    if frag & 0xFFF8:
        view.fragment = "not-first"
    elif frag & 1:
        view.fragment = "first"
    # offset 0 and no more fragments: an atomic fragment, i.e. not fragmented
    return data[offset], 8


def _jumbo_length(data: bytes, cut: bool) -> int:
    """The Jumbo Payload option's length (RFC 2675), or 0 when there is none."""
    if len(data) < 48:
        return 0
    end = 40 + (data[41] + 1) * 8
    offset = 42
    # Bounded: a 2 KiB header of Pad1 would otherwise cost a loop turn a byte.
    for _ in range(MAX_HOP_OPTIONS):
        if offset + 2 > min(end, len(data)):
            break
        kind = data[offset]
        if kind == 0:  # Pad1
            offset += 1
            continue
        if kind == IPV6_OPT_JUMBO and data[offset + 1] == 4 and offset + 6 <= len(data):
            return _I.unpack_from(data, offset + 2)[0]
        offset += 2 + data[offset + 1]
    return 0


def _check_l4(view: PacketView, data: bytes, start: int, end: int,
              cut: bool, want_l4: bool) -> None:
    """Check the L4 header fits; when the policy reads L4 fields, fill them.

    A header the copy cut short is read in full or not at all: its fields
    are then hidden (not malformed: the packet holds them).
    """
    proto = view.proto
    family = view.family
    if proto == PROTO_TCP:
        size, fields = _TCP_MIN, _TCP_FIELDS
    elif proto == PROTO_UDP or proto == PROTO_UDPLITE:
        size, fields = _UDP_LEN, _PORT_FIELDS
    elif proto == PROTO_SCTP:
        size, fields = _SCTP_MIN, _PORT_FIELDS
    elif proto == PROTO_ICMP and family == 4:
        size, fields = _ICMP_MIN, _ICMP_FIELDS
    elif proto == PROTO_ICMPV6 and family == 6:
        size, fields = _ICMPV6_MIN, _ICMP_FIELDS
    else:
        return
    have = end - start
    if have < size:
        if cut and (view.length - start) >= size:
            raise _Cut(fields, "transport header past copy_range")
        raise _Malformed(f"truncated {_PROTO_NAMES[proto]} header "
                         f"({max(have, 0)} of {size} bytes)")
    if proto == PROTO_TCP:
        header = (data[start + 12] >> 4) * 4
        if header < _TCP_MIN:
            raise _Malformed(f"TCP data offset {header} < 20")
        if header > view.length - start:
            raise _Malformed(f"TCP header length {header} beyond the segment")
        if want_l4:
            view.sport, view.dport = _PORTS.unpack_from(data, start)
            view.tcp_flags = data[start + 13]
    elif proto == PROTO_UDP:
        length = _H.unpack_from(data, start + 4)[0]
        # A first fragment's UDP length counts the whole datagram, which
        # the later fragments carry on.
        most = 0xFFFF if view.fragment == "first" else view.length - start
        if length < _UDP_LEN or length > most:
            raise _Malformed(f"UDP length {length} outside 8..{most}")
        if want_l4:
            view.sport, view.dport = _PORTS.unpack_from(data, start)
    elif proto == PROTO_UDPLITE or proto == PROTO_SCTP:
        if want_l4:
            view.sport, view.dport = _PORTS.unpack_from(data, start)
    elif want_l4:
        view.icmp_type = data[start]
        view.icmp_code = data[start + 1]


_PROTO_NAMES = {PROTO_TCP: "TCP", PROTO_UDP: "UDP", PROTO_UDPLITE: "UDP-Lite",
                PROTO_SCTP: "SCTP", PROTO_ICMP: "ICMP", PROTO_ICMPV6: "ICMPv6"}
