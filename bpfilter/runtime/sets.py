"""Named sets pinned at a hook: shared by every table and program of a family there, changed
in place at run time, kept across restores.

    <hook dir>/set_<fam>_<name>   the set's map (name escaped: bpffs refuses dots)
    <hook dir>/setdefs_<fam>      the definitions of the family's sets (compressed JSON)

A restore brings the pinned sets to the ruleset's definitions (`SetSync`): a set whose
definition is unchanged keeps its map, and so the members added at run time (the restore's
members are added to them, as `ipset restore -exist` does); a new or redefined set gets a new
map holding the restore's members, as does a set flagged `replace` (nftables rulesets: the
listing states the whole set); a set the ruleset no longer defines is removed once the new
ruleset is live. `SetStore` reads and changes the pinned sets (`bpfilter set`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import zlib
from collections.abc import Hashable

from ..bpf.consts import MapType, UpdateFlags
from ..bpf.maps import Map, MapSpec
from ..bpf.syscall import BpfError
from ..compiler.setmaps import NOMATCH, decode, encode, map_spec, set_map_key
from ..ir.model import Family
from ..ir.sets import SET_TYPES, IpSet, Parts, SetDef
from .state import unlink_quiet

CHUNK = 16 * 1024
DEFS = "setdefs"


class SetStateError(RuntimeError):
    """A pinned set is missing, or a change to it is refused."""


def _escape(name: str) -> str:
    """A set name as a pin name part: [A-Za-z0-9-] kept, anything else as _XX (hex)."""
    return "".join(c if c.isascii() and (c.isalnum() or c == "-") else
                   "".join(f"_{b:02x}" for b in c.encode()) for c in name)


def pin_of(family: Family, name: str) -> str:
    """The pin name of a set's map (never ends in _0/_1, the generation suffixes)."""
    return f"set_{family.value}_{_escape(name)}"


# --- definitions -----------------------------------------------------------------------------


def def_to_json(d: SetDef) -> dict:
    """A definition as JSON data."""
    return {"name": d.name, "type": d.type.name,
            "family": d.family.value if d.family is not None else None,
            "maxelem": d.maxelem, "hashsize": d.hashsize, "netmask": d.netmask,
            "range": list(d.range) if d.range is not None else None}


def def_from_json(x: dict) -> SetDef:
    """Inverse of `def_to_json`."""
    return SetDef(x["name"], SET_TYPES[x["type"]],
                  Family(x["family"]) if x["family"] is not None else None,
                  x["maxelem"], x["hashsize"], x["netmask"],
                  tuple(x["range"]) if x["range"] is not None else None)  # type: ignore[arg-type]


def _write_defs(defs: dict[str, SetDef]) -> Map:
    raw = zlib.compress(json.dumps([def_to_json(d) for d in defs.values()]).encode())
    blob = len(raw).to_bytes(8, "little") + raw
    n = (len(blob) + CHUNK - 1) // CHUNK
    m = Map.create(MapSpec(MapType.ARRAY, 4, CHUNK, n, name="bpf_setdefs"))
    for i in range(n):
        m.update(i.to_bytes(4, "little"), blob[i * CHUNK:(i + 1) * CHUNK].ljust(CHUNK, b"\0"))
    return m


def _read_defs(path: str) -> dict[str, SetDef]:
    if not os.path.exists(path):
        return {}
    with Map.open_pinned(path) as m:
        chunks = [m.lookup(i.to_bytes(4, "little")) or b"" for i in range(m.spec.max_entries)]
    blob = b"".join(chunks)
    size = int.from_bytes(blob[:8], "little")
    return {d.name: d for d in map(def_from_json, json.loads(zlib.decompress(blob[8:8 + size])))}


# --- restore ---------------------------------------------------------------------------------


class SetSync:
    """Brings the pinned sets of `family` in `directory` to `sets` during a restore.

    Construct it before the programs are loaded (its `maps` are what they look up), call
    `commit()` just before the switch and `finish()` after it. It never closes the maps it
    hands out: whoever loads the programs closes them.
    """

    def __init__(self, directory: str, family: Family, sets: dict[str, IpSet]) -> None:
        self.dir = directory
        self.family = family
        self.sets = {n: s for n, s in sets.items() if s.definition.fits(family)}
        self.maps: dict[Hashable, Map] = {}
        self._new: dict[str, Map] = {}  # maps to pin at commit
        self._merge: dict[str, IpSet] = {}  # members to add to kept maps at commit
        self._old = _read_defs(self._path(f"{DEFS}_{family.value}"))
        try:
            for name, s in self.sets.items():
                key = set_map_key(s.definition)
                # A replacing set gets a new map, switched to with the programs: the members
                # added at run time go, and no packet sees a half-filled set.
                kept = None if s.replace else self._reuse(s.definition)
                if kept is not None:
                    self.maps[key] = kept
                    self._merge[name] = s
                    continue
                m = self.maps[key] = self._new[name] = Map.create(map_spec(s.definition))
                _load(m, s)
        except Exception:
            for m in self.maps.values():
                m.close()
            raise

    def _path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def _reuse(self, d: SetDef) -> Map | None:
        """The pinned map of `d` if it was pinned with the same definition and shape."""
        path = self._path(pin_of(self.family, d.name))
        if self._old.get(d.name) != d or not os.path.exists(path):
            return None
        m = Map.open_pinned(path)
        want, got = map_spec(d), m.spec
        if (want.type, want.key_size, want.value_size, want.max_entries) != (
                got.type, got.key_size, got.value_size, got.max_entries):
            m.close()
            return None
        return m

    def commit(self) -> None:
        """Add the restore's members to kept sets, pin new maps and the definitions."""
        for name, s in self._merge.items():
            try:
                _load(self.maps[set_map_key(s.definition)], s)
            except BpfError as e:
                raise SetStateError(f"set {name}: cannot add the restore's members to the "
                                    f"members it has ({e})") from None
        for name, m in self._new.items():
            path = self._path(pin_of(self.family, name))
            unlink_quiet(path)
            m.pin(path)
        defs_path = self._path(f"{DEFS}_{self.family.value}")
        with _write_defs({n: s.definition for n, s in self.sets.items()}) as m:
            unlink_quiet(defs_path)
            m.pin(defs_path)

    def finish(self) -> None:
        """Unpin the sets the live ruleset no longer defines."""
        for name in set(self._old) - set(self.sets):
            unlink_quiet(self._path(pin_of(self.family, name)))


def _load(m: Map, s: IpSet) -> None:
    """Write every member of `s` into `m`."""
    d = s.definition
    pairs = [encode(d, parts, nm) for parts, nm in s.members.items()]
    try:
        for i in range(0, len(pairs), 4096):
            m.update_batch(pairs[i:i + 4096])
    except OSError:
        for k, v in pairs:  # LPM tries have no batch update
            m.update(k, v)


# --- run-time changes --------------------------------------------------------------------------


class SetStore:
    """The sets pinned for `family` in one hook directory."""

    def __init__(self, directory: str, family: Family) -> None:
        self.dir = directory
        self.family = family

    def definitions(self) -> dict[str, SetDef]:
        """Every pinned set's definition, by name."""
        return _read_defs(os.path.join(self.dir, f"{DEFS}_{self.family.value}"))

    def definition(self, name: str) -> SetDef:
        """One set's definition (SetStateError if there is no such set)."""
        d = self.definitions().get(name)
        if d is None:
            raise SetStateError(f"no set {name!r} is loaded for {self.family.value}")
        return d

    def _open(self, d: SetDef) -> Map:
        path = os.path.join(self.dir, pin_of(self.family, d.name))
        if not os.path.exists(path):
            raise SetStateError(f"set {d.name!r}: its map is not pinned at {path}")
        return Map.open_pinned(path)

    def read(self, name: str) -> IpSet:
        """A set with the members its map holds now."""
        d = self.definition(name)
        with self._open(d) as m:
            items = list(m.items())
        s = IpSet(d)
        for k, v in items:
            parts, nomatch = decode(d, k, v)
            s.add(parts, nomatch)
        return s

    def add(self, name: str, members: list[Parts], nomatch: bool = False,
            exist: bool = False) -> int:
        """Add members (an error for one already there, unless `exist`); returns how many were
        new."""
        d = self.definition(name)
        added = 0
        with self._open(d) as m:
            for parts in members:
                key, value = encode(d, parts, nomatch)
                try:
                    m.update(key, value, UpdateFlags.ANY if exist else UpdateFlags.NOEXIST)
                    added += 1
                except BpfError as e:
                    if e.errno == errno.EEXIST:
                        raise SetStateError(f"set {name}: member already added") from None
                    if e.errno in (errno.E2BIG, errno.ENOMEM, errno.ENOSPC):  # full
                        raise SetStateError(f"set {name} is full ({d.capacity()} members)") \
                            from None
                    raise
        return added

    def delete(self, name: str, members: list[Parts], exist: bool = False) -> int:
        """Remove members (an error for one not there, unless `exist`); returns how many."""
        d = self.definition(name)
        removed = 0
        with self._open(d) as m:
            for parts in members:
                key, _ = encode(d, parts)
                if m.delete(key):
                    removed += 1
                elif not exist:
                    raise SetStateError(f"set {name}: member is not in the set")
        return removed

    def test(self, name: str, members: list[Parts]) -> bool:
        """True when every member is in the set as a packet would find it (for networks: the
        longest stored prefix covering it, which must not be a nomatch member)."""
        d = self.definition(name)
        with self._open(d) as m:
            for parts in members:
                value = m.lookup(encode(d, parts)[0])
                if value is None or value[0] & NOMATCH:
                    return False
        return True

    def flush(self, name: str) -> int:
        """Remove every member; returns how many there were."""
        d = self.definition(name)
        with self._open(d) as m:
            keys = list(m.keys())
            for k in keys:
                with contextlib.suppress(OSError):
                    m.delete(k)
        return len(keys)
