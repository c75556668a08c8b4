"""Dynamic sets and sets from files: the policy syntax, the store, offload
refused for what they decide, and the supervisor's keeper on disk."""
from __future__ import annotations

import ipaddress
import json
import textwrap

import pytest

from ipqd.daemon.messages import SetChange
from ipqd.daemon.sets import SetKeeper
from ipqd.decision.address_set import (AddressSet, format_entry, load_snapshot, parse_entry,
                                       snapshot)
from ipqd.decision.compiler import compile_policy
from ipqd.errors import PolicyErrors, SetError
from ipqd.policy.loader import load, loads
from ipqd.policy._values import format_duration, parse_duration

POLICY = """\
version: 1
hooks: [{chain: input}]
default: {action: accept, log: false}
sets:
  banned: {type: address, dynamic: true, timeout: 1h, max: 3}
  forever: {dynamic: true}
rules:
  - {name: banned, src: "@banned", action: drop}
  - {name: forever, dst: ["192.0.2.1", "@forever"], action: drop}
  - {name: ssh, proto: tcp, dport: 22, action: accept}
"""


# ---- the policy ---------------------------------------------------------------

def test_a_dynamic_set_is_declared_with_its_timeout_and_room():
    policy = loads(POLICY)
    assert [(s.name, s.timeout, s.max) for s in policy.sets] == \
        [("banned", 3600.0, 3), ("forever", None, 65536)]
    src = policy.rules[0].match.src
    assert src.dynamic == ("banned",) and src.networks == () and src.families == {4, 6}
    dst = policy.rules[1].match.dst
    assert dst.dynamic == ("forever",) and dst.networks == (ipaddress.ip_network("192.0.2.1/32"),)
    assert policy.dynamic_sets() == {"banned", "forever"}


def test_a_file_set_is_read_at_load_with_comments(tmp_path):
    (tmp_path / "block.txt").write_text("# bad hosts\n192.0.2.7\n\n  2001:db8::/32  # a net\n")
    (tmp_path / "policy.yaml").write_text(POLICY.replace(
        "  forever: {dynamic: true}\n", "  forever: {dynamic: true}\n  block: {file: block.txt}\n")
        + '  - {name: block, src: "@block", action: drop}\n')
    policy = load(str(tmp_path / "policy.yaml"))
    assert policy.rules[3].match.src.networks == (ipaddress.ip_network("192.0.2.7/32"),
                                                  ipaddress.ip_network("2001:db8::/32"))
    assert str(tmp_path / "block.txt") in policy.sources


def test_a_bad_line_of_a_set_file_is_an_error_at_its_line(tmp_path):
    (tmp_path / "block.txt").write_text("192.0.2.7\n  192.0.2.300\n")
    (tmp_path / "p.yaml").write_text(textwrap.dedent("""\
        version: 1
        hooks: [{chain: input}]
        default: {action: accept}
        sets: {block: {file: block.txt}}
        rules: [{name: b, src: "@block", action: drop}]
        """))
    with pytest.raises(PolicyErrors) as raised:
        load(str(tmp_path / "p.yaml"))
    (error,) = raised.value.errors
    assert (error.path, error.line, error.column) == (str(tmp_path / "block.txt"), 2, 3)


@pytest.mark.parametrize("written, seconds", [("90", 90), ("30s", 30), ("10m", 600),
                                              ("1h30m", 5400), ("7d", 604800), ("2w", 1209600),
                                              ("1.5h", 5400), ("500ms", 0.5)])
def test_durations(written, seconds):
    assert parse_duration(written) == seconds


@pytest.mark.parametrize("written", ["", "1 hour", "h", "-5m", "0", "400d", "5m x"])
def test_bad_durations(written):
    with pytest.raises(Exception):
        parse_duration(written)


def test_remaining_time_reads_as_a_duration():
    assert [format_duration(s) for s in (0.25, 59, 61, 3723, 90000)] == \
        ["0.25s", "59s", "1m1s", "1h2m3s", "1d1h"]


# ---- the store ----------------------------------------------------------------

def test_entries_of_both_families_and_every_prefix_length():
    store = AddressSet("s", 100)
    for text in ("192.0.2.7", "10.0.0.0/8", "2001:db8::/32", "::1", "0.0.0.0/0"):
        assert store.add(parse_entry(text))
    assert not store.add(parse_entry("10.9.9.9/8"))         # the same network: renewed
    assert len(store) == 5

    def has(address):
        ip = ipaddress.ip_address(address)
        return store.contains(ip.version, int(ip))
    assert has("10.200.0.1") and has("2001:db8:1::5") and has("::1") and has("8.8.8.8")
    assert not has("2001:db9::1")
    store.discard(parse_entry("0.0.0.0/0"))
    assert not has("8.8.8.8") and has("192.0.2.7")
    assert [format_entry(e) for e, _ in store.entries()] == \
        ["192.0.2.7", "10.0.0.0/8", "::1", "2001:db8::/32"]


@pytest.mark.parametrize("text", ["1.2.3", "1.2.3.4/33", "01.2.3.4", "1.2.3.4/", "fe80::1%eth0",
                                  "2001:db8::/129", "example.org", "1.2.3.-4", ""])
def test_entries_that_are_no_address(text):
    with pytest.raises(SetError):
        parse_entry(text)


def test_a_full_set_refuses_new_entries_but_renews_old_ones():
    store = AddressSet("s", 2)
    store.add(parse_entry("192.0.2.1"))
    store.add(parse_entry("2001:db8::1"))
    with pytest.raises(SetError, match="full"):
        store.add(parse_entry("192.0.2.0/24"))
    store.add(parse_entry("192.0.2.1"), 5.0)
    assert len(store) == 2 and store.contains(4, int(ipaddress.ip_address("192.0.2.1")))
    assert not store.contains(4, int(ipaddress.ip_address("192.0.2.2")))


def test_entries_expire_in_order_and_a_renewal_moves_the_time():
    store = AddressSet("s")
    a, b, c = (parse_entry(t) for t in ("192.0.2.1", "192.0.2.2", "192.0.2.3"))
    store.add(a, 10.0)
    store.add(b, 20.0)
    store.add(c)
    store.add(a, 30.0)                      # renewed: not due at 10
    assert store.next_expiry() == 20.0
    assert store.expire(25.0) == [b]
    assert store.expire(31.0) == [a]
    assert store.next_expiry() is None and [e for e, _ in store.entries()] == [c]


def test_a_snapshot_carries_every_entry_to_another_store():
    store = AddressSet("s")
    for text in ("192.0.2.1", "10.0.0.0/8", "2001:db8::/32"):
        store.add(parse_entry(text), 99.0)
    copy = AddressSet("s")
    load_snapshot(copy, snapshot(store))
    assert sorted(e for e, _ in copy.entries()) == sorted(e for e, _ in store.entries())
    assert len(copy) == 3


# ---- offload ------------------------------------------------------------------

def test_no_decision_a_dynamic_set_could_change_is_offloaded():
    matcher = compile_policy(loads(POLICY))
    # banned reads a set; forever too; ssh is below banned, which could
    # match any of its flows later; and so is the default.
    assert [c.decision.offload for c in matcher._compiled] == [frozenset()] * 3
    assert matcher._default.offload == frozenset()
    apart = loads(POLICY.replace('src: "@banned"', 'src: "@banned", proto: udp')
                  .replace('dst: ["192.0.2.1", "@forever"]', 'dst: "@forever", proto: udp'))
    assert compile_policy(apart)._compiled[2].decision.offload     # udp rules cannot shadow tcp


# ---- the supervisor's keeper --------------------------------------------------

class Log:
    def __init__(self):
        self.events = []

    def event(self, message, priority=6, **fields):
        self.events.append((message, fields))


def keeper(path, sent=None, now=None):
    k = SetKeeper(str(path), Log(), (sent if sent is not None else []).append)
    k.adopt(loads(POLICY))
    k.restore(now)
    return k


def test_a_change_is_sent_journaled_and_kept_across_a_restart(tmp_path):
    sent = []
    k = keeper(tmp_path / "sets.json", sent)
    assert k.add("banned", ["192.0.2.7", "2001:db8::/32"], None, 1000, now=100.0)["added"] == 2
    assert k.delete("banned", ["2001:db8::/32", "192.0.2.8"], 0) == \
        {"set": "banned", "deleted": 1, "missing": 1, "size": 1}
    assert [(m.name, m.op) for m in sent] == [("banned", "add"), ("banned", "del")]
    assert sent[0] == SetChange("banned", "add", (parse_entry("192.0.2.7"),
                                                  parse_entry("2001:db8::/32")))
    message, fields = k.log.events[0]
    assert fields["IPQD_EVENT"] == "set-add" and fields["IPQD_UID"] == "1000"
    assert fields["IPQD_ENTRIES"] == "192.0.2.7 2001:db8::/32" and fields["IPQD_SET"] == "banned"
    assert "192.0.2.7, 2001:db8::/32 added" in message and "uid 1000" in message
    # No clean stop: the change log alone brings the entries back.
    again = keeper(tmp_path / "sets.json", now=150.0)
    assert [(e["entry"], e["remaining"]) for e in again.listing("banned", now=160.0)["entries"]] \
        == [("192.0.2.7", 3540.0)]
    again.close()
    assert json.loads((tmp_path / "sets.json").read_text())["sets"]["banned"] == \
        [[4, 32, [int(ipaddress.ip_address("192.0.2.7"))], [3700.0]]]
    assert (tmp_path / "sets.json.log").read_text() == ""


def test_entries_expire_across_a_restart_and_are_journaled(tmp_path):
    k = keeper(tmp_path / "sets.json")
    k.add("banned", ["192.0.2.7"], 1.0, 0, now=1000.0)
    k.add("forever", ["192.0.2.8"], None, 0, now=1000.0)
    k.close()
    k = SetKeeper(str(tmp_path / "sets.json"), Log())
    k.adopt(loads(POLICY))
    k.restore(now=1002.0)
    assert k.listing("banned")["entries"] == []
    assert [e["entry"] for e in k.listing("forever")["entries"]] == ["192.0.2.8"]
    assert any(f["IPQD_EVENT"] == "set-expire" and f["IPQD_ENTRIES"] == "192.0.2.7"
               for _, f in k.log.events)


def test_a_torn_last_line_of_the_change_log_is_left_out(tmp_path):
    k = keeper(tmp_path / "sets.json")
    k.add("forever", ["192.0.2.1"], None, 0)
    with open(tmp_path / "sets.json.log", "a") as f:
        f.write('{"op":"add","set":"forever","entr')
    again = keeper(tmp_path / "sets.json")
    assert [e["entry"] for e in again.listing("forever")["entries"]] == ["192.0.2.1"]


def test_a_request_is_applied_whole_or_not_at_all(tmp_path):
    sent = []
    k = keeper(tmp_path / "sets.json", sent)
    with pytest.raises(SetError, match="entry 2: 'nope'.*nothing was changed"):
        k.add("banned", ["192.0.2.1", "nope"], None, 0)
    with pytest.raises(SetError, match="room for 3 more entries.*not 4"):
        k.add("banned", ["192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4"], None, 0)
    with pytest.raises(SetError, match="no dynamic set 'banend'.*banned, forever"):
        k.add("banend", ["192.0.2.1"], None, 0)
    assert k.listing("banned")["size"] == 0 and sent == []


def test_a_reload_keeps_the_sets_it_still_declares(tmp_path):
    k = keeper(tmp_path / "sets.json")
    k.add("banned", ["192.0.2.1"], None, 0)
    k.add("forever", ["192.0.2.2"], None, 0)
    k.adopt(loads(POLICY.replace("  forever: {dynamic: true}\n", "").replace(
        '["192.0.2.1", "@forever"]', '"192.0.2.1"')))
    assert set(k.snapshots()) == {"banned"}
    with pytest.raises(SetError):
        k.listing("forever")
    k.close()
    saved = json.loads((tmp_path / "sets.json").read_text())["sets"]
    assert set(saved) == {"banned"}


def test_the_sets_file_goes_where_asked_and_its_folder_is_made(tmp_path):
    k = keeper(tmp_path / "new" / "sets.json")
    k.add("forever", ["192.0.2.1"], None, 0)
    assert (tmp_path / "new" / "sets.json.log").stat().st_mode & 0o777 == 0o600
    k.close()
    assert (tmp_path / "new" / "sets.json").stat().st_mode & 0o777 == 0o600


def test_entries_past_a_lowered_max_are_left_out_and_said(tmp_path):
    k = keeper(tmp_path / "sets.json")
    k.add("forever", ["192.0.2.1", "192.0.2.2", "192.0.2.3"], None, 0)
    k.close()
    k = SetKeeper(str(tmp_path / "sets.json"), Log())
    k.adopt(loads(POLICY.replace("forever: {dynamic: true}", "forever: {dynamic: true, max: 2}")))
    k.restore()
    assert k.listing("forever")["size"] == 2
    assert any("1 entries not restored: past its max of 2" in m for m, _ in k.log.events)


def test_a_damaged_snapshot_is_said_and_the_change_log_still_read(tmp_path):
    (tmp_path / "sets.json").write_text('{"format": 1, "sets": {"forever": [[5, 1, [1], []]]}}')
    (tmp_path / "sets.json.log").write_text(
        '{"op":"add","set":"forever","entries":[[4,32,3221225985]],"expires":null}\n')
    k = keeper(tmp_path / "sets.json")
    assert [e["entry"] for e in k.listing("forever")["entries"]] == ["192.0.2.1"]
    assert any("cannot read" in m and "damaged" in m for m, _ in k.log.events)


def test_a_set_file_others_could_change_is_refused_by_run_and_check(tmp_path):
    from ipqd.errors import PolicyRefused
    from ipqd.policy.check import examine
    from ipqd.policy.checked import load_checked
    (tmp_path / "block.txt").write_text("192.0.2.7\n")
    (tmp_path / "p.yaml").write_text(textwrap.dedent("""\
        version: 1
        hooks: [{chain: input}]
        default: {action: accept, log: false}
        sets: {block: {file: block.txt}}
        rules: [{name: b, src: "@block", action: drop}]
        """))
    for name in ("p.yaml", "block.txt"):
        (tmp_path / name).chmod(0o644)
    tmp_path.chmod(0o755)
    assert load_checked(str(tmp_path / "p.yaml")).rules[0].match.src.networks
    (tmp_path / "block.txt").chmod(0o666)
    with pytest.raises(PolicyRefused, match="block.txt is writable by group or others"):
        load_checked(str(tmp_path / "p.yaml"))
    problems, _ = examine(str(tmp_path / "p.yaml"))
    assert [p.message for p in problems] == [
        f"`ipqd run` refuses it: {tmp_path / 'block.txt'} is writable by group or others "
        f"(mode 666): chmod go-w {tmp_path / 'block.txt'}"]


# ---- the control commands -----------------------------------------------------

def ask(daemon, command, args, may_change=True):
    from ipqd.control.codec import Request
    from ipqd.control.commands import Peer, dispatch
    from ipqd.daemon.control import COMMANDS
    line, code = dispatch(COMMANDS, daemon, Request(command, args),
                          Peer(pid=1, uid=1000, gid=1000, may_change=may_change))
    return json.loads(line), code


def test_the_set_commands_through_the_daemons_table(tmp_path):
    class Daemon:
        sets = keeper(tmp_path / "sets.json")
    answer, code = ask(Daemon, "set-add", {"set": "banned", "entries": ["192.0.2.7"],
                                           "timeout": "10m"})
    assert code is None and answer["result"]["added"] == 1 and answer["result"]["timeout"] == 600
    assert Daemon.sets.log.events[-1][1]["IPQD_UID"] == "1000"
    answer, code = ask(Daemon, "set-list", {"set": "banned"}, may_change=False)
    assert code is None and answer["result"]["entries"][0]["entry"] == "192.0.2.7"
    assert ask(Daemon, "set-list", {}, may_change=False)[0]["result"]["sets"][0] == \
        {"set": "banned", "size": 1, "max": 3, "timeout": 3600.0}
    for command in ("set-add", "set-del", "set-flush"):
        assert ask(Daemon, command, {"set": "banned", "entries": ["192.0.2.7"]},
                   may_change=False)[1] == "not-permitted"
    assert ask(Daemon, "set-add", {"set": "banned", "entries": "192.0.2.8"})[1] == \
        "bad-arguments"
    assert ask(Daemon, "set-add", {"set": "banned", "entries": []})[1] == "bad-arguments"
    assert ask(Daemon, "set-add", {"set": "banned", "entries": ["192.0.2.8"],
                                   "timeout": "soon"})[1] == "bad-arguments"
    answer, code = ask(Daemon, "set-add", {"set": "banned", "entries": ["192.0.2.8", 7]})
    assert code == "refused" and "entry 2 is not text" in answer["error"]["message"]
    assert ask(Daemon, "set-flush", {"set": "banned"})[0]["result"]["flushed"] == 1


def test_the_supervisor_keeps_sets_without_importing_yaml():
    """The supervisor imports neither the loader nor YAML (docs/architecture.md):
    the set commands read durations and entries without them."""
    import subprocess
    import sys
    code = ("import sys, ipqd.daemon.supervisor, ipqd.control.set_verbs; "
            "print(sorted(m for m in ('yaml', 'dpkt', 'ipqd.policy.loader') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"
