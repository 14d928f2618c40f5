"""Netfilter programs (BPF_PROG_TYPE_NETFILTER): the transparent replacement for iptables.

The context is `struct bpf_nf_ctx {state, skb}`. Packet bytes are read through a dynptr made by
the `bpf_dynptr_from_skb` kfunc (netfilter programs may not call bpf_skb_load_bytes); at these
hooks skb->data is the network header. Metadata comes from kernel structs at offsets read from
vmlinux BTF.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ...bpf import insn as I
from ...bpf.asm import Assembler, Label
from ...bpf.btf import vmlinux
from ...bpf.consts import AttachType, Helper, NfHook, NfVerdict, ProgType
from ...bpf.insn import AluOp, JmpOp
from ...ir.model import Family
from ...ir.pred import CT_FIELDS, OWNER_FIELDS, Field
from .. import layout as L
from . import ctread, localtable, route
from .base import Flavour, HookPoint, Verdict

_CHAINS = {
    "filter": {"INPUT": NfHook.LOCAL_IN, "FORWARD": NfHook.FORWARD, "OUTPUT": NfHook.LOCAL_OUT},
    "mangle": {"PREROUTING": NfHook.PRE_ROUTING, "INPUT": NfHook.LOCAL_IN,
               "FORWARD": NfHook.FORWARD, "OUTPUT": NfHook.LOCAL_OUT,
               "POSTROUTING": NfHook.POST_ROUTING},
    "raw": {"PREROUTING": NfHook.PRE_ROUTING, "OUTPUT": NfHook.LOCAL_OUT},
    "security": {"INPUT": NfHook.LOCAL_IN, "FORWARD": NfHook.FORWARD,
                 "OUTPUT": NfHook.LOCAL_OUT},
}

PACKET_LOOPBACK = 5
ARPHRD_ETHER = 1
ETH_HLEN = 14
PACKET_BROADCAST, PACKET_MULTICAST = 1, 2
# skb->_nfct as read for the CT area, kept for connlimit (which remembers the entry's pointer):
# the parser's scratch bytes, free once the packet is parsed.
NF_CTPTR = 176


@dataclass
class NetfilterFlavour(Flavour):
    """Programs attached with netfilter links."""

    name: str = "nf"
    prog_type: ProgType = ProgType.NETFILTER
    attach_type: AttachType | None = AttachType.NETFILTER
    nf_hook: int | None = None  # set per hook point by for_hook

    def for_hook(self, hook: HookPoint) -> NetfilterFlavour:
        """The flavour at one netfilter hook (what the packet carries depends on it)."""
        return replace(self, nf_hook=hook.nf_hook)

    def _routed(self) -> bool:
        """Whether the packet carries its route (from the routing decision on)."""
        return self.nf_hook != NfHook.PRE_ROUTING

    def chains(self, table: str) -> dict[str, HookPoint]:
        """Built-in chains of `table` and their netfilter hooks."""
        return {c: HookPoint(c, nf_hook=h) for c, h in _CHAINS.get(table, {}).items()}

    def verdict_code(self, verdict: Verdict) -> int:
        """NF_ACCEPT or NF_DROP."""
        return NfVerdict.ACCEPT if verdict == Verdict.ACCEPT else NfVerdict.DROP

    def emit_setup(self, a: Assembler) -> None:
        """Keep the context and make a dynptr over the skb."""
        btf = vmlinux()
        a.emit(I.mov64(L.R_CTX, I.R1))
        a.emit(I.ldx(I.DW, I.R1, L.R_CTX, btf.member_offset("bpf_nf_ctx", "skb").offset))
        a.emit(I.mov64_imm(I.R2, 0))
        a.emit(I.mov64(I.R3, I.R10), I.alu64(AluOp.ADD, I.R3, L.DYNPTR_OFF, reg=False))
        a.emit(I.call_kfunc(btf.func_id("bpf_dynptr_from_skb")))

    def emit_l3_offset(self, a: Assembler, on_pass: Label) -> None:
        """The dynptr starts at the network header."""
        a.emit(I.mov64_imm(I.R7, 0))

    def emit_load(self, a: Assembler, off_reg: int, dst: int, length: int | None,
                  len_reg: int | None = None) -> None:
        """bpf_dynptr_read(r9 + dst, len, &dynptr, off, 0)."""
        a.emit(I.mov64(I.R1, L.R_PKT), I.alu64(AluOp.ADD, I.R1, dst, reg=False))
        if len_reg is not None:
            a.emit(I.mov64(I.R2, len_reg))
        else:
            a.emit(I.mov64_imm(I.R2, length or 0))
        a.emit(I.mov64(I.R3, I.R10), I.alu64(AluOp.ADD, I.R3, L.DYNPTR_OFF, reg=False))
        a.emit(I.mov64(I.R4, off_reg), I.mov64_imm(I.R5, 0))
        a.emit(I.call_helper(Helper.dynptr_read))

    def emit_meta(self, a: Assembler, fields: set[Field]) -> None:
        """Interface names from nf_hook_state, mark and packet type from the skb."""
        btf = vmlinux()
        static = self.static_fields()
        name_off = btf.member_offset("net_device", "name").offset
        for f, member, dst in ((Field.IIFNAME, "in", L.IIFNAME), (Field.OIFNAME, "out", L.OIFNAME)):
            if f not in fields or f in static:
                continue
            a.emit(I.ldx(I.DW, I.R1, L.R_CTX, btf.member_offset("bpf_nf_ctx", "state").offset))
            a.emit(I.ldx(I.DW, I.R1, I.R1, btf.member_offset("nf_hook_state", member).offset))
            # A missing device (no input device on OUTPUT) reads as NULL: its name is "".
            zero = a.label("nodev")
            done = a.label("dev")
            a.jump(JmpOp.JEQ, I.R1, 0, zero)
            a.emit(I.ldx(I.DW, I.R2, I.R1, name_off), I.stx(I.DW, L.R_PKT, I.R2, dst))
            a.emit(I.ldx(I.DW, I.R2, I.R1, name_off + 8), I.stx(I.DW, L.R_PKT, I.R2, dst + 8))
            a.goto(done)
            a.place(zero)
            a.emit(I.st(I.DW, L.R_PKT, dst, 0), I.st(I.DW, L.R_PKT, dst + 8, 0))
            a.place(done)
        if Field.MARK in fields:
            a.emit(I.ldx(I.DW, I.R1, L.R_CTX, btf.member_offset("bpf_nf_ctx", "skb").offset))
            a.emit(I.ldx(I.W, I.R2, I.R1, btf.member_offset("sk_buff", "mark").offset))
            a.emit(I.stx(I.W, L.R_PKT, I.R2, L.MARK))
        if Field.PKTTYPE in fields:
            self._emit_pkttype(a)
        if Field.SMAC in fields:
            self._emit_smac(a)
        if fields & CT_FIELDS:
            self._emit_ct(a, fields)
        # The IPv4 destination's type is the route's the kernel chose, once there is one (always
        # current); everything else is looked up in the local table's map.
        by_route = self.family is Family.IPV4 and self._routed() and Field.RTDST in fields
        if by_route:
            route.emit_dst_type(a, self.family)
        localtable.emit_types(a, self.family, fields, dev=self._emit_dev_ifindex,
                              skip=frozenset({Field.RTDST}) if by_route else frozenset())
        if fields & OWNER_FIELDS:
            route.emit_owner(a)

    def _emit_dev_ifindex(self, a: Assembler, side: str, reg: int) -> None:
        """reg = ifindex of nf_hook_state's input ("in") or output ("out") device, or NO_DEV."""
        btf = vmlinux()
        none, done = a.label("nodev"), a.label("dev_ifindex")
        a.emit(I.ldx(I.DW, I.R1, L.R_CTX, btf.member_offset("bpf_nf_ctx", "state").offset))
        a.emit(I.ldx(I.DW, I.R1, I.R1, btf.member_offset("nf_hook_state", side).offset))
        a.jump(JmpOp.JEQ, I.R1, 0, none)
        a.emit(I.ldx(I.W, reg, I.R1, btf.member_offset("net_device", "ifindex").offset))
        a.goto(done)
        a.place(none)
        a.emit(I.mov64_imm(reg, localtable.NO_DEV))
        a.place(done)

    def _emit_ct(self, a: Assembler, fields: set[Field]) -> None:
        """The packet's conntrack entry, as netfilter's conntrack attached it to the skb.

        skb->_nfct holds the nf_conn pointer with the ctinfo in its low 3 bits (see ctread).
        """
        btf = vmlinux()
        a.emit(I.ldx(I.DW, I.R1, L.R_CTX, btf.member_offset("bpf_nf_ctx", "skb").offset))
        a.emit(I.ldx(I.DW, I.R7, I.R1, btf.member_offset("sk_buff", "_nfct").offset))
        a.emit(I.stx(I.DW, L.R_PKT, I.R7, NF_CTPTR))
        ctread.emit_from_nfct(a, fields)

    def _emit_smac(self, a: Assembler) -> None:
        """The source MAC, when the skb's device is Ethernet and its MAC header lies before the
        network header (xt_mac's conditions); ETHOK says whether it does."""
        btf = vmlinux()
        off = {m: btf.member_offset("sk_buff", m).offset
               for m in ("dev", "head", "mac_header", "network_header")}
        no = a.label("nomac")
        a.emit(I.ldx(I.DW, I.R8, L.R_CTX, btf.member_offset("bpf_nf_ctx", "skb").offset))
        a.emit(I.ldx(I.DW, I.R1, I.R8, off["dev"]))
        a.jump(JmpOp.JEQ, I.R1, 0, no)
        a.emit(I.ldx(I.H, I.R1, I.R1, btf.member_offset("net_device", "type").offset))
        a.jump(JmpOp.JNE, I.R1, ARPHRD_ETHER, no)
        a.emit(I.ldx(I.H, I.R2, I.R8, off["mac_header"]))
        a.jump(JmpOp.JEQ, I.R2, 0xFFFF, no)  # not set
        a.emit(I.ldx(I.H, I.R3, I.R8, off["network_header"]))
        a.emit(I.mov64(I.R4, I.R2), I.alu64(AluOp.ADD, I.R4, ETH_HLEN, reg=False))
        a.jump(JmpOp.JGT, I.R4, I.R3, no, reg=True)
        a.emit(I.ldx(I.DW, I.R3, I.R8, off["head"]))
        a.emit(I.alu64(AluOp.ADD, I.R3, I.R2, reg=True), I.alu64(AluOp.ADD, I.R3, 6, reg=False))
        a.emit(I.mov64(I.R1, L.R_PKT), I.alu64(AluOp.ADD, I.R1, L.SMAC, reg=False))
        a.emit(I.mov64_imm(I.R2, 6))
        a.emit(I.call_helper(Helper.probe_read_kernel))
        a.jump(JmpOp.JNE, I.R0, 0, no)
        a.emit(I.st(I.B, L.R_PKT, L.ETHOK, 1))
        a.place(no)
    def _emit_pkttype(self, a: Assembler) -> None:
        """xt_pkttype's view: the skb's type, with looped-back packets classified by address."""
        btf = vmlinux()
        m = btf.member_offset("sk_buff", "pkt_type")
        a.emit(I.ldx(I.DW, I.R1, L.R_CTX, btf.member_offset("bpf_nf_ctx", "skb").offset))
        a.emit(I.ldx(I.B, I.R2, I.R1, m.offset))
        if m.bit_offset % 8:
            a.emit(I.alu32(AluOp.RSH, I.R2, m.bit_offset % 8, reg=False))
        a.emit(I.alu32(AluOp.AND, I.R2, (1 << (m.bit_size or 3)) - 1, reg=False))
        done = a.label("pkttype")
        a.jump(JmpOp.JNE, I.R2, PACKET_LOOPBACK, done)
        if self.family is Family.IPV6:
            a.emit(I.mov64_imm(I.R2, PACKET_MULTICAST))
        else:
            a.emit(I.mov64_imm(I.R2, PACKET_BROADCAST))
            a.emit(I.ldx(I.B, I.R3, L.R_PKT, L.L3 + 16), I.alu32(AluOp.AND, I.R3, 0xF0, reg=False))
            a.jump(JmpOp.JNE, I.R3, 0xE0, done)
            a.emit(I.mov64_imm(I.R2, PACKET_MULTICAST))
        a.place(done)
        a.emit(I.stx(I.B, L.R_PKT, I.R2, L.PKTTYPE))

