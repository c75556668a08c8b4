"""The values the loader produces: what the compiler and the reference evaluator read."""
from __future__ import annotations

import ast
import ipaddress
import textwrap
import time
from pathlib import Path

import pytest

from ipqd.errors import PolicyErrors
from ipqd.policy import loader, transfer
from ipqd.policy._limits import MAX_LISTED_PROBLEMS, MAX_RULES, MAX_TOTAL_BYTES
from ipqd.policy.loader import load, load_with_sets, loads
from ipqd.policy.model import (
    NF_INET_FORWARD, NF_INET_LOCAL_IN, NF_INET_LOCAL_OUT, AddrMatch, Default, Hook,
    IfaceMatch, LoggingConfig, MarkMatch, Match, Position, QueueConfig, RangeMatch, Rate,
    Rule, TcpFlagsMatch,
)

HERE = Path(__file__).parent.parent / "policies"
net = ipaddress.ip_network
SYN, ACK = 0x02, 0x10

HEAD = """\
version: 1
hooks: [{chain: input}]
default: {action: accept}
"""


def policy(rules: str, head: str = HEAD):
    return loads(head + "rules:\n" + textwrap.indent(textwrap.dedent(rules), "  "),
                 "p.yaml")


def match_of(rules: str, head: str = HEAD) -> Match:
    return policy(rules, head).rules[0].match


def errors_of(text: str):
    with pytest.raises(PolicyErrors) as caught:
        loads(text, "p.yaml")
    return [str(e) for e in caught.value.errors]


# --- the example from the issue -------------------------------------------------------

def test_example_policy_loads_exactly(monkeypatch):
    monkeypatch.chdir(HERE / "good")
    p = load("example.yaml")
    lan = AddrMatch((net("10.0.0.0/8"), net("192.168.0.0/16"), net("fd00::/8")))
    web = RangeMatch(((80, 80), (443, 443), (8000, 8099)))
    assert p.rules == (
        Rule("established", Match(ct_state=frozenset({"established", "related"})), "accept",
             position=Position("example.yaml", 16, 5)),
        Rule("ssh-from-lan", Match(proto=frozenset({6}), src=lan,
                                   dport=RangeMatch(((22, 22),))), "accept",
             position=Position("example.yaml", 19, 5)),
        Rule("web", Match(proto=frozenset({6}), dport=web), "accept", log=False,
             position=Position("example.yaml", 24, 5)),
        Rule("ping", Match(proto=frozenset({1}), icmp_type=frozenset({8})), "accept",
             rate=Rate(10.0, 10, "10/second"), position=Position("example.yaml", 29, 5)),
        Rule("no-telnet", Match(proto=frozenset({6}), dport=RangeMatch(((23, 23),))), "drop",
             log=True, position=Position("example.yaml", 34, 5)),
        Rule("neighbours", Match(proto=frozenset({58}), icmp_type=frozenset({135, 136})),
             "accept", log=False, position=Position("example.yaml", 39, 5)),
    )
    assert p.queue == QueueConfig(nums=(0,), copy_range=256, fail_open=True, bypass=True,
                                  maxlen=1024, conntrack=True)
    assert p.hooks == (Hook("input", "both"), Hook("output", "ipv4", "icmp"))
    assert p.default == Default("drop", True)
    assert p.logging == LoggingConfig(Rate(200.0, 200, "200/second"))
    assert p.sources == ("example.yaml",) and p.warnings == ()
    assert p.path == "example.yaml" and p.version == 1
    assert p.fields() == {"ct_state", "proto", "src", "dport", "icmp_type"}


def test_load_with_sets_returns_the_sets(monkeypatch):
    monkeypatch.chdir(HERE / "good")
    _, sets = load_with_sets("example.yaml")
    assert sets == {"lan": (net("10.0.0.0/8"), net("192.168.0.0/16"), net("fd00::/8")),
                    "web": ((80, 80), (443, 443), (8000, 8099))}


def test_every_field(monkeypatch):
    monkeypatch.chdir(HERE / "good")
    p = load("all-fields.yaml")
    assert p.queue == QueueConfig(nums=(2, 3, 4, 5), copy_range=128, fail_open=False,
                                  bypass=False, maxlen=4096, conntrack=True)
    assert p.hooks == (Hook("input"), Hook("forward", "ipv6"), Hook("output", "ipv4", "udp"))
    assert p.default == Default("accept", False, 1)
    assert p.logging.rate == Rate(100 / 60, 5, "100/minute burst 5")
    rules = {r.name: r for r in p.rules}
    assert [r.name for r in p.rules][2] == "rule-3"

    assert rules["not-lan"].match == Match(
        src=AddrMatch((net("10.0.0.0/8"), net("fd00::/8")), negate=True),
        dst=AddrMatch((net("192.0.2.1/32"), net("198.51.100.0/24"))))
    assert rules["ssh-admin"].match == Match(
        family=4, proto=frozenset({6}), sport=RangeMatch(((1024, 65535),)),
        dport=RangeMatch(((22, 22), (2222, 2222)), negate=True),
        tcp_flags=TcpFlagsMatch(mask=SYN | ACK, value=SYN))
    third = rules["rule-3"]
    assert third.match == Match(proto=frozenset({17, 132}),
                                dport=RangeMatch(((53, 53), (5353, 5354))))
    assert (third.action, third.set_mark) == ("accept", 0xFF)
    assert rules["ping6"].match.icmp_type == frozenset({128, 135, 2})
    assert rules["ping6"].match.icmp_code == frozenset({0, 1})
    assert rules["ping6"].rate == Rate(5 / 3600, 1, "5/hour")
    assert rules["ping4"].match.icmp_type == frozenset({8})
    assert rules["ping4"].rate == Rate(10.0, 20, "10/second burst 20")
    assert rules["interfaces"].match == Match(
        in_=IfaceMatch(("eth*", "wlan0")), out=IfaceMatch(("lo",), negate=True),
        hook=frozenset({NF_INET_LOCAL_IN, NF_INET_FORWARD}))
    assert rules["owner"].match == Match(
        uid=RangeMatch(((0, 0), (1000, 1999))), gid=RangeMatch(((100, 100),), negate=True),
        mark=MarkMatch(0x10, 0xFF), length=(64, 1500), hook=frozenset({NF_INET_LOCAL_OUT}))
    assert rules["broken"].match == Match(
        malformed=True, fragment=frozenset({"first", "not-first"}),
        ct_state=frozenset({"new", "invalid"}))
    assert rules["root-mark"].match == Match(mark=MarkMatch(7, 0xFFFFFFFF), length=(40, 40),
                                             fragment=frozenset({"none"}))
    assert p.fields() == {
        "src", "dst", "family", "proto", "sport", "dport", "tcp_flags", "icmp_type",
        "icmp_code", "in", "out", "hook", "uid", "gid", "mark", "length", "fragment",
        "ct_state"}


# --- fragments -----------------------------------------------------------------------

def test_fragments_load_in_file_name_order(monkeypatch):
    monkeypatch.chdir(HERE / "fragmented")
    p = load("policy.yaml")
    assert [r.name for r in p.rules] == ["established", "rule-2", "web", "rule-4", "smtp"]
    assert p.sources == ("policy.yaml", "policy.d/10-web.yaml", "policy.d/20-mail.yaml")
    assert p.rules[2].position == Position("policy.d/10-web.yaml", 4, 5)
    assert p.rules[4].match.dport == RangeMatch(((25, 25), (465, 465), (587, 587)))
    assert p.rules[2].match.src == AddrMatch((net("10.0.0.0/8"),))


def test_loads_reads_no_fragments(monkeypatch):
    monkeypatch.chdir(HERE / "fragmented")
    p = loads(Path("policy.yaml").read_text(), "policy.yaml")
    assert len(p.rules) == 2


def _fragmented(tmp_path, main: str, **fragments) -> str:
    (tmp_path / "policy.d").mkdir()
    (tmp_path / "policy.yaml").write_text(main)
    for name, body in fragments.items():
        (tmp_path / "policy.d" / f"{name}.yaml").write_text(body)
    return "policy.yaml"


def test_fragment_errors_name_the_fragment(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _fragmented(tmp_path, HEAD + "sets:\n  lan: [10.0.0.0/8]\n",
                       a="rules:\n  - {name: x, src: '@lan', action: acept}\n",
                       b="sets:\n  lan: [192.168.0.0/16]\ndefault: {action: drop}\n")
    with pytest.raises(PolicyErrors) as caught:
        load(path)
    assert [str(e) for e in caught.value.errors] == [
        "policy.d/a.yaml:2:36: rule \"x\": unknown action 'acept' (did you mean 'accept'?)",
        "policy.d/b.yaml:2:3: set 'lan' is already defined (in policy.yaml line 5)",
        "policy.d/b.yaml:3:1: unknown field 'default' (expected only sets and rules "
        "in a fragment)",
    ]


def test_duplicate_rule_name_across_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _fragmented(tmp_path, HEAD + "rules:\n  - {name: ssh, action: accept}\n",
                       a="rules:\n  - {name: ssh, action: drop}\n")
    with pytest.raises(PolicyErrors) as caught:
        load(path)
    assert [str(e) for e in caught.value.errors] == [
        'policy.d/a.yaml:2:12: duplicate rule name "ssh" (first in policy.yaml line 5): '
        "rule names must be unique",
    ]


def test_empty_fragment_is_allowed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _fragmented(tmp_path, HEAD, a="# nothing yet\n")
    assert load(path).rules == ()


def test_fragment_must_be_a_mapping(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _fragmented(tmp_path, HEAD, a="- {action: accept}\n")
    with pytest.raises(PolicyErrors) as caught:
        load(path)
    assert [str(e) for e in caught.value.errors] == [
        "policy.d/a.yaml:1:1: a policy.d fragment must be a mapping of sections "
        "(sets and rules), not a list"]


def test_shadowing_across_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _fragmented(tmp_path, HEAD + "rules:\n  - {name: all, action: accept}\n",
                       a="rules:\n  - {name: late, proto: tcp, action: drop}\n")
    assert [str(w) for w in load(path).warnings] == [
        'policy.d/a.yaml:2:5: warning: rule "late" can never match: rule "all" '
        "(policy.yaml line 5) matches every packet it would"]


# --- single fields -------------------------------------------------------------------

@pytest.mark.parametrize("written, expected", [
    ('"!10.0.0.0/8"', AddrMatch((net("10.0.0.0/8"),), negate=True)),
    ('["!10.0.0.0/8", "!192.168.0.0/16"]',
     AddrMatch((net("10.0.0.0/8"), net("192.168.0.0/16")), negate=True)),
    ("[10.0.0.1, 10.0.0.1]", AddrMatch((net("10.0.0.1/32"),))),
    ('"::1"', AddrMatch((net("::1/128"),))),
    ("2001:db8::/32", AddrMatch((net("2001:db8::/32"),))),
])
def test_addresses(written, expected):
    assert match_of(f"- {{src: {written}, action: accept}}\n").src == expected


@pytest.mark.parametrize("written, expected", [
    ("22", RangeMatch(((22, 22),))),
    ('"!22"', RangeMatch(((22, 22),), negate=True)),
    ("0x16", RangeMatch(((22, 22),))),
    ("[1-1023, 8080]", RangeMatch(((1, 1023), (8080, 8080)))),
    ('"0-65535"', RangeMatch(((0, 65535),))),
])
def test_ports(written, expected):
    assert match_of(f"- {{proto: tcp, dport: {written}, action: accept}}\n").dport == expected


@pytest.mark.parametrize("written, mask, value", [
    ("syn", SYN, SYN),
    ('"syn,!ack"', SYN | ACK, SYN),
    ('"!syn, !ack"', SYN | ACK, 0),
    ("[fin, syn, rst, psh, ack, urg, ece, cwr]", 0xFF, 0xFF),
    ("[SYN, '!ACK']", SYN | ACK, SYN),
    ('"syn,!ack,fin"', SYN | ACK | 0x01, SYN | 0x01),
])
def test_tcp_flags(written, mask, value):
    got = match_of(f"- {{proto: tcp, tcp_flags: {written}, action: accept}}\n").tcp_flags
    assert got == TcpFlagsMatch(mask=mask, value=value)


@pytest.mark.parametrize("proto, name, number", [
    ("icmp", "echo-request", 8), ("icmpv6", "echo-request", 128),
    ("icmp", "echo-reply", 0), ("icmpv6", "echo-reply", 129),
    ("icmp", "destination-unreachable", 3), ("icmpv6", "destination-unreachable", 1),
    ("icmp", "time-exceeded", 11), ("icmpv6", "time-exceeded", 3),
    ("icmp", "parameter-problem", 12), ("icmpv6", "parameter-problem", 4),
    ("icmp", "redirect", 5), ("icmpv6", "redirect", 137),
    ("icmp", "router-advertisement", 9), ("icmpv6", "router-advertisement", 134),
    ("icmp", "router-solicitation", 10), ("icmpv6", "router-solicitation", 133),
    ("icmp", "source-quench", 4), ("icmp", "timestamp-request", 13),
    ("icmp", "timestamp-reply", 14), ("icmpv6", "packet-too-big", 2),
    ("icmpv6", "neighbour-solicitation", 135), ("icmpv6", "neighbor-solicitation", 135),
    ("icmpv6", "neighbour-advertisement", 136), ("icmpv6", "neighbor-advertisement", 136),
    ("icmpv6", "mld-listener-query", 130),
    ("icmp", "13", 13), ("icmpv6", "200", 200),
])
def test_icmp_type_names_per_family(proto, name, number):
    got = match_of(f"- {{proto: {proto}, icmp_type: {name}, action: accept}}\n").icmp_type
    assert got == frozenset({number})


def test_icmp_type_numbers_with_both_icmp_protocols():
    got = match_of("- {proto: [icmp, icmpv6], icmp_type: [0, 129], action: accept}\n")
    assert got.icmp_type == frozenset({0, 129})


@pytest.mark.parametrize("written, expected", [
    ("10/second", Rate(10.0, 10, "10/second")),
    ("1/second", Rate(1.0, 1, "1/second")),
    ("3/minute", Rate(0.05, 1, "3/minute")),
    ("90/minute", Rate(1.5, 2, "90/minute")),
    ("7200/hour", Rate(2.0, 2, "7200/hour")),
    ("10/second burst 20", Rate(10.0, 20, "10/second burst 20")),
    ("'5 / second  burst 1'", Rate(5.0, 1, "5 / second burst 1")),
])
def test_rates(written, expected):
    assert policy(f"- {{action: accept, rate: {written}}}\n").rules[0].rate == expected


@pytest.mark.parametrize("written", ["10/sec", "10", "0/second", "10/second burst",
                                     "10/second burst 0", "ten/second", "-1/second",
                                     "10/seconds", "10/day"])
def test_bad_rates(written):
    assert errors_of(HEAD + f"rules:\n  - {{action: accept, rate: '{written}'}}\n") == [
        f"p.yaml:5:28: rule \"rule-1\": rate '{written}' is not valid: write N/second, "
        "N/minute or N/hour, optionally 'burst M'"]


@pytest.mark.parametrize("written, expected", [
    ("16", MarkMatch(16)), ("0x10/0xff", MarkMatch(0x10, 0xFF)),
    ('"0/0x1"', MarkMatch(0, 1)), ("0xffffffff", MarkMatch(0xFFFFFFFF)),
])
def test_marks(written, expected):
    assert match_of(f"- {{mark: {written}, action: accept}}\n").mark == expected


def test_uid_and_gid_by_name():
    got = match_of("- {uid: root, gid: [root, 5-9], action: accept}\n")
    assert got.uid == RangeMatch(((0, 0),))
    assert got.gid == RangeMatch(((0, 0), (5, 9)))


def test_queue_defaults_and_conntrack_auto():
    p = policy("- {action: accept}\n")
    assert p.queue == QueueConfig(conntrack=False)
    assert policy("- {ct_state: new, action: accept}\n").queue.conntrack is True
    head = HEAD + "queue: {conntrack: true}\n"
    assert policy("- {action: accept}\n", head).queue.conntrack is True


def test_default_log_defaults_to_true():
    assert policy("- {action: accept}\n").default == Default("accept", True)


def test_unnamed_rules_are_numbered_over_the_whole_policy():
    p = policy("- {action: accept, proto: tcp}\n- {name: b, action: drop}\n"
               "- {action: drop, proto: udp}\n")
    assert [r.name for r in p.rules] == ["rule-1", "b", "rule-3"]


def test_copy_range_zero_means_whole_packets_and_is_not_warned():
    p = policy("- {action: accept}\n", HEAD + "queue: {copy_range: 0}\n")
    assert (p.queue.copy_range, p.warnings) == (0, ())


def test_empty_rules_and_sets_are_allowed():
    p = loads(HEAD + "sets:\nrules:\n", "p.yaml")
    assert p.rules == () and p.warnings == ()


def test_comment_field_is_ignored():
    assert policy("- {comment: why this rule exists, action: accept}\n").rules[0].match == Match()


# --- problems reported all at once ---------------------------------------------------------

def test_every_problem_is_reported_sorted():
    text = HEAD + textwrap.dedent("""\
        rules:
          - {name: b, proto: tcp, dport: 99999, action: accept}
          - {name: a, src: 300.0.0.1, action: maybe, log: 3}
        """)
    assert errors_of(text) == [
        'p.yaml:5:34: rule "b": port 99999 is outside 0-65535',
        "p.yaml:6:20: rule \"a\": '300.0.0.1' is not an IP address or network "
        "(write e.g. 192.0.2.1, 10.0.0.0/8 or fd00::/8)",
        "p.yaml:6:39: rule \"a\": unknown action 'maybe' (expected accept, drop, reject or log)",
        'p.yaml:6:51: rule "a": log must be true or false, not the number 3',
    ]


def test_errors_carry_warnings_too():
    with pytest.raises(PolicyErrors) as caught:
        loads(HEAD + "rules:\n  - {src: 10.0.0.1/8, action: acept}\n", "p.yaml")
    assert [(e.severity, e.line, e.column) for e in caught.value.errors] == [
        ("warning", 5, 11), ("error", 5, 31)]


@pytest.mark.parametrize("text, message", [
    ("version: 1\nhooks: []\ndefault: drop\n",
     "p.yaml:3:10: default must be a mapping of fields, not 'drop'"),
    (HEAD + "queue: {num: 1, fail_open: 1}\n",
     "p.yaml:4:28: queue: fail_open must be true or false, not the number 1"),
    (HEAD + "queue: {maxlen: 0}\n",
     "p.yaml:4:17: queue: maxlen must be a number of packets from 1 to 4294967295, not '0'"),
    ("version: 1\ndefault: {action: accept}\nhooks: {chain: input}\n",
     "p.yaml:3:8: hooks must be a list of mappings such as {chain: input}, "
     "not a mapping"),
    (HEAD + "rules:\n  - {proto: tcp, dport: [], action: accept}\n",
     'p.yaml:5:25: rule "rule-1": dport is an empty list, which matches nothing: '
     "remove the field or give it values"),
    (HEAD + "rules:\n  - {src: [[10.0.0.1]], action: accept}\n",
     'p.yaml:5:12: rule "rule-1": each item of src must be an address, a network, a list '
     "or a set, not a list"),
    (HEAD + "rules:\n  - {name: '', action: accept}\n",
     "p.yaml:5:12: rule 1: name must be a short text, not ''"),
    (HEAD + "rules:\n  - {family: both, action: accept}\n",
     "p.yaml:5:14: rule \"rule-1\": unknown family 'both' (expected ipv4 or ipv6; "
     "leave family out for both)"),
    (HEAD + "rules:\n  - {proto: 256, action: accept}\n",
     'p.yaml:5:13: rule "rule-1": protocol 256 is outside 0-255'),
    (HEAD + "rules:\n  - {proto: tcp, tcp_flags: 'syn,syn', action: accept}\n",
     "p.yaml:5:29: rule \"rule-1\": TCP flag 'syn' is named twice"),
    (HEAD + "rules:\n  - {set_mark: 0x100000000, action: accept}\n",
     "p.yaml:5:16: rule \"rule-1\": set_mark must be a number from 0 to 0xffffffff, "
     "not '0x100000000'"),
    (HEAD + "rules:\n  - {uid: 4294967295, action: accept}\n",
     'p.yaml:5:11: rule "rule-1": uid 4294967295 is outside 0-4294967294'),
    (HEAD + "default: {action: accept}\n",
     "p.yaml:4:1: duplicate key 'default' (first on line 3): "
     "YAML would silently keep only the last one"),
    (HEAD + "sets:\n  'a b': [1]\n",
     "p.yaml:5:3: 'a b' is not a set name (letters, digits, '_', '-', '.')"),
    (HEAD + "sets:\n  web: []\n",
     "p.yaml:5:8: set 'web' is an empty list, which matches nothing: "
     "remove the field or give it values"),
    (HEAD + "rules:\n  - {proto: icmp, icmp_type: ping, action: accept}\n",
     "p.yaml:5:30: rule \"rule-1\": unknown icmp type 'ping'"),
    (HEAD + "rules:\n  - {proto: icmpv6, icmp_type: echo, action: accept}\n",
     "p.yaml:5:32: rule \"rule-1\": unknown icmpv6 type 'echo'"),
    (HEAD + "default: {action: drop, set_mark: 1}\n".replace("default", "x") ,
     "p.yaml:4:1: unknown field 'x' (expected version, mode, queue, hooks, default, logging, "
     "sets, rules, tests or shadow)"),
])
def test_single_problems(text, message):
    assert errors_of(text) == [message]


def test_default_set_mark_on_drop():
    text = "version: 1\nhooks: []\ndefault: {action: drop, set_mark: 1}\n"
    assert errors_of(text) == [
        "p.yaml:3:25: default: set_mark only works with action accept "
        "(a dropped packet keeps no mark)"]


# --- purity ---------------------------------------------------------------------------------

POLICY_MODULES = ["loader.py", "_yamlsafe.py", "_values.py", "_nodes.py", "_rules.py",
                  "_lint.py", "model.py"]


@pytest.mark.parametrize("name", POLICY_MODULES)
def test_policy_modules_do_no_io_but_reading_files(name):
    source = (Path(loader.__file__).parent / name).read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"socket", "select", "signal", "subprocess", "ctypes"}
    assert "yaml.load(" not in source and "FullLoader" not in source \
        and "UnsafeLoader" not in source


def test_check_file_safety(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text("version: 1\n")
    path.chmod(0o644)
    tmp_path.chmod(0o755)
    assert loader.check_file_safety(str(path)) == []
    path.chmod(0o666)
    assert loader.check_file_safety(str(path)) == [
        f"{path} is writable by group or others (mode 666): chmod go-w {path}"]
    path.chmod(0o1666)          # the sticky bit excuses a directory, never a file
    assert loader.check_file_safety(str(path)) == [
        f"{path} is writable by group or others (mode 1666): chmod go-w {path}"]
    path.chmod(0o644)
    tmp_path.chmod(0o1777)      # others may add files here, not replace root's
    assert loader.check_file_safety(str(path)) == []
    tmp_path.chmod(0o777)
    assert loader.check_file_safety(str(path)) == [
        f"{tmp_path} is writable by group or others (mode 777): chmod go-w {tmp_path}"]
    tmp_path.chmod(0o755)


# --- limits ------------------------------------------------------------------------------

def test_total_size_over_all_files_is_limited(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    padding = "# padding\n" * (3 * 1024 * 1024 // 10)        # 3 MiB: each file is allowed
    path = _fragmented(tmp_path, HEAD, a=padding, b=padding, c=padding,
                       d="this fragment is never read: [\n")
    started = time.monotonic()
    with pytest.raises(PolicyErrors) as caught:
        load(path)
    assert time.monotonic() - started < 5
    size = len(HEAD) + 3 * len(padding)
    assert [str(e) for e in caught.value.errors] == [
        f"policy.d/c.yaml:1:1: the policy is too large: its files hold {size} bytes with this "
        f"fragment, more than the {MAX_TOTAL_BYTES} allowed in all (main file and policy.d): "
        "use sets to write fewer rules, or remove fragments"]
    assert MAX_TOTAL_BYTES == 8 * 1024 * 1024


def test_rule_count_over_all_files_is_limited(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    in_main = 30_000
    path = _fragmented(tmp_path, HEAD + "rules: [" + "{action: drop}, " * in_main + "]\n",
                       a="rules:\n" + "- {action: drop}\n" * (MAX_RULES - in_main + 5))
    started = time.monotonic()
    with pytest.raises(PolicyErrors) as caught:
        load(path)
    assert time.monotonic() - started < 5
    line = MAX_RULES - in_main + 2                           # the first rule too many
    assert [str(e) for e in caught.value.errors] == [
        f"policy.d/a.yaml:{line}:3: the policy has {MAX_RULES + 5} rules, more than the "
        f"{MAX_RULES} allowed (this is rule {MAX_RULES + 1}): use sets so that one rule "
        "matches many addresses or ports, or remove rules"]
    assert MAX_RULES == 50_000


def _shadowed_rules(count: int) -> str:
    return HEAD + "rules:\n  - {name: all, action: accept}\n" + "".join(
        f"  - {{name: r{i}, proto: tcp, dport: {i}, action: drop}}\n" for i in range(count))


def test_listed_warnings_are_capped(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(_shadowed_rules(MAX_LISTED_PROBLEMS + 50))
    warnings = [str(w) for w in load(str(path)).warnings]
    assert len(warnings) == MAX_LISTED_PROBLEMS + 1
    assert warnings[-2].startswith(f"{path}:{MAX_LISTED_PROBLEMS + 5}:5: warning: rule ")
    assert warnings[-1] == (f"{path}:{MAX_LISTED_PROBLEMS + 6}:5: warning: 50 more warnings "
                            f"not listed (the first of them here): run `ipqd check {path}` "
                            "to list them all")
    # What the daemon keeps and logs is the capped list; `ipqd check` asks for all.
    assert [str(w) for w in transfer.outline(load(str(path))).warnings] == warnings
    assert len(load(str(path), every_problem=True).warnings) == MAX_LISTED_PROBLEMS + 50


def test_listed_errors_come_before_warnings_when_capped():
    host_bits = "".join(f"  - {{name: w{i}, src: 10.0.0.{i}/8, action: drop}}\n"
                        for i in range(1, MAX_LISTED_PROBLEMS + 1))      # warnings, lines 5-104

    def listed(errors: int):
        bad = "".join(f"  - {{name: e{i}, action: rejct}}\n" for i in range(errors))
        with pytest.raises(PolicyErrors) as caught:
            loads(HEAD + "rules:\n" + host_bits + bad, "p.yaml")
        return caught.value.errors

    problems = listed(3)
    assert len(problems) == MAX_LISTED_PROBLEMS + 1
    assert sum(p.severity == "error" for p in problems) == 3
    assert str(problems[-1]) == (
        "p.yaml:102:22: warning: 3 more warnings not listed (the first of them here): "
        "run `ipqd check p.yaml` to list them all")
    problems = listed(MAX_LISTED_PROBLEMS + 1)
    assert all(p.severity == "error" for p in problems)
    assert str(problems[-1]) == (
        "p.yaml:5:21: 1 more error and 100 more warnings not listed (the first of them "
        "here): run `ipqd check p.yaml` to list them all")
