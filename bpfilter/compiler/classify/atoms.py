"""Rules as key constraints: what the classifier can answer with map lookups.

A rule is *classifiable* when its predicate is a conjunction of non-negated masked equalities and
ranges on fields the classifier keys on (a multiport list is a disjunction on one field: several
keys for one rule). Each such rule becomes *rows*: for one alternative of its constraints, the
packet classes it applies to.

The class folds netfilter's special cases into the key, so odd packets need no separate path:
netfilter evaluates a transport match only on a first fragment with enough header, drops the
packet at once ("hotdrop") when the header is too short, and (IPv6) hotdrops `-p` when the
extension header chain cannot be walked. For each class a rule either matches with all its
constraints, never matches, or hotdrops where everything before the hotdropping match matched.

Rows are plain tuples, built for speed (100,000-rule rulesets make millions of them):

    row = (sig, vals, classes, hot)
    sig     = ((rank, mask), ...)  the fields a key holds, in `KEY_FIELDS` order (rank = index
              there), each with its big-endian mask; fields with an all-zero mask are left out
    vals    = (value, ...)         each field's masked value as the packet struct holds it
    classes = (class, ...)         packet classes the row applies to; (None,) for any class
    hot     = 0 or 1               1 for a hotdrop row: the packet is dropped when it decides
"""

from __future__ import annotations

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
_ALL = frozenset(PacketClass)
# Per header need: the classes whose transport header is too short for it, and the others.
_SHORT = {need: frozenset(c for c, n in _AVAIL.items() if n < need.value) for need in L4}
_ENOUGH = {need: frozenset(c for c, n in _AVAIL.items() if n >= need.value) for need in L4}
_FRAGMENTS = frozenset({PacketClass.FRAG, PacketClass.EVIL_FRAG})

# Fields a key can hold, with the number of bytes they take in a key.
KEY_FIELDS: tuple[Field, ...] = (
    Field.SADDR4, Field.DADDR4, Field.SADDR6, Field.DADDR6, Field.L4PROTO, Field.SPORT,
    Field.DPORT, Field.ICMPTYPE, Field.ICMPCODE, Field.TCPFLAGS, Field.TTL, Field.PKTTYPE,
    Field.MARK, Field.IIFNAME, Field.OIFNAME, Field.IPLEN,
)
_RANK = {f.ident: i for i, f in enumerate(KEY_FIELDS)}  # by ident: ints hash in C
_FULL = {n: b"\xff" * n for n in (1, 2, 4, 6, 16)}
_L4PROTO_RANK = _RANK[Field.L4PROTO.ident]

Sig = tuple[tuple[int, bytes], ...]
Row = tuple[Sig, tuple[bytes, ...], tuple, int]
# One constraint: ((rank, big-endian mask), value as the packet struct holds it).
Con = tuple[tuple[int, bytes], bytes]


class NotClassifiable(Exception):
    """The rule has a part the classifier cannot key on; it stays linear code."""


def mem_bytes(f: Field, be: bytes) -> bytes:
    """A field's big-endian value as the packet struct holds it (host-order fields reversed)."""
    return be[::-1] if f.order is Order.HOST and f.width > 1 else be


def _bytes(field: Field, v: int | bytes) -> bytes:
    if isinstance(v, bytes):
        return v.ljust(field.width, b"\0")
    return (v & ((1 << (8 * field.width)) - 1)).to_bytes(field.width, "big")


def _cmp(c: Cmp) -> Con | None:
    """The constraint of one comparison (None when its mask is all zero: always true)."""
    f = c.field
    rank = _RANK.get(f.ident)
    if rank is None:
        raise NotClassifiable(f"field {f.name}")
    value = _bytes(f, c.value)
    if c.mask is None:
        mask = _FULL[f.width]
    else:
        mask = _bytes(f, c.mask)
        if not any(mask):
            return None
        value = (int.from_bytes(value, "big") & int.from_bytes(mask, "big")).to_bytes(
            f.width, "big")
    return (rank, mask), mem_bytes(f, value)


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


_RANGES: dict[tuple[int, int, int], list[Con]] = {}


def _range(r: Range) -> list[Con]:
    f = r.field
    if f.ident not in _RANK or f.width > 2 or f.order is Order.BYTES:
        raise NotClassifiable(f"range on {f.name}")
    key = (f.ident, r.lo, r.hi)
    hit = _RANGES.get(key)
    if hit is not None:
        return hit
    bits = 8 * f.width
    full = (1 << bits) - 1
    rank = _RANK[f.ident]
    out: list[Con] = []
    for value, plen in range_to_prefixes(max(r.lo, 0), min(r.hi, full), bits):
        mask = full ^ ((1 << (bits - plen)) - 1)
        if not mask:
            out.append(((rank, b""), b""))  # the whole range: always true (dropped below)
            continue
        out.append(((rank, mask.to_bytes(f.width, "big")),
                    mem_bytes(f, value.to_bytes(f.width, "big"))))
    if len(_RANGES) > 1 << 14:
        _RANGES.clear()
    _RANGES[key] = out
    return out


def _alternatives(p: Pred) -> list[Con]:
    """Constraints of which one must hold (a multiport list); all on one field."""
    if isinstance(p, Cmp):
        c = _cmp(p)
        return [((_RANK[p.field.ident], b""), b"")] if c is None else [c]
    if isinstance(p, Range):
        return _range(p)
    if isinstance(p, AnyOf):
        out: list[Con] = []
        for q in p.preds:
            out.extend(_alternatives(q))
        if len({c[0][0] for c in out}) != 1:
            raise NotClassifiable("a disjunction over several fields")
        return out
    raise NotClassifiable(type(p).__name__)


_CLASSES: dict[frozenset, tuple] = {}


def _class_tuple(classes: frozenset) -> tuple:
    hit = _CLASSES.get(classes)
    if hit is None:
        hit = _CLASSES[classes] = (None,) if classes == _ALL else tuple(sorted(classes))
    return hit


def rule_rows(pred: Pred, family: Family, limit: int = 256) -> list[Row]:
    """The rows of a rule's predicate; raises NotClassifiable."""
    atoms = pred.preds if isinstance(pred, AllOf) else (pred,)
    # Walk the atoms in evaluation order, keeping what holds so far and where hotdrops happen.
    prefix: list[tuple[Con, ...]] = [()]  # alternatives of the constraints so far
    need: L4 | None = None
    allowed = _ALL  # narrowed by -f / ! -f, which netfilter tests before -m
    hotdrops: list[tuple[list[tuple[Con, ...]], frozenset]] = []
    has_proto = False
    possible = True
    for a in atoms:
        if isinstance(a, Cmp):
            c = _cmp(a)
            if c is not None:
                prefix = [(*x, c) for x in prefix]
            continue
        if isinstance(a, Const):
            if not a.value:
                # Never matches; netfilter stops here, after the hotdrops met so far.
                possible = False
                break
            continue
        if isinstance(a, NonFirstFragment):
            allowed &= _FRAGMENTS
            continue
        if isinstance(a, Not) and isinstance(a.pred, NonFirstFragment):
            allowed -= _FRAGMENTS
            continue
        if isinstance(a, Proto):
            if a.negate:
                raise NotClassifiable("negated protocol")
            if family is Family.IPV6:
                hotdrops.append((prefix, frozenset({PacketClass.V6ERR})))
                has_proto = True
            if a.proto == 0:
                continue
            c = ((_L4PROTO_RANK, b"\xff"), bytes((a.proto,)))
            prefix = [(*x, c) for x in prefix]
            continue
        if isinstance(a, TransportHeader):
            short = _SHORT[a.need]
            if a.evil_frag and family is Family.IPV4:
                short = short | {PacketClass.EVIL_FRAG}
            hotdrops.append((prefix, short))
            need = a.need if need is None or a.need.value > need.value else need
            continue
        alts = _alternatives(a)
        prefix = [(*x, c) for x in prefix for c in alts]
        if len(prefix) > limit:
            raise NotClassifiable(f"more than {limit} keys")
    # Classes in which the whole rule can match.
    classes = allowed
    if need is not None:
        classes = classes & _ENOUGH[need]
    if has_proto:
        classes = classes - {PacketClass.V6ERR}
    out: list[Row] = []
    if classes and possible:
        ct = _class_tuple(frozenset(classes))
        for alt in prefix:
            row = _row(alt, ct, 0)
            if row is not None:
                out.append(row)
    # Hotdrops: the first hotdrop point reached wins, so later points skip its classes.
    taken: frozenset = frozenset()
    for alts, hclasses in hotdrops:
        fresh = (hclasses & allowed) - taken
        taken |= hclasses
        if fresh:
            ct = _class_tuple(frozenset(fresh))
            for alt in alts:
                row = _row(alt, ct, 1)
                if row is not None:
                    out.append(row)
    return out


def _row(alt: tuple[Con, ...], classes: tuple, hot: int) -> Row | None:
    """A row from constraints in evaluation order (None if they contradict each other)."""
    cs = sorted(alt)
    n = len(cs)
    for i in range(1, n):
        if cs[i][0][0] == cs[i - 1][0][0]:
            merged = _merge(cs)
            if merged is None:
                return None
            cs = merged
            break
    sig = tuple([c[0] for c in cs if c[0][1]])
    if len(sig) != len(cs):
        cs = [c for c in cs if c[0][1]]
    return sig, tuple([c[1] for c in cs]), classes, hot


def _merge(cs: list[Con]) -> list[Con] | None:
    """Constraints with several on one field ANDed into one (None if they contradict)."""
    out: dict[int, tuple[int, int]] = {}  # rank -> (mask, value), both in struct byte order
    for (rank, mask), value in cs:
        f = KEY_FIELDS[rank]
        m = int.from_bytes(mem_bytes(f, mask), "big") if mask else 0
        v = int.from_bytes(value, "big") if value else 0
        if rank in out:
            om, ov = out[rank]
            if (om & m) and (ov & om & m) != (v & om & m):
                return None
            m, v = om | m, ov | v
        out[rank] = (m, v)
    merged: list[Con] = []
    for rank, (m, v) in sorted(out.items()):
        f = KEY_FIELDS[rank]
        if not m:
            continue
        mask = mem_bytes(f, m.to_bytes(f.width, "big"))
        merged.append(((rank, mask), v.to_bytes(f.width, "big")))
    return merged


_TOUCHED: dict[tuple, bool] = {}  # (signature, static ranks) -> has a static field


def fold_static(rows: list[Row], static: dict[Field, bytes]) -> list[Row]:
    """Rows with the constraints on compile-time known fields evaluated: a constraint that
    holds is dropped, a row with one that fails can never apply and goes."""
    if not static:
        return rows
    known = {_RANK[f.ident]: (f, v) for f, v in static.items() if f.ident in _RANK}
    ranks = frozenset(known)
    out: list[Row] = []
    for row in rows:
        sig, vals, classes, hot = row
        touched = _TOUCHED.get((sig, ranks))
        if touched is None:
            if len(_TOUCHED) > 1 << 12:
                _TOUCHED.clear()
            touched = _TOUCHED[(sig, ranks)] = any(r in ranks for r, _ in sig)
        if not touched:
            out.append(row)
            continue
        ksig: list[tuple[int, bytes]] = []
        kvals: list[bytes] = []
        ok = True
        for (r, mask), v in zip(sig, vals, strict=True):
            hit = known.get(r)
            if hit is None:
                ksig.append((r, mask))
                kvals.append(v)
                continue
            f, s = hit
            m = mem_bytes(f, mask)
            if any((a & b) != c for a, b, c in zip(s, m, v, strict=True)):
                ok = False
                break
        if ok:
            out.append((tuple(ksig), tuple(kvals), classes, hot))
    return out


def sig_fields(sig: Sig) -> tuple[tuple[Field, bytes], ...]:
    """A signature's (field, mask) pairs."""
    return tuple((KEY_FIELDS[r], m) for r, m in sig)
