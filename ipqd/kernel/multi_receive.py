"""Receiving many netlink datagrams per system call.

The kernel sends each queued packet as a datagram of its own, so reading
them with recv costs one system call per packet. recvmmsg(2) takes a
batch of them in one call; the standard library lacks it, so ctypes calls
the C library's. A recvmmsg call costs more than a recv, though, so the
first datagram of a receive comes by recv_into, and recvmmsg fetches the
rest only when a poll says more are waiting: a wake-up for a single packet
(the latency case) pays no more than before, a burst one call per batch.
Where recvmmsg is not available, each receive takes one datagram.
"""
from __future__ import annotations

import errno
import mmap
import os
import select
import socket
from typing import List

# Datagrams per receive (the first by recv_into, up to 63 more by one
# recvmmsg), and the room for each: a packet message carries at most 64 KiB
# of packet and a few hundred bytes of attributes.
SLOTS = 64
SLOT_SIZE = 1 << 17
_DONTWAIT = socket.MSG_DONTWAIT

try:
    import ctypes

    class _IOVec(ctypes.Structure):
        _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]

    class _MsgHdr(ctypes.Structure):
        _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32),
                    ("iov", ctypes.c_void_p), ("iovlen", ctypes.c_size_t),
                    ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                    ("flags", ctypes.c_int)]

    class _MMsgHdr(ctypes.Structure):
        _fields_ = [("hdr", _MsgHdr), ("len", ctypes.c_uint)]

    _libc = ctypes.CDLL(None, use_errno=True)
    _recvmmsg = _libc.recvmmsg
    _recvmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int,
                          ctypes.c_void_p]
    _recvmmsg.restype = ctypes.c_int
except (ImportError, OSError, AttributeError):          # no ctypes, or no recvmmsg
    _recvmmsg = None


class Receiver:
    """Receives into `slots` buffers of `slot_size` bytes: slot i of
    `views` holds the i-th datagram of a receive. The buffers are an
    anonymous mapping: a page takes memory only once a datagram reached it,
    so small packets keep the resident size small."""

    def __init__(self, sock: socket.socket, slots: int = SLOTS, slot_size: int = SLOT_SIZE,
                 batch: bool = True):
        if not batch or _recvmmsg is None:
            slots = 1
        self._fd = sock.fileno()
        self._recv_into = sock.recv_into
        self._area = mmap.mmap(-1, slots * slot_size)
        area = memoryview(self._area)
        self.views: List[memoryview] = [area[i * slot_size:(i + 1) * slot_size]
                                        for i in range(slots)]
        area.release()
        self._first = self.views[0]
        self._error = 0             # a recvmmsg error seen after a datagram: the next receive's
        self._more = None
        if slots > 1:
            self._more = select.poll()          # "any more waiting?"
            self._more.register(self._fd, select.POLLIN)
            self._base = ctypes.c_char.from_buffer(self._area)
            base = ctypes.addressof(self._base)
            # recvmmsg fills slots 1 and up
            self._iovecs = (_IOVec * (slots - 1))(*[(base + i * slot_size, slot_size)
                                                    for i in range(1, slots)])
            self._headers_raw = bytearray(ctypes.sizeof(_MMsgHdr) * (slots - 1))
            headers = (_MMsgHdr * (slots - 1)).from_buffer(self._headers_raw)
            for i, header in enumerate(headers):
                header.hdr.iov = ctypes.addressof(self._iovecs[i])
                header.hdr.iovlen = 1
            self._headers_at = ctypes.addressof(headers)
            # msg_len of every header, as one strided view: read with one tolist()
            step, at = ctypes.sizeof(_MMsgHdr), _MMsgHdr.len.offset
            self._lengths = memoryview(self._headers_raw).cast("I")[at // 4::step // 4]

    @property
    def batched(self) -> bool:
        return self._more is not None

    def receive(self, count: int) -> List[int]:
        """The lengths of up to `count` datagrams, now in views[0],
        views[1]...; [] when none is waiting. Raises OSError (ENOBUFS...)."""
        if self._error:
            err, self._error = self._error, 0
            raise OSError(err, os.strerror(err))
        try:
            first = self._recv_into(self._first, 0, _DONTWAIT)
        except BlockingIOError:
            return []
        if count == 1 or self._more is None or not self._more.poll(0):
            return [first]
        got = _recvmmsg(self._fd, self._headers_at, min(count, len(self.views)) - 1,
                        _DONTWAIT, None)
        if got > 0:
            return [first] + self._lengths[:got].tolist()
        if got < 0:
            err = ctypes.get_errno()
            if err != errno.EAGAIN:
                self._error = err       # after this receive's datagram, not instead of it
        return [first]

    def close(self) -> None:
        for view in self.views:
            view.release()
        self.views = []
        if self._more is not None:
            self._lengths.release()
            del self._base              # the last export of the mapping
        self._area.close()
