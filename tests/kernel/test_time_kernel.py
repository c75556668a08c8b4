"""Time windows through the real queue, against the kernel's own xt_time
on the same packets: a window open now, one on another day, one closed."""
from __future__ import annotations

import datetime
import os

import pytest

from daemon_harness import RunningIpqd, udp_probe
from netns import iptables

pytestmark = pytest.mark.kernel

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
XT_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


def _hhmm(minute: int) -> str:
    minute %= 24 * 60
    return f"{minute // 60:02d}:{minute % 60:02d}"


def _windows():
    """(port, days, start minute, end minute): open now; now but another day;
    today but later. 20 minutes either side of now: the test takes seconds."""
    now = datetime.datetime.now(datetime.timezone.utc)
    minute, today = now.hour * 60 + now.minute, now.weekday()
    return [(5601, [today], minute - 20, minute + 20),
            (5602, [(today + 1) % 7], minute - 20, minute + 20),
            (5603, [today], minute + 30, minute + 90)]


def test_time_windows_decide_as_xt_time_does(lab, tmp_path):
    windows = _windows()
    rules = "".join(
        f'  - {{name: w{port}, proto: udp, dport: {port}, action: accept, log: false, '
        f'time: {{days: [{", ".join(DAYS[d] for d in days)}], '
        f'hours: "{_hhmm(start)}-{_hhmm(end)}", tz: UTC}}}}\n'
        for port, days, start, end in windows)
    path = tmp_path / "policy.yaml"
    path.write_text("version: 1\nqueue: {num: 0, bypass: false, fail_open: false}\n"
                    "hooks:\n  - {chain: input, family: ipv4, proto: udp}\n"
                    "default: {action: drop, log: false}\nrules:\n" + rules)
    os.chmod(path, 0o644)
    ipqd = RunningIpqd(lab.server, str(path), str(tmp_path / "state"),
                       "--backend", "iptables-legacy")
    try:
        got = {port: udp_probe(lab, port) for port, _, _, _ in windows}
    finally:
        assert ipqd.stop() == 0
    for port, days, start, end in windows:
        # xt_time: UTC by default, the stop second included
        iptables(lab.server, f"-A INPUT -p udp --dport {port} -m time --timestart "
                             f"{_hhmm(start)} --timestop {_hhmm(end - 1)}:59 --weekdays "
                             f"{','.join(XT_DAYS[d] for d in days)} -j ACCEPT")
    iptables(lab.server, "-A INPUT -p udp --dport 5601:5603 -j DROP")
    oracle = {port: udp_probe(lab, port) for port, _, _, _ in windows}
    assert got == oracle == {5601: True, 5602: False, 5603: False}
