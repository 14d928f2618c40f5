"""The benchmark of issue 4, in one run (`make bench`; not a test).

    .venv/bin/python bench/run.py [--full] [--sizes 1,10,...] [--docs] [...]
    .venv/bin/python bench/run.py --render bench/out/bench.json [--docs]

Builds rulesets of N rules in several shapes (rulesets.py) and measures, side by side:
kernel-timed ns/packet (BPF_PROG_TEST_RUN) per hook flavour; packets per second with real
traffic between two namespaces for pybpfilter's three hooks, iptables-legacy, iptables-nft and
nftables (linear and with a set); build costs (parse, compile, map fill, verifier) and map
memory; a one-rule change. Prints the tables with ratios and the issue's targets, and writes
bench.json, bench.md and bench.png to bench/out/ (and docs/bench/ with --docs).

Needs root. Everything runs in namespaces and a bpffs mount made for the run and removed after
it, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import asdict

from plot import save_plot
from report import render, targets
from rulesets import SHAPES, exact
from systems import BY_KEY, FLOOR, SYSTEMS
from testrun import HOOKS, run_testruns
from topo import Sandbox
from traffic import TrafficConfig, run_traffic
from update import run_updates

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SIZES = (1, 10, 100, 1_000, 10_000, 100_000)
QUICK = {"warmup": 0.5, "duration": 2.0, "reps": 3, "repeat": 100_000, "rounds": 3}
FULL = {"warmup": 1.0, "duration": 5.0, "reps": 3, "repeat": 1_000_000, "rounds": 5}


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true",
                    help="baseline-length runs: 1 s + 5 s traffic windows, 1,000,000 repeats")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)), help="rule counts N")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="test-run/build shapes")
    ap.add_argument("--traffic-shapes", default="exact",
                    help="shapes with real traffic (exact = baseline.md's; also: cidr)")
    ap.add_argument("--hooks", default=",".join(HOOKS), help="pybpfilter hooks")
    ap.add_argument("--systems", default=",".join(s.key for s in SYSTEMS),
                    help="traffic systems: " + ", ".join(s.key for s in SYSTEMS))
    ap.add_argument("--warmup", type=float, help="traffic warm-up seconds")
    ap.add_argument("--duration", type=float, help="traffic measurement seconds")
    ap.add_argument("--reps", type=int, help="interleaved traffic rounds (median)")
    ap.add_argument("--repeat", type=int, help="test-run repeats per measurement")
    ap.add_argument("--rounds", type=int, help="test-run rounds (min)")
    ap.add_argument("--load-budget", type=float, default=120.0,
                    help="skip a system at N when its load time, scaled from the last N "
                         ">= 1,000, would exceed this (s)")
    ap.add_argument("--no-rt", action="store_true",
                    help="run the traffic generator at normal priority (default SCHED_FIFO)")
    ap.add_argument("--no-testrun", action="store_true")
    ap.add_argument("--no-traffic", action="store_true")
    ap.add_argument("--no-update", action="store_true")
    ap.add_argument("--update-n", type=int, default=10_000, help="rules for the one-rule change")
    ap.add_argument("--out", default=os.path.join(HERE, "out"), help="output directory")
    ap.add_argument("--docs", action="store_true", help="also write to docs/bench/")
    ap.add_argument("--render", metavar="JSON", help="only redo tables and plot from a run")
    args = ap.parse_args(argv)
    preset = FULL if args.full else QUICK
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def _version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, check=False).stdout
    except OSError:
        return f"{argv[0]} missing"
    return out.strip().splitlines()[0] if out.strip() else f"{argv[0]} ?"


def machine() -> dict:
    """What the numbers were measured on."""
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    return {"kernel": platform.release(), "cpu": cpu, "cores": os.cpu_count(),
            "mem_gib": mem_kib / 2**20, "python": platform.python_version(),
            "iptables": _version(["iptables-legacy", "--version"]),
            "nft": _version(["nft", "--version"]), "load_start": _loadavg()}


def _loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def log(msg: str) -> None:
    """Progress on stderr (the tables go to stdout)."""
    print(msg, file=sys.stderr, flush=True)


def measure(args: argparse.Namespace) -> dict:
    """Run every enabled part; returns the raw results."""
    sizes = sorted(int(x) for x in _csv(args.sizes))
    hooks = tuple(_csv(args.hooks))
    res: dict = {"machine": machine(), "started": _now(),
                 "config": {"full": args.full, "sizes": sizes, "hooks": hooks,
                            "warmup": args.warmup, "duration": args.duration, "reps": args.reps,
                            "repeat": args.repeat, "rounds": args.rounds, "rt": not args.no_rt,
                            "load_budget": args.load_budget}}
    with Sandbox() as sb:
        if not args.no_testrun:
            log("== test runs and builds")
            rulesets = [SHAPES[s](n) for s in _csv(args.shapes) for n in sizes]
            builds, rows = run_testruns(rulesets, hooks, args.repeat, args.rounds, log)
            res["builds"] = [{**asdict(b), "compile_s": b.compile_s} for b in builds]
            res["testrun"] = rows
        if not args.no_traffic:
            cfg = TrafficConfig(args.warmup, args.duration, args.reps, not args.no_rt,
                                args.load_budget)
            systems = [BY_KEY[k] for k in _csv(args.systems)]
            res["traffic"] = []
            for shape in _csv(args.traffic_shapes):
                log(f"== real traffic, {shape}")
                cells = run_traffic(sb, [SHAPES[shape](n) for n in sizes], systems, cfg, log,
                                    reference=FLOOR)
                res["traffic"].append({"shape": shape, "cells": [_cell(c) for c in cells]})
        if not args.no_update:
            log(f"== one-rule change to {args.update_n:,} rules")
            ups = run_updates(sb, exact(args.update_n), hooks, log)
            res["updates"] = [asdict(u) for u in ups]
    res["finished"] = _now()
    res["machine"]["load_end"] = _loadavg()
    res["machine"]["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res["targets"] = targets(res)
    return res


def _cell(c) -> dict:
    d = asdict(c)
    d["label"] = BY_KEY[c.system].label
    d["median_pps"] = c.median("pps")
    d["median_offered"] = c.median("offered_pps")
    d["median_cpu"] = c.median("cpu_busy")
    return d


def write(res: dict, out_dirs: list[str]) -> None:
    """bench.json, bench.md and bench.png into each directory."""
    text = render(res)
    print(text)
    for d in out_dirs:
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "bench.json"), "w") as f:
            json.dump(res, f, indent=1)
        with open(os.path.join(d, "bench.md"), "w") as f:
            f.write(text + "\n")
        png = os.path.join(d, "bench.png")
        if not save_plot(res, png):
            log("matplotlib is not installed (pip install -e '.[bench]'): no plot")
        log(f"wrote {d}/bench.json, bench.md" + (", bench.png" if os.path.exists(png) else ""))


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = parse_args(argv)
    outs = [args.out] + ([os.path.join(ROOT, "docs", "bench")] if args.docs else [])
    if args.render:
        with open(args.render) as f:
            res = json.load(f)
        res["targets"] = targets(res)
        write(res, outs)
        return 0
    if os.geteuid() != 0:
        print("bench: needs root (BPF, namespaces, bpffs)", file=sys.stderr)
        return 1
    t0 = time.monotonic()
    try:
        res = measure(args)
    except KeyboardInterrupt:
        log("interrupted: everything the run created has been removed")
        return 130
    write(res, outs)
    log(f"total {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
