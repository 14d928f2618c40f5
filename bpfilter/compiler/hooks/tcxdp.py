"""tc (tcx) and XDP programs on one interface."""

from __future__ import annotations

from dataclasses import dataclass

from ...bpf import insn as I
from ...bpf.asm import Assembler
from ...bpf.consts import AttachType, Helper, ProgType, TcAction, XdpAction
from ...bpf.insn import AluOp
from ...ir.pred import Field
from .. import layout as L
from .base import HookPoint, Verdict
from .l2 import EthernetFlavour

SKB_MARK = 8  # offsetof(struct __sk_buff, mark)


@dataclass
class TcFlavour(EthernetFlavour):
    """tcx ingress or egress programs (BPF_PROG_TYPE_SCHED_CLS)."""

    name: str = "tc"
    prog_type: ProgType = ProgType.SCHED_CLS
    # Loaded without an expected attach type: tcx links do not need one, and one prog array
    # holds the ingress and egress programs, which the kernel only allows when they agree.
    attach_type: AttachType | None = None

    @property
    def link_attach_type(self) -> AttachType:
        """The tcx side a link of this flavour attaches to."""
        return AttachType.TCX_EGRESS if self.egress else AttachType.TCX_INGRESS

    def chains(self, table: str) -> dict[str, HookPoint]:
        """INPUT at tcx ingress, OUTPUT at tcx egress."""
        if table != "filter":
            return {}
        return {"INPUT": HookPoint("INPUT"), "OUTPUT": HookPoint("OUTPUT", egress=True)}

    def verdict_code(self, verdict: Verdict) -> int:
        """ACCEPT lets the next tcx program (or the stack) decide; DROP drops."""
        return TcAction.NEXT if verdict == Verdict.ACCEPT else TcAction.SHOT

    def emit_setup(self, a: Assembler) -> None:
        """Keep the __sk_buff context in r6."""
        a.emit(I.mov64(L.R_CTX, I.R1))

    def emit_load(self, a: Assembler, off_reg: int, dst: int, length: int | None,
                  len_reg: int | None = None) -> None:
        """bpf_skb_load_bytes(skb, off, r9 + dst, len)."""
        a.emit(I.mov64(I.R1, L.R_CTX), I.mov64(I.R2, off_reg))
        a.emit(I.mov64(I.R3, L.R_PKT), I.alu64(AluOp.ADD, I.R3, dst, reg=False))
        if len_reg is not None:
            a.emit(I.mov64(I.R4, len_reg))
        else:
            a.emit(I.mov64_imm(I.R4, length or 0))
        a.emit(I.call_helper(Helper.skb_load_bytes))

    def emit_mark(self, a: Assembler) -> None:
        """skb->mark from the context."""
        a.emit(I.ldx(I.W, I.R1, L.R_CTX, SKB_MARK), I.stx(I.W, L.R_PKT, I.R1, L.MARK))

    def emit_store_mark(self, a: Assembler) -> bool:
        """skb->mark is writable from tc programs."""
        a.emit(I.ldx(I.W, I.R1, L.R_PKT, L.MARK), I.stx(I.W, L.R_CTX, I.R1, SKB_MARK))
        return True


@dataclass
class XdpFlavour(EthernetFlavour):
    """XDP programs: ingress only, before the stack allocates an skb."""

    name: str = "xdp"
    prog_type: ProgType = ProgType.XDP
    attach_type: AttachType | None = AttachType.XDP

    def verdict_code(self, verdict: Verdict) -> int:
        """XDP_PASS or XDP_DROP."""
        return XdpAction.PASS if verdict == Verdict.ACCEPT else XdpAction.DROP

    def emit_setup(self, a: Assembler) -> None:
        """Keep the xdp_md context in r6."""
        a.emit(I.mov64(L.R_CTX, I.R1))

    def emit_load(self, a: Assembler, off_reg: int, dst: int, length: int | None,
                  len_reg: int | None = None) -> None:
        """bpf_xdp_load_bytes(xdp, off, r9 + dst, len)."""
        a.emit(I.mov64(I.R1, L.R_CTX), I.mov64(I.R2, off_reg))
        a.emit(I.mov64(I.R3, L.R_PKT), I.alu64(AluOp.ADD, I.R3, dst, reg=False))
        if len_reg is not None:
            a.emit(I.mov64(I.R4, len_reg))
        else:
            a.emit(I.mov64_imm(I.R4, length or 0))
        a.emit(I.call_helper(Helper.xdp_load_bytes))

    def unsupported_field(self, f: Field) -> str | None:
        """XDP runs before an skb exists: there is no mark yet."""
        if f is Field.MARK:
            return "XDP programs run before the packet has a mark"
        return None
