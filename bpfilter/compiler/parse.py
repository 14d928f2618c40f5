"""The packet parser every program starts with: network and transport headers into the struct.

It follows netfilter: IPv4 options are skipped by IHL; IPv6 extension headers are walked as
ipv6_find_hdr() does (hop-by-hop, routing, destination options, AH, fragment), stopping at a
later fragment; non-first fragments carry no transport header; the transport header is copied
as far as the packet holds it (matches hotdrop when they need more).
"""

from __future__ import annotations

from ..bpf import insn as I
from ..bpf.asm import Assembler, Label
from ..bpf.insn import AluOp, JmpOp
from ..ir.model import Family
from . import layout as L
from .hooks.base import Flavour, store_zero

SCRATCH = 176
MAX_EXT_HEADERS = 8
EXT_OPTS = (0, 43, 60)  # hop-by-hop, routing, destination options: length in 8-byte units
AH, FRAGMENT, NONE, ROUTING = 51, 44, 59, 43
IPV6_EXT = (0, 43, 44, 51, 59, 60)


def emit_parse(a: Assembler, fl: Flavour, on_pass: Label, *, tcp_options: bool,
               packet_class: bool = False, routing: bool = False) -> None:
    """Fill the packet struct's header fields; jump to `on_pass` for traffic not ours
    (`routing`: record the first IPv6 routing header, for -m rt)."""
    a.emit(I.mov64(L.R_PKT, I.R10), I.alu64(AluOp.ADD, L.R_PKT, L.PKT_OFF, reg=False))
    fl.emit_setup(a)
    store_zero(a, L.L4, L.IIFNAME)
    store_zero(a, L.SMAC, L.TCPOPTS)
    store_zero(a, L.RTDST, L.RTDST + 24)
    if tcp_options:
        store_zero(a, L.TCPOPTS, L.TCPOPTS + 40)
    fl.emit_l3_offset(a, on_pass)
    a.emit(I.stx(I.W, L.R_PKT, I.R7, L.L3OFF))
    if fl.family is Family.IPV4:
        _parse_ipv4(a, fl, on_pass)
    else:
        _parse_ipv6(a, fl, on_pass, routing)
    if tcp_options:
        _copy_tcp_options(a, fl)
    if packet_class:
        _packet_class(a, fl.family)


def _packet_class(a: Assembler, family: Family) -> None:
    """Store the packet's class for the classifier (see classify.atoms.PacketClass)."""
    from .classify.atoms import PacketClass as P

    done = a.label("pclass")
    a.emit(I.mov64_imm(I.R2, P.V6ERR))
    if family is Family.IPV6:
        a.emit(I.ldx(I.B, I.R1, L.R_PKT, L.V6ERR))
        a.jump(JmpOp.JNE, I.R1, 0, done)
    a.emit(I.ldx(I.H, I.R1, L.R_PKT, L.FRAGOFF))
    first = a.label("first")
    a.jump(JmpOp.JEQ, I.R1, 0, first)
    a.emit(I.mov64_imm(I.R2, P.FRAG))
    if family is Family.IPV4:
        a.jump(JmpOp.JNE, I.R1, 1, done)
        a.emit(I.mov64_imm(I.R2, P.EVIL_FRAG))
    a.goto(done)
    a.place(first)
    a.emit(I.ldx(I.B, I.R1, L.R_PKT, L.L4AVAIL))
    for avail, cls in ((20, P.FULL), (8, P.TRUNC8), (4, P.TRUNC4)):
        a.emit(I.mov64_imm(I.R2, cls))
        a.jump(JmpOp.JGE, I.R1, avail, done)
    a.emit(I.mov64_imm(I.R2, P.TRUNC0))
    a.place(done)
    a.emit(I.stx(I.B, L.R_PKT, I.R2, L.PCLASS))


def _parse_ipv4(a: Assembler, fl: Flavour, on_pass: Label) -> None:
    no_l4 = a.label("no_l4")
    fl.emit_load(a, I.R7, L.L3, 20)
    a.jump(JmpOp.JNE, I.R0, 0, on_pass)
    # Version and header length: the stack drops malformed headers before netfilter sees them.
    a.emit(I.ldx(I.B, I.R1, L.R_PKT, L.L3), I.mov64(I.R2, I.R1))
    a.emit(I.alu32(AluOp.RSH, I.R2, 4, reg=False))
    a.jump(JmpOp.JNE, I.R2, 4, on_pass)
    a.emit(I.alu32(AluOp.AND, I.R1, 0x0F, reg=False), I.alu32(AluOp.LSH, I.R1, 2, reg=False))
    a.jump(JmpOp.JLT, I.R1, 20, on_pass)
    a.emit(I.mov64(I.R8, I.R1), I.stx(I.W, L.R_PKT, I.R8, L.L4OFF))
    a.emit(I.ldx(I.H, I.R1, L.R_PKT, L.L3 + 2), I.endian(I.R1, 16, big=True))
    a.emit(I.stx(I.H, L.R_PKT, I.R1, L.IPLEN))
    a.emit(I.ldx(I.B, I.R1, L.R_PKT, L.L3 + 9), I.stx(I.B, L.R_PKT, I.R1, L.L4PROTO))
    a.emit(I.ldx(I.H, I.R1, L.R_PKT, L.L3 + 6), I.endian(I.R1, 16, big=True))
    a.emit(I.alu32(AluOp.AND, I.R1, 0x1FFF, reg=False), I.stx(I.H, L.R_PKT, I.R1, L.FRAGOFF))
    a.jump(JmpOp.JNE, I.R1, 0, no_l4)
    _load_transport(a, fl)
    a.place(no_l4)


def _parse_ipv6(a: Assembler, fl: Flavour, on_pass: Label, routing: bool = False) -> None:
    no_l4, err, walked = a.label("no_l4"), a.label("v6err"), a.label("walked")
    # A header that cannot be read before the routing header is found: ip6t_rt hotdrops
    # (ipv6_find_hdr's -EBADMSG); a later fragment or the end of the chain is -ENOENT.
    trunc = a.label("v6trunc") if routing else err
    fl.emit_load(a, I.R7, L.L3, 40)
    a.jump(JmpOp.JNE, I.R0, 0, on_pass)
    a.emit(I.ldx(I.B, I.R1, L.R_PKT, L.L3), I.alu32(AluOp.RSH, I.R1, 4, reg=False))
    a.jump(JmpOp.JNE, I.R1, 6, on_pass)
    a.emit(I.ldx(I.H, I.R1, L.R_PKT, L.L3 + 4), I.endian(I.R1, 16, big=True))
    a.emit(I.alu32(AluOp.ADD, I.R1, 40, reg=False), I.stx(I.H, L.R_PKT, I.R1, L.IPLEN))
    a.emit(I.ldx(I.B, I.R1, L.R_PKT, L.L3 + 6), I.stx(I.B, L.R_PKT, I.R1, L.L4PROTO))
    a.emit(I.mov64_imm(I.R8, 40))
    for _ in range(MAX_EXT_HEADERS):
        opts, ah, frag, nxt = (a.label(n) for n in ("opts", "ah", "frag", "next"))
        a.emit(I.ldx(I.B, I.R1, L.R_PKT, L.L4PROTO))
        for h in EXT_OPTS:
            a.jump(JmpOp.JEQ, I.R1, h, opts)
        a.jump(JmpOp.JEQ, I.R1, AH, ah)
        a.jump(JmpOp.JEQ, I.R1, FRAGMENT, frag)
        a.goto(walked)  # an upper-layer protocol, or no next header (59)
        for lab, unit, extra in ((opts, 3, 1), (ah, 2, 2)):
            a.place(lab)
            _load_ext(a, fl, 2, trunc)
            if routing and lab is opts:
                _record_routing(a, fl)
            a.emit(I.ldx(I.B, I.R1, L.R_PKT, SCRATCH), I.stx(I.B, L.R_PKT, I.R1, L.L4PROTO))
            a.emit(I.ldx(I.B, I.R2, L.R_PKT, SCRATCH + 1))
            a.emit(I.alu64(AluOp.ADD, I.R2, extra, reg=False))
            a.emit(I.alu64(AluOp.LSH, I.R2, unit, reg=False))
            a.emit(I.alu64(AluOp.ADD, I.R8, I.R2, reg=True))
            a.goto(nxt)
        a.place(frag)
        _load_ext(a, fl, 4, trunc)
        first = a.label("first_frag")
        a.emit(I.ldx(I.H, I.R2, L.R_PKT, SCRATCH + 2), I.endian(I.R2, 16, big=True))
        a.emit(I.alu32(AluOp.AND, I.R2, 0xFFF8, reg=False))
        a.emit(I.ldx(I.B, I.R1, L.R_PKT, SCRATCH))
        a.jump(JmpOp.JEQ, I.R2, 0, first)
        # A later fragment: its protocol is the fragment header's next header, unless that is
        # another extension header (ipv6_find_hdr gives up: -ENOENT).
        for h in IPV6_EXT:
            if h != NONE:
                a.jump(JmpOp.JEQ, I.R1, h, err)
        a.emit(I.stx(I.B, L.R_PKT, I.R1, L.L4PROTO), I.stx(I.H, L.R_PKT, I.R2, L.FRAGOFF))
        a.emit(I.stx(I.W, L.R_PKT, I.R8, L.L4OFF))
        a.goto(no_l4)
        a.place(first)
        a.emit(I.stx(I.B, L.R_PKT, I.R1, L.L4PROTO), I.alu64(AluOp.ADD, I.R8, 8, reg=False))
        a.place(nxt)
        # Keep the offset bounded for the verifier (and packets are at most 64 KiB).
        a.jump(JmpOp.JGT, I.R8, 0xFFFF, err)
    a.goto(trunc)  # more extension headers than we walk
    if routing:
        a.place(trunc)
        a.emit(I.ldx(I.B, I.R1, L.R_PKT, L.RHSTATE))
        a.jump(JmpOp.JNE, I.R1, 0, err)
        a.emit(I.st(I.B, L.R_PKT, L.RHSTATE, 2))
    a.place(err)
    a.emit(I.st(I.B, L.R_PKT, L.V6ERR, 1))
    a.goto(no_l4)
    a.place(walked)
    a.emit(I.stx(I.W, L.R_PKT, I.R8, L.L4OFF), I.ldx(I.W, I.R7, L.R_PKT, L.L3OFF))
    _load_transport(a, fl)
    a.place(no_l4)


def _load_ext(a: Assembler, fl: Flavour, length: int, err: Label) -> None:
    """Read `length` bytes of the extension header at network offset + r8 into the scratch."""
    a.emit(I.ldx(I.W, I.R7, L.R_PKT, L.L3OFF), I.alu64(AluOp.ADD, I.R7, I.R8, reg=True))
    fl.emit_load(a, I.R7, SCRATCH, length)
    a.jump(JmpOp.JNE, I.R0, 0, err)


def _record_routing(a: Assembler, fl: Flavour) -> None:
    """At an extension header (r8: its offset, r7: absolute), keep the first routing header's
    fields as ip6t_rt reads them: 4 bytes (a hotdrop if unreadable), then the reserved word."""
    done, bad = a.label("rh_done"), a.label("rh_bad")
    a.emit(I.ldx(I.B, I.R1, L.R_PKT, L.L4PROTO))
    a.jump(JmpOp.JNE, I.R1, ROUTING, done)
    a.emit(I.ldx(I.B, I.R1, L.R_PKT, L.RHSTATE))
    a.jump(JmpOp.JNE, I.R1, 0, done)
    fl.emit_load(a, I.R7, SCRATCH + 4, 4)
    a.jump(JmpOp.JNE, I.R0, 0, bad)
    a.emit(I.ldx(I.B, I.R1, L.R_PKT, SCRATCH + 5), I.stx(I.B, L.R_PKT, I.R1, L.RHLEN))
    a.emit(I.ldx(I.B, I.R2, L.R_PKT, SCRATCH + 6), I.stx(I.B, L.R_PKT, I.R2, L.RHTYPE))
    a.emit(I.ldx(I.B, I.R2, L.R_PKT, SCRATCH + 7), I.stx(I.B, L.R_PKT, I.R2, L.RHSEGS))
    # The whole header must lie within the datagram (skb->len - ptr < hdrlen: no match).
    a.emit(I.st(I.B, L.R_PKT, L.RHSTATE, 3))
    a.emit(I.alu64(AluOp.ADD, I.R1, 1, reg=False), I.alu64(AluOp.LSH, I.R1, 3, reg=False))
    a.emit(I.alu64(AluOp.ADD, I.R1, I.R8, reg=True))
    a.emit(I.ldx(I.H, I.R2, L.R_PKT, L.IPLEN))
    a.jump(JmpOp.JGT, I.R1, I.R2, done, reg=True)
    a.emit(I.st(I.B, L.R_PKT, L.RHSTATE, 1))
    a.emit(I.alu64(AluOp.ADD, I.R7, 4, reg=False))
    fl.emit_load(a, I.R7, L.RHRES, 4)
    a.jump(JmpOp.JNE, I.R0, 0, done)
    a.emit(I.st(I.B, L.R_PKT, L.RHRESOK, 1))
    a.goto(done)
    a.place(bad)
    a.emit(I.st(I.B, L.R_PKT, L.RHSTATE, 2))
    a.place(done)


def _load_transport(a: Assembler, fl: Flavour) -> None:
    """Copy 20, 8 or 4 bytes of transport header, as much as the datagram holds (r8: offset)."""
    done = a.label("l4done")
    # Bytes of datagram after the network headers.
    a.emit(I.ldx(I.H, I.R1, L.R_PKT, L.IPLEN))
    a.jump(JmpOp.JLT, I.R1, I.R8, done, reg=True)
    a.emit(I.alu64(AluOp.SUB, I.R1, I.R8, reg=True))
    a.emit(I.stx(I.DW, I.R10, I.R1, L.KEY_OFF))
    a.emit(I.mov64(I.R1, I.R7), I.alu64(AluOp.ADD, I.R1, I.R8, reg=True))
    a.emit(I.mov64(I.R8, I.R1))  # absolute transport offset
    for size in (20, 8, 4):
        smaller = a.label(f"l4_{size}")
        a.emit(I.ldx(I.DW, I.R1, I.R10, L.KEY_OFF))
        a.jump(JmpOp.JLT, I.R1, size, smaller)
        fl.emit_load(a, I.R8, L.L4, size)
        a.jump(JmpOp.JNE, I.R0, 0, smaller)
        a.emit(I.st(I.B, L.R_PKT, L.L4AVAIL, size))
        a.goto(done)
        a.place(smaller)
    a.place(done)


def _copy_tcp_options(a: Assembler, fl: Flavour) -> None:
    """Copy the TCP options (for --tcp-option): 0xff in TCPOPTLEN marks unreadable options."""
    done = a.label("opts_done")
    a.emit(I.ldx(I.B, I.R1, L.R_PKT, L.L4PROTO))
    a.jump(JmpOp.JNE, I.R1, 6, done)
    a.emit(I.ldx(I.B, I.R1, L.R_PKT, L.L4AVAIL))
    a.jump(JmpOp.JLT, I.R1, 20, done)
    a.emit(I.ldx(I.B, I.R2, L.R_PKT, L.L4 + 12), I.alu32(AluOp.RSH, I.R2, 4, reg=False))
    a.emit(I.alu32(AluOp.LSH, I.R2, 2, reg=False))
    a.jump(JmpOp.JLE, I.R2, 20, done)
    a.jump(JmpOp.JGT, I.R2, 60, done)
    a.emit(I.alu64(AluOp.SUB, I.R2, 20, reg=False))
    a.emit(I.stx(I.B, L.R_PKT, I.R2, L.TCPOPTLEN))
    a.emit(I.ldx(I.W, I.R8, L.R_PKT, L.L4OFF), I.ldx(I.W, I.R1, L.R_PKT, L.L3OFF))
    a.emit(I.alu64(AluOp.ADD, I.R8, I.R1, reg=True), I.alu64(AluOp.ADD, I.R8, 20, reg=False))
    a.emit(I.ldx(I.B, I.R7, L.R_PKT, L.TCPOPTLEN))
    a.emit(I.alu64(AluOp.AND, I.R7, 0x3F, reg=False))  # bounds for the verifier: 1..40
    a.jump(JmpOp.JEQ, I.R7, 0, done)
    a.jump(JmpOp.JGT, I.R7, 40, done)
    fl.emit_load(a, I.R8, L.TCPOPTS, None, len_reg=I.R7)
    a.jump(JmpOp.JEQ, I.R0, 0, done)
    a.emit(I.st(I.B, L.R_PKT, L.TCPOPTLEN, 0xFF))
    a.place(done)
