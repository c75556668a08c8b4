"""Connection tracking as Linux's conntrack does it: the ct_state of each packet.

`Tracker.track(view, payload, now)` returns the state the kernel's conntrack
would give a packet (`new`, `established`, `related`, `invalid` or
`untracked`, the words of `ct_state`), and records what the packet changes,
so a capture replayed packet by packet gets the states the daemon saw live.
`ipqd explain` uses it; the daemon never does (the kernel tells it).

What is followed, with the kernel's default sysctls (nf_conntrack_core.c,
nf_conntrack_proto_{tcp,udp,icmp,icmpv6,generic}.c):

- A connection is known by its tuple in both directions: family, addresses,
  protocol and ports (TCP, UDP, UDP-Lite, SCTP, DCCP) or ICMP identifier,
  type and code; the reply tuple swaps the ends (and an ICMP request's type
  for its reply's).
- A packet in the original direction is `new` until one in the reply
  direction has been seen, then `established`; a reply is `established`.
- TCP: a flag combination tcp_valid_flags refuses is `invalid`. A SYN opens a
  connection; a bare ACK is picked up mid-stream (nf_conntrack_tcp_loose=1),
  `new` like a SYN; any other first packet is `invalid`. Later packets move
  the connection through the kernel's own table (`TCP_CONNTRACKS`, as
  tcp_conntracks); a move the table calls invalid is `invalid`, one it
  ignores changes nothing. A SYN after a close or a reset in TIME_WAIT or
  CLOSE reopens the connection: `new`. A RST before any reply ends it.
- UDP, UDP-Lite: any datagram opens a connection.
- ICMP, ICMPv6: echo, timestamp, information and address-mask requests (ICMPv6:
  echo and node information) open a connection; a reply without its request,
  and any other message that is not an error, is `invalid`, as is an ICMP
  type above 18. An error (destination unreachable, source quench, redirect,
  time exceeded, parameter problem; ICMPv6 types below 128) is `related` when
  the packet it quotes belongs to a tracked connection and it is sent to that
  packet's source, else `invalid`.
- ICMPv6 neighbour discovery, router solicitation and advertisement, MLD and
  multicast router discovery: `untracked`.
- Other protocols: one connection per pair of addresses and protocol.
- Timeouts from the capture's clock: TCP by state (`TCP_TIMEOUTS`; 10 s
  after a RST, 300 s for a connection picked up mid-stream until it has a
  reply), UDP 30 s, 120 s once replied to for over 2 s, ICMP 30 s, GRE 30 s
  (180 s replied), others 600 s.

Where it is approximate (docs/policy.md says so too):

- no sequence numbers or windows: a segment the kernel would call invalid for
  lying outside the window gets its connection's state;
- every packet is taken to have passed: the kernel forgets a new connection
  whose first packet was dropped, the tracker keeps it;
- checksums are not verified (the kernel calls a bad one invalid in prerouting);
- fragments: the kernel reassembles before tracking, so a first fragment is
  tracked as its packet and a later one gets the state of the last first
  fragment between the same addresses and protocol (none seen: `new`);
- SCTP and DCCP are tracked as UDP is (their own state machines are not
  followed), GRE without its PPTP keys; no helpers (FTP, SIP, ...): their
  data connections are `new`, not `related`;
- a packet the capture cut before its ports or ICMP header has no state
  (None: no `ct_state` rule matches it); a malformed one is `invalid`;
- at most `capacity` connections (65,536): past that the least recently
  seen is forgotten (the kernel would refuse new ones instead).

Pure: packets and times in, states out.
"""
from __future__ import annotations

import struct
from collections import OrderedDict
from typing import Dict, Optional

from ipqd.decision.packet import PacketMeta, PacketView, parse, transport_offset
from ipqd.policy.model import (CT_STATES, PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP,
                               PROTO_UDP, PROTO_UDPLITE)

__all__ = ["Tracker", "DEFAULT_CAPACITY", "TCP_CONNTRACKS", "TCP_TIMEOUTS"]

NEW, ESTABLISHED, RELATED, INVALID, UNTRACKED = CT_STATES

DEFAULT_CAPACITY = 65536
PROTO_DCCP = 33
PROTO_GRE = 47
_PORTED = frozenset({PROTO_TCP, PROTO_UDP, PROTO_UDPLITE, PROTO_SCTP, PROTO_DCCP})
_H = struct.Struct("!H")
_PORTS = struct.Struct("!HH")

# ---- TCP: the kernel's table (nf_conntrack_proto_tcp.c) ---------------------

(sNO, sSS, sSR, sES, sFW, sCW, sLA, sTW, sCL, sS2) = range(10)
sIV, sIG = 10, 11                       # invalid; ignored (no change)
TCP_STATE_NAMES = ("NONE", "SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT",
                   "LAST_ACK", "TIME_WAIT", "CLOSE", "SYN_SENT2")
# get_conntrack_index: which row a segment's flags select.
SYN_SET, SYNACK_SET, FIN_SET, ACK_SET, RST_SET, NONE_SET = range(6)
_FIN, _SYN, _RST, _PSH, _ACK, _URG, _ECE, _CWR = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80

# [direction][row][old state] -> new state; direction 0 original, 1 reply.
TCP_CONNTRACKS = (
    (   # original   sNO  sSS  sSR  sES  sFW  sCW  sLA  sTW  sCL  sS2
        (sSS, sSS, sIG, sIG, sIG, sIG, sIG, sSS, sSS, sS2),     # syn
        (sIV, sIV, sSR, sIV, sIV, sIV, sIV, sIV, sIV, sSR),     # syn+ack
        (sIV, sIV, sFW, sFW, sLA, sLA, sLA, sTW, sCL, sIV),     # fin
        (sES, sIV, sES, sES, sCW, sCW, sTW, sTW, sCL, sIV),     # ack
        (sIV, sCL, sCL, sCL, sCL, sCL, sCL, sCL, sCL, sCL),     # rst
        (sIV, sIV, sIV, sIV, sIV, sIV, sIV, sIV, sIV, sIV),     # none
    ),
    (   # reply      sNO  sSS  sSR  sES  sFW  sCW  sLA  sTW  sCL  sS2
        (sIV, sS2, sIV, sIV, sIV, sIV, sIV, sSS, sIV, sS2),     # syn
        (sIV, sSR, sIG, sIG, sIG, sIG, sIG, sIG, sIG, sSR),     # syn+ack
        (sIV, sIV, sFW, sFW, sLA, sLA, sLA, sTW, sCL, sIV),     # fin
        (sIV, sIG, sSR, sES, sCW, sCW, sTW, sTW, sCL, sIG),     # ack
        (sIV, sCL, sCL, sCL, sCL, sCL, sCL, sCL, sCL, sCL),     # rst
        (sIV, sIV, sIV, sIV, sIV, sIV, sIV, sIV, sIV, sIV),     # none
    ),
)
# nf_conntrack_tcp_timeout_* in seconds, by state.
TCP_TIMEOUTS = (0, 120, 60, 432000, 120, 60, 30, 120, 10, 120)
TCP_TIMEOUT_CLOSE = 10
TCP_TIMEOUT_UNACKNOWLEDGED = 300
# tcp_valid_flags, after masking ECE, CWR and PSH.
_TCP_VALID_FLAGS = frozenset({_SYN, _SYN | _URG, _SYN | _ACK, _RST, _RST | _ACK, _FIN | _ACK,
                              _FIN | _ACK | _URG, _ACK, _ACK | _URG})

UDP_TIMEOUT, UDP_TIMEOUT_STREAM, UDP_STREAM_AFTER = 30, 120, 2
ICMP_TIMEOUT = 30
GRE_TIMEOUT, GRE_TIMEOUT_STREAM = 30, 180
GENERIC_TIMEOUT = 600

# ---- ICMP -------------------------------------------------------------------

# Request <-> reply (icmp_invert_tuple's invmap); the requests open connections.
_ICMP_INVERSE = {4: {8: 0, 0: 8, 13: 14, 14: 13, 15: 16, 16: 15, 17: 18, 18: 17},
                 6: {128: 129, 129: 128, 139: 140, 140: 139}}
_ICMP_REQUESTS = {4: frozenset({8, 13, 15, 17}), 6: frozenset({128, 139})}
_ICMP_ERRORS = frozenset({3, 4, 5, 11, 12})         # icmp_is_err
_ICMP_MAX_TYPE = 18                                 # NR_ICMP_TYPES
# noct_valid_new: MLD query, report, done; RS, RA, NS, NA; MLDv2 report; and on
# recent kernels (6.18 checked) multicast router advertisement and solicitation.
ICMPV6_UNTRACKED = frozenset({130, 131, 132, 133, 134, 135, 136, 143, 151, 152})
_FRAGMENTS_KEPT = 4096


class _Flow:
    """One tracked connection."""
    __slots__ = ("original", "reply", "seen_reply", "expires", "created", "tcp",
                 "close_init", "last")

    def __init__(self, original: tuple, reply: tuple, now: float):
        self.original, self.reply = original, reply
        self.seen_reply = False             # IPS_SEEN_REPLY
        self.created = self.expires = now
        self.tcp = sNO
        self.close_init = False             # IP_CT_TCP_FLAG_CLOSE_INIT, either side
        self.last = -1                      # direction << 3 | row of the last TCP segment


class Tracker:
    """A connection table fed packet by packet, in capture order."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY):
        self.capacity = capacity
        self.evicted = 0                                        # forgotten for room
        self._tuples: Dict[tuple, _Flow] = {}                   # both directions' tuples
        self._recent: "OrderedDict[tuple, _Flow]" = OrderedDict()  # least recently seen first
        self._fragments: Dict[tuple, Optional[str]] = {}

    def __len__(self) -> int:
        return len(self._recent)

    def track(self, view: PacketView, payload: bytes, now: float) -> Optional[str]:
        """The ct_state of the packet `view` (parsed with every field: `needs`
        None) read from `payload`, at capture time `now`; the table then holds
        what the packet changed. None when the copy ends before the fields
        conntrack keys on."""
        if view.malformed:
            return INVALID
        proto, family = view.proto, view.family
        if view.src is None or proto is None:
            return None
        if view.fragment == "not-first":
            return self._fragments.get((family, view.src, view.dst, proto), NEW)
        if proto == PROTO_TCP:
            state = self._tcp(view, now)
        elif proto in _PORTED:
            state = self._datagram(view, now)
        elif proto == PROTO_ICMP or proto == PROTO_ICMPV6:
            if (proto == PROTO_ICMP) != (family == 4):
                return INVALID          # ICMP in IPv6 or ICMPv6 in IPv4
            state = self._icmp(view, payload, now)
        else:
            state = self._generic(view, now)
        if view.fragment == "first":
            self._remember_fragment((family, view.src, view.dst, proto), state)
        return state

    # ---- per protocol -----------------------------------------------------

    def _tcp(self, view: PacketView, now: float) -> Optional[str]:
        """nf_conntrack_tcp_packet, less the window checks."""
        flags = view.tcp_flags
        if flags is None:
            return None
        if flags & ~(_ECE | _CWR | _PSH) not in _TCP_VALID_FLAGS:
            return INVALID
        row = _tcp_row(flags)
        key = (view.family, PROTO_TCP, view.src, view.sport, view.dst, view.dport)
        flow = self._find(key, now)
        if flow is None:
            return self._tcp_open(key, row, now)
        direction = 0 if key == flow.original else 1
        old = flow.tcp
        new = TCP_CONNTRACKS[direction][row][old]
        if new == sSS and old >= sTW:
            if flow.close_init or flow.last == direction << 3 | RST_SET:
                self._forget(flow)      # reopened: the kernel kills it and looks up again
                return self._tcp_open(key, row, now)
            new = sIG
        if new == sIV:
            return INVALID
        state = ESTABLISHED if direction or flow.seen_reply else NEW
        flow.last = direction << 3 | row
        if new != sIG:                  # an ignored segment changes and refreshes nothing
            self._tcp_move(flow, direction, row, old, new, now)
        if direction:
            flow.seen_reply = True      # set after the segment passed, even an ignored one
        return state

    def _tcp_move(self, flow: _Flow, direction: int, row: int, old: int, new: int,
                  now: float) -> None:
        flow.tcp = new
        if new == sFW and old != sFW:
            flow.close_init = True
        timeout = TCP_TIMEOUT_CLOSE if row == RST_SET else TCP_TIMEOUTS[new]
        if not flow.seen_reply:
            if row == RST_SET:          # the only answer is a reset: no connection
                self._forget(flow)
                return
            if row == SYN_SET and old == sSS:
                return                  # a retransmitted SYN does not renew
            if new == sES:
                timeout = min(timeout, TCP_TIMEOUT_UNACKNOWLEDGED)
        flow.expires = now + timeout

    def _tcp_open(self, key: tuple, row: int, now: float) -> str:
        """tcp_new: a SYN, or a bare ACK picked up mid-stream; nothing else."""
        new = TCP_CONNTRACKS[0][row][sNO]
        if new == sIV:
            return INVALID
        flow = self._add(key, _swap(key), now)
        flow.tcp = new
        flow.last = row
        timeout = TCP_TIMEOUTS[new]
        flow.expires = now + (min(timeout, TCP_TIMEOUT_UNACKNOWLEDGED) if new == sES else timeout)
        return NEW

    def _datagram(self, view: PacketView, now: float) -> Optional[str]:
        """nf_conntrack_udp_packet (also UDP-Lite, and SCTP and DCCP by approximation)."""
        if view.sport is None:
            return None
        key = (view.family, view.proto, view.src, view.sport, view.dst, view.dport)
        flow = self._find(key, now)
        if flow is None:
            self._add(key, _swap(key), now).expires = now + UDP_TIMEOUT
            return NEW
        stream = flow.seen_reply and now > flow.created + UDP_STREAM_AFTER
        flow.expires = now + (UDP_TIMEOUT_STREAM if stream else UDP_TIMEOUT)
        return self._answer(flow, key)

    def _generic(self, view: PacketView, now: float) -> str:
        """nf_conntrack_generic_packet (and GRE without its keys)."""
        key = (view.family, view.proto, view.src, view.dst)
        gre = view.proto == PROTO_GRE
        flow = self._find(key, now)
        if flow is None:
            reply = (view.family, view.proto, view.dst, view.src)
            self._add(key, reply, now).expires = now + (GRE_TIMEOUT if gre else GENERIC_TIMEOUT)
            return NEW
        state = self._answer(flow, key)
        flow.expires = now + (GENERIC_TIMEOUT if not gre else
                              GRE_TIMEOUT_STREAM if flow.seen_reply else GRE_TIMEOUT)
        return state

    def _icmp(self, view: PacketView, payload: bytes, now: float) -> Optional[str]:
        """nf_conntrack_icmp{,v6}_error, then _packet."""
        family, kind = view.family, view.icmp_type
        if kind is None:
            return None
        if family == 6:
            if kind in ICMPV6_UNTRACKED:
                return UNTRACKED
            if kind < 128:
                return self._icmp_error(view, payload, now)
        elif kind > _ICMP_MAX_TYPE:
            return INVALID
        elif kind in _ICMP_ERRORS:
            return self._icmp_error(view, payload, now)
        start = transport_offset(payload)
        if start is None or start + 6 > len(payload):
            return None
        ident = _H.unpack_from(payload, start + 4)[0]
        key = (family, view.proto, view.src, view.dst, ident, kind, view.icmp_code)
        flow = self._find(key, now)
        if flow is None:
            if kind not in _ICMP_REQUESTS[family]:
                return INVALID          # a reply without its request; no connection at all
            self._add(key, _icmp_reply(key), now).expires = now + ICMP_TIMEOUT
            return NEW
        flow.expires = now + ICMP_TIMEOUT
        return self._answer(flow, key)

    def _icmp_error(self, view: PacketView, payload: bytes, now: float) -> str:
        """nf_conntrack_inet_error: `related` when the quoted packet's connection
        is tracked and the error goes to the quoted packet's source."""
        start = transport_offset(payload)
        if start is None:
            return INVALID
        quoted = payload[start + 8:]
        inner = parse(quoted, PacketMeta(wire_len=len(quoted) + 65536))     # cut, not malformed
        at = transport_offset(quoted)
        if inner.malformed or inner.src is None or at is None or inner.family != view.family \
                or inner.fragment == "not-first" or view.dst != inner.src:
            return INVALID
        proto = inner.proto
        if proto in _PORTED:
            if at + 4 > len(quoted):
                return INVALID
            sport, dport = _PORTS.unpack_from(quoted, at)
            other = _swap((inner.family, proto, inner.src, sport, inner.dst, dport))
        elif proto in (PROTO_ICMP, PROTO_ICMPV6):
            if at + 6 > len(quoted) or quoted[at] not in _ICMP_INVERSE[inner.family]:
                return INVALID          # not a request or reply: nf_ct_invert_tuple fails
            other = _icmp_reply((inner.family, proto, inner.src, inner.dst,
                                 _H.unpack_from(quoted, at + 4)[0], quoted[at], quoted[at + 1]))
        else:
            other = (inner.family, proto, inner.dst, inner.src)
        flow = self._tuples.get(other)
        if flow is None or now > flow.expires:
            return INVALID
        return RELATED                  # an error refreshes nothing

    # ---- the table ----------------------------------------------------------

    def _answer(self, flow: _Flow, key: tuple) -> str:
        """The state of a packet of `flow` going the way `key` says; a reply marks
        the flow as answered."""
        if key != flow.original:
            flow.seen_reply = True
            return ESTABLISHED
        return ESTABLISHED if flow.seen_reply else NEW

    def _find(self, key: tuple, now: float) -> Optional[_Flow]:
        flow = self._tuples.get(key)
        if flow is None:
            return None
        if now > flow.expires:
            self._forget(flow)
            return None
        self._recent.move_to_end(flow.original)
        return flow

    def _add(self, original: tuple, reply: tuple, now: float) -> _Flow:
        flow = _Flow(original, reply, now)
        self._tuples[original] = flow
        self._tuples.setdefault(reply, flow)    # a tuple that is its own reply: one entry
        self._recent[original] = flow
        while len(self._recent) > self.capacity:
            _, oldest = self._recent.popitem(last=False)
            self._drop_tuples(oldest)
            self.evicted += 1
        return flow

    def _forget(self, flow: _Flow) -> None:
        self._recent.pop(flow.original, None)
        self._drop_tuples(flow)

    def _drop_tuples(self, flow: _Flow) -> None:
        for key in (flow.original, flow.reply):
            if self._tuples.get(key) is flow:
                del self._tuples[key]

    def _remember_fragment(self, key: tuple, state: Optional[str]) -> None:
        fragments = self._fragments
        fragments.pop(key, None)
        fragments[key] = state
        if len(fragments) > _FRAGMENTS_KEPT:
            del fragments[next(iter(fragments))]


def _tcp_row(flags: int) -> int:
    """get_conntrack_index."""
    if flags & _RST:
        return RST_SET
    if flags & _SYN:
        return SYNACK_SET if flags & _ACK else SYN_SET
    if flags & _FIN:
        return FIN_SET
    if flags & _ACK:
        return ACK_SET
    return NONE_SET


def _swap(key: tuple) -> tuple:
    family, proto, src, sport, dst, dport = key
    return (family, proto, dst, dport, src, sport)


def _icmp_reply(key: tuple) -> tuple:
    family, proto, src, dst, ident, kind, code = key
    return (family, proto, dst, src, ident, _ICMP_INVERSE[family][kind], code)
