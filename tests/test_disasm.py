"""The disassembler: exact text of every instruction form in the kernel's print_bpf_insn()
notation, annotations, and (with root and bpftool) a round trip against `bpftool prog dump xlated`.

bpftool is only a test oracle. Debian's bpftool 7.1 predates cpu v4, so it prints sdiv/smod,
movsx, sign-extending loads, bswap, gotol, may_goto, load-acquire/store-release and the per-CPU
move as BUG_... or as older instructions; those forms are checked here against the current kernel
notation written out by hand (kernel/bpf/disasm.c), and only the rest goes through bpftool.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable

import pytest

from bpfilter.bpf import disasm
from bpfilter.bpf import insn as I
from bpfilter.bpf.asm import Assembler, Origin, Program
from bpfilter.bpf.btf import BtfError, vmlinux
from bpfilter.bpf.consts import Helper, MapType, ProgType, XdpAction
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
    R8,
    R10,
    AluOp,
    Atomic,
    B,
    H,
    Insn,
    JmpOp,
    Pseudo,
    W,
)
from bpfilter.bpf.maps import Map, MapSpec
from bpfilter.bpf.prog import Prog

TEXTS = [
    # ALU64 / ALU32
    (I.mov64_imm(R0, 1), "(b7) r0 = 1"),
    (I.mov64(R6, R1), "(bf) r6 = r1"),
    (I.mov32_imm(R2, -1), "(b4) w2 = -1"),
    (I.mov32_imm(R2, 0xFFFFFFFF), "(b4) w2 = -1"),
    (I.mov32(R3, R4), "(bc) w3 = w4"),
    (I.alu64(AluOp.ADD, R2, -4, reg=False), "(07) r2 += -4"),
    (I.alu64(AluOp.SUB, R1, R2, reg=True), "(1f) r1 -= r2"),
    (I.alu32(AluOp.MUL, R1, 3, reg=False), "(24) w1 *= 3"),
    (I.alu32(AluOp.DIV, R1, R2, reg=True), "(3c) w1 /= w2"),
    (I.alu64(AluOp.OR, R8, 0x100, reg=False), "(47) r8 |= 256"),
    (I.alu32(AluOp.AND, R1, R8, reg=True), "(5c) w1 &= w8"),
    (I.alu64(AluOp.LSH, R1, 32, reg=False), "(67) r1 <<= 32"),
    (I.alu64(AluOp.RSH, R1, R2, reg=True), "(7f) r1 >>= r2"),
    (I.neg64(R3), "(87) r3 = -r3"),
    (I.alu32(AluOp.NEG, R3, 0, reg=False), "(84) w3 = -w3"),
    (I.alu64(AluOp.MOD, R1, 10, reg=False), "(97) r1 %= 10"),
    (I.alu32(AluOp.XOR, R1, R1, reg=True), "(ac) w1 ^= w1"),
    (I.alu64(AluOp.ARSH, R1, 63, reg=False), "(c7) r1 s>>= 63"),
    (I.alu32(AluOp.ARSH, R1, R2, reg=True), "(cc) w1 s>>= w2"),
    # cpu v4: signed division/modulo, sign-extending moves, bswap
    (I.sdiv64(R1, R2, reg=True), "(3f) r1 s/= r2"),
    (I.smod64(R1, 3, reg=False), "(97) r1 s%= 3"),
    (I.alu32(AluOp.DIV, R1, -2, reg=False, off=1), "(34) w1 s/= -2"),
    (I.alu32(AluOp.MOD, R1, R2, reg=True, off=1), "(9c) w1 s%= w2"),
    (I.movsx64(R1, R2, 8), "(bf) r1 = (s8)r2"),
    (I.movsx64(R1, R2, 16), "(bf) r1 = (s16)r2"),
    (I.movsx64(R1, R2, 32), "(bf) r1 = (s32)r2"),
    (I.movsx32(R1, R2, 8), "(bc) w1 = (s8)w2"),
    (I.movsx32(R1, R2, 16), "(bc) w1 = (s16)w2"),
    (I.endian(R1, 16, big=True), "(dc) r1 = be16 r1"),
    (I.endian(R1, 32, big=False), "(d4) r1 = le32 r1"),
    (I.endian(R1, 64, big=True), "(dc) r1 = be64 r1"),
    (I.bswap(R1, 64), "(d7) r1 = bswap64 r1"),
    (I.bswap(R2, 16), "(d7) r2 = bswap16 r2"),
    # special moves: arena address-space cast, and the verifier's per-CPU address
    (Insn(0xBF, R1, R2, I.ADDR_SPACE_CAST, 1 << 16), "(bf) r1 = addr_space_cast(r2, 1, 0)"),
    (Insn(0xBF, R0, R0, I.ADDR_PERCPU), "(bf) r0 = &(void __percpu *)(r0)"),
    # loads and stores
    (I.ldx(B, R0, R1, 14), "(71) r0 = *(u8 *)(r1 +14)"),
    (I.ldx(H, R0, R1, -2), "(69) r0 = *(u16 *)(r1 -2)"),
    (I.ldx(W, R0, R1, 0), "(61) r0 = *(u32 *)(r1 +0)"),
    (I.ldx(DW, R0, R10, -8), "(79) r0 = *(u64 *)(r10 -8)"),
    (I.ldxsx(B, R0, R1, 1), "(91) r0 = *(s8 *)(r1 +1)"),
    (I.ldxsx(H, R0, R1, 2), "(89) r0 = *(s16 *)(r1 +2)"),
    (I.ldxsx(W, R0, R1, 4), "(81) r0 = *(s32 *)(r1 +4)"),
    (I.stx(B, R10, R1, -1), "(73) *(u8 *)(r10 -1) = r1"),
    (I.stx(H, R10, R1, -2), "(6b) *(u16 *)(r10 -2) = r1"),
    (I.stx(W, R10, R1, -4), "(63) *(u32 *)(r10 -4) = r1"),
    (I.stx(DW, R10, R1, -8), "(7b) *(u64 *)(r10 -8) = r1"),
    (I.st(B, R10, -1, 0x7F), "(72) *(u8 *)(r10 -1) = 127"),
    (I.st(H, R10, -2, -1), "(6a) *(u16 *)(r10 -2) = -1"),
    (I.st(W, R10, -4, 0x11223344), "(62) *(u32 *)(r10 -4) = 287454020"),
    (I.st(DW, R10, -8, 0), "(7a) *(u64 *)(r10 -8) = 0"),
    (Insn(I.ST | I.NOSPEC), "(c2) nospec"),
    # atomics
    (I.atomic(DW, Atomic.ADD, R10, R1, -8), "(db) lock *(u64 *)(r10 -8) += r1"),
    (I.atomic(W, Atomic.OR, R1, R2, 4), "(c3) lock *(u32 *)(r1 +4) |= r2"),
    (I.atomic(W, Atomic.AND, R1, R2, 0), "(c3) lock *(u32 *)(r1 +0) &= r2"),
    (I.atomic(DW, Atomic.XOR, R1, R2, 0), "(db) lock *(u64 *)(r1 +0) ^= r2"),
    (I.atomic(DW, Atomic.FETCH_ADD, R1, R2, 0),
     "(db) r2 = atomic64_fetch_add((u64 *)(r1 +0), r2)"),
    (I.atomic(W, Atomic.FETCH_OR, R1, R2, 0), "(c3) r2 = atomic_fetch_or((u32 *)(r1 +0), r2)"),
    (I.atomic(DW, Atomic.FETCH_AND, R1, R2, 8),
     "(db) r2 = atomic64_fetch_and((u64 *)(r1 +8), r2)"),
    (I.atomic(W, Atomic.FETCH_XOR, R1, R2, 0), "(c3) r2 = atomic_fetch_xor((u32 *)(r1 +0), r2)"),
    (I.atomic(DW, Atomic.XCHG, R1, R2, -16), "(db) r2 = atomic64_xchg((u64 *)(r1 -16), r2)"),
    (I.atomic(W, Atomic.XCHG, R1, R2, 0), "(c3) r2 = atomic_xchg((u32 *)(r1 +0), r2)"),
    (I.atomic(DW, Atomic.CMPXCHG, R1, R2, 0),
     "(db) r0 = atomic64_cmpxchg((u64 *)(r1 +0), r0, r2)"),
    (I.atomic(W, Atomic.CMPXCHG, R1, R2, 0), "(c3) r0 = atomic_cmpxchg((u32 *)(r1 +0), r0, r2)"),
    (I.load_acquire(B, R0, R1, 0), "(d3) r0 = load_acquire((u8 *)(r1 +0))"),
    (I.load_acquire(DW, R0, R1, 8), "(db) r0 = load_acquire((u64 *)(r1 +8))"),
    (I.store_release(H, R1, R2, 0), "(cb) store_release((u16 *)(r1 +0), r2)"),
    (I.store_release(W, R1, R2, -4), "(c3) store_release((u32 *)(r1 -4), r2)"),
    # legacy packet loads
    (I.ld_abs(B, 23), "(30) r0 = *(u8 *)skb[23]"),
    (I.ld_abs(H, 12), "(28) r0 = *(u16 *)skb[12]"),
    (I.ld_abs(W, 26), "(20) r0 = *(u32 *)skb[26]"),
    (I.ld_ind(B, R7, 0), "(50) r0 = *(u8 *)skb[r7 + 0]"),
    (I.ld_ind(W, R7, -4), "(40) r0 = *(u32 *)skb[r7 + -4]"),
    # jumps: immediates print as unsigned hex, offsets signed
    (I.jmp(JmpOp.JEQ, R1, 0x10, 3, reg=False), "(15) if r1 == 0x10 goto pc+3"),
    (I.jmp(JmpOp.JGT, R1, R2, -3, reg=True), "(2d) if r1 > r2 goto pc-3"),
    (I.jmp(JmpOp.JGE, R1, 1, 0, reg=False), "(35) if r1 >= 0x1 goto pc+0"),
    (I.jmp(JmpOp.JSET, R1, R2, 1, reg=True), "(4d) if r1 & r2 goto pc+1"),
    (I.jmp(JmpOp.JNE, R1, -1, 32767, reg=False), "(55) if r1 != 0xffffffff goto pc+32767"),
    (I.jmp(JmpOp.JSGT, R1, R2, -32768, reg=True), "(6d) if r1 s> r2 goto pc-32768"),
    (I.jmp(JmpOp.JSGE, R1, 0, 1, reg=False), "(75) if r1 s>= 0x0 goto pc+1"),
    (I.jmp(JmpOp.JLT, R1, R2, 1, reg=True), "(ad) if r1 < r2 goto pc+1"),
    (I.jmp(JmpOp.JLE, R1, 5, 1, reg=False), "(b5) if r1 <= 0x5 goto pc+1"),
    (I.jmp(JmpOp.JSLT, R1, R2, 1, reg=True), "(cd) if r1 s< r2 goto pc+1"),
    (I.jmp(JmpOp.JSLE, R1, -5, 1, reg=False), "(d5) if r1 s<= 0xfffffffb goto pc+1"),
    (I.jmp32(JmpOp.JEQ, R1, 0x10, 3, reg=False), "(16) if w1 == 0x10 goto pc+3"),
    (I.jmp32(JmpOp.JSET, R1, 0x80000000, 3, reg=False), "(46) if w1 & 0x80000000 goto pc+3"),
    (I.jmp32(JmpOp.JSLE, R1, R2, 2, reg=True), "(de) if w1 s<= w2 goto pc+2"),
    (I.ja(-1), "(05) goto pc-1"),
    (I.ja(0), "(05) goto pc+0"),
    (I.gotol(70000), "(06) gotol pc+70000"),
    (I.gotol(-70000), "(06) gotol pc-70000"),
    (I.may_goto(5), "(e5) may_goto pc+5"),
    # calls and exit
    (I.call_helper(Helper.map_lookup_elem), "(85) call bpf_map_lookup_elem#1"),
    (I.call_helper(Helper.ktime_get_ns), "(85) call bpf_ktime_get_ns#5"),
    (I.call_helper(0), "(85) call bpf_unspec#0"),
    (I.call_helper(100000), "(85) call unknown#100000"),
    (I.call_local(-3), "(85) call pc-3"),
    (I.call_local(12), "(85) call pc+12"),
    (I.call_kfunc(1234), "(85) call kernel-function#1234"),
    (I.exit_(), "(95) exit"),
    # ld_imm64 (both slots)
    (I.ld_imm64(R1, 0x1122334455667788), "(18) r1 = 0x1122334455667788"),
    (I.ld_imm64(R1, -1), "(18) r1 = 0xffffffffffffffff"),
    (I.ld_imm64(R1, 0x80000000), "(18) r1 = 0x80000000"),
    (I.ld_map_fd(R1, 5), "(18) r1 = map[id:5]"),
    (I.ld_map_value(R2, 5, 16), "(18) r2 = map[id:5][0]+16"),
    (I.ld_imm64(R1, 7, Pseudo.FUNC), "(18) r1 = subprog[+7]"),
    # what print_bpf_insn() calls bugs
    (Insn(I.LDX | I.IMM | W), "BUG_ldx_01"),
    (Insn(I.STX | I.ABS | W), "BUG_23"),
    (Insn(I.ST | I.ABS | W), "BUG_st_22"),
    (Insn(I.LD | I.MEM | W), "BUG_ld_60"),
]


@pytest.mark.parametrize(("insn", "text"), TEXTS, ids=[t for _, t in TEXTS])
def test_format_insn(insn: Insn | list[Insn], text: str) -> None:
    first, nxt = (insn[0], insn[1]) if isinstance(insn, list) else (insn, None)
    assert disasm.format_insn(first, nxt) == text


def test_kfunc_and_map_names_from_callbacks() -> None:
    seen = []

    def namer(first: Insn, second: Insn) -> str:
        seen.append((first.imm, second.imm))
        return f"map[id:{first.imm + 100}]"

    assert disasm.format_insn(I.call_kfunc(77), kfunc_name={77: "bpf_foo"}.get) == (
        "(85) call bpf_foo#77")
    assert disasm.format_insn(I.call_kfunc(78), kfunc_name={77: "bpf_foo"}.get) == (
        "(85) call kernel-function#78")
    first, second = I.ld_map_value(R3, 4, 8)
    assert disasm.format_insn(first, second, map_name=namer) == "(18) r3 = map[id:104]"
    assert seen == [(4, 8)]


def test_disassemble_layout_and_annotations() -> None:
    rule = Origin("-A INPUT -p udp -j DROP", chain="INPUT", rule=3, file="r.v4", line=9)
    a = Assembler()
    a.comment("entry")
    a.emit(I.mov64_imm(R0, 0))
    with a.origin(rule):
        done = a.label("done")
        a.jump(JmpOp.JNE, R1, 17, done)
        a.ld_map(R2, "m")
        a.comment("drop")
        a.emit(I.mov64_imm(R0, 1))
    a.place(done)
    a.emit(I.exit_())
    p = a.assemble()
    text = disasm.disassemble(p.resolve({"m": 3}), comments=p.comments)
    assert text == (
        "; entry\n"
        "   0: (b7) r0 = 0\n"
        "; -A INPUT -p udp -j DROP (r.v4:9)\n"
        "   1: (55) if r1 != 0x11 goto pc+3\n"
        "   2: (18) r2 = map[id:3]\n"
        "; drop\n"
        "   4: (b7) r0 = 1\n"
        "   5: (95) exit\n"
    )
    # Without comments there are only instruction lines; numbers are right-aligned to 4.
    lines = disasm.disassemble([I.ja(0)] * 10001).splitlines()
    assert lines[0] == "   0: (05) goto pc+0" and lines[-1] == "10000: (05) goto pc+0"


# --- round trip against bpftool ----------------------------------------------------------------

BPFTOOL = shutil.which("bpftool")
LINE = re.compile(r"^ *(\d+): (.*)$")

# Helper calls get the address of the kernel function as imm; bpftool then prints the kernel
# symbol, which for map helpers is the map type's own operation.
HELPER_SYMBOLS = {
    Helper.ktime_get_ns: "bpf_ktime_get_ns",
    Helper.map_update_elem: "array_map_update_elem",
}
KFUNCS = ("bpf_rcu_read_lock", "bpf_rcu_read_unlock")
# ALU ops whose register forms the verifier leaves alone. It expands two forms, which would
# shift everything after them: DIV and MOD by a register get a division-by-zero guard, and a
# 32-bit CMPXCHG is followed by `w0 = w0` (zero-extension of r0). Those are covered by
# test_xlated_disassembly_matches_bpftool.
ALU_X_KEPT = [op for op in AluOp if op not in (AluOp.NEG, AluOp.END, AluOp.DIV, AluOp.MOD)]
ALU_K = {AluOp.ADD: -7, AluOp.SUB: 3, AluOp.MUL: 5, AluOp.DIV: 3, AluOp.OR: 0x100,
         AluOp.AND: 0xFFF, AluOp.LSH: 3, AluOp.RSH: 2, AluOp.MOD: 7, AluOp.XOR: -1,
         AluOp.MOV: 42, AluOp.ARSH: 1}
CONDITIONS = [op for op in JmpOp if op not in (JmpOp.JA, JmpOp.CALL, JmpOp.EXIT, JmpOp.JCOND)]


def _kfunc_ids() -> dict[int, str]:
    try:
        btf = vmlinux()
        return {btf.func_id(name): name for name in KFUNCS}
    except (BtfError, OSError):
        return {}


def roundtrip_program(kfuncs: dict[int, str], *, expanded: bool = False) -> Program:
    """An XDP program with every form bpftool 7.1 prints, all of it reachable and no branch
    decidable by the verifier: operands are reloaded from a map value before each use.
    `expanded` adds the forms the verifier expands into several instructions.

    r6 = &vals[8] (unknown data), r7 = the map, r0 an unknown accumulator.
    """
    a = Assembler()
    a.ld_map_value(R6, "vals", 8)
    a.ld_map(R7, "vals")
    a.emit(I.ld_imm64(R8, 0xFEDCBA9876543210))
    a.emit(I.ldx(DW, R0, R6, 0))
    load = lambda: a.emit(I.ldx(DW, R4, R6, 8), I.ldx(DW, R5, R6, 16))  # noqa: E731
    for make in (I.alu64, I.alu32):
        for op, imm in ALU_K.items():
            load()
            a.emit(make(op, R4, imm, reg=False))
            if op in ALU_X_KEPT or expanded:
                a.emit(make(op, R4, R5, reg=True))
            a.emit(I.alu64(AluOp.ADD, R0, R4, reg=True))
        a.emit(make(AluOp.NEG, R4, 0, reg=False))
    for bits in (16, 32, 64):
        a.emit(I.endian(R4, bits, big=False), I.endian(R5, bits, big=True))
    # Stack stores of every size, then loads of every size.
    load()
    a.emit(I.stx(DW, FP, R4, -16), I.stx(W, FP, R4, -20), I.stx(H, FP, R4, -22),
           I.stx(B, FP, R4, -23), I.st(DW, FP, -32, -2), I.st(W, FP, -36, 0x12345678),
           I.st(H, FP, -38, 0x7FFF), I.st(B, FP, -39, 0x42))
    a.emit(I.ldx(DW, R4, FP, -16), I.ldx(W, R5, FP, -20), I.ldx(H, R4, FP, -38),
           I.ldx(B, R5, FP, -39))
    # Atomics on the stack.
    for size, off in ((DW, -16), (W, -20)):
        for op in Atomic:
            if op in (Atomic.LOAD_ACQ, Atomic.STORE_REL):
                continue
            if (size, op) == (W, Atomic.CMPXCHG) and not expanded:
                continue
            a.emit(I.atomic(size, op, FP, R5, off))
    # Every condition, 64 and 32 bits, immediate and register: skip one instruction.
    for make in (I.jmp, I.jmp32):
        for op in CONDITIONS:
            for reg in (False, True):
                a.emit(I.ldx(DW, R2, R6, 24), I.ldx(DW, R3, R6, 32))
                skip = a.label(op.name)
                a.jump(op, R2, R3 if reg else -5, skip, reg=reg, wide=make is I.jmp32)
                a.emit(I.alu64(AluOp.ADD, R0, 1, reg=False))
                a.place(skip)
    # An if/else with an unconditional jump.
    other, join = a.label("else"), a.label("join")
    a.jump(JmpOp.JGT, R0, R4, other, reg=True)
    a.emit(I.alu64(AluOp.ADD, R0, 2, reg=False))
    a.goto(join)
    a.place(other)
    a.emit(I.alu64(AluOp.ADD, R0, 3, reg=False))
    a.place(join)
    # Calls: a bpf-to-bpf call, a plain helper, a map helper, kfuncs.
    sub = a.label("sub")
    a.emit(I.mov64(R1, R0))
    a.call(sub)
    a.emit(I.call_helper(Helper.ktime_get_ns))
    a.emit(I.st(W, FP, -4, 0), I.mov64(R1, R7), I.mov64(R2, FP),
           I.alu64(AluOp.ADD, R2, -4, reg=False), I.mov64(R3, R6),
           I.alu64(AluOp.ADD, R3, -8, reg=False), I.mov64_imm(R4, 0))
    a.emit(I.call_helper(Helper.map_update_elem))
    for btf_id in kfuncs:
        a.emit(I.call_kfunc(btf_id))
    a.emit(I.mov64_imm(R0, XdpAction.PASS), I.exit_())
    a.place(sub)
    a.emit(I.mov64(R0, R1), I.alu64(AluOp.ADD, R0, 1, reg=False), I.exit_())
    return a.assemble()


def _bpftool_xlated(prog: Prog) -> list[str]:
    assert BPFTOOL is not None
    out = subprocess.run([BPFTOOL, "prog", "dump", "xlated", "id", str(prog.id)],
                         capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    assert all(LINE.match(x) for x in lines), f"unexpected bpftool output:\n{out}"
    return lines


@pytest.fixture
def oracle() -> None:
    """Skip unless bpftool can dump translated programs with kernel symbols."""
    if BPFTOOL is None:
        pytest.skip("bpftool is not installed (make test installs it)")
    with open("/proc/sys/net/core/bpf_jit_harden") as f:
        if f.read().strip() == "2":
            pytest.skip("bpf_jit_harden=2 blinds constants in the translated program")
    with open("/proc/sys/net/core/bpf_jit_enable") as f:
        if f.read().strip() == "0":
            pytest.skip("bpf-to-bpf calls print with their JIT symbol only when JIT is on")


def _load(p: Program) -> tuple[Map, Prog, list[Insn]]:
    vals = Map.create(MapSpec(MapType.ARRAY, 4, 64, 1, name="rt_vals"))
    insns = p.resolve({"vals": vals.fd})
    return vals, Prog.load(ProgType.XDP, insns, name="roundtrip", source=p), insns


@pytest.mark.kernel
def test_roundtrip_against_bpftool(oracle: None) -> None:
    kfuncs = _kfunc_ids()
    p = roundtrip_program(kfuncs)
    vals, prog, insns = _load(p)
    with vals, prog:
        fd, map_id = vals.fd, vals.id
        xlated = prog.xlated()
        theirs = _bpftool_xlated(prog)
    assert len(xlated) == len(insns), "the verifier inserted or removed instructions"

    # Our map fd is the kernel's map id in the dump.
    def map_name(first: Insn, second: Insn) -> str:
        assert first.imm == fd
        if first.src == Pseudo.MAP_VALUE:
            return f"map[id:{map_id}][0]+{second.imm}"
        return f"map[id:{map_id}]"

    ours = disasm.disassemble(insns, map_name=map_name, kfunc_name=kfuncs.get).splitlines()
    expected = [_as_bpftool_prints(line, insns, xlated, kfuncs) for line in ours]
    # A pattern (a call's JIT symbol) that matches stands for the line it matched.
    expected = [got if isinstance(want, re.Pattern) and want.fullmatch(got) else
                getattr(want, "pattern", want) for want, got in zip(expected, theirs,
                                                                    strict=False)]
    assert theirs == expected
    # Underneath the text, every instruction the verifier does not rewrite is ours unchanged.
    rewritten = _rewritten(insns)
    for i, (mine, kept) in enumerate(zip(insns, xlated, strict=True)):
        if i not in rewritten:
            assert kept == mine, f"insn {i}"
    # The program covers what it claims.
    assert _coverage() <= {x.opcode for x in insns}
    atomics = {(x.opcode, x.imm) for x in insns if x.opcode & 0xE7 == I.STX | I.ATOMIC}
    assert len(atomics) == 2 * 10 - 1  # all but the 32-bit cmpxchg
    assert kfuncs, "no kfunc found in vmlinux BTF to call"


def _coverage() -> set[int]:
    """Opcodes the round-trip program must contain."""
    want = {I.LD | I.IMM | DW, I.JMP | JmpOp.JA, I.JMP | JmpOp.CALL, I.JMP | JmpOp.EXIT,
            I.ALU | AluOp.NEG, I.ALU64 | AluOp.NEG, I.ALU | AluOp.END | I.TO_LE,
            I.ALU | AluOp.END | I.TO_BE, I.STX | I.ATOMIC | W, I.STX | I.ATOMIC | DW}
    for cls in (I.ALU, I.ALU64):
        want |= {cls | op | I.K for op in ALU_K} | {cls | op | I.X for op in ALU_X_KEPT}
    for cls in (I.JMP, I.JMP32):
        want |= {cls | op | src for op in CONDITIONS for src in (I.K, I.X)}
    for size in (B, H, W, DW):
        want |= {I.LDX | I.MEM | size, I.ST | I.MEM | size, I.STX | I.MEM | size}
    return want


def _rewritten(insns: list[Insn]) -> set[int]:
    """Indexes whose imm the verifier rewrites: map loads (fd -> id) and calls (-> address)."""
    out = set()
    for i, x in enumerate(insns):
        if x.is_ld_imm64 and x.src in (Pseudo.MAP_FD, Pseudo.MAP_VALUE):
            out.add(i)
        if x.opcode == I.JMP | JmpOp.CALL:
            out.add(i)
    return out


def _as_bpftool_prints(line: str, insns: list[Insn], xlated: list[Insn],
                       kfuncs: dict[int, str]) -> str | re.Pattern:
    """Our line, with the verifier's documented rewrites applied the way bpftool shows them.

    1. A helper call's imm becomes the helper's address relative to __bpf_call_base; bpftool
       prints the kernel symbol there (for map helpers: the map type's operation) and that imm.
    2. A kfunc call's imm becomes the function's address in the same way; the symbol is the
       kfunc's own name.
    3. A bpf-to-bpf call keeps its pc-relative distance in `off` (imm becomes the subprogram's
       index) and bpftool appends the JITed subprogram's symbol, bpf_prog_<tag>_<name>.
    Everything else must be identical.
    """
    m = LINE.match(line)
    assert m, line
    i = int(m.group(1))
    x, k = insns[i], xlated[i]
    if x.opcode != I.JMP | JmpOp.CALL:
        return line
    head = f"{i:4d}: (85) call "
    if x.src == Pseudo.CALL:
        assert k.off == x.imm
        return re.compile(re.escape(f"{head}pc{x.imm:+d}#") + r"bpf_prog_[0-9a-f]{16}_\w+")
    if x.src == Pseudo.KFUNC_CALL:
        return f"{head}{kfuncs[x.imm]}#{k.imm}"
    return f"{head}{HELPER_SYMBOLS[Helper(x.imm)]}#{k.imm}"


@pytest.mark.kernel
def test_xlated_disassembly_matches_bpftool(oracle: None) -> None:
    """Our disassembly of what the kernel holds (with the verifier's own insertions: division
    guards, zero-extension) is bpftool's, but for the names of call targets."""
    p = roundtrip_program(_kfunc_ids(), expanded=True)
    vals, prog, insns = _load(p)
    with vals, prog:
        xlated = prog.xlated()
        theirs = _bpftool_xlated(prog)
    assert len(xlated) > len(insns)  # the guards are there
    ours = disasm.disassemble(xlated).splitlines()
    call = re.compile(r"^( *\d+: \(85\) call )(pc[+-]\d+|[\w-]+)(#.*)?$")

    def target_free(lines: list[str], fix: Callable[[re.Match], str]) -> list[str]:
        return [call.sub(fix, x) for x in lines]

    # Helper and kfunc calls: keep `#imm`, drop the symbol (bpftool resolves kernel addresses).
    # A bpf-to-bpf call: bpftool prints pc+off#symbol from `off`; ours prints imm, which the
    # kernel has turned into the subprogram index; compare the distance with `off` instead.
    offs = {i: k.off for i, k in enumerate(xlated) if k.opcode == I.JMP | JmpOp.CALL
            and k.src == Pseudo.CALL}

    def ours_fix(m: re.Match) -> str:
        i = int(m.group(1).split(":")[0])
        if i in offs:
            return f"{m.group(1)}pc{offs[i]:+d}"
        return f"{m.group(1)}<sym>{m.group(3)}"

    def theirs_fix(m: re.Match) -> str:
        if m.group(2).startswith("pc"):
            return f"{m.group(1)}{m.group(2)}"
        return f"{m.group(1)}<sym>{m.group(3)}"

    assert target_free(ours, ours_fix) == target_free(theirs, theirs_fix)
