"""`ipqd explain POLICY --reach RULE`: a packet that reaches a rule, or why
none does (ipqd.policy.regions.reach).

The packet, in explain's description, is then explained like any described
one, so the line below it shows the rule deciding it. Earlier rules with a
rate are taken as past their rate (they may not match); the explain line
shows such a rule when its tokens are there.
"""
from __future__ import annotations

from typing import Callable, TextIO

from ipqd.console import error_line
from ipqd.exits import EXIT_FAILED, EXIT_INVALID, EXIT_OK
from ipqd.policy import regions
from ipqd.policy.model import Policy
from ipqd.printable import clean

__all__ = ["explain_reach"]


def explain_reach(policy: Policy, name: str, out: TextIO,
                  explain: Callable[[str], int]) -> int:
    """Print a packet reaching rule `name` and hand it to `explain` (which
    returns an exit status), or say that none reaches it: 0 either way; 1
    when the policy has no such rule."""
    indexes = [i for i, rule in enumerate(policy.rules) if rule.name == name]
    if not indexes:
        error_line(f"ipqd explain: the policy has no rule named '{name}'")
        return EXIT_INVALID
    index = indexes[0]
    rule = policy.rules[index]
    where = f" ({rule.position})" if rule.position else ""
    try:
        space, cube, earlier = regions.reach(policy.rules, index,
                                             conntrack=policy.queue.conntrack)
    except regions.TooLarge as error:
        error_line(f"ipqd explain: {error}")
        return EXIT_FAILED
    if cube is None:
        takers = [f'"{policy.rules[i].name}"' for i in
                  regions.needed(policy.rules, index, earlier, space)]
        verb = "takes" if len(takers) == 1 else "take"
        why = f": {', '.join(takers)} {verb} every packet it would match" if earlier else \
            ": no packet has every field it asks for"
        out.write(clean(f'no packet reaches rule "{name}"{where}{why}') + "\n")
        return EXIT_OK
    witness = space.witness(cube, policy.queue.conntrack)
    if witness is None:
        out.write(clean(f'only malformed packets reach rule "{name}"{where}: '
                        f"{space.describe(cube, space.shape_of(cube)).replace('any packet', 'any of them')}") + "\n")
        return EXIT_OK
    if rule.match.cgroup:       # no header says it: the description names the cgroup
        witness += f" cgroup={sorted(rule.match.cgroup)[0]}"
    out.write(clean(f'rule "{name}"{where} is reached by: {witness}') + "\n")
    out.flush()
    return explain(witness)
