"""The channel between the supervisor and its child processes."""
import socket
import threading

import pytest

from ipqd.child import Channel


def pair():
    a, b = socket.socketpair()
    return Channel(a.detach()), Channel(b.detach())


def test_messages_and_bytes_arrive_whole_and_in_order():
    ours, theirs = pair()
    big = bytes(range(256)) * 20_000           # 5 MB: many reads and writes
    writer = threading.Thread(target=lambda: (ours.send(("policy", big)), ours.send_bytes(b""),
                                              ours.send({"n": 1})))
    writer.start()
    assert theirs.recv() == ("policy", big)
    assert theirs.recv_bytes() == b""
    assert theirs.recv() == {"n": 1}
    writer.join()
    assert not theirs.poll(0.01)
    ours.send("x")
    assert theirs.poll(1) and theirs.recv() == "x"
    ours.close()
    theirs.close()


def test_the_peers_end_is_eof():
    ours, theirs = pair()
    ours.send_bytes(b"abc")
    ours.close()
    assert theirs.poll(1)                       # readable: the message, then the end
    assert theirs.recv_bytes() == b"abc"
    with pytest.raises(EOFError):
        theirs.recv()
    with pytest.raises(OSError):
        theirs.send("to nobody")
    theirs.close()
