"""The reload's hand-over and the process protocol, without processes:
messages in, actions out (ipqd.daemon.handover, ipqd.daemon.messages)."""
import pytest

from ipqd.daemon.handover import (RUNNING, SUCCESSOR, CallOff, Died, Done, HandOverMachine,
                                  KeptPrevious, Message, Promote, Recover, Retire, SendTo,
                                  StopAsked, TimedOut)
from ipqd.daemon.messages import (COMPILING, SERVING, STARTING, Compiled, Counters, Failed, Go,
                                  HandOver, Handed, Ready, Stats, Stopped, TakeOver,
                                  WorkerPhase)
from ipqd.errors import ProtocolError

SETTINGS = {"copy_range": 256}
CARRIED = {"engine": "counts"}


def compiled(machine, *indexes):
    actions = []
    for index in indexes:
        actions += machine.receive(Message(SUCCESSOR, index, Compiled(index)))
    return actions


def test_two_slots_hand_over_one_after_the_other():
    machine = HandOverMachine([1, 0], 60)
    assert compiled(machine, 0) == []                       # waits for every successor
    assert compiled(machine, 1) == [SendTo(RUNNING, 0, HandOver())]
    assert machine.receive(Message(RUNNING, 0, Stopped(0, SETTINGS))) == [
        SendTo(SUCCESSOR, 0, Go(SETTINGS)), Promote(0)]
    assert machine.receive(Message(RUNNING, 0, Handed(0, CARRIED))) == [
        SendTo(SUCCESSOR, 0, TakeOver(CARRIED)), Retire(0), SendTo(RUNNING, 1, HandOver())]
    assert machine.receive(Message(SUCCESSOR, 0, Ready(0, [0]))) == []
    machine.receive(Message(RUNNING, 1, Stopped(1, SETTINGS)))
    assert machine.receive(Message(RUNNING, 1, Handed(1, CARRIED)))[-1] == Done([])
    assert machine.done and machine.receive(TimedOut()) == []


@pytest.mark.parametrize("event, problem", [
    (Message(SUCCESSOR, 1, Failed(1, "MemoryError: ")), "worker 1: MemoryError: "),
    (Died(RUNNING, 0), "worker 0: exited during the reload"),
    (Died(SUCCESSOR, 1), "worker 1: its new worker exited before the hand-over"),
    (StopAsked(), "a stop was asked for"),
    (TimedOut(), "workers [1]: no compiled policy in 60 s"),
])
def test_anything_wrong_while_compiling_calls_everything_off(event, problem):
    machine = HandOverMachine([0, 1], 60)
    compiled(machine, 0)
    assert machine.receive(event) == [CallOff(0), CallOff(1), Done([problem])]
    assert machine.done


def test_a_successor_that_dies_after_compiling_calls_the_reload_off_before_any_hand_over():
    machine = HandOverMachine([0, 1], 60)
    compiled(machine, 0)
    assert machine.receive(Died(SUCCESSOR, 0)) == []
    assert compiled(machine, 1) == [CallOff(0), CallOff(1), Done(
        ["worker 0: its new worker exited before the hand-over"])]


def test_a_running_worker_that_dies_before_it_stops_is_recovered_with_the_new_policy():
    machine = HandOverMachine([0], 60)
    compiled(machine, 0)
    assert machine.receive(Died(RUNNING, 0)) == [CallOff(0), Recover(0), Done([])]


def test_a_running_worker_that_dies_after_it_stopped_loses_only_its_counters():
    machine = HandOverMachine([0], 60)
    compiled(machine, 0)
    machine.receive(Message(RUNNING, 0, Stopped(0, SETTINGS)))
    assert machine.receive(Died(RUNNING, 0)) == [Retire(0), Done([])]


def test_a_later_slot_whose_worker_or_successor_died_meanwhile():
    machine = HandOverMachine([0, 1, 2], 60)
    compiled(machine, 0, 1, 2)
    assert machine.receive(Died(RUNNING, 1)) == []          # its turn has not come
    assert machine.receive(Died(SUCCESSOR, 2)) == []
    machine.receive(Message(RUNNING, 0, Stopped(0, SETTINGS)))
    assert machine.receive(Message(RUNNING, 0, Handed(0, CARRIED))) == [
        SendTo(SUCCESSOR, 0, TakeOver(CARRIED)), Retire(0),
        CallOff(1), Recover(1), CallOff(2), KeptPrevious(2), Done([])]


def test_a_silent_running_worker_is_recovered_after_the_time_out():
    machine = HandOverMachine([0], 60)
    compiled(machine, 0)
    assert machine.receive(StopAsked()) == []               # a hand-over in progress ends first
    assert machine.receive(TimedOut()) == [CallOff(0), Recover(0), Done([])]


def test_a_message_with_no_place_is_a_protocol_error():
    machine = HandOverMachine([0], 60)
    with pytest.raises(ProtocolError, match="while the new workers compile"):
        machine.receive(Message(RUNNING, 0, Handed(0, CARRIED)))
    compiled(machine, 0)
    with pytest.raises(ProtocolError, match="while worker 0 hands over"):
        machine.receive(Message(RUNNING, 0, Handed(0, CARRIED)))       # before Stopped


def test_a_workers_messages_follow_the_declared_order():
    phase = WorkerPhase(3, STARTING)
    with pytest.raises(ProtocolError, match="worker 3 sent Stats while starting"):
        phase.accept(Stats(3, {}))
    phase.accept(Ready(3, [0]))
    assert phase.phase == SERVING
    phase.accept(Stats(3, {}, {}))
    phase.accept(Counters(3, {}, {}))
    phase.accept(Stopped(3, SETTINGS))
    with pytest.raises(ProtocolError, match=r"sent Ready while stopped \(expected Handed\)"):
        phase.accept(Ready(3, [0]))
    with pytest.raises(ProtocolError, match="which is no message"):
        WorkerPhase(0, COMPILING).accept(("compiled", 0, None))
    successor = WorkerPhase(0, COMPILING)
    for message in (Compiled(0), Ready(0, [0]), Stats(0, {})):
        successor.accept(message)
