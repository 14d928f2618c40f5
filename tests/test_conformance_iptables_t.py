"""The iptables project's own rule tests (`extensions/*.t`) as a parse corpus.

Each `RULE;EXPECTED;RESULT` line is parsed as `iptables -A CHAIN RULE` in every chain the file
lists: an OK line must parse and print back exactly as iptables-save prints it (`=`: RULE
itself), a FAIL line must raise ParseError. The files are read from ../shared at run time.
Variant lines (`;LEGACY` / `;NFT`) are taken as iptables-legacy reads them. libxt_* files run
as IPv4, as the original suite runs them.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import pytest

from bpfilter.frontends.iptables import ParseError, parse_rule_args, rule_text
from bpfilter.frontends.iptables.lexer import tokenize
from bpfilter.ir.model import Family

T_DIR = Path(__file__).resolve().parents[1] / ".." / "shared" / "conformance" / "iptables-t"

# Extensions implemented by the front-end: every line of these files must pass.
SUPPORTED = {
    "iptables.t", "libipt_standard.t", "libip6t_standard.t", "libxt_standard.t",
    "libxt_tcp.t", "libxt_udp.t", "libipt_icmp.t", "libip6t_icmp6.t", "libxt_multiport.t",
    "libipt_iprange.t", "libip6t_iprange.t", "libxt_iprange.t", "libxt_comment.t",
    "libxt_length.t", "libipt_ttl.t", "libip6t_hl.t", "libxt_pkttype.t", "libxt_mac.t",
    "libxt_mark.t", "libxt_MARK.t", "libxt_addrtype.t", "libipt_REJECT.t", "libip6t_REJECT.t",
    # Its lines name sets that do not exist (the parser is given none): both must fail.
    "libxt_set.t",
    # Parsed and printed; the compiler refuses them by name (Unsupported).
    "libxt_conntrack.t", "libipt_conntrack.t", "libip6t_conntrack.t", "libxt_state.t",
    "libxt_limit.t", "libxt_hashlimit.t", "libxt_recent.t", "libipt_recent.t",
    "libip6t_recent.t", "libxt_connlimit.t", "libipt_connlimit.t", "libip6t_connlimit.t",
    "libxt_connmark.t", "libxt_helper.t", "libxt_owner.t", "libxt_physdev.t",
    "libxt_rpfilter.t", "libxt_statistic.t", "libxt_nfacct.t", "libxt_quota.t",
    "libxt_cpu.t", "libip6t_rt.t", "libxt_sctp.t", "libxt_esp.t", "libipt_ah.t",
    "libip6t_ah.t", "libxt_tcpmss.t", "libxt_dscp.t", "libxt_tos.t",
    "libipt_LOG.t", "libip6t_LOG.t", "libxt_NFLOG.t", "libxt_CONNMARK.t", "libxt_CT.t",
    "libxt_NOTRACK.t", "libxt_TRACE.t", "libxt_TCPMSS.t", "libxt_CHECKSUM.t",
    "libxt_NFQUEUE.t", "libipt_MASQUERADE.t", "libip6t_MASQUERADE.t", "libipt_SNAT.t",
    "libip6t_SNAT.t", "libipt_DNAT.t", "libip6t_DNAT.t", "libxt_REDIRECT.t", "libipt_TTL.t",
    "libip6t_HL.t", "libxt_TOS.t", "libxt_DSCP.t", "libxt_CLASSIFY.t", "libxt_AUDIT.t",
}

_NOT_IMPL = "not implemented: no ruleset of the corpus uses it; refused by name"
# Extensions the front-end refuses by name, with the reason.
SKIPPED_BY_DESIGN = {
    "libip6t_DNPT.t": "IPv6 prefix translation target: " + _NOT_IMPL,
    "libip6t_SNPT.t": "IPv6 prefix translation target: " + _NOT_IMPL,
    "libip6t_NETMAP.t": "stateless NAT target: " + _NOT_IMPL,
    "libipt_NETMAP.t": "stateless NAT target: " + _NOT_IMPL,
    "libip6t_TEE.t": "packet duplication target: " + _NOT_IMPL,
    "libipt_TEE.t": "packet duplication target: " + _NOT_IMPL,
    "libxt_TEE.t": "packet duplication target: " + _NOT_IMPL,
    "libip6t_TPROXY.t": "transparent proxy target (needs sockets): " + _NOT_IMPL,
    "libipt_TPROXY.t": "transparent proxy target (needs sockets): " + _NOT_IMPL,
    "libip6t_dst.t": "IPv6 extension header match: " + _NOT_IMPL,
    "libip6t_hbh.t": "IPv6 extension header match: " + _NOT_IMPL,
    "libip6t_frag.t": "IPv6 extension header match: " + _NOT_IMPL,
    "libip6t_ipv6header.t": "IPv6 extension header match: " + _NOT_IMPL,
    "libip6t_mh.t": "mobility header match: " + _NOT_IMPL,
    "libip6t_srh.t": "segment routing header match: " + _NOT_IMPL,
    "libip6t_eui64.t": "EUI-64 address match: " + _NOT_IMPL,
    "libip6t_ipvs.t": "IPVS state lives outside netfilter's tables: " + _NOT_IMPL,
    "libipt_ipvs.t": "IPVS state lives outside netfilter's tables: " + _NOT_IMPL,
    "libxt_ipvs.t": "IPVS state lives outside netfilter's tables: " + _NOT_IMPL,
    "libip6t_policy.t": "IPsec policy match: " + _NOT_IMPL,
    "libipt_policy.t": "IPsec policy match: " + _NOT_IMPL,
    "libxt_policy.t": "IPsec policy match: " + _NOT_IMPL,
    "libipt_ECN.t": "ECN rewriting target: " + _NOT_IMPL,
    "libxt_ecn.t": "ECN match: " + _NOT_IMPL,
    "libipt_osf.t": "passive OS fingerprinting (needs a kernel database): " + _NOT_IMPL,
    "libipt_realm.t": "routing realm match: " + _NOT_IMPL,
    "libxt_bpf.t": "BPF bytecode match: " + _NOT_IMPL,
    "libxt_cgroup.t": "cgroup match (needs sockets): " + _NOT_IMPL,
    "libxt_cluster.t": "cluster match: " + _NOT_IMPL,
    "libxt_connbytes.t": "connection byte counters: " + _NOT_IMPL,
    "libxt_connlabel.t": "connection labels (need a kernel label table): " + _NOT_IMPL,
    "libxt_dccp.t": "DCCP match: " + _NOT_IMPL,
    "libxt_ipcomp.t": "IPComp match: " + _NOT_IMPL,
    "libxt_rateest.t": "rate estimator match (needs RATEEST objects): " + _NOT_IMPL,
    "libxt_RATEEST.t": "rate estimator target: " + _NOT_IMPL,
    "libxt_socket.t": "socket lookup match: " + _NOT_IMPL,
    "libxt_string.t": "payload string search: " + _NOT_IMPL,
    "libxt_time.t": "time-of-day match: " + _NOT_IMPL,
    "libxt_u32.t": "u32 expression match: " + _NOT_IMPL,
    "libxt_CONNSECMARK.t": "SELinux security marks: " + _NOT_IMPL,
    "libxt_SECMARK.t": "SELinux security marks: " + _NOT_IMPL,
    "libxt_HMARK.t": "hash mark target: " + _NOT_IMPL,
    "libxt_IDLETIMER.t": "idle timer target: " + _NOT_IMPL,
    "libxt_LED.t": "LED trigger target: " + _NOT_IMPL,
    "libxt_SYNPROXY.t": "SYN proxy target: " + _NOT_IMPL,
    "libxt_TCPOPTSTRIP.t": "TCP option stripping target: " + _NOT_IMPL,
    "libxt_SET.t": "ipset target (needs kernel ipset objects; the file has only FAIL lines "
                   "about a missing set): " + _NOT_IMPL,
}

# Lines of supported files whose outcome depends on kernel state a parser cannot know.
ALLOWED = {
    ("libxt_nfacct.t", "-m nfacct --nfacct-name wrong"):
        "FAIL only because no accounting object 'wrong' exists in the kernel",
}


@dataclass(frozen=True)
class Case:
    """One test line of a .t file."""

    lineno: int
    table: str
    chains: tuple[str, ...]
    rule: str
    expected: str
    result: str


def read_cases(path: Path) -> list[Case]:
    """The test lines of `path` with the table and chains in force (`@`/`%` lines skipped)."""
    table, chains = "filter", ()
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line[0] in "#@%":
            continue
        if line[0] == ":":
            chains = tuple(line[1:].strip().split(","))
            continue
        if line[0] == "*":
            table = line[1:].strip()
            continue
        item = line.split(";")
        result = item[2].strip()
        if len(item) > 3 and item[3].strip() != "LEGACY":
            # A line scoped to the nft variant: legacy gets the alternate or opposite result.
            alt = item[4].strip() if len(item) > 4 else None
            result = alt or {"OK": "FAIL", "FAIL": "OK", "NOMATCH": "OK"}[result]
        expected = item[0] if item[1] == "=" else item[1]
        out.append(Case(n, table, chains, item[0], expected, result))
    return out


def family_of(name: str) -> Family:
    """ip6tables for libip6t_ files, iptables for the others (as iptables-test.py does)."""
    return Family.IPV6 if name.startswith("libip6t_") else Family.IPV4


def run_case(name: str, case: Case) -> str | None:
    """None when the line behaves as expected, else what went wrong."""
    fam = family_of(name)
    args = [t.text for t in tokenize(case.rule)]
    for chain in case.chains:
        try:
            rules = parse_rule_args(args, family=fam, table=case.table, chain=chain)
        except ParseError as e:
            if case.result == "FAIL":
                continue
            return f"line {case.lineno} [{chain}] refused: {case.rule!r}: {e.message}"
        got = " ".join(rule_text(r, family=fam, table=case.table, chain=chain) for r in rules)
        if case.result == "FAIL":
            return f"line {case.lineno} [{chain}] should be refused: {case.rule!r} -> {got!r}"
        if case.result == "OK" and got != case.expected:
            return f"line {case.lineno} [{chain}] printed {got!r}, expected {case.expected!r}"
    return None


def _t_files() -> list[str]:
    if not T_DIR.is_dir():
        return []
    return sorted(p.name for p in T_DIR.glob("*.t") if not p.name.startswith(("libarpt_",
                                                                                "libebt_")))


needs_corpus = pytest.mark.skipif(not T_DIR.is_dir(),
                                  reason=f"iptables .t corpus not found at {T_DIR}")


@needs_corpus
def test_every_file_is_classified() -> None:
    """No .t file is silently ignored: each is supported or skipped with a reason."""
    files = set(_t_files())
    assert not SUPPORTED & set(SKIPPED_BY_DESIGN)
    assert files - SUPPORTED - set(SKIPPED_BY_DESIGN) == set()
    assert files >= SUPPORTED


@needs_corpus
@pytest.mark.parametrize("name", sorted(SUPPORTED))
def test_supported_extension(name: str) -> None:
    """Every line of a supported extension's file passes (or is allowed, with a reason)."""
    cases = read_cases(T_DIR / name)
    assert cases
    failures = []
    for case in cases:
        if (name, case.rule) in ALLOWED:
            continue
        problem = run_case(name, case)
        if problem:
            failures.append(problem)
    assert not failures, f"{name}: {len(failures)}/{len(cases)} lines fail:\n" + "\n".join(
        failures)


@needs_corpus
@pytest.mark.parametrize("name", sorted(SKIPPED_BY_DESIGN))
def test_unsupported_extension_is_refused_by_name(name: str) -> None:
    """Lines using an unsupported extension are refused with an error naming it."""
    ext = name.split("_", 1)[1].removesuffix(".t")
    fam = family_of(name)
    checked = 0
    for case in read_cases(T_DIR / name):
        args = [t.text for t in tokenize(case.rule)]
        if not any(a in ("-m", "-j") and b.lower() == ext.lower()
                   for a, b in pairwise(args)):
            continue
        with pytest.raises(ParseError) as info:
            parse_rule_args(args, family=fam, table=case.table, chain=case.chains[0])
        assert f"'{ext}'".lower() in info.value.message.lower(), info.value.message
        checked += 1
    assert checked, f"{name}: no line uses -m/-j {ext}"
