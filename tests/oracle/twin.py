"""What the two-sided rigs share: one sender feeding a netfilter side and a pybpfilter side.

`CtRig` (ctrig.py: two receivers, filter INPUT) and `RouterRig` (forward.py: two routers,
filter INPUT and FORWARD) differ in how their namespaces are built and which chains they watch;
loading, counting, sending a frame with its marker and reading pybpfilter's trace are the same.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

from helpers import topology as topo_mod

from bpfilter.bpf.maps import Map, possible_cpus
from bpfilter.ir.model import Counters, Family, Ruleset
from bpfilter.runtime import conntrack
from bpfilter.runtime.loader import Runtime, read_counters

from .netfilter import OracleError, other
from .xtables import XtReader

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
MARKER_WAIT = 2.0  # seconds for the marker frame to be counted

Key = tuple[str, int | None]


class Side(Protocol):
    """One side's namespace, the sender's socket towards it, and its counter readers."""

    ns: str
    readers: dict[Family, XtReader]

    def close(self) -> None:
        """Close the sockets."""


@dataclass(frozen=True)
class Seen:
    """What one side did with one frame."""

    reached: bool
    verdict: str  # ACCEPT or DROP
    deltas: dict[Key, Counters]
    decider: Key | None = None  # pybpfilter's trace (None on netfilter)


@dataclass
class BpfTable:
    """The counters and trace maps of the filter table pybpfilter has loaded."""

    slots: list[Key]
    cnt: Map
    trace: Map

    def close(self) -> None:
        """Close the maps."""
        self.cnt.close()
        self.trace.close()


class TwinRig:
    """Loading, counting and observing for a rig whose `sides` are netfilter and pybpfilter."""

    sides: dict[str, Side]
    namespaces: list[str]
    runtime: Runtime
    markers: dict[Family, bytes]
    watched: tuple[str, ...] = ("INPUT",)  # chains whose mangle/security counts tell the fate

    def __init__(self) -> None:
        self.namespaces = []
        self.sides = {}
        self.bpf_table: BpfTable | None = None
        self.family: Family | None = None
        self._affinity = os.sched_getaffinity(0)

    def close(self) -> None:
        """Unload, close and delete everything (also after a failed setup)."""
        errors: list[BaseException] = []
        if self.bpf_table is not None:
            self.bpf_table.close()
        if hasattr(self, "runtime"):
            try:
                self.runtime.flush()
            except Exception as e:  # go on deleting: the namespaces take the links along
                errors.append(e)
        for s in self.sides.values():
            s.close()
        for ns in self.namespaces:
            try:
                topo_mod.delete_netns(ns)
            except Exception as e:
                errors.append(e)
        if errors:
            raise errors[0]

    def __enter__(self) -> TwinRig:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def load_bpf(self, rs: Ruleset, text: str, family: Family) -> None:
        """Load `rs` on the pybpfilter side and open its filter table's counters and trace."""
        if self.bpf_table is not None:
            self.bpf_table.close()
            self.bpf_table = None
        self.runtime.restore(rs, text=text)
        loaded = self.runtime.loaded(family)
        assert loaded is not None
        paths = [self.runtime.map_path(family, kind) for kind in ("cnt", "trace")]
        assert paths[0] and paths[1], "pybpfilter pinned no counters for the filter table"
        self.bpf_table = BpfTable(loaded.record.tables["filter"].slots,
                                  Map.open_pinned(paths[0]), Map.open_pinned(paths[1]))
        self.family = family

    def flush_conntrack(self) -> None:
        """Forget every connection on both sides."""
        for s in self.sides.values():
            conntrack.flush(s.ns)

    def counters(self, side: str, fam: Family) -> dict[Key, Counters]:
        """Every counter of the loaded filter table; rule None for a policy."""
        if side == "netfilter":
            return self.sides[side].readers[fam].read("filter").flat()
        t = self.bpf_table
        assert t is not None
        vals = read_counters(t.cnt, len(t.slots))
        return {(c, r): vals[i] for i, (c, r) in enumerate(t.slots) if i}

    def _watched(self, s: Side, fam: Family, table: str) -> int:
        counts = s.readers[fam].read(table)
        return sum(counts.get(chain, None).packets for chain in self.watched)

    @staticmethod
    def _markers(s: Side, fam: Family) -> int:
        return s.readers[fam].read("mangle").get("PREROUTING", 1).packets

    def _send(self, side: str, frame: bytes) -> None:
        """Send `frame` then the other family's marker, and wait until the marker counts."""
        assert self.family is not None
        s = self.sides[side]
        mfam = other(self.family)
        marks0 = self._markers(s, mfam)
        # Frame and marker from one CPU: they share its backlog queue and stay in order.
        cpu = _libc.sched_getcpu()
        os.sched_setaffinity(0, {cpu if cpu >= 0 else min(self._affinity)})
        try:
            s.tx.send(frame)  # type: ignore[attr-defined]
            s.tx.send(self.markers[mfam])  # type: ignore[attr-defined]
        finally:
            os.sched_setaffinity(0, self._affinity)
        deadline = time.monotonic() + MARKER_WAIT
        while (marks := self._markers(s, mfam)) == marks0:
            if time.monotonic() > deadline:
                raise OracleError(f"{side}: the marker frame was not counted")
            time.sleep(0.0002)
        if marks != marks0 + 1:
            raise OracleError(f"{side}: {marks - marks0} markers counted for one sent")

    def observe(self, side: str, frame: bytes) -> Seen:
        """Send one frame to a side and report what its filter table did with it."""
        fam = self.family
        assert fam is not None and self.bpf_table is not None
        s = self.sides[side]
        before = self.counters(side, fam)
        reached0 = self._watched(s, fam, "mangle")
        passed0 = self._watched(s, fam, "security")
        if side == "pybpfilter":
            self.bpf_table.trace.update(b"\0\0\0\0", bytes(8) * possible_cpus())
        self._send(side, frame)
        after = self.counters(side, fam)
        reached = self._watched(s, fam, "mangle") - reached0
        passed = self._watched(s, fam, "security") - passed0
        if reached > 1 or passed > 1:
            raise OracleError(f"{side}: stray traffic: {reached} arrivals, {passed} passes")
        deltas = {k: Counters(v.packets - before[k].packets, v.bytes - before[k].bytes)
                  for k, v in after.items()}
        reached = self._reached(side, reached, deltas)
        return Seen(reached == 1, "ACCEPT" if passed else "DROP", deltas,
                    self._trace_decider() if side == "pybpfilter" else None)

    def _reached(self, side: str, reached: int, deltas: dict[Key, Counters]) -> int:
        """Arrivals as the rig counts them (a subclass may know better)."""
        return reached

    def _trace_decider(self) -> Key | None:
        t = self.bpf_table
        assert t is not None
        for v in t.trace.lookup_percpu(b"\0\0\0\0") or []:
            slot, verdict = struct.unpack("<II", v)
            if verdict and slot:
                return t.slots[slot][0], t.slots[slot][1]
        return None


def require_twin_tools() -> None:
    """Skip unless the kernel and the tools both sides need are here."""
    import shutil

    import pytest
    from helpers.kernel import require_kernel

    require_kernel()
    for tool in ("iptables-legacy-restore", "ip6tables-legacy-restore", "nft"):
        if shutil.which(tool) is None:
            pytest.skip(f"kernel test: needs {tool}")


@contextmanager
def private_bpffs(tmp_path_factory, name: str) -> Iterator[str]:
    """A bpffs mounted for one rig; yields the pybpfilter root in it, emptied and unmounted
    afterwards (also on failure)."""
    from helpers.bpffs import mounted_bpffs

    with mounted_bpffs(str(tmp_path_factory.mktemp(name))) as path:
        yield os.path.join(path, "pybpfilter")
