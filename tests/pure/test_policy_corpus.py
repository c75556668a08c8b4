"""Golden files: every policy in tests/policies/{bad,warn,good} and what `ipqd check` says.

bad/NN-name.yaml and warn/NN-name.yaml each have NN-name.expected beside them
holding the exact output of `ipqd check NN-name.yaml` run in that directory.
To add a case, write the .yaml, run `ipqd check` on it there, read the output
carefully, and save it as the .expected file.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest

from ipqd.decision.verify import case_problems
from ipqd.policy.check import run_check

HERE = Path(__file__).parent.parent / "policies"
BAD = sorted((HERE / "bad").glob("*.yaml"))
WARN = sorted((HERE / "warn").glob("*.yaml"))
GOOD = sorted((HERE / "good").glob("*.yaml"))
EXAMPLE = Path(__file__).parent.parent.parent / "etc" / "ipqd" / "policy.yaml"


def check(path: str, quiet: bool = False):
    out, err = io.StringIO(), io.StringIO()
    code = run_check(Namespace(policy=path, quiet=quiet), out=out, err=err, verify=case_problems)
    return code, out.getvalue(), err.getvalue()


def _ids(paths):
    return [p.stem for p in paths]


def test_corpus_is_large_enough():
    assert len(BAD) >= 45
    assert all(p.with_suffix(".expected").exists() for p in BAD + WARN)


@pytest.mark.parametrize("path", BAD, ids=_ids(BAD))
def test_bad_policy(path, monkeypatch):
    monkeypatch.chdir(path.parent)
    started = time.monotonic()
    code, out, err = check(path.name)
    assert time.monotonic() - started < 5
    assert (code, err) == (1, "")
    assert out == path.with_suffix(".expected").read_text()


@pytest.mark.parametrize("path", WARN, ids=_ids(WARN))
def test_warning_policy(path, monkeypatch):
    monkeypatch.chdir(path.parent)
    code, out, err = check(path.name)
    assert (code, err) == (0, "")
    assert out == path.with_suffix(".expected").read_text()
    assert "warning:" in out


@pytest.mark.parametrize("path", WARN, ids=_ids(WARN))
def test_quiet_hides_warnings(path, monkeypatch):
    monkeypatch.chdir(path.parent)
    assert check(path.name, quiet=True) == (0, "", "")


@pytest.mark.parametrize("path", GOOD + [EXAMPLE], ids=_ids(GOOD) + ["etc-example"])
def test_good_policy_has_no_problem(path, monkeypatch):
    monkeypatch.chdir(path.parent)
    code, out, err = check(path.name)
    assert (code, err) == (0, "")
    assert out.startswith(f"{path.name}: OK (") and out.count("\n") == 1
    assert "warning" not in out


def test_quiet_still_prints_errors(monkeypatch):
    monkeypatch.chdir(HERE / "bad")
    code, out, _ = check("69-many-problems.yaml", quiet=True)
    assert code == 1
    assert "warning" not in out
    assert out.splitlines()[-1] == "4 errors"


def test_example_summary_line(monkeypatch):
    monkeypatch.chdir(HERE / "good")
    assert check("example.yaml") == (0, "example.yaml: OK (6 rules, 2 sets)\n", "")


def test_oversized_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("big.yaml").write_text("version: 1\n" + "# padding\n" * (5 * 1024 * 1024 // 10))
    started = time.monotonic()
    code, out, _ = check("big.yaml")
    assert time.monotonic() - started < 2
    assert (code, out) == (1, "big.yaml:1:1: policy file is too large "
                              "(more than 4194304 bytes)\n1 error\n")


def test_missing_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert check("policy.yaml") == (
        3, "", "ipqd: cannot read policy.yaml: No such file or directory\n")


def test_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.mkdir("policy.yaml")
    assert check("policy.yaml") == (3, "", "ipqd: cannot read policy.yaml: Is a directory\n")


def test_fifo_is_refused_at_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.mkfifo("policy.yaml", 0o644)
    started = time.monotonic()
    assert check("policy.yaml") == (3, "", "ipqd: cannot read policy.yaml: not a regular file "
                                           "(a FIFO): a policy must be a plain file\n")
    assert time.monotonic() - started < 5


def test_permission_denied(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("policy.yaml").write_text("version: 1\n")
    os.chmod("policy.yaml", 0)
    if os.geteuid() != 0:
        assert check("policy.yaml") == (
            3, "", "ipqd: cannot read policy.yaml: Permission denied\n")
        return
    # Root reads any file: take away the capabilities that let it.
    result = subprocess.run(
        ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--",
         sys.executable, "-m", "ipqd.cli", "check", "policy.yaml"],
        capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (
        3, "", "ipqd: cannot read policy.yaml: Permission denied\n")


def test_cli_entry_point(monkeypatch, capsys):
    from ipqd.cli import main
    monkeypatch.chdir(HERE / "bad")
    assert main(["check", "39-unknown-action.yaml"]) == 1
    assert capsys.readouterr().out == (HERE / "bad" / "39-unknown-action.expected").read_text()


# --- what reaches the terminal ------------------------------------------------------------

HOSTILE = "a\x1b[2J\x07\rb"                     # ESC (clear screen), BEL, CR
FAKE = "evil.yaml: OK (9 rules, 0 sets)"
HEAD = "version: 1\nhooks: [{chain: input}]\ndefault: {action: accept}\nrules:\n"


def raw_controls(text: str) -> list:
    return [c for c in text if c != "\n" and (ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0)]


def test_check_escapes_names_errors_and_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # A newline is refused in a name, and the error quotes the name.
    Path("bad.yaml").write_text(HEAD + f"  - {{name: {json.dumps(HOSTILE + chr(10) + FAKE)}, "
                                       "action: drop}\n")
    code, out, _ = check("bad.yaml")
    assert code == 1 and not raw_controls(out)
    assert not any(line.startswith(FAKE) for line in out.splitlines())
    assert "\\x1b[2J\\x07\\x0db\\x0aevil.yaml" in out
    # ESC, BEL and CR are allowed in a name; the warnings and the path print it.
    name = f"policy\n{FAKE}.yaml"
    Path(name).write_text(HEAD + f"  - {{name: {json.dumps(HOSTILE + chr(13) + FAKE)}, "
                                 "action: accept}\n  - {name: late, action: drop}\n")
    code, out, _ = check(name)
    assert code == 0 and not raw_controls(out)
    assert not any(line.startswith(FAKE) for line in out.splitlines())
    assert out.splitlines()[-1] == f"policy\\x0a{FAKE}.yaml: OK (2 rules, 0 sets, 1 warning)"
