"""`action: reject`: which mark asks the kernel to refuse a packet, and how. Pure.

ipqd writes no packets. A rejected packet is answered NF_REPEAT with a
*reject request* in its mark: it goes through the same hook again, and the
first rules of ipqd's chain there (ipqd.kernel.hook_rules) hand it to the
kernel's own REJECT (iptables) or `reject` statement (nft), which sends the
TCP reset or ICMP error, with the checksums, addresses, rate limits and
"never answer an ICMP error" rules the kernel already has, and drops the
packet. The kernel can do this only at input, forward and output
(`REJECT_HOOKS`): at prerouting and postrouting a reject is a drop.

The bits come from the offload mask (`queue.offload.mask`, used whether
offload is on or off): a reject request is *both* offload request bits set,
which offload never does, plus one bit of the four below them naming the
refusal. Those four are connmark bits to offload, never set in a packet
mark by ipqd otherwise; and the request bits are never stored in a
connmark, so `CONNMARK --restore-mark` cannot forge a reject request.
"""
from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Tuple

from ipqd.errors import PolicyError
from ipqd.policy.model import (HOOKS, NF_INET_FORWARD, NF_INET_LOCAL_IN, NF_INET_LOCAL_OUT,
                               PROTO_TCP, REJECT_WITH, Offload, Policy)
from ipqd.policy.offload import MIN_BITS, bits_of

# The hooks where the kernel's REJECT works (ipt_REJECT/ip6t_REJECT check it).
REJECT_HOOKS = frozenset({NF_INET_LOCAL_IN, NF_INET_FORWARD, NF_INET_LOCAL_OUT})
REJECT_CHAINS = ("input", "forward", "output")

# Each refusal as iptables (per family) and nft (inet, both families) write it.
IPTABLES_REJECT = {
    4: {"tcp-reset": "tcp-reset", "port-unreachable": "icmp-port-unreachable",
        "admin-prohibited": "icmp-admin-prohibited", "host-unreachable": "icmp-host-unreachable"},
    6: {"tcp-reset": "tcp-reset", "port-unreachable": "icmp6-port-unreachable",
        "admin-prohibited": "icmp6-adm-prohibited", "host-unreachable": "icmp6-addr-unreachable"},
}
NFT_REJECT = {
    "tcp-reset": "meta l4proto tcp reject with tcp reset",
    "port-unreachable": "reject with icmpx type port-unreachable",
    "admin-prohibited": "reject with icmpx type admin-prohibited",
    "host-unreachable": "reject with icmpx type host-unreachable",
}


class RejectBits(NamedTuple):
    request: int                    # both bits set: "reject this packet"
    kinds: Tuple[Tuple[str, int], ...]      # (REJECT_WITH word, its bit)

    @property
    def mask(self) -> int:
        bits = self.request
        for _, bit in self.kinds:
            bits |= bit
        return bits

    def mark(self, kind: str) -> int:
        """The packet mark that asks for refusal `kind`."""
        return self.request | dict(self.kinds)[kind]


def reject_bits(offload: Offload) -> Optional[RejectBits]:
    """The reject bits of this mask; None when it has too few (the loader
    refuses such a mask)."""
    free = bits_of(offload.mask)
    if len(free) < MIN_BITS:
        return None
    return RejectBits(free[0] | free[1], tuple(zip(REJECT_WITH, free[2:6])))


def reject_kind(reject_with: Optional[str], proto: Optional[int],
                hook: Optional[int] = None) -> str:
    """The refusal a packet gets: the rule's `reject_with`, else a TCP reset
    for TCP and port-unreachable for everything else. At output a TCP
    packet gets port-unreachable too: the kernel's reset for a packet this
    host sends does not reach its own socket, its ICMP error does (and
    connect() fails with ECONNREFUSED either way)."""
    if reject_with is not None:
        return reject_with
    return "tcp-reset" if proto == PROTO_TCP and hook != NF_INET_LOCAL_OUT else "port-unreachable"


def describe(bits: RejectBits) -> Dict[str, int]:
    """{refusal: packet mark}, for `ipqd hooks show` and the docs."""
    return {kind: bits.request | bit for kind, bit in bits.kinds}


def rejects_as_drop(policy: Policy, default_node) -> List[PolicyError]:
    """A warning for each rejecting rule (and the default) that can decide
    packets at a hooked chain where the kernel cannot reject: there it drops;
    and for each TCP reset at output, which its own socket never sees."""
    hooked = {hook.chain for hook in policy.hooks}
    out = []
    if "output" in hooked:
        for rule in policy.rules:
            hooks = rule.match.hook
            if rule.reject_with == "tcp-reset" and rule.position is not None and \
                    (hooks is None or NF_INET_LOCAL_OUT in hooks):
                out.append(PolicyError(
                    rule.position.path, rule.position.line, rule.position.column,
                    f'rule "{rule.name}": at hook output the kernel\'s TCP reset does not reach '
                    "this host's own socket, which waits for its timeout: leave reject_with "
                    "out (port-unreachable refuses it at once) or add 'hook: input'",
                    severity="warning"))
    chains = sorted(hooked - set(REJECT_CHAINS))
    if not chains:
        return out
    for rule in policy.rules:
        if rule.action != "reject" or rule.position is None:
            continue
        hooks = rule.match.hook
        where = [c for c in chains if hooks is None or HOOKS[c] in hooks]
        if where:
            out.append(PolicyError(
                rule.position.path, rule.position.line, rule.position.column,
                f'rule "{rule.name}": at {_chains(where)} a reject is a drop (the kernel '
                "rejects only at input, forward and output): add 'hook: [input, forward, "
                "output]' or drop there on purpose with a rule of its own", severity="warning"))
    if policy.default.action == "reject" and default_node is not None:
        mark = default_node.start_mark
        out.append(PolicyError(policy.path, mark.line + 1, mark.column + 1,
                               f"default rejects, but at {_chains(chains)} a reject is a drop "
                               "(the kernel rejects only at input, forward and output)",
                               severity="warning"))
    return out


def _chains(chains: List[str]) -> str:
    words = [f"hook {c}" for c in chains]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
