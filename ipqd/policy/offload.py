"""Flow offload: which mark bits mean what. Pure.

When ipqd's verdict for every later packet of a flow is certain (the
compiler says which decisions are: `Decision.offload`), the worker answers
NF_REPEAT with a *request* bit in the packet mark. The packet goes through
the same hook again; the hook chain's first rules (ipqd.kernel.hooks) copy the
request into the flow's conntrack mark, in a bit of that chain and that
conntrack direction, clear the request and accept (or drop) the packet.
Later packets of the flow in that direction, at that chain, are accepted or
dropped by the kernel and never reach ipqd.

Why this dance: a verdict could carry the connmark itself (NFQA_CT), but only
on kernels with CONFIG_NETFILTER_NETLINK_GLUE_CT, and ipqd does not know the
packet's conntrack direction, which the kernel rules do (`--ctdir`).

Bits are taken from the top of `Offload.mask` down: two request bits (packet
mark only, never stored in the connmark, so a `CONNMARK --restore-mark` can
never forge a request), then four per hooked chain (accept and drop, each for
the original and the reply direction), chains in `CHAIN_ORDER`. Chains that
find no bits left are not offloaded.
"""
from __future__ import annotations

from typing import Iterable, NamedTuple, Optional, Tuple

from ipqd.policy.model import HOOKS, Offload

# Chains in the order they get bits: the host's own traffic first.
CHAIN_ORDER = ("input", "output", "forward", "prerouting", "postrouting")
REQUEST_BITS = 2
BITS_PER_CHAIN = 4
MIN_BITS = REQUEST_BITS + BITS_PER_CHAIN


class Slot(NamedTuple):
    """The connmark bits of one chain."""
    chain: str
    accept_original: int
    accept_reply: int
    drop_original: int
    drop_reply: int


class Layout(NamedTuple):
    request_accept: int              # packet mark: "remember accept for this flow"
    request_drop: int                # packet mark: "remember drop for this flow"
    slots: Tuple[Slot, ...]          # the chains that are offloaded

    @property
    def request(self) -> int:
        return self.request_accept | self.request_drop

    @property
    def mask(self) -> int:
        """Every bit in use, packet mark and connmark."""
        bits = self.request
        for slot in self.slots:
            bits |= slot.accept_original | slot.accept_reply | slot.drop_original | slot.drop_reply
        return bits

    def slot(self, chain: str) -> Optional[Slot]:
        for slot in self.slots:
            if slot.chain == chain:
                return slot
        return None

    @property
    def hooks(self) -> frozenset:
        """The NF_INET_* hook numbers of the offloaded chains."""
        return frozenset(HOOKS[slot.chain] for slot in self.slots)


def bits_of(mask: int) -> Tuple[int, ...]:
    """The single-bit values set in `mask`, highest first."""
    return tuple(1 << n for n in range(31, -1, -1) if mask >> n & 1)


def layout(offload: Offload, chains: Iterable[str]) -> Optional[Layout]:
    """The bits for hooks on `chains`; None when offload is off or the mask
    is too small for even one chain (the loader refuses such a mask)."""
    if offload.mode == "off":
        return None
    free = list(bits_of(offload.mask))
    if len(free) < MIN_BITS:
        return None
    request_accept, request_drop = free.pop(0), free.pop(0)
    wanted = set(chains)
    slots = []
    for chain in CHAIN_ORDER:
        if chain in wanted and len(free) >= BITS_PER_CHAIN:
            slots.append(Slot(chain, *(free.pop(0) for _ in range(BITS_PER_CHAIN))))
    return Layout(request_accept, request_drop, tuple(slots))
