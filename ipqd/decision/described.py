"""A packet description ("tcp 10.0.0.5:40000 -> 10.0.0.1:22 syn") as real
bytes and kernel meta: `build_packet`, the one reader of the grammar in
ipqd.tools.grammar, used by `ipqd explain`, `ipqd test` and the witnesses of
`ipqd diff`. Pure: dpkt builds the headers, lengths and checksums.
"""
from __future__ import annotations

import ipaddress
import struct
from typing import List

import dpkt

from ipqd.decision.packet import PacketMeta
from ipqd.errors import DescriptionError
from ipqd.policy.cgroup import mark_for
from ipqd.policy._values import ICMP_TYPES, ICMPV6_TYPES, TCP_FLAGS
from ipqd.policy.model import (CT_STATES, HOOKS, PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP,
                               PROTO_UDP, PROTO_UDPLITE, PROTOCOLS)

__all__ = ["build_packet"]


def build_packet(text: str, base: PacketMeta = PacketMeta(), cgroups=None) -> tuple:
    """Bytes and meta for a description like "tcp 10.0.0.5:40000 -> 10.0.0.1:22 syn";
    `cgroups`: the compiled policy's (Matcher.cgroups), for `cgroup=` and `unit=`.

    Raises DescriptionError saying what is wrong.
    """
    words = text.split()
    if len(words) < 4 or words[2] != "->":
        raise DescriptionError(f"'{text}' is not PROTO SRC -> DST ...")
    proto = _protocol(words[0])
    src, sport = _address(words[1])
    dst, dport = _address(words[3])
    if src.version != dst.version:
        raise DescriptionError(f"{src} and {dst} are not of the same family")
    family = src.version
    opts = _options(words[4:], proto, family)
    meta = base._replace(**{k: v for k, v in opts.items() if k in PacketMeta._fields})
    if "cgroup" in opts:        # as the output hook marks it for the policy's `cgroups`
        meta = meta._replace(mark=(meta.mark or 0) | mark_for(cgroups, opts["cgroup"]))
    if proto in (PROTO_TCP, PROTO_UDP, PROTO_UDPLITE, PROTO_SCTP):
        if (sport is None or dport is None) and opts.get("frag") != "not-first":
            raise DescriptionError(f"{words[0]} needs ports: SRC:PORT -> DST:PORT")
    elif sport is not None or dport is not None:
        raise DescriptionError(f"{words[0]} has no ports")
    if proto == PROTO_ICMP and family == 6:
        raise DescriptionError("icmp with IPv6 addresses: use icmpv6")
    if proto == PROTO_ICMPV6 and family == 4:
        raise DescriptionError("icmpv6 with IPv4 addresses: use icmp")
    l4 = _transport(proto, family, sport or 0, dport or 0, opts)
    return _ip(family, proto, src.packed, dst.packed, l4, opts), meta


def _protocol(word: str) -> int:
    if word.lower() in PROTOCOLS:
        return PROTOCOLS[word.lower()]
    if word.isdigit() and int(word) < 256:
        return int(word)
    raise DescriptionError(f"unknown protocol '{word}' (expected {', '.join(PROTOCOLS)} "
                           "or a number)")


def _address(word: str) -> tuple:
    """`10.0.0.1:22`, `10.0.0.1`, `[fd00::1]:53`, `[fd00::1]`, `fd00::1`."""
    host, port = word, None
    if word.startswith("["):
        host, _, rest = word[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise DescriptionError(f"'{word}': expected [ADDRESS]:PORT")
            port = rest[1:]
    elif word.count(":") == 1:
        host, port = word.split(":")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise DescriptionError(f"'{host}' is not an IP address") from None
    if port is not None:
        if not port.isdigit() or int(port) > 65535:
            raise DescriptionError(f"'{port}' is not a port (0-65535)")
        port = int(port)
    return address, port


def _number(key: str, value: str, top: int) -> int:
    try:
        number = int(value, 0)
    except ValueError:
        raise DescriptionError(f"{key}={value}: not a number") from None
    if not 0 <= number <= top:
        raise DescriptionError(f"{key}={value}: out of range 0-{top}")
    return number


def _options(words: List[str], proto: int, family: int) -> dict:
    opts: dict = {}
    for word in words:
        key, eq, value = word.partition("=")
        if not eq:
            key, value = _bare_word(word, proto, family)
        key = {"ct_state": "ct", "length": "len", "type": "icmp_type",
               "code": "icmp_code"}.get(key, key)
        if key == "len":
            opts["len"] = _number(key, value, 65535)
        elif key in ("mark", "uid", "gid"):
            opts[key] = _number(key, value, 0xFFFFFFFF)
        elif key in ("cgroup", "unit"):
            opts["cgroup"] = value if key == "cgroup" else \
                "system.slice/" + (value if "." in value else value + ".service")
        elif key == "ct":
            if value not in CT_STATES:
                raise DescriptionError(f"ct={value}: expected one of {', '.join(CT_STATES)}")
            opts["ct_state"] = value
        elif key in ("in", "out"):
            opts["indev" if key == "in" else "outdev"] = value
        elif key == "hook":
            if value not in HOOKS:
                raise DescriptionError(f"hook={value}: expected one of {', '.join(HOOKS)}")
            opts["hook"] = HOOKS[value]
        elif key == "frag":
            if value not in ("first", "not-first", "none"):
                raise DescriptionError(f"frag={value}: expected first or not-first")
            opts["frag"] = value
        elif key == "flags":
            opts["flags"] = _tcp_flags(value, proto)
        elif key in ("icmp_type", "icmp_code"):
            opts[key] = _icmp_type(value, family) if key == "icmp_type" \
                else _number("code", value, 255)
        else:
            raise DescriptionError(f"unknown option '{word}'")
    return opts


def _bare_word(word: str, proto: int, family: int) -> tuple:
    """A word without '=': TCP flags or an ICMP type name."""
    if proto == PROTO_TCP:
        return "flags", word
    if proto in (PROTO_ICMP, PROTO_ICMPV6):
        return "icmp_type", word
    raise DescriptionError(f"unexpected '{word}' (options are key=value)")


def _tcp_flags(text: str, proto: int) -> int:
    if proto != PROTO_TCP:
        raise DescriptionError("flags only go with tcp")
    if text.lower() == "none":          # no flag at all (a null scan)
        return 0
    flags = 0
    for name in text.lower().replace("|", ",").split(","):
        if name not in TCP_FLAGS:
            raise DescriptionError(f"unknown TCP flag '{name}' (expected "
                                   f"{', '.join(TCP_FLAGS)}, comma-separated)")
        flags |= TCP_FLAGS[name]
    return flags


def _icmp_type(text: str, family: int) -> int:
    names = ICMP_TYPES if family == 4 else ICMPV6_TYPES
    if text in names:
        return names[text]
    if text.isdigit() and int(text) < 256:
        return int(text)
    raise DescriptionError(f"unknown {'icmp' if family == 4 else 'icmpv6'} type '{text}'")


def _transport(proto: int, family: int, sport: int, dport: int, opts: dict):
    """The L4 header as a dpkt object (or bytes for what dpkt does not build)."""
    if proto == PROTO_TCP:
        return dpkt.tcp.TCP(sport=sport, dport=dport, seq=1, win=65535,
                            flags=opts.get("flags", TCP_FLAGS["syn"]))
    if proto == PROTO_UDP:
        return dpkt.udp.UDP(sport=sport, dport=dport)
    if proto == PROTO_UDPLITE:  # same header as UDP; its length field is the checksum coverage
        return struct.pack("!HHHH", sport, dport, 8, 0)
    if proto == PROTO_SCTP:     # the common header alone (dpkt's SCTP wants chunks to pack)
        return struct.pack("!HHII", sport, dport, 1, 0)
    default = ICMP_TYPES["echo-request"] if family == 4 else ICMPV6_TYPES["echo-request"]
    icmp_type = opts.get("icmp_type", default)
    code = opts.get("icmp_code", 0)
    if proto == PROTO_ICMP:
        return dpkt.icmp.ICMP(type=icmp_type, code=code,
                              data=dpkt.icmp.ICMP.Echo(id=1, seq=1))
    if proto == PROTO_ICMPV6:
        return dpkt.icmp6.ICMP6(type=icmp_type, code=code, data=b"\x00\x01\x00\x01")
    return b""


def _ip(family: int, proto: int, src: bytes, dst: bytes, l4, opts: dict) -> bytes:
    """The whole packet: IP header, L4, and padding up to len= when given."""
    header = 20 if family == 4 else 40
    frag = opts.get("frag", "none")
    if family == 6 and frag != "none":
        header += 8
    l4_len = len(bytes(l4))
    want = opts.get("len")
    if want is not None:
        if want < header + l4_len:
            raise DescriptionError(f"len={want} is shorter than the headers "
                                   f"({header + l4_len} bytes)")
        pad = b"\x00" * (want - header - l4_len)
        if isinstance(l4, bytes):
            l4 = l4 + pad
        else:
            l4.data = bytes(l4.data) + pad
            if proto == PROTO_UDP:
                l4.ulen = len(bytes(l4))
    if isinstance(l4, dpkt.udp.UDP):
        l4.ulen = len(l4)
    if family == 4:
        ip = dpkt.ip.IP(src=src, dst=dst, p=proto, ttl=64, id=1, data=l4)
        if frag == "first":
            ip.mf = 1
        elif frag == "not-first":
            ip.offset = 1480                # where a second fragment starts
            ip.data = bytes(l4)
        ip.len = len(ip)
        return bytes(ip)
    if frag == "none":
        ip6 = dpkt.ip6.IP6(src=src, dst=dst, nxt=proto, hlim=64, data=l4)
        ip6.plen = len(bytes(l4))
        return bytes(ip6)
    # a Fragment header before the upper layer: offset 0 with M set, or 1480 bytes in
    offset_m = 1 if frag == "first" else (185 << 3)
    ip6 = dpkt.ip6.IP6(src=src, dst=dst, nxt=proto, hlim=64, data=l4)
    ip6.plen = len(bytes(l4))
    upper = bytes(ip6)[40:]                  # with its checksum filled in
    fragment = struct.pack("!BBHI", proto, 0, offset_m, 1)
    head = struct.pack("!IHBB", 6 << 28, len(fragment) + len(upper), 44, 64)
    return head + src + dst + fragment + upper

