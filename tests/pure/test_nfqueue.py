"""nfnetlink_queue messages: real kernel fixtures, exact encoder bytes, round trips."""
import json
import os
import struct

import pytest
from hypothesis import given, settings, strategies as st

from ipqd.wire import nfnetlink as nl
from ipqd.wire import nfqueue as nfq
from ipqd.errors import DecodeError

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "kernel")


def fixture(name):
    with open(os.path.join(FIXTURES, name + ".hex")) as f:
        data = bytes.fromhex(f.read().strip())
    with open(os.path.join(FIXTURES, name + ".json")) as f:
        expected = json.load(f)["events"]
    return data, expected


def only_event(name):
    data, _ = fixture(name)
    events = nfq.QueueProtocol().receive_data(data)
    assert len(events) == 1
    return events[0]


# ---------------------------------------------------------------- real kernel bytes

@pytest.mark.parametrize("name", sorted(f[:-4] for f in os.listdir(FIXTURES) if f.endswith(".hex")))
def test_fixture_decodes_to_recorded_values(name):
    data, expected = fixture(name)
    events = nfq.QueueProtocol().receive_data(data)
    assert [type(e).__name__ for e in events] == [e["event"] for e in expected]
    for event, want in zip(events, expected):
        if isinstance(event, nfq.Packet):
            got = {k: (v.hex() if isinstance(v, bytes) else v) for k, v in event.as_dict().items()}
            for key in ("conntrack", "vlan", "timestamp"):
                got[key] = None if got[key] is None else list(got[key])
            assert got == {k: v for k, v in want.items() if k != "event"}
        else:
            assert getattr(event, "errno", 0) == want["errno"]


def test_input_packet_cut_by_copy_range():
    p = only_event("packet-ipv4-udp-input-cut")
    assert (p.queue, p.family, p.hook, p.hw_protocol) == (5, nl.NFPROTO_IPV4, 1, 0x0800)
    assert p.indev is not None and p.outdev is None
    assert len(p.payload) == 64 and p.cap_len == 128        # 20 IP + 8 UDP + 100 data
    assert p.wire_len == 128
    assert p.payload[0] >> 4 == 4 and p.payload[9] == 17    # IPv4, UDP
    assert struct.unpack(">H", p.payload[22:24])[0] == 9999
    assert p.timestamp is not None and p.timestamp[1] < 1_000_000
    assert p.hwaddr is not None and len(p.hwaddr) == 6


def test_output_packet_has_mark_uid_gid_and_no_timestamp():
    p = only_event("packet-ipv4-udp-output-mark")
    assert (p.hook, p.mark, p.uid, p.gid) == (3, 0x2A, 0, 0)
    assert p.outdev is not None and p.indev is None and p.timestamp is None
    assert p.cap_len is None and len(p.payload) == 20 + 8 + 10


def test_ipv6_packet():
    p = only_event("packet-ipv6-udp-input")
    assert (p.family, p.hw_protocol, p.hook) == (nl.NFPROTO_IPV6, 0x86DD, 1)
    assert p.payload[0] >> 4 == 6 and p.payload[6] == 17
    assert len(p.payload) == 40 + 8 + 8


def test_meta_mode_has_no_payload():
    p = only_event("packet-ipv4-meta")
    assert p.payload is None and p.wire_len == 0


def test_kernel_ack_and_errors():
    assert isinstance(only_event("ack-bind"), nfq.Ack)
    busy = only_event("error-ebusy")
    assert isinstance(busy, nfq.KernelError) and busy.errno == 16 and busy.seq == 2
    enoent = only_event("error-verdict-enoent")
    assert enoent.errno == 2 and enoent.op == "verdict" and enoent.seq == 77


def test_pending_request_names_what_failed():
    proto = nfq.QueueProtocol()
    request = proto.bind(3)
    reply = nl.encode_nlmsgerr(1, request.data)
    (event,) = proto.receive_data(reply)
    assert event == nfq.KernelError(request.seq, 1, "bind queue 3")
    assert request.seq not in proto.pending


# ---------------------------------------------------------------- exact encoder bytes

def test_bind_bytes():
    data = nfq.encode_config_cmd(3, nfq.NFQNL_CFG_CMD_BIND, seq=1)
    assert data.hex() == (
        "1c000000" "0203" "0500" "01000000" "00000000"     # len 28, type 0x0302, REQUEST|ACK, seq 1
        "00000003"                                         # nfgenmsg: AF_UNSPEC, v0, queue 3 (be16)
        "08000100" "01000000")                             # NFQA_CFG_CMD: BIND, pad, pf 0


def test_params_bytes_are_packed_five_bytes():
    data = nfq.encode_config_params(0, nfq.NFQNL_COPY_PACKET, 0xFFFF, seq=2)
    assert data[20:].hex() == "09000200" "0000ffff" "02" "000000"


def test_flag_off_is_zero_with_flag_in_mask():
    data = nfq.encode_config_flags(1, 0, nfq.NFQA_CFG_F_FAIL_OPEN)
    config = nfq.decode_config(next(nl.iter_messages(data)).body)
    assert (config.flags, config.mask) == (0, 1)
    assert data[20:].hex() == "08000500" "00000000" "08000400" "00000001"
    with pytest.raises(ValueError, match="outside mask"):
        nfq.encode_config_flags(1, 3, 1)


def test_verdict_bytes_with_mark():
    data = nfq.encode_verdict(2, 0x01020304, nfq.NF_ACCEPT, mark=7)
    assert struct.unpack("=HH", data[4:8]) == (nfq.MSG_VERDICT, nl.NLM_F_REQUEST)
    assert data[20:].hex() == "0c000200" "00000001" "01020304" "08000300" "00000007"


def test_plain_verdict_bytes_are_made_per_queue_and_stay_exact():
    for queue in (0, 5, 5, 0xFFFF):      # the second 5 comes from the kept prefix
        data = nfq.encode_verdict(queue, 0x01020304, nfq.NF_DROP)
        assert data.hex() == ("20000000" + struct.pack("=HH", nfq.MSG_VERDICT, nl.NLM_F_REQUEST).hex()
                              + "00000000" "00000000" "0000" + struct.pack(">H", queue).hex()
                              + "0c000200" "00000000" "01020304")
        batch = nfq.encode_verdict_batch(queue, 9, nfq.NF_ACCEPT)
        assert batch[4:6] == struct.pack("=H", nfq.MSG_VERDICT_BATCH) and batch[20:] == \
            bytes.fromhex("0c000200" "00000001" "00000009")
    with pytest.raises(ValueError, match="not a netfilter verdict"):
        nfq.encode_verdict_batch(5, 9, 7)


def test_batch_verdict_type_and_body():
    data = nfq.encode_verdict_batch(0, 99, nfq.NF_DROP)
    msg = next(nl.iter_messages(data))
    assert msg.type == (3 << 8) | 3
    assert nfq.decode_verdict(msg.type, msg.body) == nfq.Verdict(True, 0, 99, 0, None, None, None)


def test_stolen_is_refused():
    with pytest.raises(ValueError, match="NF_STOLEN"):
        nfq.encode_verdict(0, 1, nfq.NF_STOLEN)
    assert nfq.queue_verdict(7) == (7 << 16) | 3


def test_ct_state_names():
    assert nfq.ct_state_name(nfq.IP_CT_ESTABLISHED_REPLY, True) == "established"
    assert nfq.ct_state_name(nfq.IP_CT_NEW, True) == "new"
    assert nfq.ct_state_name(None, True) == "invalid"
    assert nfq.ct_state_name(None, False) is None
    assert nfq.ct_state_name(nfq.IP_CT_UNTRACKED, True) == "untracked"


def test_ct_state_names_are_the_policys_words():
    from ipqd.policy.model import CT_STATES
    words = {nfq.ct_state_name(info, True) for info in (None, *range(8))}
    assert words == set(CT_STATES)


# ---------------------------------------------------------------- malformed input

def test_packet_without_header_is_undecodable():
    body = nl.encode_nfgenmsg(2, 0) + nl.encode_be32(nfq.NFQA_MARK, 1)
    (event,) = nfq.QueueProtocol().receive_data(nl.encode_nlmsg(nfq.MSG_PACKET, 0, 0, body))
    assert isinstance(event, nfq.Undecodable) and "no packet header" in str(event.error)
    assert event.packet_id is None


def test_bad_attribute_after_header_keeps_the_packet_id():
    body = (nl.encode_nfgenmsg(2, 4) + nl.encode_attr(nfq.NFQA_PACKET_HDR, struct.pack(">IHB", 77, 0x800, 1))
            + nl.encode_attr(nfq.NFQA_MARK, b"\x01"))           # a 1-byte mark
    (event,) = nfq.QueueProtocol().receive_data(nl.encode_nlmsg(nfq.MSG_PACKET, 0, 0, body))
    assert isinstance(event, nfq.Undecodable)
    assert (event.queue, event.packet_id) == (4, 77)
    assert "NFQA_MARK" in str(event.error)


def test_unknown_attributes_are_skipped():
    data, _ = fixture("packet-ipv4-udp-output-mark")
    msg = next(nl.iter_messages(data))
    padded = msg.body + b"\0" * (nl.align(len(msg.body)) - len(msg.body))
    extended = padded + nl.encode_attr(200, b"future")
    packet = nfq.decode_packet(extended)
    assert packet == nfq.decode_packet(msg.body)


# ---------------------------------------------------------------- properties

u32 = st.integers(0, 2**32 - 1)
opt32 = st.none() | u32


@st.composite
def packets(draw):
    p = nfq.Packet(draw(st.integers(0, 0xFFFF)), draw(st.sampled_from([2, 10])), draw(u32),
                   draw(st.integers(0, 0xFFFF)), draw(st.integers(0, 4)))
    p.mark = draw(u32)
    p.timestamp = draw(st.none() | st.tuples(st.integers(0, 2**63), st.integers(0, 999_999)))
    p.indev, p.outdev, p.physindev, p.physoutdev = (draw(opt32) for _ in range(4))
    p.hwaddr = draw(st.none() | st.binary(min_size=0, max_size=8))
    p.payload = draw(st.none() | st.binary(max_size=300))
    p.cap_len, p.skb_info, p.uid, p.gid, p.ct_info, p.priority, p.cgroup_classid = (
        draw(opt32) for _ in range(7))
    p.conntrack = draw(st.none() | st.builds(nfq.Conntrack, opt32, opt32, opt32))
    p.vlan = draw(st.none() | st.tuples(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF)))
    p.l2hdr = draw(st.none() | st.binary(max_size=30))
    p.secctx = draw(st.none() | st.binary(min_size=1, max_size=20).map(lambda b: b.replace(b"\0", b"a")))
    return p


@settings(max_examples=300)
@given(packets())
def test_packet_round_trip(packet):
    (decoded,) = nfq.QueueProtocol().receive_data(nfq.encode_packet(packet))
    assert decoded == packet


@settings(max_examples=200)
@given(st.integers(0, 0xFFFF), u32, st.sampled_from([0, 1, 3, 4, 5, (9 << 16) | 3]),
       opt32, st.none() | st.binary(max_size=200), opt32)
def test_verdict_round_trip(queue, packet_id, verdict, mark, payload, connmark):
    data = nfq.encode_verdict(queue, packet_id, verdict, mark=mark, payload=payload, connmark=connmark)
    msg = next(nl.iter_messages(data))
    assert nfq.decode_verdict(msg.type, msg.body) == nfq.Verdict(
        False, queue, packet_id, verdict, mark, payload, connmark)


@settings(max_examples=200)
@given(st.integers(0, 0xFFFF), u32, st.sampled_from([0, 1]), opt32)
def test_batch_round_trip(queue, max_id, verdict, mark):
    msg = next(nl.iter_messages(nfq.encode_verdict_batch(queue, max_id, verdict, mark=mark)))
    assert nfq.decode_verdict(msg.type, msg.body) == nfq.Verdict(True, queue, max_id, verdict, mark,
                                                                 None, None)


@settings(max_examples=200)
@given(st.integers(0, 0xFFFF), st.sampled_from([1, 2, 3, 4]), st.sampled_from([0, 2, 10]),
       st.sampled_from([0, 1, 2]), u32, u32, st.integers(0, 31))
def test_config_round_trip(queue, command, pf, mode, copy_range, maxlen, flags):
    def one(data):
        return nfq.decode_config(next(nl.iter_messages(data)).body)
    assert one(nfq.encode_config_cmd(queue, command, pf))[2:4] == (command, pf)
    assert one(nfq.encode_config_params(queue, mode, copy_range))[4:6] == (mode, copy_range)
    assert one(nfq.encode_config_maxlen(queue, maxlen)).maxlen == maxlen
    assert one(nfq.encode_config_flags(queue, flags, 31))[7:] == (flags, 31)


@settings(max_examples=1000)
@given(st.binary(max_size=300))
def test_random_bytes_never_raise(data):
    events = nfq.QueueProtocol().receive_data(data)
    assert all(isinstance(e, (nfq.Packet, nfq.Ack, nfq.KernelError, nfq.Undecodable)) for e in events)


@settings(max_examples=500)
@given(packets(), st.data())
def test_mutated_kernel_messages_never_raise(packet, data):
    raw = bytearray(nfq.encode_packet(packet))
    for _ in range(data.draw(st.integers(1, 6))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    nfq.QueueProtocol().receive_data(bytes(raw[:cut]))


def test_decode_error_message_names_offset():
    err = DecodeError("nlmsghdr", 32, "length 8 does not fit")
    assert str(err) == "cannot decode nlmsghdr at offset 32: length 8 does not fit"
