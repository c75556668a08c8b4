"""TCP bulk throughput through ipqd, with and without flow offload.

    .venv/bin/python bench/tcp_offload.py [--reps 5] [--duration 3]

Also a section of bench/run.py (`--no-tcp` skips it). Two namespaces joined
by a veth (MTU 1500; tests/netns.py's Lab), one TCP connection client ->
server for `duration` seconds (bench/tcpbulk.c), throughput measured at the
receiver. Per repetition, in turn:

- none: no queue rule (the ceiling);
- offload: `ipqd run` with its hooks on the server's input, the flow's rule
  offloadable: after the first packet the kernel accepts the flow itself;
- no-offload: the same policy with `offload: false` on the rule: every
  packet goes through ipqd.

Medians of the repetitions, and each one's ratio to `none` of the same
repetition.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.path.join(ROOT, "bench", "build")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from tests.daemon_harness import RunningIpqd  # noqa: E402
from tests.netns import Lab  # noqa: E402

PORT = 9100
MODES = ("none", "offload", "no-offload")
POLICY = """\
version: 1
queue: {num: 0, copy_range: 128, fail_open: false, bypass: false}
hooks:
  - {chain: input, family: ipv4, proto: tcp}
default: {action: drop, log: false}
rules:
  - {name: bulk, proto: tcp, dport: %d, action: accept, log: false, offload: %s}
"""


def build() -> str:
    source, binary = os.path.join(ROOT, "bench", "tcpbulk.c"), os.path.join(BUILD, "tcpbulk")
    os.makedirs(BUILD, exist_ok=True)
    if not os.path.exists(binary) or os.path.getmtime(binary) < os.path.getmtime(source):
        result = subprocess.run(["gcc", "-O2", "-Wall", "-o", binary, source],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"bench: cannot build tcpbulk:\n{result.stderr}")
    return binary


def transfer(lab: Lab, binary: str, duration: float) -> dict:
    receiver = subprocess.Popen(["ip", "netns", "exec", lab.server.name, binary, "recv",
                                 "--port", str(PORT)], stdout=subprocess.PIPE, text=True)
    try:
        receiver.stdout.readline()                       # listening
        sender = subprocess.run(["ip", "netns", "exec", lab.client.name, binary, "send",
                                 "--dst", lab.SERVER4, "--port", str(PORT),
                                 "--duration", str(duration)],
                                capture_output=True, text=True, timeout=duration + 60)
        if sender.returncode != 0:
            raise SystemExit(f"bench: tcpbulk send failed: {sender.stderr.strip()}")
        out, _ = receiver.communicate(timeout=60)
        return json.loads(out)
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()


def ipqd_packets(ipqd: RunningIpqd) -> Optional[int]:
    mark = len(ipqd.lines)
    ipqd.signal(signal.SIGUSR1)
    line = ipqd.wait_for(lambda l: l.startswith("stats: "), start=mark)
    fields = dict(kv.split("=") for kv in line.split()[1:])
    return int(fields["packets"]) if "packets" in fields else None


def measure(lab: Lab, binary: str, mode: str, duration: float, tmp: str) -> dict:
    if mode == "none":
        return transfer(lab, binary, duration)
    path = os.path.join(tmp, f"{mode}.yaml")
    with open(path, "w") as out:
        out.write(POLICY % (PORT, "true" if mode == "offload" else "false"))
    os.chmod(path, 0o644)
    ipqd = RunningIpqd(lab.server, path, os.path.join(tmp, f"{mode}.state"),
                       "--backend", "iptables-legacy")
    try:
        run = transfer(lab, binary, duration)
        run["ipqd_packets"] = ipqd_packets(ipqd)
        return run
    finally:
        ipqd.stop()


def run(reps: int, duration: float, progress=sys.stderr) -> dict:
    """Every mode once per repetition; medians and ratios to `none`."""
    binary = build()
    lab = Lab()
    tmp = tempfile.mkdtemp(prefix=f"ipqd-tcp-{os.getpid()}-")
    runs: List[Dict[str, dict]] = []
    try:
        for rep in range(reps):
            measured = {}
            for mode in MODES:
                measured[mode] = measure(lab, binary, mode, duration, tmp)
                print(f"  tcp rep {rep + 1}/{reps} {mode:<11} "
                      f"{measured[mode]['mbit_s']:>9,.0f} Mbit/s", file=progress)
            runs.append(measured)
    finally:
        lab.close()
        subprocess.run(["rm", "-rf", tmp])
    summary = {}
    for mode in MODES:
        rates = [r[mode]["mbit_s"] for r in runs]
        ratios = [r[mode]["mbit_s"] / r["none"]["mbit_s"] for r in runs if r["none"]["mbit_s"]]
        packets = [r[mode].get("ipqd_packets") for r in runs if r[mode].get("ipqd_packets")]
        summary[mode] = {"mbit_s_median": statistics.median(rates), "min": min(rates),
                         "max": max(rates), "ratio_median": statistics.median(ratios),
                         "ipqd_packets_median": statistics.median(packets) if packets else None}
    return {"duration_s": duration, "reps": reps, "runs": runs, "summary": summary}


def report(result: dict) -> None:
    print(f"\nTCP bulk over a veth, {result['duration_s']:g} s per transfer, medians of "
          f"{result['reps']}:")
    print("| mode | Mbit/s | [min-max] | x no queue | packets ipqd saw |")
    print("| --- | --- | --- | --- | --- |")
    for mode, s in result["summary"].items():
        seen = "-" if s["ipqd_packets_median"] is None else f"{s['ipqd_packets_median']:,.0f}"
        print(f"| {mode} | {s['mbit_s_median']:,.0f} | [{s['min']:,.0f}-{s['max']:,.0f}] | "
              f"{s['ratio_median']:.2f} | {seen} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per transfer")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench: needs root (namespaces, iptables, NFQUEUE)", file=sys.stderr)
        return 2
    result = run(args.reps, args.duration)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=1)
    report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
