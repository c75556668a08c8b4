"""Dynamic sets through the real queue: `ipqd set` changes the verdict of
the next packet of a flow the verdict cache already holds, and of a TCP
connection that offload would otherwise have handed to the kernel; entries
survive a reload and a restart, and expire on time."""
import json
import os
import socket
import subprocess
import threading
import time

import pytest

from daemon_harness import IPQD, RunningIpqd
from ipqd.control.client import call
from ipqd.daemon.control import ASK_AGAIN_AFTER

pytestmark = pytest.mark.kernel

POLICY = """\
version: 1
queue: {num: 4, bypass: false, fail_open: false}
hooks:
  - {chain: input, family: both}
default: {action: drop, log: false}
sets:
  banned: {type: address, dynamic: true, timeout: 1h, max: 1000}
rules:
  - {name: neighbours, proto: icmpv6, action: accept, log: false}
  - {name: banned, src: "@banned", action: drop, log: false}
  - {name: udp, proto: udp, dport: 5000, action: accept, log: false}
  - {name: tcp, proto: tcp, dport: 5001, action: accept, log: false}
"""
APPLIED_WITHIN = 0.010          # a change holds for every packet sent this long after it


def start(lab, tmp_path, text=POLICY):
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    os.chmod(path, 0o644)
    control = str(tmp_path / "state" / "control")
    running = RunningIpqd(lab.server, str(path), str(tmp_path / "state"), "--control", control)
    running.control = control
    return running


def ipqd_set(daemon, *args):
    return subprocess.run([IPQD, "set", *args, "--control", daemon.control],
                          capture_output=True, text=True, timeout=60)


class Flow:
    """One UDP flow (the same ports every time) client -> server:5000."""

    def __init__(self, lab, family=socket.AF_INET):
        v6 = family == socket.AF_INET6
        self.rx = lab.server.socket(family, socket.SOCK_DGRAM)
        if v6:
            self.rx.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        self.rx.bind(("::" if v6 else "0.0.0.0", 5000))
        self.rx.settimeout(0.3)
        self.tx = lab.client.socket(family, socket.SOCK_DGRAM)
        if v6:
            self.tx.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        self.tx.bind(("::" if v6 else "0.0.0.0", 40000))
        self.to = (lab.SERVER6 if v6 else lab.SERVER4, 5000)
        self.n = 0
        self.passed = 0             # every packet that got through
        self.stopped = 0            # packets that did not, once warm
        self.warmed = False

    def passes(self) -> bool:
        self.n += 1
        payload = b"packet %d" % self.n
        self.tx.sendto(payload, self.to)
        try:
            while True:
                if self.rx.recv(100) == payload:
                    self.passed += 1
                    return True
        except socket.timeout:
            self.stopped += self.warmed
            return False

    def warm(self) -> None:
        """Through once, neighbour discovery and all; not counted."""
        deadline = time.monotonic() + 5
        while not self.passes():
            assert time.monotonic() < deadline, "the flow never got through"
        self.warmed = True

    def close(self):
        self.rx.close()
        self.tx.close()


def test_a_change_reaches_the_next_packet_of_a_cached_flow(lab, tmp_path):
    daemon = start(lab, tmp_path)
    flows = [Flow(lab), Flow(lab, socket.AF_INET6)]
    try:
        for flow in flows:
            flow.warm()
        time.sleep(0.5)                 # late warm-up packets in, then counted from here
        before = {r["name"]: r for r in call(daemon.control, "counters")["rules"]}
        warm = sum(flow.passed for flow in flows)
        for flow in flows:
            assert all(flow.passes() for _ in range(5))
        time.sleep(ASK_AGAIN_AFTER)     # the next status asks the workers afresh
        status = call(daemon.control, "status")
        assert status["cache"]["hits"] >= 6          # the flows are answered from the cache
        assert status["sets"] == {"banned": 0}

        result = ipqd_set(daemon, "add", "banned", "10.77.0.1", "fd77::1/128")
        assert result.returncode == 0, result.stderr
        assert "2 added" in result.stdout
        time.sleep(APPLIED_WITHIN)
        assert [flow.passes() for flow in flows] == [False, False]
        assert [flow.passes() for flow in flows] == [False, False]

        assert ipqd_set(daemon, "del", "banned", "fd77::1").returncode == 0
        time.sleep(APPLIED_WITHIN)
        assert [flow.passes() for flow in flows] == [False, True]

        assert ipqd_set(daemon, "add", "banned", "10.0.0.0/8").returncode == 0   # a network
        assert ipqd_set(daemon, "del", "banned", "10.77.0.1").returncode == 0
        time.sleep(APPLIED_WITHIN)
        assert not flows[0].passes()
        assert ipqd_set(daemon, "flush", "banned").returncode == 0
        time.sleep(APPLIED_WITHIN)
        assert [flow.passes() for flow in flows] == [True, True]

        # Every packet of the flows was ipqd's to decide: none was offloaded.
        time.sleep(ASK_AGAIN_AFTER)
        rules = {r["name"]: r for r in call(daemon.control, "counters")["rules"]}
        assert rules["udp"]["accepted"] - before["udp"]["accepted"] == \
            sum(flow.passed for flow in flows) - warm
        assert rules["banned"]["dropped"] == sum(flow.stopped for flow in flows) == 6
        daemon.wait_for(lambda l: l.startswith("set banned: 10.77.0.1, fd77::1 added")
                        and "by uid 0" in l)
        daemon.wait_for(lambda l: l.startswith("set banned: flushed by uid 0"))
    finally:
        for flow in flows:
            flow.close()
        assert daemon.stop() == 0


def test_a_tcp_connection_is_not_offloaded_past_a_ban(lab, tmp_path):
    """Offload is on, but the accepting rule sits below one that reads a
    dynamic set: the established connection stays in ipqd's hands, and
    its next segment after the ban is dropped."""
    daemon = start(lab, tmp_path)
    listener = lab.server.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("0.0.0.0", 5001))
    listener.listen(1)
    client = lab.client.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        client.connect((lab.SERVER4, 5001))
        conn, _ = listener.accept()
        conn.settimeout(1.0)
        for _ in range(20):
            client.sendall(b"x" * 100)
            assert conn.recv(1000)
        assert call(daemon.control, "status")["packets"]["offloaded"] == 0
        assert ipqd_set(daemon, "add", "banned", "10.77.0.1").returncode == 0
        time.sleep(APPLIED_WITHIN)
        client.sendall(b"after the ban")
        with pytest.raises(socket.timeout):
            conn.recv(1000)
        assert ipqd_set(daemon, "del", "banned", "10.77.0.1").returncode == 0
        conn.settimeout(10.0)           # the client's retransmission gets through
        assert conn.recv(1000) == b"after the ban"
        conn.close()
    finally:
        client.close()
        listener.close()
        assert daemon.stop() == 0


def test_entries_survive_reload_and_restart_and_expire_on_time(lab, tmp_path):
    daemon = start(lab, tmp_path)
    flow = Flow(lab)
    try:
        flow.warm()
        assert ipqd_set(daemon, "add", "banned", "10.77.0.1", "192.0.2.0/24").returncode == 0
        assert ipqd_set(daemon, "add", "banned", "198.51.100.7", "--timeout", "30s").returncode == 0
        assert daemon.reload().startswith("reloaded policy")
        assert not flow.passes()
        assert ipqd_set(daemon, "add", "banned", "203.0.113.9", "--timeout", "3s").returncode == 0
        added = time.monotonic()
        assert daemon.stop() == 0
        assert time.monotonic() - added < 3, "too slow a stop for this test"
        time.sleep(3.2 - (time.monotonic() - added))    # its time runs out while ipqd is stopped

        daemon = start(lab, tmp_path)
        daemon.wait_for(lambda l: l == "set banned: 203.0.113.9 expired while ipqd was stopped")
        daemon.wait_for(lambda l: l == "set banned: 3 entries restored")
        listed = json.loads(ipqd_set(daemon, "list", "banned", "--json").stdout)
        remaining = {e["entry"]: e["remaining"] for e in listed["entries"]}
        assert set(remaining) == {"10.77.0.1", "192.0.2.0/24", "198.51.100.7"}
        assert 3500 < remaining["10.77.0.1"] <= 3600 and 0 < remaining["198.51.100.7"] < 30
        assert not flow.passes()

        # A short timeout: the daemon expires it on time, and says so.
        assert ipqd_set(daemon, "add", "banned", "10.77.0.1", "--timeout", "1s").returncode == 0
        added = time.monotonic()
        daemon.wait_for(lambda l: l.startswith("set banned: 10.77.0.1 expired"), timeout=5)
        assert time.monotonic() - added < 1.5
        assert flow.passes()
        text = ipqd_set(daemon, "list", "banned").stdout
        assert "10.77.0.1" not in text and "198.51.100.7" in text and "192.0.2.0/24" in text
    finally:
        flow.close()
        daemon.stop()


def test_a_hundred_thousand_entries_from_a_file_in_under_two_seconds(lab, tmp_path):
    daemon = start(lab, tmp_path, POLICY.replace("max: 1000", "max: 1000000"))
    try:
        lines = [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(100_000)]
        path = tmp_path / "many.txt"
        path.write_text("# a big list\n" + "\n".join(lines) + "\n")
        started = time.monotonic()
        result = ipqd_set(daemon, "add", "banned", "--file", str(path))
        took = time.monotonic() - started
        assert result.returncode == 0, result.stderr
        assert "100000 added" in result.stdout
        assert took < 2.0, took
        assert call(daemon.control, "status")["sets"] == {"banned": 100_000}
        flow = Flow(lab)
        try:
            flow.warm()                             # 10.77.0.1 is not among them
            assert ipqd_set(daemon, "add", "banned", "10.77.0.1").returncode == 0
            time.sleep(APPLIED_WITHIN)
            assert not flow.passes()
        finally:
            flow.close()
        bad = tmp_path / "bad.txt"
        bad.write_text("192.0.2.1\n\n# fine so far\n192.0.2.x\n")
        result = ipqd_set(daemon, "add", "banned", "--file", str(bad))
        assert result.returncode == 1
        assert f"{bad}:4: '192.0.2.x' is not an IP address" in result.stderr
    finally:
        daemon.stop()
