"""A classified segment's layout: values, headroom, and what a later update needs to know.

A stored value is 64 bits, so rules can be added and removed in place (see
bpfilter/runtime/incremental.py) without touching the program:

    value = order << 32 | hotdrop << 31 | id
    order  the rule's place in the segment: smaller is earlier (the first match wins). Orders
           are spaced (`spacing` apart) so a rule can be inserted between two others.
    id     the rule's entry in the segment's action table: its action and its counter slot.

The segment's control map (one array element) holds, as u64 words: per group, the smallest
value a later group can hold (the probe stops early below it), then per id the rule's action
word (low 32 bits: action code | chain number << 8; high 32 bits: counter slot). Ids, counter
slots and map entries each keep spare room beyond what the ruleset uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .atoms import KEY_FIELDS, PacketClass
from .groups import Group

ORDER_SHIFT = 32
HOT_BIT = 1 << 31
ID_MASK = HOT_BIT - 1
NONE64 = (1 << 64) - 1
MAX_SPACING_BITS = 20


def spare(n: int) -> int:
    """Room kept beyond `n` used entries (ids, counter slots, map entries)."""
    return max(16, n // 4)


def spacing(n: int) -> int:
    """The distance between the orders of consecutive rules of an `n`-rule segment: a power
    of two, as large as leaves room to append as many rules again."""
    room = (1 << ORDER_SHIFT) // (2 * (n + 1))
    return 1 << max(0, min(MAX_SPACING_BITS, room.bit_length() - 1))


def encode(order: int, hot: int, ident: int) -> int:
    """A stored value."""
    return order << ORDER_SHIFT | (HOT_BIT if hot else 0) | ident


def initial_value(v: int, step: int) -> int:
    """The stored value of a freshly compiled segment for the abstract value `index << 1 |
    hotdrop` (rule `index` has order (index + 1) * step and id `index`)."""
    i = v >> 1
    return encode((i + 1) * step, v & 1, i)


def action_word(act: int, slot: int) -> int:
    """An action table entry."""
    return slot << 32 | act


@dataclass
class GroupPlan:
    """Where a row lands: one group of a segment, as the runtime needs to know it."""

    map_key: tuple  # the group's map in CompiledTable.maps
    sig: tuple  # hash: the (rank, mask) signature; LPM: the signature without the LPM field
    class_exact: bool
    lpm_rank: int | None  # LPM: rank of the LPM field (its prefix length varies)
    skips_full: bool  # the code skips the lookup for packets of class FULL
    fixed_bits: int  # LPM: key bits before the LPM field
    # Hash: keys holding several values (several rules) -> every stored value, sorted.
    dups: dict = field(default_factory=dict)
    # LPM: every prefix as (fixed part, prefix length, address) -> its own stored values,
    # sorted (the trie holds per prefix the smallest of its own and its ancestors' values).
    raw: dict = field(default_factory=dict)


@dataclass
class SegmentPlan:
    """A classified segment of one chain, for one set of compile-time field values."""

    chain: str
    variant: tuple  # the compile-time field values it was built for: ((ident, bytes), ...)
    start: int  # first rule (0-based) of the chain in the segment
    end: int
    cap: int  # ids the action table has room for
    step: int  # order spacing
    ctl_key: tuple  # the control map in CompiledTable.maps
    groups: list[GroupPlan]
    kinds: list[tuple[int, str | None]]  # actions the code dispatches on
    chain_ids: dict[str, int]  # chain number of each jump/goto target in action words
    orders: list[int]  # per rule of the segment
    ids: list[int]
    slots: list[int]
    static: tuple = ()  # compile-time field values: ((Field, bytes), ...)


def group_plan(map_key: tuple, g: Group, step: int) -> GroupPlan:
    """What the runtime needs to know of one group to add or remove its rows (values as
    stored: see `initial_value`)."""
    sig = tuple((KEY_FIELDS.index(f), m) for f, m in g.fields)
    lpm_rank = None if g.lpm_field is None else KEY_FIELDS.index(g.lpm_field)
    skips = g.class_exact and PacketClass.FULL not in g.classes
    enc = {}  # perf: a blocklist repeats few values per key

    def stored(vals: list[int]) -> list[int]:
        return sorted({enc.get(v) or enc.setdefault(v, initial_value(v, step)) for v in vals})

    if g.lpm_field is None:
        return GroupPlan(map_key, sig, g.class_exact, None, skips, 0,
                         {k: stored(vs) for k, vs in g.dups.items()})
    raw = {k: stored(g.dups.get(k, [v])) for k, v in g.prefixes.items()}
    return GroupPlan(map_key, sig, g.class_exact, lpm_rank, skips, g.fixed_bits, {}, raw)


def segment_plan(chain: str, variant: tuple, start: int, end: int, key: tuple, ctl: tuple,
                 groups: list[Group], kinds: list[tuple[int, str | None]],
                 ids: dict[str, int], step: int, cap: int, base: int,
                 static: dict) -> SegmentPlan:
    """The plan of a freshly compiled segment: rule i has order (i + 1) * step, id i and
    counter slot base + i."""
    n = end - start
    return SegmentPlan(chain, variant, start, end, cap, step, ctl,
                       [group_plan((*key, i), g, step) for i, g in enumerate(groups)],
                       kinds, ids, [(i + 1) * step for i in range(n)], list(range(n)),
                       [base + i for i in range(n)], tuple(static.items()))
