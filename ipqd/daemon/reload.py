"""A reload: load the policy again, then put it live or refuse it.

SIGHUP reaches the supervisor's loop, which calls Reloader.reload. The
policy is loaded in a process of its own (ipqd.daemon.loading) while the
running workers go on; a refused policy is logged line by line at err and
the running one stays. An accepted one goes live by a hand-over on the
same sockets (HandOverMachine, driven here), or, when the queue numbers or
settings change, by binding anew. Hooks move only for a policy that went
live, and move back when it did not.
"""
from __future__ import annotations

import os
import select
import time
from typing import Dict, List, Optional

from ipqd.daemon.handover import (RUNNING, SUCCESSOR, CallOff, Died, Done, HandOverMachine,
                                  KeptPrevious, Message, Promote, Recover, Retire, SendTo,
                                  StopAsked, TimedOut)
from ipqd.daemon.loading import LoadedPolicy, load_in_child, read_hint
from ipqd.daemon.decision_log import LOG_ERR, LOG_INFO
from ipqd.daemon.pool import WorkerHandle
from ipqd.errors import HookError, PolicyRefused, ProtocolError, ReloadCalledOff, StartupError
from ipqd.kernel import hooks as hooks_mod
from ipqd.policy.model import Policy

REPLY_TIMEOUT = 60.0       # a child's answer during a reload


class Reloader:
    """The reload of one supervisor (`daemon`, an ipqd.daemon.supervisor.Daemon)."""

    def __init__(self, daemon):
        self.daemon = daemon


    def reload(self) -> None:
        daemon = self.daemon
        daemon.tell_systemd(f"RELOADING=1\nMONOTONIC_USEC={int(time.monotonic() * 1e6)}")
        started = time.monotonic()
        try:
            loaded = load_in_child(daemon.path, waiting=daemon.keep_alive,
                                   shadow=daemon.shadow_path)
        except ReloadCalledOff:
            daemon.log.event("reload called off: stopping", LOG_INFO, IPQD_EVENT="reload-failed")
            return
        except (PolicyRefused, OSError, StartupError) as error:
            if isinstance(error, PolicyRefused):
                lines = error.lines
            elif isinstance(error, OSError):
                lines = [f"cannot read policy {error.filename or daemon.path}: "
                         f"{error.strerror}{read_hint(error)}"]
            else:
                lines = [str(error)]
            self.refuse(lines)
            return
        daemon.log_warnings(loaded.outline)
        old_digest = daemon.policy.digest if daemon.policy is not None else ""
        problem = self.apply(loaded)
        if problem:
            daemon.failed_reloads += 1
            daemon.last_reload_error = problem
            daemon.log.event(f"{problem}; the running policy ({daemon.rules} rules) stays",
                             LOG_ERR, IPQD_EVENT="reload-failed")
        else:
            daemon.reloads += 1
            daemon.log.event(f"reloaded policy {daemon.path} ({daemon.rules} rules) in "
                             f"{(time.monotonic() - started) * 1000:.0f} ms", LOG_INFO,
                             IPQD_EVENT="reloaded", IPQD_RULES=str(daemon.rules),
                             IPQD_POLICY_DIGEST=loaded.outline.digest,
                             IPQD_OLD_POLICY_DIGEST=old_digest,
                             **({"IPQD_SHADOW_POLICY_DIGEST": loaded.outline.shadow.digest}
                                if loaded.outline.shadow is not None else {}))
        daemon.tell_systemd("READY=1\n" + daemon.status_line())

    def refuse(self, lines: List[str]) -> None:
        """A policy that did not load: every line at err, the running one stays."""
        daemon = self.daemon
        daemon.failed_reloads += 1
        daemon.last_reload_error = lines[0]
        daemon.last_reload_errors = list(lines)
        for line in lines:
            daemon.log.event(line, LOG_ERR, IPQD_EVENT="reload-error")
        daemon.log.event(f"reload refused: {len(lines)} problem(s) in {daemon.path}; "
                         f"the running policy ({daemon.rules} rules) stays",
                         LOG_ERR, IPQD_EVENT="reload-failed",
                         IPQD_POLICY_DIGEST=daemon.policy.digest if daemon.policy else "")
        daemon.tell_systemd("READY=1\n" + daemon.status_line())

    def apply(self, loaded: LoadedPolicy) -> str:
        """Put a loaded policy live; "" when it is, else what went wrong
        (then the running policy, and its hooks, stay)."""
        daemon = self.daemon
        policy, running = loaded.outline, daemon.current()
        layout_changed = (hooks_mod.queue_layout(policy.queue)
                          != hooks_mod.queue_layout(running.outline.queue)
                          or policy.queue != running.outline.queue)
        hooks_changed = policy.hooks != running.outline.hooks or layout_changed
        if daemon.manage_hooks and hooks_changed:
            try:
                hooks_mod.install_recorded(policy.hooks, policy.queue, daemon.installed_backend,
                                           daemon.state_dir)
            except HookError as error:
                return f"reload refused: cannot update hooks: {error}"
        daemon.keep(loaded)
        problem = self.rebind() if layout_changed else self.hand_over()
        if problem:
            daemon.keep(running)
            if layout_changed:
                daemon.pool.start_all(hooks_mod.queue_layout(running.outline.queue), lambda: None)
            if daemon.manage_hooks and hooks_changed:
                self.restore_hooks(running.outline)
        return problem

    def rebind(self) -> str:
        """New queue numbers or settings: the workers bind anew (a short gap,
        covered by the hooks' bypass when the policy asks for it)."""
        pool = self.daemon.pool
        pool.stop_all()
        try:
            pool.start_all(hooks_mod.queue_layout(self.daemon.policy.queue), lambda: None)
        except StartupError as error:
            pool.stop_all()
            return f"reload failed: {error}"
        return ""

    def restore_hooks(self, running: Policy) -> None:
        daemon = self.daemon
        try:
            hooks_mod.install_recorded(running.hooks, running.queue, daemon.installed_backend,
                                       daemon.state_dir)
        except HookError as error:
            daemon.log.event(f"cannot put the running policy's hooks back: {error}",
                             LOG_ERR, IPQD_EVENT="reload-failed")

    # -------------------------------------------------------- the hand-over's I/O

    def hand_over(self) -> str:
        """Drive a HandOverMachine over the running workers: "" when every
        slot handed over (or kept its policy, said on its own), else the
        first problem (then nothing was handed)."""
        running = dict(self.daemon.workers)
        machine = HandOverMachine(list(running), REPLY_TIMEOUT)
        successors: Dict[int, WorkerHandle] = {}
        try:
            for index, worker in sorted(running.items()):
                successors[index] = self.daemon.pool.spawn(index, len(running), worker.queues,
                                                    SUCCESSOR)
        except StartupError as error:
            for successor in successors.values():
                successor.end(0)
            return f"reload failed: {error}"
        deadline = time.monotonic() + REPLY_TIMEOUT
        while not machine.done:
            events = self.hand_over_events(machine, running, successors, deadline)
            for event in events:
                try:
                    actions = machine.receive(event)
                except ProtocolError as error:      # a bug: end the hand-over as if timed out
                    self.daemon.log.event(f"ipqd: {error}", LOG_ERR, IPQD_EVENT="reload-failed")
                    actions = machine.receive(TimedOut())
                if actions:
                    deadline = time.monotonic() + REPLY_TIMEOUT
                outcome = self.carry_out(actions, running, successors)
                if outcome is not None:
                    return f"reload failed in {outcome[0]}" if outcome else ""
            self.daemon.tend_watchdog()
        return ""

    def hand_over_events(self, machine: HandOverMachine, running: Dict[int, WorkerHandle],
                         successors: Dict[int, WorkerHandle], deadline: float) -> List[object]:
        """What happened since the last look, as the machine's events."""
        events: List[object] = []
        _wait_readable([h.conn for h in list(successors.values()) + list(running.values())
                        if not h.reported_dead], 0.05)
        for role, handles in ((SUCCESSOR, successors), (RUNNING, running)):
            for index, handle in sorted(handles.items()):
                if handle.conn.poll():
                    alive, said = handle.take()
                else:
                    alive, said = handle.process.is_alive(), []
                messages = [Message(role, index, m) for m in said]
                died = []
                if not alive and not handle.reported_dead:
                    handle.reported_dead = True
                    died = [Died(role, index)]
                # A successor that is gone is known to be before any hand-over
                # begins; a running worker's last words come before its end.
                events += died + messages if role == SUCCESSOR else messages + died
        if self.daemon.stop_asked():
            events.append(StopAsked())
        if time.monotonic() > deadline:
            events.append(TimedOut())
        return events

    def carry_out(self, actions: List[object], running: Dict[int, WorkerHandle],
                  successors: Dict[int, WorkerHandle]) -> Optional[List[str]]:
        """Do what the machine asked; its Done's problems once it is done."""
        for action in actions:
            if isinstance(action, SendTo):
                handle = (running if action.role == RUNNING else successors)[action.index]
                try:
                    handle.conn.send(action.message)
                except OSError:
                    pass                # it died: seen as Died
            elif isinstance(action, Promote):
                old, new = running[action.index], successors[action.index]
                new.stats, new.carried, new.seen = old.stats, old.carried, time.monotonic()
                self.daemon.workers[action.index] = new
                _share_cpus(old, new)
            elif isinstance(action, Retire):
                self.daemon.pool.retire(running[action.index])
            elif isinstance(action, CallOff):
                successors[action.index].end(0)
            elif isinstance(action, Recover):
                self.recover_slot(running[action.index])
            elif isinstance(action, KeptPrevious):
                self.daemon.failed_reloads += 1
                self.daemon.last_reload_error = f"worker {action.index} kept the previous policy"
                self.daemon.log.event(f"ipqd: the new worker {action.index} exited before the "
                                      "hand-over; that worker keeps the previous policy until "
                                      "the next reload", LOG_ERR, IPQD_EVENT="reload-failed")
            elif isinstance(action, Done):
                return action.problems
        return None

    def recover_slot(self, worker: WorkerHandle) -> None:
        """The running worker died (or fell silent) before it stopped reading:
        it is ended, and the pool restarts the slot as for any dead worker,
        with a worker that recovers its socket and decides again what it
        left unanswered."""
        worker.stop()
        worker.failure = worker.failure or "it did not hand its socket over"
        self.daemon.pool.died(worker)


def _share_cpus(old: WorkerHandle, new: WorkerHandle) -> None:
    """The successor starts on its predecessor's CPUs: its packets' caches
    are warm there. Best effort: a sandbox may forbid it."""
    try:
        os.sched_setaffinity(new.process.pid, os.sched_getaffinity(old.process.pid))
    except OSError:
        pass


def _wait_readable(conns: List, timeout: float) -> None:
    """Until one of `conns` can be read (or has ended), at most `timeout` s."""
    poller = select.poll()
    for conn in conns:
        if conn.fileno() >= 0:
            poller.register(conn.fileno(), select.POLLIN)
    poller.poll(int(timeout * 1000))
