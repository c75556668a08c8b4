"""The attribute table (ipqd.wire.attributes) drives every reader of a
packet message: the reference decoder, the in-place reader, the verdict
cache's summary and the cache's metadata positions."""
import os
import subprocess
import sys
import textwrap

import pytest

from ipqd.decision.verdict_cache import _META_FIELD
from ipqd.policy.model import Match
from ipqd.wire import attributes, fast_decode
from ipqd.wire import nfnetlink as nl
from ipqd.wire import nfqueue as nfq
from ipqd.wire.attributes import FULL, PACKET_ATTRS, PASS, READ
from ipqd.wire.fast_decode import SUMMARY_FIELDS, decode_packet_datagram, packet_summary

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IPV4_UDP = bytes.fromhex("4500001c00010000401100007f0000017f000001" "9c400035" "00080000")

# A value of each wire type, and its payload on the wire, written out by hand.
SAMPLES = {
    "be32": (0x01020304, b"\x01\x02\x03\x04"),
    "be64 sec, be64 usec": ((5, 6), bytes(7) + b"\x05" + bytes(7) + b"\x06"),
    "be16 addrlen, 2 pad, addr[8]": (b"\x02\x00\x00\x00\x00\x01",
                                     b"\x00\x06\x00\x00\x02\x00\x00\x00\x00\x01\x00\x00"),
    "bytes": (b"\x45abc", b"\x45abc"),
    "bytes, NUL padded": (b"system_u", b"system_u"),
    "nested CTA_*": (nfq.Conntrack(id=9, status=8, mark=7),
                     nl.encode_be32(nfq.CTA_STATUS, 8) + nl.encode_be32(nfq.CTA_MARK, 7)
                     + nl.encode_be32(nfq.CTA_ID, 9)),
    "nested NFQA_VLAN_*": ((0x8100, 7), nl.encode_be16(nfq.NFQA_VLAN_PROTO, 0x8100)
                           + nl.encode_be16(nfq.NFQA_VLAN_TCI, 7)),
}
ROWS = {row.name: row for row in PACKET_ATTRS}


def message(*attrs: bytes, family: int = nl.NFPROTO_IPV4, queue: int = 3) -> bytes:
    """A packet message with a header (id 77, IPv4, hook 1) and `attrs`."""
    header = nl.encode_attr(nfq.NFQA_PACKET_HDR, nfq.PACKET_HDR.pack(77, 0x0800, 1))
    body = nl.encode_nfgenmsg(family, queue) + header + b"".join(attrs)
    return nl.encode_nlmsg(nfq.MSG_PACKET, 0, 0, body)


def attribute(row, payload: bytes) -> bytes:
    return nl.encode_attr(row.type, payload, nested=row.wire.nested)


def reference(data: bytes) -> nfq.Packet:
    (packet,) = nfq.QueueProtocol().receive_data(data)
    assert type(packet) is nfq.Packet, packet
    return packet


def test_rows_carry_the_kernels_names_and_numbers():
    assert len({row.type for row in PACKET_ATTRS}) == len(PACKET_ATTRS)
    assert len({row.field for row in PACKET_ATTRS}) == len(PACKET_ATTRS)
    for row in PACKET_ATTRS:
        assert getattr(attributes, row.name) == row.type == getattr(nfq, row.name)
        assert row.summary in (READ, PASS, FULL)
        assert (row.rule is not None) == (row.summary == READ), row.name


@pytest.mark.parametrize("wire", sorted({row.wire.name for row in PACKET_ATTRS}))
def test_each_wire_type_writes_and_reads_the_bytes_written_out(wire):
    (row, *_) = [row for row in PACKET_ATTRS if row.wire.name == wire]
    value, payload = SAMPLES[wire]
    assert row.wire.encode(value) == payload
    assert row.wire.decode(payload, row.name) == value


def test_a_security_context_loses_the_nul_the_kernel_may_end_it_with():
    row = ROWS["NFQA_SECCTX"]
    assert row.wire.decode(b"system_u\0\0", row.name) == b"system_u"
    data = message(attribute(row, b"system_u\0"))
    assert decode_packet_datagram(bytearray(data), len(data)).secctx == b"system_u"


@pytest.mark.parametrize("name", sorted(ROWS))
def test_each_row_decodes_the_same_in_both_readers(name):
    """A message carrying only the header and this attribute: the reference
    fills the row's field, and the in-place reader fills it the same (or,
    for a nested attribute, leaves the message to the reference)."""
    row = ROWS[name]
    value, payload = SAMPLES[row.wire.name]
    data = message(attribute(row, payload))
    packet = reference(data)
    assert getattr(packet, row.field) == value
    blank = reference(message())
    assert getattr(blank, row.field) == row.absent
    in_place = decode_packet_datagram(bytearray(data), len(data))
    if row.wire.nested:
        assert in_place is None
    else:
        assert in_place == packet and getattr(in_place, row.field) == value
    assert nfq.encode_packet(packet) == data


@pytest.mark.parametrize("name", sorted(n for n, r in ROWS.items() if r.wire.size))
def test_a_row_too_short_for_its_wire_type_is_refused_by_both(name):
    """Rows of a wire type with a minimum size (for the others, any length fits)."""
    row = ROWS[name]
    data = message(attribute(row, bytes(row.wire.size - 1)))
    (event,) = nfq.QueueProtocol().receive_data(data)
    assert type(event) is nfq.Undecodable and row.name in str(event.error)
    assert event.packet_id == 77
    assert decode_packet_datagram(bytearray(data), len(data)) is None
    assert packet_summary(bytearray(data), len(data)) is None


@pytest.mark.parametrize("name", sorted(n for n, r in ROWS.items() if r.type != nfq.NFQA_PAYLOAD))
def test_the_summary_reads_passes_over_or_refuses_each_row_as_the_table_says(name):
    """Every row but the payload, which is the summary's own (its start and end)."""
    row = ROWS[name]
    value, payload = SAMPLES[row.wire.name]
    data = message(attribute(row, payload), nl.encode_attr(nfq.NFQA_PAYLOAD, IPV4_UDP))
    summary = packet_summary(bytearray(data), len(data))
    if row.summary == FULL:
        assert summary is None
        return
    packet = reference(data)
    assert summary[:len(SUMMARY_FIELDS)] == tuple(getattr(packet, f) for f in SUMMARY_FIELDS)
    assert data[summary[-2]:summary[-1]] == packet.payload
    assert (row.field in SUMMARY_FIELDS) == (row.summary == READ)


def test_the_caches_metadata_positions_name_real_fields():
    """Each policy word the verdict cache keys on names a field of the
    summary and of a Packet, and a word a rule can use."""
    packet = reference(message())
    for word, field in _META_FIELD.items():
        assert field in SUMMARY_FIELDS and hasattr(packet, field), word
        assert ("in_" if word == "in" else word) in Match.__dataclass_fields__, word
    assert {row.rule for row in PACKET_ATTRS if row.summary == READ} <= set(_META_FIELD)


def test_a_layouts_offsets_point_at_the_summary_fields():
    read = [row for row in PACKET_ATTRS if row.summary == READ]
    data = message(*(attribute(row, SAMPLES[row.wire.name][1]) for row in read),
                   nl.encode_attr(nfq.NFQA_PAYLOAD, IPV4_UDP))
    layout, _ = fast_decode.layout_of(bytearray(data), len(data))
    assert set(layout.offsets) == set(SUMMARY_FIELDS)
    packet = reference(data)
    for field, (offset, code) in layout.offsets.items():
        assert fast_decode.struct.unpack_from(">" + code, data, offset)[0] == getattr(packet, field)


NEW_ROW = """
import sys
from ipqd.wire import attributes
from ipqd.wire.attributes import Attr, BE32, PASS
NFQA_FUTURE = 23
attributes.PACKET_ATTRS += (Attr(NFQA_FUTURE, "NFQA_FUTURE", BE32, "future", PASS),)

from ipqd.wire import nfnetlink as nl, nfqueue as nfq
from ipqd.wire.fast_decode import decode_packet_datagram, packet_summary

header = nl.encode_attr(nfq.NFQA_PACKET_HDR, nfq.PACKET_HDR.pack(77, 0x0800, 1))
body = (nl.encode_nfgenmsg(2, 3) + header + nl.encode_be32(NFQA_FUTURE, 0xABCD)
        + nl.encode_attr(nfq.NFQA_PAYLOAD, b"E" + bytes(19)))
data = nl.encode_nlmsg(nfq.MSG_PACKET, 0, 0, body)
(reference,) = nfq.QueueProtocol().receive_data(data)
in_place = decode_packet_datagram(bytearray(data), len(data))
assert reference.future == in_place.future == 0xABCD, (reference, in_place)
assert reference == in_place
assert nfq.encode_packet(reference) == data
assert nfq.Packet(0, 2, 1, 0, 1).future is None
assert packet_summary(bytearray(data), len(data))[2] == 77       # passed over
print("decoded", hex(reference.future))
"""


def test_a_row_added_to_the_table_is_decoded_by_both_readers():
    """One line in the table, and nothing else: in a fresh interpreter,
    where the readers are derived from the patched table on import."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(NEW_ROW)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "decoded 0xabcd\n"
