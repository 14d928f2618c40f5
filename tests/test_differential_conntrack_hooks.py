"""The stateful corpus of test_differential_conntrack.py with pybpfilter on tc ingress and XDP.

Legacy iptables runs the probe ruleset in filter INPUT of one receiver; pybpfilter runs it on
the other receiver's interface, before the kernel's conntrack has seen the frame (see
bpfilter/compiler/hooks/ctlookup.py). Every frame must get the same verdict, counters on every
rule and deciding rule, except in the cases listed in RESIDUAL: what the lookup cannot know
(README, "Connection tracking"), each expected to disagree (a strict xfail, so a case that
starts agreeing is noticed).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from oracle.ctcompare import StatefulDifferential
from oracle.ctrig import CtRig
from oracle.rules import spec_from_text
from oracle.twin import private_bpffs, require_twin_tools
from test_differential_conntrack import CASES, CtCase, Probe, _scenario, probe_rules

from bpfilter.ir.model import Family

pytestmark = [pytest.mark.kernel]

RESIDUAL = {
    "tcp-out-of-window-and-out-of-order": "TCP window tracking (INVALID segments)",
    "tcp-own-connection-reset-by-peer": "TCP window tracking (a SYN-ACK acking unsent data)",
    "tcp-dnat-to-local-listener": "NAT of the first packet happens after tc ingress and XDP",
    "udp-own-request-and-replies": "checksums are not verified (conntrack: INVALID)",
    "udp-closed-port-and-notrack": "raw-table NOTRACK is not seen",
    "udp-tftp-expectation-is-related": "helper expectations are not looked up",
    "icmp-echo-in": "ICMP queries cannot be looked up (the kfuncs take TCP and UDP only)",
}


@pytest.fixture(scope="module", params=["tc", "xdp"])
def hook_rig(request: pytest.FixtureRequest,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[CtRig]:
    """The sender and both receivers, pybpfilter on the receiver's interface."""
    require_twin_tools()
    with private_bpffs(tmp_path_factory, "ctbpffs") as root, CtRig(root, hook=request.param) as r:
        yield r


@pytest.fixture(scope="module", params=[Family.IPV4, Family.IPV6], ids=["ipv4", "ipv6"])
def hook_probe(request: pytest.FixtureRequest, hook_rig: CtRig) -> Probe:
    """The probe ruleset loaded for one family."""
    fam = request.param
    text = probe_rules(fam)
    hook_rig.load(text, fam)
    return Probe(fam, text, spec_from_text(text, fam), StatefulDifferential(hook_rig))


def _marked(case: CtCase):
    why = RESIDUAL.get(case.name)
    marks = [pytest.mark.xfail(reason=why, strict=True)] if why else []
    return pytest.param(case, id=case.name, marks=marks)


@pytest.mark.parametrize("case", [_marked(c) for c in CASES])
def test_corpus_before_conntrack(hook_probe: Probe, case: CtCase) -> None:
    """pybpfilter on tc ingress / XDP agrees with iptables INPUT on every frame."""
    hook_probe.run(_scenario(case, hook_probe.family))
