"""The kernel rules that send traffic to ipqd's queue, as text: no I/O.

ipqd keeps its rules in chains of its own (`IPQD_INPUT`, ... or nft table
`inet ipqd`) and adds one jump per built-in chain, so the administrator's
rules are never touched. `plan` turns a policy's hooks and queue settings
into the scripts one install runs (iptables-restore input, or one nft
script), so what would be installed can be tested and shown (`ipqd hooks
show`) without touching the kernel; ipqd.kernel.hooks runs them.

With flow offload (ipqd.policy.offload), each chain starts with the rules
that turn ipqd's NF_REPEAT requests into conntrack marks and accept or drop
the flows already marked, before any queue rule. When the policy rejects
(ipqd.policy.reject), the input, forward and output chains start, before
those, with the rules that hand packets marked for rejection to the
kernel's REJECT.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from ipqd.errors import HookError
from ipqd.policy.model import CT_STATES, Hook, QueueConfig
from ipqd.policy.offload import Layout, layout as offload_layout
from ipqd.policy.cgroup import cgroup_layout, depth
from ipqd.policy.reject import IPTABLES_REJECT, NFT_REJECT, REJECT_CHAINS, reject_bits

BACKENDS = ("nft", "iptables-nft", "iptables-legacy")
NFT_TABLE = "ipqd"
# iptables: clears the request bits and accepts (one rule cannot do both).
OFFLOAD_CHAIN = "IPQD_OFFLOAD"
# Rule slots (ipqd.policy.offload): the chain that writes a request's slot
# into the flow's connmark (jumped to by requests only, once per flow and
# direction), and the chains that count offloaded packets per slot before
# accepting or dropping them (jumped to by offloaded packets only). The
# kernel's counters of the latter are `ipqd counters`' (ipqd.kernel.offload_counters).
SLOT_CHAIN = "IPQD_SLOT"
KEPT_CHAINS = {"ACCEPT": "IPQD_KEPT_ACCEPT", "DROP": "IPQD_KEPT_DROP"}
NFT_SLOT_CHAIN = "rule_slot"
SLOT_COMMENT = "ipqd-slot-{}"           # iptables: the counting rule of a slot value
NFT_SLOT_COUNTER = "slot_{}_{}"         # nft: the named counter of a slot value and verdict

# Built-in chain -> (iptables table, built-in chain name). Input, forward and
# output live in filter, where firewall rules are; the routing hooks exist
# only in mangle (and nat/raw).
_IPT_PLACE = {
    "input": ("filter", "INPUT"),
    "forward": ("filter", "FORWARD"),
    "output": ("filter", "OUTPUT"),
    "prerouting": ("mangle", "PREROUTING"),
    "postrouting": ("mangle", "POSTROUTING"),
}
# nft base chain priorities matching the iptables tables above.
_NFT_PRIORITY = {"input": 0, "forward": 0, "output": 0, "prerouting": -150, "postrouting": -150}
_IPV6_PROTO = {"icmp": "ipv6-icmp", "icmpv6": "ipv6-icmp"}
_IPV4_PROTO = {"icmpv6": None}


def queue_layout(queue: QueueConfig) -> Dict[int, Tuple[int, Optional[str]]]:
    """Every queue number ipqd binds -> (worker index, conntrack state or None).

    Without conntrack, the policy's numbers as they are, one worker each.
    With conntrack (a rule reads ct_state), the hook rules send each state
    to its own block of queues, so the state is known from the queue a
    packet arrives on: this works on every kernel, including those that
    cannot attach conntrack information to queued packets
    (CONFIG_NETFILTER_NETLINK_GLUE_CT off). Block k holds state k, one queue
    per worker: num + k * width + worker.
    """
    nums = queue.nums
    width = len(nums)
    if not queue.conntrack:
        return {num: (i, None) for i, num in enumerate(nums)}
    return {nums[0] + k * width + i: (i, state)
            for k, state in enumerate(CT_STATES) for i in range(width)}


@dataclass(frozen=True)
class Plan:
    """What one install does: per command (e.g. iptables-legacy-restore), its input text."""
    backend: str
    scripts: Tuple[Tuple[Tuple[str, ...], str], ...]     # (argv, stdin)
    jumps: Tuple[Tuple[str, str, str, str], ...] = ()    # (tool, table, builtin, chain)


def chain_name(hook_chain: str) -> str:
    return "IPQD_" + hook_chain.upper()


def _families(hook: Hook) -> Tuple[int, ...]:
    return {"ipv4": (4,), "ipv6": (6,), "both": (4, 6)}[hook.family]


def _queue_targets(queue: QueueConfig, nft: bool = False) -> List[Tuple[str, str]]:
    """(match, target) pairs that send traffic to ipqd's queues: one pair,
    or one per conntrack state when the policy reads ct_state."""
    width = len(queue.nums)
    blocks = [("", queue.nums[0])]
    if queue.conntrack:
        if nft:
            blocks = [(f"ct state {state} ", queue.nums[0] + k * width)
                      for k, state in enumerate(CT_STATES)]
        else:
            blocks = [(f"-m conntrack --ctstate {state.upper()} ", queue.nums[0] + k * width)
                      for k, state in enumerate(CT_STATES)]
    pairs = []
    for match, first in blocks:
        last = first + width - 1
        if nft:
            target = f"queue num {first}" if width == 1 else f"queue num {first}-{last}"
            target += " bypass" if queue.bypass else ""
        elif width == 1:
            target = f"-j NFQUEUE --queue-num {first}"
        else:
            # A flow always hashes to the same queue: one worker per queue sees whole flows.
            target = f"-j NFQUEUE --queue-balance {first}:{last}"
        if not nft and queue.bypass:
            target += " --queue-bypass"
        pairs.append((match, target))
    return pairs


def _offload_layout(hooks: Sequence[Hook], queue: QueueConfig) -> Optional[Layout]:
    return offload_layout(queue.offload, {hook.chain for hook in hooks})


# Conntrack states an offloaded verdict applies to: a related packet (an ICMP
# error) carries its master flow's connmark, and must still be decided by ipqd.
_DIRECTIONS = (("ORIGINAL", "original"), ("REPLY", "reply"))


def _offload_iptables(chain: str, hook_chain: str, bits: Layout) -> List[str]:
    slot = bits.slot(hook_chain)
    if slot is None:
        return []
    ra, rd = bits.request_accept, bits.request_drop
    accept = dict(zip(("ORIGINAL", "REPLY"), (slot.accept_original, slot.accept_reply)))
    drop = dict(zip(("ORIGINAL", "REPLY"), (slot.drop_original, slot.drop_reply)))
    ct = "-m conntrack --ctstate NEW,ESTABLISHED --ctdir"
    rules = []
    # ipqd's request (the packet is back from NF_REPEAT): remember it, then apply it.
    for request, kept in ((ra, accept), (rd, drop)):
        for direction, _ in _DIRECTIONS:
            bit = kept[direction]
            rules.append(f"-A {chain} -m mark --mark {request:#x}/{request:#x} {ct} {direction} "
                         f"-j CONNMARK --set-xmark {bit:#x}/{bit:#x}")
    if bits.other:
        for request in (ra, rd):
            rules.append(f"-A {chain} -m mark --mark {request:#x}/{request:#x} "
                         f"-m conntrack --ctstate NEW,ESTABLISHED -j {SLOT_CHAIN}")
    rules.append(f"-A {chain} -m mark --mark {rd:#x}/{rd:#x} -j DROP")
    rules.append(f"-A {chain} -m mark --mark {ra:#x}/{ra:#x} -j {OFFLOAD_CHAIN}")
    # Flows offloaded earlier; drop first, should both ever be set.
    for kept, target in ((drop, "DROP"), (accept, "ACCEPT")):
        for direction, _ in _DIRECTIONS:
            bit = kept[direction]
            rules.append(f"-A {chain} {ct} {direction} -m connmark --mark {bit:#x}/{bit:#x} "
                         f"-j {KEPT_CHAINS[target] if bits.other else target}")
    return rules


def _slot_chains_iptables(bits: Layout) -> Dict[str, List[str]]:
    """The rule-slot chains (SLOT_CHAIN, KEPT_CHAINS) of one table; {} without slots."""
    if not bits.other:
        return {}
    pm, cm = bits.slot_request_mask, bits.slot_field_mask
    chains: Dict[str, List[str]] = {SLOT_CHAIN: []}
    for value in range(1, bits.other + 1):
        request, field = bits.request_value(value), bits.field_value(value)
        # The flow's first request names its rule; a request naming another makes it "other".
        chains[SLOT_CHAIN] += [
            f"-A {SLOT_CHAIN} -m mark --mark {request:#x}/{pm:#x} -m connmark --mark 0x0/{cm:#x} "
            f"-j CONNMARK --set-xmark {field:#x}/{cm:#x}",
            f"-A {SLOT_CHAIN} -m mark --mark {request:#x}/{pm:#x} -m connmark ! --mark "
            f"{field:#x}/{cm:#x} -j CONNMARK --set-xmark {cm:#x}/{cm:#x}"]
    for target, name in KEPT_CHAINS.items():
        # Slot values in order, then what no slot holds (offloaded before slots existed).
        chains[name] = [f"-A {name} -m connmark --mark {bits.field_value(value):#x}/{cm:#x} "
                        f"-m comment --comment {SLOT_COMMENT.format(value)} -j {target}"
                        for value in range(1, bits.other + 1)]
        chains[name].append(f"-A {name} -m comment --comment {SLOT_COMMENT.format(0)} -j {target}")
    return chains


def _offload_nft(hook_chain: str, bits: Layout) -> List[str]:
    slot = bits.slot(hook_chain)
    if slot is None:
        return []
    ra, rd = bits.request_accept, bits.request_drop
    accept = dict(zip(("original", "reply"), (slot.accept_original, slot.accept_reply)))
    drop = dict(zip(("original", "reply"), (slot.drop_original, slot.drop_reply)))
    ct = "ct state { new, established } ct direction"
    keep = ~(bits.request | bits.slot_request_mask) & 0xFFFFFFFF
    rules = []
    for request, kept in ((ra, accept), (rd, drop)):
        for _, direction in _DIRECTIONS:
            bit = kept[direction]
            rules.append(f"meta mark and {request:#x} == {request:#x} {ct} {direction} "
                         f"ct mark set ct mark or {bit:#x}")
    if bits.other:
        rules.append(f"meta mark and {bits.request:#x} != 0 ct state {{ new, established }} "
                     f"jump {NFT_SLOT_CHAIN}")
    rules.append(f"meta mark and {rd:#x} == {rd:#x} drop")
    rules.append(f"meta mark and {ra:#x} == {ra:#x} meta mark set meta mark and {keep:#x} accept")
    # One lookup counts an offloaded packet under its slot (every value is in
    # the map); without slots, each kept-verdict rule counts (`ipqd counters`' slot 0).
    for kept, verdict in ((drop, "drop"), (accept, "accept")):
        count = "counter "
        if bits.other:
            cm = bits.slot_field_mask
            values = ", ".join(f'{bits.field_value(v):#x} : "{NFT_SLOT_COUNTER.format(v, verdict)}"'
                               for v in range(bits.other + 1))
            count = f"counter name ct mark and {cm:#x} map {{ {values} }} "
        for _, direction in _DIRECTIONS:
            bit = kept[direction]
            rules.append(f"{ct} {direction} ct mark and {bit:#x} == {bit:#x} {count}{verdict}")
    return rules


def _reject_iptables(chain: str, hook_chain: str, queue: QueueConfig, family: int) -> List[str]:
    bits = reject_bits(queue.offload) if queue.reject else None
    if bits is None or hook_chain not in REJECT_CHAINS:
        return []
    rules = []
    for kind, bit in bits.kinds:
        tcp = "-p tcp " if kind == "tcp-reset" else ""
        rules.append(f"-A {chain} -m mark --mark {bits.request | bit:#x}/{bits.mask:#x} {tcp}"
                     f"-j REJECT --reject-with {IPTABLES_REJECT[family][kind]}")
    # A request no rule above took (never sent by ipqd): dropped, not queued again.
    rules.append(f"-A {chain} -m mark --mark {bits.request:#x}/{bits.request:#x} -j DROP")
    return rules


def _reject_nft(hook_chain: str, queue: QueueConfig) -> List[str]:
    bits = reject_bits(queue.offload) if queue.reject else None
    if bits is None or hook_chain not in REJECT_CHAINS:
        return []
    rules = [f"meta mark and {bits.mask:#x} == {bits.request | bit:#x} {NFT_REJECT[kind]}"
             for kind, bit in bits.kinds]
    rules.append(f"meta mark and {bits.request:#x} == {bits.request:#x} drop")
    return rules


def _cgroup_marks(hook_chain: str, queue: QueueConfig, nft: bool) -> List[str]:
    """Rule bodies that write each cgroup path's number into the packet mark,
    shallowest first (the deepest path a packet lies under wins): output only,
    where packets have the socket that sent them."""
    layout = cgroup_layout(queue.offload, queue.cgroups)
    if layout is None or hook_chain != "output":
        return []
    mask = layout.mask
    keep = ~mask & 0xFFFFFFFF
    # first cleared: only these rules may say a packet's cgroup
    rules = ["meta mark set meta mark and {keep:#x}".format(keep=keep) if nft
             else f"-j MARK --set-xmark 0x0/{mask:#x}"]
    for number, path in enumerate(layout.paths, 1):
        value = layout.mark(number)
        if nft:
            rules.append(f'socket cgroupv2 level {depth(path)} "{path}" '
                         f"meta mark set meta mark and {keep:#x} or {value:#x}")
        else:
            rules.append(f"-m cgroup --path {path} -j MARK --set-xmark {value:#x}/{mask:#x}")
    return rules


def _slot_nft(bits: Layout) -> List[str]:
    """The table's rule-slot declarations: a counter per slot value and NFT_SLOT_CHAIN."""
    if bits is None or not bits.other or not bits.slots:
        return []
    pm, cm = bits.slot_request_mask, bits.slot_field_mask
    lines = [f"  counter {NFT_SLOT_COUNTER.format(v, verdict)} {{ }}"
             for v in range(bits.other + 1) for verdict in ("accept", "drop")]
    lines.append(f"  chain {NFT_SLOT_CHAIN} {{")
    for value in range(1, bits.other + 1):
        request, field = bits.request_value(value), bits.field_value(value)
        lines += [f"    meta mark and {pm:#x} == {request:#x} ct mark and {cm:#x} == 0 "
                  f"ct mark set ct mark or {field:#x}",
                  f"    meta mark and {pm:#x} == {request:#x} ct mark and {cm:#x} != {field:#x} "
                  f"ct mark set ct mark or {cm:#x}"]
    lines.append("  }")
    return lines


def _ipt_proto(proto: Optional[str], family: int) -> Optional[str]:
    """The -p argument for a hook's proto in one family; None: skip this family."""
    if proto is None:
        return ""
    table = _IPV6_PROTO if family == 6 else _IPV4_PROTO
    mapped = table.get(proto, proto)
    return None if mapped is None else f"-p {mapped} "


def plan_iptables(hooks: Sequence[Hook], queue: QueueConfig, variant: str) -> Plan:
    """iptables-restore scripts (one per family and table) for `variant`
    ("legacy" or "nft"). Declaring a chain in --noflush mode flushes it, so
    each script replaces ipqd's chains in one transaction."""
    rules: Dict[Tuple[int, str], Dict[str, List[str]]] = {}
    jumps = []
    bits = _offload_layout(hooks, queue)
    for hook in hooks:
        table, builtin = _IPT_PLACE[hook.chain]
        for family in _families(hook):
            proto = _ipt_proto(hook.proto, family)
            if proto is None:
                continue
            chains = rules.setdefault((family, table), {})
            name = chain_name(hook.chain)
            if name not in chains:
                offload = _offload_iptables(name, hook.chain, bits) if bits else []
                chains[name] = _reject_iptables(name, hook.chain, queue, family) + offload
                if offload:
                    cleared = bits.request | bits.slot_request_mask
                    chains[OFFLOAD_CHAIN] = [
                        f"-A {OFFLOAD_CHAIN} -j MARK --set-xmark 0x0/{cleared:#x}",
                        f"-A {OFFLOAD_CHAIN} -j ACCEPT"]
                    chains.update(_slot_chains_iptables(bits))
            chain_rules = chains[name]
            marks = [f"-A {name} {proto}{body}" for body in _cgroup_marks(hook.chain, queue, False)]
            chain_rules += [rule for rule in marks if rule not in chain_rules]
            for match, target in _queue_targets(queue):
                chain_rules.append(f"-A {chain_name(hook.chain)} {proto}{match}{target}")
            tool = ("iptables" if family == 4 else "ip6tables") + f"-{variant}"
            jump = (tool, table, builtin, chain_name(hook.chain))
            if jump not in jumps:
                jumps.append(jump)
    scripts = []
    for (family, table), chains in sorted(rules.items()):
        lines = [f"*{table}"] + [f":{name} - [0:0]" for name in chains]
        for name, chain_rules in chains.items():
            lines += chain_rules
        lines.append("COMMIT")
        tool = ("iptables" if family == 4 else "ip6tables") + f"-{variant}-restore"
        scripts.append(((tool, "-w", "--noflush"), "\n".join(lines) + "\n"))
    return Plan(f"iptables-{variant}", tuple(scripts), tuple(jumps))


def plan_nft(hooks: Sequence[Hook], queue: QueueConfig) -> Plan:
    """One nft script: table inet ipqd, replaced whole (add, delete, define)."""
    chains: Dict[str, List[str]] = {}
    bits = _offload_layout(hooks, queue)
    for hook in hooks:
        if hook.chain not in chains:
            chains[hook.chain] = _reject_nft(hook.chain, queue) + \
                (_offload_nft(hook.chain, bits) if bits else [])
        match = {"ipv4": "meta nfproto ipv4 ", "ipv6": "meta nfproto ipv6 ", "both": ""}[hook.family]
        if hook.proto:
            proto = {"icmpv6": "ipv6-icmp"}.get(hook.proto, hook.proto)
            match += f"meta l4proto {proto} "
        for body in _cgroup_marks(hook.chain, queue, True):
            if f"{match}{body}" not in chains[hook.chain]:
                chains[hook.chain].append(f"{match}{body}")
        for ct_match, target in _queue_targets(queue, nft=True):
            chains.setdefault(hook.chain, []).append(f"{match}{ct_match}{target}")
    lines = [f"table inet {NFT_TABLE}", f"delete table inet {NFT_TABLE}", f"table inet {NFT_TABLE} {{"]
    lines += _slot_nft(bits)
    for chain, rules in chains.items():
        lines.append(f"  chain {chain} {{")
        lines.append(f"    type filter hook {chain} priority {_NFT_PRIORITY[chain]}; policy accept;")
        lines += [f"    {rule}" for rule in rules]
        lines.append("  }")
    lines.append("}")
    return Plan("nft", ((("nft", "-f", "-"), "\n".join(lines) + "\n"),))


def plan(hooks: Sequence[Hook], queue: QueueConfig, backend: str) -> Plan:
    if backend == "nft":
        return plan_nft(hooks, queue)
    if backend in ("iptables-legacy", "iptables-nft"):
        return plan_iptables(hooks, queue, backend.split("-", 1)[1])
    raise HookError(f"unknown hooks backend {backend!r}: choose one of {', '.join(BACKENDS)}")
