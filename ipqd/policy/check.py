"""`ipqd check [POLICY]`: every problem `ipqd run` would refuse or warn
about, then a one-line verdict; with --json, one object for programs.

It reports what the daemon refuses before it reads a file (file safety:
ipqd.policy.checked.safety_problems) and everything the loader finds. Exit
statuses: ipqd.exits. Every text line is escaped (ipqd.printable): a rule
name or a path cannot move the cursor or forge an `OK` line.
"""
from __future__ import annotations

import gc
import json
import sys
from typing import Callable, List, Optional, TextIO, Tuple

from ipqd.errors import PolicyError, PolicyErrors
from ipqd.exits import EXIT_INVALID, EXIT_OK, EXIT_UNREADABLE
from ipqd.policy.cases import policy_cases
from ipqd.policy.checked import (safety_problems, service_cannot_read, service_read_problems,
                                 set_file_problems, set_files)
from ipqd.policy.loader import load_with_sets
from ipqd.printable import clean

Verify = Optional[Callable]     # (policy, cases) -> the failed cases as PolicyErrors
SHOWN_PER_SEVERITY = 20        # text output: errors and warnings listed, each (--all: every one)


def run_check(args, out: TextIO = None, err: TextIO = None, verify: Verify = None) -> int:
    """Check `args.policy`; print problems to `out`, read failures to `err`.
    `verify(policy, cases)` runs the policy's test cases (ipqd.policy.cases),
    each failure an error (the CLI passes ipqd.decision.verify.case_problems)."""
    out = out or sys.stdout
    err = err or sys.stderr
    path = args.policy
    try:
        problems, counts = examine(path, verify)
    except OSError as e:
        where = e.filename or path
        if getattr(args, "json", False):
            print(json.dumps({"policy": path, "valid": False, "unreadable": str(where),
                              "reason": e.strerror}), file=out)
        else:
            print(clean(f"ipqd: cannot read {where}: {e.strerror}"), file=err)
        return EXIT_UNREADABLE
    valid = not any(p.severity == "error" for p in problems)
    if getattr(args, "json", False):
        print(json.dumps({"policy": path, "valid": valid, "problems": [_as_dict(p) for p in problems],
                          "counts": counts}), file=out)
    else:
        _print_text(path, problems, counts, valid, args, out)
    return EXIT_OK if valid else EXIT_INVALID


def examine(path: str, verify: Verify = None) -> Tuple[List[PolicyError], Optional[dict]]:
    """Every problem of the policy at `path`, in the files' order, and its counts
    (None when it did not load); with `verify`, its test cases' failures too.
    Raises OSError when it cannot be read."""
    refusals = [PolicyError(path, 0, 0, f"`ipqd run` refuses it: {p}")
                for p in safety_problems(path)]
    refusals += [PolicyError(path, 0, 0, p, severity="warning")
                 for p in service_read_problems(path)]
    # The YAML nodes of a large policy are many objects that live until the
    # load ends: the collector would walk them again and again as they grow.
    collecting = gc.isenabled()
    gc.disable()
    try:
        policy, sets = load_with_sets(path, every_problem=True)
        problems, counts = list(policy.warnings), {"rules": len(policy.rules), "sets": len(sets)}
        refusals += [PolicyError(path, 0, 0, f"`ipqd run` refuses it: {p}")
                     for p in set_file_problems(path, policy)]
        refusals += [PolicyError(path, 0, 0, p, severity="warning")
                     for p in service_cannot_read(set_files(path, policy))]
    except PolicyErrors as e:
        problems, counts = list(e.errors), None
    finally:
        if collecting:
            gc.enable()
    if counts is not None and policy.shadow_path is not None:
        problems += _shadow_problems(policy.shadow_path)
    if verify is not None and counts is not None:
        try:
            cases = policy_cases(path)
            counts["tests"] = len(cases)
            problems += verify(policy, cases)
        except PolicyErrors as e:
            problems += e.errors
            counts = None
    return refusals + problems, counts


def _shadow_problems(path: str) -> List[PolicyError]:
    """The errors and warnings of the shadow policy the checked one names."""
    # its queue, hooks and logging are not used: only warnings about its rules
    def wanted(p: PolicyError) -> bool:
        return p.severity == "error" or "can never match" in p.message
    try:
        shadow = load_with_sets(path, every_problem=True).policy
    except PolicyErrors as e:
        return [p for p in e.errors if wanted(p)]
    except OSError as e:
        return [PolicyError(path, 0, 0, f"cannot read the shadow policy: {e.strerror or e}")]
    problems = [w for w in shadow.warnings if wanted(w)]
    if shadow.shadow_path is not None:
        problems.append(PolicyError(path, 0, 0, "a shadow policy cannot name a shadow of its "
                                                "own (remove its `shadow:`)"))
    return problems


def _print_text(path: str, problems: List[PolicyError], counts: Optional[dict], valid: bool,
                args, out: TextIO) -> None:
    quiet, every = getattr(args, "quiet", False), getattr(args, "all", False)
    seen = {"error": 0, "warning": 0}
    for problem in problems:                # in the order of the files
        if quiet and problem.severity == "warning":
            continue
        seen[problem.severity] += 1
        if every or seen[problem.severity] <= SHOWN_PER_SEVERITY:
            print(clean(problem), file=out)
    for severity, number in seen.items():
        if not every and number > SHOWN_PER_SEVERITY:
            print(f"... and {number - SHOWN_PER_SEVERITY} more {severity}s "
                  f"(`ipqd check --all` lists every one)", file=out)
    errors = sum(1 for p in problems if p.severity == "error")
    warnings = len(problems) - errors
    if not valid:
        summary = _count(errors, "error")
        if warnings and not quiet:
            summary += ", " + _count(warnings, "warning")
        print(summary, file=out)
    elif not quiet:
        parts = [_count(counts["rules"], "rule"), _count(counts["sets"], "set")]
        if counts.get("tests"):
            parts.append(_count(counts["tests"], "test") + " passed")
        if warnings:
            parts.append(_count(warnings, "warning"))
        print(f"{clean(path)}: OK ({', '.join(parts)})", file=out)


def _as_dict(problem: PolicyError) -> dict:
    return {"file": problem.path, "line": problem.line or None,
            "column": problem.column or None, "severity": problem.severity,
            "message": problem.message}


def _count(number: int, word: str) -> str:
    return f"{number} {word}" if number == 1 else f"{number} {word}s"
