"""A kernel object held through a file descriptor: owned, closable, pinnable."""

from __future__ import annotations

import contextlib
import ctypes
import os

from .consts import Cmd
from .syscall import GetIdAttr, InfoAttr, ObjAttr, addr, bpf, close_fd


class FdObject:
    """Owns one fd; `close()` or a `with` block releases it."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    @property
    def fd(self) -> int:
        """The file descriptor; raises once closed."""
        if self._fd < 0:
            raise ValueError(f"{type(self).__name__} is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        """True after `close()`."""
        return self._fd < 0

    def close(self) -> None:
        """Release the file descriptor (the kernel object lives on while pinned or referenced)."""
        if self._fd >= 0:
            close_fd(self._fd)
            self._fd = -1

    def detach_fd(self) -> int:
        """Give up ownership of the fd and return it."""
        fd, self._fd = self._fd, -1
        return fd

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        # An fd leaked by a forgotten close() would pin kernel memory until exit.
        if getattr(self, "_fd", -1) >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1

    def pin(self, path: str) -> None:
        """Pin the object at `path` in a bpffs mount."""
        p = ctypes.create_string_buffer(os.fsencode(path))
        bpf(Cmd.OBJ_PIN, ObjAttr(pathname=addr(p), bpf_fd=self.fd))

    def _info(self, info: ctypes.Structure) -> ctypes.Structure:
        bpf(Cmd.OBJ_GET_INFO_BY_FD,
            InfoAttr(bpf_fd=self.fd, info_len=ctypes.sizeof(info), info=addr(info)))
        return info


def obj_get(path: str, flags: int = 0) -> int:
    """Open the object pinned at `path`; returns a new fd."""
    p = ctypes.create_string_buffer(os.fsencode(path))
    return bpf(Cmd.OBJ_GET, ObjAttr(pathname=addr(p), file_flags=flags))


def next_id(cmd: Cmd, start: int) -> int | None:
    """The next object id after `start` for a *_GET_NEXT_ID command, or None at the end."""
    attr = GetIdAttr(start_id=start)
    try:
        bpf(cmd, attr)
    except OSError as e:
        if e.errno == 2:  # ENOENT: no more
            return None
        raise
    return attr.next_id


def fd_by_id(cmd: Cmd, obj_id: int) -> int:
    """Open an object by id with a *_GET_FD_BY_ID command."""
    return bpf(cmd, GetIdAttr(start_id=obj_id))
