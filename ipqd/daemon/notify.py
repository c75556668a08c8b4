"""systemd's notification socket: readiness, status and the watchdog."""
from __future__ import annotations

import os
from typing import Optional


def notify(state: str) -> bool:
    """sd_notify `state`; True when sent. A no-op (True) when not started by
    systemd; False when the send failed (the caller says so once)."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return True
    try:
        from systemd import daemon
        return bool(daemon.notify(state))
    except Exception:
        return False


def watchdog_interval() -> Optional[float]:
    """Seconds between watchdog pings (half systemd's WatchdogSec), or None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6
