"""atheris: a queued packet with fuzzed metadata and payload through
Engine.decide on a policy that reads every field: one verdict, no error;
and through the policy's generated decision function (ipqd.decision.codegen),
read from a queue message as the daemon reads it: where it answers, the
engine's decision.

    python fuzz/fuzz_engine.py -max_total_time=60
"""
import common  # noqa: F401
import atheris

with atheris.instrument_imports():
    from ipqd.wire import nfqueue as nfq
    from ipqd.decision.engine import Engine
    from ipqd.policy.model import CT_STATES
    from ipqd.policy.loader import loads
    import fuzz_corpus

ENGINE = Engine(loads(fuzz_corpus.FUZZ_POLICY, "fuzz.yaml"))
# The same without the rules the generated function leaves to the matcher
# in front (ct_state, interfaces, hook, mark, fragment), without logging and
# without offload: it then answers most packets itself.
FAST = Engine(loads("\n".join(
    line.replace("copy_range: 256}", "copy_range: 256, offload: off}")
        .replace("log: true}", "log: false}")
    for line in fuzz_corpus.FUZZ_POLICY.splitlines()
    if not any(word in line for word in ("ct_state", "in: lo", "hook: output", "mark:",
                                         "fragment:"))),
    "fuzz-fast.yaml"))
NAMES = {1: "lo", 2: "eth0", 3: "eth9", 4: "v\x1b]0;x\x07"}
clock = [0.0]


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    packet = nfq.Packet(fdp.ConsumeIntInRange(0, 0xffff), fdp.PickValueInList([2, 10, 0, 7]),
                        fdp.ConsumeInt(4), fdp.ConsumeInt(2), fdp.ConsumeIntInRange(0, 255))
    packet.mark = fdp.ConsumeIntInRange(0, 0xffffffff)
    for name in ("indev", "outdev", "uid", "gid", "cap_len"):
        setattr(packet, name, fdp.ConsumeIntInRange(0, 0xffffffff) if fdp.ConsumeBool() else None)
    ct_state = fdp.PickValueInList(list(CT_STATES) + [None])
    clock[0] += fdp.ConsumeProbability()
    packet.payload = fdp.ConsumeBytes(fdp.remaining_bytes())
    counters = ENGINE.counters
    before = counters.accepted + counters.dropped
    verdict = ENGINE.decide(packet, NAMES.get, ct_state, clock[0])
    assert verdict.verdict in (nfq.NF_ACCEPT, nfq.NF_DROP, nfq.NF_REPEAT)
    if verdict.verdict == nfq.NF_REPEAT:        # a reject request (the policy logs: no offload)
        assert verdict.decision.action == "reject" and verdict.mark & 0xC0000000 == 0xC0000000
        assert packet.mark & 0xC0000000 == 0, "a request that came back was asked again"
    assert counters.accepted + counters.dropped == before + 1
    assert counters.errors == 0, "the matcher raised"
    for engine in (ENGINE, FAST):
        verdict = engine.decide(packet, NAMES.get, ct_state, clock[0])
        view = verdict.view
        if packet.family not in (2, 10) or view is None or view.malformed or view.hidden:
            continue
        fresh = engine.decider.decide_packet(packet.payload, 4 if packet.family == 2 else 6,
                                             packet.hook, NAMES.get(packet.indev),
                                             NAMES.get(packet.outdev), packet.mark)
        if fresh is not None:
            assert fresh.rule_index == verdict.decision.rule_index, "the generated function"


if __name__ == "__main__":
    common.main(test_one_input, [bytes(24) + s for s in fuzz_corpus.seeds()])
