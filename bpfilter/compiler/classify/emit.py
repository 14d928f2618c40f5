"""Code for a classified segment: probe the groups, then act on the first rule found.

    r8  the best value so far (see plan.py: order << 32 | hotdrop << 31 | id), all ones when
        none
    r7  once found: the rule's action word (action code | chain << 8, counter slot << 32)
Keys are built in the packet struct's key buffer (r9 + KEYBUF), so user-chain subprograms use
the same space as the main program.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass

from ...bpf import insn as I
from ...bpf.asm import Assembler
from ...bpf.consts import Helper, MapType
from ...bpf.insn import AluOp, JmpOp
from ...bpf.maps import MapSpec
from ...ir.model import Family
from .. import layout as L
from .atoms import PacketClass
from .groups import Group, mem_bytes
from .plan import initial_value, spare

VALUE_SIZE = 8
_SIZES = {1: I.B, 2: I.H, 4: I.W}


@dataclass
class SegmentMaps:
    """The maps one segment needs, with their contents."""

    specs: dict[Hashable, MapSpec]
    data: dict[Hashable, list[tuple[bytes, bytes]]]


def group_maps(prefix: tuple, groups: list[Group], step: int) -> SegmentMaps:
    """Map specs and contents of a segment's groups, keyed `prefix + (i,)`; rule i has order
    (i + 1) * step and id i. Each map has room for more entries (see plan.spare)."""
    specs: dict[Hashable, MapSpec] = {}
    data: dict[Hashable, list[tuple[bytes, bytes]]] = {}
    cache: dict[int, bytes] = {}
    for i, g in enumerate(groups):
        key = (*prefix, i)
        entries = []
        for k, v in g.entries():
            b = cache.get(v)
            if b is None:
                b = cache[v] = initial_value(v, step).to_bytes(VALUE_SIZE, "little")
            entries.append((k, b))
        room = len(entries) + spare(len(entries))
        if g.lpm_field is not None:
            specs[key] = MapSpec(MapType.LPM_TRIE, 4 + g.key_size, VALUE_SIZE, room,
                                 name="bpfilter_lpm")
        else:
            specs[key] = MapSpec(MapType.HASH, g.key_size, VALUE_SIZE, room,
                                 name="bpfilter_cls")
        data[key] = entries
    return SegmentMaps(specs, data)


def emit_key(a: Assembler, g: Group, family: Family) -> int:
    """Build the lookup key of `g` at r9 + KEYBUF; returns the key's offset in the struct."""
    pos = L.KEYBUF
    start = pos
    if g.lpm_field is not None:
        a.emit(I.st(I.W, L.R_PKT, pos, g.fixed_bits + 8 * g.lpm_field.width))
        pos += 4
    fields = list(g.fields)
    for f, mask in fields:
        pos = _copy(a, L.field_offset(f, family), pos, mem_bytes(f, mask))
    a.emit(I.ldx(I.B, I.R1, L.R_PKT, L.PCLASS) if g.class_exact else I.mov64_imm(I.R1, 0))
    a.emit(I.stx(I.B, L.R_PKT, I.R1, pos))
    pos += 1
    if g.lpm_field is not None:
        f = g.lpm_field
        pos = _copy(a, L.field_offset(f, family), pos, b"\xff" * f.width)
    if pos - L.KEYBUF > L.KEYBUF_SIZE:
        raise ValueError(f"classifier key of {pos - L.KEYBUF} bytes exceeds the key buffer")
    return start


def _copy(a: Assembler, src: int, dst: int, mask: bytes) -> int:
    """Copy len(mask) bytes r9[src:] & mask to r9[dst:] in aligned-enough chunks."""
    n = len(mask)
    i = 0
    while i < n:
        size = 1
        for s in (4, 2):
            if n - i >= s and (src + i) % s == 0 and (dst + i) % s == 0:
                size = s
                break
        m = int.from_bytes(mask[i : i + size], "little")
        full = (1 << (8 * size)) - 1
        if m == 0:
            a.emit(I.st(_SIZES[size], L.R_PKT, dst + i, 0))
        else:
            a.emit(I.ldx(_SIZES[size], I.R1, L.R_PKT, src + i))
            if m != full:
                a.emit(I.alu32(AluOp.AND, I.R1, I.s32(m), reg=False))
            a.emit(I.stx(_SIZES[size], L.R_PKT, I.R1, dst + i))
        i += size
    return dst + n


def emit_probe(a: Assembler, groups: list[Group], map_key: Callable[[int], Hashable],
               ctl_key: Hashable, family: Family) -> None:
    """Leave the smallest value over all groups in r8 (all ones if no group has the packet).

    Before group i (i > 0) the probe stops when the best value so far is below word i of the
    control map: the smallest value group i or a later one holds (kept in a map, not in the
    code, so rules can be added in place)."""
    done = a.label("cls_done")
    a.emit(I.mov64_imm(I.R8, -1))
    for i, g in enumerate(groups):
        nxt = a.label("cls_next")
        if i:
            # No later group can hold an earlier rule than what was found.
            a.ld_map_value(I.R1, ctl_key, VALUE_SIZE * i)
            a.emit(I.ldx(I.DW, I.R1, I.R1, 0))
            a.jump(JmpOp.JLT, I.R8, I.R1, done, reg=True)
        if g.class_exact and PacketClass.FULL not in g.classes:
            # Only odd packets (fragments, cut headers) have entries here: most skip it.
            a.emit(I.ldx(I.B, I.R1, L.R_PKT, L.PCLASS))
            a.jump(JmpOp.JEQ, I.R1, PacketClass.FULL, nxt)
        off = emit_key(a, g, family)
        a.ld_map(I.R1, map_key(i))
        a.emit(I.mov64(I.R2, L.R_PKT), I.alu64(AluOp.ADD, I.R2, off, reg=False))
        a.emit(I.call_helper(Helper.map_lookup_elem))
        a.jump(JmpOp.JEQ, I.R0, 0, nxt)
        a.emit(I.ldx(I.DW, I.R1, I.R0, 0))
        a.jump(JmpOp.JGE, I.R1, I.R8, nxt, reg=True)
        a.emit(I.mov64(I.R8, I.R1))
        a.place(nxt)
    a.place(done)


