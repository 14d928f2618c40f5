"""Differential tests: random rulesets and packets, judged by the kernel's netfilter and by us.

Each example draws a ruleset (1-40 rules over a built-in chain and 0-4 user chains, every match
kind the compiler has) and packets aimed at its rules; the ruleset is loaded with legacy
iptables-restore in a test namespace and compiled by pybpfilter, every packet goes through both,
and verdict, counters and deciding rule must agree (see tests/oracle/).

Environment: BPFILTER_DIFF_EXAMPLES rulesets per test (default 150; 4-16 packets each),
BPFILTER_DIFF_SEED to replay a run (the seed is printed on failure), BPFILTER_DIFF_SHRINK
seconds spent shrinking a failure (default 60; every example costs a ruleset load).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from hypothesis.internal.conjecture import engine as hyp_engine
from oracle.compare import Differential
from oracle.netfilter import NetfilterOracle, oracle_session
from oracle.packet_strategies import packet_spec
from oracle.strategies import available_kinds, ruleset_spec

from bpfilter.ir.model import Family

pytest.importorskip("bpfilter.frontends.iptables.parser",
                    reason="the iptables front-end (bpfilter.frontends.iptables) is not there")

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

EXAMPLES = int(os.environ.get("BPFILTER_DIFF_EXAMPLES", "150"))
SEED = int(os.environ.get("BPFILTER_DIFF_SEED") or random.randrange(1 << 32))
SHRINK_SECONDS = int(os.environ.get("BPFILTER_DIFF_SHRINK", "60"))
MAX_EXCLUDED = 0.05  # packets the stack drops before the hook: a generator problem beyond this

# (family, table, built-in chain, fragments): IPv4 fragments only reach raw PREROUTING.
PLACES = [
    pytest.param(Family.IPV4, "filter", "INPUT", False, id="ipv4-filter-INPUT"),
    pytest.param(Family.IPV4, "raw", "PREROUTING", True, id="ipv4-raw-PREROUTING-fragments"),
    pytest.param(Family.IPV6, "filter", "INPUT", True, id="ipv6-filter-INPUT"),
]


@pytest.fixture(scope="module")
def oracle() -> Iterator[NetfilterOracle]:
    """Netfilter in a fresh sender -> receiver topology, shared by this module's tests."""
    yield from oracle_session(())


@pytest.mark.parametrize(("family", "table", "chain", "fragments"), PLACES)
def test_netfilter_agrees(oracle: NetfilterOracle, family: Family, table: str, chain: str,
                          fragments: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Random rulesets and packets: same verdict, counters and deciding rule as netfilter."""
    kinds = available_kinds(family)
    diff = Differential(oracle, seed=SEED)
    print(f"seed {SEED} (BPFILTER_DIFF_SEED), match kinds {sorted(kinds)}")
    # Every example costs a ruleset load: shrink for a while, not hypothesis' five minutes
    # (its engine documents this constant as the one to patch).
    monkeypatch.setattr(hyp_engine, "MAX_SHRINKING_SECONDS", SHRINK_SECONDS)

    @seed(SEED)
    @settings(max_examples=EXAMPLES, deadline=None, database=None, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        spec = data.draw(ruleset_spec(family, kinds, table=table, chain=chain), label="ruleset")
        packets = data.draw(st.lists(packet_spec(spec, fragments=fragments), min_size=4,
                                     max_size=16), label="packets")
        diff.run(spec, packets)

    check()
    s = diff.stats
    spent = ", ".join(f"{k} {v:.1f}s" for k, v in s.seconds.items())
    print(f"compared {s.packets} packets over {s.rulesets} rulesets: {s.verdicts}, "
          f"{s.hotdrops} hotdrops, {s.excluded} excluded {s.excluded_examples}; {spent}")
    assert s.excluded <= MAX_EXCLUDED * (s.packets + s.excluded), \
        f"too many packets never reached the hook: {s.excluded_examples}"
