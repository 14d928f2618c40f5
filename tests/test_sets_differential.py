"""Sets against the kernel: the same ipset definitions and `-m set` rules in the kernel's ipset
and legacy iptables (inside the receiver namespace: sets are per namespace) and in pybpfilter.

For every case of tests/oracle/set_cases.py, netfilter must give the verdict the case states
(so the cases describe the kernel, not our reading of it), and pybpfilter must agree with
netfilter on verdict, counters and deciding rule for every packet.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from oracle.compare import Differential
from oracle.netfilter import PLACEMENTS, NetfilterOracle, oracle_session
from oracle.rules import spec_from_text
from oracle.set_cases import CASES, SetCase

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="module")
def oracle() -> Iterator[NetfilterOracle]:
    """Netfilter and ipset in a fresh sender -> receiver topology."""
    yield from oracle_session(("ipset",))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_sets_agree_with_netfilter(oracle: NetfilterOracle, case: SetCase) -> None:
    """The kernel gives the stated verdicts; pybpfilter agrees with it on everything."""
    text = case.text()
    spec = spec_from_text(text, case.family, case.chain)
    oracle.load_sets(case.sets)
    oracle.load(text, case.family, PLACEMENTS[spec.table])
    for pkt, want in case.packets:
        ob = oracle.observe(pkt.frame(oracle.tx_mac, oracle.rx_mac), case.family)
        assert ob.reached, f"the receiver dropped {pkt.describe()} before the hook"
        assert ob.verdict == want, f"netfilter says {ob.verdict} for {pkt.describe()}"
    Differential(oracle).run_text(text, spec, [p for p, _ in case.packets], sets_text=case.sets)
