"""The control protocol as bytes (ipqd.control.codec) and one request's
dispatch through a command table (ipqd.control.commands)."""
import json

import pytest

from ipqd.control.codec import (ERROR_CODES, MAX_REQUEST, VERSION, AnswerReader, Request,
                                RequestReader, decode_answer, decode_request, encode_error,
                                encode_request, encode_result)
from ipqd.control.commands import Command, Peer, argument, dispatch
from ipqd.errors import ControlError

ROOT = Peer(pid=1, uid=0, gid=0, may_change=True)
NOBODY = Peer(pid=2, uid=65534, gid=65534, may_change=False)


def test_request_bytes():
    assert encode_request("status") == b'{"ipqd":1,"command":"status","args":{}}\n'
    assert decode_request(b'{"ipqd":1,"command":"counters","args":{"rule":"ssh"}}') == \
        Request("counters", {"rule": "ssh"})
    assert decode_request(b'{"ipqd": 1, "command": "status"}') == Request("status", {})


def test_answer_bytes():
    assert encode_result({"rules": 3}) == b'{"ipqd":1,"ok":true,"result":{"rules":3}}\n'
    line = encode_error(ControlError("refused", "not loaded", ["p.yaml:3:7: bad"]))
    assert line == (b'{"ipqd":1,"ok":false,"error":{"code":"refused","message":"not loaded",'
                    b'"details":["p.yaml:3:7: bad"]}}\n')
    assert decode_answer(encode_result({"a": [1]})[:-1]) == {"a": [1]}
    with pytest.raises(ControlError) as caught:
        decode_answer(line[:-1])
    assert (caught.value.code, caught.value.message, caught.value.details) == \
        ("refused", "not loaded", ["p.yaml:3:7: bad"])


BAD_REQUESTS = [
    ("not json", b"status", "malformed", "the request is not JSON"),
    ("not utf-8", b'{"ipqd":1,"command":"\xff"}', "malformed", "not UTF-8 (byte 21)"),
    ("a list", b'[1, 2]', "malformed", "a request is a JSON object"),
    ("no version", b'{"command":"status"}', "unsupported-version", "version None"),
    ("version 2", b'{"ipqd":2,"command":"status"}', "unsupported-version", "version 2 is not"),
    ("no command", b'{"ipqd":1}', "malformed", '"command" is a non-empty string'),
    ("empty command", b'{"ipqd":1,"command":""}', "malformed", "non-empty string"),
    ("args not object", b'{"ipqd":1,"command":"x","args":[]}', "malformed", '"args" is a JSON'),
    ("unknown field", b'{"ipqd":1,"command":"x","id":3}', "malformed",
     "unknown request field(s) id"),
    ("deep nesting", b'{"ipqd":1,"command":"x","args":' + b'[' * 100000 + b']' * 100000 + b'}',
     "malformed", "not JSON"),
]


@pytest.mark.parametrize("line,code,words", [c[1:] for c in BAD_REQUESTS],
                         ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests_are_named(line, code, words):
    with pytest.raises(ControlError) as caught:
        decode_request(line)
    assert caught.value.code == code and code in ERROR_CODES
    assert words in caught.value.message


def test_reader_frames_lines_in_pieces():
    reader = RequestReader()
    assert reader.feed(b'{"ipqd":1,"comm') == [] and reader.partial
    out = reader.feed(b'and":"status"}\n\n{"ipqd":1,"command":"a"}\nnot json\n{"ipqd"')
    assert out[:2] == [Request("status"), Request("a")]
    assert isinstance(out[2], ControlError) and out[2].code == "malformed"
    assert len(out) == 3 and reader.partial and not reader.closed


def test_reader_closes_on_a_request_too_large():
    reader = RequestReader(limit=64)
    assert reader.feed(b"x" * 64) == []
    [error] = reader.feed(b"x")
    assert error.code == "too-large" and "at most 64 bytes" in error.message
    assert reader.closed and reader.feed(encode_request("status")) == []
    # One at the limit with its newline still passes; a longer line does not.
    reader = RequestReader(limit=len(encode_request("status")) - 1)
    assert reader.feed(encode_request("status")) == [Request("status")]
    assert RequestReader(limit=10).feed(encode_request("status"))[0].code == "too-large"
    assert MAX_REQUEST >= 4 << 20


def test_answer_reader():
    reader = AnswerReader()
    line = encode_result({"x": 1}) + encode_error(ControlError("busy", "later"))
    assert reader.feed(line[:5]) == []
    first, second = reader.feed(line[5:])
    assert first == {"x": 1} and second.code == "busy"
    assert reader.feed(b'{"ok":true}\n')[0].code == "malformed"
    with pytest.raises(ControlError):
        AnswerReader(limit=8).feed(b"x" * 9)


def _echo(context, args, peer):
    return {"context": context, "args": args, "uid": peer.uid}


def _strict(context, args, peer):
    return {"n": argument(args, "n", int)}


def _broken(context, args, peer):
    raise KeyError("oops")


def _buggy(context, args, peer):
    return 1 / 0


TABLE = {"echo": Command(_echo, False), "change": Command(_echo, True),
         "strict": Command(_strict, False), "broken": Command(_broken, False),
         "buggy": Command(_buggy, False)}


def _answer(request, peer=ROOT):
    line, code = dispatch(TABLE, "ctx", request, peer)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    return json.loads(line), code


def test_dispatch_runs_the_handler():
    answer, code = _answer(Request("echo", {"a": 1}), NOBODY)
    assert code is None and answer == {"ipqd": VERSION, "ok": True,
                                       "result": {"context": "ctx", "args": {"a": 1},
                                                  "uid": 65534}}


@pytest.mark.parametrize("request_,peer,code,words", [
    (Request("nope"), ROOT, "unknown-command", "known: broken, buggy, change, echo, strict"),
    (Request("change"), NOBODY, "not-permitted", "only root and members of the control group"),
    (Request("strict"), ROOT, "bad-arguments", "argument 'n' is missing"),
    (Request("strict", {"n": "3"}), ROOT, "bad-arguments", "must be a int, not str"),
    (Request("strict", {"n": True}), ROOT, "bad-arguments", "must be a int, not bool"),
    (Request("broken"), ROOT, "failed", "broken: 'oops'"),
])
def test_dispatch_refusals(request_, peer, code, words):
    answer, counted = _answer(request_, peer)
    assert counted == code and answer["ok"] is False and answer["error"]["code"] == code
    assert words in answer["error"]["message"]


def test_a_handler_bug_costs_one_answer():
    answer, counted = _answer(Request("buggy"))
    assert counted == "internal-error" and answer["error"] == {
        "code": "failed", "message": "buggy: internal error: ZeroDivisionError: division by zero",
        "details": []}


def test_a_change_is_allowed_to_who_may():
    assert _answer(Request("change"), ROOT)[1] is None
