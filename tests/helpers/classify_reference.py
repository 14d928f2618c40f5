"""The classifier's entry and group building as first written (before the speed work).

Kept only as the reference `tests/test_classify_speedup.py` compares the fast code with: one
Entry per packet class, a sorted signature per entry, groups filled entry by entry. Known
differences, fixed in the fast code and avoided by the comparison: several constraints on one
field (the last one won) and a match that is never true (its earlier hotdrops were lost).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bpfilter.compiler.classify.atoms import KEY_FIELDS, PacketClass, mem_bytes, range_to_prefixes
from bpfilter.ir.model import Family
from bpfilter.ir.pred import (
    AllOf,
    AnyOf,
    Cmp,
    Const,
    Field,
    NonFirstFragment,
    Not,
    Order,
    Proto,
    Range,
    TransportHeader,
)

_AVAIL = {PacketClass.FULL: 20, PacketClass.TRUNC0: 0, PacketClass.TRUNC4: 4,
          PacketClass.TRUNC8: 8}
ADDR_FIELDS = (Field.SADDR4, Field.DADDR4, Field.SADDR6, Field.DADDR6)


class NotClassifiable(Exception):
    """Stays linear."""


@dataclass(frozen=True)
class Constraint:
    field: Field
    value: bytes
    mask: bytes


@dataclass(frozen=True)
class Entry:
    constraints: tuple[Constraint, ...]
    pclass: PacketClass | None
    hotdrop: bool = False


def _bytes(f: Field, v) -> bytes:
    if isinstance(v, bytes):
        return v.ljust(f.width, b"\0")
    return (v & ((1 << (8 * f.width)) - 1)).to_bytes(f.width, "big")


def _cmp(c: Cmp) -> Constraint:
    if c.field not in KEY_FIELDS:
        raise NotClassifiable(c.field.name)
    mask = b"\xff" * c.field.width if c.mask is None else _bytes(c.field, c.mask)
    value = bytes(a & b for a, b in zip(_bytes(c.field, c.value), mask, strict=True))
    return Constraint(c.field, value, mask)


def _range(r: Range) -> list[Constraint]:
    f = r.field
    if f not in KEY_FIELDS or f.width > 2 or f.order is Order.BYTES:
        raise NotClassifiable(f.name)
    bits = 8 * f.width
    full = (1 << bits) - 1
    return [Constraint(f, v.to_bytes(f.width, "big"),
                       (full ^ ((1 << (bits - p)) - 1)).to_bytes(f.width, "big"))
            for v, p in range_to_prefixes(max(r.lo, 0), min(r.hi, full), bits)]


def _alternatives(p) -> list[Constraint]:
    if isinstance(p, Cmp):
        return [_cmp(p)]
    if isinstance(p, Range):
        return _range(p)
    if isinstance(p, AnyOf):
        out = [c for q in p.preds for c in _alternatives(q)]
        if len({c.field for c in out}) != 1:
            raise NotClassifiable("fields")
        return out
    raise NotClassifiable(type(p).__name__)


def rule_entries(pred, family: Family, limit: int = 256) -> list[Entry]:
    """Entries of a rule (one per class and alternative)."""
    atoms = list(pred.preds) if isinstance(pred, AllOf) else [pred]
    prefix: list[list[Constraint]] = [[]]
    need = None
    allowed = set(PacketClass)
    frags = {PacketClass.FRAG, PacketClass.EVIL_FRAG}
    hotdrops = []
    has_proto = False
    for a in atoms:
        if isinstance(a, Const):
            if not a.value:
                return []
            continue
        if isinstance(a, NonFirstFragment):
            allowed &= frags
            continue
        if isinstance(a, Not) and isinstance(a.pred, NonFirstFragment):
            allowed -= frags
            continue
        if isinstance(a, Proto):
            if a.negate:
                raise NotClassifiable("negated protocol")
            if family is Family.IPV6:
                hotdrops.append(([list(x) for x in prefix], {PacketClass.V6ERR}))
                has_proto = True
            if a.proto == 0:
                continue
            alts = [Constraint(Field.L4PROTO, bytes([a.proto]), b"\xff")]
        elif isinstance(a, TransportHeader):
            classes = {c for c, n in _AVAIL.items() if n < a.need.value}
            if a.evil_frag and family is Family.IPV4:
                classes.add(PacketClass.EVIL_FRAG)
            hotdrops.append(([list(x) for x in prefix], classes))
            need = a.need if need is None or a.need.value > need.value else need
            continue
        else:
            alts = _alternatives(a)
        prefix = [[*x, c] for x in prefix for c in alts]
        if len(prefix) > limit:
            raise NotClassifiable("keys")
    classes = set(allowed)
    if need is not None:
        classes &= {c for c, n in _AVAIL.items() if n >= need.value}
    if has_proto:
        classes.discard(PacketClass.V6ERR)
    out: list[Entry] = []
    for alt in prefix:
        if classes == set(PacketClass):
            out.append(Entry(tuple(alt), None))
        else:
            out.extend(Entry(tuple(alt), c) for c in sorted(classes))
    taken: set = set()
    for alts, hclasses in hotdrops:
        fresh = (hclasses & allowed) - taken
        taken |= hclasses
        for c in sorted(fresh):
            out.extend(Entry(tuple(alt), c, hotdrop=True) for alt in alts)
    return out


def fold_static(entries: list[Entry], static: dict[Field, bytes]) -> list[Entry]:
    """Constraints on compile-time known fields evaluated."""
    out = []
    for e in entries:
        keep, ok = [], True
        for c in e.constraints:
            known = static.get(c.field)
            if known is None:
                keep.append(c)
            elif any((k & m) != (v & m) for k, v, m in zip(known, c.value, c.mask, strict=True)):
                ok = False
                break
        if ok:
            out.append(Entry(tuple(keep), e.pclass, e.hotdrop))
    return out


def _plen(mask: bytes) -> int | None:
    bits, n = int.from_bytes(mask, "big"), len(mask) * 8
    plen = bin(bits).count("1")
    return plen if bits == ((1 << n) - 1) ^ ((1 << (n - plen)) - 1) else None


@dataclass
class Group:
    """A group as first built: key -> smallest value, or LPM (fixed, plen, addr) -> value."""

    fields: tuple
    class_exact: bool
    lpm_field: Field | None = None
    values: dict = field(default_factory=dict)
    classes: set = field(default_factory=set)
    prefixes: dict = field(default_factory=dict)

    def fixed_key(self, cons: dict, pclass) -> bytes:
        out = b"".join(mem_bytes(f, cons[f].value) if f in cons else bytes(f.width)
                       for f, _ in self.fields)
        return out + bytes([pclass if pclass is not None and self.class_exact else 0])


def signature(e: Entry) -> tuple:
    """Mask shape of an entry."""
    fm = sorted(((c.field, c.mask) for c in e.constraints if any(c.mask)),
                key=lambda x: KEY_FIELDS.index(x[0]))
    return tuple(fm), e.pclass is not None


def _lpm_candidate(fields_masks) -> Field | None:
    for f, m in fields_masks:
        if f in ADDR_FIELDS and _plen(m) is not None and _plen(m) < 8 * f.width:
            return f
    return None


def build_groups(rules: list[list[Entry]]) -> list[Group]:
    """Groups in probe order."""
    plain: dict = {}
    sigs: dict = {}
    for i, entries in enumerate(rules):
        for e in entries:
            sigs.setdefault(signature(e), []).append((i, e))
    lpm: dict = {}
    for sig, items in sigs.items():
        fields_masks, class_exact = sig
        lf = _lpm_candidate(fields_masks)
        if lf is not None:
            rest = tuple((f, m) for f, m in fields_masks if f != lf)
            g = lpm.setdefault((rest, class_exact, lf), Group(rest, class_exact, lf))
            plen = _plen(dict(fields_masks)[lf])
            for i, e in items:
                g.classes.add(e.pclass)
                cons = {c.field: c for c in e.constraints}
                k = (g.fixed_key(cons, e.pclass), plen, cons[lf].value)
                v = i << 1 | e.hotdrop
                g.prefixes[k] = min(g.prefixes.get(k, v), v)
            continue
        g = plain.setdefault(sig, Group(fields_masks, class_exact))
        for i, e in items:
            g.classes.add(e.pclass)
            cons = {c.field: c for c in e.constraints}
            k = g.fixed_key(cons, e.pclass)
            v = i << 1 | e.hotdrop
            g.values[k] = min(g.values.get(k, v), v)
    out = []
    for g in [*plain.values(), *lpm.values()]:
        if g.lpm_field is not None and len({p for _, p, _ in g.prefixes}) == 1:
            out.append(_as_hash(g))
        else:
            out.append(g)
    out.sort(key=lambda g: min(g.values.values() if g.lpm_field is None
                               else g.prefixes.values()))
    return out


def _as_hash(g: Group) -> Group:
    (plen,) = {p for _, p, _ in g.prefixes}
    w = g.lpm_field.width
    mask = ((1 << (8 * w)) - 1) ^ ((1 << (8 * w - plen)) - 1)
    fields = tuple(sorted([*g.fields, (g.lpm_field, mask.to_bytes(w, "big"))],
                          key=lambda fm: KEY_FIELDS.index(fm[0])))
    h = Group(fields, g.class_exact, classes=set(g.classes))
    for (fixed, _, addr), v in g.prefixes.items():
        parts, pos = {}, 0
        for f, _ in g.fields:
            parts[f] = fixed[pos : pos + f.width]
            pos += f.width
        parts[g.lpm_field] = addr
        key = b"".join(parts[f] for f, _ in fields) + fixed[pos:]
        h.values[key] = min(h.values.get(key, v), v)
    return h
