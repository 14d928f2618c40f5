"""A private bpffs mount for a test: mounted, then emptied and unmounted also on failure."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from bpfilter.bpf.bpffs import mount_bpffs, umount

# Iterators the kernel's bpf_preload puts in every bpffs root; they go with the mount.
PRELOADED = {"maps.debug", "progs.debug"}


def empty(path: str) -> None:
    """Unpin everything below `path` but the kernel's own entries."""
    for root, dirs, files in os.walk(path, topdown=False):
        for f in files:
            if root == path and f in PRELOADED:
                continue
            os.unlink(os.path.join(root, f))
        for d in dirs:
            os.rmdir(os.path.join(root, d))


@contextmanager
def mounted_bpffs(path: str) -> Iterator[str]:
    """Mount a bpffs at `path` (an existing directory) for the block."""
    mount_bpffs(path)
    try:
        yield path
    finally:
        try:
            empty(path)  # unpin first: a pinned link would otherwise outlive the test
        finally:
            umount(path)
