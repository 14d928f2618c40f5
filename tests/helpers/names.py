"""Unique names for namespaces, interfaces and cgroups created by one test run."""

from __future__ import annotations

import itertools
import os

PREFIX = "bft"
IFNAMSIZ = 16  # the kernel's limit, including the terminating NUL
_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"
_counter = itertools.count(1)


def run_prefix() -> str:
    """The prefix of every name this process makes: parallel runs (other pids) never collide."""
    return f"{PREFIX}{os.getpid():x}_"


def _base36(n: int) -> str:
    out = ""
    while True:
        n, d = divmod(n, 36)
        out = _DIGITS[d] + out
        if n == 0:
            return out


def unique_name(tag: str = "") -> str:
    """A fresh name of at most 15 characters: prefix, pid, a counter and `tag` (<= 2 chars)."""
    name = f"{run_prefix()}{_base36(next(_counter))}{tag}"
    if len(name) > IFNAMSIZ - 1:
        raise ValueError(f"name {name!r} is longer than {IFNAMSIZ - 1} characters")
    return name


def is_ours(name: str) -> bool:
    """True for names this process made."""
    return name.startswith(run_prefix())
