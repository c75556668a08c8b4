"""The messages between the supervisor and its child processes, and the
order in which a worker may send them.

Every message is a type of its own (frozen dataclasses, pickled over the
child's Channel), so a receiver dispatches on the type and reads fields by
name. A worker's messages follow WORKER_ORDER, the way h11 declares its
connection states: `WorkerPhase.accept` moves a worker's phase on, and a
message out of order, or of no known type, raises ProtocolError.

    supervisor -> worker:  Stop, HandOver, Go, TakeOver, AskCounters, SetChange
    worker -> supervisor:  Ready, Failed, Compiled, Stats, Counters, Stopped, Handed
    loader -> supervisor:  Loaded, Refused, Unreadable
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, FrozenSet, List, Optional, Tuple

from ipqd.errors import ProtocolError


# ---------------------------------------------------------------- a worker's start

# How a worker comes to its socket (its start's `mode`).
BIND = "bind"               # a new socket: bind the queues
SUCCESSOR = "successor"     # a reload's new worker: the running worker hands the socket over
RECOVER = "recover"         # the socket of a worker that died: its queues are still bound


@dataclass
class WorkerConfig:
    """What a worker needs besides the policy and its socket (its start's
    first message)."""
    index: int
    workers: int                                  # how many share the policy's log rate
    queues: Dict[int, Optional[str]]              # queue number -> conntrack state (or None)
    log_target: str
    rcvbuf: int = 8 << 20
    batch: bool = True
    cache: bool = True                            # the verdict cache (ipqd.decision.verdict_cache)
    # The dynamic sets' entries at its start: name -> ipqd.decision.address_set
    # snapshot; SetChange messages follow for every change after it.
    sets: Optional[dict] = None


# ---------------------------------------------------------------- to a worker

@dataclass(frozen=True)
class Stop:
    """Answer what is queued, unbind, exit."""


@dataclass(frozen=True)
class HandOver:
    """Stop reading the socket (a successor takes it), say Stopped, then Handed."""


@dataclass(frozen=True)
class Go:
    """To a compiled successor: take the socket, set up as `settings` says
    the predecessor had it."""
    settings: Optional[dict]


@dataclass(frozen=True)
class TakeOver:
    """Count on from a predecessor's (or a dead worker's) counters."""
    carried: dict


@dataclass(frozen=True)
class AskCounters:
    """Answer with Counters."""


@dataclass(frozen=True)
class SetChange:
    """A dynamic set changed (ipqd.daemon.sets): `op` add or del `entries`
    (ipqd.decision.address_set entries), or flush the set."""
    name: str
    op: str
    entries: tuple = ()


# ---------------------------------------------------------------- from a worker

@dataclass(frozen=True)
class Ready:
    index: int
    queues: List[int]


@dataclass(frozen=True)
class Failed:
    """The worker cannot go on; `detail` says why. It exits."""
    index: int
    detail: str


@dataclass(frozen=True)
class Compiled:
    """A successor has compiled the new policy and waits for Go or Stop."""
    index: int


@dataclass(frozen=True)
class Stats:
    """Once a period: the totals, and every counter a replacement needs."""
    index: int
    stats: Dict[str, int]
    carried: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Counters:
    index: int
    counters: dict
    stats: Dict[str, int]


@dataclass(frozen=True)
class Stopped:
    """Handing over: it no longer reads the socket; its queue settings."""
    index: int
    settings: dict


@dataclass(frozen=True)
class Handed:
    """Its counters, for the successor; it exits next."""
    index: int
    carried: dict


# ---------------------------------------------------------------- from the loader

@dataclass(frozen=True)
class Loaded:
    pickled: bytes              # the whole policy, for the workers (ipqd.policy.transfer)
    outline: bytes              # the policy without its rules, pickled
    rules: int


@dataclass(frozen=True)
class Refused:
    lines: List[str]


@dataclass(frozen=True)
class Unreadable:
    errno: int
    strerror: str
    filename: Optional[str]


# ---------------------------------------------------------------- a worker's order

# A worker's phases, from the supervisor's side.
STARTING = "starting"       # mode bind or recover: until Ready
COMPILING = "compiling"     # a successor: until Compiled
COMPILED = "compiled"       # a successor told Go (or still waiting for it): until Ready
SERVING = "serving"
STOPPED = "stopped"         # handing over: until Handed
CLOSED = "closed"

# (phase, message type) -> the next phase. Nothing else may come.
WORKER_ORDER: Dict[Tuple[str, type], str] = {
    (STARTING, Ready): SERVING,
    (STARTING, Failed): CLOSED,
    (COMPILING, Compiled): COMPILED,
    (COMPILING, Failed): CLOSED,
    (COMPILED, Ready): SERVING,
    (COMPILED, Failed): CLOSED,
    (SERVING, Stats): SERVING,
    (SERVING, Counters): SERVING,
    (SERVING, Stopped): STOPPED,
    (STOPPED, Handed): CLOSED,
}
WORKER_MESSAGES: FrozenSet[type] = frozenset(kind for _, kind in WORKER_ORDER)


class WorkerPhase:
    """Where one worker is in WORKER_ORDER."""

    def __init__(self, index: int, phase: str):
        self.index = index
        self.phase = phase

    def accept(self, message: object) -> None:
        """Move on with `message`; raises ProtocolError naming the phase and
        the message when WORKER_ORDER does not allow it."""
        kind = type(message)
        if kind not in WORKER_MESSAGES:
            raise ProtocolError(f"worker {self.index} sent {message!r}, which is no message")
        following = WORKER_ORDER.get((self.phase, kind))
        if following is None:
            allowed = ", ".join(sorted(k.__name__ for p, k in WORKER_ORDER if p == self.phase))
            raise ProtocolError(f"worker {self.index} sent {kind.__name__} while {self.phase} "
                                f"(expected {allowed or 'nothing'})")
        self.phase = following


TO_WORKER: FrozenSet[type] = frozenset({Stop, HandOver, Go, TakeOver, AskCounters, SetChange})
FROM_LOADER: FrozenSet[type] = frozenset({Loaded, Refused, Unreadable})


def expect(message: object, kinds: FrozenSet[type], sender: str) -> object:
    """`message` when it is one of `kinds`; raises ProtocolError otherwise."""
    if type(message) not in kinds:
        raise ProtocolError(f"{sender} sent {message!r}; expected one of "
                            f"{', '.join(sorted(k.__name__ for k in kinds))}")
    return message
