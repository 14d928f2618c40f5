"""Stateful rules against the kernel's netfilter, on real traffic (see tests/oracle/ctrig.py).

Two receivers with the same environment get the same frames; one runs the ruleset with legacy
iptables, the other with pybpfilter on the netfilter hook. Connections are real: the receivers'
own stacks answer (SYN-ACK, RST, echo replies, ICMP errors) and their sockets open connections of
their own, so conntrack goes through handshakes, closes, resets, retransmissions, out-of-window
segments, loose pickup, expectations (TFTP helper), NAT (DNAT/SNAT), NOTRACK and timeouts. Every
peer frame must get the same verdict, per-rule counters and deciding rule on both receivers.

The corpus plays fixed scenarios through a *probe* ruleset, one count-only rule per conntrack and
state criterion (so every frame checks all of them at once) and a stateful verdict tail; the
state netfilter gives each frame is also checked against the scenario's expectation, so the
corpus says what the kernel does and the oracle stays honest. The random suite draws rulesets and
scenarios with hypothesis.

Environment: BPFILTER_CT_EXAMPLES rulesets per family (default 12, two scenarios each),
BPFILTER_DIFF_SEED to replay, BPFILTER_DIFF_SHRINK seconds of shrinking (default 60).
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from hypothesis.internal.conjecture import engine as hyp_engine
from oracle.ct_strategies import ct_ruleset, scenario
from oracle.ctcompare import EPHEMERAL, StatefulDifferential
from oracle.ctflows import Flow, Scenario, Step
from oracle.ctpeer import Peer
from oracle.ctrig import DNAT_PORT, LOCALS, NOTRACK_PORT, PEERS, SNAT_TO, TFTP_PORT, CtRig
from oracle.rules import RulesetSpec, spec_from_text
from oracle.twin import Seen, private_bpffs, require_twin_tools

from bpfilter.ir.model import Family

pytestmark = [pytest.mark.kernel]

EXAMPLES = int(os.environ.get("BPFILTER_CT_EXAMPLES", "12"))
SEED = int(os.environ.get("BPFILTER_DIFF_SEED") or random.randrange(1 << 32))
SHRINK_SECONDS = int(os.environ.get("BPFILTER_DIFF_SHRINK", "60"))
V4, V6 = Family.IPV4, Family.IPV6


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CtRig]:
    """The sender and both receivers, with a private bpffs for pybpfilter."""
    require_twin_tools()
    with private_bpffs(tmp_path_factory, "ctbpffs") as root, CtRig(root) as r:
        yield r


# -- the probe ruleset --------------------------------------------------------------------------

STATE_RULES = ("INVALID", "NEW", "ESTABLISHED", "RELATED", "UNTRACKED")  # rules 1-5
STATE_NAMES = {"INVALID": "INV", "NEW": "NEW", "ESTABLISHED": "EST", "RELATED": "REL",
               "UNTRACKED": "UNT"}


def probe_rules(fam: Family, policy: str = "DROP") -> str:
    """Count-only rules for every criterion, then: ESTABLISHED,RELATED and UNTRACKED accepted,
    INVALID dropped, NEW accepted in a user chain unless it comes from the second peer."""
    peer, local, snat = PEERS[fam][0], LOCALS[fam][0], SNAT_TO[fam]
    net = "192.0.2.0/24" if fam is V4 else "2001:db8:a::/64"
    icmp = "icmp" if fam is V4 else "ipv6-icmp"
    echo_type = "2048" if fam is V4 else "32768"  # the echo request's type << 8 | code
    ct = "-A INPUT -m conntrack "
    probes = [f"{ct}--ctstate {s}" for s in STATE_RULES] + [
        f"{ct}--ctstate SNAT", f"{ct}--ctstate DNAT", f"{ct}! --ctstate NEW",
        f"{ct}--ctstate NEW,RELATED", f"{ct}! --ctstate INVALID,UNTRACKED",
        *(f"-A INPUT -m state --state {s}" for s in STATE_RULES),
        "-A INPUT -m state ! --state NEW,ESTABLISHED",
        *(f"{ct}--ctstatus {s}" for s in ("EXPECTED", "SEEN_REPLY", "ASSURED", "CONFIRMED",
                                          "NONE")),
        f"{ct}! --ctstatus ASSURED,CONFIRMED", f"{ct}--ctdir ORIGINAL", f"{ct}--ctdir REPLY",
        f"{ct}--ctproto tcp", f"{ct}--ctproto udp", f"{ct}--ctproto {icmp}",
        f"{ct}! --ctproto tcp", f"{ct}--ctorigsrc {peer}", f"{ct}--ctorigdst {local}",
        f"{ct}--ctreplsrc {local}", f"{ct}--ctrepldst {peer}", f"{ct}! --ctorigsrc {net}",
        f"{ct}--ctrepldst {snat}", f"{ct}! --ctreplsrc {local}",
        f"{ct}--ctorigsrcport {EPHEMERAL}:65535", f"{ct}--ctorigdstport 22",
        f"{ct}--ctreplsrcport 80", f"{ct}--ctrepldstport {EPHEMERAL}:65535",
        f"{ct}! --ctorigdstport {echo_type}", f"{ct}--ctorigdstport {echo_type}",
        f"{ct}--ctorigdstport {DNAT_PORT} --ctreplsrcport 80", f"{ct}! --ctorigsrcport 0:1023",
        f"{ct}--ctstate NEW --ctdir REPLY", f"{ct}--ctstate RELATED --ctdir REPLY",
        f"{ct}--ctstate ESTABLISHED --ctstatus SEEN_REPLY --ctproto tcp",
        f"{ct}! --ctstate INVALID --ctproto udp", f"{ct}--ctproto udp",
        f"{ct}! --ctproto udp", f"{ct}! --ctstatus NONE",
        f"{ct}--ctstate NEW --ctorigsrc {peer} ! --ctorigdstport 22",
    ]
    tail = [
        "-A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
        "-A INPUT -m state --state UNTRACKED -j ACCEPT",
        "-A INPUT -m conntrack --ctstate INVALID -j DROP",
        "-A INPUT -m conntrack --ctstate NEW -j new",
        f"-A new -s {PEERS[fam][1]} -j RETURN", "-A new -j ACCEPT",
    ]
    return ("*filter\n"
            f":INPUT {policy} [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:new - [0:0]\n"
            + "\n".join([*probes, *tail]) + "\nCOMMIT\n")


# -- the corpus ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CtCase:
    """A scenario and the state netfilter gives each peer frame (NEW, EST, REL, INV, UNT)."""

    name: str
    flows: tuple[tuple, ...]  # Flow arguments with peer/local as indexes into PEERS/LOCALS
    steps: tuple[Step, ...]
    states: str  # space separated, one per peer step


def T(flow: int, flags: str, **kw) -> Step:
    """A TCP segment from the peer."""
    return Step("tcp", flow, flags, **kw)


def S(op: str, flow: int = 0, **kw) -> Step:
    """Any other step."""
    return Step(op, flow, **kw)


E = EPHEMERAL
CASES = [
    CtCase("tcp-handshake-data-close-to-listener", (("tcp", 0, 0, E, 22),),
           (T(0, "S"), T(0, "A"), T(0, "PA", size=5), T(0, "FA"), T(0, "A")),
           "NEW EST EST EST EST"),
    CtCase("tcp-syn-retransmitted-then-handshake", (("tcp", 0, 0, E, 80),),
           (T(0, "S"), T(0, "S", seq="old"), T(0, "A"), T(0, "PA", size=4),
            T(0, "PA", size=4, seq="old")),
           "NEW EST EST EST EST"),
    CtCase("tcp-to-closed-port-then-ack", (("tcp", 0, 0, E, 23),),
           (T(0, "S"), T(0, "A"), T(0, "S", seq="next")), "NEW NEW NEW"),
    CtCase("tcp-loose-pickup-ack-without-connection", (("tcp", 0, 0, E, 22),),
           (T(0, "A", ack="zero"), T(0, "PA", size=3, ack="zero")), "NEW NEW"),
    # After the peer's RST the entry lingers (CLOSE): data is still ESTABLISHED, and so is a
    # SYN after the receiver's own RST; a SYN right after the peer's RST reopens: NEW.
    CtCase("tcp-rst-then-data-then-syn", (("tcp", 0, 0, E, 22),),
           (T(0, "S"), T(0, "A"), T(0, "R"), T(0, "PA", size=3), T(0, "S")),
           "NEW EST EST EST EST"),
    CtCase("tcp-rst-then-syn-reopens", (("tcp", 0, 0, E, 80),),
           (T(0, "S"), T(0, "A"), T(0, "R"), T(0, "S")), "NEW EST EST NEW"),
    # NEW from the second peer is dropped: the entry is never confirmed, so it stays NEW.
    CtCase("tcp-dropped-syn-stays-new", (("tcp", 1, 0, E, 22),),
           (T(0, "S"), T(0, "S", seq="old"), T(0, "A")), "NEW NEW NEW"),
    CtCase("tcp-out-of-window-and-out-of-order", (("tcp", 0, 0, E, 22),),
           (T(0, "S"), T(0, "A"), T(0, "PA", size=4, seq="ahead"), T(0, "A", seq="far"),
            T(0, "A", ack="far"), T(0, "PA", size=4), T(0, "A", badsum=True)),
           "NEW EST EST INV INV EST INV"),
    CtCase("tcp-syn-ack-from-the-peer-unsolicited", (("tcp", 0, 0, E, 22),),
           (T(0, "SA", ack="zero"), T(0, "FPU", seq="far")), "INV INV"),
    CtCase("tcp-own-connection-out", (("tcp", 0, 0, 80, E, True),),
           (S("connect"), T(0, "SA"), T(0, "PA", size=5), S("send", size=3), T(0, "A"),
            S("close"), T(0, "FA"), T(0, "A", seq="old")),
           "EST EST EST EST EST"),
    CtCase("tcp-own-connection-reset-by-peer", (("tcp", 1, 1, 443, E + 1, True),),
           (S("connect"), T(0, "SA", ack="far"), T(0, "RA"), T(0, "SA")),
           "INV EST INV"),
    CtCase("tcp-dnat-to-local-listener", (("tcp", 0, 1, E, DNAT_PORT),),
           (T(0, "S"), T(0, "A"), T(0, "PA", size=2)), "NEW EST EST"),
    CtCase("tcp-snat-in-input-after-the-first-packet", (("tcp", 2, 2, E, 22),),
           (T(0, "S"), T(0, "A"), T(0, "FA")), "NEW EST EST"),
    CtCase("udp-request-reply-and-unsolicited", (("udp", 0, 0, E, 53),),
           (S("udp"), S("udp"), S("reply"), S("udp"), S("udp", sport=E + 7)),
           "NEW NEW EST NEW"),
    CtCase("udp-own-request-and-replies", (("udp", 1, 2, 53, E, True),),
           (S("send"), S("udp"), S("udp", sport=E + 9), S("udp", badsum=True)),
           "EST NEW INV"),
    CtCase("udp-closed-port-and-notrack", (("udp", 0, 0, E, 54), ("udp", 0, 1, E + 1,
                                                                     NOTRACK_PORT)),
           (S("udp", 0), S("udp", 1), S("reply", 1), S("udp", 1), S("udp", 0)),
           "NEW UNT UNT NEW"),
    CtCase("udp-tftp-expectation-is-related", (("udp", 0, 0, TFTP_PORT, E, True),),
           (S("send"), S("udp", sport=E + 3), S("udp", sport=E + 3), S("udp")),
           "REL REL EST"),
    CtCase("icmp-echo-in", (("icmp", 0, 0, E, E),),
           (S("echo"), S("echo"), S("echo-reply")), "NEW EST INV"),
    CtCase("icmp-echo-out", (("icmp", 1, 1, E, E, True),),
           (S("send"), S("echo-reply"), S("echo-reply"), S("send"), S("echo-reply")),
           "EST EST EST"),
    # Only requests open an ICMP entry: an answer nobody asked for is INVALID, before and
    # after the receiver pinged with another identifier.
    CtCase("icmp-echo-reply-unsolicited", (("icmp", 0, 0, E, E), ("icmp", 0, 0, E + 1, E + 1,
                                                                    True)),
           (S("echo-reply", 0), S("send", 1), S("echo-reply", 1), S("echo-reply", 0)),
           "INV EST INV"),
    # A repeated request is ESTABLISHED once the receiver answered; the second peer's requests
    # are dropped (NEW from it is refused), so its flow never gets an entry.
    CtCase("icmp-echo-in-repeated-and-unanswered", (("icmp", 0, 0, E, E), ("icmp", 1, 0, E + 1,
                                                                           E + 1)),
           (S("echo", 0), S("echo", 0), S("echo", 0), S("echo", 1), S("echo", 1),
            S("echo-reply", 1)),
           "NEW EST EST NEW NEW INV"),
    CtCase("icmp-errors-quoting-own-echo", (("icmp", 0, 0, E, E, True),),
           (S("send"), S("icmp-error"), S("icmp-error", code=1), S("icmp-error", wrong_dst=True),
            S("icmp-error", about="stranger")),
           "REL REL INV INV"),
    # An error about the receiver's echo reply: the inverse of the quoted packet is the
    # incoming request's own tuple (RELATED in the original direction).
    CtCase("icmp-error-quoting-own-echo-reply", (("icmp", 0, 0, E, E),),
           (S("echo"), S("icmp-error")), "NEW REL"),
    # Replacing the ruleset keeps every flow's state (the kernel's entries; tc and XDP: the
    # ICMP query entries the egress recorder remembered).
    CtCase("flows-across-a-ruleset-replace", (("icmp", 0, 0, E, E, True), ("icmp", 0, 0, E + 1,
                                                                         E + 1),
                                              ("udp", 0, 0, 53, E + 2, True)),
           (S("send", 0), S("echo", 1), S("send", 2), S("reload"), S("echo-reply", 0),
            S("echo", 1), S("udp", 2)),
           "NEW EST EST EST"),
    CtCase("icmp-errors-quoting-own-flows", (("udp", 0, 0, 53, E, True),
                                             ("tcp", 0, 0, 80, E + 1, True)),
           (S("send", 0), S("icmp-error", 0), S("icmp-error", 0, code=1), S("connect", 1),
            S("icmp-error", 1), S("icmp-error", 1, wrong_dst=True)),
           "REL REL REL INV"),
    CtCase("icmp-errors-quoting-incoming-flows", (("tcp", 0, 0, E, 22), ("udp", 1, 0, E + 1,
                                                                          53)),
           (T(0, "S"), S("icmp-error", 0), S("udp", 1), S("reply", 1),
            S("icmp-error", 1), S("icmp-error", 1, about="stranger"),
            S("icmp-error", 0, about="made")),
           "NEW REL NEW REL INV REL"),
    CtCase("icmp-error-about-nothing", (("udp", 0, 0, 53, E, True),),
           (S("icmp-error"), S("icmp-error", about="stranger")), "INV INV"),
]


def _scenario(case: CtCase, fam: Family) -> Scenario:
    flows = tuple(Flow(proto, PEERS[fam][p], LOCALS[fam][lo], pp, lp, *out)
                  for proto, p, lo, pp, lp, *out in case.flows)
    return Scenario(fam, flows, case.steps)


def _state_of(deltas: dict) -> str:
    hit = [STATE_NAMES[s] for n, s in enumerate(STATE_RULES, 1)
           if deltas.get(("INPUT", n)) and deltas[("INPUT", n)].packets]
    return "+".join(hit) or "none"


@dataclass
class Probe:
    """The probe ruleset as loaded for one family."""

    family: Family
    text: str
    spec: RulesetSpec
    diff: StatefulDifferential

    def run(self, sc: Scenario) -> list[Seen]:
        """Play a scenario (the ruleset stays loaded); netfilter's views of the peer frames."""
        if self.diff.rig.loaded != (self.family, self.text):
            self.diff.rig.load(self.text, self.family)
        return self.diff.run(self.text, self.spec, sc, load=False)


@pytest.fixture(scope="module", params=[V4, V6], ids=["ipv4", "ipv6"])
def probe(request: pytest.FixtureRequest, rig: CtRig) -> Probe:
    """The probe ruleset loaded for one family (once for all the corpus)."""
    fam = request.param
    text = probe_rules(fam)
    rig.load(text, fam)
    return Probe(fam, text, spec_from_text(text, fam), StatefulDifferential(rig))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_corpus(probe: Probe, case: CtCase) -> None:
    """netfilter gives the expected states, and pybpfilter agrees with it on every frame."""
    seen = probe.run(_scenario(case, probe.family))
    got = " ".join(_state_of(s.deltas) for s in seen)
    assert got == case.states, f"netfilter's states: {got}, the corpus says {case.states}"


# -- random rulesets and scenarios --------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("family", [V4, V6], ids=["ipv4", "ipv6"])
def test_netfilter_agrees_on_random_stateful_rulesets(rig: CtRig, family: Family,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Random conntrack/state rulesets over random scenarios: the same on every frame."""
    diff = StatefulDifferential(rig, seed=SEED)
    print(f"seed {SEED} (BPFILTER_DIFF_SEED)")
    monkeypatch.setattr(hyp_engine, "MAX_SHRINKING_SECONDS", SHRINK_SECONDS)

    @seed(SEED)
    @settings(max_examples=EXAMPLES, deadline=None, database=None, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        spec = data.draw(ct_ruleset(family), label="ruleset")
        text = spec.text()
        for n in range(2):
            sc = data.draw(scenario(family), label=f"scenario {n + 1}")
            diff.run(text, spec, sc, load=n == 0)

    check()
    s = diff.stats
    spent = ", ".join(f"{k} {v:.1f}s" for k, v in s.seconds.items())
    print(f"compared {s.frames} frames over {s.scenarios} scenarios: {s.verdicts}, "
          f"{s.excluded} excluded; {spent}")


# -- timeouts -----------------------------------------------------------------------------------

# Conntrack timeouts are per namespace: lowered in both receivers only, for one scenario.
SHORT_TIMEOUTS = ("udp_timeout", "icmp_timeout", "icmpv6_timeout", "tcp_timeout_established")
WAIT = 1.4  # past the one-second timeouts, with room for a slow machine


@pytest.mark.parametrize("fam", [V4, V6], ids=["ipv4", "ipv6"])
def test_expired_entries(rig: CtRig, fam: Family) -> None:
    """With one-second timeouts, a reply after the entry expired is no longer ESTABLISHED."""
    check_expired_entries(rig, fam)


def check_expired_entries(rig: CtRig, fam: Family) -> None:
    """UDP and TCP start over (NEW, TCP by loose pickup), an echo reply and an error quoting the
    receiver's echo are INVALID, a repeated echo request is NEW again."""
    text = probe_rules(fam)
    rig.load(text, fam)
    diff = StatefulDifferential(rig)
    flows = (Flow("udp", PEERS[fam][0], LOCALS[fam][0], 53, E, True),
             Flow("icmp", PEERS[fam][0], LOCALS[fam][0], E + 1, E + 1, True),
             Flow("tcp", PEERS[fam][0], LOCALS[fam][0], E + 2, 22),
             Flow("udp", PEERS[fam][0], LOCALS[fam][2], 53, E + 3, True),
             Flow("icmp", PEERS[fam][0], LOCALS[fam][0], E + 4, E + 4))
    steps = (S("send", 0), S("udp", 0), S("send", 1), T(2, "S"), T(2, "A"),
             T(2, "PA", size=3), S("echo", 4), S("echo", 4), Step("wait", seconds=WAIT),
             S("udp", 0), S("echo-reply", 1), S("icmp-error", 1), S("echo", 4),
             T(2, "PA", size=3), S("send", 3), S("udp", 3))
    keys = [f"net.netfilter.nf_conntrack_{k}" for k in SHORT_TIMEOUTS]
    old = {k: rig.sysctl(k) for k in keys}
    try:
        for k in keys:
            rig.set_sysctl(k, 1)
        seen = diff.run(text, spec_from_text(text, fam), Scenario(fam, flows, steps),
                        load=False)
    finally:
        for k, v in old.items():
            rig.set_sysctl(k, int(v))
    got = " ".join(_state_of(s.deltas) for s in seen)
    assert got == "EST NEW EST EST NEW EST NEW INV INV NEW NEW EST", got


# -- limit --------------------------------------------------------------------------------------

LIMIT_RULES = """\
*filter
:INPUT DROP [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -p udp -m conntrack --ctstate NEW -m limit --limit 1/hour --limit-burst 2 -j ACCEPT
-A INPUT -p udp -m limit --limit 1/hour --limit-burst 3 -m conntrack --ctstate ESTABLISHED -j ACCEPT
-A INPUT -p udp --dport 53 -m limit --limit 20/second --limit-burst 4 -j ACCEPT
COMMIT
"""


def test_limit_buckets_are_spent_in_rule_order(rig: CtRig) -> None:
    """A limit after a conntrack match is only spent by packets that pass the match; one
    before it by every packet that reaches the rule (here: the ESTABLISHED replies to the
    receiver's own datagrams do not spend the NEW bucket, the third NEW flow spends the other)."""
    fam = V4
    rig.load(LIMIT_RULES, fam)
    diff = StatefulDifferential(rig)
    flows = (*(Flow("udp", PEERS[fam][0], LOCALS[fam][0], E + i, 54) for i in range(3)),
             Flow("udp", PEERS[fam][0], LOCALS[fam][0], 53, E + 3, True))
    steps = (S("udp", 0), S("send", 3), S("udp", 3), S("udp", 1), S("udp", 2), S("udp", 3),
             S("udp", 3), S("udp", 0))
    spec = spec_from_text(LIMIT_RULES, fam)
    seen = diff.run(LIMIT_RULES, spec, Scenario(fam, flows, steps), load=False)
    assert [s.verdict[0] for s in seen] == list("AAADADD"), [s.verdict for s in seen]


def test_limit_lets_through_the_documented_rate(rig: CtRig) -> None:
    """--limit 20/second --limit-burst 4: the burst, then 20 a second, on both receivers."""
    fam = V4
    rig.load(LIMIT_RULES, fam)
    peer = Peer(
        Scenario(fam, (Flow("udp", PEERS[fam][1], LOCALS[fam][0], E, 53),)))
    frame = peer.frame(S("udp"))
    accepted = dict.fromkeys(("netfilter", "pybpfilter"), 0)
    start = time.monotonic()
    while (elapsed := time.monotonic() - start) < 1.0:
        for side in accepted:
            accepted[side] += rig.observe(side, frame).verdict == "ACCEPT"
        time.sleep(0.004)
    elapsed = time.monotonic() - start
    want = 4 + 20 * elapsed
    for side, n in accepted.items():
        assert abs(n - want) <= 2.5, f"{side} accepted {n} in {elapsed:.2f} s, {want:.0f} due"
    assert abs(accepted["netfilter"] - accepted["pybpfilter"]) <= 1, accepted
