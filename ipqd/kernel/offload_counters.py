"""The kernel's own counts of offloaded flows: the packets and bytes that
ipqd's offload rules (ipqd.kernel.hook_rules) accepted or dropped after
ipqd handed the flow over, which ipqd itself never sees.

They are counted per rule slot (ipqd.policy.offload): the slot value the
flow's connmark holds names the rule that offloaded it, and the running
policy's table (`Matcher.offload_slots`) turns values into rule names.
iptables counts each slot in a rule of its own (IPQD_KEPT_ACCEPT/DROP,
commented `ipqd-slot-N`), nft in a named counter (`slot_N`). Slot 0 holds
what no slot names: flows offloaded while there were no slot bits (then
the kept-verdict rules count directly), or before the slots existed.
Read by root (`ipqd counters`): the daemon may run no firewall tool.
"""
from __future__ import annotations

import json
import re
import subprocess
from typing import Dict, List, Optional, Tuple

from ipqd.kernel.hook_rules import KEPT_CHAINS, NFT_SLOT_COUNTER, SLOT_COMMENT

# (slot value, "accept" or "drop") -> (packets, bytes)
SlotCounts = Dict[Tuple[int, str], Tuple[int, int]]

# iptables-save -c: "[packets:bytes] -A IPQD_KEPT_ACCEPT -m connmark --mark
# 0x40000/0x3c0000 -m comment --comment ipqd-slot-1 -j ACCEPT"
_IPT_SLOT = re.compile(r"^\[(\d+):(\d+)\] -A (?:%s) .*--comment \"?%s\"? -j (ACCEPT|DROP)\s*$"
                       % ("|".join(KEPT_CHAINS.values()), SLOT_COMMENT.format(r"(\d+)")))
# Without slots, the kept-verdict rules of each hook chain count: slot 0.
_IPT_KEPT = re.compile(r"^\[(\d+):(\d+)\] -A IPQD_[A-Z]+ .*--ctdir (?:ORIGINAL|REPLY) "
                       r"-m connmark --mark \S+ -j (ACCEPT|DROP)\s*$")
_NFT_SLOT = re.compile("^" + NFT_SLOT_COUNTER.format(r"(\d+)", "(accept|drop)") + "$")


def parse_iptables_save(text: str) -> SlotCounts:
    """The offloaded packets per slot in `iptables-save -c` output (one family)."""
    counts: SlotCounts = {}
    for line in text.splitlines():
        line = line.strip()
        match = _IPT_SLOT.match(line)
        if match:
            _add(counts, (int(match.group(3)), match.group(4).lower()),
                 int(match.group(1)), int(match.group(2)))
            continue
        match = _IPT_KEPT.match(line)
        if match:
            _add(counts, (0, match.group(3).lower()), int(match.group(1)), int(match.group(2)))
    return counts


def parse_nft_json(text: str) -> SlotCounts:
    """The offloaded packets per slot in `nft -j list table inet ipqd`: its
    named counters, or without slots the kept-verdict rules' counters."""
    counts: SlotCounts = {}
    try:
        items = json.loads(text).get("nftables", [])
    except (ValueError, AttributeError):
        return {}
    for item in items:
        if not isinstance(item, dict):
            continue
        counter = item.get("counter")
        if isinstance(counter, dict) and "name" in counter:
            match = _NFT_SLOT.match(str(counter["name"]))
            if match:
                _add(counts, (int(match.group(1)), match.group(2)), int(counter["packets"]),
                     int(counter["bytes"]))
            continue
        rule = item.get("rule")
        verdict = _kept_verdict(rule) if isinstance(rule, dict) else None
        if verdict is not None:
            for expr in rule.get("expr", []):
                plain = expr.get("counter")
                if isinstance(plain, dict) and "packets" in plain:
                    _add(counts, (0, verdict), int(plain["packets"]), int(plain["bytes"]))
    return counts


def _kept_verdict(rule: dict) -> Optional[str]:
    """The verdict of a rule applying an offloaded flow's kept verdict (a ct
    direction and a connmark test, then accept or drop); None for others."""
    direction = marked = False
    verdict = None
    for expr in rule.get("expr", []):
        if "accept" in expr or "drop" in expr:
            verdict = "accept" if "accept" in expr else "drop"
        match = expr.get("match")
        if isinstance(match, dict):
            left = match.get("left", {})
            if isinstance(left, dict) and left.get("ct", {}).get("key") == "direction":
                direction = True
            if isinstance(left, dict) and "&" in left:
                marked = marked or any(isinstance(x, dict) and x.get("ct", {}).get("key")
                                       == "mark" for x in left["&"])
    return verdict if direction and marked else None


def read(backend: str) -> Optional[SlotCounts]:
    """The offloaded packets per slot for `backend` (ipqd.kernel.hook_rules.BACKENDS),
    both families added up; None when the tools cannot be run."""
    if backend == "nft":
        text = _output(["nft", "-j", "list", "table", "inet", "ipqd"])
        return None if text is None else parse_nft_json(text)
    variant = backend.split("-", 1)[1]          # iptables-nft, iptables-legacy
    counts: SlotCounts = {}
    ran = False
    for tool in (f"iptables-{variant}-save", f"ip6tables-{variant}-save"):
        # No -t: only tables that exist are dumped (naming one would create it).
        text = _output([tool, "-c"])
        if text is not None:
            ran = True
            for key, (packets, size) in parse_iptables_save(text).items():
                _add(counts, key, packets, size)
    return counts if ran else None


def _add(counts: SlotCounts, key: Tuple[int, str], packets: int, size: int) -> None:
    old = counts.get(key, (0, 0))
    counts[key] = (old[0] + packets, old[1] + size)


def _output(argv: List[str]) -> Optional[str]:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout if result.returncode == 0 else None
