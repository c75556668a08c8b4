"""The daemon's control commands (docs/control.md): what `ipqd status`,
`counters`, `metrics` and `reload` ask, answered from the supervisor.

COMMANDS is the table the supervisor serves (ipqd.control.commands): a
name -> Command(handler, changes, summary). Each handler is
`handler(daemon, args, peer) -> dict`, run in the supervisor's loop, never
in a worker, and raises ControlError (code, message) to refuse. Another
module adds its commands to the table, e.g. `COMMANDS.update(SET_COMMANDS)`.

Figures are fresh: `snapshot` asks every worker over its Channel
(AskCounters, answered between two receive rounds, never in the middle of
one), waiting at most ASK_WITHIN; a worker that does not answer in time is
shown with its latest once-a-second report, marked `"fresh": false`.
Requests within ASK_AGAIN_AFTER of an ask share its answers.
"""
from __future__ import annotations

import os
import time
from typing import Callable, Dict, List, Optional

from ipqd.control.commands import Command, CommandTable, Peer, argument, no_arguments
from ipqd.daemon.messages import Counters
from ipqd.daemon.sets import SET_COMMANDS
from ipqd.decision.compiler import UNDECIDABLE_NAME
from ipqd.errors import ControlError
from ipqd.kernel.queue_socket import queue_counts

ASK_WITHIN = 1.0        # seconds a status waits for the workers' own figures
ASK_AGAIN_AFTER = 0.25  # readers within this share one ask: a flood of requests from
                        # any local user costs the workers at most 4 asks a second

_RULE_ZERO = {"hits": 0, "accepted": 0, "dropped": 0, "bytes": 0}

# More figures for status and metrics, by key: key -> figures(daemon). "sets"
# ({set name: entries}) is shown by `ipqd status` and exported as
# ipqd_set_entries{set=...}.
EXTRA_FIGURES: Dict[str, Callable[[object], object]] = {}


def merge_counters(answers: Dict[int, Counters]) -> Dict[str, Dict[str, int]]:
    """Every worker's per-rule counts added up: rule name -> hits, accepted,
    dropped, in rule order, then "default" and the undecidable action's
    (the latter only when it decided something)."""
    rules: Dict[str, Dict[str, int]] = {}
    for answer in answers.values():
        named = list(answer.counters["rules"].items()) + [
            ("default", answer.counters["default"]),
            (UNDECIDABLE_NAME, answer.counters.get("undecidable", _RULE_ZERO))]
        for name, entry in named:
            total = rules.setdefault(name, dict(_RULE_ZERO))
            for key in total:
                total[key] += entry.get(key, 0)     # no bytes from an older worker
    if not rules.get(UNDECIDABLE_NAME, _RULE_ZERO)["hits"]:
        rules.pop(UNDECIDABLE_NAME, None)
    return rules


def offload_slots(answers: Dict[int, Counters]) -> dict:
    """{"rules": rule name -> its offload slot value, "other": the value
    shared by everything without a slot of its own, "mixed": the values a
    reload gave to another rule} (ipqd.policy.offload, Matcher.slot_mixed),
    as the workers' compiled policy has them (the same in every worker once
    a reload is done)."""
    slots: dict = {"rules": {}, "other": 0, "mixed": []}
    for answer in answers.values():
        slots["rules"].update(answer.counters.get("offload_slots", {}))
        slots["other"] = answer.counters.get("offload_other", slots["other"])
        slots["mixed"] = sorted(set(slots["mixed"]) | set(answer.counters.get("offload_mixed", ())))
    return slots


def netns() -> str:
    """This process's network namespace, e.g. "net:[4026531840]"."""
    try:
        return os.readlink("/proc/self/ns/net")
    except OSError:
        return ""


def snapshot(daemon, kernel: Optional[dict] = None) -> dict:
    """The daemon's figures now: policy, workers, packets, cache, log,
    kernel queues, reloads, control (the answer to `status`), plus "rules"
    (per-rule counts) and "per_worker" (each worker's totals).

    The kernel's queue table is readable by root only: under the unit the
    daemon cannot read it, and "kernel" is {} unless a root client in the
    same network namespace read it (`kernel`, a metrics request's)."""
    asked, answers = daemon.counters_asked
    if time.monotonic() - asked >= ASK_AGAIN_AFTER:
        answers = daemon.pool.ask_counters(ASK_WITHIN)
        daemon.counters_asked = (time.monotonic(), answers)
    workers, per_worker, totals = [], {}, {}
    for index, handle in sorted(daemon.workers.items()):
        answer = answers.get(index)
        stats = answer.stats if answer is not None else handle.stats
        per_worker[index] = stats
        for key, value in stats.items():
            totals[key] = totals.get(key, 0) + value
        workers.append({"slot": index, "pid": handle.process.pid,
                        "queues": sorted(handle.queues), "fresh": answer is not None})
    bound = {q for h in daemon.workers.values() for q in h.queues}
    kernel = queue_counts(bound) or _given_kernel(kernel or {}, bound)
    hits, misses = totals.get("cache_hits", 0), totals.get("cache_misses", 0)
    now = time.monotonic()
    figures = {
        "policy": {"path": daemon.path, "digest": daemon.policy_digest, "rules": daemon.rules,
                   "loaded_at": daemon.policy_loaded_at},
        "pid": os.getpid(),
        "netns": netns(),
        "started_at": daemon.started_at,
        "uptime": round(now - daemon.started, 3),
        "workers": workers,
        "packets": {"judged": totals.get("packets", 0), "accepted": totals.get("accepted", 0),
                    "dropped": totals.get("dropped", 0),
                    "offloaded": totals.get("offloaded", 0),
                    "malformed": totals.get("malformed", 0), "errors": totals.get("errors", 0)},
        "cache": {"hits": hits, "misses": misses,
                  "hit_ratio": round(hits / (hits + misses), 4) if hits + misses else 0.0},
        "log": {"logged": totals.get("log_logged", 0),
                "suppressed": totals.get("log_suppressed", 0),
                "overflowed": totals.get("log_overflowed", 0),
                "failed": totals.get("log_failed", 0)},
        "kernel": kernel,
        "reloads": {"loaded": daemon.reloads, "failed": daemon.failed_reloads,
                    "last": daemon.last_reload},
        "control": dict(daemon.control.counts) if daemon.control else {},
        "sets": {s["set"]: s["size"] for s in daemon.sets.summary()},
        "rules": merge_counters(answers),
        "offload_slots": offload_slots(answers),
        "per_worker": {str(k): v for k, v in per_worker.items()},
    }
    shadow = daemon.policy.shadow if daemon.policy is not None else None
    if shadow is not None:
        figures["shadow"] = {"path": shadow.path, "digest": shadow.digest,
                             "decided": totals.get("shadow_decided", 0),
                             "disagreed": totals.get("shadow_disagreed", 0)}
    for key, figure in EXTRA_FIGURES.items():
        figures[key] = figure(daemon)
    return figures


# ---------------------------------------------------------------- handlers

def status(daemon, args: dict, peer: Peer) -> dict:
    no_arguments(args, "status")
    figures = snapshot(daemon)
    del figures["rules"], figures["per_worker"], figures["offload_slots"]
    return figures


def counters(daemon, args: dict, peer: Peer) -> dict:
    """Per rule: packets decided, accepted, dropped, and their bytes
    (ipqd's own count), with each rule's offload slot: flows the kernel
    holds after an offload are counted by the kernel's rules per slot, which
    `ipqd counters` reads and adds (the daemon under its unit cannot)."""
    rule = argument(args, "rule", str, None)
    figures = snapshot(daemon)
    rules, slots = figures["rules"], figures["offload_slots"]
    if rule is not None:
        if rule not in rules:
            raise ControlError("bad-arguments", f"no rule {rule!r} in the running policy "
                               f"(rules: {', '.join(rules)})")
        rules = {rule: rules[rule]}
    return {"rules": [dict(name=name, **entry) for name, entry in rules.items()],
            "offload_slots": slots, "netns": netns()}


def metrics(daemon, args: dict, peer: Peer) -> dict:
    """args: "format" (FORMATS), "kernel" (the kernel's queue table as read
    by the client, used when the daemon cannot read it)."""
    from ipqd.daemon.metrics import FORMATS, exposition
    kind = argument(args, "format", str, "prometheus")
    if kind not in FORMATS:
        raise ControlError("bad-arguments", f"format {kind!r}: expected one of "
                           f"{', '.join(FORMATS)}")
    kernel = argument(args, "kernel", dict, {})
    return {"format": kind, "text": exposition(snapshot(daemon, kernel), kind)}


def _given_kernel(kernel: dict, bound) -> Dict[str, dict]:
    """A client's reading of the kernel's queue table, checked: only the
    daemon's queues, only the four counts, as integers."""
    rows: Dict[str, dict] = {}
    for queue, row in kernel.items():
        if not (isinstance(queue, str) and queue.isdigit() and int(queue) in bound
                and isinstance(row, dict)):
            raise ControlError("bad-arguments", f"kernel: {queue!r} is not one of the "
                               "daemon's queues")
        try:
            rows[queue] = {key: int(row[key]) for key in
                           ("queued", "queue_dropped", "user_dropped", "portid")}
        except (KeyError, TypeError, ValueError):
            raise ControlError("bad-arguments", f"kernel: queue {queue}: expected queued, "
                               "queue_dropped, user_dropped, portid as integers")
    return rows


def reload(daemon, args: dict, peer: Peer) -> dict:
    """Load the policy now; the answer comes once it is live, or carries
    every line of why it was refused (the running policy stays)."""
    no_arguments(args, "reload")
    outcome = daemon.reload()
    if outcome["outcome"] != "loaded":
        errors: List[str] = outcome["errors"] or [f"reload {outcome['outcome']}"]
        raise ControlError("refused", f"the policy was not loaded ({outcome['outcome']}); "
                           f"the running policy ({daemon.rules} rules) stays", errors)
    return {"outcome": "loaded", "rules": daemon.rules, "digest": daemon.policy_digest,
            "took": outcome["took"], "warnings": outcome["warnings"]}


def commands(daemon, args: dict, peer: Peer) -> dict:
    return {"commands": [{"name": name, "changes": c.changes, "summary": c.summary}
                         for name, c in sorted(COMMANDS.items())],
            "you": {"uid": peer.uid, "may_change": peer.may_change}}


COMMANDS: CommandTable = {
    "commands": Command(commands, False, "the commands this daemon answers"),
    "status": Command(status, False, "policy, workers, packets, kernel queues, reloads"),
    "counters": Command(counters, False, "per-rule packets (args: rule)"),
    "metrics": Command(metrics, False, "the figures as Prometheus or OpenMetrics text"),
    "reload": Command(reload, True, "load the policy; answers once it is live or refused"),
}
COMMANDS.update(SET_COMMANDS)       # set-add, set-del, set-flush, set-list (ipqd.daemon.sets)
