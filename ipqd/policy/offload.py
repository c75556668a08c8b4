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

Rule slots, so that the kernel's counts of offloaded packets go to the
rule that offloaded the flow (`ipqd counters`): up to SLOT_BITS of the
bits left after the chains' form the connmark's *slot field*. Each
offloadable rule name (in rule order, then the default) gets a slot value
1, 2, ...; the last value, all ones, is "other": rules past the slots,
and flows offloaded by two rules (e.g. at input by one, at output by
another). A request carries the value in the four packet-mark bits below
the request bits (connmark bits of the first chain, never set in a packet
mark otherwise), and the kernel rules copy it into the slot field the
first time the flow is offloaded, or make it "other" when it differs.
With no bits left there are no slots: every offloaded packet is "other".
"""
from __future__ import annotations

from typing import Iterable, NamedTuple, Optional, Tuple

from ipqd.policy.model import HOOKS, Offload

# Chains in the order they get bits: the host's own traffic first.
CHAIN_ORDER = ("input", "output", "forward", "prerouting", "postrouting")
REQUEST_BITS = 2
BITS_PER_CHAIN = 4
MIN_BITS = REQUEST_BITS + BITS_PER_CHAIN
# The slot field's widest: 14 rules with a slot each, and "other". Past it
# the kernel's counting chain (iptables: one rule per value) would grow.
SLOT_BITS = 4


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
    # Rule slots (see the module's docstring): bits lowest first, bit j
    # carrying 2**j of the slot value; () when no bits are left.
    slot_request: Tuple[int, ...] = ()   # packet mark, beside a request bit
    slot_field: Tuple[int, ...] = ()     # connmark: the rule that offloaded the flow

    @property
    def request(self) -> int:
        return self.request_accept | self.request_drop

    @property
    def other(self) -> int:
        """The slot value of everything without a slot of its own; 0: no slots."""
        return (1 << len(self.slot_field)) - 1

    @property
    def rule_slots(self) -> int:
        """How many rule names can have a slot of their own."""
        return max(self.other - 1, 0)

    def request_value(self, value: int) -> int:
        """The packet-mark bits that carry slot `value` in a request."""
        return _spread(value, self.slot_request)

    def field_value(self, value: int) -> int:
        """The connmark bits that hold slot `value`."""
        return _spread(value, self.slot_field)

    @property
    def slot_request_mask(self) -> int:
        return _spread(self.other, self.slot_request)

    @property
    def slot_field_mask(self) -> int:
        return _spread(self.other, self.slot_field)

    @property
    def mask(self) -> int:
        """Every bit in use, packet mark and connmark."""
        bits = self.request | self.slot_request_mask | self.slot_field_mask
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


def _spread(value: int, bits: Tuple[int, ...]) -> int:
    return sum(bit for j, bit in enumerate(bits) if value >> j & 1)


def assign_slots(names: Iterable[str], bits: Optional[Layout]) -> dict:
    """Rule name -> slot value for the offloadable rules `names` (in rule
    order, the default last): 1, 2, ... while values last, then `other`."""
    slots: dict = {}
    if bits is None or not bits.other:
        return {name: 0 for name in names}
    for name in names:
        if name not in slots:
            slots[name] = len(slots) + 1 if len(slots) < bits.rule_slots else bits.other
    return slots


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
    slot_request = tuple(reversed(free[:SLOT_BITS]))
    wanted = set(chains)
    slots = []
    for chain in CHAIN_ORDER:
        if chain in wanted and len(free) >= BITS_PER_CHAIN:
            slots.append(Slot(chain, *(free.pop(0) for _ in range(BITS_PER_CHAIN))))
    width = min(SLOT_BITS, len(free))
    if width < 2:           # one bit would hold "other" alone: no rule slot
        return Layout(request_accept, request_drop, tuple(slots))
    field = tuple(reversed(free[:width]))
    return Layout(request_accept, request_drop, tuple(slots), slot_request[:width], field)
