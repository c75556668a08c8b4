"""The supervisor's dynamic sets: their entries, kept on disk, told to every
worker, each change journaled.

The supervisor owns the entries (`SetKeeper`, one ipqd.decision.address_set
AddressSet per set, with expiry times); each worker holds membership only.
A change (`ipqd set add/del/flush` over the control socket, an expiry) is
made here, then sent to every worker as a SetChange; a new worker (start,
restart, a reload's successor) gets every set's entries with its start
(WorkerConfig.sets).

On disk, under the unit's StateDirectory (`--sets-file`, default
/var/lib/ipqd/sets.json): the entries as a snapshot written atomically
(a temporary file, fsync, rename), and each change since appended as one
JSON line to SNAPSHOT.log (fsync'd before the change is answered). At a
stop, once the log grows past COMPACT_AFTER bytes, and at a start that
found changes in the log (or expired entries), the snapshot is written
anew and the log emptied. Entries are integers and expiry times
wall-clock seconds, so a timeout runs on while ipqd is stopped: an entry
due meanwhile is expired (and journaled) at start.
"""
from __future__ import annotations

import itertools
import json
import os
import time
from typing import Callable, Dict, Iterable, List, Optional

from ipqd.control.commands import Command, CommandTable, Peer, argument
from ipqd.daemon.decision_log import LOG_INFO, LOG_WARNING
from ipqd.daemon.messages import SetChange
from ipqd.decision.address_set import AddressSet, Entry, format_entry, parse_entry, snapshot
from ipqd.errors import ControlError, InvalidValue, SetError
from ipqd.policy._values import format_duration, parse_duration
from ipqd.policy.model import DynamicSet, Policy

DEFAULT_PATH = "/var/lib/ipqd/sets.json"
FORMAT = 1
COMPACT_AFTER = 8 << 20             # bytes of change log before the snapshot is written anew
EVENT_ENTRIES = 10                  # entries named in one journal event; the rest are counted


class SetKeeper:
    """The dynamic sets of the running policy. `send(message)` reaches every
    live worker; `log` is the daemon's DecisionLog (journal events)."""

    def __init__(self, path: Optional[str], log, send=None):
        self.path = path or None            # None: kept in memory only
        self.log = log
        self.send = send or (lambda message: None)
        self.declared: Dict[str, DynamicSet] = {}
        self.stores: Dict[str, AddressSet] = {}
        self._journal = None
        self.write_failed = ""              # the last failure to write, said once

    # ------------------------------------------------------------ the policy

    def adopt(self, policy: Policy) -> None:
        """The sets `policy` declares dynamic. Entries of a set it still
        declares stay; a new one starts empty. The entries of a set it no
        longer declares are left out of what workers get and what is
        written (a reload that is then called off adopts the old policy
        again, and finds them)."""
        self.declared = {s.name: s for s in policy.sets}
        for name, declared in self.declared.items():
            store = self.stores.get(name)
            if store is None:
                self.stores[name] = AddressSet(name, declared.max)
            else:
                store.max_entries = declared.max

    def snapshots(self) -> Dict[str, list]:
        """Every declared set's entries, for a new worker (WorkerConfig.sets)."""
        return {name: snapshot(self.stores[name]) for name in self.declared}

    def store(self, name: str) -> AddressSet:
        """The declared dynamic set `name`; raises SetError naming the known ones."""
        if name not in self.declared:
            known = ", ".join(sorted(self.declared)) or "none: declare one with "\
                "'sets: {NAME: {type: address, dynamic: true}}'"
            raise SetError(f"no dynamic set '{name}' in the running policy (dynamic sets: "
                           f"{known})")
        return self.stores[name]

    # ------------------------------------------------------------ changes

    def add(self, name: str, texts: Iterable[str], timeout: Optional[float], uid: Optional[int],
            now: Optional[float] = None) -> dict:
        """Add (or renew) entries, all or none: a bad entry, or more new
        entries than the set has room for, refuses the whole request.
        `timeout`: seconds (None: the set's own timeout, if any; 0: none)."""
        store = self.store(name)
        entries = parse_entries(texts)
        now = time.time() if now is None else now
        if timeout is None:
            timeout = self.declared[name].timeout
        expires = now + timeout if timeout else None
        fresh = sum(1 for e in dict.fromkeys(entries) if not store.has(e))
        if store.size + fresh > store.max_entries:
            raise SetError(f"set '{name}' has room for {store.max_entries - store.size} more "
                           f"entries (max {store.max_entries}), not {fresh}: delete entries, "
                           "or raise its max in the policy")
        added = sum(store.add(entry, expires) for entry in entries)
        self._record({"op": "add", "set": name, "entries": [list(e) for e in entries],
                      "expires": expires})
        self.send(SetChange(name, "add", tuple(entries)))
        self._event("set-add", name, entries, uid, f"added (timeout "
                    f"{_timeout_text(timeout)}, {added} new)",
                    IPQD_TIMEOUT=str(timeout or 0))
        return {"set": name, "added": added, "renewed": len(set(entries)) - added,
                "size": store.size, "timeout": timeout}

    def delete(self, name: str, texts: Iterable[str], uid: Optional[int]) -> dict:
        store = self.store(name)
        entries = parse_entries(texts)
        gone = [e for e in entries if store.discard(e)]
        missing = len(set(entries)) - len(gone)
        if gone:
            self._record({"op": "del", "set": name, "entries": [list(e) for e in gone]})
            self.send(SetChange(name, "del", tuple(gone)))
            self._event("set-del", name, gone, uid, "deleted")
        return {"set": name, "deleted": len(gone), "missing": missing, "size": store.size}

    def flush(self, name: str, uid: Optional[int]) -> dict:
        store = self.store(name)
        count = store.clear()
        self._record({"op": "flush", "set": name})
        self.send(SetChange(name, "flush", ()))
        self.log.event(f"set {name}: flushed by {_who(uid)} ({count} entries)", LOG_INFO,
                       IPQD_EVENT="set-flush", IPQD_SET=name, IPQD_COUNT=str(count),
                       **_uid(uid))
        return {"set": name, "flushed": count, "size": 0}

    def listing(self, name: str, now: Optional[float] = None) -> dict:
        """Every entry with its remaining seconds (None: no timeout)."""
        store = self.store(name)
        now = time.time() if now is None else now
        declared = self.declared[name]
        return {"set": name, "size": store.size, "max": store.max_entries,
                "timeout": declared.timeout,
                "entries": [{"entry": format_entry(entry),
                             "remaining": None if expires is None
                             else round(max(0.0, expires - now), 3)}
                            for entry, expires in store.entries()]}

    def summary(self) -> List[dict]:
        return [{"set": name, "size": self.stores[name].size,
                 "max": self.stores[name].max_entries, "timeout": d.timeout}
                for name, d in sorted(self.declared.items())]

    # ------------------------------------------------------------ time

    def next_expiry(self) -> Optional[float]:
        """The wall-clock time of the next expiry among the declared sets."""
        due = [t for t in (self.stores[n].next_expiry() for n in self.declared) if t is not None]
        return min(due) if due else None

    def wait_ms(self, longest: int) -> int:
        """How long the supervisor's loop may sleep: `longest` ms, or until
        the next expiry (an entry goes within a few ms of its time)."""
        due = self.next_expiry()
        if due is None:
            return longest
        return max(0, min(longest, int((due - time.time()) * 1000) + 1))

    def expire(self, now: Optional[float] = None) -> int:
        """Delete what is due (each set journaled once); how many went."""
        now = time.time() if now is None else now
        total = 0
        for name in self.declared:
            gone = self.stores[name].expire(now)
            if gone:
                total += len(gone)
                self._record({"op": "del", "set": name, "entries": [list(e) for e in gone]})
                self.send(SetChange(name, "del", tuple(gone)))
                self._event("set-expire", name, gone, None, "expired")
        if total:
            self._compact_if_long()
        return total

    # ------------------------------------------------------------ on disk

    def restore(self, now: Optional[float] = None) -> None:
        """Read the snapshot and the change log (a torn last line is left
        out), drop what expired meanwhile, write a fresh snapshot."""
        if self.path is None:
            return
        now = time.time() if now is None else now
        kept: Dict[str, AddressSet] = {}
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}, not {FORMAT}")
            for name, tables in data["sets"].items():
                store = kept.setdefault(name, AddressSet(name, 1 << 62))
                for version, prefix, keys, expiries in tables:
                    if version not in (4, 6) or len(keys) != len(expiries):
                        raise ValueError(f"set {name}: a damaged table")
                    store.load_table(version, prefix, keys, expiries)
                store.settle_heap()
        except FileNotFoundError:
            pass
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as error:
            kept = {}
            self.log.event(f"sets: cannot read {self.path} ({error}); dynamic sets start "
                           "from the change log alone", LOG_WARNING, IPQD_EVENT="set-restore")
        replayed = self._replay(kept)
        changed = bool(replayed)
        for name, restored in kept.items():
            if name not in self.declared:
                changed = True
                if restored.size:
                    self.log.event(f"set {name}: {restored.size} entries not restored: the "
                                   "policy declares no dynamic set of that name", LOG_WARNING,
                                   IPQD_EVENT="set-restore", IPQD_SET=name,
                                   IPQD_COUNT=str(restored.size))
                continue
            # The restored set becomes the set, within the policy's max.
            store = self.stores[name] = restored
            store.max_entries = self.declared[name].max
            left_out = [entry for entry, _ in
                        itertools.islice(store.entries(), max(0, store.size - store.max_entries))]
            for entry in left_out:
                store.discard(entry)
            changed = changed or bool(left_out)
            if left_out:
                self.log.event(f"set {name}: {len(left_out)} entries not restored: past its "
                               f"max of {store.max_entries} (raise it in the policy)",
                               LOG_WARNING, IPQD_EVENT="set-restore", IPQD_SET=name,
                               IPQD_COUNT=str(len(left_out)))
            gone = store.expire(now)
            changed = changed or bool(gone)
            if gone:
                self._event("set-expire", name, gone, None, "expired while ipqd was stopped")
            self.log.event(f"set {name}: {store.size} entries restored", LOG_INFO,
                           IPQD_EVENT="set-restore", IPQD_SET=name, IPQD_COUNT=str(store.size))
        if changed:                 # else the snapshot on disk is already this
            self.save()

    def _replay(self, kept: Dict[str, AddressSet]) -> int:
        try:
            with open(self.path + ".log", encoding="utf-8") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            return 0
        except OSError as error:
            self.log.event(f"sets: cannot read {self.path}.log: {error.strerror}", LOG_WARNING,
                           IPQD_EVENT="set-restore")
            return 0
        done = 0
        for line in lines:
            try:
                change = json.loads(line)
                store = kept.setdefault(change["set"], AddressSet(change["set"], 1 << 62))
                op = change["op"]
                if op == "add":
                    for entry in change["entries"]:
                        store.add(tuple(entry), change["expires"])
                elif op == "del":
                    for entry in change["entries"]:
                        store.discard(tuple(entry))
                elif op == "flush":
                    store.clear()
                done += 1
            except (ValueError, KeyError, TypeError):
                break               # a line cut short by a crash: what follows cannot be trusted
        return done

    def save(self) -> None:
        """The declared sets as a snapshot (atomically), and an empty change log."""
        if self.path is None or (not self.declared and not os.path.exists(self.path)):
            return
        # Columns, not an object per entry: a million entries write and
        # read back in about a second.
        data = {"format": FORMAT, "written": time.time(),
                "sets": {name: [[v, p, list(table), list(table.values())]
                                for v, p, table in self.stores[name].tables()]
                         for name in self.declared}}
        try:
            directory = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(directory, mode=0o700, exist_ok=True)
            temporary = f"{self.path}.{os.getpid()}.tmp"
            with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w",
                      encoding="utf-8") as f:
                json.dump(data, f, separators=(",", ":"))
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, self.path)
            self._close_journal()
            os.close(os.open(self.path + ".log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
            _fsync_directory(directory)
        except OSError as error:
            self._write_failed(error)

    def close(self) -> None:
        """At stop: the snapshot, so the next start reads no change log."""
        self.save()
        self._close_journal()

    def _record(self, change: dict) -> None:
        if self.path is None:
            return
        try:
            if self._journal is None:
                os.makedirs(os.path.dirname(os.path.abspath(self.path)), mode=0o700,
                            exist_ok=True)
                self._journal = open(os.open(self.path + ".log", os.O_WRONLY | os.O_CREAT |
                                             os.O_APPEND, 0o600), "a", encoding="utf-8")
            self._journal.write(json.dumps(change, separators=(",", ":")) + "\n")
            self._journal.flush()
            os.fsync(self._journal.fileno())
        except OSError as error:
            self._write_failed(error)
        self._compact_if_long()

    def _compact_if_long(self) -> None:
        if self._journal is not None:
            try:
                if self._journal.tell() > COMPACT_AFTER:
                    self.save()
            except OSError:
                pass

    def _close_journal(self) -> None:
        if self._journal is not None:
            try:
                self._journal.close()
            except OSError:
                pass
            self._journal = None

    def _write_failed(self, error: OSError) -> None:
        text = f"sets: cannot write {self.path}: {error.strerror or error}; the entries hold " \
               "until ipqd stops, but would not survive a restart"
        if text != self.write_failed:
            self.write_failed = text
            self.log.event(text, LOG_WARNING, IPQD_EVENT="set-write-failed")

    # ------------------------------------------------------------ journal

    def _event(self, event: str, name: str, entries: List[Entry], uid: Optional[int],
               what: str, **fields: str) -> None:
        shown = [format_entry(e) for e in entries[:EVENT_ENTRIES]]
        more = f" and {len(entries) - len(shown)} more" if len(entries) > len(shown) else ""
        by = f" by {_who(uid)}" if event != "set-expire" else ""
        self.log.event(f"set {name}: {', '.join(shown)}{more} {what}{by}", LOG_INFO,
                       IPQD_EVENT=event, IPQD_SET=name, IPQD_COUNT=str(len(entries)),
                       IPQD_ENTRIES=" ".join(shown) + more, **_uid(uid), **fields)


def sets_path(written: Optional[str]) -> str:
    """Where the sets are kept: `--sets-file`, else sets.json in the unit's
    StateDirectory (systemd's $STATE_DIRECTORY), else DEFAULT_PATH."""
    if written:
        return written
    state = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    return os.path.join(state, "sets.json") if state else DEFAULT_PATH


def parse_entries(texts: Iterable[str]) -> List[Entry]:
    """Entries from their text; SetError naming the first bad one and its place."""
    out = []
    for number, text in enumerate(texts, start=1):
        if not isinstance(text, str):
            raise SetError(f"entry {number} is not text")
        try:
            out.append(parse_entry(text))
        except SetError as error:
            raise SetError(f"entry {number}: {error.message}; nothing was changed") from None
    return out


def _who(uid: Optional[int]) -> str:
    return "ipqd" if uid is None else f"uid {uid}"


def _uid(uid: Optional[int]) -> dict:
    """The IPQD_UID field, left out for ipqd's own changes (expiry)."""
    return {} if uid is None else {"IPQD_UID": str(uid)}


def _timeout_text(timeout: Optional[float]) -> str:
    return format_duration(timeout) if timeout else "none"


def _fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def send_to(workers) -> Callable[[object], None]:
    """A `send` for SetKeeper: the message to every worker of the dict
    `workers()` returns (a worker that died is the pool's to see)."""
    def send(message) -> None:
        for worker in list(workers().values()):
            try:
                worker.conn.send(message)
            except OSError:
                pass
    return send


# ---------------------------------------------------------------- control commands
#
# `ipqd set add/del/list/flush` (ipqd.control.set_verbs) ask these over the
# control socket (docs/control.md); they run in the supervisor's loop.

def _refused(error: SetError) -> ControlError:
    return ControlError("refused", error.message)


def _entries(args: dict) -> List[str]:
    entries = argument(args, "entries", list)
    if not entries:
        raise ControlError("bad-arguments", "no entries: name addresses or networks")
    return entries


def _timeout(args: dict) -> Optional[float]:
    """`timeout`: seconds, or a duration as the policy writes it (`10m`); 0: none."""
    written = args.get("timeout")
    if written is None:
        return None
    if isinstance(written, (int, float)) and not isinstance(written, bool) and written >= 0:
        return float(written)
    if isinstance(written, str):
        if written.strip() in ("0", "none"):
            return 0.0
        try:
            return parse_duration(written)
        except InvalidValue as error:
            raise ControlError("bad-arguments", f"timeout: {error.message}")
    raise ControlError("bad-arguments", "timeout must be seconds or a duration such as 10m")


def set_add(daemon, args: dict, peer: Peer) -> dict:
    name = argument(args, "set", str)
    try:
        return daemon.sets.add(name, _entries(args), _timeout(args), peer.uid)
    except SetError as error:
        raise _refused(error)


def set_del(daemon, args: dict, peer: Peer) -> dict:
    name = argument(args, "set", str)
    try:
        return daemon.sets.delete(name, _entries(args), peer.uid)
    except SetError as error:
        raise _refused(error)


def set_flush(daemon, args: dict, peer: Peer) -> dict:
    try:
        return daemon.sets.flush(argument(args, "set", str), peer.uid)
    except SetError as error:
        raise _refused(error)


def set_list(daemon, args: dict, peer: Peer) -> dict:
    name = argument(args, "set", str, None)
    try:
        if name is None:
            return {"sets": daemon.sets.summary()}
        return daemon.sets.listing(name)
    except SetError as error:
        raise _refused(error)


SET_COMMANDS: CommandTable = {
    "set-add": Command(set_add, True, "add or renew entries of a dynamic set "
                       "(args: set, entries, timeout)"),
    "set-del": Command(set_del, True, "delete entries of a dynamic set (args: set, entries)"),
    "set-flush": Command(set_flush, True, "delete every entry of a dynamic set (args: set)"),
    "set-list": Command(set_list, False, "a dynamic set's entries and their remaining time "
                        "(args: set; none: every set's size)"),
}
