"""Hostile or broken policies against the daemon: a bad reload keeps the
running policy, says where the problem is, and is quick; policy.d fragments
that others could change, or that change under the loader, are refused."""
from __future__ import annotations

import os
import re
import subprocess
import time

import pytest

import ipqd.policy.loader
from daemon_harness import IPQD, RunningIpqd, udp_probe
from ipqd.daemon.messages import Compiled, Failed, HandOver
from ipqd.policy.checked import PolicyRefused, load_checked
from test_daemon import write_policy

FRAGMENT = "rules:\n  - {name: frag-udp, proto: udp, dport: 7000, action: accept}\n"
LAUGHS = "version: 1\n" + "".join(
    f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9 if i else ['lol'] * 9)}]\n" for i in range(9)) \
    + "default: {action: accept}\n"


@pytest.fixture
def policy_dir(tmp_path):
    """A policy with a policy.d holding one fragment."""
    path = write_policy(tmp_path / "policy.yaml")
    (tmp_path / "policy.d").mkdir(mode=0o755)
    fragment = tmp_path / "policy.d" / "10-frag.yaml"
    fragment.write_text(FRAGMENT)
    os.chmod(fragment, 0o644)
    return tmp_path, path, fragment


def refusal(path: str) -> str:
    with pytest.raises(PolicyRefused) as caught:
        load_checked(path)
    return "\n".join(caught.value.lines)


# ------------------------------------------------------------------ policy.d, in-process

def test_a_sound_policy_d_loads(policy_dir):
    _, path, _ = policy_dir
    assert [r.name for r in load_checked(path).rules][-1] == "frag-udp"


def test_fragment_writable_by_group_or_others_is_refused(policy_dir):
    _, path, fragment = policy_dir
    for mode in (0o664, 0o646):
        os.chmod(fragment, mode)
        assert f"{fragment} is writable by group or others" in refusal(path)


def test_fragment_owned_by_another_user_is_refused(policy_dir):
    _, path, fragment = policy_dir
    os.chown(fragment, 4321, 4321)
    assert f"{fragment} is owned by uid 4321, not root" in refusal(path)


def test_policy_d_writable_by_others_is_refused(policy_dir):
    tmp, path, _ = policy_dir
    os.chmod(tmp / "policy.d", 0o777)
    assert "policy.d is writable by group or others" in refusal(path)


def test_symlink_out_of_policy_d_is_refused_and_one_inside_is_not(policy_dir, tmp_path_factory):
    tmp, path, fragment = policy_dir
    outside = tmp_path_factory.mktemp("elsewhere") / "evil.yaml"
    outside.write_text(FRAGMENT.replace("frag-udp", "evil"))
    os.chmod(outside, 0o644)
    link = tmp / "policy.d" / "20-evil.yaml"
    link.symlink_to(outside)
    assert f"{link} is a symbolic link to {outside}, outside" in refusal(path)
    link.unlink()
    hidden = tmp / "policy.d" / ".kept"
    hidden.write_text(FRAGMENT.replace("frag-udp", "inside"))
    os.chmod(hidden, 0o644)
    link.symlink_to(".kept")
    assert [r.name for r in load_checked(path).rules][-2:] == ["frag-udp", "inside"]


def test_dangling_fragment_link_is_a_clean_refusal(policy_dir):
    tmp, path, _ = policy_dir
    (tmp / "policy.d" / "30-gone.yaml").symlink_to(tmp / "policy.d" / "nowhere")
    with pytest.raises((PolicyRefused, OSError)) as caught:
        load_checked(path)
    assert "nowhere" in str(caught.value) or "30-gone" in str(caught.value)


@pytest.mark.parametrize("change", ["vanishes", "changes", "appears"])
def test_fragment_that_changes_while_read_refuses_the_load(policy_dir, monkeypatch, change):
    tmp, path, fragment = policy_dir
    real_load = ipqd.policy.loader.load

    def load_while_changing(name):
        if change == "vanishes":
            fragment.unlink()
            return real_load(name)
        policy = real_load(name)
        if change == "changes":
            fragment.write_text(FRAGMENT.replace("7000", "7001"))
        else:
            new = tmp / "policy.d" / "99-new.yaml"
            new.write_text(FRAGMENT.replace("frag-udp", "new"))
            os.chmod(new, 0o644)
        return policy

    monkeypatch.setattr(ipqd.policy.loader, "load", load_while_changing)
    assert "its files changed while they were read; reload again" in refusal(path)


def test_fragment_that_vanishes_between_listing_and_reading(policy_dir, monkeypatch):
    _, path, fragment = policy_dir
    real_read = ipqd.policy.loader.read_text

    def read_text(name):
        if name == str(fragment):
            fragment.unlink()
        return real_read(name)

    monkeypatch.setattr(ipqd.policy.loader, "read_text", read_text)
    assert re.search(r"10-frag\.yaml:1:1: cannot read this fragment: No such file", refusal(path))


def test_policy_that_cuts_the_host_off_is_a_warning_from_check(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text("version: 1\nhooks: [{chain: input}]\ndefault: {action: drop}\n"
                    "rules:\n  - {name: ssh, proto: tcp, dport: 22, action: accept}\n")
    result = subprocess.run([IPQD, "check", str(path)], capture_output=True, text=True)
    assert result.returncode == 0
    assert re.search(r"policy\.yaml:3:1: warning: default drops input traffic and no rule "
                     r"accepts established connections", result.stdout), result.stdout


# ------------------------------------------------------------------ the daemon

BAD_POLICIES = {
    "billion-laughs": (LAUGHS, r"policy\.yaml:2:5: YAML anchors \(&l0\) are not allowed"),
    "5-MiB": ("version: 1\n#" + "x" * (5 << 20) + "\n",
              r"policy\.yaml:1:1: policy file is too large \(more than 4194304 bytes\)"),
    "python-tag": ("version: 1\ndefault: !!python/object/apply:os.system [reboot]\n",
                   r"policy\.yaml:2:10: YAML tags like '.*' are not allowed in a policy"),
    "tab": ("version: 1\ndefault:\n\t{action: accept}\n", r"policy\.yaml:3:1: YAML syntax error"),
    "not-utf8": ("version: 1\n# \udcff\n", r"policy\.yaml:\d+:\d+: policy file is not UTF-8"),
}


@pytest.mark.kernel
def test_bad_reloads_keep_the_running_policy(lab, policy_dir):
    """Each bad policy is refused within 5 s with a file:line:col error, and
    the policy that was running goes on deciding (udp 5000 and 7000 pass, 5001 not)."""
    tmp, path, fragment = policy_dir
    good = open(path).read()
    ipqd = RunningIpqd(lab.server, path, str(tmp / "state"))
    try:
        assert udp_probe(lab, 7000) and udp_probe(lab, 5000) and not udp_probe(lab, 5001)
        tried = []
        for name, (text, error) in BAD_POLICIES.items():
            with open(path, "w", encoding="utf-8", errors="surrogateescape") as f:
                f.write(text)
            mark = len(ipqd.lines)
            started = time.monotonic()
            assert ipqd.reload().startswith("reload refused"), name
            tried.append((name, time.monotonic() - started))
            assert any(re.search(error, line) for line in ipqd.lines[mark:]), (name, ipqd.lines[mark:])
        with open(path, "w") as f:
            f.write(good)
        outside = tmp / "outside.yaml"
        outside.write_text(FRAGMENT)
        os.chmod(outside, 0o644)
        for name, spoil, mend in (
                ("fragment-group-writable", lambda: os.chmod(fragment, 0o664),
                 lambda: os.chmod(fragment, 0o644)),
                ("fragment-foreign-owner", lambda: os.chown(fragment, 4321, 0),
                 lambda: os.chown(fragment, 0, 0)),
                ("fragment-link-outside", lambda: (tmp / "policy.d" / "50-x.yaml").symlink_to(outside),
                 lambda: (tmp / "policy.d" / "50-x.yaml").unlink())):
            spoil()
            started = time.monotonic()
            assert ipqd.reload().startswith("reload refused"), name
            tried.append((name, time.monotonic() - started))
            mend()
        print("bad reloads (seconds to refuse):", ", ".join(f"{n} {t:.2f}" for n, t in tried))
        assert all(t < 5 for _, t in tried), tried
        assert udp_probe(lab, 7000) and udp_probe(lab, 5000) and not udp_probe(lab, 5001)
        assert ipqd.reload().startswith("reloaded policy")     # and a good one still loads
        assert ipqd.process.poll() is None
    finally:
        ipqd.stop()


def supervisor(tmp_path):
    """A Daemon (the supervisor) that has loaded the test policy, with no
    workers: the tests give it fake ones."""
    import argparse
    from ipqd.daemon import Daemon, load_in_child
    path = tmp_path / "policy.yaml"
    write_policy(path)
    daemon = Daemon(argparse.Namespace(policy=str(path), no_hooks=True, backend="auto",
                                       state_dir=str(tmp_path), log_target="stderr"))
    daemon.keep(load_in_child(str(path)))
    return daemon, path


class FakeConn:
    def __init__(self, replies=()):
        self.sent, self.replies = [], list(replies)

    def send(self, message):
        self.sent.append(message)

    def poll(self, timeout=0.0):
        return bool(self.replies)

    def recv(self):
        return self.replies.pop(0)

    def fileno(self):
        return -1

    def close(self):
        pass


class FakeProcess:
    exitcode = None
    pid = 0x7FFFFFFF                # no such process: reading its CPUs fails, as for a dead one

    def __init__(self, alive=True):
        self.alive = alive

    def is_alive(self):
        return self.alive

    def join(self, timeout=None):
        pass

    killed = False

    def kill(self):
        self.killed, self.alive = True, False


def test_a_reload_whose_new_worker_fails_leaves_the_running_workers_alone(tmp_path):
    """The loader took the policy, but one new worker failed to compile it:
    the other new worker is stopped, the running workers are never asked to
    hand over, and the running policy stays the one kept."""
    from ipqd.daemon import WorkerHandle
    daemon, path = supervisor(tmp_path)
    running = daemon.pickled
    daemon.pool.workers = {i: WorkerHandle(i, FakeProcess(), FakeConn(), {i: None}) for i in (0, 1)}
    successors = []

    def spawn(index, count, queues, mode="bind"):
        assert mode == "successor" and daemon.pickled != running      # the new policy
        reply = Compiled(0) if index == 0 else Failed(1, "MemoryError: ")
        successors.append(WorkerHandle(index, FakeProcess(), FakeConn([reply]), queues, mode))
        return successors[-1]
    daemon.pool.spawn = spawn
    path.write_text(path.read_text().replace("dport: 5000", "dport: 5001"))
    daemon.reload()
    assert [w.conn.sent for w in daemon.workers.values()] == [[], []]
    assert [(s.conn.sent, s.process.killed) for s in successors] == [([], True), ([], True)]
    assert daemon.pickled == running and (daemon.reloads, daemon.failed_reloads) == (0, 1)
    assert daemon.last_reload_error == "reload failed in worker 1: MemoryError: "
    daemon.log.close()



def test_a_worker_that_dies_before_it_stops_reading_is_recovered_on_its_socket(tmp_path):
    """The running worker died instead of answering "handover": whatever it
    had received may be unanswered in the kernel, so its successor (which
    would cover those ids with its batch verdicts) is stopped and the slot
    restarts with the new policy as a recovering worker, which sends those
    packets through the hook again."""
    from ipqd.daemon import WorkerHandle
    daemon, path = supervisor(tmp_path)
    process = FakeProcess()

    class DyingConn(FakeConn):
        def send(self, message):
            super().send(message)
            if isinstance(message, HandOver):
                process.alive = False
    daemon.pool.workers = {0: WorkerHandle(0, process, DyingConn(), {0: None})}
    daemon.pool.sockets = {0: None}         # the slot's socket, held by the supervisor
    started = []

    def spawn(index, count, queues, mode="bind"):
        handle = WorkerHandle(index, FakeProcess(), FakeConn([Compiled(index)]), queues, mode)
        started.append((mode, handle))
        if mode != "successor":
            daemon.workers[index] = handle
        return handle
    daemon.pool.spawn = spawn
    path.write_text(path.read_text().replace("dport: 5000", "dport: 5001"))
    daemon.reload()
    (first, successor), (then, restarted) = started
    assert (first, then) == ("successor", "recover")
    assert successor.conn.sent == [] and successor.process.killed      # never told to go
    assert daemon.workers == {0: restarted} and daemon.reloads == 1
    daemon.log.close()


def test_a_worker_that_dies_while_its_successor_compiles_calls_the_reload_off(tmp_path):
    """Its slot must restart afresh on a new socket (the loop's worker_died),
    so the successor, which holds the old socket, is stopped first and the
    running policy stays."""
    from ipqd.daemon import WorkerHandle
    daemon, path = supervisor(tmp_path)
    running = daemon.pickled
    dead = WorkerHandle(0, FakeProcess(alive=False), FakeConn(), {0: None})
    daemon.pool.workers = {0: dead}
    successors = []

    def spawn(index, count, queues, mode="bind"):
        assert mode == "successor"
        successors.append(WorkerHandle(index, FakeProcess(), FakeConn(), queues, mode))  # compiling
        return successors[-1]
    daemon.pool.spawn = spawn
    path.write_text(path.read_text().replace("dport: 5000", "dport: 5001"))
    daemon.reload()
    assert successors[0].conn.sent == [] and successors[0].process.killed
    assert dead.conn.sent == []
    assert daemon.pickled == running and daemon.failed_reloads == 1
    assert daemon.last_reload_error == "reload failed in worker 0: exited during the reload"
    assert daemon.workers == {0: dead}          # for the loop to restart
    daemon.log.close()


def test_a_long_reload_keeps_the_watchdog_fed(tmp_path, monkeypatch):
    """A large policy on a slow machine compiles for longer than systemd's
    watchdog period: the supervisor pings while it waits, as its loop would."""
    import ipqd.daemon.supervisor
    from ipqd.daemon import WorkerHandle
    daemon, path = supervisor(tmp_path)
    daemon.watchdog = 0.01
    notified = []
    monkeypatch.setattr(ipqd.daemon.supervisor, "notify",
                        lambda state: notified.append(state) or True)
    daemon.pool.workers = {0: WorkerHandle(0, FakeProcess(), FakeConn(), {0: None})}

    class SlowConn(FakeConn):
        polls = 0

        def poll(self, timeout=0.0):
            self.polls += 1
            if self.polls < 20:         # 20 waits of 50 ms: about a second
                time.sleep(timeout)
                return False
            return bool(self.replies)

    def spawn(index, count, queues, mode="bind"):
        return WorkerHandle(index, FakeProcess(), SlowConn([Failed(index, "no")]), queues, mode)
    daemon.pool.spawn = spawn
    path.write_text(path.read_text().replace("dport: 5000", "dport: 5001"))
    daemon.reload()
    assert notified.count("WATCHDOG=1") >= 10
    daemon.log.close()


def test_a_new_worker_that_dies_after_compiling_calls_the_reload_off(tmp_path):
    """Handing over to it would leave the queue unread: the running workers
    are never asked, and the running policy stays."""
    from ipqd.daemon import WorkerHandle
    daemon, path = supervisor(tmp_path)
    running = daemon.pickled
    daemon.pool.workers = {0: WorkerHandle(0, FakeProcess(), FakeConn(), {0: None})}
    successors = []

    def spawn(index, count, queues, mode="bind"):
        successors.append(WorkerHandle(index, FakeProcess(alive=False),
                                       FakeConn([Compiled(index)]), queues, mode))
        return successors[-1]
    daemon.pool.spawn = spawn
    path.write_text(path.read_text().replace("dport: 5000", "dport: 5001"))
    daemon.reload()
    assert daemon.workers[0].conn.sent == [] and successors[0].conn.sent == []
    assert daemon.pickled == running and daemon.failed_reloads == 1
    assert daemon.last_reload_error == \
        "reload failed in worker 0: its new worker exited before the hand-over"
    daemon.log.close()


def test_a_failed_sd_notify_is_said_once(tmp_path, monkeypatch, capfd):
    """A Type=notify start whose notifications cannot be sent would time out
    with no reason: the first failure is logged at err, once."""
    daemon, _ = supervisor(tmp_path)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "no-such-socket"))
    daemon.tell_systemd("READY=1")
    daemon.tell_systemd("STATUS=x")
    daemon.log.close()
    lines = [l for l in capfd.readouterr().err.splitlines() if "cannot notify systemd" in l]
    assert lines == ["ipqd: cannot notify systemd (READY=1)"]
