"""-m limit: a token bucket per rule, shared by all CPUs, run in the kernel."""

from __future__ import annotations

import time

import pytest
from helpers.kernel import require_kernel
from helpers.packets import udp

from bpfilter.frontends.iptables.parser import parse
from bpfilter.ir.model import Family
from bpfilter.runtime.checker import Checker

RULES = """\
*filter
:INPUT DROP [0:0]
-A INPUT -p udp --dport 1 -m limit --limit {rate} --limit-burst {burst} -j ACCEPT
-A INPUT -p udp --dport 2 -m limit --limit 1/hour --limit-burst 2 -j ACCEPT
COMMIT
"""


@pytest.fixture(autouse=True)
def _kernel() -> None:
    require_kernel()


def _pkt(port: int) -> bytes:
    return udp("192.0.2.1", "192.0.2.2", dport=port)


def test_burst_then_the_documented_rate():
    # A slow rate keeps the test true on a loaded machine: the process may stall for up to a
    # burst's worth of tokens (400 ms) without changing the count.
    rs = parse(RULES.format(rate="10/second", burst=4), family=Family.IPV4)
    with Checker(rs) as c:
        assert [c.run(_pkt(1)).verdict for _ in range(6)] == ["ACCEPT"] * 4 + ["DROP"] * 2
        start = time.monotonic()
        accepted = 0
        while time.monotonic() - start < 1.0:
            accepted += c.run(_pkt(1)).verdict == "ACCEPT"
            time.sleep(0.005)
        elapsed = time.monotonic() - start
        # One token every 100 ms since the bucket ran dry (give or take one at each end).
        assert abs(accepted - elapsed * 10) <= 2, (accepted, elapsed)


def test_each_rule_has_its_own_bucket():
    rs = parse(RULES.format(rate="1/hour", burst=1), family=Family.IPV4)
    with Checker(rs) as c:
        assert [c.run(_pkt(1)).verdict for _ in range(2)] == ["ACCEPT", "DROP"]
        assert [c.run(_pkt(2)).verdict for _ in range(3)] == ["ACCEPT", "ACCEPT", "DROP"]
        got = c.run(_pkt(2))
        assert (got.verdict, got.rule) == ("DROP", None)  # the policy, not the limit rule
