"""BPF links: create for XDP, tcx, netfilter and cgroup hooks; update, detach, info, query."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from .consts import AttachType, Cmd, LinkFlags, LinkType, NfHook, NfProto
from .fd import FdObject, fd_by_id, next_id, obj_get
from .syscall import (
    LinkCreateAttr,
    LinkDetachAttr,
    LinkInfo,
    LinkUpdateAttr,
    QueryAttr,
    addr,
    bpf,
)

XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2


@dataclass(frozen=True)
class LinkDesc:
    """A link as the kernel describes it."""

    id: int
    type: LinkType
    prog_id: int
    ifindex: int = 0
    attach_type: int = 0
    pf: int = 0
    hooknum: int = 0
    priority: int = 0
    cgroup_id: int = 0


class Link(FdObject):
    """An attachment of a program to a hook; detaching happens when the last reference goes."""

    @classmethod
    def _create(cls, prog_fd: int, target_fd: int, attach_type: AttachType, flags: int = 0,
                fill=None) -> Link:
        attr = LinkCreateAttr(prog_fd=prog_fd, target_fd=target_fd, attach_type=attach_type,
                              flags=flags)
        if fill is not None:
            fill(attr)
        return cls(bpf(Cmd.LINK_CREATE, attr))

    @classmethod
    def xdp(cls, prog_fd: int, ifindex: int, *, mode: str = "auto") -> Link:
        """Attach an XDP program to an interface (`mode`: auto, skb or drv)."""
        flags = {"auto": 0, "skb": XDP_FLAGS_SKB_MODE, "drv": XDP_FLAGS_DRV_MODE}[mode]
        return cls._create(prog_fd, ifindex, AttachType.XDP, flags)

    @classmethod
    def tcx(cls, prog_fd: int, ifindex: int, *, egress: bool = False,
            flags: LinkFlags = LinkFlags.NONE, relative_fd: int = 0) -> Link:
        """Attach a tc program with tcx (ingress or egress); `flags` may order it (BEFORE/AFTER)."""
        at = AttachType.TCX_EGRESS if egress else AttachType.TCX_INGRESS

        def fill(attr: LinkCreateAttr) -> None:
            attr.opts.tcx.relative_fd = relative_fd

        return cls._create(prog_fd, ifindex, at, flags, fill)

    @classmethod
    def netfilter(cls, prog_fd: int, pf: NfProto, hook: NfHook, priority: int,
                  *, defrag: bool = False) -> Link:
        """Attach a netfilter program at (family, hook, priority) in the caller's namespace."""

        def fill(attr: LinkCreateAttr) -> None:
            attr.opts.netfilter.pf = pf
            attr.opts.netfilter.hooknum = hook
            attr.opts.netfilter.priority = priority
            attr.opts.netfilter.flags = 1 if defrag else 0  # BPF_F_NETFILTER_IP_DEFRAG

        return cls._create(prog_fd, 0, AttachType.NETFILTER, 0, fill)

    @classmethod
    def cgroup(cls, prog_fd: int, cgroup_fd: int, attach_type: AttachType) -> Link:
        """Attach a cgroup program (e.g. CGROUP_INET_INGRESS) to the cgroup open at `cgroup_fd`."""
        return cls._create(prog_fd, cgroup_fd, attach_type)

    @classmethod
    def open_pinned(cls, path: str) -> Link:
        """Open a link pinned in bpffs."""
        return cls(obj_get(path))

    @classmethod
    def from_id(cls, link_id: int) -> Link:
        """Open a link by id."""
        return cls(fd_by_id(Cmd.LINK_GET_FD_BY_ID, link_id))

    def update(self, new_prog_fd: int, old_prog_fd: int | None = None) -> None:
        """Swap the attached program atomically (optionally only if `old_prog_fd` is attached)."""
        flags = LinkFlags.REPLACE if old_prog_fd is not None else 0
        bpf(Cmd.LINK_UPDATE, LinkUpdateAttr(link_fd=self.fd, new_prog_fd=new_prog_fd,
                                            flags=flags, old_prog_fd=old_prog_fd or 0))

    def detach(self) -> None:
        """Detach now, even if other references (pins, fds) keep the link object alive."""
        bpf(Cmd.LINK_DETACH, LinkDetachAttr(link_fd=self.fd))

    def describe(self) -> LinkDesc:
        """The kernel's view of this link."""
        info = self._info(LinkInfo())
        t = LinkType(info.type) if info.type in LinkType._value2member_map_ else LinkType.UNSPEC
        u = info.u
        if t == LinkType.NETFILTER:
            return LinkDesc(info.id, t, info.prog_id, pf=u.netfilter.pf,
                            hooknum=u.netfilter.hooknum, priority=u.netfilter.priority)
        if t == LinkType.XDP:
            return LinkDesc(info.id, t, info.prog_id, ifindex=u.xdp.ifindex,
                            attach_type=AttachType.XDP)
        if t == LinkType.TCX:
            return LinkDesc(info.id, t, info.prog_id, ifindex=u.tcx.ifindex,
                            attach_type=u.tcx.attach_type)
        if t == LinkType.CGROUP:
            return LinkDesc(info.id, t, info.prog_id, cgroup_id=u.cgroup.cgroup_id,
                            attach_type=u.cgroup.attach_type)
        return LinkDesc(info.id, t, info.prog_id)


def link_ids() -> list[int]:
    """Ids of all links on the system."""
    out, cur = [], 0
    while (nxt := next_id(Cmd.LINK_GET_NEXT_ID, cur)) is not None:
        out.append(nxt)
        cur = nxt
    return out


def prog_ids() -> list[int]:
    """Ids of all programs on the system."""
    out, cur = [], 0
    while (nxt := next_id(Cmd.PROG_GET_NEXT_ID, cur)) is not None:
        out.append(nxt)
        cur = nxt
    return out


def query(target_fd: int, attach_type: AttachType, max_progs: int = 64) -> tuple[list[int], int]:
    """Programs attached at a target (ifindex for tcx), in order, and the hook's revision."""
    ids = (ctypes.c_uint32 * max_progs)()
    attr = QueryAttr(target_fd=target_fd, attach_type=attach_type, prog_ids=addr(ids),
                     count=max_progs)
    bpf(Cmd.PROG_QUERY, attr)
    return list(ids[: attr.count]), attr.revision
