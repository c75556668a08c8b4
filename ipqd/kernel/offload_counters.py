"""The kernel's own counts of offloaded flows: the packets and bytes that
ipqd's offload rules (ipqd.kernel.hook_rules) accepted or dropped after
ipqd handed the flow over, which ipqd itself never sees.

They are counted per hook, verdict and conntrack direction, not per rule:
a flow's connmark holds its verdict, not the rule that gave it. Read by
root (`ipqd counters`): the daemon may run no firewall tool. iptables
counts every rule; ipqd's nft rules carry no `counter`, so the nft backend
has nothing to read here.
"""
from __future__ import annotations

import json
import re
import subprocess
from typing import Dict, List, NamedTuple, Tuple

# iptables-save -c: "[packets:bytes] -A IPQD_INPUT -m conntrack --ctstate NEW,ESTABLISHED
# --ctdir ORIGINAL -m connmark --mark 0x20000000/0x20000000 -j ACCEPT"
_IPT_KEPT = re.compile(r"^\[(\d+):(\d+)\] -A IPQD_([A-Z]+) .*--ctdir (ORIGINAL|REPLY) "
                       r"-m connmark --mark \S+ -j (ACCEPT|DROP)\s*$")


class KernelCount(NamedTuple):
    hook: str           # input, output, forward, ...
    verdict: str        # accept or drop
    direction: str      # original or reply
    packets: int
    bytes: int


def parse_iptables_save(text: str) -> List[KernelCount]:
    """The offload rules' counters in `iptables-save -c` output (one family)."""
    counts = []
    for line in text.splitlines():
        match = _IPT_KEPT.match(line.strip())
        if match:
            packets, size, hook, direction, verdict = match.groups()
            counts.append(KernelCount(hook.lower(), verdict.lower(), direction.lower(),
                                      int(packets), int(size)))
    return counts


def parse_nft_json(text: str) -> List[KernelCount]:
    """The offload rules' counters in `nft -j list table inet ipqd` (only
    rules with a counter statement have any)."""
    counts = []
    try:
        items = json.loads(text).get("nftables", [])
    except (ValueError, AttributeError):
        return []
    for item in items:
        rule = item.get("rule") if isinstance(item, dict) else None
        if not rule:
            continue
        counter, verdict, direction, marked = None, None, None, False
        for expr in rule.get("expr", []):
            if "counter" in expr:
                counter = expr["counter"]
            elif "accept" in expr or "drop" in expr:
                verdict = "accept" if "accept" in expr else "drop"
            elif "match" in expr:
                left = expr["match"].get("left", {})
                if isinstance(left, dict) and left.get("ct", {}).get("key") == "direction":
                    direction = expr["match"].get("right")
                if isinstance(left, dict) and "&" in left:
                    marked = marked or any(isinstance(x, dict) and x.get("ct", {}).get("key")
                                           == "mark" for x in left["&"])
        if counter and verdict and direction and marked:
            counts.append(KernelCount(rule.get("chain", ""), verdict, str(direction),
                                      int(counter["packets"]), int(counter["bytes"])))
    return counts


def read(backend: str) -> List[KernelCount]:
    """The offload rules' counters for `backend` (ipqd.kernel.hook_rules.BACKENDS),
    both families added up; [] when the tools cannot be run."""
    if backend == "nft":
        return _add_up(parse_nft_json(_output(["nft", "-j", "list", "table", "inet", "ipqd"])))
    variant = backend.split("-", 1)[1]          # iptables-nft, iptables-legacy
    counts: List[KernelCount] = []
    for tool in (f"iptables-{variant}-save", f"ip6tables-{variant}-save"):
        # No -t: only tables that exist are dumped (naming one would create it).
        counts += parse_iptables_save(_output([tool, "-c"]))
    return _add_up(counts)


def _add_up(counts: List[KernelCount]) -> List[KernelCount]:
    total: Dict[Tuple[str, str, str], List[int]] = {}
    for c in counts:
        entry = total.setdefault((c.hook, c.verdict, c.direction), [0, 0])
        entry[0] += c.packets
        entry[1] += c.bytes
    return [KernelCount(*key, *value) for key, value in sorted(total.items())]


def _output(argv: List[str]) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return result.stdout if result.returncode == 0 else ""
