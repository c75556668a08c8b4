"""Whether a moment lies in a rule's `time` window (ipqd.policy._time reads
the window). Pure but for the tz database, read once per zone; imports no
YAML, so that the matcher can use it in any process."""
from __future__ import annotations

import datetime
from functools import lru_cache
from typing import Optional

from ipqd.policy.model import TimeWindow

@lru_cache(maxsize=None)
def zone(name: Optional[str]):
    """The tzinfo of `name` (None: the host's local time, read once)."""
    if name is None:
        return datetime.datetime.now().astimezone().tzinfo
    import zoneinfo                 # 3.9+: the standard library's tz database
    return zoneinfo.ZoneInfo(name)


def within(window: TimeWindow, moment: float) -> bool:
    """Whether the Unix time `moment` lies in `window`."""
    local = datetime.datetime.fromtimestamp(moment, zone(window.tz))
    minute = local.hour * 60 + local.minute
    if window.start < window.end:
        inside = window.start <= minute < window.end
    else:
        inside = minute >= window.start or minute < window.end
    return inside and local.weekday() in window.days
