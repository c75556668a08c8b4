"""The supervisor's child processes: each one a fresh interpreter.

A worker, or the short-lived process that loads a policy, runs as
`python -m ipqd.child JOB FD`, FD being its end of a socketpair to the
supervisor, over which the first message brings the job's arguments. A
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

    def fileno(self) -> int:
        return self._fd

    def send(self, message: Any) -> None:
        self.send_bytes(pickle.dumps(message, pickle.HIGHEST_PROTOCOL))

    def send_bytes(self, data: bytes) -> None:
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
        popen = subprocess.Popen([sys.executable, "-m", "ipqd.child", job, str(theirs.fileno())],
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


def _worker(conn: Channel, index, workers, queues, log_target, batch, cache, sock_fd,
            successor) -> None:
    if successor:
        schedule(os.SCHED_BATCH)    # before the imports: they are work too
    from ipqd.worker import WorkerConfig, worker_main
    config = WorkerConfig(index, workers, queues, log_target, batch=batch, cache=cache)
    # The policy's bytes go straight into the call, held by no name here:
    # worker_main lets them go once unpacked.
    worker_main(config, conn.recv_bytes(), conn, sock_fd, successor)


def _load(conn: Channel, path: str) -> None:
    # Background work: on a busy core the workers' packet loops come first.
    # For good: the process exits when done. Best effort, as in schedule().
    try:
        os.nice(10)
    except OSError:
        pass
    from ipqd.daemon import load_policy_job
    load_policy_job(path, conn)


_JOBS = {"worker": _worker, "load": _load}


def main() -> None:
    # The supervisor handles Ctrl-C (the terminal sends it to the whole group);
    # a child stops when told to, or when the pipe closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    job, fd = sys.argv[1], int(sys.argv[2])
    conn = Channel(fd)
    _JOBS[job](conn, *conn.recv())


if __name__ == "__main__":
    main()
