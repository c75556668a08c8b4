"""`action: reject`, the pure parts: the loader's words, the mark that asks
the kernel to refuse, the engine's answer (never cached, never offloaded,
no loop without hook rules), and the hook rules' text."""
from __future__ import annotations

import struct

import pytest

from ipqd.decision.compiler import offload_states
from ipqd.decision.engine import Engine
from ipqd.errors import PolicyErrors
from ipqd.kernel.hook_rules import plan
from ipqd.policy.loader import loads
from ipqd.policy.model import Offload
from ipqd.policy.reject import reject_bits, reject_kind
from ipqd.wire import nfqueue as nfq

POLICY = """\
version: 1
hooks:
  - {chain: input}
  - {chain: prerouting}
default: {action: accept, log: false}
rules:
  - {name: telnet, proto: tcp, dport: 23, hook: [input, prerouting], action: reject}
  - {name: dns, proto: udp, dport: 53, action: reject, reject_with: admin-prohibited}
  - {name: web, proto: tcp, dport: 80, action: reject, reject_with: port-unreachable}
"""
TCP, UDP = 6, 17
RESET, UNREACHABLE, PROHIBITED = 0xE0000000, 0xD0000000, 0xC8000000


def packet(proto: int, dport: int, mark: int = 0, hook: int = 1) -> nfq.Packet:
    p = nfq.Packet(0, 2, 1, 0x0800, hook)
    if proto == TCP:
        l4 = struct.pack("!HHIIBBHHH", 40000, dport, 1, 0, 5 << 4, 0x02, 65535, 0, 0)
    else:
        l4 = struct.pack("!HHHH", 40000, dport, 8, 0)
    p.payload = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, 0, 64, proto, 0,
                            b"\x0a\x00\x00\x01", b"\x0a\x00\x00\x02") + l4
    p.mark = mark
    return p


def decide(engine, *args, key=None, **kw):
    return engine.decide(packet(*args, **kw), lambda i: None, "new", 1.0, key)


def test_the_mark_names_the_refusal_in_bits_offload_never_sets_together():
    bits = reject_bits(Offload())
    assert bits.request == 0xC0000000            # both offload request bits
    assert [bits.mark(k) for k in ("tcp-reset", "port-unreachable", "admin-prohibited",
                                   "host-unreachable")] == [RESET, UNREACHABLE, PROHIBITED,
                                                            0xC4000000]
    assert reject_bits(Offload(mask=0x3F)).mark("tcp-reset") == 0x38


def test_without_reject_with_tcp_gets_a_reset_and_the_rest_port_unreachable():
    assert reject_kind(None, TCP) == "tcp-reset"
    assert reject_kind(None, UDP) == "port-unreachable"
    assert reject_kind(None, None) == "port-unreachable"
    assert reject_kind("admin-prohibited", TCP) == "admin-prohibited"


def test_a_reject_is_a_repeat_with_the_mark_of_its_refusal():
    engine = Engine(loads(POLICY))
    assert (decide(engine, TCP, 23).verdict, decide(engine, TCP, 23).mark) == \
        (nfq.NF_REPEAT, RESET)
    assert decide(engine, UDP, 53).mark == PROHIBITED
    assert decide(engine, TCP, 80).mark == UNREACHABLE
    c = engine.counters
    assert (c.packets, c.dropped, c.rejected, c.accepted) == (4, 4, 4, 0)
    # an accept, offloaded: one request bit, the default's rule slot below it
    assert decide(engine, TCP, 22).mark & 0xC0000000 == 0x80000000


def test_where_the_kernel_cannot_reject_a_reject_is_a_drop():
    engine = Engine(loads(POLICY))
    assert decide(engine, TCP, 23, hook=0).verdict == nfq.NF_DROP        # prerouting
    assert engine.counters.rejected == 0 and engine.counters.dropped == 1
    unhooked = Engine(loads(POLICY.replace("  - {chain: input}\n", "")))
    assert decide(unhooked, TCP, 23).verdict == nfq.NF_DROP


def test_a_request_that_comes_back_is_dropped_and_stops_the_asking():
    """No hook rules took it (--no-hooks): asking again would loop the packet."""
    engine = Engine(loads(POLICY))
    back = decide(engine, TCP, 23, mark=RESET)
    assert (back.verdict, back.mark) == (nfq.NF_DROP, None)
    assert engine.counters.reject_returned == 1 and not engine.rejecting
    assert Engine(loads(POLICY)).decide(packet(UDP, 53, mark=0x80000000), lambda i: None, "new",
                                        1.0).verdict == nfq.NF_DROP     # an offload request too
    assert decide(engine, UDP, 53).verdict == nfq.NF_DROP


def test_rejects_are_never_cached_nor_offloaded():
    policy = loads(POLICY)
    engine = Engine(policy)
    decide(engine, TCP, 23, key=("k",))
    decide(engine, TCP, 23, hook=0, key=("k0",))       # a drop here, but still a reject
    assert engine.cache.entries == {}
    per_rule, default = offload_states(policy.rules, policy.default)
    assert per_rule == (frozenset(),) * 3
    rejecting = loads(POLICY.replace("default: {action: accept, log: false}",
                                     "default: {action: reject, log: false}"))
    assert offload_states(rejecting.rules, rejecting.default)[1] == frozenset()


def test_the_hooks_refuse_first_and_only_where_the_kernel_can():
    policy = loads(POLICY)
    assert policy.queue.reject
    nft = plan(policy.hooks, policy.queue, "nft").scripts[0][1]
    chains = {text.split()[0]: text for text in nft.split("chain ")[1:]}
    assert "reject with tcp reset" in chains["input"] and "reject" not in chains["prerouting"]
    lines = chains["input"].splitlines()
    assert "tcp reset" in lines[2]                       # before offload and queue rules
    assert lines[6] == "    meta mark and 0xc0000000 == 0xc0000000 drop"
    legacy = plan(policy.hooks, policy.queue, "iptables-legacy").scripts
    filters = [text for (argv, text) in legacy if "*filter" in text]
    assert "--reject-with icmp-admin-prohibited" in filters[0]
    assert "--reject-with icmp6-adm-prohibited" in filters[1]
    assert "-m mark --mark 0xe0000000/0xfc000000 -p tcp -j REJECT --reject-with tcp-reset" \
        in filters[0]
    plain = loads(POLICY.replace("action: reject", "action: drop")
                  .replace(", reject_with: admin-prohibited", "")
                  .replace(", reject_with: port-unreachable", ""))
    assert not plain.queue.reject
    assert "REJECT" not in "".join(t for _, t in plan(plain.hooks, plain.queue,
                                                         "iptables-legacy").scripts)


@pytest.mark.parametrize("text, message", [
    ("{name: a, proto: udp, action: reject, reject_with: tcp-reset}",
     "reject_with tcp-reset needs proto tcp"),
    ("{name: a, proto: udp, action: accept, reject_with: port-unreachable}",
     "reject_with only works with action reject, not accept"),
    ("{name: a, proto: udp, action: reject, reject_with: icmp-port-unreachable}",
     "unknown reject_with 'icmp-port-unreachable'"),
    ("{name: a, action: reject, set_mark: 1}",
     "a rejected packet keeps no mark"),
])
def test_what_the_loader_refuses(text, message):
    with pytest.raises(PolicyErrors) as caught:
        loads(f"version: 1\nhooks: [{{chain: input}}]\ndefault: {{action: accept}}\n"
              f"rules:\n  - {text}\n")
    assert message in str(caught.value)
