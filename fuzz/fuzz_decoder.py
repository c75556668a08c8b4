"""atheris: one datagram from the kernel into QueueProtocol.receive_data.

    python fuzz/fuzz_decoder.py -max_total_time=60
"""
import common  # noqa: F401  (sets the path, imports atheris)
import atheris

with atheris.instrument_imports():
    from ipqd.wire import nfqueue as nfq
    import fuzz_corpus

EVENTS = (nfq.Packet, nfq.Ack, nfq.KernelError, nfq.Undecodable)


def test_one_input(data: bytes) -> None:
    events = nfq.QueueProtocol().receive_data(data)
    assert all(isinstance(e, EVENTS) for e in events)
    assert bool(events) == bool(data)


if __name__ == "__main__":
    seeds = fuzz_corpus.kernel_messages() + [
        fuzz_corpus.packet_message(p[:256], packet_id=i) for i, p in enumerate(fuzz_corpus.seeds())]
    common.main(test_one_input, seeds)
