"""Kernel-timed cost per packet (BPF_PROG_TEST_RUN) and the cost of building each program.

Each (shape, N, hook) is loaded once through `bpfilter.runtime.checker.Checker` — the programs
`restore` would attach — and both probe packets are checked to be decided where the shape says
(the policy for the miss packet, the last rule for the other) before anything is timed. Timing
then runs `prog.run(frame, repeat=R)` in rounds over every loaded program, so drift spreads over
all sizes alike; the minimum over rounds is reported.
"""

from __future__ import annotations

import gc
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from packets import frame
from rulesets import Ruleset

from bpfilter.bpf.consts import NfHook, NfProto
from bpfilter.bpf.prog import Prog
from bpfilter.frontends.iptables.parser import parse
from bpfilter.ir.model import Family
from bpfilter.runtime.checker import Checker

HOOKS = ("xdp", "tc", "nf")


def fdinfo_memlock(fd: int) -> int:
    """The kernel's memlock charge for a BPF map or program fd (bytes)."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("memlock:"):
                return int(line.split()[1])
    return 0


def nf_ctx() -> bytes:
    """struct nf_hook_state for a test run at LOCAL_IN, IPv4 (the kernel fills the pointers)."""
    return struct.pack("<BB6x5Q", NfHook.LOCAL_IN, NfProto.IPV4, 0, 0, 0, 0, 0)


@dataclass
class Build:
    """What building one (shape, N, hook) cost, and what it made."""

    shape: str
    n: int
    hook: str
    parse_s: float
    build_s: float  # Checker(): compile + create and fill maps + load (verify)
    maps_s: float  # create and fill the maps (timed again, on fresh maps)
    load_s: float  # BPF_PROG_LOAD (timed again, on the same instructions)
    verify_us: int  # the verifier's own "verification time"
    insns: int  # instructions loaded
    insns_processed: int  # the verifier's count
    jited_bytes: int
    map_bytes: int  # memlock of the maps, from fdinfo
    prog_bytes: int  # memlock of the program
    maps: dict[str, int] = field(default_factory=dict)  # map name -> entries

    @property
    def compile_s(self) -> float:
        """Compile time: the build minus the map fill and the load measured on their own."""
        return max(self.build_s - self.maps_s - self.load_s, 0.0)


@dataclass
class Loaded:
    """A loaded program ready for timing."""

    build: Build
    checker: Checker
    frames: dict[str, bytes]
    ns: dict[str, list[int]] = field(default_factory=dict)  # probe -> ns/packet per round


def parse_ruleset(rs: Ruleset):
    """Parse the iptables-restore text; returns (Ruleset, seconds)."""
    # Parsing allocates many small objects: the collector's full passes would be charged to
    # whatever step happens to run next, so they are run here, outside every timer.
    gc.collect()
    t0 = time.perf_counter()
    parsed = parse(rs.text, family=Family.IPV4, filename=f"<{rs.shape} {rs.n}>")
    return parsed, time.perf_counter() - t0


def build(rs: Ruleset, parsed, parse_s: float, hook: str) -> Loaded:
    """Load one hook's program through Checker, time its parts, check the probe verdicts."""
    gc.collect()
    t0 = time.perf_counter()
    chk = Checker(parsed, chain="INPUT", hook=hook)
    build_s = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        again = chk.compiled.create_maps()
        maps_s = time.perf_counter() - t0
        try:
            cp = chk.compiled.programs["INPUT"]
            insns = cp.program.resolve({k: m.fd for k, m in again.items()})
            t0 = time.perf_counter()
            Prog.load(cp.flavour.prog_type, insns, name=cp.name,
                      attach_type=cp.flavour.attach_type).close()
            load_s = time.perf_counter() - t0
        finally:
            for m in again.values():
                m.close()
        info = chk.prog.info()
        b = Build(rs.shape, rs.n, hook, parse_s, build_s, maps_s, load_s,
                  chk.prog.stats.verification_time_us, len(insns), chk.prog.stats.insns_processed,
                  info.jited_prog_len, sum(fdinfo_memlock(m.fd) for m in chk.maps.values()),
                  fdinfo_memlock(chk.prog.fd),
                  {_map_name(k): m.spec.max_entries for k, m in chk.maps.items()})
        frames = {"miss": frame(rs.miss), "last": frame(rs.last)}
        _check_decisions(chk, rs, frames)
    except BaseException:
        chk.close()
        raise
    return Loaded(b, chk, frames)


def _map_name(key) -> str:
    return "/".join(str(k) for k in key) if isinstance(key, tuple) else str(key)


def _check_decisions(chk: Checker, rs: Ruleset, frames: dict[str, bytes]) -> None:
    miss = chk.run(frames["miss"])
    if (miss.chain, miss.rule, miss.verdict) != ("INPUT", None, "DROP"):
        raise AssertionError(f"{rs.shape} N={rs.n} {chk.hook}: the miss packet was decided by "
                             f"{miss.chain} rule {miss.rule} ({miss.verdict}), not the policy")
    last = chk.run(frames["last"])
    if (last.chain, last.rule) != rs.last_rule:
        raise AssertionError(f"{rs.shape} N={rs.n} {chk.hook}: the last-rule packet was decided "
                             f"by {last.chain} rule {last.rule}, expected {rs.last_rule}")


def _warm_up(hooks: tuple[str, ...]) -> None:
    """Build a one-rule ruleset per hook untimed: one-time costs (vmlinux BTF, imports) are not
    charged to the first measured build."""
    from rulesets import exact

    rs = exact(1)
    parsed, _ = parse_ruleset(rs)
    for hook in hooks:
        build(rs, parsed, 0.0, hook).checker.close()


def time_round(loaded: list[Loaded], repeat: int) -> None:
    """One timing round over every program and probe (kernel-measured ns per run)."""
    for ld in loaded:
        ctx = nf_ctx() if ld.checker.hook == "nf" else None
        for probe, data in ld.frames.items():
            res = ld.checker.prog.run(data, ctx=ctx, repeat=repeat, data_out_size=0)
            ld.ns.setdefault(probe, []).append(res.duration_ns)


def run_testruns(rulesets: list[Ruleset], hooks: tuple[str, ...], repeat: int, rounds: int,
                 log: Callable[[str], None]) -> tuple[list[Build], list[dict]]:
    """Build everything, then time it in interleaved rounds; returns builds and result rows."""
    loaded: list[Loaded] = []
    builds: list[Build] = []
    _warm_up(hooks)
    try:
        for rs in rulesets:
            parsed, parse_s = parse_ruleset(rs)
            for hook in hooks:
                ld = build(rs, parsed, parse_s, hook)
                loaded.append(ld)
                builds.append(ld.build)
                b = ld.build
                log(f"  built {rs.shape:5s} N={rs.n:<7,} {hook:3s}: parse {b.parse_s:.2f} s, "
                    f"compile {b.compile_s:.2f} s, maps {b.maps_s * 1e3:.0f} ms, "
                    f"load {b.load_s * 1e3:.0f} ms, {b.insns} insns")
            del parsed
        for r in range(rounds):
            t0 = time.perf_counter()
            time_round(loaded if r % 2 == 0 else loaded[::-1], repeat)
            log(f"  test-run round {r + 1}/{rounds}: {time.perf_counter() - t0:.1f} s")
        rows = [{"shape": ld.build.shape, "n": ld.build.n, "hook": ld.build.hook,
                 "miss_ns": min(ld.ns["miss"]), "last_ns": min(ld.ns["last"]),
                 "miss_rounds": ld.ns["miss"], "last_rounds": ld.ns["last"],
                 "insns": ld.build.insns, "insns_processed": ld.build.insns_processed,
                 "jited_bytes": ld.build.jited_bytes} for ld in loaded]
        return builds, rows
    finally:
        for ld in loaded:
            ld.checker.close()
