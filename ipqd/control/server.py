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
answer left unread for REQUEST_WITHIN seconds closes the connection. Every
refusal is counted in `counts`.
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
from typing import Any, Callable, Dict, List, Optional, Tuple

from ipqd.control.codec import MAX_REQUEST, RequestReader, encode_error
from ipqd.control.commands import CommandTable, Peer, dispatch
from ipqd.errors import ControlError, StartupError

MAX_CONNECTIONS = 16
REQUEST_WITHIN = 5.0            # seconds for a whole request
UNSENT_LIMIT = 512 << 20        # answer bytes a client may leave unread before it is dropped
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


def peer_of(sock: socket.socket, change_gid: Optional[int]) -> Peer:
    """The connected peer's credentials, and whether it may change things:
    root, or a member of `change_gid` (primary or supplementary group, as
    the user database says)."""
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                  _UCRED.size))
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
    def __init__(self, sock: socket.socket, peer: Peer, now: float):
        self.sock = sock
        self.peer = peer
        self.reader = RequestReader(MAX_REQUEST)
        self.unsent = bytearray()
        self.deadline = now + REQUEST_WITHIN
        self.closing = False            # close once the unsent answer is out


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
            watched.append((fd, POLLOUT if conn.unsent else POLLIN))
        return watched

    def timeout(self) -> Optional[float]:
        """Seconds until the next deadline, None when no connection is open."""
        if not self.connections:
            return None
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
                peer = peer_of(sock, self.change_gid)
            except OSError:
                self._count("accept-failed")
                sock.close()
                continue
            self.connections[sock.fileno()] = Connection(sock, peer, self.clock())

    def _read(self, fd: int) -> None:
        conn = self.connections[fd]
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            if conn.reader.partial:
                self._count("truncated")
            self._close(fd)
            return
        for item in conn.reader.feed(data):
            self.counts["requests"] += 1
            if isinstance(item, ControlError):
                self._count(item.code)
                answer = encode_error(item)
            else:
                answer, code = dispatch(self.table, self.context, item, conn.peer)
                if code:
                    self._count(code)
            conn.unsent += answer
            conn.deadline = self.clock() + REQUEST_WITHIN
        if conn.reader.closed:
            conn.closing = True
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
        if len(conn.unsent) > UNSENT_LIMIT:
            self._count("unread")
            self._close(fd)
        elif conn.closing and not conn.unsent:
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
