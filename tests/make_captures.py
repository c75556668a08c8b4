"""Write the small captures tests/pure/test_explain.py replays, with dpkt.

    .venv/bin/python tests/make_captures.py

tests/captures/ipqd-mixed.pcap (Ethernet, one frame per case of
tests/captures/policy.yaml) and tests/captures/ipqd-sll.pcapng (Linux cooked
capture plus a raw-IP interface). The expected verdict of every frame is in
EXPECTED, which the tests import, so the file and the assertions stay together.
"""
from __future__ import annotations

import ipaddress
import os
import struct

import dpkt
from dpkt import pcap, pcapng

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "captures")
MAC_A = b"\x02\x00\x00\x00\x00\x01"
MAC_B = b"\x02\x00\x00\x00\x00\x02"


def a(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def ipv4(src, dst, l4, p, mf=0, offset=0, payload=b"") -> dpkt.ip.IP:
    if payload:
        l4.data = payload
    ip = dpkt.ip.IP(src=a(src), dst=a(dst), p=p, ttl=64, id=7, data=l4)
    ip.mf, ip.offset = mf, offset
    ip.len = len(ip)
    return ip


def ipv6(src, dst, l4, nxt) -> dpkt.ip6.IP6:
    ip = dpkt.ip6.IP6(src=a(src), dst=a(dst), nxt=nxt, hlim=64, data=l4)
    ip.plen = len(bytes(l4))
    return ip


def tcp(sport, dport, flags=dpkt.tcp.TH_SYN) -> dpkt.tcp.TCP:
    return dpkt.tcp.TCP(sport=sport, dport=dport, seq=1, win=65535, flags=flags)


def udp(sport, dport) -> dpkt.udp.UDP:
    u = dpkt.udp.UDP(sport=sport, dport=dport, data=b"q")
    u.ulen = len(u)
    return u


def ether(ip, vlan=None) -> bytes:
    kind = dpkt.ethernet.ETH_TYPE_IP6 if isinstance(ip, dpkt.ip6.IP6) else dpkt.ethernet.ETH_TYPE_IP
    tag = b"" if vlan is None else struct.pack("!HH", dpkt.ethernet.ETH_TYPE_8021Q, vlan)
    return MAC_B + MAC_A + tag + struct.pack("!H", kind) + bytes(ip)


def arp() -> bytes:
    body = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, MAC_A, a("10.0.0.5"),
                       b"\x00" * 6, a("10.0.0.1"))
    return b"\xff" * 6 + MAC_A + struct.pack("!H", dpkt.ethernet.ETH_TYPE_ARP) + body


def short_total_length() -> bytes:
    packet = bytearray(bytes(ipv4("10.0.0.5", "10.0.0.1", tcp(40000, 22), 6)))
    packet[2:4] = struct.pack("!H", 16)            # total length below the header's 20
    return ether(bytes(packet))


# (frame bytes, original length or None, verdict, rule or None for the default,
#  what the summary starts with or "skipped")
def mixed_frames():
    big = ether(ipv4("10.0.0.5", "10.0.0.1", tcp(40000, 22), 6, payload=b"x" * 1000))
    hidden = ether(ipv4("10.0.0.5", "10.0.0.1", tcp(40000, 22), 6))
    return [
        (ether(ipv4("10.0.0.5", "10.0.0.1", tcp(40000, 22), 6)), None, "accept", "ssh",
         "tcp 10.0.0.5:40000 -> 10.0.0.1:22 [S] len=40"),
        (ether(ipv4("192.168.9.9", "10.0.0.1", tcp(40000, 22), 6)), None, "drop", None,
         "tcp 192.168.9.9:40000 -> 10.0.0.1:22 [S] len=40"),
        (arp(), None, None, None, "skipped"),
        (ether(ipv4("10.0.0.5", "10.0.0.1", udp(5353, 53), 17), vlan=42), None, "accept", "dns",
         "udp 10.0.0.5:5353 -> 10.0.0.1:53 len=29"),
        (ether(ipv6("fd00::1", "fd00::2", udp(5353, 53), 17)), None, "accept", "dns",
         "udp [fd00::1]:5353 -> [fd00::2]:53 len=49"),
        (ether(ipv4("10.0.0.5", "10.0.0.1", dpkt.icmp.ICMP(
            type=8, data=dpkt.icmp.ICMP.Echo(id=1, seq=1)), 1)), None, "accept", "ping",
         "icmp 10.0.0.5 -> 10.0.0.1 echo-request len=28"),
        (ether(ipv6("fd00::1", "fd00::2", dpkt.icmp6.ICMP6(type=128, data=b"\0\1\0\1"), 58)),
         None, "accept", "ping6", "icmpv6 fd00::1 -> fd00::2 echo-request len=48"),
        (ether(ipv4("10.0.0.5", "10.0.0.1", b"\x00" * 16, 17, offset=1480)), None, "accept",
         "fragments", "udp 10.0.0.5 -> 10.0.0.1 frag=not-first len=36"),
        (short_total_length(), None, "drop", "bad", "malformed: IPv4 total length 16"),
        (big[:14 + 40 + 20], len(big), "accept", "ssh",
         "tcp 10.0.0.5:40000 -> 10.0.0.1:22 [S] len=1040"),
        (hidden[:14 + 24], len(hidden), "drop", "queue.undecidable",
         "tcp 10.0.0.5 -> 10.0.0.1 len=40 (transport header past copy_range)"),
        (ether(ipv4("10.0.0.5", "10.0.0.1", tcp(40000, 23), 6)), None, "drop", "no-telnet",
         "tcp 10.0.0.5:40000 -> 10.0.0.1:23 [S] len=40"),
    ]


def sll(protocol: int, payload: bytes) -> bytes:
    # packet type 0 (to us), ARPHRD_ETHER, 6-byte address
    return struct.pack("!HHH8sH", 0, 1, 6, MAC_A + b"\0\0", protocol) + payload


def sll_frames():
    return [
        (0, sll(dpkt.ethernet.ETH_TYPE_IP, bytes(ipv4("10.0.0.5", "10.0.0.1", tcp(1, 22), 6))),
         "accept", "ssh", "tcp 10.0.0.5:1 -> 10.0.0.1:22 [S] len=40"),
        (0, sll(dpkt.ethernet.ETH_TYPE_ARP, b"\x00" * 28), None, None, "skipped"),
        (1, bytes(ipv6("fd00::1", "fd00::2", udp(1, 53), 17)), "accept", "dns",
         "udp [fd00::1]:1 -> [fd00::2]:53 len=49"),
        (1, b"\x60" + b"\x00" * 10, "drop", "bad", "malformed: truncated IPv6 header"),
    ]


EXPECTED = {
    "ipqd-mixed.pcap": [f[2:] for f in mixed_frames()],
    "ipqd-sll.pcapng": [f[2:] for f in sll_frames()],
}


def write_pcap(path: str, frames) -> None:
    header = pcap.LEFileHdr(magic=pcap.TCPDUMP_MAGIC, v_major=2, v_minor=4, thiszone=0,
                            sigfigs=0, snaplen=65535, linktype=pcap.DLT_EN10MB)
    out = [bytes(header)]
    for n, (data, wire_len, *_rest) in enumerate(frames):
        record = pcap.LEPktHdr(tv_sec=1_700_000_000 + n, tv_usec=0, caplen=len(data),
                               len=wire_len or len(data))
        out += [bytes(record), data]
    with open(path, "wb") as f:
        f.write(b"".join(out))


def write_many_flows(path: str, count: int, per_second: int = 1000) -> None:
    """A large capture, written as it is made: `count` packets, TCP SYN and
    SYN/ACK pairs of distinct connections (85 bytes a frame; 200,000 make
    17 MB and 100,000 connections, more than explain's conntrack table
    holds). The frames are patched copies of two: checksums are not fixed
    (nothing that reads them checks them)."""
    syn = bytearray(ether(ipv4("10.0.0.5", "10.0.0.1", tcp(1024, 22), 6, payload=b"x" * 15)))
    reply = bytearray(ether(ipv4("10.0.0.1", "10.0.0.5", tcp(22, 1024, dpkt.tcp.TH_SYN |
                                                            dpkt.tcp.TH_ACK), 6,
                                 payload=b"x" * 15)))
    ip, ports = 14, 14 + 20
    header = pcap.LEFileHdr(magic=pcap.TCPDUMP_MAGIC, v_major=2, v_minor=4, thiszone=0,
                            sigfigs=0, snaplen=65535, linktype=pcap.DLT_EN10MB)
    with open(path, "wb") as f:
        f.write(bytes(header))
        for n in range(count):
            flow = n // 2
            client = struct.pack("!I", 0x0A010000 + flow // 50000)      # 10.1.x.y
            port = 1024 + flow % 50000
            frame = syn if n % 2 == 0 else reply
            if n % 2 == 0:
                frame[ip + 12:ip + 16] = client
                struct.pack_into("!H", frame, ports, port)
            else:
                frame[ip + 16:ip + 20] = client
                struct.pack_into("!H", frame, ports + 2, port)
            f.write(struct.pack("<IIII", 1_700_000_000 + n // per_second,
                                (n % per_second) * (1_000_000 // per_second), len(frame),
                                len(frame)))
            f.write(frame)


def write_pcapng(path: str, frames) -> None:
    shb = pcapng.SectionHeaderBlockLE()
    idbs = [pcapng.InterfaceDescriptionBlockLE(linktype=pcap.DLT_LINUX_SLL, snaplen=65535),
            pcapng.InterfaceDescriptionBlockLE(linktype=101, snaplen=65535)]
    blocks = [bytes(shb)] + [bytes(i) for i in idbs]
    for n, (iface, data, *_rest) in enumerate(frames):
        ts = (1_700_000_000 + n) * 1_000_000
        blocks.append(bytes(pcapng.EnhancedPacketBlockLE(
            iface_id=iface, ts_high=ts >> 32, ts_low=ts & 0xFFFFFFFF, caplen=len(data),
            pkt_len=len(data), pkt_data=data)))
    with open(path, "wb") as f:
        f.write(b"".join(blocks))


def main() -> None:
    write_pcap(os.path.join(HERE, "ipqd-mixed.pcap"), mixed_frames())
    write_pcapng(os.path.join(HERE, "ipqd-sll.pcapng"), sll_frames())


if __name__ == "__main__":
    main()
