"""Running a stateful scenario through both receivers of a `CtRig`, and comparing step by step.

Every peer frame must get the same verdict, the same counter deltas on every rule and policy of
the tested chains, and the same deciding rule (netfilter's read off its counters, pybpfilter's
from its trace map) on both receivers. The first disagreement raises `Disagreement` with the
whole story: ruleset, flows, every step so far with both verdicts, what the receivers sent, and
both conntrack tables.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from bpfilter.ir.model import Counters

from .compare import Disagreement, _fmt_deltas, _fmt_key
from .ctflows import Flow, Scenario, Step
from .ctpeer import LocalHost, Peer
from .ctrig import SIDES, CtRig
from .rules import RulesetSpec, nf_decider
from .twin import Seen

Key = tuple[str, int | None]
EPHEMERAL = 40000  # flows' ports from here on are moved by `relocate`


@dataclass
class CtStats:
    """What a run compared."""

    scenarios: int = 0
    frames: int = 0
    verdicts: dict[str, int] = field(default_factory=dict)
    states: dict[str, int] = field(default_factory=dict)  # conntrack's view, for coverage
    excluded: int = 0
    seconds: dict[str, float] = field(default_factory=dict)

    def timed(self, what: str, since: float) -> float:
        """Add the time since `since` to `what`; returns now."""
        now = time.perf_counter()
        self.seconds[what] = self.seconds.get(what, 0.0) + now - since
        return now


def relocate(sc: Scenario, offset: int) -> Scenario:
    """The scenario with ephemeral ports (>= EPHEMERAL) moved by `offset`: no socket, request
    or conntrack entry of an earlier scenario can share a flow's addresses and ports."""
    def mv(p: int) -> int:
        return p + offset if p >= EPHEMERAL else p

    flows = tuple(Flow(f.proto, f.peer, f.local, mv(f.peer_port), mv(f.local_port), f.outgoing)
                  for f in sc.flows)
    steps = tuple(s if s.sport is None else Step(**{**s.__dict__, "sport": mv(s.sport)})
                  for s in sc.steps)
    return Scenario(sc.family, flows, steps)


@dataclass
class _Log:
    lines: list[str] = field(default_factory=list)

    def add(self, line: str) -> None:
        self.lines.append(line)


class StatefulDifferential:
    """Runs scenarios on a rig and compares the receivers (see the module docstring)."""

    def __init__(self, rig: CtRig, seed: int | None = None) -> None:
        self.rig = rig
        self.seed = seed
        self.stats = CtStats()
        self._offset = 0

    def next_offset(self) -> int:
        """A fresh port offset for the next scenario."""
        self._offset = (self._offset + 64) % 24000
        return self._offset

    def run(self, text: str, spec: RulesetSpec, scenario: Scenario,
            *, load: bool = True) -> list[Seen]:
        """Load `text` (described by `spec`) and play `scenario`; netfilter's views, in order."""
        rig = self.rig
        t = time.perf_counter()
        if load:
            rig.load(text, scenario.family)
            t = self.stats.timed("load", t)
            self._check_shape(text, spec)
        sc = relocate(scenario, self.next_offset())
        rig.flush_conntrack()
        for rx in rig.receivers.values():
            rx.captured()
        peers = {side: Peer(sc) for side in SIDES}
        hosts = {side: LocalHost(rig.receivers[side].ns, sc) for side in SIDES}
        log = _Log()
        seen: list[Seen] = []
        try:
            for h in hosts.values():
                h.open()
            for n, step in enumerate(sc.steps, 1):
                if step.op in ("wait", "reload"):
                    if step.op == "wait":
                        time.sleep(step.seconds)
                    else:
                        rig.load(text, sc.family)
                    log.add(f"{n}. {step.describe(sc.flows)}")
                    continue
                if not step.is_peer:
                    outcomes = {side: hosts[side].do(step) for side in SIDES}
                    self._absorb(peers)
                    log.add(f"{n}. {step.describe(sc.flows)}: {outcomes['netfilter']}"
                            + ("" if len(set(outcomes.values())) == 1
                               else f" (pybpfilter: {outcomes['pybpfilter']})"))
                    continue
                views, frames = {}, {}
                for side in SIDES:
                    frames[side] = peers[side].frame(step)
                    views[side] = rig.observe(side, frames[side])
                self._absorb(peers)
                t = self.stats.timed("frames", t)
                nf, ours = views["netfilter"], views["pybpfilter"]
                log.add(f"{n}. {step.describe(sc.flows)}: netfilter {nf.verdict}, "
                        f"pybpfilter {ours.verdict}")
                seen.append(nf)
                if not nf.reached and not ours.reached:
                    self.stats.excluded += 1
                    continue
                self._compare(text, spec, sc, step, frames, views, peers, log)
        finally:
            for h in hosts.values():
                h.close()
        self.stats.scenarios += 1
        return seen

    def _absorb(self, peers: dict[str, Peer]) -> None:
        for side, peer in peers.items():
            peer.absorb(self.rig.receivers[side].captured())

    def _check_shape(self, text: str, spec: RulesetSpec) -> None:
        ours = {k for k in self.rig.counter_keys("pybpfilter") if k[0] in spec.chain_names}
        theirs = {k for k in self.rig.counter_keys("netfilter") if k[0] in spec.chain_names}
        if ours != theirs:
            raise Disagreement(f"the ruleset's shape differs: netfilter {sorted(theirs, key=str)}"
                               f", pybpfilter {sorted(ours, key=str)}\n{text}")

    def _compare(self, text: str, spec: RulesetSpec, sc: Scenario, step: Step,
                 frames: dict[str, bytes], views: dict[str, Seen], peers: dict[str, Peer],
                 log: _Log) -> None:
        nf, ours = views["netfilter"], views["pybpfilter"]
        self.stats.frames += 1
        self.stats.verdicts[nf.verdict] = self.stats.verdicts.get(nf.verdict, 0) + 1
        keys = sorted((k for k in nf.deltas if k[0] in spec.chain_names),
                      key=lambda k: (k[0], k[1] or 0))
        theirs = {k: nf.deltas.get(k, Counters()) for k in keys}
        mine = {k: ours.deltas.get(k, Counters()) for k in keys}
        nf_dec = nf_decider(spec, theirs)
        problems = []
        if nf.reached != ours.reached:
            problems.append(f"reached the chain: netfilter {nf.reached}, pybpfilter "
                            f"{ours.reached}")
        if nf.verdict != ours.verdict:
            problems.append(f"verdict: netfilter {nf.verdict}, pybpfilter {ours.verdict}")
        if theirs != mine:
            problems.append("counters differ")
        # The trace map holds the last decision on the CPU: a reply the receiver sent while
        # handling the frame (its OUTPUT chain) overwrites it, then only counters tell.
        traced = ours.decider is not None and ours.decider[0] in spec.chain_names
        if nf_dec is not None and traced and nf_dec != ours.decider:
            problems.append(f"deciding rule: netfilter {_fmt_key(nf_dec)}, pybpfilter "
                            f"{_fmt_key(ours.decider) if ours.decider else 'none'}")
        if not problems:
            return
        lines = ["netfilter and pybpfilter disagree: " + "; ".join(problems)]
        if self.seed is not None:
            lines.append(f"seed {self.seed}: rerun with BPFILTER_DIFF_SEED={self.seed} pytest "
                         "tests/test_differential_conntrack.py")
        lines += [f"--- ruleset ({sc.family.value}, filter INPUT):", text.rstrip(),
                  "--- scenario:", sc.describe(), "--- so far:", *log.lines,
                  f"--- this frame (netfilter's): {frames['netfilter'].hex()}",
                  f"--- netfilter: {nf.verdict} by "
                  f"{_fmt_key(nf_dec) if nf_dec else 'no rule'}; counters "
                  f"{_fmt_deltas(theirs)}",
                  f"--- pybpfilter: {ours.verdict} by "
                  f"{_fmt_key(ours.decider) if ours.decider else 'none'}; counters "
                  f"{_fmt_deltas(mine)}"]
        for side in SIDES:
            lines.append(f"--- {side} sent: {'; '.join(peers[side].heard) or 'nothing'}")
            lines.append(f"--- {side} conntrack:")
            lines += [f"    {e}" for e in self.rig.conntrack_entries(side)]
        raise Disagreement("\n".join(lines))
