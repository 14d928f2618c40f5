"""Code generation for a table: one program per built-in chain, user chains as subprograms.

Netfilter's traversal is kept exactly: rules in order, a jump calls the user chain's subprogram
and continues with the next rule when it returns CONTINUE (fell off its end or RETURN), a goto
returns the callee's verdict as the caller's own, RETURN in a built-in chain applies the policy.
Every rule that matches bumps its counter slot; the rule (or policy) that decides writes its slot
to the packet struct, and the epilogue publishes it with the verdict in the per-CPU trace map, so
`bpfilter check` can say which rule decided.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..bpf import insn as I
from ..bpf.asm import Assembler, Label, Origin, Program
from ..bpf.consts import Helper, MapType
from ..bpf.insn import AluOp, JmpOp
from ..bpf.maps import MapSpec
from ..ir.model import ACCEPT, DROP, GOTO, JUMP, RETURN, Chain, ChainRef, Rule, Table
from ..ir.pred import Field, Pred, TcpOption, all_of, fields_of
from ..matches import REGISTRY, Context, MatchError
from ..matches.ip import BUILTIN_ORDER
from . import layout as L
from .hooks.base import Flavour, HookPoint, Verdict
from .parse import emit_parse
from .predgen import PredGen, Unsupported
from .validate import CompileError, call_depth, reachable

COUNTERS, TRACE = "counters", "trace"
COUNTER_VALUE = 16  # {u64 packets, u64 bytes}
TRACE_VALUE = 8  # {u32 slot, u32 verdict}
PASSED = 3  # trace verdict: the ruleset did not apply (non-IP, other family)
MAX_CALL_DEPTH = 7  # the verifier allows 8 frames; the main program is one


@dataclass(frozen=True)
class Slot:
    """A counter slot: a rule (1-based `rule`) or a built-in chain's policy (`rule` None)."""

    index: int
    chain: str
    rule: int | None


@dataclass
class CompiledProgram:
    """The program of one built-in chain."""

    chain: str
    hook: HookPoint
    program: Program
    name: str
    flavour: Flavour


@dataclass
class CompiledTable:
    """Everything needed to load one table: programs, the maps they use, the slot table."""

    table: Table
    flavour: Flavour
    programs: dict[str, CompiledProgram]
    slots: list[Slot]
    maps: dict[str, MapSpec] = field(default_factory=dict)

    def slot_of(self, chain: str, rule: int | None) -> int:
        """The counter slot of a rule (or of a policy, rule None)."""
        for s in self.slots:
            if s.chain == chain and s.rule == rule:
                return s.index
        raise KeyError((chain, rule))


def assign_slots(table: Table) -> list[Slot]:
    """Slot 0 is 'no decision'; then each built-in chain's policy, then every rule."""
    slots = [Slot(0, "", None)]
    for c in table.chains.values():
        if c.builtin:
            slots.append(Slot(len(slots), c.name, None))
    for c in table.chains.values():
        for n in range(1, len(c.rules) + 1):
            slots.append(Slot(len(slots), c.name, n))
    return slots


def _origin(chain: str, n: int | None, rule: Rule | None) -> Origin:
    if rule is None:
        return Origin(f"policy of {chain}", chain, None)
    o = rule.origin
    text = o.text.strip() if o is not None and o.text else f"{chain} rule {n}"
    return Origin(f"{chain} #{n}: {text}", chain, n, o.file if o else None, o.line if o else None)


class TableCompiler:
    """Compiles one table for one flavour."""

    def __init__(self, table: Table, flavour: Flavour) -> None:
        self.table = table
        self.fl = flavour
        self.slots = assign_slots(table)
        self._slot = {(s.chain, s.rule): s.index for s in self.slots}
        self._preds: dict[tuple[str, int], Pred] = {}

    # -- lowering ------------------------------------------------------------------------

    def rule_pred(self, chain: str, n: int, rule: Rule) -> Pred:
        """The predicate of a rule's matches (cached)."""
        key = (chain, n)
        if key in self._preds:
            return self._preds[key]
        proto_m = rule.match("proto")
        proto = None
        inverted = False
        if proto_m is not None:
            proto = proto_m.params.proto or None
            inverted = proto_m.params.invert
        ctx = Context(self.fl.family, self.table.name, chain, None if inverted else proto,
                      inverted, self.fl.name)
        parts: list[Pred] = []
        # ip_packet_match() tests the built-in part first (-s -d -i -o -p -f, in that order),
        # then the matches in rule order; only the order of hotdrops depends on it.
        order = {k: i for i, k in enumerate(BUILTIN_ORDER)}
        builtins = sorted((m for m in rule.matches if m.kind in order), key=lambda m: order[m.kind])
        for m in [*builtins, *(m for m in rule.matches if m.kind not in order)]:
            entry = REGISTRY.matches.get(m.kind)
            if entry is None:
                raise CompileError(f"match {m.kind!r} is not supported", rule.origin)
            try:
                parts.append(entry.lower(m.params, ctx))
            except MatchError as e:
                raise CompileError(f"match {m.kind!r}: {e}", rule.origin) from None
        pred = all_of(*parts)
        for f in fields_of(pred):
            why = self.fl.unsupported_field(f)
            if why is not None:
                raise CompileError(f"{rule_text(chain, n, rule)}: {why} (hook {self.fl.name})",
                                   rule.origin)
        self._preds[key] = pred
        return pred

    def _check_target(self, chain: str, n: int, rule: Rule) -> None:
        t = rule.target
        if t is None or t.kind in (ACCEPT, DROP, RETURN, JUMP, GOTO):
            return
        raise CompileError(f"{rule_text(chain, n, rule)}: target {t.kind!r} is not supported "
                           f"on hook {self.fl.name}", rule.origin)

    # -- programs ------------------------------------------------------------------------

    def compile(self) -> CompiledTable:
        """Validate and generate every program of the table."""
        from .validate import check_references

        check_references(self.table)
        hooks = self.fl.chains(self.table.name)
        for c in self.table.chains.values():
            if c.builtin and c.name not in hooks and (c.rules or c.policy != ACCEPT):
                raise CompileError(f"chain {c.name} of table {self.table.name} cannot run on hook "
                                   f"{self.fl.describe()} (it has rules or a DROP policy)",
                                   c.origin)
        programs: dict[str, CompiledProgram] = {}
        for name, hook in hooks.items():
            chain = self.table.chains.get(name)
            if chain is None:
                continue
            fl = self.fl.for_hook(hook)
            prog = TableCompiler(self.table, fl)._program(chain)
            programs[name] = CompiledProgram(name, hook, prog, f"bpf_{name.lower()[:11]}", fl)
        maps = {
            COUNTERS: MapSpec(MapType.PERCPU_ARRAY, 4, COUNTER_VALUE, max(len(self.slots), 1),
                              name="bpfilter_cnt"),
            TRACE: MapSpec(MapType.PERCPU_ARRAY, 4, TRACE_VALUE, 1, name="bpfilter_trace"),
        }
        return CompiledTable(self.table, self.fl, programs, self.slots, maps)

    def _program(self, chain: Chain) -> Program:
        a = Assembler()
        subs = reachable(self.table, chain)
        depth = call_depth(self.table, chain.name)
        if depth > MAX_CALL_DEPTH:
            raise CompileError(f"chain {chain.name}: user chains nest {depth} deep; the kernel's "
                               f"verifier allows {MAX_CALL_DEPTH}", chain.origin)
        needed: set[Field] = set()
        tcp_opts = False
        for c in [chain.name, *subs]:
            for n, rule in enumerate(self.table.chains[c].rules, 1):
                self._check_target(c, n, rule)
                pred = self.rule_pred(c, n, rule)
                needed |= fields_of(pred)
                tcp_opts = tcp_opts or _uses(pred, TcpOption)
        verdict, passed = a.label("verdict"), a.label("pass")
        with a.origin(Origin(f"prologue: parse the packet ({self.fl.name}, {chain.name})")):
            emit_parse(a, self.fl, passed, tcp_options=tcp_opts)
            self.fl.emit_meta(a, needed)
        labels = {c: a.label(f"chain_{c}") for c in subs}
        self._chain_body(a, chain, labels, verdict, main=True)
        with a.origin(Origin("epilogue: publish the decision, return the verdict")):
            self._epilogue(a, verdict, passed)
        for c in subs:
            with a.origin(Origin(f"user chain {c}", c)):
                a.place(labels[c])
                a.emit(I.mov64(L.R_PKT, I.R1))
            self._chain_body(a, self.table.chains[c], labels, verdict, main=False)
        return a.assemble()

    def _chain_body(self, a: Assembler, chain: Chain, labels: dict[str, Label], verdict: Label,
                    *, main: bool) -> None:
        policy = a.label("policy")
        static = self.fl.static_fields()
        gen = PredGen(a, self.fl.family, static)
        for n, rule in enumerate(chain.rules, 1):
            slot = self._slot[(chain.name, n)]
            with a.origin(_origin(chain.name, n, rule)):
                nxt, hotdrop = a.label("next"), a.label("hotdrop")
                try:
                    gen.emit(self.rule_pred(chain.name, n, rule), nxt, hotdrop)
                except Unsupported as e:
                    raise CompileError(f"{rule_text(chain.name, n, rule)}: {e}",
                                       rule.origin) from None
                _count(a, slot)
                self._target(a, rule, slot, labels, verdict, policy, main=main)
                if a.referenced(hotdrop):
                    a.place(hotdrop)
                    _decide(a, slot)
                    _finish(a, Verdict.DROP, verdict, main)
                a.place(nxt)
        if main:
            pslot = self._slot[(chain.name, None)]
            with a.origin(_origin(chain.name, None, None)):
                a.place(policy)
                _count(a, pslot)
                _decide(a, pslot)
                _finish(a, Verdict.ACCEPT if chain.policy == ACCEPT else Verdict.DROP, verdict,
                        True)
        else:
            with a.origin(Origin(f"end of user chain {chain.name}: return", chain.name)):
                a.emit(I.mov64_imm(I.R0, Verdict.CONTINUE), I.exit_())

    def _target(self, a: Assembler, rule: Rule, slot: int, labels: dict[str, Label],
                verdict: Label, policy: Label, *, main: bool) -> None:
        t = rule.target
        if t is None:
            return
        if t.kind in (ACCEPT, DROP):
            _decide(a, slot)
            _finish(a, Verdict.ACCEPT if t.kind == ACCEPT else Verdict.DROP, verdict, main)
        elif t.kind == RETURN:
            if main:
                a.goto(policy)
            else:
                a.emit(I.mov64_imm(I.R0, Verdict.CONTINUE), I.exit_())
        elif t.kind in (JUMP, GOTO):
            ref = t.params
            assert isinstance(ref, ChainRef)
            a.emit(I.mov64(I.R1, L.R_PKT))
            a.call(labels[ref.chain])
            if t.kind == GOTO and not main:
                a.emit(I.exit_())
                return
            if main:
                a.jump(JmpOp.JNE, I.R0, Verdict.CONTINUE, verdict)
                if t.kind == GOTO:
                    a.goto(policy)
            else:
                cont = a.label("cont")
                a.jump(JmpOp.JEQ, I.R0, Verdict.CONTINUE, cont)
                a.emit(I.exit_())
                a.place(cont)

    def _epilogue(self, a: Assembler, verdict: Label, passed: Label) -> None:
        publish = a.label("publish")
        a.place(passed)
        a.emit(I.st(I.W, L.R_PKT, L.DECIDER, 0), I.mov64_imm(I.R0, PASSED))
        a.place(verdict)
        a.place(publish)
        a.emit(I.mov64(I.R7, I.R0))
        a.emit(I.st(I.W, I.R10, L.KEY_OFF, 0))
        a.emit(I.mov64(I.R2, I.R10), I.alu64(AluOp.ADD, I.R2, L.KEY_OFF, reg=False))
        a.ld_map(I.R1, TRACE)
        a.emit(I.call_helper(Helper.map_lookup_elem))
        out = a.label("out")
        a.jump(JmpOp.JEQ, I.R0, 0, out)
        a.emit(I.ldx(I.W, I.R1, L.R_PKT, L.DECIDER), I.stx(I.W, I.R0, I.R1, 0))
        a.emit(I.stx(I.W, I.R0, I.R7, 4))
        a.place(out)
        drop, pas = a.label("drop"), a.label("passcode")
        a.jump(JmpOp.JEQ, I.R7, PASSED, pas)
        a.jump(JmpOp.JNE, I.R7, Verdict.ACCEPT, drop)
        a.emit(I.mov64_imm(I.R0, self.fl.verdict_code(Verdict.ACCEPT)), I.exit_())
        a.place(drop)
        a.emit(I.mov64_imm(I.R0, self.fl.verdict_code(Verdict.DROP)), I.exit_())
        a.place(pas)
        a.emit(I.mov64_imm(I.R0, self.fl.pass_code()), I.exit_())


def rule_text(chain: str, n: int, rule: Rule) -> str:
    """How messages name a rule."""
    if rule.origin is not None and rule.origin.text:
        return f"rule {chain} #{n} ({rule.origin.text.strip()})"
    return f"rule {chain} #{n}"


def _uses(pred: Pred, kind: type) -> bool:
    if isinstance(pred, kind):
        return True
    inner = getattr(pred, "preds", None)
    if inner is not None:
        return any(_uses(p, kind) for p in inner)
    sub = getattr(pred, "pred", None)
    return sub is not None and _uses(sub, kind)


def _count(a: Assembler, slot: int) -> None:
    """counters[slot].packets += 1, .bytes += the datagram's length (per CPU)."""
    skip = a.label("nocount")
    a.emit(I.st(I.W, I.R10, L.KEY_OFF, slot))
    a.emit(I.mov64(I.R2, I.R10), I.alu64(AluOp.ADD, I.R2, L.KEY_OFF, reg=False))
    a.ld_map(I.R1, COUNTERS)
    a.emit(I.call_helper(Helper.map_lookup_elem))
    a.jump(JmpOp.JEQ, I.R0, 0, skip)
    a.emit(I.ldx(I.DW, I.R1, I.R0, 0), I.alu64(AluOp.ADD, I.R1, 1, reg=False),
           I.stx(I.DW, I.R0, I.R1, 0))
    a.emit(I.ldx(I.H, I.R1, L.R_PKT, L.IPLEN), I.ldx(I.DW, I.R2, I.R0, 8),
           I.alu64(AluOp.ADD, I.R2, I.R1, reg=True), I.stx(I.DW, I.R0, I.R2, 8))
    a.place(skip)


def _decide(a: Assembler, slot: int) -> None:
    a.emit(I.st(I.W, L.R_PKT, L.DECIDER, slot))


def _finish(a: Assembler, v: Verdict, verdict: Label, main: bool) -> None:
    a.emit(I.mov64_imm(I.R0, v))
    if main:
        a.goto(verdict)
    else:
        a.emit(I.exit_())


def compile_table(table: Table, flavour: Flavour) -> CompiledTable:
    """Compile `table` for `flavour`; raises CompileError naming the rule at fault."""
    return TableCompiler(table, flavour).compile()
