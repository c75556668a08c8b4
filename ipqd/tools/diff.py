"""`ipqd diff OLD NEW`: every region of packet space the two policies treat
differently, from their rules (ipqd.policy.regions), not from samples.

Each region is one line: a witness packet in explain's description, what
OLD does to it and what NEW does, with the deciding rules and where they
are written; then the fields that set the region apart. Afterwards, what
the regions cannot say exactly is named: rules with a rate (whether they
match depends on their tokens), interface globs (compared on sample
names), and settings that change which packets are queued or how cut ones
are decided. `--pcap FILE` also replays a capture through both policies
and counts the packets and connections whose verdict would change.

Exit statuses (ipqd.exits, as diff(1)): 0 no packet is treated
differently; 1 some are; 2 usage, or a policy is invalid; 3 a policy or
the capture cannot be read; 4 the regions are too many to compute.
"""
from __future__ import annotations

import json
import os
import sys
from typing import List, Optional, TextIO

from ipqd.console import error_line
from ipqd.decision.compiler import compile_policy
from ipqd.decision.conntrack import Tracker
from ipqd.decision.packet import PacketMeta, parse
from ipqd.errors import CaptureError, NotIP, PolicyErrors
from ipqd.exits import EXIT_CHANGED, EXIT_FAILED, EXIT_OK, EXIT_UNREADABLE, EXIT_USAGE
from ipqd.policy import regions
from ipqd.policy.model import HOOKS, Policy
from ipqd.printable import clean
from ipqd.tools.pcap import ip_payload, read_capture

__all__ = ["run_diff", "describe_outcome"]


def run_diff(args, out: Optional[TextIO] = None) -> int:
    out = out or sys.stdout
    try:
        return _run(args, out)
    except BrokenPipeError:         # `| head`: the reader has what it wanted
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, out.fileno())      # the interpreter's last flush stays quiet
            os.close(devnull)
        except (OSError, ValueError, AttributeError):
            pass
        return EXIT_OK


def _run(args, out: TextIO) -> int:
    from ipqd.policy.loader import load
    policies = []
    for path in (args.old, args.new):
        try:
            policies.append(load(path))
        except PolicyErrors as errors:
            for problem in errors.errors:
                error_line(str(problem))
            error_line(f"ipqd diff: {path} is not a valid policy (`ipqd check {path}`)")
            return EXIT_USAGE
        except OSError as error:
            error_line(f"ipqd diff: cannot read {error.filename or path}: "
                       f"{error.strerror or error}")
            return EXIT_UNREADABLE
    old, new = policies
    try:
        space, changes = regions.diff(old, new)
    except regions.TooLarge as error:
        error_line(f"ipqd diff: {error} (at most {regions.MAX_CUBES} cubes); compare smaller "
                   f"policies, or fragments of them")
        return EXIT_FAILED
    conntrack = old.queue.conntrack or new.queue.conntrack
    changes.sort(key=lambda c: (space.witness(c.cube) is None, c.old, c.new))
    notes = inexact(old, new, space, changes)
    counts = None
    if args.pcap:
        counts = replay(old, new, args.pcap)
        if isinstance(counts, int):
            return counts
    if args.json:
        out.write(json.dumps({
            "old": old.path, "new": new.path, "changed": bool(changes),
            "regions": [_region_json(space, old, new, c, conntrack) for c in changes],
            "inexact": notes, "pcap": counts}) + "\n")
    else:
        groups = _grouped(space, changes, conntrack)
        for group in groups:
            witness, where, change, kinds = group
            out.write(clean(f"{witness}: {describe_outcome(old, change.old)} -> "
                            f"{describe_outcome(new, change.new)}") + "\n")
            also = f" (packets of {', '.join(kinds)})" if len(kinds) > 1 else ""
            out.write(clean(f"    where {where}{also}") + "\n")
        if not changes:
            out.write(clean(f"{old.path} -> {new.path}: no packet is decided differently") + "\n")
        else:
            shown = f", shown as {len(groups)}" if len(groups) != len(changes) else ""
            out.write(clean(f"{old.path} -> {new.path}: {len(changes)} region"
                            f"{'s' if len(changes) != 1 else ''} decided differently"
                            f"{shown}") + "\n")
        for note in notes:
            out.write(clean(f"not exact: {note}") + "\n")
        if counts is not None:
            out.write(clean(f"{args.pcap}: {counts['packets_changed']} of {counts['packets']} "
                            f"packets and {counts['flows_changed']} of {counts['flows']} "
                            f"connections would be decided differently") + "\n")
    changed = bool(changes) or bool(counts and counts["packets_changed"])
    return EXIT_CHANGED if changed else EXIT_OK


def _grouped(space: regions.Space, changes, conntrack: bool) -> list:
    """The regions with the same outcomes and the same narrowing, one line
    each: the first one's witness, and the kinds of packet (family and
    protocol, from each one's witness) they span. Ordered as `changes`."""
    groups: dict = {}
    for change in changes:
        where = space.describe(change.cube, change.shape)
        witness = space.witness(change.cube, conntrack)
        key = (change.old, change.new, where)
        if key not in groups:
            groups[key] = [witness or "malformed packets", where, change, []]
        kind = _kind(witness)
        if kind not in groups[key][3]:
            groups[key][3].append(kind)
    return list(groups.values())


def _kind(witness: Optional[str]) -> str:
    """`tcp over ipv4` from a witness; `malformed` without one."""
    if witness is None:
        return "malformed"
    words = witness.split()
    return f"{words[0]} over ipv{6 if '::' in words[1] or words[1].count(':') > 1 else 4}"


def describe_outcome(policy: Policy, outcome: regions.Outcome) -> str:
    """`drop (no-telnet)`, `accept mark 0x10 (web)`, `drop (default)`; rules
    with a rate first: `accept (ssh-limit, within 10/second) else drop (default)`."""
    parts = []
    for index in outcome.rated + (outcome.final,):
        if index < 0:
            d = policy.default
            text = f"{d.action}{_mark(d.action, d.set_mark)} (default)"
        else:
            rule = policy.rules[index]
            where = f" at {rule.position.path}:{rule.position.line}" if rule.position else ""
            rate = f", within {rule.rate.text or rule.rate.per_second}" if rule.rate else ""
            if rule.time is not None:
                rate += ", within its time window"
            if rule.match.cgroup:
                rate += f", from cgroup {' or '.join(sorted(rule.match.cgroup))}"
            log = rule.log if rule.log is not None else policy.default.log
            text = (f"{rule.action}{_mark(rule.action, rule.set_mark)}"
                    f"{' log' if log and not policy.default.log else ''}"
                    f"{' nolog' if not log and policy.default.log else ''} "
                    f"({rule.name}{where}{rate})")
        parts.append(text)
    if outcome.final < 0 and policy.default.log:
        parts[-1] = parts[-1][:-1] + ", logged)"
    # an `action: log` rule decides nothing: the next one decides
    text = parts[0]
    for index, part in zip(outcome.rated + (outcome.final,), parts[1:]):
        logs = index >= 0 and policy.rules[index].action == "log"
        text += (", then " if logs else " else ") + part
    return text


def _mark(action: str, mark: Optional[int]) -> str:
    return f" mark {mark:#x}" if action == "accept" and mark is not None else ""


def inexact(old: Policy, new: Policy, space: regions.Space, changes) -> List[str]:
    """What the regions cannot decide exactly, named."""
    notes = []
    for policy in (old, new):
        for rule in policy.rules:
            if rule.rate is not None:
                notes.append(f"{policy.path}: rule \"{rule.name}\" matches only within its rate "
                             f"({rule.rate.text or rule.rate.per_second}): regions where it may "
                             f"decide show it first, with what decides past its rate")
            if rule.time is not None:
                notes.append(f"{policy.path}: rule \"{rule.name}\" matches only within its "
                             f"time window: regions where it may decide show it first, with "
                             f"what decides outside it")
            if rule.match.cgroup:
                notes.append(f"{policy.path}: rule \"{rule.name}\" matches only packets of "
                             f"the cgroups it names, which no header says: regions where it "
                             f"may decide show it first")
            dynamic = sorted(rule.match.dynamic_sets())
            if dynamic:
                notes.append(f"{policy.path}: rule \"{rule.name}\" reads the dynamic set"
                             f"{'s' if len(dynamic) > 1 else ''} "
                             f"{', '.join('@' + n for n in dynamic)}, whose entries change "
                             f"at run time (`ipqd set`): the regions take "
                             f"{'them' if len(dynamic) > 1 else 'it'} as empty")
    notes += space.approximate
    if old.hooks != new.hooks:
        notes.append("hooks: the packets queued to ipqd change (the kernel decides the others); "
                     "the regions compare only packets both policies are given")
    for setting in ("copy_range", "undecidable"):
        a, b = getattr(old.queue, setting), getattr(new.queue, setting)
        if a != b:
            notes.append(f"queue.{setting}: {a} -> {b}: packets whose copy hides fields the "
                         f"rules read are decided by what the copy shows; the regions compare "
                         f"whole packets")
    if old.queue.conntrack != new.queue.conntrack:
        notes.append(f"queue.conntrack: {old.queue.conntrack} -> {new.queue.conntrack}: packets "
                     f"carry ct_state only with conntrack; the regions take it as given")
    return notes


def _region_json(space, old, new, change, conntrack: bool) -> dict:
    def side(policy, outcome):
        out = []
        for index in outcome.rated + (outcome.final,):
            rule = policy.rules[index] if index >= 0 else None
            out.append({"rule": rule.name if rule else None,
                        "position": str(rule.position) if rule and rule.position else None,
                        "action": rule.action if rule else policy.default.action,
                        "rate": (rule.rate.text or rule.rate.per_second)
                        if rule and rule.rate else None})
        return out
    return {"witness": space.witness(change.cube, conntrack),
            "where": space.describe(change.cube, change.shape),
            "old": side(old, change.old), "new": side(new, change.new)}


def replay(old: Policy, new: Policy, path: str):
    """Counts of a capture's packets and connections whose decision (verdict,
    mark, log) changes; an exit status when it cannot be read."""
    before, after = compile_policy(old), compile_policy(new)
    tracker = Tracker() if old.queue.conntrack or new.queue.conntrack else None
    base = PacketMeta(hook=HOOKS["input"])
    counts = {"packets": 0, "packets_changed": 0}
    flows, changed_flows = set(), set()
    try:
        with open(path, "rb") as f:
            for frame in read_capture(f):
                try:
                    ip = ip_payload(frame)
                except NotIP:
                    continue
                meta = base._replace(wire_len=ip.wire_len, family=ip.family)
                shown = parse(ip.payload, meta)
                if tracker is not None:
                    meta = meta._replace(ct_state=tracker.track(shown, ip.payload,
                                                                frame.timestamp))
                a = before.decide(parse(ip.payload, meta, before.fields), frame.timestamp)
                b = after.decide(parse(ip.payload, meta, after.fields), frame.timestamp)
                ends = sorted([(shown.src, shown.sport), (shown.dst, shown.dport)],
                              key=lambda e: (e[0] or 0, e[1] or 0))
                flow = (shown.family, shown.proto, *ends)
                flows.add(flow)
                counts["packets"] += 1
                if (a.action, a.mark, a.log) != (b.action, b.mark, b.log):
                    counts["packets_changed"] += 1
                    changed_flows.add(flow)
    except CaptureError as error:
        error_line(f"ipqd diff: {path}: capture damaged: {error}")
        return EXIT_USAGE
    except OSError as error:
        error_line(f"ipqd diff: cannot read capture {path}: {error.strerror or error}")
        return EXIT_UNREADABLE
    counts["flows"] = len(flows)
    counts["flows_changed"] = len(changed_flows)
    return counts
