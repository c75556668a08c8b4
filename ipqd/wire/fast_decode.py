"""Reading nfnetlink_queue packet messages in place, without QueueProtocol. Pure.

The receive path's shortcuts: `decode_packet_datagram` makes the Packet of
a datagram holding one ordinary packet message, `packet_summary` reads the
few fields the verdict cache needs without making anything, and
`layout_of` gives the learned attribute layout a message has (the verdict
cache compiles its key readers from it). Both are derived from the
attribute table (ipqd.wire.attributes.PACKET_ATTRS). QueueProtocol
(ipqd.wire.nfqueue) stays the reference: whatever these do not handle in
full, they leave to it (tests/pure/test_fast_decode.py checks that both agree).
"""
from __future__ import annotations

import struct
from operator import itemgetter
from typing import Dict, List, Optional, Tuple

from ipqd.wire import nfnetlink as nl
from ipqd.wire.attributes import (NFQA_PACKET_HDR, NFQA_PAYLOAD, PACKET_ATTRS, PACKET_HDR,
                                  PACKET_HDR_AT, PASS, READ)
from ipqd.wire.nfqueue import MSG_PACKET, Packet

_NLMSG_LEN_TYPE = struct.Struct("=IH")
_NLATTR = struct.Struct("=HH")
_NLA_TYPE_MASK = nl.NLA_TYPE_MASK
_FAMILY_AT = nl.NLMSG_HDRLEN                    # nfgenmsg.family
_QUEUE_AT = nl.NLMSG_HDRLEN + 2                 # nfgenmsg.res_id, big-endian
_FIRST_ATTR = nl.NLMSG_HDRLEN + nl.NFGENMSG_LEN
_HEADER_LEN = nl.NLA_HDRLEN + PACKET_HDR.size   # the fewest bytes of NFQA_PACKET_HDR

# Attribute list entries: (offset of the attribute header, type, nla_len).
Attrs = List[Tuple[int, int, int]]


# ---------------------------------------------------------------- the in-place reader

# How the in-place reader takes each row of the table, by type: the field,
# the fewest bytes of the attribute, the unpack call (None: the bytes as
# they are) and what makes the value. Nested rows are the reference's.
_IN_PLACE = {row.type: (row.field, nl.NLA_HDRLEN + row.wire.size,
                        row.wire.layout.unpack_from if row.wire.layout else None, row.wire.value)
             for row in PACKET_ATTRS if not row.wire.nested}
_NESTED = frozenset(row.type for row in PACKET_ATTRS if row.wire.nested)


def decode_packet_datagram(buf, n: int, view: Optional[memoryview] = None) -> Optional[Packet]:
    """The Packet of a datagram that holds exactly one well-formed packet
    message without nested attributes, read in place; None for anything else.

    The receive path's shortcut: the general decoder (QueueProtocol) copies
    every message and attribute, which costs more than parsing and deciding
    together. Anything this does not handle in full (another message type,
    several messages, a conntrack or VLAN attribute, any length that does
    not fit) returns None and goes to QueueProtocol, which stays the
    reference: both give the same Packet (tests/pure/test_fast_decode.py).
    """
    attrs = _attributes(buf, n)
    if attrs is None:
        return None
    if view is None:
        view = memoryview(buf)
    # Made first, so that each field is stored as it is read; the header
    # fills the rest (the kernel writes it first, but it need not be).
    packet = Packet((buf[_QUEUE_AT] << 8) | buf[_QUEUE_AT + 1], buf[_FAMILY_AT], None, None, None)
    for offset, attr_type, attr_len in attrs:
        if attr_type == NFQA_PACKET_HDR:
            if attr_len < _HEADER_LEN:
                return None
            packet.packet_id, packet.hw_protocol, packet.hook = \
                PACKET_HDR.unpack_from(buf, offset + 4)
            continue
        how = _IN_PLACE.get(attr_type)
        if how is None:
            if attr_type in _NESTED:
                return None
            continue                # not the packet's, or newer than the table: skipped
        field, need, unpack, value = how
        if attr_len < need:
            return None
        if unpack is None:
            setattr(packet, field, value(view[offset + 4:offset + attr_len]))
        else:
            setattr(packet, field, value(unpack(buf, offset + 4)))
    return packet if packet.packet_id is not None else None


def _attributes(buf, n: int) -> Optional[Attrs]:
    """(offset, type, length) of each attribute of the packet message that
    fills buf[:n], or None when the datagram is not one packet message whose
    attributes all fit."""
    if n < _FIRST_ATTR:
        return None
    length, msg_type = _NLMSG_LEN_TYPE.unpack_from(buf, 0)
    if msg_type != MSG_PACKET or length < _FIRST_ATTR or length > n or (length + 3) & ~3 < n:
        return None
    attrs = []
    offset = _FIRST_ATTR
    while offset < length:
        if length - offset < 4:
            return None
        attr_len, attr_type = _NLATTR.unpack_from(buf, offset)
        if attr_len < 4 or attr_len > length - offset:
            return None
        attrs.append((offset, attr_type & _NLA_TYPE_MASK, attr_len))
        offset += (attr_len + 3) & ~3
    return attrs


# ---------------------------------------------------------------- the summary

# The summary's fields, in order: nfgenmsg's, the packet header's, then the
# table's rows it READs. Each is followed by (payload start, payload end).
_SUMMARY_HEADER = ("packet_id", "hook")
SUMMARY_FIELDS = ("queue", "family") + _SUMMARY_HEADER + \
    tuple(row.field for row in PACKET_ATTRS if row.summary == READ)
# A field's value when the message does not carry it (a layout may lack the
# READ attributes), and the distinct values, which follow what a layout reads.
SUMMARY_ABSENT = {**dict.fromkeys(SUMMARY_FIELDS),
                  **{row.field: row.absent for row in PACKET_ATTRS if row.summary == READ}}
ABSENT_VALUES = tuple(dict.fromkeys(SUMMARY_ABSENT.values()))
# The fewest bytes of each attribute a summary may have before its payload:
# the header, the rows it reads and those it passes over (which the
# reference must still accept).
_SUMMARY_NEEDS = {NFQA_PACKET_HDR: _HEADER_LEN,
                  **{row.type: nl.NLA_HDRLEN + row.wire.size for row in PACKET_ATTRS
                     if row.summary in (READ, PASS)}}
# Where a READ row's value lies in its attribute, and its struct code.
_SUMMARY_READ = {row.type: (row.field, row.wire.code) for row in PACKET_ATTRS
                 if row.summary == READ}
assert None not in (code for _, code in _SUMMARY_READ.values()), \
    "the summary reads only rows whose value is one number"


def absent_position(field: str, read: int) -> int:
    """Where a summary field a layout does not carry is found, in the `read`
    values of a layout followed by ABSENT_VALUES."""
    return read + ABSENT_VALUES.index(SUMMARY_ABSENT[field])


def packet_summary(buf, n: int) -> Optional[tuple]:
    """SUMMARY_FIELDS (queue, family, packet id, hook, mark, indev, outdev,
    uid, gid) and the payload's start and end, of a datagram holding exactly
    one packet message with its whole payload, read in place; None for
    anything else.

    The verdict cache's shortcut: no Packet, no copy of the payload. What it
    does not handle (a cut copy, META mode, another message, an attribute
    the table marks FULL, any length that does not fit) returns None and
    goes to decode_packet_datagram and QueueProtocol;
    tests/pure/test_fast_decode.py checks that both agree.

    The kernel lays out the messages of one queue and hook the same way
    every time, so the attribute layout of each message walked in full is
    remembered (`AttributeLayout`): a message with the same headers is
    read with two struct calls instead of one per attribute.
    """
    found = layout_of(buf, n)
    if found is None:
        return None
    layout, end = found
    return layout.pick(layout.values.unpack_from(buf) + ABSENT_VALUES + (layout.start, end))


def layout_of(buf, n: int) -> Optional[Tuple["AttributeLayout", int]]:
    """The layout of the packet message in buf[:n] and the end of its
    payload, learning the layout when it is new; None for a datagram
    packet_summary does not handle."""
    for layout in _layouts:
        end = layout.payload_end(buf, n)
        if end:
            return layout, end
    walked = _walk(buf, n)
    if walked is None:
        return None
    before, payload_at, end = walked
    layout = AttributeLayout(buf, before, payload_at)
    _layouts.insert(0, layout)
    del _layouts[_MAX_LAYOUTS:]
    return layout, end


_MAX_LAYOUTS = 8
_layouts: List["AttributeLayout"] = []


def _walk(buf, n: int) -> Optional[Tuple[Attrs, int, int]]:
    """The attributes before the payload, where the payload's attribute
    starts and where the payload ends, of a message packet_summary handles:
    a packet header, the payload last, and between them only attributes the
    table lets a summary read or pass over, each long enough for the
    reference. None for anything else."""
    attrs = _attributes(buf, n)
    if not attrs:
        return None
    *before, (payload_at, payload_type, payload_len) = attrs
    if payload_type != NFQA_PAYLOAD:
        return None
    for _, attr_type, attr_len in before:
        need = _SUMMARY_NEEDS.get(attr_type)
        if need is None or attr_len < need:
            return None
    if all(attr_type != NFQA_PACKET_HDR for _, attr_type, _ in before):
        return None
    return before, payload_at, payload_at + payload_len


def _summary_offsets(attrs: Attrs) -> Dict[str, Tuple[int, str]]:
    """Where each summary field lies in a message with these attributes, and
    its struct code (network order). A later attribute of a type replaces
    an earlier one, as in the reference."""
    offsets = {"queue": (_QUEUE_AT, "H"), "family": (_FAMILY_AT, "B")}
    for offset, attr_type, _ in attrs:
        if attr_type == NFQA_PACKET_HDR:
            for name in _SUMMARY_HEADER:
                at, code = PACKET_HDR_AT[name]
                offsets[name] = (offset + nl.NLA_HDRLEN + at, code)
        elif attr_type in _SUMMARY_READ:
            field, code = _SUMMARY_READ[attr_type]
            offsets[field] = (offset + nl.NLA_HDRLEN, code)
    return offsets


class AttributeLayout:
    """One message layout: the attribute headers to expect, where the
    summary's values lie (`offsets`, by field), and where the payload starts."""
    __slots__ = ("size", "heads", "head_fields", "expected", "payload_type", "payload_at",
                 "start", "values", "pick", "offsets")

    def __init__(self, buf, attrs: Attrs, payload_at: int):
        # heads: native order (netlink lengths and types), values: network order.
        heads = [(0, "I"), (4, "H")] + [(offset, "HH") for offset, _, _ in attrs] + \
            [(payload_at, "HH")]
        self.offsets = _summary_offsets(attrs)
        self.size = payload_at + 4
        self.head_fields = heads                        # (offset, code) of each
        self.heads = layout_struct("=", heads)
        fields = sorted(self.offsets.items(), key=lambda item: item[1][0])
        self.values = layout_struct(">", [where for _, where in fields])
        # The values are followed by ABSENT_VALUES, then the payload's start and end.
        index = {field: i for i, (field, _) in enumerate(fields)}
        order = [index[f] if f in index else absent_position(f, len(fields))
                 for f in SUMMARY_FIELDS]
        tail = len(fields) + len(ABSENT_VALUES)
        self.pick = itemgetter(*order, tail, tail + 1)
        self.payload_at = payload_at
        self.start = payload_at + 4
        learned = self.heads.unpack_from(buf)
        self.expected = learned[1:-2]
        self.payload_type = learned[-1]

    def payload_end(self, buf, n: int) -> int:
        """Where the payload of the message in buf[:n] ends, if the message
        has this layout and its lengths fit; else 0."""
        if n < self.size:
            return 0
        heads = self.heads.unpack_from(buf)
        if heads[1:-2] != self.expected or heads[-1] != self.payload_type:
            return 0
        length, attr_len = heads[0], heads[-2]
        end = self.payload_at + attr_len
        if end <= length <= self.payload_at + ((attr_len + 3) & ~3) \
                and length <= n <= ((length + 3) & ~3) and attr_len >= 4:
            return end
        return 0


def layout_struct(order: str, fields: List[Tuple[int, str]]) -> struct.Struct:
    """One struct reading `fields` ((offset, code) pairs) in offset order,
    skipping the bytes between them."""
    out, at = [], 0
    for offset, code in sorted(fields):
        if offset > at:
            out.append(f"{offset - at}x")
        out.append(code)
        at = offset + struct.calcsize("=" + code)
    return struct.Struct(order + "".join(out))
