"""The rulesets the benchmark loads: iptables-restore text per shape and size, nft equivalents.

Every shape yields the same rules for every system (iptables-legacy, iptables-nft and pybpfilter
read the same iptables-restore text; nft gets the same rules written natively, once as a linear
chain and once as one set lookup), plus two probe packets: one that matches no rule (every rule
is evaluated, then the policy drops it) and one decided by the last rule.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass

from packets import IPPROTO_TCP, IPPROTO_UDP, SRC_IP, Probe

HEADER = ["*filter", ":INPUT DROP [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
NFT_TABLE = "bench"
NFT_COUNTER = "final"


@dataclass
class Ruleset:
    """One shape at one size."""

    shape: str
    n: int
    text: str  # iptables-restore input
    miss: Probe  # matches no rule: the policy decides
    last: Probe  # decided by the last rule
    last_rule: tuple[str, int]  # (chain, 1-based rule) that must decide `last`
    # nft -f input, linear and with a set; None when the shape has no nft translation here.
    nft_linear: str | None = None
    nft_set: str | None = None


def _text(chains: dict[str, list[str]]) -> str:
    lines = list(HEADER)
    lines += [f":{c} - [0:0]" for c in chains if c != "INPUT"]
    for c, rules in chains.items():
        lines += [f"-A {c} {r}" for r in rules]
    return "\n".join([*lines, "COMMIT", ""])


def _nft(rules: list[str], sets: str = "") -> str:
    # A named counter on the final drop, so the packets that reached the verdict can be read
    # without listing every rule.
    body = "\n".join(f"    {r}" for r in rules)
    return (f"table ip {NFT_TABLE} {{\n  counter {NFT_COUNTER} {{ }}\n{sets}"
            f"  chain input {{\n    type filter hook input priority 0; policy drop;\n{body}\n"
            f"    counter name {NFT_COUNTER} drop\n  }}\n}}\n")


# -- exact 5-tuples: the shape of baseline.md ---------------------------------------------------


def exact_tuple(i: int) -> tuple[str, int]:
    """The (source, port) of rule i: 250 sources x as many ports as needed, all distinct."""
    return f"192.0.2.{1 + i % 250}", 1024 + i // 250


def exact(n: int) -> Ruleset:
    """N rules `-s 192.0.2.X/32 -p udp --dport P -j DROP`."""
    tuples = [exact_tuple(i) for i in range(n)]
    rules = [f"-s {s}/32 -p udp -m udp --dport {p} -j DROP" for s, p in tuples]
    elems = ",\n      ".join(f"{s} . {p}" for s, p in tuples)
    sets = (f"  set blk {{\n    type ipv4_addr . inet_service\n    size {max(n, 1) * 2}\n"
            f"    elements = {{ {elems} }}\n  }}\n")
    src, port = tuples[-1]
    return Ruleset(
        "exact", n, _text({"INPUT": rules}), Probe(SRC_IP, 9), Probe(src, port), ("INPUT", n),
        nft_linear=_nft([f"ip saddr {s} udp dport {p} drop" for s, p in tuples]),
        nft_set=_nft(["ip saddr . udp dport @blk drop"], sets))


# -- CIDR blocklist with mixed prefix lengths --------------------------------------------------

CIDR_BASE = int(ipaddress.IPv4Address("1.0.0.0"))
CIDR_BLOCK = 4096  # each rule owns one /20, so no two prefixes overlap


def cidr_prefix(i: int) -> tuple[str, int]:
    """Rule i's prefix: the start of its own /20, with a length from /20 to /32."""
    plen = 20 + (i * 7) % 13
    return str(ipaddress.IPv4Address(CIDR_BASE + i * CIDR_BLOCK)), plen


def cidr(n: int) -> Ruleset:
    """N rules `-s A/len -j DROP`, disjoint, prefix lengths mixed."""
    prefixes = [cidr_prefix(i) for i in range(n)]
    rules = [f"-s {a}/{p} -j DROP" for a, p in prefixes]
    elems = ",\n      ".join(f"{a}/{p}" for a, p in prefixes)
    sets = (f"  set blk {{\n    type ipv4_addr\n    flags interval\n"
            f"    elements = {{ {elems} }}\n  }}\n")
    return Ruleset(
        "cidr", n, _text({"INPUT": rules}), Probe(SRC_IP, 9), Probe(prefixes[-1][0], 9),
        ("INPUT", n),
        nft_linear=_nft([f"ip saddr {a}/{p} drop" for a, p in prefixes]),
        nft_set=_nft(["ip saddr @blk drop"], sets))


# -- port lists --------------------------------------------------------------------------------


def ports_rule(i: int) -> tuple[str, int, str, str]:
    """Rule i: (destination, first port, multiport list, target); ranges and lists mixed."""
    k, d = i % 4000, i // 4000
    base = 1024 + 16 * k
    dports = f"{base},{base + 2},{base + 4}:{base + 11}"
    return f"203.0.113.{d + 1}", base, dports, "ACCEPT" if i % 2 else "DROP"


def ports(n: int) -> Ruleset:
    """N rules `-d D -p tcp -m multiport --dports a,b,c:d -j ACCEPT|DROP`."""
    specs = [ports_rule(i) for i in range(n)]
    rules = [f"-d {d}/32 -p tcp -m multiport --dports {pl} -j {t}" for d, _, pl, t in specs]
    d, base, _, _ = specs[-1]
    return Ruleset("ports", n, _text({"INPUT": rules}), Probe(SRC_IP, 9, IPPROTO_TCP),
                   Probe(SRC_IP, base, IPPROTO_TCP, dst=d), ("INPUT", n))


# -- a realistic host firewall with user chains ------------------------------------------------

MIX_FIXED = [
    ("INPUT", "-i lo -j ACCEPT"),
    ("INPUT", "-p icmp -m icmp --icmp-type 8 -j ACCEPT"),
    ("INPUT", "-j blocklist"),
    ("INPUT", "-p tcp -m tcp --dport 22 -j ssh"),
    ("INPUT", "-p tcp -m multiport --dports 80,443 -m comment --comment web -j ACCEPT"),
    ("INPUT", "-j services"),
    ("ssh", "-s 192.0.2.0/24 -j ACCEPT"),
    ("ssh", "-j DROP"),
]


def mix(n: int) -> Ruleset:
    """A host firewall: loopback, ICMP, a CIDR blocklist chain, ssh and web, then a services
    chain of per-client UDP allows; 2/3 of the extra rules in the blocklist, 1/3 in services.
    Below 10 rules it is only the services allows (no user chain fits)."""
    if n < len(MIX_FIXED) + 2:
        tuples = [exact_tuple(i) for i in range(n)]
        rules = [f"-s {s}/32 -p udp -m udp --dport {p} -j ACCEPT" for s, p in tuples]
        s, p = tuples[-1]
        return Ruleset("mix", n, _text({"INPUT": rules}), Probe(SRC_IP, 9, IPPROTO_UDP),
                       Probe(s, p), ("INPUT", n))
    extra = n - len(MIX_FIXED)
    n_block = extra * 2 // 3
    n_serv = extra - n_block
    chains: dict[str, list[str]] = {"INPUT": [], "blocklist": [], "ssh": [], "services": []}
    for c, r in MIX_FIXED:
        chains[c].append(r)
    for i in range(n_block):
        a, plen = cidr_prefix(i)
        chains["blocklist"].append(f"-s {a}/{plen} -j DROP")
    tuples = [exact_tuple(i) for i in range(n_serv)]
    chains["services"] = [f"-s {s}/32 -p udp -m udp --dport {p} -j ACCEPT" for s, p in tuples]
    s, p = tuples[-1]
    return Ruleset("mix", n, _text(chains), Probe(SRC_IP, 9), Probe(s, p), ("services", n_serv))


SHAPES: dict[str, Callable[[int], Ruleset]] = {
    "exact": exact, "cidr": cidr, "ports": ports, "mix": mix,
}
SHAPE_TEXT = {
    "exact": "exact 5-tuples: -s 192.0.2.X/32 -p udp --dport P -j DROP",
    "cidr": "CIDR blocklist: -s A/len -j DROP, disjoint, /20../32 mixed",
    "ports": "port lists: -d D -p tcp -m multiport --dports a,b,c:d -j ACCEPT|DROP",
    "mix": "host firewall with user chains (blocklist 2/3, per-client UDP allows 1/3)",
}
PROTO_NAMES = {IPPROTO_UDP: "udp", IPPROTO_TCP: "tcp"}


def one_rule_changed(rs: Ruleset) -> str:
    """The same ruleset with its first rule's port (or address) changed: a one-rule update."""
    lines = rs.text.splitlines()
    for k, line in enumerate(lines):
        if line.startswith("-A INPUT "):
            if "--dport " in line:
                head, _, rest = line.partition("--dport ")
                port, _, tail = rest.partition(" ")
                lines[k] = f"{head}--dport {int(port) + 50000} {tail}"
            else:
                lines[k] = line.replace("-s ", "-s 100.64.0.1/32 -d ", 1)
            break
    return "\n".join(lines) + "\n"
