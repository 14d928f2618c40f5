"""Small code pieces every rule and verdict uses: counting a rule, recording who decided."""

from __future__ import annotations

from ..bpf import insn as I
from ..bpf.asm import Assembler, Label
from ..bpf.consts import Helper
from ..bpf.insn import AluOp, JmpOp
from . import layout as L
from .compiled import COUNTERS


def count(a: Assembler, slot: int) -> None:
    """counters[slot].packets += 1, .bytes += the datagram's length (per CPU)."""
    a.emit(I.st(I.W, L.R_PKT, L.SLOTKEY, slot))
    bump_counter(a)


def count_reg(a: Assembler, reg: int) -> None:
    """Like _count, for the slot held in `reg` (clobbers r1-r5)."""
    a.emit(I.stx(I.W, L.R_PKT, reg, L.SLOTKEY))
    bump_counter(a)


def bump_counter(a: Assembler) -> None:
    """Bump the counter whose slot is the u32 at SLOTKEY in the packet struct."""
    skip = a.label("nocount")
    a.emit(I.mov64(I.R2, L.R_PKT), I.alu64(AluOp.ADD, I.R2, L.SLOTKEY, reg=False))
    a.ld_map(I.R1, COUNTERS)
    a.emit(I.call_helper(Helper.map_lookup_elem))
    a.jump(JmpOp.JEQ, I.R0, 0, skip)
    a.emit(I.ldx(I.DW, I.R1, I.R0, 0), I.alu64(AluOp.ADD, I.R1, 1, reg=False),
           I.stx(I.DW, I.R0, I.R1, 0))
    a.emit(I.ldx(I.H, I.R1, L.R_PKT, L.IPLEN), I.ldx(I.DW, I.R2, I.R0, 8),
           I.alu64(AluOp.ADD, I.R2, I.R1, reg=True), I.stx(I.DW, I.R0, I.R2, 8))
    a.place(skip)


def decide_slot(a: Assembler) -> None:
    """Decider = the counter slot in the high half of the action word in r7."""
    a.emit(I.mov64(I.R1, I.R7), I.alu64(AluOp.RSH, I.R1, 32, reg=False))
    a.emit(I.stx(I.W, L.R_PKT, I.R1, L.DECIDER))


def decide(a: Assembler, slot: int) -> None:
    """Decider = `slot`."""
    a.emit(I.st(I.W, L.R_PKT, L.DECIDER, slot))


def finish(a: Assembler, v: int, verdict: Label, main: bool) -> None:
    """Return verdict `v`: through the epilogue in the main program, at once in a chain."""
    a.emit(I.mov64_imm(I.R0, v))
    if main:
        a.goto(verdict)
    else:
        a.emit(I.exit_())
