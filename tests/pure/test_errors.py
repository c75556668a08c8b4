"""ipqd's exceptions: one hierarchy in ipqd/errors.py, each picklable to an
equal error (a child process may send one), and the old import places kept."""
import ast
import builtins
import errno
import inspect
import os
import pickle

import pytest

from ipqd import errors
from ipqd.errors import IpqdError

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                    "ipqd")

EXAMPLES = [
    errors.DecodeError("NFQA_MARK", 24, "attribute is 1 byte, expected 4"),
    errors.NetlinkError("bind queue 3", errno.EPERM, "run as root"),
    errors.PolicyError("p.yaml", 12, 7, "unknown action 'rejct'", "warning"),
    errors.PolicyErrors([errors.PolicyError("p.yaml", 1, 1, "a"),
                         errors.PolicyError("p.yaml", 2, 1, "b")]),
    errors.InvalidValue("protocol 300 is outside 0-255"),
    errors.PolicyRefused(["refusing policy p.yaml: a", "refusing policy p.yaml: b"]),
    errors.HookError("nft: no such table"),
    errors.StartupError("ipqd: cannot start worker 0"),
    errors.ReloadCalledOff(),
    errors.ProtocolError("an unknown message"),
    errors.CaptureError("record 3: header cut short"),
    errors.NotIP("ethertype 0x0806 (ARP)"),
    errors.DescriptionError("unknown option 'x'"),
    errors.SetError("set 'banned' is full (10 entries)"),
    errors.RegionsTooLarge("the regions are too many to compute exactly"),
    errors.IpqError(errors.IPQ_ERR_SEND, errno.EPERM),
    errors.IpqError(errors.IPQ_ERR_SUPP, detail="copy mode 7"),
    errors.ControlError("refused", "the policy was not loaded", ["p.yaml:3:7: bad"]),
]

# Exceptions that stay private to the one module that raises and catches
# them: control flow that never leaves it.
PRIVATE = {
    ("decision/packet.py", "_Malformed"),   # parse never raises: becomes PacketView.reason
    ("decision/packet.py", "_Cut"),         # parse never raises: becomes PacketView.hidden
    ("policy/_yamlsafe.py", "_Refused"),    # compose turns it into a PolicyError
}


def test_every_error_has_an_example():
    classes = {c for _, c in inspect.getmembers(errors, inspect.isclass)
               if issubclass(c, IpqdError) and c is not IpqdError}
    assert classes == {type(e) for e in EXAMPLES}


@pytest.mark.parametrize("error", EXAMPLES, ids=lambda e: type(e).__name__)
def test_an_error_pickles_to_an_equal_one(error):
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error) and isinstance(copy, IpqdError)
    assert str(copy) == str(error)
    assert copy.args == error.args
    assert {k: str(v) for k, v in vars(copy).items()} == {k: str(v) for k, v in vars(error).items()}


def test_policy_refused_keeps_its_lines():
    refused = pickle.loads(pickle.dumps(errors.PolicyRefused(["one", "two"])))
    assert refused.lines == ["one", "two"] and str(refused) == "one\ntwo"


def test_ipq_error_says_libipqs_text():
    assert str(errors.IpqError(errors.IPQ_ERR_TIMEOUT)) == "Timeout"
    assert str(errors.IpqError(errors.IPQ_ERR_SUPP, detail="x")) == "Operation not supported: x"
    assert errors.ipq_errstr(99) == "Unknown error"


def _exception_names():
    return {name for name in dir(builtins)
            if isinstance(getattr(builtins, name), type)
            and issubclass(getattr(builtins, name), BaseException)} | \
        {name for name, c in inspect.getmembers(errors, inspect.isclass)
         if issubclass(c, BaseException)}


def _sources():
    for folder, _, names in os.walk(ROOT):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                yield os.path.relpath(path, ROOT), open(path).read()


def test_every_exception_class_is_in_errors_or_private_to_its_module():
    known = _exception_names()
    found = set()
    for relpath, source in _sources():
        if relpath == "errors.py":
            continue
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ClassDef):
                bases = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", None)
                         for b in node.bases}
                if bases & known:
                    found.add((relpath, node.name))
    assert found == PRIVATE, "define exceptions in ipqd/errors.py, under IpqdError"


@pytest.mark.parametrize("relpath, name", sorted(PRIVATE))
def test_a_private_exception_never_leaves_its_module(relpath, name):
    elsewhere = [other for other, source in _sources() if other != relpath and name in source]
    assert not elsewhere


def test_the_old_import_places_still_name_the_same_classes():
    from ipqd.daemon import StartupError
    from ipqd.kernel.hooks import HookError
    from ipqd.policy.checked import PolicyRefused
    from ipqd.tools.explain import DescriptionError
    from ipqd.tools.ipq import IPQ_ERR_TIMEOUT, IpqError
    from ipqd.tools.pcap import CaptureError, NotIP
    assert (StartupError, HookError, PolicyRefused, DescriptionError, IpqError, CaptureError,
            NotIP) == (errors.StartupError, errors.HookError, errors.PolicyRefused,
                       errors.DescriptionError, errors.IpqError, errors.CaptureError,
                       errors.NotIP)
    assert IPQ_ERR_TIMEOUT == errors.IPQ_ERR_TIMEOUT
