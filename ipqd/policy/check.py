"""`ipqd check POLICY`: every problem in a policy, then a one-line verdict.

Exit status: 0 when the policy is valid (warnings allowed), 1 when it is not,
2 when the file cannot be read at all. Every line is escaped (ipqd.printable):
a rule name or a path cannot move the cursor or forge an `OK` line.
"""
from __future__ import annotations

import gc
import sys
from typing import List, TextIO

from ipqd.errors import PolicyError, PolicyErrors
from ipqd.policy.loader import load_with_sets
from ipqd.printable import clean

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_UNREADABLE = 2


def run_check(args, out: TextIO = None, err: TextIO = None) -> int:
    """Check `args.policy`; print problems to `out`, read failures to `err`."""
    out = out or sys.stdout
    err = err or sys.stderr
    path = args.policy
    quiet = getattr(args, "quiet", False)
    # The YAML nodes of a large policy are many objects that live until the
    # load ends: the collector would walk them again and again as they grow
    # (half the time of a 50,000-rule check).
    collecting = gc.isenabled()
    gc.disable()
    try:
        policy, sets = load_with_sets(path, every_problem=True)
    except OSError as e:
        print(clean(f"ipqd: cannot read {e.filename or path}: {e.strerror}"), file=err)
        return EXIT_UNREADABLE
    except PolicyErrors as e:
        shown = _shown(e.errors, quiet)
        for problem in shown:
            print(clean(problem), file=out)
        print(_summary(e.errors, quiet), file=out)
        return EXIT_INVALID
    finally:
        if collecting:
            gc.enable()
    warnings = _shown(policy.warnings, quiet)
    for problem in warnings:
        print(clean(problem), file=out)
    if not quiet:
        counts = [_count(len(policy.rules), "rule"), _count(len(sets), "set")]
        if warnings:
            counts.append(_count(len(warnings), "warning"))
        print(f"{clean(path)}: OK ({', '.join(counts)})", file=out)
    return EXIT_OK


def _shown(problems: List[PolicyError], quiet: bool) -> List[PolicyError]:
    return [p for p in problems if not (quiet and p.severity == "warning")]


def _summary(problems: List[PolicyError], quiet: bool) -> str:
    errors = sum(1 for p in problems if p.severity == "error")
    warnings = len(problems) - errors
    text = _count(errors, "error")
    if warnings and not quiet:
        text += ", " + _count(warnings, "warning")
    return text


def _count(number: int, word: str) -> str:
    return f"{number} {word}" if number == 1 else f"{number} {word}s"
