"""The compiled form of a table: its programs, maps and counter slots, as the runtime loads them."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

from ..bpf.asm import Program
from ..bpf.maps import Map, MapSpec
from ..ir.model import Table
from ..ir.pred import Field
from .classify.groups import Group
from .classify.plan import SegmentPlan
from .hooks.base import Flavour, HookPoint

COUNTERS, TRACE = "counters", "trace"
COUNTER_VALUE = 16  # {u64 packets, u64 bytes}
TRACE_VALUE = 8  # {u32 slot, u32 verdict}
PASSED = 3  # trace verdict: the ruleset did not apply (non-IP, other family)
# Action codes of classified rules (low byte; a chain index above it for jumps and gotos).
ACT_ACCEPT, ACT_DROP, ACT_RETURN, ACT_JUMP, ACT_GOTO = 1, 2, 3, 4, 5


@dataclass
class Segment:
    """A run of rules [start, end) (0-based) answered by the classifier."""

    start: int
    end: int
    groups: list[Group]
    actions: list[tuple[int, str | None]]  # per rule: (ACT_*, chain for jumps/gotos)
    fields: set[Field]
    variant: int = 0  # which set of compile-time field values it was built for


@dataclass(frozen=True)
class Slot:
    """A counter slot: a rule (1-based `rule`) or a built-in chain's policy (`rule` None)."""

    index: int
    chain: str
    rule: int | None


@dataclass
class CompiledProgram:
    """The program of one built-in chain."""

    chain: str
    hook: HookPoint
    program: Program
    name: str
    flavour: Flavour


@dataclass
class CompiledTable:
    """Everything needed to load one table: programs, the maps they use, the slot table."""

    table: Table
    flavour: Flavour
    programs: dict[str, CompiledProgram]
    slots: list[Slot]
    maps: dict[Hashable, MapSpec] = field(default_factory=dict)
    # Initial contents of maps that are not zero-filled (classifier tables, action arrays).
    map_data: dict[Hashable, list[tuple[bytes, bytes]]] = field(default_factory=dict)
    uses_conntrack: bool = False  # rules read the packet's conntrack entry
    # Per classified segment, what an in-place update needs (see classify/plan.py), and per
    # chain the segment variants it was compiled in (a change must fit every one of them).
    plans: dict[tuple, SegmentPlan] = field(default_factory=dict)
    variants: dict[str, list[int]] = field(default_factory=dict)

    def create_maps(self, shared: dict[Hashable, Map] | None = None) -> dict[Hashable, Map]:
        """Create every map of the table and load the contents it starts with; maps in
        `shared` (e.g. the log ring buffer that outlives rulesets) are used as they are."""
        made: dict[Hashable, Map] = {}
        try:
            for k, spec in self.maps.items():
                if shared and k in shared:
                    made[k] = shared[k]
                    continue
                m = made[k] = Map.create(spec)
                data = self.map_data.get(k)
                if data:
                    _fill(m, data)
        except Exception:
            for k, m in made.items():
                if not (shared and k in shared):
                    m.close()
            raise
        return made

    def slot_of(self, chain: str, rule: int | None) -> int:
        """The counter slot of a rule (or of a policy, rule None)."""
        for s in self.slots:
            if s.chain == chain and s.rule == rule:
                return s.index
        raise KeyError((chain, rule))


def _fill(m: Map, data: list[tuple[bytes, bytes]]) -> None:
    try:
        for i in range(0, len(data), 4096):
            m.update_batch(data[i : i + 4096])
    except OSError:
        for k, v in data:  # maps without batch support (LPM tries on some kernels)
            m.update(k, v)


def assign_slots(table: Table) -> list[Slot]:
    """Slot 0 is 'no decision'; then each built-in chain's policy, then every rule."""
    slots = [Slot(0, "", None)]
    for c in table.chains.values():
        if c.builtin:
            slots.append(Slot(len(slots), c.name, None))
    for c in table.chains.values():
        for n in range(1, len(c.rules) + 1):
            slots.append(Slot(len(slots), c.name, n))
    return slots
