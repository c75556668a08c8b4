"""Rules by cgroup through the real queue: two processes in two cgroups
connect out; the policy lets only one of them, and refuses the other."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from daemon_harness import RunningIpqd
from ipqd.policy.loader import cgroup2_root

pytestmark = pytest.mark.kernel

CONNECT = textwrap.dedent("""\
    import errno, socket, sys
    s = socket.socket()
    s.settimeout(3)
    try:
        s.connect((sys.argv[1], 5701))
        print("connected")
    except OSError as e:
        print(errno.errorcode.get(e.errno, "timeout"))
    """)


def _connect_from(cgroup_dir: str, host, target: str) -> str:
    """Connect from a process placed in `cgroup_dir` before it enters the host's namespace."""
    script = (f"echo $$ > {cgroup_dir}/cgroup.procs && exec ip netns exec {host.name} "
              f"{sys.executable} -c '{CONNECT}' {target}")
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True,
                          timeout=20).stdout.strip()


def test_only_the_allowed_cgroup_may_connect(lab, tmp_path):
    root = cgroup2_root()
    assert root is not None, "no cgroup v2 hierarchy mounted"
    names = [f"ipqd-test-{os.getpid()}-{side}" for side in ("allowed", "other")]
    dirs = [os.path.join(root, name) for name in names]
    for d in dirs:
        os.mkdir(d)
    listener = lab.client.socket(2, 1)
    listener.setsockopt(1, 2, 1)
    listener.bind(("0.0.0.0", 5701))
    listener.listen(8)
    path = tmp_path / "policy.yaml"
    path.write_text(f"""\
version: 1
queue: {{num: 0, bypass: false, fail_open: false}}
hooks:
  - {{chain: output, family: ipv4, proto: tcp}}
default: {{action: accept, log: false}}
rules:
  - {{name: web, hook: output, cgroup: {names[0]}, proto: tcp, dport: 5701, action: accept}}
  - {{name: others, hook: output, proto: tcp, dport: 5701, action: reject}}
""")
    os.chmod(path, 0o644)
    try:
        ipqd = RunningIpqd(lab.server, str(path), str(tmp_path / "state"),
                           "--backend", "iptables-legacy")
        try:
            allowed = _connect_from(dirs[0], lab.server, lab.CLIENT4)
            other = _connect_from(dirs[1], lab.server, lab.CLIENT4)
        finally:
            assert ipqd.stop() == 0
    finally:
        listener.close()
        for d in dirs:
            os.rmdir(d)
    assert (allowed, other) == ("connected", "ECONNREFUSED")
