"""The `ipqd` command: one subcommand per job, each in its own module."""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ipqd",
        description="Rule-driven packet firewall daemon for Linux NFQUEUE.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    check = sub.add_parser("check", help="validate a policy file and print every problem")
    check.add_argument("policy", help="path of the policy YAML file")
    check.add_argument("--quiet", action="store_true", help="print errors only, no warnings")

    explain = sub.add_parser(
        "explain", help="show the verdict a policy gives to captured or described packets")
    explain.add_argument("policy", help="path of the policy YAML file")
    explain.add_argument("packet", nargs="?",
                         help='one packet, e.g. "tcp 10.0.0.5:40000 -> 10.0.0.1:22 syn"')
    explain.add_argument("--pcap", metavar="FILE", help="a pcap or pcapng capture to replay")
    explain.add_argument("--json", action="store_true", help="machine-readable output")
    explain.add_argument("--hook", default="input",
                         help="hook the packets are taken to arrive at (default: input)")
    explain.add_argument("--in", dest="indev", metavar="IFACE", help="input interface name")
    explain.add_argument("--out", dest="outdev", metavar="IFACE", help="output interface name")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "check":
        from ipqd.policy.check import run_check
        return run_check(args)
    if args.command == "explain":
        from ipqd.explain import run_explain
        return run_explain(args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
