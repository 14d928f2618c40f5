"""Code for a set lookup (`SetLookup`): build the packet's member key, look it up, check flags.

The key is built in the packet struct's key buffer (r9 + KEYBUF) as `setmaps.layout` says. The
ports of a member come the way xt_set takes them (ip_set_get_ip4_port / ip_set_get_ip6_port):

- IPv4: protocol 0 has none; a fragment at a non-zero offset has none for TCP, SCTP, UDP,
  UDP-Lite and ICMP, and port 0 for other protocols.
- IPv6: none when the extension headers cannot be walked, for a non-first fragment, or when the
  chain ends in "no next header" (ipv6_skip_exthdr gives up on it).
- TCP, UDP, UDP-Lite, SCTP: the source or destination port, if the whole TCP (20 bytes), UDP
  (8) or SCTP (12) header is there; ICMP and ICMPv6 (in either family): type and code, if 8
  bytes are there; any other protocol: port 0.
- bitmap:port takes only TCP and UDP ports.

A packet without ports is not in the set (ip_set_test turns the error into "no match").
"""

from __future__ import annotations

from collections.abc import Hashable

from ..bpf import insn as I
from ..bpf.asm import Assembler, Label
from ..bpf.consts import Helper
from ..bpf.insn import AluOp, JmpOp
from ..bpf.maps import MapSpec
from ..ir.model import Family
from ..ir.pred import Pred, SetLookup
from ..ir.sets import Dim, SetDef
from . import layout as L
from .setmaps import NOMATCH, KeyPart, layout, map_spec, set_map_key

TCP, UDP, UDPLITE, SCTP, ICMP, ICMPV6, NONE = 6, 17, 136, 132, 1, 58, 59
NO_PORT_WHEN_FRAGMENT = (TCP, SCTP, UDP, UDPLITE, ICMP)  # IPv4: at a non-zero offset
_ADDR = {(Family.IPV4, True): L.L3 + 12, (Family.IPV4, False): L.L3 + 16,
         (Family.IPV6, True): L.L3 + 8, (Family.IPV6, False): L.L3 + 24}


def emit_set_lookup(a: Assembler, family: Family, p: SetLookup, fail: Label) -> None:
    """Fall through when the packet's member is in the set, else jump to `fail`."""
    d = p.definition
    lay = layout(d)
    base = L.KEYBUF + lay.data_offset
    if lay.key_size > L.KEYBUF_SIZE:
        raise ValueError(f"set {d.name}: key of {lay.key_size} bytes exceeds the key buffer")
    # Ports first: a packet without them skips building the rest.
    for kp, src in zip(lay.parts, p.src, strict=True):
        if kp.dim is Dim.PORT:
            _port(a, family, d, kp, base, src, fail)
    for off in range(0, lay.data_offset, 4):
        a.emit(I.st(I.W, L.R_PKT, L.KEYBUF + off, 8 * lay.data_size))  # the LPM prefix length
    for kp, src in zip(lay.parts, p.src, strict=True):
        if kp.dim is not Dim.PORT:
            _addr(a, family, d, kp, base, src)
    a.ld_map(I.R1, set_map_key(d))
    a.emit(I.mov64(I.R2, L.R_PKT), I.alu64(AluOp.ADD, I.R2, L.KEYBUF, reg=False))
    a.emit(I.call_helper(Helper.map_lookup_elem))
    a.jump(JmpOp.JEQ, I.R0, 0, fail)
    if d.type.has_net:
        a.emit(I.ldx(I.B, I.R1, I.R0, 0), I.alu32(AluOp.AND, I.R1, NOMATCH, reg=False))
        # --return-nomatch inverts which members count (ip_set_test).
        a.jump(JmpOp.JEQ if p.return_nomatch else JmpOp.JNE, I.R1, 0, fail)


def _addr(a: Assembler, family: Family, d: SetDef, kp: KeyPart, base: int, src: bool) -> None:
    """Copy the source or destination address into the key (masked to the set's netmask)."""
    n = kp.size
    mask = (((1 << (8 * n)) - 1) ^ ((1 << (8 * n - d.netmask)) - 1)).to_bytes(n, "big") \
        if d.netmask is not None and kp.dim is Dim.IP else None
    for i in range(0, n, 4):
        a.emit(I.ldx(I.W, I.R1, L.R_PKT, _ADDR[(family, src)] + i))
        if mask is not None:
            m = int.from_bytes(mask[i:i + 4], "little")
            if m != 0xFFFFFFFF:
                a.emit(I.alu32(AluOp.AND, I.R1, I.s32(m), reg=False))
        a.emit(I.stx(I.W, L.R_PKT, I.R1, base + kp.offset + i))


def _port(a: Assembler, family: Family, d: SetDef, kp: KeyPart, base: int, src: bool,
          fail: Label) -> None:
    """Store the packet's port (and protocol) in the key, or jump to `fail` if it has none."""
    store, zero = a.label("set_port"), a.label("set_port0")
    a.emit(I.ldx(I.B, I.R1, L.R_PKT, L.L4PROTO))
    a.emit(I.ldx(I.H, I.R2, L.R_PKT, L.FRAGOFF))
    if family is Family.IPV4:
        a.jump(JmpOp.JEQ, I.R1, 0, fail)
        first = a.label("set_first")
        a.jump(JmpOp.JEQ, I.R2, 0, first)
        if d.type.port_only:
            a.goto(fail)
        else:
            for proto in NO_PORT_WHEN_FRAGMENT:
                a.jump(JmpOp.JEQ, I.R1, proto, fail)
            a.goto(zero)
        a.place(first)
    else:
        a.jump(JmpOp.JNE, I.R2, 0, fail)
        a.emit(I.ldx(I.B, I.R2, L.R_PKT, L.V6ERR))
        a.jump(JmpOp.JNE, I.R2, 0, fail)
        a.jump(JmpOp.JEQ, I.R1, NONE, fail)
    port_at = L.L4 + (0 if src else 2)
    a.emit(I.ldx(I.B, I.R3, L.R_PKT, L.L4AVAIL))
    tcp, udp = a.label("set_tcp"), a.label("set_udp")
    a.jump(JmpOp.JEQ, I.R1, TCP, tcp)
    a.jump(JmpOp.JEQ, I.R1, UDP, udp)
    if d.type.port_only:
        a.goto(fail)
    else:
        sctp, icmp = a.label("set_sctp"), a.label("set_icmp")
        a.jump(JmpOp.JEQ, I.R1, UDPLITE, udp)
        a.jump(JmpOp.JEQ, I.R1, SCTP, sctp)
        a.jump(JmpOp.JEQ, I.R1, ICMP, icmp)
        a.jump(JmpOp.JEQ, I.R1, ICMPV6, icmp)
        a.goto(zero)
        a.place(sctp)
        # The parser copies 8 or 20 bytes: an SCTP header (12) needs the datagram's length.
        a.jump(JmpOp.JLT, I.R3, 8, fail)
        a.emit(I.ldx(I.H, I.R4, L.R_PKT, L.IPLEN), I.ldx(I.W, I.R5, L.R_PKT, L.L4OFF))
        a.emit(I.alu64(AluOp.ADD, I.R5, 12, reg=False))
        a.jump(JmpOp.JLT, I.R4, I.R5, fail, reg=True)
        a.emit(I.ldx(I.H, I.R2, L.R_PKT, port_at))
        a.goto(store)
        a.place(icmp)
        a.jump(JmpOp.JLT, I.R3, 8, fail)
        a.emit(I.ldx(I.H, I.R2, L.R_PKT, L.L4))  # type, code: the "port" in both directions
        a.goto(store)
    a.place(tcp)
    a.jump(JmpOp.JLT, I.R3, L.TCP_HDR, fail)
    a.emit(I.ldx(I.H, I.R2, L.R_PKT, port_at))
    a.goto(store)
    a.place(udp)
    a.jump(JmpOp.JLT, I.R3, 8, fail)
    a.emit(I.ldx(I.H, I.R2, L.R_PKT, port_at))
    a.goto(store)
    a.place(zero)
    a.emit(I.mov64_imm(I.R2, 0))
    a.place(store)
    a.emit(I.stx(I.H, L.R_PKT, I.R2, base + kp.offset))
    if not d.type.port_only:
        a.emit(I.stx(I.B, L.R_PKT, I.R1, base + kp.offset + 2),
               I.st(I.B, L.R_PKT, base + kp.offset + 3, 0))


def set_maps(pred: Pred) -> dict[Hashable, MapSpec]:
    """The maps of the sets `pred` looks up, by their key in a table's maps."""
    if isinstance(pred, SetLookup):
        return {set_map_key(pred.definition): map_spec(pred.definition)}
    out: dict[Hashable, MapSpec] = {}
    for sub in getattr(pred, "preds", ()):
        out.update(set_maps(sub))
    inner = getattr(pred, "pred", None)
    if inner is not None:
        out.update(set_maps(inner))
    return out
