"""A disassembler that prints programs in the notation of `bpftool prog dump xlated`.

The text of each instruction follows the kernel's print_bpf_insn(); `ld_imm64` of a map prints as
`map[id:N]` like bpftool once a map id (or name) is known. Annotations (origins and comments) are
interleaved as `; ...` lines, the way bpftool interleaves source lines.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from . import insn as I
from .consts import helper_name
from .insn import Insn, Pseudo

_ALU = {
    0x00: "+=", 0x10: "-=", 0x20: "*=", 0x30: "/=", 0x40: "|=", 0x50: "&=", 0x60: "<<=",
    0x70: ">>=", 0x80: "neg", 0x90: "%=", 0xA0: "^=", 0xB0: "=", 0xC0: "s>>=", 0xD0: "endian",
}
_ALU_SIGNED = {0x30: "s/=", 0x90: "s%="}
_MOVSX = {8: "(s8)", 16: "(s16)", 32: "(s32)"}
_ATOMIC_ALU = {0x00: "add", 0x40: "or", 0x50: "and", 0xA0: "xor"}
_SIZE = {I.W: "u32", I.H: "u16", I.B: "u8", I.DW: "u64"}
_SIZE_SX = {I.W: "s32", I.H: "s16", I.B: "s8"}
_JMP = {
    0x00: "jmp", 0x10: "==", 0x20: ">", 0x30: ">=", 0x40: "&", 0x50: "!=", 0x60: "s>",
    0x70: "s>=", 0xA0: "<", 0xB0: "<=", 0xC0: "s<", 0xD0: "s<=",
}

# Names an ld_imm64 with a map pseudo source is printed with, given (insn, next insn).
MapNamer = Callable[[Insn, Insn], str]
# Name of a kfunc by BTF id.
KfuncNamer = Callable[[int], str | None]


def _default_map_name(first: Insn, second: Insn) -> str:
    if first.src == Pseudo.MAP_VALUE:
        return f"map[id:{first.imm}][0]+{second.imm}"
    return f"map[id:{first.imm}]"


def format_insn(
    insn: Insn,
    nxt: Insn | None = None,
    *,
    map_name: MapNamer = _default_map_name,
    kfunc_name: KfuncNamer | None = None,
) -> str:
    """One instruction (with its second slot for ld_imm64) as print_bpf_insn() writes it."""
    code = insn.opcode
    cls, op = code & 0x07, code & 0xF0
    head = f"({code:02x})"
    if cls in (I.ALU, I.ALU64):
        r = "w" if cls == I.ALU else "r"
        if op == 0xD0:
            if cls == I.ALU64:
                return f"{head} r{insn.dst} = bswap{insn.imm} r{insn.dst}"
            order = "be" if code & I.TO_BE else "le"
            return f"{head} r{insn.dst} = {order}{insn.imm} r{insn.dst}"
        if op == 0x80:
            return f"{head} {r}{insn.dst} = -{r}{insn.dst}"
        sym = _ALU_SIGNED[op] if op in _ALU_SIGNED and insn.off == 1 else _ALU[op]
        if code & I.X:
            sx = _MOVSX.get(insn.off, "") if op == 0xB0 else ""
            return f"{head} {r}{insn.dst} {sym} {sx}{r}{insn.src}"
        return f"{head} {r}{insn.dst} {sym} {_s32(insn.imm)}"
    if cls == I.STX:
        mode, size = code & 0xE0, code & 0x18
        t = _SIZE[size]
        if mode == I.MEM:
            return f"{head} *({t} *)(r{insn.dst} {insn.off:+d}) = r{insn.src}"
        if mode == I.ATOMIC:
            return _format_atomic(insn, head, t)
        return f"BUG_{code:02x}"
    if cls == I.ST:
        if code & 0xE0 == I.MEM:
            return f"{head} *({_SIZE[code & 0x18]} *)(r{insn.dst} {insn.off:+d}) = {_s32(insn.imm)}"
        return f"BUG_st_{code:02x}"
    if cls == I.LDX:
        mode, size = code & 0xE0, code & 0x18
        if mode == I.MEM:
            t = _SIZE[size]
        elif mode == I.MEMSX and size in _SIZE_SX:
            t = _SIZE_SX[size]
        else:
            return f"BUG_ldx_{code:02x}"
        return f"{head} r{insn.dst} = *({t} *)(r{insn.src} {insn.off:+d})"
    if cls == I.LD:
        mode, size = code & 0xE0, code & 0x18
        if mode == I.ABS:
            return f"{head} r0 = *({_SIZE[size]} *)skb[{_s32(insn.imm)}]"
        if mode == I.IND:
            return f"{head} r0 = *({_SIZE[size]} *)skb[r{insn.src} + {_s32(insn.imm)}]"
        if mode == I.IMM and size == I.DW:
            second = nxt if nxt is not None else Insn(0)
            if insn.src in (Pseudo.MAP_FD, Pseudo.MAP_VALUE):
                text = map_name(insn, second)
            elif insn.src == Pseudo.FUNC:
                text = f"subprog[{_s32(insn.imm):+d}]"
            else:
                value = ((second.imm & 0xFFFFFFFF) << 32) | (insn.imm & 0xFFFFFFFF)
                text = f"0x{value:x}"
            return f"{head} r{insn.dst} = {text}"
        return f"BUG_ld_{code:02x}"
    # JMP / JMP32
    r = "w" if cls == I.JMP32 else "r"
    if op == 0x80:
        if insn.src == Pseudo.CALL:
            return f"{head} call pc{_s32(insn.imm):+d}"
        if insn.src == Pseudo.KFUNC_CALL:
            name = (kfunc_name(insn.imm) if kfunc_name else None) or "kernel-function"
            return f"{head} call {name}#{_s32(insn.imm)}"
        return f"{head} call bpf_{helper_name(insn.imm)}#{_s32(insn.imm)}"
    if code == I.JMP | 0x00:
        return f"{head} goto pc{insn.off:+d}"
    if code == I.JMP | 0xE0 and insn.src == Pseudo.MAY_GOTO:
        return f"{head} may_goto pc{insn.off:+d}"
    if code == I.JMP32 | 0x00:
        return f"{head} gotol pc{_s32(insn.imm):+d}"
    if code == I.JMP | 0x90:
        return f"{head} exit"
    if op not in _JMP:
        return f"{head} {('ld', 'ldx', 'st', 'stx', 'alu', 'jmp', 'jmp32', 'alu64')[cls]}"
    if code & I.X:
        return f"{head} if {r}{insn.dst} {_JMP[op]} {r}{insn.src} goto pc{insn.off:+d}"
    return f"{head} if {r}{insn.dst} {_JMP[op]} 0x{insn.imm & 0xFFFFFFFF:x} goto pc{insn.off:+d}"


def _format_atomic(insn: Insn, head: str, t: str) -> str:
    imm = insn.imm
    bits = "64" if insn.opcode & 0x18 == I.DW else ""
    if imm in _ATOMIC_ALU:
        return f"{head} lock *({t} *)(r{insn.dst} {insn.off:+d}) {_ALU[imm]} r{insn.src}"
    if imm & ~0x01 in _ATOMIC_ALU and imm & 0x01:
        name = _ATOMIC_ALU[imm & ~0x01]
        return (f"{head} r{insn.src} = atomic{bits}_fetch_{name}(({t} *)(r{insn.dst} "
                f"{insn.off:+d}), r{insn.src})")
    if imm == I.Atomic.CMPXCHG:
        return (f"{head} r0 = atomic{bits}_cmpxchg(({t} *)(r{insn.dst} {insn.off:+d}), r0, "
                f"r{insn.src})")
    if imm == I.Atomic.XCHG:
        return (f"{head} r{insn.src} = atomic{bits}_xchg(({t} *)(r{insn.dst} {insn.off:+d}), "
                f"r{insn.src})")
    if imm == I.Atomic.LOAD_ACQ:
        return f"{head} r{insn.dst} = load_acquire(({t} *)(r{insn.src} {insn.off:+d}))"
    if imm == I.Atomic.STORE_REL:
        return f"{head} store_release(({t} *)(r{insn.dst} {insn.off:+d}), r{insn.src})"
    return f"BUG_{insn.opcode:02x}"


def _s32(v: int) -> int:
    return v - (1 << 32) if v >= 1 << 31 else v


def disassemble(
    insns: list[Insn],
    *,
    comments: Mapping[int, list[str]] | None = None,
    map_name: MapNamer = _default_map_name,
    kfunc_name: KfuncNamer | None = None,
) -> str:
    """The whole program, one `%4d: text` line per instruction, comments as `; ...` lines."""
    lines: list[str] = []
    i = 0
    while i < len(insns):
        for note in (comments or {}).get(i, []):
            lines.append(f"; {note}")
        nxt = insns[i + 1] if i + 1 < len(insns) else None
        text = format_insn(insns[i], nxt, map_name=map_name, kfunc_name=kfunc_name)
        lines.append(f"{i:4d}: {text}")
        i += 2 if insns[i].is_ld_imm64 else 1
    return "\n".join(lines) + "\n"
