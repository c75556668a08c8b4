"""Decision log entries: their fields and text, the rate cap, the bounded queue, escaping."""
import threading
import time

from ipqd.daemon.decision_log import (DecisionLog, clean, decision_fields, decision_message)
from ipqd.decision.packet import PacketMeta, parse
from ipqd.policy.model import Rate
from test_checksum import build


def view_of(packet: bytes, **meta):
    return parse(packet, PacketMeta(**{"hook": 1, "indev": "veth0", **meta}))


def tcp_to(port: int) -> bytes:
    import dpkt
    tcp = dpkt.tcp.TCP(sport=51514, dport=port, flags=dpkt.tcp.TH_SYN)
    ip = dpkt.ip.IP(src=bytes([10, 0, 0, 2]), dst=bytes([10, 0, 0, 1]), p=6, data=tcp)
    ip.len = len(ip)
    return bytes(ip)


def test_fields_and_message_of_a_drop():
    fields = decision_fields("drop", "no-telnet", view_of(tcp_to(23)), 0, None)
    assert fields == {
        "IPQD_VERDICT": "drop", "IPQD_RULE": "no-telnet", "IPQD_QUEUE": "0",
        "IPQD_FAMILY": "ipv4", "IPQD_PROTO": "tcp", "IPQD_SRC": "10.0.0.2", "IPQD_DST": "10.0.0.1",
        "IPQD_SPORT": "51514", "IPQD_DPORT": "23", "IPQD_LENGTH": "40", "IPQD_IN": "veth0",
        "IPQD_HOOK": "input", "IPQD_MARK": "0x0"}
    assert decision_message(fields) == "DROP tcp 10.0.0.2:51514 -> 10.0.0.1:23 in=veth0 rule=no-telnet"


def test_ipv6_udp_and_icmp_text():
    udp6 = decision_message(decision_fields("accept", "dns", view_of(build(6, 17, b"q")), 3, 7))
    assert udp6 == "ACCEPT udp [fd00::1]:1234 -> [fd00::2]:53 in=veth0 rule=dns"
    icmp = decision_message(decision_fields("accept", "ping", view_of(build(4, 1, b"")), 0, None))
    assert icmp == "ACCEPT icmp 10.0.0.1 -> 10.0.0.2 type=8 code=0 in=veth0 rule=ping"


def test_malformed_packets_say_why():
    fields = decision_fields("drop", "default", view_of(b"\x45\x00\x00"), 0, None)
    assert fields["IPQD_MALFORMED"]
    assert decision_message(fields).startswith("DROP malformed (")


def test_control_characters_cannot_forge_a_line():
    assert clean("eth0\nDROP forged") == "eth0\\x0aDROP forged"
    fields = decision_fields("accept", "a\r\nb", view_of(tcp_to(80), indev="x\x1b[2Jy"), 0, None)
    text = decision_message(fields)
    assert "\n" not in text and "\r" not in text and "\x1b" not in text
    assert "rule=a\\x0d\\x0ab" in text and "in=x\\x1b[2Jy" in text


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_rate_caps_entries_and_the_summary_counts_the_rest():
    sent = []
    clock = Clock()
    log = DecisionLog(rate=Rate(10, 10), send=lambda m, p, f: sent.append((m, f)), clock=clock)
    view = view_of(tcp_to(23))
    for _ in range(50):
        log.decision("drop", "no-telnet", view, 0, None)
    clock.now += 1.0                          # a second later: ten more tokens
    for _ in range(5):
        log.decision("drop", "no-telnet", view, 0, None)
    log.close()
    decisions = [m for m, f in sent if f.get("IPQD_VERDICT")]
    assert len(decisions) == 15 and log.suppressed == 40
    summary = [f for m, f in sent if f.get("IPQD_EVENT") == "log-summary"]
    assert summary[-1]["IPQD_SUPPRESSED"] == "40"


def test_a_stuck_sink_never_blocks_the_packet_path():
    release = threading.Event()
    sent = []

    def stuck(message, priority, fields):
        release.wait(10)                      # a journald that does not answer
        sent.append(message)

    log = DecisionLog(capacity=100, send=stuck)
    view = view_of(tcp_to(80))
    start = time.monotonic()
    for _ in range(10000):
        log.decision("accept", "web", view, 0, None)
    assert time.monotonic() - start < 2.0
    assert 9890 <= log.overflowed <= 9900     # the queue held 100 (and one in the sink)
    release.set()
    log.close(timeout=10)
    assert len(sent) >= 100


def test_a_failing_sink_is_counted():
    def broken(message, priority, fields):
        raise OSError("journal socket gone")

    log = DecisionLog(send=broken)
    log.event("hello")
    log.close()
    assert log.failed >= 1 and log.logged == 0


class CountingStream:
    """A stderr that counts its writes."""

    def __init__(self):
        self.writes = []

    def write(self, text):
        self.writes.append(text)

    def flush(self):
        pass


def test_a_round_of_decisions_is_written_at_flush_in_one_write(monkeypatch):
    """The packet path queues; the worker's flush after a round's verdicts
    wakes the writer once, and stderr gets the round in one write."""
    stream = CountingStream()
    monkeypatch.setattr("sys.stderr", stream)
    log = DecisionLog("stderr")
    view = view_of(tcp_to(23))
    for _ in range(40):
        log.decision("drop", "no-telnet", view, 0, None)
    log.flush()
    deadline = time.monotonic() + 5
    while log.logged < 40 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert log.logged == 40
    assert len(stream.writes) == 1 and stream.writes[0].count("\n") == 40
    assert stream.writes[0].startswith("DROP tcp 10.0.0.2:51514 -> 10.0.0.1:23")
    log.close()


def test_remembered_address_texts_are_the_same():
    from ipqd.daemon.decision_log import _address
    from ipqd.decision.packet import address_text
    for family, value in ((4, 0x0A000001), (6, 1 << 120 | 5), (6, 0xFFFF0A000001), (None, 3),
                          (4, None)):
        assert _address(family, value) == address_text(family, value)
        assert _address(family, value) == address_text(family, value)       # the second time


def test_asking_whether_an_entry_is_wanted_spends_no_token():
    """The cache's gate looks at the rate without spending it; a decision
    that is then logged spends it, and one past the rate is counted."""
    sent = []
    clock = Clock()
    log = DecisionLog(rate=Rate(1, 1), send=lambda m, p, f: sent.append(m), clock=clock)
    assert log.wants_entry() and log.wants_entry()
    log.decision("drop", "no-telnet", view_of(tcp_to(23)), 0, None)
    assert not log.wants_entry() and log.suppressed == 1
    clock.now += 1.0
    assert log.wants_entry()
    log.close()
    assert len([m for m in sent if m.startswith("DROP")]) == 1
