"""The libipq API, on nfnetlink_queue, so libipq programs port over line by line.

libipq talked to the kernel's ip_queue, removed in Linux 3.5. This module
keeps its functions, constants and buffers: `read` hands back an ip_queue
message (an nlmsghdr of type IPQM_PACKET followed by `struct ipq_packet_msg`
in the machine's native layout, or the kernel's NLMSG_ERROR), and
`message_type`, `get_packet` and `get_msgerr` read it, exactly as in C:

    C                                           Python
    h = ipq_create_handle(0, NFPROTO_IPV4);     h = ipq.create_handle(0, ipq.NFPROTO_IPV4)
    ipq_set_mode(h, IPQ_COPY_PACKET, BUFSIZE);  ipq.set_mode(h, ipq.IPQ_COPY_PACKET, BUFSIZE)
    status = ipq_read(h, buf, BUFSIZE, 0);      status = ipq.read_into(h, buf, BUFSIZE, 0)
                                                (or: buf = ipq.read(h, BUFSIZE, 0))
    ipq_message_type(buf)                       ipq.message_type(buf)
    m = ipq_get_packet(buf);                    m = ipq.get_packet(buf)
    ipq_set_verdict(h, m->packet_id,            ipq.set_verdict(h, m.packet_id,
                    NF_ACCEPT, 0, NULL);                        ipq.NF_ACCEPT, 0, None)
    ipq_perror("passer");                       ipq.perror("passer")
    ipq_destroy_handle(h);                      ipq.destroy_handle(h)

Functions return what libipq returned (a handle or None, a byte count, -1 on
failure) and record the error both in the handle (`errstr(h)`, libipq's own
TODO: per-handle error state) and module-wide (`errstr()`, as libipq's global
ipq_errno). The Pythonic face beside it is `Handle`: a context manager that
iterates over packets and raises `IpqError` instead of returning -1.

Differences from ip_queue, all forced by nfnetlink_queue:
- A handle binds one NFQUEUE number (`queue=`, default 0: `-j QUEUE` is
  NFQUEUE 0). IPv4 and IPv6 handles on the same queue cannot coexist, since
  a queue has one listener: use one handle with protocol NFPROTO_UNSPEC
  (both families) or two queue numbers.
- Packets of a family the handle was not created for are accepted unseen.
- timestamp_sec/usec: when the kernel attached no timestamp (locally made
  packets, or no socket asked for timestamps), the time ipqd received it.
- hw_type is read from the input interface (ARPHRD_*), as ip_queue did.
"""
from __future__ import annotations

import errno as _errno
import os
import struct
import sys
import time
from typing import Iterator, List, Optional

from ipqd.wire import nfnetlink as nl
from ipqd.wire import nfqueue as nfq
from ipqd import errors
from ipqd.errors import IpqError, NetlinkError, ipq_errstr
from ipqd.kernel.queue_socket import QueueSocket

# Protocol families (linux/netfilter.h); PF_INET/PF_INET6 have the same values.
NFPROTO_UNSPEC = nl.NFPROTO_UNSPEC
NFPROTO_IPV4 = nl.NFPROTO_IPV4
NFPROTO_IPV6 = nl.NFPROTO_IPV6
PF_INET = NFPROTO_IPV4
PF_INET6 = NFPROTO_IPV6

# Copy modes (linux/netfilter_ipv4/ip_queue.h)
IPQ_COPY_NONE = nfq.NFQNL_COPY_NONE
IPQ_COPY_META = nfq.NFQNL_COPY_META
IPQ_COPY_PACKET = nfq.NFQNL_COPY_PACKET

# ip_queue message types
IPQM_BASE = 0x10
IPQM_MODE = IPQM_BASE + 1
IPQM_VERDICT = IPQM_BASE + 2
IPQM_PACKET = IPQM_BASE + 3
NLMSG_ERROR = nl.NLMSG_ERROR

# Verdicts
NF_DROP = nfq.NF_DROP
NF_ACCEPT = nfq.NF_ACCEPT
NF_STOLEN = nfq.NF_STOLEN
NF_QUEUE = nfq.NF_QUEUE
NF_REPEAT = nfq.NF_REPEAT
NF_STOP = nfq.NF_STOP

# libipq's error codes (libipq.c); IpqError and their texts are in ipqd.errors.
IPQ_ERR_NONE = errors.IPQ_ERR_NONE
IPQ_ERR_IMPL = errors.IPQ_ERR_IMPL
IPQ_ERR_HANDLE = errors.IPQ_ERR_HANDLE
IPQ_ERR_SOCKET = errors.IPQ_ERR_SOCKET
IPQ_ERR_BIND = errors.IPQ_ERR_BIND
IPQ_ERR_BUFFER = errors.IPQ_ERR_BUFFER
IPQ_ERR_RECV = errors.IPQ_ERR_RECV
IPQ_ERR_NLEOF = errors.IPQ_ERR_NLEOF
IPQ_ERR_ADDRLEN = errors.IPQ_ERR_ADDRLEN
IPQ_ERR_STRUNC = errors.IPQ_ERR_STRUNC
IPQ_ERR_RTRUNC = errors.IPQ_ERR_RTRUNC
IPQ_ERR_NLRECV = errors.IPQ_ERR_NLRECV
IPQ_ERR_SEND = errors.IPQ_ERR_SEND
IPQ_ERR_SUPP = errors.IPQ_ERR_SUPP
IPQ_ERR_RECVBUF = errors.IPQ_ERR_RECVBUF
IPQ_ERR_TIMEOUT = errors.IPQ_ERR_TIMEOUT
IPQ_ERR_PROTOCOL = errors.IPQ_ERR_PROTOCOL

IFNAMSIZ = 16
# struct ipq_packet_msg in the native layout (unsigned long, long, size_t).
_PACKET_MSG = struct.Struct("@LLllI16s16sHHB8sN")
_NLMSGHDR = struct.Struct("=IHHII")
_FAMILY_NAMES = {NFPROTO_UNSPEC: "both", NFPROTO_IPV4: "ipv4", NFPROTO_IPV6: "ipv6"}


class PacketMsg:
    """`ipq_packet_msg_t`: the fields of one queued packet, as libipq named them."""
    __slots__ = ("packet_id", "mark", "timestamp_sec", "timestamp_usec", "hook", "indev_name",
                 "outdev_name", "hw_protocol", "hw_type", "hw_addrlen", "hw_addr", "data_len",
                 "payload")

    def __init__(self, **fields):
        for name in self.__slots__:
            setattr(self, name, fields[name])

    def __repr__(self) -> str:
        shown = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__slots__ if n != "payload")
        return f"PacketMsg({shown}, payload=<{len(self.payload)} bytes>)"


# ---------------------------------------------------------------- the ip_queue message format

def encode_packet_msg(msg: PacketMsg) -> bytes:
    """An IPQM_PACKET netlink message holding `msg`, as ip_queue sent it."""
    body = _PACKET_MSG.pack(
        msg.packet_id, msg.mark & 0xFFFFFFFF, msg.timestamp_sec, msg.timestamp_usec, msg.hook,
        msg.indev_name.encode()[:IFNAMSIZ - 1], msg.outdev_name.encode()[:IFNAMSIZ - 1],
        # hw_protocol stays in network order in the struct, as in C
        struct.unpack("=H", struct.pack(">H", msg.hw_protocol))[0],
        msg.hw_type, msg.hw_addrlen, msg.hw_addr, msg.data_len) + msg.payload
    return nl.encode_nlmsg(IPQM_PACKET, 0, 0, body)


def message_type(buf: bytes) -> int:
    """The type of the message in `buf`: IPQM_PACKET or NLMSG_ERROR."""
    return _NLMSGHDR.unpack_from(buf, 0)[1]


def get_packet(buf: bytes) -> PacketMsg:
    """The packet message in `buf` (after message_type said IPQM_PACKET)."""
    fields = _PACKET_MSG.unpack_from(buf, nl.NLMSG_HDRLEN)
    (packet_id, mark, sec, usec, hook, indev, outdev, hw_protocol, hw_type, hw_addrlen,
     hw_addr, data_len) = fields
    start = nl.NLMSG_HDRLEN + _PACKET_MSG.size
    return PacketMsg(
        packet_id=packet_id, mark=mark, timestamp_sec=sec, timestamp_usec=usec, hook=hook,
        indev_name=indev.split(b"\0", 1)[0].decode(), outdev_name=outdev.split(b"\0", 1)[0].decode(),
        hw_protocol=struct.unpack(">H", struct.pack("=H", hw_protocol))[0], hw_type=hw_type,
        hw_addrlen=hw_addrlen, hw_addr=hw_addr, data_len=data_len,
        payload=bytes(buf[start:start + data_len]))


def get_msgerr(buf: bytes) -> int:
    """The (positive) errno of the NLMSG_ERROR message in `buf`."""
    return -struct.unpack_from("=i", buf, nl.NLMSG_HDRLEN)[0]


# ---------------------------------------------------------------- handles

_last_error = {"ipq_errno": IPQ_ERR_NONE, "errno": 0}


class Handle:
    """A libipq handle: one netlink socket bound to one NFQUEUE.

    Also the Pythonic face: a context manager; iterating yields PacketMsg;
    accept()/drop()/verdict() answer; errors raise IpqError.
    """

    def __init__(self, flags: int = 0, protocol: int = NFPROTO_IPV4, queue: int = 0,
                 sock=None):
        if protocol not in _FAMILY_NAMES:
            raise IpqError(IPQ_ERR_PROTOCOL, detail=f"protocol {protocol} is not NFPROTO_IPV4, "
                                                    "NFPROTO_IPV6 or NFPROTO_UNSPEC")
        self.flags = flags
        self.protocol = protocol
        self.queue = queue
        self.ipq_errno = IPQ_ERR_NONE
        self.errno = 0
        self._bound = False
        self._pending: List[bytes] = []
        try:
            self._qs = QueueSocket(sock=sock)
        except NetlinkError as err:
            raise IpqError(IPQ_ERR_SOCKET, err.errno, str(err)) from err

    # -- libipq calls, raising; the module functions turn these into return codes

    def set_mode(self, mode: int, copy_range: int) -> int:
        if mode not in (IPQ_COPY_META, IPQ_COPY_PACKET):
            raise IpqError(IPQ_ERR_SUPP, detail=f"copy mode {mode} is not IPQ_COPY_META or IPQ_COPY_PACKET")
        copy_range = min(max(copy_range, 0), nfq.NFQNL_MAX_COPY_RANGE)
        try:
            if not self._bound:
                # As ip_queue's first mode message, this tells the kernel we are here.
                self._qs.bind(self.queue, family=_FAMILY_NAMES[self.protocol], copy_mode=mode,
                              copy_range=copy_range)
                self._bound = True
            else:
                self._qs.set_mode(self.queue, mode, copy_range)
        except NetlinkError as err:
            raise IpqError(IPQ_ERR_SEND if err.errno != _errno.EPERM else IPQ_ERR_BIND,
                           err.errno, str(err)) from err
        return len(nfq.encode_config_params(self.queue, mode, copy_range))

    def read(self, bufsize: int, timeout: int = 0) -> bytes:
        """The next message (IPQM_PACKET or NLMSG_ERROR) as ip_queue bytes.

        timeout in microseconds: 0 waits forever, negative returns at once.
        Raises IpqError(IPQ_ERR_TIMEOUT) when nothing came in time and
        IPQ_ERR_RTRUNC when the message is larger than bufsize.
        """
        if not self._pending:
            wait = None if timeout == 0 else max(timeout, 0) / 1e6
            try:
                events = self._qs.receive_events(wait)
            except NetlinkError as err:
                raise IpqError(IPQ_ERR_RECV, err.errno, str(err)) from err
            now = time.time()
            for event in events:
                if type(event) is nfq.Packet:
                    self._pending.append(encode_packet_msg(self._packet_msg(event, now)))
                elif isinstance(event, nfq.KernelError):
                    request = nl.encode_nlmsg(nfq.MSG_VERDICT, 0, event.seq, b"")
                    self._pending.append(nl.encode_nlmsgerr(event.errno, request, seq=event.seq))
            if not self._pending:
                raise IpqError(IPQ_ERR_TIMEOUT)
        message = self._pending[0]
        if len(message) > bufsize:
            raise IpqError(IPQ_ERR_RTRUNC, detail=f"message of {len(message)} bytes, "
                                                  f"buffer of {bufsize}")
        return self._pending.pop(0)

    def _packet_msg(self, packet: nfq.Packet, now: float) -> PacketMsg:
        sec, usec = packet.timestamp or (int(now), int((now % 1) * 1e6))
        indev = self._qs.ifname(packet.indev) or ""
        hwaddr = packet.hwaddr or b""
        payload = packet.payload or b""
        return PacketMsg(
            packet_id=packet.packet_id, mark=packet.mark, timestamp_sec=sec, timestamp_usec=usec,
            hook=packet.hook, indev_name=indev, outdev_name=self._qs.ifname(packet.outdev) or "",
            hw_protocol=packet.hw_protocol, hw_type=(self._qs.hwtype(indev) or 0) if indev else 0,
            hw_addrlen=len(hwaddr), hw_addr=hwaddr.ljust(8, b"\0"), data_len=len(payload),
            payload=payload)

    def set_verdict(self, packet_id: int, verdict: int, data_len: int = 0,
                    buf: Optional[bytes] = None, mark: Optional[int] = None) -> int:
        payload = bytes(buf[:data_len]) if (buf is not None and data_len) else None
        try:
            data = nfq.encode_verdict(self.queue, packet_id, verdict, payload=payload, mark=mark)
        except ValueError as err:
            raise IpqError(IPQ_ERR_SUPP, detail=str(err)) from err
        try:
            self._qs._send(data, "verdict")
        except NetlinkError as err:
            raise IpqError(IPQ_ERR_SEND, err.errno, str(err)) from err
        return len(data)

    def close(self) -> None:
        self._qs.close()

    # -- the Pythonic face

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self) -> Iterator[PacketMsg]:
        """Packets, forever; kernel errors raise IpqError(IPQ_ERR_NLRECV)."""
        while True:
            buf = self.read(1 << 17, 0)
            if message_type(buf) == NLMSG_ERROR:
                err = get_msgerr(buf)
                raise IpqError(IPQ_ERR_NLRECV, err)
            yield get_packet(buf)

    def packets(self, timeout: float) -> Iterator[PacketMsg]:
        """Packets until none arrives for `timeout` seconds."""
        while True:
            try:
                buf = self.read(1 << 17, max(1, int(timeout * 1e6)))
            except IpqError as err:
                if err.ipq_errno == IPQ_ERR_TIMEOUT:
                    return
                raise
            if message_type(buf) == IPQM_PACKET:
                yield get_packet(buf)

    def accept(self, packet: PacketMsg, payload: Optional[bytes] = None,
               mark: Optional[int] = None) -> None:
        self.set_verdict(packet.packet_id, NF_ACCEPT, len(payload or b""), payload, mark)

    def drop(self, packet: PacketMsg) -> None:
        self.set_verdict(packet.packet_id, NF_DROP)

    @property
    def stats(self):
        return self._qs.stats


def open_handle(queue: int = 0, protocol: int = NFPROTO_UNSPEC, mode: int = IPQ_COPY_PACKET,
                copy_range: int = nfq.NFQNL_MAX_COPY_RANGE, sock=None) -> Handle:
    """A ready handle (created and mode set), raising IpqError on failure."""
    handle = Handle(0, protocol, queue, sock=sock)
    try:
        handle.set_mode(mode, copy_range)
    except BaseException:
        handle.close()
        raise
    return handle


# ---------------------------------------------------------------- libipq's functions

def _fail(handle: Optional[Handle], err: IpqError):
    _last_error.update(ipq_errno=err.ipq_errno, errno=err.errno)
    if handle is not None:
        handle.ipq_errno, handle.errno = err.ipq_errno, err.errno
    return -1


def create_handle(flags: int, protocol: int, queue: int = 0, sock=None) -> Optional[Handle]:
    """ipq_create_handle: a handle, or None (see errstr()). `queue` picks the NFQUEUE."""
    try:
        return Handle(flags, protocol, queue, sock=sock)
    except IpqError as err:
        _fail(None, err)
        return None


def destroy_handle(h: Optional[Handle]) -> int:
    """ipq_destroy_handle: unbind and close; 0."""
    if h is not None:
        h.close()
    return 0


def set_mode(h: Handle, mode: int, copy_range: int) -> int:
    """ipq_set_mode: bytes sent (> 0), or -1."""
    try:
        return h.set_mode(mode, copy_range)
    except IpqError as err:
        return _fail(h, err)


def read(h: Handle, bufsize: int, timeout: int = 0):
    """ipq_read: the message as bytes; 0 on timeout; -1 on failure.

    timeout in microseconds: 0 waits forever, negative returns at once.
    """
    try:
        return h.read(bufsize, timeout)
    except IpqError as err:
        _fail(h, err)
        return 0 if err.ipq_errno == IPQ_ERR_TIMEOUT else -1


def read_into(h: Handle, buf: bytearray, length: int, timeout: int = 0) -> int:
    """ipq_read with C's shape: fills `buf`, returns the byte count, 0 on timeout, -1."""
    message = read(h, min(length, len(buf)), timeout)
    if isinstance(message, int):
        return message
    buf[:len(message)] = message
    return len(message)


def set_verdict(h: Handle, packet_id: int, verdict: int, data_len: int = 0,
                buf: Optional[bytes] = None) -> int:
    """ipq_set_verdict: bytes sent (> 0), or -1. With buf and data_len, the
    packet is replaced by buf[:data_len] (fix its checksums: ipqd.decision.checksum)."""
    try:
        return h.set_verdict(packet_id, verdict, data_len, buf)
    except IpqError as err:
        return _fail(h, err)


def errstr(h: Optional[Handle] = None) -> str:
    """ipq_errstr: the text of the last error, of `h` when given."""
    code = h.ipq_errno if h is not None else _last_error["ipq_errno"]
    return ipq_errstr(code)


def perror(s: Optional[str] = None, h: Optional[Handle] = None) -> None:
    """ipq_perror: `s: error text: system error` to stderr."""
    sys_errno = h.errno if h is not None else _last_error["errno"]
    text = f"{s}: " if s else ""
    text += errstr(h)
    if sys_errno:
        text += f": {os.strerror(sys_errno)}"
    print(text, file=sys.stderr)
