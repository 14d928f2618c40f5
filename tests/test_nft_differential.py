"""nftables rulesets against the kernel's nftables, on real traffic (rig: tests/oracle/ctrig.py).

Two receivers get the same frames. In one the ruleset is loaded with `nft -f` (the kernel's
nf_tables is the oracle); the JSON `nft -j list ruleset` prints there is what pybpfilter
translates and loads on the netfilter hook of the other. Each frame must get the same verdict,
and each nft rule's `counter` must move exactly as the pybpfilter rules that count it (one
rule, or one per element of an anonymous set it expands). Connections are real (the receivers'
stacks answer), so `ct state` is conntrack's own.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from oracle.addresses import RX_IFNAME
from oracle.ctcompare import EPHEMERAL, relocate
from oracle.ctflows import Flow, Scenario, Step
from oracle.ctpeer import LocalHost, Peer
from oracle.ctrig import LOCALS, PEERS, SIDES, CtRig
from oracle.netfilter import other
from oracle.twin import private_bpffs, require_twin_tools

from bpfilter.frontends.iptables.parser import parse as ipt_parse
from bpfilter.frontends.iptables.saver import save
from bpfilter.frontends.nftables import NftParseError, parse
from bpfilter.ir.model import Counters, Family, Ruleset, jump_target

pytestmark = [pytest.mark.kernel]
V4, V6 = Family.IPV4, Family.IPV6
BASE = {"input": "INPUT", "forward": "FORWARD", "output": "OUTPUT"}


def debian_style(p4: tuple[str, ...], p6: tuple[str, ...]) -> str:
    """Debian's /etc/nftables.conf with a typical host firewall filled in; every rule counts."""
    return f"""
table inet filter {{
    chain input {{
        type filter hook input priority filter; policy drop;
        ct state established,related counter accept
        ct state invalid counter drop
        iif lo counter accept
        tcp dport {{ 22, 80 }} counter accept
        icmp type {{ echo-request, destination-unreachable }} counter accept
        icmpv6 type {{ echo-request, nd-neighbor-solicit, nd-neighbor-advert }} counter accept
        udp dport 53 ip saddr {{ {p4[0]}, {p4[1]} }} counter accept
        udp dport 53 ip6 saddr {{ {p6[0]}, {p6[1]} }} counter accept
        udp dport 7001 counter jump screen
        tcp dport 23 log prefix "telnet " counter drop
        counter log prefix "nft-drop: " drop
    }}
    chain screen {{
        ip saddr {p4[2]} counter return
        ip6 saddr {p6[2]} counter return
        counter accept
    }}
    chain forward {{
        type filter hook forward priority filter; policy drop;
    }}
    chain output {{
        type filter hook output priority filter; policy accept;
    }}
}}
"""


class NftRig(CtRig):
    """CtRig whose netfilter receiver runs an nftables ruleset instead of iptables."""

    def counters(self, side: str, fam: Family) -> dict:
        """pybpfilter's filter counters; nft's are read per rule handle (`nft_counters`)."""
        return {} if side == "netfilter" else super().counters(side, fam)

    def nft(self, *args: str, stdin: str | None = None) -> str:
        """Run nft in the netfilter receiver's namespace (never the caller's)."""
        ns = self.receivers["netfilter"].ns
        r = subprocess.run(["ip", "netns", "exec", ns, "nft", *args], input=stdin,
                           capture_output=True, text=True)
        if r.returncode:
            raise AssertionError(f"nft {' '.join(args)}: {r.stderr}")
        return r.stdout

    def load_nft(self, text: str, family: Family) -> dict[Family, Ruleset]:
        """Load nft text in the netfilter receiver, its JSON listing in pybpfilter."""
        self.nft("flush", "ruleset")
        self.nft("-f", "-", stdin=text)
        listing = self.nft("-j", "list", "ruleset")
        rulesets = parse(listing, filename="nft -j list ruleset")
        self.runtime.restore(rulesets[other(family)], text=save(rulesets[other(family)]))
        self.load_bpf(rulesets[family], save(rulesets[family]), family)
        return rulesets

    def nft_counters(self) -> dict[int, Counters]:
        """Each rule's counter statement, by rule handle."""
        out = {}
        for item in json.loads(self.nft("-j", "list", "ruleset"))["nftables"]:
            rule = item.get("rule")
            if rule is None:
                continue
            for e in rule["expr"]:
                if "counter" in e:
                    out[rule["handle"]] = Counters(e["counter"]["packets"],
                                                   e["counter"]["bytes"])
        return out


def counting_rules(rs: Ruleset) -> dict[int, list[tuple[str, int]]]:
    """nft rule handle → the pybpfilter (chain, rule) counters that count its packets: the
    rules in the nft rule's own chain (helper chains hold what happens after matching)."""
    out: dict[int, list[tuple[str, int]]] = {}
    chains = rs.tables["filter"].chains
    for name, chain in chains.items():
        for n, r in enumerate(chain.rules, 1):
            words = r.origin.text.split()  # "inet filter input handle 7"
            if BASE.get(words[2], words[2]) != name:
                continue
            dest = jump_target(r)
            if not r.matches and dest is not None and dest.startswith(f"{name}.") and all(
                    x.target.kind in ("GOTO", "RETURN") for x in chains[dest].rules):
                # A selector chain: its rules count the nft rule (first element that matches).
                out.setdefault(int(words[-1]), []).extend(
                    (dest, i) for i in range(1, len(chains[dest].rules) + 1))
            else:
                out.setdefault(int(words[-1]), []).append((name, n))
    return out


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NftRig]:
    """The sender and both receivers, with a private bpffs for pybpfilter."""
    require_twin_tools()
    with private_bpffs(tmp_path_factory, "nftbpffs") as root, NftRig(root) as r:
        yield r


def T(flow: int, flags: str, **kw) -> Step:
    """A TCP segment from the peer."""
    return Step("tcp", flow, flags, **kw)


E = EPHEMERAL


def scenario(fam: Family) -> Scenario:
    """Flows and steps that meet every rule of `debian_style` (in `fam`)."""
    p, lo = PEERS[fam], LOCALS[fam][0]
    flows = (
        Flow("tcp", p[0], lo, E, 22),  # 0: handshake to a listener
        Flow("udp", p[0], lo, E + 1, 5353),  # 1: dropped by the last rule (logged)
        Flow("icmp", p[0], lo, E + 2, E + 2),  # 2: echo
        Flow("tcp", p[0], lo, E + 3, 23),  # 3: telnet, logged and dropped
        Flow("tcp", p[0], lo, 4000, E + 4, outgoing=True),  # 4: the receiver connects out
        Flow("udp", p[1], lo, E + 5, 53),  # 5: DNS from an allowed peer
        Flow("udp", p[2], lo, E + 6, 53),  # 6: DNS from another peer
        Flow("tcp", p[0], lo, E + 7, 80),  # 7: a SYN-ACK out of nowhere: invalid
        Flow("udp", p[1], lo, E + 8, 7001),  # 8: screened, accepted
        Flow("udp", p[2], lo, E + 9, 7001),  # 9: screened, returns, dropped
    )
    steps = (T(0, "S"), T(0, "A"), T(0, "PA", size=5), Step("udp", 1), Step("echo", 2),
             T(3, "S"), Step("connect", 4), T(4, "SA"), Step("udp", 5), Step("udp", 6),
             T(7, "SA"), Step("udp", 8), Step("udp", 9), Step("udp", 1), T(0, "FA"))
    return Scenario(fam, flows, steps)


def play(rig: NftRig, rulesets: dict[Family, Ruleset], sc: Scenario) -> list[str]:
    """Play `sc`; every peer frame must get nft's verdict and move the same counters."""
    fam = sc.family
    counting = counting_rules(rulesets[fam])
    rig.flush_conntrack()
    for rx in rig.receivers.values():
        rx.captured()
    peers = {side: Peer(sc) for side in SIDES}
    hosts = {side: LocalHost(rig.receivers[side].ns, sc) for side in SIDES}
    verdicts = []
    try:
        for h in hosts.values():
            h.open()
        for n, step in enumerate(sc.steps, 1):
            what = f"step {n} ({step.describe(sc.flows)})"
            if not step.is_peer:
                for side in SIDES:
                    assert hosts[side].do(step) == "ok", what
                for side in SIDES:
                    peers[side].absorb(rig.receivers[side].captured())
                continue
            nft_before, ours_before = rig.nft_counters(), rig.counters("pybpfilter", fam)
            views = {side: rig.observe(side, peers[side].frame(step)) for side in SIDES}
            for side in SIDES:
                peers[side].absorb(rig.receivers[side].captured())
            nf, ours = views["netfilter"], views["pybpfilter"]
            assert nf.reached and ours.reached, what
            assert nf.verdict == ours.verdict, f"{what}: nft {nf.verdict}, pybpfilter " \
                f"{ours.verdict}\n{save(rulesets[fam])}"
            verdicts.append(nf.verdict)
            nft_after, ours_after = rig.nft_counters(), rig.counters("pybpfilter", fam)
            for handle, keys in counting.items():
                if handle not in nft_after:
                    continue  # a rule without a counter statement (a verdict map's elements)
                theirs = nft_after[handle].packets - nft_before[handle].packets
                mine = sum(ours_after[k].packets - ours_before[k].packets for k in keys)
                assert theirs == mine, f"{what}: rule handle {handle}: nft counted {theirs}, " \
                    f"pybpfilter {mine} ({keys})\n{save(rulesets[fam])}"
    finally:
        for h in hosts.values():
            h.close()
    return verdicts


@pytest.mark.parametrize("fam", [V4, V6], ids=["ipv4", "ipv6"])
def test_debian_style_ruleset_matches_nftables(rig: NftRig, fam: Family):
    rulesets = rig.load_nft(debian_style(PEERS[V4], PEERS[V6]), fam)
    verdicts = play(rig, rulesets, relocate(scenario(fam), 64 if fam is V4 else 128))
    # The scenario reaches both verdicts, through the policy's log rule too.
    assert "ACCEPT" in verdicts and "DROP" in verdicts
    counting = counting_rules(rulesets[fam])
    last = max(h for h, keys in counting.items() if keys[0][0] == "INPUT")
    assert rig.nft_counters()[last].packets >= 2  # the final `log prefix "nft-drop: " drop`


SPLIT_RULES = f"""
table inet t {{
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname {{ "{RX_IFNAME[:3]}*", "{RX_IFNAME}" }} udp dport 7100 counter log prefix "wild "
        udp dport 7101 limit rate 2/second burst 3 packets counter accept
        udp dport 7101 counter drop
        udp dport 7102-7104 counter jump logret
        tcp flags & (syn | ack) == syn tcp dport 9000 counter log prefix "syn9000 " drop
        meta l4proto udp udp dport != {{ 53, 7100-7110 }} counter goto gochain
    }}
    chain logret {{
        udp dport 7103 log prefix "ret " counter return
        udp dport 7104 counter drop
        counter
    }}
    chain gochain {{
        udp dport 9999 counter accept
        counter log prefix "go " drop
    }}
}}
"""


def split_scenario(fam: Family) -> Scenario:
    """Frames for `SPLIT_RULES`: each rule that needs helper chains, and the limit."""
    p, lo = PEERS[fam], LOCALS[fam][0]
    ports = (7100, 7101, 7102, 7103, 7104, 9999, 9998)
    flows = tuple(Flow("udp", p[0], lo, E + i, port) for i, port in enumerate(ports))
    flows += (Flow("tcp", p[0], lo, E + 20, 9000),)
    udp = {port: i for i, port in enumerate(ports)}
    steps = (Step("udp", udp[7100]), *(Step("udp", udp[7101]) for _ in range(6)),
             Step("udp", udp[7102]), Step("udp", udp[7103]), Step("udp", udp[7104]),
             Step("udp", udp[9999]), Step("udp", udp[9998]), T(len(ports), "S"),
             T(len(ports), "SA"))
    return Scenario(fam, flows, steps)


@pytest.mark.parametrize("fam", [V4, V6], ids=["ipv4", "ipv6"])
def test_rules_split_into_helper_chains_match_nftables(rig: NftRig, fam: Family):
    rulesets = rig.load_nft(SPLIT_RULES, fam)
    verdicts = play(rig, rulesets, relocate(split_scenario(fam), 192 if fam is V4 else 256))
    # The limit lets its burst (3) through, then drops, as nft's does (per-frame equality is
    # checked in play; this checks the limit was exercised).
    assert verdicts[1:4] == ["ACCEPT"] * 3 and "DROP" in verdicts[4:7], verdicts
    assert verdicts.count("DROP") >= 4, verdicts


SET_RULES = """
table inet t {
    set bl4 { type ipv4_addr; flags interval;
              elements = { 192.0.2.4-192.0.2.6, 198.51.100.128/25, 203.0.113.9 } }
    set bl6 { type ipv6_addr; flags interval;
              elements = { 2001:db8:a::4-2001:db8:a::6, 2001:db8:b::8000/113, 2001:db8:c::9 } }
    set ports { type inet_service; flags interval; elements = { 7200, 7210-7212 } }
    set svc4 { type ipv4_addr . inet_service; elements = { 192.0.2.1 . 7220, 192.0.2.4 . 7221 } }
    set svc6 { type ipv6_addr . inet_service;
               elements = { 2001:db8:a::1 . 7220, 2001:db8:a::4 . 7221 } }
    chain input {
        type filter hook input priority filter; policy accept;
        ip saddr . udp dport @svc4 counter accept
        ip6 saddr . udp dport @svc6 counter accept
        udp dport 7220-7221 counter drop
        ip saddr @bl4 udp dport 7230 counter drop
        ip6 saddr @bl6 udp dport 7230 counter drop
        ip saddr != @bl4 udp dport 7231 counter drop
        ip6 saddr != @bl6 udp dport 7231 counter drop
        udp dport @ports counter drop
        udp dport vmap { 7260 : accept, 7261 : drop, 7262 : jump vchain, 7263-7265 : drop }
        udp dport 7266-7270 counter udp dport vmap { 7266 : drop, 7267 : jump vchain }
        udp dport 7280-7290 udp dport vmap { 7280 : drop, * : accept }
        meta l4proto vmap { tcp : jump tcpchain }
    }
    chain vchain {
        udp dport 7262 counter drop
        counter
    }
    chain tcpchain {
        tcp dport != @ports tcp dport 7240 counter drop
    }
}
"""


def set_scenario(fam: Family) -> Scenario:
    """Frames for `SET_RULES`: members and non-members of each named set, each vmap element."""
    p, lo = PEERS[fam], LOCALS[fam][0]
    udp = ((0, 7220), (1, 7220), (1, 7221), (0, 7221), (1, 7230), (2, 7230), (0, 7230),
           (0, 7231), (1, 7231), (0, 7200), (0, 7211), (0, 7201), (0, 7260), (0, 7261),
           (0, 7262), (0, 7264), (0, 7266), (0, 7267), (0, 7268), (0, 7280), (0, 7281))
    flows = tuple(Flow("udp", p[peer], lo, E + i, port) for i, (peer, port) in enumerate(udp))
    flows += (Flow("tcp", p[0], lo, E + 40, 7240), Flow("tcp", p[0], lo, E + 41, 7241))
    steps = (*(Step("udp", i) for i in range(len(udp))), T(len(udp), "S"), T(len(udp) + 1, "S"))
    return Scenario(fam, flows, steps)


@pytest.mark.parametrize("fam", [V4, V6], ids=["ipv4", "ipv6"])
def test_named_sets_and_verdict_maps_match_nftables(rig: NftRig, fam: Family):
    rulesets = rig.load_nft(SET_RULES, fam)
    assert {n: s.definition.type.name for n, s in rulesets[fam].sets.items()} == {
        f"bl{fam.value[-1]}": "hash:net", "ports": "bitmap:port",
        f"svc{fam.value[-1]}": "hash:ip,port"}
    verdicts = play(rig, rulesets, relocate(set_scenario(fam), 320 if fam is V4 else 384))
    assert verdicts == ["ACCEPT", "DROP", "ACCEPT", "DROP", "DROP", "DROP", "ACCEPT", "DROP",
                        "ACCEPT", "DROP", "DROP", "ACCEPT", "ACCEPT", "DROP", "DROP", "DROP",
                        "DROP", "ACCEPT", "ACCEPT", "DROP", "ACCEPT", "DROP", "ACCEPT"], verdicts


SHELL_DUMPS = Path(__file__).resolve().parents[1] / ".." / "shared" / "conformance" / \
    "nftables-shell" / "dumps"


@pytest.mark.skipif(not SHELL_DUMPS.is_dir(), reason=f"nftables shell-test dumps not found at "
                    f"{SHELL_DUMPS} (../shared/conformance/nftables-shell/dumps)")
def test_shell_dumps_listed_by_nft_load_or_are_refused_by_name(netns: str):
    """Each dump nft accepts, as `nft -j list ruleset` prints it, loads or is refused by name."""
    def nft(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", netns, "nft", *args], capture_output=True,
                              text=True)

    counts = {"loaded": 0, "refused": 0, "nft refused": 0}
    for path in sorted(SHELL_DUMPS.glob("*/*.nft")):
        nft("flush", "ruleset")
        if nft("-f", str(path)).returncode:
            counts["nft refused"] += 1  # needs devices or modules this namespace lacks
            continue
        listing = nft("-j", "list", "ruleset").stdout
        try:
            rulesets = parse(listing, filename=str(path))
        except NftParseError as e:
            assert e.file == str(path) and e.token and e.location, str(e)
            counts["refused"] += 1
            continue
        counts["loaded"] += 1
        for rs in rulesets.values():  # what the runtime stores and save/list re-read
            assert ipt_parse(save(rs), family=rs.family, sets=rs.sets) == rs, path
    nft("flush", "ruleset")
    assert counts["loaded"] + counts["refused"] > 100, counts
