"""Loading a policy for the supervisor, in a short-lived process of its own.

A large policy's YAML nodes and model take a hundred megabytes of heap
while they are read; the supervisor gets only their pickle, so its own
heap never grows with the policy, and a load that hangs (a FIFO in place
of the file, a hung name lookup, a stalled mount) is killed at its time
limit instead of wedging the daemon.
"""
from __future__ import annotations

import errno
import gc
import os
import pickle
import time
from typing import Callable, Optional

from ipqd.daemon import child
from ipqd.daemon.messages import FROM_LOADER, Loaded, Refused, Unreadable, expect
from ipqd.errors import PolicyRefused, ProtocolError, StartupError
from ipqd.policy.checked import load_checked
from ipqd.policy.model import Policy

LOAD_TIMEOUT = 60.0        # reading and checking a policy; past it the load is refused


class LoadedPolicy:
    """A checked policy as the supervisor keeps it: the pickle the workers
    compile from, and the policy without its rules for everything else."""

    def __init__(self, pickled: bytes, outline: Policy, rules: int):
        self.pickled = pickled
        self.outline = outline          # queue, hooks, default, logging, warnings; rules=()
        self.rules = rules


def load_in_child(path: str, waiting: Optional[Callable[[], None]] = None,
                  timeout: float = LOAD_TIMEOUT, shadow: Optional[str] = None) -> LoadedPolicy:
    """load_checked in a short-lived process (ipqd.daemon.child); `waiting`
    is called about twice a second until it answers, and may raise to call
    the load off (the process is killed). Raises as load_checked does,
    PolicyRefused when the load runs past `timeout` s, and StartupError when
    the loading process cannot start or dies without an answer (not the
    policy's fault: the installation's, or the system's). `shadow`: a
    candidate's path, instead of the policy's own `shadow:` (ipqd run --shadow).
    """
    try:
        loading = child.start("load", path, shadow)
    except OSError as error:
        raise StartupError(f"ipqd: cannot start the process that loads the policy ({error}): "
                           f"is the ipqd installation complete?") from None
    deadline = time.monotonic() + timeout
    try:
        while not loading.conn.poll(min(0.5, max(0.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                raise PolicyRefused([f"refusing policy {path}: reading it took longer than "
                                     f"{timeout:g} s (is it on a stalled mount, or "
                                     f"naming a user or group whose lookup hangs?)"])
            if waiting is not None:
                waiting()
        answer = expect(loading.conn.recv(), FROM_LOADER, "the loading process")
    except (EOFError, OSError, ProtocolError):
        answer = None
    finally:
        loading.conn.close()
        if loading.is_alive():
            loading.kill()
        loading.join()
    if answer is None:
        raise StartupError(f"ipqd: the process loading {path} exited ({loading.exitcode}) "
                           f"without an answer; its error, if any, is in the log above")
    if isinstance(answer, Loaded):
        return LoadedPolicy(answer.pickled, pickle.loads(answer.outline), answer.rules)
    if isinstance(answer, Unreadable):
        raise OSError(answer.errno, answer.strerror, answer.filename)
    raise PolicyRefused(answer.lines)


def load_policy_job(path: str, conn, shadow: Optional[str] = None) -> None:
    """What the loading process does: load_checked, its answer sent on `conn`."""
    from ipqd.policy import transfer
    # The process exits when done: nothing to collect, and the collector
    # would walk the whole node tree again and again as it grows.
    gc.disable()
    try:
        from ipqd.decision.verify import case_problems
        policy = load_checked(path, verify=case_problems, shadow=shadow)
        conn.send(Loaded(transfer.pack(policy),
                         pickle.dumps(transfer.outline(policy), pickle.HIGHEST_PROTOCOL),
                         len(policy.rules)))
    except PolicyRefused as refused:
        conn.send(Refused(refused.lines))
    except OSError as error:
        conn.send(Unreadable(error.errno, error.strerror, error.filename))
    conn.close()


def read_hint(error: OSError) -> str:
    """What to do when this process may not read the policy: under the
    shipped unit it reads through the group ipqd."""
    if error.errno != errno.EACCES:
        return ""
    name = error.filename or "the policy"
    return (f" (this process runs as uid {os.getuid()}; under the ipqd unit, let group ipqd "
            f"read it: chgrp ipqd {name} && chmod g+r {name})")
