"""Single-rule changes (append, insert, delete, replace) applied to the loaded maps in place.

A rule that lies in (or next to) a classified segment in every variant of its chain, whose rows
fit groups the segment already probes and whose action the segment's code dispatches, is added
by writing its keys and action word: the programs stay as they are. Anything else (a linear
part of a chain, a new shape, no room left) falls back to a full, atomic restore of the changed
ruleset with the counters carried over. Either way the stored record (the ruleset text and the
rule -> counter slot table) is rewritten, so `save`/`list` show the new ruleset.

Everything is checked before the first write; then the new rule's action word, bounds and keys
are written before the old rule's keys go (segedit.py), so a replaced rule stays in force until
its successor is. The new state is pinned under a temporary name and renamed into place.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

from ..bpf.maps import Map, possible_cpus
from ..compiler.classify.atoms import KEY_FIELDS, NotClassifiable, fold_static, rule_rows
from ..compiler.classify.plan import HOT_BIT, ORDER_SHIFT, SegmentPlan, action_word
from ..compiler.codegen import TableCompiler
from ..compiler.compiled import ACT_ACCEPT, ACT_DROP, ACT_GOTO, ACT_JUMP, ACT_RETURN
from ..frontends.iptables.lexer import tokenize
from ..frontends.iptables.parser import parse, parse_rule_args
from ..frontends.iptables.saver import rule_text
from ..gcpause import paused_gc
from ..ir.model import ACCEPT, DROP, GOTO, JUMP, RETURN, Family, Rule, Table
from . import planstore
from .loader import Runtime, RuntimeError_, make_flavour
from .segedit import Fallback, Session, add_values, remove_id, write_action
from .state import Record, locked, pin_name, unlink_quiet, write_record

MAX_ORDER = (1 << 32) - 2  # all-ones values mean "nothing found"


@dataclass
class Change:
    """One iptables-style rule command: A(ppend), I(nsert), D(elete) or R(eplace)."""

    op: str
    chain: str
    table: str = "filter"
    index: int | None = None  # 1-based rule number (I, D, R)
    args: list[str] = field(default_factory=list)  # the rule (A, I, R; D by specification)


@dataclass
class Outcome:
    """How a change was applied."""

    in_place: bool
    why: str  # why it needed a full restore ("" in place)
    text: str  # the new ruleset (iptables-save form)


@dataclass
class _Edit:
    """The change resolved against the loaded ruleset."""

    pos: int  # 0-based rule index in the chain
    old: Rule | None  # the rule removed (D, R)
    new: Rule | None  # the rule added (A, I, R)
    lines: list[str]  # the new ruleset text, by line


def apply_change(rt: Runtime, fam: Family, change: Change, sets: dict | None = None) -> Outcome:
    """Apply `change` to the ruleset of `fam` loaded at `rt`: in place when the loaded maps
    allow it, else by a full atomic restore."""
    # perf: the plans are thousands of small objects; collector passes over them cost more
    # than the change.
    with locked(rt.dir), paused_gc():
        gen = rt._active_gen(fam)
        rec = rt._record(fam, gen) if gen is not None else None
        if rec is None or gen is None:
            raise RuntimeError_(f"no {fam.value} ruleset is loaded at hook {rt.hook}")
        edit = _resolve(rec, fam, change, sets)
        text = "\n".join(edit.lines) + "\n"
        try:
            _in_place(rt, fam, gen, rec, change, edit, text)
            return Outcome(True, "", text)
        except Fallback as e:
            why = str(e)
        except OSError as e:  # a map write failed midway: a whole new generation mends it
            why = f"an in-place write failed ({e})"
    _reload(rt, fam, change, edit, text, sets)
    return Outcome(False, why, text)


# -- resolving the change against the record -------------------------------------------------


def _chain_lines(lines: list[str], table: str, chain: str) -> tuple[list[int], set[str], int]:
    """Line numbers of `chain`'s rules in `table`, the table's chains, and its COMMIT line."""
    start = lines.index(f"*{table}") if f"*{table}" in lines else None
    if start is None:
        raise RuntimeError_(f"table {table!r} is not loaded")
    end = lines.index("COMMIT", start)
    chains = set()
    i = start + 1
    while i < end and lines[i].startswith(":"):
        chains.add(lines[i][1:].split()[0])
        i += 1
    head = f"-A {chain} "
    # perf: one C-level pass (a 10,000-rule chain is read on every change).
    out = [k for k, line in enumerate(lines[i:end], i) if line.startswith(head)]
    return out, chains, end


def _parse_one(args: list[str], fam: Family, table: str, chain: str, chains: set[str],
               sets: dict | None) -> Rule:
    rules = parse_rule_args(args, family=fam, table=table, chain=chain, chains=chains,
                            sets=sets)
    if len(rules) != 1:
        raise RuntimeError_(f"the rule stands for {len(rules)} rules; give one address per "
                            "-s/-d for single-rule commands")
    return rules[0]


def _line_rule(line: str, fam: Family, table: str, chain: str, chains: set[str],
               sets: dict | None) -> Rule:
    return _parse_one([t.text for t in tokenize(line)][2:], fam, table, chain, chains, sets)


def _resolve(rec: Record, fam: Family, ch: Change, sets: dict | None) -> _Edit:
    lines = rec.text.splitlines()
    at, chains, commit = _chain_lines(lines, ch.table, ch.chain)
    if ch.chain not in chains:
        raise RuntimeError_(f"no chain {ch.chain!r} in table {ch.table!r}")
    n = len(at)
    new = None
    if ch.op in "AIR" or (ch.op == "D" and ch.index is None):
        new = _parse_one(ch.args, fam, ch.table, ch.chain, chains - {ch.chain}, sets)
        new_line = f"-A {ch.chain} " + rule_text(new, family=fam, table=ch.table,
                                                 chain=ch.chain)
        new_line = new_line.rstrip()
    if ch.op == "D" and ch.index is None:
        match = [k for k, i in enumerate(at) if lines[i] == new_line]
        if not match:
            raise RuntimeError_("bad rule (does a matching rule exist in that chain?)")
        pos, new = match[0], None
    elif ch.op == "A":
        pos = n
    else:
        pos = (ch.index or 1) - 1
        limit = n + 1 if ch.op == "I" else n
        if not 0 <= pos < limit:
            raise RuntimeError_(f"index of {ch.op} out of range (chain {ch.chain} has {n} "
                                "rules)")
    old = None
    if ch.op in "DR":
        old = _line_rule(lines[at[pos]], fam, ch.table, ch.chain, chains, sets)
    out = list(lines)
    if ch.op in "DR":
        i = at[pos]
        out[i : i + 1] = [new_line] if ch.op == "R" else []
    else:
        # An empty chain's first rule goes before COMMIT (order only matters within a chain).
        i = at[pos] if pos < n else (at[-1] + 1 if at else commit)
        out.insert(i, new_line)
    return _Edit(pos, old, new, out)


# -- in place ------------------------------------------------------------------------------


def _in_place(rt: Runtime, fam: Family, gen: int, rec: Record, ch: Change, edit: _Edit,
              text: str) -> None:
    s = Session(rt, fam, gen, ch.table)
    try:
        _apply(s, rec, ch, edit)
        _write_state(s, rec, text, ch.table)
    finally:
        s.close()


def _choose(s: Session, text: str, table: str, chain: str, pos: int,
            inserting: bool) -> list[SegmentPlan]:
    """Per variant of `chain`, the segment the rule at `pos` belongs to."""
    tp = s.tp
    roots = {c for p in tp.plans for k, c in p.kinds if k == ACT_JUMP}
    if roots and chain in _decisive(text.splitlines(), table, roots):
        # Whether a jump's target always decides is part of how its callers were classified.
        raise Fallback(f"chain {chain} is (or decides for) the target of a classified jump")
    variants = tp.variants.get(chain)
    if not variants:
        raise Fallback(f"chain {chain} has no classified segment")
    out = []
    for v in variants:
        segs = sorted((p for p in tp.plans if p.chain == chain and p.variant == (v,)),
                      key=lambda p: p.start)
        hit = [p for p in segs if p.start <= pos < p.end or (inserting and pos == p.end)]
        if not hit:
            raise Fallback(f"rule {pos + 1} of {chain} lies in linear code")
        out.append(hit[0])
    return out


def _decisive(lines: list[str], table: str, roots: set[str]) -> set[str]:
    """`roots` and the chains their goto/last-rule verdicts lead to (what `always_decides`
    reads)."""
    edges: dict[str, set[str]] = {}
    in_table = False
    for line in lines:
        if line.startswith("*"):
            in_table = line[1:].strip() == table
        elif in_table and line.startswith("-A ") and (" -j " in line or " -g " in line):
            words = line.split()
            for i in range(len(words) - 1):
                if words[i] in ("-j", "-g"):
                    edges.setdefault(words[1], set()).add(words[i + 1])
    out, todo = set(), list(roots)
    while todo:
        c = todo.pop()
        if c not in out:
            out.add(c)
            todo.extend(edges.get(c, ()))
    return out


def _action(rule: Rule, plan: SegmentPlan) -> int:
    """The action code (with the chain number) the segment's code dispatches for `rule`."""
    t = rule.target
    kind = None if t is None else t.kind
    simple = {ACCEPT: ACT_ACCEPT, DROP: ACT_DROP, RETURN: ACT_RETURN}
    if kind in simple:
        return simple[kind]
    if kind in (JUMP, GOTO):
        code = ACT_JUMP if kind == JUMP else ACT_GOTO
        target = t.params.chain
        if (code, target) in plan.kinds:
            return code | plan.chain_ids[target] << 8
        raise Fallback(f"the segment does not dispatch {kind} {target}")
    raise Fallback(f"target {kind} is not classified")


def _rows(rt: Runtime, fam: Family, table: str, chain: str, rule: Rule) -> list:
    fl = make_flavour(rt.hook, fam, rt.iface or "x")
    tc = TableCompiler(Table(table), fl)
    try:
        return rule_rows(tc.rule_pred(chain, 1, rule), fam)
    except NotClassifiable as e:
        raise Fallback(f"the rule is not classifiable ({e})") from None
    except Exception as e:  # the full restore reports it properly
        raise Fallback(str(e)) from None


def _place(rows: list, plan: SegmentPlan) -> list[tuple[int, object]]:
    """(group index, key) of every row: hash keys are bytes, LPM keys (fixed, plen, addr)."""
    out = []
    for sig, vals, classes, hot in rows:
        exact = classes[0] is not None
        cls_bytes = [bytes((c,)) for c in classes] if exact else [b"\0"]
        found = None
        for gi, g in enumerate(plan.groups):
            if g.class_exact != exact:
                continue
            if g.skips_full and any(c == 0 for c in classes):  # PacketClass.FULL
                continue
            if g.lpm_rank is None:
                if tuple(sig) == g.sig:
                    head = b"".join(vals)
                    found = [(gi, head + c, hot) for c in cls_bytes]
                    break
                continue
            key = _lpm_parts(sig, vals, g)
            if key is not None:
                rest, plen, addr = key
                found = [(gi, (rest + c, plen, addr), hot) for c in cls_bytes]
                break
        if found is None:
            raise Fallback("a row of the rule has a shape no group of the segment probes")
        out.extend(found)
    return out


def _lpm_parts(sig, vals, g) -> tuple[bytes, int, bytes] | None:
    """(fixed part, prefix length, address) when the row fits LPM group `g`."""
    width = KEY_FIELDS[g.lpm_rank].width
    sig = tuple(sig)
    for j, (rank, mask) in enumerate(sig):
        if rank != g.lpm_rank:
            continue
        bits = int.from_bytes(mask, "big")
        plen = bin(bits).count("1")
        if bits != ((1 << 8 * width) - 1) ^ ((1 << (8 * width - plen)) - 1):
            return None
        if sig[:j] + sig[j + 1:] != g.sig:
            return None
        return b"".join(vals[:j] + vals[j + 1:]), plen, vals[j]
    if sig == g.sig:  # no constraint on the address: the /0 prefix
        return b"".join(vals), 0, bytes(width)
    return None


def _apply(s: Session, rec: Record, ch: Change, edit: _Edit) -> None:
    rt, fam = s.rt, s.fam
    inserting = edit.new is not None
    plans = _choose(s, rec.text, ch.table, ch.chain, edit.pos, edit.old is None)
    tr = rec.tables.get(ch.table)
    if tr is None:
        raise Fallback(f"table {ch.table} has no slot table")
    # Everything is checked before the first write.
    new_rows = _rows(rt, fam, ch.table, ch.chain, edit.new) if edit.new else None
    old_rows = _rows(rt, fam, ch.table, ch.chain, edit.old) if edit.old else None
    work = []
    for p in plans:
        static = dict(p.static)
        ins = None
        if new_rows is not None:
            k = edit.pos - p.start + (1 if edit.old is not None else 0)  # R: after the old one
            order = _order(p, k)
            free = sorted(set(range(p.cap)) - set(p.ids))
            if not free:
                raise Fallback("the segment's action table is full")
            placed = _place(fold_static(new_rows, static), p)
            for gi, _, _ in placed:
                name = p.groups[gi].map_key
                used, cap = s.tp.fill[name]
                if used + len(placed) > cap:
                    raise Fallback("a classifier map is full")
            ins = (k, order, free[0], _action(edit.new, p), placed)
        rem = None
        if old_rows is not None:
            k = edit.pos - p.start
            rem = (k, p.ids[k], _place(fold_static(old_rows, static), p))
        work.append((p, ins, rem))
    slot = None
    if inserting:
        if s.tp.free_slots:
            slot = s.tp.free_slots.pop(0)
        elif len(tr.slots) < s.tp.counter_cap:
            slot = len(tr.slots)
        else:
            raise Fallback("no spare counter slot")
        _zero_counter(s, ch.table, slot)
    # Write: the new rule first (a replaced rule stays until its successor is in), then the
    # removal of the old one.
    old_slot = None
    for p, ins, rem in work:
        if ins is not None:
            k, order, ident, act, placed = ins
            write_action(s, p, ident, action_word(act, slot))
            vals = {}
            for gi, key, hot in placed:
                v = order << ORDER_SHIFT | (HOT_BIT if hot else 0) | ident
                vals[(gi, key)] = min(vals.get((gi, key), v), v)  # a hotdrop row may share it
            add_values(s, p, vals)
            p.orders.insert(k, order)
            p.ids.insert(k, ident)
            p.slots.insert(k, slot)
        if rem is not None:
            k, ident, placed = rem
            remove_id(s, p, {(gi, key) for gi, key, _ in placed}, ident)
            old_slot = p.slots[k]
            del p.orders[k], p.ids[k], p.slots[k]
    delta = (1 if inserting else 0) - (1 if edit.old is not None else 0)
    for p in s.tp.plans:
        if p.chain != ch.chain or any(p is q for q in plans):
            continue
        if p.start > edit.pos or (p.start == edit.pos and inserting):
            p.start += delta
            p.end += delta
    for p in plans:
        p.end += delta
    _renumber(tr.slots, ch.chain, edit, slot, old_slot)
    if old_slot is not None and old_slot != slot:
        s.tp.free_slots.append(old_slot)


def _order(p: SegmentPlan, k: int) -> int:
    """An order between the rules at k - 1 and k of the segment."""
    lo = p.orders[k - 1] if k > 0 else 0
    if k < len(p.orders):
        hi = p.orders[k]
        mid = (lo + hi) // 2
        if not lo < mid < hi:
            raise Fallback("no room between the neighbouring rules' orders")
        return mid
    if lo + p.step > MAX_ORDER:
        raise Fallback("no room after the segment's last rule")
    return lo + p.step


def _zero_counter(s: Session, table: str, slot: int) -> None:
    path = s.rt._path(pin_name("cnt", s.fam.value, table, str(s.gen)))
    with Map.open_pinned(path) as m:
        m.update(struct.pack("<I", slot), bytes(16 * possible_cpus()))


def _renumber(slots: list, chain: str, edit: _Edit, new_slot: int | None,
              old_slot: int | None) -> None:
    """The slot table after the change: later rules of the chain move, slots stay."""
    pos1 = edit.pos + 1  # the changed rule's number
    if edit.old is not None:
        old = next((i for i, (c, r) in enumerate(slots) if c == chain and r == pos1), None)
        assert old is None or old_slot is None or old == old_slot
        if old is not None:
            slots[old] = ("", None)
    shift = -1 if edit.new is None else 1 if edit.old is None else 0
    if shift:
        first = pos1 + 1 if shift < 0 else pos1  # rules after a deleted one, from an insert
        slots[:] = [(c, r + shift) if c == chain and r is not None and r >= first else (c, r)
                    for c, r in slots]
    if new_slot is not None:
        if new_slot == len(slots):
            slots.append((chain, pos1))
        else:
            slots[new_slot] = (chain, pos1)


def _write_state(s: Session, rec: Record, text: str, table: str) -> None:
    """Replace the record and the plans (pinned under a temporary name, then renamed)."""
    gen = str(s.gen)
    fam = s.fam.value
    new = Record(rec.family, rec.hook, rec.iface, text, rec.tables, None, None, rec.version)
    fi = 0 if s.fam is Family.IPV4 else 1
    for name, make in ((pin_name("meta", fam, gen), lambda: write_record(new, f"bpf_meta{fi}")),
                       (pin_name("plan", fam, gen),
                        lambda: planstore.write_blob(planstore.encode(s.all), f"bpf_plan{fi}"))):
        path = s.rt._path(name)
        tmp = path + "_tmp"
        unlink_quiet(tmp)
        with make() as m:
            m.pin(tmp)
        os.rename(tmp, path)


# -- fallback ------------------------------------------------------------------------------


def _reload(rt: Runtime, fam: Family, ch: Change, edit: _Edit, text: str,
            sets: dict | None) -> None:
    """Restore `text` whole, each rule keeping its counters (a new rule starts at zero)."""
    loaded = rt.loaded(fam)
    rs = parse(text, family=fam, filename="<loaded>", sets=sets)
    if loaded is not None:
        for tname, tr in loaded.record.tables.items():
            table, counts = rs.tables.get(tname), loaded.counters.get(tname)
            if table is None or counts is None:
                continue
            for i, (c, r) in enumerate(tr.slots):
                if not c or c not in table.chains:
                    continue
                if r is None:
                    table.chains[c].counters = counts[i]
                    continue
                if c == ch.chain and tname == ch.table:
                    r = _moved(r, edit)
                if r is not None and r <= len(table.chains[c].rules):
                    table.chains[c].rules[r - 1].counters = counts[i]
    rt.restore(rs, text=text, counters=True)


def _moved(r: int, edit: _Edit) -> int | None:
    """The number rule `r` of the changed chain has afterwards (None: it went)."""
    pos1 = edit.pos + 1
    if edit.old is not None:
        if r == pos1:
            return None
        return r - 1 if r > pos1 and edit.new is None else r
    return r + 1 if r >= pos1 else r


__all__ = ["Change", "Fallback", "Outcome", "apply_change"]
