"""The pure netlink framing: byte literals in, values out, and back."""
import struct

import pytest
from hypothesis import given, settings, strategies as st

from ipqd.wire import nfnetlink as nl
from ipqd.errors import DecodeError


def test_nlmsg_header_layout_is_host_order_with_padding():
    msg = nl.encode_nlmsg(0x0302, nl.NLM_F_REQUEST | nl.NLM_F_ACK, 7, b"\x01\x02\x03", pid=9)
    assert len(msg) == 20                              # 16 + 3, padded to 4
    assert struct.unpack("=IHHII", msg[:16]) == (19, 0x0302, 5, 7, 9)
    assert msg[16:] == b"\x01\x02\x03\x00"


def test_attr_flags_and_padding():
    attr = nl.encode_attr(11, b"\xaa", nested=True)
    assert attr == struct.pack("=HH", 5, 11 | nl.NLA_F_NESTED) + b"\xaa\0\0\0"
    attr = nl.encode_attr(3, b"", net_byteorder=True)
    assert attr == struct.pack("=HH", 4, 3 | nl.NLA_F_NET_BYTEORDER)


def test_be32_attr_is_network_order():
    assert nl.encode_be32(3, 0x2A) == b"\x08\x00\x03\x00\x00\x00\x00\x2a"


def test_nfgenmsg_res_id_is_big_endian():
    assert nl.encode_nfgenmsg(nl.NFPROTO_IPV4, 0x0102) == b"\x02\x00\x01\x02"
    assert nl.decode_nfgenmsg(b"\x0a\x00\x00\x05") == (nl.NFPROTO_IPV6, 0, 5)


def test_decode_attrs_strips_flag_bits_and_later_wins():
    buf = nl.encode_attr(5, b"a", nested=True) + nl.encode_attr(5, b"bb") + nl.encode_attr(6, b"")
    assert nl.decode_attrs(buf) == {5: b"bb", 6: b""}


def test_several_messages_in_one_buffer():
    buf = nl.encode_nlmsg(0x10, 0, 1, b"one") + nl.encode_nlmsg(0x11, 0, 2, b"four")
    msgs = list(nl.iter_messages(buf))
    assert [(m.type, m.seq, m.body) for m in msgs] == [(0x10, 1, b"one"), (0x11, 2, b"four")]


def test_error_and_ack_carry_errno_and_request():
    request = nl.encode_nlmsg(0x0302, nl.NLM_F_ACK, 42, b"")
    err = next(nl.iter_messages(nl.encode_nlmsgerr(16, request)))
    assert err.type == nl.NLMSG_ERROR
    decoded = nl.decode_error(err.body)
    assert decoded == nl.ErrorMessage(16, 0x0302, 42)
    assert not decoded.is_ack and decoded.describe() == "EBUSY (16)"
    ack = nl.decode_error(next(nl.iter_messages(nl.encode_nlmsgerr(0, request))).body)
    assert ack.is_ack and ack.request_seq == 42


@pytest.mark.parametrize("buf, message", [
    (b"\x10\x00\x00", "3 bytes left, a header needs 16"),
    (struct.pack("=IHHII", 8, 0, 0, 0, 0), "length 8 does not fit"),
    (struct.pack("=IHHII", 400, 0, 0, 0, 0), "length 400 does not fit"),
])
def test_bad_headers_are_named(buf, message):
    with pytest.raises(DecodeError, match=message) as info:
        list(nl.iter_messages(buf))
    assert info.value.what == "nlmsghdr"


@pytest.mark.parametrize("buf, message", [
    (struct.pack("=HH", 2, 1), "attribute 1 has length 2"),
    (struct.pack("=HH", 40, 9) + b"\0" * 4, "attribute 9 has length 40, 8 bytes left"),
    (b"\x05\x00", "2 bytes left"),
])
def test_bad_attributes_are_named(buf, message):
    with pytest.raises(DecodeError, match=message):
        nl.decode_attrs(buf)


def test_short_fixed_size_attribute():
    with pytest.raises(DecodeError, match="NFQA_MARK.*2 bytes, expected 4"):
        nl.be32(b"\0\0", "NFQA_MARK")


@settings(max_examples=300)
@given(st.lists(st.tuples(st.integers(1, 0x3FFF), st.binary(max_size=40)), max_size=8))
def test_attrs_round_trip(pairs):
    buf = b"".join(nl.encode_attr(t, d) for t, d in pairs)
    expected = {}
    for t, d in pairs:
        expected[t] = d
    assert nl.decode_attrs(buf) == expected


@settings(max_examples=300)
@given(st.lists(st.tuples(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF),
                          st.integers(0, 2**32 - 1), st.binary(max_size=64)), max_size=6))
def test_messages_round_trip(items):
    buf = b"".join(nl.encode_nlmsg(t, f, s, b) for t, f, s, b in items)
    assert [(m.type, m.flags, m.seq, m.body[:len(b)]) for m, (_, _, _, b) in
            zip(nl.iter_messages(buf), items)] == [(t, f, s, b) for t, f, s, b in items]


@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_random_bytes_decode_or_raise_decode_error(data):
    try:
        for msg in nl.iter_messages(data):
            nl.decode_attrs(msg.body)
    except DecodeError:
        pass
