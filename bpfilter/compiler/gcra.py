"""One try of the GCRA compare-and-swap that `-m limit` and hashlimit's packet buckets share.

The bucket is one u64, the theoretical arrival time `tat`: a packet at `now` conforms if
tat <= now + tau, and moves tat to max(tat, now) + interval. CPUs race on the word, so each
caller retries a bounded number of times.
"""

from __future__ import annotations

from ..bpf import insn as I
from ..bpf.asm import Assembler, Label
from ..bpf.insn import AluOp, JmpOp


def emit_try(a: Assembler, tau: int, interval: int, over: Label, conform: Label) -> None:
    """r2: the bucket, r3: now, r0: the arrival time to judge, r1: the word the swap expects.
    Jumps to `over` without credit, to `conform` when the swap took; falls through with r0 =
    the word another CPU wrote. Clobbers r5."""
    later = a.label("gcra_later")
    a.emit(I.ld_imm64(I.R5, tau), I.alu64(AluOp.ADD, I.R5, I.R3, reg=True))
    a.jump(JmpOp.JGT, I.R0, I.R5, over, reg=True)  # no credit left
    a.emit(I.mov64(I.R5, I.R3))
    a.jump(JmpOp.JGE, I.R3, I.R0, later, reg=True)
    a.emit(I.mov64(I.R5, I.R0))
    a.place(later)
    a.emit(I.ld_imm64(I.R0, interval), I.alu64(AluOp.ADD, I.R5, I.R0, reg=True))
    a.emit(I.mov64(I.R0, I.R1))
    a.emit(I.atomic(I.DW, I.Atomic.CMPXCHG, I.R2, I.R5, 0))
    a.jump(JmpOp.JEQ, I.R0, I.R1, conform, reg=True)
