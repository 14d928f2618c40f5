"""bpffs mounts: where pinned programs, maps and links live."""

from __future__ import annotations

import ctypes
import ctypes.util
import os

BPF_FS_MAGIC = 0xCAFE4A11

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
MNT_DETACH = 2


class _Statfs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_long * 15)]


_libc.statfs.argtypes = [ctypes.c_char_p, ctypes.POINTER(_Statfs)]


def is_bpffs(path: str) -> bool:
    """True if `path` is on a bpf filesystem."""
    st = _Statfs()
    if _libc.statfs(os.fsencode(path), ctypes.byref(st)) != 0:
        return False
    return (st.f_type & 0xFFFFFFFF) == BPF_FS_MAGIC


def mount_bpffs(path: str) -> None:
    """Mount a bpffs at `path` (created if missing) unless one is already there."""
    os.makedirs(path, exist_ok=True)
    if is_bpffs(path):
        return
    if _libc.mount(b"bpffs", os.fsencode(path), b"bpf", 0, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount bpffs at {path}: {os.strerror(err)}")


def umount(path: str) -> None:
    """Lazily unmount `path`."""
    if _libc.umount2(os.fsencode(path), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount {path}: {os.strerror(err)}")


def remove_tree(path: str) -> None:
    """Remove a directory of pins (unpinning every object in it)."""
    if not os.path.isdir(path):
        return
    for root, dirs, files in os.walk(path, topdown=False):
        for f in files:
            os.unlink(os.path.join(root, f))
        for d in dirs:
            os.rmdir(os.path.join(root, d))
    os.rmdir(path)
