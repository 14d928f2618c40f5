"""Running the same ruleset and packets through netfilter and pybpfilter, and comparing.

Per packet the two sides must agree on the verdict, on every counter delta of the tested chain
and its user chains (rules and policy, packets and bytes), and on the deciding rule (netfilter's
read off its counters, see `rules.nf_decider`). A disagreement raises `Disagreement` carrying a
reproducer: the ruleset text, the packet and its bytes, both sides' view.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from bpfilter import netns
from bpfilter.ir.model import Counters, Family, Ruleset
from bpfilter.runtime.checker import Checker

from .addresses import RX_IFNAME
from .frames import PacketSpec
from .netfilter import PLACEMENTS, NetfilterOracle, Observation
from .rules import RulesetSpec, nf_decider

# BPF_PROG_TEST_RUN gives netfilter programs an skb classified by eth_type_trans() against
# the loopback device of the calling thread's namespace. Its address is all zeroes, so a
# unicast frame is sent to that address to be PACKET_HOST there, as it is on the receiver; and
# its broadcast address is all zeroes too unless set: runs happen in the oracle's `testrun_ns`,
# whose loopback calls ff:ff:ff:ff:ff:ff broadcast. Programs cannot read MAC addresses otherwise.
TEST_RUN_HOST_MAC = "00:00:00:00:00:00"

Key = tuple[str, int | None]


class Disagreement(AssertionError):
    """netfilter and pybpfilter disagree on a packet (or on the ruleset itself)."""


@dataclass
class Stats:
    """What a run compared."""

    rulesets: int = 0
    packets: int = 0
    excluded: int = 0  # never reached the tested hook (the stack dropped them first)
    excluded_examples: list[str] = field(default_factory=list)
    hotdrops: int = 0
    verdicts: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # where the time goes

    def timed(self, what: str, since: float) -> float:
        """Add the time since `since` to `what`; returns now."""
        now = time.perf_counter()
        self.seconds[what] = self.seconds.get(what, 0.0) + now - since
        return now


def parse_ruleset(text: str, family: Family, sets_text: str | None = None) -> Ruleset:
    """The iptables front-end's reading of restore text (with the sets of `ipset restore`
    text `sets_text`, if given)."""
    from bpfilter.frontends.iptables.parser import parse

    sets = None
    if sets_text is not None:
        from bpfilter.frontends.ipset import parse_sets

        sets = parse_sets(sets_text, filename="<differential sets>")
    return parse(text, family=family, filename="<differential>", sets=sets)


def _fmt_key(k: Key) -> str:
    return f"{k[0]} policy" if k[1] is None else f"{k[0]} #{k[1]}"


def _fmt_deltas(d: dict[Key, Counters]) -> str:
    moved = [f"{_fmt_key(k)} +{c.packets}/{c.bytes}B" for k, c in sorted(
        d.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)) if c.packets or c.bytes]
    return ", ".join(moved) or "none"


@dataclass(frozen=True)
class OurView:
    """pybpfilter's verdict, deciding rule and counter deltas for one packet."""

    verdict: str
    decider: Key | None
    deltas: dict[Key, Counters]


def reproducer(spec_text: str, family: Family, placement: str, pkt: PacketSpec, frame: bytes,
               seed: int | None) -> str:
    """The text that lets anyone replay a disagreement."""
    try:
        from scapy.layers.l2 import Ether

        dissect = Ether(frame).summary()
    except Exception as e:  # a report must not fail on a dissector problem
        dissect = f"(scapy: {e})"
    lines = []
    if seed is not None:
        lines.append(f"seed {seed}: rerun with BPFILTER_DIFF_SEED={seed} "
                     "pytest tests/test_differential.py")
    lines += [f"--- ruleset ({family.value}, {placement}):", spec_text.rstrip(),
              f"--- packet: {pkt.describe()}", f"    {pkt!r}", f"    frame {frame.hex()}",
              f"    {dissect}"]
    return "\n".join(lines)


class Differential:
    """Compares netfilter (through `oracle`) and pybpfilter's Checker on the same traffic."""

    def __init__(self, oracle: NetfilterOracle, seed: int | None = None) -> None:
        self.oracle = oracle
        self.seed = seed
        self.stats = Stats()

    def run(self, spec: RulesetSpec, packets: Iterable[PacketSpec]) -> None:
        """Load `spec` on both sides and compare every packet; raises Disagreement."""
        self.run_text(spec.text(), spec, packets)

    def run_text(self, text: str, spec: RulesetSpec, packets: Iterable[PacketSpec],
                 sets_text: str | None = None) -> list[Observation]:
        """Like `run`, for a hand-written text that `spec` describes (chains, targets);
        returns netfilter's observations, in order. With `sets_text` (`ipset restore` text),
        both sides get those sets first (netfilter's replace every set it had)."""
        fam = spec.family
        placement = PLACEMENTS[spec.table]
        where = f"{spec.table} {spec.chain}"
        t = time.perf_counter()
        if sets_text is not None:
            self.oracle.load_sets(sets_text)
        self.oracle.load(text, fam, placement)
        t = self.stats.timed("iptables-restore", t)
        try:
            rs = parse_ruleset(text, fam, sets_text)
            checker = Checker(rs, chain=spec.chain, table=spec.table, hook="nf", iif=RX_IFNAME)
            t = self.stats.timed("compile+load", t)
        except Exception as e:
            raise Disagreement(f"iptables-legacy-restore accepts this ruleset, pybpfilter "
                               f"refuses it: {type(e).__name__}: {e}\n--- ruleset "
                               f"({fam.value}, {where}):\n{text}") from e
        self.stats.rulesets += 1
        seen = []
        with checker:
            last = checker.counters()
            keys = sorted((k for k in last if k[0] in spec.chain_names),
                          key=lambda k: (k[0], k[1] or 0))
            theirs = {k for k in self.oracle.counter_keys(fam) if k[0] in spec.chain_names}
            if set(keys) != theirs:
                raise Disagreement(
                    f"the ruleset's shape differs: netfilter has rules/policies "
                    f"{sorted(theirs - set(keys), key=str)} that pybpfilter has not, and "
                    f"pybpfilter {sorted(set(keys) - theirs, key=str)}\n--- ruleset "
                    f"({fam.value}, {where}):\n{text}")
            for pkt in packets:
                frame = pkt.frame(self.oracle.tx_mac, self.oracle.rx_mac)
                ob = self.oracle.observe(frame, fam)
                t = self.stats.timed("netfilter", t)
                seen.append(ob)
                if not ob.reached:
                    self.stats.excluded += 1
                    if len(self.stats.excluded_examples) < 5:
                        self.stats.excluded_examples.append(pkt.describe())
                    continue
                ours, last = self._ours(checker, pkt, last)
                t = self.stats.timed("test runs", t)
                self._compare(spec, (sets_text or "") + text, where, pkt, frame, ob, ours,
                              keys)
        return seen

    def _ours(self, checker: Checker, pkt: PacketSpec,
              before: dict[Key, Counters]) -> tuple[OurView, dict[Key, Counters]]:
        frame = pkt.frame(self.oracle.tx_mac, TEST_RUN_HOST_MAC)
        with netns.enter(self.oracle.testrun_ns):
            res = checker.run(frame)
        after = checker.counters()
        deltas = {k: Counters(v.packets - before[k].packets, v.bytes - before[k].bytes)
                  for k, v in after.items()}
        decider = (res.chain, res.rule) if res.chain is not None else None
        return OurView(res.verdict, decider, deltas), after

    def _compare(self, spec: RulesetSpec, text: str, where: str, pkt: PacketSpec, frame: bytes,
                 ob: Observation, ours: OurView, keys: list[Key]) -> None:
        self.stats.packets += 1
        self.stats.verdicts[ob.verdict] = self.stats.verdicts.get(ob.verdict, 0) + 1
        theirs = {k: ob.deltas.get(k, Counters()) for k in keys}
        mine = {k: ours.deltas.get(k, Counters()) for k in keys}
        nf_dec = nf_decider(spec, theirs)
        if nf_dec is None:
            self.stats.hotdrops += 1
        problems = []
        if ob.verdict != ours.verdict:
            problems.append(f"verdict: netfilter {ob.verdict}, pybpfilter {ours.verdict}")
        if theirs != mine:
            problems.append("counters differ")
        if nf_dec is not None and nf_dec != ours.decider:
            problems.append(f"deciding rule: netfilter {_fmt_key(nf_dec)}, pybpfilter "
                            f"{_fmt_key(ours.decider) if ours.decider else 'none'}")
        if not problems:
            return
        nf_says = _fmt_key(nf_dec) if nf_dec else "no rule (hotdrop)"
        our_says = _fmt_key(ours.decider) if ours.decider else "none"
        raise Disagreement(
            "netfilter and pybpfilter disagree: " + "; ".join(problems) + "\n"
            + reproducer(text, spec.family, where, pkt, frame, self.seed) + "\n"
            + f"--- netfilter: {ob.verdict} by {nf_says}; counters {_fmt_deltas(theirs)}\n"
            + f"--- pybpfilter: {ours.verdict} by {our_says}; counters {_fmt_deltas(mine)}")
