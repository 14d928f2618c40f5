"""Dispatchers: the small programs that stay attached while rulesets are replaced under them.

A dispatcher reads the generation word of its family from the one-entry `gen` array map (direct
map-value load, no helper call) and tail-calls `progs[gen * GEN_STRIDE + slot]`. Replacing a
ruleset fills the other generation's slots and flips the word with one map write, so every hook
of that family switches at once. If a slot is empty the dispatcher falls through and accepts: an
empty slot means no ruleset, and the runtime never leaves a live slot empty.
"""

from __future__ import annotations

from ..bpf import insn as I
from ..bpf.asm import Assembler, Origin, Program
from ..bpf.consts import Helper
from ..bpf.insn import AluOp, JmpOp
from ..ir.model import Family

GEN_MAP, PROGS_MAP = "gen", "progs"
FAMILY_STRIDE = 32  # slots per family
GEN_STRIDE = 2 * FAMILY_STRIDE  # slots per generation
PROG_ARRAY_SIZE = 2 * GEN_STRIDE

# Built-in chains that can have a program, in slot order within a family.
TABLE_CHAINS: tuple[tuple[str, str], ...] = (
    ("filter", "INPUT"), ("filter", "FORWARD"), ("filter", "OUTPUT"),
    ("mangle", "PREROUTING"), ("mangle", "INPUT"), ("mangle", "FORWARD"), ("mangle", "OUTPUT"),
    ("mangle", "POSTROUTING"), ("raw", "PREROUTING"), ("raw", "OUTPUT"),
    ("security", "INPUT"), ("security", "FORWARD"), ("security", "OUTPUT"),
    # tc only: the nat table's programs at ingress (PREROUTING tail-calls POSTROUTING, which
    # tail-calls INPUT for a connection delivered here; INPUT last: earlier slots keep their
    # numbers).
    ("nat", "PREROUTING"), ("nat", "POSTROUTING"), ("nat", "INPUT"),
)

ETH_P_IP, ETH_P_IPV6 = 0x0800, 0x86DD
SKB_PROTOCOL = 16  # offsetof(struct __sk_buff, protocol), network byte order


def family_index(family: Family) -> int:
    """0 for IPv4, 1 for IPv6: the family's word in `gen` and block of slots."""
    return 0 if family is Family.IPV4 else 1


def slot_id(family: Family, table: str, chain: str) -> int:
    """The slot (within a generation) of a built-in chain's program."""
    return family_index(family) * FAMILY_STRIDE + TABLE_CHAINS.index((table, chain))


def _be16(v: int) -> int:
    return int.from_bytes(v.to_bytes(2, "big"), "little")


def _tail(a: Assembler, fam_reg_const: int | None, chain_idx: int, accept: int) -> None:
    """r3 = gen[family] * GEN_STRIDE + family * FAMILY_STRIDE + chain_idx; tail call; accept.

    With `fam_reg_const` None the family index is in r8 (chosen at run time).
    """
    a.ld_map_value(I.R1, GEN_MAP, 0)
    if fam_reg_const is None:
        a.emit(I.mov64(I.R2, I.R8), I.alu64(AluOp.LSH, I.R2, 2, reg=False))
        a.emit(I.alu64(AluOp.ADD, I.R1, I.R2, reg=True))
        a.emit(I.ldx(I.W, I.R3, I.R1, 0))
        a.emit(I.mov64(I.R2, I.R8), I.alu64(AluOp.MUL, I.R2, FAMILY_STRIDE, reg=False))
    else:
        a.emit(I.ldx(I.W, I.R3, I.R1, 4 * fam_reg_const))
        a.emit(I.mov64_imm(I.R2, fam_reg_const * FAMILY_STRIDE))
    a.emit(I.alu64(AluOp.AND, I.R3, 1, reg=False))
    a.emit(I.alu64(AluOp.MUL, I.R3, GEN_STRIDE, reg=False))
    a.emit(I.alu64(AluOp.ADD, I.R3, I.R2, reg=True))
    a.emit(I.alu64(AluOp.ADD, I.R3, chain_idx, reg=False))
    a.emit(I.mov64(I.R1, I.R6))
    a.ld_map(I.R2, PROGS_MAP)
    a.emit(I.call_helper(Helper.tail_call))
    a.emit(I.mov64_imm(I.R0, accept), I.exit_())


def nf_dispatcher(family: Family, table: str, chain: str, accept: int) -> Program:
    """Dispatcher of one netfilter hook (its family is fixed by the link)."""
    a = Assembler()
    with a.origin(Origin(f"dispatch {family.value} {table}/{chain}")):
        a.emit(I.mov64(I.R6, I.R1))
        _tail(a, family_index(family), TABLE_CHAINS.index((table, chain)), accept)
    return a.assemble()


def tc_dispatcher(chain: str, accept: int, table: str = "filter") -> Program:
    """Dispatcher of a tcx hook: the family comes from skb->protocol."""
    a = Assembler()
    with a.origin(Origin(f"dispatch tc {chain}")):
        out = a.label("other")
        a.emit(I.mov64(I.R6, I.R1), I.ldx(I.W, I.R2, I.R6, SKB_PROTOCOL))
        a.emit(I.mov64_imm(I.R8, 0))
        v4 = a.label("v4")
        a.jump(JmpOp.JEQ, I.R2, _be16(ETH_P_IP), v4)
        a.jump(JmpOp.JNE, I.R2, _be16(ETH_P_IPV6), out)
        a.emit(I.mov64_imm(I.R8, 1))
        a.place(v4)
        _tail(a, None, TABLE_CHAINS.index((table, chain)), accept)
        a.place(out)
        a.emit(I.mov64_imm(I.R0, accept), I.exit_())
    return a.assemble()


def xdp_dispatcher(accept: int) -> Program:
    """Dispatcher of an XDP hook: the family comes from the ethertype (after up to 2 VLAN tags)."""
    a = Assembler()
    with a.origin(Origin("dispatch xdp INPUT")):
        out = a.label("other")
        a.emit(I.mov64(I.R6, I.R1))
        a.emit(I.ldx(I.W, I.R2, I.R6, 0), I.ldx(I.W, I.R3, I.R6, 4))  # data, data_end
        a.emit(I.mov64_imm(I.R8, 0))
        found = a.label("found")
        for off in (12, 16, 20):
            a.emit(I.mov64(I.R4, I.R2), I.alu64(AluOp.ADD, I.R4, off + 2, reg=False))
            a.jump(JmpOp.JGT, I.R4, I.R3, out, reg=True)
            a.emit(I.ldx(I.H, I.R5, I.R2, off))
            a.jump(JmpOp.JEQ, I.R5, _be16(ETH_P_IP), found)
            v6 = a.label("v6")
            a.jump(JmpOp.JEQ, I.R5, _be16(ETH_P_IPV6), v6)
            if off == 20:
                a.goto(out)
            else:
                nxt = a.label("vlan")
                a.jump(JmpOp.JEQ, I.R5, _be16(0x8100), nxt)
                a.jump(JmpOp.JNE, I.R5, _be16(0x88A8), out)
                a.place(nxt)
                a.goto(_after := a.label("next"))
            a.place(v6)
            a.emit(I.mov64_imm(I.R8, 1))
            a.goto(found)
            if off != 20:
                a.place(_after)
        a.place(found)
        _tail(a, None, TABLE_CHAINS.index(("filter", "INPUT")), accept)
        a.place(out)
        a.emit(I.mov64_imm(I.R0, accept), I.exit_())
    return a.assemble()


def neutral(accept: int) -> list[I.Insn]:
    """A program that accepts everything: stands in a live slot that has no chain program."""
    return [I.mov64_imm(I.R0, accept), I.exit_()]
