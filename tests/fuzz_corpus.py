"""Seeds and builders for the fuzz tests and the atheris harnesses.

Real packets: every IP packet in tests/captures and in the shared tcpdump
captures (hostile ones included), the payloads and whole messages of the
recorded kernel fixtures, and hand-built worst cases (long IPv6 extension
chains, IPv4 options, lying lengths, fragments).
"""
from __future__ import annotations

import glob
import os
import struct
from typing import List

from ipqd.wire import nfqueue as nfq
from ipqd.tools.pcap import read_capture, ip_payload

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CAPTURE_DIRS = [os.path.join(HERE, "captures"), "/work/shared/captures/tcpdump-tests"]
KERNEL_FIXTURES = os.path.join(HERE, "fixtures", "kernel")

# A policy that reads every field a rule can test, so the matcher walks every path.
FUZZ_POLICY = """\
version: 1
queue: {num: 0, copy_range: 256}
hooks: [{chain: input}, {chain: output}]
default: {action: drop, log: true}
logging: {rate: 100/second}
sets:
  lan: [10.0.0.0/8, 192.168.0.0/16, "fd00::/8"]
  web: [80, 443, 8000-8099]
rules:
  - {name: bad, malformed: true, action: drop}
  - {name: est, ct_state: [established, related], action: accept}
  - {name: lo, in: lo, action: accept}
  - {name: out-root, hook: output, uid: 0, gid: "0-10", action: accept, set_mark: 0x10}
  - {name: marked, mark: "0x10/0xff", length: "0-1500", action: accept}
  - {name: frags, fragment: not-first, src: "!@lan", action: drop}
  - {name: ssh, proto: tcp, dport: 22, tcp_flags: "syn,!ack", src: "@lan", action: accept}
  - {name: web, proto: tcp, dport: "@web", action: accept, log: false}
  - {name: not-dns, proto: [udp, udplite, sctp], dport: "!53", sport: "1024-65535", action: drop}
  - {name: ping, proto: icmp, icmp_type: echo-request, icmp_code: 0, rate: 50/second, action: accept}
  - {name: nd, proto: icmpv6, icmp_type: [neighbour-solicitation, 136], action: accept}
  - {name: v6-out, family: ipv6, out: "!eth9", dst: "!fd00::/8", action: accept}
  - {name: gre, proto: [gre, esp, ah, 255], action: drop}
  - {name: flood, proto: udp, dport: 9999, rate: {limit: 5/second, per: [src/24, dport], keys: 64}, action: accept}
  - {name: watch, proto: tcp, dport: [25, 113], action: log}
  - {name: office, proto: tcp, dport: 8080, time: {days: [mon, fri], hours: "22:00-06:00", tz: Europe/Paris}, action: drop}
  - {name: svc, hook: output, cgroup: [system.slice, system.slice/x.service], proto: tcp, action: accept}
  - {name: ident, proto: tcp, dport: 113, action: reject}
  - {name: snmp, proto: udp, dport: 161-162, action: reject, reject_with: admin-prohibited}
  - {name: other-udp, proto: udp, hook: [input, output], action: reject}
"""


def capture_packets() -> List[bytes]:
    """Every IP packet of every capture we keep (those that hold one)."""
    packets = []
    for directory in CAPTURE_DIRS:
        for path in sorted(glob.glob(os.path.join(directory, "*.pcap*"))):
            try:
                with open(path, "rb") as f:
                    for frame in read_capture(f):
                        try:
                            packets.append(ip_payload(frame).payload)
                        except Exception:
                            continue
            except Exception:           # a damaged capture: keep what was read
                continue
    return [p for p in packets if p]


def kernel_messages() -> List[bytes]:
    """The recorded kernel datagrams (tests/fixtures/kernel/*.hex)."""
    messages = []
    for path in sorted(glob.glob(os.path.join(KERNEL_FIXTURES, "*.hex"))):
        with open(path) as f:
            messages.append(bytes.fromhex(f.read().strip()))
    return messages


def kernel_payloads() -> List[bytes]:
    payloads = []
    for message in kernel_messages():
        for event in nfq.QueueProtocol().receive_data(message):
            if isinstance(event, nfq.Packet) and event.payload:
                payloads.append(event.payload)
    return payloads


# ------------------------------------------------------------- hand-built worst cases

def ipv4(payload: bytes, proto: int = 17, options: bytes = b"", total: int = None,
         frag: int = 0, src: bytes = b"\x0a\x00\x00\x01", dst: bytes = b"\x0a\x00\x00\x02") -> bytes:
    options += b"\x00" * (-len(options) % 4)
    ihl = 5 + len(options) // 4
    length = total if total is not None else ihl * 4 + len(payload)
    return struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, length, 1, frag, 64, proto, 0,
                       src, dst) + options + payload


def ipv6(payload: bytes, nxt: int = 17, plen: int = None,
         src: bytes = b"\xfd" + b"\x00" * 14 + b"\x01",
         dst: bytes = b"\xfd" + b"\x00" * 14 + b"\x02") -> bytes:
    length = len(payload) if plen is None else plen
    return struct.pack("!IHBB", 0x60000000, length, nxt, 64) + src + dst + payload


def udp(sport: int = 40000, dport: int = 53, data: bytes = b"q") -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data


def tcp(sport: int = 40000, dport: int = 22, flags: int = 0x02) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 65535, 0, 0)


def ext_chain(count: int, last: int, hdr_len: int = 255, pad1: bool = True) -> tuple:
    """`count` IPv6 destination-options headers, each (hdr_len + 1) * 8 bytes,
    filled with Pad1 (the slowest option to walk), the last pointing to `last`."""
    chain = b""
    for i in range(count):
        nxt = 60 if i < count - 1 else last
        body = (b"\x00" if pad1 else b"\x01\x00") * ((hdr_len + 1) * 8 - 2)
        chain += bytes([nxt, hdr_len]) + body[:(hdr_len + 1) * 8 - 2]
    return 60 if count else last, chain


def worst_cases() -> dict:
    """Named packets that make parse and decide work hardest."""
    cases = {}
    # A Hop-by-Hop header of 2 KiB of Pad1 with a zero payload length: the
    # jumbo-option search walks every byte; then 7 more 2 KiB headers.
    nxt, chain = ext_chain(7, 6)
    rest = chain + tcp()
    hop = bytes([60, 255]) + b"\x00" * 2040 + b"\xc2\x04" + struct.pack("!I", 2048 + len(rest))
    cases["ipv6-jumbo-search-8-ext-2k"] = ipv6(hop + rest, nxt=0, plen=0)
    nxt, chain = ext_chain(8, 6)
    cases["ipv6-8-ext-2k-tcp"] = ipv6(chain + tcp(), nxt=nxt)
    nxt, chain = ext_chain(9, 6, hdr_len=0)
    cases["ipv6-9-ext"] = ipv6(chain + tcp(), nxt=nxt)
    # The most headers a 1,500-byte packet holds: one loop turn each.
    nxt, chain = ext_chain((1500 - 40 - 20) // 8, 6, hdr_len=0, pad1=False)
    cases["ipv6-180-ext-in-1500-bytes"] = ipv6(chain + tcp(), nxt=nxt)
    nxt, chain = ext_chain(7, 44, hdr_len=0)
    cases["ipv6-ext-then-fragment"] = ipv6(chain + bytes([6, 0, 0, 1, 0, 0, 0, 1]) + tcp(), nxt=nxt)
    cases["ipv6-lying-plen"] = ipv6(udp(), plen=65535)
    cases["ipv4-40-bytes-options"] = ipv4(tcp(), proto=6, options=b"\x01" * 39 + b"\x00")
    cases["ipv4-lying-total"] = ipv4(udp(), total=65535)
    cases["ipv4-total-below-header"] = ipv4(udp(), total=10)
    cases["ipv4-not-first-fragment"] = ipv4(b"\x00" * 16, frag=100)
    cases["ipv4-first-fragment"] = ipv4(tcp(), proto=6, frag=0x2000)
    cases["ipv4-udp-lying-length"] = ipv4(struct.pack("!HHHH", 1, 53, 60000, 0))
    cases["ipv4-tcp-data-offset-15"] = ipv4(tcp()[:12] + b"\xf0" + tcp()[13:], proto=6)
    cases["ipv4-plain-tcp"] = ipv4(tcp(), proto=6)
    return cases


def seeds() -> List[bytes]:
    return capture_packets() + kernel_payloads() + list(worst_cases().values())


def packet_message(payload: bytes, *, packet_id: int = 1, family: int = 2, queue: int = 0,
                   hook: int = 1, **attrs) -> bytes:
    """A packet message as the kernel sends it, with `payload` and attributes."""
    packet = nfq.Packet(queue, family, packet_id, 0x0800, hook)
    packet.payload = payload
    for name, value in attrs.items():
        setattr(packet, name, value)
    return nfq.encode_packet(packet)
