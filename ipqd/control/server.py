"""The daemon's control socket: a Unix stream socket served from the
supervisor's loop, never from a thread and never by a worker.

Who may do what (docs/control.md): the socket is mode 0666, so every local
user may connect and run the commands that only look (`status`, `counters`,
`metrics`, ...); a command that changes something (`reload`, ...) is
answered only for root and for members of the control group
(`--control-group`), judged by the peer's credentials (SO_PEERCRED) and the
user database, never by what the client says.

A connection is non-blocking and bounded: MAX_CONNECTIONS at once (more
are told "busy" and closed), a request must be whole within REQUEST_WITHIN
seconds of the connection or of the previous answer (else "too-slow" and
closed), MAX_REQUEST bytes at most (else "too-large" and closed), and an
answer left unread for REQUEST_WITHIN seconds closes the connection. A
connection gets PER_ROUND answers per round of the loop, and none while
UNSENT_HIGH bytes of its answers wait to be read; a round answers for
ROUND_BUDGET seconds at most (one answer at least), the connections taking
turns to go first. So no client, however many requests it sends, holds the
loop (and with it the watchdog's ping) longer than one answer takes. Every refusal is counted in `counts`.
"""
from __future__ import annotations

import errno
import grp
import os
import pwd
import socket
import stat
import struct
import time
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from ipqd.control.codec import MAX_REQUEST, Request, RequestReader, encode_error
from ipqd.control.commands import CommandTable, Peer, dispatch
from ipqd.errors import ControlError, StartupError

MAX_CONNECTIONS = 16
REQUEST_WITHIN = 5.0            # seconds for a whole request
PER_ROUND = 4                   # requests of one connection answered per round of the loop
ROUND_BUDGET = 0.1              # seconds of answering per round (at least one answer)
UNSENT_HIGH = 1 << 20           # answers waiting to be read: no more are made meanwhile
SOCKET_MODE = 0o666             # who may connect; who may change is SO_PEERCRED's (above)
_UCRED = struct.Struct("3i")    # struct ucred: pid, uid, gid
POLLIN, POLLOUT, POLLERR, POLLHUP = 0x001, 0x004, 0x008, 0x010   # select.POLL*


def control_group(name: Optional[str]) -> Tuple[Optional[int], str]:
    """The gid of `name` (a name or a number; None for no group), and a
    warning when there is no such group: then only root may change things
    (a firewall does not refuse to start over its administrators' group)."""
    if not name:
        return None, ""
    try:
        return (int(name) if name.isdigit() else grp.getgrnam(name).gr_gid), ""
    except KeyError:
        return None, (f"ipqd: no group {name!r} for --control-group: only root may change the "
                      f"daemon over its control socket until it exists (`groupadd --system "
                      f"{name}`, then restart ipqd)")


def credentials(sock: socket.socket) -> Tuple[int, int, int]:
    """The connected peer's pid, uid and gid (SO_PEERCRED: as it connected)."""
    return _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))


def peer_of(creds: Tuple[int, int, int], change_gid: Optional[int]) -> Peer:
    """Who `creds` are, and whether they may change things: root, or a
    member of `change_gid` (primary or supplementary group, as the user
    database says)."""
    pid, uid, gid = creds
    return Peer(pid, uid, gid, uid == 0 or _member(uid, gid, change_gid))


def _member(uid: int, gid: int, group: Optional[int]) -> bool:
    if group is None:
        return False
    if gid == group:
        return True
    try:
        user = pwd.getpwuid(uid)
        return group in os.getgrouplist(user.pw_name, user.pw_gid)
    except (KeyError, OSError):
        return False


class Connection:
    def __init__(self, sock: socket.socket, creds: Tuple[int, int, int], now: float):
        self.sock = sock
        self.creds = creds
        self.peer: Optional[Peer] = None    # looked up at its first request, not before
        self.reader = RequestReader(MAX_REQUEST)
        self.unsent = bytearray()
        self.pending: List[Union[Request, ControlError]] = []   # read, not yet answered
        self.deadline = now + REQUEST_WITHIN
        self.closing = False            # close once the unsent answer is out
        self.ended = False              # the peer shut its side: nothing more to read


class ControlServer:
    """One listening socket and its connections. The owner polls `fds()`,
    hands what poll said to `serve`, and calls `tend` now and then (the
    deadlines). `table` and `context` are the commands and what their
    handlers get (ipqd.control.commands)."""

    def __init__(self, path: str, table: CommandTable, context: Any,
                 change_gid: Optional[int] = None,
                 clock: Callable[[], float] = time.monotonic):
        self.path = path
        self.table = table
        self.context = context
        self.change_gid = change_gid
        self.clock = clock
        self.listener: Optional[socket.socket] = None
        self.connections: Dict[int, Connection] = {}
        self.counts: Dict[str, int] = {"connections": 0, "requests": 0}
        self._turn = 0                      # which connection goes first this round
        self._round_end = 0.0
        self._round_answers = 0

    # ------------------------------------------------------------ life cycle

    def open(self) -> None:
        """Listen on `path`; a stale socket left by a daemon that died is
        replaced. Raises StartupError when another daemon answers there or
        the path cannot be used."""
        self._remove_stale()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), 0o755, exist_ok=True)
            listener.bind(self.path)
            os.chmod(self.path, SOCKET_MODE)
            listener.listen(MAX_CONNECTIONS)
        except OSError as error:
            listener.close()
            raise StartupError(f"ipqd: cannot listen on the control socket {self.path}: "
                               f"{error.strerror} (--control names another path, "
                               f"--control none runs without)")
        listener.setblocking(False)
        self.listener = listener

    def _remove_stale(self) -> None:
        try:
            mode = os.lstat(self.path).st_mode
        except FileNotFoundError:
            return
        except OSError as error:
            raise StartupError(f"ipqd: cannot use the control socket {self.path}: "
                               f"{error.strerror}")
        if not stat.S_ISSOCK(mode):
            raise StartupError(f"ipqd: {self.path} exists and is not a socket: remove it or "
                               "name another path with --control")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(self.path)
        except OSError as error:
            if error.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise StartupError(f"ipqd: cannot use the control socket {self.path}: "
                                   f"{error.strerror}")
            os.unlink(self.path)            # nobody listens: a dead daemon's
            return
        finally:
            probe.close()
        raise StartupError(f"ipqd: another ipqd answers on {self.path}: stop it, or give this "
                           "one another --control path")

    def close(self) -> None:
        for fd in list(self.connections):
            self._close(fd)
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            try:
                os.unlink(self.path)
            except OSError:
                pass

    # ------------------------------------------------------------ the loop's side

    def fds(self) -> List[Tuple[int, int]]:
        """(fd, poll events) to watch."""
        if self.listener is None:
            return []
        watched = [(self.listener.fileno(), POLLIN)]
        for fd, conn in self.connections.items():
            if conn.unsent:
                watched.append((fd, POLLOUT))
            elif not conn.pending and not conn.ended:
                watched.append((fd, POLLIN))
        return watched

    def timeout(self) -> Optional[float]:
        """Seconds until there is something to do without any fd waking the
        loop (0: requests are waiting for their turn), None for nothing."""
        if not self.connections:
            return None
        if any(c.pending and len(c.unsent) < UNSENT_HIGH for c in self.connections.values()):
            return 0.0
        return max(0.0, min(c.deadline for c in self.connections.values()) - self.clock())

    def serve(self, ready: List[Tuple[int, int]]) -> None:
        """Act on poll's `ready` list (fds not ours are ignored)."""
        for fd, events in ready:
            if self.listener is not None and fd == self.listener.fileno():
                self._accept()
            elif fd in self.connections:
                if events & POLLOUT:
                    self._flush(fd)
                if events & (POLLIN | POLLERR | POLLHUP) and fd in self.connections:
                    self._read(fd)
        fds = list(self.connections)
        if fds:
            self._turn = (self._turn + 1) % len(fds)
            self._round_end = time.monotonic() + ROUND_BUDGET
            self._round_answers = 0
            for fd in fds[self._turn:] + fds[:self._turn]:
                if fd in self.connections:
                    self._answer(fd)
        self.tend()

    def tend(self) -> None:
        """Close connections whose request is late."""
        now = self.clock()
        for fd, conn in list(self.connections.items()):
            if now < conn.deadline:
                continue
            if conn.unsent:                 # it does not read its answer
                self._count("unread")
                self._close(fd)
            else:
                self._refuse(fd, ControlError("too-slow", f"no whole request within "
                                              f"{REQUEST_WITHIN:g} s"))

    # ------------------------------------------------------------ one connection

    def _accept(self) -> None:
        for _ in range(MAX_CONNECTIONS):
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:                 # EMFILE and the like: try on the next round
                self._count("accept-failed")
                return
            sock.setblocking(False)
            self.counts["connections"] += 1
            if len(self.connections) >= MAX_CONNECTIONS:
                self._count("busy")
                _try_send(sock, encode_error(ControlError(
                    "busy", f"{MAX_CONNECTIONS} connections are open already; try again")))
                sock.close()
                continue
            try:
                creds = credentials(sock)
            except OSError:
                self._count("accept-failed")
                sock.close()
                continue
            self.connections[sock.fileno()] = Connection(sock, creds, self.clock())

    def _read(self, fd: int) -> None:
        conn = self.connections[fd]
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:                        # it is done writing: answer what came, then close
            if conn.reader.partial:
                self._count("truncated")
            conn.ended = conn.closing = True
            return
        conn.pending += conn.reader.feed(data)
        if conn.reader.closed:
            conn.closing = True

    def _answer(self, fd: int) -> None:
        """Answer up to PER_ROUND of a connection's requests, then send."""
        conn = self.connections[fd]
        answered = 0
        while conn.pending and answered < PER_ROUND and len(conn.unsent) < UNSENT_HIGH and \
                (not self._round_answers or time.monotonic() < self._round_end):
            item = conn.pending.pop(0)
            answered += 1
            self._round_answers += 1
            self.counts["requests"] += 1
            if isinstance(item, ControlError):
                self._count(item.code)
                answer = encode_error(item)
            else:
                if conn.peer is None:       # the user database, once a request came
                    conn.peer = peer_of(conn.creds, self.change_gid)
                answer, code = dispatch(self.table, self.context, item, conn.peer)
                if code:
                    self._count(code)
            conn.unsent += answer
            conn.deadline = self.clock() + REQUEST_WITHIN
        if answered or conn.unsent or conn.closing:
            self._flush(fd)

    def _flush(self, fd: int) -> None:
        conn = self.connections[fd]
        while conn.unsent:
            try:
                sent = conn.sock.send(conn.unsent)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._close(fd)
                return
            del conn.unsent[:sent]
        if conn.closing and not conn.unsent and not conn.pending:
            self._close(fd)

    def _refuse(self, fd: int, error: ControlError) -> None:
        self._count(error.code)
        conn = self.connections[fd]
        _try_send(conn.sock, encode_error(error))
        self._close(fd)

    def _close(self, fd: int) -> None:
        conn = self.connections.pop(fd, None)
        if conn is not None:
            conn.sock.close()

    def _count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1


def _try_send(sock: socket.socket, data: bytes) -> None:
    try:
        sock.send(data)
    except OSError:
        pass
