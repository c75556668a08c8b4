"""The receive path's shortcut (fast_decode.decode_packet_datagram) against
the reference decoder (QueueProtocol): same Packet, or None and the reference decides."""
import os

import pytest
from hypothesis import given, settings, strategies as st

from ipqd.wire import nfqueue as nfq
from ipqd.wire.fast_decode import decode_packet_datagram, packet_summary

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "kernel")
NAMES = sorted(f[:-4] for f in os.listdir(FIXTURES) if f.endswith(".hex"))


def reference(data: bytes):
    events = nfq.QueueProtocol().receive_data(data)
    return events[0] if len(events) == 1 else None


def agrees(data: bytes) -> None:
    fast = decode_packet_datagram(bytearray(data), len(data))
    if fast is not None:
        assert fast == reference(data)
        assert type(reference(data)) is nfq.Packet
    summary_agrees(data)


def summary_agrees(data: bytes) -> None:
    """The verdict cache's summary says what the reference decodes, or nothing."""
    summary = packet_summary(bytearray(data), len(data))
    if summary is None:
        return
    packet = reference(data)
    assert type(packet) is nfq.Packet
    assert summary[:9] == (packet.queue, packet.family, packet.packet_id, packet.hook,
                           packet.mark, packet.indev, packet.outdev, packet.uid, packet.gid)
    assert data[summary[9]:summary[10]] == packet.payload
    assert packet.cap_len is None and packet.conntrack is None


@pytest.mark.parametrize("name", NAMES)
def test_kernel_fixtures(name):
    with open(os.path.join(FIXTURES, name + ".hex")) as f:
        data = bytes.fromhex(f.read().strip())
    fast = decode_packet_datagram(bytearray(data), len(data))
    if name.startswith("packet-"):
        assert fast is not None and fast == reference(data)
    else:
        assert fast is None
    summary = packet_summary(bytearray(data), len(data))
    if fast is None or fast.payload is None or fast.cap_len is not None:
        assert summary is None
    else:
        summary_agrees(data)
        assert summary is not None


def test_reads_only_the_first_n_bytes():
    with open(os.path.join(FIXTURES, "packet-ipv6-udp-input.hex")) as f:
        data = bytes.fromhex(f.read().strip())
    buf = bytearray(data) + bytearray(b"\xff" * 64)
    assert decode_packet_datagram(buf, len(data)) == reference(data)


def test_structured_attributes_go_to_the_reference():
    packet = nfq.Packet(0, 2, 7, 0x0800, 1)
    packet.payload = b"\x45" + b"\0" * 19
    packet.conntrack = nfq.Conntrack(1, 2, 3)
    data = nfq.encode_packet(packet)
    assert decode_packet_datagram(bytearray(data), len(data)) is None


optional_u32 = st.none() | st.integers(0, 0xFFFFFFFF)


@st.composite
def packets(draw):
    packet = nfq.Packet(draw(st.integers(0, 0xFFFF)), draw(st.sampled_from([2, 10, 7])),
                        draw(st.integers(0, 0xFFFFFFFF)), draw(st.integers(0, 0xFFFF)),
                        draw(st.integers(0, 255)))
    packet.mark = draw(st.integers(0, 0xFFFFFFFF))
    for name in ("indev", "outdev", "physindev", "physoutdev", "cap_len", "skb_info", "uid",
                 "gid", "ct_info", "priority", "cgroup_classid"):
        setattr(packet, name, draw(optional_u32))
    packet.timestamp = draw(st.none() | st.tuples(st.integers(0, 2**63), st.integers(0, 999999)))
    packet.hwaddr = draw(st.none() | st.binary(min_size=0, max_size=8))
    packet.payload = draw(st.none() | st.binary(max_size=80))
    return packet


@settings(max_examples=300, deadline=None)
@given(packets())
def test_encoded_packets_decode_the_same(packet):
    data = nfq.encode_packet(packet)
    fast = decode_packet_datagram(bytearray(data), len(data))
    assert fast is not None and fast == reference(data)
    summary_agrees(data)


@settings(max_examples=500, deadline=None)
@given(packets(), st.data())
def test_damaged_bytes_never_disagree(packet, data):
    raw = bytearray(nfq.encode_packet(packet))
    for _ in range(data.draw(st.integers(1, 4))):
        where = data.draw(st.integers(0, len(raw) - 1))
        raw[where] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    agrees(bytes(raw[:cut]))
    agrees(bytes(raw))


@settings(max_examples=100, deadline=None)
@given(packets(), st.integers(0, 255))
def test_a_learned_layout_never_disagrees_with_the_reference(packet, value):
    """The summary reads a known layout with two struct calls: every byte of
    a message of that layout, changed, still gives the reference's answer."""
    data = nfq.encode_packet(packet)
    summary_agrees(data)                 # walked in full, its layout remembered
    for where in range(len(data)):
        damaged = bytearray(data)
        damaged[where] = value
        summary_agrees(bytes(damaged))
    for cut in range(len(data)):
        summary_agrees(data[:cut])
    summary_agrees(data + b"\0\0\0\0")


def test_a_skipped_attribute_too_short_for_the_reference_gives_no_summary():
    """Found by the property above: a mark attribute retyped as a 4-byte
    timestamp, which QueueProtocol refuses."""
    data = bytes.fromhex("2c000000000300000000000000000000020000000b000100000000000000"
                         "0000080004000000000104000a00")
    assert type(reference(data)) is nfq.Undecodable
    assert packet_summary(bytearray(data), len(data)) is None
