"""The attributes of an nfnetlink_queue packet message, declared once. Pure.

One row per attribute: the kernel's number and name
(include/uapi/linux/netfilter/nfnetlink_queue.h), how its value lies on
the wire, the Packet field it fills, and what the verdict cache's summary
does with it. Every reader and writer of a packet message is derived from
`PACKET_ATTRS`:

  nfqueue.Packet                    its fields and what each holds when absent
  nfqueue.decode_packet             the reference decoder
  nfqueue.encode_packet             the packet message as the kernel sends it
  fast_decode.decode_packet_datagram  the in-place reader (checked against the reference)
  fast_decode.packet_summary        the verdict cache's summary and its layouts
  verdict_cache                     where each metadata field a rule reads lies

Adding an attribute is one row here, plus its tests.
"""
from __future__ import annotations

import struct
from operator import itemgetter
from typing import Callable, NamedTuple, Optional, Tuple

from ipqd.errors import DecodeError
from ipqd.wire import nfnetlink as nl

# enum nfqnl_attr_type
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_MARK = 3
NFQA_TIMESTAMP = 4
NFQA_IFINDEX_INDEV = 5
NFQA_IFINDEX_OUTDEV = 6
NFQA_IFINDEX_PHYSINDEV = 7
NFQA_IFINDEX_PHYSOUTDEV = 8
NFQA_HWADDR = 9
NFQA_PAYLOAD = 10
NFQA_CT = 11
NFQA_CT_INFO = 12
NFQA_CAP_LEN = 13
NFQA_SKB_INFO = 14
NFQA_EXP = 15
NFQA_UID = 16
NFQA_GID = 17
NFQA_SECCTX = 18
NFQA_VLAN = 19
NFQA_L2HDR = 20
NFQA_PRIORITY = 21
NFQA_CGROUP_CLASSID = 22

# enum nfqnl_vlan_attr, inside NFQA_VLAN
NFQA_VLAN_PROTO = 1
NFQA_VLAN_TCI = 2

# Conntrack attributes inside NFQA_CT (linux/netfilter/nfnetlink_conntrack.h)
CTA_STATUS = 3
CTA_MARK = 8
CTA_ID = 12

# struct nfqnl_msg_packet_hdr (packed: 7 bytes), the attribute every packet
# message carries: the Packet fields it fills, in order, with struct codes.
PACKET_HDR_FIELDS = (("packet_id", "I"), ("hw_protocol", "H"), ("hook", "B"))
PACKET_HDR = struct.Struct(">" + "".join(code for _, code in PACKET_HDR_FIELDS))
# Where each of them lies inside the attribute's payload, for readers in place.
PACKET_HDR_AT = {name: (struct.calcsize(">" + "".join(c for _, c in PACKET_HDR_FIELDS[:i])),
                        code) for i, (name, code) in enumerate(PACKET_HDR_FIELDS)}


class Conntrack(NamedTuple):
    """The few NFQA_CT fields ipqd uses; absent fields are None."""
    id: Optional[int]
    status: Optional[int]
    mark: Optional[int]


class Wire(NamedTuple):
    """How an attribute's value lies on the wire; the byte order is in the name.

    `layout` is the struct read in place (None: the bytes as they are) and
    `value` makes the field's value of what it unpacks (or of the bytes);
    `encode` is the reverse. A `nested` value is attributes of its own,
    which only the reference decoder reads.
    """
    name: str
    size: int                           # the fewest bytes the reference accepts
    layout: Optional[struct.Struct]
    value: Callable
    encode: Callable
    nested: bool = False

    def decode(self, data: bytes, what: str):
        """The field's value of an attribute's payload; DecodeError naming
        `what` when the payload is too short."""
        if len(data) < self.size:
            raise DecodeError(what, 0, f"attribute has {len(data)} bytes, expected {self.size}")
        return self.value(data if self.layout is None else self.layout.unpack_from(data, 0))

    @property
    def code(self) -> Optional[str]:
        """The struct code of a value that is one number ("I"), else None."""
        if self.layout is None or self.value is not _FIRST:
            return None
        return self.layout.format.lstrip("<>=!@")


_FIRST = itemgetter(0)
_BE32_LAYOUT = struct.Struct(">I")
_TIMESTAMP = struct.Struct(">QQ")               # struct nfqnl_msg_packet_timestamp: sec, usec
_HWADDR = struct.Struct(">H2x8s")               # struct nfqnl_msg_packet_hw: addrlen, pad, addr[8]


def _hwaddr(unpacked: tuple) -> bytes:
    addrlen, addr = unpacked
    return addr[:min(addrlen, 8)]


def _nul_padded(data) -> bytes:
    return bytes(data).rstrip(b"\0")


def _decode_conntrack(data: bytes) -> Conntrack:
    ct = nl.decode_attrs(data, 0, "NFQA_CT")
    return Conntrack(nl.optional(ct, CTA_ID, nl.be32, "CTA_ID"),
                     nl.optional(ct, CTA_STATUS, nl.be32, "CTA_STATUS"),
                     nl.optional(ct, CTA_MARK, nl.be32, "CTA_MARK"))


def _encode_conntrack(ct: Conntrack) -> bytes:
    return b"".join(nl.encode_be32(attr_type, value)
                    for attr_type, value in ((CTA_STATUS, ct.status), (CTA_MARK, ct.mark),
                                             (CTA_ID, ct.id)) if value is not None)


def _decode_vlan(data: bytes) -> Tuple[Optional[int], Optional[int]]:
    vlan = nl.decode_attrs(data, 0, "NFQA_VLAN")
    return (nl.optional(vlan, NFQA_VLAN_PROTO, nl.be16, "NFQA_VLAN_PROTO"),
            nl.optional(vlan, NFQA_VLAN_TCI, nl.be16, "NFQA_VLAN_TCI"))


def _encode_vlan(vlan: Tuple[int, int]) -> bytes:
    return nl.encode_be16(NFQA_VLAN_PROTO, vlan[0]) + nl.encode_be16(NFQA_VLAN_TCI, vlan[1])


BE32 = Wire("be32", 4, _BE32_LAYOUT, _FIRST, _BE32_LAYOUT.pack)
TIMESTAMP = Wire("be64 sec, be64 usec", 16, _TIMESTAMP, tuple, lambda t: _TIMESTAMP.pack(*t))
HWADDR = Wire("be16 addrlen, 2 pad, addr[8]", 12, _HWADDR, _hwaddr,
              lambda addr: _HWADDR.pack(len(addr), addr))
BYTES = Wire("bytes", 0, None, bytes, bytes)
NUL_PADDED = Wire("bytes, NUL padded", 0, None, _nul_padded, bytes)
CONNTRACK = Wire("nested CTA_*", 0, None, _decode_conntrack, _encode_conntrack, nested=True)
VLAN = Wire("nested NFQA_VLAN_*", 0, None, _decode_vlan, _encode_vlan, nested=True)

# What the verdict cache's summary (fast_decode.packet_summary) does with an
# attribute. READ: reads it, a rule may test it (`rule` is the policy's
# word). PASS: passes over it, nothing a rule tests comes from it. FULL:
# leaves the packet to the full path (a cut copy, conntrack, structure).
# The payload is the summary's own: where it starts and ends.
READ, PASS, FULL = "read", "pass", "full"


class Attr(NamedTuple):
    """One attribute of a packet message. `absent` is the field's value
    when the kernel leaves the attribute out (it omits NFQA_MARK for 0)."""
    type: int
    name: str
    wire: Wire
    field: str
    summary: str = FULL
    rule: Optional[str] = None
    absent: object = None


# In the order of the kernel's enum; the kernel writes the payload last.
PACKET_ATTRS: Tuple[Attr, ...] = (
    Attr(NFQA_MARK, "NFQA_MARK", BE32, "mark", READ, "mark", absent=0),
    Attr(NFQA_TIMESTAMP, "NFQA_TIMESTAMP", TIMESTAMP, "timestamp", PASS),
    Attr(NFQA_IFINDEX_INDEV, "NFQA_IFINDEX_INDEV", BE32, "indev", READ, "in"),
    Attr(NFQA_IFINDEX_OUTDEV, "NFQA_IFINDEX_OUTDEV", BE32, "outdev", READ, "out"),
    Attr(NFQA_IFINDEX_PHYSINDEV, "NFQA_IFINDEX_PHYSINDEV", BE32, "physindev", PASS),
    Attr(NFQA_IFINDEX_PHYSOUTDEV, "NFQA_IFINDEX_PHYSOUTDEV", BE32, "physoutdev", PASS),
    Attr(NFQA_HWADDR, "NFQA_HWADDR", HWADDR, "hwaddr", PASS),
    Attr(NFQA_PAYLOAD, "NFQA_PAYLOAD", BYTES, "payload"),
    Attr(NFQA_CT, "NFQA_CT", CONNTRACK, "conntrack"),
    Attr(NFQA_CT_INFO, "NFQA_CT_INFO", BE32, "ct_info"),
    Attr(NFQA_CAP_LEN, "NFQA_CAP_LEN", BE32, "cap_len"),
    Attr(NFQA_SKB_INFO, "NFQA_SKB_INFO", BE32, "skb_info", PASS),
    Attr(NFQA_UID, "NFQA_UID", BE32, "uid", READ, "uid"),
    Attr(NFQA_GID, "NFQA_GID", BE32, "gid", READ, "gid"),
    Attr(NFQA_SECCTX, "NFQA_SECCTX", NUL_PADDED, "secctx"),
    Attr(NFQA_VLAN, "NFQA_VLAN", VLAN, "vlan"),
    Attr(NFQA_L2HDR, "NFQA_L2HDR", BYTES, "l2hdr"),
    Attr(NFQA_PRIORITY, "NFQA_PRIORITY", BE32, "priority", PASS),
    Attr(NFQA_CGROUP_CLASSID, "NFQA_CGROUP_CLASSID", BE32, "cgroup_classid", PASS),
)
