"""One-rule changes to a loaded ruleset: in place (`apply_change`) vs a full atomic restore.

For each shape of bench/rulesets.py at 1,000 and 10,000 rules, loads the ruleset at the nf hook
of a throwaway namespace (private bpffs), then times a single-rule append, insert (middle),
delete (middle) and replace (middle) applied in place, and the same change as a full restore of
the changed ruleset (parse + compile + load + switch, in-process: what the fallback costs).
Wall time, median of REPS. Run as root: `.venv/bin/python bench/incremental.py [--sizes ...]`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

from rulesets import SHAPES

from bpfilter import netns
from bpfilter.bpf.bpffs import mount_bpffs
from bpfilter.frontends.iptables.parser import parse
from bpfilter.ir.model import Family
from bpfilter.runtime.incremental import Change, apply_change
from bpfilter.runtime.loader import Runtime

REPS = 5
# Per shape: the chain changed and a rule of its shape (the new rule of A, I and R).
NEW_RULE = {
    "exact": ("INPUT", "-s 192.0.2.251/32 -p udp -m udp --dport 9 -j DROP"),
    "cidr": ("INPUT", "-s 100.64.0.0/20 -j DROP"),
    "ports": ("INPUT", "-d 203.0.113.250/32 -p tcp -m multiport --dports 7,9 -j ACCEPT"),
    "mix": ("blocklist", "-s 100.64.0.0/22 -j DROP"),
}


@contextmanager
def sandbox() -> Iterator[Runtime]:
    """A runtime on a fresh namespace with its own bpffs; both removed afterwards."""
    name = f"bfinc{os.getpid()}"
    root = tempfile.mkdtemp(prefix="bfinc")
    netns.create(name)
    try:
        mount_bpffs(root)
        try:
            rt = Runtime("nf", netns_name=name, root=os.path.join(root, "pybpfilter"))
            yield rt
            rt.flush()
        finally:
            subprocess.run(["umount", root], check=False)
    finally:
        netns.delete(name)
        os.rmdir(root)


def _changes(chain: str, rule: str, n: int) -> list[tuple[str, list[Change]]]:
    """Each op as a change and the one that undoes it (so every rep starts alike)."""
    args = rule.split()
    mid = n // 2
    return [
        ("append", [Change("A", chain, args=args), Change("D", chain, args=args)]),
        ("insert", [Change("I", chain, index=mid, args=args), Change("D", chain, index=mid)]),
        ("delete", [Change("I", chain, index=mid, args=args), Change("D", chain, index=mid)]),
        ("replace", [Change("R", chain, index=mid, args=args)]),
    ]


def _full(rt: Runtime, text: str) -> float:
    t0 = time.perf_counter()
    rt.restore(parse(text, family=Family.IPV4), text=text)
    return time.perf_counter() - t0


def bench(shape: str, n: int) -> list[tuple[str, float, float, bool]]:
    """(op, in place seconds, full restore seconds, applied in place?) per op."""
    rs = SHAPES[shape](n)
    chain, rule = NEW_RULE[shape]
    count = sum(1 for line in rs.text.splitlines() if line.startswith(f"-A {chain} "))
    out = []
    with sandbox() as rt:
        rt.restore(parse(rs.text, family=Family.IPV4), text=rs.text)
        for op, seq in _changes(chain, rule, count):
            inplace, full, ok = [], [], True
            for _ in range(REPS):
                timed = seq[1] if op == "delete" else seq[0]
                for ch in seq:
                    t0 = time.perf_counter()
                    res = apply_change(rt, Family.IPV4, ch)
                    dt = time.perf_counter() - t0
                    if ch is timed:
                        inplace.append(dt)
                        ok = ok and res.in_place
                        text = res.text
                if op == "replace":  # put the original rule back with a full restore
                    full.append(_full(rt, text))
                    rt.restore(parse(rs.text, family=Family.IPV4), text=rs.text)
                else:
                    full.append(_full(rt, text if op != "delete" else rs.text))
            out.append((op, statistics.median(inplace), statistics.median(full), ok))
    return out


def main() -> int:
    """Print the table."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--shapes", nargs="+", default=list(NEW_RULE))
    a = ap.parse_args()
    print(f"{'shape':6} {'rules':>6} {'op':8} {'in place':>10} {'full restore':>13} "
          f"{'ratio':>7}")
    for shape in a.shapes:
        for n in a.sizes:
            for op, ip, full, ok in bench(shape, n):
                mark = "" if ok else "  (fell back: not in place)"
                print(f"{shape:6} {n:6d} {op:8} {ip * 1000:8.1f}ms {full * 1000:11.1f}ms "
                      f"{full / ip:6.0f}x{mark}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
