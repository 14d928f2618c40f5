"""Set lookups in the kernel (BPF_PROG_TEST_RUN): every set type, flag and negation, LPM
overlaps and nomatch members, ports of every protocol, fragments and cut headers, on every
hook. The verdicts are the ones netfilter gives (tests/test_sets_differential.py checks them
against the kernel's ipset); here pybpfilter's programs must give them too.
"""

from __future__ import annotations

import time

import pytest
from helpers.kernel import require_kernel
from oracle.set_cases import CASES, SRC, V4, V6, SetCase, icmp, sets, tcp, udp

from bpfilter.bpf.maps import Map
from bpfilter.compiler.setmaps import set_map_key
from bpfilter.frontends.ipset import parse_sets
from bpfilter.frontends.iptables import parse
from bpfilter.ir.model import Family
from bpfilter.runtime.checker import Checker

pytestmark = pytest.mark.kernel
SRC_MAC, HOST_MAC = "02:00:00:00:00:01", "00:00:00:00:00:00"


def _checker(case: SetCase, hook: str) -> Checker:
    rs = parse(case.text(), family=case.family, sets=parse_sets(case.sets))
    return Checker(rs, chain=case.chain, table=case.table, hook=hook, iif="eth0")


def _params() -> list:
    out = []
    for c in CASES:
        hooks = ["nf"] if c.table != "filter" else ["nf", "tc", "xdp"]
        out += [pytest.param(c, h, id=f"{c.name}-{h}") for h in hooks]
    return out


@pytest.mark.parametrize(("case", "hook"), _params())
def test_set_case(case: SetCase, hook: str) -> None:
    """Each packet gets netfilter's verdict."""
    require_kernel()
    with _checker(case, hook) as chk:
        got = [(p.describe(), chk.run(p.frame(SRC_MAC, HOST_MAC)).verdict) for p, _ in case.packets]
    assert got == [(p.describe(), want) for p, want in case.packets]


def test_members_change_without_recompiling() -> None:
    """The program looks the set up at run time: a member added to its map counts at once."""
    require_kernel()
    case = SetCase("live", sets("create s hash:net"), ("-m set --match-set s src -j DROP",), ())
    with _checker(case, "nf") as chk:
        frame = udp().frame(SRC_MAC, HOST_MAC)
        assert chk.run(frame).verdict == "ACCEPT"
        m: Map = chk.maps[set_map_key(chk.compiled.table.chains["INPUT"].rules[0]
                                      .matches[0].params.definition)]
        m.update((4 + 24).to_bytes(4, "little") + bytes([192, 0, 2, 0]), b"\0")
        assert chk.run(frame).verdict == "DROP"
        m.update((4 + 24).to_bytes(4, "little") + bytes([192, 0, 2, 0]), b"\1")  # nomatch
        assert chk.run(frame).verdict == "ACCEPT"


def test_longest_prefix_wins_over_rule_order_of_members() -> None:
    """Overlapping prefixes added in any order: the longest covering one decides, as ipset's
    hash:net searches its prefix lengths from the longest."""
    require_kernel()
    lines = ["create s hash:net family inet6"]
    for plen in (16, 120, 32, 64, 48, 96, 127):
        flag = " nomatch" if plen in (32, 96, 127) else ""
        lines.append(f"add s 2001:db8:a::/{plen}{flag}")
    case = SetCase("lpm", sets(*lines), ("-m set --match-set s src -j DROP",), (), family=V6)
    want = {"2001:db8:a::1": "ACCEPT",  # /127 nomatch
            "2001:db8:a::4": "DROP",  # /120
            "2001:db8:a::100": "ACCEPT",  # /96 nomatch
            "2001:db8:a:1::1": "DROP",  # /48
            "2001:db8:b::1": "ACCEPT",  # /32 nomatch
            "2001:db9::1": "DROP",  # /16
            "fd42:1::8": "ACCEPT"}
    with _checker(case, "nf") as chk:
        got = {a: chk.run(udp(V6, src=a).frame(SRC_MAC, HOST_MAC)).verdict for a in want}
    assert got == want


def test_set_rules_in_user_chains_and_tc() -> None:
    """Sets looked up from a user chain subprogram (the key buffer is the caller's stack)."""
    require_kernel()
    text = ("*filter\n:INPUT ACCEPT [0:0]\n:c - [0:0]\n-A INPUT -p udp -j c\n"
            "-A c -m set --match-set s src,dst -j DROP\nCOMMIT\n")
    rs = parse(text, family=V4, sets=parse_sets(sets("create s hash:ip,port",
                                                     f"add s {SRC[V4]},udp:53")))
    for hook in ("nf", "tc"):
        with Checker(rs, hook=hook, iif="eth0") as chk:
            assert chk.run(udp().frame(SRC_MAC, HOST_MAC)).rule == 1
            assert chk.run(udp(dport=5).frame(SRC_MAC, HOST_MAC)).verdict == "ACCEPT"
            assert chk.run(tcp(dport=53).frame(SRC_MAC, HOST_MAC)).verdict == "ACCEPT"
            assert chk.run(icmp().frame(SRC_MAC, HOST_MAC)).verdict == "ACCEPT"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["hash:ip", "hash:net"])
def test_big_set_loads_fast_and_costs_the_same(kind: str, capsys) -> None:
    """A 100,000-member set loads in a few seconds; a packet costs what it costs with one."""
    require_kernel()
    timings = {}
    for n in (1, 1000, 100_000):
        lines = [f"create s {kind} maxelem {max(n, 1)}"]
        lines += [f"add s 10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"
                  + ("/32" if kind == "hash:net" and i % 2 else "") for i in range(n)]
        text = "\n".join(lines) + "\n"
        t0 = time.perf_counter()
        rs = parse("*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -m set --match-set s src -j DROP\n"
                   "COMMIT\n", family=Family.IPV4, sets=parse_sets(text))
        with Checker(rs) as chk:
            load = time.perf_counter() - t0
            frame = udp(src="192.0.2.1").frame(SRC_MAC, HOST_MAC)
            ns = min(chk.prog.run(frame, ctx=chk._ctx(), data_out_size=0, repeat=100_000)
                     .duration_ns for _ in range(3))
            hit = udp(src="10.0.0.0").frame(SRC_MAC, HOST_MAC)
            assert chk.run(hit).verdict == "DROP"
        timings[n] = (load, ns)
    with capsys.disabled():
        print(f"\n{kind}: " + ", ".join(f"{n:,} members: load {t:.2f} s, {ns} ns/packet"
                                       for n, (t, ns) in timings.items()))
    assert timings[100_000][0] < 10
    assert timings[100_000][1] < 3 * max(timings[1][1], 50)
