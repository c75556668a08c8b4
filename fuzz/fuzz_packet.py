"""atheris: bytes into the packet view (ipqd.decision.packet.parse); the first byte
picks the metadata (cut copy, announced family, which fields are read).

    python fuzz/fuzz_packet.py -max_total_time=60
"""
import common  # noqa: F401
import atheris

with atheris.instrument_imports():
    from ipqd.decision.packet import L4_FIELDS, PacketMeta, parse
    import fuzz_corpus

NEEDS = (None, frozenset(), frozenset(L4_FIELDS), frozenset({"src"}))


def test_one_input(data: bytes) -> None:
    if not data:
        return
    control, payload = data[0], data[1:]
    meta = PacketMeta(hook=1, wire_len=len(payload) + (control & 0x3f) if control & 0x40 else None,
                      family=(None, 4, 6, None)[control >> 6])
    view = parse(payload, meta, NEEDS[control & 3])
    l4 = (view.sport, view.dport, view.icmp_type, view.icmp_code, view.tcp_flags)
    if view.malformed:
        assert " " in view.reason, f"parse hit an unexpected {view.reason}"
        assert l4 == (None,) * 5
    if view.fragment == "not-first":
        assert l4 == (None,) * 5


if __name__ == "__main__":
    common.main(test_one_input, [b"\x00" + s for s in fuzz_corpus.seeds()])
