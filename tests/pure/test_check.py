"""`ipqd check` reports what `ipqd run` would refuse, speaks JSON, and
keeps its listing short."""
import io
import json
import os
from argparse import Namespace

import pytest

from ipqd.cli import DEFAULT_POLICY, build_parser
from ipqd.policy.check import SHOWN_PER_SEVERITY, run_check
from ipqd.policy.checked import PolicyRefused, load_checked

GOOD = "version: 1\nhooks: [{chain: input}]\ndefault: {action: accept}\nrules:\n  - {name: ssh, proto: tcp, dport: 22, action: accept}\n"


def check(path, **options):
    out, err = io.StringIO(), io.StringIO()
    code = run_check(Namespace(policy=str(path), **options), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def policy_with_fragment(tmp_path, fragment_mode=0o644, policy_mode=0o644):
    path = tmp_path / "policy.yaml"
    path.write_text(GOOD)
    os.chmod(path, policy_mode)
    (tmp_path / "policy.d").mkdir(mode=0o755)
    fragment = tmp_path / "policy.d" / "10-more.yaml"
    fragment.write_text("rules:\n  - {name: web, proto: tcp, dport: 80, action: accept}\n")
    os.chmod(fragment, fragment_mode)
    return path, fragment


@pytest.mark.parametrize("policy_mode, fragment_mode, culprit", [
    (0o666, 0o644, "policy.yaml"), (0o1666, 0o644, "policy.yaml"), (0o644, 0o664, "10-more.yaml")])
def test_check_refuses_what_run_refuses(tmp_path, policy_mode, fragment_mode, culprit):
    os.chmod(tmp_path, 0o755)
    path, _ = policy_with_fragment(tmp_path, fragment_mode, policy_mode)
    with pytest.raises(PolicyRefused) as refused:
        load_checked(str(path))
    code, out, _ = check(path)
    assert code == 1 and "OK" not in out
    first = out.splitlines()[0]
    assert first.startswith(f"{path}: `ipqd run` refuses it: ") and culprit in first
    assert first.split("refuses it: ")[1] in refused.value.lines[0]


def test_a_sound_policy_is_ok_for_both(tmp_path):
    os.chmod(tmp_path, 0o755)
    path, _ = policy_with_fragment(tmp_path)
    assert [r.name for r in load_checked(str(path)).rules] == ["ssh", "web"]
    assert check(path) == (0, f"{path}: OK (2 rules, 0 sets)\n", "")


def test_json_lists_every_problem_with_its_place(tmp_path):
    os.chmod(tmp_path, 0o755)
    path = tmp_path / "policy.yaml"
    path.write_text(GOOD + "  - {name: bad, proto: tcp, dprot: 80, action: accept}\n")
    os.chmod(path, 0o666)
    code, out, err = check(path, json=True)
    report = json.loads(out)
    assert code == 1 and err == "" and report["valid"] is False
    safety, unknown = report["problems"]
    assert safety["line"] is None and safety["severity"] == "error" and "writable" in safety["message"]
    assert (unknown["file"], unknown["line"], unknown["column"], unknown["severity"]) == \
        (str(path), 6, 29, "error")
    assert "unknown field 'dprot'" in unknown["message"]


def test_json_when_unreadable(tmp_path):
    code, out, _ = check(tmp_path / "missing.yaml", json=True)
    assert code == 3 and json.loads(out)["reason"] == "No such file or directory"


def test_long_listings_are_capped_unless_all(tmp_path):
    os.chmod(tmp_path, 0o755)
    path = tmp_path / "policy.yaml"
    path.write_text(GOOD + "".join(f"  - {{name: r{i}, proto: tcp, dprot: {i}, action: accept}}\n"
                                   for i in range(SHOWN_PER_SEVERITY + 5)))
    os.chmod(path, 0o644)
    code, out, _ = check(path)
    lines = out.splitlines()
    assert code == 1 and len(lines) == SHOWN_PER_SEVERITY + 2
    assert lines[-2] == "... and 5 more errors (`ipqd check --all` lists every one)"
    assert len(check(path, all=True)[1].splitlines()) == SHOWN_PER_SEVERITY + 5 + 1


def test_check_defaults_to_the_policy_run_uses():
    args = build_parser().parse_args(["check"])
    assert args.policy == DEFAULT_POLICY == build_parser().parse_args(["run"]).policy


def test_version_and_completion(capsys):
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("ipqd ")
    from ipqd.cli import main
    assert main(["completion", "bash"]) == 0
    script = capsys.readouterr().out
    for word in ("run", "check", "explain", "hooks", "--no-hooks", "--pcap"):
        assert word in script
    assert main(["completion", "zsh"]) == 0 and "#compdef ipqd" in capsys.readouterr().out


def test_a_fragment_policy_d_does_not_read_is_a_warning(tmp_path):
    os.chmod(tmp_path, 0o755)
    path, _ = policy_with_fragment(tmp_path)
    (tmp_path / "policy.d" / "20-b.yml").write_text("rules: []\n")
    (tmp_path / "policy.d" / ".hidden").write_text("")
    code, out, _ = check(path)
    assert code == 0
    assert out.splitlines()[0] == (f"{tmp_path}/policy.d/20-b.yml: warning: not read: policy.d "
                                   "reads only files ending in .yaml (rename it, or move it out "
                                   "of policy.d)")


def test_an_address_with_a_zone_is_refused_with_what_to_write(tmp_path):
    os.chmod(tmp_path, 0o755)
    path = tmp_path / "policy.yaml"
    path.write_text(GOOD + '  - {name: ll, src: "fe80::1%eth0", action: accept}\n')
    os.chmod(path, 0o644)
    code, out, _ = check(path)
    assert code == 1
    assert ("'fe80::1%eth0': an address with a zone (%eth0) is not supported: write fe80::1 "
            "and add 'in: eth0' (or 'out:') to the rule") in out


def test_a_refused_yaml_tag_hides_no_other_problem(tmp_path):
    os.chmod(tmp_path, 0o755)
    path = tmp_path / "policy.yaml"
    path.write_text(GOOD + "  - {name: a, src: !!python/object:os.system x, action: accept}\n"
                           "  - {name: b, src: !10.0.0.0/8, action: accept}\n"
                           "  - {name: c, proto: tcp, dprot: 1, action: accept}\n")
    os.chmod(path, 0o644)
    code, out, _ = check(path)
    lines = out.splitlines()
    assert code == 1 and lines[-1] == "3 errors", out
    assert "YAML tags like '!!python/object:os.system' are not allowed" in lines[0]
    assert "'!10.0.0.0/8' is read by YAML as a tag" in lines[1]
    assert "unknown field 'dprot'" in lines[2]
