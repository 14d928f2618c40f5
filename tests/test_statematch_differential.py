"""hashlimit and recent against the kernel: the same rules under legacy iptables (xt_hashlimit,
xt_recent) in the receiver namespace of the differential topology and in pybpfilter, fed the
same packet sequence. Netfilter must give the verdicts tests/oracle/state_cases.py states, and
pybpfilter must agree with it on verdict, counters and deciding rule for every packet."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from oracle.compare import Differential
from oracle.netfilter import PLACEMENTS, NetfilterOracle, oracle_session
from oracle.rules import spec_from_text
from oracle.state_cases import CASES, StateCase

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="module")
def oracle() -> Iterator[NetfilterOracle]:
    """Legacy iptables in a fresh sender -> receiver topology."""
    yield from oracle_session()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_state_tables_agree_with_netfilter(oracle: NetfilterOracle, case: StateCase) -> None:
    """The kernel gives the stated verdicts; pybpfilter agrees with it packet by packet."""
    text = case.text()
    spec = spec_from_text(text, case.family, case.chain)
    # The kernel's verdicts first, on a table of its own: the comparison below loads the
    # ruleset again, and the kernel keeps a named table while a rule names it, so it runs on
    # renamed tables.
    oracle.load(text, case.family, PLACEMENTS[spec.table])
    for pkt, want in case.packets:
        ob = oracle.observe(pkt.frame(oracle.tx_mac, oracle.rx_mac), case.family)
        assert ob.reached, f"the receiver dropped {pkt.describe()} before the hook"
        assert ob.verdict == want, f"netfilter says {ob.verdict} for {pkt.describe()}"
    renamed = _renamed(text)
    Differential(oracle).run_text(renamed, spec_from_text(renamed, case.family, case.chain),
                                  [p for p, _ in case.packets])


def _renamed(text: str) -> str:
    """The ruleset with every hashlimit and recent table under a new name."""
    out = []
    for line in text.splitlines():
        words = line.split()
        for i, w in enumerate(words[:-1]):
            if w in ("--name", "--hashlimit-name"):
                words[i + 1] += "b"
        out.append(" ".join(words))
    return "\n".join(out) + "\n"
