"""A reload's hand-over as a state machine, with no processes in it.

Once the policy is loaded, every running worker gets a successor that
compiles the new policy beside it. When all have compiled, each running
worker in turn stops reading its socket (Stopped), its successor is told
to Go on the same socket, and the old worker's counters follow (Handed).
A failure before anything was handed calls the whole reload off; once
hand-overs have begun, each slot ends as well as it can.

Feed `HandOverMachine.receive` what happened (a message, a death, a stop
asked for, a time-out) and carry out the actions it returns, in order. It
is tested with messages alone (tests/pure/test_handover.py); the
supervisor's driver (ipqd.daemon.supervisor) does the I/O.

    phase        event                         actions
    COMPILING    successor Compiled (all)      SendTo(running, HandOver) for the first slot
    COMPILING    successor Failed / died,      CallOff every successor; Done(problems)
                 running died, stop, time-out
    HANDING      running Stopped               SendTo(successor, Go); Promote
    HANDING      running Handed                SendTo(successor, TakeOver); Retire; next slot
    HANDING      running died before Stopped   CallOff; Recover (a worker recovers the socket)
    HANDING      running died after Stopped    Retire (counters lost); next slot
    HANDING      slot whose successor died     CallOff; KeptPrevious
    HANDING      slot whose worker died        CallOff; Recover
    DONE         -                             -
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

from ipqd.daemon.messages import (Compiled, Failed, Go, HandOver, Handed, Stopped,
                                  TakeOver)
from ipqd.errors import ProtocolError

RUNNING = "running"         # the slot's worker, which hands over
SUCCESSOR = "successor"     # the new worker, which takes over

COMPILING = "compiling"
HANDING = "handing"
DONE = "done"


# ---------------------------------------------------------------- events

@dataclass(frozen=True)
class Message:
    role: str
    index: int
    message: object


@dataclass(frozen=True)
class Died:
    role: str
    index: int


@dataclass(frozen=True)
class StopAsked:
    pass


@dataclass(frozen=True)
class TimedOut:
    pass


# ---------------------------------------------------------------- actions

@dataclass(frozen=True)
class SendTo:
    role: str
    index: int
    message: object


@dataclass(frozen=True)
class CallOff:
    """End successor `index`: never told Go, it holds nothing of its own."""
    index: int


@dataclass(frozen=True)
class Promote:
    """Successor `index` is the slot's worker from now on."""
    index: int


@dataclass(frozen=True)
class Retire:
    """The old worker of slot `index` only exits now."""
    index: int


@dataclass(frozen=True)
class Recover:
    """The old worker of slot `index` died before it stopped reading: end it
    and start a worker that recovers its socket (with the new policy)."""
    index: int


@dataclass(frozen=True)
class KeptPrevious:
    """Slot `index` keeps the previous policy (its successor died)."""
    index: int


@dataclass(frozen=True)
class Done:
    """The hand-over has ended; `problems` non-empty means nothing was
    handed over and the running policy stays."""
    problems: List[str]


class HandOverMachine:
    def __init__(self, indexes: Sequence[int], reply_timeout: float):
        self.indexes = sorted(indexes)
        self.reply_timeout = reply_timeout
        self.phase = COMPILING
        self.compiling = set(self.indexes)
        self.gone: set = set()                  # successors that died before their turn
        self.dead: set = set()                  # running workers that died before their turn
        self.current: Optional[int] = None      # the slot handing over
        self.stopped = False                    # whether `current`'s worker said Stopped
        self.queue: List[int] = []              # slots still to hand over

    @property
    def done(self) -> bool:
        return self.phase == DONE

    def receive(self, event) -> List[object]:
        """The actions `event` calls for. Raises ProtocolError for a message
        that has no place here."""
        if self.phase == COMPILING:
            return self._compiling(event)
        if self.phase == HANDING:
            return self._handing(event)
        return []

    # ------------------------------------------------------------ compiling

    def _compiling(self, event) -> List[object]:
        problem = None
        if isinstance(event, Message) and event.role == SUCCESSOR:
            if isinstance(event.message, Compiled):
                self.compiling.discard(event.index)
                return self._begin() if not self.compiling else []
            if isinstance(event.message, Failed):
                problem = f"worker {event.index}: {event.message.detail}"
        elif isinstance(event, Died):
            problem = (f"worker {event.index}: exited during the reload" if event.role == RUNNING
                       else self._successor_died(event.index))
            if problem is None:
                return []
        elif isinstance(event, StopAsked):
            problem = "a stop was asked for"
        elif isinstance(event, TimedOut):
            problem = (f"workers {sorted(self.compiling)}: no compiled policy in "
                       f"{self.reply_timeout:.0f} s")
        if problem is None:
            raise ProtocolError(f"{event!r} while the new workers compile")
        self.phase = DONE
        return [CallOff(i) for i in self.indexes] + [Done([problem])]

    def _successor_died(self, index: int) -> Optional[str]:
        if index in self.compiling:
            return f"worker {index}: its new worker exited before the hand-over"
        self.gone.add(index)
        return None

    def _begin(self) -> List[object]:
        """All compiled. A successor that died meanwhile calls the reload off
        while nothing has been handed yet."""
        if self.gone:
            self.phase = DONE
            return [CallOff(i) for i in self.indexes] + [Done([
                f"worker {i}: its new worker exited before the hand-over"
                for i in sorted(self.gone)])]
        self.phase = HANDING
        self.queue = list(self.indexes)
        return self._next()

    # ------------------------------------------------------------ handing

    def _next(self) -> List[object]:
        actions: List[object] = []
        while self.queue:
            index = self.queue.pop(0)
            if index in self.dead:
                actions += [CallOff(index), Recover(index)]
                continue
            if index in self.gone:
                actions += [CallOff(index), KeptPrevious(index)]
                continue
            self.current, self.stopped = index, False
            return actions + [SendTo(RUNNING, index, HandOver())]
        self.phase = DONE
        self.current = None
        return actions + [Done([])]

    def _handing(self, event) -> List[object]:
        index = self.current
        if isinstance(event, Died) and event.role == SUCCESSOR:
            if event.index != index or not self.stopped:
                self.gone.add(event.index)
            return []           # promoted already: the loop restarts it as any worker
        if isinstance(event, (StopAsked,)):
            return []           # each slot's hand-over is short: it ends first
        ours = getattr(event, "index", None) == index and getattr(event, "role", None) == RUNNING
        if isinstance(event, Message) and ours and isinstance(event.message, Stopped) \
                and not self.stopped:
            self.stopped = True
            return [SendTo(SUCCESSOR, index, Go(event.message.settings)), Promote(index)]
        if isinstance(event, Message) and ours and isinstance(event.message, Handed) and self.stopped:
            return [SendTo(SUCCESSOR, index, TakeOver(event.message.carried)), Retire(index)] \
                + self._next()
        if (isinstance(event, Died) and ours) or isinstance(event, TimedOut):
            if self.stopped:
                return [Retire(index)] + self._next()       # its counters are lost
            return [CallOff(index), Recover(index)] + self._next()
        if isinstance(event, Message) and event.role == SUCCESSOR:
            return []           # a successor's Ready after Go
        if isinstance(event, Died):
            if event.index in self.queue:
                self.dead.add(event.index)      # its turn comes: it recovers then
            return []           # one whose turn has passed retired, or is the loop's now
        raise ProtocolError(f"{event!r} while worker {index} hands over")
