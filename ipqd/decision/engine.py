"""The decision engine: a queued packet in, a verdict out. Pure.

`Engine.decide` turns the kernel's description of a packet (ipqd.wire.nfqueue.Packet)
into the view rules match (ipqd.decision.packet.parse), asks the compiled policy
(ipqd.decision.compiler.Matcher) and returns the verdict to send. Every path ends in
exactly one verdict: a packet that cannot be parsed is matched as malformed
(and usually falls to the default); one whose copy hides a field its
verdict depends on gets the policy's `queue.undecidable` action, counted.
A packet that cannot be decided at all (an exception inside the decision
code; in the worker's socket, a message that does not decode or a family
its queue was not bound for) gets `fallback_verdict`, the one answer for
all of them.

Flow offload: a decision whose verdict holds for the rest of the flow
(`Decision.offload`) is answered NF_REPEAT with a request bit in the packet
mark; ipqd's hook rules then write it into the flow's conntrack mark and
accept or drop the packet (see ipqd.policy.offload).

Reject: a decision with action reject is answered NF_REPEAT with a reject
request in the packet mark; ipqd's hook rules hand the packet to the
kernel's REJECT (see ipqd.policy.reject). At a hook where the kernel cannot
reject, or once a request has come back (no hook rules took it), it is a
drop. Rejects are neither cached nor offloaded: each packet is decided, so
every later packet of a rejected flow is refused in turn.
"""
from __future__ import annotations

from typing import Callable, Dict, NamedTuple, Optional

from ipqd.decision.address_set import load_snapshot
from ipqd.decision.codegen import decider_for
from ipqd.decision.compiler import UNDECIDABLE, Decision, Matcher, compile_policy
from ipqd.wire.nfnetlink import NFPROTO_IPV4, NFPROTO_IPV6
from ipqd.wire.nfqueue import NF_ACCEPT, NF_DROP, NF_REPEAT, Packet
from ipqd.policy.offload import layout as offload_layout
from ipqd.decision.packet import PacketMeta, PacketView, parse
from ipqd.policy.model import HOOKS, Policy
from ipqd.policy.cgroup import split_mark
from ipqd.policy.reject import REJECT_HOOKS, reject_bits, reject_kind
from ipqd.decision.shadow import Shadow, disagree
from ipqd.decision.verdict_cache import CachedVerdict, VerdictCache

_FAMILY = {NFPROTO_IPV4: 4, NFPROTO_IPV6: 6}


def fallback_verdict(policy: Policy) -> int:
    """The verdict (NF_ACCEPT or NF_DROP) of a packet ipqd cannot decide:
    the decision code failed on it, its message does not decode, or it is
    of a family its queue was not bound for. The policy has no key of its
    own for these: its default's action answers them (docs/policy.md), and
    in monitor mode every packet is accepted."""
    if policy.mode == "monitor":
        return NF_ACCEPT
    return NF_ACCEPT if policy.default.action == "accept" else NF_DROP


class Verdict(NamedTuple):
    verdict: int                 # NF_ACCEPT, NF_DROP, or NF_REPEAT to offload the flow
    mark: Optional[int]          # a new packet mark, or None to leave it
    decision: Decision
    view: Optional[PacketView]   # None only when the decision code failed
    # False: monitor mode accepted a packet the policy would drop or reject
    # (decision.action says what it would have done).
    enforced: bool = True


class Counters:
    """What the engine decided, in total."""
    __slots__ = ("packets", "accepted", "dropped", "malformed", "errors", "offloaded",
                 "offload_returned", "undecidable", "rejected", "reject_returned",
                 "not_enforced", "shadow_decided", "shadow_disagreed")

    def __init__(self) -> None:
        self.packets = self.accepted = self.dropped = self.malformed = self.errors = 0
        self.rejected = 0        # of the dropped: handed to the kernel's REJECT
        self.reject_returned = 0     # reject requests that came back: dropped instead
        self.not_enforced = 0    # of the accepted: would-be drops and rejects (monitor mode)
        self.shadow_decided = self.shadow_disagreed = 0     # by a shadow policy, beside
        self.undecidable = 0     # given queue.undecidable: the copy hid what the rules needed
        self.offloaded = 0       # verdicts handed to the kernel for the rest of a flow
        self.offload_returned = 0    # requests that came back: no hook rules took them

    def as_dict(self) -> Dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class Engine:
    """A compiled policy plus the counters that outlive reloads. It keeps
    none of the policy's rules: the matcher has what it needs."""

    def __init__(self, policy: Policy, matcher: Optional[Matcher] = None,
                 counters: Optional[Counters] = None, caching: bool = True):
        self.caching = caching            # False: decide stores nothing (ipqd run --no-cache)
        self.matcher = matcher or compile_policy(policy)
        # A candidate deciding beside (ipqd.decision.shadow): the view has what both read.
        self.shadow = Shadow(policy.shadow) if policy.shadow is not None else None
        self.needs = self.matcher.fields | (self.shadow.matcher.fields if self.shadow else set())
        self.disagreement: Optional[Decision] = None    # the last decide's, for the log
        self.counters = counters or Counters()
        self._rule_bytes = self.matcher.bytes_by_index
        # The answer to what cannot be decided: for the socket owner too (see the worker).
        self.fallback_verdict = fallback_verdict(policy)
        default = policy.default
        accept = self.fallback_verdict == NF_ACCEPT
        self._fallback_decision = Decision(None, -1, "accept" if accept else "drop",
                                           default.set_mark if accept else None, default.log)
        offload = offload_layout(policy.queue.offload, {hook.chain for hook in policy.hooks})
        # Per compiled policy: a reload starts empty. Keys it does not hold
        # are decided by the policy's generated function where it can: not
        # with a shadow (which must see every packet) nor in monitor mode
        # (whose would-be drops are accepted, logged and counted).
        generated = caching and self.shadow is None and policy.mode != "monitor"
        self.decider = decider_for(policy, self.needs) if generated else None
        self.cache = VerdictCache(decide=self.decider.decide if self.decider else None)
        self._offload_hooks = offload.hooks if offload else frozenset()
        self._request = offload.request if offload else 0
        # Cleared from the mark of a request: the request and its rule slot.
        self._request_bits = (offload.request | offload.slot_request_mask) if offload else 0
        self._request_accept = offload.request_accept if offload else 0
        self._request_drop = offload.request_drop if offload else 0
        # Cleared when a request comes back: nothing takes requests (--no-hooks
        # without ipqd's rules), and asking would send each packet through twice.
        # Never with a shadow: an offloaded flow's packets would not reach it.
        self.offloading = bool(self._offload_hooks) and self.shadow is None
        # The hooks where ipqd's own chain can reject (its hook rules hold the
        # REJECT rules when the policy rejects); elsewhere a reject is a drop.
        bits = reject_bits(policy.queue.offload) if policy.queue.reject else None
        self._reject_bits = bits
        self._reject_request = bits.request if bits else 0
        self._reject_hooks = frozenset(HOOKS[hook.chain] for hook in policy.hooks) & REJECT_HOOKS \
            if bits else frozenset()
        self.rejecting = bool(self._reject_hooks)
        # cgroup rules: the output hook wrote the packet's cgroup into the mark.
        self._cgroups = self.matcher.cgroups
        # Monitor mode: every packet accepted, what the policy would do logged.
        self.monitor = policy.mode == "monitor"

    def carry_over(self) -> dict:
        """What a successor worker takes over (`take_over`): the totals, the
        cache's counts and the matcher's (plain data, for a pipe)."""
        self.settle()
        return {"counters": self.counters.as_dict(), "matcher": self.matcher.carry_over(),
                "cache": (self.cache.hits, self.cache.misses, self.cache.flushes)}

    def take_over(self, state: dict) -> None:
        """Count on from a predecessor's `carry_over` (a reload's new worker)."""
        for name, value in state["counters"].items():
            setattr(self.counters, name, getattr(self.counters, name) + value)
        self.matcher.take_over(state["matcher"])
        hits, misses, flushes = state["cache"]
        self.cache.hits += hits
        self.cache.misses += misses
        self.cache.flushes += flushes

    def decide(self, packet: Packet, ifname: Callable[[Optional[int]], Optional[str]],
               ct_state: Optional[str], now: float, key: Optional[tuple] = None) -> Verdict:
        """The verdict on a decoded packet. `key`, the packet's cache key
        (read by a KeyMaker of `cache`, which found no verdict under it), stores the
        decision when it may be cached."""
        counters = self.counters
        counters.packets += 1
        self.disagreement = None
        try:
            mark, cgroups = packet.mark, self._cgroups
            if cgroups is not None:
                cgroup, mark = split_mark(cgroups, mark)
            meta = PacketMeta(packet.hook, ifname(packet.indev), ifname(packet.outdev), mark,
                              packet.uid, packet.gid, ct_state, packet.cap_len,
                              _FAMILY.get(packet.family))
            view = parse(packet.payload or b"", meta, self.needs)
            if cgroups is not None:
                view.cgroup = cgroup
            decision = self.matcher.decide(view, now)
            # Bytes beside the hit the matcher counted: the length on the wire.
            self._rule_bytes[decision.rule_index] += packet.wire_len
            shadow = self.shadow
            if shadow is not None:
                seen = shadow.decide(view, now)
                counters.shadow_decided += 1
                if disagree(decision, seen):
                    counters.shadow_disagreed += 1
                    self.disagreement = seen
        except Exception:       # the per-packet boundary: the default, counted
            return self.fallback()
        if view.malformed:
            counters.malformed += 1
            return self._finish(decision, view)
        if view.hidden:         # decided on part of the packet: never cached
            if decision.rule_index == UNDECIDABLE:
                counters.undecidable += 1
            return self._finish(decision, view)
        verdict = self._finish(decision, view)
        if key is not None and self.caching and not self.matcher.rated \
                and (verdict.verdict == NF_ACCEPT or verdict.verdict == NF_DROP) \
                and decision.action != "reject" and verdict.enforced:
            if shadow is None:
                self.cache.admit(key, CachedVerdict(verdict.verdict, verdict.mark,
                                                    decision.rule_index, decision.log))
            elif not shadow.matcher.rated:
                # the pair: a disagreement is logged like a logged decision
                disagrees = self.disagreement is not None
                self.cache.admit(key, CachedVerdict(
                    verdict.verdict, verdict.mark, decision.rule_index,
                    decision.log or disagrees, seen.rule_index, disagrees))
        return verdict

    def change_set(self, name: str, op: str, entries=()) -> None:
        """A dynamic set's change, as the supervisor sends it: `add` or `del`
        these entries, `flush` the set, `load` it whole (a snapshot, see
        ipqd.decision.address_set.snapshot). Every cached verdict is
        forgotten, since the set may have decided it. A set this policy
        does not have is ignored (its change raced a reload). A shadow
        policy's set of the same name gets the same change."""
        stores = [self.matcher.sets.get(name)]
        if self.shadow is not None:
            stores.append(self.shadow.matcher.sets.get(name))
        for store in stores:
            if store is not None:
                _change(store, op, entries)
        self.cache.invalidate()

    def settle(self, at_least: int = 0) -> None:
        """Add the cache's hits since the last call to the totals, as `decide`
        would have counted each: before anyone reads them. With `at_least`,
        only once that many entries have been hit (bounded work per call)."""
        cache = self.cache
        if len(cache.touched) < at_least:
            return
        counters = self.counters
        tally = self.matcher.tally
        shadow_tally = self.shadow.matcher.tally if self.shadow is not None else None
        for entry in cache.touched:
            hits, entry.hits = entry.hits, 0
            size, entry.bytes = entry.bytes, 0
            if not entry.fresh:             # a decider's answer: a miss, decided
                cache.hits += hits
            counters.packets += hits
            if entry.accept:
                counters.accepted += hits
            else:
                counters.dropped += hits
            tally(entry.rule_index, hits, size)
            if shadow_tally is not None:
                counters.shadow_decided += hits
                if entry.disagrees:
                    counters.shadow_disagreed += hits
                shadow_tally(entry.shadow_index, hits)
        cache.touched.clear()

    def fallback(self) -> Verdict:
        """The verdict for a packet the decision code failed on
        (`fallback_verdict`), counted as an error."""
        self.counters.errors += 1
        return self._finish(self._fallback_decision, None)

    def _finish(self, decision: Decision, view: Optional[PacketView]) -> Verdict:
        if self.monitor and decision.action != "accept":
            # Accepted, not offloaded, not cached, and always logged: each
            # would-be drop is seen and counted.
            self.counters.accepted += 1
            self.counters.not_enforced += 1
            return Verdict(NF_ACCEPT, None, decision._replace(log=True, offload=frozenset()),
                           view, False)
        if decision.action == "reject":
            return self._rejected(decision, view)
        if decision.offload and self.offloading and view is not None \
                and view.hook in self._offload_hooks:
            offloaded = self._offloaded(decision, view)
            if offloaded is not None:
                return offloaded
        if decision.action == "accept":
            self.counters.accepted += 1
            return Verdict(NF_ACCEPT, decision.mark, decision, view)
        self.counters.dropped += 1
        return Verdict(NF_DROP, None, decision, view)

    def _offloaded(self, decision: Decision, view: PacketView) -> Optional[Verdict]:
        """NF_REPEAT asking the hook rules to remember the verdict for the flow,
        or None to answer this packet alone."""
        mark = view.mark or 0
        state = view.ct_state
        # A packet that already carries a request came back without meeting
        # ipqd's hook rules (--no-hooks, rules of the administrator's own):
        # asking again would loop it, and asking for other flows would only
        # send their packets through twice, so this engine stops asking.
        if mark & self._request:
            self.counters.offload_returned += 1
            self.offloading = False
            return None
        if view.malformed or (state is not None and state not in decision.offload):
            return None
        self.counters.offloaded += 1
        mark = (mark & ~self._request_bits) | decision.offload_slot
        if decision.action == "accept":
            self.counters.accepted += 1
            return Verdict(NF_REPEAT, mark | self._request_accept, decision, view)
        self.counters.dropped += 1
        return Verdict(NF_REPEAT, mark | self._request_drop, decision, view)

    def _rejected(self, decision: Decision, view: Optional[PacketView]) -> Verdict:
        """NF_REPEAT with a reject request, or a drop where ipqd cannot reject."""
        self.counters.dropped += 1
        if view is None or not self.rejecting or view.hook not in self._reject_hooks:
            return Verdict(NF_DROP, None, decision, view)
        if (view.mark or 0) & self._reject_request:
            # Back from NF_REPEAT without meeting ipqd's rules, which would have
            # taken any request (--no-hooks, the administrator's own queue
            # rules): asking again would loop it.
            self.counters.reject_returned += 1
            self.rejecting = False
            return Verdict(NF_DROP, None, decision, view)
        self.counters.rejected += 1
        kind = reject_kind(decision.reject_with, view.proto, view.hook)
        return Verdict(NF_REPEAT, self._reject_bits.mark(kind), decision, view)


def _change(store, op: str, entries) -> None:
    if op == "add":
        for entry in entries:
            store.add(entry)
    elif op == "del":
        for entry in entries:
            store.discard(entry)
    elif op == "flush":
        store.clear()
    elif op == "load":
        store.clear()
        load_snapshot(store, entries)
    else:
        raise ValueError(f"unknown set change {op!r}")
