"""The nfnetlink_queue protocol, sans-IO: requests out as bytes, kernel bytes in as events.

Nothing here touches a socket. `QueueProtocol` numbers the requests it makes
so that the kernel's ACKs and errors can be matched to what was being
attempted ("bind queue 3"), and `receive_data` turns one datagram from the
kernel into a list of events: `Packet`, `Ack`, `KernelError`, `Undecodable`.
Constant names are the kernel's (include/uapi/linux/netfilter/nfnetlink_queue.h).
"""
from __future__ import annotations

import itertools
import struct
from typing import Dict, List, NamedTuple, Optional, Tuple, Union

from ipqd.wire import nfnetlink as nl
from ipqd.errors import DecodeError
# The packet message's attributes are declared in ipqd.wire.attributes;
# their kernel names are re-exported here, where the messages are.
from ipqd.wire.attributes import (  # noqa: F401
    CTA_ID, CTA_MARK, CTA_STATUS, NFQA_CAP_LEN, NFQA_CGROUP_CLASSID, NFQA_CT, NFQA_CT_INFO,
    NFQA_EXP, NFQA_GID, NFQA_HWADDR, NFQA_IFINDEX_INDEV, NFQA_IFINDEX_OUTDEV,
    NFQA_IFINDEX_PHYSINDEV, NFQA_IFINDEX_PHYSOUTDEV, NFQA_L2HDR, NFQA_MARK, NFQA_PACKET_HDR,
    NFQA_PAYLOAD, NFQA_PRIORITY, NFQA_SECCTX, NFQA_SKB_INFO, NFQA_TIMESTAMP, NFQA_UID,
    NFQA_VERDICT_HDR, NFQA_VLAN, NFQA_VLAN_PROTO, NFQA_VLAN_TCI, PACKET_ATTRS, PACKET_HDR,
    Conntrack)

# enum nfqnl_msg_types
NFQNL_MSG_PACKET = 0
NFQNL_MSG_VERDICT = 1
NFQNL_MSG_CONFIG = 2
NFQNL_MSG_VERDICT_BATCH = 3

# NFQA_SKB_INFO bits
NFQA_SKB_CSUMNOTREADY = 1 << 0
NFQA_SKB_GSO = 1 << 1
NFQA_SKB_CSUM_NOTVERIFIED = 1 << 2

# enum nfqnl_msg_config_cmds
NFQNL_CFG_CMD_NONE = 0
NFQNL_CFG_CMD_BIND = 1
NFQNL_CFG_CMD_UNBIND = 2
NFQNL_CFG_CMD_PF_BIND = 3
NFQNL_CFG_CMD_PF_UNBIND = 4

# enum nfqnl_config_mode
NFQNL_COPY_NONE = 0
NFQNL_COPY_META = 1
NFQNL_COPY_PACKET = 2

# enum nfqnl_attr_config
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQA_CFG_MASK = 4
NFQA_CFG_FLAGS = 5

# Queue flags (NFQA_CFG_FLAGS, with NFQA_CFG_MASK saying which to change)
NFQA_CFG_F_FAIL_OPEN = 1 << 0
NFQA_CFG_F_CONNTRACK = 1 << 1
NFQA_CFG_F_GSO = 1 << 2
NFQA_CFG_F_UID_GID = 1 << 3
NFQA_CFG_F_SECCTX = 1 << 4
NFQA_CFG_F_ALL = (1 << 5) - 1

# The kernel copies at most this many payload bytes (0xffff minus headers).
NFQNL_MAX_COPY_RANGE = 65531

# Verdicts (linux/netfilter.h)
NF_DROP = 0
NF_ACCEPT = 1
NF_STOLEN = 2
NF_QUEUE = 3
NF_REPEAT = 4
NF_STOP = 5
NF_VERDICT_MASK = 0xFF

# enum ip_conntrack_info, as carried in NFQA_CT_INFO
IP_CT_ESTABLISHED = 0
IP_CT_RELATED = 1
IP_CT_NEW = 2
IP_CT_ESTABLISHED_REPLY = 3
IP_CT_RELATED_REPLY = 4
IP_CT_UNTRACKED = 7

_CT_STATE_NAMES = {
    IP_CT_ESTABLISHED: "established",
    IP_CT_ESTABLISHED_REPLY: "established",
    IP_CT_RELATED: "related",
    IP_CT_RELATED_REPLY: "related",
    IP_CT_NEW: "new",
    IP_CT_UNTRACKED: "untracked",
}

MSG_PACKET = nl.nfnl_msg_type(nl.NFNL_SUBSYS_QUEUE, NFQNL_MSG_PACKET)
MSG_VERDICT = nl.nfnl_msg_type(nl.NFNL_SUBSYS_QUEUE, NFQNL_MSG_VERDICT)
MSG_CONFIG = nl.nfnl_msg_type(nl.NFNL_SUBSYS_QUEUE, NFQNL_MSG_CONFIG)
MSG_VERDICT_BATCH = nl.nfnl_msg_type(nl.NFNL_SUBSYS_QUEUE, NFQNL_MSG_VERDICT_BATCH)

_VERDICT_HDR = struct.Struct(">II")        # verdict, id
_CONFIG_CMD = struct.Struct(">BxH")        # command, pad, pf
_CONFIG_PARAMS = struct.Struct(">IB")      # copy_range, copy_mode (packed: 5 bytes)


def ct_state_name(ct_info: Optional[int], conntrack_requested: bool) -> Optional[str]:
    """The policy's ct_state word for a packet's NFQA_CT_INFO.

    With conntrack info requested, a packet without it has no conntrack entry
    the kernel could attach: "invalid". Without the request: None (unknown).
    """
    if ct_info is None:
        return "invalid" if conntrack_requested else None
    return _CT_STATE_NAMES.get(ct_info, "invalid")


class Packet:
    """One queued packet, as the kernel described it.

    Its fields: the queue and family (nfgenmsg), the packet header's
    (packet_id, hw_protocol, hook), and one per attribute of
    ipqd.wire.attributes.PACKET_ATTRS, which holds the row's `absent` until
    the kernel sends the attribute: None, not 0, except `mark` (the kernel
    omits NFQA_MARK when the mark is 0). `payload` starts at the network
    header; with copy mode META it is None. `cap_len` is the packet's real
    length when the copy was cut short.
    """
    HEADER = ("queue", "family", "packet_id", "hw_protocol", "hook")
    # The attributes' fields are class attributes (set below, from the
    # table): a packet stores only what its message carries.

    def __init__(self, queue: int, family: int, packet_id: int, hw_protocol: int, hook: int):
        self.queue = queue
        self.family = family
        self.packet_id = packet_id
        self.hw_protocol = hw_protocol
        self.hook = hook

    @property
    def wire_len(self) -> int:
        """The packet's length on the wire: cap_len when the copy was cut."""
        if self.cap_len is not None:
            return self.cap_len
        return len(self.payload) if self.payload is not None else 0

    def as_dict(self) -> dict:
        return {name: getattr(self, name)
                for name in self.HEADER + tuple(row.field for row in PACKET_ATTRS)}

    def __eq__(self, other) -> bool:
        return isinstance(other, Packet) and self.as_dict() == other.as_dict()

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.as_dict().items() if v is not None)
        return f"Packet({fields})"


for _row in PACKET_ATTRS:
    setattr(Packet, _row.field, _row.absent)
del _row


class Ack(NamedTuple):
    """The kernel accepted request `seq` (what `op` describes)."""
    seq: int
    op: str


class KernelError(NamedTuple):
    """The kernel refused request `seq` with `errno` (positive)."""
    seq: int
    errno: int
    op: str


class Undecodable(NamedTuple):
    """A message that could not be decoded. `packet_id` is set when it was a
    packet whose header was readable, so it can still be given a verdict."""
    error: DecodeError
    queue: Optional[int] = None
    packet_id: Optional[int] = None


Event = Union[Packet, Ack, KernelError, Undecodable]


# ---------------------------------------------------------------- encoding

def _config(queue: int, seq: int, attrs: bytes, family: int = nl.NFPROTO_UNSPEC) -> bytes:
    body = nl.encode_nfgenmsg(family, queue) + attrs
    return nl.encode_nlmsg(MSG_CONFIG, nl.NLM_F_REQUEST | nl.NLM_F_ACK, seq, body)


def encode_config_cmd(queue: int, command: int, pf: int = nl.NFPROTO_UNSPEC, seq: int = 0) -> bytes:
    """BIND, UNBIND (or the obsolete PF_BIND/PF_UNBIND) for one queue, asking for an ACK."""
    return _config(queue, seq, nl.encode_attr(NFQA_CFG_CMD, _CONFIG_CMD.pack(command, pf)), pf)


def encode_config_params(queue: int, copy_mode: int, copy_range: int, seq: int = 0) -> bytes:
    """Copy mode (NONE, META, PACKET) and how many payload bytes to copy."""
    if copy_mode not in (NFQNL_COPY_NONE, NFQNL_COPY_META, NFQNL_COPY_PACKET):
        raise ValueError(f"copy mode {copy_mode} is not NONE (0), META (1) or PACKET (2)")
    if not 0 <= copy_range <= 0xFFFFFFFF:
        raise ValueError(f"copy range {copy_range} is out of range")
    params = _CONFIG_PARAMS.pack(copy_range, copy_mode)
    return _config(queue, seq, nl.encode_attr(NFQA_CFG_PARAMS, params))


def encode_config_maxlen(queue: int, maxlen: int, seq: int = 0) -> bytes:
    """How many packets the kernel may hold for this queue before it drops (or fails open)."""
    return _config(queue, seq, nl.encode_be32(NFQA_CFG_QUEUE_MAXLEN, maxlen))


def encode_config_flags(queue: int, flags: int, mask: int, seq: int = 0) -> bytes:
    """Set the flags in `mask` to their values in `flags`.

    The kernel changes only the bits in MASK, and answers EINVAL to FLAGS
    without MASK: turning a flag off is flags=0 with the flag in the mask.
    """
    if flags & ~mask:
        raise ValueError(f"flags {flags:#x} has bits outside mask {mask:#x}")
    attrs = nl.encode_be32(NFQA_CFG_FLAGS, flags) + nl.encode_be32(NFQA_CFG_MASK, mask)
    return _config(queue, seq, attrs)


def _check_verdict(verdict: int) -> None:
    base = verdict & NF_VERDICT_MASK
    if base == NF_STOLEN:
        raise ValueError("NF_STOLEN cannot be given from userspace: the kernel would leak the packet")
    if base > NF_STOP:
        raise ValueError(f"verdict {verdict:#x} is not a netfilter verdict (NF_DROP..NF_STOP)")


def queue_verdict(queue: int) -> int:
    """NF_QUEUE to another queue: the target queue number rides in the upper 16 bits."""
    return (queue << 16) | NF_QUEUE


# The bytes before the verdict header of a verdict that carries nothing else,
# by (message type, queue): the same for every packet, so made once.
_PLAIN_PREFIX: Dict[Tuple[int, int], bytes] = {}


def _plain_verdict(msg_type: int, queue: int, packet_id: int, verdict: int) -> bytes:
    prefix = _PLAIN_PREFIX.get((msg_type, queue))
    if prefix is None:
        body = nl.encode_nfgenmsg(nl.NFPROTO_UNSPEC, queue) + \
            nl.encode_attr(NFQA_VERDICT_HDR, bytes(_VERDICT_HDR.size))
        whole = nl.encode_nlmsg(msg_type, nl.NLM_F_REQUEST, 0, body)
        prefix = _PLAIN_PREFIX.setdefault((msg_type, queue), whole[:-_VERDICT_HDR.size])
    if verdict != NF_ACCEPT and verdict != NF_DROP:
        _check_verdict(verdict)
    return prefix + _VERDICT_HDR.pack(verdict, packet_id)


def encode_verdict(queue: int, packet_id: int, verdict: int, *, mark: Optional[int] = None,
                   payload: Optional[bytes] = None, connmark: Optional[int] = None,
                   seq: int = 0) -> bytes:
    """A verdict on one packet, optionally setting its mark, its connection's
    mark, or replacing its contents (checksums are the caller's job)."""
    if mark is None and payload is None and connmark is None and not seq:
        return _plain_verdict(MSG_VERDICT, queue, packet_id, verdict)
    _check_verdict(verdict)
    attrs = nl.encode_attr(NFQA_VERDICT_HDR, _VERDICT_HDR.pack(verdict, packet_id))
    if mark is not None:
        attrs += nl.encode_be32(NFQA_MARK, mark)
    if connmark is not None:
        attrs += nl.encode_attr(NFQA_CT, nl.encode_be32(CTA_MARK, connmark), nested=True)
    if payload is not None:
        if len(payload) > NFQNL_MAX_COPY_RANGE:
            raise ValueError(f"replacement payload of {len(payload)} bytes is over "
                             f"{NFQNL_MAX_COPY_RANGE}")
        attrs += nl.encode_attr(NFQA_PAYLOAD, bytes(payload))
    body = nl.encode_nfgenmsg(nl.NFPROTO_UNSPEC, queue) + attrs
    return nl.encode_nlmsg(MSG_VERDICT, nl.NLM_F_REQUEST, seq, body)


def encode_verdict_batch(queue: int, max_id: int, verdict: int, *, mark: Optional[int] = None,
                         seq: int = 0) -> bytes:
    """One verdict for every packet of the queue with an id up to `max_id`.

    The kernel allows only the verdict header and a mark on a batch.
    """
    if mark is None and not seq:
        return _plain_verdict(MSG_VERDICT_BATCH, queue, max_id, verdict)
    _check_verdict(verdict)
    attrs = nl.encode_attr(NFQA_VERDICT_HDR, _VERDICT_HDR.pack(verdict, max_id))
    if mark is not None:
        attrs += nl.encode_be32(NFQA_MARK, mark)
    body = nl.encode_nfgenmsg(nl.NFPROTO_UNSPEC, queue) + attrs
    return nl.encode_nlmsg(MSG_VERDICT_BATCH, nl.NLM_F_REQUEST, seq, body)


# The kernel writes the payload last, and so does encode_packet.
_WRITE_ORDER = sorted(PACKET_ATTRS, key=lambda row: row.type == NFQA_PAYLOAD)


def encode_packet(packet: Packet, seq: int = 0, portid: int = 0) -> bytes:
    """A packet message as the kernel would send it. For tests and fixtures."""
    attrs = [nl.encode_attr(NFQA_PACKET_HDR,
                            PACKET_HDR.pack(packet.packet_id, packet.hw_protocol, packet.hook))]
    for row in _WRITE_ORDER:
        value = getattr(packet, row.field)
        if value is not None and value != row.absent:
            attrs.append(nl.encode_attr(row.type, row.wire.encode(value), nested=row.wire.nested))
    body = nl.encode_nfgenmsg(packet.family, packet.queue) + b"".join(attrs)
    return nl.encode_nlmsg(MSG_PACKET, 0, seq, body, portid)


# ---------------------------------------------------------------- decoding

# The reference's reading of each row, by type: the field, the decoder, the name.
_DECODE = {row.type: (row.field, row.wire.decode, row.name) for row in PACKET_ATTRS}


def decode_packet(body: bytes) -> Packet:
    """A packet message's body (after nlmsghdr) as a Packet.

    Raises DecodeError naming the attribute when something does not fit.
    Unknown attributes, from kernels newer than this code, are skipped.
    """
    family, _, queue = nl.decode_nfgenmsg(body)
    attrs = nl.decode_attrs(body, nl.NFGENMSG_LEN, "packet attribute")
    hdr = attrs.get(NFQA_PACKET_HDR)
    if hdr is None:
        raise DecodeError("NFQA_PACKET_HDR", nl.NLMSG_HDRLEN, "packet message has no packet header")
    if len(hdr) < PACKET_HDR.size:
        raise DecodeError("NFQA_PACKET_HDR", nl.NLMSG_HDRLEN,
                          f"attribute has {len(hdr)} bytes, expected {PACKET_HDR.size}")
    packet = Packet(queue, family, *PACKET_HDR.unpack_from(hdr, 0))
    for attr_type, data in attrs.items():
        how = _DECODE.get(attr_type)
        if how is not None:             # else not the packet's, or newer than the table
            field, decode, name = how
            setattr(packet, field, decode(data, name))
    return packet


class Verdict(NamedTuple):
    """A decoded verdict or batch verdict message (the kernel's view of what we send)."""
    batch: bool
    queue: int
    packet_id: int
    verdict: int
    mark: Optional[int]
    payload: Optional[bytes]
    connmark: Optional[int]


def decode_verdict(msg_type: int, body: bytes) -> Verdict:
    """Decode a verdict or batch verdict body, as the kernel would read it."""
    _, _, queue = nl.decode_nfgenmsg(body)
    attrs = nl.decode_attrs(body, nl.NFGENMSG_LEN, "verdict attribute")
    hdr = attrs.get(NFQA_VERDICT_HDR)
    if hdr is None or len(hdr) < _VERDICT_HDR.size:
        raise DecodeError("NFQA_VERDICT_HDR", nl.NLMSG_HDRLEN, "verdict without a valid header")
    verdict, packet_id = _VERDICT_HDR.unpack_from(hdr, 0)
    connmark = None
    if NFQA_CT in attrs:
        connmark = nl.optional(nl.decode_attrs(attrs[NFQA_CT], 0, "NFQA_CT"), CTA_MARK,
                               nl.be32, "CTA_MARK")
    return Verdict(msg_type == MSG_VERDICT_BATCH, queue, packet_id, verdict,
                   nl.optional(attrs, NFQA_MARK, nl.be32, "NFQA_MARK"),
                   attrs.get(NFQA_PAYLOAD), connmark)


class Config(NamedTuple):
    """A decoded config message: each part None when absent."""
    queue: int
    family: int
    command: Optional[int]
    pf: Optional[int]
    copy_mode: Optional[int]
    copy_range: Optional[int]
    maxlen: Optional[int]
    flags: Optional[int]
    mask: Optional[int]


def decode_config(body: bytes) -> Config:
    """Decode a config message body, as the kernel would read it."""
    family, _, queue = nl.decode_nfgenmsg(body)
    attrs = nl.decode_attrs(body, nl.NFGENMSG_LEN, "config attribute")
    command = pf = copy_mode = copy_range = None
    if NFQA_CFG_CMD in attrs:
        if len(attrs[NFQA_CFG_CMD]) < _CONFIG_CMD.size:
            raise DecodeError("NFQA_CFG_CMD", 0, "attribute shorter than 4 bytes")
        command, pf = _CONFIG_CMD.unpack_from(attrs[NFQA_CFG_CMD], 0)
    if NFQA_CFG_PARAMS in attrs:
        if len(attrs[NFQA_CFG_PARAMS]) < _CONFIG_PARAMS.size:
            raise DecodeError("NFQA_CFG_PARAMS", 0, "attribute shorter than 5 bytes")
        copy_range, copy_mode = _CONFIG_PARAMS.unpack_from(attrs[NFQA_CFG_PARAMS], 0)
    return Config(queue, family, command, pf, copy_mode, copy_range,
                  nl.optional(attrs, NFQA_CFG_QUEUE_MAXLEN, nl.be32, "NFQA_CFG_QUEUE_MAXLEN"),
                  nl.optional(attrs, NFQA_CFG_FLAGS, nl.be32, "NFQA_CFG_FLAGS"),
                  nl.optional(attrs, NFQA_CFG_MASK, nl.be32, "NFQA_CFG_MASK"))


# ---------------------------------------------------------------- the protocol

class Request(NamedTuple):
    """Bytes to send, and the sequence number whose ACK or error answers them."""
    seq: int
    op: str
    data: bytes


class QueueProtocol:
    """nfnetlink_queue as a pure object: make requests, feed kernel bytes, get events.

    Config requests ask for an ACK and are remembered by sequence number
    until answered, so that an error names what was attempted. Verdicts ask
    for no ACK (one per packet would halve throughput); a failed verdict
    still comes back as a KernelError between packets.
    """

    def __init__(self) -> None:
        self._seq = itertools.count(1)
        self.pending: Dict[int, str] = {}

    def _request(self, op: str, encode, *args, **kwargs) -> Request:
        seq = next(self._seq) & 0xFFFFFFFF
        data = encode(*args, seq=seq, **kwargs)
        self.pending[seq] = op
        return Request(seq, op, data)

    def bind(self, queue: int) -> Request:
        return self._request(f"bind queue {queue}", encode_config_cmd, queue, NFQNL_CFG_CMD_BIND)

    def unbind(self, queue: int) -> Request:
        return self._request(f"unbind queue {queue}", encode_config_cmd, queue, NFQNL_CFG_CMD_UNBIND)

    def set_mode(self, queue: int, copy_mode: int, copy_range: int) -> Request:
        return self._request(f"set copy mode of queue {queue}", encode_config_params,
                             queue, copy_mode, copy_range)

    def set_maxlen(self, queue: int, maxlen: int) -> Request:
        return self._request(f"set length of queue {queue}", encode_config_maxlen, queue, maxlen)

    def set_flags(self, queue: int, flags: int, mask: int) -> Request:
        return self._request(f"set flags {flags:#x}/{mask:#x} of queue {queue}",
                             encode_config_flags, queue, flags, mask)

    def verdict(self, queue: int, packet_id: int, verdict: int, **options) -> bytes:
        return encode_verdict(queue, packet_id, verdict, **options)

    def verdict_batch(self, queue: int, max_id: int, verdict: int, **options) -> bytes:
        return encode_verdict_batch(queue, max_id, verdict, **options)

    def receive_data(self, data: bytes) -> List[Event]:
        """Events in one datagram from the kernel, in order. Never raises:
        what cannot be decoded becomes an Undecodable event."""
        events: List[Event] = []
        try:
            for msg in nl.iter_messages(data):
                events.append(self._event(msg))
        except DecodeError as err:
            events.append(Undecodable(err))
        return events

    def _event(self, msg: nl.Message) -> Event:
        if msg.type == MSG_PACKET:
            try:
                return decode_packet(msg.body)
            except DecodeError as err:
                return Undecodable(err, *_packet_identity(msg.body))
        if msg.type == nl.NLMSG_ERROR:
            try:
                error = nl.decode_error(msg.body)
            except DecodeError as err:
                return Undecodable(err)
            op = self.pending.pop(error.request_seq, None) or _describe_request(error.request_type)
            if error.is_ack:
                return Ack(error.request_seq, op)
            return KernelError(error.request_seq, error.errno, op)
        return Undecodable(DecodeError("nlmsghdr", 0, f"unexpected message type {msg.type:#x}"))


def _describe_request(msg_type: int) -> str:
    return {MSG_VERDICT: "verdict", MSG_VERDICT_BATCH: "batch verdict",
            MSG_CONFIG: "queue config"}.get(msg_type, f"request type {msg_type:#x}")


def _packet_identity(body: bytes) -> Tuple[Optional[int], Optional[int]]:
    """(queue, packet_id) of a packet message whose full decode failed, when
    the packet header itself can still be found, so it can get a verdict."""
    queue = packet_id = None
    try:
        _, _, queue = nl.decode_nfgenmsg(body)
        try:
            attrs = nl.decode_attrs(body, nl.NFGENMSG_LEN)
        except DecodeError as err:          # the attributes before the damage
            attrs = nl.decode_attrs(body[:err.offset], nl.NFGENMSG_LEN)
        hdr = attrs.get(NFQA_PACKET_HDR)
        if hdr is not None and len(hdr) >= PACKET_HDR.size:
            packet_id = PACKET_HDR.unpack_from(hdr, 0)[0]
    except DecodeError:
        pass
    return queue, packet_id
