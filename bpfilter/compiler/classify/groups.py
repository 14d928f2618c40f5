"""Tuple-space search: entries grouped by mask, one map per group, first match by rule order.

Entries with the same masks form a group, looked up with one hash map keyed by the masked packet
fields. Groups that differ only in the prefix length of one address field merge into one LPM
trie with that field last in the key; there each stored prefix holds the best value of itself and
every shorter prefix of the group containing it, so the longest-prefix answer is the first rule
among all matching prefixes. A value is `rule index << 1 | hotdrop`: the smallest value found over
all groups is the first rule that applies. Groups are probed in order of their smallest value, so
the search stops as soon as no later group can hold an earlier rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ...ir.pred import Field
from .atoms import KEY_FIELDS, PacketClass, Row, Sig, mem_bytes, sig_fields

CLASS_WIDTH = 1  # the packet class byte ends every key
ADDR_FIELDS = (Field.SADDR4, Field.DADDR4, Field.SADDR6, Field.DADDR6)
_ADDR_RANKS = frozenset(KEY_FIELDS.index(f) for f in ADDR_FIELDS)
_CLASS_BYTE = [bytes((c,)) for c in range(256)]
_NOCLASS = b"\0"

__all__ = ["Group", "build_groups", "group_key", "mem_bytes"]


def _plen(mask: bytes) -> int | None:
    bits = int.from_bytes(mask, "big")
    n = len(mask) * 8
    plen = bin(bits).count("1")
    return plen if bits == ((1 << n) - 1) ^ ((1 << (n - plen)) - 1) else None


@dataclass
class Group:
    """One probe: a hash map (or LPM trie, `lpm_field` set) over masked fields."""

    fields: tuple[tuple[Field, bytes], ...]  # (field, mask) in key order; LPM field excluded
    class_exact: bool
    lpm_field: Field | None = None
    values: dict[bytes, int] = field(default_factory=dict)  # key -> value (hash)
    # Packet classes its entries apply to (None: any class).
    classes: set[PacketClass | None] = field(default_factory=set)
    prefixes: dict[tuple[bytes, int, bytes], int] = field(default_factory=dict)  # LPM
    # Keys (LPM: prefixes) that several rules share: key -> every value, the smallest first.
    dups: dict = field(default_factory=dict)

    @property
    def key_size(self) -> int:
        """Bytes of a lookup key (LPM: the data part, without the prefix length word)."""
        n = sum(f.width for f, _ in self.fields) + CLASS_WIDTH
        return n + (self.lpm_field.width if self.lpm_field is not None else 0)

    @property
    def fixed_bits(self) -> int:
        """Key bits before the LPM field."""
        return 8 * (sum(f.width for f, _ in self.fields) + CLASS_WIDTH)

    def min_value(self) -> int:
        """The smallest value stored (the earliest rule this group can answer)."""
        vals = self.values.values() if self.lpm_field is None else self.prefixes.values()
        return min(vals)

    def entries(self) -> list[tuple[bytes, int]]:
        """(key, value) pairs to load: LPM keys carry the u32 prefix length first."""
        if self.lpm_field is None:
            return list(self.values.items())
        return self._lpm_entries()

    def _lpm_entries(self) -> list[tuple[bytes, int]]:
        assert self.lpm_field is not None
        width = self.lpm_field.width
        # Best value of each exact (fixed part, prefix) first, then fold in every ancestor.
        by_fixed: dict[bytes, dict[int, dict[int, int]]] = {}
        for (fixed, plen, addr), v in self.prefixes.items():
            level = by_fixed.setdefault(fixed, {}).setdefault(plen, {})
            a = int.from_bytes(addr, "big")
            old = level.get(a)
            if old is None or v < old:
                level[a] = v
        out: list[tuple[bytes, int]] = []
        nbits = width * 8
        full = (1 << nbits) - 1
        for fixed, levels in by_fixed.items():
            lens = sorted(levels)
            masks = {p: full & ~((1 << (nbits - p)) - 1) for p in lens}
            for i, plen in enumerate(lens):
                shorter = lens[:i]
                head = (self.fixed_bits + plen).to_bytes(4, "little") + fixed
                for a, v in levels[plen].items():
                    val = v
                    for s in shorter:
                        w = levels[s].get(a & masks[s])
                        if w is not None and w < val:
                            val = w
                    out.append((head + a.to_bytes(width, "big"), val))
        return out


_GROUP_KEYS: dict[tuple, tuple] = {}


def group_key(sig: tuple) -> tuple:
    """The group a row signature `(sig, class_exact)` ends up in: LPM candidates that differ
    only in the prefix length of their LPM field share one (what a segment's lookup count is
    made of)."""
    hit = _GROUP_KEYS.get(sig)
    if hit is not None:
        return hit
    fields_masks, class_exact = sig
    j = _lpm_index(fields_masks)
    key = sig if j is None else (fields_masks[:j] + fields_masks[j + 1:], class_exact,
                                 fields_masks[j][0])
    if len(_GROUP_KEYS) > 1 << 12:
        _GROUP_KEYS.clear()
    _GROUP_KEYS[sig] = key
    return key


def _lpm_index(sig: Sig) -> int | None:
    """Where the LPM field is in a signature: the first address field with a prefix mask
    shorter than its width (an exact /32 blocklist stays a hash lookup)."""
    for j, (rank, mask) in enumerate(sig):
        if rank in _ADDR_RANKS:
            p = _plen(mask)
            if p is not None and p < 8 * len(mask):
                return j
    return None


@dataclass
class _Plan:
    """How rows of one signature land in their group."""

    group: Group
    lpm_at: int | None  # index of the LPM field in the signature
    plen: int = 0


def build_groups(rules: list[list[Row]]) -> list[Group]:
    """Groups for a segment's rules (rule i's rows at index i), ordered for probing."""
    plain: dict[tuple, Group] = {}
    lpm: dict[tuple, Group] = {}
    plans: dict[tuple, _Plan] = {}
    for i, rows in enumerate(rules):
        base = i << 1
        for sig, vals, classes, hot in rows:
            exact = classes[0] is not None
            plan = plans.get((sig, exact))
            if plan is None:
                plan = plans[(sig, exact)] = _plan((sig, exact), plain, lpm)
            g = plan.group
            g.classes.update(classes)
            v = base | hot
            j = plan.lpm_at
            # Rules come in order and a rule's hotdrop rows last: the first value a key gets
            # is its smallest; later ones are kept aside for updates that remove a rule.
            if j is None:
                head = b"".join(vals)
                d = g.values
                if exact:
                    for c in classes:
                        k = head + _CLASS_BYTE[c]
                        if d.setdefault(k, v) != v:
                            _dup(g, k, d[k], v)
                else:
                    k = head + _NOCLASS
                    if d.setdefault(k, v) != v:
                        _dup(g, k, d[k], v)
                continue
            rest = b"".join(vals[:j] + vals[j + 1:])
            addr, plen, pd = vals[j], plan.plen, g.prefixes
            for c in classes:
                k = (rest + (_CLASS_BYTE[c] if exact else _NOCLASS), plen, addr)
                if pd.setdefault(k, v) != v:
                    _dup(g, k, pd[k], v)
    groups = [*plain.values(), *lpm.values()]
    # An LPM trie holding a single prefix length is just a hash map with one more field.
    out = []
    for g in groups:
        if g.lpm_field is not None and len({p for _, p, _ in g.prefixes}) == 1:
            out.append(_as_hash(g))
        else:
            out.append(g)
    out.sort(key=Group.min_value)
    return out


def _dup(g: Group, key: object, first: int, v: int) -> None:
    vals = g.dups.get(key)
    if vals is None:
        g.dups[key] = [first, v]
    elif vals[-1] != v:
        vals.append(v)


def _plan(key: tuple, plain: dict[tuple, Group], lpm: dict[tuple, Group]) -> _Plan:
    sig, exact = key
    j = _lpm_index(sig)
    if j is None:
        g = plain.get(key)
        if g is None:
            g = plain[key] = Group(sig_fields(sig), exact)
        return _Plan(g, None)
    gkey = group_key(key)
    g = lpm.get(gkey)
    if g is None:
        rest = sig[:j] + sig[j + 1:]
        g = lpm[gkey] = Group(sig_fields(rest), exact, KEY_FIELDS[sig[j][0]])
    plen = _plen(sig[j][1])
    assert plen is not None
    return _Plan(g, j, plen)


def _as_hash(g: Group) -> Group:
    assert g.lpm_field is not None
    ((_, plen, _),) = {(None, p, None) for _, p, _ in g.prefixes}
    mask = ((1 << (8 * g.lpm_field.width)) - 1) ^ ((1 << (8 * g.lpm_field.width - plen)) - 1)
    fields = tuple(sorted([*g.fields, (g.lpm_field, mask.to_bytes(g.lpm_field.width, "big"))],
                          key=lambda fm: KEY_FIELDS.index(fm[0])))
    h = Group(fields, g.class_exact, classes=set(g.classes))
    for (fixed, _, addr), v in g.prefixes.items():
        # Re-lay the key in field order: the LPM field was last, the class byte before it.
        parts = {}
        pos = 0
        for f, _ in g.fields:
            parts[f] = fixed[pos : pos + f.width]
            pos += f.width
        cls = fixed[pos:]
        parts[g.lpm_field] = addr
        key = b"".join(parts[f] for f, _ in fields) + cls
        h.values[key] = min(h.values.get(key, v), v)
        if (fixed, plen, addr) in g.dups:
            h.dups[key] = g.dups[(fixed, plen, addr)]
    return h
