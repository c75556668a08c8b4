"""The `ipqd` command: one subcommand per job, each in its own module.

Exit statuses are one table for every verb: ipqd.exits.
"""
from __future__ import annotations

import argparse
import sys

from ipqd import __version__
from ipqd.exits import EXIT_STATUSES
from ipqd.policy.model import CT_STATES
from ipqd.tools.grammar import EXPLAIN_EPILOG


DEFAULT_POLICY = "/etc/ipqd/policy.yaml"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ipqd",
        description="Rule-driven packet firewall daemon for Linux NFQUEUE.",
        epilog=EXIT_TEXT, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"ipqd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in (_add_run, _add_check, _add_explain, _add_hooks, _add_completion):
        add(sub)
    return parser


def _add_run(sub) -> None:
    run = sub.add_parser("run", help="answer queued packets according to the policy (the daemon)")
    run.add_argument("--policy", default=DEFAULT_POLICY, help=f"default: {DEFAULT_POLICY}")
    run.add_argument("--no-hooks", action="store_true",
                     help="do not install queue rules (the administrator or `ipqd hooks` does)")
    run.add_argument("--backend", default="auto",
                     choices=("auto", "nft", "iptables-nft", "iptables-legacy"),
                     help="how to install the queue rules (default: the best that works here)")
    run.add_argument("--log-target", default="auto", choices=("auto", "journal", "stderr"),
                     help="where decisions go (auto: journald under systemd, else stderr)")
    run.add_argument("--state-dir", default="/run/ipqd",
                     help="where ipqd notes which backend holds its rules")
    run.add_argument("--no-batch", action="store_true",
                     help="one verdict message per packet instead of batch verdicts")
    run.add_argument("--no-cache", action="store_true",
                     help="decide every packet in full instead of using the verdict cache")


def _add_check(sub) -> None:
    check = sub.add_parser("check", help="validate a policy file and print every problem",
                           description="Print every problem in a policy, as `ipqd run` "
                           "would refuse or warn about it (file safety included).",
                           epilog=EXIT_TEXT, formatter_class=argparse.RawDescriptionHelpFormatter)
    check.add_argument("policy", nargs="?", default=DEFAULT_POLICY,
                       help=f"path of the policy YAML file (default: {DEFAULT_POLICY})")
    check.add_argument("--quiet", action="store_true", help="print errors only, no warnings")
    check.add_argument("--all", action="store_true",
                       help="list every problem (by default the first 20 errors and warnings)")
    check.add_argument("--json", action="store_true",
                       help="one JSON object: every problem with file, line, column, "
                            "severity and message")


def _add_explain(sub) -> None:
    explain = sub.add_parser(
        "explain", help="show the verdict a policy gives to captured or described packets",
        description="Show the verdict a policy gives to a described packet or to every packet\n"
        "of a capture, through the daemon's own parser and matcher.",
        epilog=EXPLAIN_EPILOG + "\n\n" + EXIT_TEXT,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    explain.add_argument("policy", help="path of the policy YAML file")
    packets = explain.add_mutually_exclusive_group()
    packets.add_argument("packet", nargs="?",
                         help='one packet, e.g. "tcp 10.0.0.5:40000 -> 10.0.0.1:22 syn" '
                              "(the grammar is below)")
    packets.add_argument("--pcap", metavar="FILE", help="a pcap or pcapng capture to replay")
    explain.add_argument("--ct-state", choices=CT_STATES,
                         help="the described packet's conntrack state (default: what conntrack "
                              "gives a lone packet: new, or invalid, or untracked)")
    explain.add_argument("--json", action="store_true",
                         help="JSON Lines: one object per packet, then a summary object")
    explain.add_argument("--hook", default="input",
                         help="hook the packets are taken to arrive at (default: input)")
    explain.add_argument("--in", dest="indev", metavar="IFACE", help="input interface name")
    explain.add_argument("--out", dest="outdev", metavar="IFACE", help="output interface name")
    explain.add_argument("--show-code", action="store_true",
                         help="print the policy's generated decision function (the Python "
                              "source the daemon compiles for new flows) and exit")


def _add_hooks(sub) -> None:
    hooks = sub.add_parser(
        "hooks", help="install, remove or show the kernel rules that queue traffic to ipqd")
    hooks.add_argument("action", choices=("install", "remove", "show", "detect"))
    hooks.add_argument("--policy", default=DEFAULT_POLICY, help=f"default: {DEFAULT_POLICY}")
    hooks.add_argument("--backend", default="auto",
                       choices=("auto", "nft", "iptables-nft", "iptables-legacy"),
                       help="how to install the rules (default: the best that works here)")
    hooks.add_argument("--state-dir", default="/run/ipqd",
                       help="where ipqd notes which backend holds its rules")


def _add_completion(sub) -> None:
    completion = sub.add_parser("completion", help="print the shell completion script",
                                description="Print a completion script generated from this "
                                "command's own parser. bash: `ipqd completion bash > "
                                "/etc/bash_completion.d/ipqd`; zsh: `ipqd completion zsh > "
                                "\"${fpath[1]}/_ipqd\"`.")
    completion.add_argument("shell", choices=("bash", "zsh"))


EXIT_TEXT = "exit status:\n" + "\n".join(f"  {code}  {meaning}" for code, meaning in EXIT_STATUSES)


def print_completion(shell: str) -> int:
    """The completion script for `shell`, generated from build_parser by shtab."""
    import shtab
    print(shtab.complete(build_parser(), shell=shell))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        from ipqd.daemon import run_daemon
        return run_daemon(args)
    if args.command == "check":
        from ipqd.policy.check import run_check
        return run_check(args)
    if args.command == "explain":
        from ipqd.tools.explain import run_explain
        return run_explain(args)
    if args.command == "hooks":
        from ipqd.kernel.hooks import run_hooks_command
        return run_hooks_command(args)
    if args.command == "completion":
        return print_completion(args.shell)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
