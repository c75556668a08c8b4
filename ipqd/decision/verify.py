"""A policy's test cases run through the daemon's own parse and matcher.

`run_cases(policy, cases)` gives one `Outcome` per case (ipqd.policy.cases),
in their order: each described packet is built into bytes
(ipqd.decision.described), parsed with the fields the compiled policy
needs and decided, as `ipqd explain` does for one described packet (input
hook unless `hook=` says otherwise; with conntrack, a lone packet gets the
state conntrack gives the first packet of a connection unless `ct=` says).
`failure_lines` says what failed, one line each, as `ipqd test`, `ipqd
check` and a refused reload print it.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence

from ipqd.decision.compiler import Matcher, compile_policy
from ipqd.decision.conntrack import Tracker
from ipqd.decision.described import build_packet
from ipqd.decision.packet import PacketMeta, parse
from ipqd.errors import DescriptionError, PolicyError
from ipqd.policy.cases import DEFAULT_RULE, Case
from ipqd.policy.model import NF_INET_LOCAL_IN, Policy

__all__ = ["Outcome", "run_cases", "failures", "failure_lines", "case_problems"]


class Outcome(NamedTuple):
    case: Case
    verdict: Optional[str]          # None: the packet description could not be read
    rule: Optional[str]             # the deciding rule's name, "default" for the default
    where: Optional[str]            # the deciding rule's file:line:column
    problem: Optional[str]          # why the case failed; None: it passed

    @property
    def passed(self) -> bool:
        return self.problem is None


def run_cases(policy: Policy, cases: Sequence[Case],
              matcher: Optional[Matcher] = None) -> List[Outcome]:
    """Every case decided by `policy` (compiled unless `matcher` is given)."""
    if not cases:
        return []
    matcher = matcher or compile_policy(policy)
    names = {rule.name for rule in policy.rules} | {DEFAULT_RULE}
    return [_run(matcher, policy.queue.conntrack, names, case) for case in cases]


def _run(matcher: Matcher, conntrack: bool, names: set, case: Case) -> Outcome:
    if case.rule is not None and case.rule not in names:
        return Outcome(case, None, None, None,
                       f"the policy has no rule named '{case.rule}' (write a rule's name, "
                       f"or `{DEFAULT_RULE}`)")
    try:
        payload, meta = build_packet(case.packet, PacketMeta(hook=NF_INET_LOCAL_IN))
    except DescriptionError as error:
        return Outcome(case, None, None, None, f"cannot read the packet description: {error}")
    if conntrack and meta.ct_state is None:
        # A lone packet, as explain gives it: the first of its connection.
        meta = meta._replace(ct_state=Tracker().track(parse(payload, meta), payload, 0.0))
    decision = matcher.decide(parse(payload, meta, matcher.fields), 0.0)
    rule = decision.rule.name if decision.rule is not None else DEFAULT_RULE
    where = str(decision.rule.position) if decision.rule is not None and \
        decision.rule.position is not None else None
    problem = None
    if decision.action != case.expect or (case.rule is not None and rule != case.rule):
        wanted = case.expect + (f" ({case.rule})" if case.rule is not None else "")
        problem = f"expected {wanted}, decided {decision.action} ({rule})"
    return Outcome(case, decision.action, rule, where, problem)


def failures(outcomes: Sequence[Outcome]) -> List[PolicyError]:
    """Each failed case as an error at the case: `file:line:col: test "title"
    failed: expected ..., decided ... (rule at file:line:col)`."""
    out = []
    for o in outcomes:
        if o.passed:
            continue
        at = f" (rule at {o.where})" if o.where else ""
        p = o.case.position
        out.append(PolicyError(p.path, p.line, p.column,
                               f"test \"{o.case.title}\" failed: {o.problem}{at}"))
    return out


def failure_lines(outcomes: Sequence[Outcome]) -> List[str]:
    return [str(problem) for problem in failures(outcomes)]


def case_problems(policy: Policy, cases: Sequence[Case]) -> List[PolicyError]:
    """The errors of the cases that fail (`ipqd check`, the daemon's load)."""
    return failures(run_cases(policy, cases))
