"""The channel between the supervisor and its child processes."""
import socket
import threading

import pytest

from ipqd.daemon.child import Channel


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


def test_send_nowait_never_blocks_and_keeps_the_stream_whole():
    """A reader that stopped (a SIGSTOPped supervisor): reports beyond what
    the socket holds are dropped and counted at once; once the reader reads
    again every message it gets is whole, and a waiting send comes after
    the part left over."""
    import time
    ours, theirs = pair()
    report = ("stats", 0, {"packets": 1}, b"x" * 5000)
    start = time.monotonic()
    sent = sum(ours.send_nowait(report) for _ in range(2000))
    assert time.monotonic() - start < 5                    # nothing waited
    assert ours.dropped > 0 and sent + ours.dropped == 2000
    got = []
    reader = threading.Thread(target=lambda: got.extend(theirs.recv() for _ in range(sent + 1)))
    reader.start()
    ours.send("last")                                       # finishes the partial one first
    reader.join(10)
    assert got[:-1] == [report] * sent and got[-1] == "last"
    ours.close()
    theirs.close()
