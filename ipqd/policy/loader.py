"""Policy files -> `Policy`, with every problem reported at once.

`load(path)` reads the main file and the fragments in `policy.d/` beside it;
`loads(text)` reads one text (no fragments). Both raise `PolicyErrors` holding
every error found (and the warnings), each with file, line and column, or
return a `Policy` whose `warnings` hold the warnings. Past
MAX_LISTED_PROBLEMS, one line counts the rest, unless `every_problem` is
asked for (`ipqd check`). The limits are in ipqd.policy._limits.

Pure except for reading the policy files (and the user and group databases
when a rule names a user or group).
"""
from __future__ import annotations

import errno
import os
import re
import stat
from dataclasses import replace
from typing import Callable, Dict, List, NamedTuple, Optional, Set, Tuple

import yaml

from ipqd.errors import InvalidValue, PolicyError, PolicyErrors
from ipqd.policy import _lint
from ipqd.policy import _values as values
from ipqd.policy._limits import MAX_LISTED_PROBLEMS, MAX_RULES, MAX_TOTAL_BYTES
from ipqd.policy._offload import parse_offload
from ipqd.policy._undecidable import parse_undecidable
from ipqd.policy._nodes import Where, boolean, choice, describe, fields, is_scalar, scalars, text
from ipqd.policy._shadow import shadow_path
from ipqd.policy._rules import ParsedRule, SetDef, check_reject, parse_action, parse_rate, \
    parse_reject_with, parse_rule, parse_set_mark
from ipqd.policy._sets import parse_set_file, read_mapping
from ipqd.policy._values import one_of
from ipqd.policy._yamlsafe import TAG_PROBLEM_STARTS, compose, read_text
from ipqd.policy.cgroup import capacity, ordered
from ipqd.policy.model import (
    CT_STATES, HOOKS, MODES, PROTOCOL_NAMES, Default, Hook, LoggingConfig, Policy, QueueConfig,
)
from ipqd.wire.nfqueue import NFQNL_MAX_COPY_RANGE

__all__ = ["load", "loads", "load_with_sets", "check_file_safety", "fragment_paths", "Loaded"]

FRAGMENT_DIR = "policy.d"
TOP_FIELDS = ("version", "mode", "queue", "hooks", "default", "logging", "sets", "rules",
              "tests", "shadow")
FRAGMENT_FIELDS = ("sets", "rules")
QUEUE_FIELDS = ("num", "copy_range", "fail_open", "bypass", "maxlen", "conntrack", "offload",
                "undecidable")
HOOK_FIELDS = ("chain", "family", "proto")
HOOK_FAMILIES = ("ipv4", "ipv6", "both")
DEFAULT_FIELDS = ("action", "log", "set_mark", "reject_with")
LOGGING_FIELDS = ("rate",)

CT_QUEUE_BLOCKS = len(CT_STATES)     # one block of queues per conntrack state
MAX_QUEUES = 64                      # one worker each: more is a typo, not a plan
COPY_RANGE_HEADERS = 64              # an IPv6 header (40) plus a TCP one (20) and change
_SET_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_PORT_TEXT = re.compile(r"^\d+(\s*-\s*\d+)?$")


class Loaded(NamedTuple):
    policy: Policy
    sets: Dict[str, tuple]           # set name -> its networks or port ranges


class _File(NamedTuple):
    where: Where
    root: Optional[yaml.Node]
    items: Dict[str, Tuple[yaml.Node, yaml.Node]]   # section -> (key node, value node)


def load(path: str, every_problem: bool = False) -> Policy:
    """The policy in `path` plus `policy.d/*.yaml` beside it.

    Raises OSError when the main file (or the fragment directory) cannot be
    read, PolicyErrors when the policy is not valid. Its problems (in the
    Policy's warnings, or in PolicyErrors) stop at MAX_LISTED_PROBLEMS and a
    line that counts the rest, unless `every_problem`.
    """
    return load_with_sets(path, every_problem).policy


def load_with_sets(path: str, every_problem: bool = False) -> Loaded:
    """As `load`, with the sets the policy defined (expanded into the rules)."""
    try:
        text = read_text(path)
    except PolicyError as e:
        raise PolicyErrors([e]) from None
    loader = _Loader(every_problem)
    for name in skipped_fragments(path):
        loader.problems.append(PolicyError(name, 0, 0, "not read: policy.d reads only files "
                                                       "ending in .yaml (rename it, or move it "
                                                       "out of policy.d)", severity="warning"))
    return loader.run(path, text, fragment_paths(path))


def loads(text: str, path: str = "<string>", every_problem: bool = False) -> Policy:
    """The policy in `text`; `path` only names it in messages. No fragments."""
    return _Loader(every_problem).run(path, text, []).policy


def fragment_paths(path: str) -> List[str]:
    """The policy.d fragments `load` reads for `path`, in the order it reads them."""
    return [name for name in _policy_d(path) if name.endswith(".yaml")]


def skipped_fragments(path: str) -> List[str]:
    """The files in policy.d that `load` does not read (hidden ones aside):
    a `20-web.yml` there is most likely meant to be read."""
    return [name for name in _policy_d(path) if not name.endswith(".yaml")]


def _policy_d(path: str) -> List[str]:
    """The paths of policy.d's entries beside `path`, sorted, hidden ones aside."""
    directory = os.path.join(os.path.dirname(path), FRAGMENT_DIR)
    if not os.path.isdir(directory):
        return []
    return [os.path.join(directory, name) for name in sorted(os.listdir(directory))
            if not name.startswith(".")]


class _Loader:
    def __init__(self, every_problem: bool = False):
        self.every_problem = every_problem
        self.size = 0                               # bytes read, over all files
        self.problems: List[PolicyError] = []
        self.sets: Dict[str, SetDef] = {}
        self.used_sets: Set[str] = set()
        self.shared: Dict[tuple, object] = {}       # see parse_rule
        self.tagged: Set[tuple] = set()             # where a refused tag's value was emptied
        self.sources: List[str] = []

    # --- files ---------------------------------------------------------------

    def run(self, path: str, text: str, fragment_paths: List[str]) -> Loaded:
        main = self._compose(path, text, TOP_FIELDS, "a policy", main=True)
        fragments = []
        for fragment in fragment_paths:
            if self.size > MAX_TOTAL_BYTES:         # said once, at the fragment that went past
                break
            fragments.append(self._compose(fragment, None, FRAGMENT_FIELDS,
                                           "a policy.d fragment"))
        files = [f for f in [main] + fragments if f is not None]
        if not self._few_enough_rules(files):
            raise PolicyErrors(self._listed(path, sorted(self.problems, key=self._order)))
        for f in files:
            if "sets" in f.items:
                self._sets(f.where, *f.items["sets"])
        parsed = []
        for f in files:
            if "rules" in f.items:
                parsed += self._rules(f.where, f.items["rules"][1], len(parsed))
        policy = self._policy(main, parsed) if main is not None else None
        self._unused_sets()
        errors = [p for p in self.problems if p.severity == "error"]
        if policy is not None and not errors:
            self.problems += _lint.lint(policy, main.items.get("default", (main.root,))[0])
        # A refused tag's value reads as empty: the field's own complaint
        # about that would only repeat the refusal.
        self.problems = [p for p in self.problems if (p.path, p.line, p.column) not in self.tagged
                         or p.message.startswith(TAG_PROBLEM_STARTS)]
        problems = self._listed(path, sorted(self.problems, key=self._order))
        if errors or policy is None:
            raise PolicyErrors(problems)
        return Loaded(_with_warnings(policy, self.sources, problems),
                      {name: s.values for name, s in self.sets.items()})

    def _few_enough_rules(self, files: List[_File]) -> bool:
        """False, with an error at the first rule too many, past MAX_RULES.

        Counted before any rule is read, so a policy far too large costs
        only its reading.
        """
        lists = [(f, f.items["rules"][1]) for f in files if "rules" in f.items]
        lists = [(f, node) for f, node in lists if isinstance(node, yaml.SequenceNode)]
        total = sum(len(node.value) for _, node in lists)
        if total <= MAX_RULES:
            return True
        before = 0
        for f, node in lists:
            if before + len(node.value) > MAX_RULES:
                break
            before += len(node.value)
        f.where.error(node.value[MAX_RULES - before],
                      f"the policy has {total} rules, more than the {MAX_RULES} allowed "
                      f"(this is rule {MAX_RULES + 1}): use sets so that one rule matches "
                      "many addresses or ports, or remove rules")
        return False

    def _listed(self, path: str, problems: List[PolicyError]) -> List[PolicyError]:
        """`problems`, or past MAX_LISTED_PROBLEMS the first of them (errors
        before warnings) and one more line that counts the rest."""
        if self.every_problem or len(problems) <= MAX_LISTED_PROBLEMS:
            return problems
        first = sorted(problems, key=lambda p: p.severity != "error")[:MAX_LISTED_PROBLEMS]
        kept = {id(p) for p in first}
        left = [p for p in problems if id(p) not in kept]
        errors = sum(1 for p in left if p.severity == "error")
        counts = [_more(number, word) for number, word in
                  ((errors, "error"), (len(left) - errors, "warning")) if number]
        return [p for p in problems if id(p) in kept] + [
            PolicyError(left[0].path, left[0].line, left[0].column,
                        f"{' and '.join(counts)} not listed (the first of them here): "
                        f"run `ipqd check {path}` to list them all",
                        "error" if errors else "warning")]

    def _order(self, problem: PolicyError):
        rank = self.sources.index(problem.path) if problem.path in self.sources else 0
        return rank, problem.line, problem.column

    def _compose(self, path: str, text: Optional[str], known, what: str,
                 main: bool = False) -> Optional[_File]:
        self.sources.append(path)
        where = Where(path, self.problems)
        try:
            if text is None:
                text = read_text(path)
            self.size += len(text.encode("utf-8"))
            if not main and self.size > MAX_TOTAL_BYTES:
                raise PolicyError(path, 1, 1, _too_large(self.size))
            root, duplicates = compose(text, path)
            self.tagged.update((p.path, p.line, p.column) for p in duplicates
                               if p.message.startswith(TAG_PROBLEM_STARTS))
        except PolicyError as e:
            self.problems.append(e)
            return None
        except OSError as e:
            self.problems.append(PolicyError(path, 1, 1, f"cannot read this fragment: {e.strerror}"))
            return None
        self.problems += duplicates
        if root is None or (isinstance(root, yaml.ScalarNode) and root.tag.endswith(":null")):
            if main:
                self.problems.append(PolicyError(path, 1, 1, "the policy file is empty: "
                                                 "start with 'version: 1'"))
                return None
            return _File(where, None, {})
        if not isinstance(root, yaml.MappingNode):
            sections = f"{', '.join(known[:-1])} and {known[-1]}"
            where.error(root, f"{what} must be a mapping of sections ({sections}), "
                              f"not {describe(root)}")
            return None
        items = fields(where, root, known, what,
                       listing=None if main else "only sets and rules in a fragment")
        return _File(where, root, {name: (key, value) for key, name, value in items or ()})

    # --- sets -----------------------------------------------------------------

    def _sets(self, where: Where, key: yaml.Node, node: yaml.Node) -> None:
        if _is_null(node):
            return
        if not isinstance(node, yaml.MappingNode):
            where.error(node, f"sets must be a mapping of set names to lists, not {describe(node)}")
            return
        for name_node, value in node.value:
            name = name_node.value if is_scalar(name_node) else ""
            if not _SET_NAME.match(name):
                where.error(name_node, f"'{name}' is not a set name (letters, digits, '_', '-', '.')")
                continue
            if name in self.sets:
                first = self.sets[name]
                where.error(name_node, f"set '{name}' is already defined "
                                       f"({_place(first.where.path, first.node, where.path)})")
                continue
            if isinstance(value, yaml.MappingNode):
                self.sets[name] = self._set_mapping(where, name, name_node, value)
                continue
            kind, members = self._set_items(where, name, value)
            self.sets[name] = SetDef(name, kind, members, name_node, where)

    def _set_mapping(self, where: Where, name: str, name_node: yaml.Node,
                     node: yaml.MappingNode) -> SetDef:
        """A set from a file, or a dynamic one (ipqd.policy._sets)."""
        read = read_mapping(where, name, node)
        if not read.ok:
            return SetDef(name, None, (), name_node, where)
        if read.dynamic is not None:
            return SetDef(name, "address", (), name_node, where, dynamic=read.dynamic)
        file_node, written = read.file
        path = os.path.join(os.path.dirname(where.path), written)
        try:
            content = read_set_file(path)
        except OSError as e:
            where.error(file_node, f"set '{name}': cannot read {path}: {e.strerror}")
            return SetDef(name, None, (), name_node, where)
        except UnicodeDecodeError as e:
            where.error(file_node, f"set '{name}': {path} is not UTF-8 text ({e.reason} at "
                                   f"byte {e.start})")
            return SetDef(name, None, (), name_node, where)
        if path not in self.sources:
            self.sources.append(path)
        kind, members = parse_set_file(path, content, name, read.kind, self.problems)
        return SetDef(name, kind, members, name_node, where)

    def _set_items(self, where: Where, name: str, node: yaml.Node):
        """(kind, members) of a set; kind None when the set is not usable."""
        items = scalars(where, node, f"set '{name}'", "a list of addresses or of ports")
        if items is None:
            return None, ()
        kinds, members, ok = set(), [], True
        for item in items:
            written = item.value.strip()
            try:
                if _PORT_TEXT.match(written):
                    members.append(values.parse_range(written, "port", 0, 65535, "8000-8099"))
                    kinds.add("port")
                    continue
                network, warning = values.parse_network(written)
            except InvalidValue as e:
                message = e.message
                if not _PORT_TEXT.match(written):
                    message = (f"'{written}' is neither an address nor a port "
                               "(write e.g. 10.0.0.0/8, fd00::/8, 22 or 8000-8099)")
                where.error(item, f"set '{name}': {message}")
                ok = False
                continue
            if warning:
                where.warn(item, warning)
            members.append(network)
            kinds.add("address")
        if len(kinds) > 1:
            where.error(node, f"set '{name}' holds both addresses and ports: "
                              "split it into an address set and a port set")
            return None, ()
        if not ok:
            return None, ()
        return kinds.pop(), tuple(dict.fromkeys(members))

    def _unused_sets(self) -> None:
        for name, found in self.sets.items():
            if name not in self.used_sets and found.kind is not None:
                found.where.warn(found.node, f"set '{name}' is never used "
                                             f'(use it as "@{name}", or remove it)')

    # --- rules ----------------------------------------------------------------

    def _rules(self, where: Where, node: yaml.Node, before: int) -> List[ParsedRule]:
        if _is_null(node):
            return []
        if not isinstance(node, yaml.SequenceNode):
            where.error(node, f"rules must be a list of rules, not {describe(node)}")
            return []
        out = []
        for offset, item in enumerate(node.value, start=1):
            parsed = parse_rule(where, item, before + offset, self.sets, self.used_sets,
                                self.shared)
            if parsed is not None:
                out.append(parsed)
        return out

    def _check_names(self, parsed: List[ParsedRule]) -> None:
        first: Dict[str, ParsedRule] = {}
        for rule in parsed:
            if rule.name in first:
                earlier = first[rule.name]
                rule.where.within("").error(
                    rule.name_node,
                    f'duplicate rule name "{rule.name}" '
                    f"(first {_place(earlier.where.path, earlier.name_node, rule.where.path)}): "
                    "rule names must be unique")
            else:
                first[rule.name] = rule

    def _policy(self, main: _File, parsed: List[ParsedRule]) -> Optional[Policy]:
        self._check_names(parsed)
        where, items = main.where, main.items
        _version(where, main.root, items.get("version"))
        queue = _queue(where, items.get("queue"))
        hooks = _hooks(where, main.root, items.get("hooks"))
        default = _default(where, main.root, items.get("default"))
        logging = _logging(where, items.get("logging"))
        queue = _conntrack(where, queue, items.get("queue"), parsed)
        mode = "enforce" if "mode" not in items else choice(where, items["mode"][1], "mode", MODES)
        if mode == "monitor":
            where.warn(items["mode"][1], "mode: monitor: every packet is accepted; what the "
                                         "policy would drop or reject is only logged (write "
                                         "mode: enforce once the log shows it is right)")
        if None in (queue, hooks, default, logging, mode) or any(p.rule is None for p in parsed):
            return None
        rejects = default.action == "reject" or any(p.rule.action == "reject" for p in parsed)
        cgroups = _cgroups(where, queue, hooks, parsed)
        if cgroups is None:
            return None
        queue = replace(queue, reject=rejects, cgroups=cgroups)
        dynamic = tuple(s.dynamic for s in self.sets.values() if s.dynamic is not None)
        return Policy(path=where.path, version=1, queue=queue, hooks=hooks, default=default,
                      logging=logging, rules=tuple(p.rule for p in parsed), sets=dynamic,
                      shadow_path=shadow_path(where, items.get("shadow")), mode=mode)


def _cgroups(where: Where, queue: QueueConfig, hooks, parsed: List[ParsedRule]):
    """Every cgroup path the rules name, in the order the hooks mark them;
    None (reported) when the mask cannot number them all."""
    using = [p for p in parsed if p.rule.match.cgroup]
    paths = ordered([path for p in using for path in p.rule.match.cgroup])
    if not paths:
        return ()
    first = using[0]
    key = first.keys.get("cgroup") or first.keys.get("unit")
    if len(paths) > capacity(queue.offload):
        first.where.error(key, f"the rules name {len(paths)} cgroups, but queue.offload.mask "
                               f"numbers at most {capacity(queue.offload)}: widen the mask "
                               "or name fewer")
        return None
    if not any(hook.chain == "output" for hook in hooks):
        first.where.warn(key, "no hook on chain output: cgroup and unit rules see no packet "
                              "(add '- {chain: output}' under hooks)")
    root = cgroup2_root()
    for p in using:
        for path in sorted(p.rule.match.cgroup):
            if root is None:
                p.where.warn(p.keys.get("cgroup") or p.keys.get("unit"),
                             "no cgroup v2 hierarchy is mounted here: ipqd cannot check that "
                             "the cgroups exist" if has_cgroup2() else
                             "this kernel has no cgroup v2: cgroup and unit rules cannot be "
                             "enforced, and ipqd's hooks cannot be installed")
                return paths
            if not os.path.isdir(os.path.join(root, path)):
                p.where.warn(p.keys.get("cgroup") or p.keys.get("unit"),
                             f"cgroup '{path}' does not exist now: the kernel refuses rules "
                             "naming it, so ipqd cannot install its hooks until it does "
                             "(start the unit first)")
    return paths


def has_cgroup2() -> bool:
    """Whether the kernel has cgroup v2 (mounted here or not)."""
    try:
        with open("/proc/filesystems") as filesystems:
            return any(line.split()[-1:] == ["cgroup2"] for line in filesystems)
    except OSError:
        return False


def cgroup2_root() -> Optional[str]:
    """Where the cgroup v2 hierarchy is mounted (/sys/fs/cgroup, or
    /sys/fs/cgroup/unified on hybrid systems), or None."""
    try:
        with open("/proc/self/mounts") as mounts:
            for line in mounts:
                parts = line.split()
                if len(parts) > 2 and parts[2] == "cgroup2":
                    return parts[1]
    except OSError:
        pass
    return None


# --- the main file's sections --------------------------------------------------

def _version(where: Where, root, item) -> None:
    if item is None:
        where.error(root, "missing 'version: 1' (the first line of every policy)")
        return
    written = text(where, item[1], "version", "1")
    if written is not None and values.parse_number(written) != 1:
        where.error(item[1], f"version must be 1, not '{written}' "
                             "(this ipqd reads version 1 policies)")


def _queue(where: Where, item) -> Optional[dict]:
    if item is None or _is_null(item[1]):
        return {}
    where = where.within("queue: ")
    found = fields(where, item[1], QUEUE_FIELDS, "queue")
    if found is None:
        return None
    out, ok = {}, True
    for key, name, node in found:
        value = QUEUE_PARSERS[name](where, node)
        ok = ok and value is not None
        out[name] = value
    return out if ok else None


def _conntrack(where: Where, queue: Optional[dict], item,
               parsed: List[ParsedRule]) -> Optional[QueueConfig]:
    reads_ct = [p for p in parsed if "ct_state" in p.keys]
    if queue is not None and queue.get("conntrack") is False:
        for p in reads_ct:
            p.where.error(p.keys["ct_state"], "ct_state needs conntrack, but "
                                              "queue.conntrack is false (remove 'conntrack: false')")
        if reads_ct:
            return None
    if queue is None:
        return None
    queue.setdefault("conntrack", bool(reads_ct))
    if "num" in queue:
        queue["nums"] = queue.pop("num")
    nums = queue.get("nums", QueueConfig().nums)
    last = nums[0] + CT_QUEUE_BLOCKS * len(nums) - 1
    if queue["conntrack"] and last > 65535:
        # ipqd learns the conntrack state from the queue a packet comes on
        # (one block of queues per state): they must all exist.
        where.error(item[1] if item else None,
                    f"queue.num: with conntrack, ipqd uses queues {nums[0]}-{last} "
                    f"(one per conntrack state and worker), past 65535: choose a lower num")
        return None
    return QueueConfig(**queue)


def _hooks(where: Where, root, item) -> Optional[Tuple]:
    if item is None or _is_null(item[1]):
        where.warn(item[0] if item else root,
                   "no hooks: ipqd asks the kernel to queue nothing, so it sees only the "
                   "packets your own iptables or nft rules send to its queue")
        return ()
    node = item[1]
    if not isinstance(node, yaml.SequenceNode):
        where.error(node, "hooks must be a list of mappings such as "
                          f"{{chain: input}}, not {describe(node)}")
        return None
    where = where.within("hooks: ")
    hooks = [_hook(where, entry) for entry in node.value]
    return None if None in hooks else tuple(hooks)


def _default(where: Where, root, item) -> Optional[Default]:
    if item is None:
        where.error(root, "missing 'default': say what happens to unmatched packets: "
                          "add 'default: {action: accept}' or 'default: {action: drop}'")
        return None
    where = where.within("default: ")
    found = fields(where, item[1], DEFAULT_FIELDS, "default")
    if found is None:
        return None
    parsers = {"action": parse_action, "set_mark": parse_set_mark,
               "log": lambda w, n: boolean(w, n, "log"), "reject_with": parse_reject_with}
    out = {name: parsers[name](where, node) for _, name, node in found}
    keys = {name: key for key, name, _ in found}
    if "action" not in out:
        where.error(item[1], "missing 'action' (add action: accept or action: drop)")
        return None
    if not check_reject(where, keys, out, None, default=True) or None in out.values():
        return None
    return Default(**out)


def _logging(where: Where, item) -> Optional[LoggingConfig]:
    if item is None or _is_null(item[1]):
        return LoggingConfig()
    where = where.within("logging: ")
    found = fields(where, item[1], LOGGING_FIELDS, "logging")
    if found is None:
        return None
    rate = None
    for _, name, node in found:
        rate = parse_rate(where, node)
        if rate is None:
            return None
    return LoggingConfig(rate=rate)


# --- queue values -------------------------------------------------------------------

def _queue_num(where: Where, node) -> Optional[Tuple[int, ...]]:
    written = text(where, node, "num", "a queue number or a range such as 0-3")
    if written is None:
        return None
    try:
        low, high = values.parse_range(written, "num", 0, 65535, "0 or 0-3")
    except InvalidValue as e:
        where.error(node, e.message)
        return None
    if high - low + 1 > MAX_QUEUES:
        where.error(node, f"num {written} would start {high - low + 1} workers "
                          f"(at most {MAX_QUEUES})")
        return None
    return tuple(range(low, high + 1))


def _copy_range(where: Where, node) -> Optional[int]:
    written = text(where, node, "copy_range", f"a number of bytes from 0 to {NFQNL_MAX_COPY_RANGE}")
    if written is None:
        return None
    number = values.parse_number(written)
    if number is None or number > NFQNL_MAX_COPY_RANGE:
        where.error(node, f"copy_range must be a number of bytes from 0 to {NFQNL_MAX_COPY_RANGE} "
                          f"(0 copies whole packets), not '{written}'")
        return None
    if 0 < number < COPY_RANGE_HEADERS:
        where.warn(node, f"copy_range {number} may cut packets before their transport header: "
                         f"use at least {COPY_RANGE_HEADERS}")
    return number


def _maxlen(where: Where, node) -> Optional[int]:
    written = text(where, node, "maxlen", "a number of packets")
    if written is None:
        return None
    number = values.parse_number(written)
    if number is None or not 1 <= number <= values.U32_MAX:
        where.error(node, f"maxlen must be a number of packets from 1 to {values.U32_MAX}, "
                          f"not '{written}'")
        return None
    return number


QUEUE_PARSERS = {
    "num": _queue_num,
    "copy_range": _copy_range,
    "fail_open": lambda where, node: boolean(where, node, "fail_open"),
    "bypass": lambda where, node: boolean(where, node, "bypass"),
    "maxlen": _maxlen,
    "conntrack": lambda where, node: boolean(where, node, "conntrack"),
    "offload": parse_offload,
    "undecidable": parse_undecidable,
}


# --- hooks -----------------------------------------------------------------------

def _hook(where: Where, node: yaml.Node) -> Optional[Hook]:
    found = fields(where, node, HOOK_FIELDS, "each hook")
    if found is None:
        return None
    out, keys = {}, {}
    for key, name, value in found:
        keys[name] = key
        out[name] = _HOOK_PARSERS[name](where, value)
    if "chain" not in out:
        where.error(node, f"each hook needs a chain ({one_of(HOOKS)})")
        return None
    if None in out.values():
        return None
    proto, family = out.get("proto"), out.get("family", "both")
    implied = {"icmp": "ipv4", "icmpv6": "ipv6"}.get(proto)
    if implied and family not in ("both", implied):
        where.error(keys["proto"], f"proto {proto} never occurs in family {family}")
        return None
    return Hook(**out)


def _hook_word(field: str, choices) -> Callable:
    def parse(where: Where, node) -> Optional[str]:
        return choice(where, node, field, choices)
    return parse


def _hook_proto(where: Where, node) -> Optional[str]:
    written = text(where, node, "proto", "a protocol name such as tcp")
    if written is None:
        return None
    try:
        number = values.parse_protocol(written)
    except InvalidValue as e:
        where.error(node, e.message)
        return None
    return PROTOCOL_NAMES.get(number, str(number))


_HOOK_PARSERS = {
    "chain": _hook_word("chain", tuple(HOOKS)),
    "family": _hook_word("family", HOOK_FAMILIES),
    "proto": _hook_proto,
}


# --- helpers ---------------------------------------------------------------------

SET_FILE_MAX_BYTES = 64 << 20       # a million IPv6 networks and their comments


def read_set_file(path: str) -> str:
    """A set file's text; OSError (EFBIG past SET_FILE_MAX_BYTES) when it cannot be read."""
    with open(path, "rb") as f:
        data = f.read(SET_FILE_MAX_BYTES + 1)
    if len(data) > SET_FILE_MAX_BYTES:
        raise OSError(errno.EFBIG, f"larger than {SET_FILE_MAX_BYTES >> 20} MiB")
    return data.decode("utf-8")


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null")


def _place(path: str, node: yaml.Node, here: str) -> str:
    """'on line 4', or 'in policy.d/x.yaml line 4' when that is another file."""
    line = node.start_mark.line + 1
    return f"on line {line}" if path == here else f"in {path} line {line}"


def _too_large(size: int) -> str:
    return (f"the policy is too large: its files hold {size} bytes with this fragment, "
            f"more than the {MAX_TOTAL_BYTES} allowed in all (main file and policy.d): "
            "use sets to write fewer rules, or remove fragments")


def _more(number: int, word: str) -> str:
    return f"{number} more {word}" + ("" if number == 1 else "s")


def _with_warnings(policy: Policy, sources, problems) -> Policy:
    return replace(policy, sources=tuple(sources), warnings=tuple(problems))


def check_file_safety(path: str) -> List[str]:
    """Why `path` (or its directory) could be changed by someone other than root.

    An empty list when the file is owned by root or the caller and writable
    by its owner only. Raises OSError when the file cannot be examined.
    """
    problems = []
    for target in (path, os.path.dirname(os.path.abspath(path))):
        info = os.stat(target)
        if info.st_uid not in (0, os.getuid()):
            problems.append(f"{target} is owned by uid {info.st_uid}, not root")
        # In a sticky directory (1777) others may add files but not replace
        # root's; on a file the sticky bit means nothing.
        sticky_directory = stat.S_ISDIR(info.st_mode) and info.st_mode & stat.S_ISVTX
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not sticky_directory:
            problems.append(f"{target} is writable by group or others "
                            f"(mode {stat.S_IMODE(info.st_mode):o}): chmod go-w {target}")
    return problems
