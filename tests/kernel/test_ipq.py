"""The libipq API: its buffers and error state (pure), then against the real kernel."""
import socket
import time

import pytest

from ipqd.tools import ipq
from ipqd.decision.checksum import fix_checksums
from netns import iptables


def sample_msg(**overrides):
    fields = dict(packet_id=7, mark=0x10, timestamp_sec=1700000000, timestamp_usec=123456, hook=1,
                  indev_name="eth0", outdev_name="", hw_protocol=0x0800, hw_type=1, hw_addrlen=6,
                  hw_addr=b"\x02\x00\x00\x00\x00\x01\0\0", data_len=4, payload=b"\x45\x00\x00\x04")
    fields.update(overrides)
    return ipq.PacketMsg(**fields)


def test_packet_message_round_trip_and_type():
    buf = ipq.encode_packet_msg(sample_msg())
    assert ipq.message_type(buf) == ipq.IPQM_PACKET == 0x13
    m = ipq.get_packet(buf)
    for name in ipq.PacketMsg.__slots__:
        assert getattr(m, name) == getattr(sample_msg(), name), name


def test_hw_protocol_is_stored_in_network_order_as_in_c():
    buf = ipq.encode_packet_msg(sample_msg(hw_protocol=0x86DD))
    # After the longs and the hook and names comes hw_protocol, big-endian.
    assert b"\x86\xdd" in buf and ipq.get_packet(buf).hw_protocol == 0x86DD


def test_error_message():
    from ipqd.wire import nfnetlink as nl
    buf = nl.encode_nlmsgerr(2, nl.encode_nlmsg(0x0301, 0, 5, b""))
    assert ipq.message_type(buf) == ipq.NLMSG_ERROR
    assert ipq.get_msgerr(buf) == 2


def test_error_state_is_per_handle_and_global(capsys):
    class FakeHandle:
        ipq_errno = ipq.IPQ_ERR_NONE
        errno = 0
    a, b = FakeHandle(), FakeHandle()
    ipq._fail(a, ipq.IpqError(ipq.IPQ_ERR_TIMEOUT))
    ipq._fail(b, ipq.IpqError(ipq.IPQ_ERR_SEND, 1))
    assert ipq.errstr(a) == "Timeout"
    assert ipq.errstr(b) == "Failed to send netlink message"
    assert ipq.errstr() == "Failed to send netlink message"        # the latest, as ipq_errno
    ipq.perror("passer")
    assert capsys.readouterr().err == "passer: Failed to send netlink message: Operation not permitted\n"
    ipq.perror("x", a)
    assert capsys.readouterr().err == "x: Timeout\n"


def test_bad_protocol_is_refused():
    assert ipq.create_handle(0, 99) is None
    assert ipq.errstr() == "Invalid protocol specified"


# ---------------------------------------------------------------- real kernel

def handle_in(lab, protocol=ipq.NFPROTO_IPV4, queue=0):
    h = ipq.create_handle(0, protocol, queue=queue, sock=lab.server.netlink_socket())
    assert h is not None, ipq.errstr()
    return h


def udp(lab):
    rx = lab.server.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("0.0.0.0", 9999))
    rx.settimeout(2)
    tx = lab.client.socket(socket.AF_INET, socket.SOCK_DGRAM)
    return rx, tx, (lab.SERVER4, 9999)


@pytest.mark.kernel
def test_read_packet_fields_and_verdict(lab):
    iptables(lab.server, "-A INPUT -p udp --dport 9999 -j QUEUE")
    h = handle_in(lab)
    try:
        assert ipq.set_mode(h, ipq.IPQ_COPY_PACKET, 2048) > 0
        rx, tx, dst = udp(lab)
        tx.sendto(b"libipq", dst)
        buf = bytearray(2048)
        status = ipq.read_into(h, buf, 2048, 0)
        assert status > 0
        assert ipq.message_type(buf) == ipq.IPQM_PACKET
        m = ipq.get_packet(buf)
        assert m.hook == 1 and m.indev_name == "veth-s" and m.outdev_name == ""
        assert m.hw_protocol == 0x0800 and m.hw_type == 1 and m.hw_addrlen == 6
        assert m.data_len == 20 + 8 + 6 and m.payload.endswith(b"libipq")
        assert abs(m.timestamp_sec + m.timestamp_usec / 1e6 - time.time()) < 5
        changed = fix_checksums(m.payload[:28] + b"LIBIPQ")
        assert ipq.set_verdict(h, m.packet_id, ipq.NF_ACCEPT, len(changed), changed) > 0
        assert rx.recv(100) == b"LIBIPQ"
    finally:
        ipq.destroy_handle(h)


@pytest.mark.kernel
def test_read_timeout_in_microseconds(lab):
    h = handle_in(lab)
    try:
        assert ipq.set_mode(h, ipq.IPQ_COPY_META, 0) > 0
        start = time.monotonic()
        assert ipq.read(h, 2048, 200_000) == 0
        assert 0.19 < time.monotonic() - start < 1.0
        assert ipq.errstr(h) == "Timeout"
        start = time.monotonic()
        assert ipq.read(h, 2048, -1) == 0                 # negative: return at once
        assert time.monotonic() - start < 0.1
    finally:
        ipq.destroy_handle(h)


@pytest.mark.kernel
def test_meta_mode_and_kernel_error_message(lab):
    iptables(lab.server, "-A INPUT -p udp --dport 9999 -j QUEUE")
    h = handle_in(lab)
    try:
        ipq.set_mode(h, ipq.IPQ_COPY_META, 0)
        rx, tx, dst = udp(lab)
        tx.sendto(b"meta", dst)
        buf = ipq.read(h, 2048, 2_000_000)
        m = ipq.get_packet(buf)
        assert m.data_len == 0 and m.payload == b""
        assert ipq.set_verdict(h, m.packet_id + 100, ipq.NF_ACCEPT, 0, None) > 0
        err = ipq.read(h, 2048, 2_000_000)                 # the kernel's answer to a bad id
        assert ipq.message_type(err) == ipq.NLMSG_ERROR and ipq.get_msgerr(err) == 2   # ENOENT
        ipq.set_verdict(h, m.packet_id, ipq.NF_ACCEPT, 0, None)
        assert rx.recv(10) == b"meta"
    finally:
        ipq.destroy_handle(h)


@pytest.mark.kernel
def test_small_buffer_is_rtrunc(lab):
    iptables(lab.server, "-A INPUT -p udp --dport 9999 -j QUEUE")
    h = handle_in(lab)
    try:
        ipq.set_mode(h, ipq.IPQ_COPY_PACKET, 2048)
        rx, tx, dst = udp(lab)
        tx.sendto(b"x" * 500, dst)
        assert ipq.read(h, 100, 2_000_000) == -1
        assert ipq.errstr(h) == "Received message truncated"
        m = ipq.get_packet(ipq.read(h, 4096, 0))             # still there for a big enough buffer
        ipq.set_verdict(h, m.packet_id, ipq.NF_DROP, 0, None)
        with pytest.raises(socket.timeout):
            rx.recv(1000)
    finally:
        ipq.destroy_handle(h)


@pytest.mark.kernel
def test_pythonic_handle(lab):
    iptables(lab.server, "-A INPUT -p udp --dport 9999 -j NFQUEUE --queue-num 3")
    with ipq.open_handle(queue=3, sock=lab.server.netlink_socket()) as h:
        rx, tx, dst = udp(lab)
        for word in (b"one", b"two", b"three"):
            tx.sendto(word, dst)
        seen = []
        for m in h.packets(timeout=0.5):
            seen.append(m.payload[28:])
            (h.drop if m.payload.endswith(b"two") else h.accept)(m)
        assert seen == [b"one", b"two", b"three"]
        assert sorted([rx.recv(10), rx.recv(10)]) == [b"one", b"three"]
