"""A disassembler that prints programs in the notation of `bpftool prog dump xlated`.

The text of each instruction follows the kernel's print_bpf_insn(); `ld_imm64` of a map prints as
`map[id:N]` like bpftool once a map id (or name) is known. Annotations (origins and comments) are
interleaved as `; ...` lines, the way bpftool interleaves source lines.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from . import insn as I
from .consts import HELPER_NAMES
from .insn import AluOp, Atomic, Insn, JmpOp, Pseudo

_ALU = {
    AluOp.ADD: "+=", AluOp.SUB: "-=", AluOp.MUL: "*=", AluOp.DIV: "/=", AluOp.OR: "|=",
    AluOp.AND: "&=", AluOp.LSH: "<<=", AluOp.RSH: ">>=", AluOp.NEG: "neg", AluOp.MOD: "%=",
    AluOp.XOR: "^=", AluOp.MOV: "=", AluOp.ARSH: "s>>=", AluOp.END: "endian",
}
_ALU_SIGNED = {AluOp.DIV: "s/=", AluOp.MOD: "s%="}  # with off == 1
_MOVSX = {8: "(s8)", 16: "(s16)", 32: "(s32)"}  # MOV | X with off == bits
_ATOMIC_LOCK = {Atomic.ADD: "+=", Atomic.OR: "|=", Atomic.AND: "&=", Atomic.XOR: "^="}
_ATOMIC_FETCH = {Atomic.FETCH_ADD: "add", Atomic.FETCH_OR: "or", Atomic.FETCH_AND: "and",
                 Atomic.FETCH_XOR: "xor"}
_SIZE = {I.W: "u32", I.H: "u16", I.B: "u8", I.DW: "u64"}
_SIZE_SX = {I.W: "s32", I.H: "s16", I.B: "s8"}
_JMP = {
    JmpOp.JA: "jmp", JmpOp.JEQ: "==", JmpOp.JGT: ">", JmpOp.JGE: ">=", JmpOp.JSET: "&",
    JmpOp.JNE: "!=", JmpOp.JSGT: "s>", JmpOp.JSGE: "s>=", JmpOp.JLT: "<", JmpOp.JLE: "<=",
    JmpOp.JSLT: "s<", JmpOp.JSLE: "s<=",
}
_CLASS = ("ld", "ldx", "st", "stx", "alu", "jmp", "jmp32", "alu64")

# Names an ld_imm64 with a map pseudo source is printed with, given (insn, next insn).
MapNamer = Callable[[Insn, Insn], str]
# Name of a kfunc by BTF id.
KfuncNamer = Callable[[int], str | None]


def _default_map_name(first: Insn, second: Insn) -> str:
    # bpftool prints both numbers unsigned.
    map_id = first.imm & 0xFFFFFFFF
    if first.src == Pseudo.MAP_VALUE:
        return f"map[id:{map_id}][0]+{second.imm & 0xFFFFFFFF}"
    return f"map[id:{map_id}]"


def format_insn(
    insn: Insn,
    nxt: Insn | None = None,
    *,
    map_name: MapNamer = _default_map_name,
    kfunc_name: KfuncNamer | None = None,
) -> str:
    """One instruction (with its second slot for ld_imm64) as print_bpf_insn() writes it."""
    cls = insn.cls
    head = f"({insn.opcode:02x})"
    if cls in (I.ALU, I.ALU64):
        return f"{head} {_format_alu(insn)}"
    if cls == I.STX:
        mode, t = insn.opcode & 0xE0, _SIZE[insn.opcode & 0x18]
        if mode == I.MEM:
            return f"{head} *({t} *)(r{insn.dst} {insn.off:+d}) = r{insn.src}"
        if mode == I.ATOMIC:
            return _format_atomic(insn, head, t)
        return f"BUG_{insn.opcode:02x}"
    if cls == I.ST:
        if insn.opcode & 0xE0 == I.MEM:
            t = _SIZE[insn.opcode & 0x18]
            return f"{head} *({t} *)(r{insn.dst} {insn.off:+d}) = {insn.imm}"
        if insn.opcode & 0xE0 == I.NOSPEC:
            return f"{head} nospec"
        return f"BUG_st_{insn.opcode:02x}"
    if cls == I.LDX:
        mode, size = insn.opcode & 0xE0, insn.opcode & 0x18
        if mode == I.MEM:
            t = _SIZE[size]
        elif mode == I.MEMSX and size in _SIZE_SX:
            t = _SIZE_SX[size]
        else:
            return f"BUG_ldx_{insn.opcode:02x}"
        return f"{head} r{insn.dst} = *({t} *)(r{insn.src} {insn.off:+d})"
    if cls == I.LD:
        text = _format_ld(insn, nxt, map_name)
        return f"{head} {text}" if text else f"BUG_ld_{insn.opcode:02x}"
    return f"{head} {_format_jmp(insn, kfunc_name)}"


def _format_alu(insn: Insn) -> str:
    code, cls, op = insn.opcode, insn.cls, insn.opcode & 0xF0
    r = "w" if cls == I.ALU else "r"
    if op == AluOp.END:
        if cls == I.ALU64:
            return f"r{insn.dst} = bswap{insn.imm} r{insn.dst}"
        order = "be" if code & I.TO_BE else "le"
        return f"r{insn.dst} = {order}{insn.imm} r{insn.dst}"
    if op == AluOp.NEG:
        return f"{r}{insn.dst} = -{r}{insn.dst}"
    if code == I.ALU64 | AluOp.MOV | I.X and insn.off == I.ADDR_SPACE_CAST:
        imm = insn.imm & 0xFFFFFFFF
        return f"r{insn.dst} = addr_space_cast(r{insn.src}, {imm >> 16}, {imm & 0xFFFF})"
    if code == I.ALU64 | AluOp.MOV | I.X and insn.off == I.ADDR_PERCPU:
        return f"r{insn.dst} = &(void __percpu *)(r{insn.src})"
    sym = _ALU_SIGNED[op] if op in _ALU_SIGNED and insn.off == 1 else _ALU[op]
    if code & I.X:
        sx = _MOVSX.get(insn.off, "") if op == AluOp.MOV else ""
        return f"{r}{insn.dst} {sym} {sx}{r}{insn.src}"
    return f"{r}{insn.dst} {sym} {insn.imm}"


def _format_ld(insn: Insn, nxt: Insn | None, map_name: MapNamer) -> str | None:
    mode, size = insn.opcode & 0xE0, insn.opcode & 0x18
    if mode == I.ABS:
        return f"r0 = *({_SIZE[size]} *)skb[{insn.imm}]"
    if mode == I.IND:
        return f"r0 = *({_SIZE[size]} *)skb[r{insn.src} + {insn.imm}]"
    if mode != I.IMM or size != I.DW:
        return None
    second = nxt if nxt is not None else Insn(0)
    if insn.src in (Pseudo.MAP_FD, Pseudo.MAP_VALUE):
        text = map_name(insn, second)
    elif insn.src == Pseudo.FUNC:
        text = f"subprog[{insn.imm:+d}]"
    else:
        value = ((second.imm & 0xFFFFFFFF) << 32) | (insn.imm & 0xFFFFFFFF)
        text = f"0x{value:x}"
    return f"r{insn.dst} = {text}"


def _format_jmp(insn: Insn, kfunc_name: KfuncNamer | None) -> str:
    code, cls, op = insn.opcode, insn.cls, insn.opcode & 0xF0
    if op == JmpOp.CALL:
        if insn.src == Pseudo.CALL:
            return f"call pc{insn.imm:+d}"
        if insn.src == Pseudo.KFUNC_CALL:
            name = (kfunc_name(insn.imm) if kfunc_name else None) or "kernel-function"
            return f"call {name}#{insn.imm}"
        # The kernel names ids it knows bpf_<name> (0 is bpf_unspec), anything else "unknown".
        known = 0 <= insn.imm < len(HELPER_NAMES)
        return f"call {'bpf_' + HELPER_NAMES[insn.imm] if known else 'unknown'}#{insn.imm}"
    if code == I.JMP | JmpOp.JA:
        return f"goto pc{insn.off:+d}"
    if code == I.JMP | JmpOp.JCOND and insn.src == Pseudo.MAY_GOTO:
        return f"may_goto pc{insn.off:+d}"
    if code == I.JMP32 | JmpOp.JA:
        return f"gotol pc{insn.imm:+d}"
    if code == I.JMP | JmpOp.EXIT:
        return "exit"
    if op not in _JMP:
        return _CLASS[cls]
    r = "w" if cls == I.JMP32 else "r"
    if code & I.X:
        return f"if {r}{insn.dst} {_JMP[op]} {r}{insn.src} goto pc{insn.off:+d}"
    return f"if {r}{insn.dst} {_JMP[op]} 0x{insn.imm & 0xFFFFFFFF:x} goto pc{insn.off:+d}"


def _format_atomic(insn: Insn, head: str, t: str) -> str:
    imm, dst, src, off = insn.imm, insn.dst, insn.src, insn.off
    bits = "64" if insn.opcode & 0x18 == I.DW else ""
    if imm in _ATOMIC_LOCK:
        return f"{head} lock *({t} *)(r{dst} {off:+d}) {_ATOMIC_LOCK[imm]} r{src}"
    if imm in _ATOMIC_FETCH:
        name = _ATOMIC_FETCH[imm]
        return f"{head} r{src} = atomic{bits}_fetch_{name}(({t} *)(r{dst} {off:+d}), r{src})"
    if imm == Atomic.CMPXCHG:
        return f"{head} r0 = atomic{bits}_cmpxchg(({t} *)(r{dst} {off:+d}), r0, r{src})"
    if imm == Atomic.XCHG:
        return f"{head} r{src} = atomic{bits}_xchg(({t} *)(r{dst} {off:+d}), r{src})"
    if imm == Atomic.LOAD_ACQ:
        return f"{head} r{dst} = load_acquire(({t} *)(r{src} {off:+d}))"
    if imm == Atomic.STORE_REL:
        return f"{head} store_release(({t} *)(r{dst} {off:+d}), r{src})"
    return f"BUG_{insn.opcode:02x}"


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
