"""`make bench`: NFQUEUE consumers side by side, on loopback UDP in a namespace.

    .venv/bin/python bench/run.py [--reps 5] [--quick] [--consumers a,b] [--no-reload]
                                  [--no-rss] [--no-multiqueue] [--json PATH]

Needs root, gcc and libnetfilter-queue-dev (`make bench` installs them). It
builds bench/udpblast.c and bench/nfq_accept.c into bench/build/, makes
bench/build/venv with PyPI's netfilterqueue, creates one network namespace
(ipqd-bench-PID), and removes everything it started, even on failure or
Ctrl-C. Nothing runs in the root namespace's firewall.

Every consumer is started once, bound to a queue of its own; one iptables
rule in the namespace (INPUT, udp dport 9000) is pointed at one queue at a
time, so the consumers are measured interleaved within each repetition and
every ratio compares numbers of the same repetition. Per consumer and
repetition:

- closed: lossless closed loop, 64-byte IP packets, a window of packets in
  flight: packets/s at the receiver, and the consumer's CPU microseconds per
  packet (utime+stime of all its processes from /proc/PID/stat).
- flood: open loop as fast as the sender goes: sent, received, and the
  queue's "queue dropped" and "user dropped" counters.
- latency: one packet in flight, consumer and sender pinned on CPU 0
  (cross-CPU wake-ups cost hundreds of microseconds on small VMs): median
  and p99 round trip.

Consumers named new:NAME get new-flow traffic: every packet from a new
source address of 127.64.0.0/10 and a new source port (udpblast --spread),
so no cache can answer; their ipqd policies mix CIDR sets, port ranges,
negation, tcp flags and icmp types, and the traffic matches only the last
rule, which reads the source network and port (`newflow_policy_yaml`).
Their ratios are to new:c-1verdict of the same repetition.

Then, each optional: reload of the 10,000-rule policy under a latency probe
(reload time, worst packet delay), resident memory of ipqd with 10 and
10,000 rules, two queues on two workers against one queue, and TCP bulk
throughput with and without flow offload (bench/tcp_offload.py, in
namespaces of its own).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
BUILD = os.path.join(BENCH, "build")
RESULTS = os.path.join(BENCH, "results")
sys.path.insert(0, ROOT)

from tests.netns import Host  # noqa: E402  (the suite's namespace helper)

PORT = 9000
PACKET_SIZE = 64                # bytes of the IP packet
WINDOW = 256                    # closed loop: packets in flight (queue maxlen is 1024)
REFERENCE = "c-1verdict"
NEW = "new:"                    # prefix of consumers measured with new-flow traffic
SPREAD_BITS = 22                # new flows: sources over all of 127.64.0.0/10
CLK_TCK = os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count() or 1

# name -> what it is, in table order
CONSUMERS = {
    "none": "no queue: the rule accepts (ceiling)",
    "c-1verdict": "C, libnetfilter_queue, one verdict per packet (reference)",
    "c-batch": "C, libnetfilter_queue, batch verdicts",
    "py-netfilterqueue": "Python, PyPI netfilterqueue 1.x, accept in the callback",
    "ipqd-client": "Python, ipqd's QueueSocket, batch verdicts, 8 MB rcvbuf",
    "ipqd-10": "ipqd run, 10 rules, traffic hits the last, logging off",
    "ipqd-10-log": "ipqd run, 10 rules, every decision logged (stderr to /dev/null)",
    "ipqd-1000": "ipqd run, 1,000 rules, logging off",
    "ipqd-1000-nocache": "ipqd run, 1,000 rules, logging off, verdict cache off (--no-cache)",
    "ipqd-1000-log": "ipqd run, 1,000 rules, every decision logged",
    "ipqd-1000-lograte": "ipqd run, 1,000 rules, every decision logged, logging.rate 100/second",
    "ipqd-10000": "ipqd run, 10,000 rules, logging off",
    "ipqd-10000-log": "ipqd run, 10,000 rules, every decision logged",
    "new:c-1verdict": "new flows: C, one verdict per packet (reference of the new: rows)",
    "new:c-batch": "new flows: C, batch verdicts",
    "new:py-netfilterqueue": "new flows: Python, PyPI netfilterqueue",
    "new:ipqd-10": "new flows: ipqd run, 10 mixed rules, traffic hits the last",
    "new:ipqd-10-nocache": "new flows: ipqd run, 10 mixed rules, --no-cache",
    "new:ipqd-1000": "new flows: ipqd run, 1,000 mixed rules",
    "new:ipqd-1000-nocache": "new flows: ipqd run, 1,000 mixed rules, --no-cache",
    "new:ipqd-10000": "new flows: ipqd run, 10,000 mixed rules",
    "new:ipqd-10000-nocache": "new flows: ipqd run, 10,000 mixed rules, --no-cache",
}
BASE = "base:"                  # prefix of consumers run from the --baseline tree
QUICK = ("none", "c-1verdict", "c-batch", "py-netfilterqueue", "ipqd-client", "ipqd-1000",
         "new:c-1verdict", "new:ipqd-1000", "new:ipqd-1000-nocache")


def reference_of(name: str) -> str:
    """The C reference measured with the same traffic as `name`."""
    return NEW + REFERENCE if NEW in name else REFERENCE


def is_ipqd(name: str) -> bool:
    """A consumer that `ipqd run` or ipqd's client serves (a --baseline tree runs them too)."""
    return not name.startswith(BASE) and name.split(":")[-1].startswith("ipqd-")


# ---------------------------------------------------------------- building

def build() -> Dict[str, Optional[str]]:
    """Compile the C programs and make the netfilterqueue venv; what failed, why."""
    os.makedirs(BUILD, exist_ok=True)
    problems: Dict[str, Optional[str]] = {}
    for name, libs in (("udpblast", []), ("nfq_accept", ["-lnetfilter_queue"])):
        source, binary = os.path.join(BENCH, name + ".c"), os.path.join(BUILD, name)
        if not os.path.exists(binary) or os.path.getmtime(binary) < os.path.getmtime(source):
            result = subprocess.run(["gcc", "-O2", "-Wall", "-o", binary, source] + libs,
                                    capture_output=True, text=True)
            if result.returncode != 0:
                raise SystemExit(f"bench: cannot build {name}:\n{result.stderr}")
    venv = os.path.join(BUILD, "venv")
    python = os.path.join(venv, "bin", "python")
    check = [python, "-c", "import netfilterqueue"]
    if not os.path.exists(python) or subprocess.run(check, capture_output=True).returncode:
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        result = subprocess.run([python, "-m", "pip", "install", "-q", "netfilterqueue"],
                                capture_output=True, text=True)
        if result.returncode != 0:
            problems["py-netfilterqueue"] = "pip install netfilterqueue failed: " + \
                (result.stderr.strip().splitlines() or ["?"])[-1]
    return problems


# ---------------------------------------------------------------- processes

def proc_children() -> Dict[int, List[int]]:
    children: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    return children


def family(pid: int) -> List[int]:
    """The process and all its descendants."""
    children = proc_children()
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, []))
    return found


def cpu_seconds(pids: List[int]) -> float:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])     # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total / CLK_TCK


def memory_kb(pid: int) -> Dict[str, int]:
    """VmRSS (status) and Pss (smaps_rollup) of one process, in kB."""
    out = {"rss_kb": 0, "pss_kb": 0}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    out["rss_kb"] = int(line.split()[1])
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    out["pss_kb"] = int(line.split()[1])
    except OSError:
        pass
    return out


def set_affinity(pids: List[int], cpus: str) -> None:
    for pid in pids:
        subprocess.run(["taskset", "-a", "-p", "-c", cpus, str(pid)], capture_output=True)


# ---------------------------------------------------------------- the lab

class Lab:
    """The namespace, its one queue rule, the consumers, the blaster."""

    def __init__(self):
        self.tmp = tempfile.mkdtemp(prefix=f"ipqd-bench-{os.getpid()}-")
        self.host: Optional[Host] = None
        self.procs: Dict[str, subprocess.Popen] = {}
        self.queues: Dict[str, str] = {}         # consumer -> "N" or "A:B"
        self.logs: Dict[str, str] = {}
        self.iptables = "iptables-legacy" if shutil.which("iptables-legacy") else "iptables"
        try:
            self.host = Host(f"ipqd-bench-{os.getpid()}")
            self.ipt(f"-I INPUT 1 -p udp --dport {PORT} -j ACCEPT")
        except BaseException:
            self.close()
            raise

    def ipt(self, rule: str) -> None:
        self.host.sh(f"{self.iptables} -w {rule}")

    def point(self, consumer: str) -> None:
        """Send the benchmark traffic to `consumer`'s queue (or nowhere: "none")."""
        queue = self.queues.get(consumer)
        if queue is None:
            target = "ACCEPT"
        elif ":" in queue:
            target = f"NFQUEUE --queue-balance {queue}"
        else:
            target = f"NFQUEUE --queue-num {queue}"
        self.ipt(f"-R INPUT 1 -p udp --dport {PORT} -j {target}")

    def queue_table(self) -> Dict[int, List[int]]:
        text = self.host.sh("cat /proc/net/netfilter/nfnetlink_queue", check=False).stdout
        rows = [[int(x) for x in line.split()] for line in text.splitlines() if line.strip()]
        return {row[0]: row for row in rows}

    def start(self, name: str, queue: str, args: List[str], log: Optional[str] = None,
              source: Optional[str] = None) -> None:
        stderr = open(log, "w") if log else subprocess.DEVNULL
        env = dict(os.environ)
        if source:          # ipqd imported from another tree: a before/after pair
            env["PYTHONPATH"] = source
        self.procs[name] = subprocess.Popen(
            ["ip", "netns", "exec", self.host.name] + args, stdout=subprocess.DEVNULL,
            stderr=stderr, start_new_session=True, env=env, cwd=self.tmp)
        if log:
            stderr.close()
            self.logs[name] = log
        self.queues[name] = queue

    def wait_bound(self, names: List[str], timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            bound = self.queue_table()
            waiting = [n for n in names
                       if not all(int(q) in bound for q in _queue_numbers(self.queues[n]))]
            if not waiting:
                return
            for name in waiting:
                if self.procs[name].poll() is not None:
                    raise SystemExit(f"bench: consumer {name} exited "
                                     f"({self.procs[name].returncode}) before binding")
            if time.monotonic() > deadline:
                raise SystemExit(f"bench: consumers {waiting} did not bind in {timeout:.0f} s")
            time.sleep(0.2)

    def pids(self, name: str) -> List[int]:
        proc = self.procs.get(name)
        return family(proc.pid) if proc else []

    def blast(self, mode: str, *args: str, pin: bool = False) -> dict:
        command = ["ip", "netns", "exec", self.host.name]
        if pin:
            command += ["taskset", "-c", "0"]
        command += [os.path.join(BUILD, "udpblast"), mode, "--port", str(PORT),
                    "--size", str(PACKET_SIZE)] + list(args)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if result.returncode != 0:
            raise SystemExit(f"bench: udpblast {mode} failed: {result.stderr.strip()}")
        out = json.loads(result.stdout)
        # The sender's own CPU (`ip netns exec` becomes udpblast): near one
        # whole CPU, the sender, not the consumer, sets the pace.
        out["sender_cpu_s"] = round((after.ru_utime + after.ru_stime)
                                    - (before.ru_utime + before.ru_stime), 3)
        return out

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        except ProcessLookupError:
            pass

    def close(self) -> None:
        for name in list(self.procs):
            try:
                self.stop(name)
            except Exception:           # the namespace's removal kills the rest
                pass
        if self.host is not None:
            self.host.delete()
            self.host = None
        shutil.rmtree(self.tmp, ignore_errors=True)


def _queue_numbers(queue: str) -> List[int]:
    if ":" in queue:
        first, last = map(int, queue.split(":"))
        return list(range(first, last + 1))
    return [int(queue)]


# ---------------------------------------------------------------- policies

def policy_yaml(rules: int, queue: str, log: bool, log_rate: Optional[str] = None) -> str:
    """`rules` rules; the benchmark traffic (udp 127.0.0.0/8 -> 9000) matches only
    the last. Every other rule is udp from a 10.x.y.0/24 of its own, half of them
    on port 9000 too, so neither the port nor the protocol alone rules them out.
    The default drops: a miss would show as lost packets. `log_rate`: the
    policy's logging.rate (the lines past it are counted, not written)."""
    flag = "true" if log else "false"
    num = f'"{queue.replace(":", "-")}"' if ":" in queue else queue
    # offload off: the benchmark measures the per-packet path (and --no-hooks
    # leaves out the rules that would take offload requests).
    lines = ["version: 1", "queue:", f"  num: {num}", "  copy_range: 256",
             "  fail_open: false", "  bypass: false", "  offload: off",
             "hooks:", "  - {chain: input, family: ipv4, proto: udp}",
             f"default: {{action: drop, log: {flag}}}"]
    if log_rate:
        lines.append(f"logging: {{rate: {log_rate}}}")
    lines.append("rules:")
    for i in range(rules - 1):
        dport = PORT if i % 2 else 20000 + i % 40000
        lines.append(f"  - {{name: r{i}, proto: udp, src: 10.{(i >> 8) & 255}.{i & 255}.0/24, "
                     f"dport: {dport}, action: accept}}")
    lines.append(f"  - {{name: bench, proto: udp, src: 127.0.0.0/8, dport: {PORT}, action: accept}}")
    return "\n".join(lines) + "\n"


def newflow_rule(i: int) -> str:
    """Rule `i` of a mixed policy, one that new-flow traffic (udp from
    127.64.0.0/10, ports 1024-65535, to 127.0.0.1:9000) never matches:
    CIDR sets, port ranges, negations, tcp flags, icmp types, most of them
    on udp port 9000 too, so that neither the port nor the protocol alone
    rules them out."""
    a, b = (i >> 8) & 255, i & 255
    kind = i % 8
    if kind == 0:       # a CIDR set outside the traffic's sources, with a port range
        return (f"{{name: r{i}, proto: udp, src: [10.{a}.{b}.0/24, 172.16.{b}.0/25, "
                f"192.168.{a}.{b}/32], sport: 1024-65535, dport: {PORT}, action: accept}}")
    if kind == 1:       # a negated network the traffic lies in
        return (f"{{name: r{i}, proto: udp, src: \"!127.0.0.0/8\", dport: {PORT}-{PORT + b}, "
                f"action: accept}}")
    if kind == 2:       # tcp flags
        return (f"{{name: r{i}, proto: tcp, tcp_flags: \"syn,!ack\", src: 127.64.0.0/10, "
                f"dport: {PORT}, action: accept}}")
    if kind == 3:       # icmp types
        return (f"{{name: r{i}, proto: icmp, icmp_type: [echo-request, timestamp-request], "
                f"src: 10.{a}.0.0/16, action: accept}}")
    if kind == 4:       # the traffic's network, but low source ports
        return (f"{{name: r{i}, proto: udp, src: 127.64.0.0/10, sport: 1-{1 + b}, "
                f"dport: {PORT}, action: accept}}")
    if kind == 5:       # other loopback networks, the traffic's ports
        return (f"{{name: r{i}, proto: udp, src: 127.{a % 64}.{b}.0/24, sport: 1024-65535, "
                f"dport: {PORT}, action: accept}}")
    if kind == 6:       # a negated port
        return (f"{{name: r{i}, proto: udp, src: 127.64.0.0/10, dport: \"!{PORT}\", "
                f"action: drop}}")
    return (f"{{name: r{i}, proto: udp, dst: 127.1.{a}.{b}, sport: \"!{b}\", "  # another destination
            f"dport: {PORT}, action: accept}}")


def newflow_policy_yaml(rules: int, queue: str) -> str:
    """`rules` mixed rules (newflow_rule); new-flow traffic matches only the
    last, which reads the source network and port. Default drop, offload off."""
    lines = ["version: 1", "queue:", f"  num: {queue}", "  copy_range: 256",
             "  fail_open: false", "  bypass: false", "  offload: off",
             "hooks:", "  - {chain: input, family: ipv4, proto: udp}",
             "default: {action: drop, log: false}", "rules:"]
    lines += [f"  - {newflow_rule(i)}" for i in range(rules - 1)]
    lines.append(f"  - {{name: bench, proto: udp, src: 127.64.0.0/10, sport: 1024-65535, "
                 f"dport: {PORT}, action: accept}}")
    return "\n".join(lines) + "\n"


def start_ipqd(lab: Lab, name: str, rules: int, queue: str, log: bool,
               source: Optional[str] = None, cache: bool = True,
               log_rate: Optional[str] = None, newflow: bool = False) -> None:
    path = os.path.join(lab.tmp, f"{name.replace(':', '-')}.yaml")
    with open(path, "w") as out:
        out.write(newflow_policy_yaml(rules, queue) if newflow
                  else policy_yaml(rules, queue, log, log_rate))
    os.chmod(path, 0o644)
    state = os.path.join(lab.tmp, f"{name.replace(':', '-')}.state")
    os.makedirs(state, exist_ok=True)
    # Decision lines go to /dev/null; a log-off instance keeps its few event lines.
    log_file = None if log else os.path.join(lab.tmp, f"{name.replace(':', '-')}.log")
    lab.start(name, queue, [sys.executable, "-m", "ipqd.cli", "run", "--policy", path,
                            "--no-hooks", "--log-target", "stderr", "--state-dir", state]
              + ([] if cache else ["--no-cache"]),
              log=log_file, source=source)


def start_consumers(lab: Lab, names: List[str], extra_ipqd: Dict[str, tuple],
                    baseline: Optional[str] = None) -> None:
    queue = 1
    for name in names:
        if name == "none":
            continue
        q = str(queue)
        queue += 1
        source = baseline if name.startswith(BASE) else None
        kind = name[len(BASE):] if source else name
        newflow = kind.startswith(NEW)
        kind = kind[len(NEW):] if newflow else kind
        if kind == "ipqd-client":
            lab.start(name, q, [sys.executable, os.path.join(BENCH, "accept_all.py"),
                                "queuesocket", q], source=source)
        elif kind.startswith("ipqd-"):
            rules = int(kind.split("-")[1])
            start_ipqd(lab, name, rules, q, kind.endswith(("-log", "-lograte")), source,
                       cache=not kind.endswith("-nocache"),
                       log_rate="100/second" if kind.endswith("-lograte") else None,
                       newflow=newflow)
        elif kind == "c-1verdict":
            lab.start(name, q, [os.path.join(BUILD, "nfq_accept"), q])
        elif kind == "c-batch":
            lab.start(name, q, [os.path.join(BUILD, "nfq_accept"), q, "--batch"])
        elif kind == "py-netfilterqueue":
            lab.start(name, q, [os.path.join(BUILD, "venv", "bin", "python"),
                                os.path.join(BENCH, "accept_all.py"), "netfilterqueue", q])
    for name, (rules, queue_spec) in extra_ipqd.items():
        start_ipqd(lab, name, rules, queue_spec, False)
    lab.wait_bound([n for n in names if n != "none"] + list(extra_ipqd))


# ---------------------------------------------------------------- measuring

def measure(lab: Lab, name: str, args) -> dict:
    lab.point(name)
    pids = lab.pids(name)
    queues = _queue_numbers(lab.queues[name]) if name in lab.queues else []
    out: dict = {}
    traffic = ["--spread", str(SPREAD_BITS)] if NEW in name else []

    cpu0 = cpu_seconds(pids)
    closed = lab.blast("closed", "--duration", str(args.closed), "--window", str(WINDOW),
                       *traffic)
    cpu = cpu_seconds(pids) - cpu0
    closed["cpu_us_per_packet"] = (cpu * 1e6 / closed["received"]
                                   if pids and closed["received"] else None)
    closed["sender_busy"] = closed["sender_cpu_s"] / args.closed
    out["closed"] = closed

    before = lab.queue_table()
    flood = lab.blast("flood", "--duration", str(args.flood), *traffic)
    after = lab.queue_table()
    flood["queue_dropped"] = sum(after[q][5] - before[q][5] for q in queues if q in after)
    flood["user_dropped"] = sum(after[q][6] - before[q][6] for q in queues if q in after)
    out["flood"] = flood

    set_affinity(pids, "0")
    try:
        out["latency"] = lab.blast("latency", "--count", str(args.latency_count), *traffic,
                                   pin=True)
    finally:
        set_affinity(pids, f"0-{NCPU - 1}")
    return out


RELOAD_PROBE_S = 20.0       # the probe runs from 1.5 s before the SIGHUP to past the reload's end
PROBE_WARMUP_S = 0.5        # its first round trips (a process just started) are not counted


def daemon_roles(pids: List[int]) -> Dict[str, List[int]]:
    """An ipqd's processes by role: a worker's command line ends in
    `ipqd.daemon.child worker FD` (`ipqd.child worker FD` in older trees)."""
    commands = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline") as f:
                commands[pid] = f.read().rstrip("\0").split("\0")
        except OSError:
            continue
    workers = [pid for pid, command in commands.items()
               if command[-3:-1] in (["ipqd.daemon.child", "worker"], ["ipqd.child", "worker"])]
    return {"workers": workers, "others": [pid for pid in commands if pid not in workers]}


def measure_reload(lab: Lab, name: str, reps: int, one_cpu: bool) -> dict:
    """SIGHUP under a one-in-flight probe: reload time (the daemon's own
    figure) and the worst round trip while it ran; then the same probe once
    without a reload (`control`), for the VM's own worst delay. The probe and
    the worker share CPU 0; the supervisor, and so the processes it starts
    to load the new policy and to compile it (the new worker), run on CPU 0
    too when `one_cpu`, else on the other CPUs."""
    lab.point(name)
    runs = [_probe_reload(lab, name, one_cpu, reload=True) for _ in range(reps)]
    control = _probe_reload(lab, name, one_cpu, reload=False)
    return {"consumer": name, "one_cpu": one_cpu, "runs": runs, "control": control,
            "reload_ms_median": _median([r["reload_ms"] for r in runs]),
            "worst_delay_ms_max": max(r["worst_delay_ms"] for r in runs),
            "lost": sum(r["probe"].get("lost", 0) for r in runs)}


def _probe_reload(lab: Lab, name: str, one_cpu: bool, reload: bool) -> dict:
    pids = lab.pids(name)               # each reload makes a new worker
    roles = daemon_roles(pids)
    with open(lab.logs[name]) as log:
        mark = len(log.readlines())
    set_affinity(pids, "0")
    if not one_cpu and NCPU > 1:
        set_affinity(roles["others"], f"1-{NCPU - 1}")
    probe = subprocess.Popen(
        ["ip", "netns", "exec", lab.host.name, "taskset", "-c", "0",
         os.path.join(BUILD, "udpblast"), "latency", "--duration", str(RELOAD_PROBE_S),
         "--warmup", str(PROBE_WARMUP_S), "--port", str(PORT), "--size", str(PACKET_SIZE)],
        stdout=subprocess.PIPE, text=True)
    time.sleep(1.5)
    sent_at = time.monotonic()
    took = None
    if reload:
        os.kill(lab.procs[name].pid, signal.SIGHUP)
        while time.monotonic() - sent_at < 60 and took is None:
            with open(lab.logs[name]) as log:
                for line in log.readlines()[mark:]:
                    found = re.search(r"reloaded policy .* in (\d+) ms", line)
                    if found:
                        took = int(found.group(1))
            time.sleep(0.05)
    seen_at = time.monotonic() - sent_at
    stdout, _ = probe.communicate(timeout=60)
    set_affinity(lab.pids(name), f"0-{NCPU - 1}")
    latency = json.loads(stdout)
    return {"reload_ms": took, "reload_seen_s": round(seen_at, 3),
            "probe_covered_reload": 1.5 + seen_at < RELOAD_PROBE_S,
            "probe": latency,
            "worst_delay_ms": (latency["max_us"] - latency["median_us"]) / 1000}


def measure_rss(lab: Lab, names: List[str]) -> dict:
    out = {}
    for name in names:
        if name not in lab.procs:
            continue
        per = {str(pid): memory_kb(pid) for pid in lab.pids(name)}
        out[name] = {"processes": per,
                     "rss_mb": sum(p["rss_kb"] for p in per.values()) / 1024,
                     "pss_mb": sum(p["pss_kb"] for p in per.values()) / 1024}
    return out


def measure_multiqueue(lab: Lab, reps: int, duration: float) -> dict:
    runs = []
    for _ in range(reps):
        run = {}
        for name in ("mq-1queue", "mq-2queues"):
            lab.point(name)
            pids = lab.pids(name)
            before = lab.queue_table()
            cpu0 = cpu_seconds(pids)
            closed = lab.blast("closed", "--duration", str(duration), "--window",
                               str(2 * WINDOW), "--sources", "8")
            closed["cpu_us_per_packet"] = ((cpu_seconds(pids) - cpu0) * 1e6 / closed["received"]
                                           if closed["received"] else None)
            closed["sender_busy"] = closed["sender_cpu_s"] / duration
            after = lab.queue_table()
            closed["per_queue"] = {q: after[q][7] - before[q][7]
                                   for q in _queue_numbers(lab.queues[name]) if q in after}
            run[name] = closed
        run["ratio"] = run["mq-2queues"]["pps"] / run["mq-1queue"]["pps"]
        runs.append(run)
    return {"runs": runs,
            "pps_1queue_median": _median([r["mq-1queue"]["pps"] for r in runs]),
            "pps_2queues_median": _median([r["mq-2queues"]["pps"] for r in runs]),
            "ratio_median": _median([r["ratio"] for r in runs]),
            "sender_busy_median": _median([r[name]["sender_busy"] for r in runs
                                           for name in ("mq-1queue", "mq-2queues")])}


# ---------------------------------------------------------------- reporting

def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


METRICS = {      # key in the table -> (path in a measurement, better when higher)
    "pps": (("closed", "pps"), True),
    "cpu_us": (("closed", "cpu_us_per_packet"), False),
    "sender_busy": (("closed", "sender_busy"), False),
    "flood_rx_pps": (("flood", "received_pps"), True),
    "flood_sent_pps": (("flood", "sent_pps"), True),
    "queue_dropped": (("flood", "queue_dropped"), False),
    "user_dropped": (("flood", "user_dropped"), False),
    "lat_median_us": (("latency", "median_us"), False),
    "lat_p99_us": (("latency", "p99_us"), False),
}


def summarize(reps: List[Dict[str, dict]], names: List[str]) -> Dict[str, dict]:
    summary: Dict[str, dict] = {}
    for name in names:
        entry: Dict[str, dict] = {}
        for metric, ((part, key), _) in METRICS.items():
            values = [rep[name][part].get(key) for rep in reps if name in rep]
            values = [v for v in values if v is not None]
            ref = reference_of(name)
            ratios = [rep[name][part][key] / rep[ref][part][key] for rep in reps
                      if name in rep and ref in rep
                      and rep[name][part].get(key) is not None
                      and rep[ref][part].get(key)]
            entry[metric] = {"median": _median(values), "min": min(values, default=None),
                             "max": max(values, default=None), "values": values,
                             "ratio_median": _median(ratios),
                             "ratio_min": min(ratios, default=None),
                             "ratio_max": max(ratios, default=None)}
        summary[name] = entry
    return summary


def _fmt(value, digits=0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _percent(share) -> str:
    return "-" if share is None else f"{share:.0%}"


def table(summary: Dict[str, dict], reps: int) -> str:
    head = ("| consumer | packets/s closed loop: median [min-max] | x C | CPU us/packet | x C "
            "| sender busy | flood: received/s (sent/s) | queue / user dropped "
            "| latency median [min-max] us | x C | p99 us |")
    lines = [head, "|" + " --- |" * 11]
    for name, s in summary.items():
        pps, cpu, lat = s["pps"], s["cpu_us"], s["lat_median_us"]
        lines.append(
            f"| {name} | {_fmt(pps['median'])} [{_fmt(pps['min'])}-{_fmt(pps['max'])}] "
            f"| {_fmt(pps['ratio_median'], 2)} "
            f"| {_fmt(cpu['median'], 2)} | {_fmt(cpu['ratio_median'], 2)} "
            f"| {_percent(s['sender_busy']['median'])} "
            f"| {_fmt(s['flood_rx_pps']['median'])} ({_fmt(s['flood_sent_pps']['median'])}) "
            f"| {_fmt(s['queue_dropped']['median'])} / {_fmt(s['user_dropped']['median'])} "
            f"| {_fmt(lat['median'], 1)} [{_fmt(lat['min'], 1)}-{_fmt(lat['max'], 1)}] "
            f"| {_fmt(lat['ratio_median'], 2)} | {_fmt(s['lat_p99_us']['median'], 1)} |")
    lines.append("")
    lines.append(f"Medians of {reps} repetitions; every ratio (x C) is to {REFERENCE} in the "
                 f"same repetition ({NEW}{REFERENCE} for the {NEW} rows, measured with new-flow "
                 "traffic), then the median of those. Sender busy: the closed loop's "
                 "sender and receiver (one thread) as a share of one CPU; near 100% it, not "
                 "the consumer, sets the packets/s, and the consumer's CPU per packet is "
                 "what tells consumers apart.")
    return "\n".join(lines)


def machine() -> dict:
    model = ""
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"nproc": NCPU, "cpu": model, "kernel": platform.release(),
            "python": platform.python_version()}


# ---------------------------------------------------------------- main

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--quick", action="store_true",
                        help=f"fewer consumers ({', '.join(QUICK)}), shorter runs, no extras")
    parser.add_argument("--consumers", help="comma-separated names, in table order: "
                        + ", ".join(CONSUMERS))
    parser.add_argument("--closed", type=float, default=2.0, help="seconds of closed loop")
    parser.add_argument("--flood", type=float, default=1.0, help="seconds of flood")
    parser.add_argument("--latency-count", type=int, default=3000, help="round trips")
    parser.add_argument("--no-reload", action="store_true")
    parser.add_argument("--no-rss", action="store_true")
    parser.add_argument("--no-multiqueue", action="store_true")
    parser.add_argument("--no-tcp", action="store_true",
                        help="skip TCP bulk throughput with and without flow offload")
    parser.add_argument("--json", default=os.path.join(RESULTS, "latest.json"))
    parser.add_argument("--baseline", metavar="DIR",
                        help="also run the ipqd consumers from this source tree (e.g. a "
                        "`git worktree` of an older commit), as base:NAME, for before/after")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench: needs root (namespaces, iptables, NFQUEUE)", file=sys.stderr)
        return 2
    if args.quick:
        args.closed, args.flood, args.latency_count = 1.0, 0.5, 1000
        args.no_reload = args.no_rss = args.no_multiqueue = args.no_tcp = True
    names = list(QUICK if args.quick else CONSUMERS)
    if args.consumers:
        wanted = args.consumers.split(",")
        unknown = [n for n in wanted if n not in CONSUMERS]
        if unknown:
            parser.error(f"unknown consumers {unknown}; known: {', '.join(CONSUMERS)}")
        names = [n for n in CONSUMERS if n in wanted]
    if args.baseline:
        names += [BASE + n for n in names if is_ipqd(n)]
        CONSUMERS.update({BASE + n: CONSUMERS[n] + f" (from {args.baseline})"
                          for n in names if is_ipqd(n)})
    if REFERENCE not in names:
        names.insert(1 if "none" in names else 0, REFERENCE)
    if any(NEW in n for n in names) and NEW + REFERENCE not in names:
        names.insert(next(i for i, n in enumerate(names) if NEW in n), NEW + REFERENCE)
    skipped = build()
    for name, why in skipped.items():
        print(f"bench: skipping {name}: {why}", file=sys.stderr)
    names = [n for n in names if n not in skipped]
    if not args.no_reload and "ipqd-10000" not in names:
        names.append("ipqd-10000")
    extra = {} if args.no_multiqueue else {"mq-1queue": (10, "30"), "mq-2queues": (10, "31:32")}

    def interrupted(signum, _frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGHUP, interrupted)
    result = {"machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "config": {"reps": args.reps, "packet_bytes": PACKET_SIZE, "window": WINDOW,
                         "closed_s": args.closed, "flood_s": args.flood,
                         "latency_count": args.latency_count, "reference": REFERENCE,
                         "consumers": {n: CONSUMERS[n] for n in names}}}
    lab = Lab()
    try:
        started = time.monotonic()
        start_consumers(lab, names, extra, args.baseline)
        result["startup_s"] = round(time.monotonic() - started, 1)
        print(f"bench: {len(names)} consumers bound in {result['startup_s']} s "
              f"(namespace {lab.host.name})", file=sys.stderr)
        reps: List[Dict[str, dict]] = []
        for rep in range(args.reps):
            measured = {}
            for name in names:
                measured[name] = measure(lab, name, args)
                print(f"  rep {rep + 1}/{args.reps} {name:<18} "
                      f"{measured[name]['closed']['pps']:>10,.0f} packets/s  "
                      f"lat {measured[name]['latency']['median_us']:>7.1f} us",
                      file=sys.stderr)
            reps.append(measured)
        result["reps"] = reps
        result["summary"] = summarize(reps, names)
        if not args.no_rss:
            result["rss"] = measure_rss(lab, ["ipqd-10", "ipqd-10000"])
        if not args.no_reload:
            result["reload"] = measure_reload(lab, "ipqd-10000", 3, one_cpu=False)
            result["reload_one_cpu"] = measure_reload(lab, "ipqd-10000", 3, one_cpu=True)
            if not args.no_rss:
                result["rss_after_reloads"] = measure_rss(lab, ["ipqd-10000"])
        if extra:
            result["multiqueue"] = measure_multiqueue(lab, args.reps, args.closed)
    finally:
        lab.close()
    if not args.no_tcp:
        import tcp_offload     # bench/: its own namespaces, after the UDP lab is gone
        result["tcp"] = tcp_offload.run(args.reps, 3.0)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as out:
        json.dump(result, out, indent=1)
    report(result)
    print(f"\nJSON: {args.json}")
    return 0


def report(result: dict) -> None:
    m = result["machine"]
    print(f"\nipqd bench, {m['nproc']} x {m['cpu']}, Linux {m['kernel']}, Python {m['python']}; "
          f"loopback UDP, {result['config']['packet_bytes']}-byte packets, closed-loop window "
          f"{result['config']['window']}\n")
    print(table(result["summary"], result["config"]["reps"]))
    s = result["summary"]
    for prefix in ("", NEW):
        few, many = prefix + "ipqd-10", prefix + "ipqd-10000"
        if few in s and many in s:
            print(f"\n{prefix}10,000 rules vs 10: "
                  f"{s[many]['pps']['median'] / s[few]['pps']['median']:.2f}x packets/s, "
                  f"{s[many]['cpu_us']['median'] / s[few]['cpu_us']['median']:.2f}x CPU/packet")
    for key, when in (("rss", ""), ("rss_after_reloads", ", after the 6 reloads below")):
        for name, r in result.get(key, {}).items():
            print(f"memory {name}{when}: VmRSS {r['rss_mb']:.1f} MB, PSS {r['pss_mb']:.1f} MB "
                  f"over {len(r['processes'])} processes (supervisor, workers)")
    for key, where in (("reload", "load on another CPU"), ("reload_one_cpu", "all on one CPU")):
        if key in result:
            r = result[key]
            control = r.get("control")
            each = ", ".join(f"{x['worst_delay_ms']:.1f}" for x in r["runs"])
            print(f"reload of 10,000 rules ({where}): {r['reload_ms_median']} ms (median of "
                  f"{len(r['runs'])}); worst packet delay during it {r['worst_delay_ms_max']:.1f} ms"
                  f" (each: {each})"
                  + (f"; the same probe without a reload: {control['worst_delay_ms']:.1f} ms"
                     if control else "")
                  + f", probes lost {r['lost']}"
                  + ("" if all(x["probe_covered_reload"] for x in r["runs"])
                     else " (the probe ended before a reload did)"))
    if "tcp" in result:
        import tcp_offload
        tcp_offload.report(result["tcp"])
    if "multiqueue" in result:
        mq = result["multiqueue"]
        print(f"two queues vs one (ipqd, 10 rules, 8 sources): {mq['pps_2queues_median']:,.0f} vs "
              f"{mq['pps_1queue_median']:,.0f} packets/s = {mq['ratio_median']:.2f}x "
              f"(sender busy {_percent(mq.get('sender_busy_median'))} of a CPU; "
              f"{NCPU} CPUs)")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as stop:
        print(f"bench: interrupted ({stop}); everything it made is removed", file=sys.stderr)
        sys.exit(130)
