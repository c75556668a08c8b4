"""Flow offload, the pure parts: which decisions may be offloaded (compiler),
the NF_REPEAT answer (engine), the mark bits, the hook rules' text, and the
`queue.offload` setting."""
from __future__ import annotations

import dataclasses
import ipaddress
import struct
import textwrap

import pytest
import yaml

from ipqd.kernel import hooks
from ipqd.wire import nfqueue as nfq
from ipqd.decision.compiler import compile_policy, disjoint, offload_states
from ipqd.decision.engine import Engine
from ipqd.policy.offload import assign_slots, layout
from ipqd.policy._nodes import Where
from ipqd.policy._offload import parse_offload
from ipqd.policy.loader import loads
from ipqd.policy.model import (AddrMatch, Default, Hook, Match, Offload, Policy, QueueConfig,
                               RangeMatch, Rate, Rule, TcpFlagsMatch)

BOTH = frozenset({"new", "established"})
EST = frozenset({"established"})
NONE = frozenset()
NET = ipaddress.ip_network


def rule(name="r", action="accept", **match) -> Rule:
    extra = {k: match.pop(k) for k in ("log", "set_mark", "rate", "offload") if k in match}
    return Rule(name=name, match=Match(**match), action=action, **extra)


def states(*rules, default=Default("drop", log=False)):
    return offload_states(rules, default)


def ports(*values, negate=False) -> RangeMatch:
    return RangeMatch(tuple((v, v) if isinstance(v, int) else v for v in values), negate)


# ---------------------------------------------------------------- the compiler

def test_flow_fields_only_offload_from_any_state():
    per_rule, default = states(rule(proto=frozenset({6}), dport=ports(22)),
                               rule(src=AddrMatch((NET("10.0.0.0/8"),)), action="drop"))
    assert per_rule == (BOTH, BOTH)
    assert default == BOTH


def test_what_a_rule_does_per_packet_keeps_it_in_userspace():
    per_rule, _ = states(rule("log", proto=frozenset({6}), log=True),
                         rule("mark", proto=frozenset({17}), set_mark=7),
                         rule("rate", proto=frozenset({1}), rate=Rate(10, 10)),
                         rule("opt-out", proto=frozenset({132}), offload=False))
    assert per_rule == (NONE, NONE, NONE, NONE)


def test_a_rule_without_log_logs_as_the_default_says():
    quiet = rule(proto=frozenset({6}))
    assert states(quiet, default=Default("drop", log=True)) == ((NONE,), NONE)
    assert states(quiet, default=Default("drop", log=False)) == ((BOTH,), BOTH)
    loud = rule(proto=frozenset({6}), log=False)
    assert states(loud, default=Default("drop", log=True)) == ((BOTH,), NONE)


def test_per_packet_fields_are_never_offloaded():
    per_rule, default = states(rule(proto=frozenset({6}), tcp_flags=TcpFlagsMatch(0x12, 0x02)))
    assert per_rule == (NONE,)
    assert default == NONE        # a later packet could have SYN set and match the rule


def test_ct_state_established_offloads_from_established_only():
    per_rule, default = states(rule(ct_state=frozenset({"established", "related"})))
    assert per_rule == (EST,)
    # The default: a new packet's successors become established and match the rule.
    assert default == EST


def test_default_after_a_new_only_rule():
    per_rule, default = states(rule(proto=frozenset({6}), ct_state=frozenset({"new"}),
                                    action="drop"))
    assert per_rule == (NONE,)          # later packets become established: no longer match
    assert default == EST               # from established it stays unmatched


def test_earlier_per_packet_rule_blocks_unless_disjoint_on_flow_fields():
    syn = rule("syn-to-web", proto=frozenset({6}), dport=ports(80),
               tcp_flags=TcpFlagsMatch(0x02, 0x02), action="drop")
    per_rule, _ = states(syn,
                         rule("ssh", proto=frozenset({6}), dport=ports(22)),
                         rule("web", proto=frozenset({6}), dport=ports(80)),
                         rule("dns", proto=frozenset({17}), dport=ports(53)),
                         rule("not-web", proto=frozenset({6}), dport=ports(80, negate=True)),
                         rule("all-tcp", proto=frozenset({6})))
    assert per_rule == (NONE, BOTH, NONE, BOTH, BOTH, NONE)


def test_disjoint_by_addresses_families_and_hooks():
    a = Match(src=AddrMatch((NET("10.0.0.0/8"),)))
    assert disjoint(a, Match(src=AddrMatch((NET("192.168.0.0/16"),))))
    assert not disjoint(a, Match(src=AddrMatch((NET("10.1.0.0/16"),))))
    assert disjoint(a, Match(family=6))
    # negated networks are never used to prove anything
    assert not disjoint(a, Match(src=AddrMatch((NET("192.168.0.0/16"),), negate=True)))
    assert disjoint(Match(hook=frozenset({1})), Match(hook=frozenset({3})))
    assert not disjoint(Match(dport=ports((1000, 2000))), Match(dport=ports(1500)))
    assert disjoint(Match(dport=ports((1000, 2000), negate=True)), Match(dport=ports(1500)))


def test_malformed_rules_do_not_block_later_ones():
    per_rule, _ = states(rule("junk", malformed=True, action="drop"),
                         rule("ssh", proto=frozenset({6}), dport=ports(22)))
    assert per_rule == (NONE, BOTH)


def test_matcher_decisions_carry_the_states_and_mode_off_clears_them():
    rules = (rule(proto=frozenset({6}), dport=ports(22)),)
    on = Policy(path="p", rules=rules, default=Default("drop", log=False))
    off = Policy(path="p", rules=rules, default=Default("drop", log=False),
                 queue=QueueConfig(offload=Offload("off")))
    assert compile_policy(on)._compiled[0].decision.offload == BOTH
    assert compile_policy(on)._default.offload == BOTH
    assert compile_policy(off)._compiled[0].decision.offload == NONE
    assert compile_policy(off)._default.offload == NONE


# ---------------------------------------------------------------- the bits

def test_layout_takes_bits_from_the_top_of_the_mask_in_chain_order():
    bits = layout(Offload(), ["output", "input"])
    assert (bits.request_accept, bits.request_drop) == (0x80000000, 0x40000000)
    assert bits.slot("input") == ("input", 0x20000000, 0x10000000, 0x08000000, 0x04000000)
    assert bits.slot("output").accept_original == 0x02000000
    assert bits.mask == 0xFFFC0000        # the last four: the rule slot field
    assert bits.hooks == frozenset({1, 3})


def test_rule_slots_take_the_bits_left_and_name_the_rest_other():
    bits = layout(Offload(), ["output", "input"])
    assert bits.slot_field_mask == 0x003C0000 and bits.slot_request_mask == 0x3C000000
    assert (bits.other, bits.rule_slots) == (15, 14)
    assert bits.request_value(5) == 0x14000000 and bits.field_value(5) == 0x00140000
    names = [f"r{i}" for i in range(16)] + ["r0"]
    slots = assign_slots(names, bits)
    assert [slots[f"r{i}"] for i in range(16)] == list(range(1, 15)) + [15, 15]
    # Three chains take every bit of the default mask: no slots, all "other" (0).
    full = layout(Offload(), ["input", "output", "forward"])
    assert full.other == 0 and assign_slots(["a"], full) == {"a": 0}
    # A wider mask gives the slots back.
    assert layout(Offload(mask=0xFFFF0000), ["input", "output", "forward"]).other == 3


def test_small_mask_offloads_the_chains_that_fit_and_off_is_none():
    bits = layout(Offload(mask=0x3F), ["forward", "input"])
    assert [s.chain for s in bits.slots] == ["input"]
    assert bits.request == 0x30
    assert layout(Offload(mode="off"), ["input"]) is None


# ---------------------------------------------------------------- the engine

HOOKED = """\
version: 1
hooks: [{chain: input}]
default: {action: drop, log: false}
rules:
  - {name: web, proto: tcp, dport: 80, action: accept, log: false}
  - {name: telnet, proto: tcp, dport: 23, action: drop, log: false}
  - {name: ssh, proto: tcp, dport: 22, action: accept, log: true}
"""


def tcp_packet(dport: int, mark: int = 0, hook: int = 1) -> nfq.Packet:
    packet = nfq.Packet(0, 2, 1, 0x0800, hook)
    tcp = struct.pack("!HHIIBBHHH", 40000, dport, 1, 0, 5 << 4, 0x10, 65535, 0, 0)
    packet.payload = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 1, 0, 64, 6, 0,
                                 b"\x0a\x00\x00\x01", b"\x0a\x00\x00\x02") + tcp
    packet.mark = mark
    return packet


def decide(engine, dport, ct_state="established", **kw):
    return engine.decide(tcp_packet(dport, **kw), lambda i: None, ct_state, 1.0)


def test_offloadable_accept_and_drop_answer_repeat_with_the_request_bit():
    engine = Engine(loads(HOOKED))
    # The request bit, and the rule's slot in the four bits below: web 1, telnet 2.
    assert engine.matcher.offload_slots == {"web": 1, "telnet": 2, "default": 3}
    accept = decide(engine, 80, mark=0x11)
    assert (accept.verdict, accept.mark) == (nfq.NF_REPEAT, 0x84000011)
    drop = decide(engine, 23, mark=0x3C000000)      # slot bits of no request: replaced
    assert (drop.verdict, drop.mark) == (nfq.NF_REPEAT, 0x48000000)
    logged = decide(engine, 22)
    assert (logged.verdict, logged.mark) == (nfq.NF_ACCEPT, None)
    c = engine.counters
    assert (c.packets, c.accepted, c.dropped, c.offloaded) == (3, 2, 1, 2)


def test_a_packet_already_carrying_a_request_gets_a_plain_verdict():
    """No loop: it came back without meeting ipqd's hook rules."""
    engine = Engine(loads(HOOKED))
    again = decide(engine, 80, mark=0x80000000)
    assert (again.verdict, again.mark) == (nfq.NF_ACCEPT, None)
    again = decide(engine, 23, mark=0x40000005)
    assert again.verdict == nfq.NF_DROP
    assert engine.counters.offloaded == 0


def test_a_request_that_comes_back_stops_the_engine_asking():
    """Without rules to take requests, asking would send every packet twice."""
    policy = loads(HOOKED)
    engine = Engine(policy)
    assert decide(engine, 80).verdict == nfq.NF_REPEAT
    assert decide(engine, 80, mark=0x80000000).verdict == nfq.NF_ACCEPT     # it came back
    assert decide(engine, 80).verdict == nfq.NF_ACCEPT and not engine.offloading
    assert decide(engine, 23).verdict == nfq.NF_DROP
    assert engine.counters.offload_returned == 1 and engine.counters.offloaded == 1
    # a reload asks again (the hooks may have been installed meanwhile)
    successor = Engine(policy)
    successor.take_over(engine.carry_over())
    assert decide(successor, 80).verdict == nfq.NF_REPEAT


def test_no_offload_at_unhooked_chains_untracked_packets_or_with_mode_off():
    engine = Engine(loads(HOOKED))
    assert decide(engine, 80, hook=3).verdict == nfq.NF_ACCEPT        # output: no hook rules
    assert decide(engine, 80, ct_state="untracked").verdict == nfq.NF_ACCEPT
    assert decide(engine, 80, ct_state="related").verdict == nfq.NF_ACCEPT
    assert decide(engine, 80, ct_state=None).verdict == nfq.NF_REPEAT    # no conntrack queues
    off = dataclasses.replace(loads(HOOKED), queue=QueueConfig(offload=Offload("off")))
    assert decide(Engine(off), 80).verdict == nfq.NF_ACCEPT


def test_repeat_is_never_cached():
    engine = Engine(loads(HOOKED))
    for _ in range(3):
        assert decide(engine, 80).verdict == nfq.NF_REPEAT
    assert not engine.cache.entries


# ---------------------------------------------------------------- the hook rules

# Six bits: the requests and one chain's, none left for rule slots.
NO_SLOTS = Offload(mask=0xFC000000)


def test_iptables_plan_starts_each_chain_with_the_offload_rules():
    plan = hooks.plan([Hook("input", "ipv4")], QueueConfig(nums=(3,), offload=NO_SLOTS),
                      "iptables-legacy")
    (argv, text), = plan.scripts
    ct = "-m conntrack --ctstate NEW,ESTABLISHED --ctdir"
    assert text == textwrap.dedent(f"""\
        *filter
        :IPQD_INPUT - [0:0]
        :IPQD_OFFLOAD - [0:0]
        -A IPQD_INPUT -m mark --mark 0x80000000/0x80000000 {ct} ORIGINAL -j CONNMARK --set-xmark 0x20000000/0x20000000
        -A IPQD_INPUT -m mark --mark 0x80000000/0x80000000 {ct} REPLY -j CONNMARK --set-xmark 0x10000000/0x10000000
        -A IPQD_INPUT -m mark --mark 0x40000000/0x40000000 {ct} ORIGINAL -j CONNMARK --set-xmark 0x8000000/0x8000000
        -A IPQD_INPUT -m mark --mark 0x40000000/0x40000000 {ct} REPLY -j CONNMARK --set-xmark 0x4000000/0x4000000
        -A IPQD_INPUT -m mark --mark 0x40000000/0x40000000 -j DROP
        -A IPQD_INPUT -m mark --mark 0x80000000/0x80000000 -j IPQD_OFFLOAD
        -A IPQD_INPUT {ct} ORIGINAL -m connmark --mark 0x8000000/0x8000000 -j DROP
        -A IPQD_INPUT {ct} REPLY -m connmark --mark 0x4000000/0x4000000 -j DROP
        -A IPQD_INPUT {ct} ORIGINAL -m connmark --mark 0x20000000/0x20000000 -j ACCEPT
        -A IPQD_INPUT {ct} REPLY -m connmark --mark 0x10000000/0x10000000 -j ACCEPT
        -A IPQD_INPUT -j NFQUEUE --queue-num 3 --queue-bypass
        -A IPQD_OFFLOAD -j MARK --set-xmark 0x0/0xc0000000
        -A IPQD_OFFLOAD -j ACCEPT
        COMMIT
        """)


def test_iptables_rule_slots_are_written_once_per_flow_and_counted_per_slot():
    # Two bits left for slots: values 1 and 2 name rules, 3 is "other".
    queue = QueueConfig(nums=(3,), offload=Offload(mask=0xFF000000))
    (argv, text), = hooks.plan([Hook("input", "ipv4")], queue, "iptables-legacy").scripts
    lines = text.splitlines()
    ct = "-m conntrack --ctstate NEW,ESTABLISHED"
    # Requests only (either bit) jump to the slot chain, before the request is applied.
    jumps = [i for i, line in enumerate(lines) if line.endswith("-j IPQD_SLOT")]
    assert [lines[i] for i in jumps] == [
        f"-A IPQD_INPUT -m mark --mark 0x80000000/0x80000000 {ct} -j IPQD_SLOT",
        f"-A IPQD_INPUT -m mark --mark 0x40000000/0x40000000 {ct} -j IPQD_SLOT"]
    assert max(jumps) < lines.index("-A IPQD_INPUT -m mark --mark 0x40000000/0x40000000 -j DROP")
    slot = [line for line in lines if line.startswith("-A IPQD_SLOT")]
    assert slot[:2] == [
        "-A IPQD_SLOT -m mark --mark 0x4000000/0xc000000 -m connmark --mark 0x0/0x3000000 "
        "-j CONNMARK --set-xmark 0x1000000/0x3000000",
        "-A IPQD_SLOT -m mark --mark 0x4000000/0xc000000 -m connmark ! --mark 0x1000000/0x3000000 "
        "-j CONNMARK --set-xmark 0x3000000/0x3000000"]
    assert len(slot) == 6
    # Offloaded packets: counted by the rule of their slot, then the verdict.
    assert f"-A IPQD_INPUT {ct} --ctdir ORIGINAL -m connmark --mark 0x20000000/0x20000000 " \
        "-j IPQD_KEPT_ACCEPT" in lines
    assert [line for line in lines if line.startswith("-A IPQD_KEPT_DROP")] == [
        "-A IPQD_KEPT_DROP -m connmark --mark 0x1000000/0x3000000 -m comment --comment "
        "ipqd-slot-1 -j DROP",
        "-A IPQD_KEPT_DROP -m connmark --mark 0x2000000/0x3000000 -m comment --comment "
        "ipqd-slot-2 -j DROP",
        "-A IPQD_KEPT_DROP -m connmark --mark 0x3000000/0x3000000 -m comment --comment "
        "ipqd-slot-3 -j DROP",
        "-A IPQD_KEPT_DROP -m comment --comment ipqd-slot-0 -j DROP"]
    # An accepted request leaves with neither the request nor its slot.
    assert "-A IPQD_OFFLOAD -j MARK --set-xmark 0x0/0xcc000000" in lines


def test_nft_rule_slots_count_with_one_map_lookup():
    queue = QueueConfig(nums=(3,), offload=Offload(mask=0xFF000000))
    text = hooks.plan([Hook("input")], queue, "nft").scripts[0][1]
    assert "  counter slot_3_drop { }" in text and "  counter slot_0_accept { }" in text
    assert "meta mark and 0xc0000000 != 0 ct state { new, established } jump rule_slot" in text
    assert "meta mark and 0xc000000 == 0x8000000 ct mark and 0x3000000 == 0 " \
        "ct mark set ct mark or 0x2000000" in text
    assert "ct direction reply ct mark and 0x10000000 == 0x10000000 counter name ct mark and " \
        '0x3000000 map { 0x0 : "slot_0_accept", 0x1000000 : "slot_1_accept", 0x2000000 : ' \
        '"slot_2_accept", 0x3000000 : "slot_3_accept" } accept' in text
    assert "meta mark set meta mark and 0x33ffffff accept" in text


def test_offload_rules_come_once_per_chain_before_the_conntrack_queues():
    queue = QueueConfig(nums=(0,), conntrack=True)
    plan = hooks.plan([Hook("forward", "ipv4", "tcp"), Hook("forward", "ipv4", "udp")], queue,
                      "iptables-nft")
    (argv, text), = plan.scripts
    lines = text.splitlines()
    assert sum("CONNMARK" in line and line.startswith("-A IPQD_FORWARD") for line in lines) == 4
    last_offload = max(i for i, line in enumerate(lines)
                       if "connmark" in line and line.startswith("-A IPQD_FORWARD"))
    first_queue = min(i for i, line in enumerate(lines) if "NFQUEUE" in line)
    assert last_offload < first_queue
    # forward is the only hooked chain: it gets the first chain bits
    assert "--ctdir ORIGINAL -m connmark --mark 0x20000000/0x20000000 -j IPQD_KEPT_ACCEPT" in text


def test_nft_plan_uses_ct_and_meta_mark():
    plan = hooks.plan([Hook("output")], QueueConfig(nums=(2,), bypass=False, offload=NO_SLOTS),
                      "nft")
    text = plan.scripts[0][1]
    assert textwrap.indent(textwrap.dedent("""\
          chain output {
            type filter hook output priority 0; policy accept;
            meta mark and 0x80000000 == 0x80000000 ct state { new, established } ct direction original ct mark set ct mark or 0x20000000
            meta mark and 0x80000000 == 0x80000000 ct state { new, established } ct direction reply ct mark set ct mark or 0x10000000
            meta mark and 0x40000000 == 0x40000000 ct state { new, established } ct direction original ct mark set ct mark or 0x8000000
            meta mark and 0x40000000 == 0x40000000 ct state { new, established } ct direction reply ct mark set ct mark or 0x4000000
            meta mark and 0x40000000 == 0x40000000 drop
            meta mark and 0x80000000 == 0x80000000 meta mark set meta mark and 0x3fffffff accept
            ct state { new, established } ct direction original ct mark and 0x8000000 == 0x8000000 counter drop
            ct state { new, established } ct direction reply ct mark and 0x4000000 == 0x4000000 counter drop
            ct state { new, established } ct direction original ct mark and 0x20000000 == 0x20000000 counter accept
            ct state { new, established } ct direction reply ct mark and 0x10000000 == 0x10000000 counter accept
            queue num 2
          }
        """), "  ") in text


def test_offload_off_plans_only_the_queue_rules():
    queue = QueueConfig(offload=Offload("off"))
    for backend in ("iptables-legacy", "nft"):
        text = "".join(s for _, s in hooks.plan([Hook("input")], queue, backend).scripts)
        assert "mark" not in text and "OFFLOAD" not in text


# ---------------------------------------------------------------- queue.offload

def parse(text):
    problems = []
    node = yaml.compose(text)
    return parse_offload(Where("p.yaml", problems), node), [str(p) for p in problems]


@pytest.mark.parametrize("text, expected", [
    ("auto", Offload()),
    ("off", Offload("off")),
    ("{mode: off}", Offload("off")),
    ("{mask: 0xff}", Offload("auto", 0xff)),
])
def test_offload_setting(text, expected):
    assert parse(text) == (expected, [])


@pytest.mark.parametrize("text, message", [
    ("on", "p.yaml:1:1: queue.offload: unknown mode 'on' (expected auto or off)"),
    ("{mask: 0x300}", "p.yaml:1:8: queue.offload: mask 0x300 has 2 bits set, but offload needs "
                      "at least 6 (2, plus 4 for each hooked chain): widen the mask or write "
                      "'offload: off'"),
    ("{bits: 1}", "p.yaml:1:2: queue.offload: unknown field 'bits' (expected mode or mask)"),
    ("{mask: high}", "p.yaml:1:8: queue.offload: mask must be a number from 0 to 0xffffffff, "
                     "not 'high'"),
])
def test_offload_setting_errors(text, message):
    assert parse(text) == (None, [message])


def test_a_reload_that_gives_a_slot_to_another_rule_makes_its_counts_mixed():
    """The kernel's per-slot counts outlive a reload: a value that changes
    owner belongs to no single rule from then on."""
    before = Engine(loads(HOOKED))
    assert before.matcher.offload_slots == {"web": 1, "telnet": 2, "default": 3}
    web = "  - {name: web, proto: tcp, dport: 80, action: accept, log: false}\n"
    swapped = HOOKED.replace(web, "") + web              # web last: telnet takes slot 1
    after = Engine(loads(swapped))
    after.take_over(before.carry_over())
    assert after.matcher.offload_slots == {"telnet": 1, "web": 2, "default": 3}
    assert after.matcher.counters()["offload_mixed"] == [1, 2]
    again = Engine(loads(swapped))             # the next reload keeps them mixed
    again.take_over(after.carry_over())
    assert again.matcher.counters()["offload_mixed"] == [1, 2]
