"""A real systemd, or a lone journald, for tests on hosts whose PID 1 is not systemd.

`SystemdSandbox` boots systemd as PID 1 in fresh pid, mount, uts, ipc, net
and cgroup namespaces. Its root is an overlay: the host's / read-only below a
tmpfs, so `make install`, unit files and the journal written inside never
reach the host. Everything is torn down on exit, also when the test fails.

    with SystemdSandbox(binds=[results]) as sb:
        sb.write_file("/etc/systemd/system/x.service", UNIT)
        sb.systemctl("daemon-reload")
        sb.systemctl("start", "x")
        entry = sb.wait_journal(lambda e: e.get("X_EVENT") == "START", unit="x")

The sandbox's network namespace holds only `lo`. To send it traffic from
outside, make a namespace on the host and a veth pair across (the sandbox is
addressed by the host pid of its PID 1, `sb.pid`):

    ip netns add ipqd-peer-<pid>
    ip link add veth-o netns ipqd-peer-<pid> type veth peer name veth-i netns <sb.pid>

`SystemdSandbox.add_veth` does exactly that and addresses both ends. An
end-to-end test of ipqd (tests/systemd/test_unit.py has the full one):

    wheels = str(tmp_path / "wheels")
    build_wheelhouse(wheels)                     # the sandbox has no network
    with SystemdSandbox(binds=[wheels], cow_binds=[CHECKOUT]) as sb:
        sb.run(["make", "-C", CHECKOUT, "install",
                f"PIP_INSTALL_FLAGS=--no-index --find-links={wheels}"], timeout=300)
        sb.write_file("/etc/ipqd/policy.yaml", POLICY)
        sb.systemctl("start", "ipqd")            # returns after READY=1
        subprocess.run(["ip", "netns", "add", peer], check=True)   # peer: unique name
        try:
            sb.add_veth(peer, inside_addr="10.79.0.1/24", outside_addr="10.79.0.2/24")
            subprocess.run(["ip", "netns", "exec", peer, "ping", "-c1", "10.79.0.1"])
        finally:
            subprocess.run(["ip", "netns", "del", peer])
        drop = sb.wait_journal(unit="ipqd", fields={"IPQD_VERDICT": "drop"})

`Journald` runs systemd-journald alone in a private mount namespace, for
tests that need the journal but not the service manager.

Both need root, util-linux, overlayfs and Debian's systemd package:
`require_sandbox()` skips a test without them, and fails it under CI.
"""
from __future__ import annotations

import itertools
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKOUT = os.path.dirname(HERE)
INIT_SCRIPT = os.path.join(HERE, "sandbox-init.sh")
SYSTEMD = "/lib/systemd/systemd"
JOURNALD = "/lib/systemd/systemd-journald"
# Inside, commands get a plain environment, not the caller's pyenv or venv.
INSIDE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "TERM": "dumb",
    "SYSTEMD_PAGER": "",
    "SYSTEMD_COLORS": "0",
}
_counter = itertools.count()


class SandboxError(RuntimeError):
    """The sandbox could not be booted, or a command in it failed."""


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def cgroup2_root() -> Optional[str]:
    """Where the cgroup2 hierarchy is mounted: /sys/fs/cgroup/unified on hybrid
    hosts (v1 controllers plus v2), /sys/fs/cgroup on pure v2 ones."""
    mounts = _mount_types()
    for path in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup"):
        if mounts.get(path) == "cgroup2":
            return path
    return None


def _mount_types() -> Dict[str, str]:
    """Mount point -> file system type, the last mount on a point winning."""
    types = {}
    try:
        with open("/proc/self/mountinfo") as mounts:
            for line in mounts:
                fields = line.split()
                types[fields[4]] = fields[fields.index("-") + 1]
    except OSError:
        pass
    return types


def missing_prerequisites(journald_only: bool = False) -> List[str]:
    """What the sandbox needs and this machine lacks."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root")
    for tool in ("unshare", "nsenter", "journalctl"):
        if shutil.which(tool) is None:
            missing.append(f"{tool} (util-linux / systemd)")
    if not os.access(JOURNALD, os.X_OK):
        missing.append(f"{JOURNALD} (Debian package systemd)")
    if journald_only:
        return missing
    if not os.access(SYSTEMD, os.X_OK) or shutil.which("systemctl") is None:
        missing.append(f"{SYSTEMD} (Debian package systemd)")
    try:
        with open("/proc/filesystems") as filesystems:
            if "overlay" not in filesystems.read().split():
                missing.append("overlayfs")
    except OSError:
        missing.append("/proc/filesystems")
    if cgroup2_root() is None:
        missing.append("a cgroup2 hierarchy")
    return missing


def require(missing: List[str], what: str) -> None:
    """Skip a test for which this machine lacks `missing`; under CI fail it,
    so that a skip never hides a broken feature there."""
    if missing:
        message = f"{what} needs: " + ", ".join(missing)
        if in_ci():
            pytest.fail(message + " (CI must not skip: install them)", pytrace=False)
        pytest.skip(message)


def require_sandbox() -> None:
    """Skip (under CI: fail) when SystemdSandbox cannot run here."""
    require(missing_prerequisites(), "systemd sandbox test")


def require_journald() -> None:
    """Skip (under CI: fail) when Journald cannot run here."""
    require(missing_prerequisites(journald_only=True), "journald test")


def _check(args: Sequence[str], result: subprocess.CompletedProcess) -> None:
    if result.returncode != 0:
        output = (result.stderr or "").strip() or (result.stdout or "").strip()
        raise SandboxError(f"{shlex.join(args)} failed ({result.returncode}): {output}")


def _parse_json_lines(text: str) -> List[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def _journal_args(unit: Optional[str], identifier: Optional[str],
                  fields: Dict[str, str]) -> List[str]:
    args = ["journalctl", "--no-pager", "-o", "json"]
    if unit:
        args += ["-u", unit]
    if identifier:
        args += ["-t", identifier]
    args += [f"{key}={value}" for key, value in fields.items()]
    return args


def _cursor_key(cursor: str) -> tuple:
    """An order for cursors: sequence number within one journal (s=), else time."""
    parts = dict(item.split("=", 1) for item in cursor.split(";"))
    return (int(parts["t"], 16), parts["s"], int(parts["i"], 16))


def _tail(path: str, lines: int = 40) -> str:
    try:
        with open(path, errors="replace") as log:
            return "".join(log.readlines()[-lines:])
    except OSError:
        return ""


class _JournalReader:
    """journal()/wait_journal() over a `run` that executes inside."""

    def run(self, args, check=True, timeout=60, input=None):  # pragma: no cover
        raise NotImplementedError

    def journal(self, unit: Optional[str] = None, identifier: Optional[str] = None,
                fields: Dict[str, str] = {}, since_cursor: Optional[str] = None) -> List[dict]:
        """Entries as journalctl's JSON objects (values are strings, or lists
        for repeated fields), oldest first. `fields` match exactly (KEY=value)."""
        args = _journal_args(unit, identifier, fields)
        result = self.run(args, check=False)
        # journalctl exits 1 when nothing matches; any other noise is an error.
        if result.returncode not in (0, 1) or (result.returncode and result.stdout.strip()):
            _check(args, result)
        entries = _parse_json_lines(result.stdout)
        if since_cursor:
            # journalctl 252 returns nothing for --after-cursor combined with
            # matches, so the cursor is applied here.
            after = _cursor_key(since_cursor)
            entries = [e for e in entries if _cursor_key(e["__CURSOR"]) > after]
        return entries

    def cursor(self) -> Optional[str]:
        """The newest entry's cursor, to read only what comes after it."""
        entries = _parse_json_lines(
            self.run(["journalctl", "--no-pager", "-o", "json", "-n", "1"], check=False).stdout)
        return entries[-1]["__CURSOR"] if entries else None

    def wait_journal(self, predicate: Optional[Callable[[dict], bool]] = None,
                     timeout: float = 10.0, **query) -> dict:
        """The first entry matching `query` (journal()'s arguments) and
        `predicate`, polling because journald writes asynchronously.
        Raises TimeoutError listing the entries that were seen."""
        deadline = time.monotonic() + timeout
        while True:
            entries = self.journal(**query)
            for entry in entries:
                if predicate is None or predicate(entry):
                    return entry
            if time.monotonic() > deadline:
                seen = "\n".join(str(e.get("MESSAGE")) for e in entries[-20:])
                raise TimeoutError(f"no journal entry for {query} within {timeout}s; "
                                   f"last seen:\n{seen}")
            time.sleep(0.1)


class SystemdSandbox(_JournalReader):
    """systemd 252 as PID 1 of new namespaces, over an overlay of the host's /.

    binds: host directories bind-mounted read-write at the same path inside
    (results, artifacts). cow_binds: host directories shown copy-on-write
    (e.g. a checkout on another file system than /, which the overlay of /
    does not include; writes inside stay inside).
    """

    def __init__(self, binds: Iterable[str] = (), cow_binds: Iterable[str] = (),
                 boot_timeout: float = 30.0):
        self.binds = [os.path.abspath(d) for d in binds]
        self.cow_binds = [os.path.abspath(d) for d in cow_binds]
        self.boot_timeout = boot_timeout
        self.name = f"ipqd-sandbox-{os.getpid()}-{next(_counter)}"
        self.pid: Optional[int] = None          # host pid of the sandbox's systemd
        self.cgroup: Optional[str] = None
        self.workdir: Optional[str] = None
        self.boot_log: Optional[str] = None
        self._unshare: Optional[subprocess.Popen] = None

    # -- lifetime --------------------------------------------------------

    def __enter__(self) -> "SystemdSandbox":
        try:
            self._boot()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _boot(self) -> None:
        cgroot = cgroup2_root()
        if cgroot is None:
            raise SandboxError("no cgroup2 hierarchy")
        self.workdir = tempfile.mkdtemp(prefix=self.name + "-")
        scratch = os.path.join(self.workdir, "mnt")
        os.mkdir(scratch)
        self.boot_log = os.path.join(self.workdir, "boot.log")
        self.cgroup = os.path.join(cgroot, self.name)
        os.mkdir(self.cgroup)
        specs = [f"rw:{d}" for d in self.binds] + [f"cow:{d}" for d in self.cow_binds]
        # The shell moves itself into the child cgroup before unshare, so the
        # new cgroup namespace is rooted there and systemd owns only that subtree.
        command = (f"echo $$ > {shlex.quote(self.cgroup)}/cgroup.procs && exec unshare "
                   "--pid --mount --uts --ipc --net --cgroup --fork --propagation private "
                   + shlex.join(["sh", INIT_SCRIPT, scratch] + specs))
        with open(self.boot_log, "wb") as log:
            self._unshare = subprocess.Popen(["sh", "-c", command], stdin=subprocess.DEVNULL,
                                             stdout=log, stderr=subprocess.STDOUT)
        self.pid = self._wait_for_child()
        self._wait_running()

    def _wait_for_child(self) -> int:
        """The host pid of unshare's forked child (the namespace's PID 1)."""
        deadline = time.monotonic() + 5
        children = f"/proc/{self._unshare.pid}/task/{self._unshare.pid}/children"
        while time.monotonic() < deadline:
            if self._unshare.poll() is not None:
                raise SandboxError(f"sandbox died while starting:\n{_tail(self.boot_log)}")
            try:
                with open(children) as f:
                    pids = f.read().split()
                if pids:
                    return int(pids[0])
            except OSError:
                pass
            time.sleep(0.02)
        raise SandboxError(f"sandbox init did not start:\n{_tail(self.boot_log)}")

    def _wait_running(self) -> None:
        deadline = time.monotonic() + self.boot_timeout
        state = ""
        while time.monotonic() < deadline:
            if self._unshare.poll() is not None:
                raise SandboxError(f"sandbox died during boot:\n{_tail(self.boot_log)}")
            if self._systemd_is_up():
                result = self.run(["systemctl", "is-system-running"], check=False, timeout=10)
                state = result.stdout.strip()
                if state in ("running", "degraded"):
                    return
            time.sleep(0.1)
        journal = ""
        if self._systemd_is_up():
            journal = self.run(["journalctl", "--no-pager", "-b", "-n", "40"],
                               check=False, timeout=10).stdout
        raise SandboxError(f"systemd did not finish booting within {self.boot_timeout}s "
                           f"(state {state!r}); last journal lines:\n{journal}\n"
                           f"boot log:\n{_tail(self.boot_log)}")

    def _systemd_is_up(self) -> bool:
        """Whether the namespace's PID 1 is systemd yet. Before that, its root
        is still the host's: a systemctl run there would reach the host's own
        systemd (on hosts that have one) and could power off the host."""
        try:
            with open(f"/proc/{self.pid}/comm") as comm:
                return comm.read().strip() == "systemd"
        except OSError:
            return False

    def close(self) -> None:
        """Power off (SIGKILL after 10 s), reap, remove the cgroup and scratch dir."""
        if self._unshare is not None:
            if self._unshare.poll() is None and self.pid is not None:
                powering_off = self._systemd_is_up() and self.run(
                    ["systemctl", "poweroff", "--no-block"], check=False, timeout=10
                ).returncode == 0
                try:
                    # Without a manager to ask (boot failed early), kill at once.
                    self._unshare.wait(timeout=10 if powering_off else 0)
                except subprocess.TimeoutExpired:
                    # Killing a pid namespace's init kills everything in it.
                    _kill(self.pid, signal.SIGKILL)
            if self._unshare.poll() is None:
                try:
                    self._unshare.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._unshare.kill()
                    self._unshare.wait()
            self._unshare = None
        if self.cgroup is not None:
            _remove_cgroup(self.cgroup)
            self.cgroup = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    # -- commands inside -------------------------------------------------

    def run(self, args: Sequence[str], check: bool = True, timeout: float = 60,
            input: Optional[str] = None, env: Optional[Dict[str, str]] = None
            ) -> subprocess.CompletedProcess:
        """Run `args` inside all the sandbox's namespaces, at its root.
        The process stays in the host's cgroup, not under the sandbox's systemd."""
        if self.pid is None:
            raise SandboxError("sandbox is not running")
        command = ["nsenter", f"--target={self.pid}", "--mount", "--uts", "--ipc", "--net",
                   "--pid", "--cgroup", "--root", "--wd", "--"] + list(args)
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                input=input, env={**INSIDE_ENV, **(env or {})})
        if check:
            _check(args, result)
        return result

    def sh(self, command: str, check: bool = True, timeout: float = 60,
           input: Optional[str] = None) -> subprocess.CompletedProcess:
        return self.run(["sh", "-c", command], check=check, timeout=timeout, input=input)

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run(["systemctl", "--no-pager", *args], check=check)

    def write_file(self, path: str, text: str, mode: int = 0o644, owner: str = "root") -> None:
        """Write `text` to `path` inside the sandbox (parents created)."""
        # Through nsenter, not /proc/<pid>/root: absolute symlinks inside must
        # resolve against the sandbox's root, not the host's.
        self.run(["sh", "-c", 'mkdir -p "$(dirname "$1")" && cat > "$1" && '
                  'chmod "$2" "$1" && chown "$3" "$1"', "sh", path, f"{mode:o}", owner],
                 input=text)

    def read_file(self, path: str) -> str:
        return self.run(["cat", path]).stdout

    # -- network ---------------------------------------------------------

    def add_veth(self, netns: str, inside: str = "veth-sb", outside: str = "veth-out",
                 inside_addr: Optional[str] = None, outside_addr: Optional[str] = None) -> None:
        """Join the sandbox to the host's named network namespace `netns`
        (`ip netns add`) with a veth pair: `inside` in the sandbox, `outside`
        in `netns`; addresses like "10.78.0.1/24" are optional. Both ends
        are up. The pair goes away with either namespace."""
        subprocess.run(["ip", "link", "add", outside, "netns", netns, "type", "veth",
                        "peer", "name", inside, "netns", str(self.pid)],
                       check=True, capture_output=True)
        outside_cmd = ["ip", "netns", "exec", netns, "sh", "-c",
                       f"ip link set {outside} up"]
        inside_cmd = f"ip link set lo up && ip link set {inside} up"
        if outside_addr:
            outside_cmd[-1] = f"ip addr add {outside_addr} dev {outside} && " + outside_cmd[-1]
        if inside_addr:
            inside_cmd = f"ip addr add {inside_addr} dev {inside} && " + inside_cmd
        result = subprocess.run(outside_cmd, capture_output=True, text=True)
        _check(outside_cmd, result)
        self.sh(inside_cmd)


class Journald(_JournalReader):
    """systemd-journald alone, in a private mount namespace.

    tmpfs over /run/systemd, /run/log (and /var/log/journal where it exists)
    keep the host untouched. A process started with `popen`/`run` shares that
    mount namespace, so `systemd.journal.send` reaches this journald. There is
    no _SYSTEMD_UNIT without systemd: read back with journal(identifier=...).
    A long-lived holder process keeps the namespace, so journald itself can be
    stopped (`freeze`), killed (`kill`) and started again (`start`).
    """

    def __init__(self):
        self.holder: Optional[subprocess.Popen] = None
        self.journald: Optional[subprocess.Popen] = None

    def __enter__(self) -> "Journald":
        try:
            self._make_namespace()
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _make_namespace(self) -> None:
        mounts = ["/run/systemd", "/run/log"]
        if os.path.isdir("/var/log/journal"):
            mounts.append("/var/log/journal")
        script = "".join(f"mkdir -p {m} && mount -t tmpfs -o mode=755 tmpfs {m} && "
                         for m in mounts) + "echo ready && exec sleep infinity"
        self.holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if self.holder.stdout.readline().strip() != "ready":
            self.holder.wait(timeout=5)
            raise SandboxError(f"could not make the journald namespace: "
                               f"{self.holder.stderr.read().strip()}")

    @property
    def socket_path(self) -> str:
        return "/run/systemd/journal/socket"

    def _nsenter(self, args: Sequence[str]) -> List[str]:
        return ["nsenter", f"--target={self.holder.pid}", "--mount", "--"] + list(args)

    def start(self) -> None:
        """Start journald (again) and wait for its socket."""
        self.journald = subprocess.Popen(self._nsenter([JOURNALD]), stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if self.journald.poll() is not None:
                raise SandboxError(f"systemd-journald exited with {self.journald.returncode}")
            if self._socket_answers():
                return
            time.sleep(0.05)
        raise SandboxError("systemd-journald did not open its socket within 5 s")

    def _socket_answers(self) -> bool:
        # Through the holder's root, this process sees the namespace's /run.
        # A stale socket file without journald behind it refuses.
        path = f"/proc/{self.holder.pid}/root{self.socket_path}"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
            try:
                probe.connect(path)
            except OSError:
                return False
        return True

    def freeze(self) -> None:
        """SIGSTOP journald: writers block once the socket's buffer is full."""
        os.kill(self.journald.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.journald.pid, signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL journald: its socket file stays, and sending to it fails
        (ECONNREFUSED) until `start`."""
        if self.journald is not None and self.journald.poll() is None:
            self.journald.kill()
            self.journald.wait()

    def popen(self, args: Sequence[str], **kwargs) -> subprocess.Popen:
        """Start `args` inside the namespace, e.g. a daemon that logs."""
        return subprocess.Popen(self._nsenter(args), **kwargs)

    def run(self, args: Sequence[str], check: bool = True, timeout: float = 60,
            input: Optional[str] = None) -> subprocess.CompletedProcess:
        result = subprocess.run(self._nsenter(args), capture_output=True, text=True,
                                timeout=timeout, input=input)
        if check:
            _check(args, result)
        return result

    def close(self) -> None:
        if self.journald is not None:
            if self.journald.poll() is None:
                self.thaw()     # a stopped process would ignore SIGTERM until continued
                self.journald.terminate()
                try:
                    self.journald.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self.journald.kill()
                    self.journald.wait()
            self.journald = None
        if self.holder is not None:
            if self.holder.poll() is None:
                self.holder.kill()
            self.holder.wait()
            for stream in (self.holder.stdout, self.holder.stderr):
                stream.close()
            self.holder = None


def build_wheelhouse(path: str) -> None:
    """Wheels of the project's dependencies and build requirements in `path`,
    made on the host (from pip's cache or the index), so that `make install`
    inside a sandbox, which has no network, can use --no-index."""
    import tomllib     # here: Python 3.11+, and only this helper needs it
    with open(os.path.join(CHECKOUT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)
    wanted = project["project"]["dependencies"] + project["build-system"]["requires"] + ["wheel"]
    args = [sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check",
            "-w", path] + wanted
    _check(args, subprocess.run(args, capture_output=True, text=True))


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _remove_cgroup(path: str) -> None:
    """rmdir the cgroup tree bottom-up, retrying while dying processes leave it."""
    deadline = time.monotonic() + 5
    while os.path.isdir(path):
        for dirpath, _dirs, _files in sorted(os.walk(path), key=lambda w: -len(w[0])):
            try:
                os.rmdir(dirpath)
            except OSError:
                pass
        if not os.path.isdir(path):
            return
        if time.monotonic() > deadline:
            raise SandboxError(f"cgroup {path} still busy after teardown")
        time.sleep(0.05)
