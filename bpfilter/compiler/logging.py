"""LOG and NFLOG: one event per logged packet, sent to user space through a ring buffer.

Only packets that match a logging rule pay anything: the event is built in the key buffer and
handed to bpf_ringbuf_output. `bpfilter monitor` reads the events and names the rule from the
slot, so prefixes and levels stay in user space.

Event layout (88 bytes, little endian):
    0  u64 time (bpf_ktime_get_ns)      8  u32 counter slot of the rule
    12 u16 datagram length              14 u8 family (4/6)   15 u8 transport protocol
    16 source address (16 bytes)        32 destination address (16 bytes)
    48 u16 source port (network order)  50 u16 destination port (network order)
    52 u8 table index                   53 u8 fragment (1: a later fragment)
    56 input interface name (16)        72 output interface name (16)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..bpf import insn as I
from ..bpf.asm import Assembler
from ..bpf.consts import Helper, MapType
from ..bpf.insn import AluOp, JmpOp
from ..bpf.maps import MapSpec
from ..ir.model import Family
from ..ir.pred import Field
from . import layout as L

LOG_MAP = "log"
EVENT_SIZE = 88
RING_SIZE = 256 * 1024
TABLES = ("filter", "mangle", "raw", "security", "nat")
LOG_TARGETS = ("LOG", "NFLOG")


def log_map_spec() -> MapSpec:
    """The ring buffer every logging program of a family writes to."""
    return MapSpec(MapType.RINGBUF, 0, 0, RING_SIZE, name="bpfilter_log")


def emit_log(a: Assembler, slot: int, table: str, family: Family,
             static: dict[Field, bytes]) -> None:
    """Send this packet's event (clobbers r1-r5)."""
    ev = L.KEYBUF
    a.emit(I.call_helper(Helper.ktime_get_ns), I.stx(I.DW, L.R_PKT, I.R0, ev))
    a.emit(I.st(I.W, L.R_PKT, ev + 8, slot))
    a.emit(I.ldx(I.H, I.R1, L.R_PKT, L.IPLEN), I.stx(I.H, L.R_PKT, I.R1, ev + 12))
    a.emit(I.st(I.B, L.R_PKT, ev + 14, 4 if family is Family.IPV4 else 6))
    a.emit(I.ldx(I.B, I.R1, L.R_PKT, L.L4PROTO), I.stx(I.B, L.R_PKT, I.R1, ev + 15))
    width = family.addr_len
    src, dst = (L.L3 + 12, L.L3 + 16) if family is Family.IPV4 else (L.L3 + 8, L.L3 + 24)
    for from_, to in ((src, ev + 16), (dst, ev + 32)):
        for o in range(0, 16, 4):
            if o < width:
                a.emit(I.ldx(I.W, I.R1, L.R_PKT, from_ + o), I.stx(I.W, L.R_PKT, I.R1, to + o))
            else:
                a.emit(I.st(I.W, L.R_PKT, to + o, 0))
    a.emit(I.ldx(I.W, I.R1, L.R_PKT, L.L4), I.stx(I.W, L.R_PKT, I.R1, ev + 48))
    a.emit(I.st(I.B, L.R_PKT, ev + 52, TABLES.index(table)))
    a.emit(I.ldx(I.H, I.R1, L.R_PKT, L.FRAGOFF), I.mov64_imm(I.R2, 0))
    first = a.label("log_first")
    a.jump(JmpOp.JEQ, I.R1, 0, first)
    a.emit(I.mov64_imm(I.R2, 1))
    a.place(first)
    a.emit(I.stx(I.B, L.R_PKT, I.R2, ev + 53), I.st(I.H, L.R_PKT, ev + 54, 0))
    names = ((Field.IIFNAME, L.IIFNAME, ev + 56), (Field.OIFNAME, L.OIFNAME, ev + 72))
    for f, src_off, to in names:
        known = static.get(f)
        for o in range(0, 16, 4):
            if known is not None:
                a.emit(I.st(I.W, L.R_PKT, to + o, I.s32(int.from_bytes(known[o:o + 4], "little"))))
            else:
                a.emit(I.ldx(I.W, I.R1, L.R_PKT, src_off + o), I.stx(I.W, L.R_PKT, I.R1, to + o))
    a.ld_map(I.R1, LOG_MAP)
    a.emit(I.mov64(I.R2, L.R_PKT), I.alu64(AluOp.ADD, I.R2, ev, reg=False))
    a.emit(I.mov64_imm(I.R3, EVENT_SIZE), I.mov64_imm(I.R4, 0))
    a.emit(I.call_helper(Helper.ringbuf_output))


@dataclass(frozen=True)
class Event:
    """A decoded log event."""

    time_ns: int
    slot: int
    length: int
    family: int
    proto: int
    src: bytes
    dst: bytes
    sport: int
    dport: int
    table: str
    fragment: bool
    iif: str
    oif: str


def decode(raw: bytes) -> Event:
    """Decode one ring buffer record."""
    t, slot, length, fam, proto = struct.unpack_from("<QIHBB", raw, 0)
    src, dst = raw[16:32], raw[32:48]
    sport, dport = struct.unpack_from(">HH", raw, 48)
    table, frag = raw[52], raw[53]
    n = 4 if fam == 4 else 16
    return Event(t, slot, length, fam, proto, src[:n], dst[:n], sport, dport,
                 TABLES[table] if table < len(TABLES) else "?", bool(frag),
                 raw[56:72].split(b"\0", 1)[0].decode(errors="replace"),
                 raw[72:88].split(b"\0", 1)[0].decode(errors="replace"))


