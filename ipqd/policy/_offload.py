"""`queue.offload`: `auto`, `off`, or `{mode: auto, mask: 0x...}`.

Parsed here so that the loader only has to name the field: QUEUE_FIELDS gets
"offload" and QUEUE_PARSERS gets `"offload": parse_offload`.
"""
from __future__ import annotations

from typing import Optional

import yaml

from ipqd.policy.offload import MIN_BITS, bits_of
from ipqd.policy import _values as values
from ipqd.policy._nodes import Where, choice, fields, is_scalar, text
from ipqd.errors import InvalidValue
from ipqd.policy.model import OFFLOAD_MASK, OFFLOAD_MODES, Offload

OFFLOAD_FIELDS = ("mode", "mask")


def parse_offload(where: Where, node: yaml.Node) -> Optional[Offload]:
    """The Offload of `offload: auto|off` or its mapping form; None after an error."""
    where = where.within("queue.offload: ")
    if is_scalar(node):
        mode = _mode(where, node)
        return None if mode is None else Offload(mode=mode)
    before = len(where.problems)
    found = fields(where, node, OFFLOAD_FIELDS, "offload")
    if found is None or len(where.problems) > before:    # an unknown field: said, refused
        return None
    out = {}
    for _, name, value in found:
        out[name] = _mode(where, value) if name == "mode" else _mask(where, value)
    if None in out.values():
        return None
    return Offload(mode=out.get("mode", "auto"), mask=out.get("mask", OFFLOAD_MASK))


def _mode(where: Where, node: yaml.Node) -> Optional[str]:
    # `off` is a YAML 1.1 boolean; choice() reads it as written.
    return choice(where, node, "offload", OFFLOAD_MODES, kind="mode")


def _mask(where: Where, node: yaml.Node) -> Optional[int]:
    written = text(where, node, "mask", "a number such as 0xfffc0000")
    if written is None:
        return None
    try:
        mask = values.parse_u32(written, "mask")
    except InvalidValue as e:
        where.error(node, e.message)
        return None
    if len(bits_of(mask)) < MIN_BITS:
        where.error(node, f"mask {written} has {len(bits_of(mask))} bits set, but offload "
                          f"needs at least {MIN_BITS} (2, plus 4 for each hooked chain): "
                          f"widen the mask or write 'offload: off'")
        return None
    return mask
