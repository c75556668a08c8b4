"""Lines for the person (or the journal) reading a command's stderr.

Under systemd, a unit's stderr goes to the journal at the unit's default
priority (info) unless a line starts with `<N>`, N a syslog priority
(SyslogLevelPrefix=, on by default). The helper commands of the unit
(`ipqd hooks install` at start and reload) say their errors through
error_line, so `journalctl -p err` shows them. systemd sets JOURNAL_STREAM
to the device and inode of the stream it connected: the prefix is written
only when stderr is that stream, never to a terminal or a file.
"""
from __future__ import annotations

import os
import sys
from typing import Optional, TextIO

from ipqd.printable import clean

LOG_ERR = 3
LOG_WARNING = 4


def error_line(text: str, priority: int = LOG_ERR, stream: Optional[TextIO] = None) -> None:
    """Print `text` on stderr (escaped), at `priority` when it goes to the journal."""
    stream = stream or sys.stderr
    prefix = f"<{priority}>" if _to_journal(stream) else ""
    print(prefix + clean(text), file=stream)


def _to_journal(stream: TextIO) -> bool:
    expected = os.environ.get("JOURNAL_STREAM", "")
    if not expected:
        return False
    try:
        info = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return expected == f"{info.st_dev}:{info.st_ino}"
