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
    for add in (_add_run, _add_check, _add_explain, _add_test, _add_diff, _add_hooks,
                _add_completion, _add_status, _add_counters, _add_metrics, _add_reload,
                _add_set):
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
    run.add_argument("--sets-file", default=None, metavar="PATH",
                     help="where the dynamic sets' entries are kept (default: sets.json in "
                          "$STATE_DIRECTORY, else /var/lib/ipqd/sets.json)")
    run.add_argument("--no-batch", action="store_true",
                     help="one verdict message per packet instead of batch verdicts")
    run.add_argument("--no-cache", action="store_true",
                     help="decide every packet in full instead of using the verdict cache")
    run.add_argument("--shadow", metavar="FILE",
                     help="a candidate policy that decides every packet beside the policy, "
                          "enforcing nothing (instead of the policy's own `shadow:`)")
    run.add_argument("--control", metavar="PATH",
                     help="the control socket (default: STATE_DIR/control, /run/ipqd/control; "
                          "`none`: no control socket)")
    run.add_argument("--control-group", metavar="GROUP",
                     help="members of GROUP may change the running daemon over the control "
                          "socket (`ipqd reload`), besides root")
    run.add_argument("--metrics-textfile", metavar="FILE",
                     help="keep FILE up to date with the figures in Prometheus text "
                          "(node_exporter's textfile collector), replaced atomically")
    run.add_argument("--metrics-every", metavar="SECONDS", type=float, default=15.0,
                     help="how often --metrics-textfile is written (default: 15)")


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
    packets.add_argument("--reach", metavar="RULE",
                         help="a packet that reaches RULE (explained), or why none does")
    explain.add_argument("--ct-state", choices=CT_STATES,
                         help="the described packet's conntrack state (default: what conntrack "
                              "gives a lone packet: new, or invalid, or untracked)")
    explain.add_argument("--json", action="store_true",
                         help="JSON Lines: one object per packet, then a summary object")
    explain.add_argument("--hook", default="input",
                         help="hook the packets are taken to arrive at (default: input)")
    explain.add_argument("--in", dest="indev", metavar="IFACE", help="input interface name")
    explain.add_argument("--out", dest="outdev", metavar="IFACE", help="output interface name")
    explain.add_argument("--at", metavar="TIME",
                         help='decide the described packet as at TIME, e.g. "2026-12-07 09:30" '
                              "(the host's local time), \"2026-12-07 09:30+01:00\" or "
                              '"2026-12-07 09:30 Europe/Paris" (default: now), for rules '
                              "with time windows")
    explain.add_argument("--show-code", action="store_true",
                         help="print the policy's generated decision function (the Python "
                              "source the daemon compiles for new flows) and exit")


def _add_test(sub) -> None:
    test = sub.add_parser(
        "test", help="run a policy's test cases: described packets and the verdicts they must get",
        description="Decide each test case's packet with the policy and compare the verdict\n"
        "(and the rule, when the case names one) with what the case expects. Without CASES,\n"
        "the policy's own cases run: its `tests:` section and tests.d/*.yaml beside it.",
        epilog=EXIT_TEXT, formatter_class=argparse.RawDescriptionHelpFormatter)
    test.add_argument("policy", help="path of the policy YAML file")
    test.add_argument("cases", nargs="*", metavar="CASES",
                      help="files of test cases (a list of {packet, expect, rule, name})")
    test.add_argument("--junit", metavar="FILE", help="also write a JUnit XML report to FILE")


def _add_diff(sub) -> None:
    diff = sub.add_parser(
        "diff", help="show every kind of packet two policies decide differently",
        description="Compare two policies from their rules: every region of packet space\n"
        "whose verdict, mark or logging changes, each with a witness packet (in explain's\n"
        "description) and the rules that decide it before and after.",
        epilog=EXIT_TEXT, formatter_class=argparse.RawDescriptionHelpFormatter)
    diff.add_argument("old", help="the policy now in use")
    diff.add_argument("new", help="the candidate policy")
    diff.add_argument("--pcap", metavar="FILE",
                      help="also count a capture's packets and connections that would be "
                           "decided differently")
    diff.add_argument("--json", action="store_true",
                      help="one JSON object: the regions, what is not exact, the capture's counts")


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


CONTROL_SOCKET = "/run/ipqd/control"


def _control_option(parser) -> None:
    parser.add_argument("--control", metavar="PATH", default=CONTROL_SOCKET,
                        help=f"the daemon's control socket (default: {CONTROL_SOCKET})")


def _add_status(sub) -> None:
    status = sub.add_parser("status", help="ask the running daemon how it is doing",
                            description="Policy, workers, packets, cache, log, the kernel's "
                            "queue counters, uptime and the last reload, from the running "
                            "daemon.", epilog=EXIT_TEXT,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    status.add_argument("--json", action="store_true", help="one JSON object")
    _control_option(status)


def _add_counters(sub) -> None:
    counters = sub.add_parser("counters", help="packets and bytes decided by each rule of the "
                                               "running daemon, offloaded flows included")
    counters.add_argument("rule", nargs="?", help="only this rule")
    counters.add_argument("--json", action="store_true",
                          help="a JSON object: rules, one total per rule (ipqd's and the "
                               "kernel's parts beside); offloaded_other; kernel")
    counters.add_argument("--state-dir", default="/run/ipqd",
                          help="where the daemon's hooks noted their backend (for the kernel's "
                               "counts of offloaded flows)")
    _control_option(counters)


def _add_metrics(sub) -> None:
    metrics = sub.add_parser("metrics", help="the running daemon's figures as Prometheus text")
    metrics.add_argument("--openmetrics", action="store_true",
                         help="OpenMetrics text instead of Prometheus text format 0.0.4")
    _control_option(metrics)


def _add_reload(sub) -> None:
    reload = sub.add_parser("reload", help="load the policy in the running daemon and say "
                            "whether it went live",
                            description="Ask the running daemon to load its policy again and "
                            "wait: exit 0 once the new policy is live, 1 with every error when "
                            "it is refused (the running policy stays).", epilog=EXIT_TEXT,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    reload.add_argument("--timeout", metavar="SECONDS", type=float, default=120.0,
                        help="how long to wait for the outcome (default: 120)")
    _control_option(reload)


def _add_set(sub) -> None:
    sets = sub.add_parser("set", help="add, delete or list the entries of a dynamic set of the "
                          "running daemon",
                          description="Change a dynamic set (declared with 'dynamic: true' in "
                          "the policy) of the running daemon: from the next packet on, kept "
                          "across reloads and restarts.", epilog=EXIT_TEXT,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = sets.add_subparsers(dest="set_verb", metavar="VERB")
    verbs.required = True
    add = verbs.add_parser("add", help="add entries (or renew their timeout)")
    delete = verbs.add_parser("del", help="delete entries")
    for parser in (add, delete):
        parser.add_argument("name", help="the set's name in the policy")
        parser.add_argument("entries", nargs="*", metavar="ENTRY",
                            help="an address or CIDR network, IPv4 or IPv6")
        parser.add_argument("--file", metavar="FILE",
                            help="entries from FILE too, one per line, '#' comments ('-': stdin)")
        _control_option(parser)
    add.add_argument("--timeout", metavar="DURATION",
                     help="how long the entries stay: 90s, 10m, 1h, 7d; 0 for no timeout "
                          "(default: the set's timeout)")
    listing = verbs.add_parser("list", help="the entries and the time each has left "
                               "(without NAME: every set's size)")
    listing.add_argument("name", nargs="?", help="the set's name in the policy")
    listing.add_argument("--json", action="store_true", help="one JSON object")
    _control_option(listing)
    flush = verbs.add_parser("flush", help="delete every entry")
    flush.add_argument("name", help="the set's name in the policy")
    _control_option(flush)


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
        from ipqd.decision.verify import case_problems
        from ipqd.policy.check import run_check
        return run_check(args, verify=case_problems)
    if args.command == "diff":
        from ipqd.tools.diff import run_diff
        return run_diff(args)
    if args.command == "test":
        from ipqd.tools.policy_test import run_test
        return run_test(args)
    if args.command == "explain":
        from ipqd.tools.explain import run_explain
        return run_explain(args)
    if args.command == "hooks":
        from ipqd.decision.verify import case_problems
        from ipqd.kernel.hooks import run_hooks_command
        return run_hooks_command(args, verify=case_problems)
    if args.command in ("status", "counters", "metrics", "reload"):
        from ipqd.control import verbs
        return getattr(verbs, f"run_{args.command}")(args)
    if args.command == "set":
        from ipqd.control.set_verbs import run_set
        return run_set(args)
    if args.command == "completion":
        return print_completion(args.shell)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
