"""The words and numbers of the policy language, each text -> value.

Every function here takes the text as written and either returns the
normalised value or raises `InvalidValue` with a message that says what to write
instead. Positions are the caller's business.
"""
from __future__ import annotations

import difflib
import ipaddress
import math
import re
from typing import Iterable, Optional, Tuple

from ipqd.errors import InvalidValue
from ipqd.policy.model import PROTO_ICMP, PROTO_ICMPV6, PROTOCOLS, MarkMatch, Rate, TcpFlagsMatch

ICMP_PROTOCOLS = frozenset((PROTO_ICMP, PROTO_ICMPV6))

# RFC 792 and friends; names as in iptables -p icmp --help.
ICMP_TYPES = {
    "echo-reply": 0, "destination-unreachable": 3, "source-quench": 4,
    "redirect": 5, "echo-request": 8, "router-advertisement": 9,
    "router-solicitation": 10, "time-exceeded": 11, "parameter-problem": 12,
    "timestamp-request": 13, "timestamp-reply": 14, "info-request": 15,
    "info-reply": 16, "address-mask-request": 17, "address-mask-reply": 18,
}
# RFC 4443, 4861, 2710 and 3810; names as in ip6tables -p icmpv6 --help.
ICMPV6_TYPES = {
    "destination-unreachable": 1, "packet-too-big": 2, "time-exceeded": 3,
    "parameter-problem": 4, "echo-request": 128, "echo-reply": 129,
    "mld-listener-query": 130, "mld-listener-report": 131,
    "mld-listener-done": 132, "mld-listener-reduction": 132,
    "router-solicitation": 133, "router-advertisement": 134,
    "neighbour-solicitation": 135, "neighbor-solicitation": 135,
    "neighbour-advertisement": 136, "neighbor-advertisement": 136,
    "redirect": 137, "mld2-listener-report": 143,
}

TCP_FLAGS = {
    "fin": 0x01, "syn": 0x02, "rst": 0x04, "psh": 0x08,
    "ack": 0x10, "urg": 0x20, "ece": 0x40, "cwr": 0x80,
}

RATE_UNITS = {"second": 1, "minute": 60, "hour": 3600}
_RATE = re.compile(r"^([1-9][0-9]*)\s*/\s*([a-z]+)(?:\s+burst\s+([1-9][0-9]*))?$")
_NUMBER = re.compile(r"^(0[xX][0-9a-fA-F]+|[0-9]+)$")
U32_MAX = 0xFFFFFFFF


def suggest(word: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest choice, or ''.

    Swapped letters ('dprot') are the commonest typo, so a choice with the
    same letters wins over one that merely looks alike ('proto').
    """
    choices = list(choices)
    close = [c for c in choices if sorted(c) == sorted(word)]
    close = close or difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def one_of(choices: Iterable[str]) -> str:
    """'a, b or c'."""
    words = list(choices)
    if len(words) < 2:
        return "".join(words)
    return ", ".join(words[:-1]) + " or " + words[-1]


def parse_number(text: str) -> Optional[int]:
    """A decimal or 0x-hex integer, or None when `text` is not one."""
    text = text.strip()
    if not _NUMBER.match(text):
        return None
    return int(text, 0) if text[:2].lower() == "0x" else int(text, 10)


def parse_range(text: str, what: str, low: int, high: int,
                example: str) -> Tuple[int, int]:
    """`n` or `a-b` as an inclusive (a, b) within low..high.

    `what` names one value ("port"), `example` shows the right form.
    """
    text = text.strip()
    first, dash, last = text.partition("-")
    start = parse_number(first)
    end = parse_number(last) if dash else start
    if start is None or end is None:
        hint = "; write ranges with '-'" if ":" in text else ""
        raise InvalidValue(f"'{text}' is not a {what} or a range of them "
                      f"(write e.g. {example}{hint})")
    for number in (start, end):
        if not low <= number <= high:
            raise InvalidValue(f"{what} {number} is outside {low}-{high}")
    if start > end:
        raise InvalidValue(f"range {text} is reversed: write {end}-{start}")
    return start, end


def parse_network(text: str) -> Tuple[ipaddress._BaseNetwork, Optional[str]]:
    """An address or CIDR network, and a warning when host bits are set."""
    text = text.strip()
    if "%" in text:
        # Python reads fe80::1%eth0, but a packet carries no zone: the rule
        # would match fe80::1 on every interface.
        address, zone = text.split("%", 1)
        raise InvalidValue(f"'{text}': an address with a zone (%{zone.split('/')[0]}) is not "
                           f"supported: write {address.split('/')[0]} and add 'in: "
                           f"{zone.split('/')[0]}' (or 'out:') to the rule")
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise InvalidValue(f"'{text}' is not an IP address or network "
                      "(write e.g. 192.0.2.1, 10.0.0.0/8 or fd00::/8)") from None
    if "/" in text and ipaddress.ip_interface(text).ip != network.network_address:
        return network, f"{text} has host bits set; did you mean {network}?"
    return network, None


def parse_protocol(text: str) -> int:
    text = text.strip().lower()
    number = parse_number(text)
    if number is not None:
        if number > 255:
            raise InvalidValue(f"protocol {number} is outside 0-255")
        return number
    if text in PROTOCOLS:
        return PROTOCOLS[text]
    hint = suggest(text, PROTOCOLS) or " (expected a name such as tcp, udp or icmp, " \
                                       "or a number 0-255)"
    raise InvalidValue(f"unknown protocol '{text}'{hint}")


def parse_icmp_type(text: str, proto: Optional[int]) -> int:
    """A type number, or a name looked up in the table of `proto`.

    `proto` is PROTO_ICMP, PROTO_ICMPV6 or None (the rule names neither, or both).
    """
    number = parse_number(text)
    if number is not None:
        if number > 255:
            raise InvalidValue(f"icmp_type {number} is outside 0-255")
        return number
    name = text.strip().lower()
    if proto is None:
        raise InvalidValue(f"icmp_type '{name}' has a number for ICMP and another for ICMPv6: "
                      "give the rule a single proto, icmp or icmpv6")
    table, family, other, other_family = (
        (ICMP_TYPES, "icmp", ICMPV6_TYPES, "icmpv6") if proto == PROTO_ICMP
        else (ICMPV6_TYPES, "icmpv6", ICMP_TYPES, "icmp"))
    if name in table:
        return table[name]
    if name in other:
        raise InvalidValue(f"'{name}' is an {other_family} type, not an {family} one: "
                      f"use proto {other_family}")
    raise InvalidValue(f"unknown {family} type '{name}'{suggest(name, table)}")


def parse_rate(text: str) -> Rate:
    words = " ".join(text.split())
    found = _RATE.match(words)
    if not found or found.group(2) not in RATE_UNITS:
        raise InvalidValue(f"rate '{text}' is not valid: write N/second, N/minute or N/hour, "
                      "optionally 'burst M'")
    count, unit, burst = found.groups()
    per_second = int(count) / RATE_UNITS[unit]
    if burst is None:
        burst = max(1, math.ceil(per_second))
    return Rate(per_second=per_second, burst=int(burst), text=words)


def parse_tcp_flags(words: Iterable[str]) -> TcpFlagsMatch:
    """`syn`, `!ack`, ... -> mask of every named flag, value of the plain ones."""
    mask = value = 0
    for word in words:
        word = word.strip().lower()
        name = word.lstrip("!").strip()
        if name not in TCP_FLAGS:
            hint = suggest(name, TCP_FLAGS) or f" (flags are {', '.join(TCP_FLAGS)})"
            raise InvalidValue(f"unknown TCP flag '{name}'{hint}")
        bit = TCP_FLAGS[name]
        if mask & bit:
            raise InvalidValue(f"TCP flag '{name}' is named twice")
        mask |= bit
        if not word.startswith("!"):
            value |= bit
    if not mask:
        raise InvalidValue("tcp_flags names no flag (write e.g. 'syn,!ack')")
    return TcpFlagsMatch(mask=mask, value=value)


def parse_mark(text: str) -> MarkMatch:
    value_text, slash, mask_text = text.strip().partition("/")
    value = parse_number(value_text)
    mask = parse_number(mask_text) if slash else U32_MAX
    if value is None or mask is None:
        raise InvalidValue(f"mark '{text}' is not valid: write a number or number/mask, "
                      "e.g. 0x10 or 0x10/0xff")
    if value > U32_MAX or mask > U32_MAX:
        raise InvalidValue(f"mark '{text}' does not fit in 32 bits")
    if value & ~mask:
        raise InvalidValue(f"mark '{text}' can never match: the value has bits outside the mask")
    return MarkMatch(value=value, mask=mask)


def parse_u32(text: str, what: str) -> int:
    number = parse_number(text)
    if number is None or number > U32_MAX:
        raise InvalidValue(f"{what} must be a number from 0 to 0xffffffff, not '{text}'")
    return number


# Durations: a dynamic set's timeout (ipqd.policy._sets) and `ipqd set add
# --timeout`. Here, with no YAML, since the supervisor reads them too.
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
TIMEOUT_MAX = 365 * 86400.0         # a year: longer is a typo (write no timeout)


def parse_duration(written: str) -> float:
    """Seconds from `90`, `30s`, `10m`, `1h30m`, `7d`, `2w`; raises InvalidValue."""
    t = written.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", t):
        seconds = float(t)
    else:
        pos, seconds = 0, 0.0
        for m in _DURATION.finditer(t):
            if m.start() != pos and t[pos:m.start()].strip():
                break
            seconds += float(m.group(1)) * _UNITS[m.group(2)]
            pos = m.end()
        if pos == 0 or t[pos:].strip():
            raise InvalidValue(f"'{written}' is not a duration (write e.g. 90s, 10m, 1h or 7d)")
    if seconds <= 0:
        raise InvalidValue(f"duration '{written}' must be more than 0")
    if seconds > TIMEOUT_MAX:
        raise InvalidValue(f"duration '{written}' is longer than a year: leave the timeout out "
                           "for entries that stay until deleted")
    return seconds


def format_duration(seconds: float) -> str:
    """`1h2m3s` for 3723: how `ipqd set list` shows a remaining time."""
    if seconds < 1:
        return f"{seconds:.3g}s"
    whole = int(seconds + 0.5)
    out = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if whole >= size:
            out.append(f"{whole // size}{unit}")
            whole %= size
    if whole or not out:
        out.append(f"{whole}s")
    return "".join(out)
