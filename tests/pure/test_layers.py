"""The layout is the architecture: each folder a layer, imports only go
down, and the pure layers do no I/O (docs/architecture.md)."""
import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                    "ipqd")

# Each layer and the layers it may import. `base` is errors.py, exits.py and printable.py.
ALLOWED = {
    "base": set(),
    "wire": {"base"},
    "policy": {"base", "wire"},       # wire: the kernel's limits (NFQNL_MAX_COPY_RANGE)
    "decision": {"base", "wire", "policy"},
    "kernel": {"base", "wire", "policy"},
    "control": {"base", "wire", "policy", "kernel"},   # kernel: the queue table, for verbs
    "tools": {"base", "wire", "policy", "decision", "kernel"},
    "daemon": {"base", "wire", "policy", "decision", "kernel", "control"},
    "cli": {"base", "wire", "policy", "decision", "kernel", "tools", "daemon", "control"},
}
TOP = {"errors": "base", "printable": "base", "exits": "base", "console": "base", "cli": "cli", "ipq": "cli", "__init__": "cli"}

# The sans-IO core: whole folders, and the policy's modules that read no file.
PURE_FOLDERS = ["wire", "decision"]
PURE_MODULES = ["printable.py", "policy/model.py", "policy/transfer.py",
                "policy/offload.py", "policy/reject.py", "policy/cgroup.py", "policy/windows.py",
                "policy/_nodes.py", "policy/_values.py", "policy/_rules.py",
                "policy/_lint.py", "policy/_limits.py", "policy/_offload.py",
                "policy/_undecidable.py", "policy/regions.py", "policy/_rate.py",
                "policy/_time.py", "control/codec.py", "control/commands.py"]
FORBIDDEN = {"socket", "select", "selectors", "signal", "os", "subprocess", "threading",
             "multiprocessing", "fcntl", "ctypes", "systemd"}


def modules():
    for folder, _, names in os.walk(ROOT):
        for name in names:
            if name.endswith(".py"):
                yield os.path.relpath(os.path.join(folder, name), ROOT)


def layer(relpath: str) -> str:
    parts = relpath[:-3].split(os.sep)
    return TOP[parts[0]] if len(parts) == 1 else parts[0]


def imported(path):
    """Every module named by an import, at any depth of the file."""
    tree = ast.parse(open(path).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            for alias in node.names:
                yield f"{node.module}.{alias.name}"


def ipqd_layer(module: str):
    parts = module.split(".")
    if parts[0] != "ipqd" or len(parts) == 1:
        return None
    name = parts[1]
    if name in TOP:
        return TOP[name]
    return name if name in ALLOWED else None


@pytest.mark.parametrize("relpath", sorted(modules()))
def test_imports_go_down_only(relpath):
    own = layer(relpath)
    assert own in ALLOWED, f"{relpath} is in no layer: add it to ALLOWED or TOP"
    wrong = sorted({m for m in imported(os.path.join(ROOT, relpath))
                    if ipqd_layer(m) not in (None, own) and ipqd_layer(m) not in ALLOWED[own]})
    assert not wrong, f"{relpath} ({own}) imports {wrong}"


def pure_modules():
    for relpath in sorted(modules()):
        if relpath.split(os.sep)[0] in PURE_FOLDERS or relpath in PURE_MODULES:
            yield relpath


@pytest.mark.parametrize("relpath", list(pure_modules()))
def test_pure_module_imports_no_io(relpath):
    bad = FORBIDDEN & {m.split(".")[0] for m in imported(os.path.join(ROOT, relpath))}
    assert not bad, f"{relpath} imports {sorted(bad)}"


def test_every_pure_folder_is_covered():
    covered = {r.split(os.sep)[0] for r in pure_modules()}
    assert set(PURE_FOLDERS) <= covered
