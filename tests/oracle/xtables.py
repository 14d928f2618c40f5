"""Reading a legacy xtables table's rule counters with getsockopt (IPT_SO_GET_ENTRIES).

`iptables-legacy-save -c` costs a process per read; the oracle reads counters after every packet,
so it asks the kernel directly. The blob is the table as the kernel holds it: built-in chains start
at `hook_entry[hook]` and end with their policy at `underflow[hook]`; a user chain starts after an
ERROR entry carrying its name and ends with an implicit RETURN entry; a final ERROR entry closes
the table.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import socket
import struct
from dataclasses import dataclass
from enum import IntEnum

from bpfilter import netns
from bpfilter.bpf.consts import NfHook
from bpfilter.ir.model import Counters, Family


class XtSockopt(IntEnum):
    """getsockopt names of <linux/netfilter_ipv4/ip_tables.h> (the same for ip6_tables.h)."""

    GET_INFO = 64  # IPT_BASE_CTL
    GET_ENTRIES = 65


TABLE_MAXNAMELEN = 32  # XT_TABLE_MAXNAMELEN
NF_INET_NUMHOOKS = 5
ERROR_TARGET = "ERROR"  # XT_ERROR_TARGET: chain heads and the table's end
TARGET_HEADER = 32  # struct xt_entry_target: u16 size, char name[29], u8 revision

# struct ipt_getinfo: name, valid_hooks, hook_entry[5], underflow[5], num_entries, size.
_GETINFO = struct.Struct(f"<{TABLE_MAXNAMELEN}sI5I5III")
# struct ipt_get_entries: name, size, then the 8-byte aligned entry table.
_GETENTRIES_HEAD = 40


@dataclass(frozen=True)
class EntryLayout:
    """Where ipt_entry / ip6t_entry keep the fields we read (x86_64)."""

    target_offset: int  # u16 target_offset, followed by u16 next_offset
    counters: int  # struct xt_counters {u64 pcnt, bcnt}
    level: int  # socket level: SOL_IP or SOL_IPV6


# ipt_entry: struct ipt_ip (84 bytes), nfcache, offsets at 88, comefrom, counters at 96.
# ip6t_entry: struct ip6t_ip6 (136 bytes), nfcache, offsets at 140, comefrom, counters at 152.
LAYOUTS = {
    Family.IPV4: EntryLayout(88, 96, socket.IPPROTO_IP),
    Family.IPV6: EntryLayout(140, 152, socket.IPPROTO_IPV6),
}

HOOK_CHAINS = {NfHook.PRE_ROUTING: "PREROUTING", NfHook.LOCAL_IN: "INPUT",
               NfHook.FORWARD: "FORWARD", NfHook.LOCAL_OUT: "OUTPUT",
               NfHook.POST_ROUTING: "POSTROUTING"}

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.getsockopt.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                             ctypes.POINTER(ctypes.c_uint32)]


@dataclass(frozen=True)
class TableCounters:
    """A table's counters: per chain the rules' counters in order, and built-in policies."""

    rules: dict[str, list[Counters]]
    policies: dict[str, Counters]

    def get(self, chain: str, rule: int | None) -> Counters:
        """A rule's counters (1-based), or the chain's policy counters (rule None)."""
        if rule is None:
            return self.policies[chain]
        return self.rules[chain][rule - 1]

    def flat(self) -> dict[tuple[str, int | None], Counters]:
        """Every counter by (chain, rule); rule None for a policy."""
        out: dict[tuple[str, int | None], Counters] = {}
        for chain, rules in self.rules.items():
            for n, c in enumerate(rules, 1):
                out[(chain, n)] = c
        for chain, c in self.policies.items():
            out[(chain, None)] = c
        return out


class XtReader:
    """Reads the legacy tables of one namespace and family through a raw socket made inside it."""

    def __init__(self, ns: str, family: Family) -> None:
        af = socket.AF_INET if family is Family.IPV4 else socket.AF_INET6
        with netns.enter(ns):
            self.sock = socket.socket(af, socket.SOCK_RAW, socket.IPPROTO_RAW)
        self.layout = LAYOUTS[family]

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()

    def _getsockopt(self, opt: XtSockopt, buf: ctypes.Array) -> None:
        size = ctypes.c_uint32(len(buf))
        if _libc.getsockopt(self.sock.fileno(), self.layout.level, opt, buf,
                            ctypes.byref(size)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"getsockopt({opt.name}): {os.strerror(err)}")

    def read(self, table: str) -> TableCounters:
        """The current counters of `table` (ENOENT when the table does not exist here)."""
        name = table.encode().ljust(TABLE_MAXNAMELEN, b"\0")
        info = ctypes.create_string_buffer(name, _GETINFO.size)
        self._getsockopt(XtSockopt.GET_INFO, info)
        _, valid, *rest = _GETINFO.unpack(info.raw)
        hook_entry, underflow, size = rest[0:5], rest[5:10], rest[11]
        buf = ctypes.create_string_buffer(_GETENTRIES_HEAD + size)
        buf[:TABLE_MAXNAMELEN + 4] = name + struct.pack("<I", size)
        self._getsockopt(XtSockopt.GET_ENTRIES, buf)
        hooks = [h for h in NfHook if valid & (1 << h)]
        return self._split(buf.raw[_GETENTRIES_HEAD:], hooks, hook_entry, underflow)

    def _split(self, blob: bytes, hooks: list[NfHook], hook_entry: list[int],
               underflow: list[int]) -> TableCounters:
        starts = {hook_entry[h]: HOOK_CHAINS[h] for h in hooks}
        ends = {underflow[h]: HOOK_CHAINS[h] for h in hooks}
        entries = []
        off = 0
        lay = self.layout
        while off < len(blob):
            t_off, n_off = struct.unpack_from("<HH", blob, off + lay.target_offset)
            pcnt, bcnt = struct.unpack_from("<QQ", blob, off + lay.counters)
            tname = blob[off + t_off + 2 : off + t_off + TARGET_HEADER - 1].split(b"\0")[0]
            data = blob[off + t_off + TARGET_HEADER : off + n_off].split(b"\0")[0]
            entries.append((off, Counters(pcnt, bcnt), tname.decode(),
                            data.decode(errors="replace")))
            off += n_off
        rules: dict[str, list[Counters]] = {}
        policies: dict[str, Counters] = {}
        chain: str | None = None
        for i, (off, ctr, tname, data) in enumerate(entries):
            if off in starts:
                chain = starts[off]
                rules[chain] = []
            if tname == ERROR_TARGET:
                chain = data if i + 1 < len(entries) else None
                if chain is not None:
                    rules[chain] = []
                continue
            if off in ends:
                policies[ends[off]] = ctr
                chain = None
                continue
            if chain is None:
                continue
            if i + 1 < len(entries) and entries[i + 1][2] == ERROR_TARGET:
                continue  # a user chain's implicit RETURN (built-in chains end at underflow)
            rules[chain].append(ctr)
        return TableCounters(rules, policies)
