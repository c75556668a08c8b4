"""The exit statuses of every `ipqd` verb: one table (docs: ipqd(8)).

    0  done: the policy is valid (warnings allowed), the command did its job
    1  the policy (or a packet description, or a capture) is invalid or refused;
       `ipqd test`: a test case failed; `ipqd diff`: the policies decide some
       packets differently (there, as in diff(1), an invalid policy is 2)
    2  usage: unknown verb or option, missing argument (argparse's own status)
    3  a file cannot be read: the policy, a fragment, a capture
    4  the system refused: no privilege, the kernel or a firewall tool failed,
       another ipqd owns the hooks, the daemon could not start or stopped on
       a fault, no daemon answers on the control socket or it refused
"""
EXIT_OK = 0
EXIT_INVALID = 1
EXIT_CHANGED = 1          # ipqd diff: the policies differ (diff(1)'s 1)
EXIT_USAGE = 2
EXIT_UNREADABLE = 3
EXIT_FAILED = 4

EXIT_STATUSES = (
    (EXIT_OK, "done; the policy is valid (warnings allowed)"),
    (EXIT_INVALID, "the policy, a packet description or a capture is invalid or refused; "
                   "test: a case failed; diff: some packets are decided differently"),
    (EXIT_USAGE, "usage: unknown verb or option, or a missing argument; diff: an invalid "
                 "policy"),
    (EXIT_UNREADABLE, "a file cannot be read (policy, fragment, capture)"),
    (EXIT_FAILED, "the system refused: privilege, kernel, firewall tool, another ipqd"),
)
