"""`ipqd status`, `counters`, `metrics` and `reload`: ask the daemon over
its control socket (ipqd.control.client) and print the answer.

Exit statuses (ipqd.exits): 0 done; 1 a reload refused (its errors
printed); 4 the daemon is not running, does not answer, or refused the
request (a one-line reason on stderr).
"""
from __future__ import annotations

import json
import os
import time
from typing import Dict, List, Optional, Tuple

from ipqd.console import LOG_WARNING, error_line
from ipqd.control.client import call
from ipqd.errors import ControlError
from ipqd.exits import EXIT_FAILED, EXIT_INVALID, EXIT_OK
from ipqd.kernel.hooks import remembered
from ipqd.kernel.offload_counters import read as read_offload_counts
from ipqd.kernel.queue_socket import queue_counts

RELOAD_TIMEOUT = 120.0      # the loading process has 60 s, the hand-over as long again


def _ask(args, command: str, request_args=None, timeout: float = 10.0):
    """The result, or None after the reason was said on stderr."""
    try:
        return call(args.control, command, request_args, timeout)
    except ControlError as error:
        error_line(f"ipqd {command}: {error.message}")
        for line in error.details:
            error_line(line)
        return error


def own_kernel_rows(netns: str, queues) -> dict:
    """The kernel's queue table for `queues`, read by this command: the
    daemon under its unit cannot (the table is root's), a root client in
    the same network namespace can. {} otherwise."""
    try:
        if not netns or os.readlink("/proc/self/ns/net") != netns:
            return {}
    except OSError:
        return {}
    return queue_counts(queues)


def run_status(args) -> int:
    result = _ask(args, "status")
    if isinstance(result, ControlError):
        return EXIT_FAILED
    if not result["kernel"]:
        result["kernel"] = own_kernel_rows(result.get("netns", ""),
                                           {q for w in result["workers"] for q in w["queues"]})
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print("\n".join(status_lines(result)))
    return EXIT_OK


def status_lines(s: dict) -> List[str]:
    """`ipqd status` for a person."""
    p, k, c, log = s["policy"], s["packets"], s["cache"], s["log"]
    lines = [
        f"ipqd is running: pid {s['pid']}, up {_duration(s['uptime'])}",
        f"policy:   {p['path']} ({p['rules']} rules), loaded {_when(p['loaded_at'])}, "
        f"digest sha256:{p['digest'][:16]}",
        "workers:  " + "; ".join(f"slot {w['slot']} pid {w['pid']} queues "
                                 f"{','.join(map(str, w['queues']))}"
                                 + ("" if w["fresh"] else " (not answering: last report)")
                                 for w in s["workers"]),
        f"packets:  {k['judged']} judged, {k['accepted']} accepted, {k['dropped']} dropped, "
        f"{k['offloaded']} offloaded, {k['malformed']} malformed",
        f"cache:    {c['hit_ratio'] * 100:.1f}% hits ({c['hits']} of {c['hits'] + c['misses']})",
        f"log:      {log['logged']} decisions logged, {log['suppressed']} suppressed by the "
        f"rate, {log['overflowed'] + log['failed']} lost",
    ]
    for queue, q in sorted(s["kernel"].items(), key=lambda item: int(item[0])):
        lines.append(f"kernel:   queue {queue}: {q['queued']} queued, {q['queue_dropped']} "
                     f"queue-dropped, {q['user_dropped']} user-dropped")
    if not s["kernel"]:
        lines.append("kernel:   the queue counters are root's: run `ipqd status` as root, in "
                     "the daemon's network namespace")
    r = s["reloads"]
    last = r["last"]
    text = f"reloads:  {r['loaded']} loaded, {r['failed']} failed"
    if last:
        text += f"; the last at {_when(last['at'])}: {last['outcome']}"
    lines.append(text)
    if last and last["errors"]:
        lines += [f"          {line}" for line in last["errors"]]
    shadow = s.get("shadow")
    if shadow:
        lines.append(f"shadow:   {shadow['path']} (digest sha256:{shadow['digest'][:16]}): "
                     f"{shadow['disagreed']} of {shadow['decided']} decisions differ")
    for name, size in sorted(s.get("sets", {}).items()):
        lines.append(f"set:      {name}: {size} entries")
    return lines


def run_counters(args) -> int:
    result = _ask(args, "counters", {"rule": args.rule} if args.rule else {})
    if isinstance(result, ControlError):
        return EXIT_FAILED if result.code != "bad-arguments" else EXIT_INVALID
    kernel, note = offloaded_counts(result.get("netns", ""), args.state_dir)
    merged = merge_offloaded(result["rules"], result.get("offload_slots") or {}, kernel,
                             whole=not args.rule)
    merged["kernel"] = note
    if args.json:
        print(json.dumps(merged, indent=2))
        return EXIT_OK
    print("\n".join(counters_lines(merged)))
    return EXIT_OK


def merge_offloaded(rules: List[dict], slots: dict, kernel: Optional[dict],
                    whole: bool = True) -> dict:
    """One total per rule: ipqd's own count (`rules`, the daemon's answer)
    plus the kernel's count of the flows the rule offloaded (`kernel`,
    ipqd.kernel.offload_counters: (slot, verdict) -> (packets, bytes); None
    when unread), by the daemon's slot table `slots` ({"rules": name ->
    value, "other": value}). Kernel counts no single rule owns (the "other"
    value, 0, a value no rule has now, or one a reload gave to another
    rule since the hooks were installed) go to "offloaded_other" (with
    `whole`: the answer covers every rule)."""
    other, mixed = slots.get("other", 0), set(slots.get("mixed", ()))
    by_value = {value: name for name, value in slots.get("rules", {}).items()
                if value and value != other and value not in mixed}
    owned: Dict[str, Dict[str, int]] = {}
    rest = {"packets": 0, "bytes": 0}
    for (value, verdict), (packets, size) in sorted((kernel or {}).items()):
        name = by_value.get(value)
        into = rest if name is None else owned.setdefault(
            name, {"packets": 0, "bytes": 0, "accepted": 0, "dropped": 0})
        into["packets"] += packets
        into["bytes"] += size
        if name is not None:
            into["accepted" if verdict == "accept" else "dropped"] += packets
    out = []
    for r in rules:
        k = owned.get(r["name"])
        ipqd = {"packets": r["hits"], "bytes": r.get("bytes", 0)}
        row = {"name": r["name"],
               "packets": ipqd["packets"] + (k["packets"] if k else 0),
               "bytes": ipqd["bytes"] + (k["bytes"] if k else 0),
               "accepted": r["accepted"] + (k["accepted"] if k else 0),
               "dropped": r["dropped"] + (k["dropped"] if k else 0),
               "ipqd": ipqd,
               "kernel": None if kernel is None else
               {"packets": k["packets"] if k else 0, "bytes": k["bytes"] if k else 0},
               "slot": slots.get("rules", {}).get(r["name"])}
        out.append(row)
    answer: dict = {"rules": out}
    if whole:
        answer["offloaded_other"] = rest if kernel is not None else None
    return answer


def counters_lines(merged: dict) -> List[str]:
    """`ipqd counters` for a person."""
    rules = merged["rules"]
    width = max([len(r["name"]) for r in rules] + [4])
    lines = [f"{'rule':<{width}}  {'packets':>12}  {'bytes':>14}  {'accepted':>12}  "
             f"{'dropped':>12}  {'by the kernel':>13}"]
    for r in rules:
        kernel = "-" if r["kernel"] is None else str(r["kernel"]["packets"])
        lines.append(f"{r['name']:<{width}}  {r['packets']:>12}  {r['bytes']:>14}  "
                     f"{r['accepted']:>12}  {r['dropped']:>12}  {kernel:>13}")
    other = merged.get("offloaded_other")
    if other and other["packets"]:
        lines.append(f"offloaded flows no single rule owns (past the rule slots, offloaded by "
                     f"two rules, or by a rule a reload renamed or moved): {other['packets']} "
                     f"packets, {other['bytes']} bytes")
    if merged.get("kernel") != "counted":
        lines.append(f"kernel: {merged['kernel']}")
    return lines


def offloaded_counts(netns: str, state_dir: str) -> Tuple[Optional[dict], str]:
    """The kernel's counts of offloaded flows per slot
    (ipqd.kernel.offload_counters) and "counted", or None and why not: they
    are read by this command as root, in the daemon's network namespace,
    with the hooks' backend noted in `state_dir`."""
    try:
        if os.geteuid() != 0 or not netns or os.readlink("/proc/self/ns/net") != netns:
            return None, ("offloaded flows not counted: the kernel's counters are root's; run "
                          "`ipqd counters` as root, in the daemon's network namespace")
    except OSError:
        return None, "offloaded flows not counted: the network namespace cannot be read"
    backend = remembered(state_dir)
    if backend is None:
        return None, ("offloaded flows not counted: no hooks installed by ipqd "
                      f"(none noted in {state_dir})")
    counts = read_offload_counts(backend)
    if counts is None:
        return None, f"offloaded flows not counted: the {backend} tools could not be run"
    return counts, "counted"


def run_metrics(args) -> int:
    request = {"format": "openmetrics" if args.openmetrics else "prometheus"}
    status = _ask(args, "status")           # which queues, where, and whether it reads them
    if isinstance(status, ControlError):
        return EXIT_FAILED
    if not status["kernel"]:
        request["kernel"] = own_kernel_rows(status.get("netns", ""),
                                            {q for w in status["workers"] for q in w["queues"]})
    result = _ask(args, "metrics", request)
    if isinstance(result, ControlError):
        return EXIT_FAILED
    print(result["text"], end="")
    return EXIT_OK


def run_reload(args) -> int:
    result = _ask(args, "reload", timeout=args.timeout)
    if isinstance(result, ControlError):
        return EXIT_INVALID if result.code == "refused" else EXIT_FAILED
    for warning in result["warnings"]:
        error_line(warning, LOG_WARNING)
    print(f"reloaded: {result['rules']} rules live in {result['took'] * 1000:.0f} ms")
    return EXIT_OK


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "min"), (seconds, "s")]
    shown = [f"{n}{unit}" for n, unit in parts if n] or ["0s"]
    return " ".join(shown[:2])


def _when(stamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp)) if stamp else "never"
