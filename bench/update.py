"""A one-rule change to a large loaded ruleset: how long until it is in force.

pybpfilter changes one rule in place (`bpfilter -R INPUT 1 ...`: the loaded maps are edited,
the programs stay; see bpfilter/runtime/incremental.py); a whole-ruleset `restore` parses,
compiles and loads the new ruleset, then flips the generation word. Both are measured as an
operator runs them (the command, wall time, Python's start-up included) and in-process, next to
what the other systems offer for the same change: `iptables -R` (legacy and nft) and, for the
set variant of nftables, deleting one element and adding another.
"""

from __future__ import annotations

import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

from rulesets import NFT_TABLE, Ruleset, exact_tuple, one_rule_changed
from systems import BPFILTER, BY_KEY
from topo import Sandbox

from bpfilter.frontends.iptables.parser import parse
from bpfilter.frontends.iptables.saver import save
from bpfilter.ir.model import Family
from bpfilter.runtime.incremental import Change, apply_change
from bpfilter.runtime.loader import Runtime

REPS = 3


@dataclass
class UpdateResult:
    """Median time of one kind of one-rule change."""

    system: str
    mode: str  # what a target line calls it: CLI, in-process, or the baseline's command
    how: str
    n: int
    seconds: float
    all_seconds: list[float]


def _timed(argv: list[str], text: str | None = None) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(argv, input=text, capture_output=True, text=True, check=False)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:6])}...: {proc.stderr.strip()[-300:]}")
    return dt


def run_updates(sb: Sandbox, rs: Ruleset, hooks: tuple[str, ...],
                log: Callable[[str], None]) -> list[UpdateResult]:
    """Time one-rule changes to `rs` (the exact shape) on every system that has one."""
    bpffs = sb.private_bpffs()
    changed = one_rule_changed(rs)
    out: list[UpdateResult] = []
    pair = sb.pair()
    try:
        ns = pair.receiver_ns
        for hook in hooks:
            base = [BPFILTER, "restore", "--netns", ns, "--bpffs", bpffs, "--hook", hook]
            if hook != "nf":
                base += ["--iface", pair.receiver_if]
            first = _timed(base, rs.text)
            cli: list[float] = []
            inproc: list[float] = []
            phases: list[tuple[float, float]] = []
            rt = Runtime(hook, netns_name=ns, iface=pair.receiver_if if hook != "nf" else None,
                         root=bpffs)
            for k in range(REPS):
                # Alternate between the two versions so every restore is a real one-rule change.
                cli.append(_timed(base, changed if k % 2 == 0 else rs.text))
            for k in range(REPS):
                text = rs.text if k % 2 == 0 else changed
                t0 = time.perf_counter()
                parsed = parse(text, family=Family.IPV4, filename="<update>")
                t1 = time.perf_counter()
                rt.restore(parsed, text=save(parsed))
                t2 = time.perf_counter()
                inproc.append(t2 - t0)
                phases.append((t1 - t0, t2 - t1))
            # In place: replace rule 1 by each of two rules in turn, as the baselines do.
            src, port = exact_tuple(0)
            rules = [f"-s {src}/32 -p udp -m udp --dport {port + 50000} -j DROP",
                     f"-s {src}/32 -p udp -m udp --dport {port} -j DROP"]
            fam_args = ["--netns", ns, "--bpffs", bpffs, "--hook", hook]
            if hook != "nf":
                fam_args += ["--iface", pair.receiver_if]
            rt.restore(parse(rs.text, family=Family.IPV4), text=rs.text)
            inplace: list[float] = []
            cli_inplace: list[float] = []
            for k in range(REPS):
                t0 = time.perf_counter()
                res = apply_change(rt, Family.IPV4,
                                   Change("R", "INPUT", index=1, args=rules[k % 2].split()))
                inplace.append(time.perf_counter() - t0)
                if not res.in_place:
                    raise RuntimeError(f"one-rule change fell back to a restore: {res.why}")
            for k in range(REPS):
                cli_inplace.append(_timed([BPFILTER, *fam_args, "-R", "INPUT", "1",
                                           *rules[(k + 1) % 2].split()]))
            rt.flush()
            label = BY_KEY[f"bpf-{hook}"].label
            out.append(UpdateResult(label, "in place, in-process",
                                    "apply_change: -R INPUT 1 edits the maps in place", rs.n,
                                    statistics.median(inplace), inplace))
            out.append(UpdateResult(label, "in place, CLI",
                                    "bpfilter -R INPUT 1 ... (Python start-up included)", rs.n,
                                    statistics.median(cli_inplace), cli_inplace))
            out.append(UpdateResult(label, "CLI", "bpfilter restore (full ruleset, CLI)", rs.n,
                                    statistics.median(cli), cli))
            p_s = statistics.median([p for p, _ in phases])
            r_s = statistics.median([r for _, r in phases])
            how = f"parse ({p_s:.2f} s) + Runtime.restore ({r_s:.2f} s), in-process"
            out.append(UpdateResult(label, "in-process", how, rs.n, statistics.median(inproc),
                                    inproc))
            log(f"  one-rule change, {label}: first load {first:.2f} s, CLI restore "
                f"{statistics.median(cli):.2f} s, in-process {statistics.median(inproc):.2f} s; "
                f"in place {statistics.median(inplace) * 1e3:.0f} ms, CLI in place "
                f"{statistics.median(cli_inplace) * 1e3:.0f} ms")
        boot = [_timed([BPFILTER, "--version"]) for _ in range(REPS)]
        out.append(UpdateResult("pybpfilter", "start-up", "bpfilter --version (Python start-up "
                                "and imports: part of every command)", rs.n,
                                statistics.median(boot), boot))
        out += _baselines(sb, rs, log)
    finally:
        sb.delete_pair(pair)
    return out


def _baselines(sb: Sandbox, rs: Ruleset, log: Callable[[str], None]) -> list[UpdateResult]:
    out: list[UpdateResult] = []
    src, port = exact_tuple(0)
    rules = [f"-s {src}/32 -p udp -m udp --dport {port + 50000} -j DROP",
             f"-s {src}/32 -p udp -m udp --dport {port} -j DROP"]
    for variant in ("legacy", "nft"):
        pair = sb.pair()
        try:
            ns = pair.receiver_ns
            _timed(["ip", "netns", "exec", ns, f"iptables-{variant}-restore"], rs.text)
            times = [_timed(["ip", "netns", "exec", ns, f"iptables-{variant}", "-w", "-R",
                             "INPUT", "1", *rules[k % 2].split()]) for k in range(REPS)]
        finally:
            sb.delete_pair(pair)
        label = BY_KEY[f"ipt-{variant}"].label
        out.append(UpdateResult(label, "iptables -R", "iptables -R INPUT 1 ...", rs.n,
                                statistics.median(times), times))
        log(f"  one-rule change, {label}: {statistics.median(times) * 1e3:.0f} ms")
    if rs.nft_set is not None:
        pair = sb.pair()
        try:
            ns = pair.receiver_ns
            _timed(["ip", "netns", "exec", ns, "nft", "-f", "-"], rs.nft_set)
            elems = [f"{src} . {port}", f"{src} . {port + 50000}"]
            times = []
            for k in range(REPS):
                old, new = elems[k % 2], elems[1 - k % 2]
                script = (f"delete element ip {NFT_TABLE} blk {{ {old} }}\n"
                          f"add element ip {NFT_TABLE} blk {{ {new} }}\n")
                times.append(_timed(["ip", "netns", "exec", ns, "nft", "-f", "-"], script))
        finally:
            sb.delete_pair(pair)
        label = BY_KEY["nft-set"].label
        out.append(UpdateResult(label, "nft set element",
                                "nft -f: delete element + add element (one transaction)", rs.n,
                                statistics.median(times), times))
        log(f"  one-rule change, {label}: {statistics.median(times) * 1e3:.0f} ms")
    return out
