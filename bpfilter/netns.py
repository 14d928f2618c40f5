"""Network namespaces as `ip netns` knows them (/run/netns/NAME), and entering one from Python.

Creating and deleting goes through the `ip` command, so namespaces made here are the same objects
`ip netns list` and `ip netns exec` see. Entering uses setns(2) through ctypes (Python 3.11 has no
os.setns) and only switches the *calling thread*: other threads keep their namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import subprocess
from collections.abc import Iterator, Sequence

NETNS_RUN_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000  # from <linux/sched.h>: setns() nstype for network namespaces
# The thread's own namespace: /proc/self would name the main thread's, which differs while a
# thread other than the main one is entered.
_THREAD_NS = "/proc/thread-self/ns/net"

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.setns.restype = ctypes.c_int


class NetnsError(OSError):
    """A namespace cannot be created, found, entered or left."""


def _check_name(name: str) -> str:
    if not name or "/" in name or name in (".", "..") or "\0" in name:
        raise ValueError(f"invalid network namespace name {name!r}")
    return name


def path_of(name_or_path: str) -> str:
    """The namespace file: `name_or_path` itself if it contains a '/', else /run/netns/NAME."""
    if "/" in name_or_path:
        return name_or_path
    return os.path.join(NETNS_RUN_DIR, _check_name(name_or_path))


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise NetnsError(proc.returncode, f"ip {' '.join(args)}: {proc.stderr.strip()}")


def exists(name: str) -> bool:
    """True if the named namespace exists."""
    return os.path.exists(path_of(_check_name(name)))


def list_names() -> list[str]:
    """Names of all named namespaces, sorted."""
    try:
        return sorted(os.listdir(NETNS_RUN_DIR))
    except FileNotFoundError:
        return []


def create(name: str) -> None:
    """Create the named namespace (`ip netns add`); raises if it exists."""
    if exists(name):
        raise NetnsError(errno.EEXIST, f"network namespace {name!r} already exists")
    _ip("netns", "add", name)


def delete(name: str) -> None:
    """Delete the named namespace (`ip netns del`); its devices go with its last user."""
    _ip("netns", "del", _check_name(name))


def _setns(fd: int, what: str) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetnsError(err, f"setns({what}): {os.strerror(err)}")


@contextlib.contextmanager
def enter(name_or_path: str) -> Iterator[None]:
    """Switch the calling thread into a namespace for the block; always switches back."""
    path = path_of(name_or_path)
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NetnsError(errno.ENOENT, f"no network namespace {name_or_path!r} ({path})") from None
    try:
        home = os.open(_THREAD_NS, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target, path)
            try:
                yield
            finally:
                # Failing to return would leave this thread in the wrong namespace, silently
                # applying later work there: the error must propagate.
                _setns(home, _THREAD_NS)
        finally:
            os.close(home)
    finally:
        os.close(target)


def current_ns_inode() -> int:
    """The inode number of the calling thread's network namespace."""
    return os.stat(_THREAD_NS).st_ino


def ns_inode(name_or_path: str) -> int:
    """The inode number of a namespace given by name or path."""
    return os.stat(path_of(name_or_path)).st_ino


def ns_id(name: str | None) -> str:
    """A stable short identifier: the name of a named namespace, `ino<inode>` for the caller's."""
    if name is not None:
        return _check_name(name)
    return f"ino{current_ns_inode()}"


def run(
    name: str,
    argv: Sequence[str],
    *,
    check: bool = True,
    capture: bool = True,
    text: bool = True,
    timeout: float | None = None,
    **kw,
) -> subprocess.CompletedProcess:
    """Run `argv` inside the named namespace (`ip netns exec`).

    Note that `ip netns exec` remounts /sys for the command, so cgroup v2 mounts under /sys are
    not visible inside it.
    """
    cmd = ["ip", "netns", "exec", _check_name(name), *argv]
    return subprocess.run(cmd, check=check, capture_output=capture, text=text, timeout=timeout,
                          **kw)
