"""Faults on the real kernel: a stopped daemon, a decision code that raises,
a journald that is stuck or gone, reload storms. Every packet is accounted for."""
from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import threading
import time

import pytest

from daemon_harness import IPQD, RunningIpqd, queue_counters
from ipqd.policy.loader import loads
from ipqd.daemon.messages import WorkerConfig
from ipqd.daemon.worker import Worker
from netns import iptables
from sandbox import Journald, require_journald

pytestmark = pytest.mark.kernel

POLICY = """\
version: 1
queue: {num: 0, bypass: %(bypass)s, fail_open: %(fail_open)s, maxlen: %(maxlen)d}
hooks: [{chain: input, family: ipv4, proto: udp}]
default: {action: drop, log: %(log)s}
logging: {rate: 100000/second}
rules:
  - {name: allow-udp, proto: udp, dport: 5000, action: accept}
"""


def write(tmp_path, bypass="true", fail_open="true", maxlen=1024, log="false") -> str:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY % dict(bypass=bypass, fail_open=fail_open, maxlen=maxlen, log=log))
    os.chmod(path, 0o644)
    return str(path)


def stats(ipqd: RunningIpqd) -> dict:
    """The daemon's totals from its SIGUSR1 report."""
    mark = len(ipqd.lines)
    ipqd.signal(signal.SIGUSR1)
    line = ipqd.wait_for(lambda l: l.startswith("stats: "), start=mark)
    return {k: int(v) for k, v in (item.split("=") for item in line[len("stats: "):].split())}


def hook_packets(host) -> int:
    """The NFQUEUE rule's packet counter in ipqd's own chain (iptables-legacy)."""
    out = host.sh("iptables-legacy -w -L IPQD_INPUT -v -x -n").stdout
    return sum(int(line.split()[0]) for line in out.splitlines() if "NFQUEUE" in line)


class Receiver:
    """Counts datagrams per port on the server, in a thread."""

    def __init__(self, lab, ports):
        self.counts = {port: 0 for port in ports}
        self.socks = []
        for port in ports:
            s = lab.server.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
            s.bind(("0.0.0.0", port))
            s.settimeout(0.1)
            self.socks.append((port, s))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.is_set():
            for port, s in self.socks:
                try:
                    while True:
                        s.recv(2048)
                        self.counts[port] += 1
                        s.settimeout(0)
                except (socket.timeout, BlockingIOError):
                    s.settimeout(0.05)

    def wait(self, port, count, timeout=10.0) -> int:
        deadline = time.monotonic() + timeout
        while self.counts[port] < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.counts[port]

    def probe(self, tx, lab, port, timeout=1.0) -> bool:
        """One datagram to `port`: True when it arrived."""
        had = self.counts[port]
        tx.sendto(b"p", (lab.SERVER4, port))
        return self.wait(port, had + 1, timeout) > had

    def close(self):
        self.stop.set()
        self.thread.join(2)
        for _, s in self.socks:
            s.close()


# ------------------------------------------------------------------ SIGSTOP

@pytest.mark.parametrize("bypass", ["true", "false"])
def test_sigstop_of_the_whole_daemon_with_fail_open(lab, tmp_path, bypass):
    """Stopped, the daemon still holds its queue, so bypass plays no part:
    the kernel holds maxlen packets and, with fail_open, accepts the rest.
    After SIGCONT the held ones get their verdicts. The hook rule's counter
    equals ipqd's verdicts plus what the kernel accepted on its own."""
    ipqd = RunningIpqd(lab.server, write(tmp_path, bypass=bypass, maxlen=32), str(tmp_path / "st"),
                       "--backend", "iptables-legacy")
    rx = Receiver(lab, [5000, 5001])
    tx = lab.client.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        before, hook_before = stats(ipqd), hook_packets(lab.server)
        os.killpg(ipqd.process.pid, signal.SIGSTOP)
        for i in range(300):
            tx.sendto(b"a", (lab.SERVER4, 5000))
        for i in range(100):
            tx.sendto(b"b", (lab.SERVER4, 5001))
        time.sleep(0.3)
        held = queue_counters(lab.server)[0][2]
        os.killpg(ipqd.process.pid, signal.SIGCONT)
        assert rx.wait(5000, 300) == 300            # the policy accepts, or the kernel does
        time.sleep(1.5)                             # a worker stats report
        after, hook_after = stats(ipqd), hook_packets(lab.server)
        row = queue_counters(lab.server)[0]
        decided = after["packets"] - before["packets"]
        hooked = hook_after - hook_before
        fail_open = hooked - decided - row[5]
        print(f"bypass {bypass}: {hooked} packets hit the hook, {held} held while stopped, "
              f"{decided} decided by ipqd, {fail_open} accepted by the kernel (fail-open), "
              f"{row[5]} dropped by the queue, {rx.counts[5001]} of 100 to a denied port got through")
        assert hooked == 400
        assert held == 32 and decided >= 32 and fail_open > 0 and row[5] == row[6] == 0
        dropped = after["dropped"] - before["dropped"]
        assert rx.counts[5001] + dropped == 100        # each: dropped by ipqd or passed by fail-open
        assert decided + fail_open == hooked
        assert rx.probe(tx, lab, 5000) and not rx.probe(tx, lab, 5001)
    finally:
        os.killpg(ipqd.process.pid, signal.SIGCONT)
        rx.close()
        tx.close()
        ipqd.stop()


# ------------------------------------------------------------------ the decision code raises

@pytest.mark.parametrize("default", ["accept", "drop"])
def test_decision_code_that_raises_gives_every_packet_the_default(lab, default):
    """A Worker on a real queue whose engine fails on every other packet (in
    Engine.decide itself, past its own boundary) and whose matcher fails on the rest:
    every packet still gets exactly one verdict, the default, and each
    failure is counted."""
    policy = loads(f"version: 1\nqueue: {{num: 3}}\ndefault: {{action: {default}, log: false}}\n"
                   "rules:\n  - {name: never, proto: udp, dport: 6000, action: drop}\n", "p.yaml")
    iptables(lab.server, "-A INPUT -p udp --dport 6000 -j NFQUEUE --queue-num 3")
    parent, child = multiprocessing.Pipe()
    worker = Worker(WorkerConfig(0, 1, {3: None}, "stderr"), policy, child,
                    sock=lab.server.netlink_socket())
    rx = Receiver(lab, [6000])
    tx = lab.client.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        worker.bind()
        real_decide = worker.engine.decide
        calls = [0]

        def engine_decide(*args):
            calls[0] += 1
            if calls[0] % 2:
                raise RuntimeError("injected fault in Engine.decide")
            return real_decide(*args)

        def matcher_decide(view, now):
            raise ZeroDivisionError("injected fault in the matcher")

        worker.engine.decide = engine_decide
        worker.engine.matcher.decide = matcher_decide
        for i in range(200):
            tx.sendto(b"%d" % i, (lab.SERVER4, 6000))
        deadline = time.monotonic() + 10
        while worker.engine.counters.packets + worker.engine.counters.errors < 300 \
                and time.monotonic() < deadline:
            events = worker.qs.receive_events(timeout=0.2)
            if events:
                worker.answer(events)
        expected = 200 if default == "accept" else 0
        assert rx.wait(6000, expected, timeout=3) == expected
        counters = worker.stats()
        assert calls[0] == 200
        assert counters["errors"] == 200                      # 100 in Engine.decide, 100 in the matcher
        assert counters[f"{default}ed" if default == "accept" else "dropped"] == 200
        row = [r for r in queue_counters(lab.server) if r[0] == 3][0]
        assert row[2] == 0 and row[7] == 200                   # nothing left waiting
    finally:
        rx.close()
        tx.close()
        worker.close()
        parent.close()
        child.close()


# ------------------------------------------------------------------ journald stuck or gone

def test_journald_stuck_then_gone_verdicts_keep_flowing(lab, tmp_path):
    require_journald()
    path = write(tmp_path, log="true")
    with Journald() as journald:
        daemon = journald.popen(["ip", "netns", "exec", lab.server.name, IPQD, "run", "--policy", path,
                                 "--log-target", "journal", "--state-dir", str(tmp_path / "st")],
                                stdout=subprocess_devnull(), stderr=subprocess_devnull(),
                                start_new_session=True)
        try:
            journald.wait_journal(lambda e: e["MESSAGE"].startswith("ipqd started"),
                                  identifier="ipqd", timeout=20)
            rx = Receiver(lab, [5000, 5001])
            tx = lab.client.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                journald.freeze()
                started = time.monotonic()
                blast(tx, lab, 6000, rx)                    # every one logged: the log backs up
                frozen_rate = 6000 / (time.monotonic() - started)
                assert rx.probe(tx, lab, 5000) and not rx.probe(tx, lab, 5001)
                journald.thaw()
                journald.kill()
                blast(tx, lab, 2000, rx)
                assert rx.probe(tx, lab, 5000) and not rx.probe(tx, lab, 5001)
                journald.start()
                cursor = journald.cursor()
                os.kill(daemon.pid, signal.SIGUSR1)
                entry = journald.wait_journal(
                    lambda e: e.get("IPQD_EVENT") == "stats" and int(e.get("IPQD_PACKETS", 0)) >= 8000,
                    identifier="ipqd", since_cursor=cursor, timeout=20)
                figures = {k[5:].lower(): int(v) for k, v in entry.items()
                           if k.startswith("IPQD_") and v.isdigit()}
                print(f"journald frozen then killed: {figures['packets']} packets decided, "
                      f"{figures['log_logged']} entries written, {figures['log_overflowed']} dropped "
                      f"while the log was backed up, {figures['log_failed']} failed "
                      f"(verdicts at {frozen_rate:.0f}/s while frozen)")
                assert figures["log_overflowed"] > 0 and figures["log_failed"] > 0
                assert rx.counts[5000] >= 8000
            finally:
                rx.close()
                tx.close()
        finally:
            os.killpg(daemon.pid, signal.SIGTERM)
            try:
                daemon.wait(15)
            except Exception:
                os.killpg(daemon.pid, signal.SIGKILL)
                daemon.wait(5)


def subprocess_devnull():
    import subprocess
    return subprocess.DEVNULL


def blast(tx, lab, count: int, rx: Receiver) -> None:
    """`count` datagrams to the accepted port, in steps so the queue never fills."""
    start = rx.counts[5000]
    for i in range(count):
        tx.sendto(b"j", (lab.SERVER4, 5000))
        if i % 200 == 199:
            assert rx.wait(5000, start + i + 1 - 100, timeout=5) >= start + i + 1 - 100
    assert rx.wait(5000, start + count) == start + count


# ------------------------------------------------------------------ reload storms

def test_reload_storm_and_a_reload_during_a_flood(lab, tmp_path):
    """SIGHUP every 10 ms for 3 s under a stream, then a flood with reloads:
    every datagram arrives, the kernel queue drops nothing, the daemon lives
    and stops promptly."""
    ipqd = RunningIpqd(lab.server, write(tmp_path, fail_open="false", maxlen=4096),
                       str(tmp_path / "st"))
    rx = Receiver(lab, [5000, 5001])
    tx = lab.client.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stop = threading.Event()
    signals = [0]

    def storm():
        while not stop.is_set():
            ipqd.signal(signal.SIGHUP)
            signals[0] += 1
            time.sleep(0.01)

    thread = threading.Thread(target=storm)
    try:
        thread.start()
        sent = 0
        started = time.monotonic()
        while time.monotonic() - started < 3:
            tx.sendto(b"s", (lab.SERVER4, 5000))
            sent += 1
            if sent % 200 == 0:
                assert rx.wait(5000, sent - 100) >= sent - 100
        for _ in range(3000):                      # the flood: no pacing
            tx.sendto(b"f", (lab.SERVER4, 5000))
            sent += 1
        stop.set()
        thread.join()
        assert rx.wait(5000, sent, timeout=20) == sent
        row = queue_counters(lab.server)[0]
        reloads = sum(1 for l in ipqd.lines if l.startswith("reloaded policy"))
        print(f"reload storm: {signals[0]} SIGHUPs, {reloads} reloads, {sent} datagrams, "
              f"all received; queue dropped {row[5]}, user dropped {row[6]}")
        assert row[5] == 0 and row[6] == 0
        # Each reload starts a loading process and a new worker (some 0.4 s
        # here), and the SIGHUPs that come meanwhile make one more reload.
        assert ipqd.process.poll() is None and reloads >= 5
        assert rx.probe(tx, lab, 5000) and not rx.probe(tx, lab, 5001)
        stopping = time.monotonic()
        assert ipqd.stop() == 0
        assert time.monotonic() - stopping < 10
    finally:
        stop.set()
        if thread.is_alive():
            thread.join()
        rx.close()
        tx.close()
        ipqd.stop()
