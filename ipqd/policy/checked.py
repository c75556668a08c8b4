"""A policy as `ipqd run` accepts it: only root can change its files, and
they stay the same while they are read (load_checked)."""
from __future__ import annotations

import os
from typing import List

from ipqd.errors import PolicyErrors
from ipqd.policy.model import Policy


class PolicyRefused(Exception):
    def __init__(self, lines: List[str]):
        self.lines = lines
        super().__init__("\n".join(lines))


def load_checked(path: str) -> Policy:
    """Load a policy after checking that only root can change it.

    Fragments in policy.d must pass the same checks, and a symbolic link
    there must point inside policy.d. The files are looked at before and
    after reading: a fragment that appears, vanishes or changes meanwhile
    refuses the load (the caller keeps what it had). Raises PolicyRefused
    with every line to report, OSError when unreadable.

    `ipqd run` calls it in its loading process (ipqd.daemon.load_in_child),
    and `ipqd hooks install` before it moves any hook: the same checks in
    the same order, so hooks never move for a policy the daemon refuses.
    """
    from ipqd.policy.loader import FRAGMENT_DIR, check_file_safety, load
    files = _policy_files(path)
    before = _identities(files)
    problems = check_file_safety(path)
    fragments = os.path.join(os.path.dirname(os.path.abspath(path)), FRAGMENT_DIR)
    if os.path.isdir(fragments):
        problems += check_file_safety(fragments)
        inside = os.path.realpath(fragments) + os.sep
        for fragment in files[1:]:
            if os.path.islink(fragment) and not os.path.realpath(fragment).startswith(inside):
                problems.append(f"{fragment} is a symbolic link to {os.path.realpath(fragment)}, "
                                f"outside {fragments}")
            problems += check_file_safety(fragment)
    if problems:
        raise PolicyRefused([f"refusing policy {path}: {p}" for p in dict.fromkeys(problems)])
    try:
        policy = load(path)
    except PolicyErrors as errors:
        raise PolicyRefused([str(e) for e in errors.errors]) from None
    if before != _identities(_policy_files(path)):
        raise PolicyRefused([f"refusing policy {path}: its files changed while they were read; "
                             f"reload again"])
    return policy


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
            with open(name, "rb") as f:
                identities.append((name, hashlib.sha256(f.read(MAX_BYTES + 1)).digest()))
        except OSError:
            identities.append((name, None))
    return identities
