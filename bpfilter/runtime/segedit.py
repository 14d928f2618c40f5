"""Editing one segment's loaded maps: keys, their shared values, the control map.

Keys of one group can be shared by several rules (multiport overlaps, the same address in two
rules): a hash key holds the smallest of its values and the plan keeps all of them (`dups`); an
LPM prefix holds the smallest of its own values and its ancestors' (`raw`), so a change to one
prefix rewrites it and every stored prefix below it. The control map's early-stop words only
ever go down (a bound below the true minimum just stops the probe later).
"""

from __future__ import annotations

import os
import struct

from ..bpf.maps import Map
from ..compiler.classify.atoms import KEY_FIELDS
from ..compiler.classify.plan import ID_MASK, SegmentPlan
from ..ir.model import Family
from . import planstore
from .loader import Runtime
from .state import pin_name

VALUE = struct.Struct("<Q")


class Fallback(Exception):
    """The change cannot be applied in place (the message says why)."""


class Session:
    """Open maps and the plans of one table, while a change is applied."""

    def __init__(self, rt: Runtime, fam: Family, gen: int, table: str) -> None:
        self.rt, self.fam, self.gen = rt, fam, gen
        path = rt._path(pin_name("plan", fam.value, str(gen)))
        if not os.path.exists(path):
            raise Fallback("the loaded ruleset has no classifier plans")
        with Map.open_pinned(path) as m:
            self.all = planstore.decode(planstore.read_blob(m))
        if table not in self.all:
            raise Fallback(f"table {table} has no classifier plans")
        self.tp = self.all[table]
        self.maps: dict[str, Map] = {}
        # LPM prefixes per (group map, fixed part): {(plen, address): address as int}.
        self.lpm: dict[tuple[str, bytes], dict[tuple[int, bytes], int]] = {}

    def map(self, name: str) -> Map:
        m = self.maps.get(name)
        if m is None:
            m = self.maps[name] = Map.open_pinned(self.rt._path(f"{name}_{self.gen}"))
        return m

    def close(self) -> None:
        for m in self.maps.values():
            m.close()



def write_action(s: Session, p: SegmentPlan, ident: int, word: int) -> None:
    m = s.map(p.ctl_key)
    raw = bytearray(m.lookup(bytes(4)) or b"")
    off = 8 * (len(p.groups) + ident)
    raw[off : off + 8] = VALUE.pack(word)
    m.update(bytes(4), bytes(raw))


def lower_bounds(s: Session, p: SegmentPlan, per_group: dict[int, int]) -> None:
    """Word i of the control map must stay at most the smallest value of groups >= i."""
    m = s.map(p.ctl_key)
    raw = bytearray(m.lookup(bytes(4)) or b"")
    best = None
    changed = False
    for i in range(len(p.groups) - 1, -1, -1):
        v = per_group.get(i)
        if v is not None and (best is None or v < best):
            best = v
        if best is not None:
            (w,) = VALUE.unpack_from(raw, 8 * i)
            if best < w:
                VALUE.pack_into(raw, 8 * i, best)
                changed = True
    if changed:
        m.update(bytes(4), bytes(raw))


def add_values(s: Session, p: SegmentPlan, vals: dict[tuple[int, object], int]) -> None:
    lows: dict[int, int] = {}
    for (gi, _), v in vals.items():
        lows[gi] = min(lows.get(gi, v), v)
    # The probe's early stop must see the new values before any key holds them.
    lower_bounds(s, p, lows)
    for (gi, key), v in vals.items():
        g = p.groups[gi]
        if g.lpm_rank is None:
            cur = _hash_values(s, g, key)
            _hash_store(s, g, key, sorted({*cur, v}), had=bool(cur))
        else:
            fixed, plen, addr = key
            own = g.raw.get(key)
            if own is None:
                s.tp.fill[g.map_key][0] += 1
            g.raw[key] = sorted({*(own or ()), v})
            _lpm_refresh(s, g, fixed, plen, addr)


def remove_id(s: Session, p: SegmentPlan, keys: set, ident: int) -> None:
    for gi, key in keys:
        g = p.groups[gi]
        if g.lpm_rank is None:
            cur = _hash_values(s, g, key)
            _hash_store(s, g, key, [v for v in cur if v & ID_MASK != ident], had=bool(cur))
        else:
            own = g.raw.get(key)
            if own is None:
                continue
            left = [v for v in own if v & ID_MASK != ident]
            if left:
                g.raw[key] = left
            else:
                del g.raw[key]
                s.tp.fill[g.map_key][0] -= 1
            _lpm_refresh(s, g, *key)


def _hash_values(s: Session, g, key: bytes) -> list[int]:
    vals = g.dups.get(key)
    if vals is not None:
        return list(vals)
    raw = s.map(g.map_key).lookup(key)
    return [] if raw is None else [VALUE.unpack(raw)[0]]


def _hash_store(s: Session, g, key: bytes, vals: list[int], *, had: bool) -> None:
    m = s.map(g.map_key)
    if len(vals) > 1:
        g.dups[key] = vals
    else:
        g.dups.pop(key, None)
    if vals:
        m.update(key, VALUE.pack(vals[0]))
        if not had:
            s.tp.fill[g.map_key][0] += 1
    elif had:
        m.delete(key)
        s.tp.fill[g.map_key][0] -= 1


def _lpm_refresh(s: Session, g, fixed: bytes, plen: int, addr: bytes) -> None:
    """Rewrite the trie entry of a prefix and of every stored prefix below it."""
    width = KEY_FIELDS[g.lpm_rank].width
    nbits = 8 * width
    full = (1 << nbits) - 1

    def masked(a: int, q: int) -> int:
        return a & (full ^ ((1 << (nbits - q)) - 1))

    shift = nbits - plen
    top = int.from_bytes(addr, "big") >> shift
    index = s.lpm.get((g.map_key, fixed))
    if index is None:  # built once per change: a blocklist has thousands of prefixes
        frm = int.from_bytes
        index = s.lpm[(g.map_key, fixed)] = {(q, a): frm(a, "big") for f, q, a in g.raw
                                             if f == fixed}
    if (fixed, plen, addr) in g.raw:
        index[(plen, addr)] = top << shift
    else:
        index.pop((plen, addr), None)
    plens = {q for q, _ in index}
    below = [k for k, ai in index.items() if k[0] > plen and ai >> shift == top]
    m = s.map(g.map_key)
    for q, a in [(plen, addr), *below]:
        ai = int.from_bytes(a, "big")
        best = None
        for r in plens:
            if r > q:
                continue
            own = g.raw.get((fixed, r, masked(ai, r).to_bytes(width, "big")))
            if own and (best is None or own[0] < best):
                best = own[0]
        key = (g.fixed_bits + q).to_bytes(4, "little") + fixed + a
        if (fixed, q, a) not in g.raw:
            m.delete(key)
        elif best is not None:
            m.update(key, VALUE.pack(best))


