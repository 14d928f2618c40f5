"""Small programs the kernel tests load: a packet counter that returns a fixed verdict."""

from __future__ import annotations

from bpfilter.bpf import insn as I
from bpfilter.bpf.asm import Assembler
from bpfilter.bpf.asm import Program as AsmProgram
from bpfilter.bpf.consts import AttachType, Helper, MapType, ProgType
from bpfilter.bpf.insn import Atomic, JmpOp
from bpfilter.bpf.maps import Map, MapSpec, u32
from bpfilter.bpf.prog import Prog

COUNTER_SLOTS = 8

# Program types whose loads must name their attach point.
_ATTACH_TYPES = {ProgType.NETFILTER: AttachType.NETFILTER}


def counter_map(name: str = "counters") -> Map:
    """An array of u64 counters, one per slot."""
    return Map.create(MapSpec(MapType.ARRAY, 4, 8, COUNTER_SLOTS, name=name))


def counting_asm(slot: int, verdict: int) -> AsmProgram:
    """counters[slot] += 1 atomically, then return `verdict` (map relocation key "counters")."""
    a = Assembler()
    a.emit(I.st(I.W, I.FP, -4, slot))
    a.emit(I.mov64(I.R2, I.FP), I.alu64(I.AluOp.ADD, I.R2, -4, reg=False))
    a.ld_map(I.R1, "counters")
    a.emit(I.call_helper(Helper.map_lookup_elem))
    done = a.label("done")
    a.jump(JmpOp.JEQ, I.R0, 0, done)
    a.emit(I.mov64_imm(I.R1, 1), I.atomic(I.DW, Atomic.ADD, I.R0, I.R1, 0))
    a.place(done)
    a.emit(I.mov64_imm(I.R0, verdict), I.exit_())
    return a.assemble()


def counting_prog(prog_type: ProgType, counters: Map, slot: int, verdict: int, *,
                  attach_type: AttachType | None = None) -> Prog:
    """Load a counting program of `prog_type` that counts in `counters[slot]`."""
    src = counting_asm(slot, verdict)
    return Prog.load(prog_type, src.resolve({"counters": counters.fd}),
                     name=f"count{slot}", source=src,
                     attach_type=attach_type or _ATTACH_TYPES.get(prog_type))


def count(counters: Map, slot: int) -> int:
    """The value of one counter."""
    raw = counters.lookup(u32(slot))
    assert raw is not None
    return int.from_bytes(raw, "little")
