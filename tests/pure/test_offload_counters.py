"""The kernel's counts of offloaded flows read from the firewall tools'
output (ipqd.kernel.offload_counters), per rule slot and verdict, and
`ipqd counters`' one total per rule (ipqd.control.verbs.merge_offloaded)."""
import json

from ipqd.control.verbs import counters_lines, merge_offloaded
from ipqd.kernel.offload_counters import parse_iptables_save, parse_nft_json

# As iptables-legacy-save -c prints ipqd's rules (ipqd.kernel.hook_rules), counts added.
IPTABLES_SAVE = """\
*filter
:INPUT ACCEPT [0:0]
:IPQD_INPUT - [0:0]
:IPQD_KEPT_ACCEPT - [0:0]
[12:900] -A INPUT -j IPQD_INPUT
[1:128] -A IPQD_INPUT -m mark --mark 0x80000000/0x80000000 -m conntrack --ctstate NEW,ESTABLISHED -j IPQD_SLOT
[9:1152] -A IPQD_INPUT -m conntrack --ctstate NEW,ESTABLISHED --ctdir ORIGINAL -m connmark --mark 0x20000000/0x20000000 -j IPQD_KEPT_ACCEPT
[2:80] -A IPQD_INPUT -m conntrack --ctstate NEW,ESTABLISHED --ctdir ORIGINAL -m connmark --mark 0x8000000/0x8000000 -j IPQD_KEPT_DROP
[5:500] -A IPQD_INPUT -j NFQUEUE --queue-num 0
[7:1000] -A IPQD_KEPT_ACCEPT -m connmark --mark 0x40000/0x3c0000 -m comment --comment ipqd-slot-1 -j ACCEPT
[2:152] -A IPQD_KEPT_ACCEPT -m connmark --mark 0x3c0000/0x3c0000 -m comment --comment ipqd-slot-15 -j ACCEPT
[0:0] -A IPQD_KEPT_ACCEPT -m comment --comment ipqd-slot-0 -j ACCEPT
[2:80] -A IPQD_KEPT_DROP -m connmark --mark 0x80000/0x3c0000 -m comment --comment ipqd-slot-2 -j DROP
COMMIT
"""

# Without slot bits the kept-verdict rules jump nowhere: they count, as slot 0.
IPTABLES_SAVE_NO_SLOTS = """\
[3:300] -A IPQD_INPUT -m conntrack --ctstate NEW,ESTABLISHED --ctdir REPLY -m connmark --mark 0x10000000/0x10000000 -j ACCEPT
[1:128] -A IPQD_INPUT -m mark --mark 0x80000000/0x80000000 -j IPQD_OFFLOAD
"""


def test_iptables_save_counts_per_slot_and_verdict():
    assert parse_iptables_save(IPTABLES_SAVE) == {
        (1, "accept"): (7, 1000), (15, "accept"): (2, 152), (0, "accept"): (0, 0),
        (2, "drop"): (2, 80)}
    assert parse_iptables_save(IPTABLES_SAVE_NO_SLOTS) == {(0, "accept"): (3, 300)}
    assert parse_iptables_save("") == {}


def _rule(chain, exprs):
    return {"rule": {"family": "inet", "table": "ipqd", "chain": chain, "expr": exprs}}


def test_nft_json_counts_named_counters_and_plain_kept_rules():
    kept = [{"match": {"op": "==", "left": {"ct": {"key": "direction"}}, "right": "reply"}},
            {"match": {"op": "==", "left": {"&": [{"ct": {"key": "mark"}}, 8]}, "right": 8}}]
    # As nft 1.0.6 lists them (tests/kernel checks a real kernel's listing too).
    text = json.dumps({"nftables": [
        {"metainfo": {"json_schema_version": 1}},
        {"counter": {"family": "inet", "name": "slot_1_accept", "table": "ipqd",
                     "packets": 7, "bytes": 700}},
        {"counter": {"family": "inet", "name": "slot_3_drop", "table": "ipqd",
                     "packets": 1, "bytes": 40}},
        {"counter": {"family": "inet", "name": "elsewhere", "table": "ipqd",
                     "packets": 9, "bytes": 9}},
        _rule("input", kept + [{"counter": {"packets": 4, "bytes": 400}}, {"drop": None}]),
        _rule("input", kept + [{"counter": {"map": {"key": {}, "data": {"set": []}}}},
                               {"accept": None}]),
        _rule("input", [{"counter": {"packets": 7, "bytes": 7}}, {"queue": {"num": 0}}]),
    ]})
    assert parse_nft_json(text) == {(1, "accept"): (7, 700), (3, "drop"): (1, 40),
                                    (0, "drop"): (4, 400)}
    assert parse_nft_json("not json") == {}


RULES = [{"name": "web", "hits": 3, "accepted": 3, "dropped": 0, "bytes": 180},
         {"name": "telnet", "hits": 1, "accepted": 0, "dropped": 1, "bytes": 60},
         {"name": "default", "hits": 2, "accepted": 0, "dropped": 2, "bytes": 80}]
SLOTS = {"rules": {"web": 1, "telnet": 2, "late": 15}, "other": 15}


def test_one_total_per_rule_from_ipqd_and_the_kernel():
    merged = merge_offloaded(RULES, SLOTS, parse_iptables_save(IPTABLES_SAVE))
    web, telnet, default = merged["rules"]
    assert (web["packets"], web["bytes"], web["accepted"]) == (3 + 7, 180 + 1000, 10)
    assert web["ipqd"] == {"packets": 3, "bytes": 180}
    assert web["kernel"] == {"packets": 7, "bytes": 1000} and web["slot"] == 1
    assert (telnet["packets"], telnet["dropped"], telnet["bytes"]) == (3, 3, 140)
    assert default["kernel"] == {"packets": 0, "bytes": 0} and default["slot"] is None
    # "other" (15) and slot 0 belong to no single rule.
    assert merged["offloaded_other"] == {"packets": 2, "bytes": 152}
    lines = counters_lines(dict(merged, kernel="counted"))
    assert any(line.startswith("web ") and " 10 " in line for line in lines), lines
    assert "2 packets, 152 bytes" in lines[-1]


def test_unread_kernel_counts_are_said_not_guessed():
    merged = merge_offloaded(RULES[:1], SLOTS, None, whole=False)
    assert merged["rules"][0]["kernel"] is None and merged["rules"][0]["packets"] == 3
    assert "offloaded_other" not in merged
    merged["kernel"] = "offloaded flows not counted: the kernel's counters are root's"
    assert counters_lines(merged)[-1] == "kernel: " + merged["kernel"]
