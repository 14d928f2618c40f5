"""tc (tcx) and XDP programs on one interface."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from ...bpf import insn as I
from ...bpf.asm import Assembler
from ...bpf.consts import (
    AttachType,
    Helper,
    ProgType,
    RedirectFlags,
    SkbStoreFlags,
    TcAction,
    XdpAction,
)
from ...bpf.insn import AluOp, JmpOp
from ...ir.pred import Field
from .. import layout as L
from .. import reject
from . import localtable
from .base import HookPoint, Verdict
from .l2 import EthernetFlavour

if TYPE_CHECKING:
    from ...matches.targets import Reject

SKB_MARK = 8  # offsetof(struct __sk_buff, mark)
SKB_IFINDEX = 40  # offsetof(struct __sk_buff, ifindex)
XDP_INGRESS_IFINDEX = 12  # offsetof(struct xdp_md, ingress_ifindex)


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

    load_helper: ClassVar[Helper] = Helper.skb_load_bytes

    def emit_mark(self, a: Assembler) -> None:
        """skb->mark from the context."""
        a.emit(I.ldx(I.W, I.R1, L.R_CTX, SKB_MARK), I.stx(I.W, L.R_PKT, I.R1, L.MARK))

    def emit_dev_ifindex(self, a: Assembler, side: str, reg: int) -> None:
        """The interface attached to is the input device at ingress, the output at egress."""
        if (side == "out") == self.egress:
            a.emit(I.ldx(I.W, reg, L.R_CTX, SKB_IFINDEX))
        else:
            a.emit(I.mov64_imm(reg, localtable.NO_DEV))

    def emit_store_mark(self, a: Assembler) -> bool:
        """skb->mark is writable from tc programs."""
        a.emit(I.ldx(I.W, I.R1, L.R_PKT, L.MARK), I.stx(I.W, L.R_CTX, I.R1, SKB_MARK))
        return True

    # -- REJECT: the reply leaves by the interface the packet came in on -------------------

    reply_load: ClassVar[Helper] = Helper.skb_load_bytes
    reply_store: ClassVar[Helper] = Helper.skb_store_bytes
    reply_store_flags: ClassVar[int] = SkbStoreFlags.RECOMPUTE_CSUM

    def emit_reject(self, a: Assembler, kinds: Sequence[Reject]) -> bool:
        """Rewrite the skb into the reply and redirect it (see compiler.reject)."""
        reject.emit_replies(a, self, kinds)
        return True

    def emit_resize(self, a: Assembler) -> None:
        """bpf_skb_change_tail(skb, r2, 0)."""
        a.emit(I.mov64(I.R1, L.R_CTX), I.mov64_imm(I.R3, 0))
        a.emit(I.call_helper(Helper.skb_change_tail))

    def emit_send(self, a: Assembler) -> None:
        """Out of the interface at ingress; back up into this host for a packet leaving it."""
        flags = RedirectFlags.INGRESS if self.egress else RedirectFlags.NONE
        a.emit(I.ldx(I.W, I.R1, L.R_CTX, SKB_IFINDEX), I.mov64_imm(I.R2, flags))
        a.emit(I.call_helper(Helper.redirect), I.exit_())


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

    load_helper: ClassVar[Helper] = Helper.xdp_load_bytes

    def emit_dev_ifindex(self, a: Assembler, side: str, reg: int) -> None:
        """The receiving interface; there is no output device yet."""
        if side == "in":
            a.emit(I.ldx(I.W, reg, L.R_CTX, XDP_INGRESS_IFINDEX))
        else:
            a.emit(I.mov64_imm(reg, localtable.NO_DEV))

    # -- REJECT: the reply is transmitted from the receive queue (XDP_TX) -----------------

    reply_load: ClassVar[Helper] = Helper.xdp_load_bytes
    reply_store: ClassVar[Helper] = Helper.xdp_store_bytes
    reply_store_flags: ClassVar[int] = 0

    def emit_reject(self, a: Assembler, kinds: Sequence[Reject]) -> bool:
        """Rewrite the frame into the reply and bounce it (see compiler.reject)."""
        reject.emit_replies(a, self, kinds)
        return True

    def emit_resize(self, a: Assembler) -> None:
        """Grow at the head (XDP guarantees headroom, not tailroom) or shrink at the tail."""
        grow, done = a.label("grow"), a.label("resized")
        a.emit(I.stx(I.DW, I.R10, I.R2, L.KEY_OFF))
        a.emit(I.mov64(I.R1, L.R_CTX), I.call_helper(Helper.xdp_get_buff_len))
        a.emit(I.ldx(I.DW, I.R2, I.R10, L.KEY_OFF), I.alu64(AluOp.SUB, I.R2, I.R0, reg=True))
        a.emit(I.mov64_imm(I.R0, 0))
        a.jump(JmpOp.JEQ, I.R2, 0, done)
        a.jump(JmpOp.JSGT, I.R2, 0, grow)
        a.emit(I.mov64(I.R1, L.R_CTX), I.call_helper(Helper.xdp_adjust_tail))
        a.goto(done)
        a.place(grow)
        a.emit(I.mov64(I.R1, L.R_CTX), I.neg64(I.R2), I.call_helper(Helper.xdp_adjust_head))
        a.place(done)

    def emit_send(self, a: Assembler) -> None:
        """XDP_TX: out of the interface the frame arrived on."""
        a.emit(I.mov64_imm(I.R0, XdpAction.TX), I.exit_())

    def unsupported_field(self, f: Field) -> str | None:
        """XDP runs before an skb exists: there is no mark yet."""
        if f is Field.MARK:
            return "XDP programs run before the packet has a mark"
        return super().unsupported_field(f)
