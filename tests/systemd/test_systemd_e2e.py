"""What an administrator does, under a real systemd (PID 1 in its own namespaces):
make install, systemctl start, traffic, journalctl, reload, a broken reload,
kill -9, a wedged daemon and the watchdog, systemctl stop.

One sandbox is booted for the module and the tests run in file order, each a
step of the same story. Traffic comes from a network namespace joined to the
sandbox by veth: the probes need no listener, since an accepted UDP datagram
or TCP SYN to a closed port is answered (port unreachable, RST) and a dropped
one is not.
"""
import json
import os
import subprocess
import sys
import time

import pytest

from sandbox import SystemdSandbox, build_wheelhouse, require_sandbox

pytestmark = pytest.mark.kernel
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
POLICY = "/etc/ipqd/policy.yaml"
INSIDE, OUTSIDE = "10.79.0.1", "10.79.0.2"

POLICY_TEXT = """\
version: 1
queue: {num: 0, bypass: false, fail_open: false}
hooks:
  - {chain: input, family: both}
default: {action: drop, log: true}
logging: {rate: 1000/second}
rules:
  - name: neighbours
    proto: icmpv6
    action: accept
    log: false
  - name: allowed-udp
    proto: udp
    dport: %(udp)d
    action: accept
  - name: ping
    proto: icmp
    icmp_type: echo-request
    action: accept
  - name: no-telnet
    proto: tcp
    dport: 23
    action: drop
    log: true
"""

PROBE = r"""
import socket, sys
kind, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM)
s.settimeout(1.0)
try:
    if kind == "udp":
        s.connect((sys.argv[3], port)); s.send(b"probe"); s.recv(10)
    else:
        s.connect((sys.argv[3], port))
    print("answered")
except ConnectionRefusedError:
    print("answered")          # accepted: the closed port said so
except (socket.timeout, TimeoutError):
    print("silent")            # dropped
"""


class Admin:
    def __init__(self, sb, peer):
        self.sb = sb
        self.peer = peer

    def probe(self, kind, port):
        """True when the packet got through ipqd (the sandbox answered)."""
        out = subprocess.run(["ip", "netns", "exec", self.peer, sys.executable, "-c", PROBE,
                              kind, str(port), INSIDE], capture_output=True, text=True, timeout=20)
        assert out.stdout.strip() in ("answered", "silent"), out.stderr
        return out.stdout.strip() == "answered"

    def ping(self):
        return subprocess.run(["ip", "netns", "exec", self.peer, "ping", "-c", "1", "-W", "1", INSIDE],
                              capture_output=True).returncode == 0

    def write_policy(self, text):
        self.sb.write_file(POLICY, text, mode=0o644)

    def main_pid(self):
        return int(self.sb.systemctl("show", "-P", "MainPID", "ipqd").stdout.strip())

    def wait_active(self, old_pid=None, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.sb.systemctl("is-active", "ipqd", check=False).stdout.strip()
            if state == "active" and self.main_pid() not in (0, old_pid):
                return
            time.sleep(0.2)
        raise AssertionError(f"ipqd not active again: {state}\n"
                             + self.sb.run(["journalctl", "-u", "ipqd", "--no-pager", "-n", "40"],
                                           check=False).stdout)

    def hooks_in_kernel(self):
        return self.sb.sh("iptables-nft-save; ip6tables-nft-save; iptables-legacy-save; "
                          "ip6tables-legacy-save", check=False).stdout


@pytest.fixture(scope="module")
def admin(tmp_path_factory):
    require_sandbox()
    wheels = str(tmp_path_factory.mktemp("wheels"))
    build_wheelhouse(wheels)
    peer = f"ipqd-e2e-{os.getpid()}-0"
    with SystemdSandbox(binds=[wheels], cow_binds=[ROOT]) as sb:
        sb.run(["make", "-s", "-C", ROOT, "install",
                f"PIP_INSTALL_FLAGS=--no-index --find-links={wheels}"], timeout=300)
        subprocess.run(["ip", "netns", "add", peer], check=True)
        try:
            sb.add_veth(peer, inside_addr=f"{INSIDE}/24", outside_addr=f"{OUTSIDE}/24")
            yield Admin(sb, peer)
        finally:
            subprocess.run(["ip", "netns", "del", peer], check=False)


def test_start_and_decide(admin):
    admin.write_policy(POLICY_TEXT % {"udp": 5000})
    admin.sb.systemctl("start", "ipqd")            # returns after READY=1
    assert admin.sb.systemctl("is-active", "ipqd").stdout.strip() == "active"
    assert "IPQD_INPUT" in admin.hooks_in_kernel()
    assert admin.probe("udp", 5000)
    assert not admin.probe("udp", 5001)
    assert not admin.probe("tcp", 23)
    assert admin.ping()


def test_decisions_in_the_journal_with_fields(admin):
    # What an administrator types: journalctl -u ipqd IPQD_VERDICT=drop IPQD_DPORT=23
    drop = admin.sb.wait_journal(unit="ipqd", fields={"IPQD_VERDICT": "drop", "IPQD_DPORT": "23"})
    assert drop["MESSAGE"].startswith(f"DROP tcp {OUTSIDE}:")
    assert drop["MESSAGE"].endswith(f" -> {INSIDE}:23 in=veth-sb rule=no-telnet")
    expected = {"IPQD_RULE": "no-telnet", "IPQD_FAMILY": "ipv4", "IPQD_PROTO": "tcp",
                "IPQD_SRC": OUTSIDE, "IPQD_DST": INSIDE, "IPQD_IN": "veth-sb", "IPQD_HOOK": "input",
                "IPQD_QUEUE": "0", "IPQD_MARK": "0x0", "PRIORITY": "5",
                "_SYSTEMD_UNIT": "ipqd.service", "SYSLOG_IDENTIFIER": "ipqd"}
    assert {k: drop.get(k) for k in expected} == expected
    assert int(drop["IPQD_SPORT"]) > 0 and int(drop["IPQD_LENGTH"]) >= 40
    accept = admin.sb.wait_journal(unit="ipqd", fields={"IPQD_RULE": "allowed-udp"})
    assert accept["IPQD_VERDICT"] == "accept" and accept["PRIORITY"] == "6"
    default = admin.sb.wait_journal(unit="ipqd", fields={"IPQD_RULE": "default", "IPQD_DPORT": "5001"})
    assert default["IPQD_VERDICT"] == "drop"
    assert not admin.sb.journal(unit="ipqd", fields={"IPQD_RULE": "neighbours"})    # log: false


def test_status_shows_counts_and_policy(admin):
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        status = admin.sb.systemctl("show", "-P", "StatusText", "ipqd").stdout.strip()
        if status[:1].isdigit() and int(status.split()[0]) >= 4:
            break
        time.sleep(0.5)
    assert status.endswith(f"policy {POLICY} (4 rules)"), status
    packets = int(status.split()[0])
    assert packets >= 4
    assert "ipqd packet firewall" in admin.sb.systemctl("status", "--no-pager", "ipqd").stdout


def test_ipqd_status_over_the_control_socket(admin):
    """`ipqd status` asks the running daemon; any local user may look, only
    root and members of ipqd-control may reload."""
    shown = admin.sb.run(["ipqd", "status"])
    assert shown.stdout.startswith("ipqd is running: pid ")
    assert f"policy:   {POLICY} (4 rules)" in shown.stdout
    assert "queue 0: 0 queued, 0 queue-dropped, 0 user-dropped" in shown.stdout
    status = json.loads(admin.sb.run(["ipqd", "status", "--json"]).stdout)
    assert status["pid"] == admin.main_pid() and status["packets"]["judged"] >= 4
    assert [w["queues"] for w in status["workers"]] == [[0]]
    assert admin.sb.run(["stat", "-c", "%A %U", "/run/ipqd/control"]).stdout.split() == \
        ["srw-rw-rw-", "ipqd"]
    # The kernel's queue table is root's: the daemon cannot read it under the
    # unit, root's `ipqd metrics` reads it and hands it over.
    metrics = admin.sb.run(["ipqd", "metrics"]).stdout
    assert 'ipqd_kernel_user_dropped_total{queue="0"} 0.0' in metrics
    assert 'ipqd_rule_packets_total{rule="allowed-udp",verdict="accept"}' in metrics
    nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "ipqd"]
    as_nobody = admin.sb.run(nobody + ["status"]).stdout
    assert as_nobody.startswith("ipqd is running")
    assert "kernel:   the queue counters are root's" in as_nobody
    refused = admin.sb.run(nobody + ["reload"], check=False)
    assert refused.returncode == 4 and "only root and members of the control group" in \
        refused.stderr
    admin.sb.run(["useradd", "--no-create-home", "--groups", "ipqd-control", "alice"])
    member = ["setpriv", "--reuid=alice", "--regid=alice", "--init-groups", "ipqd"]
    reloaded = admin.sb.run(member + ["reload"])
    assert reloaded.stdout.startswith("reloaded: 4 rules live in")


def test_reload_changes_behaviour(admin):
    admin.write_policy(POLICY_TEXT % {"udp": 5001})
    admin.sb.systemctl("reload", "ipqd")
    admin.sb.wait_journal(unit="ipqd", fields={"IPQD_EVENT": "reloaded"})
    assert admin.probe("udp", 5001)
    assert not admin.probe("udp", 5000)


def test_broken_reload_keeps_the_old_policy_and_says_where(admin):
    cursor = admin.sb.cursor()
    admin.write_policy(POLICY_TEXT % {"udp": 5001} + "  - name: typo\n    proto: tcp\n"
                       "    dprot: 80\n    action: accept\n")
    result = admin.sb.systemctl("reload", "ipqd", check=False)
    assert result.returncode != 0                  # systemctl tells the administrator at once
    error = admin.sb.wait_journal(
        lambda e: "unknown field 'dprot'" in e.get("MESSAGE", ""), unit="ipqd", since_cursor=cursor)
    line = (POLICY_TEXT % {"udp": 5001}).count("\n") + 3          # the `dprot:` line
    assert error["MESSAGE"] == (f"{POLICY}:{line}:5: rule \"typo\": unknown field 'dprot' "
                                "(did you mean 'dport'?)")
    assert error["PRIORITY"] == "3"                # `journalctl -p err` shows it
    # `ipqd reload` (ExecReload) said why the reload failed, at err too: its
    # exit status is what failed the systemctl command.
    said = admin.sb.wait_journal(
        lambda e: e.get("MESSAGE", "").startswith("ipqd reload: the policy was not loaded"),
        unit="ipqd", since_cursor=cursor)
    assert said["PRIORITY"] == "3"
    status = json.loads(admin.sb.run(["ipqd", "status", "--json"]).stdout)
    assert status["reloads"]["last"]["outcome"] == "refused"
    assert status["reloads"]["last"]["errors"] == [error["MESSAGE"]]
    assert admin.sb.systemctl("is-active", "ipqd").stdout.strip() == "active"
    assert admin.probe("udp", 5001) and not admin.probe("udp", 5000)   # the old policy
    admin.write_policy(POLICY_TEXT % {"udp": 5001})


def test_a_policy_only_root_and_the_service_can_read(admin):
    """root:ipqd 0640: the service reads it through its group ipqd. root:root
    0600: the service cannot; the start fails, and says what to do at
    priority err, and `ipqd check` warns about it beforehand."""
    admin.sb.run(["chgrp", "ipqd", POLICY])
    admin.sb.run(["chmod", "0640", POLICY])
    admin.sb.systemctl("restart", "ipqd")
    assert admin.probe("udp", 5001) and not admin.probe("udp", 5000)
    admin.sb.systemctl("stop", "ipqd")
    admin.sb.run(["chgrp", "root", POLICY])
    admin.sb.run(["chmod", "0600", POLICY])
    check = admin.sb.run(["ipqd", "check", POLICY], check=False)
    assert check.returncode == 0 and "not readable by the ipqd service" in check.stdout
    cursor = admin.sb.cursor()
    assert admin.sb.systemctl("start", "ipqd", check=False).returncode != 0
    error = admin.sb.wait_journal(lambda e: "cannot read policy" in e.get("MESSAGE", ""),
                                  unit="ipqd", since_cursor=cursor)
    assert error["PRIORITY"] == "3" and "chgrp ipqd" in error["MESSAGE"]
    admin.sb.systemctl("reset-failed", "ipqd", check=False)
    admin.sb.run(["chmod", "0644", POLICY])
    admin.sb.systemctl("start", "ipqd")


def test_the_policy_path_is_set_once_for_every_command(admin):
    other = "/etc/ipqd/other.yaml"
    admin.sb.write_file(other, POLICY_TEXT % {"udp": 5002}, mode=0o644)
    admin.sb.write_file("/etc/systemd/system/ipqd.service.d/policy.conf",
                        f"[Service]\nEnvironment=IPQD_POLICY={other}\n")
    admin.sb.systemctl("daemon-reload")
    admin.sb.systemctl("restart", "ipqd")
    assert admin.probe("udp", 5002) and not admin.probe("udp", 5001)
    admin.sb.write_file(other, POLICY_TEXT % {"udp": 5003}, mode=0o644)
    cursor = admin.sb.cursor()
    admin.sb.systemctl("reload", "ipqd")
    admin.sb.wait_journal(unit="ipqd", fields={"IPQD_EVENT": "reloaded"}, since_cursor=cursor)
    assert admin.probe("udp", 5003)
    admin.sb.run(["rm", "/etc/systemd/system/ipqd.service.d/policy.conf"])
    admin.sb.systemctl("daemon-reload")
    admin.sb.systemctl("restart", "ipqd")
    assert admin.probe("udp", 5001) and not admin.probe("udp", 5003)


def test_dynamic_set_entries_survive_reload_and_restart(admin):
    """`ipqd set add` bans the peer at once; the entry is journaled with the
    uid that asked, survives `systemctl reload` and `systemctl restart`
    (the unit's StateDirectory), and `ipqd set del` lets the peer in again."""
    banning = (POLICY_TEXT % {"udp": 5001}).replace("rules:\n", (
        "sets:\n  banned: {type: address, dynamic: true, timeout: 1h}\nrules:\n"
        "  - {name: banned, src: \"@banned\", action: drop, log: false}\n"))
    admin.write_policy(banning)
    admin.sb.systemctl("reload", "ipqd")
    assert admin.probe("udp", 5001)
    cursor = admin.sb.cursor()
    added = admin.sb.run(["ipqd", "set", "add", "banned", OUTSIDE, "2001:db8::/32"])
    assert added.stdout.startswith("set banned: 2 added")
    assert not admin.probe("udp", 5001)
    event = admin.sb.wait_journal(unit="ipqd", fields={"IPQD_EVENT": "set-add"},
                                  since_cursor=cursor)
    assert (event["IPQD_SET"], event["IPQD_UID"], event["IPQD_ENTRIES"]) == \
        ("banned", "0", f"{OUTSIDE} 2001:db8::/32")
    nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "ipqd", "set"]
    refused = admin.sb.run(nobody + ["del", "banned", OUTSIDE], check=False)
    assert refused.returncode == 4 and "only root and members" in refused.stderr
    assert OUTSIDE in admin.sb.run(nobody + ["list", "banned"]).stdout

    admin.sb.systemctl("reload", "ipqd")
    assert not admin.probe("udp", 5001)
    old = admin.main_pid()
    admin.sb.systemctl("restart", "ipqd")
    assert admin.main_pid() != old
    assert not admin.probe("udp", 5001)
    listed = json.loads(admin.sb.run(["ipqd", "set", "list", "banned", "--json"]).stdout)
    assert sorted(e["entry"] for e in listed["entries"]) == ["10.79.0.2", "2001:db8::/32"]
    assert all(3000 < e["remaining"] <= 3600 for e in listed["entries"])
    assert admin.sb.run(["stat", "-L", "-c", "%a %U", "/var/lib/ipqd/sets.json"]).stdout.split() \
        == ["600", "ipqd"]

    admin.sb.run(["ipqd", "set", "del", "banned", OUTSIDE])
    assert admin.probe("udp", 5001)
    admin.write_policy(POLICY_TEXT % {"udp": 5001})
    admin.sb.systemctl("reload", "ipqd")


def test_metrics_textfile_for_node_exporter(admin):
    """docs/control.md's recipe: the daemon keeps node_exporter's textfile,
    in a folder the unit is allowed to write."""
    from prometheus_client.parser import text_string_to_metric_families
    folder = "/var/lib/prometheus/node-exporter"
    admin.sb.run(["mkdir", "-p", folder])
    admin.sb.run(["chgrp", "ipqd", folder])
    admin.sb.run(["chmod", "0775", folder])
    ipqd = admin.sb.run(["sh", "-c", "command -v ipqd"]).stdout.strip()
    admin.sb.write_file("/etc/systemd/system/ipqd.service.d/metrics.conf",
                        "[Service]\nExecStart=\n"
                        f"ExecStart={ipqd} run --policy ${{IPQD_POLICY}} --no-hooks "
                        f"--control-group ipqd-control --metrics-textfile {folder}/ipqd.prom "
                        "--metrics-every 0.5\n"
                        f"ReadWritePaths={folder}\n")
    admin.sb.systemctl("daemon-reload")
    admin.sb.systemctl("restart", "ipqd")
    try:
        assert admin.probe("udp", 5001)
        deadline = time.monotonic() + 15
        accepted = 0
        while time.monotonic() < deadline and not accepted:
            text = admin.sb.run(["cat", f"{folder}/ipqd.prom"], check=False).stdout
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name == "ipqd_rule_packets_total" and sample.labels == {
                            "rule": "allowed-udp", "verdict": "accept"}:
                        accepted = sample.value
            time.sleep(0.3)
        assert accepted >= 1
        assert admin.sb.run(["ls", "-A", folder]).stdout.split() == ["ipqd.prom"]
    finally:
        admin.sb.run(["rm", "/etc/systemd/system/ipqd.service.d/metrics.conf"])
        admin.sb.systemctl("daemon-reload")
        admin.sb.systemctl("restart", "ipqd")


def test_kill_9_restarts_and_enforces_again(admin):
    old = admin.main_pid()
    admin.sb.systemctl("kill", "--kill-who=main", "-s", "SIGKILL", "ipqd")
    admin.wait_active(old_pid=old)
    assert admin.probe("udp", 5001) and not admin.probe("udp", 5000)


def test_wedged_daemon_is_restarted_by_the_watchdog(admin):
    admin.sb.write_file("/etc/systemd/system/ipqd.service.d/watchdog.conf",
                        "[Service]\nWatchdogSec=2s\n")
    admin.sb.systemctl("daemon-reload")
    admin.sb.systemctl("restart", "ipqd")
    old = admin.main_pid()
    cursor = admin.sb.cursor()
    admin.sb.run(["kill", "-STOP", str(old)])
    admin.wait_active(old_pid=old, timeout=30)
    watchdog = admin.sb.wait_journal(
        lambda e: "watchdog" in e.get("MESSAGE", "").lower(), unit="ipqd", since_cursor=cursor)
    assert "timeout" in watchdog["MESSAGE"].lower()
    assert admin.probe("udp", 5001) and not admin.probe("udp", 5000)


def test_stop_removes_every_hook(admin):
    admin.sb.systemctl("stop", "ipqd")
    assert "IPQD" not in admin.hooks_in_kernel()
    admin.sb.wait_journal(unit="ipqd", fields={"IPQD_EVENT": "stop"})
    assert admin.probe("udp", 5000)        # nothing queued any more: the port answers
