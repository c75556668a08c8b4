"""`time:` of a rule: `{days: [mon, tue], hours: "09:00-17:00", tz: Europe/Paris}`,
and whether a moment lies in a window.

Every key is optional (at least one): `days` (default every day), `hours`
(default the whole day), `tz` (default the host's local time). Hours are
`HH:MM-HH:MM`, start included, end excluded; an end at or before the start
wraps past midnight ("22:00-06:00"). The day is the moment's own date in
`tz`, as the kernel's xt_time sees it without --contiguous: with `days:
[fri]` and `hours: "22:00-06:00"`, Friday 23:00 and Friday 05:00 match,
Saturday 05:00 does not. Time zones come from the tz database through the
standard library's zoneinfo.
"""
from __future__ import annotations

import re
from typing import Optional

import yaml

from ipqd.policy._nodes import Where, fields, scalars, text
from ipqd.policy._values import one_of, suggest
from ipqd.policy.model import DAYS, TimeWindow
from ipqd.policy.windows import zone

TIME_FIELDS = ("days", "hours", "tz")
_HOURS = re.compile(r"^(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})$")
_DAY_NAMES = {**{d: i for i, d in enumerate(DAYS)},
              **{name: i for i, name in enumerate(("monday", "tuesday", "wednesday", "thursday",
                                                    "friday", "saturday", "sunday"))}}
DAY_MINUTES = 24 * 60


def parse_time(where: Where, node: yaml.Node) -> Optional[TimeWindow]:
    if not isinstance(node, yaml.MappingNode):
        where.error(node, 'time must be a mapping such as {days: [mon, fri], hours: '
                          '"09:00-17:00", tz: Europe/Paris}')
        return None
    before = len(where.problems)
    found = fields(where, node, TIME_FIELDS, "time")
    if found is None or len(where.problems) > before:
        return None
    if not found:
        where.error(node, "time names nothing: give days, hours or both")
        return None
    out = {}
    for _, name, value in found:
        out[name] = {"days": _days, "hours": _hours, "tz": _tz}[name](where, value)
    if None in out.values():
        return None
    start, end = out.get("hours", (0, DAY_MINUTES))
    parts = []
    if "days" in out:
        parts.append(",".join(DAYS[d] for d in sorted(out["days"])))
    if "hours" in out:
        parts.append(f"{start // 60:02d}:{start % 60:02d}-{end // 60:02d}:{end % 60:02d}")
    if "tz" in out:
        parts.append(out["tz"])
    return TimeWindow(days=out.get("days", frozenset(range(7))), start=start, end=end,
                      tz=out.get("tz"), text=" ".join(parts))


def _days(where: Where, node: yaml.Node) -> Optional[frozenset]:
    items = scalars(where, node, "days", "day names such as mon or [mon, fri]")
    if items is None:
        return None
    out = set()
    for item in items:
        word = item.value.strip().lower()
        if word not in _DAY_NAMES:
            hint = suggest(word, DAYS) or f" (expected {one_of(DAYS)})"
            where.error(item, f"time: unknown day '{item.value}'{hint}")
            return None
        out.add(_DAY_NAMES[word])
    return frozenset(out)


def _hours(where: Where, node: yaml.Node):
    written = text(where, node, "hours", 'text such as "09:00-17:00"')
    if written is None:
        return None
    found = _HOURS.match(written.strip())
    if found is None:
        where.error(node, f"time: hours '{written}' is not HH:MM-HH:MM (write e.g. "
                          '"09:00-17:00", or "22:00-06:00" across midnight; quote it)')
        return None
    h1, m1, h2, m2 = (int(g) for g in found.groups())
    if h1 > 23 or h2 > 24 or m1 > 59 or m2 > 59 or (h2 == 24 and m2):
        where.error(node, f"time: hours '{written}': hours are 00-23 (24:00 ends a day) "
                          "and minutes 00-59")
        return None
    start, end = h1 * 60 + m1, h2 * 60 + m2
    if start == end:
        where.error(node, f"time: hours '{written}' is empty: the start and the end are "
                          "the same (leave hours out for the whole day)")
        return None
    return start, end


def _tz(where: Where, node: yaml.Node) -> Optional[str]:
    written = text(where, node, "tz", "a time zone name such as Europe/Paris")
    if written is None:
        return None
    name = written.strip()
    try:
        zone(name)
    except (ValueError, LookupError, OSError):
        where.error(node, f"time: unknown time zone '{name}' (a name from the tz database, "
                          "e.g. Europe/Paris or UTC; see timedatectl list-timezones)")
        return None
    return name
