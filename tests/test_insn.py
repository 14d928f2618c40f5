"""The instruction set: exact encodings, range checks, pack/unpack, and (with root) the kernel's
own execution of every ALU and jump form, memory access, atomic and cpu-v4 instruction.

Expected bytes are written by hand from the documented layout (Documentation/bpf/standardization/
instruction-set.rst): byte 0 opcode, byte 1 src_reg << 4 | dst_reg, bytes 2-3 off (s16 LE),
bytes 4-7 imm (s32 LE).
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bpfilter.bpf import insn as I
from bpfilter.bpf.asm import Assembler
from bpfilter.bpf.consts import ProgType
from bpfilter.bpf.insn import (
    DW,
    FP,
    R0,
    R1,
    R2,
    R3,
    R4,
    R5,
    R6,
    R7,
    R9,
    R10,
    AluOp,
    Atomic,
    B,
    EncodeError,
    H,
    Insn,
    JmpOp,
    Pseudo,
    W,
)
from bpfilter.bpf.maps import Map, MapSpec, MapType, u32
from bpfilter.bpf.prog import Prog

U64 = (1 << 64) - 1
U32 = (1 << 32) - 1


def hx(x: Insn | list[Insn]) -> str:
    """Space-separated hex of one instruction or a two-slot list."""
    raw = I.pack(x) if isinstance(x, list) else x.pack()
    return raw.hex(" ")


# --- exact encodings ---------------------------------------------------------------------------

ENCODINGS = [
    # ALU64 / ALU32, immediate and register sources
    (I.mov64_imm(R0, 1), "b7 00 00 00 01 00 00 00"),
    (I.mov64(R6, R1), "bf 16 00 00 00 00 00 00"),
    (I.mov32_imm(R2, -1), "b4 02 00 00 ff ff ff ff"),
    (I.mov32(R3, R4), "bc 43 00 00 00 00 00 00"),
    (I.alu64(AluOp.ADD, R2, -4, reg=False), "07 02 00 00 fc ff ff ff"),
    (I.alu64(AluOp.SUB, R1, R2, reg=True), "1f 21 00 00 00 00 00 00"),
    (I.alu32(AluOp.MUL, R1, 3, reg=False), "24 01 00 00 03 00 00 00"),
    (I.alu32(AluOp.DIV, R1, R2, reg=True), "3c 21 00 00 00 00 00 00"),
    (I.alu64(AluOp.OR, R9, 0x100, reg=False), "47 09 00 00 00 01 00 00"),
    (I.alu32(AluOp.AND, R1, R9, reg=True), "5c 91 00 00 00 00 00 00"),
    (I.alu64(AluOp.LSH, R1, 32, reg=False), "67 01 00 00 20 00 00 00"),
    (I.alu64(AluOp.RSH, R1, R2, reg=True), "7f 21 00 00 00 00 00 00"),
    (I.neg64(R3), "87 03 00 00 00 00 00 00"),
    (I.alu32(AluOp.NEG, R3, 0, reg=False), "84 03 00 00 00 00 00 00"),
    (I.alu64(AluOp.MOD, R1, 10, reg=False), "97 01 00 00 0a 00 00 00"),
    (I.alu32(AluOp.XOR, R1, R1, reg=True), "ac 11 00 00 00 00 00 00"),
    (I.alu64(AluOp.ARSH, R1, 63, reg=False), "c7 01 00 00 3f 00 00 00"),
    (I.alu32(AluOp.ARSH, R1, R2, reg=True), "cc 21 00 00 00 00 00 00"),
    # signed division and modulo: off = 1 (cpu v4)
    (I.sdiv64(R1, R2, reg=True), "3f 21 01 00 00 00 00 00"),
    (I.smod64(R1, 3, reg=False), "97 01 01 00 03 00 00 00"),
    (I.alu32(AluOp.DIV, R1, -2, reg=False, off=1), "34 01 01 00 fe ff ff ff"),
    # sign-extending moves: off = source width (cpu v4)
    (I.movsx64(R1, R2, 8), "bf 21 08 00 00 00 00 00"),
    (I.movsx64(R1, R2, 16), "bf 21 10 00 00 00 00 00"),
    (I.movsx64(R1, R2, 32), "bf 21 20 00 00 00 00 00"),
    (I.movsx32(R1, R2, 8), "bc 21 08 00 00 00 00 00"),
    (I.movsx32(R1, R2, 16), "bc 21 10 00 00 00 00 00"),
    # byte order: ALU class with TO_LE/TO_BE, ALU64 class = unconditional bswap (cpu v4)
    (I.endian(R1, 16, big=True), "dc 01 00 00 10 00 00 00"),
    (I.endian(R1, 32, big=False), "d4 01 00 00 20 00 00 00"),
    (I.endian(R1, 64, big=True), "dc 01 00 00 40 00 00 00"),
    (I.bswap(R1, 64), "d7 01 00 00 40 00 00 00"),
    # loads and stores of every size
    (I.ldx(B, R0, R1, 14), "71 10 0e 00 00 00 00 00"),
    (I.ldx(H, R0, R1, -2), "69 10 fe ff 00 00 00 00"),
    (I.ldx(W, R0, R1, 0), "61 10 00 00 00 00 00 00"),
    (I.ldx(DW, R0, R10, -8), "79 a0 f8 ff 00 00 00 00"),
    (I.ldxsx(B, R0, R1, 1), "91 10 01 00 00 00 00 00"),
    (I.ldxsx(H, R0, R1, 2), "89 10 02 00 00 00 00 00"),
    (I.ldxsx(W, R0, R1, 4), "81 10 04 00 00 00 00 00"),
    (I.stx(B, R10, R1, -1), "73 1a ff ff 00 00 00 00"),
    (I.stx(H, R10, R1, -2), "6b 1a fe ff 00 00 00 00"),
    (I.stx(W, R10, R1, -4), "63 1a fc ff 00 00 00 00"),
    (I.stx(DW, R10, R1, -8), "7b 1a f8 ff 00 00 00 00"),
    (I.st(B, R10, -1, 0x7F), "72 0a ff ff 7f 00 00 00"),
    (I.st(H, R10, -2, -1), "6a 0a fe ff ff ff ff ff"),
    (I.st(W, R10, -4, 0x11223344), "62 0a fc ff 44 33 22 11"),
    (I.st(DW, R10, -8, 0), "7a 0a f8 ff 00 00 00 00"),
    # atomics: STX | ATOMIC | size, the operation in imm
    (I.atomic(DW, Atomic.ADD, R10, R1, -8), "db 1a f8 ff 00 00 00 00"),
    (I.atomic(W, Atomic.OR, R1, R2, 4), "c3 21 04 00 40 00 00 00"),
    (I.atomic(W, Atomic.AND, R1, R2, 0), "c3 21 00 00 50 00 00 00"),
    (I.atomic(DW, Atomic.XOR, R1, R2, 0), "db 21 00 00 a0 00 00 00"),
    (I.atomic(DW, Atomic.FETCH_ADD, R1, R2, 0), "db 21 00 00 01 00 00 00"),
    (I.atomic(W, Atomic.FETCH_OR, R1, R2, 0), "c3 21 00 00 41 00 00 00"),
    (I.atomic(DW, Atomic.FETCH_AND, R1, R2, 0), "db 21 00 00 51 00 00 00"),
    (I.atomic(W, Atomic.FETCH_XOR, R1, R2, 0), "c3 21 00 00 a1 00 00 00"),
    (I.atomic(DW, Atomic.XCHG, R1, R2, -16), "db 21 f0 ff e1 00 00 00"),
    (I.atomic(W, Atomic.CMPXCHG, R1, R2, 0), "c3 21 00 00 f1 00 00 00"),
    (I.load_acquire(B, R0, R1, 0), "d3 10 00 00 00 01 00 00"),
    (I.load_acquire(DW, R0, R1, 8), "db 10 08 00 00 01 00 00"),
    (I.store_release(H, R1, R2, 0), "cb 21 00 00 10 01 00 00"),
    (I.store_release(W, R1, R2, -4), "c3 21 fc ff 10 01 00 00"),
    # legacy packet loads (socket filters)
    (I.ld_abs(B, 23), "30 00 00 00 17 00 00 00"),
    (I.ld_abs(H, 12), "28 00 00 00 0c 00 00 00"),
    (I.ld_abs(W, 26), "20 00 00 00 1a 00 00 00"),
    (I.ld_ind(B, R7, 0), "50 70 00 00 00 00 00 00"),
    (I.ld_ind(H, R7, 2), "48 70 00 00 02 00 00 00"),
    (I.ld_ind(W, R7, -4), "40 70 00 00 fc ff ff ff"),
    # jumps
    (I.jmp(JmpOp.JEQ, R1, 0x10, 3, reg=False), "15 01 03 00 10 00 00 00"),
    (I.jmp(JmpOp.JGT, R1, R2, -3, reg=True), "2d 21 fd ff 00 00 00 00"),
    (I.jmp(JmpOp.JGE, R1, 1, 0, reg=False), "35 01 00 00 01 00 00 00"),
    (I.jmp(JmpOp.JSET, R1, R2, 1, reg=True), "4d 21 01 00 00 00 00 00"),
    (I.jmp(JmpOp.JNE, R1, -1, 32767, reg=False), "55 01 ff 7f ff ff ff ff"),
    (I.jmp(JmpOp.JSGT, R1, R2, -32768, reg=True), "6d 21 00 80 00 00 00 00"),
    (I.jmp(JmpOp.JSGE, R1, 0, 1, reg=False), "75 01 01 00 00 00 00 00"),
    (I.jmp(JmpOp.JLT, R1, R2, 1, reg=True), "ad 21 01 00 00 00 00 00"),
    (I.jmp(JmpOp.JLE, R1, 5, 1, reg=False), "b5 01 01 00 05 00 00 00"),
    (I.jmp(JmpOp.JSLT, R1, R2, 1, reg=True), "cd 21 01 00 00 00 00 00"),
    (I.jmp(JmpOp.JSLE, R1, -5, 1, reg=False), "d5 01 01 00 fb ff ff ff"),
    (I.jmp32(JmpOp.JEQ, R1, 0x10, 3, reg=False), "16 01 03 00 10 00 00 00"),
    (I.jmp32(JmpOp.JNE, R1, R2, 2, reg=True), "5e 21 02 00 00 00 00 00"),
    (I.jmp32(JmpOp.JSLE, R1, R2, 2, reg=True), "de 21 02 00 00 00 00 00"),
    (I.ja(-1), "05 00 ff ff 00 00 00 00"),
    (I.gotol(70000), "06 00 00 00 70 11 01 00"),
    (I.gotol(-70000), "06 00 00 00 90 ee fe ff"),
    (I.may_goto(5), "e5 00 05 00 00 00 00 00"),
    # calls and exit
    (I.call_helper(1), "85 00 00 00 01 00 00 00"),
    (I.call_local(-3), "85 10 00 00 fd ff ff ff"),
    (I.call_kfunc(1234), "85 20 00 00 d2 04 00 00"),
    (I.call_kfunc(1234, 2), "85 20 02 00 d2 04 00 00"),
    (I.exit_(), "95 00 00 00 00 00 00 00"),
    # ld_imm64: two slots, the second one carries the upper half in imm
    (I.ld_imm64(R1, 0x1122334455667788),
     "18 01 00 00 88 77 66 55 00 00 00 00 44 33 22 11"),
    (I.ld_imm64(R1, -1), "18 01 00 00 ff ff ff ff 00 00 00 00 ff ff ff ff"),
    (I.ld_imm64(R0, U64), "18 00 00 00 ff ff ff ff 00 00 00 00 ff ff ff ff"),
    (I.ld_map_fd(R1, 5), "18 11 00 00 05 00 00 00 00 00 00 00 00 00 00 00"),
    (I.ld_map_value(R2, 5, 16), "18 22 00 00 05 00 00 00 00 00 00 00 10 00 00 00"),
    (I.ld_imm64(R1, 7, Pseudo.FUNC), "18 41 00 00 07 00 00 00 00 00 00 00 00 00 00 00"),
]


@pytest.mark.parametrize(("insn", "expected"), ENCODINGS, ids=lambda v: v if isinstance(v, str)
                         else None)
def test_encoding(insn: Insn | list[Insn], expected: str) -> None:
    assert hx(insn) == expected


ALU_OPCODES = {  # op: (ALU64|K, ALU64|X, ALU|K, ALU|X), by hand from the opcode tables
    AluOp.ADD: (0x07, 0x0F, 0x04, 0x0C), AluOp.SUB: (0x17, 0x1F, 0x14, 0x1C),
    AluOp.MUL: (0x27, 0x2F, 0x24, 0x2C), AluOp.DIV: (0x37, 0x3F, 0x34, 0x3C),
    AluOp.OR: (0x47, 0x4F, 0x44, 0x4C), AluOp.AND: (0x57, 0x5F, 0x54, 0x5C),
    AluOp.LSH: (0x67, 0x6F, 0x64, 0x6C), AluOp.RSH: (0x77, 0x7F, 0x74, 0x7C),
    AluOp.MOD: (0x97, 0x9F, 0x94, 0x9C), AluOp.XOR: (0xA7, 0xAF, 0xA4, 0xAC),
    AluOp.MOV: (0xB7, 0xBF, 0xB4, 0xBC), AluOp.ARSH: (0xC7, 0xCF, 0xC4, 0xCC),
}
JMP_OPCODES = {  # op: (JMP|K, JMP|X, JMP32|K, JMP32|X)
    JmpOp.JEQ: (0x15, 0x1D, 0x16, 0x1E), JmpOp.JGT: (0x25, 0x2D, 0x26, 0x2E),
    JmpOp.JGE: (0x35, 0x3D, 0x36, 0x3E), JmpOp.JSET: (0x45, 0x4D, 0x46, 0x4E),
    JmpOp.JNE: (0x55, 0x5D, 0x56, 0x5E), JmpOp.JSGT: (0x65, 0x6D, 0x66, 0x6E),
    JmpOp.JSGE: (0x75, 0x7D, 0x76, 0x7E), JmpOp.JLT: (0xA5, 0xAD, 0xA6, 0xAE),
    JmpOp.JLE: (0xB5, 0xBD, 0xB6, 0xBE), JmpOp.JSLT: (0xC5, 0xCD, 0xC6, 0xCE),
    JmpOp.JSLE: (0xD5, 0xDD, 0xD6, 0xDE),
}


@pytest.mark.parametrize("op", list(ALU_OPCODES))
def test_alu_opcodes(op: AluOp) -> None:
    got = (I.alu64(op, R1, 7, reg=False), I.alu64(op, R1, R2, reg=True),
           I.alu32(op, R1, 7, reg=False), I.alu32(op, R1, R2, reg=True))
    assert tuple(i.opcode for i in got) == ALU_OPCODES[op]
    assert [(i.dst, i.src, i.off, i.imm) for i in got] == [(1, 0, 0, 7), (1, 2, 0, 0)] * 2


@pytest.mark.parametrize("op", list(JMP_OPCODES))
def test_jmp_opcodes(op: JmpOp) -> None:
    got = (I.jmp(op, R1, 7, 5, reg=False), I.jmp(op, R1, R2, 5, reg=True),
           I.jmp32(op, R1, 7, 5, reg=False), I.jmp32(op, R1, R2, 5, reg=True))
    assert tuple(i.opcode for i in got) == JMP_OPCODES[op]
    assert [(i.dst, i.src, i.off, i.imm) for i in got] == [(1, 0, 5, 7), (1, 2, 5, 0)] * 2


def test_ld_imm64_is_two_slots() -> None:
    first, second = I.ld_imm64(R3, 0xDEADBEEF_00000001)
    assert first.is_ld_imm64 and not second.is_ld_imm64
    assert (first.opcode, first.dst, first.imm) == (0x18, 3, 1)
    assert (second.opcode, second.dst, second.src, second.off) == (0, 0, 0, 0)
    assert second.imm & U32 == 0xDEADBEEF
    assert len(I.pack(I.ld_map_fd(R1, 3))) == 16


def test_classes_and_is_jump() -> None:
    assert [I.Insn(c).cls for c in (0x18, 0x61, 0x62, 0x63, 0x04, 0x05, 0x06, 0x07)] == list(
        range(8))
    assert I.is_jump(I.ja(1)) and I.is_jump(I.gotol(1)) and I.is_jump(I.may_goto(1))
    assert I.is_jump(I.jmp32(JmpOp.JSET, R1, 1, 1, reg=False))
    assert not I.is_jump(I.call_helper(1)) and not I.is_jump(I.call_local(1))
    assert not I.is_jump(I.exit_()) and not I.is_jump(I.mov64_imm(R0, 0))


# --- range checks --------------------------------------------------------------------------------

@pytest.mark.parametrize(("make", "field"), [
    (lambda: Insn(0x100), "opcode 256"),
    (lambda: Insn(0xB7, dst=16), "dst 16"),
    (lambda: Insn(0xB7, src=-1), "src -1"),
    (lambda: Insn(0x05, off=1 << 15), "off 32768"),
    (lambda: Insn(0x05, off=-(1 << 15) - 1), "off -32769"),
    (lambda: Insn(0xB7, imm=1 << 32), "imm 4294967296"),
    (lambda: Insn(0xB7, imm=-(1 << 31) - 1), "imm -2147483649"),
    (lambda: I.mov64_imm(R0, 1 << 32), "imm"),
    # 64-bit forms sign-extend imm: 0xffffffff would silently mean -1, so it is refused
    (lambda: I.mov64_imm(R0, 0xFFFFFFFF), "imm 4294967295 out of range"),
    (lambda: I.alu64(AluOp.AND, R0, 0x80000000, reg=False), "sign-extended.*imm 2147483648"),
    (lambda: I.jmp(JmpOp.JEQ, R1, 0xC0A80001, 1, reg=False), "jmp JEQ.*sign-extended"),
    (lambda: I.st(DW, R10, -8, 0xFFFFFFFF), "st DW"),
    (lambda: I.call_local(1 << 31), "rel 2147483648"),
    (lambda: I.ja(40000), "off 40000"),
    (lambda: I.jmp(JmpOp.JEQ, R1, 0, -40000, reg=False), "off -40000"),
    (lambda: I.ldx(W, R0, R1, 1 << 15), "off 32768"),
    (lambda: I.gotol(1 << 31), "gotol: off 2147483648"),
    (lambda: I.st(DW, R10, -8, 1 << 40), "imm"),
    (lambda: I.ld_imm64(R1, 1 << 64), "value"),
    (lambda: I.ld_imm64(R1, -(1 << 63) - 1), "value"),
    (lambda: I.movsx64(R1, R2, 64), "width 64"),
    (lambda: I.movsx32(R1, R2, 32), "width 32"),
    (lambda: I.endian(R1, 8, big=True), "width 8"),
    (lambda: I.bswap(R1, 48), "width 48"),
    (lambda: I.ldxsx(DW, R0, R1, 0), "64 bits"),
    (lambda: I.atomic(B, Atomic.ADD, R1, R2, 0), "ADD"),
    (lambda: I.atomic(H, Atomic.CMPXCHG, R1, R2, 0), "CMPXCHG"),
    (lambda: I.unpack(b"\0" * 12), "multiple of 8"),
])
def test_range_checks(make, field: str) -> None:
    with pytest.raises(EncodeError, match=field):
        make()


def test_encode_error_is_value_error() -> None:
    assert issubclass(EncodeError, ValueError)


def test_32bit_forms_take_unsigned_immediates() -> None:
    # Where only 32 bits count, a bit pattern given unsigned is unambiguous.
    assert hx(I.jmp32(JmpOp.JEQ, R1, 0xC0A80001, 1, reg=False)) == "16 01 01 00 01 00 a8 c0"
    assert hx(I.mov32_imm(R1, 0xFFFFFFFF)) == "b4 01 00 00 ff ff ff ff"
    assert hx(I.st(W, R10, -4, 0xFFFFFFFF)) == "62 0a fc ff ff ff ff ff"
    assert I.mov64_imm(R1, -(1 << 31)).imm == -(1 << 31)


# --- pack / unpack ---------------------------------------------------------------------------

insns = st.builds(
    Insn, st.integers(0, 0xFF), st.integers(0, 15), st.integers(0, 15),
    st.integers(-(1 << 15), (1 << 15) - 1), st.integers(-(1 << 31), (1 << 32) - 1))


@given(insns)
def test_pack_unpack_roundtrip(insn: Insn) -> None:
    raw = insn.pack()
    assert len(raw) == 8
    assert Insn.unpack(raw) == insn
    assert Insn.unpack(raw).pack() == raw


@given(st.binary(min_size=8, max_size=8))
def test_unpack_pack_roundtrip(raw: bytes) -> None:
    assert Insn.unpack(raw).pack() == raw


@given(st.lists(insns, max_size=20))
def test_program_roundtrip(prog: list[Insn]) -> None:
    assert I.unpack(I.pack(prog)) == prog


@given(st.integers(-(1 << 63), U64))
def test_ld_imm64_value_roundtrip(value: int) -> None:
    first, second = I.unpack(I.pack(I.ld_imm64(R1, value)))
    assert ((second.imm & U32) << 32 | (first.imm & U32)) == value & U64


def test_imm_is_normalised_to_s32() -> None:
    # The same 32 bits given unsigned or signed make the same instruction.
    assert Insn(0xB7, imm=0xFFFFFFFF) == Insn(0xB7, imm=-1)
    assert Insn(0xB7, imm=0xFFFFFFFF).imm == -1
    a = I.atomic(DW, Atomic.XCHG, R1, R2, 0)
    assert type(a.imm) is int and repr(a) == "Insn(opcode=219, dst=1, src=2, off=0, imm=225)"


# --- branch inversion ----------------------------------------------------------------------------

def _s(v: int, bits: int) -> int:
    v &= (1 << bits) - 1
    return v - (1 << bits) if v >> (bits - 1) else v


def cond(op: JmpOp, a: int, b: int, bits: int = 64) -> bool:
    """What the kernel's conditional jump `op` decides for dst=a, src=b."""
    m = (1 << bits) - 1
    ua, ub, sa, sb = a & m, b & m, _s(a, bits), _s(b, bits)
    return {
        JmpOp.JEQ: ua == ub, JmpOp.JNE: ua != ub, JmpOp.JSET: bool(ua & ub),
        JmpOp.JGT: ua > ub, JmpOp.JGE: ua >= ub, JmpOp.JLT: ua < ub, JmpOp.JLE: ua <= ub,
        JmpOp.JSGT: sa > sb, JmpOp.JSGE: sa >= sb, JmpOp.JSLT: sa < sb, JmpOp.JSLE: sa <= sb,
    }[op]


@given(st.integers(0, U64), st.integers(0, U64))
def test_inverse_conditions(a: int, b: int) -> None:
    for op, inv in I.INVERSE.items():
        assert I.INVERSE[inv] == op
        assert cond(op, a, b) != cond(inv, a, b)
    assert JmpOp.JSET not in I.INVERSE  # no inverse: the assembler has a special far form


# --- the kernel runs it --------------------------------------------------------------------------
# Each program writes its results into an array map value that the test reads back after one
# BPF_PROG_TEST_RUN; inputs come from another map so that nothing is a verifier-known constant.

SLOTS = 64  # u64 result slots per program


def _run(build, inputs: list[int], *, prog_type: ProgType = ProgType.SOCKET_FILTER,
         data: bytes = bytes(64)) -> tuple[list[int], int]:
    """Assemble `build(a)` (r6 = &inputs[0], r7 = &out[0]), run it once; (outputs, retval)."""
    spec_in = MapSpec(MapType.ARRAY, 4, 8 * len(inputs), 1, name="insn_in")
    spec_out = MapSpec(MapType.ARRAY, 4, 8 * SLOTS, 1, name="insn_out")
    with Map.create(spec_in) as m_in, Map.create(spec_out) as m_out:
        m_in.update(u32(0), b"".join((v & U64).to_bytes(8, "little") for v in inputs))
        a = Assembler()
        a.ld_map_value(R6, "in")
        a.ld_map_value(R7, "out")
        build(a)
        a.emit(I.exit_())
        src = a.assemble()
        with Prog.load(prog_type, src.resolve({"in": m_in.fd, "out": m_out.fd}), name="insn_sem",
                       source=src) as prog:
            ret = prog.run(data).retval
        raw = m_out.lookup(u32(0))
        assert raw is not None
        return [int.from_bytes(raw[i : i + 8], "little") for i in range(0, len(raw), 8)], ret


def alu_model(op: AluOp, a: int, b: int, bits: int, signed: bool = False) -> int:
    """The result of `a op b` in a `bits`-wide BPF ALU (32-bit results zero-extended)."""
    m = (1 << bits) - 1
    ua, ub, sa, sb = a & m, b & m, _s(a, bits), _s(b, bits)
    sh = ub & (bits - 1)
    if signed:
        q = abs(sa) // abs(sb) * (1 if (sa < 0) == (sb < 0) else -1)
        return (q if op == AluOp.DIV else sa - q * sb) & m
    if op == AluOp.NEG:
        return -ua & m
    return {
        AluOp.ADD: ua + ub, AluOp.SUB: ua - ub, AluOp.MUL: ua * ub, AluOp.OR: ua | ub,
        AluOp.AND: ua & ub, AluOp.LSH: ua << sh, AluOp.RSH: ua >> sh, AluOp.XOR: ua ^ ub,
        AluOp.MOV: ub, AluOp.ARSH: sa >> sh,
        AluOp.DIV: ua // ub if ub else 0, AluOp.MOD: ua % ub if ub else ua,
    }[op] & m


SHIFTS = (AluOp.LSH, AluOp.RSH, AluOp.ARSH)
# (op, signed) pairs; K operands per case below.
ALU_CASES = [(op, False) for op in ALU_OPCODES] + [(AluOp.NEG, False), (AluOp.DIV, True),
                                                   (AluOp.MOD, True)]


def _alu_cases() -> list[tuple[AluOp, bool, bool, bool, int]]:
    """(op, signed, is64, reg, imm) for every ALU form; K immediates chosen per op."""
    out = []
    for op, signed in ALU_CASES:
        for is64 in (True, False):
            for reg in (False, True):
                if op == AluOp.NEG and reg:
                    continue
                imm = 5 if op in SHIFTS else (-3 if signed else -0x1234567)
                if op == AluOp.NEG:
                    imm = 0  # the kernel refuses any operand
                out.append((op, signed, is64, reg, imm))
    return out


@pytest.mark.kernel
@pytest.mark.parametrize(("a", "b", "s"), [
    (0xFEDCBA9876543210, 0x0123456789ABCDEF, 3),
    (-7, 2, 31),
    (0x80000001_7FFFFFFF, -5, 1),
    (12345, 0x1_00000007, 17),
])
def test_kernel_alu_semantics(a: int, b: int, s: int) -> None:
    """Every ALU/ALU64 op, K and X, computed by the kernel matches the ISA's definition."""
    cases = _alu_cases()
    assert len(cases) <= SLOTS

    def build(asm: Assembler) -> None:
        for n, (op, signed, is64, reg, imm) in enumerate(cases):
            make = I.alu64 if is64 else I.alu32
            # Shifts by a register take the (in-range) amount s instead of b.
            asm.emit(I.ldx(DW, R1, R6, 0), I.ldx(DW, R2, R6, 8 if op not in SHIFTS else 16))
            asm.emit(make(op, R1, R2 if reg else imm, reg=reg, off=1 if signed else 0))
            asm.emit(I.stx(DW, R7, R1, 8 * n))
        asm.emit(I.mov64_imm(R0, 0))

    out, _ = _run(build, [a, b, s])
    for n, (op, signed, is64, reg, imm) in enumerate(cases):
        operand = (b if op not in SHIFTS else s) if reg else imm
        want = alu_model(op, a, operand, 64 if is64 else 32, signed)
        assert out[n] == want, f"{'ALU64' if is64 else 'ALU'} {op.name} signed={signed} reg={reg}"


@pytest.mark.kernel
@pytest.mark.parametrize(("a", "b"), [
    (1, 2), (2, 1), (5, 5), (-1, 1), (1, -1), (0x1_00000001, 2), (0x80000000, 1),
    (0xF0, 0x0F), (0xFFFFFFFF_00000000, 0xFFFFFFFF), (-5, -7),
])
def test_kernel_jump_semantics(a: int, b: int) -> None:
    """Every JMP/JMP32 condition, K and X: the kernel branches exactly when the ISA says."""
    imm = b if -(1 << 31) <= _s(b, 64) < 1 << 31 else None
    cases = [(op, is64, reg) for op in JMP_OPCODES for is64 in (True, False)
             for reg in (True, False) if reg or imm is not None]

    def build(asm: Assembler) -> None:
        asm.emit(I.ldx(DW, R1, R6, 0), I.ldx(DW, R2, R6, 8), I.mov64_imm(R3, 0))
        for n, (op, is64, reg) in enumerate(cases):
            make = I.jmp if is64 else I.jmp32
            # r3 |= 1 << n unless the branch is taken.
            asm.emit(make(op, R1, R2 if reg else _s(b, 64), 3, reg=reg))
            asm.emit(I.ld_imm64(R4, 1 << n))
            asm.emit(I.alu64(AluOp.OR, R3, R4, reg=True))
        asm.emit(I.stx(DW, R7, R3, 0), I.mov64_imm(R0, 0))

    out, _ = _run(build, [a, b])
    for n, (op, is64, reg) in enumerate(cases):
        taken = not (out[0] >> n) & 1
        assert taken == cond(op, a, b, 64 if is64 else 32), (
            f"{'JMP' if is64 else 'JMP32'} {op.name} {'X' if reg else 'K'}")


@pytest.mark.kernel
def test_kernel_memory_atomics_and_v4_forms() -> None:
    """Loads/stores of every size, atomics, byte swaps, sign extension, gotol and may_goto."""
    def build(a: Assembler) -> None:
        def st_(n: int, reg: int) -> None:
            a.emit(I.stx(DW, R7, reg, 8 * n))

        a.emit(I.ldx(DW, R5, R6, 0))  # 0x8182838485868788 (unknown to the verifier)
        # 0-3: stores of each size, read back with loads of each size
        a.emit(I.st(DW, FP, -8, -2), I.ldx(DW, R1, FP, -8))
        st_(0, R1)
        a.emit(I.stx(DW, FP, R5, -16), I.stx(W, FP, R5, -16), I.st(H, FP, -14, 0x7FFF))
        a.emit(I.stx(B, FP, R5, -13), I.ldx(DW, R1, FP, -16))
        st_(1, R1)
        a.emit(I.ldx(W, R1, FP, -12), I.ldx(H, R2, FP, -12), I.ldx(B, R3, FP, -12))
        a.emit(I.alu64(AluOp.LSH, R1, 32, reg=False), I.alu64(AluOp.LSH, R2, 16, reg=False))
        a.emit(I.alu64(AluOp.OR, R1, R2, reg=True), I.alu64(AluOp.OR, R1, R3, reg=True))
        st_(2, R1)
        # 3-5: sign-extending loads
        for n, size in enumerate((B, H, W)):
            a.emit(I.ldxsx(size, R1, FP, -16))
            st_(3 + n, R1)
        # 6-8: sign-extending moves
        a.emit(I.movsx64(R1, R5, 8))
        st_(6, R1)
        a.emit(I.movsx32(R1, R5, 16))
        st_(7, R1)
        a.emit(I.movsx64(R1, R5, 32))
        st_(8, R1)
        # 9-13: byte order
        for n, ins in enumerate((I.bswap(R1, 16), I.bswap(R1, 32), I.bswap(R1, 64),
                                 I.endian(R1, 32, big=True), I.endian(R1, 16, big=False))):
            a.emit(I.mov64(R1, R5), ins)
            st_(9 + n, R1)
        # 14-19: atomics on the stack
        a.emit(I.st(DW, FP, -24, 5), I.mov64_imm(R1, 3))
        a.emit(I.atomic(DW, Atomic.FETCH_ADD, FP, R1, -24))
        st_(14, R1)  # old value 5; memory 8
        a.emit(I.mov64_imm(R0, 8), I.mov64_imm(R2, 100))
        a.emit(I.atomic(DW, Atomic.CMPXCHG, FP, R2, -24))
        st_(15, R0)  # 8; memory 100
        a.emit(I.mov64_imm(R3, 7), I.atomic(DW, Atomic.XCHG, FP, R3, -24))
        st_(16, R3)  # 100; memory 7
        a.emit(I.mov64_imm(R1, 0x30), I.atomic(DW, Atomic.OR, FP, R1, -24))
        a.emit(I.mov64_imm(R1, 0x3C), I.atomic(DW, Atomic.AND, FP, R1, -24))
        a.emit(I.mov64_imm(R1, 1), I.atomic(DW, Atomic.XOR, FP, R1, -24))
        a.emit(I.mov64_imm(R1, 2), I.atomic(DW, Atomic.ADD, FP, R1, -24))
        a.emit(I.ldx(DW, R1, FP, -24))
        st_(17, R1)  # ((7 | 0x30) & 0x3c ^ 1) + 2 = 0x37
        a.emit(I.st(W, FP, -28, -1), I.mov64_imm(R1, 1))
        a.emit(I.atomic(W, Atomic.FETCH_ADD, FP, R1, -28), I.ldx(W, R2, FP, -28))
        a.emit(I.alu64(AluOp.LSH, R1, 32, reg=False), I.alu64(AluOp.OR, R1, R2, reg=True))
        st_(18, R1)  # old 0xffffffff, wrapped to 0
        a.emit(I.store_release(DW, FP, R5, -32), I.load_acquire(DW, R1, FP, -32))
        st_(19, R1)
        # 20: gotol over an instruction reachable only through another branch; may_goto
        a.emit(I.mov64_imm(R1, 1), I.ldx(DW, R2, R6, 8))
        a.emit(I.jmp(JmpOp.JEQ, R2, 0x42, 1, reg=False), I.gotol(1))
        a.emit(I.mov64_imm(R1, 2))
        a.emit(I.may_goto(1), I.alu64(AluOp.ADD, R1, 10, reg=False))
        st_(20, R1)
        a.emit(I.mov64_imm(R0, 0))

    v = 0x8182838485868788
    out, _ = _run(build, [v, 0])
    def s64(x: int) -> int:
        return x & U64

    assert out[0] == s64(-2)  # ST DW sign-extends its imm
    # fp-16: 88 87 | ff 7f (st H) | 88 (stx B over 7f) | 84 83 82 81
    assert out[1] == 0x81828384_88FF8788
    assert out[2] == (0x81828384 << 32) | (0x8384 << 16) | 0x84
    assert out[3:6] == [s64(-0x78), s64(0x8788 - 0x10000), s64(0x88FF8788 - (1 << 32))]
    assert out[6] == s64(-0x78) and out[7] == 0xFFFF8788 and out[8] == s64(0x85868788 - (1 << 32))
    assert out[9:14] == [0x8887, 0x88878685, 0x8887868584838281, 0x88878685, 0x8788]
    assert out[14:18] == [5, 8, 100, 0x37]
    assert out[18] == 0xFFFFFFFF_00000000
    assert out[19] == v
    assert out[20] == 11  # gotol skipped r1 = 2; may_goto fell through once


@pytest.mark.kernel
def test_kernel_legacy_packet_loads() -> None:
    """LD_ABS / LD_IND read big-endian packet bytes (socket filter, r6 = skb)."""
    data = bytes(range(0x10, 0x50))
    # A socket filter's test run pulls the Ethernet header: offsets count from the IP header.
    eth = 14

    def build(a: Assembler) -> None:
        a.emit(I.mov64(R6, R1))  # LD_ABS/LD_IND take the skb from r6
        a.emit(I.ld_abs(H, 12), I.stx(DW, R7, R0, 0))
        a.emit(I.ld_abs(W, 20), I.stx(DW, R7, R0, 8))
        a.emit(I.mov64_imm(R2, 4), I.ld_ind(B, R2, 30), I.stx(DW, R7, R0, 16))
        a.emit(I.ld_abs(B, 1), I.alu64(AluOp.ADD, R0, 1, reg=False))

    out, ret = _run(build, [0], data=data)
    d = data[eth:]
    assert out[:3] == [int.from_bytes(d[12:14], "big"), int.from_bytes(d[20:24], "big"), d[34]]
    assert ret == d[1] + 1
