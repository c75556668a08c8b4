"""`ipqd explain`: the verdict a policy gives to captured or described packets.

Every packet goes through the daemon's own path: `ipqd.decision.packet.parse` with the
fields the compiled policy needs, then `Matcher.decide`. A described packet
("tcp 10.0.0.5:40000 -> 10.0.0.1:22 syn") is first built into real bytes
(ipqd.decision.described: headers, lengths, checksums); a capture is read with `ipqd.tools.pcap`.

When the policy turns conntrack on, each packet carries the ct_state the
daemon would get from the kernel: for a capture, `ipqd.decision.conntrack`
follows its connections packet by packet; a described packet is a lone one
(`new`, or whatever `--ct-state` or `ct=` says).

A capture streams: each packet's line (or JSON object) is written as it is
decided, the summary at the end, in memory that does not grow with the
capture. --json writes JSON Lines: one object per packet ("type": "packet"),
then one summary ("type": "summary"). A closed stdout (`| head`) ends the
command quietly, with status 0.

Exit statuses (ipqd.exits): 0 done; 1 an invalid policy, description or
damaged capture; 2 usage; 3 the policy or the capture cannot be read. Text
output escapes rule names, paths and error texts (ipqd.printable); errors go
to stderr through ipqd.console.error_line; JSON escapes itself.
"""
from __future__ import annotations

import datetime
import json
import os
import sys
import time
import zoneinfo
from typing import BinaryIO, Iterator, Optional, TextIO

from ipqd.console import error_line
from ipqd.decision.codegen import decider_for
from ipqd.decision.compiler import Decision, Matcher, compile_policy
from ipqd.decision.conntrack import Tracker
from ipqd.decision.described import build_packet
from ipqd.decision.packet import PacketMeta, PacketView, parse
from ipqd.errors import CaptureError, DescriptionError, IpqdError, NotIP, PolicyErrors
from ipqd.exits import EXIT_INVALID, EXIT_OK, EXIT_UNREADABLE, EXIT_USAGE
from ipqd.policy._values import ICMP_TYPES, ICMPV6_TYPES
from ipqd.policy.model import HOOKS, PROTOCOL_NAMES
from ipqd.policy.cgroup import split_mark
from ipqd.policy.reject import REJECT_HOOKS, reject_kind
from ipqd.printable import clean
from ipqd.tools.grammar import EXPECTED_FORM
from ipqd.tools.pcap import Frame, ip_payload, read_capture

__all__ = ["run_explain", "decide", "build_packet", "summary", "EXPECTED_FORM"]

# tcpdump's letters, in bit order (FIN first); ACK is '.'.
_FLAG_LETTERS = ((0x01, "F"), (0x02, "S"), (0x04, "R"), (0x08, "P"), (0x10, "."),
                 (0x20, "U"), (0x40, "E"), (0x80, "W"))
_ICMP_NAMES = {4: {v: k for k, v in reversed(list(ICMP_TYPES.items()))},
               6: {v: k for k, v in reversed(list(ICMPV6_TYPES.items()))}}


# ---- the command ------------------------------------------------------------

def run_explain(args) -> int:
    """Run `ipqd explain` with parsed arguments; return the exit status."""
    try:
        from ipqd.policy.loader import load
        policy = load(args.policy)
    except PolicyErrors as errors:
        for problem in errors.errors:
            error_line(str(problem))
        return EXIT_INVALID
    except OSError as error:
        error_line(f"ipqd explain: cannot read policy {args.policy}: {error.strerror or error}")
        return EXIT_UNREADABLE
    hook = HOOKS.get(args.hook)
    if hook is None:
        error_line(f"ipqd explain: unknown hook '{args.hook}' (expected one of {', '.join(HOOKS)})")
        return EXIT_USAGE
    ct_state = getattr(args, "ct_state", None)
    if args.pcap and ct_state:
        error_line("ipqd explain: --ct-state goes with a described packet; a capture's "
                   "packets get the states of their connections")
        return EXIT_USAGE
    from ipqd.policy.checked import policy_digest
    try:
        digest = policy_digest(args.policy)
    except OSError:
        digest = ""                         # a fragment went meanwhile: the policy has loaded
    at = getattr(args, "at", None)
    if args.pcap and at:
        error_line("ipqd explain: --at goes with a described packet; a capture's packets "
                   "are decided at the times they were captured")
        return EXIT_USAGE
    try:
        now = moment(at) if at else time.time()
    except ValueError as error:
        error_line(f"ipqd explain: --at: {error}")
        return EXIT_USAGE
    matcher = compile_policy(policy)
    # The daemon decides a new flow with the policy's generated function
    # where it can: explain runs it on every packet too (see decide).
    matcher.decider = decider_for(policy, matcher.fields)
    if getattr(args, "show_code", False):
        print(matcher.decider.source, end="")
        return EXIT_OK
    base = PacketMeta(hook=hook, indev=args.indev, outdev=args.outdev)
    out = sys.stdout
    try:
        if getattr(args, "reach", None):
            from ipqd.tools.reach import explain_reach
            return explain_reach(policy, args.reach, out, lambda text: _explain_described(
                matcher, text, base, None, policy.queue.conntrack,
                _Report(out, args.json, digest, policy.mode == "monitor"), now))
        if args.pcap:
            tracker = Tracker() if policy.queue.conntrack else None
            code = _explain_capture(matcher, args.pcap, base, tracker,
                                    _Report(out, args.json, digest, policy.mode == "monitor"))
        elif args.packet:
            code = _explain_described(matcher, args.packet, base, ct_state,
                                      policy.queue.conntrack,
                                      _Report(out, args.json, digest, policy.mode == "monitor"),
                                      now)
        else:
            error_line("ipqd explain: give a packet description or --pcap FILE")
            print(EXPECTED_FORM, file=sys.stderr)
            return EXIT_USAGE
        out.flush()
    except BrokenPipeError:         # `| head`: the reader has what it wanted
        _silence(out)
        return EXIT_OK
    return code


def _silence(out: TextIO) -> None:
    """Point stdout at /dev/null, so the interpreter's last flush at exit does
    not fail on the closed pipe again (and print a traceback)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, out.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):   # not a real file (tests' capture)
        pass


def moment(text: str) -> float:
    """The Unix time of `--at`: an ISO date and time, with an offset, a tz
    database name after a space, or neither (the host's local time)."""
    written, _, zone_name = text.strip().rpartition(" ")
    zone = None
    if written and ("/" in zone_name or zone_name.upper() == "UTC"):
        try:
            zone = zoneinfo.ZoneInfo(zone_name)
        except (ValueError, LookupError, OSError):
            raise ValueError(f"unknown time zone '{zone_name}' (e.g. Europe/Paris or UTC)")
    else:
        written = text.strip()
    try:
        when = datetime.datetime.fromisoformat(written)
    except ValueError:
        raise ValueError(f"'{text}' is not a date and time (write e.g. \"2026-12-07 09:30\", "
                         "\"2026-12-07 09:30+01:00\" or \"2026-12-07 09:30 Europe/Paris\")")
    if when.tzinfo is None:
        when = when.replace(tzinfo=zone) if zone else when.astimezone()
    elif zone is not None:
        raise ValueError(f"'{text}' gives both an offset and a time zone: give one")
    return when.timestamp()


def _explain_described(matcher: Matcher, text: str, base: PacketMeta, ct_state: Optional[str],
                       conntrack: bool, report: "_Report", now: float) -> int:
    try:
        payload, meta = build_packet(text, base, matcher.cgroups)
    except DescriptionError as error:
        error_line(f"ipqd explain: cannot read packet description: {error}")
        print(EXPECTED_FORM, file=sys.stderr)
        return EXIT_INVALID
    if ct_state and meta.ct_state and ct_state != meta.ct_state:
        error_line(f"ipqd explain: ct={meta.ct_state} in the description and --ct-state "
                   f"{ct_state} disagree")
        return EXIT_USAGE
    given = ct_state or meta.ct_state
    # The daemon knows a state only with conntrack; a lone packet is the
    # first of its connection, as the tracker says (new, invalid, untracked).
    tracker = Tracker() if conntrack and not given else None
    report.packet(decide(matcher, 1, payload, meta._replace(ct_state=given), now, tracker))
    report.finish(matcher, capture=None)
    return EXIT_OK


def _explain_capture(matcher: Matcher, path: str, base: PacketMeta,
                     tracker: Optional[Tracker], report: "_Report") -> int:
    try:
        f = open(path, "rb")
    except OSError as error:
        error_line(f"ipqd explain: cannot read capture {path}: {error.strerror or error}")
        return EXIT_UNREADABLE
    problem, code = None, EXIT_OK
    with f:
        for item in _frames_then_problem(f):
            if isinstance(item, Frame):
                report.packet(_frame_record(matcher, item, base, tracker))
            else:
                problem, code = item
    if problem:
        problem = f"{path}: {problem}"
    report.finish(matcher, capture=path, tracker=tracker, problem=problem)
    if problem:
        error_line(f"ipqd explain: {problem}")
    return code


def _frames_then_problem(f: BinaryIO) -> Iterator:
    """The frames of a capture, then, if reading stopped early, one
    (problem, exit status) pair. Read errors only: the caller's write errors
    (a closed stdout) never come in here."""
    try:
        yield from read_capture(f)
    except CaptureError as error:
        yield f"capture damaged, stopped: {error}", EXIT_INVALID
    except OSError as error:
        yield f"cannot read capture: {error.strerror or error}", EXIT_UNREADABLE


# ---- one packet -------------------------------------------------------------

def decide(matcher: Matcher, number: int, payload: bytes, meta: PacketMeta, now: float,
           tracker: Optional[Tracker] = None) -> dict:
    """One packet through parse and decide, as a record for the report. With
    a tracker, the packet gets the ct_state it gives (and the tracker moves on)."""
    cgroup, mark = split_mark(matcher.cgroups, meta.mark)    # as the daemon's engine
    meta = meta._replace(mark=mark)
    shown = parse(payload, meta)            # every field: for the tracker and the summary
    shown.cgroup = cgroup
    if tracker is not None:
        meta = meta._replace(ct_state=tracker.track(shown, payload, now))
        shown.ct_state = meta.ct_state
    view = parse(payload, meta, matcher.fields)
    view.cgroup = cgroup
    decision = matcher.decide(view, now)
    decider = getattr(matcher, "decider", None)
    if decider is not None and view.family in (4, 6) and not view.malformed:
        fresh = decider.decide_packet(payload, view.family, meta.hook, meta.indev, meta.outdev,
                                      meta.mark)
        if fresh is not None and (fresh.rule_index, fresh.accept, fresh.mark) != \
                (decision.rule_index, decision.action == "accept", decision.mark):
            raise IpqdError(f"packet {number}: the policy's generated decision function "
                            f"decides rule {fresh.rule_index}, the compiled matcher rule "
                            f"{decision.rule_index}: a bug in ipqd, please report it with "
                            "`ipqd explain --show-code` and this packet")
    # Bytes per rule, as the engine counts them: the length on the wire.
    matcher.bytes_by_index[decision.rule_index] += meta.wire_len or len(payload)
    return _record(number, view, shown, decision)


def _frame_record(matcher: Matcher, frame: Frame, base: PacketMeta,
                  tracker: Optional[Tracker]) -> dict:
    try:
        ip = ip_payload(frame)
    except NotIP as why:
        return {"number": frame.number, "verdict": None, "skipped": f"not IP: {why}"}
    meta = base._replace(wire_len=ip.wire_len, family=ip.family)
    return decide(matcher, frame.number, ip.payload, meta, frame.timestamp, tracker)


def _record(number: int, view: PacketView, shown: PacketView, decision: Decision) -> dict:
    rule = decision.rule
    addresses = (shown.src_text, shown.dst_text)     # once: the text form is not cheap
    return {
        "number": number,
        "verdict": decision.action,
        "rule": rule.name if rule is not None else None,
        "rule_index": decision.rule_index,
        "position": str(rule.position) if rule is not None and rule.position else None,
        "set_mark": decision.mark,
        # How a reject is refused, as the daemon's hook rules would; None at
        # prerouting and postrouting, where the kernel cannot and it is a drop.
        "reject_with": reject_kind(decision.reject_with, view.proto, view.hook)
        if decision.action == "reject" and view.hook in REJECT_HOOKS else None,
        "log": decision.log,
        "log_rules": list(decision.log_rules),      # `action: log` rules met on the way
        "malformed": view.malformed,
        "hidden": sorted(view.hidden),          # fields the rules read that the copy cut off
        "reason": view.reason or None,
        "summary": summary(shown, addresses),
        "packet": _fields(shown, addresses),
    }


def _fields(view: PacketView, addresses: tuple) -> dict:
    fields = {name: getattr(view, name) for name in (
        "family", "proto", "sport", "dport", "icmp_type", "icmp_code", "tcp_flags",
        "length", "fragment", "hook", "indev", "outdev", "mark", "uid", "gid", "ct_state",
        "cgroup")}
    fields["src"], fields["dst"] = addresses
    return fields


def summary(view: PacketView, addresses: Optional[tuple] = None) -> str:
    """One line in tcpdump's spirit: `tcp 10.0.0.5:40000 -> 10.0.0.1:22 [S]`.
    `addresses`: the view's (src_text, dst_text), when already at hand."""
    if view.malformed:
        return f"malformed: {view.reason}"
    if view.src is None:            # the copy ended inside the IP header
        return f"ipv{view.family} ({view.reason})"
    proto = view.proto
    name = "ip" if proto is None else PROTOCOL_NAMES.get(proto, f"proto {proto}")
    src_text, dst_text = addresses or (view.src_text, view.dst_text)
    src = _endpoint(view.family, src_text, view.sport)
    dst = _endpoint(view.family, dst_text, view.dport)
    text = f"{name} {src} -> {dst}"
    if view.tcp_flags is not None:
        text += " [" + ("".join(c for bit, c in _FLAG_LETTERS if view.tcp_flags & bit)
                        or "none") + "]"
    if view.icmp_type is not None:
        text += " " + _ICMP_NAMES[view.family].get(view.icmp_type, f"type {view.icmp_type}")
        if view.icmp_code:
            text += f" code {view.icmp_code}"
    if view.fragment not in ("none", None):
        text += f" frag={view.fragment}"
    text += f" len={view.length}"
    if view.hidden:
        text += f" ({view.reason})"
    return text


def _endpoint(family: int, address: str, port: Optional[int]) -> str:
    if port is None:
        return address
    return f"[{address}]:{port}" if family == 6 else f"{address}:{port}"


# ---- the report -------------------------------------------------------------

class _Report:
    """Writes each record as it comes, then the summary: text lines, or JSON
    Lines (an object per packet, "type": "packet", then "type": "summary")."""

    def __init__(self, out: TextIO, as_json: bool, digest: str = "", monitor: bool = False):
        self.out = out
        self.as_json = as_json
        self.digest = digest            # of the policy's files, as its journal entries carry it
        self.monitor = monitor          # mode: monitor: drops and rejects are not enforced
        self.packets = self.skipped = 0

    def packet(self, r: dict) -> None:
        self.packets += 1
        if r["verdict"] is None:
            self.skipped += 1
        if r["verdict"] is not None:
            r["enforced"] = not (self.monitor and r["verdict"] != "accept")
        if self.as_json:
            self.out.write(json.dumps({"type": "packet", **r}) + "\n")
        elif r["verdict"] is None:
            self.out.write(f"{r['number']:>5}  {'-':<6}  {'':<20}  skipped: {clean(r['skipped'])}\n")
        else:
            rule = clean(r["rule"]) if r["rule"] is not None else "default"
            state = r["packet"]["ct_state"]
            ct = f" ct={state}" if state else ""
            extra = f"  (set mark {r['set_mark']:#x})" if r["set_mark"] is not None else ""
            if not r["enforced"]:
                extra += "  (not enforced: mode monitor accepts it)"
            if r["log_rules"]:
                extra += f"  (logged by {clean(', '.join(r['log_rules']))})"
            if r["reject_with"] is not None:
                extra += f"  (with {r['reject_with']})"
            elif r["verdict"] == "reject":
                extra += "  (a drop at this hook: the kernel rejects only at input, " \
                         "forward and output)"
            self.out.write(f"{r['number']:>5}  {r['verdict'].upper():<6}  {rule:<20}  "
                           f"{clean(r['summary'])}{ct}{extra}\n")

    def finish(self, matcher: Matcher, capture: Optional[str], tracker: Optional[Tracker] = None,
               problem: Optional[str] = None) -> None:
        counters = matcher.counters()
        conntrack = None if tracker is None else {
            "connections": len(tracker), "forgotten": tracker.evicted, "capacity": tracker.capacity}
        if self.as_json:
            self.out.write(json.dumps({
                "type": "summary", "policy": matcher.path, "digest": self.digest or None,
                "capture": capture,
                "packets": self.packets, "skipped": self.skipped, "counters": counters,
                "conntrack": conntrack, "error": problem}) + "\n")
            return
        out = self.out
        if capture is None:         # one described packet: which policy decided it
            if self.digest:
                out.write(f"policy {clean(matcher.path)} sha256:{self.digest}\n")
            return
        out.write("\n")
        rows = [(clean(name), c) for name, c in counters["rules"].items()]
        rows.append(("(default: " + matcher.default.action + ")", counters["default"]))
        if counters["undecidable"]["hits"]:
            rows.append(("(undecidable: " + matcher.undecidable + ")", counters["undecidable"]))
        width = max([len(name) for name, _ in rows] + [4])
        out.write(f"{'rule':<{width}}  {'hits':>7}  {'accepted':>8}  {'dropped':>7}\n")
        for name, c in rows:
            out.write(f"{name:<{width}}  {c['hits']:>7}  {c['accepted']:>8}  {c['dropped']:>7}\n")
        if self.skipped:
            out.write(f"{self.skipped} frame(s) skipped: not IP\n")
        if self.digest:
            out.write(f"policy {clean(matcher.path)} sha256:{self.digest}\n")
        if conntrack is not None:
            forgotten = (f", {conntrack['forgotten']} forgotten for room (at most "
                         f"{conntrack['capacity']})" if conntrack["forgotten"] else "")
            out.write(f"conntrack: {conntrack['connections']} connection(s) tracked at the "
                      f"end{forgotten}\n")
