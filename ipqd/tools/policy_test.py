"""`ipqd test POLICY [CASES ...]`: a policy's test cases, run as `ipqd run`
would decide them.

Without CASES the policy's own cases run (its `tests:` section and
`tests.d/*.yaml`, ipqd.policy.cases); with CASES, the cases in those files.
Each failure is one line at the case's file:line:column with what was
expected, what the policy decided and the deciding rule; then a summary.
`--junit FILE` also writes a JUnit XML report for CI systems.

Exit statuses (ipqd.exits): 0 every case passed; 1 a case failed, or the
policy or a case file is invalid, or there is no case to run; 2 usage; 3 a
file cannot be read.
"""
from __future__ import annotations

import sys
from typing import List, Optional, Sequence, TextIO
from xml.etree import ElementTree

from ipqd.console import error_line
from ipqd.decision.verify import Outcome, failure_lines, run_cases
from ipqd.errors import PolicyErrors
from ipqd.exits import EXIT_INVALID, EXIT_OK, EXIT_UNREADABLE
from ipqd.policy.cases import TESTS_DIR, Case, policy_cases, read_cases
from ipqd.printable import clean

__all__ = ["run_test", "junit_xml"]


def run_test(args, out: Optional[TextIO] = None) -> int:
    out = out or sys.stdout
    from ipqd.policy.loader import load
    try:
        policy = load(args.policy)
        cases: List[Case] = []
        if args.cases:
            for name in args.cases:
                cases += read_cases(name)
        else:
            cases = policy_cases(args.policy)
    except PolicyErrors as errors:
        for problem in errors.errors:
            error_line(str(problem))
        return EXIT_INVALID
    except OSError as error:
        error_line(f"ipqd test: cannot read {error.filename or args.policy}: "
                   f"{error.strerror or error}")
        return EXIT_UNREADABLE
    if not cases:
        error_line(f"ipqd test: no test cases: give a file of cases, or write them in "
                   f"{args.policy}'s `tests:` section or in {TESTS_DIR}/")
        return EXIT_INVALID
    outcomes = run_cases(policy, cases)
    for line in failure_lines(outcomes):
        print(clean(line), file=out)
    failed = sum(1 for o in outcomes if not o.passed)
    print(f"{clean(args.policy)}: {len(outcomes)} test{'s' if len(outcomes) != 1 else ''}, "
          f"{len(outcomes) - failed} passed, {failed} failed", file=out)
    if args.junit:
        try:
            with open(args.junit, "wb") as f:
                f.write(junit_xml(args.policy, outcomes))
        except OSError as error:
            error_line(f"ipqd test: cannot write {args.junit}: {error.strerror or error}")
            return EXIT_UNREADABLE
    return EXIT_INVALID if failed else EXIT_OK


def junit_xml(policy_path: str, outcomes: Sequence[Outcome]) -> bytes:
    """The outcomes as one JUnit <testsuite>, each case a <testcase> with
    its file and line; a failed case holds a <failure>."""
    failed = sum(1 for o in outcomes if not o.passed)
    suite = ElementTree.Element("testsuite", name=policy_path, tests=str(len(outcomes)),
                                failures=str(failed), errors="0", skipped="0")
    for o in outcomes:
        case = ElementTree.SubElement(
            suite, "testcase", name=o.case.title, classname=policy_path,
            file=o.case.position.path, line=str(o.case.position.line))
        if not o.passed:
            failure = ElementTree.SubElement(case, "failure", message=o.problem)
            failure.text = failure_lines([o])[0]
    return ElementTree.tostring(suite, encoding="utf-8", xml_declaration=True) + b"\n"
