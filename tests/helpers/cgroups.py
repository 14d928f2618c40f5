"""Child cgroups of the cgroup v2 mount for tests (never the root cgroup itself)."""

from __future__ import annotations

import contextlib
import os


def create(root: str, name: str) -> str:
    """Make the child cgroup `name` under `root`; returns its path."""
    path = os.path.join(root, name)
    os.mkdir(path)
    return path


def pids(path: str) -> list[int]:
    """Processes in a cgroup."""
    with open(os.path.join(path, "cgroup.procs")) as f:
        return [int(x) for x in f.read().split()]


def remove(path: str) -> None:
    """Move any process left in the cgroup to its parent, then remove it."""
    if not os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    for pid in pids(path):
        # The process may have exited meanwhile.
        with contextlib.suppress(ProcessLookupError), \
                open(os.path.join(parent, "cgroup.procs"), "w") as f:
            f.write(str(pid))
    os.rmdir(path)
