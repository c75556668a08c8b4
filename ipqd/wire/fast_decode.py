"""Reading nfnetlink_queue packet messages in place, without QueueProtocol. Pure.

The receive path's shortcuts: `decode_packet_datagram` makes the Packet of
a datagram holding one ordinary packet message, `packet_summary` reads the
few fields the verdict cache needs without making anything, and
`layout_of` gives the learned attribute layout a message has (the verdict
cache compiles its key readers from it). QueueProtocol (ipqd.wire.nfqueue) stays
the reference: whatever these do not handle in full, they leave to it
(tests/pure/test_fast_decode.py checks that both agree).
"""
from __future__ import annotations

import struct
from operator import itemgetter
from typing import List, Optional, Tuple

from ipqd.wire import nfnetlink as nl
from ipqd.wire import nfqueue as nfq
from ipqd.wire.nfqueue import Packet

_NLMSG_LEN_TYPE = struct.Struct("=IH")
_NLATTR = struct.Struct("=HH")
_BE32 = struct.Struct(">I")
_PACKET_HDR = struct.Struct(">IHB")
_TIMESTAMP = struct.Struct(">QQ")
_HWADDR = struct.Struct(">H2x8s")
_NLA_TYPE_MASK = nl.NLA_TYPE_MASK
_MSG_PACKET = nfq.MSG_PACKET
# be32 attributes the fast path decodes, by type: the Packet field each fills.
_FAST_BE32 = {
    nfq.NFQA_MARK: "mark", nfq.NFQA_IFINDEX_INDEV: "indev", nfq.NFQA_IFINDEX_OUTDEV: "outdev",
    nfq.NFQA_IFINDEX_PHYSINDEV: "physindev", nfq.NFQA_IFINDEX_PHYSOUTDEV: "physoutdev",
    nfq.NFQA_CT_INFO: "ct_info", nfq.NFQA_CAP_LEN: "cap_len", nfq.NFQA_SKB_INFO: "skb_info",
    nfq.NFQA_UID: "uid", nfq.NFQA_GID: "gid", nfq.NFQA_PRIORITY: "priority",
    nfq.NFQA_CGROUP_CLASSID: "cgroup_classid",
}
_NFQA_PACKET_HDR = nfq.NFQA_PACKET_HDR
_NFQA_PAYLOAD = nfq.NFQA_PAYLOAD
_NFQA_INDEV = nfq.NFQA_IFINDEX_INDEV
_NFQA_OUTDEV = nfq.NFQA_IFINDEX_OUTDEV
_NFQA_TIMESTAMP = nfq.NFQA_TIMESTAMP
_NFQA_HWADDR = nfq.NFQA_HWADDR


def decode_packet_datagram(buf, n: int, view: Optional[memoryview] = None) -> Optional[Packet]:
    """The Packet of a datagram that holds exactly one well-formed packet
    message of the usual kind, read in place; None for anything else.

    The receive path's shortcut: the general decoder (QueueProtocol) copies
    every message and attribute and dispatches on tables, which costs more
    than parsing and deciding together. Anything this does not handle in
    full (another message type, several messages, a conntrack, VLAN, L2 or
    security-context attribute, any length that does not fit) returns None
    and goes to QueueProtocol, which stays the reference: both give the
    same Packet (tests/pure/test_fast_decode.py).
    """
    attrs = _attributes(buf, n)
    if attrs is None:
        return None
    if view is None:
        view = memoryview(buf)
    hdr = None
    fields = []
    payload = timestamp = hwaddr = None
    for offset, attr_type, attr_len in attrs:
        if attr_type == _NFQA_PAYLOAD:
            payload = bytes(view[offset + 4:offset + attr_len])
        elif attr_type == _NFQA_PACKET_HDR:
            if attr_len < 4 + 7:
                return None
            hdr = _PACKET_HDR.unpack_from(buf, offset + 4)
        elif attr_type in _FAST_BE32:
            if attr_len < 8:
                return None
            fields.append((_FAST_BE32[attr_type], _BE32.unpack_from(buf, offset + 4)[0]))
        elif attr_type == _NFQA_TIMESTAMP:
            if attr_len < 4 + 16:
                return None
            timestamp = _TIMESTAMP.unpack_from(buf, offset + 4)
        elif attr_type == _NFQA_HWADDR:
            if attr_len < 4 + 12:
                return None
            hwaddr = _HWADDR.unpack_from(buf, offset + 4)
        elif attr_type <= nfq.NFQA_CGROUP_CLASSID:
            return None             # an attribute with structure: the full decoder
    if hdr is None:
        return None
    packet = Packet((buf[18] << 8) | buf[19], buf[16], hdr[0], hdr[1], hdr[2])
    packet.payload = payload
    for name, value in fields:
        setattr(packet, name, value)
    if timestamp is not None:
        packet.timestamp = timestamp
    if hwaddr is not None:
        packet.hwaddr = hwaddr[1][:min(hwaddr[0], 8)]
    return packet



_NFQA_MARK = nfq.NFQA_MARK
_NFQA_UID = nfq.NFQA_UID
_NFQA_GID = nfq.NFQA_GID
# Attributes a summary can pass over, as nothing a rule reads comes from
# them, with the fewest bytes QueueProtocol accepts in each.
_SUMMARY_SKIPS = {nfq.NFQA_TIMESTAMP: 16, nfq.NFQA_HWADDR: 12, nfq.NFQA_IFINDEX_PHYSINDEV: 4,
                  nfq.NFQA_IFINDEX_PHYSOUTDEV: 4, nfq.NFQA_SKB_INFO: 4, nfq.NFQA_PRIORITY: 4,
                  nfq.NFQA_CGROUP_CLASSID: 4}


def packet_summary(buf, n: int) -> Optional[tuple]:
    """(queue, family, packet id, hook, mark, indev, outdev, uid, gid,
    payload start, payload end) of a datagram holding exactly one packet
    message with its whole payload, read in place; None for anything else.

    The verdict cache's shortcut: no Packet, no copy of the payload. What it
    does not handle (a cut copy, META mode, another message, an attribute
    with structure, any length that does not fit) returns None and goes to
    decode_packet_datagram and QueueProtocol; tests/pure/test_fast_decode.py
    checks that both agree.

    The kernel lays out the messages of one queue and hook the same way
    every time, so the attribute layout of each message walked in full is
    remembered (`AttributeLayout`): a message with the same headers is
    read with two struct calls instead of one per attribute.
    """
    found = layout_of(buf, n)
    if found is None:
        return None
    layout, end = found
    return layout.pick(layout.values.unpack_from(buf) + (0, None, layout.start, end))


def layout_of(buf, n: int) -> Optional[Tuple["AttributeLayout", int]]:
    """The layout of the packet message in buf[:n] and the end of its
    payload, learning the layout when it is new; None for a datagram
    packet_summary does not handle."""
    for layout in _layouts:
        end = layout.payload_end(buf, n)
        if end:
            return layout, end
    walked = _walk_summary(buf, n)
    if walked is None:
        return None
    summary, attrs = walked
    layout = AttributeLayout(buf, attrs, summary[9] - 4)
    _layouts.insert(0, layout)
    del _layouts[_MAX_LAYOUTS:]
    return layout, summary[10]


_MAX_LAYOUTS = 8
_layouts: List["AttributeLayout"] = []
# Where each summary field comes from, for a be32 attribute.
_SUMMARY_BE32 = {nfq.NFQA_MARK: 4, nfq.NFQA_IFINDEX_INDEV: 5, nfq.NFQA_IFINDEX_OUTDEV: 6,
                 nfq.NFQA_UID: 7, nfq.NFQA_GID: 8}


class AttributeLayout:
    """One message layout: the attribute headers to expect, where the
    summary's values lie, and where the payload starts."""
    __slots__ = ("size", "heads", "head_fields", "expected", "payload_type", "payload_at",
                 "start", "values", "pick", "offsets")

    def __init__(self, buf, attrs: List[Tuple[int, int, int]], payload_at: int):
        # heads: native order (netlink lengths and types), values: network order.
        heads = [(0, "I"), (4, "H")] + [(offset, "HH") for offset, _, _ in attrs] + \
            [(payload_at, "HH")]
        # summary index -> (offset, struct code) of each value this layout has
        offsets = {1: (16, "B"), 0: (18, "H")}           # family, queue (nfgenmsg)
        for offset, attr_type, _ in attrs:
            if attr_type == nfq.NFQA_PACKET_HDR:
                offsets[2], offsets[3] = (offset + 4, "I"), (offset + 10, "B")    # id, hook
            elif attr_type in _SUMMARY_BE32:
                offsets[_SUMMARY_BE32[attr_type]] = (offset + 4, "I")
        self.offsets = offsets
        self.size = payload_at + 4
        self.head_fields = heads                        # (offset, code) of each
        self.heads = layout_struct("=", heads)
        fields = sorted(offsets.items(), key=lambda item: item[1][0])
        self.values = layout_struct(">", [where for _, where in fields])
        # The values are followed by (0, None, start, end): a missing mark is
        # 0, a missing interface or id None.
        tail = len(fields)
        index = {summary_index: i for i, (summary_index, _) in enumerate(fields)}
        order = [index.get(i, tail + 1) for i in range(9)]
        order[4] = index.get(4, tail)
        self.pick = itemgetter(*order, tail + 2, tail + 3)
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


def _walk_summary(buf, n: int) -> Optional[Tuple[tuple, List[Tuple[int, int, int]]]]:
    """packet_summary by walking every attribute; also the attributes before
    the payload as (offset, type, length), for AttributeLayout."""
    attrs = _attributes(buf, n)
    if attrs is None:
        return None
    packet_id = hook = indev = outdev = uid = gid = None
    mark = 0
    start = -1
    end = 0
    before: List[Tuple[int, int, int]] = []
    for offset, attr_type, attr_len in attrs:
        if start >= 0:
            return None                 # the payload is the last attribute
        if attr_type == _NFQA_PAYLOAD:
            start = offset + 4
            end = offset + attr_len
        elif attr_type == _NFQA_PACKET_HDR:
            if attr_len < 4 + 7:
                return None
            packet_id, _proto, hook = _PACKET_HDR.unpack_from(buf, offset + 4)
        elif attr_type in _SUMMARY_SKIPS:
            if attr_len - 4 < _SUMMARY_SKIPS[attr_type]:
                return None             # the reference refuses it: so does the summary
        elif attr_len < 8:
            return None
        elif attr_type == _NFQA_INDEV:
            indev = _BE32.unpack_from(buf, offset + 4)[0]
        elif attr_type == _NFQA_OUTDEV:
            outdev = _BE32.unpack_from(buf, offset + 4)[0]
        elif attr_type == _NFQA_MARK:
            mark = _BE32.unpack_from(buf, offset + 4)[0]
        elif attr_type == _NFQA_UID:
            uid = _BE32.unpack_from(buf, offset + 4)[0]
        elif attr_type == _NFQA_GID:
            gid = _BE32.unpack_from(buf, offset + 4)[0]
        else:
            return None             # cap_len (a cut copy), conntrack, VLAN, L2, ...
        if start < 0:
            before.append((offset, attr_type, attr_len))
    if packet_id is None or start < 0:
        return None
    return (((buf[18] << 8) | buf[19], buf[16], packet_id, hook, mark, indev, outdev, uid, gid,
             start, end), before)


def _attributes(buf, n: int) -> Optional[List[Tuple[int, int, int]]]:
    """(offset, type, length) of each attribute of the packet message that
    fills buf[:n], or None when the datagram is not one packet message whose
    attributes all fit."""
    if n < 20:
        return None
    length, msg_type = _NLMSG_LEN_TYPE.unpack_from(buf, 0)
    if msg_type != _MSG_PACKET or length < 20 or length > n or (length + 3) & ~3 < n:
        return None
    attrs = []
    offset = 20
    while offset < length:
        if length - offset < 4:
            return None
        attr_len, attr_type = _NLATTR.unpack_from(buf, offset)
        if attr_len < 4 or attr_len > length - offset:
            return None
        attrs.append((offset, attr_type & _NLA_TYPE_MASK, attr_len))
        offset += (attr_len + 3) & ~3
    return attrs
