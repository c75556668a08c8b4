"""The queue client against the real kernel, in throwaway namespaces.

Each test builds a client and a server host joined by veth, sends real
traffic, answers it through ipqd's own netlink client, and asserts both
sides: what the client saw, and what the receiver got.
"""
import errno
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from ipqd.kernel import multi_receive
from ipqd.wire import nfqueue as nfq
from ipqd.decision.checksum import fix_checksums
from ipqd.errors import NetlinkError
from ipqd.kernel.queue_socket import QueueSocket
from netns import find_ifindex, iptables

pytestmark = pytest.mark.kernel
SO_TIMESTAMP = 29
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def udp_pair(lab, family=socket.AF_INET, port=9999):
    rx = lab.server.socket(family, socket.SOCK_DGRAM)
    if family == socket.AF_INET6:
        rx.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    rx.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
    rx.settimeout(1.0)
    tx = lab.client.socket(family, socket.SOCK_DGRAM)
    dst = (lab.SERVER6 if family == socket.AF_INET6 else lab.SERVER4, port)
    return rx, tx, dst


def server_queue(lab, **bind):
    qs = QueueSocket(sock=lab.server.netlink_socket())
    qs.bind(bind.pop("queue", 0), **bind)
    return qs


def receive_n(qs, n, timeout=3.0):
    got, deadline = [], time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        got.extend(qs.receive(timeout=0.2))
    return got


def recv_or_none(sock):
    try:
        return sock.recv(65535)
    except socket.timeout:
        return None


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def test_udp_metadata_and_accept(lab, family):
    v = 6 if family == socket.AF_INET6 else 4
    iptables(lab.server, "-t mangle -A INPUT -p udp --dport 9999 -j MARK --set-mark 0x11", family=v)
    iptables(lab.server, "-t mangle -A INPUT -p udp --dport 9999 -j NFQUEUE --queue-num 2", family=v)
    with server_queue(lab, queue=2) as qs:
        rx, tx, dst = udp_pair(lab, family)
        rx.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMP, 1)   # so input packets carry timestamps
        time.sleep(0.2)      # the kernel turns stamping on from a work item, not at once
        before = time.time()
        tx.sendto(b"hello", dst)
        (packet,) = receive_n(qs, 1)
        assert packet.queue == 2
        assert packet.family == (10 if v == 6 else 2)
        assert packet.hook == 1                                      # NF_INET_LOCAL_IN
        assert packet.hw_protocol == (0x86DD if v == 6 else 0x0800)
        assert qs.ifname(packet.indev) == "veth-s"
        assert packet.indev == find_ifindex(lab.server, "veth-s")
        assert packet.outdev is None
        assert packet.mark == 0x11
        assert packet.payload.endswith(b"hello")
        assert len(packet.payload) == (40 if v == 6 else 20) + 8 + 5
        assert packet.hwaddr is not None and len(packet.hwaddr) == 6
        assert qs.hwtype("veth-s") == 1                              # ARPHRD_ETHER
        sec, usec = packet.timestamp
        assert before - 1 <= sec + usec / 1e6 <= time.time() + 1
        assert recv_or_none(rx) is None                              # held until the verdict
        qs.verdict(packet, nfq.NF_ACCEPT)
        rx.settimeout(2)
        assert rx.recv(100) == b"hello"


def test_drop_stops_the_packet(lab):
    iptables(lab.server, "-A INPUT -p udp --dport 9999 -j NFQUEUE --queue-num 0")
    with server_queue(lab) as qs:
        rx, tx, dst = udp_pair(lab)
        tx.sendto(b"a", dst)
        tx.sendto(b"b", dst)
        first, second = receive_n(qs, 2)
        qs.verdict(first, nfq.NF_DROP)
        qs.verdict(second, nfq.NF_ACCEPT)
        assert rx.recv(10) == b"b"
        assert recv_or_none(rx) is None


def test_verdict_mark_reaches_later_rules(lab):
    iptables(lab.server, "-t mangle -A INPUT -p udp --dport 9999 -j NFQUEUE --queue-num 0")
    iptables(lab.server, "-A INPUT -p udp --dport 9999 -m mark --mark 0x7 -j ACCEPT")
    iptables(lab.server, "-A INPUT -p udp --dport 9999 -j DROP")
    with server_queue(lab) as qs:
        rx, tx, dst = udp_pair(lab)
        tx.sendto(b"marked", dst)
        tx.sendto(b"plain", dst)
        first, second = receive_n(qs, 2)
        qs.verdict(first, nfq.NF_ACCEPT, mark=7)
        qs.verdict(second, nfq.NF_ACCEPT)
        assert rx.recv(10) == b"marked"
        assert recv_or_none(rx) is None          # unmarked: dropped by the filter rule


def test_batch_verdict_releases_many(lab, monkeypatch):
    iptables(lab.server, "-A INPUT -p udp --dport 9999 -j NFQUEUE --queue-num 0")
    calls = []
    real_recvmmsg = multi_receive._recvmmsg
    monkeypatch.setattr(multi_receive, "_recvmmsg", lambda *a: calls.append(a) or real_recvmmsg(*a))
    with server_queue(lab) as qs:
        rx, tx, dst = udp_pair(lab)
        for i in range(50):
            tx.sendto(b"%d" % i, dst)
        time.sleep(0.2)                     # all 50 queued: one receive takes them
        packets = qs.receive(timeout=1)
        assert sorted(int(p.payload[28:]) for p in packets) == list(range(50))
        assert len(calls) == 1              # one recv, then one recvmmsg for the other 49
        assert recv_or_none(rx) is None
        qs.verdict_batch(0, max(p.packet_id for p in packets), nfq.NF_ACCEPT)
        got = sorted(int(rx.recv(10)) for _ in range(50))
        assert got == list(range(50))
        assert qs.stats.batches == 1 and qs.stats.verdicts == 0


def test_several_verdicts_in_one_datagram(lab):
    iptables(lab.server, "-A INPUT -p udp --dport 9999 -j NFQUEUE --queue-num 0")
    with server_queue(lab) as qs:
        rx, tx, dst = udp_pair(lab)
        for i in range(5):
            tx.sendto(b"%d" % i, dst)
        packets = receive_n(qs, 5)
        qs.send_many([nfq.encode_verdict(0, p.packet_id, nfq.NF_ACCEPT if i % 2 == 0 else nfq.NF_DROP)
                      for i, p in enumerate(packets)])
        assert sorted(rx.recv(10) for _ in range(3)) == [b"0", b"2", b"4"]
        assert recv_or_none(rx) is None


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("new", [b"HELLO", b"a longer payload than before"])
def test_replacement_payload_with_fixed_checksums(lab, family, new):
    v = 6 if family == socket.AF_INET6 else 4
    iptables(lab.server, "-A INPUT -p udp --dport 9999 -j NFQUEUE --queue-num 0", family=v)
    with server_queue(lab) as qs:
        rx, tx, dst = udp_pair(lab, family)
        tx.sendto(b"hello", dst)
        (packet,) = receive_n(qs, 1)
        header = (40 if v == 6 else 20) + 8
        changed = fix_checksums(packet.payload[:header] + new)
        qs.verdict(packet, nfq.NF_ACCEPT, payload=changed)
        assert rx.recv(100) == new


def test_bad_checksum_replacement_is_dropped_by_the_kernel(lab):
    """Why fix_checksums exists: the manual's warning, shown."""
    iptables(lab.server, "-A INPUT -p udp --dport 9999 -j NFQUEUE --queue-num 0")
    with server_queue(lab) as qs:
        rx, tx, dst = udp_pair(lab)
        tx.sendto(b"hello", dst)
        (packet,) = receive_n(qs, 1)
        qs.verdict(packet, nfq.NF_ACCEPT, payload=packet.payload[:28] + b"HELLO")
        assert recv_or_none(rx) is None


def test_copy_mode_meta_and_copy_range(lab):
    iptables(lab.server, "-A INPUT -p udp --dport 9999 -j NFQUEUE --queue-num 0")
    with server_queue(lab, copy_mode=nfq.NFQNL_COPY_META, copy_range=0) as qs:
        rx, tx, dst = udp_pair(lab)
        tx.sendto(b"x" * 300, dst)
        (packet,) = receive_n(qs, 1)
        assert packet.payload is None
        qs.verdict(packet, nfq.NF_ACCEPT)
        qs.set_mode(0, nfq.NFQNL_COPY_PACKET, 40)
        tx.sendto(b"y" * 300, dst)
        (packet,) = receive_n(qs, 1)
        assert len(packet.payload) == 40 and packet.cap_len == 328
        qs.verdict(packet, nfq.NF_ACCEPT)
        assert len(rx.recv(1000)) == 300 and len(rx.recv(1000)) == 300


def test_receive_timeout_returns_in_time(lab):
    with server_queue(lab) as qs:
        start = time.monotonic()
        assert qs.receive(timeout=0.3) == []
        elapsed = time.monotonic() - start
        assert 0.29 <= elapsed < 1.0
        start = time.monotonic()
        assert qs.receive(timeout=0) == []
        assert time.monotonic() - start < 0.1


def test_tcp_handshake_accepted_then_dropped(lab):
    iptables(lab.server, "-A INPUT -p tcp --dport 8080 -j NFQUEUE --queue-num 0")
    listener = lab.server.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("0.0.0.0", 8080))
    listener.listen(4)
    with server_queue(lab) as qs:
        stop = threading.Event()
        decide = {"verdict": nfq.NF_ACCEPT}
        seen = []

        def answer():
            while not stop.is_set():
                for packet in qs.receive(timeout=0.05):
                    seen.append(packet.payload[33] if packet.payload else None)   # TCP flags
                    qs.verdict(packet, decide["verdict"])

        worker = threading.Thread(target=answer)
        worker.start()
        try:
            client = lab.client.socket(socket.AF_INET, socket.SOCK_STREAM)
            client.settimeout(2)
            client.connect((lab.SERVER4, 8080))
            client.sendall(b"over tcp")
            conn, _ = listener.accept()
            conn.settimeout(2)
            assert conn.recv(100) == b"over tcp"
            assert seen and seen[0] & 0x02                       # the first packet was the SYN
            decide["verdict"] = nfq.NF_DROP
            blocked = lab.client.socket(socket.AF_INET, socket.SOCK_STREAM)
            blocked.settimeout(1)
            with pytest.raises(OSError):
                blocked.connect((lab.SERVER4, 8080))
        finally:
            stop.set()
            worker.join()


def test_ping_through_queue_target_with_the_passer_example(lab):
    """The manual's own example: `iptables -A OUTPUT -p icmp -j QUEUE` and passer."""
    iptables(lab.client, "-A OUTPUT -p icmp -j QUEUE")
    assert lab.client.sh(f"ping -c 1 -W 1 {lab.SERVER4}", check=False).returncode != 0
    passer = lab.client.popen([sys.executable, os.path.join(ROOT, "examples", "passer.py")],
                              env={**os.environ, "PYTHONPATH": ROOT})
    try:
        time.sleep(0.5)
        assert passer.poll() is None, passer.stderr.read()
        result = lab.client.sh(f"ping -c 3 -i 0.2 -W 2 {lab.SERVER4}", check=False)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "3 received" in result.stdout
    finally:
        passer.kill()
        passer.wait()


def test_ping6_queued_and_dropped(lab):
    iptables(lab.client, "-A OUTPUT -p icmpv6 --icmpv6-type echo-request -j NFQUEUE --queue-num 1",
             family=6)
    with QueueSocket(sock=lab.client.netlink_socket()) as qs:
        qs.bind(1, family="ipv6")
        ping = lab.client.popen(["ping", "-6", "-c", "1", "-W", "1", lab.SERVER6])
        (packet,) = receive_n(qs, 1)
        assert packet.hook == 3 and qs.ifname(packet.outdev) == "veth-c"
        assert packet.payload[6] == 58                               # ICMPv6
        qs.verdict(packet, nfq.NF_DROP)
        assert ping.wait(5) != 0


def test_second_bind_of_a_held_queue_names_it_and_close_frees_it(lab):
    first = QueueSocket(sock=lab.server.netlink_socket())
    first.bind(4)
    second = QueueSocket(sock=lab.server.netlink_socket())
    try:
        with pytest.raises(NetlinkError) as info:
            second.bind(4)
        assert info.value.errno == errno.EPERM
        assert "bind queue 4" in str(info.value)
        assert "queue 4 is held by another process" in str(info.value)
        first.close()
        second.bind(4)                   # freed by closing the holder
        assert second.queues == {4: frozenset({2, 10})}
    finally:
        first.close()
        second.close()


def test_same_socket_binding_twice_is_ebusy(lab):
    with server_queue(lab, queue=6) as qs:
        with pytest.raises(NetlinkError) as info:
            qs.bind(6)
        assert info.value.errno == errno.EBUSY
        assert "already bound by this socket" in str(info.value)


def test_without_cap_net_admin_the_error_says_so(lab):
    code = ("import sys; sys.path.insert(0, %r)\n"
            "from ipqd.kernel.queue_socket import QueueSocket\n"
            "from ipqd.errors import NetlinkError\n"
            "try:\n    QueueSocket().bind(0)\n"
            "except NetlinkError as e:\n    print(e.errno, e)\n") % ROOT
    result = subprocess.run(
        # Root without CAP_NET_ADMIN: still able to read the checkout, wherever it lies.
        ["ip", "netns", "exec", lab.server.name, "setpriv", "--inh-caps=-net_admin",
         "--bounding-set=-net_admin", sys.executable, "-c", code],
        capture_output=True, text=True, timeout=30)
    assert result.stdout.startswith(f"{errno.EPERM} bind queue 0: Operation not permitted (EPERM)"), \
        result.stdout + result.stderr
    assert "needs CAP_NET_ADMIN" in result.stdout


def test_several_queues_and_sockets_in_one_process(lab):
    for queue, port in ((10, 9010), (11, 9011), (12, 9012)):
        iptables(lab.server, f"-A INPUT -p udp --dport {port} -j NFQUEUE --queue-num {queue}")
    shared = server_queue(lab, queue=10)
    shared.bind(11)
    alone = server_queue(lab, queue=12)
    try:
        tx = lab.client.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for port in (9010, 9011, 9012):
            tx.sendto(b"p", (lab.SERVER4, port))
        got_shared = receive_n(shared, 2)
        got_alone = receive_n(alone, 1)
        assert sorted(p.queue for p in got_shared) == [10, 11]
        assert [p.queue for p in got_alone] == [12]
        for packet in got_shared:
            shared.verdict(packet, nfq.NF_ACCEPT)
        alone.verdict(got_alone[0], nfq.NF_ACCEPT)
    finally:
        shared.close()
        alone.close()


def test_flags_fail_open_and_conntrack_errors(lab):
    iptables(lab.server, "-A INPUT -p udp --dport 9999 -j NFQUEUE --queue-num 0")
    with server_queue(lab, maxlen=2, flags=nfq.NFQA_CFG_F_FAIL_OPEN) as qs:
        rx, tx, dst = udp_pair(lab)
        for i in range(6):
            tx.sendto(b"%d" % i, dst)
        time.sleep(0.2)
        # Queue length 2 with FAIL_OPEN: the packets past it pass uninspected.
        passed = [rx.recv(10) for _ in range(4)]
        assert len(passed) == 4
        held = receive_n(qs, 2)
        assert len(held) == 2
        qs.verdict_batch(0, max(p.packet_id for p in held), nfq.NF_ACCEPT)
        qs.set_flags(0, 0, nfq.NFQA_CFG_F_FAIL_OPEN)      # off again: flags 0 with the mask
        try:
            qs.set_flags(0, nfq.NFQA_CFG_F_CONNTRACK, nfq.NFQA_CFG_F_CONNTRACK)
        except NetlinkError as err:      # kernels without CONFIG_NETFILTER_NETLINK_GLUE_CT
            assert err.errno == errno.EOPNOTSUPP
            assert "cannot attach conntrack information" in str(err)


def test_enobufs_is_survived_and_counted(lab):
    iptables(lab.server, "-A INPUT -p udp --dport 9999 -j NFQUEUE --queue-num 0")
    with server_queue(lab, maxlen=10000) as qs:
        qs.set_rcvbuf(4096)
        rx, tx, dst = udp_pair(lab)
        for _ in range(300):
            tx.sendto(b"z" * 1000, dst)
        time.sleep(0.3)
        packets = receive_n(qs, 300, timeout=1.0)
        assert qs.stats.enobufs >= 1
        assert 0 < len(packets) < 300
        qs.verdict_batch(0, max(p.packet_id for p in packets), nfq.NF_ACCEPT)
        stats = lab.server.sh("cat /proc/net/netfilter/nfnetlink_queue").stdout.split()
        assert int(stats[6]) > 0                          # the kernel's user-dropped counter
        tx.sendto(b"after", dst)                          # still working afterwards
        (after,) = [p for p in receive_n(qs, 1) if p.payload.endswith(b"after")]
        qs.verdict(after, nfq.NF_ACCEPT)


def test_no_enobufs_option_silences_the_error_and_the_kernel_still_counts(lab):
    iptables(lab.server, "-A INPUT -p udp --dport 9999 -j NFQUEUE --queue-num 0")
    qs = QueueSocket(sock=lab.server.netlink_socket(), no_enobufs=True)
    try:
        qs.bind(0, maxlen=10000)
        granted = qs.set_rcvbuf(4096)
        assert granted < 65536
        rx, tx, dst = udp_pair(lab)
        for _ in range(300):
            tx.sendto(b"z" * 1000, dst)
        time.sleep(0.3)
        packets = receive_n(qs, 300, timeout=1.0)
        assert qs.stats.enobufs == 0 and 0 < len(packets) < 300
        qs.verdict_batch(0, max(p.packet_id for p in packets), nfq.NF_ACCEPT)
        stats = lab.server.sh("cat /proc/net/netfilter/nfnetlink_queue").stdout.split()
        assert int(stats[6]) > 0                          # user-dropped, counted by the kernel
    finally:
        qs.close()
