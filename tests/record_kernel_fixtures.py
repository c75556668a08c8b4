"""Record real nfnetlink_queue messages from the kernel as test fixtures.

Run as root (`.venv/bin/python tests/record_kernel_fixtures.py`): it makes a
throwaway namespace pair, queues a few packets of each kind, and writes every
datagram the kernel sends as hex, with the decoded values the tests expect
beside it (tests/fixtures/kernel/NAME.hex and NAME.json). The fixtures are
committed; the pure-layer tests read them without root.
"""
import json
import os
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from netns import Lab, iptables  # noqa: E402
from ipqd.wire import nfqueue as nfq  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "kernel")


def recv_raw(sock: socket.socket) -> bytes:
    sock.settimeout(2)
    return sock.recv(1 << 17)


def transact(sock, data: bytes) -> bytes:
    sock.send(data)
    return recv_raw(sock)


def save(name: str, data: bytes, note: str) -> None:
    events = nfq.QueueProtocol().receive_data(data)
    decoded = []
    for event in events:
        if isinstance(event, nfq.Packet):
            d = event.as_dict()
            d = {k: (v.hex() if isinstance(v, bytes) else v) for k, v in d.items()}
            d["conntrack"] = None if event.conntrack is None else list(event.conntrack)
            d["vlan"] = None if event.vlan is None else list(event.vlan)
            d["timestamp"] = None if event.timestamp is None else list(event.timestamp)
            decoded.append({"event": "Packet", **d})
        else:
            decoded.append({"event": type(event).__name__, "errno": getattr(event, "errno", 0)})
    with open(os.path.join(OUT, name + ".hex"), "w") as f:
        f.write(data.hex() + "\n")
    with open(os.path.join(OUT, name + ".json"), "w") as f:
        json.dump({"note": note, "events": decoded}, f, indent=1, sort_keys=True)
        f.write("\n")
    print(name, len(data), "bytes:", decoded)


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    lab = Lab()
    try:
        iptables(lab.server, "-A INPUT -p udp --dport 9999 -j NFQUEUE --queue-num 5")
        iptables(lab.server, "-A OUTPUT -p udp --dport 9998 -j MARK --set-mark 0x2a")
        iptables(lab.server, "-A OUTPUT -p udp --dport 9998 -j NFQUEUE --queue-num 5")
        iptables(lab.server, "-A INPUT -p udp --dport 9999 -j NFQUEUE --queue-num 5", family=6)
        nlsock = lab.server.netlink_socket()
        nlsock.bind((0, 0))
        save("ack-bind", transact(nlsock, nfq.encode_config_cmd(5, nfq.NFQNL_CFG_CMD_BIND, seq=1)),
             "ACK of BIND queue 5")
        save("error-ebusy", transact(nlsock, nfq.encode_config_cmd(5, nfq.NFQNL_CFG_CMD_BIND, seq=2)),
             "second BIND of queue 5 on the same socket: EBUSY")
        transact(nlsock, nfq.encode_config_params(5, nfq.NFQNL_COPY_PACKET, 64, seq=3))
        transact(nlsock, nfq.encode_config_flags(5, nfq.NFQA_CFG_F_UID_GID, nfq.NFQA_CFG_F_UID_GID, seq=4))

        rx = lab.server.socket(socket.AF_INET, socket.SOCK_DGRAM)
        rx.setsockopt(socket.SOL_SOCKET, 29, 1)  # SO_TIMESTAMP, so input skbs carry a timestamp
        rx.bind(("0.0.0.0", 9999))
        tx = lab.client.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tx.sendto(b"x" * 100, (lab.SERVER4, 9999))
        data = recv_raw(nlsock)
        save("packet-ipv4-udp-input-cut", data,
             "UDP/IPv4 to port 9999 arriving on veth-s (input hook), copy range 64: payload cut, cap_len 128")
        packet = nfq.QueueProtocol().receive_data(data)[0]
        nlsock.send(nfq.encode_verdict(5, packet.packet_id, nfq.NF_ACCEPT))

        out = lab.server.socket(socket.AF_INET, socket.SOCK_DGRAM)
        out.sendto(b"y" * 10, (lab.CLIENT4, 9998))
        data = recv_raw(nlsock)
        save("packet-ipv4-udp-output-mark", data,
             "UDP/IPv4 sent by the server (output hook) with mark 0x2a and uid/gid 0")
        packet = nfq.QueueProtocol().receive_data(data)[0]
        nlsock.send(nfq.encode_verdict(5, packet.packet_id, nfq.NF_DROP))

        rx6 = lab.server.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        rx6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        rx6.bind(("::", 9999))
        tx6 = lab.client.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        tx6.sendto(b"z" * 8, (lab.SERVER6, 9999))
        data = recv_raw(nlsock)
        save("packet-ipv6-udp-input", data, "UDP/IPv6 to port 9999, input hook, copy range 64")
        packet = nfq.QueueProtocol().receive_data(data)[0]
        nlsock.send(nfq.encode_verdict(5, packet.packet_id, nfq.NF_ACCEPT))

        transact(nlsock, nfq.encode_config_params(5, nfq.NFQNL_COPY_META, 0, seq=5))
        tx.sendto(b"m" * 20, (lab.SERVER4, 9999))
        data = recv_raw(nlsock)
        save("packet-ipv4-meta", data, "copy mode META: no payload attribute")
        packet = nfq.QueueProtocol().receive_data(data)[0]
        nlsock.send(nfq.encode_verdict(5, packet.packet_id + 1000, nfq.NF_ACCEPT, seq=77))
        save("error-verdict-enoent", recv_raw(nlsock), "verdict on an unknown packet id: ENOENT")
        nlsock.send(nfq.encode_verdict(5, packet.packet_id, nfq.NF_ACCEPT))
        nlsock.close()
    finally:
        lab.close()


if __name__ == "__main__":
    main()
