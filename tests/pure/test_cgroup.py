"""Rules by cgroup, the pure parts: the numbers the output hook writes into
the packet mark, the hook rules' text, and the engine reading them back."""
from __future__ import annotations

import struct

from ipqd.decision.engine import Engine
from ipqd.kernel.hook_rules import plan
from ipqd.policy.cgroup import cgroup_layout, under
from ipqd.policy.loader import loads
from ipqd.policy.model import Offload
from ipqd.wire import nfqueue as nfq

POLICY = """\
version: 1
hooks: [{chain: output}]
default: {action: accept, log: false}
rules:
  - {name: nginx, hook: output, unit: nginx, proto: udp, action: accept, set_mark: 0x7}
  - {name: services, hook: output, cgroup: system.slice, proto: udp, action: drop}
  - {name: marked, hook: output, mark: "0x1/0xff", action: reject}
"""


def packet(mark: int, hook: int = 3) -> nfq.Packet:
    p = nfq.Packet(0, 2, 1, 0x0800, hook)
    p.payload = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, 1, 0, 64, 17, 0,
                            b"\x0a\x00\x00\x01", b"\x0a\x00\x00\x02") + \
        struct.pack("!HHHH", 40000, 53, 8, 0)
    p.mark = mark
    return p


def decide(engine, mark, **kw):
    return engine.decide(packet(mark, **kw), lambda i: None, None, 1.0).decision


def test_paths_are_numbered_shallowest_first_in_the_masks_lowest_bits():
    layout = cgroup_layout(Offload(), ["system.slice/nginx.service", "system.slice", "a"])
    assert layout.paths == ("a", "system.slice", "system.slice/nginx.service")
    assert layout.bits == (0x40000, 0x80000) and layout.mask == 0xC0000
    assert [layout.mark(n) for n in (1, 2, 3)] == [0x40000, 0x80000, 0xC0000]
    assert layout.path(0xC0000 | 0x11) == "system.slice/nginx.service"
    assert layout.path(0x11) is None
    assert under("system.slice/nginx.service", "system.slice")
    assert not under("system.slice2", "system.slice")
    assert cgroup_layout(Offload(), []) is None


def test_the_output_chain_clears_then_marks_each_path_before_queueing():
    policy = loads(POLICY)
    assert policy.queue.cgroups == ("system.slice", "system.slice/nginx.service")
    text = plan(policy.hooks, policy.queue, "iptables-legacy").scripts[0][1]
    lines = [line for line in text.splitlines() if "MARK" in line and "cgroup" in line
             or line.endswith("0x0/0xc0000")]
    assert lines == [
        "-A IPQD_OUTPUT -j MARK --set-xmark 0x0/0xc0000",
        "-A IPQD_OUTPUT -m cgroup --path system.slice -j MARK --set-xmark 0x40000/0xc0000",
        "-A IPQD_OUTPUT -m cgroup --path system.slice/nginx.service "
        "-j MARK --set-xmark 0x80000/0xc0000"]
    assert text.index("0x0/0xc0000") < text.index("--path system.slice ") < \
        text.index("NFQUEUE")
    nft = plan(policy.hooks, policy.queue, "nft").scripts[0][1]
    assert 'socket cgroupv2 level 2 "system.slice/nginx.service" meta mark set meta mark ' \
           "and 0xfff3ffff or 0x80000" in nft


def test_the_engine_reads_the_cgroup_from_the_mark_and_hides_its_bits():
    engine = Engine(loads(POLICY))
    assert decide(engine, 0x80000).rule.name == "nginx"           # the deepest path
    assert decide(engine, 0x40000).rule.name == "services"        # system.slice itself
    assert decide(engine, 0x0).rule is None                       # no cgroup named
    assert decide(engine, 0xC0001).rule.name == "marked"          # mark read without the bits
    assert "mark" in engine.needs                                 # cache keys hold the cgroup
