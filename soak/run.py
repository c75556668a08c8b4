"""Soak: `ipqd run` on the example policy under mixed traffic for a long time.

    make soak                    # 30 minutes
    make soak DURATION=300       # or: .venv/bin/python soak/run.py --duration 300

Two throwaway network namespaces (tests/netns.py). The client sends UDP,
TCP connections, ICMP echo (IPv4 and IPv6) and a share of malformed IPv4
and IPv6 packets (raw sockets: bad lengths, bad TCP offsets, extension
header chains, fragments) to the server, where ipqd runs with
etc/ipqd/policy.yaml. SIGHUP every RELOAD_EVERY seconds, a stop and start
every RESTART_EVERY seconds. At the end: packets sent and decided, verdicts,
the kernel queue's drop counters, RSS and open files of ipqd's processes at
the start and end of each run, and the largest delay seen by timestamped
probes. Exit status 1 when a check fails (RSS growth, drops, a dead daemon).
Needs root; removes everything it made, also on failure.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import struct
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import fuzz_corpus                                     # noqa: E402
from daemon_harness import RunningIpqd, queue_counters  # noqa: E402
from netns import Lab, missing_prerequisites           # noqa: E402

RELOAD_EVERY = 5.0
RESTART_EVERY = 180.0
WARMUP = 10.0
RSS_GROWTH_BOUND = 16 << 20        # per run of the daemon (between restarts)
PROBE_EVERY = 0.05


def processes(ipqd: RunningIpqd) -> list:
    """The pids of ipqd's process group: the supervisor, workers, loading processes."""
    pgid = ipqd.process.pid
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) == pgid:
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


def resources(ipqd: RunningIpqd) -> dict:
    rss = fds = 0
    pids = processes(ipqd)
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1]) * 1024
            fds += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            pass
    return {"rss": rss, "fds": fds, "processes": len(pids)}


def stats(ipqd: RunningIpqd) -> dict:
    mark = len(ipqd.lines)
    ipqd.signal(signal.SIGUSR1)
    line = ipqd.wait_for(lambda l: l.startswith("stats: "), start=mark, timeout=20)
    return {k: int(v) for k, v in (item.split("=") for item in line[len("stats: "):].split())}


class Traffic:
    """Client-side senders and server-side sinks, each a thread."""

    def __init__(self, lab: Lab):
        self.lab = lab
        self.stop = threading.Event()
        self.sent = {"udp4": 0, "udp6": 0, "tcp": 0, "icmp4": 0, "icmp6": 0, "malformed": 0,
                     "probes": 0}
        self.received = {"udp": 0, "probes": 0}
        self.max_delay = 0.0
        self.delays = []
        self.errors = []
        self.threads = [threading.Thread(target=self._guard, args=(f,), daemon=True)
                        for f in (self._udp_sink, self._tcp_sink, self._probe_sink, self._udp,
                                  self._tcp, self._icmp, self._malformed, self._probes)]

    def start(self):
        for t in self.threads:
            t.start()
            time.sleep(0.05)

    def close(self):
        self.stop.set()
        for t in self.threads:
            t.join(5)

    def _guard(self, target):
        try:
            target()
        except Exception as error:          # reported, and the run fails
            self.errors.append(f"{target.__name__}: {type(error).__name__}: {error}")

    # sinks
    def _udp_sink(self):
        s = self.lab.server.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.bind(("::", 5353))
        s.settimeout(0.2)
        while not self.stop.is_set():
            try:
                s.recv(2048)
                self.received["udp"] += 1
            except socket.timeout:
                pass
        s.close()

    def _tcp_sink(self):
        s = self.lab.server.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", 22))
        s.listen(64)
        s.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = s.accept()
                conn.close()
            except socket.timeout:
                pass
        s.close()

    def _probe_sink(self):
        s = self.lab.server.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", 5354))
        s.settimeout(0.2)
        while not self.stop.is_set():
            try:
                data = s.recv(64)
            except socket.timeout:
                continue
            delay = time.monotonic() - struct.unpack("!d", data[:8])[0]
            self.received["probes"] += 1
            self.max_delay = max(self.max_delay, delay)
            self.delays.append(delay)
        s.close()

    # senders
    def _udp(self):
        s4 = self.lab.client.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s6 = self.lab.client.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        while not self.stop.is_set():
            for _ in range(50):
                s4.sendto(b"u" * 64, (self.lab.SERVER4, 5353))
                s6.sendto(b"u" * 64, (self.lab.SERVER6, 5353))
            self.sent["udp4"] += 50
            self.sent["udp6"] += 50
            time.sleep(0.1)                 # about 1000 datagrams a second

    def _tcp(self):
        while not self.stop.is_set():
            c = self.lab.client.socket(socket.AF_INET, socket.SOCK_STREAM)
            c.settimeout(2)
            try:
                c.connect((self.lab.SERVER4, 22))
                self.sent["tcp"] += 1
            except OSError:
                pass
            finally:
                c.close()
            time.sleep(0.05)

    def _icmp(self):
        s4 = self.lab.client.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        s6 = self.lab.client.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        seq = 0
        while not self.stop.is_set():
            seq = (seq + 1) & 0xffff
            body = struct.pack("!HH", 7, seq) + b"soak"
            header = struct.pack("!BBH", 8, 0, 0) + body
            s4.sendto(struct.pack("!BBH", 8, 0, _checksum(header)) + body, (self.lab.SERVER4, 0))
            s6.sendto(struct.pack("!BBH", 128, 0, 0) + body, (self.lab.SERVER6, 0))  # kernel sums
            self.sent["icmp4"] += 1
            self.sent["icmp6"] += 1
            time.sleep(0.05)

    def _malformed(self):
        s4 = self.lab.client.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        s6 = self.lab.client.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
        src4, dst4 = socket.inet_aton(self.lab.CLIENT4), socket.inet_aton(self.lab.SERVER4)
        src6 = socket.inet_pton(socket.AF_INET6, self.lab.CLIENT6)
        dst6 = socket.inet_pton(socket.AF_INET6, self.lab.SERVER6)
        packets = []
        for name, packet in fuzz_corpus.worst_cases().items():
            if len(packet) > 1400:
                continue
            if packet[0] >> 4 == 4:
                packets.append((s4, packet[:12] + src4 + dst4 + packet[20:], self.lab.SERVER4))
            else:
                packets.append((s6, packet[:8] + src6 + dst6 + packet[40:], self.lab.SERVER6))
        while not self.stop.is_set():
            for sock, packet, target in packets:
                try:
                    sock.sendto(packet, (target, 0))
                    self.sent["malformed"] += 1
                except OSError:
                    pass            # the sending stack refuses some; others reach the wire
            time.sleep(0.1)

    def _probes(self):
        s = self.lab.client.socket(socket.AF_INET, socket.SOCK_DGRAM)
        while not self.stop.is_set():
            s.sendto(struct.pack("!d", time.monotonic()), (self.lab.SERVER4, 5354))
            self.sent["probes"] += 1
            time.sleep(PROBE_EVERY)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xffff) + (total >> 16)
    return ~total & 0xffff


def soak(duration: float) -> int:
    lab = Lab()
    workdir = tempfile.mkdtemp(prefix="ipqd-soak-")
    os.chmod(workdir, 0o700)
    policy = os.path.join(workdir, "policy.yaml")
    shutil.copy(os.path.join(ROOT, "etc", "ipqd", "policy.yaml"), policy)
    os.chmod(policy, 0o644)
    traffic = Traffic(lab)
    runs, failures = [], []
    ipqd = None
    started = time.monotonic()
    try:
        traffic.start()
        while time.monotonic() - started < duration:
            ipqd = RunningIpqd(lab.server, policy, os.path.join(workdir, "state"))
            run_started = time.monotonic()
            run = {"reloads": 0}
            time.sleep(WARMUP)
            run["start"] = resources(ipqd)
            last_reload = time.monotonic()
            while (time.monotonic() - run_started < RESTART_EVERY
                   and time.monotonic() - started < duration):
                time.sleep(0.5)
                if time.monotonic() - last_reload >= RELOAD_EVERY:
                    if ipqd.reload().startswith("reloaded policy"):
                        run["reloads"] += 1
                    last_reload = time.monotonic()
                    del ipqd.lines[:-2000]          # the harness keeps every line
                if ipqd.process.poll() is not None:
                    failures.append(f"ipqd exited with {ipqd.process.returncode}")
                    break
            run["end"] = resources(ipqd)
            run["stats"] = stats(ipqd)
            run["queues"] = queue_counters(lab.server)
            run["exit"] = ipqd.stop()
            runs.append(run)
            growth = run["end"]["rss"] - run["start"]["rss"]
            print(f"run {len(runs)}: {run['stats'].get('packets', 0)} packets decided, "
                  f"{run['reloads']} reloads, RSS {run['start']['rss'] >> 20} -> "
                  f"{run['end']['rss'] >> 20} MiB, fds {run['start']['fds']} -> {run['end']['fds']}",
                  flush=True)
            if growth > RSS_GROWTH_BOUND:
                failures.append(f"run {len(runs)}: RSS grew {growth >> 20} MiB (bound "
                                f"{RSS_GROWTH_BOUND >> 20} MiB)")
            if run["end"]["fds"] > run["start"]["fds"] + 4:
                failures.append(f"run {len(runs)}: open files {run['start']['fds']} -> "
                                f"{run['end']['fds']}")
            if any(row[5] or row[6] for row in run["queues"]):
                failures.append(f"run {len(runs)}: kernel queue drops {run['queues']}")
            if run["exit"] != 0:
                failures.append(f"run {len(runs)}: exit status {run['exit']}")
            ipqd = None
    finally:
        traffic.close()
        if ipqd is not None:
            ipqd.stop()
        lab.close()
        shutil.rmtree(workdir, ignore_errors=True)
    failures += traffic.errors
    delays = sorted(traffic.delays) or [0.0]
    keys = ("packets", "accepted", "dropped", "malformed", "errors", "socket_enobufs",
            "socket_undecodable", "kernel_errors", "log_logged", "log_suppressed",
            "log_overflowed", "log_failed")
    totals = {k: sum(r["stats"].get(k, 0) for r in runs) for k in keys}
    report = {
        "duration_s": round(time.monotonic() - started),
        "runs": len(runs),
        "reloads": sum(r["reloads"] for r in runs),
        "sent": traffic.sent,
        "received": traffic.received,
        "decided": totals,
        "queue_dropped": sum(row[5] for r in runs for row in r["queues"]),
        "queue_user_dropped": sum(row[6] for r in runs for row in r["queues"]),
        "rss_mib": [(round(r["start"]["rss"] / 2**20, 1), round(r["end"]["rss"] / 2**20, 1))
                    for r in runs],
        "fds": [(r["start"]["fds"], r["end"]["fds"]) for r in runs],
        "max_growth_mib": round(max((r["end"]["rss"] - r["start"]["rss"] for r in runs),
                                    default=0) / 2**20, 1),
        "probe_delay_ms": {"max": round(traffic.max_delay * 1000, 2),
                           "p99": round(delays[int(len(delays) * 0.99)] * 1000, 2),
                           "median": round(delays[len(delays) // 2] * 1000, 3)},
        "probes_lost": traffic.sent["probes"] - traffic.received["probes"],
        "failures": failures,
    }
    print(json.dumps(report, indent=2))
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=1800, help="seconds (default 1800)")
    args = parser.parse_args()
    missing = missing_prerequisites()
    if missing:
        print("soak needs: " + ", ".join(missing), file=sys.stderr)
        return 2
    return soak(args.duration)


if __name__ == "__main__":
    sys.exit(main())
