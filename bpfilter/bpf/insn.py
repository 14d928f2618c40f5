"""The eBPF instruction set: one immutable record, one pack function, constructors.

Encoding of one slot (8 bytes, little endian on x86_64)::

      7       6       5       4       3       2       1       0   bits of byte 0
    +---------------+-------+-----------+
    |   op (4)      | s (1) | class (3) |   opcode for ALU/JMP: op | source | class
    +---------------+-------+-----------+
    |  mode (3) | size (2) | class (3) |     opcode for LD/LDX/ST/STX
    +-----------+----------+-----------+

    byte 0: opcode   byte 1: src_reg << 4 | dst_reg   bytes 2-3: off (s16)   bytes 4-7: imm (s32)

`ld_imm64` takes two slots; the second carries only the upper 32 bits of the constant in `imm`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

# Instruction classes.
LD, LDX, ST, STX, ALU, JMP, JMP32, ALU64 = range(8)

# Sizes (LD/LDX/ST/STX).
W, H, B, DW = 0x00, 0x08, 0x10, 0x18
SIZE_BYTES = {W: 4, H: 2, B: 1, DW: 8}
BYTES_SIZE = {v: k for k, v in SIZE_BYTES.items()}

# Modes (LD/LDX/ST/STX).
IMM, ABS, IND, MEM, MEMSX, ATOMIC = 0x00, 0x20, 0x40, 0x60, 0x80, 0xC0
NOSPEC = 0xC0  # ST-class mode of the speculation barrier the verifier inserts (not UAPI)

# Source operand (ALU/JMP).
K, X = 0x00, 0x08


class AluOp(IntEnum):
    """ALU operations (bits 4-7 of the opcode)."""

    ADD = 0x00
    SUB = 0x10
    MUL = 0x20
    DIV = 0x30
    OR = 0x40
    AND = 0x50
    LSH = 0x60
    RSH = 0x70
    NEG = 0x80
    MOD = 0x90
    XOR = 0xA0
    MOV = 0xB0
    ARSH = 0xC0
    END = 0xD0


class JmpOp(IntEnum):
    """Jump operations (bits 4-7 of the opcode)."""

    JA = 0x00
    JEQ = 0x10
    JGT = 0x20
    JGE = 0x30
    JSET = 0x40
    JNE = 0x50
    JSGT = 0x60
    JSGE = 0x70
    CALL = 0x80
    EXIT = 0x90
    JLT = 0xA0
    JLE = 0xB0
    JSLT = 0xC0
    JSLE = 0xD0
    JCOND = 0xE0


# Conditions usable in conditional jumps, with the inverse of each (used to branch on failure).
INVERSE = {
    JmpOp.JEQ: JmpOp.JNE, JmpOp.JNE: JmpOp.JEQ,
    JmpOp.JGT: JmpOp.JLE, JmpOp.JLE: JmpOp.JGT,
    JmpOp.JGE: JmpOp.JLT, JmpOp.JLT: JmpOp.JGE,
    JmpOp.JSGT: JmpOp.JSLE, JmpOp.JSLE: JmpOp.JSGT,
    JmpOp.JSGE: JmpOp.JSLT, JmpOp.JSLT: JmpOp.JSGE,
}

# `off` values that give ALU64 | MOV | X another meaning than a plain (or sign-extending) move.
ADDR_SPACE_CAST = 1  # arena pointer cast; imm = dst_as << 16 | src_as
ADDR_PERCPU = -1  # verifier-internal: dst = src + this CPU's per-CPU offset

# Byte-order conversion (ALU | END) source bit.
TO_LE, TO_BE = 0x00, 0x08


class Atomic(IntEnum):
    """`imm` values of STX | ATOMIC instructions."""

    ADD = 0x00
    OR = 0x40
    AND = 0x50
    XOR = 0xA0
    FETCH_ADD = 0x01
    FETCH_OR = 0x41
    FETCH_AND = 0x51
    FETCH_XOR = 0xA1
    XCHG = 0xE1
    CMPXCHG = 0xF1
    LOAD_ACQ = 0x100
    STORE_REL = 0x110


class Pseudo(IntEnum):
    """`src_reg` values that give `ld_imm64` and `call` a special meaning."""

    NONE = 0
    MAP_FD = 1  # ld_imm64: imm is a map fd
    MAP_VALUE = 2  # ld_imm64: imm is a map fd, second imm an offset into value 0
    BTF_ID = 3  # ld_imm64: a kernel variable by BTF id
    FUNC = 4  # ld_imm64: address of a subprogram
    MAP_IDX = 5
    MAP_IDX_VALUE = 6
    CALL = 1  # call: bpf-to-bpf, imm is the relative offset
    KFUNC_CALL = 2  # call: kfunc, imm is its BTF id
    MAY_GOTO = 0  # JCOND: may_goto


# Registers. r10 is the read-only frame pointer; r1-r5 are clobbered by calls.
R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, R10 = range(11)
FP = R10


class EncodeError(ValueError):
    """An operand does not fit the instruction's field."""


def _check(name: str, value: int, lo: int, hi: int, what: str) -> int:
    if not lo <= value <= hi:
        raise EncodeError(f"{what}: {name} {value} out of range [{lo}, {hi}]")
    return value


@dataclass(frozen=True, slots=True)
class Insn:
    """One 8-byte instruction slot, with exactly the kernel's fields."""

    opcode: int
    dst: int = 0
    src: int = 0
    off: int = 0
    imm: int = 0

    def __post_init__(self) -> None:
        what = f"insn opcode 0x{self.opcode:02x}"
        _check("opcode", self.opcode, 0, 0xFF, what)
        _check("dst", self.dst, 0, 15, what)
        _check("src", self.src, 0, 15, what)
        _check("off", self.off, -(1 << 15), (1 << 15) - 1, what)
        _check("imm", self.imm, -(1 << 31), (1 << 32) - 1, what)
        # Fields hold plain ints (not enum members), imm as the kernel's s32: equal encodings
        # then compare and print equal.
        for name in ("opcode", "dst", "src", "off"):
            if type(getattr(self, name)) is not int:
                object.__setattr__(self, name, int(getattr(self, name)))
        imm = int(self.imm)
        if imm >= 1 << 31:
            imm -= 1 << 32
        if type(self.imm) is not int or imm != self.imm:
            object.__setattr__(self, "imm", imm)

    @property
    def cls(self) -> int:
        """The instruction class (LD ... ALU64)."""
        return self.opcode & 0x07

    def pack(self) -> bytes:
        """Encode this slot as the kernel's `struct bpf_insn`."""
        return struct.pack("<BBhi", self.opcode, (self.src << 4) | self.dst, self.off, self.imm)

    @classmethod
    def unpack(cls, raw: bytes) -> Insn:
        """Decode one 8-byte slot."""
        opcode, regs, off, imm = struct.unpack("<BBhi", raw)
        return cls(opcode, regs & 0x0F, regs >> 4, off, imm)

    @property
    def is_ld_imm64(self) -> bool:
        """True for the first slot of a two-slot `ld_imm64`."""
        return self.opcode == LD | IMM | DW


def pack(insns: list[Insn]) -> bytes:
    """Encode a program."""
    return b"".join(i.pack() for i in insns)


def unpack(raw: bytes) -> list[Insn]:
    """Decode a program."""
    if len(raw) % 8:
        raise EncodeError(f"program length {len(raw)} is not a multiple of 8")
    return [Insn.unpack(raw[i : i + 8]) for i in range(0, len(raw), 8)]


# ---------------------------------------------------------------------------------------------
# Constructors. They return lists only where an instruction takes two slots (ld_imm64).


def _simm(value: int, what: str) -> int:
    """An imm the kernel sign-extends to 64 bits: 0xffffffff would silently mean -1."""
    return _check("imm", value, -(1 << 31), (1 << 31) - 1, f"{what} (imm is sign-extended)")


def alu64(op: AluOp, dst: int, src_or_imm: int, *, reg: bool, off: int = 0) -> Insn:
    """64-bit ALU; `reg` selects a register source over an immediate (an s32)."""
    if reg:
        return Insn(ALU64 | op | X, dst, src_or_imm, off, 0)
    return Insn(ALU64 | op | K, dst, 0, off, _simm(src_or_imm, f"alu64 {op.name}"))


def alu32(op: AluOp, dst: int, src_or_imm: int, *, reg: bool, off: int = 0) -> Insn:
    """32-bit ALU (upper half of dst zeroed)."""
    if reg:
        return Insn(ALU | op | X, dst, src_or_imm, off, 0)
    return Insn(ALU | op | K, dst, 0, off, src_or_imm)


def mov64(dst: int, src: int) -> Insn:
    """dst = src (registers)."""
    return alu64(AluOp.MOV, dst, src, reg=True)


def mov64_imm(dst: int, imm: int) -> Insn:
    """dst = imm, sign-extended to 64 bits."""
    return alu64(AluOp.MOV, dst, imm, reg=False)


def mov32(dst: int, src: int) -> Insn:
    """wdst = wsrc (zero-extends)."""
    return alu32(AluOp.MOV, dst, src, reg=True)


def mov32_imm(dst: int, imm: int) -> Insn:
    """wdst = imm (zero-extends)."""
    return alu32(AluOp.MOV, dst, imm, reg=False)


def movsx64(dst: int, src: int, bits: int) -> Insn:
    """dst = (s8|s16|s32) src, sign-extended to 64 bits (cpu v4)."""
    if bits not in (8, 16, 32):
        raise EncodeError(f"movsx: width {bits} is not 8, 16 or 32")
    return alu64(AluOp.MOV, dst, src, reg=True, off=bits)


def movsx32(dst: int, src: int, bits: int) -> Insn:
    """wdst = (s8|s16) wsrc (cpu v4)."""
    if bits not in (8, 16):
        raise EncodeError(f"movsx32: width {bits} is not 8 or 16")
    return alu32(AluOp.MOV, dst, src, reg=True, off=bits)


def sdiv64(dst: int, src_or_imm: int, *, reg: bool) -> Insn:
    """Signed 64-bit division (cpu v4)."""
    return alu64(AluOp.DIV, dst, src_or_imm, reg=reg, off=1)


def smod64(dst: int, src_or_imm: int, *, reg: bool) -> Insn:
    """Signed 64-bit modulo (cpu v4)."""
    return alu64(AluOp.MOD, dst, src_or_imm, reg=reg, off=1)


def neg64(dst: int) -> Insn:
    """dst = -dst."""
    return Insn(ALU64 | AluOp.NEG, dst)


def endian(dst: int, bits: int, *, big: bool) -> Insn:
    """Convert dst from host order to big (`big`) or little endian, truncating to `bits`."""
    if bits not in (16, 32, 64):
        raise EncodeError(f"endian: width {bits} is not 16, 32 or 64")
    return Insn(ALU | AluOp.END | (TO_BE if big else TO_LE), dst, 0, 0, bits)


def bswap(dst: int, bits: int) -> Insn:
    """Unconditional byte swap (cpu v4)."""
    if bits not in (16, 32, 64):
        raise EncodeError(f"bswap: width {bits} is not 16, 32 or 64")
    return Insn(ALU64 | AluOp.END, dst, 0, 0, bits)


def ldx(size: int, dst: int, src: int, off: int) -> Insn:
    """dst = *(size *)(src + off)."""
    return Insn(LDX | MEM | size, dst, src, off, 0)


def ldxsx(size: int, dst: int, src: int, off: int) -> Insn:
    """dst = *(s8|s16|s32 *)(src + off), sign-extended (cpu v4)."""
    if size == DW:
        raise EncodeError("ldxsx: no sign-extending load of 64 bits")
    return Insn(LDX | MEMSX | size, dst, src, off, 0)


def stx(size: int, dst: int, src: int, off: int) -> Insn:
    """*(size *)(dst + off) = src."""
    return Insn(STX | MEM | size, dst, src, off, 0)


def st(size: int, dst: int, off: int, imm: int) -> Insn:
    """*(size *)(dst + off) = imm (sign-extended for DW)."""
    if size == DW:
        _simm(imm, "st DW")
    return Insn(ST | MEM | size, dst, 0, off, imm)


def atomic(size: int, op: Atomic, dst: int, src: int, off: int) -> Insn:
    """Atomic read-modify-write on *(size *)(dst + off) with src."""
    if size not in (W, DW) and op not in (Atomic.LOAD_ACQ, Atomic.STORE_REL):
        raise EncodeError(f"atomic {op.name}: only 32- and 64-bit operands")
    return Insn(STX | ATOMIC | size, dst, src, off, op)


def load_acquire(size: int, dst: int, src: int, off: int) -> Insn:
    """dst = *(size *)(src + off) with acquire ordering (cpu v4; note dst/src roles)."""
    return Insn(STX | ATOMIC | size, dst, src, off, Atomic.LOAD_ACQ)


def store_release(size: int, dst: int, src: int, off: int) -> Insn:
    """*(size *)(dst + off) = src with release ordering (cpu v4)."""
    return Insn(STX | ATOMIC | size, dst, src, off, Atomic.STORE_REL)


def ld_abs(size: int, imm: int) -> Insn:
    """Legacy r0 = *(size *)skb[imm] (socket filters)."""
    return Insn(LD | ABS | size, 0, 0, 0, imm)


def ld_ind(size: int, src: int, imm: int) -> Insn:
    """Legacy r0 = *(size *)skb[src + imm]."""
    return Insn(LD | IND | size, 0, src, 0, imm)


def ld_imm64(dst: int, value: int, pseudo: Pseudo = Pseudo.NONE) -> list[Insn]:
    """dst = 64-bit constant (two slots); `value` may be given signed or unsigned."""
    _check("value", value, -(1 << 63), (1 << 64) - 1, "ld_imm64")
    value &= (1 << 64) - 1
    lo, hi = value & 0xFFFFFFFF, value >> 32
    return [Insn(LD | IMM | DW, dst, pseudo, 0, lo), Insn(0, 0, 0, 0, hi)]


def ld_map_fd(dst: int, fd: int) -> list[Insn]:
    """dst = pointer to the map behind `fd` (resolved by the kernel at load)."""
    return [Insn(LD | IMM | DW, dst, Pseudo.MAP_FD, 0, fd), Insn(0)]


def ld_map_value(dst: int, fd: int, offset: int) -> list[Insn]:
    """dst = address of byte `offset` of element 0 of the array map behind `fd`."""
    return [Insn(LD | IMM | DW, dst, Pseudo.MAP_VALUE, 0, fd), Insn(0, 0, 0, 0, offset)]


def jmp(op: JmpOp, dst: int, src_or_imm: int, off: int, *, reg: bool) -> Insn:
    """if dst <op> src goto +off (64-bit compare; an immediate is an s32, sign-extended)."""
    if reg:
        return Insn(JMP | op | X, dst, src_or_imm, off, 0)
    return Insn(JMP | op | K, dst, 0, off, _simm(src_or_imm, f"jmp {op.name}"))


def jmp32(op: JmpOp, dst: int, src_or_imm: int, off: int, *, reg: bool) -> Insn:
    """if wdst <op> wsrc goto +off (32-bit compare)."""
    if reg:
        return Insn(JMP32 | op | X, dst, src_or_imm, off, 0)
    return Insn(JMP32 | op | K, dst, 0, off, src_or_imm)


def ja(off: int) -> Insn:
    """goto +off."""
    return Insn(JMP | JmpOp.JA, off=off)


def gotol(off: int) -> Insn:
    """goto +off with a 32-bit range (cpu v4)."""
    _check("off", off, -(1 << 31), (1 << 31) - 1, "gotol")
    return Insn(JMP32 | JmpOp.JA, imm=off)


def may_goto(off: int) -> Insn:
    """Bounded-loop escape: jumps to +off once the kernel's loop budget is spent."""
    return Insn(JMP | JmpOp.JCOND, src=Pseudo.MAY_GOTO, off=off)


def call_helper(helper_id: int) -> Insn:
    """Call a helper function by number."""
    return Insn(JMP | JmpOp.CALL, imm=helper_id)


def call_local(rel: int) -> Insn:
    """bpf-to-bpf call to the instruction at pc + 1 + rel."""
    _check("rel", rel, -(1 << 31), (1 << 31) - 1, "call")
    return Insn(JMP | JmpOp.CALL, src=Pseudo.CALL, imm=rel)


def call_kfunc(btf_id: int, btf_fd_index: int = 0) -> Insn:
    """Call a kernel function by its BTF id (index 0: vmlinux)."""
    return Insn(JMP | JmpOp.CALL, src=Pseudo.KFUNC_CALL, off=btf_fd_index, imm=btf_id)


def exit_() -> Insn:
    """return r0."""
    return Insn(JMP | JmpOp.EXIT)


def is_jump(insn: Insn) -> bool:
    """True for instructions whose `off` (or `imm` for gotol) is a branch distance."""
    if insn.cls not in (JMP, JMP32):
        return False
    op = insn.opcode & 0xF0
    return op not in (JmpOp.CALL, JmpOp.EXIT)


def s32(v: int) -> int:
    """`v` as the signed 32-bit immediate that encodes it (two's complement above 2**31)."""
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v
