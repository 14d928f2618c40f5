"""Real traffic between two namespaces, the way baseline.md measured it.

For each N, every system gets its own fresh sender/receiver pair with the ruleset loaded in the
receiver; then `reps` rounds measure each system in turn (order rotated per round), so drift on
this shared machine spreads over all systems alike; the median is reported.

What is counted: the receiving veth's `rx_packets`. veth counts a packet there when its NAPI
poll takes it off the ring, before XDP, tc or netfilter see it, so the same count means the same
thing for every system: packets the receiving CPU handled. Frames the ring had no room for are
`rx_dropped` (the excess of the offered load). As a check, the final drop's own counter (policy
counter, nft named counter, pybpfilter's policy slot) is compared with rx_packets over the whole
time the ruleset was loaded: the ratio should be ~1.00 (every handled packet reached the verdict).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from packets import frame
from rulesets import Ruleset
from systems import LoadError, System
from topo import RECEIVER_CPU, SENDER_CPU, Pair, Sandbox, cpu_busy

SCALE_FROM = 1000
GEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gen.py")


@dataclass
class Window:
    """One measurement window."""

    pps: float  # rx_packets per second at the receiver
    offered_pps: float  # rx_packets + rx_dropped per second
    cpu_busy: float  # receiving CPU busy fraction (/proc/stat)


@dataclass
class Cell:
    """One system at one N."""

    system: str
    n: int
    load_s: float | None = None
    skipped: str | None = None
    windows: list[Window] = field(default_factory=list)
    verdict_ratio: float | None = None  # final-drop counter / rx_packets while loaded

    def median(self, attr: str = "pps") -> float | None:
        """Median of one window attribute."""
        vals = [getattr(w, attr) for w in self.windows]
        return statistics.median(vals) if vals else None


@dataclass
class TrafficConfig:
    """How long and how often to measure."""

    warmup: float = 0.5
    duration: float = 2.0
    reps: int = 3
    rt: bool = True  # generator as SCHED_FIFO
    load_budget: float = 120.0  # skip a size whose load would take longer (extrapolated)


def measure(sb: Sandbox, pair: Pair, data: bytes, cfg: TrafficConfig) -> Window:
    """Run the generator into `pair` and count what the receiver handles."""
    argv = [sys.executable, GEN, "--netns", pair.sender_ns, "--ifindex",
            str(pair.sender_ifindex), "--frame", data.hex(), "--cpu", str(SENDER_CPU)]
    if cfg.rt:
        argv.append("--rt")
    gen = sb.spawn(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert gen.stdout is not None
        if gen.stdout.readline().strip() != "ready":
            raise RuntimeError("the traffic generator did not start")
        time.sleep(cfg.warmup)
        rx0, drop0 = pair.rx_stats()
        c0, t0 = cpu_busy(), time.monotonic()
        time.sleep(cfg.duration)
        rx1, drop1 = pair.rx_stats()
        c1, t1 = cpu_busy(), time.monotonic()
    finally:
        sb.stop(gen)
    dt = t1 - t0
    busy = (c1[RECEIVER_CPU][0] - c0[RECEIVER_CPU][0]) / max(
        c1[RECEIVER_CPU][1] - c0[RECEIVER_CPU][1], 1)
    return Window((rx1 - rx0) / dt, (rx1 - rx0 + drop1 - drop0) / dt, busy)


def _skip_reason(sysm: System, n: int, cells: dict[tuple[str, int], Cell],
                 budget: float) -> str | None:
    """Why `sysm` should not load N rules: its last load, scaled linearly, is over budget."""
    # Only loads of 1,000 rules or more say how loading scales (below, start-up dominates).
    prev = [c for (k, m), c in cells.items()
            if k == sysm.key and SCALE_FROM <= m < n and c.load_s]
    if not prev:
        prev_skips = [c for (k, m), c in cells.items() if k == sysm.key and c.skipped]
        return prev_skips[-1].skipped if prev_skips else None
    last = max(prev, key=lambda c: c.n)
    est = last.load_s * n / last.n
    if est > budget:
        return (f"not loaded: N={last.n:,} took {last.load_s:.1f} s, so N={n:,} would take "
                f"~{est:.0f} s (> {budget:.0f} s budget)")
    return None


def run_traffic(sb: Sandbox, rulesets: list[Ruleset], systems: list[System],
                cfg: TrafficConfig, log: Callable[[str], None],
                reference: System | None = None) -> list[Cell]:
    """Every system at every N of `rulesets` (one shape), measured in interleaved rounds;
    `reference` (the XDP drop-all floor) is measured alongside the first N only."""
    bpffs = sb.private_bpffs()
    cells: dict[tuple[str, int], Cell] = {}
    for i, rs in enumerate(rulesets):
        live: list[tuple[System, Pair, Cell, tuple[int | None, int]]] = []
        here = [reference, *systems] if reference is not None and i == 0 else systems
        try:
            for sysm in here:
                cell = cells[(sysm.key, rs.n)] = Cell(sysm.key, rs.n)
                if not sysm.available(rs):
                    cell.skipped = "no translation of this shape"
                    continue
                why = _skip_reason(sysm, rs.n, cells, cfg.load_budget)
                if why:
                    cell.skipped = why
                    log(f"  {sysm.label:16s} N={rs.n:<7,} {why}")
                    continue
                pair = sb.pair()
                try:
                    cell.load_s = sysm.load(pair, rs, bpffs, timeout=cfg.load_budget * 2)
                    start = (sysm.final_drops(pair, bpffs), pair.rx_stats()[0])
                except LoadError as e:
                    cell.skipped = f"load failed: {e}"
                    log(f"  {sysm.label:16s} N={rs.n:<7,} {cell.skipped}")
                    sysm.release(pair)
                    sb.delete_pair(pair)
                    continue
                live.append((sysm, pair, cell, start))
                log(f"  {sysm.label:16s} N={rs.n:<7,} loaded in {cell.load_s:.2f} s")
            data = frame(rs.miss)
            for r in range(cfg.reps):
                k = r % max(len(live), 1)
                for sysm, pair, cell, _ in live[k:] + live[:k]:
                    w = measure(sb, pair, data, cfg)
                    cell.windows.append(w)
                    log(f"  round {r + 1}/{cfg.reps} {sysm.label:16s} N={rs.n:<7,} "
                        f"{w.pps:>12,.0f} pps (offered {w.offered_pps:,.0f}, "
                        f"CPU{RECEIVER_CPU} {w.cpu_busy:.0%} busy)")
            for sysm, pair, cell, (drops0, rx0) in live:
                drops = sysm.final_drops(pair, bpffs)
                rx = pair.rx_stats()[0] - rx0
                if drops is not None and drops0 is not None and rx:
                    cell.verdict_ratio = (drops - drops0) / rx
        finally:
            for sysm, pair, _, _ in live:
                sysm.release(pair)
                sb.delete_pair(pair)
                if sysm.kind == "bpfilter":
                    _forget_pins(bpffs, pair)
    return list(cells.values())


def _forget_pins(bpffs: str, pair: Pair) -> None:
    """Remove a deleted namespace's pins (its links died with it; the maps go with the pins)."""
    from topo import remove_tree_contents

    path = os.path.join(bpffs, pair.receiver_ns)
    if os.path.isdir(path):
        remove_tree_contents(path)
        os.rmdir(path)
