"""The stateful corpus of test_differential_conntrack.py with pybpfilter on tc ingress and XDP.

Legacy iptables runs the probe ruleset in filter INPUT of one receiver; pybpfilter runs it on
the other receiver's interface, before the kernel's conntrack has seen the frame (see
bpfilter/compiler/hooks/ctlookup.py). Every frame must get the same verdict, counters on every
rule and deciding rule, except in the cases listed in RESIDUAL: what the lookup cannot know
(README, "Connection tracking"), each expected to disagree (a strict xfail, so a case that
starts agreeing is noticed).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from oracle.compare import parse_ruleset
from oracle.ctcompare import StatefulDifferential
from oracle.ctrig import CtRig
from oracle.rules import spec_from_text
from oracle.twin import private_bpffs, require_twin_tools
from test_differential_conntrack import (
    CASES,
    CtCase,
    Probe,
    _scenario,
    check_expired_entries,
    probe_rules,
)

from bpfilter.bpf.link import Link
from bpfilter.ir.model import Family

pytestmark = [pytest.mark.kernel]

RESIDUAL = {
    "tcp-out-of-window-and-out-of-order": "TCP window tracking (INVALID segments)",
    "tcp-own-connection-reset-by-peer": "TCP window tracking (a SYN-ACK acking unsent data)",
    "tcp-dnat-to-local-listener": "NAT of the first packet happens after tc ingress and XDP",
    "udp-own-request-and-replies": "checksums are not verified (conntrack: INVALID)",
    "udp-closed-port-and-notrack": "raw-table NOTRACK is not seen",
    "udp-tftp-expectation-is-related": "helper expectations are not looked up",
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


@pytest.mark.parametrize("fam", [Family.IPV4, Family.IPV6], ids=["ipv4", "ipv6"])
def test_expired_entries_before_conntrack(hook_rig: CtRig, fam: Family) -> None:
    """With one-second timeouts, tc ingress / XDP see entries expire as netfilter does (the
    kfuncs' lookup, and the ICMP query entries' timeout read by ctquery)."""
    check_expired_entries(hook_rig, fam)


PLAIN = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"


def test_recorder_follows_the_rulesets(hook_rig: CtRig) -> None:
    """The ICMP query recorder is attached at tcx egress while a family's ruleset reads
    conntrack, swapped in place by a restore, and detached when no family needs it."""
    d = hook_rig.runtime.dir
    link, pins = os.path.join(d, "link_ctquery"), {
        fam: os.path.join(d, f"ctquery_{fam.value}") for fam in Family}

    def plain(fam: Family) -> None:
        hook_rig.runtime.restore(parse_ruleset(PLAIN, fam), text=PLAIN)

    hook_rig.load(probe_rules(Family.IPV4), Family.IPV4)
    with Link.open_pinned(link) as ln:
        first = ln.describe().prog_id
    hook_rig.load(probe_rules(Family.IPV6), Family.IPV6)
    assert all(os.path.exists(p) for p in pins.values())
    with Link.open_pinned(link) as ln:
        assert ln.describe().prog_id != first  # replaced with the ruleset
    plain(Family.IPV4)
    assert os.path.exists(pins[Family.IPV6]) and not os.path.exists(pins[Family.IPV4])
    assert os.path.exists(link)
    plain(Family.IPV6)
    assert not os.path.exists(link) and not any(os.path.exists(p) for p in pins.values())
    hook_rig.load(probe_rules(Family.IPV4), Family.IPV4)
    assert os.path.exists(link)
