"""The test harness itself: a booted systemd runs a notify service and its
journal, a lone journald takes entries, and neither leaves anything on the host."""
import os
import subprocess
import sys
import tempfile
import time

import pytest

import sandbox
from sandbox import Journald, SandboxError, SystemdSandbox, require_journald, require_sandbox

pytestmark = pytest.mark.kernel
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STANDIN = os.path.join(ROOT, "tests", "standin_daemon.py")

STANDIN_UNIT = f"""\
[Unit]
Description=ipqd harness stand-in

[Service]
Type=notify
ExecStart={sys.executable} {STANDIN}
ExecReload=/bin/kill -HUP $MAINPID
"""


def host_traces(sb: SystemdSandbox) -> dict:
    """What a running sandbox has on the host, to check it is gone afterwards."""
    return {
        "pid": sb.pid,
        "pidns": os.readlink(f"/proc/{sb.pid}/ns/pid"),
        "cgroup": sb.cgroup,
        "workdir": sb.workdir,
    }


def assert_gone(traces: dict) -> None:
    assert not os.path.exists(f"/proc/{traces['pid']}")
    assert not os.path.exists(traces["cgroup"])
    assert not os.path.exists(traces["workdir"])
    with open("/proc/self/mountinfo") as mounts:
        assert traces["workdir"] not in mounts.read()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            assert os.readlink(f"/proc/{pid}/ns/pid") != traces["pidns"], f"pid {pid} survived"
        except OSError:    # exited meanwhile
            pass


def journal_mounts() -> list:
    """Host mounts where Journald mounts privately (others' tests mount
    elsewhere meanwhile, e.g. /run/netns)."""
    with open("/proc/self/mountinfo") as mounts:
        points = [line.split()[4] for line in mounts]
    return sorted(p for p in points if p.startswith(("/run/systemd", "/run/log", "/var/log")))


@pytest.fixture
def sb():
    require_sandbox()
    # Copy-on-write, so the stand-in and the venv's interpreter are there even
    # when the checkout is not on the root file system.
    with SystemdSandbox(cow_binds=[ROOT]) as box:
        yield box


def test_notify_service_reload_and_journal(sb):
    sb.write_file("/etc/systemd/system/standin.service", STANDIN_UNIT)
    sb.systemctl("daemon-reload")
    sb.systemctl("start", "standin")    # returns once READY=1 arrived
    assert sb.systemctl("is-active", "standin").stdout.strip() == "active"
    start = sb.wait_journal(unit="standin", fields={"STANDIN_EVENT": "start"})
    assert start["_SYSTEMD_UNIT"] == "standin.service"
    assert start["SYSLOG_IDENTIFIER"] == "ipqd-standin"

    # systemd 252 returns from reload before the daemon handled SIGHUP: wait
    # for the daemon's own entry.
    sb.systemctl("reload", "standin")
    sb.wait_journal(unit="standin", fields={"STANDIN_EVENT": "reload", "STANDIN_RELOADS": "1"})
    cursor = sb.cursor()
    sb.systemctl("reload", "standin")
    second = sb.wait_journal(unit="standin", since_cursor=cursor,
                             fields={"STANDIN_EVENT": "reload"})
    assert second["STANDIN_RELOADS"] == "2"
    deadline = time.monotonic() + 5
    while "2 reloads" not in sb.systemctl("show", "-P", "StatusText", "standin").stdout:
        assert time.monotonic() < deadline, "STATUS= after the reload never arrived"
        time.sleep(0.05)

    sb.systemctl("stop", "standin")
    sb.wait_journal(unit="standin", fields={"STANDIN_EVENT": "stop"})
    result = sb.systemctl("show", "-P", "Result", "standin").stdout.strip()
    assert result == "success"
    events = [e.get("STANDIN_EVENT") for e in sb.journal(unit="standin")
              if "STANDIN_EVENT" in e]
    assert events == ["start", "reload", "reload", "stop"]
    # -u also brings systemd's own lines about the unit.
    assert any(e.get("UNIT") == "standin.service" for e in sb.journal(unit="standin"))


def test_binds_and_overlay_keep_the_host_clean():
    require_sandbox()
    probe = f"/etc/ipqd-sandbox-probe-{os.getpid()}"
    with tempfile.TemporaryDirectory(prefix=f"ipqd-results-{os.getpid()}-") as results:
        with SystemdSandbox(binds=[results]) as box:
            box.write_file(probe, "inside only\n")
            box.write_file(f"{results}/out.txt", "kept\n", mode=0o600)
            assert box.read_file(probe) == "inside only\n"
            assert box.run(["hostname"]).stdout.strip() == "ipqd-sandbox"
            assert box.sh("ip -o link | wc -l").stdout.strip() == "1"   # lo only
            traces = host_traces(box)
        with open(f"{results}/out.txt") as out:
            assert out.read() == "kept\n"
        assert os.stat(f"{results}/out.txt").st_mode & 0o777 == 0o600
    assert not os.path.exists(probe)
    assert_gone(traces)


def test_teardown_when_the_test_fails():
    require_sandbox()
    with pytest.raises(ZeroDivisionError):
        with SystemdSandbox() as box:
            box.run(["systemd-run", "--unit=sleeper", "sleep", "1000"])
            traces = host_traces(box)
            1 / 0
    assert_gone(traces)


def test_boot_timeout_reports_the_journal_and_cleans_up():
    require_sandbox()
    box = SystemdSandbox(boot_timeout=0)
    with pytest.raises(SandboxError, match="last journal lines"):
        with box:
            pass
    assert box.pid is not None
    assert not os.path.exists(f"/proc/{box.pid}")
    assert box.cgroup is None and box.workdir is None


def test_veth_from_a_host_namespace(sb):
    netns = f"ipqd-sbpeer-{os.getpid()}-0"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    try:
        sb.add_veth(netns, inside="veth-sb", outside="veth-out",
                    inside_addr="10.78.0.1/24", outside_addr="10.78.0.2/24")
        ping = subprocess.run(["ip", "netns", "exec", netns, "ping", "-c1", "-W2", "10.78.0.1"],
                              capture_output=True, text=True)
        assert ping.returncode == 0, ping.stdout + ping.stderr
        assert "10.78.0.1/24" in sb.run(["ip", "-o", "addr", "show", "veth-sb"]).stdout
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=False)


def test_require_sandbox_fails_under_ci(monkeypatch):
    monkeypatch.setattr(sandbox, "missing_prerequisites", lambda **_: ["overlayfs"])
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="overlayfs"):
        require_sandbox()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="overlayfs"):
        require_sandbox()


SEND = """
import sys
from systemd import journal
journal.send(sys.argv[1], SYSLOG_IDENTIFIER="ipqd-jtest", IPQD_VERDICT=sys.argv[2])
"""


def test_journald_alone():
    require_journald()
    host_had_socket = os.path.exists("/run/systemd/journal/socket")
    host_mounts = journal_mounts()
    with Journald() as jd:
        jd.run([sys.executable, "-c", SEND, "first", "drop"])
        entry = jd.wait_journal(identifier="ipqd-jtest", fields={"IPQD_VERDICT": "drop"})
        assert entry["MESSAGE"] == "first"
        assert "_SYSTEMD_UNIT" not in entry

        # Stuck: the datagram waits in the socket and lands once journald runs.
        jd.freeze()
        jd.run([sys.executable, "-c", SEND, "while stopped", "accept"], timeout=10)
        time.sleep(0.2)
        assert jd.journal(identifier="ipqd-jtest", fields={"IPQD_VERDICT": "accept"}) == []
        jd.thaw()
        jd.wait_journal(identifier="ipqd-jtest", fields={"IPQD_VERDICT": "accept"})

        # Missing: sending fails; a new journald takes over the same files.
        jd.kill()
        missing = jd.run([sys.executable, "-c", SEND, "nobody", "drop"], check=False)
        assert missing.returncode != 0 and "Connection refused" in missing.stderr
        jd.start()
        jd.run([sys.executable, "-c", SEND, "again", "drop"])
        jd.wait_journal(lambda e: e["MESSAGE"] == "again", identifier="ipqd-jtest")
        pids = (jd.holder.pid, jd.journald.pid)
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}")
    assert os.path.exists("/run/systemd/journal/socket") == host_had_socket
    assert journal_mounts() == host_mounts
