"""IPv6 TCP SYNs behind destination-options headers, as real bytes.

The two shapes of a known evasion: one 408-byte header holding two "skip"
options (the TCP header starts at byte 448, past a 256-byte copy) and nine
8-byte headers in a row. Both are valid packets that the kernel delivers to
a listener; checksums are right, so a real-kernel test can send them too.
"""
from __future__ import annotations

import ipaddress
import struct

from ipqd.decision.checksum import internet_checksum

DSTOPTS = 60
TCP = 6
# RFC 4727's experimental option type: its top two bits are 00, "skip over
# this option if you do not know it" (RFC 8200 4.2).
SKIP_OPTION = 0x1E
PADN = 1
SYN = 0x02
BIG_HEADER = 408            # the TCP header then starts at 40 + 408 = 448


def dest_opts(nxt: int, size: int = 8) -> bytes:
    """One destination-options header of `size` bytes (a multiple of 8):
    8 bytes hold a PadN, larger ones two skip options sharing the rest."""
    assert size % 8 == 0 and size >= 8
    if size == 8:
        options = bytes([PADN, 4]) + bytes(4)
    else:
        first = (size - 2) // 2 - 2
        second = size - 2 - (2 + first) - 2
        options = bytes([SKIP_OPTION, first]) + bytes(first) + \
            bytes([SKIP_OPTION, second]) + bytes(second)
    return bytes([nxt, size // 8 - 1]) + options


def tcp_syn(src: str, dst: str, sport: int, dport: int, seq: int = 1) -> bytes:
    header = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, SYN, 64240, 0, 0)
    pseudo = (ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed
              + struct.pack("!I3xB", len(header), TCP))
    return header[:16] + struct.pack("!H", internet_checksum(pseudo + header)) + header[18:]


def ipv6(src: str, dst: str, nxt: int, payload: bytes) -> bytes:
    return (struct.pack("!IHBB", 6 << 28, len(payload), nxt, 64)
            + ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed + payload)


def syn_behind_one_big_header(src: str, dst: str, sport: int, dport: int) -> bytes:
    """A SYN behind one 408-byte destination-options header."""
    return ipv6(src, dst, DSTOPTS, dest_opts(TCP, BIG_HEADER) + tcp_syn(src, dst, sport, dport))


def syn_behind_headers(src: str, dst: str, sport: int, dport: int, count: int = 9) -> bytes:
    """A SYN behind `count` 8-byte destination-options headers (0: a plain SYN)."""
    chain = b"".join(dest_opts(DSTOPTS if i < count - 1 else TCP) for i in range(count))
    return ipv6(src, dst, DSTOPTS if count else TCP, chain + tcp_syn(src, dst, sport, dport))
