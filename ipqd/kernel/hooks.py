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

The rule text comes from ipqd.kernel.hook_rules (pure); this module runs
it, and only as root. Looking (`show`, `detect`) changes nothing: nft's
queue statement is probed with `nft -c` (checked by the kernel, never
committed), and no table is listed that does not exist (listing one with
iptables would create it). Tables that an install had to create are
recorded in the state directory and deleted again by `remove` when empty.
"""
from __future__ import annotations

import errno
import os
import shutil
import socket
import struct
import subprocess
from typing import List, Optional, Sequence, Tuple

from ipqd.console import error_line
from ipqd.errors import HookError, PolicyRefused
from ipqd.kernel.hook_rules import (_IPT_PLACE, BACKENDS, KEPT_CHAINS, NFT_TABLE,  # noqa: F401
                                    OFFLOAD_CHAIN, SLOT_CHAIN, Plan, chain_name, plan,
                                    plan_iptables, plan_nft, queue_layout)
from ipqd.policy.model import Hook, QueueConfig


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
    if backend != "nft":            # chains an earlier policy had and this one has not
        _remove_iptables(backend, keep=the_plan.jumps)
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


def _family_of(tool: str) -> str:
    return "ip6" if tool.startswith("ip6tables") else "ip"


def table_exists(tool: str, table: str) -> bool:
    """Whether `table` exists for `tool` (e.g. ip6tables-legacy), asked
    without creating it: listing a missing table with iptables creates it."""
    family = _family_of(tool)
    if tool.endswith("-legacy"):
        try:
            with open(f"/proc/self/net/{family}_tables_names") as names:
                return table in names.read().split()
        except OSError:
            return False                # no legacy table at all (module not loaded)
    if shutil.which("nft") is None:
        return True                     # cannot ask without listing: assume it may
    return _run(["nft", "list", "table", family, table]).returncode == 0


def _remove_chain(tool: str, table: str, chain: str, builtin: Optional[str] = None) -> bool:
    """Delete every jump from `builtin` to `chain` (a helper chain has none
    left: only ipqd's own chains jump to it), then the chain. True if it
    existed."""
    base = [tool, "-w", "-t", table]
    if not table_exists(tool, table) or _run(base + ["-n", "-L", chain]).returncode != 0:
        return False
    while builtin and _run(base + ["-D", builtin, "-j", chain]).returncode == 0:
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
    return _remove_iptables(backend)


def _remove_iptables(backend: str, keep: Sequence[Tuple[str, str, str, str]] = ()) -> List[str]:
    """Remove ipqd's iptables chains of `backend` but the jumps in `keep`
    (tool, table, builtin, chain), and the offload chain of each table no
    kept jump uses (e.g. ip6tables' after a policy leaves IPv6). What was
    removed."""
    removed = []
    used = {(tool, table) for tool, table, _, _ in keep}
    variant = backend.split("-", 1)[1]
    for family in ("iptables", "ip6tables"):
        tool = f"{family}-{variant}"
        if shutil.which(tool) is None:
            continue
        for chain, (table, builtin) in _IPT_PLACE.items():
            jump = (tool, table, builtin, chain_name(chain))
            if jump not in keep and _remove_chain(tool, table, jump[3], builtin):
                removed.append(f"{tool} -t {table} {jump[3]}")
        for table in sorted({table for table, _ in _IPT_PLACE.values()}):
            if (tool, table) in used:
                continue
            for chain in (OFFLOAD_CHAIN, SLOT_CHAIN, *KEPT_CHAINS.values()):
                if _remove_chain(tool, table, chain):
                    removed.append(f"{tool} -t {table} {chain}")
    return removed


def probe_nft_queue() -> Tuple[bool, str]:
    """Whether nft's native queue statement works here (a throwaway table)."""
    if shutil.which("nft") is None:
        return False, "nft is not installed"
    # -c: the kernel checks the transaction and nothing is committed.
    script = ("table inet ipqd_probe {\n  chain c {\n"
              "    type filter hook input priority 0; policy accept;\n"
              "    meta l4proto 253 queue num 65535 bypass\n  }\n}\n")
    result = _run(["nft", "-c", "-f", "-"], script)
    if result.returncode == 0:
        return True, "ok"
    return False, _explain_failure("nft", ["nft"], result)


def detect_backend() -> Tuple[str, List[str]]:
    """The best backend that works here, and why the better ones were passed over.
    Raises HookError without root: the kernel answers no probe then."""
    require_privilege("detecting the hooks backend")
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


def cgroup_note(backend: str) -> str:
    """Whether `cgroup:` and `unit:` rules can be enforced here, in one line."""
    from ipqd.policy.loader import cgroup2_root, has_cgroup2
    root = cgroup2_root()
    if root is None:
        if has_cgroup2():
            return ("cgroup: this kernel has cgroup v2, not mounted here: rules with cgroup "
                    "or unit work if their cgroups exist; ipqd cannot check that they do")
        return ("cgroup: this kernel has no cgroup v2: rules with cgroup or unit cannot be "
                "enforced here")
    if backend == "nft" and root != "/sys/fs/cgroup":
        # nft looks cgroup paths up under /sys/fs/cgroup only
        return (f"cgroup: cgroup v2 at {root}, where nft cannot find cgroups (it looks under "
                "/sys/fs/cgroup): for rules with cgroup or unit use --backend iptables-nft")
    match = "socket cgroupv2" if backend == "nft" else "iptables cgroup --path"
    return f"cgroup: cgroup v2 at {root}; rules with cgroup or unit use {match} (output only)"


def require_privilege(doing: str) -> None:
    """Raise HookError saying that `doing` needs root, unless it has CAP_NET_ADMIN."""
    from ipqd.kernel.queue_socket import has_cap_net_admin
    if not has_cap_net_admin():
        raise HookError(f"{doing} needs root (CAP_NET_ADMIN): run it with sudo, or as root")


# ---------------------------------------------------------------- what was installed

STATE_DIR = "/run/ipqd"


def _state_path(state_dir: str) -> str:
    return f"{state_dir.rstrip('/')}/hooks.backend"


def remember(backend: str, state_dir: str = STATE_DIR,
             created: Sequence[Tuple[str, str]] = ()) -> None:
    """Note which backend holds ipqd's rules, so `remove` needs no guess,
    and the tables an install created (tool, table), so `remove` can delete
    them again; tables noted earlier for the same backend stay noted."""
    if remembered(state_dir) == backend:
        created = list(dict.fromkeys(list(created_tables(state_dir)) + list(created)))
    os.makedirs(state_dir, mode=0o755, exist_ok=True)
    with open(_state_path(state_dir), "w") as f:
        f.write(backend + "\n")
        for tool, table in created:
            f.write(f"created {tool} {table}\n")


def _state_lines(state_dir: str) -> List[str]:
    try:
        with open(_state_path(state_dir)) as f:
            return f.read().splitlines()
    except OSError:
        return []


def remembered(state_dir: str = STATE_DIR) -> Optional[str]:
    lines = _state_lines(state_dir)
    backend = lines[0].strip() if lines else None
    return backend if backend in BACKENDS else None


def created_tables(state_dir: str = STATE_DIR) -> List[Tuple[str, str]]:
    """The (tool, table) pairs ipqd's installs created, as remember noted them."""
    return [tuple(line.split()[1:3]) for line in _state_lines(state_dir)[1:]
            if line.startswith("created ") and len(line.split()) == 3]


def install_recorded(hooks: Sequence[Hook], queue: QueueConfig, backend: str,
                     state_dir: str = STATE_DIR) -> Plan:
    """install, noting the backend and the tables it had to create."""
    missing = missing_tables(plan(hooks, queue, backend))
    the_plan = install(hooks, queue, backend)
    remember(backend, state_dir, missing)
    return the_plan


def remove_recorded(backend: str, state_dir: str = STATE_DIR) -> List[str]:
    """remove, then delete the tables ipqd's installs created if nothing
    else has put rules there since; forget the state. What was removed."""
    removed = remove(backend)
    for tool, table in created_tables(state_dir):
        if _delete_if_empty(tool, table):
            removed.append(f"{tool} table {table} (created by ipqd, empty)")
    forget(state_dir)
    return removed


def missing_tables(the_plan: Plan) -> List[Tuple[str, str]]:
    """The tables an install of `the_plan` would create. Only iptables-nft's
    count: nft's table is ipqd's own, and a legacy table, once the kernel
    registers it, cannot be deleted."""
    if the_plan.backend != "iptables-nft":
        return []
    pairs = dict.fromkeys((tool, table) for tool, table, _, _ in the_plan.jumps)
    return [pair for pair in pairs if not table_exists(*pair)]


def _delete_if_empty(tool: str, table: str) -> bool:
    """Delete an iptables-nft table that holds only empty built-in chains
    with policy accept. Whether it was deleted."""
    family = _family_of(tool)
    listed = _run(["nft", "list", "table", family, table])
    if listed.returncode != 0:
        return False
    for line in (line.strip() for line in listed.stdout.splitlines()):
        if not line or line == "}" or line.startswith(("table ", "chain ")):
            continue
        if line.startswith("type ") and line.endswith("policy accept;"):
            continue
        return False                    # a rule, or a policy someone set
    return _run(["nft", "delete", "table", family, table]).returncode == 0


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

def run_hooks_command(args, verify=None) -> int:
    """`ipqd hooks install|remove|show|detect`; the exit status (ipqd.exits).
    `verify`: runs the policy's own test cases, as `ipqd run` does (load_checked)."""
    import sys
    from ipqd.exits import EXIT_FAILED, EXIT_INVALID, EXIT_OK, EXIT_UNREADABLE
    from ipqd.policy.checked import load_checked

    lock = None
    try:
        if args.action in ("install", "remove"):
            require_privilege(f"ipqd hooks {args.action}")
            lock = hold_lock()
        if args.action == "detect":
            chosen, notes = detect_backend()
            for note in notes:
                print(f"passed over {note}")
            print(cgroup_note(chosen))
            print(chosen)
            return EXIT_OK
        if args.action == "remove":
            _remove_command(args)
            return EXIT_OK
        # The same checks, in the same order, as `ipqd run` makes: hooks are
        # never moved for a policy the daemon would refuse.
        policy = load_checked(args.policy, verify)
        backend = _chosen_backend(args)
        if args.action == "show":
            for argv, stdin in plan(policy.hooks, policy.queue, backend).scripts:
                print(f"# {' '.join(argv)}")
                print(stdin, end="")
            return EXIT_OK
        previous = remembered(args.state_dir)
        if previous and previous != backend:
            remove_recorded(previous, args.state_dir)
        install_recorded(policy.hooks, policy.queue, backend, args.state_dir)
        print(f"installed {len(policy.hooks)} hook(s) with {backend}")
        return EXIT_OK
    except PolicyRefused as refused:
        for line in refused.lines:
            error_line(line)
        error_line(f"ipqd: hooks left as they are: fix the policy, then check it with "
                   f"`ipqd check {args.policy}`")
        return EXIT_INVALID
    except OSError as err:
        error_line(f"ipqd: cannot read {err.filename or args.policy}: {err.strerror}")
        return EXIT_UNREADABLE
    except HookError as err:
        error_line(f"ipqd: {err}")
        return EXIT_FAILED
    finally:
        if lock is not None:
            lock.close()
        sys.stdout.flush()


def _chosen_backend(args) -> str:
    """--backend, else the one holding ipqd's rules now, else the best here."""
    import sys
    backend = args.backend
    if backend == "auto" and args.action == "install":
        backend = remembered(args.state_dir) or "auto"    # stay where the rules are
    if backend == "auto":
        backend, notes = detect_backend()
        for note in notes:
            print(f"ipqd: passed over {note}", file=sys.stderr)
    return backend


def _remove_command(args) -> None:
    """Remove ipqd's rules: from the backend noted, or --backend, or else
    from every backend that has any (tables that do not exist are not
    listed, so none is created); then the tables ipqd's installs created."""
    backend = args.backend
    if backend == "auto":
        backend = remembered(args.state_dir)
    for name in [backend] if backend else BACKENDS:
        for what in remove(name):
            print(f"removed {what}")
    for tool, table in created_tables(args.state_dir):
        if _delete_if_empty(tool, table):
            print(f"removed {tool} table {table} (created by ipqd, empty)")
    forget(args.state_dir)
