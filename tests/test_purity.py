"""The sans-IO core stays pure: no sockets, files, signals or processes in it."""
import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ipqd")
PURE = ["nfnetlink.py", "nfqueue.py", "packet.py", "compiler.py", "engine.py", "checksum.py",
        "policy/transfer.py",
        "verdict_cache.py", "fast_decode.py", "policy/model.py", "printable.py"]
FORBIDDEN = {"socket", "select", "selectors", "signal", "os", "subprocess", "threading",
             "multiprocessing", "fcntl", "ctypes", "systemd"}


def imported(path):
    tree = ast.parse(open(path).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module.split(".")[0]


@pytest.mark.parametrize("module", PURE)
def test_pure_module_imports_no_io(module):
    bad = FORBIDDEN & set(imported(os.path.join(ROOT, module)))
    assert not bad, f"{module} imports {sorted(bad)}"
