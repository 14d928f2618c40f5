"""Filling the packet struct's CT area (layout.CT..CTREPLDPORT) from a conntrack entry.

Shared by every hook flavour: the netfilter hooks and tc egress find the entry netfilter attached
to the skb (`skb->_nfct`: the nf_conn pointer with the ctinfo in its low 3 bits); tc ingress and
XDP look it up (see ctlookup; ICMP queries: the entry the egress recorder remembered, ctquery).
Either way the entry ends up as r7 = nf_conn (kernel memory, read
with bpf_probe_read_kernel) and r8 = ctinfo, and one routine turns that into xt_conntrack's view.
"""

from __future__ import annotations

from ...bpf import insn as I
from ...bpf.asm import Assembler
from ...bpf.btf import BtfKind, vmlinux
from ...bpf.consts import Helper
from ...bpf.insn import AluOp, JmpOp
from ...ir.model import Family
from ...ir.pred import Field
from .. import layout as L

NFCT_INFOMASK = 7
# enum ip_conntrack_info
IP_CT_ESTABLISHED, IP_CT_RELATED, IP_CT_NEW, IP_CT_IS_REPLY = 0, 1, 2, 3
IP_CT_ESTABLISHED_REPLY, IP_CT_RELATED_REPLY, IP_CT_UNTRACKED = 3, 4, 7
# enum ip_conntrack_status
IPS_SEEN_REPLY, IPS_CONFIRMED = 1 << 1, 1 << 3
IPS_SRC_NAT, IPS_DST_NAT = 1 << 4, 1 << 5

TUPLE_FIELDS = frozenset({
    Field.CTPROTO, Field.CTORIGSRC, Field.CTORIGDST, Field.CTREPLSRC, Field.CTREPLDST,
    Field.CTORIGSPORT, Field.CTORIGDPORT, Field.CTREPLSPORT, Field.CTREPLDPORT})
_DIRS = ((L.CTORIGSRC, L.CTORIGDST, L.CTORIGSPORT, L.CTORIGDPORT),
         (L.CTREPLSRC, L.CTREPLDST, L.CTREPLSPORT, L.CTREPLDPORT))


class CtBit:
    """xt_conntrack's state bits."""

    INVALID, ESTABLISHED, RELATED, NEW = 1, 2, 4, 8
    SNAT, DNAT, UNTRACKED = 1 << 6, 1 << 7, 1 << 8


def probe(a: Assembler, dst: int, size: int, off: int, base: int = I.R7) -> None:
    """r9[dst:dst+size] = kernel memory at `base` + off (zeros if unreadable)."""
    a.emit(I.mov64(I.R1, L.R_PKT), I.alu64(AluOp.ADD, I.R1, dst, reg=False))
    a.emit(I.mov64_imm(I.R2, size))
    a.emit(I.mov64(I.R3, base), I.alu64(AluOp.ADD, I.R3, off, reg=False))
    a.emit(I.call_helper(Helper.probe_read_kernel))


def store_state(a: Assembler, bits: int) -> None:
    """CTSTATE = CTBITS = `bits` (constant)."""
    a.emit(I.mov64_imm(I.R1, bits))
    a.emit(I.stx(I.H, L.R_PKT, I.R1, L.CTSTATE), I.stx(I.H, L.R_PKT, I.R1, L.CTBITS))


def emit_no_entry(a: Assembler, bits: int) -> None:
    """No conntrack entry: state `bits` (INVALID, UNTRACKED), no direction, no tuples."""
    a.emit(I.st(I.B, L.R_PKT, L.CTHAS, 0), I.st(I.B, L.R_PKT, L.CTDIR, 0))
    store_state(a, bits)


def emit_from_nfct(a: Assembler, fields: set[Field]) -> None:
    """The CT area from r7 = skb->_nfct (r7, r8 and r1-r5 are clobbered)."""
    done, has = a.label("ct_done"), a.label("ct_has")
    a.emit(I.mov64(I.R8, I.R7), I.alu64(AluOp.AND, I.R8, NFCT_INFOMASK, reg=False))
    a.emit(I.alu64(AluOp.AND, I.R7, ~NFCT_INFOMASK, reg=False))
    a.jump(JmpOp.JNE, I.R7, 0, has)
    # No entry: untracked (ctinfo IP_CT_UNTRACKED) or invalid.
    inval = a.label("ct_invalid")
    a.jump(JmpOp.JNE, I.R8, IP_CT_UNTRACKED, inval)
    emit_no_entry(a, CtBit.UNTRACKED)
    a.goto(done)
    a.place(inval)
    emit_no_entry(a, CtBit.INVALID)
    a.goto(done)
    a.place(has)
    emit_from_conn(a, fields)
    a.place(done)


def emit_from_conn(a: Assembler, fields: set[Field], base: int = I.R7) -> None:
    """The CT area from the entry at `base` (not NULL) and r8 = ctinfo (r8 is kept)."""
    btf = vmlinux()
    a.emit(I.st(I.B, L.R_PKT, L.CTHAS, 1), I.st(I.B, L.R_PKT, L.CTDIR, 0))
    orig = a.label("ct_orig")
    a.jump(JmpOp.JLT, I.R8, IP_CT_IS_REPLY, orig)
    a.emit(I.st(I.B, L.R_PKT, L.CTDIR, 1))
    a.place(orig)
    # The state bit: 1 << (ctinfo % IP_CT_IS_REPLY + 1).
    a.emit(I.mov64(I.R2, I.R8), I.alu64(AluOp.MOD, I.R2, IP_CT_IS_REPLY, reg=False))
    a.emit(I.alu64(AluOp.ADD, I.R2, 1, reg=False), I.mov64_imm(I.R1, 1))
    a.emit(I.alu64(AluOp.LSH, I.R1, I.R2, reg=True))
    a.emit(I.stx(I.H, L.R_PKT, I.R1, L.CTSTATE), I.stx(I.H, L.R_PKT, I.R1, L.CTBITS))
    conn = "nf_conn"
    probe(a, L.CTSTATUS, 4, btf.member_offset(conn, "status").offset, base)
    # xt_conntrack adds SNAT/DNAT to the state when the entry is NATed.
    for status, bit in ((IPS_SRC_NAT, CtBit.SNAT), (IPS_DST_NAT, CtBit.DNAT)):
        natted, nxt = a.label("ct_nat"), a.label("ct_nat_next")
        a.emit(I.ldx(I.W, I.R1, L.R_PKT, L.CTSTATUS))
        a.jump(JmpOp.JSET, I.R1, status, natted)
        a.goto(nxt)
        a.place(natted)
        a.emit(I.ldx(I.H, I.R1, L.R_PKT, L.CTBITS), I.alu32(AluOp.OR, I.R1, bit, reg=False))
        a.emit(I.stx(I.H, L.R_PKT, I.R1, L.CTBITS))
        a.place(nxt)
    if not fields & TUPLE_FIELDS:
        return
    th = btf.member_offset(conn, "tuplehash").offset
    th_size = btf.type_size(btf.find("nf_conntrack_tuple_hash", BtfKind.STRUCT))
    tup = btf.member_offset("nf_conntrack_tuple_hash", "tuple").offset
    m = {k: btf.member_offset("nf_conntrack_tuple", k).offset
         for k in ("src.u3", "src.u", "dst.u3", "dst.u", "dst.protonum")}
    size = m["dst.protonum"] + 1
    for d, (src, dst, sport, dport) in enumerate(_DIRS):
        probe(a, L.KEYBUF, size, th + d * th_size + tup, base)
        for o in range(0, 16, 4):
            a.emit(I.ldx(I.W, I.R1, L.R_PKT, L.KEYBUF + m["src.u3"] + o),
                   I.stx(I.W, L.R_PKT, I.R1, src + o))
            a.emit(I.ldx(I.W, I.R1, L.R_PKT, L.KEYBUF + m["dst.u3"] + o),
                   I.stx(I.W, L.R_PKT, I.R1, dst + o))
        a.emit(I.ldx(I.H, I.R1, L.R_PKT, L.KEYBUF + m["src.u"]),
               I.stx(I.H, L.R_PKT, I.R1, sport))
        a.emit(I.ldx(I.H, I.R1, L.R_PKT, L.KEYBUF + m["dst.u"]),
               I.stx(I.H, L.R_PKT, I.R1, dport))
        if d == 0:
            a.emit(I.ldx(I.B, I.R1, L.R_PKT, L.KEYBUF + m["dst.protonum"]),
                   I.stx(I.B, L.R_PKT, I.R1, L.CTPROTO))


def emit_from_packet(a: Assembler, fields: set[Field], family: Family, *, reply: bool,
                     status: int, sport_off: int = L.L4, dport_off: int = L.L4 + 2,
                     rport_off: int | None = None) -> None:
    """The entry netfilter would create for this packet (no NAT): the packet's tuple in the
    original direction and its inverse as the reply (swapped when `reply`: the packet is the
    answer to a flow conntrack would know). `rport_off` is the reply's destination "port"
    (ICMP: the answer's type and code) when it is not the source port."""
    a.emit(I.st(I.B, L.R_PKT, L.CTHAS, 1), I.st(I.B, L.R_PKT, L.CTDIR, int(reply)))
    a.emit(I.st(I.W, L.R_PKT, L.CTSTATUS, status))
    if not fields & TUPLE_FIELDS:
        return
    a.emit(I.ldx(I.B, I.R1, L.R_PKT, L.L4PROTO), I.stx(I.B, L.R_PKT, I.R1, L.CTPROTO))
    v4 = family is Family.IPV4
    s_off, d_off, alen = (L.L3 + 12, L.L3 + 16, 4) if v4 else (L.L3 + 8, L.L3 + 24, 16)
    pkt = (s_off, d_off)
    # (address source, address destination) per direction, in packet-struct offsets.
    orig, repl = (pkt, pkt[::-1]) if not reply else (pkt[::-1], pkt)
    for (src, dst, _, _), (a_src, a_dst) in zip(_DIRS, (orig, repl), strict=True):
        for o in range(0, 16, 4):
            for to, frm in ((src, a_src), (dst, a_dst)):
                if o < alen:
                    a.emit(I.ldx(I.W, I.R1, L.R_PKT, frm + o), I.stx(I.W, L.R_PKT, I.R1, to + o))
                else:
                    a.emit(I.st(I.W, L.R_PKT, to + o, 0))
    # Ports: the packet's (source, destination); the inverse swaps them.
    ports = (sport_off, dport_off)
    inverse = (dport_off, sport_off) if rport_off is None else (sport_off, rport_off)
    for (_, _, to_s, to_d), (p_s, p_d) in zip(_DIRS, (inverse, ports) if reply
                                              else (ports, inverse), strict=True):
        a.emit(I.ldx(I.H, I.R1, L.R_PKT, p_s), I.stx(I.H, L.R_PKT, I.R1, to_s))
        a.emit(I.ldx(I.H, I.R1, L.R_PKT, p_d), I.stx(I.H, L.R_PKT, I.R1, to_d))
