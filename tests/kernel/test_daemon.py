"""`ipqd run` in a namespace, with real traffic: decisions, reloads, signals, faults."""
import os
import re
import shutil
import signal
import socket
import threading
import time

import pytest

from daemon_harness import RunningIpqd, ping, queue_counters, tcp_probe, udp_probe

pytestmark = pytest.mark.kernel
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

POLICY = """\
version: 1
queue: {num: %(num)s, bypass: %(bypass)s, fail_open: false}
hooks:
  - {chain: input, family: both}
default: {action: drop, log: true}
logging: {rate: 10000/second}
rules:
  - name: neighbours
    proto: icmpv6
    action: accept
    log: false
  - name: allow-udp
    proto: udp
    dport: %(udp)s
    action: accept
  - name: web
    proto: tcp
    dport: 8080
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


def write_policy(path, num=0, bypass="false", udp=5000):
    path.write_text(POLICY % dict(num=num, bypass=bypass, udp=udp))
    os.chmod(path, 0o644)
    return str(path)


@pytest.fixture
def daemon(lab, tmp_path):
    started = []

    def start(policy=None, *extra, wait=True, **policy_args):
        policy = policy or write_policy(tmp_path / "policy.yaml", **policy_args)
        running = RunningIpqd(lab.server, policy, str(tmp_path / "state"), *extra, wait=wait)
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


def test_decisions_follow_the_policy_and_are_logged(lab, daemon):
    ipqd = daemon()
    assert udp_probe(lab, 5000)
    assert not udp_probe(lab, 5001)
    assert tcp_probe(lab, 8080)
    assert not tcp_probe(lab, 23)
    assert ping(lab)
    assert udp_probe(lab, 5000, family=socket.AF_INET6)
    line = ipqd.wait_for(lambda l: "rule=no-telnet" in l)
    assert re.fullmatch(r"DROP tcp 10\.77\.0\.1:\d+ -> 10\.77\.0\.2:23 in=veth-s rule=no-telnet", line)
    ipqd.wait_for(lambda l: re.fullmatch(
        r"ACCEPT udp 10\.77\.0\.1:\d+ -> 10\.77\.0\.2:5000 in=veth-s rule=allow-udp", l) is not None)
    ipqd.wait_for(lambda l: re.fullmatch(
        r"ACCEPT udp \[fd77::1\]:\d+ -> \[fd77::2\]:5000 in=veth-s rule=allow-udp", l) is not None)
    ipqd.wait_for(lambda l: l.startswith("DROP udp") and ":5001 " in l and l.endswith("rule=default"))
    ipqd.wait_for(lambda l: l.startswith("ACCEPT icmp 10.77.0.1 -> 10.77.0.2 type=8 code=0"))
    assert not any("rule=neighbours" in l for l in ipqd.lines)      # log: false


def test_stop_removes_hooks_and_exits_zero(lab, daemon):
    ipqd = daemon()
    assert "IPQD_INPUT" in lab.server.sh("iptables-legacy-save; iptables-nft-save").stdout
    assert ipqd.stop() == 0
    saved = lab.server.sh("iptables-legacy-save; iptables-nft-save; ip6tables-legacy-save; "
                          "ip6tables-nft-save").stdout
    assert "IPQD" not in saved
    assert ipqd.lines[-1] == "ipqd stopped"
    assert udp_probe(lab, 5001)          # no hooks: nothing queued, nothing dropped


def test_reload_changes_behaviour_and_a_bad_edit_keeps_the_old_policy(lab, daemon, tmp_path):
    policy = write_policy(tmp_path / "policy.yaml", udp=5000)
    ipqd = daemon(policy)
    assert udp_probe(lab, 5000) and not udp_probe(lab, 6000)
    write_policy(tmp_path / "policy.yaml", udp=6000)
    assert ipqd.reload().startswith("reloaded policy")
    assert udp_probe(lab, 6000) and not udp_probe(lab, 5000)

    with open(policy, "a") as f:
        f.write("  - name: broken\n    proto: tcp\n    dprot: 80\n    action: accept\n")
    mark = len(ipqd.lines)
    assert ipqd.reload().startswith("reload refused")
    error = ipqd.wait_for(lambda l: "unknown field" in l, start=mark)
    assert re.match(r".*policy\.yaml:\d+:5: rule \"broken\": unknown field 'dprot' \(did you mean 'dport'\?\)",
                    error), error
    assert udp_probe(lab, 6000) and not udp_probe(lab, 5000)      # the old policy still runs


def test_counters_on_sigusr1_carry_over_reloads(lab, daemon, tmp_path):
    ipqd = daemon()
    for _ in range(3):
        assert udp_probe(lab, 5000)
    assert ipqd.reload().startswith("reloaded")
    assert udp_probe(lab, 5000)
    mark = len(ipqd.lines)
    ipqd.signal(signal.SIGUSR1)
    line = ipqd.wait_for(lambda l: l.startswith("rule allow-udp:"), start=mark)
    assert line == "rule allow-udp: 4 hits (4 accepted, 0 dropped)"
    ipqd.wait_for(lambda l: l.startswith("rule default:"), start=mark)


def test_counters_survive_a_worker_crash(lab, daemon):
    """The supervisor keeps each worker's last report: a worker killed after
    it reported hands its counters to the one that recovers its socket."""
    ipqd = daemon()
    for _ in range(3):
        assert udp_probe(lab, 5000)
    time.sleep(1.5)                     # one report period (worker.STATS_EVERY) and more
    (pid,) = worker_pids(ipqd)
    mark = len(ipqd.lines)
    os.kill(pid, signal.SIGKILL)
    ipqd.wait_for(lambda l: l.startswith("ipqd: worker 0 exited"), start=mark)
    assert udp_probe(lab, 5000)
    ipqd.signal(signal.SIGUSR1)
    line = ipqd.wait_for(lambda l: l.startswith("rule allow-udp:"), start=mark)
    assert line == "rule allow-udp: 4 hits (4 accepted, 0 dropped)"


def worker_pids(ipqd) -> list:
    with open(f"/proc/{ipqd.process.pid}/task/{ipqd.process.pid}/children") as f:
        children = [int(pid) for pid in f.read().split()]
    pids = []
    for pid in children:
        try:
            with open(f"/proc/{pid}/cmdline") as f:
                if f.read().rstrip("\0").split("\0")[-3:-1] == ["ipqd.daemon.child", "worker"]:
                    pids.append(pid)
        except OSError:
            pass
    return pids


def test_a_reload_hands_the_bound_socket_to_a_new_worker_under_traffic(lab, daemon, tmp_path):
    """The new policy runs in a new worker process on the same netlink socket
    (the queue's peer port id stays, so nothing was unbound or dropped), and
    a stream sent all through three reloads arrives whole, in order."""
    ipqd = daemon(write_policy(tmp_path / "policy.yaml", udp=5000))
    before_pids, (before,) = worker_pids(ipqd), queue_counters(lab.server)
    assert len(before_pids) == 1
    rx = lab.server.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind((lab.SERVER4, 5000))
    rx.settimeout(5)
    got = []
    receiver = threading.Thread(target=lambda: got.extend(iter(lambda: int(rx.recv(64)), -1)))
    receiver.daemon = True
    receiver.start()
    tx = lab.client.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stop, sent = threading.Event(), [0]

    def stream():
        while not stop.is_set():
            tx.sendto(b"%d" % sent[0], (lab.SERVER4, 5000))
            sent[0] += 1
            time.sleep(0.001)
    sender = threading.Thread(target=stream)
    sender.start()
    owner = "  - {name: owner, proto: tcp, dport: 9, uid: 0, action: drop}\n"
    try:
        # The second reload reads the uid (the queue's UID_GID flag is set on
        # the taken-over socket); the others keep their predecessor's settings.
        for extra in ("", owner, ""):
            path = write_policy(tmp_path / "policy.yaml", udp=5000)
            with open(path, "a") as f:
                f.write(extra)
            assert ipqd.reload().startswith("reloaded policy")
    finally:
        stop.set()
        sender.join()
    tx.sendto(b"-1", (lab.SERVER4, 5000))         # the end
    receiver.join(10)
    assert got == list(range(sent[0])) and sent[0] > 100
    (after,) = queue_counters(lab.server)
    assert after[1] == before[1]                    # the same socket holds the queue
    assert after[5] == after[6] == 0                # nothing dropped by the kernel
    # The predecessor answers what it holds, then exits: on a busy machine
    # that may take a moment after "reloaded policy".
    deadline = time.monotonic() + 10
    while len(worker_pids(ipqd)) > 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    after_pids = worker_pids(ipqd)
    assert len(after_pids) == 1 and after_pids != before_pids
    rx.close()


def stats_of(ipqd) -> dict:
    mark = len(ipqd.lines)
    ipqd.signal(signal.SIGUSR1)
    line = ipqd.wait_for(lambda l: l.startswith("stats: "), start=mark)
    return {k: int(v) for k, v in (kv.split("=") for kv in line.split()[1:])}


def test_the_verdict_cache_answers_repeats_and_a_reload_empties_it(lab, daemon, tmp_path):
    path = tmp_path / "quiet.yaml"
    write_policy(path)
    # Offload off: accepted flows would otherwise be handed to the kernel.
    path.write_text(path.read_text().replace("default: {action: drop, log: true}",
                                             "default: {action: drop, log: false}")
                    .replace("fail_open: false}", "fail_open: false, offload: off}"))
    ipqd = daemon(str(path))
    for _ in range(10):
        assert udp_probe(lab, 5000)           # new source ports: the policy reads no sport
    for _ in range(3):
        assert not udp_probe(lab, 5001)
    before = stats_of(ipqd)
    # A flow's key is kept on its second sight: its later packets hit.
    assert before["cache_hits"] >= 8 + 1 and before["cache_entries"] >= 2, before
    path.write_text(path.read_text().replace("dport: 5000", "dport: 5001"))
    assert ipqd.reload().startswith("reloaded policy")
    for _ in range(3):
        assert udp_probe(lab, 5001) and not udp_probe(lab, 5000)
    after = stats_of(ipqd)
    assert after["cache_hits"] >= before["cache_hits"] + 2, after   # carried over, and hit again
    assert after["accepted"] == before["accepted"] + 3


def test_invalid_policy_refuses_to_start_with_positions(lab, daemon, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("version: 1\ndefault: {action: rejct}\nrules: []\n")
    ipqd = daemon(str(path), wait=False)
    assert ipqd.process.wait(20) == 1
    ipqd.stop()
    text = "\n".join(ipqd.lines)
    assert "bad.yaml:2:19: default: unknown action 'rejct' (did you mean 'reject'?)" in text, text
    assert "not started" in text
    assert "IPQD" not in lab.server.sh("iptables-legacy-save; iptables-nft-save").stdout


def test_group_writable_policy_is_refused(lab, daemon, tmp_path):
    path = write_policy(tmp_path / "policy.yaml")
    os.chmod(path, 0o664)
    ipqd = daemon(path, wait=False)
    assert ipqd.process.wait(20) == 1
    ipqd.stop()
    assert any("writable by group or others" in l and "chmod go-w" in l for l in ipqd.lines), ipqd.lines


def test_queue_held_by_another_process_is_a_clear_startup_error(lab, daemon):
    from ipqd.kernel.queue_socket import QueueSocket
    with QueueSocket(sock=lab.server.netlink_socket()) as holder:
        holder.bind(0)
        ipqd = daemon(wait=False)
        assert ipqd.process.wait(30) == 4                # the system refused (ipqd.exits)
        ipqd.stop()
    assert any("queue 0 is held by another process" in l for l in ipqd.lines), ipqd.lines


@pytest.mark.parametrize("bypass", [True, False])
def test_kill_9_with_and_without_bypass_then_restart_enforces_again(lab, daemon, tmp_path, bypass):
    ipqd = daemon(bypass="true" if bypass else "false")
    assert not udp_probe(lab, 5001)
    ipqd.kill()                           # hooks stay; nobody listens on the queue
    assert udp_probe(lab, 5001) is bypass
    assert udp_probe(lab, 5000) is bypass
    daemon(bypass="true" if bypass else "false")   # the restart finds and replaces its hooks
    assert udp_probe(lab, 5000) and not udp_probe(lab, 5001)


def test_two_queues_two_workers(lab, daemon, tmp_path):
    ipqd = daemon(num='"0-1"')
    assert "queues 0-1" in ipqd.wait_for(lambda l: l.startswith("ipqd started"))
    tx = lab.client.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx = lab.server.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("0.0.0.0", 5000))
    rx.settimeout(2)
    # --queue-balance hashes the address pair: many client addresses, many flows.
    for n in range(10, 50):
        lab.client.sh(f"ip addr add 10.77.0.{n}/24 dev veth-c")
    senders = []
    for n in range(10, 50):
        s = lab.client.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((f"10.77.0.{n}", 0))
        s.sendto(b"f", (lab.SERVER4, 5000))
        senders.append(s)
    got = sum(1 for _ in range(40) if rx.recv(10) == b"f")
    assert got == 40
    rows = {row[0]: row for row in queue_counters(lab.server)}
    assert set(rows) == {0, 1}
    assert rows[0][2] == 0 and rows[1][2] == 0           # nothing waiting
    assert rows[0][7] > 0 and rows[1][7] > 0             # both queues saw packets (id sequence)
    # A reload: each worker hands its own socket to its own successor.
    before = set(worker_pids(ipqd))
    assert len(before) == 2
    assert ipqd.reload().startswith("reloaded policy")
    for s in senders:
        s.sendto(b"g", (lab.SERVER4, 5000))
    assert sum(1 for _ in range(40) if rx.recv(10) == b"g") == 40
    after = {row[0]: row for row in queue_counters(lab.server)}
    assert {q: row[1] for q, row in after.items()} == {q: row[1] for q, row in rows.items()}
    assert after[0][7] > rows[0][7] and after[1][7] > rows[1][7]
    workers = set(worker_pids(ipqd))
    assert len(workers) == 2 and not workers & before
    tx.close()


def test_every_packet_accounted_for_under_reloads(lab, daemon, tmp_path):
    """A reload every 100 ms under a stream of packets loses none: the
    stream goes on until at least 5 reloads have happened within it."""
    policy = write_policy(tmp_path / "policy.yaml")
    ipqd = daemon(policy)
    total = 100000

    def reloaded():
        return sum(1 for l in ipqd.lines if l.startswith("reloaded policy"))
    rx = lab.server.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    rx.bind(("0.0.0.0", 5000))
    rx.settimeout(3)
    tx = lab.client.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stop = threading.Event()

    def reloader():
        while not stop.is_set():
            ipqd.signal(signal.SIGHUP)
            time.sleep(0.1)

    thread = threading.Thread(target=reloader)
    thread.start()
    received = 0
    deadline = time.monotonic() + 60
    try:
        i = 0
        while i < total or (reloaded() < 5 and time.monotonic() < deadline):
            tx.sendto(b"%d" % i, (lab.SERVER4, 5000))
            i += 1
            if i % 200 == 0:         # a closed loop in steps: the kernel queue never overflows
                while received < i - 100:
                    rx.recv(100)
                    received += 1
        total = i
        while received < total:
            rx.recv(100)
            received += 1
    finally:
        stop.set()
        thread.join()
    assert received == total
    row = queue_counters(lab.server)[0]
    assert row[5] == 0 and row[6] == 0       # queue dropped, user dropped
    assert reloaded() >= 5


def test_flood_past_the_queue_length_is_survived(lab, daemon, tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text((POLICY % dict(num=0, bypass="false", udp=5000)).replace(
        "fail_open: false}", "fail_open: false, maxlen: 16}").replace("10000/second", "5/second"))
    os.chmod(path, 0o644)
    ipqd = daemon(str(path))
    os.killpg(ipqd.process.pid, signal.SIGSTOP)       # a daemon that falls behind
    tx = lab.client.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for i in range(200):
        tx.sendto(b"x", (lab.SERVER4, 5000))
    os.killpg(ipqd.process.pid, signal.SIGCONT)
    time.sleep(0.5)
    row = queue_counters(lab.server)[0]
    assert row[5] > 0                                  # the kernel counted what it dropped
    assert udp_probe(lab, 5000)                        # and ipqd answers again


def test_example_policy_runs_as_shipped(lab, daemon, tmp_path):
    policy = tmp_path / "policy.yaml"
    shutil.copy(os.path.join(ROOT, "etc", "ipqd", "policy.yaml"), policy)
    os.chmod(policy, 0o644)
    ipqd = daemon(str(policy))
    started = ipqd.wait_for(lambda l: l.startswith("ipqd started"))
    assert "queues 0-4" in started            # one queue per conntrack state (ct_state rules)
    assert ping(lab)
    assert tcp_probe(lab, 22)
    assert udp_probe(lab, 5353)
    ipqd.wait_for(lambda l: l.startswith("ACCEPT") or l.startswith("DROP"))


@pytest.mark.parametrize("v6", [False, True])
def test_the_example_policy_limits_a_ping_flood(lab, daemon, tmp_path, v6):
    """300 echo requests in about 1.5 s from one ping (one conntrack flow,
    established after the first reply): the example's 10/second burst 20
    lets through about 35, not all of them."""
    policy = tmp_path / "policy.yaml"
    shutil.copy(os.path.join(ROOT, "etc", "ipqd", "policy.yaml"), policy)
    os.chmod(policy, 0o644)
    daemon(str(policy))
    target = lab.SERVER6 if v6 else lab.SERVER4
    out = lab.client.sh(f"ping {'-6 ' if v6 else ''}-i 0.005 -c 300 -W 1 -q {target}",
                        check=False).stdout
    received = int(re.search(r"(\d+) (?:packets )?received", out).group(1))
    assert 20 <= received <= 60, out


def netfilter_sockets(pid: int) -> set:
    """Inodes of the NETLINK_NETFILTER sockets process `pid` holds."""
    with open(f"/proc/{pid}/net/netlink") as f:
        netfilter = {line.split()[-1] for line in f.readlines()[1:] if line.split()[1] == "12"}
    held = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    return {inode for inode in netfilter if f"socket:[{inode}]" in held}


def test_a_killed_worker_is_restarted_on_its_socket_and_leaks_nothing(lab, daemon, tmp_path):
    """kill -9 of the worker, three times: each time a new worker answers on
    the same socket (the supervisor holds it, so the queue stays bound to
    the same port id), with the reason logged, and the supervisor holds as
    many open files as before."""
    ipqd = daemon()
    assert udp_probe(lab, 5000) and not udp_probe(lab, 5001)
    supervisor_fds = f"/proc/{ipqd.process.pid}/fd"
    files = len(os.listdir(supervisor_fds))
    (row,) = queue_counters(lab.server)
    held = netfilter_sockets(ipqd.process.pid)
    assert len(held) == 1
    for round_ in range(3):
        (pid,) = worker_pids(ipqd)
        mark = len(ipqd.lines)
        os.kill(pid, signal.SIGKILL)
        ipqd.wait_for(lambda l: l.startswith("ipqd: worker 0 exited: killed by SIGKILL; "
                                             "restarting it"), start=mark)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (
                len(worker_pids(ipqd)) == 1 and worker_pids(ipqd) != [pid]):
            time.sleep(0.05)
        assert netfilter_sockets(ipqd.process.pid) == held, "the worker's socket was let go"
        assert [r[:2] for r in queue_counters(lab.server)] == [row[:2]], "the queue was unbound"
        assert udp_probe(lab, 5000) and not udp_probe(lab, 5001)
    assert len(os.listdir(supervisor_fds)) == files


FLOOD_POLICY = """\
version: 1
queue: {num: 0, bypass: true, fail_open: false, maxlen: 65536}
hooks:
  - {chain: input, family: ipv4, proto: udp}
default: {action: drop}
rules:
  - name: allowed
    proto: udp
    dport: 5000
    action: accept
"""


def flood_while(lab, action, pps: int = 8000, seconds: float = 2.0) -> dict:
    """Datagrams client -> server, alternately to 5000 (allowed) and 5001
    (denied), `pps` a second for `seconds`, with `action()` run halfway.
    Returns how many were sent and how many of each the server got."""
    receivers = {}
    for port in (5000, 5001):
        rx = lab.server.socket(socket.AF_INET, socket.SOCK_DGRAM)
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
        rx.bind(("0.0.0.0", port))
        rx.settimeout(0.2)
        receivers[port] = rx
    got = {5000: 0, 5001: 0}

    def count(port):
        while True:
            try:
                receivers[port].recv(64)
            except socket.timeout:
                if done.is_set():
                    return
                continue
            got[port] += 1
    done = threading.Event()
    counters = [threading.Thread(target=count, args=(p,), daemon=True) for p in got]
    for t in counters:
        t.start()
    tx = lab.client.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sent = 0
    total = int(pps * seconds)
    start = time.monotonic()
    acted = False
    while sent < total:
        due = start + sent / pps
        if not acted and sent >= total // 2:
            action()
            acted = True
        if time.monotonic() < due:
            time.sleep(max(0.0, due - time.monotonic()))
        tx.sendto(b"x", (lab.SERVER4, 5000 + sent % 2))
        sent += 1
    tx.close()
    time.sleep(3)                   # what waited in the queue is answered by now
    done.set()
    for t in counters:
        t.join(5)
    for rx in receivers.values():
        rx.close()
    return {"sent": sent, "allowed": got[5000], "denied": got[5001]}


def test_a_worker_crash_under_load_lets_nothing_through_and_loses_nothing(lab, daemon, tmp_path):
    """kill -9 of the worker at 8k packets a second, with the hooks' queue
    bypass on (ipqd's default): the queue stays bound while the new worker
    starts, so no datagram to the denied port passes and every allowed one
    arrives (the kernel holds them, up to the queue's length)."""
    path = tmp_path / "policy.yaml"
    path.write_text(FLOOD_POLICY)
    os.chmod(path, 0o644)
    ipqd = daemon(str(path))
    assert "--queue-bypass" in lab.server.sh("iptables-nft-save; iptables-legacy-save").stdout
    killed = []

    def kill_worker():
        (pid,) = worker_pids(ipqd)
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)
    result = flood_while(lab, kill_worker)
    ipqd.wait_for(lambda l: l.startswith("ipqd: worker 0 exited: killed by SIGKILL"))
    assert killed and worker_pids(ipqd) not in ([], killed)
    assert result["denied"] == 0, result
    assert result["allowed"] == result["sent"] // 2, result


def test_a_recovering_worker_decides_what_the_dead_one_left_unanswered(lab):
    """A worker read three packets and died before answering: they wait in
    the kernel. The worker that recovers its socket sends them through the
    hook again (NF_REPEAT), reads them anew and decides them: the allowed
    one arrives, the denied ones do not, and the queue ends empty."""
    from ipqd.policy.loader import loads
    from ipqd.kernel.queue_socket import QueueSocket, QueueState
    from ipqd.daemon.messages import WorkerConfig
    from ipqd.daemon.worker import Worker
    lab.server.sh("iptables-nft -A INPUT -p udp -j NFQUEUE --queue-num 0")
    sock = lab.server.netlink_socket()
    dead = QueueSocket(sock=sock)
    dead.bind(0)
    rx = lab.server.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("0.0.0.0", 5000))
    rx.settimeout(1.0)
    tx = lab.client.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for port in (5001, 5000, 5001):
        tx.sendto(b"x", (lab.SERVER4, port))
    read = []
    deadline = time.monotonic() + 5
    while len(read) < 3 and time.monotonic() < deadline:
        read += [e for e in dead.receive_events(0.5) if type(e).__name__ == "Packet"]
    assert len(read) == 3                                   # read, never answered
    policy = loads("version: 1\ndefault: {action: drop}\nrules:\n"
                   "  - {name: allowed, proto: udp, dport: 5000, action: accept}\n", "p.yaml")
    worker = Worker(WorkerConfig(0, 1, {0: None}, "stderr"), policy, conn=None, sock=sock)
    worker.rebind()
    # The table as the worker would read it inside the server's namespace.
    states = {r[0]: QueueState(r[0], r[1], r[2], r[7]) for r in queue_counters(lab.server)}
    assert states[0].total == 3
    assert worker.requeue_unanswered(states) == 1
    for _ in range(10):
        worker.answer(worker.qs.receive_events(0.2))
    assert rx.recv(64) == b"x"
    with pytest.raises(socket.timeout):
        rx.recv(64)                                         # one allowed datagram, once
    rows = queue_counters(lab.server)
    assert [r[2] for r in rows if r[0] == 0] == [0], rows   # nothing left waiting
    assert worker.engine.counters.dropped == 2 and worker.engine.counters.accepted == 1
    worker.close()
    tx.close()
    rx.close()


@pytest.mark.parametrize("num", [0, 5])
def test_a_second_instance_leaves_the_first_ones_hooks_alone(lab, daemon, tmp_path, num):
    """A second `ipqd run` (another state dir; the same queue, or another)
    cannot start while the first owns the hooks, and on its way out it
    touches none of them: the first's rules and verdicts stay."""
    first = daemon()
    before = lab.server.sh("iptables-nft-save; ip6tables-nft-save").stdout
    assert "IPQD_INPUT" in before
    other = write_policy(tmp_path / "other.yaml", num=num, udp=5001)
    second = RunningIpqd(lab.server, other, str(tmp_path / "other-state"), wait=False)
    assert second.process.wait(20) == 4                  # the system refused (ipqd.exits)
    second._reader.join(2)
    assert any("owns ipqd's queue rules" in l for l in second.lines), second.lines
    after = lab.server.sh("iptables-nft-save; ip6tables-nft-save").stdout
    assert _rules(after) == _rules(before)
    assert udp_probe(lab, 5000) and not udp_probe(lab, 5001)
    assert first.process.poll() is None


def _rules(saved: str) -> list:
    """iptables-save output without its comments and counters."""
    return [re.sub(r"\[\d+:\d+\]", "", l) for l in saved.splitlines() if not l.startswith("#")]


def test_a_refused_reload_moves_no_hook(lab, daemon, tmp_path):
    """The unit's reload: `ipqd hooks install` (as root), then SIGHUP. With
    the queue moved to 3 and a group-writable policy.d fragment, the daemon
    would refuse the policy, so the hooks command refuses it too and moves
    nothing; even a SIGHUP sent anyway leaves queue 0 answered and every
    datagram to the denied port dropped."""
    from daemon_harness import IPQD
    state = tmp_path / "state"
    policy = write_policy(tmp_path / "policy.yaml", bypass="true")
    hooks = f"{IPQD} hooks install --policy {policy} --state-dir {state}"
    assert lab.server.sh(hooks).returncode == 0
    ipqd = daemon(policy, "--no-hooks")
    before = lab.server.sh("iptables-nft-save").stdout
    write_policy(tmp_path / "policy.yaml", num=3, bypass="true", udp=5001)
    (tmp_path / "policy.d").mkdir(mode=0o755)
    fragment = tmp_path / "policy.d" / "10-open.yaml"
    fragment.write_text("rules:\n  - {name: open, proto: udp, dport: 5002, action: accept}\n")
    os.chmod(fragment, 0o664)
    refused = lab.server.sh(hooks, check=False)
    assert refused.returncode == 1
    assert "10-open.yaml" in refused.stderr and "hooks left as they are" in refused.stderr
    assert _rules(lab.server.sh("iptables-nft-save").stdout) == _rules(before)
    assert ipqd.reload().startswith("reload refused")
    result = flood_while(lab, lambda: None, pps=2000, seconds=1.0)
    assert result["denied"] == 0 and result["allowed"] == result["sent"] // 2, result


def test_no_code_comes_from_the_working_directory_or_pythonpath(lab, tmp_path):
    """Root starts ipqd from a directory holding a yaml.py, with that
    directory in PYTHONPATH too: the processes ipqd starts (the loader, at
    start and at each reload, and the workers) never import it."""
    planted = tmp_path / "planted"
    planted.mkdir()
    marker = tmp_path / "imported"
    for name in ("yaml", "dpkt"):
        (planted / f"{name}.py").write_text(f"open({str(marker)!r}, 'a').write('{name}\\n')\n")
    policy = write_policy(tmp_path / "policy.yaml")
    ipqd = RunningIpqd(lab.server, policy, str(tmp_path / "state"), cwd=str(planted),
                       env={**os.environ, "PYTHONPATH": str(planted)})
    try:
        assert ipqd.reload().startswith("reloaded policy")
        assert udp_probe(lab, 5000) and not udp_probe(lab, 5001)
    finally:
        ipqd.stop()
    assert not marker.exists(), marker.read_text()


def big_policy(path, rules: int = 40000) -> str:
    """The test policy with `rules` more rules after its own: seconds to
    load and compile."""
    text = POLICY % dict(num=0, bypass="false", udp=5000) + "".join(
        f"  - {{name: r{i}, proto: udp, src: 10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}, "
        f"dport: 7000, action: drop}}\n" for i in range(rules))
    path.write_text(text)
    os.chmod(path, 0o644)
    return str(path)


def test_a_pending_reload_wedges_nothing(lab, daemon, tmp_path):
    """A reload of a policy that takes seconds to load and compile: meanwhile
    a killed worker is restarted at once, its queue keeps dropping what the
    running policy drops, and SIGTERM is obeyed within seconds."""
    ipqd = daemon()
    big_policy(tmp_path / "policy.yaml")
    mark = len(ipqd.lines)
    ipqd.signal(signal.SIGHUP)
    time.sleep(0.3)
    (pid,) = worker_pids(ipqd)
    os.kill(pid, signal.SIGKILL)
    ipqd.wait_for(lambda l: l.startswith("ipqd: worker 0 exited"), start=mark, timeout=5)
    assert udp_probe(lab, 5000) and not udp_probe(lab, 5001)
    assert not any(l.startswith("reloaded") for l in ipqd.lines[mark:]), "the reload was quick"
    started = time.monotonic()
    assert ipqd.stop(timeout=10) == 0
    assert time.monotonic() - started < 5
    assert not any(l.startswith("reloaded") for l in ipqd.lines[mark:])


def test_a_load_past_its_time_limit_is_refused(tmp_path):
    from ipqd.daemon import load_in_child
    from ipqd.policy.checked import PolicyRefused
    path = big_policy(tmp_path / "policy.yaml")
    started = time.monotonic()
    with pytest.raises(PolicyRefused) as refused:
        load_in_child(path, timeout=0.5)
    assert time.monotonic() - started < 3
    assert "took longer than 0.5 s" in refused.value.lines[0]


def test_a_fifo_in_place_of_the_policy_is_refused_at_once(lab, daemon, tmp_path):
    ipqd = daemon()
    path = tmp_path / "policy.yaml"
    path.unlink()
    os.mkfifo(path, 0o600)
    started = time.monotonic()
    assert ipqd.reload().startswith("reload refused")
    assert time.monotonic() - started < 5
    assert any("not a regular file (a FIFO)" in l for l in ipqd.lines)
    assert udp_probe(lab, 5000) and not udp_probe(lab, 5001)
