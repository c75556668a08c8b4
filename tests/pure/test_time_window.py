"""`time:` windows: the loader's words, the moment in the window's zone,
the matcher against the reference minute by minute across the edges, and
decisions that never outlive an edge (not cached, not offloaded)."""
from __future__ import annotations

import datetime
import ipaddress
import zoneinfo

import pytest

from ipqd.decision.compiler import compile_policy, offload_states
from ipqd.decision.packet import PacketView
from ipqd.errors import PolicyErrors
from ipqd.policy.windows import within
from ipqd.policy.loader import loads
from ipqd.policy.model import Default, Match, Policy, Rule, TimeWindow
from policy_strategies import assert_agrees

PARIS = zoneinfo.ZoneInfo("Europe/Paris")
OFFICE = TimeWindow(frozenset(range(5)), 9 * 60, 17 * 60, "Europe/Paris")
NIGHT = TimeWindow(frozenset({4}), 22 * 60, 6 * 60, "UTC")          # Friday nights


def at(text: str, zone=PARIS) -> float:
    return datetime.datetime.fromisoformat(text).replace(tzinfo=zone).timestamp()


def test_office_hours_start_included_end_excluded_in_the_windows_zone():
    assert not within(OFFICE, at("2026-12-07 08:59"))           # a Monday
    assert within(OFFICE, at("2026-12-07 09:00"))
    assert within(OFFICE, at("2026-12-07 16:59:59"))
    assert not within(OFFICE, at("2026-12-07 17:00"))
    assert not within(OFFICE, at("2026-12-06 10:00"))           # a Sunday
    # 09:30 in Paris is 08:30 UTC in winter, 07:30 in summer
    assert within(OFFICE, at("2026-12-07 08:30", datetime.timezone.utc))
    assert within(OFFICE, at("2026-07-06 07:30", datetime.timezone.utc))


def test_across_midnight_the_day_is_the_moments_own():
    utc = datetime.timezone.utc
    assert within(NIGHT, at("2026-12-11 23:00", utc))           # Friday 23:00
    assert within(NIGHT, at("2026-12-11 05:00", utc))           # Friday 05:00
    assert not within(NIGHT, at("2026-12-12 05:00", utc))       # Saturday 05:00
    assert not within(NIGHT, at("2026-12-11 06:00", utc))


def view() -> PacketView:
    return PacketView.build(family=4, proto=6, src=int(ipaddress.ip_address("10.0.0.1")),
                            dst=1, sport=40000, dport=22, length=40, fragment="none",
                            tcp_flags=2, hook=1)


def test_the_matcher_agrees_with_the_reference_minute_by_minute_across_edges():
    rules = (Rule("night", Match(proto=frozenset({6})), "drop", time=NIGHT),
             Rule("office", Match(dport=None), "accept", time=OFFICE),
             Rule("kathmandu", Match(), "reject",
                  time=TimeWindow(frozenset(range(7)), 12 * 60 + 30, 13 * 60, "Asia/Kathmandu")))
    policy = Policy("t.yaml", rules=rules, default=Default("drop"))
    # Two days of 30-second steps over a Thursday-Friday-Saturday, and the
    # night the clocks go back in Paris (2026-10-25 03:00 -> 02:00).
    for start in (at("2026-12-10 20:00"), at("2026-10-24 20:00")):
        assert_agrees(policy, [view()] * (2 * 24 * 120), step=30.0, start=start)


def test_the_matcher_reads_the_window_once_a_minute_and_follows_the_clock_back():
    policy = Policy("t.yaml", rules=(Rule("office", Match(), "accept", time=OFFICE),),
                    default=Default("drop"))
    matcher = compile_policy(policy)
    assert matcher.decide(view(), at("2026-12-07 16:59:30")).action == "accept"
    assert matcher.rated                                 # a timed decision is not cached
    assert matcher.decide(view(), at("2026-12-07 17:00:00")).action == "drop"
    assert matcher.decide(view(), at("2026-12-07 16:59:59")).action == "accept"   # set back
    matcher.clock_offset = at("2026-12-07 08:00") - 100.0     # a monotonic clock at 100 s
    assert matcher.decide(view(), 100.0 + 3600).action == "accept"          # 09:00


def test_a_timed_rule_is_never_offloaded_and_blocks_offload_below_it():
    rules = (Rule("office", Match(proto=frozenset({6})), "accept", log=False, time=OFFICE),
             Rule("rest", Match(proto=frozenset({6})), "drop", log=False))
    per_rule, default = offload_states(rules, Default("drop", log=False))
    assert per_rule == (frozenset(), frozenset())


def test_the_loader_reads_a_window():
    policy = loads('version: 1\nhooks: [{chain: input}]\ndefault: {action: drop}\nrules:\n'
                   '  - {proto: tcp, dport: 22, action: accept,\n'
                   '     time: {days: [Mon, tuesday, fri], hours: "22:00-06:30", tz: UTC}}\n')
    window = policy.rules[0].time
    assert (window.days, window.start, window.end, window.tz) == \
        (frozenset({0, 1, 4}), 22 * 60, 6 * 60 + 30, "UTC")
    assert window.text == "mon,tue,fri 22:00-06:30 UTC"


@pytest.mark.parametrize("time, message", [
    ("{days: [mon, thur]}", "unknown day 'thur' (did you mean 'thu'?)"),
    ('{hours: "9-17"}', "hours '9-17' is not HH:MM-HH:MM"),
    ('{hours: "09:00-25:00"}', "hours are 00-23"),
    ('{hours: "09:00-09:00"}', "is empty"),
    ("{tz: Europe/Pariss}", "unknown time zone 'Europe/Pariss'"),
    ("{}", "time names nothing"),
    ("{day: mon}", "unknown field 'day'"),
    ("mon", "time must be a mapping"),
])
def test_what_the_loader_refuses(time, message):
    with pytest.raises(PolicyErrors) as caught:
        loads("version: 1\nhooks: [{chain: input}]\ndefault: {action: drop}\nrules:\n"
              f"  - {{proto: tcp, action: accept, time: {time}}}\n")
    assert message in str(caught.value)


def test_explain_decides_as_at_the_time_given(capsys, tmp_path):
    from ipqd.cli import main
    path = tmp_path / "p.yaml"
    path.write_text('version: 1\nhooks: [{chain: input}]\ndefault: {action: drop}\nrules:\n'
                    '  - {name: office, proto: tcp, dport: 22, action: accept,\n'
                    '     time: {days: [mon, tue, wed, thu, fri], hours: "09:00-17:00",'
                    ' tz: Europe/Paris}}\n')
    packet = "tcp 10.0.0.5:40000 -> 10.0.0.1:22 syn"
    verdicts = []
    for moment in ("2026-12-07 09:30 Europe/Paris", "2026-12-07 09:30+00:00",
                   "2026-12-07 08:30 Europe/Paris", "2026-12-06 09:30 Europe/Paris"):
        assert main(["explain", str(path), packet, "--at", moment, "--json"]) == 0
        verdicts.append(capsys.readouterr().out.split('"verdict": "')[1].split('"')[0])
    assert verdicts == ["accept", "accept", "drop", "drop"]
    assert main(["explain", str(path), packet, "--at", "monday"]) == 2
    assert "is not a date and time" in capsys.readouterr().err
    assert main(["explain", str(path), "--pcap", str(path), "--at", "2026-12-07 09:30"]) == 2
