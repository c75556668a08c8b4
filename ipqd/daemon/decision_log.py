"""Decision and event logging to journald (structured fields) or stderr.

Logging never blocks verdicts: the packet path only checks the policy's log
rate and appends to a bounded queue; a thread formats and sends. The worker
wakes that thread once per round of packets, after the round's verdicts
(`flush`), not once per entry: each wake-up hands the interpreter's lock
over twice, which cost more than writing the entry. The thread writes in
batches and lets the packet loop run between them. What the
rate suppressed and what a full queue (a slow or stuck journald) dropped are
counted and reported in a summary entry. Every text that comes from the
network, the kernel or the policy is escaped, so a name with a newline or a
control character cannot forge a second log line.
"""
from __future__ import annotations

import collections
import os
import socket
import struct
import sys
import threading
import time
from typing import TYPE_CHECKING, Callable, Deque, Dict, Optional, Tuple

from ipqd.decision.token_bucket import TokenBucket
from ipqd.policy.model import HOOK_NAMES, PROTOCOL_NAMES, Position, Rate
from ipqd.printable import clean

if TYPE_CHECKING:       # the supervisor logs no packets: it need not import them (dpkt)
    from ipqd.decision.packet import PacketView

LOG_ERR, LOG_WARNING, LOG_NOTICE, LOG_INFO = 3, 4, 5, 6
_SUMMARY_EVERY = 10.0
_WRITE_BATCH = 64           # entries the log thread writes before it lets the packet loop run
JOURNAL_SOCKET = "/run/systemd/journal/socket"
JOURNAL_TIMEOUT = 1.0


def choose_target(requested: str) -> str:
    """"journal" or "stderr": auto means journal when started by systemd."""
    if requested != "auto":
        return requested
    if os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"):
        return "journal"
    return "stderr"


_texts: Dict[tuple, Optional[str]] = {}       # (family, address) -> its text


def _address(family: Optional[int], value: Optional[int]) -> Optional[str]:
    """address_text, remembered: a flow's addresses come back entry after
    entry, and ipaddress takes microseconds to print one."""
    text = _texts.get((family, value), "")
    if text == "":
        from ipqd.decision.packet import address_text      # imported by the worker already: see above
        if len(_texts) >= 4096:
            _texts.clear()
        text = _texts[family, value] = address_text(family, value)
    return text


_sources: Dict[Position, str] = {}        # a rule's position -> its `file:line`, made once


def _source(position: Position) -> str:
    text = _sources.get(position)
    if text is None:
        if len(_sources) >= 65536:
            _sources.clear()
        text = _sources[position] = clean(f"{position.path}:{position.line}")
    return text


def decision_fields(action: str, rule_name: str, view: Optional[PacketView], queue: int,
                    mark: Optional[int], position: Optional[Position] = None,
                    digest: str = "", enforced: bool = True,
                    log_rules: Tuple[str, ...] = ()) -> Dict[str, str]:
    """The journal fields of one decision (headers only: never payload);
    `position`: where the deciding rule is written, `digest`: the policy's,
    `enforced` false for what monitor mode only logs, `log_rules`: the
    `action: log` rules the packet matched on the way."""
    fields = {"IPQD_VERDICT": action, "IPQD_RULE": clean(rule_name), "IPQD_QUEUE": str(queue)}
    if position is not None:
        fields["IPQD_RULE_SOURCE"] = _source(position)
    if digest:
        fields["IPQD_POLICY_DIGEST"] = digest
    if not enforced:        # monitor mode: accepted, though the policy says otherwise
        fields["IPQD_ENFORCED"] = "no"
    if log_rules:
        fields["IPQD_LOG_RULES"] = clean(",".join(log_rules))
    if view is None:
        return fields
    if view.family:
        fields["IPQD_FAMILY"] = f"ipv{view.family}"
    if view.proto is not None:
        fields["IPQD_PROTO"] = PROTOCOL_NAMES.get(view.proto, str(view.proto))
    for name, value in (("IPQD_SRC", _address(view.family, view.src)),
                        ("IPQD_DST", _address(view.family, view.dst)),
                        ("IPQD_SPORT", view.sport), ("IPQD_DPORT", view.dport),
                        ("IPQD_ICMP_TYPE", view.icmp_type), ("IPQD_ICMP_CODE", view.icmp_code),
                        ("IPQD_LENGTH", view.length)):
        if value is not None:
            fields[name] = str(value)
    if view.indev:
        fields["IPQD_IN"] = clean(view.indev)
    if view.outdev:
        fields["IPQD_OUT"] = clean(view.outdev)
    if view.hook is not None:
        fields["IPQD_HOOK"] = HOOK_NAMES.get(view.hook, str(view.hook))
    fields["IPQD_MARK"] = f"{mark if mark is not None else view.mark:#x}"
    if view.ct_state:
        fields["IPQD_CT_STATE"] = view.ct_state
    if view.malformed:
        fields["IPQD_MALFORMED"] = clean(view.reason or "malformed")
    elif view.hidden:       # the copy hid fields the rules read (see ipqd.decision.packet)
        fields["IPQD_CUT"] = clean(view.reason)
    return fields


def shadow_fields(enforced, shadow, view: Optional[PacketView], queue: int, digest: str,
                  shadow_digest: str) -> Dict[str, str]:
    """A disagreement's fields: the enforced decision's (decision_fields)
    and the shadow policy's verdict, rule, its file:line and digest."""
    rule = enforced.rule
    fields = decision_fields(enforced.action, rule.name if rule else "default", view, queue,
                             enforced.mark, rule.position if rule else None, digest)
    fields["IPQD_EVENT"] = "shadow-disagreement"
    fields["IPQD_SHADOW_VERDICT"] = shadow.action
    fields["IPQD_SHADOW_RULE"] = clean(shadow.rule.name if shadow.rule else "default")
    if shadow.mark is not None:
        fields["IPQD_SHADOW_MARK"] = f"{shadow.mark:#x}"
    position = shadow.rule.position if shadow.rule else None
    if position is not None:
        fields["IPQD_SHADOW_RULE_SOURCE"] = _source(position)
    if shadow_digest:
        fields["IPQD_SHADOW_POLICY_DIGEST"] = shadow_digest
    return fields


def shadow_message(fields: Dict[str, str]) -> str:
    """`SHADOW accept -> drop tcp 10.0.0.2:51514 -> 10.0.0.1:22 rule=ssh shadow-rule=default`."""
    text = decision_message(fields)
    verdict, _, rest = text.partition(" ")
    return (f"SHADOW {fields['IPQD_VERDICT']} -> {fields['IPQD_SHADOW_VERDICT']} {rest} "
            f"shadow-rule={fields['IPQD_SHADOW_RULE']}")


def decision_message(fields: Dict[str, str]) -> str:
    """`DROP tcp 10.0.0.2:51514 -> 10.0.0.1:23 in=veth0 rule=no-telnet`."""
    parts = [fields["IPQD_VERDICT"].upper()]
    if fields.get("IPQD_ENFORCED") == "no":
        parts.append("(not enforced)")
    if "IPQD_MALFORMED" in fields:
        parts.append(f"malformed ({fields['IPQD_MALFORMED']})")
    elif "IPQD_CUT" in fields:
        parts.append(f"cut ({fields['IPQD_CUT']})")
    parts.append(fields.get("IPQD_PROTO", "ip"))
    src, dst = fields.get("IPQD_SRC"), fields.get("IPQD_DST")
    if src and dst:
        def endpoint(addr: str, port: Optional[str]) -> str:
            if port is None:
                return addr
            return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"
        parts.append(f"{endpoint(src, fields.get('IPQD_SPORT'))} -> "
                     f"{endpoint(dst, fields.get('IPQD_DPORT'))}")
    if "IPQD_ICMP_TYPE" in fields:
        parts.append(f"type={fields['IPQD_ICMP_TYPE']} code={fields.get('IPQD_ICMP_CODE', '?')}")
    for key, word in (("IPQD_IN", "in"), ("IPQD_OUT", "out")):
        if key in fields:
            parts.append(f"{word}={fields[key]}")
    parts.append(f"rule={fields['IPQD_RULE']}")
    if "IPQD_LOG_RULES" in fields:
        parts.append(f"logged-by={fields['IPQD_LOG_RULES']}")
    return " ".join(parts)


class DecisionLog:
    """Rate-capped, bounded, off-the-packet-path logging."""

    def __init__(self, target: str = "stderr", rate: Optional[Rate] = None, capacity: int = 4096,
                 identifier: str = "ipqd", send: Optional[Callable] = None,
                 clock: Callable[[], float] = time.monotonic, digest: str = "",
                 shadow_digest: str = ""):
        self.target = target
        self.digest = digest            # of the policy whose decisions this log writes
        self.shadow_digest = shadow_digest      # of its shadow policy, if it has one
        self.identifier = identifier
        self.clock = clock
        # journald takes an entry per datagram, stderr a batch in one write
        self._send = send or (self._journal_send if target == "journal" else None)
        self._send_all = self._send_each if self._send else self._stderr_send_all
        self._journal: Optional[JournalSocket] = None
        self._bucket = TokenBucket(rate) if rate else None
        self._queue: Deque = collections.deque()
        self._capacity = capacity
        self._wake = threading.Event()
        self._stop = False
        self.logged = self.suppressed = self.overflowed = self.failed = 0
        self._reported = (0, 0)
        self._last_summary = clock()
        self._thread = threading.Thread(target=self._run, name="ipqd-log", daemon=True)
        self._thread.start()

    def set_rate(self, rate: Optional[Rate]) -> None:
        self._bucket = TokenBucket(rate) if rate else None

    # -- the packet path: cheap, never blocks

    def decision(self, action: str, rule_name: str, view: Optional[PacketView], queue: int,
                 mark: Optional[int], position: Optional[Position] = None,
                 enforced: bool = True, log_rules: Tuple[str, ...] = ()) -> None:
        """Queue a decision's entry; the writer wakes at the next `flush`
        (or within a second). `position`: where the deciding rule is written
        (formatted by the writer, off the packet path)."""
        if self._bucket is not None and not self._bucket.take(self.clock()):
            self.suppressed += 1
            return
        self._put(("decision", action, rule_name, view, queue, mark, position, enforced,
                   log_rules))

    def disagreement(self, enforced, shadow, view: Optional[PacketView], queue: int) -> None:
        """Queue the entry of a packet a shadow policy decides otherwise
        (`enforced` and `shadow` are the two Decisions), under the same rate
        as decisions."""
        if self._bucket is not None and not self._bucket.take(self.clock()):
            self.suppressed += 1
            return
        self._put(("shadow", enforced, shadow, view, queue))

    def wants_entry(self) -> bool:
        """Whether a logged decision made now would be written. When the
        rate would suppress it, counts it as suppressed and says False: the
        packet path may then answer it from the verdict cache, with no
        packet view to build (a flood of logged drops stays cheap)."""
        bucket = self._bucket
        if bucket is None or bucket.available(self.clock()):
            return True
        self.suppressed += 1
        return False

    def flush(self) -> None:
        """Wake the writer for the entries queued so far: once per round of packets."""
        if self._queue:
            self._wake.set()

    def event(self, message: str, priority: int = LOG_INFO, **fields: str) -> None:
        """A life-cycle entry (start, reload, errors): never rate-capped, written at once."""
        if self._put(("event", message, priority, fields)):
            self._wake.set()

    def _put(self, item) -> bool:
        """Queue `item` unless the queue is full (counted); the caller wakes the writer."""
        if len(self._queue) >= self._capacity:
            self.overflowed += 1
            return False
        self._queue.append(item)
        return True

    # -- the writer thread

    def _run(self) -> None:
        queue = self._queue
        while True:
            self._wake.wait(1.0)
            self._wake.clear()
            while queue:
                self._write([queue.popleft() for _ in range(min(len(queue), _WRITE_BATCH))])
                if queue:
                    time.sleep(0)   # lets the packet loop take the interpreter between batches
            self._maybe_summary()
            if self._stop and not queue:
                return

    def _write(self, items) -> None:
        entries = []
        for item in items:
            try:
                entries.append(self._entry(item))
            except Exception:       # a broken log must never stop the daemon
                self.failed += 1
        self._send_all(entries)

    def _entry(self, item):
        """(message, priority, fields) of a queued decision or event."""
        if item[0] == "decision":
            _, action, rule_name, view, queue, mark, position, enforced, log_rules = item
            fields = decision_fields(action, rule_name, view, queue, mark, position, self.digest,
                                     enforced, log_rules)
            notice = action in ("drop", "reject") and enforced
            return decision_message(fields), LOG_NOTICE if notice else LOG_INFO, fields
        if item[0] == "shadow":
            _, enforced, shadow, view, queue = item
            fields = shadow_fields(enforced, shadow, view, queue, self.digest, self.shadow_digest)
            return shadow_message(fields), LOG_NOTICE, fields
        _, message, priority, fields = item
        return clean(message), priority, {k: clean(v) for k, v in fields.items()}

    def _send_each(self, entries) -> None:
        for message, priority, fields in entries:
            try:
                self._send(message, priority, fields)
                self.logged += 1
            except Exception:
                self.failed += 1

    def _maybe_summary(self, force: bool = False) -> None:
        now = self.clock()
        if not force and now - self._last_summary < _SUMMARY_EVERY:
            return
        self._last_summary = now
        suppressed, overflowed = self.suppressed, self.overflowed
        new = (suppressed - self._reported[0], overflowed - self._reported[1])
        if new == (0, 0):
            return
        self._reported = (suppressed, overflowed)
        self._write([("event", f"log entries not written: {new[0]} over the log rate, "
                              f"{new[1]} while the log was backed up "
                              f"(totals {suppressed} and {overflowed})", LOG_NOTICE,
                     {"IPQD_EVENT": "log-summary", "IPQD_SUPPRESSED": str(new[0]),
                      "IPQD_OVERFLOWED": str(new[1])})])

    def close(self, timeout: float = 2.0) -> None:
        """Write what is queued (and a last summary), then stop the thread."""
        self._stop = True
        self._wake.set()
        self._thread.join(timeout)
        if not self._thread.is_alive():     # a stuck sink would block the caller too
            self._maybe_summary(force=True)
        if self._journal is not None:
            self._journal.close()

    # -- sinks

    def _journal_send(self, message: str, priority: int, fields: Dict[str, str]) -> None:
        if self._journal is None:
            self._journal = JournalSocket()
        self._journal.send({"MESSAGE": message, "PRIORITY": str(priority),
                            "SYSLOG_IDENTIFIER": self.identifier, **fields})

    def _stderr_send_all(self, entries) -> None:
        if not entries:
            return
        try:
            sys.stderr.write("".join(f"{message}\n" for message, _, _ in entries))
            sys.stderr.flush()
            self.logged += len(entries)
        except Exception:
            self.failed += len(entries)


def encode_journal(fields: Dict[str, str]) -> bytes:
    """One entry in journald's native protocol: KEY=value lines, or for a value
    holding a newline, KEY, a newline, its length (64-bit little endian) and the value."""
    parts = []
    for key, value in fields.items():
        data = str(value).encode("utf-8", "backslashreplace")
        name = key.encode("ascii")
        if b"\n" in data:
            parts.append(name + b"\n" + struct.pack("<Q", len(data)) + data + b"\n")
        else:
            parts.append(name + b"=" + data + b"\n")
    return b"".join(parts)


class JournalSocket:
    """A datagram socket connected to journald, with a send timeout.

    Not python-systemd's journal.send: that blocks with the GIL held when
    journald stops reading, which stops every thread of the process, packet
    loop included. Here a stuck journald costs the log thread at most
    `timeout` per entry (the entry counts as failed, and the bounded queue
    drops what comes meanwhile); a restarted journald is reached again
    through a new socket.
    """

    def __init__(self, path: str = JOURNAL_SOCKET, timeout: float = JOURNAL_TIMEOUT):
        self.path = path
        self.timeout = timeout
        self._sock: Optional[socket.socket] = None

    def send(self, fields: Dict[str, str]) -> None:
        """Raises OSError (socket.timeout included) when journald cannot take it."""
        data = encode_journal(fields)
        fresh = self._sock is None
        if fresh:
            self._connect()
        try:
            self._sock.send(data)
        except ConnectionError:
            # journald was restarted: this socket still points at the old one.
            self.close()
            if fresh:
                raise
            self._connect()
            self._sock.send(data)
        except OSError:
            self.close()
            raise

    def _connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.path)     # connected: a full journald shows as not writable
        except OSError:
            sock.close()
            raise
        self._sock = sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
