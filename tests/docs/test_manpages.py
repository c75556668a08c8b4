"""The man pages (docs/ipqd.8.md, docs/ipqd-policy.5.md) keep up with the code:
every verb, option and choice of the parser, every exit status and every
journal field and event the daemon writes is in ipqd(8); and both pages
build with pandoc and render in man without a warning."""
import argparse
import glob
import os
import re
import shutil
import subprocess

import pytest

from ipqd.cli import build_parser
from ipqd.exits import EXIT_STATUSES

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAGE = os.path.join(ROOT, "docs", "ipqd.8.md")


@pytest.fixture(scope="module")
def page():
    with open(PAGE) as f:
        return f.read()


def _section(text: str, title: str) -> str:
    start = text.index(f"\n# {title}\n")
    end = text.find("\n# ", start + 1)
    return text[start:end if end > 0 else None]


def _verbs():
    """(verb, its parser) for each subcommand."""
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return sorted(action.choices.items())
    raise AssertionError("no subcommands")


def test_every_verb_option_and_choice(page):
    commands = _section(page, "COMMANDS")
    for verb, parser in _verbs():
        assert f"## ipqd {verb}\n" in commands, verb
        body = commands.split(f"## ipqd {verb}\n")[1].split("\n## ")[0]
        for action in parser._actions:
            if action.dest == "help":
                continue
            if action.option_strings:       # positionals have the page's own names (FILE)
                longest = max(action.option_strings, key=len)
                assert f"**{longest}**" in body, f"ipqd {verb} {longest}"
            for choice in action.choices or ():     # shared options: "As for ipqd run"
                assert f"**{choice}**" in commands, f"ipqd {verb}: {action.dest} {choice}"
        assert f"**ipqd {verb}**" in _section(page, "SYNOPSIS"), verb
    for option in ("--help", "--version"):
        assert f"**{option}**" in page


def test_every_exit_status(page):
    documented = re.findall(r"^\*\*(\d+)\*\*$", _section(page, "EXIT STATUS"), re.M)
    assert [int(code) for code in documented] == [code for code, _ in EXIT_STATUSES]


def test_every_journal_field_and_event(page):
    fields, events = set(), set()
    for path in glob.glob(os.path.join(ROOT, "ipqd", "daemon", "*.py")):
        with open(path) as f:
            source = f.read()
        fields |= set(re.findall(r"\b(IPQD_[A-Z_]+[A-Z])\b", source))
        events |= set(re.findall(r"IPQD_EVENT\"?\s*[=:]\s*\"([a-z-]+)\"", source))
    journal = _section(page, "JOURNAL FIELDS")
    assert fields and events
    for field in sorted(fields):
        assert f"*{field}*" in journal, field
    for event in sorted(events):
        assert f"**{event}**" in journal, event


def test_pages_build_and_render_cleanly(tmp_path):
    if shutil.which("pandoc") is None or shutil.which("man") is None:
        pytest.skip("pandoc and man (make deps installs them) build and render the pages")
    subprocess.run(["make", "-s", "-C", ROOT, "man", f"MAN_BUILD={tmp_path}"], check=True,
                   capture_output=True)
    for name, title in (("ipqd.8", "IPQD(8)"), ("ipqd-policy.5", "IPQD-POLICY(5)")):
        # As lintian checks them (and as a terminal of 80 columns shows them).
        for width in ("80", "120"):
            result = subprocess.run(["man", "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z",
                                     str(tmp_path / name)], capture_output=True, text=True,
                                    env={"PATH": os.environ["PATH"], "LC_ALL": "C.UTF-8",
                                         "MANWIDTH": width})
            assert (result.returncode, result.stderr) == (0, ""), name
        shown = subprocess.run(["man", "-l", str(tmp_path / name)], capture_output=True,
                               text=True, env={"PATH": os.environ["PATH"], "MANWIDTH": "80",
                                               "MANPAGER": "cat", "LC_ALL": "C.UTF-8"}).stdout
        assert shown.startswith(title) and "\nNAME\n" in shown and "\nSEE ALSO\n" in shown
