"""Code generation for predicates: generic over fields, the same on every hook flavour.

`emit_pred(pred, fail)` emits code that falls through when the predicate holds and jumps to
`fail` when it does not. Fields are read from the packet struct through r9; r1-r5 are scratch.
A *hotdrop* (netfilter drops the packet in the middle of a match) jumps to `hotdrop`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..bpf import insn as I
from ..bpf.asm import Assembler, Label
from ..bpf.consts import Helper
from ..bpf.insn import AluOp, JmpOp
from ..ir.model import Family
from ..ir.pred import (
    AllOf,
    AnyOf,
    Cmp,
    Connlimit,
    Const,
    EtherHeader,
    Field,
    HashLimit,
    NonFirstFragment,
    Not,
    Order,
    Pred,
    Proto,
    Range,
    RateLimit,
    Recent,
    RoutingHeader,
    SetLookup,
    TcpOption,
    TransportHeader,
)
from . import gcra
from . import layout as L
from .connlimit import emit_connlimit
from .layout import R_PKT
from .setgen import emit_set_lookup
from .statematch import StateError, emit_hashlimit, emit_recent

_SIZES = {1: I.B, 2: I.H, 4: I.W, 8: I.DW}
LIMITS_MAP = "limits"
LIMIT_RETRIES = 4
# Why a predicate type cannot be compiled, by type name (addrtype: lowered to RTDST instead).
_WHY_NOT: dict[str, str] = {}


class Unsupported(ValueError):
    """The predicate cannot be compiled for this hook (e.g. a field the hook cannot know)."""


@dataclass
class PredGen:
    """Emits predicate code into `asm` for one program."""

    asm: Assembler
    family: Family
    # Compile-time values of fields the hook knows statically (e.g. the interface of a tc
    # program); a predicate over such a field folds to a constant.
    static: dict[Field, bytes]
    # Offset of a rate limit's state in the limits map, by the limit's key.
    limits: Callable[[tuple], int] | None = None

    def emit(self, pred: Pred, fail: Label, hotdrop: Label) -> None:
        """Fall through if `pred` holds, jump to `fail` if not, to `hotdrop` on a hotdrop."""
        a = self.asm
        match pred:
            case Const(value=True):
                return
            case Const(value=False):
                a.goto(fail)
            case AllOf(preds=ps):
                for p in ps:
                    self.emit(p, fail, hotdrop)
            case AnyOf(preds=ps):
                self._any_of(ps, fail, hotdrop)
            case Not(pred=p):
                p_false = a.label("not")
                self.emit(p, p_false, hotdrop)
                a.goto(fail)
                a.place(p_false)
            case Cmp():
                self._cmp(pred, fail)
            case Range():
                self._range(pred, fail)
            case NonFirstFragment():
                a.emit(I.ldx(I.H, I.R1, R_PKT, L.FRAGOFF))
                a.jump(JmpOp.JEQ, I.R1, 0, fail)
            case TransportHeader(need=need, evil_frag=evil):
                self._transport(need.value, evil, fail, hotdrop)
            case Proto(proto=proto, negate=neg):
                if self.family is Family.IPV6:
                    a.emit(I.ldx(I.B, I.R1, R_PKT, L.V6ERR))
                    a.jump(JmpOp.JNE, I.R1, 0, hotdrop)
                if proto == 0:
                    return
                a.emit(I.ldx(I.B, I.R1, R_PKT, L.L4PROTO))
                a.jump(JmpOp.JEQ if neg else JmpOp.JNE, I.R1, proto, fail)
            case TcpOption(kind=kind):
                self._tcp_option(kind, fail, hotdrop)
            case RateLimit():
                self._rate_limit(pred, fail)
            case EtherHeader():
                a.emit(I.ldx(I.B, I.R1, R_PKT, L.ETHOK))
                a.jump(JmpOp.JEQ, I.R1, 0, fail)
            case SetLookup():
                emit_set_lookup(a, self.family, pred, fail)
            case RoutingHeader(reserved=False):
                a.emit(I.ldx(I.B, I.R1, R_PKT, L.RHSTATE))
                a.jump(JmpOp.JEQ, I.R1, 2, hotdrop)
                a.jump(JmpOp.JNE, I.R1, 1, fail)
            case RoutingHeader(reserved=True):
                a.emit(I.ldx(I.B, I.R1, R_PKT, L.RHRESOK))
                a.jump(JmpOp.JEQ, I.R1, 0, hotdrop)
                a.emit(I.ldx(I.W, I.R1, R_PKT, L.RHRES))
                a.jump(JmpOp.JNE, I.R1, 0, fail)
            case HashLimit():
                self._state(emit_hashlimit, pred, fail, hotdrop)
            case Recent():
                self._state(emit_recent, pred, fail, hotdrop)
            case Connlimit():
                self._state(emit_connlimit, pred, fail, hotdrop)
            case _:
                why = _WHY_NOT.get(type(pred).__name__)
                raise Unsupported(why or f"{type(pred).__name__} cannot be compiled here")

    # -- helpers -------------------------------------------------------------------------

    def _state(self, emit: Callable, pred: Pred, fail: Label, hotdrop: Label) -> None:
        try:
            emit(self.asm, self.family, pred, fail, hotdrop)
        except StateError as e:
            raise Unsupported(str(e)) from None

    def _static(self, field: Field) -> bytes | None:
        return self.static.get(field)

    def _load(self, field: Field, reg: int, *, host_order: bool) -> int:
        """Load a numeric field (width <= 4) into `reg`; returns its width in bits."""
        w = field.width
        if w not in (1, 2, 4):
            raise Unsupported(f"field {field.name} of {w} bytes is not numeric")
        self.asm.emit(I.ldx(_SIZES[w], reg, R_PKT, L.field_offset(field, self.family)))
        if host_order and w > 1 and field.order in (Order.NET, Order.BYTES):
            self.asm.emit(I.endian(reg, w * 8, big=True))
        return w * 8

    @staticmethod
    def _swap(value: int, width: int) -> int:
        """A host-order value as the little-endian load of its big-endian bytes."""
        return int.from_bytes(value.to_bytes(width, "big"), "little")

    def _cmp(self, c: Cmp, fail: Label) -> None:
        a = self.asm
        field = c.field
        static = self._static(field)
        if field.order is Order.BYTES:
            value = c.value if isinstance(c.value, bytes) else c.value.to_bytes(field.width, "big")
            mask = c.mask if c.mask is not None else b"\xff" * field.width
            if not isinstance(mask, bytes):
                mask = mask.to_bytes(field.width, "big")
            value, mask = value.ljust(field.width, b"\0"), mask.ljust(field.width, b"\0")
            if any(v & ~m & 0xFF for v, m in zip(value, mask, strict=False)):
                a.goto(fail)  # a value bit the mask clears can never be equalled
                return
            if static is not None:
                ok = all((s & m) == (v & m) for s, v, m in zip(static, value, mask, strict=False))
                if not ok:
                    a.goto(fail)
                return
            self._cmp_bytes(L.field_offset(field, self.family), value, mask, fail)
            return
        if static is not None:
            raise Unsupported(f"static numeric field {field.name}")
        width = field.width
        value = int(c.value)  # type: ignore[arg-type]
        mask = None if c.mask is None else int(c.mask)  # type: ignore[arg-type]
        full = (1 << (8 * width)) - 1
        if value & ~(full if mask is None else mask & full):
            a.goto(fail)  # (field & mask) == value cannot hold with value bits outside the mask
            return
        if mask is not None and mask & full == 0:
            return  # (field & 0) == 0: always true
        a.emit(I.ldx(_SIZES[width], I.R1, R_PKT, L.field_offset(field, self.family)))
        if field.order is Order.NET:
            value = self._swap(value & full, width)
            mask = None if mask is None else self._swap(mask & full, width)
        if mask is not None and mask & full != full:
            a.emit(I.alu32(AluOp.AND, I.R1, I.s32(mask & full), reg=False))
            value &= mask
        a.jump(JmpOp.JNE, I.R1, I.s32(value & full), fail, wide=True)

    def _cmp_bytes(self, off: int, value: bytes, mask: bytes, fail: Label) -> None:
        """Compare a byte string in 4-, 2- and 1-byte chunks, skipping unmasked ones."""
        a = self.asm
        pos = 0
        n = len(value)
        while pos < n:
            size = 4 if n - pos >= 4 else (2 if n - pos >= 2 else 1)
            m = int.from_bytes(mask[pos : pos + size], "little")
            v = int.from_bytes(value[pos : pos + size], "little") & m
            full = (1 << (8 * size)) - 1
            if m:
                a.emit(I.ldx(_SIZES[size], I.R1, R_PKT, off + pos))
                if m != full:
                    a.emit(I.alu32(AluOp.AND, I.R1, I.s32(m), reg=False))
                a.jump(JmpOp.JNE, I.R1, I.s32(v), fail, wide=True)
            pos += size

    def _range(self, r: Range, fail: Label) -> None:
        a = self.asm
        if r.field.width == 16:
            self._range_wide(r, fail)
            return
        bits = self._load(r.field, I.R1, host_order=True)
        full = (1 << bits) - 1
        lo, hi = max(r.lo, 0), min(r.hi, full)
        if lo > hi:
            a.goto(fail)
            return
        if lo > 0:
            a.jump(JmpOp.JLT, I.R1, I.s32(lo), fail, wide=True)
        if hi < full:
            a.jump(JmpOp.JGT, I.R1, I.s32(hi), fail, wide=True)

    def _range_wide(self, r: Range, fail: Label) -> None:
        """lo <= x <= hi for a 128-bit big-endian field, word by word."""
        a = self.asm
        off = L.field_offset(r.field, self.family)
        for bound, too_far, fine in ((r.lo, JmpOp.JLT, JmpOp.JGT), (r.hi, JmpOp.JGT, JmpOp.JLT)):
            done = a.label("rng")
            words = bound.to_bytes(16, "big")
            for i in range(4):
                w = int.from_bytes(words[4 * i : 4 * i + 4], "big")
                a.emit(I.ldx(I.W, I.R1, R_PKT, off + 4 * i), I.endian(I.R1, 32, big=True))
                a.jump(too_far, I.R1, I.s32(w), fail, wide=True)
                if i < 3:
                    a.jump(fine, I.R1, I.s32(w), done, wide=True)
            a.place(done)

    def _any_of(self, preds: tuple[Pred, ...], fail: Label, hotdrop: Label) -> None:
        a = self.asm
        ok = a.label("any")
        field = _common_numeric_field(preds)
        if field is not None and self._static(field) is None:
            # One load, then a compare per alternative.
            self._load(field, I.R1, host_order=True)
            for p in preds:
                if isinstance(p, Cmp):
                    a.jump(JmpOp.JEQ, I.R1, I.s32(int(p.value)), ok, wide=True)
                else:
                    assert isinstance(p, Range)
                    nxt = a.label("alt")
                    if p.lo > 0:
                        a.jump(JmpOp.JLT, I.R1, I.s32(p.lo), nxt, wide=True)
                    a.jump(JmpOp.JLE, I.R1, I.s32(p.hi), ok, wide=True)
                    a.place(nxt)
            a.goto(fail)
            a.place(ok)
            return
        for p in preds[:-1]:
            nxt = a.label("alt")
            self.emit(p, nxt, hotdrop)
            a.goto(ok)
            a.place(nxt)
        self.emit(preds[-1], fail, hotdrop)
        a.place(ok)

    def _transport(self, need: int, evil_frag: bool, fail: Label, hotdrop: Label) -> None:
        a = self.asm
        whole = a.label("l4")
        a.emit(I.ldx(I.H, I.R1, R_PKT, L.FRAGOFF))
        a.jump(JmpOp.JEQ, I.R1, 0, whole)
        if evil_frag and self.family is Family.IPV4:
            a.jump(JmpOp.JEQ, I.R1, 1, hotdrop)
        a.goto(fail)
        a.place(whole)
        a.emit(I.ldx(I.B, I.R1, R_PKT, L.L4AVAIL))
        a.jump(JmpOp.JLT, I.R1, need, hotdrop)

    def _rate_limit(self, r: RateLimit, fail: Label) -> None:
        """GCRA, the token bucket's equivalent on one u64 (the theoretical arrival time): a
        packet at `now` conforms if tat <= now + tau, and moves tat to max(tat, now) + T.
        The update is a compare-and-swap, retried: the bucket is shared by all CPUs."""
        a = self.asm
        if self.limits is None:
            raise Unsupported("rate limits need a limits map")
        off = self.limits(r.key)
        tau = (r.burst - 1) * r.interval_ns
        ok = a.label("limit_ok")
        a.emit(I.call_helper(Helper.ktime_get_ns), I.mov64(I.R3, I.R0))
        a.ld_map_value(I.R2, LIMITS_MAP, off)
        a.emit(I.ldx(I.DW, I.R0, I.R2, 0))
        for _ in range(LIMIT_RETRIES):
            a.emit(I.mov64(I.R1, I.R0))  # what the swap expects
            gcra.emit_try(a, tau, r.interval_ns, fail, ok)
        a.goto(fail)  # lost the race too often: count it as over the limit
        a.place(ok)

    def _tcp_option(self, kind: int, fail: Label, hotdrop: Label) -> None:
        """Scan the TCP options the parser copied, as xt_tcpudp's tcp_find_option does."""
        a = self.asm
        found, loop, step1 = (a.label(n) for n in ("opt_found", "opt_loop", "opt_1"))
        # The data offset must cover a whole header; the parser copied doff*4-20 option bytes.
        a.emit(I.ldx(I.B, I.R1, R_PKT, L.L4 + 12), I.alu32(AluOp.RSH, I.R1, 4, reg=False))
        a.jump(JmpOp.JLT, I.R1, 5, hotdrop)
        a.emit(I.ldx(I.B, I.R3, R_PKT, L.TCPOPTLEN))
        a.jump(JmpOp.JEQ, I.R3, 0xFF, hotdrop)  # the options could not be read
        a.emit(I.mov64_imm(I.R2, 0))  # i
        a.place(loop)
        a.jump(JmpOp.JGE, I.R2, I.R3, fail, reg=True)
        a.jump(JmpOp.JGE, I.R2, 40, fail)  # bounds the loop for the verifier
        a.emit(I.mov64(I.R4, R_PKT), I.alu64(AluOp.ADD, I.R4, I.R2, reg=True),
               I.ldx(I.B, I.R5, I.R4, L.TCPOPTS))
        a.jump(JmpOp.JEQ, I.R5, kind, found)
        a.jump(JmpOp.JLT, I.R5, 2, step1)
        a.jump(JmpOp.JGE, I.R2, 39, fail)
        a.emit(I.ldx(I.B, I.R5, I.R4, L.TCPOPTS + 1))
        a.jump(JmpOp.JEQ, I.R5, 0, step1)
        a.emit(I.alu64(AluOp.ADD, I.R2, I.R5, reg=True))
        a.goto(loop)
        a.place(step1)
        a.emit(I.alu64(AluOp.ADD, I.R2, 1, reg=False))
        a.goto(loop)
        a.place(found)


def _common_numeric_field(preds: tuple[Pred, ...]) -> Field | None:
    """The field when every alternative is an unmasked Cmp/Range on one numeric field."""
    fields = set()
    for p in preds:
        plain_cmp = isinstance(p, Cmp) and p.mask is None and isinstance(p.value, int)
        if plain_cmp or isinstance(p, Range):
            fields.add(p.field)
        else:
            return None
    if len(fields) != 1:
        return None
    f = fields.pop()
    return f if f.width in (1, 2, 4) and f.order is not Order.BYTES else None


