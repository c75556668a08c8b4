"""The supervisor's child processes: each one a fresh interpreter.

A worker, or the short-lived process that loads a policy, runs as
`python -I -c BOOT DIR ipqd.daemon.child JOB FD`, FD being its end of a socketpair
to the supervisor, over which the first message brings the job's arguments.
Isolated (-I): a child runs as root, so neither the working directory nor
PYTHONPATH nor the user's site directory may bring it code; DIR, where the
supervisor's own ipqd package lives, is the one path added. A
fresh interpreter rather than a fork: the supervisor runs a log thread, and
a fork would copy whatever lock that thread holds at the instant. Started
this way, each child imports only what its job needs, and no other process
(multiprocessing's fork server and resource tracker) stays resident.
"""
from __future__ import annotations

import os
import pickle
import select
import signal
import socket
import struct
import subprocess
import sys
from typing import Any, Optional, Tuple

_LENGTH = struct.Struct("!I")
# The child's first line: import ipqd from where the supervisor's came from.
_BOOT = "import sys; sys.path.insert(0, sys.argv[1]); from ipqd.daemon.child import main; main()"
_PACKAGE_HOME = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Channel:
    """One end of the socketpair between the supervisor and a child: whole
    messages, each a 4-byte length and its bytes (`send` pickles).

    The calls and errors of multiprocessing.connection.Connection (EOFError
    at the peer's end, OSError from the system), without importing
    multiprocessing: 3 MB less resident in every process.
    """

    def __init__(self, fd: int):
        self._fd = fd
        self._poller = select.poll()
        self._poller.register(fd, select.POLLIN)
        self._unsent = b""          # the rest of a message send_nowait could not finish
        self.dropped = 0            # messages send_nowait let go
        self._nowait: Optional[socket.socket] = None

    def send_nowait(self, message: Any) -> bool:
        """Send `message` if the pipe takes it now; never wait. A message
        the pipe takes only in part is finished by the next send; while a
        part waits, new messages are dropped (counted in `dropped`).
        Returns whether `message` was sent or queued. For reports that a
        newer one replaces: a stopped reader never stalls the sender."""
        if self._unsent and not self._write_nowait(self._unsent):
            self.dropped += 1
            return False
        data = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
        self._write_nowait(_LENGTH.pack(len(data)) + data)
        return True

    @property
    def unsent(self) -> bool:
        """Part of a send_nowait message still waits for room in the pipe."""
        return bool(self._unsent)

    def flush_nowait(self) -> bool:
        """Send what fits of a message send_nowait began; whether all went."""
        return not self._unsent or self._write_nowait(self._unsent)

    def _write_nowait(self, data: bytes) -> bool:
        """Write what fits of `data`, keeping the rest; whether all went."""
        if self._nowait is None:
            # A second handle on the same socket, for MSG_DONTWAIT: the
            # waiting sends keep the socket itself blocking.
            self._nowait = socket.fromfd(self._fd, socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sent = self._nowait.send(data, socket.MSG_DONTWAIT)
        except BlockingIOError:
            sent = 0
        self._unsent = data[sent:]
        return not self._unsent

    def fileno(self) -> int:
        return self._fd

    def send(self, message: Any) -> None:
        self.send_bytes(pickle.dumps(message, pickle.HIGHEST_PROTOCOL))

    def send_bytes(self, data: bytes) -> None:
        if self._unsent:                # a message begun by send_nowait comes first
            unsent, self._unsent = self._unsent, b""
            self._write(unsent)
        self._write(_LENGTH.pack(len(data)))
        self._write(data)

    def recv(self) -> Any:
        return pickle.loads(self.recv_bytes())

    def recv_bytes(self) -> bytes:
        return self._read(_LENGTH.unpack(self._read(_LENGTH.size))[0])

    def poll(self, timeout: float = 0.0) -> bool:
        """Whether a message (or the end) can be read, after waiting up to `timeout` s."""
        return bool(self._poller.poll(int(timeout * 1000)))

    def close(self) -> None:
        if self._nowait is not None:
            self._nowait.close()
            self._nowait = None
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]

    def _read(self, size: int) -> bytes:
        buf = bytearray(size)
        view = memoryview(buf)
        got = 0
        while got < size:
            n = os.readv(self._fd, [view[got:]])
            if n == 0:
                raise EOFError
            got += n
        return bytes(buf)


class Child:
    """A started child: its end of the pipe, and the process calls the
    supervisor makes (as multiprocessing.Process names them)."""

    def __init__(self, popen: subprocess.Popen, conn: Channel):
        self.popen = popen
        self.conn = conn

    @property
    def pid(self) -> int:
        return self.popen.pid

    def is_alive(self) -> bool:
        return self.popen.poll() is None

    def join(self, timeout: Optional[float] = None) -> None:
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def kill(self) -> None:
        self.popen.kill()

    @property
    def exitcode(self) -> Optional[int]:
        """The exit status, -N for signal N, None while running."""
        return self.popen.poll()


def start(job: str, *args, payload: Optional[bytes] = None, fds: Tuple[int, ...] = ()) -> Child:
    """Start `job` ("worker" or "load") with `args`; `payload`, bytes sent
    apart from them, is passed as the last argument but one (before the pipe).
    `fds` are inherited under the same numbers (args can name them).

    Raises OSError when the interpreter cannot be started. A child that
    dies at once shows as the pipe's end of file.
    """
    mine, theirs = socket.socketpair()
    try:
        popen = subprocess.Popen([sys.executable, "-I", "-c", _BOOT, _PACKAGE_HOME, __name__,
                                  job, str(theirs.fileno())],
                                 pass_fds=(theirs.fileno(),) + tuple(fds),
                                 stdin=subprocess.DEVNULL)
    finally:
        theirs.close()
    conn = Channel(mine.detach())
    try:
        conn.send(args)
        if payload is not None:
            conn.send_bytes(payload)
    except OSError:
        pass                    # it died: its reader gets end of file
    return Child(popen, conn)


def schedule(policy: int) -> None:
    """This process's scheduling policy: SCHED_BATCH while it starts up or
    compiles beside a running worker (whose wake-ups then preempt it),
    SCHED_OTHER afterwards, SCHED_IDLE once it has handed over and only
    exits. None of these needs privilege; best effort, since a sandbox's
    system call filter may refuse it."""
    try:
        os.sched_setscheduler(0, policy, os.sched_param(0))
    except OSError:
        pass


def _worker(conn: Channel, config, sock_fd: int, mode: str) -> None:
    if mode == "successor":
        schedule(os.SCHED_BATCH)    # before the imports: they are work too
    from ipqd.daemon.worker import worker_main
    # The policy's bytes go straight into the call, held by no name here:
    # worker_main lets them go once unpacked.
    worker_main(config, conn.recv_bytes(), conn, sock_fd, mode)


def _load(conn: Channel, path: str, shadow=None) -> None:
    # Background work: on a busy core the workers' packet loops come first.
    # For good: the process exits when done. Best effort, as in schedule().
    try:
        os.nice(10)
    except OSError:
        pass
    from ipqd.daemon.loading import load_policy_job
    load_policy_job(path, conn, shadow)


_JOBS = {"worker": _worker, "load": _load}


def main() -> None:
    # The supervisor handles Ctrl-C (the terminal sends it to the whole group)
    # and the signals an admin may send to the whole unit (`systemctl kill -s
    # USR1 ipqd` reaches every process); a child stops when told to, or when
    # the pipe closes.
    for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)
    job, fd = sys.argv[-2], int(sys.argv[-1])
    conn = Channel(fd)
    _JOBS[job](conn, *conn.recv())


if __name__ == "__main__":
    main()
