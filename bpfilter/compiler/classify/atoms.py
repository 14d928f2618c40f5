"""Rules as key constraints: what the classifier can answer with map lookups.

A rule is *classifiable* when its predicate is a conjunction of non-negated masked equalities and
ranges on fields the classifier keys on (a multiport list is a disjunction on one field: several
keys for one rule). Each such rule becomes one or more `Entry`s: a mask and a value per field, plus
the packet *class* it applies to.

The class folds netfilter's special cases into the key, so odd packets need no separate path:
netfilter evaluates a transport match only on a first fragment with enough header, drops the
packet at once ("hotdrop") when the header is too short, and (IPv6) hotdrops `-p` when the
extension header chain cannot be walked. For each class a rule either matches with all its
constraints, never matches, or hotdrops where everything before the hotdropping match matched.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from ...ir.model import Family
from ...ir.pred import (
    L4,
    AllOf,
    AnyOf,
    Cmp,
    Const,
    Field,
    NonFirstFragment,
    Not,
    Order,
    Pred,
    Proto,
    Range,
    TransportHeader,
)


class PacketClass(IntEnum):
    """What the parser found, as far as netfilter's special cases are concerned."""

    FULL = 0  # transport header of 20 bytes or more (or no transport match needs more)
    FRAG = 1  # a later fragment
    EVIL_FRAG = 2  # IPv4 fragment at offset 1 (xt_tcpudp hotdrops TCP matches)
    TRUNC0 = 3  # first fragment, fewer than 4 bytes of transport header
    TRUNC4 = 4  # 4 to 7 bytes
    TRUNC8 = 5  # 8 to 19 bytes
    V6ERR = 6  # IPv6 extension headers could not be walked


_AVAIL = {PacketClass.FULL: 20, PacketClass.TRUNC0: 0, PacketClass.TRUNC4: 4,
          PacketClass.TRUNC8: 8}

# Fields a key can hold, with the number of bytes they take in a key.
KEY_FIELDS: tuple[Field, ...] = (
    Field.SADDR4, Field.DADDR4, Field.SADDR6, Field.DADDR6, Field.L4PROTO, Field.SPORT,
    Field.DPORT, Field.ICMPTYPE, Field.ICMPCODE, Field.TCPFLAGS, Field.TTL, Field.PKTTYPE,
    Field.MARK, Field.IIFNAME, Field.OIFNAME, Field.IPLEN,
)


@dataclass(frozen=True)
class Constraint:
    """field & mask == value, with value and mask as big-endian bytes of the field's width."""

    field: Field
    value: bytes
    mask: bytes


@dataclass(frozen=True)
class Entry:
    """One key of a rule: constraints that must all hold, for packets of `pclass`.

    `hotdrop` entries stand for the rule's hotdrop: they hold the constraints evaluated before the
    match that drops, and the packet is dropped when such an entry decides.
    """

    constraints: tuple[Constraint, ...]
    pclass: PacketClass | None  # None: any class
    hotdrop: bool = False


class NotClassifiable(Exception):
    """The rule has a part the classifier cannot key on; it stays linear code."""


def _bytes(field: Field, v: int | bytes) -> bytes:
    if isinstance(v, bytes):
        return v.ljust(field.width, b"\0")
    return (v & ((1 << (8 * field.width)) - 1)).to_bytes(field.width, "big")


def _cmp(c: Cmp) -> Constraint:
    if c.field not in KEY_FIELDS:
        raise NotClassifiable(f"field {c.field.name}")
    full = b"\xff" * c.field.width
    mask = full if c.mask is None else _bytes(c.field, c.mask)
    value = bytes(a & b for a, b in zip(_bytes(c.field, c.value), mask, strict=True))
    return Constraint(c.field, value, mask)


def range_to_prefixes(lo: int, hi: int, bits: int) -> list[tuple[int, int]]:
    """Cover [lo, hi] with (value, prefix length) blocks, fewest first-to-last."""
    out: list[tuple[int, int]] = []
    while lo <= hi:
        size = lo & -lo if lo else 1 << bits
        while size > hi - lo + 1:
            size >>= 1
        out.append((lo, bits - size.bit_length() + 1))
        lo += size
    return out


def _range(r: Range) -> list[Constraint]:
    f = r.field
    if f not in KEY_FIELDS or f.width > 2 or f.order is Order.BYTES:
        raise NotClassifiable(f"range on {f.name}")
    bits = 8 * f.width
    full = (1 << bits) - 1
    out = []
    for value, plen in range_to_prefixes(max(r.lo, 0), min(r.hi, full), bits):
        mask = full ^ ((1 << (bits - plen)) - 1)
        out.append(Constraint(f, value.to_bytes(f.width, "big"), mask.to_bytes(f.width, "big")))
    return out


def _alternatives(p: Pred) -> list[Constraint]:
    """Constraints of which one must hold (a multiport list); all on one field."""
    if isinstance(p, Cmp):
        return [_cmp(p)]
    if isinstance(p, Range):
        return _range(p)
    if isinstance(p, AnyOf):
        out: list[Constraint] = []
        for q in p.preds:
            out.extend(_alternatives(q))
        if len({c.field for c in out}) != 1:
            raise NotClassifiable("a disjunction over several fields")
        return out
    raise NotClassifiable(type(p).__name__)


def rule_entries(pred: Pred, family: Family, limit: int = 256) -> list[Entry]:
    """The entries of a rule's predicate; raises NotClassifiable."""
    atoms = list(pred.preds) if isinstance(pred, AllOf) else [pred]
    # Walk the atoms in evaluation order, keeping what holds so far and where hotdrops happen.
    prefix: list[list[Constraint]] = [[]]  # alternatives of the constraints so far
    need: L4 | None = None
    evil = False
    allowed = set(PacketClass)  # narrowed by -f / ! -f, which netfilter tests before -m
    fragments = {PacketClass.FRAG, PacketClass.EVIL_FRAG}
    hotdrops: list[tuple[list[list[Constraint]], set[PacketClass]]] = []
    has_proto = False
    for a in atoms:
        if isinstance(a, Const):
            if not a.value:
                return []
            continue
        if isinstance(a, NonFirstFragment):
            allowed &= fragments
            continue
        if isinstance(a, Not) and isinstance(a.pred, NonFirstFragment):
            allowed -= fragments
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
            short = {c for c, n in _AVAIL.items() if n < a.need.value}
            classes = set(short)
            if a.evil_frag and family is Family.IPV4:
                classes.add(PacketClass.EVIL_FRAG)
            hotdrops.append(([list(x) for x in prefix], classes))
            need = a.need if need is None or a.need.value > need.value else need
            evil = evil or a.evil_frag
            continue
        else:
            alts = _alternatives(a)
        prefix = [[*x, c] for x in prefix for c in alts]
        if len(prefix) > limit:
            raise NotClassifiable(f"more than {limit} keys")
    # Classes in which the whole rule can match.
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
    out.extend(_hotdrop_entries(hotdrops, allowed))
    return out


def _hotdrop_entries(hotdrops: list[tuple[list[list[Constraint]], set[PacketClass]]],
                     allowed: set[PacketClass]) -> list[Entry]:
    """Hotdrop entries: the first hotdrop point reached wins, so later points skip its classes."""
    out: list[Entry] = []
    taken: set[PacketClass] = set()
    for alts, classes in hotdrops:
        fresh = (classes & allowed) - taken
        taken |= classes
        for c in sorted(fresh):
            out.extend(Entry(tuple(alt), c, hotdrop=True) for alt in alts)
    return out


def fold_static(entries: list[Entry], static: dict[Field, bytes]) -> list[Entry]:
    """Entries with the constraints on compile-time known fields evaluated: a constraint that
    holds is dropped, an entry with one that fails can never apply and goes."""
    if not static:
        return entries
    out: list[Entry] = []
    for e in entries:
        keep: list[Constraint] = []
        ok = True
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
