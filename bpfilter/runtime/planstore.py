"""The classifier plans of a loaded ruleset, kept in bpffs so a later command can update maps.

Per family and generation the loader pins each classifier map (`cls_<fam>_<table>_<n>_<gen>`)
and one blob (`plan_<fam>_<gen>`, chunked like the record) describing per table: each segment's
plan (classify/plan.py) with the pin names of its maps, the segment variants of each chain, the
counter map's capacity and the free counter slots. Plans are stored as JSON (bytes as hex) so
the state never holds anything executable.
"""

from __future__ import annotations

import base64
import json
import struct
from array import array
from collections.abc import Hashable
from dataclasses import dataclass, field

from ..bpf.consts import MapType
from ..bpf.maps import Map, MapSpec
from ..compiler.classify.atoms import KEY_FIELDS
from ..compiler.classify.plan import GroupPlan, SegmentPlan
from ..compiler.compiled import COUNTERS, CompiledTable
from ..ir.pred import Field
from .state import CHUNK

_FIELDS = {f.name: f for f in Field}


@dataclass
class TablePlans:
    """What in-place updates need to know of one loaded table."""

    plans: list[SegmentPlan]
    variants: dict[str, list[int]]
    counter_cap: int
    free_slots: list[int] = field(default_factory=list)
    # Group map pin name -> [entries stored, capacity].
    fill: dict[str, list[int]] = field(default_factory=dict)


def classifier_pins(ct: CompiledTable, fam: str, table: str) -> dict[Hashable, str]:
    """Pin names (without the generation) of the classifier maps of a compiled table."""
    out: dict[Hashable, str] = {}
    for p in ct.plans.values():
        for k in [p.ctl_key, *(g.map_key for g in p.groups)]:
            out[k] = f"cls_{fam}_{table}_{len(out)}"
    return out


def table_plans(ct: CompiledTable, pins: dict[Hashable, str]) -> TablePlans:
    """The plans of a freshly compiled table, maps named by their pins."""
    plans = []
    fill: dict[str, list[int]] = {}
    for p in ct.plans.values():
        groups = []
        for g in p.groups:
            name = pins[g.map_key]
            fill[name] = [len(ct.map_data.get(g.map_key, ())), ct.maps[g.map_key].max_entries]
            groups.append(GroupPlan(name, g.sig, g.class_exact, g.lpm_rank, g.skips_full,
                                    g.fixed_bits, g.dups, g.raw))
        plans.append(SegmentPlan(p.chain, p.variant, p.start, p.end, p.cap, p.step,
                                 pins[p.ctl_key], groups, p.kinds, p.chain_ids, p.orders,
                                 p.ids, p.slots, p.static))
    return TablePlans(plans, ct.variants, ct.maps[COUNTERS].max_entries, [], fill)


def _raw_format(g: GroupPlan) -> struct.Struct:
    """One packed LPM prefix with a single value: fixed part, prefix length, address, value."""
    width = KEY_FIELDS[g.lpm_rank].width if g.lpm_rank is not None else 0
    return struct.Struct(f"<{g.fixed_bits // 8}sB{width}sQ")


def _group_json(g: GroupPlan) -> dict:
    # perf: a blocklist's prefixes mostly hold one value each: those are packed, not JSON.
    fmt = _raw_format(g)
    single = b"".join([fmt.pack(f, n, a, v[0]) for (f, n, a), v in g.raw.items() if len(v) == 1])
    return {"map": g.map_key, "sig": [[r, m.hex()] for r, m in g.sig], "exact": g.class_exact,
            "lpm": g.lpm_rank, "skips": g.skips_full, "fixed_bits": g.fixed_bits,
            "dups": [[k.hex(), v] for k, v in g.dups.items()],
            "raw1": base64.b64encode(single).decode(),
            "raw": [[f.hex(), n, a.hex(), v] for (f, n, a), v in g.raw.items() if len(v) > 1]}


def _group_from(d: dict) -> GroupPlan:
    fh = bytes.fromhex
    g = GroupPlan(d["map"], tuple((r, fh(m)) for r, m in d["sig"]), d["exact"], d["lpm"],
                  d["skips"], d["fixed_bits"], {fh(k): v for k, v in d["dups"]}, {})
    single = base64.b64decode(d["raw1"])
    if single:
        g.raw = {(f, n, a): [v] for f, n, a, v in _raw_format(g).iter_unpack(single)}
    g.raw.update({(fh(f), n, fh(a)): v for f, n, a, v in d["raw"]})
    return g


def _plan_json(p: SegmentPlan) -> dict:
    return {"chain": p.chain, "variant": list(p.variant), "start": p.start, "end": p.end,
            "cap": p.cap, "step": p.step, "ctl": p.ctl_key,
            "groups": [_group_json(g) for g in p.groups], "kinds": [list(k) for k in p.kinds],
            "chain_ids": p.chain_ids, "orders": _pack(p.orders), "ids": _pack(p.ids),
            "slots": _pack(p.slots),
            "static": [[f.name, v.hex()] for f, v in p.static]}


def _plan_from(d: dict) -> SegmentPlan:
    return SegmentPlan(d["chain"], tuple(d["variant"]), d["start"], d["end"], d["cap"],
                       d["step"], d["ctl"], [_group_from(g) for g in d["groups"]],
                       [(k, c) for k, c in d["kinds"]], d["chain_ids"], _unpack(d["orders"]),
                       _unpack(d["ids"]), _unpack(d["slots"]),
                       tuple((_FIELDS[f], bytes.fromhex(v)) for f, v in d["static"]))


def _pack(vals: list[int]) -> str:
    # perf: per-rule lists as packed u64s; JSON lists of 10,000 ints cost more than the change
    return base64.b64encode(array("Q", vals).tobytes()).decode()


def _unpack(text: str) -> list[int]:
    return array("Q", base64.b64decode(text)).tolist()


def encode(tables: dict[str, TablePlans]) -> bytes:
    """JSON of every table's plans."""
    d = {t: {"plans": [_plan_json(p) for p in tp.plans], "variants": tp.variants,
             "counter_cap": tp.counter_cap, "free": tp.free_slots, "fill": tp.fill}
         for t, tp in tables.items()}
    # Not compressed: it is rewritten on every single-rule change, and bpffs has the room.
    return json.dumps(d, separators=(",", ":")).encode()


def decode(raw: bytes) -> dict[str, TablePlans]:
    """Inverse of `encode`."""
    d = json.loads(raw)
    return {t: TablePlans([_plan_from(p) for p in v["plans"]], v["variants"],
                          v["counter_cap"], v["free"], v["fill"]) for t, v in d.items()}


def write_blob(raw: bytes, name: str) -> Map:
    """A new array map holding `raw` (8-byte length, then the bytes, in CHUNK-sized values)."""
    blob = len(raw).to_bytes(8, "little") + raw
    n = max(1, (len(blob) + CHUNK - 1) // CHUNK)
    m = Map.create(MapSpec(MapType.ARRAY, 4, CHUNK, n, name=name[:15]))
    try:
        m.update_batch([(i.to_bytes(4, "little"),
                         blob[i * CHUNK : (i + 1) * CHUNK].ljust(CHUNK, b"\0"))
                        for i in range(n)])
    except OSError:
        for i in range(n):
            m.update(i.to_bytes(4, "little"),
                     blob[i * CHUNK : (i + 1) * CHUNK].ljust(CHUNK, b"\0"))
    return m


def read_blob(m: Map) -> bytes:
    """The bytes `write_blob` stored in `m`."""
    first = m.lookup(bytes(4))
    if first is None:
        raise ValueError("empty state blob")
    size = int.from_bytes(first[:8], "little")
    parts = [first]
    i = 1
    while len(parts) * CHUNK < size + 8:
        v = m.lookup(i.to_bytes(4, "little"))
        if v is None:
            raise ValueError("truncated state blob")
        parts.append(v)
        i += 1
    return b"".join(parts)[8 : 8 + size]
