"""The real fail2ban server with contrib/fail2ban/ipqd.conf: failed logins
written to a log ban their source through `ipqd set add`, ipqd drops its
packets, and they pass again after the unban."""
import json
import os
import shutil
import socket
import subprocess
import time

import pytest

from daemon_harness import IPQD, RunningIpqd
from netns import in_ci

pytestmark = pytest.mark.kernel

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ACTION = os.path.join(ROOT, "contrib", "fail2ban", "ipqd.conf")

POLICY = """\
version: 1
queue: {num: 5, bypass: false, fail_open: false}
hooks:
  - {chain: input, family: both}
default: {action: drop, log: false}
sets:
  fail2ban: {type: address, dynamic: true, max: 100000}
rules:
  - {name: neighbours, proto: icmpv6, action: accept, log: false}
  - {name: fail2ban, src: "@fail2ban", action: drop, log: false}
  - {name: udp, proto: udp, dport: 5000, action: accept, log: false}
"""

FILTER = """\
[Definition]
failregex = ^login: authentication failure for \\S+ from <HOST>$
datepattern = {NONE}
"""

FAIL2BAN_CONF = """\
[Definition]
loglevel = INFO
logtarget = %(log)s
syslogsocket = auto
socket = %(socket)s
pidfile = %(pid)s
dbfile = :memory:
dbpurgeage = 1d
dbmaxmatches = 10
[Thread]
"""

JAIL = """\
[DEFAULT]
backend = polling
[ipqd-test]
enabled = true
filter = ipqd-test
logpath = %(authlog)s
maxretry = 3
findtime = 600
bantime = 600
action = ipqd[ipqd_set=fail2ban, ipqd="%(ipqd)s", ipqd_control="%(control)s"]
"""


def fail2ban_server() -> str:
    found = shutil.which("fail2ban-server")
    if found is None:
        if in_ci():
            pytest.fail("fail2ban is not installed (Debian package fail2ban, in the Makefile's DEBS)")
        pytest.skip("fail2ban is not installed (apt-get install fail2ban)")
    return found


@pytest.fixture
def fail2ban(lab, tmp_path):
    """fail2ban-server in the server's namespace, configured in tmp_path."""
    server = fail2ban_server()
    conf = tmp_path / "fail2ban"
    for sub in ("action.d", "filter.d", "jail.d", "fail2ban.d"):
        (conf / sub).mkdir(parents=True)
    shutil.copy(ACTION, conf / "action.d" / "ipqd.conf")
    (conf / "filter.d" / "ipqd-test.conf").write_text(FILTER)
    paths = {"log": str(tmp_path / "fail2ban.log"), "socket": str(tmp_path / "f2b.sock"),
             "pid": str(tmp_path / "f2b.pid"), "authlog": str(tmp_path / "auth.log"),
             "ipqd": IPQD, "control": str(tmp_path / "state" / "control")}
    (conf / "fail2ban.conf").write_text(FAIL2BAN_CONF % paths)
    (conf / "jail.conf").write_text(JAIL % paths)
    (tmp_path / "auth.log").write_text("")
    process = subprocess.Popen(["ip", "netns", "exec", lab.server.name, server, "-f", "-x",
                                "-c", str(conf), "-s", paths["socket"], "-p", paths["pid"]],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.STDOUT, start_new_session=True)
    client = shutil.which("fail2ban-client")

    def ask(*args):
        return subprocess.run([client, "-c", str(conf), "-s", paths["socket"], *args],
                              capture_output=True, text=True, timeout=30)
    deadline = time.monotonic() + 30
    while ask("status", "ipqd-test").returncode != 0:
        assert process.poll() is None, (tmp_path / "fail2ban.log").read_text()
        assert time.monotonic() < deadline, "fail2ban did not start its jail in 30 s:\n" + \
            (tmp_path / "fail2ban.log").read_text()
        time.sleep(0.2)
    ask.log = tmp_path / "fail2ban.log"
    ask.authlog = tmp_path / "auth.log"
    yield ask
    ask("stop")
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


def udp_passes(lab, timeout=0.5) -> bool:
    rx = lab.server.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = lab.client.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.bind(("0.0.0.0", 5000))
        rx.settimeout(timeout)
        tx.sendto(b"hello", (lab.SERVER4, 5000))
        try:
            return rx.recv(100) == b"hello"
        except socket.timeout:
            return False
    finally:
        rx.close()
        tx.close()


def listed(control: str) -> list:
    result = subprocess.run([IPQD, "set", "list", "fail2ban", "--json", "--control", control],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["entries"]


def wait_until(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_fail2ban_bans_and_unbans_through_ipqd(lab, tmp_path, fail2ban):
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    os.chmod(policy, 0o644)
    control = str(tmp_path / "state" / "control")
    daemon = RunningIpqd(lab.server, str(policy), str(tmp_path / "state"), "--control", control)
    try:
        deadline = time.monotonic() + 5
        while not udp_passes(lab):
            assert time.monotonic() < deadline, "the client never got through"
        with open(fail2ban.authlog, "a") as log:
            for user in ("root", "admin", "oracle"):
                log.write(f"login: authentication failure for {user} from {lab.CLIENT4}\n")
        wait_until(lambda: [e["entry"] for e in listed(control)] == [lab.CLIENT4], 20,
                   "fail2ban did not ban:\n" + fail2ban.log.read_text())
        (entry,) = listed(control)
        assert 590 < entry["remaining"] <= 600          # the jail's bantime
        assert not udp_passes(lab)
        assert not udp_passes(lab)
        assert lab.CLIENT4 in fail2ban("status", "ipqd-test").stdout
        daemon.wait_for(lambda l: l.startswith(f"set fail2ban: {lab.CLIENT4} added") and
                        "by uid 0" in l)

        assert fail2ban("set", "ipqd-test", "unbanip", lab.CLIENT4).returncode == 0
        wait_until(lambda: listed(control) == [], 20,
                   "fail2ban did not unban:\n" + fail2ban.log.read_text())
        assert udp_passes(lab)
        daemon.wait_for(lambda l: l.startswith(f"set fail2ban: {lab.CLIENT4} deleted"))
    finally:
        daemon.stop()
