"""hashlimit and recent tables across restores: pinned per family and name, like the kernel's.

The kernel keeps a named table while some rule names it, so `iptables-restore` of a ruleset
that names it again keeps its buckets and lists, and every table of the family (filter,
mangle, ...) sees the same one. Here the map of a table is pinned under its name and reused by
the next restore when its shape (key, value, size) is unchanged; a table no rule names any
more is unpinned after the switch. (The kernel also keeps the old configuration of a hashlimit
table a restore changes; here the new one applies to the kept buckets.) connlimit's per-rule
groups and remembered connections (two maps) are kept the same way, under a name made of the
rule (compiler/connlimit.py): the kernel starts them afresh at every restore.
"""

from __future__ import annotations

import os
from collections.abc import Hashable

from ..bpf.maps import Map, MapSpec
from ..compiler.compiled import CompiledTable
from ..ir.model import Family
from .state import pin_name, unlink_quiet

PREFIX = "state"


def _pin(family: Family, key: tuple) -> str:
    # bpffs refuses dots; list names may hold any character but "/".
    return pin_name(PREFIX, family.value, key[1], key[2].encode().hex())


def _shape(spec: MapSpec) -> tuple:
    return spec.type, spec.key_size, spec.value_size, spec.max_entries


class StateSync:
    """The maps of the named state tables of a restore: kept ones opened from their pins, new
    ones created. Construct before loading, `commit()` before the switch, `finish()` after;
    the maps are closed by whoever loads the programs (they are in `maps`)."""

    def __init__(self, directory: str, family: Family, compiled: list[CompiledTable]) -> None:
        self.dir = directory
        self.family = family
        self.maps: dict[Hashable, Map] = {}
        self._new: dict[str, Map] = {}
        specs: dict[tuple, MapSpec | None] = {}
        for ct in compiled:
            for k, spec in ct.maps.items():
                if isinstance(k, tuple) and len(k) == 3 and k[0] == "state" and k[1] in (
                        "hashlimit", "recent", "connlimit", "connlist"):
                    # A name two tables configure differently stays a map per table.
                    specs[k] = spec if specs.get(k, spec) == spec else None
        try:
            for k, spec in specs.items():
                if spec is not None:
                    self.maps[k] = self._open(k, spec)
        except Exception:
            for m in self.maps.values():
                m.close()
            raise

    def _open(self, key: tuple, spec: MapSpec) -> Map:
        path = os.path.join(self.dir, _pin(self.family, key))
        if os.path.exists(path):
            m = Map.open_pinned(path)
            if _shape(m.spec) == _shape(spec):
                return m
            m.close()
        m = self._new[path] = Map.create(spec)
        return m

    def commit(self) -> None:
        """Pin the new tables (replacing pins of another shape)."""
        for path, m in self._new.items():
            unlink_quiet(path)
            m.pin(path)

    def finish(self) -> None:
        """Unpin the family's tables no rule names any more."""
        keep = {_pin(self.family, k) for k in self.maps}
        head = pin_name(PREFIX, self.family.value) + "_"
        for name in os.listdir(self.dir):
            if name.startswith(head) and name not in keep:
                unlink_quiet(os.path.join(self.dir, name))
