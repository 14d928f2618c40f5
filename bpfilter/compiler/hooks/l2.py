"""Flavours that see the Ethernet frame (tc and XDP): link-layer parsing and link metadata."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from ...bpf import insn as I
from ...bpf.asm import Assembler, Label
from ...bpf.consts import Helper
from ...bpf.insn import AluOp, JmpOp
from ...ir.model import Family
from ...ir.pred import CT_FIELDS, Field
from .. import layout as L
from . import ctlookup, localtable
from .base import Flavour, HookPoint

ETH_P_IP, ETH_P_IPV6 = 0x0800, 0x86DD
VLAN_TYPES = (0x8100, 0x88A8)
SCRATCH = 176  # 16 free bytes at the end of the packet struct
MAX_VLAN_TAGS = 2

PACKET_HOST, PACKET_BROADCAST, PACKET_MULTICAST, PACKET_OTHERHOST = 0, 1, 2, 3


def _be16(v: int) -> int:
    return int.from_bytes(v.to_bytes(2, "big"), "little")


@dataclass
class EthernetFlavour(Flavour):
    """Common part of tc and XDP: the program sees the frame from its Ethernet header on."""

    ifname: str = ""
    egress: bool = False
    # The interface's MAC address, to tell a frame for this host from one for another host.
    mac: bytes | None = None

    def chains(self, table: str) -> dict[str, HookPoint]:
        """INPUT runs at ingress; OUTPUT at egress where the flavour has one (tc)."""
        if table != "filter":
            return {}
        return {"INPUT": HookPoint("INPUT")}

    def for_hook(self, hook: HookPoint) -> EthernetFlavour:
        """A copy facing the hook's direction."""
        return dataclasses.replace(self, egress=hook.egress)

    load_helper: ClassVar[Helper]  # bpf_skb_load_bytes or bpf_xdp_load_bytes

    def emit_load(self, a: Assembler, off_reg: int, dst: int, length: int | None,
                  len_reg: int | None = None) -> None:
        """load_helper(ctx, off, r9 + dst, len): both helpers take the same arguments."""
        a.emit(I.mov64(I.R1, L.R_CTX), I.mov64(I.R2, off_reg))
        a.emit(I.mov64(I.R3, L.R_PKT), I.alu64(AluOp.ADD, I.R3, dst, reg=False))
        if len_reg is not None:
            a.emit(I.mov64(I.R4, len_reg))
        else:
            a.emit(I.mov64_imm(I.R4, length or 0))
        a.emit(I.call_helper(self.load_helper))

    def emit_l3_offset(self, a: Assembler, on_pass: Label) -> None:
        """Skip the Ethernet header and up to two VLAN tags; pass other protocols."""
        want = ETH_P_IP if self.family is Family.IPV4 else ETH_P_IPV6
        a.emit(I.mov64_imm(I.R7, 0))
        self.emit_load(a, I.R7, SCRATCH, 14)
        a.jump(JmpOp.JNE, I.R0, 0, on_pass)
        a.emit(I.st(I.B, L.R_PKT, L.ETHOK, 1))
        for i in range(0, 6, 2):  # stack accesses must be aligned: the MAC sits at offset 6
            a.emit(I.ldx(I.H, I.R1, L.R_PKT, SCRATCH + 6 + i),
                   I.stx(I.H, L.R_PKT, I.R1, L.SMAC + i))
        self._emit_pkttype_from_dst(a)
        a.emit(I.ldx(I.H, I.R8, L.R_PKT, SCRATCH + 12))
        a.emit(I.mov64_imm(I.R7, 14))
        for _ in range(MAX_VLAN_TAGS):
            found = a.label("ethertype")
            a.jump(JmpOp.JEQ, I.R8, _be16(want), found)
            tagged = a.label("vlan")
            for t in VLAN_TYPES:
                a.jump(JmpOp.JEQ, I.R8, _be16(t), tagged)
            a.goto(on_pass)
            a.place(tagged)
            self.emit_load(a, I.R7, SCRATCH, 4)
            a.jump(JmpOp.JNE, I.R0, 0, on_pass)
            a.emit(I.ldx(I.H, I.R8, L.R_PKT, SCRATCH + 2))
            a.emit(I.alu64(AluOp.ADD, I.R7, 4, reg=False))
            a.place(found)
        a.jump(JmpOp.JNE, I.R8, _be16(want), on_pass)

    def _emit_pkttype_from_dst(self, a: Assembler) -> None:
        """Classify the frame by its destination MAC, as the stack sets skb->pkt_type."""
        done = a.label("pkttype")
        a.emit(I.mov64_imm(I.R2, PACKET_MULTICAST))
        a.emit(I.ldx(I.B, I.R1, L.R_PKT, SCRATCH + 0))
        notmc = a.label("notmc")
        a.jump(JmpOp.JSET, I.R1, 1, notmc)
        if self.mac is not None:
            a.emit(I.mov64_imm(I.R2, PACKET_HOST))
            lo = int.from_bytes(self.mac[:4], "little")
            hi = int.from_bytes(self.mac[4:6], "little")
            a.emit(I.ldx(I.W, I.R1, L.R_PKT, SCRATCH + 0))
            other = a.label("other")
            a.jump(JmpOp.JNE, I.R1, I.s32(lo), other, wide=True)
            a.emit(I.ldx(I.H, I.R1, L.R_PKT, SCRATCH + 4))
            a.jump(JmpOp.JEQ, I.R1, hi, done, wide=True)
            a.place(other)
            a.emit(I.mov64_imm(I.R2, PACKET_OTHERHOST))
        else:
            a.emit(I.mov64_imm(I.R2, PACKET_HOST))
        a.goto(done)
        a.place(notmc)
        # Group bit set: broadcast when all ones.
        a.emit(I.ldx(I.W, I.R1, L.R_PKT, SCRATCH + 0))
        a.jump(JmpOp.JNE, I.R1, -1, done, wide=True)
        a.emit(I.ldx(I.H, I.R1, L.R_PKT, SCRATCH + 4))
        a.jump(JmpOp.JNE, I.R1, 0xFFFF, done, wide=True)
        a.emit(I.mov64_imm(I.R2, PACKET_BROADCAST))
        a.place(done)
        a.emit(I.stx(I.B, L.R_PKT, I.R2, L.PKTTYPE))

    def emit_meta(self, a: Assembler, fields: set[Field]) -> None:
        """MAC and packet type come from the frame (see emit_l3_offset); conntrack state from
        the skb or a lookup (see ctlookup)."""
        if Field.MARK in fields:
            self.emit_mark(a)
        if fields & CT_FIELDS:
            ctlookup.emit_ct(a, self, fields)
        localtable.emit_types(a, self.family, fields, dev=self.emit_dev_ifindex)

    def unsupported_field(self, f: Field) -> str | None:
        """Every field can be read (XDP refuses the mark itself)."""
        return None

    def emit_mark(self, a: Assembler) -> None:
        """Store the packet mark (tc only)."""
        raise NotImplementedError

    def emit_dev_ifindex(self, a: Assembler, side: str, reg: int) -> None:
        """reg = ifindex of the packet's input ("in") or output ("out") device, or
        localtable.NO_DEV when this side has none."""
        raise NotImplementedError

    def static_fields(self) -> dict[Field, bytes]:
        """The interface is the one the program is attached to."""
        out = super().static_fields()
        here = self.ifname.encode().ljust(16, b"\0")
        if self.egress:
            out.setdefault(Field.OIFNAME, here)
            out.setdefault(Field.IIFNAME, bytes(16))
        else:
            out.setdefault(Field.IIFNAME, here)
            out.setdefault(Field.OIFNAME, bytes(16))
        return out


