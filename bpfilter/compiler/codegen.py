"""Code generation for a table: one program per built-in chain, user chains as subprograms.

Netfilter's traversal is kept exactly: rules in order, a jump calls the user chain's subprogram
and continues with the next rule when it returns CONTINUE (fell off its end or RETURN), a goto
returns the callee's verdict as the caller's own, RETURN in a built-in chain applies the policy.
Every rule that matches bumps its counter slot; the rule (or policy) that decides writes its slot
to the packet struct, and the epilogue publishes it with the verdict in the per-CPU trace map, so
`bpfilter check` can say which rule decided.
"""

from __future__ import annotations

from collections.abc import Hashable
from functools import cached_property

from ..bpf import insn as I
from ..bpf.asm import Assembler, Label, Origin, Program
from ..bpf.consts import Helper, MapType
from ..bpf.insn import AluOp, JmpOp
from ..bpf.maps import MapSpec
from ..gcpause import paused_gc
from ..ir.model import ACCEPT, DROP, GOTO, JUMP, RETURN, Chain, ChainRef, Rule, Table
from ..ir.pred import (
    CT_FIELDS,
    RH_FIELDS,
    Field,
    Pred,
)
from ..matches import Context
from . import layout as L
from . import reject
from .classify.atoms import NotClassifiable, fold_static, rule_rows
from .classify.emit import VALUE_SIZE, emit_probe, group_maps
from .classify.groups import build_groups, group_key
from .classify.plan import (
    ID_MASK,
    SegmentPlan,
    action_word,
    initial_value,
    segment_plan,
    spacing,
    spare,
)
from .compiled import (
    ACT_ACCEPT,
    ACT_DROP,
    ACT_GOTO,
    ACT_JUMP,
    ACT_RETURN,
    COUNTER_VALUE,
    COUNTERS,
    PASSED,
    TRACE,
    TRACE_VALUE,
    CompiledProgram,
    CompiledTable,
    Segment,
    assign_slots,
)
from .counting import count, count_reg, decide, decide_slot, finish
from .hooks import ctquery, localtable
from .hooks.base import Flavour, Verdict
from .logging import LOG_MAP, LOG_TARGETS, emit_log, log_map_spec
from .lower import key_limits, lower_rule, pred_info, rule_context
from .parse import emit_parse
from .predgen import LIMITS_MAP, PredGen, Unsupported
from .setgen import set_maps
from .statematch import STATE_MATCHES, StateError, StateTables, state_maps
from .validate import CompileError, always_decides, call_depth, reachable

MAX_CALL_DEPTH = 7  # the verifier allows 8 frames; the main program is one
NEAR_BRANCH = 8191  # longest 16-bit branch in generated code; longer ones use gotol
MIN_SEGMENT = 16  # shorter runs of classifiable rules stay linear code (cheaper)
RULES_PER_GROUP = 4  # a segment must hold this many rules per lookup it needs
MAX_GROUPS = 8  # lookups per segment (a run needing more is split)
MAX_GROUPS_PER_TABLE = 48  # the kernel allows 64 maps per program
NAT_TARGETS = ("SNAT", "DNAT", "MASQUERADE", "REDIRECT")




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
        self._info: dict[tuple[str, int], tuple[frozenset[Field], bool]] = {}  # fields, TCP opts
        self._contexts: dict[tuple, Context] = {}  # lowering contexts, shared by rules
        self.maps: dict[Hashable, MapSpec] = {}
        self.map_data: dict[Hashable, list[tuple[bytes, bytes]]] = {}
        self._segments: dict[tuple, dict[int, Segment]] = {}
        self.plans: dict[tuple, SegmentPlan] = {}  # per classified segment, for in-place updates
        self.min_segment = int(flavour.opts.get("min_segment", MIN_SEGMENT))
        self.rules_per_group = int(flavour.opts.get("rules_per_group", RULES_PER_GROUP))
        self._groups_used = 0
        self.uses_conntrack = False
        self._limits: dict[tuple, int] = {}  # rate limit key -> its u64 in the limits map
        self._reject_kinds: list = []  # REJECT kinds of the program being compiled (by index)
        self._nat_targets: list = []  # (kind, params) of its NAT targets (by index)

    # -- lowering ------------------------------------------------------------------------

    def rule_pred(self, chain: str, n: int, rule: Rule) -> Pred:
        """The predicate of a rule's matches (cached)."""
        key = (chain, n)
        if key in self._preds:
            return self._preds[key]
        ctx = rule_context(rule, self.fl.family, self.table.name, chain, self.fl.name,
                           self._contexts)
        pred = lower_rule(rule, ctx)
        if any(m.kind in STATE_MATCHES for m in rule.matches):
            try:  # hashlimit/recent tables are configured by the first rule naming them
                pred = self._state_tables.resolve(pred, key)
            except StateError as e:
                raise CompileError(f"{rule_text(chain, n, rule)}: {e}", rule.origin) from None
        fields, tcp_opts, limits = pred_info(pred)  # perf: one walk, kept for every program
        if limits:
            pred = key_limits(pred, (chain, n))
        self._info[key] = (frozenset(fields), tcp_opts)
        for f in fields:
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
        if t.kind == "MARK" and self.fl.emit_store_mark(Assembler()):
            return
        if t.kind in LOG_TARGETS:
            return
        if t.kind in NAT_TARGETS:
            if self._does_nat:
                return
            raise CompileError(f"{rule_text(chain, n, rule)}: target {t.kind} (table nat) needs "
                               f"--hook tc; {self.fl.name} programs cannot bind NAT",
                               rule.origin)
        if t.kind == "REJECT":
            if self._sends_replies:
                return
            raise CompileError(f"{rule_text(chain, n, rule)}: target REJECT needs a hook that can "
                               f"send the reply; {self.fl.name} programs cannot transmit packets "
                               "(use --hook tc or --hook xdp)", rule.origin)
        raise CompileError(f"{rule_text(chain, n, rule)}: target {t.kind!r} is not supported "
                           f"on hook {self.fl.name}", rule.origin)

    @cached_property
    def _state_tables(self) -> StateTables:
        """The hashlimit and recent tables of the table's rules."""
        return StateTables.scan(self.table, self.fl.family)

    @cached_property
    def _does_nat(self) -> bool:
        """Whether the flavour binds NAT (asked once, with no targets)."""
        return self.fl.emit_nat(Assembler(), [])

    @cached_property
    def _sends_replies(self) -> bool:
        """Whether the flavour can send REJECT's replies (asked once, with no kinds)."""
        return self.fl.emit_reject(Assembler(), [])

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
            prog = self._program(chain, fl)
            programs[name] = CompiledProgram(name, hook, prog, f"bpf_{name.lower()[:11]}", fl)
        maps: dict[Hashable, MapSpec] = {
            # Spare slots: rules added in place get their own counter.
            COUNTERS: MapSpec(MapType.PERCPU_ARRAY, 4, COUNTER_VALUE,
                              len(self.slots) + spare(len(self.slots)), name="bpfilter_cnt"),
            TRACE: MapSpec(MapType.PERCPU_ARRAY, 4, TRACE_VALUE, 1, name="bpfilter_trace"),
            **self.maps,
        }
        if self._limits:
            maps[LIMITS_MAP] = MapSpec(MapType.ARRAY, 4, 8 * len(self._limits), 1,
                                       name="bpfilter_limit")
        variants: dict[str, list[int]] = {}
        for variant, (chain_name, _) in enumerate(self._segments):  # as `segments` numbers them
            variants.setdefault(chain_name, []).append(variant)
        return CompiledTable(self.table, self.fl, programs, self.slots, maps, self.map_data,
                             self.uses_conntrack, plans=self.plans, variants=variants)

    def _program(self, chain: Chain, fl: Flavour) -> Program:
        # Headroom for the verifier's rewrites (inlined map lookups grow the code).
        a = Assembler(near=NEAR_BRANCH)
        subs = reachable(self.table, chain)
        depth = call_depth(self.table, chain.name)
        if depth > MAX_CALL_DEPTH:
            raise CompileError(f"chain {chain.name}: user chains nest {depth} deep; the kernel's "
                               f"verifier allows {MAX_CALL_DEPTH}", chain.origin)
        needed: set[Field] = set()
        tcp_opts = False
        sets_mark = False
        self._reject_kinds = []
        self._nat_targets = []
        for c in [chain.name, *subs]:
            for n, rule in enumerate(self.table.chains[c].rules, 1):
                self._check_target(c, n, rule)
                if rule.target is not None and rule.target.kind in LOG_TARGETS:
                    needed |= {Field.IIFNAME, Field.OIFNAME}
                if rule.target is not None and rule.target.kind == "MARK":
                    needed.add(Field.MARK)
                    sets_mark = True
                if (rule.target is not None and rule.target.kind == "REJECT"
                        and rule.target.params not in self._reject_kinds):
                    self._reject_kinds.append(rule.target.params)
                if (rule.target is not None and rule.target.kind in NAT_TARGETS
                        and (rule.target.kind, rule.target.params) not in self._nat_targets):
                    self._nat_targets.append((rule.target.kind, rule.target.params))
                pred = self.rule_pred(c, n, rule)
                fields, uses_opts = self._info[(c, n)]
                for f in fields:  # per hook point (nf: no route yet in PREROUTING)
                    why = fl.unsupported_field(f)
                    if why is not None:
                        raise CompileError(f"{rule_text(c, n, rule)}: {why}", rule.origin)
                needed |= fields
                tcp_opts = tcp_opts or uses_opts
                self.maps.update(set_maps(pred))
                self.maps.update(state_maps(pred))
        verdict, passed = a.label("verdict"), a.label("pass")
        for c in [chain.name, *subs]:
            for seg in self.segments(self.table.chains[c], fl).values():
                needed |= seg.fields
        classified = any(self.segments(self.table.chains[c], fl) for c in [chain.name, *subs])
        self.uses_conntrack |= bool(needed & CT_FIELDS)
        self.maps.update(localtable.maps_for(needed, fl.family))  # addrtype's lookups
        self.maps.update(ctquery.maps_for(needed, fl))  # ICMP query entries (tc, XDP)
        with a.origin(Origin(f"prologue: parse the packet ({fl.name}, {chain.name})")):
            emit_parse(a, fl, passed, tcp_options=tcp_opts, packet_class=classified,
                       routing=bool(needed & RH_FIELDS))
            fl.emit_meta(a, needed)
        labels = {c: a.label(f"chain_{c}") for c in subs}
        self._chain_body(a, chain, labels, verdict, fl, main=True)
        reject_at = a.label("reject") if self._reject_kinds else None
        with a.origin(Origin("epilogue: publish the decision, return the verdict")):
            nat_at = a.label("nat") if self._does_nat else None
            self._epilogue(a, verdict, passed, fl if sets_mark else None, reject_at, nat_at,
                           codes=fl)
        if nat_at is not None:
            with a.origin(Origin("NAT: bind the connection's translation")):
                a.place(nat_at)
                fl.emit_nat(a, self._nat_targets)
        if reject_at is not None:
            self.maps[reject.REJECT_BUF] = reject.buffer_spec()
            with a.origin(Origin("REJECT: build the reply and send it back")):
                a.place(reject_at)
                fl.emit_reject(a, self._reject_kinds)
        for c in subs:
            with a.origin(Origin(f"user chain {c}", c)):
                a.place(labels[c])
                a.emit(I.mov64(L.R_PKT, I.R1))
            self._chain_body(a, self.table.chains[c], labels, verdict, fl, main=False)
        return a.assemble()

    def _chain_body(self, a: Assembler, chain: Chain, labels: dict[str, Label], verdict: Label,
                    fl: Flavour, *, main: bool) -> None:
        policy = a.label("policy")
        self._static = fl.static_fields()
        gen = PredGen(a, fl.family, self._static, self._limit_offset)
        segments = self.segments(chain, fl)
        i = 0
        while i < len(chain.rules):
            seg = segments.get(i)
            if seg is not None:
                self._segment(a, chain, seg, labels, verdict, policy, fl, main=main)
                i = seg.end
                continue
            n, rule = i + 1, chain.rules[i]
            i += 1
            slot = self._slot[(chain.name, n)]
            with a.origin(_origin(chain.name, n, rule)):
                nxt, hotdrop = a.label("next"), a.label("hotdrop")
                try:
                    gen.emit(self.rule_pred(chain.name, n, rule), nxt, hotdrop)
                except Unsupported as e:
                    raise CompileError(f"{rule_text(chain.name, n, rule)}: {e}",
                                       rule.origin) from None
                count(a, slot)
                self._target(a, rule, slot, labels, verdict, policy, main=main)
                if a.referenced(hotdrop):
                    a.goto(nxt)  # a jump that returned continues; pruned after a verdict
                    a.place(hotdrop)
                    decide(a, slot)
                    finish(a, Verdict.DROP, verdict, main)
                a.place(nxt)
        if main:
            pslot = self._slot[(chain.name, None)]
            with a.origin(_origin(chain.name, None, None)):
                a.place(policy)
                count(a, pslot)
                decide(a, pslot)
                finish(a, Verdict.ACCEPT if chain.policy == ACCEPT else Verdict.DROP, verdict,
                        True)
        else:
            with a.origin(Origin(f"end of user chain {chain.name}: return", chain.name)):
                a.emit(I.mov64_imm(I.R0, Verdict.CONTINUE), I.exit_())

    def _limit_offset(self, key: tuple) -> int:
        """Byte offset of a rate limit's state (one u64 per limit, in rule order of first use)."""
        if key not in self._limits:
            self._limits[key] = len(self._limits)
        return 8 * self._limits[key]

    # -- classified segments -------------------------------------------------------------

    def _action(self, rule: Rule) -> tuple[int, str | None] | None:
        """The action of a rule the classifier may decide on, None if it must stay linear."""
        t = rule.target
        if t is None:
            return None  # a counting rule: traversal goes on after it
        if t.kind == ACCEPT:
            return ACT_ACCEPT, None
        if t.kind == DROP:
            return ACT_DROP, None
        if t.kind == RETURN:
            return ACT_RETURN, None
        if t.kind == GOTO:
            return ACT_GOTO, t.params.chain
        if t.kind == JUMP and always_decides(self.table, t.params.chain):
            return ACT_JUMP, t.params.chain
        return None

    def segments(self, chain: Chain, fl: Flavour) -> dict[int, Segment]:
        """Runs of at least `min_segment` classifiable rules, by start index.

        Fields the hook knows when compiling (a tc/XDP program's interface) are folded into
        the entries, so a chain reached from hooks that know different values gets one
        variant per hook.
        """
        static = fl.static_fields()
        ckey = (chain.name, tuple(sorted((f.ident, v) for f, v in static.items())))
        if ckey in self._segments:
            return self._segments[ckey]
        variant = len(self._segments)
        out: dict[int, Segment] = {}
        run: list[tuple[int, list, tuple[int, str | None]]] = []
        sigs: set = set()

        def close() -> None:
            if len(run) >= self.min_segment:
                groups = build_groups([e for _, e, _ in run])
                # A lookup costs about as much as a dozen inline compares: keep the linear
                # code where the run is too varied to pay for its lookups.
                worth = len(run) >= self.rules_per_group * len(groups)
                if worth and self._groups_used + len(groups) <= MAX_GROUPS_PER_TABLE:
                    self._groups_used += len(groups)
                    start = run[0][0]
                    fields = {f for g in groups for f, _ in g.fields}
                    fields |= {g.lpm_field for g in groups if g.lpm_field is not None}
                    out[start] = Segment(start, start + len(run), groups,
                                         [x for _, _, x in run], fields, variant)
            run.clear()
            sigs.clear()

        for i, rule in enumerate(chain.rules):
            action = self._action(rule)
            entries = None
            if action is not None:
                try:
                    entries = rule_rows(self.rule_pred(chain.name, i + 1, rule), self.fl.family)
                    entries = fold_static(entries, static)
                except NotClassifiable:
                    entries = None
            if entries is None or action is None:
                close()
                continue
            mine = {group_key((r[0], r[2][0] is not None)) for r in entries}  # after LPM merges
            if len(sigs | mine) > MAX_GROUPS:
                close()  # a new shape: start the next segment here
            sigs |= mine
            run.append((i, entries, action))
        close()
        self._segments[ckey] = out
        return out

    def _segment(self, a: Assembler, chain: Chain, seg: Segment, labels: dict[str, Label],
                 verdict: Label, policy: Label, fl: Flavour, *, main: bool) -> None:
        key = ("cls", chain.name, seg.variant, seg.start)
        ctl = ("ctl", chain.name, seg.variant, seg.start)
        # Every verdict is dispatched, so a rule added in place may have any of them.
        kinds = sorted({*seg.actions, (ACT_ACCEPT, None), (ACT_DROP, None), (ACT_RETURN, None)})
        ids = {c: i for i, c in enumerate(sorted({c for _, c in kinds if c}))}
        plan = self.plans.get(ctl) or self._plan(chain, seg, key, ctl, kinds, ids, fl)
        end = a.label("seg_end")
        text = (f"{chain.name} #{seg.start + 1}-#{seg.end}: classifier over "
                f"{seg.end - seg.start} rules, {len(seg.groups)} lookups")
        with a.origin(Origin(text, chain.name, seg.start + 1)):
            emit_probe(a, seg.groups, lambda i: (*key, i), ctl, fl.family)
            a.jump(JmpOp.JEQ, I.R8, -1, end)
            a.emit(I.mov32(I.R7, I.R8), I.alu32(AluOp.AND, I.R7, ID_MASK, reg=False))
            a.jump(JmpOp.JGE, I.R7, plan.cap, end)  # never: bounds r7 for the verifier
            # r7 = the rule's action word (action, counter slot) from the control map.
            a.ld_map_value(I.R1, ctl, VALUE_SIZE * len(seg.groups))
            a.emit(I.alu64(AluOp.LSH, I.R7, 3, reg=False), I.alu64(AluOp.ADD, I.R1, I.R7, reg=True))
            a.emit(I.ldx(I.DW, I.R7, I.R1, 0))
            hot = a.label("seg_hotdrop")
            a.emit(I.alu64(AluOp.RSH, I.R8, 31, reg=False))
            a.jump(JmpOp.JSET, I.R8, 1, hot)
            a.emit(I.mov64(I.R1, I.R7), I.alu64(AluOp.RSH, I.R1, 32, reg=False))
            count_reg(a, I.R1)
            a.emit(I.mov32(I.R2, I.R7), I.alu32(AluOp.AND, I.R2, 0xFF, reg=False))
            for kind, chain_name in kinds:
                skip = a.label("act")
                a.jump(JmpOp.JNE, I.R2, kind, skip)
                if chain_name is not None:
                    a.emit(I.mov32(I.R3, I.R7), I.alu32(AluOp.RSH, I.R3, 8, reg=False))
                    a.jump(JmpOp.JNE, I.R3, ids[chain_name], skip)
                self._act(a, (kind, chain_name), labels, verdict, policy, end, main=main)
                a.place(skip)
            a.goto(end)  # an action code this segment does not have: cannot happen
            a.place(hot)
            decide_slot(a)
            finish(a, Verdict.DROP, verdict, main)
        a.place(end)

    def _plan(self, chain: Chain, seg: Segment, key: tuple, ctl: tuple,
              kinds: list[tuple[int, str | None]], ids: dict[str, int],
              fl: Flavour) -> SegmentPlan:
        """The maps of a segment (groups and control map) and its plan for later updates."""
        base = self._slot[(chain.name, seg.start + 1)]
        n = seg.end - seg.start
        cap, step = n + spare(n), spacing(n)
        sm = group_maps(key, seg.groups, step)
        self.maps.update(sm.specs)
        self.map_data.update(sm.data)
        words = [initial_value(g.min_value(), step) for g in seg.groups]
        words += [action_word(k | (ids[c] << 8 if c else 0), base + i)
                  for i, (k, c) in enumerate(seg.actions)]
        value = b"".join(w.to_bytes(VALUE_SIZE, "little") for w in words)
        size = VALUE_SIZE * (len(seg.groups) + cap)
        self.maps[ctl] = MapSpec(MapType.ARRAY, 4, size, 1, name="bpfilter_ctl")
        self.map_data[ctl] = [(bytes(4), value.ljust(size, b"\0"))]
        plan = self.plans[ctl] = segment_plan(chain.name, (seg.variant,), seg.start, seg.end,
                                              key, ctl, seg.groups, kinds, ids, step, cap, base,
                                              fl.static_fields())
        return plan

    def _act(self, a: Assembler, action: tuple[int, str | None], labels: dict[str, Label],
             verdict: Label, policy: Label, end: Label, *, main: bool) -> None:
        """The action of the rule whose action word is in r7 (its counter slot above bit 32)."""
        kind, chain = action
        if kind in (ACT_ACCEPT, ACT_DROP):
            decide_slot(a)
            finish(a, Verdict.ACCEPT if kind == ACT_ACCEPT else Verdict.DROP, verdict, main)
        elif kind == ACT_RETURN:
            if main:
                a.goto(policy)
            else:
                a.emit(I.mov64_imm(I.R0, Verdict.CONTINUE), I.exit_())
        else:
            assert chain is not None
            a.emit(I.mov64(I.R1, L.R_PKT))
            a.call(labels[chain])
            if kind == ACT_GOTO and not main:
                a.emit(I.exit_())
                return
            if main:
                a.jump(JmpOp.JNE, I.R0, Verdict.CONTINUE, verdict)
                a.goto(policy if kind == ACT_GOTO else end)
            else:
                cont = a.label("cont")
                a.jump(JmpOp.JEQ, I.R0, Verdict.CONTINUE, cont)
                a.emit(I.exit_())
                a.place(cont)
                a.goto(end)

    def _target(self, a: Assembler, rule: Rule, slot: int, labels: dict[str, Label],
                verdict: Label, policy: Label, *, main: bool) -> None:
        t = rule.target
        if t is None:
            return
        if t.kind in LOG_TARGETS:
            self.maps[LOG_MAP] = log_map_spec()
            emit_log(a, slot, self.table.name, self.fl.family, self._static)
            return
        if t.kind == "MARK":
            # (mark & ~mask) ^ value; later `-m mark` matches read the struct's copy.
            a.emit(I.ldx(I.W, I.R1, L.R_PKT, L.MARK))
            a.emit(I.alu32(AluOp.AND, I.R1, I.s32(~t.params.mask), reg=False))
            a.emit(I.alu32(AluOp.XOR, I.R1, I.s32(t.params.value), reg=False))
            a.emit(I.stx(I.W, L.R_PKT, I.R1, L.MARK), I.st(I.B, L.R_PKT, L.MARKSET, 1))
            return
        if t.kind in (ACCEPT, DROP):
            decide(a, slot)
            finish(a, Verdict.ACCEPT if t.kind == ACCEPT else Verdict.DROP, verdict, main)
        elif t.kind == "REJECT":
            decide(a, slot)
            finish(a, reject.verdict_code(self._reject_kinds.index(t.params)), verdict, main)
        elif t.kind in NAT_TARGETS:
            decide(a, slot)
            index = self._nat_targets.index((t.kind, t.params))
            finish(a, Verdict.NAT | index << 8, verdict, main)
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

    def _epilogue(self, a: Assembler, verdict: Label, passed: Label,
                  mark_fl: Flavour | None, reject_at: Label | None = None,
                  nat_at: Label | None = None, codes: Flavour | None = None) -> None:
        # The return codes are the program's own flavour's (one table may mix hook types:
        # nat PREROUTING at tc ingress, nat OUTPUT at the sockets).
        codes = codes or self.fl
        publish = a.label("publish")
        a.place(passed)
        a.emit(I.st(I.W, L.R_PKT, L.DECIDER, 0), I.mov64_imm(I.R0, PASSED))
        a.place(verdict)
        a.place(publish)
        a.emit(I.mov64(I.R7, I.R0))
        if mark_fl is not None:
            same = a.label("mark_kept")
            a.emit(I.ldx(I.B, I.R1, L.R_PKT, L.MARKSET))
            a.jump(JmpOp.JEQ, I.R1, 0, same)
            mark_fl.emit_store_mark(a)
            a.place(same)
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
        if reject_at is not None:  # the kind's number is in the bits above the verdict
            a.emit(I.mov64(I.R1, I.R7), I.alu64(AluOp.AND, I.R1, 0xFF, reg=False))
            a.jump(JmpOp.JEQ, I.R1, Verdict.REJECT, reject_at)
        if nat_at is not None:  # a NAT target, or ACCEPT: the binding code decides
            a.emit(I.mov64(I.R1, I.R7), I.alu64(AluOp.AND, I.R1, 0xFF, reg=False))
            a.jump(JmpOp.JEQ, I.R1, Verdict.NAT, nat_at)
            a.jump(JmpOp.JEQ, I.R7, Verdict.ACCEPT, nat_at)
        a.jump(JmpOp.JNE, I.R7, Verdict.ACCEPT, drop)
        a.emit(I.mov64_imm(I.R0, codes.verdict_code(Verdict.ACCEPT)), I.exit_())
        a.place(drop)
        a.emit(I.mov64_imm(I.R0, codes.verdict_code(Verdict.DROP)), I.exit_())
        a.place(pas)
        a.emit(I.mov64_imm(I.R0, codes.pass_code()), I.exit_())


def rule_text(chain: str, n: int, rule: Rule) -> str:
    """How messages name a rule."""
    if rule.origin is not None and rule.origin.text:
        return f"rule {chain} #{n} ({rule.origin.text.strip()})"
    return f"rule {chain} #{n}"


def compile_table(table: Table, flavour: Flavour) -> CompiledTable:
    """Compile `table` for `flavour`; raises CompileError naming the rule at fault."""
    with paused_gc():  # perf: the collector's passes over a big IR cost a third of a compile
        return TableCompiler(table, flavour).compile()
