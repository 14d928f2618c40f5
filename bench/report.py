"""Tables (markdown, printed and saved) and the issue's targets, from the raw results dict.

Everything here reads only the JSON-able results, so `run.py --render FILE` can redo the
tables and the plot from a saved run.
"""

from __future__ import annotations

from collections.abc import Iterable

from rulesets import SHAPE_TEXT
from systems import BY_KEY

BASELINES = ("ipt-legacy", "ipt-nft", "nft-linear", "nft-set")
BPF_HOOKS = {"bpf-xdp": "xdp", "bpf-tc": "tc", "bpf-nf": "nf"}
TARGET_N = 10_000
BIG_N = 100_000


def table(headers: list[str], rows: Iterable[list[str]], left: int = 1) -> list[str]:
    """A markdown table: the first `left` columns left-aligned (text), the rest right-aligned."""
    out = ["| " + " | ".join(headers) + " |",
           "|" + "|".join(["---"] * left + ["---:"] * (len(headers) - left)) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def n_str(n: int) -> str:
    """1,000-style N."""
    return f"{n:,}"


def pps_str(v: float | None) -> str:
    """Packets per second, thousands separated."""
    return "—" if v is None else f"{v:,.0f}"


def ratio_str(v: float | None) -> str:
    """A ratio with sensible precision."""
    if v is None:
        return "—"
    return f"{v:,.0f}x" if v >= 100 else f"{v:.1f}x" if v >= 10 else f"{v:.2f}x"


def secs_str(v: float | None) -> str:
    """Seconds, or milliseconds below one second."""
    if v is None:
        return "—"
    return f"{v:.2f} s" if v >= 1 else f"{v * 1e3:.0f} ms"


def bytes_str(v: int) -> str:
    """KiB / MiB."""
    return f"{v / 2**20:.1f} MiB" if v >= 2**20 else f"{v / 1024:.0f} KiB"


def worst(row: dict) -> int:
    """The worse of the two probes of a test-run row."""
    return max(row["miss_ns"], row["last_ns"])


# -- sections ----------------------------------------------------------------------------------


def machine_section(res: dict) -> list[str]:
    """Where and how the numbers were taken."""
    m, c = res["machine"], res["config"]
    out = [f"Machine: {m['cpu']}, {m['cores']} cores, {m['mem_gib']:.0f} GiB, "
           f"Linux {m['kernel']}; {m['iptables']}, {m['nft']}; Python {m['python']}.",
           f"Run: {res['started']} → {res['finished']}, load average {m['load_start']} at the "
           f"start, {m.get('load_end', '?')} at the end (a shared machine: read the ratios); "
           f"peak memory of the benchmark process {m.get('peak_rss_mib', 0):,.0f} MiB.",
           f"Config: {'full' if c['full'] else 'quick'}: test runs {c['repeat']:,} repeats x "
           f"{c['rounds']} rounds (min); traffic {c['warmup']} s warm-up + {c['duration']} s "
           f"x {c['reps']} interleaved rounds (median); generator "
           f"{'SCHED_FIFO' if c['rt'] else 'normal priority'} on CPU0, receiver NAPI thread on "
           "CPU1.", ""]
    return out


def testrun_section(res: dict) -> list[str]:
    """ns/packet per shape, hook and probe; ratios to the 1-rule ruleset."""
    rows = res.get("testrun") or []
    if not rows:
        return []
    out = ["## BPF_PROG_TEST_RUN: ns per packet (kernel-timed, min over rounds)", "",
           "`miss` matches no rule (every rule evaluated, then the policy); `last` is decided "
           "by the last rule. `x 1 rule` is the worse probe at N over the worse at N = 1, same "
           "hook.", ""]
    hooks = list(dict.fromkeys(r["hook"] for r in rows))
    for shape in dict.fromkeys(r["shape"] for r in rows):
        sr = [r for r in rows if r["shape"] == shape]
        n0 = min(r["n"] for r in sr)
        base = {r["hook"]: worst(r) for r in sr if r["n"] == n0}
        out += [f"### {shape}: {SHAPE_TEXT.get(shape, shape)}", ""]
        headers = ["N"]
        for h in hooks:
            headers += [f"{h} miss", f"{h} last", f"{h} x 1 rule"]
        headers += [f"insns ({hooks[0]})", "verifier insns"]
        body = []
        for n in sorted({r["n"] for r in sr}):
            cells = [n_str(n)]
            first = None
            for h in hooks:
                r = next((x for x in sr if x["n"] == n and x["hook"] == h), None)
                if r is None:
                    cells += ["—"] * 3
                    continue
                first = first or r
                cells += [f"{r['miss_ns']}", f"{r['last_ns']}",
                          ratio_str(worst(r) / base[h]) if base.get(h) else "—"]
            cells += [str(first["insns"]), str(first["insns_processed"])] if first else ["—"] * 2
            body.append(cells)
        out += [*table(headers, body), ""]
    return out


def build_section(res: dict) -> list[str]:
    """Parse, compile, map fill, load, memory."""
    builds = res.get("builds") or []
    if not builds:
        return []
    out = ["## Building the programs (in-process, per hook)", "",
           "`parse` is the iptables-restore text to the IR (once per ruleset); `compile` is "
           "code generation and classifier tables; `maps` creates and fills the maps; `load` "
           "is BPF_PROG_LOAD (the verifier's own time in brackets). Memory is the kernel's "
           "memlock charge from /proc/self/fdinfo (maps; the program apart).", ""]
    hooks = list(dict.fromkeys(b["hook"] for b in builds))
    for shape in dict.fromkeys(b["shape"] for b in builds):
        sb = [b for b in builds if b["shape"] == shape]
        out += [f"### {shape}", ""]
        headers = ["N", "parse"] + [f"compile {h}" for h in hooks] + [
            "maps", "load (verify)", "parse+compile+maps+load (worst hook)", "map memory",
            "prog memory"]
        body = []
        for n in sorted({b["n"] for b in sb}):
            bn = [b for b in sb if b["n"] == n]
            by_h = {b["hook"]: b for b in bn}
            w = max(bn, key=total_build)
            body.append([n_str(n), secs_str(bn[0]["parse_s"])]
                        + [secs_str(by_h[h]["compile_s"]) if h in by_h else "—" for h in hooks]
                        + [secs_str(w["maps_s"]),
                           f"{secs_str(w['load_s'])} ({w['verify_us']:,} µs)",
                           secs_str(total_build(w)), bytes_str(w["map_bytes"]),
                           bytes_str(w["prog_bytes"])])
        out += [*table(headers, body), ""]
    return out


def total_build(b: dict) -> float:
    """parse + compile + maps + load of one build."""
    return b["parse_s"] + b["compile_s"] + b["maps_s"] + b["load_s"]


def _cell_value(c: dict | None, key: str, fmt, notes: dict[str, int]) -> str:
    """A cell's value, or `n/a [k]` with its reason collected as note k."""
    if c is None:
        return ""
    if c.get("skipped"):
        k = notes.setdefault(c["skipped"], len(notes) + 1)
        return f"n/a [{k}]"
    return fmt(c.get(key))


def traffic_section(res: dict) -> list[str]:
    """pps per system and N, ratios, load times, the counting check."""
    out: list[str] = []
    for tr in res.get("traffic") or []:
        cells = tr["cells"]
        sizes = sorted({c["n"] for c in cells})
        systems = list(dict.fromkeys(c["system"] for c in cells))
        get = {(c["system"], c["n"]): c for c in cells}
        notes: dict[str, int] = {}

        def val(c: dict | None, key: str, fmt=pps_str, notes=notes) -> str:
            return _cell_value(c, key, fmt, notes)

        out += [f"## Real traffic ({tr['shape']}): packets per second handled by the receiver",
                "", "64-byte UDP frames that match no rule, then the final drop; median of the "
                "rounds. Counted: the receiving veth's rx_packets (every packet its NAPI poll "
                "took off the ring, whatever hook then dropped it); `offered` adds the frames "
                "the ring had no room for.", ""]
        body = [[BY_KEY[s].label] + [val(get.get((s, n)), "median_pps") for n in sizes]
                for s in systems]
        out += [*table(["system"] + [f"N = {n_str(n)}" for n in sizes], body), ""]
        out += ["Offered load (median) and receiving CPU busy:", ""]
        body = [[BY_KEY[s].label] + [
            val(get.get((s, n)), "median_offered", lambda v: f"{v / 1e6:.1f} M")
            + (f" / {get[(s, n)]['median_cpu']:.0%}" if get.get((s, n), {}).get("median_cpu")
               is not None else "") for n in sizes] for s in systems]
        out += [*table(["system"] + [f"N = {n_str(n)}" for n in sizes], body), ""]
        out += ["### Ratios: pybpfilter's packet rate over each baseline's", ""]
        body = []
        for b in (s for s in systems if s in BPF_HOOKS):
            for base in (s for s in BASELINES if s in systems):
                row = [f"{BY_KEY[b].label} / {BY_KEY[base].label}"]
                for n in sizes:
                    x, y = get.get((b, n), {}), get.get((base, n), {})
                    ok = x.get("median_pps") and y.get("median_pps")
                    row.append(ratio_str(x["median_pps"] / y["median_pps"]) if ok else "—")
                body.append(row)
        out += [*table(["ratio"] + [f"N = {n_str(n)}" for n in sizes], body), ""]
        out += ["### Load time (wall, as an operator runs it: `bpfilter restore`, "
                "`iptables-*-restore`, `nft -f`)", ""]
        body = [[BY_KEY[s].label] + [val(get.get((s, n)), "load_s", secs_str) for n in sizes]
                for s in systems if s != "floor"]
        out += [*table(["system"] + [f"N = {n_str(n)}" for n in sizes], body), ""]
        ratios = [c["verdict_ratio"] for c in cells if c.get("verdict_ratio") is not None]
        if ratios:
            out += [f"Check: the final drop's own counter over rx_packets while loaded was "
                    f"{min(ratios):.4f}..{max(ratios):.4f} across all cells (1.0000 = every "
                    "counted packet reached the ruleset's verdict).", ""]
        for text, k in notes.items():
            out.append(f"[{k}] {text}")
        if notes:
            out.append("")
    return out


def update_section(res: dict) -> list[str]:
    """One-rule changes."""
    ups = res.get("updates") or []
    if not ups:
        return []
    out = ["## A one-rule change to a loaded ruleset of "
           f"{n_str(ups[0]['n'])} rules (median of 3)", ""]
    body = [[u["system"], u["how"], secs_str(u["seconds"])] for u in ups]
    return out + table(["system", "how", "time"], body, left=2) + [""]


# -- targets -----------------------------------------------------------------------------------


def targets(res: dict) -> list[dict]:
    """The issue's targets, each with the measured value and whether it is met."""
    out: list[dict] = []
    rows = res.get("testrun") or []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        for hook in dict.fromkeys(r["hook"] for r in rows):
            one = [r for r in rows if r["shape"] == shape and r["hook"] == hook and r["n"] == 1]
            big = [r for r in rows if r["shape"] == shape and r["hook"] == hook
                   and r["n"] == TARGET_N]
            if one and big:
                x = worst(big[0]) / worst(one[0])
                out.append({"target": f"test run, {shape}, {hook}: worst case at 10,000 rules "
                            "≤ 2x the 1-rule ruleset",
                            "measured": f"{worst(big[0])} ns vs {worst(one[0])} ns = "
                                        f"{ratio_str(x)}", "met": x <= 2.0})
    for tr in res.get("traffic") or []:
        get = {(c["system"], c["n"]): c for c in tr["cells"]}
        for b in BPF_HOOKS:
            x = (get.get((b, TARGET_N)) or {}).get("median_pps")
            if not x:
                continue
            for base, need in (("ipt-nft", 50.0), ("ipt-legacy", 50.0), ("nft-set", 1.0)):
                y = (get.get((base, TARGET_N)) or {}).get("median_pps")
                if not y:
                    continue
                out.append({"target": f"traffic ({tr['shape']}), 10,000 rules: "
                            f"{BY_KEY[b].label} ≥ {need:g}x {BY_KEY[base].label}",
                            "measured": f"{pps_str(x)} vs {pps_str(y)} pps = "
                                        f"{ratio_str(x / y)}", "met": x / y >= need})
    builds = res.get("builds") or []
    for n, limit in ((TARGET_N, 1.5), (BIG_N, 15.0)):
        for shape in dict.fromkeys(b["shape"] for b in builds):
            bn = [b for b in builds if b["shape"] == shape and b["n"] == n]
            if not bn:
                continue
            w = max(bn, key=total_build)
            t = total_build(w)
            out.append({"target": f"compile + load, {shape}, {n_str(n)} rules < {limit:g} s",
                        "measured": f"{t:.2f} s (worst hook {w['hook']}: parse "
                                    f"{w['parse_s']:.2f} + compile {w['compile_s']:.2f} + maps "
                                    f"{w['maps_s']:.2f} + load {w['load_s']:.3f})",
                        "met": t < limit})
    ups = res.get("updates") or []
    start = [u["seconds"] for u in ups if u["mode"] == "start-up"]
    for u in ups:
        # The target is the in-place change; full restores are the fallback (in the table).
        if u["system"].startswith("pybpfilter") and u["mode"].startswith("in place"):
            measured = secs_str(u["seconds"])
            if u["mode"].endswith("CLI") and start:
                measured += f" (Python start-up and imports alone: {secs_str(start[0])})"
            out.append({"target": f"one-rule change to {n_str(u['n'])} rules < 50 ms, "
                        f"{u['system']}, {u['mode']}",
                        "measured": measured, "met": u["seconds"] < 0.05})
    return out


def targets_section(res: dict) -> list[str]:
    """The targets table."""
    ts = res.get("targets") or targets(res)
    if not ts:
        return []
    body = [[t["target"], t["measured"], "met" if t["met"] else "**not met**"] for t in ts]
    return ["## Targets (issue 4)", "", *table(["target", "measured", ""], body, left=3), ""]


def render(res: dict) -> str:
    """The whole report as markdown."""
    lines = ["# pybpfilter benchmark", ""]
    lines += machine_section(res)
    lines += targets_section(res)
    lines += testrun_section(res)
    lines += traffic_section(res)
    lines += build_section(res)
    lines += update_section(res)
    return "\n".join(lines)
