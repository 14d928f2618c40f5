"""The classifier gives the same first match as the linear code it replaces.

Each example compiles one random ruleset twice — classified (runs of 16+ rules become hash/LPM
lookups) and linear — loads both into the kernel, runs the same packets through both with
BPF_PROG_TEST_RUN, and compares verdict, deciding rule and every counter. The linear code is
itself checked against netfilter by the differential tests.
"""

from __future__ import annotations

import pytest
from helpers.kernel import require_kernel
from helpers.packets import build, fragments, icmp, tcp, udp
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import TCP, UDP

from bpfilter.frontends.iptables.parser import parse
from bpfilter.ir.model import Family
from bpfilter.runtime.checker import Checker

NETS4 = ["10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "10.1.2.3", "192.0.2.0/24", "192.0.2.7",
         "0.0.0.0/1", "10.1.2.128/25"]
NETS6 = ["2001:db8::/32", "2001:db8:1::/48", "2001:db8:1::3", "fd00::/8", "2001:db8:1:2::/64"]
PORTS = [22, 53, 80, 443, 1000, 1023, 1024, 8080]
LINEAR = {"min_segment": 10**9}
EAGER = {"rules_per_group": 0, "min_segment": 4}  # classify every run, however varied


@st.composite
def rule_line(draw, family: Family) -> str:
    nets = NETS4 if family is Family.IPV4 else NETS6
    parts = []
    if draw(st.booleans()):
        parts += ["-s", draw(st.sampled_from(nets))]
    if draw(st.booleans()):
        parts += ["-d", draw(st.sampled_from(nets))]
    if draw(st.integers(0, 4)) == 0:
        parts += ["-i", draw(st.sampled_from(["eth0", "eth+", "lo"]))]
    proto = draw(st.sampled_from(["", "tcp", "udp", "icmp"]))
    if proto == "icmp":
        if family is Family.IPV4:
            parts += ["-p", "icmp", "-m", "icmp", "--icmp-type", draw(st.sampled_from(
                ["8", "0", "3/3", "any", "3"]))]
        else:
            parts += ["-p", "ipv6-icmp", "-m", "icmp6", "--icmpv6-type",
                      draw(st.sampled_from(["128", "129", "1/4"]))]
    elif proto:
        parts += ["-p", proto]
        kind = draw(st.sampled_from(["dport", "sport", "range", "multi", "none"]))
        if kind in ("dport", "sport"):
            parts += [f"--{kind}", str(draw(st.sampled_from(PORTS)))]
        elif kind == "range":
            lo = draw(st.sampled_from(PORTS))
            parts += ["--dport", f"{lo}:{lo + draw(st.integers(0, 2000))}"]
        elif kind == "multi":
            ps = draw(st.lists(st.sampled_from(PORTS), min_size=1, max_size=4, unique=True))
            parts += ["-m", "multiport", "--dports", ",".join(map(str, ps))]
        if proto == "tcp" and draw(st.integers(0, 3)) == 0:
            parts += ["--syn"]
    target = draw(st.sampled_from(["ACCEPT", "DROP", "DROP", "RETURN", "DECIDE", "GOTO"]))
    if target == "GOTO":
        return " ".join([*parts, "-g", "MAYBE"])
    return " ".join([*parts, "-j", target])


@st.composite
def ruleset(draw, family: Family) -> str:
    n = draw(st.integers(16, 80))
    rules = draw(st.lists(rule_line(family), min_size=n, max_size=n))
    policy = draw(st.sampled_from(["ACCEPT", "DROP"]))
    lines = ["*filter", f":INPUT {policy} [0:0]", ":FORWARD ACCEPT [0:0]",
             ":OUTPUT ACCEPT [0:0]", ":DECIDE - [0:0]", ":MAYBE - [0:0]"]
    lines += [f"-A INPUT {r}" for r in rules]
    # DECIDE always decides (a jump the classifier may take); MAYBE may return.
    lines += ["-A DECIDE -p udp -j DROP", "-A DECIDE -j ACCEPT",
              "-A MAYBE -p tcp -j DROP", "-A MAYBE -p udp --dport 53 -j RETURN"]
    return "\n".join([*lines, "COMMIT", ""])


def _packets(family: Family, seed: int) -> list[bytes]:
    import random

    rnd = random.Random(seed)
    if family is Family.IPV4:
        srcs = ["10.1.2.3", "10.1.2.200", "10.9.9.9", "192.0.2.7", "192.0.2.9", "172.16.0.1"]
        dsts = ["10.1.2.3", "192.0.2.7", "203.0.113.5", "10.1.5.5"]
    else:
        srcs = ["2001:db8:1::3", "2001:db8:1:2::9", "2001:db8:5::1", "fd00::1", "2001:db9::1"]
        dsts = ["2001:db8:1::3", "fd00::2", "2001:db8:1:2::1"]
    out = []
    for _ in range(40):
        s, d = rnd.choice(srcs), rnd.choice(dsts)
        sp, dp = rnd.choice([*PORTS, 40000]), rnd.choice([*PORTS, 1500, 2500, 9])
        kind = rnd.randrange(6)
        if kind == 0:
            out.append(tcp(s, d, sp, dp, flags=rnd.choice(["S", "A", "SA", "R"])))
        elif kind == 1:
            out.append(udp(s, d, sp, dp))
        elif kind == 2:
            t = rnd.choice([0, 3, 8]) if family is Family.IPV4 else rnd.choice([1, 128, 129])
            out.append(icmp(s, d, type=t, code=rnd.choice([0, 3, 4])))
        elif kind == 3 and family is Family.IPV4:
            frame = build(UDP(sport=sp, dport=dp), s, d, payload=b"x" * 40)
            out.append(rnd.choice(fragments(frame, 16)))
        elif kind == 4:
            # A transport header cut short: matches on it hotdrop.
            frame = build(TCP(sport=sp, dport=dp), s, d)
            out.append(frame[: len(frame) - 12] if family is Family.IPV4 else frame)
        else:
            out.append(udp(s, d, sp, dp))
    return out


@pytest.mark.parametrize("family", [Family.IPV4, Family.IPV6])
def test_classifier_matches_linear_code(family):
    require_kernel()

    classified = []

    @settings(max_examples=40, deadline=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(text=ruleset(family), seed=st.integers(0, 10**6))
    def check(text: str, seed: int) -> None:
        rs = parse(text, family=family, filename="random")
        with Checker(rs, iif="eth0", opts=EAGER) as fast, \
                Checker(rs, iif="eth0", opts=LINEAR) as slow:
            classified.append(any(isinstance(k, tuple) and k[0] == "cls"
                                  for k in fast.compiled.maps))
            for n, frame in enumerate(_packets(family, seed)):
                got, want = fast.run(frame), slow.run(frame)
                assert got == want, f"packet {n} ({frame.hex()}):\n{text}"
            assert fast.counters() == slow.counters(), text

    check()
    assert sum(classified) >= len(classified) // 2, "the classifier was hardly exercised"
