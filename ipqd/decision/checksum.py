"""Checksums for modified packets.

The kernel silently drops a reinjected packet whose checksums are wrong (the
libipq manual's own warning), so a program that rewrites a packet passes it
through `fix_checksums` before giving it back as a verdict payload.
"""
from __future__ import annotations

import struct

from ipqd.decision.packet import EXT_DSTOPTS, EXT_HOPOPTS, EXT_MOBILITY, EXT_ROUTING
from ipqd.policy.model import PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP

# Offset of the checksum inside each upper-layer header.
_CSUM_OFFSET = {PROTO_TCP: 16, PROTO_UDP: 6, PROTO_ICMP: 2, PROTO_ICMPV6: 2}
# IPv6 extension headers walked to reach the upper layer (not ESP: opaque).
_IPV6_EXT = {EXT_HOPOPTS, EXT_ROUTING, EXT_DSTOPTS, EXT_MOBILITY}


def internet_checksum(data: bytes, initial: int = 0) -> int:
    """RFC 1071 one's-complement sum, complemented."""
    if len(data) % 2:
        data += b"\0"
    total = initial + sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def fix_checksums(packet: bytes) -> bytes:
    """The packet with its IPv4 header checksum and its TCP, UDP, ICMP or
    ICMPv6 checksum recomputed (and IP length fields set to the real length).

    Raises ValueError for something that is not a whole IPv4/IPv6 packet.
    A non-first fragment keeps its upper-layer bytes as they are.
    """
    buf = bytearray(packet)
    if not buf:
        raise ValueError("empty packet")
    version = buf[0] >> 4
    if version == 4:
        return bytes(_fix_ipv4(buf))
    if version == 6:
        return bytes(_fix_ipv6(buf))
    raise ValueError(f"IP version {version} is neither 4 nor 6")


def _fix_ipv4(buf: bytearray) -> bytearray:
    ihl = (buf[0] & 0x0F) * 4
    if ihl < 20 or len(buf) < ihl:
        raise ValueError(f"IPv4 header length {ihl} does not fit in {len(buf)} bytes")
    struct.pack_into("!H", buf, 2, len(buf))
    struct.pack_into("!H", buf, 10, 0)
    struct.pack_into("!H", buf, 10, internet_checksum(bytes(buf[:ihl])))
    frag = struct.unpack_from("!H", buf, 6)[0]
    if frag & 0x1FFF or frag & 0x2000:
        return buf      # a fragment: the upper-layer checksum covers the whole datagram
    proto = buf[9]
    pseudo = bytes(buf[12:20]) + struct.pack("!BBH", 0, proto, len(buf) - ihl)
    _fix_upper(buf, ihl, proto, pseudo if proto != PROTO_ICMP else b"")
    return buf


def _fix_ipv6(buf: bytearray) -> bytearray:
    if len(buf) < 40:
        raise ValueError(f"IPv6 header needs 40 bytes, packet has {len(buf)}")
    struct.pack_into("!H", buf, 4, len(buf) - 40)
    proto, offset = buf[6], 40
    for _ in range(8):
        if proto == 44:          # fragment header
            return buf
        if proto not in _IPV6_EXT or offset + 2 > len(buf):
            break
        proto, offset = buf[offset], offset + (buf[offset + 1] + 1) * 8
    if offset > len(buf):
        raise ValueError("IPv6 extension headers run past the end of the packet")
    pseudo = bytes(buf[8:40]) + struct.pack("!IxxxB", len(buf) - offset, proto)
    _fix_upper(buf, offset, proto, pseudo)
    return buf


def _fix_upper(buf: bytearray, offset: int, proto: int, pseudo: bytes) -> None:
    where = _CSUM_OFFSET.get(proto)
    if where is None or len(buf) < offset + where + 2:
        return
    if proto == PROTO_UDP and len(buf) >= offset + 8:
        struct.pack_into("!H", buf, offset + 4, len(buf) - offset)
    struct.pack_into("!H", buf, offset + where, 0)
    csum = internet_checksum(pseudo + bytes(buf[offset:]))
    if proto == PROTO_UDP and csum == 0:
        csum = 0xFFFF            # zero means "no checksum" in UDP
    struct.pack_into("!H", buf, offset + where, csum)
