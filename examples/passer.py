#!/usr/bin/env python3
"""passer: the libipq manual's example, ported line by line to ipqd.tools.ipq.

Receives packets queued with `-j QUEUE` (NFQUEUE 0) and accepts each one.
    iptables -A OUTPUT -p icmp -j QUEUE
    python3 examples/passer.py
"""
import sys

from ipqd import ipq

BUFSIZE = 2048


def die(h):
    ipq.perror("passer")
    ipq.destroy_handle(h)
    sys.exit(1)


def main():
    h = ipq.create_handle(0, ipq.NFPROTO_IPV4)
    if not h:
        die(h)

    status = ipq.set_mode(h, ipq.IPQ_COPY_PACKET, BUFSIZE)
    if status < 0:
        die(h)

    while True:
        buf = bytearray(BUFSIZE)
        status = ipq.read_into(h, buf, BUFSIZE, 0)
        if status < 0:
            die(h)

        mtype = ipq.message_type(buf)
        if mtype == ipq.NLMSG_ERROR:
            print(f"Received error message {ipq.get_msgerr(buf)}", file=sys.stderr)

        elif mtype == ipq.IPQM_PACKET:
            m = ipq.get_packet(buf)
            status = ipq.set_verdict(h, m.packet_id, ipq.NF_ACCEPT, 0, None)
            if status < 0:
                die(h)

        else:
            print("Unknown message type!", file=sys.stderr)

    ipq.destroy_handle(h)
    return 0


if __name__ == "__main__":
    sys.exit(main())
