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

from ...ir.pred import Field, Order
from .atoms import KEY_FIELDS, Constraint, Entry, PacketClass

CLASS_WIDTH = 1  # the packet class byte ends every key
ADDR_FIELDS = (Field.SADDR4, Field.DADDR4, Field.SADDR6, Field.DADDR6)


def mem_bytes(f: Field, be: bytes) -> bytes:
    """A field's big-endian value as the packet struct holds it (host-order fields reversed)."""
    return be[::-1] if f.order is Order.HOST and f.width > 1 else be


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

    def fixed_key(self, cons: dict[Field, Constraint], pclass: PacketClass | None) -> bytes:
        """Key bytes of the fixed fields and the class (masked values, struct byte order)."""
        out = b""
        for f, mask in self.fields:
            c = cons.get(f)
            out += mem_bytes(f, c.value) if c is not None else bytes(f.width)
            del mask
        return out + bytes([pclass if pclass is not None and self.class_exact else 0])

    def entries(self) -> list[tuple[bytes, int]]:
        """(key, value) pairs to load: LPM keys carry the u32 prefix length first."""
        if self.lpm_field is None:
            return sorted(self.values.items())
        return self._lpm_entries()

    def _lpm_entries(self) -> list[tuple[bytes, int]]:
        assert self.lpm_field is not None
        width = self.lpm_field.width
        # Best value of each exact (fixed part, prefix) first, then fold in every ancestor.
        best: dict[tuple[bytes, int, int], int] = {}
        for (fixed, plen, addr), v in self.prefixes.items():
            k = (fixed, plen, int.from_bytes(addr, "big"))
            best[k] = min(best.get(k, v), v)
        by_fixed: dict[bytes, dict[int, dict[int, int]]] = {}
        for (fixed, plen, a), v in best.items():
            by_fixed.setdefault(fixed, {}).setdefault(plen, {})[a] = v
        out: list[tuple[bytes, int]] = []
        nbits = width * 8
        for fixed, levels in by_fixed.items():
            lens = sorted(levels)
            for plen in lens:
                for a, v in levels[plen].items():
                    val = v
                    for shorter in lens:
                        if shorter >= plen:
                            break
                        anc = a & ~((1 << (nbits - shorter)) - 1) & ((1 << nbits) - 1)
                        w = levels[shorter].get(anc)
                        if w is not None and w < val:
                            val = w
                    key_plen = self.fixed_bits + plen
                    out.append((key_plen.to_bytes(4, "little") + fixed + a.to_bytes(width, "big"),
                                val))
        return out


_ORDER = {f: i for i, f in enumerate(KEY_FIELDS)}


def signature(e: Entry) -> tuple:
    """The mask shape of an entry: entries of one shape share a group."""
    fm = sorted(((c.field, c.mask) for c in e.constraints if any(c.mask)),
                key=lambda x: _ORDER[x[0]])
    return tuple(fm), e.pclass is not None


def build_groups(rules: list[list[Entry]]) -> list[Group]:
    """Groups for a segment's rules (rule i's entries at index i), ordered for probing."""
    plain: dict[tuple, Group] = {}
    # First pass: gather signatures, to find merge candidates for LPM tries.
    sigs: dict[tuple, list[tuple[int, Entry]]] = {}
    for i, entries in enumerate(rules):
        for e in entries:
            sigs.setdefault(signature(e), []).append((i, e))
    lpm: dict[tuple, Group] = {}
    for sig, items in sigs.items():
        fields_masks, class_exact = sig
        lpm_field = _lpm_candidate(fields_masks)
        if lpm_field is not None:
            rest = tuple((f, m) for f, m in fields_masks if f != lpm_field)
            gkey = (rest, class_exact, lpm_field)
            g = lpm.setdefault(gkey, Group(rest, class_exact, lpm_field))
            plen = _plen(dict(fields_masks)[lpm_field])
            assert plen is not None
            for i, e in items:
                g.classes.add(e.pclass)
                cons = {c.field: c for c in e.constraints}
                fixed = g.fixed_key(cons, e.pclass)
                addr = cons[lpm_field].value
                v = i << 1 | e.hotdrop
                k = (fixed, plen, addr)
                g.prefixes[k] = min(g.prefixes.get(k, v), v)
            continue
        g = plain.setdefault(sig, Group(fields_masks, class_exact))
        for i, e in items:
            g.classes.add(e.pclass)
            cons = {c.field: c for c in e.constraints}
            key = g.fixed_key(cons, e.pclass)
            v = i << 1 | e.hotdrop
            g.values[key] = min(g.values.get(key, v), v)
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


def _lpm_candidate(fields_masks: tuple) -> Field | None:
    """The address field to make the LPM dimension: the first with a prefix mask shorter than
    its width (an exact /32 blocklist stays a hash lookup)."""
    for f, m in fields_masks:
        if f in ADDR_FIELDS and _plen(m) is not None and _plen(m) < 8 * f.width:
            return f
    return None


def _as_hash(g: Group) -> Group:
    assert g.lpm_field is not None
    (_, plen, _), = {(None, p, None) for _, p, _ in g.prefixes}
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
    return h
