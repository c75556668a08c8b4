"""Shared by the atheris harnesses: seeds from the test corpus, and the run."""
from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import atheris  # noqa: E402


CORPUS = os.path.join(os.path.dirname(HERE), "build", "fuzz-corpus")


def seed_dir(name: str, seeds) -> str:
    """build/fuzz-corpus/NAME, seeded on first use; it grows run after run
    (`make clean` removes it)."""
    directory = os.path.join(CORPUS, name)
    if not os.path.isdir(directory):
        os.makedirs(directory)
        for number, data in enumerate(seeds):
            with open(os.path.join(directory, f"seed-{number:04d}"), "wb") as f:
                f.write(data)
    return directory


def main(test_one_input, seeds) -> None:
    """Run libFuzzer on `test_one_input`; the arguments are libFuzzer's
    (e.g. -max_total_time=60). Without a corpus directory, the seeds are one."""
    args = list(sys.argv)
    if not any(not a.startswith("-") for a in args[1:]):
        name = os.path.basename(args[0])[len("fuzz_"):-len(".py")]
        args.append(seed_dir(name, seeds))
    atheris.Setup(args, test_one_input)
    atheris.Fuzz()
