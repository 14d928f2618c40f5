"""-m hashlimit and -m recent in the kernel (BPF_PROG_TEST_RUN): per-packet verdicts of packet
sequences on every hook (the verdicts are netfilter's: tests/test_statematch_differential.py
checks them against xt_hashlimit and xt_recent), timing, expiry and what is refused by name."""

from __future__ import annotations

import time

import pytest
from helpers.kernel import require_kernel
from oracle.state_cases import CASES, S1, S2, StateCase, u

from bpfilter.compiler.validate import CompileError
from bpfilter.frontends.iptables import parse
from bpfilter.ir.model import Family
from bpfilter.matches.registry import MatchError
from bpfilter.runtime.checker import Checker

pytestmark = pytest.mark.kernel
SRC_MAC, HOST_MAC = "02:00:00:00:00:01", "00:00:00:00:00:00"


def _checker(text: str, family: Family = Family.IPV4, hook: str = "nf",
             chain: str = "INPUT") -> Checker:
    return Checker(parse(text, family=family), chain=chain, hook=hook, iif="eth0")


def _rules(*rules: str, chain: str = "INPUT") -> str:
    body = "".join(f"-A {chain} {r}\n" for r in rules)
    return f"*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n{body}COMMIT\n"


@pytest.mark.parametrize(("case", "hook"), [pytest.param(c, h, id=f"{c.name}-{h}")
                                            for c in CASES for h in ("nf", "tc", "xdp")])
def test_state_case(case: StateCase, hook: str) -> None:
    """Each packet of the sequence gets netfilter's verdict."""
    require_kernel()
    with _checker(case.text(), case.family, hook) as chk:
        got = [(p.describe(), chk.run(p.frame(SRC_MAC, HOST_MAC)).verdict)
               for p, _ in case.packets]
    assert got == [(p.describe(), want) for p, want in case.packets]


def _verdicts(chk: Checker, src: str, n: int, dport: int = 53) -> list[str]:
    return [chk.run(u(src, dport).frame(SRC_MAC, HOST_MAC)).verdict for _ in range(n)]


def test_hashlimit_burst_then_rate_per_source() -> None:
    """Each source gets its own burst, then one packet per interval."""
    require_kernel()
    text = _rules("-p udp -m hashlimit --hashlimit-upto 20/sec --hashlimit-burst 2 "
                  "--hashlimit-mode srcip --hashlimit-name t1 -j DROP")
    with _checker(text) as chk:
        assert _verdicts(chk, S1, 4) == ["DROP", "DROP", "ACCEPT", "ACCEPT"]
        assert _verdicts(chk, S2, 3) == ["DROP", "DROP", "ACCEPT"]
        start = time.monotonic()
        limited = 0
        while time.monotonic() - start < 0.5:
            limited += chk.run(u(S1).frame(SRC_MAC, HOST_MAC)).verdict == "DROP"
            time.sleep(0.002)
        elapsed = time.monotonic() - start
        assert abs(limited - elapsed * 20) <= 2, (limited, elapsed)


def test_hashlimit_idle_bucket_expires() -> None:
    """A bucket idle for --hashlimit-htable-expire starts again with a full burst."""
    require_kernel()
    text = _rules("-p udp -m hashlimit --hashlimit-above 1/hour --hashlimit-burst 1 "
                  "--hashlimit-mode srcip --hashlimit-name t2 --hashlimit-htable-expire 150 "
                  "-j DROP")
    with _checker(text) as chk:
        assert _verdicts(chk, S1, 2) == ["ACCEPT", "DROP"]
        time.sleep(0.1)
        assert _verdicts(chk, S1, 1) == ["DROP"]  # seen: the expiry moved on
        time.sleep(0.2)
        assert _verdicts(chk, S1, 2) == ["ACCEPT", "DROP"]


def test_recent_seconds_window() -> None:
    """--seconds counts only the timestamps that recent."""
    require_kernel()
    text = _rules("-p udp --dport 1 -m recent --set --name t3",
                  "-p udp --dport 3 -m recent --rcheck --seconds 1 --hitcount 2 --name t3 "
                  "-j DROP")
    with _checker(text) as chk:
        assert _verdicts(chk, S1, 2, 1) == ["ACCEPT", "ACCEPT"]
        assert _verdicts(chk, S1, 1, 3) == ["DROP"]
        time.sleep(1.1)
        assert _verdicts(chk, S1, 1, 3) == ["ACCEPT"]
        assert _verdicts(chk, S1, 1, 1) == ["ACCEPT"]
        assert _verdicts(chk, S1, 1, 3) == ["ACCEPT"]  # one recent stamp of three
        assert _verdicts(chk, S1, 1, 1) == ["ACCEPT"]
        assert _verdicts(chk, S1, 1, 3) == ["DROP"]


def test_recent_list_shared_by_rules_and_keeps_32_stamps() -> None:
    """Stamps wrap around after 32 (the kernel's default for lists without hitcount)."""
    require_kernel()
    text = _rules("-p udp --dport 1 -m recent --set --name t4",
                  "-p udp --dport 3 -m recent --rcheck --hitcount 32 --name t4 -j DROP")
    with _checker(text) as chk:
        _verdicts(chk, S1, 31, 1)
        assert _verdicts(chk, S1, 1, 3) == ["ACCEPT"]
        _verdicts(chk, S1, 40, 1)  # wraps: still 32 remembered
        assert _verdicts(chk, S1, 1, 3) == ["DROP"]


@pytest.mark.parametrize(("rule", "why"), [
    ("-m recent --rcheck --seconds 5 --reap --name x", "--reap"),
    ("-m recent --rcheck --hitcount 300 --name x", "--hitcount above"),
    ("-m hashlimit --hashlimit-upto 1kb/s --hashlimit-burst 1000b --hashlimit-name x",
     "burst cannot be smaller than 1024b"),
    ("-m hashlimit --hashlimit-upto 1/sec --hashlimit-name x --hashlimit-rate-match",
     "rate-match"),
])
def test_refused_by_name(rule: str, why: str) -> None:
    """What is not done yet (or iptables refuses) is refused, naming the option."""
    require_kernel()
    with pytest.raises((CompileError, MatchError)) as e:
        _checker(_rules(rule))
    assert why in str(e.value)


def test_rttl_refused_where_the_kernel_adjusts_the_ttl() -> None:
    """--rttl on a list that FORWARD rules update: there the kernel stores TTL + 1."""
    require_kernel()
    text = ("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n"
            "-A FORWARD -m recent --set --name t5\n"
            "-A INPUT -m recent --rcheck --rttl --name t5 -j DROP\nCOMMIT\n")
    with pytest.raises(CompileError, match="--rttl and in FORWARD"):
        _checker(text)


@pytest.mark.parametrize("hook", ["nf", "tc"])
def test_lists_survive_restores_that_name_them(topology, bpffs, tmp_path, hook) -> None:
    """End to end: a restore naming a list keeps it (as the kernel keeps a named table), one
    that does not name it drops it."""
    from test_cli import _hook_args, bpfilter, delivered

    listed = tmp_path / "recent.v4"
    listed.write_text("*filter\n:INPUT ACCEPT [0:0]\n"
                      "-A INPUT -p udp --dport 7101 -m recent --rcheck --name e2e -j DROP\n"
                      "-A INPUT -p udp --dport 7100 -m recent --set --name e2e\nCOMMIT\n")
    other = tmp_path / "other.v4"
    other.write_text("*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -p udp --dport 7109 -j DROP\n"
                     "COMMIT\n")
    args = _hook_args(hook, topology)
    bpfilter("restore", *args, str(listed), bpffs=bpffs)
    assert delivered(topology, [7101]) == {7101: True}
    assert delivered(topology, [7100]) == {7100: True}
    assert delivered(topology, [7101]) == {7101: False}
    bpfilter("restore", *args, str(listed), bpffs=bpffs)
    assert delivered(topology, [7101]) == {7101: False}  # still listed
    bpfilter("restore", *args, str(other), bpffs=bpffs)
    bpfilter("restore", *args, str(listed), bpffs=bpffs)
    assert delivered(topology, [7101]) == {7101: True}  # a new, empty list
