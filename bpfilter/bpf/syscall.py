"""The raw bpf(2) system call over ctypes, with one attribute struct per command.

Only this package talks to the kernel. errno becomes `BpfError` (with the command's name) at this
boundary; callers add context such as the verifier log.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from ctypes import c_char, c_int, c_int32, c_long, c_uint8, c_uint32, c_uint64, c_void_p

from .consts import SYS_BPF, Cmd

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_syscall = _libc.syscall
_syscall.restype = c_long
_syscall.argtypes = [c_long, c_int, c_void_p, c_uint32]


class BpfError(OSError):
    """A bpf(2) command failed; `errno` and `strerror` are set, `cmd` names the command."""

    def __init__(self, cmd: Cmd, err: int, detail: str = "") -> None:
        self.cmd = cmd
        msg = f"bpf({cmd.name}): {os.strerror(err)}"
        if detail:
            msg += f": {detail}"
        super().__init__(err, msg)

    def __str__(self) -> str:
        return self.args[1]


class PermissionDenied(BpfError):
    """EPERM/EACCES: not root, or a lockdown forbids it."""


def bpf(cmd: Cmd, attr: ctypes.Structure) -> int:
    """Run one bpf(2) command; returns its result or raises `BpfError`."""
    ret = _syscall(SYS_BPF, int(cmd), ctypes.addressof(attr), ctypes.sizeof(attr))
    if ret < 0:
        err = ctypes.get_errno()
        if err in (errno.EPERM, errno.EACCES) and cmd != Cmd.PROG_LOAD:
            raise PermissionDenied(cmd, err)
        raise BpfError(cmd, err)
    return ret


def addr(buf: ctypes.Array | ctypes.Structure | bytes | None) -> int:
    """The address of a ctypes buffer as a u64 for an attr field (0 for None)."""
    if buf is None:
        return 0
    return ctypes.addressof(buf)


# --- attribute structs (union bpf_attr members), field for field as in the UAPI -------------


class MapCreateAttr(ctypes.Structure):
    _fields_ = [
        ("map_type", c_uint32), ("key_size", c_uint32), ("value_size", c_uint32),
        ("max_entries", c_uint32), ("map_flags", c_uint32), ("inner_map_fd", c_uint32),
        ("numa_node", c_uint32), ("map_name", c_char * 16), ("map_ifindex", c_uint32),
        ("btf_fd", c_uint32), ("btf_key_type_id", c_uint32), ("btf_value_type_id", c_uint32),
        ("btf_vmlinux_value_type_id", c_uint32), ("map_extra", c_uint64),
    ]


class MapElemAttr(ctypes.Structure):
    _fields_ = [("map_fd", c_uint32), ("_pad", c_uint32), ("key", c_uint64), ("value", c_uint64),
                ("flags", c_uint64)]


class MapBatchAttr(ctypes.Structure):
    _fields_ = [
        ("in_batch", c_uint64), ("out_batch", c_uint64), ("keys", c_uint64), ("values", c_uint64),
        ("count", c_uint32), ("map_fd", c_uint32), ("elem_flags", c_uint64), ("flags", c_uint64),
    ]


class ProgLoadAttr(ctypes.Structure):
    _fields_ = [
        ("prog_type", c_uint32), ("insn_cnt", c_uint32), ("insns", c_uint64),
        ("license", c_uint64), ("log_level", c_uint32), ("log_size", c_uint32),
        ("log_buf", c_uint64), ("kern_version", c_uint32), ("prog_flags", c_uint32),
        ("prog_name", c_char * 16), ("prog_ifindex", c_uint32),
        ("expected_attach_type", c_uint32), ("prog_btf_fd", c_uint32),
        ("func_info_rec_size", c_uint32), ("func_info", c_uint64), ("func_info_cnt", c_uint32),
        ("line_info_rec_size", c_uint32), ("line_info", c_uint64), ("line_info_cnt", c_uint32),
        ("attach_btf_id", c_uint32), ("attach_prog_fd", c_uint32), ("core_relo_cnt", c_uint32),
        ("fd_array", c_uint64), ("core_relos", c_uint64), ("core_relo_rec_size", c_uint32),
        ("log_true_size", c_uint32),
    ]


class ObjAttr(ctypes.Structure):
    _fields_ = [("pathname", c_uint64), ("bpf_fd", c_uint32), ("file_flags", c_uint32),
                ("path_fd", c_int32)]


class TestRunAttr(ctypes.Structure):
    _fields_ = [
        ("prog_fd", c_uint32), ("retval", c_uint32), ("data_size_in", c_uint32),
        ("data_size_out", c_uint32), ("data_in", c_uint64), ("data_out", c_uint64),
        ("repeat", c_uint32), ("duration", c_uint32), ("ctx_size_in", c_uint32),
        ("ctx_size_out", c_uint32), ("ctx_in", c_uint64), ("ctx_out", c_uint64),
        ("flags", c_uint32), ("cpu", c_uint32), ("batch_size", c_uint32),
    ]


class GetIdAttr(ctypes.Structure):
    _fields_ = [("start_id", c_uint32), ("next_id", c_uint32), ("open_flags", c_uint32),
                ("fd_by_id_token_fd", c_int32)]


class InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", c_uint32), ("info_len", c_uint32), ("info", c_uint64)]


class QueryAttr(ctypes.Structure):
    _fields_ = [
        ("target_fd", c_uint32), ("attach_type", c_uint32), ("query_flags", c_uint32),
        ("attach_flags", c_uint32), ("prog_ids", c_uint64), ("count", c_uint32),
        ("_pad", c_uint32), ("prog_attach_flags", c_uint64), ("link_ids", c_uint64),
        ("link_attach_flags", c_uint64), ("revision", c_uint64),
    ]


class _NetfilterOpts(ctypes.Structure):
    _fields_ = [("pf", c_uint32), ("hooknum", c_uint32), ("priority", c_int32),
                ("flags", c_uint32)]


class _RelativeOpts(ctypes.Structure):
    # tcx, netkit and cgroup links: order relative to another program or link.
    _fields_ = [("relative_fd", c_uint32), ("_pad", c_uint32), ("expected_revision", c_uint64)]


class _LinkCreateOpts(ctypes.Union):
    _fields_ = [("target_btf_id", c_uint32), ("netfilter", _NetfilterOpts),
                ("tcx", _RelativeOpts), ("cgroup", _RelativeOpts), ("_size", c_uint8 * 48)]


class LinkCreateAttr(ctypes.Structure):
    _fields_ = [("prog_fd", c_uint32), ("target_fd", c_uint32), ("attach_type", c_uint32),
                ("flags", c_uint32), ("opts", _LinkCreateOpts)]


class LinkUpdateAttr(ctypes.Structure):
    _fields_ = [("link_fd", c_uint32), ("new_prog_fd", c_uint32), ("flags", c_uint32),
                ("old_prog_fd", c_uint32)]


class LinkDetachAttr(ctypes.Structure):
    _fields_ = [("link_fd", c_uint32)]


class ProgBindMapAttr(ctypes.Structure):
    _fields_ = [("prog_fd", c_uint32), ("map_fd", c_uint32), ("flags", c_uint32)]


class BtfLoadAttr(ctypes.Structure):
    _fields_ = [("btf", c_uint64), ("btf_log_buf", c_uint64), ("btf_size", c_uint32),
                ("btf_log_size", c_uint32), ("btf_log_level", c_uint32),
                ("btf_log_true_size", c_uint32)]


# --- info structs returned by OBJ_GET_INFO_BY_FD ----------------------------------------


class ProgInfo(ctypes.Structure):
    _fields_ = [
        ("type", c_uint32), ("id", c_uint32), ("tag", c_uint8 * 8), ("jited_prog_len", c_uint32),
        ("xlated_prog_len", c_uint32), ("jited_prog_insns", c_uint64),
        ("xlated_prog_insns", c_uint64), ("load_time", c_uint64), ("created_by_uid", c_uint32),
        ("nr_map_ids", c_uint32), ("map_ids", c_uint64), ("name", c_char * 16),
        ("ifindex", c_uint32), ("gpl_compatible", c_uint32), ("netns_dev", c_uint64),
        ("netns_ino", c_uint64), ("nr_jited_ksyms", c_uint32), ("nr_jited_func_lens", c_uint32),
        ("jited_ksyms", c_uint64), ("jited_func_lens", c_uint64), ("btf_id", c_uint32),
        ("func_info_rec_size", c_uint32), ("func_info", c_uint64), ("nr_func_info", c_uint32),
        ("nr_line_info", c_uint32), ("line_info", c_uint64), ("jited_line_info", c_uint64),
        ("nr_jited_line_info", c_uint32), ("line_info_rec_size", c_uint32),
        ("jited_line_info_rec_size", c_uint32), ("nr_prog_tags", c_uint32),
        ("prog_tags", c_uint64), ("run_time_ns", c_uint64), ("run_cnt", c_uint64),
        ("recursion_misses", c_uint64), ("verified_insns", c_uint32),
        ("attach_btf_obj_id", c_uint32), ("attach_btf_id", c_uint32),
    ]


class MapInfo(ctypes.Structure):
    _fields_ = [
        ("type", c_uint32), ("id", c_uint32), ("key_size", c_uint32), ("value_size", c_uint32),
        ("max_entries", c_uint32), ("map_flags", c_uint32), ("name", c_char * 16),
        ("ifindex", c_uint32), ("btf_vmlinux_value_type_id", c_uint32), ("netns_dev", c_uint64),
        ("netns_ino", c_uint64), ("btf_id", c_uint32), ("btf_key_type_id", c_uint32),
        ("btf_value_type_id", c_uint32), ("btf_vmlinux_id", c_uint32), ("map_extra", c_uint64),
    ]


class _LinkInfoNetfilter(ctypes.Structure):
    _fields_ = [("pf", c_uint32), ("hooknum", c_uint32), ("priority", c_int32),
                ("flags", c_uint32)]


class _LinkInfoXdp(ctypes.Structure):
    _fields_ = [("ifindex", c_uint32)]


class _LinkInfoIface(ctypes.Structure):
    _fields_ = [("ifindex", c_uint32), ("attach_type", c_uint32)]


class _LinkInfoCgroup(ctypes.Structure):
    _fields_ = [("cgroup_id", c_uint64), ("attach_type", c_uint32)]


class _LinkInfoUnion(ctypes.Union):
    _fields_ = [("netfilter", _LinkInfoNetfilter), ("xdp", _LinkInfoXdp),
                ("tcx", _LinkInfoIface), ("cgroup", _LinkInfoCgroup), ("_size", c_uint8 * 64)]


class LinkInfo(ctypes.Structure):
    _fields_ = [("type", c_uint32), ("id", c_uint32), ("prog_id", c_uint32), ("_pad", c_uint32),
                ("u", _LinkInfoUnion)]


def close_fd(fd: int) -> None:
    """Close a file descriptor, ignoring EBADF (already closed)."""
    try:
        os.close(fd)
    except OSError as e:
        if e.errno != errno.EBADF:
            raise


def str_c(value: bytes) -> str:
    """Decode a NUL-padded C string field."""
    return value.split(b"\0", 1)[0].decode(errors="replace")


__all__ = ["BpfError", "PermissionDenied", "addr", "bpf", "c_int", "close_fd", "str_c"]
