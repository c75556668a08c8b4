import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from netns import Lab, namespaces_left, require_kernel  # noqa: E402


@pytest.fixture
def lab():
    """Two fresh hosts (client, server) joined by veth; removed even when the test fails."""
    require_kernel()
    lab = Lab()
    try:
        yield lab
    finally:
        lab.close()


def pytest_sessionfinish(session, exitstatus):
    # A test run must leave no namespace behind, even after failures.
    left = [n for n in namespaces_left() if f"-{os.getpid()}-" in n]
    if left:
        print(f"\nleaked network namespaces: {left}", file=sys.stderr)
        session.exitstatus = 1
