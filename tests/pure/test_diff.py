"""`ipqd diff` and the regions under it: exact lines for small changes, the
exit statuses, what is not exact named, a capture's changed packets counted.
(tests/slow/test_diff_property.py shows it complete on random policies.)"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from ipqd.cli import main
from ipqd.decision.described import build_packet
from ipqd.decision.packet import parse
from ipqd.policy import regions
from ipqd.policy.checked import policy_digest
from ipqd.policy.loader import loads

CAPTURE = Path(__file__).parent.parent / "captures" / "ipqd-mixed.pcap"
HEAD = "version: 1\ndefault: {action: drop}\nrules:\n"
WEB = """\
  - name: ssh
    proto: tcp
    dport: 22
    action: accept
  - name: web
    proto: tcp
    dport: [80, 443, 23]
    action: accept
  - name: no-telnet
    proto: tcp
    dport: 23
    action: drop
"""


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def run(capsys, *argv):
    code = main(["diff", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_narrowed_rule_shows_the_region_it_gave_up(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "old.yaml", HEAD + WEB)
    write(tmp_path, "new.yaml", HEAD + WEB.replace("[80, 443, 23]", "[80, 443]"))
    code, out, err = run(capsys, "old.yaml", "new.yaml")
    assert (code, err) == (1, "")
    assert out == (
        "tcp 192.0.2.1:40000 -> 198.51.100.1:23 syn: accept (web at old.yaml:8) -> "
        "drop (no-telnet at new.yaml:12)\n"
        "    where dport 23 (packets of tcp over ipv4, tcp over ipv6)\n"
        "old.yaml -> new.yaml: 2 regions decided differently, shown as 1\n")


def test_the_same_policy_changes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "old.yaml", HEAD + WEB)
    write(tmp_path, "new.yaml", HEAD + WEB.replace("ssh", "secure-shell"))
    code, out, _ = run(capsys, "old.yaml", "new.yaml")
    assert (code, out) == (0, "old.yaml -> new.yaml: no packet is decided differently\n")


def test_a_reorder_that_opens_a_port(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    block = "  - {name: block-lan, src: 10.0.0.0/8, action: drop}\n"
    open_ = "  - {name: ssh, proto: tcp, dport: 22, action: accept}\n"
    write(tmp_path, "old.yaml", HEAD + block + open_)
    write(tmp_path, "new.yaml", HEAD + open_ + block)
    code, out, _ = run(capsys, "old.yaml", "new.yaml")
    assert code == 1
    lines = out.splitlines()
    assert lines[0] == ("tcp 10.0.0.1:40000 -> 198.51.100.1:22 syn: drop (block-lan at old.yaml:4) "
                        "-> accept (ssh at new.yaml:4)")
    assert lines[1] == "    where src 10.0.0.0/8, dport 22"
    assert lines[-1] == "old.yaml -> new.yaml: 1 region decided differently"


def test_rates_globs_and_settings_are_named(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "old.yaml", HEAD + "  - {name: ssh, proto: tcp, dport: 22, action: accept, "
                                       "rate: 10/second}\n")
    write(tmp_path, "new.yaml", "version: 1\nhooks: [{chain: input}]\ndefault: {action: drop}\n"
                                "rules:\n  - {name: lan, in: 'eth*', action: accept}\n")
    code, out, _ = run(capsys, "old.yaml", "new.yaml")
    assert code == 1
    assert "accept (ssh at old.yaml:4, within 10/second) else drop (default, logged)" in out
    notes = [line for line in out.splitlines() if line.startswith("not exact: ")]
    assert notes[0].startswith('not exact: old.yaml: rule "ssh" matches only within its rate')
    assert notes[1].startswith("not exact: in (glob patterns eth* are compared on sample names")
    assert notes[2].startswith("not exact: hooks: the packets queued to ipqd change")


def test_exit_statuses(tmp_path, capsys):
    good = write(tmp_path, "good.yaml", HEAD + WEB)
    bad = write(tmp_path, "bad.yaml", HEAD + "  - {action: maybe}\n")
    assert run(capsys, good, bad)[0] == 2
    assert run(capsys, good, str(tmp_path / "missing.yaml"))[0] == 3
    assert run(capsys, good, good, "--pcap", str(tmp_path / "missing.pcap"))[0] == 3


def test_a_capture_counts_packets_and_connections(tmp_path, capsys):
    old = write(tmp_path, "old.yaml", HEAD + WEB)
    new = write(tmp_path, "new.yaml", HEAD + WEB.replace("[80, 443, 23]", "[80, 443]"))
    code, out, _ = run(capsys, old, new, "--pcap", str(CAPTURE), "--json")
    report = json.loads(out)
    assert code == 1 and report["changed"]
    assert report["pcap"] == {"packets": 11, "packets_changed": 1, "flows": 9,
                              "flows_changed": 1}
    assert report["regions"][0]["old"] == [{"rule": "web", "position": f"{old}:8:5",
                                            "action": "accept", "rate": None}]


def test_every_witness_is_decided_as_its_region_says():
    old = loads(HEAD + WEB, "old.yaml")
    new = loads(HEAD + WEB.replace("dport: 23", "dport: [23, 25]")
                .replace("[80, 443, 23]", "80"), "new.yaml")
    space, changes = regions.diff(old, new)
    assert changes
    for change in changes:
        payload, meta = build_packet(space.witness(change.cube))
        atoms = space.atoms_of(parse(payload, meta._replace(hook=1)))
        assert space.holds(change.cube, atoms)


def test_too_large_is_said():
    policy = loads(HEAD + "".join(f"  - {{name: r{i}, proto: tcp, dport: {i}, sport: {i}, action: "
                                  f"{'accept' if i % 2 else 'drop'}}}\n" for i in range(1, 40)),
                   "p.yaml")
    other = loads(HEAD + "  - {name: all, action: accept}\n", "q.yaml")
    with pytest.raises(regions.TooLarge):
        regions.diff(policy, other, limit=100)


def test_sctp_and_null_scans_are_described():
    payload, _ = build_packet("sctp 10.0.0.1:1 -> 10.0.0.2:2 len=100")
    assert len(payload) == 100
    payload, meta = build_packet("tcp 10.0.0.1:1 -> 10.0.0.2:2 none")
    assert parse(payload, meta).tcp_flags == 0


SHADOWED = HEAD + """\
  - {name: low-ports, proto: tcp, dport: 0-1023, action: accept}
  - {name: high-ports, proto: tcp, dport: 1024-65535, action: drop}
  - {name: web2, proto: tcp, dport: [80, 8080], action: accept}
  - {name: bad, malformed: true, action: accept}
"""


def test_reach_prints_a_packet_the_rule_decides(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "p.yaml", SHADOWED)
    assert main(["explain", "p.yaml", "--reach", "high-ports"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        'rule "high-ports" (p.yaml:5:5) is reached by: tcp 192.0.2.1:40000 -> '
        '198.51.100.1:1024 syn',
        "    1  DROP    high-ports            tcp 192.0.2.1:40000 -> 198.51.100.1:1024 [S] "
        "len=40",
        f"policy p.yaml sha256:{policy_digest('p.yaml')}"]


def test_reach_says_which_rules_take_every_packet(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "p.yaml", SHADOWED)
    assert main(["explain", "p.yaml", "--reach", "web2"]) == 0
    assert capsys.readouterr().out == ('no packet reaches rule "web2" (p.yaml:6:5): '
                                       '"low-ports", "high-ports" take every packet it would '
                                       'match\n')
    assert main(["explain", "p.yaml", "--reach", "bad"]) == 0
    assert capsys.readouterr().out == ('only malformed packets reach rule "bad" (p.yaml:7:5): '
                                       'any of them\n')
    assert main(["explain", "p.yaml", "--reach", "nope"]) == 1


def test_check_names_the_rules_that_shadow_together():
    policy = loads(SHADOWED, "p.yaml")
    assert [str(w) for w in policy.warnings if "never match" in str(w)] == [
        'p.yaml:6:5: warning: rule "web2" can never match: rules "low-ports" (line 4) and '
        '"high-ports" (line 5) together match every packet it would']


def test_dynamic_sets_are_named(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sets = "sets:\n  banned: {type: address, dynamic: true}\n"
    write(tmp_path, "old.yaml", "version: 1\ndefault: {action: accept}\n" + sets + "rules: []\n")
    write(tmp_path, "new.yaml", "version: 1\ndefault: {action: accept}\n" + sets +
          "rules:\n  - {name: bans, src: '@banned', action: drop}\n")
    code, out, _ = run(capsys, "old.yaml", "new.yaml")
    notes = [line for line in out.splitlines() if line.startswith("not exact: ")]
    assert notes == ['not exact: new.yaml: rule "bans" reads the dynamic set @banned, whose '
                     'entries change at run time (`ipqd set`): the regions take it as empty']
    assert code == 0


def test_log_rules_time_windows_and_cgroups_may_decide_first(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    head = "version: 1\nhooks: [{chain: output}]\ndefault: {action: accept, log: false}\nrules:\n"
    write(tmp_path, "old.yaml", head + "  - {name: web, proto: tcp, dport: 80, action: accept}\n")
    write(tmp_path, "new.yaml", head +
          "  - {name: watch, proto: tcp, dport: 80, action: log}\n"
          "  - {name: office, proto: tcp, dport: 80, action: drop, "
          "time: {days: [mon], hours: '09:00-17:00', tz: UTC}}\n"
          "  - {name: web, proto: tcp, dport: 80, action: accept}\n")
    code, out, _ = run(capsys, "old.yaml", "new.yaml")
    assert code == 1
    assert "accept (web at old.yaml:5) -> log (watch at new.yaml:5), then drop (office at " \
           "new.yaml:6, within its time window) else accept (web at new.yaml:7)" in out
    assert any(line.startswith('not exact: new.yaml: rule "office" matches only within its '
                               'time window') for line in out.splitlines())
