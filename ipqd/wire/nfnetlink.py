"""Netlink and nfnetlink framing, as pure functions over bytes.

No sockets here: this module turns values into the bytes the kernel expects
and bytes from the kernel into values, so every rule of the wire format is
testable with byte literals. Constant names are the kernel's own
(include/uapi/linux/netlink.h, linux/netfilter/nfnetlink.h) so that grep finds
the same token here and in the headers.

Layout of one message (all host byte order except where noted):
    struct nlmsghdr  { u32 len; u16 type; u16 flags; u32 seq; u32 pid; }   16 bytes
    struct nfgenmsg  { u8 family; u8 version; be16 res_id; }               4 bytes
    attributes       { u16 nla_len; u16 nla_type; payload; pad to 4 }      repeated
"""
from __future__ import annotations

import errno as _errno
import struct
from typing import Dict, Iterator, NamedTuple, Optional

from ipqd.errors import DecodeError

NETLINK_NETFILTER = 12

# nlmsghdr
NLMSG_HDRLEN = 16
NLMSG_ALIGNTO = 4
NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_OVERRUN = 4
NLMSG_MIN_TYPE = 0x10

NLM_F_REQUEST = 0x01
NLM_F_MULTI = 0x02
NLM_F_ACK = 0x04
NLM_F_ECHO = 0x08
# Flags on an NLMSG_ERROR reply (netlink.h "Flags for ACK message").
NLM_F_CAPPED = 0x100
NLM_F_ACK_TLVS = 0x200

# nlattr
NLA_HDRLEN = 4
NLA_F_NESTED = 0x8000
NLA_F_NET_BYTEORDER = 0x4000
NLA_TYPE_MASK = ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER) & 0xFFFF

# Socket options (SOL_NETLINK level)
SOL_NETLINK = 270
NETLINK_NO_ENOBUFS = 5
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11

# nfnetlink
NFNETLINK_V0 = 0
NFGENMSG_LEN = 4
NFNL_SUBSYS_QUEUE = 3

# Protocol families carried in nfgenmsg.family (linux/netfilter.h)
NFPROTO_UNSPEC = 0
NFPROTO_IPV4 = 2
NFPROTO_IPV6 = 10

_NLMSGHDR = struct.Struct("=IHHII")
_NLATTR = struct.Struct("=HH")
_NFGENMSG = struct.Struct("=BB2s")      # res_id kept raw: it is big-endian
_NLMSGERR = struct.Struct("=i")
_BE16 = struct.Struct(">H")
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")


def align(length: int) -> int:
    """Round a length up to netlink's 4-byte alignment."""
    return (length + NLMSG_ALIGNTO - 1) & ~(NLMSG_ALIGNTO - 1)


def nfnl_msg_type(subsys: int, msg: int) -> int:
    """The nlmsghdr type of an nfnetlink message: subsystem in the high byte."""
    return (subsys << 8) | msg


# ---------------------------------------------------------------- encoding

def encode_attr(attr_type: int, data: bytes, *, nested: bool = False,
                net_byteorder: bool = False) -> bytes:
    """One attribute with its header and the padding that follows it."""
    if nested:
        attr_type |= NLA_F_NESTED
    if net_byteorder:
        attr_type |= NLA_F_NET_BYTEORDER
    length = NLA_HDRLEN + len(data)
    if length > 0xFFFF:
        raise ValueError(f"attribute {attr_type & NLA_TYPE_MASK} too long: {len(data)} bytes")
    return _NLATTR.pack(length, attr_type) + data + b"\0" * (align(length) - length)


def encode_u8(attr_type: int, value: int) -> bytes:
    return encode_attr(attr_type, bytes((value,)))


def encode_be16(attr_type: int, value: int) -> bytes:
    return encode_attr(attr_type, _BE16.pack(value))


def encode_be32(attr_type: int, value: int) -> bytes:
    return encode_attr(attr_type, _BE32.pack(value))


def encode_be64(attr_type: int, value: int) -> bytes:
    return encode_attr(attr_type, _BE64.pack(value))


def encode_nfgenmsg(family: int, res_id: int) -> bytes:
    """nfgenmsg: res_id (the queue number for nfnetlink_queue) is big-endian."""
    return _NFGENMSG.pack(family, NFNETLINK_V0, _BE16.pack(res_id))


def encode_nlmsg(msg_type: int, flags: int, seq: int, body: bytes, pid: int = 0) -> bytes:
    """A whole netlink message: header, body, padding to 4 bytes."""
    length = NLMSG_HDRLEN + len(body)
    return (_NLMSGHDR.pack(length, msg_type, flags, seq, pid) + body
            + b"\0" * (align(length) - length))


def encode_nlmsgerr(errno: int, request_header: bytes, seq: int = 0, pid: int = 0) -> bytes:
    """An NLMSG_ERROR message (errno 0 is an ACK), as the kernel sends it.

    The kernel writes the negative errno; `errno` here is the positive value.
    Only used by tests and fixtures: userspace never sends these.
    """
    body = _NLMSGERR.pack(-errno) + request_header[:NLMSG_HDRLEN]
    return encode_nlmsg(NLMSG_ERROR, NLM_F_CAPPED, seq, body, pid)


# ---------------------------------------------------------------- decoding

class Message(NamedTuple):
    """One netlink message: its header fields and its body (after the header)."""
    type: int
    flags: int
    seq: int
    pid: int
    body: bytes


def iter_messages(buf: bytes) -> Iterator[Message]:
    """Split a buffer (one datagram) into its netlink messages.

    Raises DecodeError when a header is cut short or claims a length that
    does not fit; messages before the bad one have already been yielded.
    """
    offset = 0
    end = len(buf)
    while offset < end:
        if end - offset < NLMSG_HDRLEN:
            raise DecodeError("nlmsghdr", offset,
                              f"{end - offset} bytes left, a header needs {NLMSG_HDRLEN}")
        length, msg_type, flags, seq, pid = _NLMSGHDR.unpack_from(buf, offset)
        if length < NLMSG_HDRLEN or length > end - offset:
            raise DecodeError("nlmsghdr", offset,
                              f"length {length} does not fit (at least {NLMSG_HDRLEN}, "
                              f"at most {end - offset} bytes left)")
        yield Message(msg_type, flags, seq, pid, bytes(buf[offset + NLMSG_HDRLEN:offset + length]))
        offset += align(length)


def decode_attrs(buf: bytes, offset: int = 0, what: str = "attribute") -> Dict[int, bytes]:
    """Attributes from `offset` to the end of `buf`, by type (flag bits removed).

    A later attribute of the same type replaces an earlier one, as the
    kernel's own nla_parse does. Raises DecodeError naming the attribute type
    when a header or a length does not fit.
    """
    attrs: Dict[int, bytes] = {}
    end = len(buf)
    while offset < end:
        if end - offset < NLA_HDRLEN:
            # Trailing padding shorter than a header is legal only when zero.
            if not any(buf[offset:end]):
                break
            raise DecodeError(what, offset,
                              f"{end - offset} bytes left, an attribute header needs {NLA_HDRLEN}")
        length, attr_type = _NLATTR.unpack_from(buf, offset)
        if length < NLA_HDRLEN or length > end - offset:
            raise DecodeError(what, offset,
                              f"attribute {attr_type & NLA_TYPE_MASK} has length {length}, "
                              f"{end - offset} bytes left")
        attrs[attr_type & NLA_TYPE_MASK] = bytes(buf[offset + NLA_HDRLEN:offset + length])
        offset += align(length)
    return attrs


def decode_nfgenmsg(body: bytes) -> tuple:
    """(family, version, res_id) of the nfgenmsg at the start of a message body."""
    if len(body) < NFGENMSG_LEN:
        raise DecodeError("nfgenmsg", NLMSG_HDRLEN,
                          f"body has {len(body)} bytes, nfgenmsg needs {NFGENMSG_LEN}")
    family, version, res_id = _NFGENMSG.unpack_from(body, 0)
    return family, version, _BE16.unpack(res_id)[0]


class ErrorMessage(NamedTuple):
    """An NLMSG_ERROR: errno 0 is an ACK. `request_seq` names the request it answers."""
    errno: int
    request_type: int
    request_seq: int

    @property
    def is_ack(self) -> bool:
        return self.errno == 0

    def describe(self) -> str:
        if self.is_ack:
            return "ACK"
        return f"{_errno.errorcode.get(self.errno, self.errno)} ({self.errno})"


def decode_error(body: bytes) -> ErrorMessage:
    """Decode an NLMSG_ERROR body: a negative errno, then the request's header."""
    if len(body) < _NLMSGERR.size + NLMSG_HDRLEN:
        raise DecodeError("nlmsgerr", NLMSG_HDRLEN,
                          f"body has {len(body)} bytes, needs {_NLMSGERR.size + NLMSG_HDRLEN}")
    (error,) = _NLMSGERR.unpack_from(body, 0)
    _, req_type, _, req_seq, _ = _NLMSGHDR.unpack_from(body, _NLMSGERR.size)
    return ErrorMessage(-error, req_type, req_seq)


def be16(data: bytes, what: str) -> int:
    return _fixed(_BE16, data, what)


def be32(data: bytes, what: str) -> int:
    return _fixed(_BE32, data, what)


def be64(data: bytes, what: str) -> int:
    return _fixed(_BE64, data, what)


def u8(data: bytes, what: str) -> int:
    if len(data) < 1:
        raise DecodeError(what, 0, "attribute is empty, expected 1 byte")
    return data[0]


def _fixed(fmt: struct.Struct, data: bytes, what: str) -> int:
    if len(data) < fmt.size:
        raise DecodeError(what, 0, f"attribute has {len(data)} bytes, expected {fmt.size}")
    return fmt.unpack_from(data, 0)[0]


def optional(attrs: Dict[int, bytes], attr_type: int, decode, what: str) -> Optional[int]:
    """Decode an attribute when present; absent is None, never 0."""
    data = attrs.get(attr_type)
    return None if data is None else decode(data, what)
