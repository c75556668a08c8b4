"""The receiver under QueueSocket, on a datagram socket pair (real sockets,
no kernel queue: tests/kernel/test_kernel_queue.py covers netlink)."""
import ctypes
import errno
import socket

import pytest

from ipqd.kernel import multi_receive
from ipqd.kernel.multi_receive import Receiver


@pytest.fixture
def pair():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    yield ours, theirs
    ours.close()
    theirs.close()


def contents(receiver, lengths):
    return [bytes(view[:n]) for view, n in zip(receiver.views, lengths)]


def test_a_burst_comes_in_one_receive_in_order(pair):
    ours, theirs = pair
    receiver = Receiver(ours, slots=8, slot_size=4096)
    assert receiver.batched, "recvmmsg should be callable on Linux"
    sent = [b"a" * 100, b"bb", b"c" * 4096, b"d"]
    for data in sent:
        theirs.send(data)
    assert contents(receiver, receiver.receive(8)) == sent
    assert receiver.receive(8) == []
    receiver.close()


def test_count_and_slots_bound_a_receive_and_the_rest_waits(pair):
    ours, theirs = pair
    receiver = Receiver(ours, slots=4, slot_size=64)
    for i in range(11):
        theirs.send(b"%d" % i)
    assert contents(receiver, receiver.receive(2)) == [b"0", b"1"]
    assert contents(receiver, receiver.receive(100)) == [b"2", b"3", b"4", b"5"]   # 4 slots
    assert contents(receiver, receiver.receive(1)) == [b"6"]
    assert contents(receiver, receiver.receive(4)) == [b"7", b"8", b"9", b"10"]
    assert receiver.receive(4) == []
    receiver.close()


def test_without_batching_each_receive_takes_one(pair):
    ours, theirs = pair
    receiver = Receiver(ours, batch=False)
    assert not receiver.batched and len(receiver.views) == 1
    theirs.send(b"x")
    theirs.send(b"y")
    assert contents(receiver, receiver.receive(64)) == [b"x"]
    assert contents(receiver, receiver.receive(64)) == [b"y"]
    assert receiver.receive(64) == []
    receiver.close()


def test_an_error_after_the_first_datagram_comes_with_the_next_receive(pair, monkeypatch):
    """recvmmsg failing (ENOBUFS: the kernel dropped some) must not cost the
    datagram recv_into already took, nor go unreported."""
    ours, theirs = pair
    receiver = Receiver(ours, slots=4, slot_size=64)

    def failing(*args):
        ctypes.set_errno(errno.ENOBUFS)
        return -1

    monkeypatch.setattr(multi_receive, "_recvmmsg", failing)
    theirs.send(b"first")
    theirs.send(b"second")
    assert contents(receiver, receiver.receive(4)) == [b"first"]
    with pytest.raises(OSError) as raised:
        receiver.receive(4)
    assert raised.value.errno == errno.ENOBUFS
    monkeypatch.undo()
    assert contents(receiver, receiver.receive(4)) == [b"second"]
    receiver.close()


def test_a_datagram_larger_than_its_slot_is_cut_to_the_slot(pair):
    """As recv does: the length says how much arrived, and the decoders
    reject what does not add up."""
    ours, theirs = pair
    receiver = Receiver(ours, slots=2, slot_size=16)
    theirs.send(b"1" * 10)
    theirs.send(b"2" * 40)
    assert receiver.receive(2) == [10, 16]
    receiver.close()
