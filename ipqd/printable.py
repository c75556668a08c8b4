"""Text made safe to print as part of one line: a log entry or a terminal line.

Rule names, interface names, error texts and paths come from files, the
network or the kernel. Escaped, a newline in one cannot forge a second line,
and ESC, BEL or CR cannot reach a terminal. Pure.
"""
from __future__ import annotations

__all__ = ["clean"]

# C0, DEL and C1 controls, and the two Unicode line breaks some readers split on.
_CONTROL = {c: f"\\x{c:02x}" for c in list(range(0x20)) + list(range(0x7F, 0xA0))}
_CONTROL.update({0x2028: "\\u2028", 0x2029: "\\u2029"})


def clean(text: object) -> str:
    """Printable text: control characters (newline included) escaped as \\xNN."""
    return str(text).translate(_CONTROL)
