"""`ipqd run`: the supervisor. Loads the policy, installs hooks, runs the
workers, and handles signals and systemd.

The supervisor never touches packets: it starts one worker per queue of the
policy (ipqd.worker, in a process of its own: ipqd.child), holds each
worker's netlink socket so that a reload's new worker can take it over,
and turns their reports into sd_notify status, watchdog pings and journal
entries. Signals
only set a flag and wake the loop (signal.set_wakeup_fd); the loop does the
work, so nothing runs inside a signal handler.

    SIGHUP   reload: load and check the policy; if valid, a new worker per
             queue compiles it beside the running one, then takes over its
             socket and counters (see ipqd.worker); if not, or if a new
             worker fails, the errors go to the journal and the running
             policy stays.
    SIGTERM, SIGINT   stop: workers answer what is pending and unbind,
             installed hooks are removed, exit 0.
    SIGUSR1  one journal entry per rule with its counters.
"""
from __future__ import annotations

import gc
import os
import pickle
import select
import signal
import socket
import time
from typing import Callable, Dict, List, Optional, Tuple

from ipqd import child
from ipqd import hooks as hooks_mod
from ipqd.decision_log import LOG_ERR, LOG_INFO, LOG_WARNING, DecisionLog, choose_target
from ipqd.nfnetlink import NETLINK_NETFILTER
from ipqd.policy.checked import PolicyRefused, load_checked
from ipqd.policy.model import Policy

READY_TIMEOUT = 15.0
REPLY_TIMEOUT = 60.0
LOAD_TIMEOUT = 60.0        # reading and checking a policy; past it the load is refused
STABLE_AFTER = 5.0         # a worker that lived this long counts as started well
BACKOFF_FIRST = 0.25       # a worker failing again soon waits this long before its restart,
BACKOFF_MAX = 5.0          # doubling up to this
FRESH_SOCKET_AFTER = 5     # quick failures in a row, after which the slot gets a new socket
STATUS_EVERY = 2.0
STALE_AFTER = 5.0          # a worker silent this long is wedged: no watchdog ping
RETIRE_WITHIN = 10.0       # a handed-over worker has this long to write its log and exit


def notify(state: str) -> None:
    """sd_notify; a no-op when not started by systemd."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return
    try:
        from systemd import daemon
        daemon.notify(state)
    except Exception:
        pass


class StartupError(Exception):
    """The daemon cannot start; the message says why and what to do."""


class ReloadCalledOff(Exception):
    """A stop was asked for while a reload waited: the reload ends unfinished."""


class LoadedPolicy:
    """A checked policy as the supervisor keeps it: the pickle the workers
    compile from, and the policy without its rules for everything else."""

    def __init__(self, pickled: bytes, outline: Policy, rules: int):
        self.pickled = pickled
        self.outline = outline          # queue, hooks, default, logging, warnings; rules=()
        self.rules = rules


def load_in_child(path: str, waiting: Optional[Callable[[], None]] = None,
                  timeout: float = LOAD_TIMEOUT) -> LoadedPolicy:
    """load_checked in a short-lived process (ipqd.child); `waiting` is
    called about twice a second until it answers, and may raise to call
    the load off (the process is killed).

    A large policy's YAML nodes and model take a hundred megabytes of heap
    while they are read; the supervisor gets only their pickle, so its own
    heap never grows with the policy. A load that takes longer than
    `timeout` seconds (a FIFO in place of the file, a hung name lookup, a
    stalled mount) is killed and refused. Raises as load_checked does (and
    PolicyRefused when the loading process dies or runs out of time).
    """
    try:
        loading = child.start("load", path)
    except OSError as error:
        raise PolicyRefused([f"refusing policy {path}: cannot start the process loading it "
                             f"({error}); is the ipqd installation complete?"]) from None
    deadline = time.monotonic() + timeout
    try:
        while not loading.conn.poll(min(0.5, max(0.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                raise PolicyRefused([f"refusing policy {path}: reading it took longer than "
                                     f"{timeout:.0f} s (is it a FIFO, on a stalled mount, or "
                                     f"naming a user or group whose lookup hangs?)"])
            if waiting is not None:
                waiting()
        answer = loading.conn.recv()
    except (EOFError, OSError):
        answer = ("refused", [f"refusing policy {path}: the process loading it exited"])
    finally:
        loading.conn.close()
        if loading.is_alive():
            loading.kill()
        loading.join()
    kind = answer[0]
    if kind == "loaded":
        return LoadedPolicy(answer[1], pickle.loads(answer[2]), answer[3])
    if kind == "oserror":
        raise OSError(answer[1], answer[2], answer[3])
    raise PolicyRefused(answer[1])


def load_policy_job(path: str, conn) -> None:
    """What the loading process does: load_checked, its answer sent on `conn`."""
    from ipqd.policy import transfer
    # The process exits when done: nothing to collect, and the collector
    # would walk the whole node tree again and again as it grows.
    gc.disable()
    try:
        policy = load_checked(path)
        conn.send(("loaded", transfer.pack(policy),
                   pickle.dumps(transfer.outline(policy), pickle.HIGHEST_PROTOCOL),
                   len(policy.rules)))
    except PolicyRefused as refused:
        conn.send(("refused", refused.lines))
    except OSError as error:
        conn.send(("oserror", error.errno, error.strerror, error.filename))
    conn.close()


class WorkerHandle:
    def __init__(self, index: int, process, conn, queues: Dict[int, Optional[str]]):
        self.index = index
        self.process = process
        self.conn = conn
        self.queues = queues
        self.stats: Dict[str, int] = {}
        self.carried: Optional[dict] = None     # its latest counters, for a restart (carry_over)
        self.failure = ""                       # why it said it cannot go on
        self.started = self.seen = time.monotonic()


class Daemon:
    def __init__(self, args):
        self.path = args.policy
        self.manage_hooks = not args.no_hooks
        self.backend = args.backend
        self.state_dir = args.state_dir
        self.batch = not getattr(args, "no_batch", False)
        self.cache = not getattr(args, "no_cache", False)
        self.target = choose_target(args.log_target)
        self.log = DecisionLog(self.target)
        self.policy: Optional[Policy] = None          # without its rules: see LoadedPolicy
        self.pickled = b""                            # the whole policy, for the workers
        self.rules = 0
        self.workers: Dict[int, WorkerHandle] = {}
        self.sockets: Dict[int, socket.socket] = {}  # worker index -> its netlink socket
        self.installed_backend: Optional[str] = None
        self.signals: List[int] = []
        self.reloads = self.failed_reloads = 0
        self.watchdog = _watchdog_interval()          # seconds between pings, or None
        self.retiring: List[tuple] = []               # (since, handle) of handed-over workers
        self.last_ping = 0.0
        self.last_reload_error = ""
        self.hooks_lock: Optional[socket.socket] = None
        self.failures: Dict[int, int] = {}            # worker index -> quick failures in a row
        self.restarts: Dict[int, tuple] = {}          # worker index -> (due, queues, carried)

    # -------------------------------------------------------- life cycle

    def run(self) -> int:
        try:
            self.start()
        except StartupError as error:
            for line in str(error).splitlines():
                self.log.event(line, LOG_ERR, IPQD_EVENT="start-failed")
            self.shutdown()
            return 1
        try:
            self.loop()
        finally:
            self.shutdown()
        return 0

    def start(self) -> None:
        try:
            loaded = load_in_child(self.path)
        except PolicyRefused as refused:
            raise StartupError("\n".join(refused.lines + ["ipqd: not started: fix the policy, "
                                                          f"then check it with `ipqd check {self.path}`"]))
        except OSError as error:
            raise StartupError(f"ipqd: cannot read policy {error.filename or self.path}: {error.strerror}")
        self.keep(loaded)
        for warning in self.policy.warnings:
            self.log.event(str(warning), LOG_WARNING, IPQD_EVENT="policy-warning")
        # The queues are bound before any hook points at them, and hooks are
        # touched only by the one instance that holds the lock: an instance
        # that cannot start leaves another's rules alone.
        if self.manage_hooks:
            try:
                self.hooks_lock = hooks_mod.hold_lock()
            except hooks_mod.HookError as error:
                raise StartupError(f"ipqd: {error}")
        self.start_workers()
        if self.manage_hooks:
            self.install_hooks(self.policy)
        self.setup_signals()
        queues = sorted(q for w in self.workers.values() for q in w.queues)
        self.log.event(f"ipqd started: policy {self.path} ({self.rules} rules), "
                       f"queues {_ranges(queues)}, "
                       f"hooks {'by ' + self.installed_backend if self.installed_backend else 'left to the administrator'}",
                       LOG_INFO, IPQD_EVENT="start", IPQD_POLICY=self.path,
                       IPQD_RULES=str(self.rules))
        notify("READY=1\n" + self.status_line())

    def keep(self, loaded: LoadedPolicy) -> None:
        self.policy, self.pickled, self.rules = loaded.outline, loaded.pickled, loaded.rules

    def install_hooks(self, policy: Policy) -> None:
        backend = self.backend
        try:
            if backend == "auto":
                backend = hooks_mod.remembered(self.state_dir) or hooks_mod.detect_backend()[0]
            hooks_mod.install(policy.hooks, policy.queue, backend)
            hooks_mod.remember(backend, self.state_dir)
        except hooks_mod.HookError as error:
            raise StartupError(f"ipqd: cannot install hooks: {error}")
        except OSError as error:
            raise StartupError(f"ipqd: cannot record the hooks backend in {self.state_dir}: "
                               f"{error.strerror}")
        self.installed_backend = backend

    def start_workers(self) -> None:
        layout = hooks_mod.queue_layout(self.policy.queue)
        per_worker: Dict[int, Dict[int, Optional[str]]] = {}
        for number, (index, state) in layout.items():
            per_worker.setdefault(index, {})[number] = state
        for index, queues in sorted(per_worker.items()):
            self.spawn(index, len(per_worker), queues)
        deadline = time.monotonic() + READY_TIMEOUT
        waiting = set(self.workers)
        while waiting:
            for worker in list(self.workers.values()):
                if worker.index in waiting and worker.conn.poll(0.05):
                    kind, index, detail = worker.conn.recv()
                    if kind == "failed":
                        raise StartupError(f"ipqd: worker {index} cannot start: {detail}")
                    if kind == "ready":
                        waiting.discard(index)
            if time.monotonic() > deadline:
                raise StartupError(f"ipqd: workers {sorted(waiting)} did not start in {READY_TIMEOUT:.0f} s")

    def spawn(self, index: int, count: int, queues: Dict[int, Optional[str]],
              mode: str = "bind") -> WorkerHandle:
        """Start worker `index` (modes as ipqd.worker.worker_main's): "bind"
        on a new socket; "successor" of the running one, on its socket (the
        caller hands over; see reload); "recover" on the socket of one that
        died, whose queues stay bound meanwhile."""
        try:
            if mode == "bind":
                self.close_socket(index)
                sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
                sock.bind((0, 0))
                self.sockets[index] = sock
            fd = self.sockets[index].fileno()
            process = child.start("worker", index, count, queues, self.target, self.batch,
                                  self.cache, fd, mode, payload=self.pickled, fds=(fd,))
        except OSError as error:
            raise StartupError(f"ipqd: cannot start worker {index}: {error}")
        handle = WorkerHandle(index, process, process.conn, queues)
        if mode != "successor":
            self.workers[index] = handle
        return handle

    def close_socket(self, index: int) -> None:
        """Let go of a worker's socket: once no process holds it, the kernel
        unbinds its queues (and drops what a dead worker left unanswered)."""
        sock = self.sockets.pop(index, None)
        if sock is not None:
            sock.close()

    def stop_workers(self) -> None:
        self.restarts.clear()
        for worker in self.workers.values():
            try:
                worker.conn.send(("stop",))
            except (OSError, EOFError):
                pass
        for worker in self.workers.values():
            _end(worker, 5)
        self.workers = {}
        self.reap_retired(float("inf"))
        for index in list(self.sockets):
            self.close_socket(index)

    def shutdown(self) -> None:
        notify("STOPPING=1")
        self.stop_workers()
        if self.installed_backend:
            try:
                hooks_mod.remove(self.installed_backend)
                hooks_mod.forget(self.state_dir)
            except Exception as error:
                self.log.event(f"ipqd: could not remove hooks: {error}", LOG_ERR, IPQD_EVENT="stop")
            self.installed_backend = None
        if self.hooks_lock is not None:
            self.hooks_lock.close()
            self.hooks_lock = None
        if self.policy is not None:
            self.log.event("ipqd stopped", LOG_INFO, IPQD_EVENT="stop")
        self.log.close()

    # -------------------------------------------------------- the loop

    def setup_signals(self) -> None:
        self.wake_r, wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(signum, lambda n, _frame: self.signals.append(n))

    def loop(self) -> None:
        last_status = 0.0
        poller = select.poll()
        poller.register(self.wake_r, select.POLLIN)
        registered = set()
        while True:
            for worker in self.workers.values():
                if worker.conn.fileno() not in registered:
                    poller.register(worker.conn.fileno(), select.POLLIN)
                    registered.add(worker.conn.fileno())
            poller.poll(500)
            _drain(self.wake_r)
            # What came since the last round, each once: a stop first, and one
            # reload for many SIGHUPs (it reads the files as they are now).
            pending, self.signals = self.signals, []
            for signum in (signal.SIGTERM, signal.SIGINT):
                if signum in pending:
                    self.log.event(f"ipqd stopping on {signal.Signals(signum).name}", LOG_INFO,
                                   IPQD_EVENT="stop")
                    return
            if signal.SIGHUP in pending:
                self.reload()
            if signal.SIGUSR1 in pending:
                self.report_counters()
            for worker in list(self.workers.values()):
                self.read_worker(worker)
            for fd in list(registered):
                if fd not in {w.conn.fileno() for w in self.workers.values()}:
                    poller.unregister(fd)
                    registered.discard(fd)
            now = time.monotonic()
            self.restart_due(now)
            self.tend_watchdog()
            self.reap_retired(now)
            if now - last_status >= STATUS_EVERY:
                notify(self.status_line())
                last_status = now

    def reap_retired(self, now: float) -> None:
        """Handed-over workers that have exited; one still there after
        RETIRE_WITHIN is killed (it has nothing left but its log to write)."""
        for entry in list(self.retiring):
            since, worker = entry
            if worker.process.is_alive() and now - since < RETIRE_WITHIN:
                continue
            _end(worker, 1)
            self.retiring.remove(entry)

    def keep_alive(self) -> None:
        """While a reload waits: take the running workers' reports (so that
        they count as answering), restart those that died, and feed the
        watchdog. Raises ReloadCalledOff when a stop is asked for."""
        if self.stop_asked():
            raise ReloadCalledOff()
        for worker in list(self.workers.values()):
            self.read_worker(worker)
        self.restart_due(time.monotonic())
        self.tend_watchdog()

    def stop_asked(self) -> bool:
        """Whether SIGTERM or SIGINT came (the loop acts on it when it is back)."""
        return signal.SIGTERM in self.signals or signal.SIGINT in self.signals

    def tend_watchdog(self) -> None:
        """Ping systemd's watchdog when it is due and the workers are answering:
        from the loop, and while a reload waits (a large policy on a slow
        machine can take longer than the watchdog's period)."""
        now = time.monotonic()
        if self.watchdog and now - self.last_ping >= self.watchdog and self.healthy(now):
            notify("WATCHDOG=1")
            self.last_ping = now

    def read_worker(self, worker: WorkerHandle, want: str = "") -> Optional[tuple]:
        """Handle what a worker said, restarting it if it died; return its
        first message of kind `want`."""
        alive, wanted = self.take_reports(worker, want)
        if not alive:
            self.worker_died(worker)
        return wanted

    def take_reports(self, worker: WorkerHandle, want: str = "") -> Tuple[bool, Optional[tuple]]:
        """Read what a worker has said, up to its first message of kind
        `want`: stats are kept. (Whether it lives, that message or None.)"""
        try:
            while worker.conn.poll():
                message = worker.conn.recv()
                worker.seen = time.monotonic()
                if message[0] == want:
                    return worker.process.is_alive(), message
                if message[0] == "stats":
                    worker.stats, worker.carried = message[2], message[3]
                elif message[0] == "failed":
                    worker.failure = message[2]
        except (EOFError, OSError):
            return False, None
        return worker.process.is_alive(), None

    def worker_died(self, worker: WorkerHandle) -> None:
        """A worker that dies is restarted on the same socket, so its queues
        stay bound and the kernel holds their packets (up to the queue's
        length) for the new one: none bypasses the policy meanwhile. It
        starts from the counters of the dead one's last report. One that
        keeps failing waits longer each time before its restart."""
        if self.workers.get(worker.index) is not worker:
            return
        worker.process.join(1)
        worker.conn.close()
        now = time.monotonic()
        index = worker.index
        quick = now - worker.started < STABLE_AFTER
        failures = self.failures[index] = self.failures.get(index, 0) + 1 if quick else 1
        delay = 0.0 if failures == 1 else min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (failures - 2))
        reason = worker.failure or _exit_reason(worker.process.exitcode)
        when = f"in {delay:.2g} s ({failures} failures in a row)" if delay else "at once"
        self.log.event(f"ipqd: worker {index} exited: {reason}; restarting it {when}",
                       LOG_ERR, IPQD_EVENT="worker-died", IPQD_WORKER=str(index))
        del self.workers[index]
        self.restarts[index] = (now + delay, worker.queues, worker.carried)
        self.restart_due(now)

    def restart_due(self, now: float) -> None:
        """Start the workers whose restart is due (worker_died)."""
        for index, (due, queues, carried) in sorted(self.restarts.items()):
            if due > now:
                continue
            del self.restarts[index]
            # A socket that keeps failing its workers is made anew (the
            # queues are unbound a moment, and what they held is lost).
            mode = "bind" if self.failures.get(index, 0) >= FRESH_SOCKET_AFTER \
                or index not in self.sockets else "recover"
            try:
                handle = self.spawn(index, len(self.workers) + len(self.restarts) + 1, queues, mode)
            except StartupError as error:
                self.log.event(str(error), LOG_ERR, IPQD_EVENT="worker-died")
                self.restarts[index] = (now + BACKOFF_MAX, queues, carried)
                continue
            handle.carried = carried
            if carried is not None:
                try:
                    handle.conn.send(("take_over", carried))
                except OSError:
                    pass                # it died: the loop sees it

    def healthy(self, now: float) -> bool:
        """Every queue has a live worker that reported lately."""
        return not self.restarts and all(now - w.seen < STALE_AFTER and w.process.is_alive()
                                         for w in self.workers.values())

    # -------------------------------------------------------- reload

    def reload(self) -> None:
        notify(f"RELOADING=1\nMONOTONIC_USEC={int(time.monotonic() * 1e6)}")
        started = time.monotonic()
        try:
            loaded = load_in_child(self.path, waiting=self.keep_alive)
        except ReloadCalledOff:
            self.log.event("reload called off: stopping", LOG_INFO, IPQD_EVENT="reload-failed")
            return
        except (PolicyRefused, OSError) as error:
            lines = error.lines if isinstance(error, PolicyRefused) else [
                f"cannot read policy {error.filename or self.path}: {error.strerror}"]
            self.failed_reloads += 1
            self.last_reload_error = lines[0]
            for line in lines:
                self.log.event(line, LOG_ERR, IPQD_EVENT="reload-error")
            self.log.event(f"reload refused: {len(lines)} problem(s) in {self.path}; "
                           f"the running policy ({self.rules} rules) stays",
                           LOG_ERR, IPQD_EVENT="reload-failed")
            notify("READY=1\n" + self.status_line())
            return
        policy = loaded.outline
        for warning in policy.warnings:
            self.log.event(str(warning), LOG_WARNING, IPQD_EVENT="policy-warning")
        layout_changed = (hooks_mod.queue_layout(policy.queue) != hooks_mod.queue_layout(self.policy.queue)
                          or policy.queue != self.policy.queue)
        if self.manage_hooks and (policy.hooks != self.policy.hooks or layout_changed):
            try:
                hooks_mod.install(policy.hooks, policy.queue, self.installed_backend)
            except hooks_mod.HookError as error:
                self.log.event(f"reload refused: cannot update hooks: {error}", LOG_ERR,
                               IPQD_EVENT="reload-failed")
                notify("READY=1\n" + self.status_line())
                return
        running = LoadedPolicy(self.pickled, self.policy, self.rules)
        self.keep(loaded)
        if layout_changed:
            # New queue numbers or settings: the workers bind anew (a short gap,
            # covered by the hooks' bypass when the policy asks for it).
            self.stop_workers()
            try:
                self.start_workers()
            except StartupError as error:
                self.log.event(str(error), LOG_ERR, IPQD_EVENT="reload-failed")
                self.keep(running)
                self.start_workers()
                notify("READY=1\n" + self.status_line())
                return
        else:
            problems = self.hand_over()
            if problems:
                # The new workers are gone and the running ones never knew.
                self.keep(running)
                if self.manage_hooks and policy.hooks != running.outline.hooks:
                    try:
                        hooks_mod.install(running.outline.hooks, running.outline.queue,
                                          self.installed_backend)
                    except hooks_mod.HookError as error:
                        self.log.event(f"cannot put the running policy's hooks back: {error}",
                                       LOG_ERR, IPQD_EVENT="reload-failed")
                self.failed_reloads += 1
                self.last_reload_error = f"reload failed in {problems[0]}"
                self.log.event(f"{self.last_reload_error}; the running policy ({self.rules} "
                               f"rules) stays", LOG_ERR, IPQD_EVENT="reload-failed")
                notify("READY=1\n" + self.status_line())
                return
        self.reloads += 1
        self.log.event(f"reloaded policy {self.path} ({self.rules} rules) in "
                       f"{(time.monotonic() - started) * 1000:.0f} ms", LOG_INFO,
                       IPQD_EVENT="reloaded", IPQD_RULES=str(self.rules))
        notify("READY=1\n" + self.status_line())

    def hand_over(self) -> List[str]:
        """Start a successor of every worker with the policy just kept; once
        all have compiled, each running worker hands its socket's queue and
        counters over to its successor. Returns the problems (then nothing
        was handed over and the running workers go on)."""
        count = len(self.workers)
        successors: Dict[int, WorkerHandle] = {}
        problems: List[str] = []
        try:
            for index, worker in sorted(self.workers.items()):
                successors[index] = self.spawn(index, count, worker.queues, "successor")
        except StartupError as error:
            problems.append(str(error))
        waiting = set(successors) if not problems else set()
        deadline = time.monotonic() + REPLY_TIMEOUT
        while waiting and not problems:
            for index in sorted(waiting):
                message = self.read_successor(successors[index], 0.05)
                if message is None:
                    continue
                if message[0] == "compiled":
                    waiting.discard(index)
                else:
                    problems.append(f"worker {index}: {message[2]}")
            # The running workers go on reporting meanwhile. One that dies
            # calls the reload off: its slot restarts afresh (the loop's
            # worker_died), which needs the successor off its socket first.
            for index, worker in sorted(self.workers.items()):
                if not self.take_reports(worker)[0]:
                    problems.append(f"worker {index}: exited during the reload")
            if self.stop_asked():
                problems.append("a stop was asked for")
            self.tend_watchdog()
            if time.monotonic() > deadline:
                problems.append(f"workers {sorted(waiting)}: no compiled policy in "
                                f"{REPLY_TIMEOUT:.0f} s")
        if not problems:
            problems = [f"worker {index}: its new worker exited before the hand-over"
                        for index, successor in sorted(successors.items())
                        if not successor.process.is_alive()]
        if problems:
            for successor in successors.values():
                _call_off(successor)
            return problems
        for index, successor in sorted(successors.items()):
            self.hand_over_one(self.workers[index], successor)
        return []

    def read_successor(self, successor: WorkerHandle, timeout: float) -> Optional[tuple]:
        """A successor's "compiled" or "failed" (also for one that died)."""
        try:
            if not successor.conn.poll(timeout):
                if successor.process.is_alive():
                    return None
                return ("failed", successor.index, f"exited ({successor.process.exitcode})")
            return successor.conn.recv()
        except (EOFError, OSError):
            return ("failed", successor.index, "exited before it had compiled")

    def hand_over_one(self, worker: WorkerHandle, successor: WorkerHandle) -> None:
        """The running worker stops after answering what it has received, and
        the successor starts at once on the socket, where packets wait
        meanwhile, and on the same CPUs. The counters follow: the old worker
        sends them after it stopped, and the successor adds them up."""
        if not successor.process.is_alive():
            # Gone since it compiled: the running worker keeps its queue (and
            # the previous policy) rather than leave the queue unread.
            _call_off(successor)
            self.failed_reloads += 1
            self.last_reload_error = f"worker {worker.index} kept the previous policy"
            self.log.event(f"ipqd: the new worker {worker.index} exited before the hand-over; "
                           "that worker keeps the previous policy until the next reload",
                           LOG_ERR, IPQD_EVENT="reload-failed")
            return
        try:
            os.sched_setaffinity(successor.process.pid, os.sched_getaffinity(worker.process.pid))
        except OSError:
            pass                    # a sandbox may forbid it; or a worker is gone (below)
        try:
            worker.conn.send(("handover",))
        except OSError:
            pass                    # gone: seen as no "stopped" below
        stopped = self._await(worker, "stopped")
        if stopped is None:
            # It died first: a worker recovering the socket judges again
            # what it had received and left unanswered.
            _call_off(successor)
            _stop_child(worker)
            self.log.event(f"ipqd: worker {worker.index} did not hand over; restarting it",
                           LOG_ERR, IPQD_EVENT="worker-died")
            del self.workers[worker.index]
            self.spawn(worker.index, len(self.workers) + 1, worker.queues, "recover")
            return
        successor.stats, successor.carried = worker.stats, worker.carried
        successor.seen = time.monotonic()
        self.workers[worker.index] = successor
        try:
            # With the old worker's queue settings: it sets up the queue only
            # if its own differ (an acknowledgement can be lost under load).
            successor.conn.send(("go", stopped[2]))
        except OSError:
            pass                    # it died: the loop restarts it, on a new socket
        handed = self._await(worker, "handed")
        if handed is None:
            self.log.event(f"ipqd: worker {worker.index} exited before it handed its counters "
                           "over; they start again from zero", LOG_ERR, IPQD_EVENT="worker-died")
        else:
            successor.carried = handed[2]
            try:
                successor.conn.send(("take_over", handed[2]))
            except OSError:
                pass
        # It exits by itself once its log is written; the loop reaps it.
        self.retiring.append((time.monotonic(), worker))

    def _await(self, worker: WorkerHandle, kind: str) -> Optional[tuple]:
        """The worker's next message of `kind`; None if it dies or stays
        silent first."""
        deadline = time.monotonic() + REPLY_TIMEOUT
        while time.monotonic() < deadline:
            if worker.conn.poll(0.05):
                alive, message = self.take_reports(worker, kind)
                if message is not None or not alive:
                    return message
            elif not worker.process.is_alive():
                return None
            self.tend_watchdog()
        return None

    def ask_workers(self, message: tuple, reply: str) -> Dict[int, tuple]:
        for worker in self.workers.values():
            worker.conn.send(message)
        answers: Dict[int, tuple] = {}
        deadline = time.monotonic() + REPLY_TIMEOUT
        while len(answers) < len(self.workers) and time.monotonic() < deadline:
            for worker in list(self.workers.values()):
                if worker.index not in answers and worker.conn.poll(0.01):
                    got = self.read_worker(worker, want=reply)
                    if got is not None:
                        answers[worker.index] = got
        return answers

    # -------------------------------------------------------- reports

    def report_counters(self) -> None:
        answers = self.ask_workers(("counters",), "counters")
        rules: Dict[str, Dict[str, int]] = {}
        default = {"hits": 0, "accepted": 0, "dropped": 0}
        for _, _, counters, _ in answers.values():
            for name, entry in counters["rules"].items():
                total = rules.setdefault(name, {"hits": 0, "accepted": 0, "dropped": 0})
                for key in total:
                    total[key] += entry[key]
            for key in default:
                default[key] += counters["default"][key]
        totals: Dict[str, int] = {}
        for _, _, _, stats in answers.values():
            for key, value in stats.items():
                totals[key] = totals.get(key, 0) + value
        self.log.event("stats: " + " ".join(f"{k}={v}" for k, v in sorted(totals.items())),
                       LOG_INFO, IPQD_EVENT="stats",
                       **{f"IPQD_{k.upper()}": str(v) for k, v in totals.items()})
        for name, entry in list(rules.items()) + [("default", default)]:
            self.log.event(f"rule {name}: {entry['hits']} hits ({entry['accepted']} accepted, "
                           f"{entry['dropped']} dropped)", LOG_INFO, IPQD_EVENT="counters",
                           IPQD_RULE=name, IPQD_HITS=str(entry["hits"]),
                           IPQD_ACCEPTED=str(entry["accepted"]), IPQD_DROPPED=str(entry["dropped"]))

    def totals(self) -> Dict[str, int]:
        total: Dict[str, int] = {}
        for worker in self.workers.values():
            for key, value in worker.stats.items():
                total[key] = total.get(key, 0) + value
        return total

    def status_line(self) -> str:
        t = self.totals()
        text = (f"STATUS={t.get('packets', 0)} packets, {t.get('accepted', 0)} accepted, "
                f"{t.get('dropped', 0)} dropped; policy {self.path} "
                f"({self.rules} rules)")
        if self.last_reload_error:
            text += f"; last failed reload: {self.last_reload_error}"
        return text


def _call_off(successor: WorkerHandle) -> None:
    """End a successor that was not told "go": it never read the socket, so
    killing it loses nothing, and it may be deep in a compile."""
    _end(successor, 0)


def _stop_child(handle: WorkerHandle) -> None:
    try:
        handle.conn.send(("stop",))
    except OSError:
        pass
    _end(handle, 5)


def _end(handle: WorkerHandle, wait: float) -> None:
    """Give a child `wait` seconds to exit, kill it if it has not, close its pipe."""
    if wait:
        handle.process.join(wait)
    if handle.process.is_alive():
        handle.process.kill()
        handle.process.join(2)
    handle.conn.close()


def _exit_reason(code: Optional[int]) -> str:
    """A child's exit status in words."""
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def _ranges(numbers: List[int]) -> str:
    if not numbers:
        return "none"
    if numbers == list(range(numbers[0], numbers[-1] + 1)) and len(numbers) > 1:
        return f"{numbers[0]}-{numbers[-1]}"
    return ",".join(map(str, numbers))


def _watchdog_interval() -> Optional[float]:
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except (BlockingIOError, OSError):
        pass


def run_daemon(args) -> int:
    return Daemon(args).run()
