"""The packet description of `ipqd explain`, as text: its --help and its errors.

Kept apart from explain.py (which imports dpkt) so the command line parser
can show it without importing anything.
"""
from __future__ import annotations

__all__ = ["EXPECTED_FORM", "EXPLAIN_EPILOG", "FORM"]

FORM = "PROTO SRC[:PORT] -> DST[:PORT] [FLAGS|ICMP-TYPE] [key=value ...]"
KEYS = ("len, mark, uid, gid, ct, in, out, hook, frag (first|not-first), flags, type, code, "
        "cgroup (a path), unit")
_EXAMPLES = (
    '"tcp 10.0.0.5:40000 -> 10.0.0.1:22 syn"',
    '"udp [fd00::1]:53 -> [fd00::2]:5353 len=1200"',
    '"icmp 10.0.0.1 -> 10.0.0.2 echo-request"',
)

# After an unreadable description, on stderr.
EXPECTED_FORM = (f"expected: {FORM}, e.g.\n" + "".join(f"  {e}\n" for e in _EXAMPLES) +
                 f"keys: {KEYS}")

EXPLAIN_EPILOG = f"""\
packet description (PACKET):
  {FORM}
  PROTO      tcp, udp, icmp, icmpv6, sctp, udplite, gre, esp, ah, igmp, or a number
  SRC, DST   an address, with :PORT for tcp, udp, sctp and udplite;
             IPv6 with a port in brackets: [fd00::1]:53
  FLAGS      tcp flags, comma-separated: syn (the default), ack, fin, rst, psh, urg,
             ece, cwr; none for no flag at all
  ICMP-TYPE  a type name (echo-request, the default) or number
  keys       {KEYS}
             (ct: new, established, related, invalid or untracked, as --ct-state)

examples:
  ipqd explain policy.yaml "tcp 10.0.0.5:40000 -> 10.0.0.1:22 syn"
  ipqd explain policy.yaml "tcp 10.0.0.5:40000 -> 10.0.0.1:22 ack" --ct-state established
  ipqd explain policy.yaml "udp [fd00::1]:53 -> [fd00::2]:5353 len=1200" --in eth0
  ipqd explain policy.yaml "icmpv6 fe80::1 -> ff02::1 neighbour-advertisement"
  ipqd explain policy.yaml --pcap capture.pcap --json | jq -c 'select(.verdict == "drop")'

A capture's packets get the connection-tracking state the kernel would give
them, followed through the capture (docs: ipqd-policy(5), "ipqd explain and
connection state")."""
