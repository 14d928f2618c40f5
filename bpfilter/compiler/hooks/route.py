"""Netfilter metadata from the packet's route and socket: xt_addrtype's destination type and
xt_owner's socket credentials, read from the kernel's structs at offsets from vmlinux BTF.

- Destination type (IPv4): xt_addrtype asks inet_dev_addr_type(), which answers BROADCAST for
  0.0.0.0/8 and 255.255.255.255, MULTICAST for 224.0.0.0/4 and otherwise looks the address up
  in the local routing table (LOCAL, BROADCAST, else UNICAST). From the routing decision on,
  the skb carries the route the kernel chose for that same destination (`skb->_skb_refdst`, a
  `struct rtable`, or an xfrm bundle that copies it), whose `rt_type` is the local table's
  answer: the local table's rule comes first in the policy database, so a destination it holds
  is routed by it. The type is stored as a bit (1 << RTN_*) as the match tests it. This is used
  on the nf hook from the routing decision on, where it is always current; the source's type,
  PREROUTING, IPv6, --limit-iface-in/out and the tc/XDP hooks look the address up in a copy of
  the local table instead (localtable.py).
- Owner: xt_owner reads the full socket (`skb_to_full_sk`: a request socket's listener), its
  `struct socket` and that socket's file credentials (fsuid, fsgid).
"""

from __future__ import annotations

from ...bpf import insn as I
from ...bpf.asm import Assembler
from ...bpf.btf import vmlinux
from ...bpf.consts import Helper
from ...bpf.insn import AluOp, JmpOp
from ...ir.model import Family
from ...matches.kernel import RouteType
from .. import layout as L

SKB_DST_NOREF = 1  # the low bit of _skb_refdst: the reference is not counted


def emit_dst_type(a: Assembler, family: Family) -> None:
    """RTDST = 1 << the destination's address type (IPv4; 0 when the skb has no route)."""
    if family is not Family.IPV4:
        raise ValueError("the route's destination type is read for IPv4 only")
    btf = vmlinux()
    store, done = a.label("rt_store"), a.label("rt_done")
    a.emit(I.ldx(I.W, I.R2, L.R_PKT, L.L3 + 16))  # daddr, first byte lowest
    a.emit(I.mov64(I.R1, I.R2), I.alu32(AluOp.AND, I.R1, 0xFF, reg=False))
    a.emit(I.mov64_imm(I.R3, 1 << RouteType.BROADCAST))
    a.jump(JmpOp.JEQ, I.R1, 0, store)  # 0.0.0.0/8
    a.emit(I.mov64(I.R4, I.R2), I.alu32(AluOp.ADD, I.R4, 1, reg=False))
    a.jump(JmpOp.JEQ, I.R4, 0, store)  # 255.255.255.255
    a.emit(I.alu32(AluOp.AND, I.R1, 0xF0, reg=False))
    a.emit(I.mov64_imm(I.R3, 1 << RouteType.MULTICAST))
    a.jump(JmpOp.JEQ, I.R1, 0xE0, store)
    # _skb_refdst is an unsigned long, not a typed pointer: read the route with a probe.
    a.emit(I.ldx(I.DW, I.R1, L.R_CTX, btf.member_offset("bpf_nf_ctx", "skb").offset))
    a.emit(I.ldx(I.DW, I.R3, I.R1, btf.member_offset("sk_buff", "_skb_refdst").offset))
    a.emit(I.alu64(AluOp.AND, I.R3, ~SKB_DST_NOREF, reg=False))
    a.jump(JmpOp.JEQ, I.R3, 0, done)
    rt_type = btf.member_offset("rtable", "rt_type")
    a.emit(I.alu64(AluOp.ADD, I.R3, rt_type.offset, reg=False))
    a.emit(I.mov64(I.R1, L.R_PKT), I.alu64(AluOp.ADD, I.R1, L.RTDST, reg=False))
    a.emit(I.mov64_imm(I.R2, 2))
    a.emit(I.call_helper(Helper.probe_read_kernel))
    a.jump(JmpOp.JNE, I.R0, 0, done)  # the probe zeroed the field: unknown
    a.emit(I.ldx(I.H, I.R1, L.R_PKT, L.RTDST), I.alu32(AluOp.AND, I.R1, 15, reg=False))
    a.emit(I.mov64_imm(I.R3, 1), I.alu64(AluOp.LSH, I.R3, I.R1, reg=True))
    a.place(store)
    a.emit(I.stx(I.H, L.R_PKT, I.R3, L.RTDST))
    a.place(done)


def _probe(a: Assembler, off: int, size: int, dst: int) -> None:
    """r9[dst:dst + size] = *(r7 + off) read with bpf_probe_read_kernel; r0 = 0 on success."""
    a.emit(I.mov64(I.R1, L.R_PKT), I.alu64(AluOp.ADD, I.R1, dst, reg=False))
    a.emit(I.mov64_imm(I.R2, size))
    a.emit(I.mov64(I.R3, I.R7), I.alu64(AluOp.ADD, I.R3, off, reg=False))
    a.emit(I.call_helper(Helper.probe_read_kernel))


def emit_owner(a: Assembler) -> None:
    """OWNSTATE, OWNUID, OWNGID as xt_owner sees the packet's socket.

    The chain of pointers is followed with probe reads (r7: the current pointer): the
    listener pointer shares a union with a plain integer, which BTF loads see as a scalar."""
    btf = vmlinux()
    done, full = a.label("own_done"), a.label("own_full")
    tmp = L.OWNUID  # 8 bytes of scratch until the credentials are stored there

    def follow(struct: str, member: str) -> None:
        _probe(a, btf.member_offset(struct, member).offset, 8, tmp)
        a.jump(JmpOp.JNE, I.R0, 0, done)
        a.emit(I.ldx(I.DW, I.R7, L.R_PKT, tmp))
        a.jump(JmpOp.JEQ, I.R7, 0, done)

    a.emit(I.ldx(I.DW, I.R1, L.R_CTX, btf.member_offset("bpf_nf_ctx", "skb").offset))
    a.emit(I.mov64(I.R7, I.R1))
    follow("sk_buff", "sk")
    # skb_to_full_sk: a SYN-ACK belongs to a request socket; the listener owns it.
    _probe(a, btf.member_offset("sock", "__sk_common.skc_state").offset, 1, tmp)
    a.jump(JmpOp.JNE, I.R0, 0, done)
    a.emit(I.ldx(I.B, I.R1, L.R_PKT, tmp))
    a.jump(JmpOp.JNE, I.R1, btf.enum_value("TCP_NEW_SYN_RECV"), full)
    follow("sock", "__sk_common.skc_listener")
    a.place(full)
    # A socket of another namespace counts as none (net_eq(xt_net, sock_net)).
    _probe(a, btf.member_offset("sock", "__sk_common.skc_net.net").offset, 8, tmp)
    a.jump(JmpOp.JNE, I.R0, 0, done)
    a.emit(I.ldx(I.DW, I.R3, L.R_PKT, tmp))
    a.emit(I.ldx(I.DW, I.R4, L.R_CTX, btf.member_offset("bpf_nf_ctx", "state").offset))
    _probe_net = btf.member_offset("nf_hook_state", "net").offset
    a.emit(I.ldx(I.DW, I.R4, I.R4, _probe_net))
    a.emit(I.stx(I.DW, L.R_PKT, I.R4, tmp))
    a.emit(I.ldx(I.DW, I.R4, L.R_PKT, tmp))  # through the stack: compared as numbers
    a.jump(JmpOp.JNE, I.R3, I.R4, done, reg=True)
    follow("sock", "sk_socket")
    a.emit(I.st(I.B, L.R_PKT, L.OWNSTATE, 1))
    follow("socket", "file")
    follow("file", "f_cred")
    _probe(a, btf.member_offset("cred", "fsuid").offset, 8, tmp)  # fsuid, fsgid
    a.jump(JmpOp.JNE, I.R0, 0, done)
    a.emit(I.st(I.B, L.R_PKT, L.OWNSTATE, 2))
    a.place(done)
