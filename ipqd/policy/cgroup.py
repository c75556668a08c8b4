"""`cgroup:` and `unit:` rules: how the hooks tell ipqd a packet's cgroup. Pure.

The kernel knows the cgroup (v2) of the socket a locally generated packet
comes from; iptables' `cgroup --path` and nft's `socket cgroupv2` match it.
ipqd's output chain gives each cgroup path the policy names a number, and
writes it into bits of the packet mark before the queue rules: the bits at
the bottom of `queue.offload.mask`, below those offload and reject use in
the packet mark. The paths are marked from the shallowest to the deepest,
so a packet carries the deepest path it lies under; a rule naming a path
matches the packets marked with it or with a path beneath it, which is
exact, since every path a rule names has its own number.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Sequence, Tuple

from ipqd.policy.model import Offload
from ipqd.policy.offload import MIN_BITS, bits_of

# The bits of the mask offload and reject keep for the packet mark (the two
# request bits and the four refusal bits below them).
_KEPT = MIN_BITS


class CgroupLayout(NamedTuple):
    bits: Tuple[int, ...]               # lowest first: bit j carries 2**j of the number
    paths: Tuple[str, ...]              # number i + 1 is paths[i]; shallowest first

    @property
    def mask(self) -> int:
        out = 0
        for bit in self.bits:
            out |= bit
        return out

    def mark(self, number: int) -> int:
        return sum(bit for j, bit in enumerate(self.bits) if number >> j & 1)

    def number(self, mark: int) -> int:
        return sum(1 << j for j, bit in enumerate(self.bits) if mark & bit)

    def path(self, mark: int) -> Optional[str]:
        """The deepest path the packet was marked with, None for none."""
        number = self.number(mark)
        return self.paths[number - 1] if 0 < number <= len(self.paths) else None


def depth(path: str) -> int:
    return path.count("/") + 1


def ordered(paths: Sequence[str]) -> Tuple[str, ...]:
    return tuple(sorted(set(paths), key=lambda p: (depth(p), p)))


def capacity(offload: Offload) -> int:
    """How many cgroup paths the mask can number."""
    free = len(bits_of(offload.mask)) - _KEPT
    return (1 << free) - 1 if free > 0 else 0


def cgroup_layout(offload: Offload, paths: Sequence[str]) -> Optional[CgroupLayout]:
    """The numbering of `paths`; None when there are none or too many (the
    loader refuses that)."""
    paths = ordered(paths)
    if not paths or len(paths) > capacity(offload):
        return None
    free = bits_of(offload.mask)[_KEPT:]
    width = len(paths).bit_length()
    return CgroupLayout(tuple(reversed(free))[:width], paths)


def under(path: str, ancestor: str) -> bool:
    return path == ancestor or path.startswith(ancestor + "/")


def numbered(layout: CgroupLayout) -> Dict[str, int]:
    return {path: i + 1 for i, path in enumerate(layout.paths)}


def split_mark(layout: Optional[CgroupLayout], mark: int) -> Tuple[Optional[str], int]:
    """(the packet's cgroup path, its mark without the cgroup bits)."""
    if layout is None or not mark:
        return None, mark
    return layout.path(mark), mark & ~layout.mask


def mark_for(layout: Optional[CgroupLayout], path: str) -> int:
    """The bits the output hook writes for a packet of cgroup `path`: its
    deepest ancestor among the paths the policy names (0: none)."""
    if layout is None:
        return 0
    found = [i for i, known in enumerate(layout.paths, 1) if under(path.strip("/"), known)]
    return layout.mark(max(found, key=lambda i: depth(layout.paths[i - 1]))) if found else 0
