"""The Debian package (debian/, `make deb`): it builds with Debian's own tools
from Debian's own packages, lintian finds no error in it, and installed in a
systemd sandbox its unit starts, runs and stops the daemon.

The package is built once for the module, from a copy of the tree (`make
deb` never writes packaging leftovers into the checkout), into a temporary
directory. The sandbox has no network: the package's dependencies are
fetched into the host's apt cache first, and apt inside installs from there.
"""
import os
import shutil
import subprocess
import time

import pytest

from sandbox import SystemdSandbox, require, require_sandbox

pytestmark = pytest.mark.kernel
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
POLICY = "/etc/ipqd/policy.yaml"
APT_ENV = {"DEBIAN_FRONTEND": "noninteractive"}


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


@pytest.fixture(scope="module")
def deb(tmp_path_factory):
    """The path of the .deb that `make deb` built (lintian included)."""
    missing = [tool for tool in ("dpkg", "apt-get", "make") if shutil.which(tool) is None]
    if os.geteuid() != 0:
        missing.append("root (make deb installs the build dependencies with apt-get)")
    require(missing, "Debian package test")
    work = tmp_path_factory.mktemp("deb")
    dist = work / "dist"
    started = time.monotonic()
    result = subprocess.run(["make", "-s", "-C", ROOT, "deb", f"DEB_BUILD={work / 'build'}",
                             f"DIST={dist}"], capture_output=True, text=True, timeout=1200)
    # make deb fails on a lintian error too.
    assert result.returncode == 0, f"make deb failed:\n{_tail(result.stdout + result.stderr)}"
    debs = sorted(dist.glob("ipqd_*_all.deb"))
    assert len(debs) == 1, f"expected one ipqd_*_all.deb in {dist}: {os.listdir(dist)}"
    print(f"make deb: {time.monotonic() - started:.1f}s")
    return str(debs[0])


def dpkg_deb(*args: str) -> str:
    return subprocess.run(["dpkg-deb", *args], check=True, capture_output=True,
                          text=True).stdout


def test_version_is_the_projects():
    changelog = subprocess.run(["dpkg-parsechangelog", "-l", os.path.join(ROOT, "debian",
                                                                          "changelog"),
                                "-S", "Version"], capture_output=True, text=True)
    if changelog.returncode != 0:
        pytest.skip("dpkg-parsechangelog (dpkg-dev) is not installed")
    import tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        assert changelog.stdout.strip() == tomllib.load(f)["project"]["version"]


def test_contents_and_dependencies(deb):
    depends = dpkg_deb("-f", deb, "Depends")
    # Debian's own packages, not wheels from PyPI.
    for package in ("python3-yaml", "python3-dpkt", "python3-systemd"):
        assert package in depends, depends
    files = {line.split()[-1].lstrip(".") for line in dpkg_deb("-c", deb).splitlines()}
    for path in ("/usr/sbin/ipqd", "/lib/systemd/system/ipqd.service", POLICY,
                 "/usr/share/man/man8/ipqd.8.gz", "/usr/share/man/man5/ipqd-policy.5.gz",
                 "/usr/lib/python3/dist-packages/ipqd/cli.py"):
        assert path in files, path
    assert "/usr/bin/ipqd" not in files
    control = subprocess.run(["dpkg-deb", "--ctrl-tarfile", deb], check=True,
                             capture_output=True).stdout
    conffiles = subprocess.run(["tar", "-xO", "./conffiles"], input=control, check=True,
                               capture_output=True).stdout.decode()
    assert conffiles.split() == [POLICY]


def test_installed_under_systemd(deb):
    require_sandbox()
    started = time.monotonic()
    _fetch_dependencies(deb)
    times = {"fetch": time.monotonic() - started}
    with SystemdSandbox(binds=[os.path.dirname(deb)]) as sb:
        # A container image's policy-rc.d (exit 101) forbids maintainer
        # scripts to start or stop services; a real host has none.
        sb.run(["rm", "-f", "/usr/sbin/policy-rc.d"])
        sb.run(["apt-get", "install", "-y", "-q", deb], timeout=300, env=APT_ENV)
        times["install"] = time.monotonic() - started - times["fetch"]

        # Isolated Python (-I), so root's ipqd imports nothing from the
        # current directory; the unit points at it.
        assert "-I -m ipqd.cli" in sb.read_file("/usr/sbin/ipqd")
        unit = sb.read_file("/lib/systemd/system/ipqd.service")
        assert "@BINDIR@" not in unit and "ExecStart=/usr/sbin/ipqd run" in unit
        sb.run(["systemd-analyze", "verify", "/lib/systemd/system/ipqd.service"])
        assert "ipqd-policy" in sb.sh("man -P cat 5 ipqd-policy | head -5").stdout

        # Installed disabled, so not started: the administrator checks the
        # policy first, then starts it.
        assert sb.systemctl("is-enabled", "ipqd", check=False).stdout.strip() == "disabled"
        assert sb.systemctl("is-active", "ipqd", check=False).stdout.strip() == "inactive"
        assert sb.sh(f"stat -c '%a %U' {POLICY}").stdout.split() == ["644", "root"]
        sb.run(["ipqd", "check", POLICY])
        sb.systemctl("start", "ipqd")            # returns after READY=1
        assert sb.systemctl("is-active", "ipqd").stdout.strip() == "active"
        sb.wait_journal(unit="ipqd", fields={"IPQD_EVENT": "start"})
        pid = sb.systemctl("show", "-P", "MainPID", "ipqd").stdout.strip()
        # The daemon is the dynamic user, not root, and the hooks (root's
        # ExecStartPre) are in place.
        uids = [line.split()[1:] for line in sb.read_file(f"/proc/{pid}/status").splitlines()
                if line.startswith("Uid:")][0]
        assert "0" not in uids, uids
        assert "IPQD_INPUT" in _hooks(sb)
        sb.systemctl("reload", "ipqd")
        sb.wait_journal(unit="ipqd", fields={"IPQD_EVENT": "reloaded"})
        sb.systemctl("stop", "ipqd")
        assert sb.systemctl("is-active", "ipqd", check=False).stdout.strip() == "inactive"
        assert sb.systemctl("show", "-P", "Result", "ipqd").stdout.strip() == "success"
        assert "IPQD" not in _hooks(sb)

        # Removing the package stops a running daemon, whose rules go with it;
        # purging removes the policy.
        sb.systemctl("start", "ipqd")
        sb.run(["apt-get", "remove", "-y", "-q", "ipqd"], timeout=120, env=APT_ENV)
        assert sb.systemctl("is-active", "ipqd", check=False).stdout.strip() != "active"
        assert "IPQD" not in _hooks(sb)
        assert sb.run(["test", "-e", "/usr/sbin/ipqd"], check=False).returncode != 0
        assert sb.read_file(POLICY)                 # a conffile stays until purge
        sb.run(["apt-get", "purge", "-y", "-q", "ipqd"], timeout=120, env=APT_ENV)
        assert sb.run(["test", "-e", POLICY], check=False).returncode != 0
    times["total"] = time.monotonic() - started
    print("package in the sandbox: " + ", ".join(f"{k} {v:.1f}s" for k, v in times.items()))


def _hooks(sb) -> str:
    return sb.sh("iptables-nft-save; ip6tables-nft-save; iptables-legacy-save; "
                 "ip6tables-legacy-save", check=False).stdout


def _fetch_dependencies(deb: str) -> None:
    """Put the package's missing dependencies in the host's apt cache (the
    host itself is not changed), for apt in the sandbox, which has no
    network. Refreshes the package lists once when they are stale."""
    args = ["apt-get", "install", "-y", "-q", "--download-only", deb]
    env = {**os.environ, **APT_ENV}
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    if result.returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=600)
        result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, f"cannot fetch the package's dependencies:\n{result.stderr}"
