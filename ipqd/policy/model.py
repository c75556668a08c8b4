"""The compiled-from-YAML policy as plain, immutable values.

This is the contract between the loader (YAML -> these objects, with every
check done) and the compiler/matcher (these objects -> a fast decision).
Field names are the policy's own words: the YAML key `dport` is `Match.dport`.
Values are already normalised (numbers, not names) so the matcher never has to
interpret text.
"""
from __future__ import annotations

import ipaddress
import sys
from dataclasses import dataclass, field
from typing import Optional, Tuple, Union

IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

# Slots, where Python has them for dataclasses (3.10): a worker holds one
# Rule, Match, ... per rule, and an instance dict is most of each one's size.
_SLOTS = {"slots": True} if sys.version_info >= (3, 10) else {}

# Netfilter hook numbers (include/uapi/linux/netfilter.h, enum nf_inet_hooks):
# the same numbers the kernel puts in NFQA_PACKET_HDR.hook.
NF_INET_PRE_ROUTING = 0
NF_INET_LOCAL_IN = 1
NF_INET_FORWARD = 2
NF_INET_LOCAL_OUT = 3
NF_INET_POST_ROUTING = 4

HOOKS = {
    "prerouting": NF_INET_PRE_ROUTING,
    "input": NF_INET_LOCAL_IN,
    "forward": NF_INET_FORWARD,
    "output": NF_INET_LOCAL_OUT,
    "postrouting": NF_INET_POST_ROUTING,
}
HOOK_NAMES = {v: k for k, v in HOOKS.items()}

FAMILIES = {"ipv4": 4, "ipv6": 6}

# IP protocol numbers (IANA, /etc/protocols; dpkt.ip.IP_PROTO_*), and the
# names nft and iptables give them, which are the policy's names too.
PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMPV6 = 58
PROTO_SCTP = 132
PROTO_UDPLITE = 136
PROTOCOLS = {
    "icmp": PROTO_ICMP, "igmp": 2, "tcp": PROTO_TCP, "udp": PROTO_UDP, "gre": 47, "esp": 50,
    "ah": 51, "icmpv6": PROTO_ICMPV6, "sctp": PROTO_SCTP, "udplite": PROTO_UDPLITE,
}
PROTOCOL_NAMES = {number: name for name, number in PROTOCOLS.items()}
# The protocols whose header starts with a source and a destination port.
PORT_PROTOCOLS = frozenset({PROTO_TCP, PROTO_UDP, PROTO_SCTP, PROTO_UDPLITE})

# The IPv6 extension headers ipqd.decision.packet walks past to the upper
# layer: an IPv6 packet's `proto` is never one of them.
IPV6_EXT_HEADERS = frozenset({0, 43, 44, 51, 60, 135})

# Conntrack states, in the order ipqd lays out their queues (ipqd.kernel.hooks.queue_layout).
CT_STATES = ("new", "established", "related", "invalid", "untracked")
FRAGMENTS = ("first", "not-first", "none")
ACTIONS = ("accept", "drop", "reject")              # verdicts: a rule's or the default's
# A rule may also only log: the packet is logged and the next rules decide.
RULE_ACTIONS = ACTIONS + ("log",)
# `mode`: enforce the verdicts, or accept every packet and log and count
# what the policy would have done.
MODES = ("enforce", "monitor")
# How a rejected packet is refused (ipqd.policy.reject): a TCP reset or an
# ICMP/ICMPv6 destination-unreachable of one of three codes.
REJECT_WITH = ("tcp-reset", "port-unreachable", "admin-prohibited", "host-unreachable")


@dataclass(frozen=True, **_SLOTS)
class Position:
    """Where something was written: file path and 1-based line and column."""
    path: str
    line: int
    column: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}:{self.column}"


@dataclass(frozen=True, **_SLOTS)
class AddrMatch:
    """`src`/`dst`: the packet's address lies in one of `networks`.

    An address field only ever matches packets of the families its networks
    belong to (as nft's `ip saddr` only matches IPv4); `negate` inverts the
    answer within those families.
    """
    networks: Tuple[IPNetwork, ...]
    negate: bool = False
    # Dynamic sets (`@name` of a set with `dynamic: true`): their entries
    # change while ipqd runs, so the matcher looks them up per packet.
    dynamic: Tuple[str, ...] = ()

    @property
    def families(self) -> frozenset:
        if self.dynamic:            # a dynamic set may hold either family
            return frozenset((4, 6))
        return frozenset(n.version for n in self.networks)


@dataclass(frozen=True, **_SLOTS)
class RangeMatch:
    """A numeric field (ports, uid, gid) lies in one of the inclusive ranges.

    For ports: only packets that carry ports (TCP, UDP, SCTP, UDP-Lite; not a
    non-first fragment, not malformed) can match, negated or not, as iptables.
    """
    ranges: Tuple[Tuple[int, int], ...]
    negate: bool = False

    def contains(self, value: int) -> bool:
        inside = any(lo <= value <= hi for lo, hi in self.ranges)
        return inside != self.negate


@dataclass(frozen=True, **_SLOTS)
class IfaceMatch:
    """`in`/`out`: interface name equal to one of the names or fnmatch globs."""
    patterns: Tuple[str, ...]
    negate: bool = False


@dataclass(frozen=True, **_SLOTS)
class TcpFlagsMatch:
    """`tcp_flags: syn,!ack` -> (flags & mask) == value. Bits as in the TCP header."""
    mask: int
    value: int


@dataclass(frozen=True, **_SLOTS)
class MarkMatch:
    """`mark: 0x10/0xff` -> (packet mark & mask) == value."""
    value: int
    mask: int = 0xFFFFFFFF


# A rate kept per key tracks at most this many keys unless `keys:` says
# otherwise (ipqd.decision.rate_table), and never more than RATE_KEYS_MAX.
RATE_KEYS_DEFAULT = 16384
RATE_KEYS_MAX = 1_000_000
RATE_KEY_FIELDS = ("src", "dst", "sport", "dport")


@dataclass(frozen=True, **_SLOTS)
class Rate:
    """A token bucket: `per_second` tokens a second, at most `burst` saved up.

    With `per`, one bucket per key: ((field, IPv4 prefix, IPv6 prefix), ...)
    of RATE_KEY_FIELDS (prefixes 0 for ports), at most `keys` keys tracked."""
    per_second: float
    burst: int
    text: str = ""
    per: Tuple[Tuple[str, int, int], ...] = ()
    keys: int = 0


DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")     # datetime.weekday() order


@dataclass(frozen=True, **_SLOTS)
class TimeWindow:
    """`time:` a rule matches only on `days` (0 = Monday), between minute
    `start` (included) and minute `end` (excluded) of the day, in zone `tz`
    (None: the host's local time). `end` <= `start` wraps past midnight; the
    day is always the packet's own (ipqd.policy._time)."""
    days: frozenset = frozenset(range(7))
    start: int = 0
    end: int = 24 * 60
    tz: Optional[str] = None
    text: str = ""


@dataclass(frozen=True, **_SLOTS)
class Match:
    """Everything a rule tests. None means "not tested" (matches anything).

    Semantics shared by the loader, the reference evaluator and the compiler:
    - every tested field must match (AND); a list inside a field is OR;
    - a field the packet does not carry (ports on ICMP, icmp_type on TCP, uid
      on forwarded traffic, ct_state without conntrack info) makes the rule
      not match, even when the field is negated;
    - a rule matches a malformed packet only when it says `malformed: true`;
      `malformed: true` matches only malformed packets.
    """
    family: Optional[int] = None                    # 4 or 6
    proto: Optional[frozenset] = None               # IP protocol numbers
    src: Optional[AddrMatch] = None
    dst: Optional[AddrMatch] = None
    sport: Optional[RangeMatch] = None
    dport: Optional[RangeMatch] = None
    in_: Optional[IfaceMatch] = None                # YAML key `in`
    out: Optional[IfaceMatch] = None
    hook: Optional[frozenset] = None                # NF_INET_* numbers
    icmp_type: Optional[frozenset] = None           # type numbers (v4 or v6 per family)
    icmp_code: Optional[frozenset] = None
    tcp_flags: Optional[TcpFlagsMatch] = None
    ct_state: Optional[frozenset] = None            # names from CT_STATES
    uid: Optional[RangeMatch] = None
    gid: Optional[RangeMatch] = None
    mark: Optional[MarkMatch] = None
    length: Optional[Tuple[int, int]] = None        # inclusive, whole IP packet length
    fragment: Optional[frozenset] = None            # names from FRAGMENTS
    cgroup: Optional[frozenset] = None              # cgroup v2 paths (`cgroup`, `unit`); output only
    malformed: bool = False

    def dynamic_sets(self) -> frozenset:
        """The names of the dynamic sets its addresses look up: their entries
        change while ipqd runs, so its answer for a flow may change too."""
        return frozenset(name for addr in (self.src, self.dst) if addr is not None
                         for name in addr.dynamic)

    def fields(self) -> frozenset:
        """The names of the packet fields this match reads (policy words)."""
        names = set()
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if name == "malformed":
                continue
            if value is not None:
                names.add("in" if name == "in_" else name)
        return frozenset(names)


@dataclass(frozen=True, **_SLOTS)
class Rule:
    name: str
    match: Match
    action: str                                     # "accept", "drop", "reject" or "log"
    set_mark: Optional[int] = None                  # only with accept
    log: Optional[bool] = None                      # None: follow the default's log
    rate: Optional[Rate] = None                     # above the rate the rule does not match
    position: Optional[Position] = None
    offload: bool = True                            # false: never offload this rule's flows
    reject_with: Optional[str] = None               # with reject; None: per protocol (REJECT_WITH)
    time: Optional[TimeWindow] = None               # outside the window the rule does not match


@dataclass(frozen=True, **_SLOTS)
class Default:
    action: str = "drop"
    log: bool = True
    set_mark: Optional[int] = None
    reject_with: Optional[str] = None               # with reject; None: per protocol


OFFLOAD_MODES = ("auto", "off")
# The top 14 bits: clear of the low bits most tools use (kube-proxy 0x4000/0x8000,
# Cilium 0x0f00, OpenGFW's connmarks 1001/1002, wg-quick 0xca6c); see docs/policy.md.
OFFLOAD_MASK = 0xFFFC0000


@dataclass(frozen=True, **_SLOTS)
class Offload:
    """Flow offload: where the verdict of a flow cannot change, ipqd asks the
    kernel to remember it in the conntrack mark (bits of `mask`) and stops
    seeing the flow. `auto`: only where every later packet would get the same
    verdict from ipqd; `off`: every packet comes to ipqd."""
    mode: str = "auto"
    mask: int = OFFLOAD_MASK


@dataclass(frozen=True, **_SLOTS)
class QueueConfig:
    nums: Tuple[int, ...] = (0,)                    # "0-3" -> (0, 1, 2, 3)
    copy_range: int = 256
    fail_open: bool = True
    bypass: bool = True
    maxlen: int = 1024
    conntrack: bool = False                         # loader: queue.conntrack, else on when a rule reads ct_state
    offload: Offload = field(default_factory=Offload)
    # The verdict for a packet whose copy hides a field the rules need to
    # tell its verdict (a transport header past copy_range): accept or drop.
    undecidable: str = "drop"
    # Loader: on when a rule or the default rejects; the hooks then hold the
    # rules that refuse what ipqd marks for rejection (ipqd.policy.reject).
    reject: bool = False
    # Loader: every cgroup path a rule names; the output hook marks them
    # (ipqd.policy.cgroup).
    cgroups: Tuple[str, ...] = ()


@dataclass(frozen=True, **_SLOTS)
class Hook:
    """One kernel rule ipqd installs to send traffic to its queue."""
    chain: str                                      # input, output, forward, prerouting, postrouting
    family: str = "both"                            # ipv4, ipv6, both
    proto: Optional[str] = None                     # tcp, udp, icmp, ... or None for all


@dataclass(frozen=True, **_SLOTS)
class LoggingConfig:
    rate: Optional[Rate] = None                     # cap on decision log entries


@dataclass(frozen=True, **_SLOTS)
class DynamicSet:
    """A set whose entries (addresses and networks, either family) are
    added and deleted while ipqd runs (`ipqd set`), each with an optional
    timeout. `timeout`: seconds an entry lives unless its add says
    otherwise (None: until deleted); `max`: entries it may hold."""
    name: str
    timeout: Optional[float] = None
    max: int = 65536
    position: Optional[Position] = None


@dataclass(frozen=True, **_SLOTS)
class Policy:
    path: str
    version: int = 1
    queue: QueueConfig = field(default_factory=QueueConfig)
    hooks: Tuple[Hook, ...] = ()
    default: Default = field(default_factory=Default)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    rules: Tuple[Rule, ...] = ()
    sets: Tuple[DynamicSet, ...] = ()               # the dynamic sets (static ones are in the rules)
    sources: Tuple[str, ...] = ()                   # every file read, main file first
    warnings: Tuple = ()                            # PolicyError objects of severity warning
    digest: str = ""                                # of the files' text (ipqd.policy.checked)
    shadow_path: Optional[str] = None               # `shadow:` a candidate deciding beside it
    shadow: Optional["Policy"] = None               # that candidate, loaded (load_checked)
    mode: str = "enforce"                           # or "monitor" (MODES)

    def dynamic_sets(self) -> frozenset:
        """The names of the dynamic sets some rule reads."""
        return frozenset(name for rule in self.rules for name in rule.match.dynamic_sets())

    def fields(self) -> frozenset:
        """Every packet field some rule reads: what the packet view must parse."""
        out = set()
        for rule in self.rules:
            out |= rule.match.fields()
        return frozenset(out)


# The match fields each L4 header feeds (ipqd.decision.packet fills them).
L4_FIELDS = frozenset({"sport", "dport", "icmp_type", "icmp_code", "tcp_flags"})
# What a copy cut at copy_range can hide besides the transport header's own
# fields, by where it ends (see PacketView.hidden).
HIDDEN_CHAIN = L4_FIELDS | {"proto", "fragment"}                # in the IPv6 extension headers
HIDDEN_IP = HIDDEN_CHAIN | {"src", "dst", "length"}             # in the IP header itself
