"""A stand-in for `ipqd run` in the sandbox's own tests: a Type=notify daemon
that logs structured entries, reloads on SIGHUP and stops on SIGTERM.

Its journal fields (STANDIN_EVENT, STANDIN_RELOADS) and notify messages
follow what ipqd's daemon sends, so the harness is tested the way it is used.
"""
import signal
import sys

from systemd import daemon, journal

IDENTIFIER = "ipqd-standin"


def log(message: str, **fields: str) -> None:
    journal.send(message, SYSLOG_IDENTIFIER=IDENTIFIER, **fields)


def main() -> int:
    # Blocked and taken with sigwait: no handler, no lost wake-up.
    signals = {signal.SIGHUP, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    reloads = 0
    log("standin: started", STANDIN_EVENT="start")
    daemon.notify("READY=1\nSTATUS=serving, 0 reloads")
    while signal.sigwait(signals) == signal.SIGHUP:
        daemon.notify("RELOADING=1")
        reloads += 1
        log(f"standin: reloaded ({reloads})", STANDIN_EVENT="reload",
            STANDIN_RELOADS=str(reloads))
        daemon.notify(f"READY=1\nSTATUS=serving, {reloads} reloads")
    daemon.notify("STOPPING=1")
    log("standin: stopping", STANDIN_EVENT="stop")
    return 0


if __name__ == "__main__":
    sys.exit(main())
