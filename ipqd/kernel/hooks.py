"""The kernel rules that send traffic to ipqd's queue, and their removal.

ipqd keeps its rules in chains of its own (`IPQD_INPUT`, ... or nft table
`inet ipqd`) and adds one jump per built-in chain, so the administrator's
rules are never touched; `remove` deletes exactly those. Installing again
replaces the chains' contents atomically (one iptables-restore transaction,
or one nft script), so a reload never opens a window where traffic passes
uninspected.

Backends: `iptables-legacy`, `iptables-nft` (the NFQUEUE target through
nft's xtables compatibility) and `nft` (nft's native `queue` statement,
which needs CONFIG_NFT_QUEUE). `detect_backend` tries them in that order of
preference: nft, iptables-nft, iptables-legacy.

Rule text is built by pure functions (`plan_*`), so what would be installed
can be tested and shown (`ipqd hooks show`) without touching the kernel.

With flow offload (ipqd.policy.offload), each chain starts with the rules that turn
ipqd's NF_REPEAT requests into conntrack marks and accept or drop the flows
already marked, before any queue rule; their packet counters are what the
kernel decided instead of ipqd.
"""
from __future__ import annotations

import errno
import os
import shutil
import socket
import struct
import subprocess
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from ipqd.errors import IpqdError
from ipqd.policy.offload import Layout, layout as offload_layout
from ipqd.policy.model import Hook, QueueConfig

BACKENDS = ("nft", "iptables-nft", "iptables-legacy")
NFT_TABLE = "ipqd"
# iptables: clears the request bits and accepts (one rule cannot do both).
OFFLOAD_CHAIN = "IPQD_OFFLOAD"

# Built-in chain -> (iptables table, built-in chain name). Input, forward and
# output live in filter, where firewall rules are; the routing hooks exist
# only in mangle (and nat/raw).
_IPT_PLACE = {
    "input": ("filter", "INPUT"),
    "forward": ("filter", "FORWARD"),
    "output": ("filter", "OUTPUT"),
    "prerouting": ("mangle", "PREROUTING"),
    "postrouting": ("mangle", "POSTROUTING"),
}
# nft base chain priorities matching the iptables tables above.
_NFT_PRIORITY = {"input": 0, "forward": 0, "output": 0, "prerouting": -150, "postrouting": -150}
_IPV6_PROTO = {"icmp": "ipv6-icmp", "icmpv6": "ipv6-icmp"}
_IPV4_PROTO = {"icmpv6": None}


# Conntrack states in the order their queues are laid out (see queue_layout).
CT_STATES = ("new", "established", "related", "invalid", "untracked")


def queue_layout(queue: QueueConfig) -> Dict[int, Tuple[int, Optional[str]]]:
    """Every queue number ipqd binds -> (worker index, conntrack state or None).

    Without conntrack, the policy's numbers as they are, one worker each.
    With conntrack (a rule reads ct_state), the hook rules send each state
    to its own block of queues, so the state is known from the queue a
    packet arrives on: this works on every kernel, including those that
    cannot attach conntrack information to queued packets
    (CONFIG_NETFILTER_NETLINK_GLUE_CT off). Block k holds state k, one queue
    per worker: num + k * width + worker.
    """
    nums = queue.nums
    width = len(nums)
    if not queue.conntrack:
        return {num: (i, None) for i, num in enumerate(nums)}
    return {nums[0] + k * width + i: (i, state)
            for k, state in enumerate(CT_STATES) for i in range(width)}


class HookError(IpqdError):
    """Installing or removing the queue rules failed; says which backend and what to try."""


@dataclass(frozen=True)
class Plan:
    """What one install does: per command (e.g. iptables-legacy-restore), its input text."""
    backend: str
    scripts: Tuple[Tuple[Tuple[str, ...], str], ...]     # (argv, stdin)
    jumps: Tuple[Tuple[str, str, str, str], ...] = ()    # (tool, table, builtin, chain)


def chain_name(hook_chain: str) -> str:
    return "IPQD_" + hook_chain.upper()


def _families(hook: Hook) -> Tuple[int, ...]:
    return {"ipv4": (4,), "ipv6": (6,), "both": (4, 6)}[hook.family]


def _queue_targets(queue: QueueConfig, nft: bool = False) -> List[Tuple[str, str]]:
    """(match, target) pairs that send traffic to ipqd's queues: one pair,
    or one per conntrack state when the policy reads ct_state."""
    width = len(queue.nums)
    blocks = [("", queue.nums[0])]
    if queue.conntrack:
        if nft:
            blocks = [(f"ct state {state} ", queue.nums[0] + k * width)
                      for k, state in enumerate(CT_STATES)]
        else:
            blocks = [(f"-m conntrack --ctstate {state.upper()} ", queue.nums[0] + k * width)
                      for k, state in enumerate(CT_STATES)]
    pairs = []
    for match, first in blocks:
        last = first + width - 1
        if nft:
            target = f"queue num {first}" if width == 1 else f"queue num {first}-{last}"
            target += " bypass" if queue.bypass else ""
        elif width == 1:
            target = f"-j NFQUEUE --queue-num {first}"
        else:
            # A flow always hashes to the same queue: one worker per queue sees whole flows.
            target = f"-j NFQUEUE --queue-balance {first}:{last}"
        if not nft and queue.bypass:
            target += " --queue-bypass"
        pairs.append((match, target))
    return pairs


def _offload_layout(hooks: Sequence[Hook], queue: QueueConfig) -> Optional[Layout]:
    return offload_layout(queue.offload, {hook.chain for hook in hooks})


# Conntrack states an offloaded verdict applies to: a related packet (an ICMP
# error) carries its master flow's connmark, and must still be decided by ipqd.
_DIRECTIONS = (("ORIGINAL", "original"), ("REPLY", "reply"))


def _offload_iptables(chain: str, hook_chain: str, bits: Layout) -> List[str]:
    slot = bits.slot(hook_chain)
    if slot is None:
        return []
    ra, rd = bits.request_accept, bits.request_drop
    accept = dict(zip(("ORIGINAL", "REPLY"), (slot.accept_original, slot.accept_reply)))
    drop = dict(zip(("ORIGINAL", "REPLY"), (slot.drop_original, slot.drop_reply)))
    ct = "-m conntrack --ctstate NEW,ESTABLISHED --ctdir"
    rules = []
    # ipqd's request (the packet is back from NF_REPEAT): remember it, then apply it.
    for request, kept in ((ra, accept), (rd, drop)):
        for direction, _ in _DIRECTIONS:
            bit = kept[direction]
            rules.append(f"-A {chain} -m mark --mark {request:#x}/{request:#x} {ct} {direction} "
                         f"-j CONNMARK --set-xmark {bit:#x}/{bit:#x}")
    rules.append(f"-A {chain} -m mark --mark {rd:#x}/{rd:#x} -j DROP")
    rules.append(f"-A {chain} -m mark --mark {ra:#x}/{ra:#x} -j {OFFLOAD_CHAIN}")
    # Flows offloaded earlier; drop first, should both ever be set.
    for kept, target in ((drop, "DROP"), (accept, "ACCEPT")):
        for direction, _ in _DIRECTIONS:
            bit = kept[direction]
            rules.append(f"-A {chain} {ct} {direction} -m connmark --mark {bit:#x}/{bit:#x} "
                         f"-j {target}")
    return rules


def _offload_nft(hook_chain: str, bits: Layout) -> List[str]:
    slot = bits.slot(hook_chain)
    if slot is None:
        return []
    ra, rd = bits.request_accept, bits.request_drop
    accept = dict(zip(("original", "reply"), (slot.accept_original, slot.accept_reply)))
    drop = dict(zip(("original", "reply"), (slot.drop_original, slot.drop_reply)))
    ct = "ct state { new, established } ct direction"
    keep = ~bits.request & 0xFFFFFFFF
    rules = []
    for request, kept in ((ra, accept), (rd, drop)):
        for _, direction in _DIRECTIONS:
            bit = kept[direction]
            rules.append(f"meta mark and {request:#x} == {request:#x} {ct} {direction} "
                         f"ct mark set ct mark or {bit:#x}")
    rules.append(f"meta mark and {rd:#x} == {rd:#x} drop")
    rules.append(f"meta mark and {ra:#x} == {ra:#x} meta mark set meta mark and {keep:#x} accept")
    for kept, verdict in ((drop, "drop"), (accept, "accept")):
        for _, direction in _DIRECTIONS:
            bit = kept[direction]
            rules.append(f"{ct} {direction} ct mark and {bit:#x} == {bit:#x} {verdict}")
    return rules


def _ipt_proto(proto: Optional[str], family: int) -> Optional[str]:
    """The -p argument for a hook's proto in one family; None: skip this family."""
    if proto is None:
        return ""
    table = _IPV6_PROTO if family == 6 else _IPV4_PROTO
    mapped = table.get(proto, proto)
    return None if mapped is None else f"-p {mapped} "


def plan_iptables(hooks: Sequence[Hook], queue: QueueConfig, variant: str) -> Plan:
    """iptables-restore scripts (one per family and table) for `variant`
    ("legacy" or "nft"). Declaring a chain in --noflush mode flushes it, so
    each script replaces ipqd's chains in one transaction."""
    rules: Dict[Tuple[int, str], Dict[str, List[str]]] = {}
    jumps = []
    bits = _offload_layout(hooks, queue)
    for hook in hooks:
        table, builtin = _IPT_PLACE[hook.chain]
        for family in _families(hook):
            proto = _ipt_proto(hook.proto, family)
            if proto is None:
                continue
            chains = rules.setdefault((family, table), {})
            name = chain_name(hook.chain)
            if name not in chains:
                offload = _offload_iptables(name, hook.chain, bits) if bits else []
                chains[name] = offload
                if offload:
                    chains[OFFLOAD_CHAIN] = [
                        f"-A {OFFLOAD_CHAIN} -j MARK --set-xmark 0x0/{bits.request:#x}",
                        f"-A {OFFLOAD_CHAIN} -j ACCEPT"]
            chain_rules = chains[name]
            for match, target in _queue_targets(queue):
                chain_rules.append(f"-A {chain_name(hook.chain)} {proto}{match}{target}")
            tool = ("iptables" if family == 4 else "ip6tables") + f"-{variant}"
            jump = (tool, table, builtin, chain_name(hook.chain))
            if jump not in jumps:
                jumps.append(jump)
    scripts = []
    for (family, table), chains in sorted(rules.items()):
        lines = [f"*{table}"] + [f":{name} - [0:0]" for name in chains]
        for name, chain_rules in chains.items():
            lines += chain_rules
        lines.append("COMMIT")
        tool = ("iptables" if family == 4 else "ip6tables") + f"-{variant}-restore"
        scripts.append(((tool, "-w", "--noflush"), "\n".join(lines) + "\n"))
    return Plan(f"iptables-{variant}", tuple(scripts), tuple(jumps))


def plan_nft(hooks: Sequence[Hook], queue: QueueConfig) -> Plan:
    """One nft script: table inet ipqd, replaced whole (add, delete, define)."""
    chains: Dict[str, List[str]] = {}
    bits = _offload_layout(hooks, queue)
    for hook in hooks:
        if hook.chain not in chains:
            chains[hook.chain] = _offload_nft(hook.chain, bits) if bits else []
        match = {"ipv4": "meta nfproto ipv4 ", "ipv6": "meta nfproto ipv6 ", "both": ""}[hook.family]
        if hook.proto:
            proto = {"icmpv6": "ipv6-icmp"}.get(hook.proto, hook.proto)
            match += f"meta l4proto {proto} "
        for ct_match, target in _queue_targets(queue, nft=True):
            chains.setdefault(hook.chain, []).append(f"{match}{ct_match}{target}")
    lines = [f"table inet {NFT_TABLE}", f"delete table inet {NFT_TABLE}", f"table inet {NFT_TABLE} {{"]
    for chain, rules in chains.items():
        lines.append(f"  chain {chain} {{")
        lines.append(f"    type filter hook {chain} priority {_NFT_PRIORITY[chain]}; policy accept;")
        lines += [f"    {rule}" for rule in rules]
        lines.append("  }")
    lines.append("}")
    return Plan("nft", ((("nft", "-f", "-"), "\n".join(lines) + "\n"),))


def plan(hooks: Sequence[Hook], queue: QueueConfig, backend: str) -> Plan:
    if backend == "nft":
        return plan_nft(hooks, queue)
    if backend in ("iptables-legacy", "iptables-nft"):
        return plan_iptables(hooks, queue, backend.split("-", 1)[1])
    raise HookError(f"unknown hooks backend {backend!r}: choose one of {', '.join(BACKENDS)}")


# ---------------------------------------------------------------- running the plan

def _run(argv: Sequence[str], stdin: str = "") -> subprocess.CompletedProcess:
    try:
        return subprocess.run(list(argv), input=stdin, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        return subprocess.CompletedProcess(argv, 127, "", f"{argv[0]}: command not found")


def _explain_failure(backend: str, argv: Sequence[str], result) -> str:
    text = (result.stderr or result.stdout).strip()
    others = [b for b in BACKENDS if b != backend]
    advice = f"try --backend {' or --backend '.join(others)}"
    if backend == "nft" and "No such file or directory" in text:
        return (f"the nft backend cannot queue packets: this kernel has no nft `queue` "
                f"statement (CONFIG_NFT_QUEUE); {advice}")
    if result.returncode == 127:
        return f"{argv[0]} is not installed; install it or {advice}"
    return f"{' '.join(argv)} failed: {text}; {advice}"


def install(hooks: Sequence[Hook], queue: QueueConfig, backend: str) -> Plan:
    """Install (or atomically replace) ipqd's queue rules. Returns the plan.

    Raises HookError naming the backend that failed and what to try instead.
    """
    the_plan = plan(hooks, queue, backend)
    if backend != "nft":
        _remove_stale_iptables(backend, the_plan)
    for argv, stdin in the_plan.scripts:
        result = _run(argv, stdin)
        if result.returncode != 0:
            raise HookError(_explain_failure(backend, argv, result))
    for tool, table, builtin, chain in the_plan.jumps:
        jump = [tool, "-w", "-t", table]
        if _run(jump + ["-C", builtin, "-j", chain]).returncode != 0:
            result = _run(jump + ["-I", builtin, "1", "-j", chain])
            if result.returncode != 0:
                raise HookError(_explain_failure(backend, jump, result))
    return the_plan


def _remove_stale_iptables(backend: str, new_plan: Plan) -> None:
    """Chains of an earlier policy that the new one no longer has: unhook and delete."""
    wanted = set(new_plan.jumps)
    variant = backend.split("-", 1)[1]
    for family in ("iptables", "ip6tables"):
        tool = f"{family}-{variant}"
        for chain, (table, builtin) in _IPT_PLACE.items():
            jump = (tool, table, builtin, chain_name(chain))
            if jump not in wanted:
                _remove_chain(*jump)


def _remove_chain(tool: str, table: str, builtin: str, chain: str) -> bool:
    """Delete every jump to `chain`, then the chain. True if anything existed."""
    base = [tool, "-w", "-t", table]
    if _run(base + ["-n", "-L", chain]).returncode != 0:
        return False
    while _run(base + ["-D", builtin, "-j", chain]).returncode == 0:
        pass
    _run(base + ["-F", chain])
    _run(base + ["-X", chain])
    return True


def remove(backend: str) -> List[str]:
    """Remove everything ipqd installed with `backend`; returns what was removed."""
    removed = []
    if backend == "nft":
        if _run(["nft", "list", "table", "inet", NFT_TABLE]).returncode == 0:
            _run(["nft", "delete", "table", "inet", NFT_TABLE])
            removed.append(f"nft table inet {NFT_TABLE}")
        return removed
    variant = backend.split("-", 1)[1]
    for family in ("iptables", "ip6tables"):
        tool = f"{family}-{variant}"
        if shutil.which(tool) is None:
            continue
        for chain, (table, builtin) in _IPT_PLACE.items():
            if _remove_chain(tool, table, builtin, chain_name(chain)):
                removed.append(f"{tool} -t {table} {chain_name(chain)}")
        for table in sorted({table for table, _ in _IPT_PLACE.values()}):
            if _remove_helper_chain(tool, table, OFFLOAD_CHAIN):
                removed.append(f"{tool} -t {table} {OFFLOAD_CHAIN}")
    return removed


def _remove_helper_chain(tool: str, table: str, chain: str) -> bool:
    """Delete a chain only ipqd's own chains jump to (they are gone by now)."""
    base = [tool, "-w", "-t", table]
    if _run(base + ["-n", "-L", chain]).returncode != 0:
        return False
    _run(base + ["-F", chain])
    _run(base + ["-X", chain])
    return True


def probe_nft_queue() -> Tuple[bool, str]:
    """Whether nft's native queue statement works here (a throwaway table)."""
    if shutil.which("nft") is None:
        return False, "nft is not installed"
    script = ("table inet ipqd_probe\ndelete table inet ipqd_probe\n"
              "table inet ipqd_probe {\n  chain c {\n"
              "    type filter hook input priority 0; policy accept;\n"
              "    meta l4proto 253 queue num 65535 bypass\n  }\n}\n")
    result = _run(["nft", "-f", "-"], script)
    _run(["nft", "delete", "table", "inet", "ipqd_probe"])
    if result.returncode == 0:
        return True, "ok"
    return False, _explain_failure("nft", ["nft"], result)


def detect_backend() -> Tuple[str, List[str]]:
    """The best backend that works here, and why the better ones were passed over."""
    notes = []
    ok, why = probe_nft_queue()
    if ok:
        return "nft", notes
    notes.append(f"nft: {why}")
    for backend in ("iptables-nft", "iptables-legacy"):
        if shutil.which(backend) and shutil.which(f"{backend}-restore"):
            return backend, notes
        notes.append(f"{backend}: not installed")
    raise HookError("no backend can install queue rules here: " + "; ".join(notes)
                    + ". Install iptables (or nftables with CONFIG_NFT_QUEUE), or run with "
                      "--no-hooks and add the NFQUEUE rules yourself")


# ---------------------------------------------------------------- what was installed

STATE_DIR = "/run/ipqd"


def _state_path(state_dir: str) -> str:
    return f"{state_dir.rstrip('/')}/hooks.backend"


def remember(backend: str, state_dir: str = STATE_DIR) -> None:
    """Note which backend holds ipqd's rules, so `remove` needs no guess."""
    os.makedirs(state_dir, mode=0o755, exist_ok=True)
    with open(_state_path(state_dir), "w") as f:
        f.write(backend + "\n")


def remembered(state_dir: str = STATE_DIR) -> Optional[str]:
    try:
        with open(_state_path(state_dir)) as f:
            backend = f.read().strip()
    except OSError:
        return None
    return backend if backend in BACKENDS else None


def forget(state_dir: str = STATE_DIR) -> None:
    try:
        os.unlink(_state_path(state_dir))
    except FileNotFoundError:
        pass


# ---------------------------------------------------------------- who may touch them

# An abstract unix socket: one per network namespace (where the hooks are),
# gone with its holder however it ends, and no file to leave behind.
LOCK_ADDRESS = b"\0ipqd/hooks"


def hold_lock() -> socket.socket:
    """Take the right to change ipqd's hooks in this network namespace, held
    while the returned socket is open (an `ipqd run` holds it for its whole
    life). Raises HookError naming the holder when another process has it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(LOCK_ADDRESS)
        sock.listen(1)          # a peer's connect then tells who holds it (lock_holder)
    except OSError as error:
        sock.close()
        if error.errno != errno.EADDRINUSE:
            raise HookError(f"cannot take the hooks lock: {error.strerror}") from None
        holder = lock_holder()
        who = f"process {holder}" if holder else "another process"
        raise HookError(f"another ipqd ({who}) owns ipqd's queue rules in this network "
                        f"namespace; stop it first (`ipqd run --no-hooks` leaves the rules "
                        f"alone)") from None
    return sock


def lock_holder() -> Optional[int]:
    """The pid holding the hooks lock, or None (free, or not known)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(0.5)
    try:
        probe.connect(LOCK_ADDRESS)
        creds = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return struct.unpack("3i", creds)[0] or None
    except OSError:
        return None
    finally:
        probe.close()


# ---------------------------------------------------------------- `ipqd hooks`

def run_hooks_command(args) -> int:
    """`ipqd hooks install|remove|show|detect`: exit 0 on success, 1 on failure."""
    import sys
    from ipqd.policy.checked import PolicyRefused, load_checked

    backend = args.backend
    lock = None
    try:
        if args.action in ("install", "remove"):
            lock = hold_lock()
        if args.action == "detect":
            chosen, notes = detect_backend()
            for note in notes:
                print(f"passed over {note}")
            print(chosen)
            return 0
        if args.action == "remove":
            backends = [backend] if backend != "auto" else (
                [remembered(args.state_dir)] if remembered(args.state_dir) else list(BACKENDS))
            for name in backends:
                for what in remove(name):
                    print(f"removed {what}")
            forget(args.state_dir)
            return 0
        # The same checks, in the same order, as `ipqd run` makes: hooks are
        # never moved for a policy the daemon would refuse.
        policy = load_checked(args.policy)
        if backend == "auto" and args.action == "install":
            backend = remembered(args.state_dir) or "auto"    # stay where the rules are
        if backend == "auto":
            backend, notes = detect_backend()
            for note in notes:
                print(f"ipqd: passed over {note}", file=sys.stderr)
        if args.action == "show":
            for argv, stdin in plan(policy.hooks, policy.queue, backend).scripts:
                print(f"# {' '.join(argv)}")
                print(stdin, end="")
            return 0
        previous = remembered(args.state_dir)
        if previous and previous != backend:
            remove(previous)
        install(policy.hooks, policy.queue, backend)
        remember(backend, args.state_dir)
        print(f"installed {len(policy.hooks)} hook(s) with {backend}")
        return 0
    except PolicyRefused as refused:
        for line in refused.lines:
            print(line, file=sys.stderr)
        print(f"ipqd: hooks left as they are: fix the policy, then check it with "
              f"`ipqd check {args.policy}`", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"ipqd: cannot read {err.filename or args.policy}: {err.strerror}", file=sys.stderr)
        return 1
    except HookError as err:
        print(f"ipqd: {err}", file=sys.stderr)
        return 1
    finally:
        if lock is not None:
            lock.close()
