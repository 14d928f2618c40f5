"""Whether this process may run kernel tests: root, BPF, the `ip` command, a cgroup v2 mount."""

from __future__ import annotations

import os
import shutil
from functools import cache

import pytest

from bpfilter.bpf import insn as I
from bpfilter.bpf.consts import ProgType
from bpfilter.bpf.prog import Prog
from bpfilter.runtime import natoutput


@cache
def skip_reason() -> str | None:
    """Why kernel tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return f"kernel test: needs root for BPF and namespaces (running as uid {os.geteuid()})"
    if shutil.which("ip") is None:
        return "kernel test: needs the `ip` command (iproute2)"
    try:
        Prog.load(ProgType.SOCKET_FILTER, [I.mov64_imm(I.R0, 0), I.exit_()], name="probe").close()
    except OSError as e:
        return f"kernel test: this kernel refuses BPF programs ({e})"
    return None


def require_kernel() -> None:
    """Skip the calling test unless kernel tests can run."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)


def cgroup2_mount() -> str | None:
    """Where the cgroup v2 hierarchy is mounted (here /sys/fs/cgroup/unified), or None."""
    return natoutput.cgroup2_mount()
