"""systemd/ipqd.service: it verifies, its hardening score does not regress,
and `make install` gives a unit that runs the real daemon under that hardening."""
import os
import re
import shutil
import subprocess
import time

import pytest

from sandbox import SystemdSandbox, build_wheelhouse, require, require_sandbox

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
UNIT = os.path.join(ROOT, "systemd", "ipqd.service")
POLICY = "/etc/ipqd/policy.yaml"
# Measured 1.1 (systemd 252); the build fails above this, in tenths.
SECURITY_THRESHOLD = 12


def parse_unit(path: str):
    """[(section, key, value)] in file order (keys repeat, so not a dict)."""
    entries, section = [], None
    with open(path) as unit:
        for line in unit:
            line = line.strip()
            if not line or line[0] in "#;":
                continue
            if line.startswith("["):
                section = line.strip("[]")
                continue
            key, _, value = line.partition("=")
            entries.append((section, key.strip(), value.strip()))
    return entries


def service(key: str):
    return [v for s, k, v in parse_unit(UNIT) if s == "Service" and k == key]


@pytest.fixture
def unit_file(tmp_path):
    """The unit with @BINDIR@ pointing at an executable stand-in, as verify wants."""
    if shutil.which("systemd-analyze") is None:
        require(["systemd-analyze (Debian package systemd)"], "unit check")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "ipqd").write_text("#!/bin/sh\n")
    (bindir / "ipqd").chmod(0o755)
    with open(UNIT) as unit:
        text = unit.read()
    path = tmp_path / "ipqd.service"
    path.write_text(text.replace("@BINDIR@", str(bindir)))
    return path


def test_only_the_bindir_placeholder():
    with open(UNIT) as unit:
        assert set(re.findall(r"@[A-Z_]+@", unit.read())) == {"@BINDIR@"}


def test_commands_are_the_contract():
    assert service("Type") == ["notify"]
    # The policy is named once, for every command (`systemctl edit` changes it).
    assert service("Environment") == [f"IPQD_POLICY={POLICY}"]
    assert service("ExecStart") == ["@BINDIR@/ipqd run --policy ${IPQD_POLICY} --no-hooks "
                                    "--control-group ipqd-control"]
    # The rules need more privilege than the daemon: "+" runs them outside the sandbox.
    assert service("ExecStartPre") == ["+@BINDIR@/ipqd hooks install --policy ${IPQD_POLICY}"]
    assert service("ExecStopPost") == ["+@BINDIR@/ipqd hooks remove --policy ${IPQD_POLICY}"]
    # The reload reports: it waits for the daemon's outcome (exit 1 and every
    # error when refused), then brings the rules up to date.
    assert service("ExecReload") == ["+@BINDIR@/ipqd reload",
                                     "+@BINDIR@/ipqd hooks install --policy ${IPQD_POLICY}"]
    # The control socket's directory, and the group that may change the daemon.
    assert service("RuntimeDirectory") == ["ipqd"]
    sysusers = open(os.path.join(ROOT, "systemd", "ipqd.sysusers")).read()
    assert any(line.split()[:2] == ["g", "ipqd-control"] for line in sysusers.splitlines())
    assert service("WatchdogSec") == ["10s"]


def test_the_service_user_reads_the_policy_through_its_group():
    assert service("User") == ["ipqd"] and service("DynamicUser") == ["yes"]
    # With DynamicUser=, a preserved RuntimeDirectory= would go behind
    # /run/private (0700), out of the control socket's clients' reach.
    assert service("RuntimeDirectoryPreserve") in ([], ["no"])
    sysusers = open(os.path.join(ROOT, "systemd", "ipqd.sysusers")).read()
    assert any(line.split()[:2] == ["u", "ipqd"] for line in sysusers.splitlines())


def test_only_cap_net_admin():
    assert service("CapabilityBoundingSet") == ["CAP_NET_ADMIN"]
    assert service("AmbientCapabilities") == ["CAP_NET_ADMIN"]
    # Either would cut the daemon off from the host's network namespace.
    assert service("PrivateUsers") in ([], ["no"])
    assert service("PrivateNetwork") in ([], ["no"])


def test_verify(unit_file):
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit_file)],
                            capture_output=True, text=True)
    # An unknown or misspelt key is only a warning (exit 0): the output must be empty.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_security_score(unit_file):
    result = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager",
                             f"--threshold={SECURITY_THRESHOLD}", str(unit_file)],
                            capture_output=True, text=True)
    match = re.search(r"Overall exposure level for ipqd\.service: (\d+\.\d) (\w+)", result.stdout)
    assert match, result.stdout + result.stderr
    score, verdict = float(match.group(1)), match.group(2)
    assert score <= SECURITY_THRESHOLD / 10 and verdict == "OK", result.stdout
    assert result.returncode == 0, result.stdout


# --- make install, in a sandbox ---------------------------------------------

NO_PING_POLICY = """\
version: 1
queue: {num: 0}
hooks:
  - {chain: input, family: ipv4, proto: icmp}
default: {action: accept, log: false}
rules:
  - name: no-ping
    proto: icmp
    icmp_type: echo-request
    action: drop
    log: true
"""


@pytest.mark.kernel
def test_make_install_runs_the_daemon_hardened(tmp_path):
    require_sandbox()
    started = time.monotonic()
    wheels = str(tmp_path / "wheels")
    build_wheelhouse(wheels)
    times = {"wheels": time.monotonic() - started}
    netns = f"ipqd-unit-{os.getpid()}-0"
    make = ["make", "-s", "-C", ROOT, f"PIP_INSTALL_FLAGS=--no-index --find-links={wheels}"]
    # Copy-on-write: the build writes into the checkout, and that stays inside.
    with SystemdSandbox(binds=[wheels], cow_binds=[ROOT]) as sb:
        sb.run(make + ["install"], timeout=300)
        times["install"] = time.monotonic() - started - times["wheels"]
        sb.run(["systemd-analyze", "verify", "/etc/systemd/system/ipqd.service"])
        assert "usage: ipqd" in sb.run(["/usr/local/bin/ipqd", "--help"]).stdout
        for section, page in (("8", "ipqd"), ("5", "ipqd-policy")):     # man finds them
            found = sb.sh(f'readlink -f "$(man -w {section} {page})"').stdout.strip()
            assert found == f"/usr/local/share/man/man{section}/{page}.{section}"
        assert sb.sh(f"stat -c '%a %U' {POLICY}").stdout.split() == ["644", "root"]
        # The installed interpreter is outside /root, so ProtectHome=yes holds.
        python = sb.run(["readlink", "-f", "/usr/local/lib/ipqd/bin/python3"]).stdout
        assert not python.startswith(("/root", "/home"))

        # An administrator's policy survives a reinstall.
        sb.write_file(POLICY, NO_PING_POLICY)
        assert "keeping the existing" in sb.run(make + ["install"], timeout=300).stdout
        assert sb.read_file(POLICY) == NO_PING_POLICY

        # The real daemon, with the unit's sandboxing, answers real traffic
        # from a namespace joined to the sandbox by veth.
        sb.systemctl("start", "ipqd")
        sb.wait_journal(unit="ipqd", fields={"IPQD_EVENT": "start"})
        subprocess.run(["ip", "netns", "add", netns], check=True)
        try:
            sb.add_veth(netns, inside_addr="10.79.0.1/24", outside_addr="10.79.0.2/24")
            ping = subprocess.run(["ip", "netns", "exec", netns, "ping", "-c1", "-W1",
                                   "10.79.0.1"], capture_output=True, text=True)
            assert ping.returncode != 0, "the policy drops pings"
        finally:
            subprocess.run(["ip", "netns", "del", netns], check=False)
        drop = sb.wait_journal(unit="ipqd", fields={"IPQD_VERDICT": "drop"})
        assert (drop["IPQD_RULE"], drop["IPQD_SRC"]) == ("no-ping", "10.79.0.2")
        assert drop["_SYSTEMD_UNIT"] == "ipqd.service"

        sb.systemctl("reload", "ipqd")
        sb.wait_journal(unit="ipqd", fields={"IPQD_EVENT": "reloaded"})
        sb.systemctl("stop", "ipqd")
        sb.wait_journal(unit="ipqd", fields={"IPQD_EVENT": "stop"})
        assert sb.systemctl("show", "-P", "Result", "ipqd").stdout.strip() == "success"

        sb.run(make + ["uninstall"])
        left = sb.sh("ls -d /usr/local/bin/ipqd /usr/local/lib/ipqd "
                     "/etc/systemd/system/ipqd.service /usr/local/share/man/man8/ipqd.8 "
                     "/usr/local/share/man/man5/ipqd-policy.5 2>/dev/null", check=False).stdout
        assert left == ""
        assert sb.read_file(POLICY) == NO_PING_POLICY
    times["total"] = time.monotonic() - started
    print("make install timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in times.items()))
