"""`ipqd test`: a policy's test cases, their failures at file:line, JUnit, and
`ipqd check` and the daemon's load refusing a policy whose own cases fail."""
from __future__ import annotations

import io
import textwrap
from argparse import Namespace
from xml.etree import ElementTree

import pytest

from ipqd.cli import main
from ipqd.daemon.loading import load_policy_job
from ipqd.daemon.messages import Loaded, Refused
from ipqd.decision.verify import case_problems, run_cases
from ipqd.errors import PolicyErrors
from ipqd.policy.cases import policy_cases, read_cases
from ipqd.policy.check import run_check
from ipqd.policy.loader import load
from ipqd.tools.policy_test import run_test

POLICY = """\
version: 1
default: {action: drop}
rules:
  - name: ssh
    proto: tcp
    dport: 22
    action: accept
  - name: web
    proto: tcp
    dport: [80, 443]
    action: accept
"""
PASSING = """\
tests:
  - {packet: "tcp 10.0.0.5:40000 -> 10.0.0.1:22 syn", expect: accept, rule: ssh}
  - {packet: "udp 10.0.0.5:40000 -> 10.0.0.1:53", expect: drop, rule: default}
"""
FAILING = """\
  - name: telnet
    packet: "tcp 10.0.0.5:40000 -> 10.0.0.1:23"
    expect: accept
"""


def write(tmp_path, text, name="policy.yaml"):
    path = tmp_path / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    path.chmod(0o644)
    return path


def test_passing_cases_exit_0(tmp_path, capsys):
    path = write(tmp_path, POLICY + PASSING)
    assert main(["test", str(path)]) == 0
    assert capsys.readouterr().out == f"{path}: 2 tests, 2 passed, 0 failed\n"


def test_a_failure_names_the_case_the_verdicts_and_the_rule(tmp_path, capsys):
    path = write(tmp_path, POLICY + PASSING + FAILING)
    assert main(["test", str(path)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out == [f'{path}:15:5: test "telnet" failed: expected accept, decided drop (default)',
                   f"{path}: 3 tests, 2 passed, 1 failed"]


def test_the_expected_rule_is_compared(tmp_path):
    path = write(tmp_path, POLICY + textwrap.dedent("""\
        tests:
          - {packet: "tcp 10.0.0.5:40000 -> 10.0.0.1:443", expect: accept, rule: ssh}
        """))
    [outcome] = run_cases(load(str(path)), policy_cases(str(path)))
    assert (outcome.verdict, outcome.rule) == ("accept", "web")
    assert outcome.problem == "expected accept (ssh), decided accept (web)"
    assert outcome.where == f"{path}:8:5"


def test_cases_from_files_and_tests_d(tmp_path, capsys):
    path = write(tmp_path, POLICY)
    write(tmp_path, "- {packet: \"tcp 10.0.0.5:1 -> 10.0.0.1:80\", expect: accept}\n",
          "tests.d/10-web.yaml")
    write(tmp_path, "tests:\n  - {packet: \"tcp 10.0.0.5:1 -> 10.0.0.1:81\", expect: accept}\n",
          "other.yaml")
    assert [c.packet for c in policy_cases(str(path))] == ["tcp 10.0.0.5:1 -> 10.0.0.1:80"]
    assert main(["test", str(path)]) == 0
    capsys.readouterr()
    assert main(["test", str(path), str(tmp_path / "other.yaml")]) == 1
    assert f"{tmp_path / 'other.yaml'}:2:5: test" in capsys.readouterr().out


def test_no_case_is_an_error(tmp_path, capsys):
    path = write(tmp_path, POLICY)
    assert main(["test", str(path)]) == 1
    assert "no test cases" in capsys.readouterr().err


def test_an_invalid_case_file_is_reported_at_its_node(tmp_path):
    path = write(tmp_path, "- {packet: 'tcp 1.2.3.4:1 -> 1.2.3.4:2', expect: maybe}\n",
                 "cases.yaml")
    with pytest.raises(PolicyErrors) as raised:
        read_cases(str(path))
    assert [str(e) for e in raised.value.errors] == [
        f"{path}:1:50: test case: unknown verdict 'maybe' (expected accept, drop or reject)"]


def test_unreadable_cases_exit_3(tmp_path, capsys):
    path = write(tmp_path, POLICY)
    assert main(["test", str(path), str(tmp_path / "missing.yaml")]) == 3


def test_junit_report(tmp_path):
    path = write(tmp_path, POLICY + PASSING + FAILING)
    report = tmp_path / "junit.xml"
    assert run_test(Namespace(policy=str(path), cases=[], junit=str(report)),
                    out=io.StringIO()) == 1
    suite = ElementTree.parse(report).getroot()
    assert (suite.tag, suite.get("tests"), suite.get("failures")) == ("testsuite", "3", "1")
    cases = suite.findall("testcase")
    assert [c.get("line") for c in cases] == ["13", "14", "15"]
    [failure] = cases[2].findall("failure")
    assert failure.get("message") == "expected accept, decided drop (default)"


def test_check_runs_the_policys_own_tests(tmp_path):
    path = write(tmp_path, POLICY + PASSING)
    out = io.StringIO()
    assert run_check(Namespace(policy=str(path)), out=out, err=out, verify=case_problems) == 0
    assert out.getvalue().endswith("OK (2 rules, 0 sets, 2 tests passed, 1 warning)\n")
    path = write(tmp_path, POLICY + PASSING + FAILING)
    out = io.StringIO()
    assert run_check(Namespace(policy=str(path)), out=out, err=out, verify=case_problems) == 1
    assert 'test "telnet" failed' in out.getvalue()


class _Conn:
    def __init__(self):
        self.sent = []

    def send(self, message):
        self.sent.append(message)

    def close(self):
        pass


def test_the_daemons_load_refuses_a_policy_failing_its_tests(tmp_path):
    tmp_path.chmod(0o755)
    path = write(tmp_path, POLICY + PASSING)
    conn = _Conn()
    load_policy_job(str(path), conn)
    assert isinstance(conn.sent[0], Loaded)
    path = write(tmp_path, POLICY + PASSING + FAILING)
    conn = _Conn()
    load_policy_job(str(path), conn)
    [refused] = conn.sent
    assert isinstance(refused, Refused)
    assert refused.lines[0].startswith(f'{path}:15:5: test "telnet" failed: expected accept')
    assert refused.lines[-1] == (f"refusing policy {path}: 1 of its test case(s) failed or "
                                 f"could not be read (`ipqd test {path}`)")


def test_hooks_are_not_moved_for_a_policy_failing_its_tests(tmp_path, capsys):
    """`ipqd hooks` loads as `ipqd run` does (systemd's reload runs `hooks
    install` first): a policy failing its own tests moves no hook."""
    tmp_path.chmod(0o755)
    path = write(tmp_path, POLICY + PASSING)
    assert main(["hooks", "show", "--policy", str(path), "--backend", "nft"]) == 0
    path = write(tmp_path, POLICY + PASSING + FAILING)
    capsys.readouterr()
    assert main(["hooks", "show", "--policy", str(path), "--backend", "nft"]) == 1
    assert 'test "telnet" failed' in capsys.readouterr().err
