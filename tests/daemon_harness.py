"""Run `ipqd run` inside a test host and watch what it says."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Callable, List

IPQD = os.path.join(os.path.dirname(sys.executable), "ipqd")


class RunningIpqd:
    """`ipqd run` in a network namespace, logging to stderr, its lines collected."""

    def __init__(self, host, policy: str, state_dir: str, *extra: str, wait: bool = True,
                 **popen_args):
        self.host = host
        self.lines: List[str] = []
        self.process = subprocess.Popen(
            ["ip", "netns", "exec", host.name, IPQD, "run", "--policy", policy,
             "--log-target", "stderr", "--state-dir", state_dir,
             "--sets-file", os.path.join(state_dir, "sets.json"), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
            **popen_args)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if wait:
            self.wait_for(lambda line: line.startswith("ipqd started"), timeout=20)

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, predicate: Callable[[str], bool], timeout: float = 10, start: int = 0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines[start:]:
                if predicate(line):
                    return line
            if self.process.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.02)
        raise AssertionError(f"no such line within {timeout} s; ipqd said:\n" + "\n".join(self.lines))

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def reload(self, timeout: float = 20) -> str:
        """SIGHUP, then the daemon's own answer: reloaded or refused."""
        mark = len(self.lines)
        self.signal(signal.SIGHUP)
        return self.wait_for(lambda l: l.startswith(("reloaded policy", "reload refused")),
                             timeout, start=mark)

    def stop(self, timeout: float = 15) -> int:
        if self.process.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        self._reader.join(2)
        return self.process.returncode

    def kill(self) -> None:
        """kill -9 of the whole daemon (supervisor and workers)."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(5)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:      # the workers too: they hold the queues
            try:
                os.killpg(self.process.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.02)
        raise AssertionError("ipqd's workers outlived kill -9")


def udp_probe(lab, port: int, payload: bytes = b"probe", timeout: float = 1.0,
              family: int = socket.AF_INET) -> bool:
    """Send one datagram client -> server:port; True when the server got it."""
    rx = lab.server.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            rx.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        rx.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
        rx.settimeout(timeout)
        tx = lab.client.socket(family, socket.SOCK_DGRAM)
        tx.sendto(payload, (lab.SERVER6 if family == socket.AF_INET6 else lab.SERVER4, port))
        tx.close()
        try:
            return rx.recv(65535) == payload
        except socket.timeout:
            return False
    finally:
        rx.close()


def tcp_probe(lab, port: int, timeout: float = 1.0) -> bool:
    """A TCP connection client -> server:port; True when it was accepted."""
    listener = lab.server.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("0.0.0.0", port))
        listener.listen(1)
        client = lab.client.socket(socket.AF_INET, socket.SOCK_STREAM)
        client.settimeout(timeout)
        try:
            client.connect((lab.SERVER4, port))
            return True
        except OSError:
            return False
        finally:
            client.close()
    finally:
        listener.close()


def ping(lab, count: int = 1, v6: bool = False) -> bool:
    target = lab.SERVER6 if v6 else lab.SERVER4
    result = lab.client.sh(f"ping {'-6 ' if v6 else ''}-c {count} -i 0.2 -W 1 {target}", check=False)
    return result.returncode == 0


def queue_counters(host) -> List[List[int]]:
    """/proc/net/netfilter/nfnetlink_queue of the host: one row of numbers per queue."""
    text = host.sh("cat /proc/net/netfilter/nfnetlink_queue").stdout
    return [[int(x) for x in line.split()] for line in text.splitlines() if line.strip()]
