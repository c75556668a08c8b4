"""A policy packed for the workers comes back equal; the supervisor's outline has no rules."""
from ipqd.policy import transfer
from ipqd.policy.loader import loads


def policy_of(count: int):
    rules = "".join(f"  - {{name: r{i}, proto: udp, src: 10.{i >> 8 & 255}.{i & 255}.0/24, "
                    f"dport: {1000 + i % 500}, action: accept}}\n" for i in range(count))
    return loads("version: 1\ndefault: {action: drop}\nrules:\n" + rules, "p.yaml")


def test_round_trip_keeps_every_rule_in_order():
    for count in (0, 1, 607):
        policy = policy_of(count)
        back = transfer.unpack(transfer.pack(policy))
        assert back.rules == policy.rules and back.queue == policy.queue
        assert (back.default, back.hooks, back.logging, back.path) == \
            (policy.default, policy.hooks, policy.logging, policy.path)
        assert [str(w) for w in back.warnings] == [str(w) for w in policy.warnings]
        assert transfer.outline(policy).rules == () and \
            transfer.outline(policy).default == policy.default
