"""A policy as `ipqd run` accepts it: only root can change its files, and
they stay the same while they are read (load_checked)."""
from __future__ import annotations

import os
import stat
from dataclasses import replace
from typing import Callable, List, Optional

from ipqd.errors import PolicyErrors, PolicyRefused
from ipqd.policy.model import Policy


def load_checked(path: str, verify: Optional[Callable] = None,
                 shadow: Optional[str] = None) -> Policy:
    """Load a policy after checking that only root can change it.

    Fragments in policy.d must pass the same checks, and a symbolic link
    there must point inside policy.d. The files are looked at before and
    after reading: a fragment that appears, vanishes or changes meanwhile
    refuses the load (the caller keeps what it had). Raises PolicyRefused
    with every line to report, OSError when unreadable.

    `ipqd run` calls it in its loading process (ipqd.daemon.load_in_child),
    and `ipqd hooks install` before it moves any hook: the same checks in
    the same order, so hooks never move for a policy the daemon refuses.
    Both pass `verify` (ipqd.decision.verify.case_problems), which runs the
    policy's own test cases: one that fails refuses the policy. `shadow`:
    a candidate's path that takes the place of the policy's `shadow:`.
    """
    from ipqd.policy.loader import load
    before = _identities(_policy_files(path))
    problems = safety_problems(path)
    if problems:
        raise PolicyRefused([f"refusing policy {path}: {p}" for p in problems])
    try:
        policy = load(path)
    except PolicyErrors as errors:
        raise PolicyRefused([str(e) for e in errors.errors]) from None
    # Set files (`sets: {name: {file: ...}}`) are found while reading: the
    # same rule holds for them, checked once they are known.
    problems = set_file_problems(path, policy)
    if problems:
        raise PolicyRefused([f"refusing policy {path}: {p}" for p in problems])
    if before != _identities(_policy_files(path)):
        raise PolicyRefused([f"refusing policy {path}: its files changed while they were read; "
                             f"reload again"])
    policy = replace(policy, digest=_digest(path, before))
    if shadow is not None:
        policy = replace(policy, shadow_path=shadow)
    if policy.shadow_path is not None:
        policy = replace(policy, shadow=_shadow(path, policy.shadow_path))
    if verify is not None:
        _passes_its_tests(path, policy, verify)
    return policy


def _passes_its_tests(path: str, policy: Policy, verify: Callable) -> None:
    """Raises PolicyRefused, each failure a line, when the policy's own test
    cases (its `tests:`, tests.d/) are invalid or one of them fails: a
    policy that contradicts its own tests is not put in front of packets."""
    from ipqd.policy.cases import policy_cases
    try:
        problems = verify(policy, policy_cases(path))
    except PolicyErrors as errors:
        problems = errors.errors
    if problems:
        raise PolicyRefused([str(p) for p in problems] +
                            [f"refusing policy {path}: {len(problems)} of its test case(s) "
                             f"failed or could not be read (`ipqd test {path}`)"])


def _shadow(path: str, shadow_path: str) -> Policy:
    """The candidate the policy names in `shadow:`, loaded with the same
    checks; its problems refuse the policy (nothing would compare it)."""
    refusal = f"refusing policy {path}: its shadow policy {shadow_path} is not loaded"
    try:
        shadow = load_checked(shadow_path)
    except PolicyRefused as refused:
        raise PolicyRefused(refused.lines + [refusal]) from None
    except OSError as error:
        raise PolicyRefused([f"cannot read {error.filename or shadow_path}: "
                             f"{error.strerror or error}", refusal]) from None
    if shadow.shadow_path is not None:
        raise PolicyRefused([f"{shadow_path}: a shadow policy cannot name a shadow of its own "
                             f"(remove its `shadow:`)", refusal])
    return shadow


def policy_digest(path: str) -> str:
    """The digest of the policy at `path`: its main file and policy.d
    fragments together (sha256, hex). Each decision logged carries the
    digest of the policy that made it. Raises OSError when a file cannot
    be read."""
    identities = _identities(_policy_files(path))
    unreadable = next((name for name, digest in identities if digest is None), None)
    if unreadable is not None:
        raise OSError(f"cannot read {unreadable}")
    return _digest(path, identities)


def _digest(path: str, identities: List[tuple]) -> str:
    """sha256 over each file's name (as the policy knows it: policy.d/NAME
    for a fragment, so a renamed fragment, which may move its rules, counts)
    and the sha256 of its bytes, in the loader's order."""
    import hashlib
    whole = hashlib.sha256()
    for number, (name, digest) in enumerate(identities):
        label = "policy" if number == 0 else f"policy.d/{os.path.basename(name)}"
        whole.update(label.encode() + b"\0" + (digest or b""))
    return whole.hexdigest()


def safety_problems(path: str) -> List[str]:
    """Why `ipqd run` would refuse the files of the policy at `path` before
    reading them: someone other than root could change one (the file,
    policy.d, a fragment), or a fragment links out of policy.d. `ipqd check`
    reports the same list. Raises OSError when a file cannot be examined."""
    from ipqd.policy.loader import FRAGMENT_DIR, check_file_safety
    problems = check_file_safety(path)
    fragments = os.path.join(os.path.dirname(os.path.abspath(path)), FRAGMENT_DIR)
    if os.path.isdir(fragments):
        problems += check_file_safety(fragments)
        inside = os.path.realpath(fragments) + os.sep
        for fragment in _policy_files(path)[1:]:
            if os.path.islink(fragment) and not os.path.realpath(fragment).startswith(inside):
                problems.append(f"{fragment} is a symbolic link to {os.path.realpath(fragment)}, "
                                f"outside {fragments}")
            problems += check_file_safety(fragment)
    return list(dict.fromkeys(problems))


def set_files(path: str, policy: Policy) -> List[str]:
    """The files the policy's sets were read from (`{file: ...}`)."""
    read = set(_policy_files(path))
    return [source for source in policy.sources if source not in read]


def set_file_problems(path: str, policy: Policy) -> List[str]:
    """safety_problems for the policy's set files, once it is loaded."""
    from ipqd.policy.loader import check_file_safety
    return list(dict.fromkeys(p for name in set_files(path, policy)
                              for p in check_file_safety(name)))


SERVICE_GROUP = "ipqd"      # the group the shipped unit reads the policy through


def service_read_problems(path: str) -> List[str]:
    """Why the shipped unit's daemon (a dynamic user in group ipqd) could
    not read the policy's files: not readable by others, nor by a group
    ipqd that exists. Empty when there is no such group (no unit here)."""
    from ipqd.policy.loader import FRAGMENT_DIR
    fragments = os.path.join(os.path.dirname(os.path.abspath(path)), FRAGMENT_DIR)
    targets = [path] + ([fragments] + _policy_files(path)[1:] if os.path.isdir(fragments) else [])
    return service_cannot_read(targets)


def service_cannot_read(targets: List[str]) -> List[str]:
    """service_read_problems for these files (a policy's set files)."""
    import grp
    try:
        gid = grp.getgrnam(SERVICE_GROUP).gr_gid
    except KeyError:
        return []
    problems = []
    for target in targets:
        info = os.stat(target)
        need = (stat.S_IROTH | stat.S_IXOTH) if stat.S_ISDIR(info.st_mode) else stat.S_IROTH
        group_need = need << 3
        if info.st_mode & need == need or (info.st_gid == gid and info.st_mode & group_need == group_need):
            continue
        problems.append(f"{target} is not readable by the ipqd service (group {SERVICE_GROUP}): "
                        f"chgrp {SERVICE_GROUP} {target} && chmod g+r{'x' if need & stat.S_IXOTH else ''} "
                        f"{target}")
    return problems


def _policy_files(path: str) -> List[str]:
    """The main file and the fragments the loader reads, in its order."""
    from ipqd.policy.loader import fragment_paths
    return [path] + fragment_paths(path)


def _identities(files: List[str]) -> List[tuple]:
    """Each file's name and a digest of its bytes (None when unreadable):
    sizes and times miss a same-size edit within one clock tick."""
    import hashlib
    from ipqd.policy._yamlsafe import MAX_BYTES
    identities = []
    for name in files:
        try:
            if not stat.S_ISREG(os.stat(name).st_mode):
                raise OSError(f"{name} is not a regular file")    # the loader says why
            with open(name, "rb") as f:
                identities.append((name, hashlib.sha256(f.read(MAX_BYTES + 1)).digest()))
        except OSError:
            identities.append((name, None))
    return identities
