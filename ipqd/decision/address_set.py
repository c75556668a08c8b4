"""Dynamic sets: addresses and networks of both families, each entry with an
optional expiry, looked up per packet at a cost that does not grow with the
number of entries.

An entry is `(version, prefixlen, key)`, `key` being the network's address
as an integer shifted right by the bits the prefix leaves open. The set
keeps one dict per (family, prefix length) present; a lookup shifts the
packet's address once per length present, longest prefix first, and asks
each dict: at most 33 lookups for IPv4 and 129 for IPv6, in practice the
handful of lengths a set holds (a ban list of single addresses: one).

The supervisor keeps each set with the entries' expiry times (wall-clock
seconds, so that they hold across a restart) and a heap of them; the
workers keep membership only, and learn of expiries as deletions. Pure.
"""
from __future__ import annotations

import heapq
import ipaddress
import re
from typing import Dict, Iterator, List, Optional, Tuple

from ipqd.errors import SetError

Entry = Tuple[int, int, int]            # (version, prefixlen, address >> (bits - prefixlen))
BITS = {4: 32, 6: 128}


_BYTE = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
# A dotted quad (no leading zeros) and an optional prefix length: the common
# case, read by one regular expression (a bulk add reads 100,000 of them).
_V4 = re.compile(r"\s*" + r"\.".join([_BYTE] * 4) + r"(?:/(3[0-2]|[12][0-9]|[0-9]))?\s*\Z")


def parse_entry(text: str) -> Entry:
    """`192.0.2.1`, `10.0.0.0/8`, `2001:db8::/32` as an Entry; host bits
    beyond the prefix are dropped (10.1.2.3/8 is 10.0.0.0/8). Raises SetError."""
    found = _V4.match(text)
    if found is not None:
        a, b, c, d, length = found.groups()
        prefix = 32 if length is None else int(length)
        value = int(a) << 24 | int(b) << 16 | int(c) << 8 | int(d)
        return 4, prefix, value >> (32 - prefix)
    written = text.strip()
    address, slash, length = written.partition("/")
    parts = address.split(".")
    try:
        if len(parts) == 4 and ":" not in address:      # the common case, without ipaddress
            value = 0
            for part in parts:
                byte = int(part)
                if not 0 <= byte <= 255 or not part.isdigit() or (len(part) > 1 and part[0] == "0"):
                    raise ValueError
                value = value << 8 | byte
            version = 4
        else:
            if "%" in address:
                raise ValueError
            value = int(ipaddress.IPv6Address(address))
            version = 6
        bits = BITS[version]
        prefix = bits if not slash else int(length)
        if not length.isdigit() and slash or not 0 <= prefix <= bits:
            raise ValueError
    except ValueError:
        raise SetError(f"'{written}' is not an IP address or network "
                       "(write e.g. 192.0.2.1, 10.0.0.0/8 or 2001:db8::/32)") from None
    return version, prefix, value >> (bits - prefix)


def format_entry(entry: Entry) -> str:
    version, prefix, key = entry
    bits = BITS[version]
    address = ipaddress.ip_address(key << (bits - prefix)) if version == 4 else \
        ipaddress.IPv6Address(key << (bits - prefix))
    return str(address) if prefix == bits else f"{address}/{prefix}"


class AddressSet:
    """One dynamic set's entries. `max_entries`: adds past it raise SetError."""

    __slots__ = ("name", "max_entries", "size", "_tables", "_lookup", "_heap")

    def __init__(self, name: str, max_entries: int = 65536):
        self.name = name
        self.max_entries = max_entries
        self.size = 0
        # family -> prefixlen -> {key: expiry (wall-clock seconds) or None}
        self._tables: Dict[int, Dict[int, Dict[int, Optional[float]]]] = {4: {}, 6: {}}
        # family -> ((shift, dict), ...) longest prefix first: what contains walks
        self._lookup: Dict[int, tuple] = {4: (), 6: ()}
        self._heap: List[Tuple[float, Entry]] = []          # (expiry, entry), stale ones too

    # -- the packet path --

    def contains(self, family: int, address: int) -> bool:
        """Whether `address` (an int of `family`) lies in an entry."""
        for shift, keys in self._lookup[family]:
            if address >> shift in keys:
                return True
        return False

    # -- changes --

    def add(self, entry: Entry, expires: Optional[float] = None) -> bool:
        """Add or renew `entry` (its expiry replaced). True when it is new."""
        version, prefix, key = entry
        table = self._tables[version].get(prefix)
        if table is None:
            table = self._tables[version][prefix] = {}
            self._relink(version)
        new = key not in table
        if new:
            if self.size >= self.max_entries:
                if not table:
                    del self._tables[version][prefix]
                    self._relink(version)
                raise SetError(f"set '{self.name}' is full ({self.max_entries} entries): "
                               "delete entries, or raise its max in the policy")
            self.size += 1
        table[key] = expires
        if expires is not None:
            heapq.heappush(self._heap, (expires, entry))
        return new

    def discard(self, entry: Entry) -> bool:
        """Delete `entry`; False when it was not there."""
        version, prefix, key = entry
        table = self._tables[version].get(prefix)
        if table is None or key not in table:
            return False
        del table[key]
        self.size -= 1
        if not table:
            del self._tables[version][prefix]
            self._relink(version)
        return True

    def clear(self) -> int:
        """Delete every entry; how many there were."""
        size = self.size
        self._tables = {4: {}, 6: {}}
        self._lookup = {4: (), 6: ()}
        self._heap = []
        self.size = 0
        return size

    def _relink(self, version: int) -> None:
        bits = BITS[version]
        self._lookup[version] = tuple((bits - prefix, table) for prefix, table
                                      in sorted(self._tables[version].items(), reverse=True))

    # -- expiry (the supervisor's copy) --

    def has(self, entry: Entry) -> bool:
        version, prefix, key = entry
        table = self._tables[version].get(prefix)
        return table is not None and key in table

    def expires(self, entry: Entry) -> Optional[float]:
        """The entry's expiry; KeyError when it is not there."""
        version, prefix, key = entry
        return self._tables[version][prefix][key]

    def next_expiry(self) -> Optional[float]:
        """When the next entry expires, or None."""
        heap = self._heap
        while heap and self._stale(heap[0]):
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def expire(self, now: float) -> List[Entry]:
        """Delete and return the entries whose expiry is `now` or earlier."""
        out = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            item = heapq.heappop(heap)
            if not self._stale(item):
                self.discard(item[1])
                out.append(item[1])
        return out

    def _stale(self, item: Tuple[float, Entry]) -> bool:
        """A heap item whose entry was deleted or renewed since."""
        expiry, (version, prefix, key) = item
        table = self._tables[version].get(prefix)
        return table is None or table.get(key, -1.0) != expiry

    # -- whole tables (the supervisor's file) --

    def tables(self) -> Iterator[Tuple[int, int, Dict[int, Optional[float]]]]:
        """(version, prefixlen, {key: expiry}) of each prefix length present."""
        for version in (4, 6):
            for prefix, table in sorted(self._tables[version].items(), reverse=True):
                yield version, prefix, table

    def load_table(self, version: int, prefix: int, keys: List[int],
                   expiries: List[Optional[float]]) -> None:
        """Add many entries of one prefix length at once (a restore); they
        replace equal entries. Call `settle_heap` after the last table."""
        table = self._tables[version].setdefault(prefix, {})
        before = len(table)
        table.update(zip(keys, expiries))
        self.size += len(table) - before
        self._heap.extend((e, (version, prefix, k)) for k, e in zip(keys, expiries)
                          if e is not None)
        self._relink(version)

    def settle_heap(self) -> None:
        heapq.heapify(self._heap)

    # -- listing --

    def entries(self) -> Iterator[Tuple[Entry, Optional[float]]]:
        """Every (entry, expiry), IPv4 before IPv6, longer prefixes first."""
        for version in (4, 6):
            for prefix, table in sorted(self._tables[version].items(), reverse=True):
                for key, expires in table.items():
                    yield (version, prefix, key), expires

    def __len__(self) -> int:
        return self.size


# A set's entries for another process: [(version, prefixlen, [key, ...]), ...],
# plain ints in lists (a million entries pickle in a fraction of a second).
Snapshot = List[Tuple[int, int, List[int]]]


def snapshot(store: AddressSet) -> Snapshot:
    """The entries of `store`, without their expiry (what a worker needs)."""
    return [(version, prefix, list(table)) for version in (4, 6)
            for prefix, table in sorted(store._tables[version].items(), reverse=True)]


def load_snapshot(store: AddressSet, snap: Snapshot) -> None:
    """Add a `snapshot`'s entries to `store` (no expiry: the supervisor expires them)."""
    for version, prefix, keys in snap:
        table = store._tables[version].setdefault(prefix, {})
        before = len(table)
        table.update(dict.fromkeys(keys))
        store.size += len(table) - before
        store._relink(version)
