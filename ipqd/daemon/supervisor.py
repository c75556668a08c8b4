"""`ipqd run`: the supervisor. Loads the policy, binds the queues, installs
hooks, and handles signals and systemd.

The supervisor never touches packets: its workers do (ipqd.daemon.pool,
each in a process of its own). It turns their reports into sd_notify
status, watchdog pings and journal entries. Signals only set a flag and
wake the loop (signal.set_wakeup_fd); the loop does the work, so nothing
runs inside a signal handler.

    SIGHUP   reload: load and check the policy; if valid, a new worker per
             slot compiles it beside the running one, then takes over its
             socket and counters (ipqd.daemon.handover); if not, or if a
             new worker fails, the errors go to the journal and the running
             policy stays.
    SIGTERM, SIGINT   stop: workers answer what is pending and unbind,
             installed hooks are removed, exit 0.
    SIGUSR1  one journal entry per rule with its counters.

The control socket (ipqd.control.server, commands in ipqd.daemon.control)
is served from the same loop: a request is read, answered and written
between two rounds, and a reload asked over it is the same reload as
SIGHUP's, answered once it is done.
"""
from __future__ import annotations

import os
import select
import signal
import tempfile
import time
from typing import Dict, List, Optional

from ipqd.control.server import ControlServer, control_group
from ipqd.daemon.control import COMMANDS, merge_counters, snapshot
from ipqd.daemon.decision_log import LOG_ERR, LOG_INFO, LOG_WARNING, DecisionLog, choose_target
from ipqd.daemon.loading import LoadedPolicy, load_in_child, read_hint
from ipqd.daemon.notify import notify, watchdog_interval
from ipqd.daemon.pool import WorkerHandle, WorkerPool
from ipqd.daemon.reload import REPLY_TIMEOUT, Reloader
from ipqd.daemon.sets import SetKeeper, sets_path, send_to
from ipqd.decision.compiler import UNDECIDABLE_NAME
from ipqd.errors import HookError, PolicyRefused, ReloadCalledOff, StartupError
from ipqd.exits import EXIT_FAILED, EXIT_INVALID, EXIT_UNREADABLE
from ipqd.kernel import hooks as hooks_mod
from ipqd.policy.model import Policy

STATUS_EVERY = 2.0
NO_CONTROL = "none"         # --control none: no control socket


class Daemon:
    def __init__(self, args):
        self.path = args.policy
        # --shadow: a candidate deciding beside, instead of the policy's `shadow:`
        shadow = getattr(args, "shadow", None)
        self.shadow_path = os.path.abspath(shadow) if shadow else None
        self.manage_hooks = not args.no_hooks
        self.backend = args.backend
        self.state_dir = args.state_dir
        self.target = choose_target(args.log_target)
        self.log = DecisionLog(self.target)
        self.pool = WorkerPool(self.log, self.target, batch=not getattr(args, "no_batch", False),
                               cache=not getattr(args, "no_cache", False))
        self.policy: Optional[Policy] = None          # without its rules: see LoadedPolicy
        self.rules = 0
        self.installed_backend: Optional[str] = None
        self.hooks_lock = None
        self.signals: List[int] = []
        self.reloads = self.failed_reloads = 0
        self.watchdog = watchdog_interval()           # seconds between pings, or None
        self.last_ping = 0.0
        self.last_reload_error = ""
        self.notify_failed = False                    # said once (tell_systemd)
        self.reloader = Reloader(self)
        # Dynamic sets: the supervisor's copy, on disk, told to each worker.
        self.sets = SetKeeper(sets_path(getattr(args, "sets_file", None)), self.log,
                              send_to(lambda: self.pool.workers))
        self.pool.sets_snapshot = self.sets.snapshots
        self.control_path = getattr(args, "control", None) or os.path.join(self.state_dir,
                                                                           "control")
        self.control_group = getattr(args, "control_group", None)
        self.control: Optional[ControlServer] = None
        self.metrics_textfile = getattr(args, "metrics_textfile", None)
        self.metrics_every = getattr(args, "metrics_every", 15.0)
        self.started = time.monotonic()
        self.started_at = time.time()
        self.policy_digest = ""                       # of its files (ipqd.policy.checked)
        self.policy_loaded_at = 0.0
        self.last_reload: Optional[dict] = None       # the last reload's outcome (status)
        self.last_reload_errors: List[str] = []       # set by the Reloader when it refuses
        self.counters_asked: tuple = (float("-inf"), {})  # when, answers (daemon.control)

    @property
    def workers(self) -> Dict[int, WorkerHandle]:
        return self.pool.workers

    @property
    def pickled(self) -> bytes:
        return self.pool.pickled

    # -------------------------------------------------------- life cycle

    def run(self) -> int:
        try:
            self.start()
        except StartupError as error:
            for line in str(error).splitlines():
                self.log.event(line, LOG_ERR, IPQD_EVENT="start-failed")
            self.shutdown()
            return error.status
        try:
            self.loop()
        except StartupError as error:       # the running policy's workers could not come back
            self.log.event(str(error), LOG_ERR, IPQD_EVENT="stop")
            return EXIT_FAILED
        finally:
            self.shutdown()
        return 0

    def start(self) -> None:
        self.setup_signals()
        try:
            loaded = load_in_child(self.path, waiting=self.startup_waiting,
                                   shadow=self.shadow_path)
        except PolicyRefused as refused:
            raise StartupError("\n".join(refused.lines + [
                f"ipqd: not started: fix the policy, then check it with `ipqd check {self.path}`"]),
                EXIT_INVALID)
        except OSError as error:
            raise StartupError(f"ipqd: cannot read policy {error.filename or self.path}: "
                               f"{error.strerror}{read_hint(error)}", EXIT_UNREADABLE)
        self.keep(loaded)
        self.sets.restore()
        self.policy_loaded_at = time.time()
        self.log_warnings(self.policy)
        # The queues are bound before any hook points at them, and hooks are
        # touched only by the one instance that holds the lock: an instance
        # that cannot start leaves another's rules alone.
        if self.manage_hooks:
            try:
                self.hooks_lock = hooks_mod.hold_lock()
            except HookError as error:
                raise StartupError(f"ipqd: {error}")
        self.pool.start_all(hooks_mod.queue_layout(self.policy.queue), self.startup_waiting)
        if self.manage_hooks:
            self.install_hooks(self.policy)
        if self.control_path != NO_CONTROL:
            gid, warning = control_group(self.control_group)
            if warning:
                self.log.event(warning, LOG_WARNING, IPQD_EVENT="control-group-missing")
            self.control = ControlServer(self.control_path, COMMANDS, self, gid)
            self.control.open()
        queues = sorted(q for w in self.workers.values() for q in w.queues)
        hooks = f"by {self.installed_backend}" if self.installed_backend else \
            "managed outside this process (--no-hooks)"
        shadow = self.policy.shadow
        self.log.event(f"ipqd started: policy {self.path} ({self.rules} rules), "
                       f"queues {_ranges(queues)}, hooks {hooks}" +
                       (f", shadow policy {shadow.path} deciding beside it" if shadow else ""),
                       LOG_INFO, IPQD_EVENT="start", IPQD_POLICY=self.path,
                       IPQD_RULES=str(self.rules), IPQD_POLICY_DIGEST=self.policy.digest,
                       **({"IPQD_SHADOW_POLICY_DIGEST": shadow.digest} if shadow else {}))
        self.tell_systemd("READY=1\n" + self.status_line())

    def startup_waiting(self) -> None:
        if self.stop_asked():
            raise StartupError("ipqd: stopped while starting")

    def keep(self, loaded: LoadedPolicy) -> None:
        self.policy, self.pool.pickled, self.rules = loaded.outline, loaded.pickled, loaded.rules
        self.sets.adopt(loaded.outline)
        self.policy_digest = loaded.outline.digest

    def current(self) -> LoadedPolicy:
        return LoadedPolicy(self.pool.pickled, self.policy, self.rules)

    def log_warnings(self, policy: Policy) -> None:
        for warning in policy.warnings:
            self.log.event(str(warning), LOG_WARNING, IPQD_EVENT="policy-warning")

    def install_hooks(self, policy: Policy) -> None:
        backend = self.backend
        try:
            if backend == "auto":
                backend = hooks_mod.remembered(self.state_dir) or hooks_mod.detect_backend()[0]
            hooks_mod.install_recorded(policy.hooks, policy.queue, backend, self.state_dir)
        except HookError as error:
            raise StartupError(f"ipqd: cannot install hooks: {error}")
        except OSError as error:
            raise StartupError(f"ipqd: cannot record the hooks backend in {self.state_dir}: "
                               f"{error.strerror}")
        self.installed_backend = backend

    def shutdown(self) -> None:
        self.tell_systemd("STOPPING=1")
        if self.control is not None:
            self.control.close()
            self.control = None
        self.pool.stop_all()
        self.sets.close()
        if self.installed_backend:
            try:
                hooks_mod.remove_recorded(self.installed_backend, self.state_dir)
            except Exception as error:
                self.log.event(f"ipqd: could not remove hooks: {error}", LOG_ERR,
                               IPQD_EVENT="stop")
            self.installed_backend = None
        if self.hooks_lock is not None:
            self.hooks_lock.close()
            self.hooks_lock = None
        if self.policy is not None:
            self.log.event("ipqd stopped", LOG_INFO, IPQD_EVENT="stop")
        self.log.close()

    def tell_systemd(self, state: str) -> None:
        """sd_notify; a failed send is said once (a Type=notify start would
        otherwise time out with no reason)."""
        if not notify(state) and not self.notify_failed:
            self.notify_failed = True
            self.log.event(f"ipqd: cannot notify systemd ({state.splitlines()[0]})", LOG_ERR,
                           IPQD_EVENT="notify-failed")

    # -------------------------------------------------------- the loop

    def setup_signals(self) -> None:
        self.wake_r, wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(signum, lambda n, _frame: self.signals.append(n))

    def loop(self) -> None:
        last_status = last_metrics = 0.0
        while True:
            poller = select.poll()
            poller.register(self.wake_r, select.POLLIN)
            for worker in self.workers.values():
                poller.register(worker.conn.fileno(), select.POLLIN)
            wait = self.sets.wait_ms(500)       # at most until the next set entry expires
            if self.control is not None:
                for fd, events in self.control.fds():
                    poller.register(fd, events)
                due = self.control.timeout()
                if due is not None:
                    wait = min(wait, int(due * 1000) + 1 if due else 0)
            ready = poller.poll(wait)
            _drain(self.wake_r)
            self.sets.expire()
            # What came since the last round, each once: a stop first, and one
            # reload for many SIGHUPs (it reads the files as they are now).
            pending, self.signals = self.signals, []
            stop = next((s for s in (signal.SIGTERM, signal.SIGINT) if s in pending), None)
            if stop is not None:
                self.log.event(f"ipqd stopping on {signal.Signals(stop).name}", LOG_INFO,
                               IPQD_EVENT="stop")
                return
            if signal.SIGHUP in pending:
                self.reload()
            if signal.SIGUSR1 in pending:
                self.report_counters()
            if self.control is not None:
                self.control.serve(ready)
            self.pool.read_all()
            now = time.monotonic()
            self.pool.restart_due(now)
            self.tend_watchdog()
            self.pool.reap_retired(now)
            if now - last_status >= STATUS_EVERY:
                self.tell_systemd(self.status_line())
                last_status = now
            if self.metrics_textfile and now - last_metrics >= self.metrics_every:
                self.write_metrics_textfile()
                last_metrics = time.monotonic()

    def stop_asked(self) -> bool:
        """Whether SIGTERM or SIGINT came (the loop acts on it when it is back)."""
        return signal.SIGTERM in self.signals or signal.SIGINT in self.signals

    def keep_alive(self) -> None:
        """While a reload waits: take the running workers' reports (so that
        they count as answering), restart those that died, and feed the
        watchdog. Raises ReloadCalledOff when a stop is asked for."""
        if self.stop_asked():
            raise ReloadCalledOff()
        self.pool.read_all()
        self.pool.restart_due(time.monotonic())
        self.tend_watchdog()

    def tend_watchdog(self) -> None:
        """Ping systemd's watchdog when it is due and every slot has a live,
        reporting worker: from the loop, and while a reload waits."""
        now = time.monotonic()
        if self.watchdog and now - self.last_ping >= self.watchdog and self.pool.healthy(now):
            self.tell_systemd("WATCHDOG=1")
            self.last_ping = now

    # -------------------------------------------------------- reload

    def reload(self) -> dict:
        """SIGHUP, or `ipqd reload`: see ipqd.daemon.reload. The outcome,
        also kept for `status`: "loaded", "refused" (every line why, the
        running policy stays), "partly" (some slots kept the previous
        policy) or "called-off" (a stop came)."""
        loaded, failed, started = self.reloads, self.failed_reloads, time.monotonic()
        self.last_reload_errors = []
        self.reloader.reload()
        self.counters_asked = (float("-inf"), {})
        if self.reloads > loaded:
            outcome = "partly" if self.failed_reloads > failed else "loaded"
        else:
            outcome = "refused" if self.failed_reloads > failed else "called-off"
        errors = list(self.last_reload_errors)
        if outcome in ("refused", "partly") and not errors:
            errors = [self.last_reload_error]
        if outcome == "loaded":
            self.policy_loaded_at = time.time()
        self.last_reload = {
            "outcome": outcome, "at": time.time(), "errors": errors,
            "took": round(time.monotonic() - started, 3),
            "warnings": [str(w) for w in self.policy.warnings] if outcome == "loaded" else []}
        return self.last_reload

    # -------------------------------------------------------- reports

    def report_counters(self) -> None:
        answers = self.pool.ask_counters(REPLY_TIMEOUT)
        rules = merge_counters(answers)
        totals: Dict[str, int] = {}
        for answer in answers.values():
            for key, value in answer.stats.items():
                totals[key] = totals.get(key, 0) + value
        self.log.event("stats: " + " ".join(f"{k}={v}" for k, v in sorted(totals.items())),
                       LOG_INFO, IPQD_EVENT="stats",
                       **{f"IPQD_{k.upper()}": str(v) for k, v in totals.items()})
        for name, entry in rules.items():
            self.log.event(f"rule {name}: {entry['hits']} hits ({entry['accepted']} accepted, "
                           f"{entry['dropped']} dropped)", LOG_INFO, IPQD_EVENT="counters",
                           IPQD_RULE=name, IPQD_HITS=str(entry["hits"]),
                           IPQD_ACCEPTED=str(entry["accepted"]),
                           IPQD_DROPPED=str(entry["dropped"]))

    def write_metrics_textfile(self) -> None:
        """The figures for node_exporter's textfile collector, replaced
        atomically (a temporary file beside it, renamed over it); a failure
        is said at err and tried again next time."""
        from ipqd.daemon.metrics import exposition
        path = self.metrics_textfile
        folder = os.path.dirname(os.path.abspath(path))
        try:
            text = exposition(snapshot(self), "prometheus")
            fd, temporary = tempfile.mkstemp(prefix=".ipqd-metrics.", dir=folder)
            try:
                with os.fdopen(fd, "w") as out:
                    out.write(text)
                os.chmod(temporary, 0o644)
                os.replace(temporary, path)
            except BaseException:
                os.unlink(temporary)
                raise
        except OSError as error:
            self.log.event(f"ipqd: cannot write metrics to {path}: {error.strerror}", LOG_ERR,
                           IPQD_EVENT="metrics-failed")

    def status_line(self) -> str:
        t = self.pool.totals()
        text = (f"STATUS={t.get('packets', 0)} packets, {t.get('accepted', 0)} accepted, "
                f"{t.get('dropped', 0)} dropped")
        if t.get("not_enforced"):
            text += f" ({t['not_enforced']} of the accepted not enforced: monitor mode)"
        text += f"; policy {self.path} ({self.rules} rules)"
        if self.last_reload_error:
            text += f"; last failed reload: {self.last_reload_error}"
        return text


def _ranges(numbers: List[int]) -> str:
    if not numbers:
        return "none"
    if numbers == list(range(numbers[0], numbers[-1] + 1)) and len(numbers) > 1:
        return f"{numbers[0]}-{numbers[-1]}"
    return ",".join(map(str, numbers))


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except (BlockingIOError, OSError):
        pass


def run_daemon(args) -> int:
    return Daemon(args).run()
