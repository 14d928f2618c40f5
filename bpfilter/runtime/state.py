"""Pinned state: where a loaded ruleset lives in bpffs, and the record that describes it.

    <root>/<netns id>/<hook>[@<iface>]/
        gen                 array map: the active generation of each family
        progs               prog array: gen * 64 + family * 32 + chain slot
        link_<...>          the attached dispatchers' links
        meta_<fam>_<gen>    array map holding the record below (compressed JSON, in chunks)
        cnt_<fam>_<table>_<gen>, trace_<fam>_<table>_<gen>

(bpffs reserves names with dots, hence the underscores.)

The record holds the ruleset in iptables-save form plus each table's slot table, so any later
command (save, list, check) rebuilds what is loaded from bpffs alone.
"""

from __future__ import annotations

import fcntl
import json
import os
import zlib
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field

from ..bpf.consts import MapType
from ..bpf.maps import Map, MapSpec

DEFAULT_ROOT = "/sys/fs/bpf/pybpfilter"
CHUNK = 32 * 1024


def bpffs_root() -> str:
    """The pin root: $BPFILTER_BPFFS, else /sys/fs/bpf/pybpfilter."""
    return os.environ.get("BPFILTER_BPFFS", DEFAULT_ROOT)


def pin_name(*parts: str) -> str:
    """A pin name from its parts (bpffs refuses dots in names)."""
    return "_".join(parts)


def hook_dir_name(hook: str, iface: str | None) -> str:
    """`nf`, or `tc@eth0` / `xdp@eth0` for per-interface hooks."""
    return f"{hook}@{iface}" if iface else hook


@dataclass
class TableRecord:
    """One compiled table: its slot table as (chain, rule or None) per slot."""

    slots: list[tuple[str, int | None]]
    chains: list[str] = field(default_factory=list)  # built-in chains with a program


@dataclass
class Record:
    """What is loaded for one family at one hook."""

    family: str
    hook: str
    iface: str | None
    text: str  # the ruleset as iptables-save prints it (without counters)
    tables: dict[str, TableRecord]
    source: str | None = None  # the file it was restored from
    original: str | None = None  # that file's text, so dumps cite the operator's own lines
    version: int = 1

    def encode(self) -> bytes:
        """Compressed JSON."""
        # perf: by hand, not dataclasses.asdict (which deep-copies every slot tuple), and a
        # fast compression level: single-rule changes rewrite the record each time.
        d = {**{k: v for k, v in vars(self).items() if k != "tables"},
             "tables": {k: {"runs": _runs(v.slots), "chains": v.chains}
                        for k, v in self.tables.items()}}
        return zlib.compress(json.dumps(d, separators=(",", ":")).encode(), 1)

    @classmethod
    def decode(cls, raw: bytes) -> Record:
        """Inverse of `encode`."""
        d = json.loads(zlib.decompress(raw))
        tables = {k: TableRecord(_slots(v["runs"]) if "runs" in v else
                                 list(map(tuple, v["slots"])), v.get("chains", []))
                  for k, v in d["tables"].items()}
        return cls(d["family"], d["hook"], d["iface"], d["text"], tables, d.get("source"),
                   d.get("original"), d.get("version", 1))


def _runs(slots: list[tuple[str, int | None]]) -> list[list]:
    """The slot table as [chain, first rule, count] runs of consecutive rules (a rule table
    of 10,000 slots is a handful of runs: cheap to store on every single-rule change)."""
    out: list[list] = []
    last = None
    for c, r in slots:
        if last is not None and last[0] == c and (
                (r is None and last[1] is None)
                or (r is not None and last[1] is not None and last[1] + last[2] == r)):
            last[2] += 1
        else:
            last = [c, r, 1]
            out.append(last)
    return out


def _slots(runs: list[list]) -> list[tuple[str, int | None]]:
    out: list[tuple[str, int | None]] = []
    for c, r, n in runs:
        out.extend([(c, r)] * n if r is None else [(c, r + i) for i in range(n)])
    return out


def write_record(rec: Record, name: str) -> Map:
    """A new array map holding `rec` (8-byte length, then the bytes, in CHUNK-sized values)."""
    raw = rec.encode()
    blob = len(raw).to_bytes(8, "little") + raw
    n = (len(blob) + CHUNK - 1) // CHUNK
    m = Map.create(MapSpec(MapType.ARRAY, 4, CHUNK, n, name=name[:15]))
    for i in range(n):
        m.update(i.to_bytes(4, "little"), blob[i * CHUNK : (i + 1) * CHUNK].ljust(CHUNK, b"\0"))
    return m


def read_record(m: Map) -> Record:
    """Decode the record held by map `m`."""
    first = m.lookup((0).to_bytes(4, "little"))
    if first is None:
        raise ValueError("empty state record")
    size = int.from_bytes(first[:8], "little")
    parts = [first]
    i = 1
    while sum(len(p) for p in parts) < size + 8:
        v = m.lookup(i.to_bytes(4, "little"))
        if v is None:
            raise ValueError("truncated state record")
        parts.append(v)
        i += 1
    return Record.decode(b"".join(parts)[8 : 8 + size])


@contextmanager
def locked(path: str) -> Iterator[None]:
    """Hold an exclusive lock on directory `path` (serialises concurrent commands)."""
    os.makedirs(path, exist_ok=True)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def unlink_quiet(path: str) -> None:
    """Remove a pin if it exists."""
    with suppress(FileNotFoundError):
        os.unlink(path)
