"""The netlink socket that carries nfnetlink_queue messages to and from the kernel.

A thin I/O layer: `QueueProtocol` (ipqd.wire.nfqueue) makes and reads the bytes,
this module only moves them, waits for ACKs, and counts what went wrong.
One socket may bind several queues; a process may open several sockets.

    with QueueSocket() as qs:
        qs.bind(0, copy_range=256, flags=NFQA_CFG_F_FAIL_OPEN)
        while True:
            for packet in qs.receive(timeout=1.0):
                qs.verdict(packet, NF_ACCEPT)
"""
from __future__ import annotations

import collections
import errno
import fcntl
import os
import select
import socket
import struct
import time
from dataclasses import dataclass, fields
from typing import Callable, Deque, Dict, List, NamedTuple, Optional, Sequence

from ipqd.wire import nfnetlink as nl
from ipqd.wire import nfqueue as nfq
from ipqd.errors import NetlinkError
from ipqd.wire.fast_decode import decode_packet_datagram
from ipqd.kernel.multi_receive import Receiver
from ipqd.wire.nfqueue import Ack, Event, KernelError, Packet, Undecodable

FAMILIES = {
    "ipv4": (nl.NFPROTO_IPV4,),
    "ipv6": (nl.NFPROTO_IPV6,),
    "both": (nl.NFPROTO_IPV4, nl.NFPROTO_IPV6),
}

SO_RCVBUFFORCE = 33
SIOCGIFNAME = 0x8910
SIOCGIFHWADDR = 0x8927
CAP_NET_ADMIN = 12

_ACK_TIMEOUT = 5.0
_NLMSG_TYPE = struct.Struct("=H")          # nlmsghdr's type, in host order
_BATCH_TYPE = (nl.NFNL_SUBSYS_QUEUE << 8) | nfq.NFQNL_MSG_VERDICT_BATCH
_IFNAME_TTL = 5.0


@dataclass
class QueueStats:
    """Counters of one socket; every abnormal event is counted, never fatal."""
    packets: int = 0            # packet messages received
    verdicts: int = 0           # single verdicts sent
    batches: int = 0            # batch verdicts sent
    enobufs: int = 0            # receive buffer overflows (kernel dropped messages)
    kernel_errors: int = 0      # NLMSG_ERROR for verdicts etc. outside a config request
    undecodable: int = 0        # messages that could not be decoded
    foreign: int = 0            # packets of a family this socket did not ask for

    def as_dict(self) -> Dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def has_cap_net_admin() -> bool:
    """Whether this process holds CAP_NET_ADMIN in its effective set."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) & (1 << CAP_NET_ADMIN))
    except OSError:
        pass
    return os.geteuid() == 0


class QueueState(NamedTuple):
    """One line of the kernel's queue table (nfnetlink_queue's seq_show)."""
    queue: int
    portid: int
    total: int              # packets in the queue: unread, or read and unanswered
    id_sequence: int        # the id given to the queue's latest packet
    queue_dropped: int = 0  # dropped by the kernel: the queue was full
    user_dropped: int = 0   # dropped by the kernel: ipqd's socket buffer was full


# /proc/self/net, not /proc/net: the unit's ProcSubset=pid hides the latter.
_QUEUE_TABLE = "/proc/self/net/netfilter/nfnetlink_queue"


def queue_states() -> Dict[int, QueueState]:
    """The kernel's bound queues of this network namespace, by number
    (empty when the table cannot be read)."""
    states: Dict[int, QueueState] = {}
    try:
        with open(_QUEUE_TABLE) as table:
            for line in table:
                parts = line.split()
                if len(parts) >= 8:
                    states[int(parts[0])] = QueueState(int(parts[0]), int(parts[1]),
                                                       int(parts[2]), int(parts[7]),
                                                       int(parts[5]), int(parts[6]))
    except (OSError, ValueError):
        pass
    return states


def queue_counts(queues) -> Dict[str, Dict[str, int]]:
    """The kernel's counters of `queues` (numbers), by number as text, for
    `ipqd status`: queued, queue_dropped, user_dropped, portid. Empty when
    the table cannot be read (it is root's: the daemon under its unit
    cannot)."""
    return {str(number): {"queued": state.total, "queue_dropped": state.queue_dropped,
                          "user_dropped": state.user_dropped, "portid": state.portid}
            for number, state in sorted(queue_states().items()) if number in queues}


def queue_holder(queue: int) -> Optional[int]:
    """The netlink port id bound to `queue`, or None."""
    state = queue_states().get(queue)
    return state.portid if state else None


_FLAG_NAMES = {
    nfq.NFQA_CFG_F_FAIL_OPEN: "FAIL_OPEN", nfq.NFQA_CFG_F_CONNTRACK: "CONNTRACK",
    nfq.NFQA_CFG_F_GSO: "GSO", nfq.NFQA_CFG_F_UID_GID: "UID_GID", nfq.NFQA_CFG_F_SECCTX: "SECCTX",
}


def flag_names(flags: int) -> str:
    """NFQA_CFG_F_* bits as words: 0x9 -> "FAIL_OPEN|UID_GID"."""
    names = [name for bit, name in _FLAG_NAMES.items() if flags & bit]
    unknown = flags & ~nfq.NFQA_CFG_F_ALL
    if unknown:
        names.append(f"{unknown:#x}")
    return "|".join(names) or "0"


def _hint(op_kind: str, queue: int, err: int, flags: int = 0) -> str:
    """What the user can do about a refused config request."""
    if err == errno.EPERM:
        if not has_cap_net_admin():
            return "binding an NFQUEUE needs CAP_NET_ADMIN: run as root or grant the capability"
        holder = queue_holder(queue)
        who = f" (netlink port id {holder})" if holder is not None else ""
        return (f"queue {queue} is held by another process{who}: stop it, "
                "or choose another queue number")
    if err == errno.EBUSY:
        return f"queue {queue} is already bound by this socket"
    if err == errno.ENODEV:
        return f"queue {queue} is not bound by this socket: bind it first"
    if err == errno.EOPNOTSUPP and op_kind == "flags":
        if flags & nfq.NFQA_CFG_F_CONNTRACK:
            return ("this kernel cannot attach conntrack information to queued packets "
                    "(CONFIG_NETFILTER_NETLINK_GLUE_CT is off)")
        return f"this kernel does not support queue flags {flag_names(flags)}"
    if err == errno.EINVAL and op_kind == "flags":
        return "the kernel refused the flags: FLAGS needs a MASK"
    return ""


class QueueSocket:
    """One AF_NETLINK/NETLINK_NETFILTER socket, bound to one or more queues."""

    def __init__(self, *, rcvbuf: Optional[int] = None, no_enobufs: bool = False,
                 undecodable_verdict: int = nfq.NF_DROP, foreign_verdict: int = nfq.NF_ACCEPT,
                 sock: Optional[socket.socket] = None):
        """Open the socket.

        rcvbuf: receive buffer in bytes (SO_RCVBUFFORCE when permitted, else
        SO_RCVBUF, which the kernel caps at net.core.rmem_max).
        no_enobufs: set NETLINK_NO_ENOBUFS, so an overflow drops silently
        instead of raising ENOBUFS (which receive() survives and counts anyway).
        undecodable_verdict: given by receive() to a packet whose message
        could not be decoded but whose id could. foreign_verdict: given to a
        packet of a family the queue was not bound for. The owner decides
        both: the daemon's worker passes its policy's answer
        (ipqd.decision.engine.fallback_verdict); the defaults are libipq's.
        sock: an already created netlink socket (for example one made inside
        another network namespace).
        """
        try:
            self._sock = sock or socket.socket(socket.AF_NETLINK, socket.SOCK_RAW,
                                               nl.NETLINK_NETFILTER)
            if self._sock.getsockname()[0] == 0:        # not bound yet (a second bind fails)
                self._sock.bind((0, 0))
        except OSError as err:
            raise NetlinkError("open netlink socket", err.errno,
                               "is this a Linux kernel with nfnetlink?") from err
        self.portid = self._sock.getsockname()[0]
        if rcvbuf:
            self.set_rcvbuf(rcvbuf)
        if no_enobufs:
            self._sock.setsockopt(nl.SOL_NETLINK, nl.NETLINK_NO_ENOBUFS, 1)
        self.protocol = nfq.QueueProtocol()
        self.stats = QueueStats()
        self.undecodable_verdict = undecodable_verdict
        self.foreign_verdict = foreign_verdict
        self.kernel_errors: Deque[KernelError] = collections.deque(maxlen=64)
        self.queues: Dict[int, frozenset] = {}          # queue -> families wanted
        self.conntrack: Dict[int, bool] = {}            # queue -> CONNTRACK flag on
        self.transport = Transport(self._sock, self.protocol, self.stats)
        self._interfaces = Interfaces(self._sock)

    @property
    def woken(self) -> bool:
        """Whether the last receive saw the wake fd readable; True when it did
        not look, so a caller that skips its own check on False misses nothing."""
        return self.transport.woken

    # ------------------------------------------------------------ life cycle

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        """Unbind every queue (best effort) and close. Closing alone also
        frees the queues: the kernel unbinds a closed socket's queues."""
        if self._sock.fileno() < 0:
            return
        for queue in list(self.queues):
            try:
                self.unbind(queue)
            except (NetlinkError, OSError):
                pass
        self.transport.close()

    def __enter__(self) -> "QueueSocket":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def set_rcvbuf(self, size: int) -> int:
        """Set the receive buffer; returns what the kernel granted."""
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
        except PermissionError:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
        return self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)

    # ------------------------------------------------------------ configuration

    def bind(self, queue: int, *, family: str = "both", copy_mode: int = nfq.NFQNL_COPY_PACKET,
             copy_range: int = nfq.NFQNL_MAX_COPY_RANGE, maxlen: Optional[int] = None,
             flags: int = 0, flags_mask: Optional[int] = None) -> None:
        """Bind `queue` and configure it, each step checked by the kernel's ACK.

        family: "ipv4", "ipv6" or "both": which packets this socket wants;
        since Linux 3.8 a queue gets every family its rules send, so packets
        of another family are answered with foreign_verdict and counted.
        flags: NFQA_CFG_F_* bits to turn on; flags_mask: which bits to set
        (default: exactly those in flags).
        Raises NetlinkError with the errno and what to do about it.
        """
        if not 0 <= queue <= 0xFFFF:
            raise ValueError(f"queue number {queue} is not in 0-65535")
        if family not in FAMILIES:
            raise ValueError(f"family {family!r} is not one of {', '.join(FAMILIES)}")
        self._transact(self.protocol.bind(queue), "bind", queue)
        try:
            self.configure(queue, family=family, copy_mode=copy_mode, copy_range=copy_range,
                           maxlen=maxlen, flags=flags, flags_mask=flags_mask)
        except NetlinkError:
            self.unbind(queue)
            raise

    def configure(self, queue: int, *, family: str = "both",
                  copy_mode: int = nfq.NFQNL_COPY_PACKET,
                  copy_range: int = nfq.NFQNL_MAX_COPY_RANGE,
                  maxlen: Optional[int] = None, flags: int = 0,
                  flags_mask: Optional[int] = None) -> None:
        """The settings of `queue`, which this socket is bound to already: by
        `bind`, or by another process that held the same socket before (a
        reload's new worker takes its predecessor's socket, queued packets
        and all, and must not bind again: the kernel would refuse)."""
        self.adopt(queue, family)
        self._transact(self.protocol.set_mode(queue, copy_mode, copy_range), "mode", queue)
        if maxlen is not None:
            self._transact(self.protocol.set_maxlen(queue, maxlen), "maxlen", queue)
        mask = flags if flags_mask is None else flags_mask
        if mask:
            self.set_flags(queue, flags, mask)

    def adopt(self, queue: int, family: str = "both") -> None:
        """Take `queue` as bound and set up already, with nothing asked of the
        kernel: by another process that held this socket with the same settings."""
        if family not in FAMILIES:
            raise ValueError(f"family {family!r} is not one of {', '.join(FAMILIES)}")
        self.queues[queue] = frozenset(FAMILIES[family])

    def set_mode(self, queue: int, copy_mode: int, copy_range: int) -> None:
        self._transact(self.protocol.set_mode(queue, copy_mode, copy_range), "mode", queue)

    def set_maxlen(self, queue: int, maxlen: int) -> None:
        self._transact(self.protocol.set_maxlen(queue, maxlen), "maxlen", queue)

    def set_flags(self, queue: int, flags: int, mask: int) -> None:
        self._transact(self.protocol.set_flags(queue, flags, mask), "flags", queue, flags)
        if mask & nfq.NFQA_CFG_F_CONNTRACK:
            self.conntrack[queue] = bool(flags & nfq.NFQA_CFG_F_CONNTRACK)

    def unbind(self, queue: int) -> None:
        self.queues.pop(queue, None)
        self.conntrack.pop(queue, None)
        self._transact(self.protocol.unbind(queue), "unbind", queue)

    def _transact(self, request: nfq.Request, kind: str, queue: int, flags: int = 0) -> None:
        """Send a config request and wait for its ACK; a refusal raises
        NetlinkError saying what the user can do about it."""
        refused = self.transport.transact(request)
        if refused is not None:
            raise NetlinkError(refused.op, refused.errno, _hint(kind, queue, refused.errno, flags))

    # ------------------------------------------------------------ receiving

    def receive_events(self, timeout: Optional[float] = None, max_datagrams: int = 256,
                       wake_fd: Optional[int] = None,
                       shortcut: Optional[Callable] = None) -> List[Event]:
        """Every event waiting, after waiting up to `timeout` seconds for the
        first (None: forever; 0: do not wait). Returns [] on timeout.

        Drains what is already queued in one wake-up. ENOBUFS is counted in
        stats.enobufs and survived; kernel errors are counted and kept in
        `kernel_errors`. Packets of a family the queue was not bound for, and
        packets whose message could not be decoded but whose id could, are
        answered here (foreign_verdict, undecodable_verdict) and counted, so
        every queued packet gets a verdict; only wanted packets come back as
        Packet events. A readable `wake_fd` (a signal or control pipe) ends
        the wait early; reading it is the caller's business.

        `shortcut(views, lengths)`, when given, sees each batch of
        datagrams first, in place (datagram i is views[i][:lengths[i]]),
        before any family check; it takes on the packets it can (decided, and
        answered or to be answered by the caller), which are counted and not
        returned, and returns the indexes of the rest, in order (the verdict
        cache's hits skip decoding this way).
        """
        raw = self.transport.read(timeout, max_datagrams, wake_fd, shortcut)
        events: List[Event] = []
        stats = self.stats
        for event in raw:
            if type(event) is Packet:
                stats.packets += 1
                wanted = self.queues.get(event.queue)
                if wanted is not None and event.family not in wanted:
                    stats.foreign += 1
                    self.verdict(event, self.foreign_verdict)
                    continue
            elif isinstance(event, KernelError):
                stats.kernel_errors += 1
                self.kernel_errors.append(event)
            elif isinstance(event, Undecodable):
                stats.undecodable += 1
                if event.packet_id is not None:
                    self.verdict_id(event.queue, event.packet_id, self.undecodable_verdict)
            events.append(event)
        return events

    def receive(self, timeout: Optional[float] = None, max_datagrams: int = 256,
                wake_fd: Optional[int] = None) -> List[Packet]:
        """The packets waiting (see receive_events), ready for verdicts."""
        return [e for e in self.receive_events(timeout, max_datagrams, wake_fd)
                if type(e) is Packet]

    # ------------------------------------------------------------ verdicts

    def verdict(self, packet: Packet, verdict: int, *, mark: Optional[int] = None,
                payload: Optional[bytes] = None, connmark: Optional[int] = None) -> None:
        """Verdict on one packet: NF_ACCEPT, NF_DROP, NF_REPEAT or queue_verdict(n),
        optionally with a new mark, a connmark, or a replacement payload."""
        self.verdict_id(packet.queue, packet.packet_id, verdict, mark=mark, payload=payload,
                        connmark=connmark)

    def verdict_id(self, queue: int, packet_id: int, verdict: int, **options) -> None:
        self._send(nfq.encode_verdict(queue, packet_id, verdict, **options), "verdict")
        self.stats.verdicts += 1

    def verdict_batch(self, queue: int, max_id: int, verdict: int, *,
                      mark: Optional[int] = None) -> None:
        """One verdict for every packet of `queue` with an id up to `max_id`."""
        self._send(nfq.encode_verdict_batch(queue, max_id, verdict, mark=mark), "batch verdict")
        self.stats.batches += 1

    def send_many(self, messages: Sequence[bytes]) -> None:
        """Several encoded verdicts in one datagram: the kernel processes
        each. Counted as verdicts and batches, by each message's type."""
        if messages:
            self._send(b"".join(messages), "verdicts")
            batches = 0
            for message in messages:
                if _NLMSG_TYPE.unpack_from(message, 4)[0] == _BATCH_TYPE:
                    batches += 1
            self.stats.batches += batches
            self.stats.verdicts += len(messages) - batches

    def _send(self, data: bytes, op: str) -> None:
        self.transport.send(data, op)

    # ------------------------------------------------------------ interfaces

    def ifname(self, index: Optional[int]) -> Optional[str]:
        """Interface name of an ifindex in this socket's network namespace (Interfaces.name)."""
        return self._interfaces.name(index)

    def hwtype(self, name: Optional[str]) -> Optional[int]:
        """ARPHRD_* type of an interface (ARPHRD_ETHER 1, ARPHRD_LOOPBACK 772)."""
        return self._interfaces.hwtype(name)


class Transport:
    """The bytes a QueueSocket moves: sends, waits for the socket (or a wake
    fd), reads bursts of datagrams and makes events of them, and waits for
    the ACK of a config request, keeping what arrives meanwhile for the next
    read. Counts in the socket's `stats` what it receives and survives."""

    def __init__(self, sock: socket.socket, protocol: nfq.QueueProtocol, stats: QueueStats):
        self._sock = sock
        self._fd = sock.fileno()
        self.protocol = protocol
        self.stats = stats
        self.receiver = Receiver(sock)
        self._backlog: List[Event] = []
        self._poller = None
        self._wake_fd: Optional[int] = None
        self._ready_alone: list = []
        self._timeout: Optional[float] = -1.0
        self._timeout_ms: Optional[int] = None
        self.woken = True               # see QueueSocket.woken

    def close(self) -> None:
        self.receiver.close()
        self._sock.close()

    def send(self, data: bytes, op: str) -> None:
        while True:
            try:
                self._sock.send(data)
                return
            except InterruptedError:
                continue
            except OSError as err:
                raise NetlinkError(op, err.errno) from err

    def transact(self, request: nfq.Request) -> Optional[KernelError]:
        """Send a config request and wait for its answer: None for an ACK,
        the KernelError of a refusal. Raises NetlinkError (ETIMEDOUT) when
        the kernel does not answer."""
        self.send(request.data, request.op)
        deadline = time.monotonic() + _ACK_TIMEOUT
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.protocol.pending.pop(request.seq, None)
                raise NetlinkError(request.op, errno.ETIMEDOUT, "the kernel did not answer")
            for event in self._read(remaining, max_datagrams=1):
                if isinstance(event, (Ack, KernelError)) and event.seq == request.seq:
                    return event if isinstance(event, KernelError) else None
                self._backlog.append(event)

    def read(self, timeout: Optional[float], max_datagrams: int, wake_fd: Optional[int] = None,
             shortcut: Optional[Callable] = None) -> List[Event]:
        """The events kept while waiting for an ACK, then those read now (see
        QueueSocket.receive_events); with events kept, it does not wait."""
        if self._backlog:
            events, self._backlog = self._backlog, []
            events.extend(self._read(0, max_datagrams, None, shortcut))
            self.woken = True
            return events
        return self._read(timeout, max_datagrams, wake_fd, shortcut)

    def _read(self, timeout: Optional[float], max_datagrams: int,
              wake_fd: Optional[int] = None, shortcut: Optional[Callable] = None) -> List[Event]:
        if timeout == 0:
            self.woken = True
        elif not self._wait_readable(timeout, wake_fd):
            return []
        events: List[Event] = []
        receive = self.receiver.receive
        views = self.receiver.views
        stats = self.stats
        left = max_datagrams
        taken = 0                           # by the shortcut, counted at the end
        while left > 0:
            want = min(left, len(views))
            try:
                lengths = receive(want)
            except InterruptedError:
                continue
            except OSError as err:
                if err.errno == errno.ENOBUFS:
                    stats.enobufs += 1
                    continue
                raise NetlinkError("receive", err.errno) from err
            if shortcut is not None:
                rest = shortcut(views, lengths)
                taken += len(lengths) - len(rest)
            else:
                rest = range(len(lengths))
            for i in rest:
                buf, n = views[i], lengths[i]
                packet = decode_packet_datagram(buf, n, buf)
                if packet is not None:
                    events.append(packet)
                else:
                    events.extend(self.protocol.receive_data(bytes(buf[:n])))
            if len(lengths) < want:         # the socket ran dry
                break
            left -= want
        stats.packets += taken
        return events

    def _wait_readable(self, timeout: Optional[float], wake_fd: Optional[int] = None) -> bool:
        """Wait for the socket (True) or the wake fd or the timeout (False);
        `woken` then says whether the wake fd was readable."""
        if self._poller is None or self._wake_fd != wake_fd:
            # kept across calls: one wait is one syscall
            self._poller = select.poll()
            self._poller.register(self._fd, select.POLLIN)
            if wake_fd is not None:
                self._poller.register(wake_fd, select.POLLIN)
            self._wake_fd = wake_fd
            self._ready_alone = [(self._fd, select.POLLIN)]
        if timeout != self._timeout:
            self._timeout = timeout
            self._timeout_ms = None if timeout is None else max(0, int(timeout * 1000 + 0.999))
        ready = self._poller.poll(self._timeout_ms)     # retried after a signal (PEP 475)
        if ready == self._ready_alone:                  # the usual wake-up: packets, no more
            self.woken = False
            return True
        readable = self.woken = False
        for ready_fd, _ in ready:
            if ready_fd == self._fd:
                readable = True
            else:
                self.woken = True
        return readable


class Interfaces:
    """Names and hardware types of interfaces, asked of the kernel through
    one socket (so right for the socket's network namespace)."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self._names: Dict[int, tuple] = {}

    def name(self, index: Optional[int]) -> Optional[str]:
        """Interface name of an ifindex, or None.

        Asked of the kernel through the socket (SIOCGIFNAME), so it is right
        even when the socket was made in another namespace; cached briefly,
        since a name lookup per packet would cost a system call.
        """
        if index is None:
            return None
        now = time.monotonic()
        cached = self._names.get(index)
        if cached is not None and now - cached[1] < _IFNAME_TTL:
            return cached[0]
        try:
            ifreq = fcntl.ioctl(self._sock.fileno(), SIOCGIFNAME, struct.pack("16si20x", b"", index))
            name = ifreq[:16].split(b"\0", 1)[0].decode("ascii", "replace")
        except OSError:
            name = None
        if len(self._names) > 4096:
            self._names.clear()
        self._names[index] = (name, now)
        return name

    def hwtype(self, name: Optional[str]) -> Optional[int]:
        """ARPHRD_* type of an interface (ARPHRD_ETHER 1, ARPHRD_LOOPBACK 772)."""
        if not name:
            return None
        try:
            ifreq = fcntl.ioctl(self._sock.fileno(), SIOCGIFHWADDR,
                                struct.pack("16s24x", name.encode()))
        except OSError:
            return None
        return struct.unpack_from("=H", ifreq, 16)[0]
