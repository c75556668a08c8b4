"""`ipqd explain`: captures and described packets through the real parse + decide path."""
from __future__ import annotations

import glob
import json
import os

import pytest

from ipqd.cli import main
from ipqd.policy.checked import policy_digest
from make_captures import EXPECTED

HERE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "captures")
POLICY = os.path.join(HERE, "policy.yaml")
SHARED = "/work/shared/captures/tcpdump-tests"


def explain(capsys, *argv) -> tuple:
    code = main(["explain", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def json_lines(out: str) -> dict:
    """--json's JSON Lines: the packet objects, then the summary object."""
    objects = [json.loads(line) for line in out.splitlines()]
    assert all(o["type"] == "packet" for o in objects[:-1]) and objects[-1]["type"] == "summary"
    return {"packets": objects[:-1], "summary": objects[-1]}


def explain_json(capsys, *argv) -> dict:
    code, out, err = explain(capsys, POLICY, *argv, "--json")  # a description must come first
    assert code == 0, err
    return json_lines(out)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_own_captures_get_the_expected_verdicts(capsys, name):
    document = explain_json(capsys, "--pcap", os.path.join(HERE, name))
    packets = document["packets"]
    assert len(packets) == len(EXPECTED[name])
    for record, (verdict, rule, summary) in zip(packets, EXPECTED[name]):
        if summary == "skipped":
            assert record["verdict"] is None and record["skipped"].startswith("not IP")
            continue
        assert (record["verdict"], record["rule"]) == (verdict, rule), record
        assert record["summary"].startswith(summary), record


def test_capture_text_output(capsys):
    code, out, _ = explain(capsys, POLICY, "--pcap", os.path.join(HERE, "ipqd-mixed.pcap"))
    lines = out.splitlines()
    assert code == 0
    assert lines[0].split() == ["1", "ACCEPT", "ssh", "tcp", "10.0.0.5:40000", "->",
                                "10.0.0.1:22", "[S]", "len=40", "ct=new"]
    assert "skipped: not IP" in lines[2]
    assert "DROP    queue.undecidable     tcp 10.0.0.5 -> 10.0.0.1 len=40 " \
           "(transport header past copy_range)" in out
    table = {line.split()[0]: line.split()[1:] for line in lines[lines.index("") + 2:]
             if line and not line.startswith(("(", "1 frame"))}
    assert table["ssh"] == ["2", "2", "0"] and table["bad"] == ["1", "0", "1"]
    assert "(default: drop)            1         0        1" in out
    assert "(undecidable: drop)        1         0        1" in out


CAPTURE_MALFORMED = {
    "LINKTYPE_IPV4_invalid.pcap": ["IPv6 header in an IPv4 packet"],
    "LINKTYPE_RAW_ipv6.pcap": [None],
    "dns_udp.pcap": [None, None],
    "icmp-length-zero.pcapng": ["IPv4 total length 0 < header length 20"],
    "icmpv6.pcap": [None] * 5,
    "ipv4_invalid_total_length.pcap": ["IPv4 total length 85 beyond the 84 bytes"],
    "ipv6-routing-header.pcap": [None] * 4,
    "ipv6_frag6_negative_len.pcap": ["IPv6 extension header runs off the end"],
    "tcp_header_heapoverflow.pcap": ["transport header past copy_range"],    # snaplen 46
    "tcp_rst_data-trunc.pcap": [None],
}


@pytest.mark.parametrize("name", sorted(CAPTURE_MALFORMED))
def test_tcpdump_captures_malformed_or_not(capsys, name):
    packets = explain_json(capsys, "--pcap", os.path.join(HERE, name))["packets"]
    assert [p["reason"] for p in packets] == CAPTURE_MALFORMED[name]
    for p in packets:
        assert p["verdict"] in ("accept", "drop")
        assert (p["rule"] == "bad") == p["malformed"]


def every_capture():
    own = glob.glob(os.path.join(HERE, "*.pcap*"))
    shared = glob.glob(os.path.join(SHARED, "*.pcap*"))
    return sorted(own + shared)


@pytest.mark.parametrize("path", every_capture(), ids=os.path.basename)
def test_every_capture_reads_without_traceback(capsys, path):
    from ipqd.tools.pcap import NotIP, ip_payload, read_capture
    with open(path, "rb") as f:
        frames = list(read_capture(f))
    ip_frames = 0
    for frame in frames:
        try:
            ip_payload(frame)
            ip_frames += 1
        except NotIP:
            pass
    for as_json in (True, False):
        code, out, err = explain(capsys, POLICY, "--pcap", path, *(["--json"] if as_json else []))
        assert code == 0 and "Traceback" not in err
    packets = json_lines(explain(capsys, POLICY, "--pcap", path, "--json")[1])["packets"]
    decided = [p for p in packets if p["verdict"] is not None]
    assert len(packets) == len(frames) and len(decided) == ip_frames
    for p in decided:
        assert p["summary"].startswith("malformed: ") == p["malformed"]


def test_damaged_capture_reports_what_it_read(capsys, tmp_path):
    data = open(os.path.join(HERE, "ipqd-mixed.pcap"), "rb").read()
    damaged = tmp_path / "damaged.pcap"
    damaged.write_bytes(data[:300])
    code, out, err = explain(capsys, POLICY, "--pcap", str(damaged))
    assert code == 1 and "capture damaged" in err
    assert out.startswith("    1  ACCEPT  ssh")


def test_not_a_capture(capsys, tmp_path):
    junk = tmp_path / "junk.pcap"
    junk.write_bytes(b"hello, world, this is not a capture")
    code, out, err = explain(capsys, POLICY, "--pcap", str(junk))
    assert code == 1 and "not a pcap or pcapng file" in err


def test_missing_capture(capsys, tmp_path):
    code, _, err = explain(capsys, POLICY, "--pcap", str(tmp_path / "none.pcap"))
    assert code == 3 and "cannot read capture" in err      # EXIT_UNREADABLE, as `ipqd check`


DESCRIBED = [
    ("tcp 10.0.0.5:40000 -> 10.0.0.1:22 syn", [], "accept", "ssh",
     "tcp 10.0.0.5:40000 -> 10.0.0.1:22 [S] len=40"),
    ("tcp 10.0.0.5:40000 -> 10.0.0.1:22 syn,ack", [], "accept", "ssh",
     "tcp 10.0.0.5:40000 -> 10.0.0.1:22 [S.] len=40"),
    ("tcp 192.168.0.5:40000 -> 10.0.0.1:22", [], "drop", None, "tcp 192.168.0.5:40000"),
    ("udp [fd00::1]:53 -> [fd00::2]:5353", [], "drop", None,
     "udp [fd00::1]:53 -> [fd00::2]:5353 len=48"),
    ("udp [fd00::1]:5353 -> [fd00::2]:53 len=1200", [], "accept", "dns",
     "udp [fd00::1]:5353 -> [fd00::2]:53 len=1200"),
    ("icmp 10.0.0.1 -> 10.0.0.2 echo-request", [], "accept", "ping",
     "icmp 10.0.0.1 -> 10.0.0.2 echo-request len=28"),
    ("icmp 10.0.0.1 -> 10.0.0.2 echo-reply", [], "drop", None, "icmp 10.0.0.1 -> 10.0.0.2 echo-reply"),
    ("icmpv6 fd00::1 -> fd00::2 echo-request", [], "accept", "ping6",
     "icmpv6 fd00::1 -> fd00::2 echo-request len=48"),
    ("icmpv6 fd00::1 -> fd00::2 type=135", [], "accept", "ping6",
     "icmpv6 fd00::1 -> fd00::2 neighbour-solicitation"),
    ("tcp 192.168.0.5:1 -> 10.0.0.1:80 ct=established", [], "accept", "established", "tcp"),
    ("udp 10.0.0.5:1 -> 10.0.0.1:53 frag=first", [], "accept", "dns",
     "udp 10.0.0.5:1 -> 10.0.0.1:53 frag=first"),
    ("udp 10.0.0.5 -> 10.0.0.1 frag=not-first", [], "accept", "fragments",
     "udp 10.0.0.5 -> 10.0.0.1 frag=not-first"),
    ("tcp [fd00::5]:1 -> [fd00::1]:23 frag=first", [], "drop", "no-telnet",
     "tcp [fd00::5]:1 -> [fd00::1]:23 [S] frag=first"),
    ("gre 10.0.0.5 -> 10.0.0.1", [], "drop", None, "gre 10.0.0.5 -> 10.0.0.1 len=20"),
]


@pytest.mark.parametrize("text,argv,verdict,rule,summary", DESCRIBED, ids=[d[0] for d in DESCRIBED])
def test_described_packet(capsys, text, argv, verdict, rule, summary):
    document = explain_json(capsys, text, *argv)
    (record,) = document["packets"]
    assert (record["verdict"], record["rule"]) == (verdict, rule), record
    assert record["summary"].startswith(summary), record


def test_described_packet_meta_options(tmp_path, capsys):
    policy = tmp_path / "p.yaml"
    policy.write_text(
        "version: 1\ndefault: {action: drop}\nrules:\n"
        "  - {name: out-eth1, out: eth1, hook: output, mark: 0x10, uid: 1000, action: accept}\n"
        "  - {name: in-eth, in: 'eth*', gid: 0, length: 1000-2000, action: accept, set_mark: 5}\n")
    code, out, _ = explain(capsys, str(policy), "tcp 10.0.0.1:1 -> 10.0.0.2:2 out=eth1 "
                           "mark=0x10 uid=1000 hook=output")
    assert code == 0 and "ACCEPT  out-eth1" in out
    code, out, _ = explain(capsys, str(policy), "tcp 10.0.0.1:1 -> 10.0.0.2:2 out=eth1 "
                           "mark=0x10 uid=1000", "--hook", "output")
    assert "ACCEPT  out-eth1" in out
    code, out, _ = explain(capsys, str(policy), "udp 10.0.0.1:1 -> 10.0.0.2:2 gid=0 len=1200",
                           "--in", "eth3")
    assert "ACCEPT  in-eth" in out and "(set mark 0x5)" in out
    code, out, _ = explain(capsys, str(policy), "udp 10.0.0.1:1 -> 10.0.0.2:2 gid=0 len=1200")
    assert "DROP    default" in out


BAD_DESCRIPTIONS = [
    ("tcp 10.0.0.1 -> 10.0.0.2", "tcp needs ports"),
    ("tcp 10.0.0.1:1 => 10.0.0.2:2", "is not PROTO SRC -> DST"),
    ("foo 10.0.0.1 -> 10.0.0.2", "unknown protocol 'foo'"),
    ("tcp 10.0.0.300:1 -> 10.0.0.2:2", "'10.0.0.300' is not an IP address"),
    ("tcp 10.0.0.1:70000 -> 10.0.0.2:2", "'70000' is not a port"),
    ("udp 10.0.0.1:1 -> [fd00::1]:2", "not of the same family"),
    ("tcp 10.0.0.1:1 -> 10.0.0.2:2 syn,bogus", "unknown TCP flag 'bogus'"),
    ("icmp fd00::1 -> fd00::2 echo-request", "use icmpv6"),
    ("icmp 10.0.0.1 -> 10.0.0.2 bogus", "unknown icmp type 'bogus'"),
    ("udp 10.0.0.1:1 -> 10.0.0.2:2 len=10", "len=10 is shorter than the headers (28 bytes)"),
    ("udp 10.0.0.1:1 -> 10.0.0.2:2 ct=maybe", "ct=maybe: expected one of new"),
    ("udp 10.0.0.1:1 -> 10.0.0.2:2 colour=red", "unknown option 'colour=red'"),
    ("udp 10.0.0.1:1 -> 10.0.0.2:2 syn", "unexpected 'syn'"),
    ("icmp 10.0.0.1:1 -> 10.0.0.2", "icmp has no ports"),
]


@pytest.mark.parametrize("text,message", BAD_DESCRIPTIONS, ids=[b[0] for b in BAD_DESCRIPTIONS])
def test_bad_description(capsys, text, message):
    code, out, err = explain(capsys, POLICY, text)
    assert code == 1 and out == ""                          # EXIT_INVALID
    assert message in err and "expected: PROTO SRC[:PORT] -> DST[:PORT]" in err


def test_no_packet_and_no_capture(capsys):
    code, _, err = explain(capsys, POLICY)
    assert code == 2 and "give a packet description or --pcap FILE" in err


def test_bad_hook(capsys):
    code, _, err = explain(capsys, POLICY, "tcp 10.0.0.1:1 -> 10.0.0.2:2", "--hook", "inbound")
    assert code == 2 and "unknown hook 'inbound'" in err


def test_policy_errors_are_listed(capsys, tmp_path):
    policy = tmp_path / "bad.yaml"
    policy.write_text("version: 1\nrules:\n  - {name: x, action: rejct}\n")
    code, out, err = explain(capsys, str(policy), "tcp 10.0.0.1:1 -> 10.0.0.2:2")
    assert code == 1 and out == ""
    assert f"{policy}:3:" in err


def test_missing_policy(capsys, tmp_path):
    code, _, err = explain(capsys, str(tmp_path / "none.yaml"), "tcp 10.0.0.1:1 -> 10.0.0.2:2")
    assert code == 3 and "cannot read policy" in err       # EXIT_UNREADABLE, as `ipqd check`


def test_the_bigtcp_capture_if_present(capsys):
    path = os.path.join(SHARED, "bigtcp-ipv6-hbh.pcap")
    if not os.path.exists(path):
        pytest.skip("shared captures not present")
    (record,) = explain_json(capsys, "--pcap", path)["packets"]
    assert not record["malformed"] and record["packet"]["length"] == 80080


def test_text_output_escapes_names_and_errors(capsys, tmp_path):
    hostile, fake = "a\x1b[2J\x07\rb", "1  ACCEPT  ok"
    controls = [chr(c) for c in range(0x20) if c != 0x0A] + [chr(c) for c in range(0x7F, 0xA0)]
    policy = tmp_path / "p.yaml"
    policy.write_text("version: 1\ndefault: {action: drop}\nrules:\n"
                      f"  - {{name: {json.dumps(hostile + chr(13) + fake)}, action: accept}}\n")
    code, out, err = explain(capsys, str(policy), "tcp 10.0.0.1:1 -> 10.0.0.2:2")
    assert code == 0 and not any(c in out + err for c in controls)
    assert "ACCEPT  a\\x1b[2J\\x07\\x0db\\x0d1  ACCEPT  ok" in out
    # A newline is refused in a name, and the error quotes the name.
    policy.write_text("version: 1\ndefault: {action: drop}\nrules:\n"
                      f"  - {{name: {json.dumps(hostile + chr(10) + fake)}, action: accept}}\n")
    code, out, err = explain(capsys, str(policy), "tcp 10.0.0.1:1 -> 10.0.0.2:2")
    assert code == 1 and not any(c in out + err for c in controls)
    assert not any(line.startswith(fake) for line in err.splitlines())
    assert "\\x0a1  ACCEPT  ok" in err


# ---- connection state -------------------------------------------------------

def test_a_capture_is_tracked_so_replies_are_established(capsys):
    """The issue's case: the policy accepts [established, related] first, and
    the DNS answer in dns_udp.pcap was dropped by the default."""
    document = explain_json(capsys, "--pcap", os.path.join(HERE, "dns_udp.pcap"))
    query, answer = document["packets"]
    assert (query["rule"], query["packet"]["ct_state"]) == ("dns", "new")
    assert (answer["verdict"], answer["rule"]) == ("accept", "established")
    assert answer["packet"]["ct_state"] == "established"
    assert document["summary"]["conntrack"] == {"connections": 1, "forgotten": 0,
                                                "capacity": 65536}
    code, out, _ = explain(capsys, POLICY, "--pcap", os.path.join(HERE, "dns_udp.pcap"))
    assert out.splitlines()[1].endswith("len=252 ct=established")
    assert "conntrack: 1 connection(s) tracked at the end" in out


LONE = [
    ("tcp 192.168.0.5:1 -> 10.0.0.1:80 syn", [], "new", "drop", None),
    ("tcp 192.168.0.5:1 -> 10.0.0.1:80 ack", [], "new", "drop", None),        # picked up
    ("tcp 192.168.0.5:1 -> 10.0.0.1:80 fin,ack", [], "invalid", "drop", None),
    ("icmp 10.0.0.1 -> 10.0.0.2 echo-reply", [], "invalid", "drop", None),
    ("icmpv6 fe80::1 -> ff02::1 neighbour-solicitation", [], "untracked", "accept", "ping6"),
    ("tcp 192.168.0.5:1 -> 10.0.0.1:80 ack", ["--ct-state", "established"], "established",
     "accept", "established"),
    ("udp 192.168.0.5:1 -> 10.0.0.1:80 ct=related", [], "related", "accept", "established"),
    ("udp 192.168.0.5:1 -> 10.0.0.1:80 ct=new", ["--ct-state", "new"], "new", "drop", None),
]


@pytest.mark.parametrize("text,argv,state,verdict,rule", LONE, ids=[" ".join([t[0]] + t[1])
                                                                    for t in LONE])
def test_a_described_packet_is_a_lone_packet_unless_told(capsys, text, argv, state, verdict,
                                                         rule):
    (record,) = explain_json(capsys, text, *argv)["packets"]
    assert record["packet"]["ct_state"] == state
    assert (record["verdict"], record["rule"]) == (verdict, rule)
    code, out, _ = explain(capsys, POLICY, text, *argv)
    decided, named = out.splitlines()
    assert code == 0 and decided.endswith(f"ct={state}")
    assert named == f"policy {POLICY} sha256:{policy_digest(POLICY)}"   # as its journal says


def test_ct_state_usage_errors(capsys):
    code, out, err = explain(capsys, POLICY, "udp 10.0.0.1:1 -> 10.0.0.2:2 ct=new",
                             "--ct-state", "established")
    assert code == 2 and out == "" and "ct=new in the description and --ct-state " \
        "established disagree" in err
    code, out, err = explain(capsys, POLICY, "--pcap", os.path.join(HERE, "dns_udp.pcap"),
                             "--ct-state", "new")
    assert code == 2 and out == "" and "--ct-state goes with a described packet" in err
    with pytest.raises(SystemExit) as exit:
        main(["explain", POLICY, "udp 10.0.0.1:1 -> 10.0.0.2:2", "--ct-state", "maybe"])
    assert exit.value.code == 2 and "invalid choice: 'maybe'" in capsys.readouterr().err


def test_without_conntrack_the_daemon_knows_no_state_and_neither_does_explain(capsys,
                                                                                tmp_path):
    policy = tmp_path / "p.yaml"
    policy.write_text("version: 1\ndefault: {action: drop}\nrules:\n"
                      "  - {name: dns, proto: udp, dport: 53, action: accept}\n")
    code, out, _ = explain(capsys, str(policy), "--pcap", os.path.join(HERE, "dns_udp.pcap"),
                           "--json")
    document = json_lines(out)
    assert [p["packet"]["ct_state"] for p in document["packets"]] == [None, None]
    assert document["summary"]["conntrack"] is None
    code, out, _ = explain(capsys, str(policy), "--pcap", os.path.join(HERE, "dns_udp.pcap"))
    assert "ct=" not in out and "conntrack:" not in out


# ---- the command line -------------------------------------------------------

def test_a_description_with_pcap_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["explain", POLICY, "udp 10.0.0.1:1 -> 10.0.0.2:2", "--pcap",
              os.path.join(HERE, "dns_udp.pcap")])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "argument --pcap: not allowed with argument packet" in err


def test_help_shows_the_description_grammar(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["explain", "--help"])
    out = capsys.readouterr().out
    assert exit.value.code == 0
    assert "PROTO SRC[:PORT] -> DST[:PORT] [FLAGS|ICMP-TYPE] [key=value ...]" in out
    assert 'ipqd explain policy.yaml "tcp 10.0.0.5:40000 -> 10.0.0.1:22 syn"' in out
    assert "keys       len, mark, uid, gid, ct, in, out, hook, frag" in out
    assert "3  a file cannot be read" in out                 # the exit statuses


def test_json_lines_end_with_a_summary(capsys, tmp_path):
    document = explain_json(capsys, "--pcap", os.path.join(HERE, "ipqd-mixed.pcap"))
    summary = document["summary"]
    assert summary["policy"] == POLICY and summary["capture"].endswith("ipqd-mixed.pcap")
    assert (summary["packets"], summary["skipped"], summary["error"]) == (12, 1, None)
    # bytes: the wire lengths, 40 and 1040 (a copy cut at 60)
    assert summary["counters"]["rules"]["ssh"] == {"hits": 2, "accepted": 2, "dropped": 0,
                                                   "bytes": 1080}
    data = open(os.path.join(HERE, "ipqd-mixed.pcap"), "rb").read()
    damaged = tmp_path / "damaged.pcap"
    damaged.write_bytes(data[:300])
    code, out, err = explain(capsys, POLICY, "--pcap", str(damaged), "--json")
    document = json_lines(out)
    assert code == 1 and "capture damaged" in document["summary"]["error"]
    assert document["summary"]["packets"] == len(document["packets"]) > 0
    assert err.startswith("ipqd explain: ") and "capture damaged, stopped" in err
