"""The assembler: labels, branch layout (far forms), calls, map relocations, origins, comments;
and (with root) far branches and calls proven by the kernel running them."""

from __future__ import annotations

import pytest

from bpfilter.bpf import insn as I
from bpfilter.bpf.asm import S16_MAX, AsmError, Assembler, Origin, Program, Reloc
from bpfilter.bpf.consts import Helper, MapType, ProgType
from bpfilter.bpf.insn import DW, R0, R1, R2, R3, R6, AluOp, EncodeError, Insn, JmpOp, Pseudo, W
from bpfilter.bpf.maps import Map, MapSpec, u32
from bpfilter.bpf.prog import Prog

FILLER = I.alu64(AluOp.ADD, R1, 1, reg=False)


def target(insns: list[Insn], i: int) -> int:
    """Where the jump or local call at index `i` goes."""
    x = insns[i]
    if x.opcode == I.JMP32 | JmpOp.JA or x.opcode == I.JMP | JmpOp.CALL:
        return i + 1 + x.imm
    return i + 1 + x.off


def fill(a: Assembler, n: int) -> None:
    for _ in range(n):
        a.emit(FILLER)


# --- labels ------------------------------------------------------------------------------------

def test_forward_and_backward_labels() -> None:
    a = Assembler()
    top = a.here("top")
    a.emit(I.mov64_imm(R0, 0))
    end = a.label("end")
    a.jump(JmpOp.JGT, R0, 5, end)  # 1: forward
    a.emit(FILLER)  # 2
    a.jump(JmpOp.JNE, R1, R2, top, reg=True)  # 3: backward to 0
    a.goto(top)  # 4
    a.place(end)
    a.emit(I.exit_())  # 5
    p = a.assemble()
    assert p.insns[1] == I.jmp(JmpOp.JGT, R0, 5, 3, reg=False)
    assert p.insns[3] == I.jmp(JmpOp.JNE, R1, R2, -4, reg=True)
    assert p.insns[4] == I.ja(-5)
    assert [target(p.insns, i) for i in (1, 3, 4)] == [5, 0, 0]
    assert p.labels == {"top": 0, "end": 5}
    assert len(p) == 6


def test_wide_branch_is_jmp32() -> None:
    a = Assembler()
    lab = a.label()
    a.jump(JmpOp.JSLT, R1, -1, lab, wide=True)
    a.place(lab)
    a.emit(I.exit_())
    assert a.assemble().insns[0] == I.jmp32(JmpOp.JSLT, R1, -1, 0, reg=False)


def test_label_at_ld_imm64_and_two_labels_same_place() -> None:
    a = Assembler()
    x, y = a.label("x"), a.label("y")
    a.goto(y)
    a.place(x)
    a.place(y)
    a.emit(I.ld_imm64(R1, 1 << 40))
    a.goto(x)
    p = a.assemble()
    assert target(p.insns, 0) == 1 and target(p.insns, 3) == 1
    assert p.labels == {"x": 1, "y": 1}


def test_label_placed_twice() -> None:
    a = Assembler()
    lab = a.label("again")
    a.place(lab)
    with pytest.raises(AsmError, match="'again' placed twice"):
        a.place(lab)


def test_label_never_placed() -> None:
    a = Assembler()
    a.goto(a.label("nowhere"))
    a.emit(I.exit_())
    with pytest.raises(AsmError, match="'nowhere' is used but never placed"):
        a.assemble()
    b = Assembler()
    b.call(b.label("no_such_sub"))
    with pytest.raises(AsmError, match="no_such_sub"):
        b.assemble()


def test_bad_branches_are_refused_where_written() -> None:
    a = Assembler()
    lab = a.label()
    for op in (JmpOp.CALL, JmpOp.EXIT, JmpOp.JCOND):
        with pytest.raises(AsmError, match=op.name):
            a.jump(op, R0, 0, lab)
    with pytest.raises(EncodeError, match="imm 4294967295"):
        a.jump(JmpOp.JEQ, R0, 0xFFFFFFFF, lab)  # a 64-bit compare would mean -1
    a.jump(JmpOp.JEQ, R0, 0xFFFFFFFF, lab, wide=True)  # fine for a 32-bit compare
    with pytest.raises(AsmError, match="two-slot"):
        a.emit(I.ld_imm64(R1, 5)[0])


# --- far branches ------------------------------------------------------------------------------

def _far(op: JmpOp | None, n: int, *, backward: bool = False,
         wide: bool = False) -> tuple[Program, int]:
    """A branch (None: goto) to label "far" over `n` filler instructions, forward or backward;
    returns the program and the branch's index. Every instruction is reachable."""
    a = Assembler()
    lab = a.label("far")
    a.emit(I.mov64_imm(R0, 0))
    if backward:
        start = a.label("start")
        a.goto(start)
        a.place(lab)
        a.emit(I.exit_())
        a.place(start)
        fill(a, n)
    elif op is None:
        skip = a.label("skip")
        a.jump(JmpOp.JEQ, R1, 0, skip)
    if op is None:
        a.goto(lab)
    else:
        a.jump(op, R1, 7, lab, wide=wide)
    if not backward:
        if op is None:
            a.place(skip)
        fill(a, n)
        a.place(lab)
    if not backward or op is not None:  # nothing can follow a backward goto
        a.emit(I.exit_())
    at = n + 3 if backward else (2 if op is None else 1)
    return a.assemble(), at


@pytest.mark.parametrize("backward", [False, True])
def test_far_conditional_branch(backward: bool) -> None:
    p, b = _far(JmpOp.JGT, 40000, backward=backward)
    # Inverted short branch over a gotol that carries the distance.
    assert p.insns[b] == I.jmp(JmpOp.JLE, R1, 7, 1, reg=False)
    assert p.insns[b + 1].opcode == I.JMP32 | JmpOp.JA
    assert target(p.insns, b) == b + 2  # the fall-through path continues after the pair
    assert target(p.insns, b + 1) == p.labels["far"]
    assert len(p) == 40000 + (6 if backward else 4)


def test_far_wide_branch_keeps_jmp32() -> None:
    p, b = _far(JmpOp.JSGE, 40000, wide=True)
    assert p.insns[b] == I.jmp32(JmpOp.JSLT, R1, 7, 1, reg=False)
    assert target(p.insns, b + 1) == p.labels["far"] == 40003


@pytest.mark.parametrize("backward", [False, True])
def test_far_goto_is_gotol(backward: bool) -> None:
    p, b = _far(None, 40000, backward=backward)
    assert p.insns[b] == I.gotol(p.labels["far"] - b - 1)
    assert p.labels["far"] == (2 if backward else 40003)
    assert len(p) == 40000 + 4


def test_far_jset() -> None:
    # JSET has no inverse: branch onto the gotol, otherwise hop over it.
    p, b = _far(JmpOp.JSET, 40000)
    assert p.insns[b : b + 3] == [I.jmp(JmpOp.JSET, R1, 7, 1, reg=False), I.ja(1),
                                  I.gotol(40000)]
    assert target(p.insns, b) == b + 2 and target(p.insns, b + 1) == b + 3
    assert target(p.insns, b + 2) == p.labels["far"] == 40004


def test_branch_range_boundary() -> None:
    # A distance of exactly S16_MAX still fits; one more needs the far form.
    fits, b = _far(JmpOp.JEQ, S16_MAX)
    assert fits.insns[b] == I.jmp(JmpOp.JEQ, R1, 7, S16_MAX, reg=False)
    grows, b = _far(JmpOp.JEQ, S16_MAX + 1)
    assert grows.insns[b].opcode == I.JMP | JmpOp.JNE and len(grows) == S16_MAX + 5
    back, b = _far(None, S16_MAX - 1, backward=True)  # distance -(n + 2) == S16_MIN fits
    assert back.insns[b] == I.ja(-(S16_MAX + 1))
    back, b = _far(None, S16_MAX, backward=True)
    assert back.insns[b] == I.gotol(-(S16_MAX + 2))


def test_growth_pushes_another_branch_out_of_range() -> None:
    # `outer` fits only while `inner` is short; inner's far form adds a slot, so outer grows too.
    a = Assembler()
    far, after = a.label("far"), a.label("after")
    a.jump(JmpOp.JEQ, R1, 0, after)  # outer: over inner and the filler
    a.jump(JmpOp.JEQ, R2, 0, far)  # inner
    fill(a, S16_MAX - 1)
    a.place(after)
    fill(a, 10)
    a.place(far)
    a.emit(I.exit_())
    # Without inner growing, outer's distance would be exactly S16_MAX; inner's distance is
    # S16_MAX + 9, so it grows to two slots and outer must follow.
    p = a.assemble()
    assert p.insns[0] == I.jmp(JmpOp.JNE, R1, 0, 1, reg=False)
    assert target(p.insns, 1) == p.labels["after"]
    assert p.insns[2] == I.jmp(JmpOp.JNE, R2, 0, 1, reg=False)
    assert target(p.insns, 3) == p.labels["far"] == len(p) - 1


# --- calls and relocations ---------------------------------------------------------------------

def test_bpf_to_bpf_call_offsets() -> None:
    a = Assembler()
    sub, early, main = a.label("sub"), a.label("early"), a.label("main")
    a.goto(main)
    a.place(early)
    a.emit(I.mov64_imm(R0, 1), I.exit_())  # 1, 2
    a.place(main)
    a.call(sub)  # 3: forward
    a.call(early)  # 4: backward
    a.emit(I.exit_())
    a.place(sub)
    a.emit(I.mov64_imm(R0, 2), I.exit_())  # 6
    p = a.assemble()
    assert p.insns[3] == I.call_local(2) and p.insns[4] == I.call_local(-4)
    assert (p.insns[3].src, target(p.insns, 3), target(p.insns, 4)) == (Pseudo.CALL, 6, 1)


def test_map_relocations_resolve() -> None:
    a = Assembler()
    a.ld_map(R1, "counters")
    a.emit(I.mov64_imm(R0, 0))
    a.ld_map_value(R2, ("cfg", 1), 24)
    a.ld_map(R3, "counters")
    a.emit(I.exit_())
    p = a.assemble()
    assert p.relocs == [Reloc(0, "counters", None), Reloc(3, ("cfg", 1), 24), Reloc(5,
                        "counters", None)]
    out = p.resolve({"counters": 7, ("cfg", 1): 9})
    assert out[0:2] == I.ld_map_fd(R1, 7)
    assert out[3:5] == I.ld_map_value(R2, 9, 24)
    assert out[5:7] == I.ld_map_fd(R3, 7)
    assert p.insns[0].imm == 0  # resolve() returns a copy
    with pytest.raises(AsmError, match=r"\('cfg', 1\) at insn 3"):
        p.resolve({"counters": 7})


# --- origins and comments ----------------------------------------------------------------------

def test_origins_map_every_instruction() -> None:
    r1 = Origin("-A INPUT -p tcp -j DROP", chain="INPUT", rule=1, file="rules.v4", line=7)
    r2 = Origin("-A INPUT -j ACCEPT", chain="INPUT", rule=2)
    a = Assembler()
    a.emit(I.mov64_imm(R0, 0))  # 0: no origin
    with a.origin(r1):
        skip = a.label("skip")
        a.jump(JmpOp.JEQ, R1, 6, skip)  # 1
        a.ld_map(R2, "m")  # 2, 3
        with a.origin(r2):
            a.place(skip)
            a.emit(I.ld_imm64(R1, 3))  # 4, 5
        a.emit(FILLER)  # 6: back to r1
    a.emit(I.exit_())  # 7: no origin
    p = a.assemble()
    assert p.origins == [None, r1, r1, r1, r2, r2, r1, None]
    assert [p.origin_of(i) for i in range(8)] == [None, r1, r1, r1, r2, r2, r1, r1]
    assert p.origin_of(100) == r1  # past the end: the last one known
    assert str(r1) == "-A INPUT -p tcp -j DROP (rules.v4:7)" and str(r2) == "-A INPUT -j ACCEPT"
    assert p.comments == {1: [str(r1)], 4: [str(r2)]}


def test_origins_cover_far_branch_expansions() -> None:
    o = Origin("far")
    a = Assembler()
    lab = a.label()
    with a.origin(o):
        a.jump(JmpOp.JSET, R1, 1, lab)
    fill(a, 40000)
    a.place(lab)
    a.emit(I.exit_())
    p = a.assemble()
    assert p.origins[:4] == [o, o, o, None] and len(p.origins) == len(p)


def test_comments_attach_to_next_instruction() -> None:
    a = Assembler()
    a.comment("first")
    a.comment("second")
    lab = a.here("l")  # a label in between does not take the comments
    a.emit(I.mov64_imm(R0, 0))
    a.emit(FILLER)
    a.comment("before jump")
    a.jump(JmpOp.JEQ, R1, 0, lab)
    a.comment("before ld")
    a.ld_map_value(R1, "m")
    a.emit(I.exit_())
    p = a.assemble()
    assert p.comments == {0: ["first", "second"], 2: ["before jump"], 3: ["before ld"]}


def test_assemble_twice_gives_the_same_program() -> None:
    a = Assembler()
    lab = a.label("l")
    a.goto(lab)
    a.comment("unreachable")  # the instruction goes, its comment stays with what follows
    a.emit(FILLER)
    a.place(lab)
    a.emit(I.exit_())
    first, second = a.assemble(), a.assemble()
    assert first == second
    assert first.comments == {1: ["unreachable"]}


def test_dangling_comment() -> None:
    a = Assembler()
    a.emit(I.exit_())
    a.comment("trailing")
    with pytest.raises(AsmError, match="'trailing'"):
        a.assemble()


# --- the kernel runs it ------------------------------------------------------------------------

def _socket_filter(p: Program, fds: dict | None = None) -> Prog:
    return Prog.load(ProgType.SOCKET_FILTER, p.resolve(fds or {}), name="asm_test", source=p)


@pytest.mark.kernel
def test_kernel_far_branches() -> None:
    """Far JGT, far JSET and a far backward goto, each over 40000 instructions, run right."""
    n = 40000
    a = Assembler()
    far_a, far_b, mid, back = (a.label(x) for x in ("far_a", "far_b", "mid", "back"))
    a.emit(I.ldx(W, R2, R1, 0), I.mov64_imm(R1, 0))  # r2 = skb->len, unknown to the verifier
    a.jump(JmpOp.JGT, R2, 1000, far_a)
    a.jump(JmpOp.JSET, R2, 0x100, far_b)
    a.goto(mid)
    a.place(back)
    a.emit(I.mov64(R0, R1), I.exit_())
    a.place(mid)
    fill(a, n)
    a.goto(back)
    a.place(far_a)
    a.emit(I.mov64_imm(R0, 7), I.exit_())
    a.place(far_b)
    a.emit(I.mov64_imm(R0, 9), I.exit_())
    p = a.assemble()
    gotols = [i for i, x in enumerate(p.insns) if x.opcode == I.JMP32 | JmpOp.JA]
    assert len(gotols) == 3  # both conditionals and the backward goto are far
    with _socket_filter(p) as prog:
        assert prog.run(bytes(64)).retval == n  # falls through, runs the filler, goes back
        assert prog.run(bytes(300)).retval == 9  # 300 & 0x100
        assert prog.run(bytes(1500)).retval == 7  # 1500 > 1000


@pytest.mark.kernel
def test_kernel_calls_and_map_relocation() -> None:
    """A bpf-to-bpf call (forward) returns into the caller; an ld_map relocation reaches the map."""
    with Map.create(MapSpec(MapType.ARRAY, 4, 8, 1, name="asm_test")) as m:
        m.update(u32(0), (1000).to_bytes(8, "little"))
        a = Assembler()
        double = a.label("double")
        a.emit(I.st(W, I.FP, -4, 0), I.mov64(R2, I.FP), I.alu64(AluOp.ADD, R2, -4, reg=False))
        a.ld_map(R1, "m")
        a.emit(I.call_helper(Helper.map_lookup_elem))
        fail = a.label("fail")
        a.jump(JmpOp.JEQ, R0, 0, fail)
        a.emit(I.ldx(DW, R6, R0, 0))  # 1000
        a.emit(I.mov64_imm(R1, 21))
        a.call(double)
        a.emit(I.alu64(AluOp.ADD, R0, R6, reg=True), I.exit_())  # 42 + 1000
        a.place(fail)
        a.emit(I.mov64_imm(R0, 1), I.exit_())
        a.place(double)
        a.emit(I.mov64(R0, R1), I.alu64(AluOp.MUL, R0, 2, reg=False), I.exit_())
        with _socket_filter(a.assemble(), {"m": m.fd}) as prog:
            assert prog.run(bytes(64)).retval == 1042
