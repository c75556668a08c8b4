"""The `shadow` setting: a candidate policy that decides every packet
beside the enforced one, enforcing nothing (its disagreements are logged
and counted: ipqd.decision.shadow). Its path is relative to the policy's
directory; ipqd.policy.checked loads it with the same checks."""
from __future__ import annotations

import os
from typing import Optional, Tuple

import yaml

from ipqd.policy._nodes import Where, text


def shadow_path(where: Where, item: Optional[Tuple[yaml.Node, yaml.Node]]) -> Optional[str]:
    """The candidate's path (joined to the policy's directory), or None."""
    if item is None:
        return None
    written = text(where, item[1], "shadow", "the path of a candidate policy file")
    if written is None:
        return None
    written = written.strip()
    if not written.endswith((".yaml", ".yml")):
        where.error(item[1], f"shadow must name a policy file (*.yaml), not '{written}'")
        return None
    path = os.path.join(os.path.dirname(where.path), written)
    if os.path.abspath(path) == os.path.abspath(where.path):
        where.error(item[1], "shadow names the policy itself: name a candidate policy file")
        return None
    return path
