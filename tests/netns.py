"""Throwaway network namespaces for real-kernel tests.

Every test host lives in a namespace this module creates and removes, so a
test never touches the root namespace's rules or traffic. Sockets can be
created inside a namespace from this process (`Host.socket`): a socket
belongs to the namespace it was created in, whatever thread uses it later.
"""
from __future__ import annotations

import ctypes
import itertools
import os
import shutil
import socket
import subprocess
import threading
from typing import List, Optional

import pytest

CLONE_NEWNET = 0x40000000
_counter = itertools.count()
_libc = ctypes.CDLL(None, use_errno=True)


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing_prerequisites() -> List[str]:
    """What real-kernel tests need and this machine lacks."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root")
    for tool in ("ip", "iptables-legacy", "ip6tables-legacy", "ping"):
        if shutil.which(tool) is None:
            missing.append(tool)
    if not missing:
        probe = f"ipqd-probe-{os.getpid()}"
        ok = subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode == 0
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
        if not ok:
            missing.append("network namespaces (ip netns add failed)")
    return missing


def require_kernel() -> None:
    """Skip (or, under CI, fail) when real-kernel tests cannot run here."""
    missing = missing_prerequisites()
    if missing:
        message = "real-kernel test needs: " + ", ".join(missing)
        if in_ci():
            pytest.fail(message + " (CI must not skip: install them)", pytrace=False)
        pytest.skip(message)


def run(args: List[str], check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, text=True, **kwargs)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}): "
                           f"{result.stderr.strip() or result.stdout.strip()}")
    return result


class Host:
    """One network namespace."""

    def __init__(self, name: str):
        self.name = name
        run(["ip", "netns", "add", name])
        self.sh("ip link set lo up")

    def sh(self, command: str, check: bool = True) -> subprocess.CompletedProcess:
        return run(["ip", "netns", "exec", self.name, "sh", "-c", command], check=check)

    def popen(self, args: List[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.name] + args,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)

    def socket(self, family: int, kind: int, proto: int = 0) -> socket.socket:
        """A socket created inside this namespace (via a short-lived thread
        that enters it: setns changes only the calling thread)."""
        box: dict = {}

        def make() -> None:
            fd = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into {self.name}: {os.strerror(err)}")
                box["sock"] = socket.socket(family, kind, proto)
            except BaseException as exc:   # handed to the caller's thread
                box["error"] = exc
            finally:
                os.close(fd)

        thread = threading.Thread(target=make)
        thread.start()
        thread.join()
        if "error" in box:
            raise box["error"]
        return box["sock"]

    def netlink_socket(self) -> socket.socket:
        return self.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)

    def delete(self) -> None:
        # Killing what still runs inside first: a namespace with processes lingers.
        pids = run(["ip", "netns", "pids", self.name], check=False).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), 9)
            except (ProcessLookupError, ValueError):
                pass
        run(["ip", "netns", "del", self.name], check=False)


class Lab:
    """Two hosts joined by a veth pair, addressed for IPv4 and IPv6.

    client (10.77.0.1, fd77::1, interface `veth-c`) <-> server (10.77.0.2, fd77::2, `veth-s`)
    """

    CLIENT4, SERVER4 = "10.77.0.1", "10.77.0.2"
    CLIENT6, SERVER6 = "fd77::1", "fd77::2"

    def __init__(self):
        tag = f"{os.getpid()}-{next(_counter)}"
        self.hosts: List[Host] = []
        try:
            self.client = self._host(f"ipqd-c-{tag}")
            self.server = self._host(f"ipqd-s-{tag}")
            run(["ip", "link", "add", "veth-c", "netns", self.client.name, "type", "veth",
                 "peer", "name", "veth-s", "netns", self.server.name])
            for host, dev, v4, v6 in ((self.client, "veth-c", self.CLIENT4, self.CLIENT6),
                                      (self.server, "veth-s", self.SERVER4, self.SERVER6)):
                host.sh(f"ip addr add {v4}/24 dev {dev} && "
                        f"ip -6 addr add {v6}/64 dev {dev} nodad && ip link set {dev} up")
        except BaseException:
            self.close()
            raise

    def _host(self, name: str) -> Host:
        host = Host(name)
        self.hosts.append(host)
        return host

    def close(self) -> None:
        for host in self.hosts:
            host.delete()
        self.hosts = []


def iptables(host: Host, rule: str, family: int = 4, backend: str = "legacy") -> None:
    """Run one iptables command inside `host` (never in the root namespace)."""
    tool = {4: "iptables", 6: "ip6tables"}[family] + f"-{backend}"
    host.sh(f"{tool} -w {rule}")


def namespaces_left(prefix: str = "ipqd-") -> List[str]:
    out = run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(prefix)]


def find_ifindex(host: Host, dev: str) -> Optional[int]:
    out = host.sh(f"cat /sys/class/net/{dev}/ifindex", check=False).stdout.strip()
    return int(out) if out.isdigit() else None
