"""Hypothesis strategies: random rulesets over every match in scope, and packets aimed at them.

Values come from small pools (the receiver's addresses and neighbours, a dozen ports, a few ICMP
types, lengths and TTLs) so that packets hit rules; packet fields are drawn from the values of a
rule picked at random, from their neighbours (± 1) or from anywhere. Probabilities are written
so that shrinking goes towards fewer matches, no negation and the aimed value.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

from bpfilter.ir.model import ACCEPT, DROP, RETURN, Family

from .addresses import MULTICASTS, RX_ADDRS, RX_IFNAME, SOURCES
from .rules import RulesetSpec, RuleSpec

# -- value pools ----------------------------------------------------------------------------

NEARBY = {
    Family.IPV4: ("192.0.2.0", "192.0.2.1", "192.0.2.128", "198.51.100.128", "203.0.113.0",
                  "10.0.0.0", "0.0.0.0", "198.51.100.200"),
    Family.IPV6: ("2001:db8:a::", "2001:db8:a::1", "2001:db8:b::8000", "2001:db8::", "fd42:1::",
                  "::", "2001:db8:a:1::1", "fe80::"),
}
PREFIXES = {Family.IPV4: (0, 1, 8, 16, 23, 24, 25, 30, 31, 32),
            Family.IPV6: (0, 16, 32, 48, 63, 64, 65, 112, 127, 128)}
MASKS = {Family.IPV4: ("255.255.255.0", "255.255.0.255", "255.0.255.0", "0.0.0.255",
                       "255.255.255.254", "255.255.255.255", "128.0.0.0", "0.0.0.0"),
         Family.IPV6: ("ffff:ffff:ffff:ffff::", "ffff::ffff", "::ffff", "ffff:ffff:0:ffff::",
                       "ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe")}
IFACES = (RX_IFNAME, "bfrx+", "bf+", "+", "bfrx", "bfrx00", "bfrx1", "lo", f"{RX_IFNAME}+",
          "eth0", "b+", "bfrx0123456789a", "bfrx1+")
PORTS = (0, 1, 22, 53, 80, 443, 1023, 1024, 8080, 40000, 65535)
# Service names (/etc/services) iptables resolves for each protocol.
SERVICES = {"tcp": {22: "ssh", 53: "domain", 80: "http", 443: "https", 8080: "http-alt"},
            "udp": {53: "domain", 443: "https"}}
TCP_FLAG_NAMES = ("FIN", "SYN", "RST", "PSH", "ACK", "URG")
TCP_OPTION_KINDS = (1, 2, 3, 4, 5, 8, 30, 254, 255)
ICMP_TYPES = (0, 3, 5, 8, 11, 12, 13, 255)
ICMP_NAMES = {"any": (255, None), "echo-request": (8, None), "echo-reply": (0, None),
              "destination-unreachable": (3, None), "port-unreachable": (3, 3),
              "host-unreachable": (3, 1), "time-exceeded": (11, None),
              "ttl-zero-during-transit": (11, 0), "parameter-problem": (12, None),
              "redirect": (5, None), "timestamp-request": (13, None)}
ICMP6_TYPES = (1, 2, 3, 4, 128, 129, 133, 134, 135, 136, 255)
ICMP6_NAMES = {"echo-request": (128, None), "echo-reply": (129, None),
               "destination-unreachable": (1, None), "no-route": (1, 0),
               "packet-too-big": (2, None), "time-exceeded": (3, None),
               "parameter-problem": (4, None), "neighbour-solicitation": (135, None),
               "router-advertisement": (134, None)}
ICMP_CODES = (0, 1, 3, 4, 255)
LENGTHS = (0, 20, 28, 40, 48, 52, 60, 64, 84, 100, 576, 65535)
TTLS = (0, 1, 2, 63, 64, 65, 127, 128, 254, 255)
MARKS = (0, 1, 0x10, 0xFFFFFFFF)
MARK_MASKS = (None, 0xFF, 0xFFFFFFFF, 0, 1)
PKTTYPES = {"unicast": "host", "host": "host", "broadcast": "bcast", "multicast": "mcast",
            "otherhost": None}
PROTOS = {Family.IPV4: ("tcp", "udp", "icmp", "all", "6", "17", "1", "47", "132", "0"),
          Family.IPV6: ("tcp", "udp", "ipv6-icmp", "icmpv6", "all", "6", "17", "58", "59", "47",
                        "44", "60", "51")}
PROTO_NUMBERS = {"tcp": 6, "udp": 17, "icmp": 1, "ipv6-icmp": 58, "icmpv6": 58, "all": 0}

# Match kinds this module generates, and the registry names that mean the compiler has them.
KINDS = {
    "src": ("src",), "dst": ("dst",), "iif": ("iif",), "proto": ("proto",), "frag": ("frag",),
    "tcp": ("tcp",), "udp": ("udp",), "icmp": ("icmp",), "icmp6": ("icmp6", "icmpv6"),
    "multiport": ("multiport",), "iprange": ("iprange",), "comment": ("comment",),
    "length": ("length",), "ttl": ("ttl",), "hl": ("hl",), "pkttype": ("pkttype",),
    "mark": ("mark",),
}
V4_ONLY, V6_ONLY = {"frag", "icmp", "ttl"}, {"icmp6", "hl"}


def available_kinds(family: Family) -> frozenset[str]:
    """The generated match kinds the compiler's match table has, for `family`."""
    from bpfilter.matches import REGISTRY

    out = {k for k, names in KINDS.items() if any(n in REGISTRY.matches for n in names)}
    out -= V6_ONLY if family is Family.IPV4 else V4_ONLY
    return frozenset(out)


# -- helpers --------------------------------------------------------------------------------


def chance(draw: Callable, percent: int) -> bool:
    """True with probability `percent`; shrinks to False."""
    return draw(st.integers(0, 99)) >= 100 - percent


def _neg(draw: Callable, percent: int = 30) -> tuple[str, ...]:
    return ("!",) if chance(draw, percent) else ()


@dataclass(frozen=True)
class Part:
    """Option words of one match, the kind it needs and aimed packet values."""

    args: tuple[str, ...]
    needs: str
    aim: tuple[tuple[str, Any], ...] = ()


def _addr_text(draw: Callable, fam: Family, base: str) -> str:
    form = draw(st.integers(0, 3))
    if form == 0:
        return base
    if form == 3:
        return f"{base}/{draw(st.sampled_from(MASKS[fam]))}"
    return f"{base}/{draw(st.sampled_from(PREFIXES[fam]))}"


def _port_range(draw: Callable, proto: str) -> tuple[str, int]:
    lo = draw(st.sampled_from(PORTS))
    form = draw(st.integers(0, 3))
    if form == 0:
        name = SERVICES[proto].get(lo)
        return (name if name and chance(draw, 30) else str(lo)), lo
    if form == 1:
        hi = draw(st.sampled_from([p for p in PORTS if p >= lo]))
        return f"{lo}:{hi}", lo if chance(draw, 50) else hi
    if form == 2:
        return f":{lo}", lo
    return f"{lo}:", lo


def _flags_text(draw: Callable, value: int) -> str:
    if value == 0x3F and chance(draw, 50):
        return "ALL"
    if value == 0:
        return "NONE"
    names = [n for i, n in enumerate(TCP_FLAG_NAMES) if value & (1 << i)]
    return ",".join(draw(st.permutations(names)))


# -- matches --------------------------------------------------------------------------------


@st.composite
def addr_part(draw: Callable, fam: Family, flag: str) -> Part:
    """-s / -d with a prefix, a dotted mask or none, maybe negated."""
    pool = RX_ADDRS[fam] + MULTICASTS[fam] if flag == "-d" else SOURCES[fam]
    base = draw(st.sampled_from(pool + NEARBY[fam]))
    key = "src" if flag == "-s" else "dst"
    return Part((*_neg(draw), flag, _addr_text(draw, fam, base)), key, ((key, base),))


@st.composite
def iface_part(draw: Callable) -> Part:
    """-i with exact names, prefixes and wildcards."""
    return Part((*_neg(draw), "-i", draw(st.sampled_from(IFACES))), "iif")


@st.composite
def proto_part(draw: Callable, fam: Family) -> Part:
    """-p by name or number, `all`, maybe negated."""
    p = draw(st.sampled_from(PROTOS[fam]))
    num = PROTO_NUMBERS.get(p, int(p) if p.isdigit() else 0)
    neg = _neg(draw) if num else ()
    return Part((*neg, "-p", p), "proto", (("proto", num),) if num else ())


@st.composite
def tcp_part(draw: Callable) -> Part:
    """-p tcp and the tcp match: ports, flags or --syn, --tcp-option."""
    args: list[str] = ["-p", draw(st.sampled_from(["tcp", "6"]))]
    explicit = chance(draw, 60)
    opts: list[str] = []
    aim: list[tuple[str, Any]] = [("proto", 6)]
    for key, flag in (("sport", "--sport"), ("dport", "--dport")):
        if chance(draw, 40):
            text, port = _port_range(draw, "tcp")
            opts += [*_neg(draw), flag, text]
            aim.append((key, port))
    if chance(draw, 15):
        opts += [*_neg(draw), "--syn"]
        aim.append(("flags", 0x02))
    elif chance(draw, 30):
        mask = draw(st.integers(0, 0x3F))
        comp = draw(st.integers(0, 0x3F)) & (mask if chance(draw, 85) else 0x3F)
        opts += [*_neg(draw), "--tcp-flags", _flags_text(draw, mask), _flags_text(draw, comp)]
        aim.append(("flags", comp))
    if chance(draw, 20):
        kind = draw(st.sampled_from(TCP_OPTION_KINDS))
        opts += [*_neg(draw), "--tcp-option", str(kind)]
        aim.append(("tcpopt", kind))
    if explicit or not opts:
        args += ["-m", "tcp"]
    return Part((*args, *opts), "tcp", tuple(aim))


@st.composite
def udp_part(draw: Callable) -> Part:
    """-p udp and the udp match's ports."""
    args: list[str] = ["-p", draw(st.sampled_from(["udp", "17"]))]
    opts: list[str] = []
    aim: list[tuple[str, Any]] = [("proto", 17)]
    for key, flag in (("sport", "--sport"), ("dport", "--dport")):
        if chance(draw, 50):
            text, port = _port_range(draw, "udp")
            opts += [*_neg(draw), flag, text]
            aim.append((key, port))
    if chance(draw, 60) or not opts:
        args += ["-m", "udp"]
    return Part((*args, *opts), "udp", tuple(aim))


@st.composite
def icmp_part(draw: Callable, fam: Family) -> Part:
    """-p icmp -m icmp --icmp-type, or the icmp6 match: names, types, type/code."""
    v4 = fam is Family.IPV4
    names, types = (ICMP_NAMES, ICMP_TYPES) if v4 else (ICMP6_NAMES, ICMP6_TYPES)
    proto = draw(st.sampled_from(["icmp", "1"] if v4 else ["ipv6-icmp", "icmpv6", "58"]))
    form = draw(st.integers(0, 2))
    if form == 0:
        name = draw(st.sampled_from(sorted(names)))
        text, (t, c) = name, names[name]
    elif form == 1:
        t, c = draw(st.sampled_from(types)), None
        text = str(t)
    else:
        t, c = draw(st.sampled_from(types)), draw(st.sampled_from(ICMP_CODES))
        text = f"{t}/{c}"
    flag = "--icmp-type" if v4 else "--icmpv6-type"
    module = "icmp" if v4 else "icmp6"
    aim = (("proto", 1 if v4 else 58), ("icmp", (t, c if c is not None else 0)))
    return Part(("-p", proto, "-m", module, *_neg(draw), flag, text), module, aim)


@st.composite
def multiport_part(draw: Callable) -> Part:
    """-m multiport --sports/--dports/--ports with single ports and ranges (15 slots)."""
    proto = draw(st.sampled_from(["tcp", "udp"]))
    which = draw(st.sampled_from(["--dports", "--sports", "--ports"]))
    items: list[str] = []
    aim: list[tuple[str, Any]] = [("proto", 6 if proto == "tcp" else 17)]
    slots = 0
    for _ in range(draw(st.integers(1, 6))):
        lo = draw(st.sampled_from(PORTS))
        if lo < PORTS[-1] and chance(draw, 30):
            # multiport wants lo < hi, where tcp/udp take lo <= hi.
            hi = draw(st.sampled_from([p for p in PORTS if p > lo]))
            items.append(f"{lo}:{hi}")
            slots += 2
        else:
            items.append(str(lo))
            slots += 1
        key = {"--dports": "dport", "--sports": "sport"}.get(which, "dport")
        aim.append((key, lo))
        if slots >= 13:
            break
    return Part(("-p", proto, "-m", "multiport", *_neg(draw), which, ",".join(items)),
                "multiport", tuple(aim))


@st.composite
def iprange_part(draw: Callable, fam: Family) -> Part:
    """-m iprange --src-range / --dst-range (usually ordered, sometimes reversed)."""
    words: list[str] = ["-m", "iprange"]
    aim: list[tuple[str, Any]] = []
    for key, flag, pool in (("src", "--src-range", SOURCES[fam] + NEARBY[fam]),
                            ("dst", "--dst-range", RX_ADDRS[fam] + NEARBY[fam])):
        if (len(words) == 2 and key == "dst") or chance(draw, 50):
            a, b = draw(st.sampled_from(pool)), draw(st.sampled_from(pool))
            lo, hi = sorted((a, b), key=lambda x: int(ipaddress.ip_address(x)))
            if chance(draw, 10):
                lo, hi = hi, lo
            words += [*_neg(draw), flag, f"{lo}-{hi}"]
            aim += [(key, lo), (key, hi)]
    return Part(tuple(words), "iprange", tuple(aim))


@st.composite
def length_part(draw: Callable) -> Part:
    """-m length --length N or a range."""
    lo = draw(st.sampled_from(LENGTHS))
    form = draw(st.integers(0, 2))
    hi = draw(st.sampled_from([x for x in LENGTHS if x >= lo]))
    text = str(lo) if form == 0 else f"{lo}:{hi}"
    if form == 2:
        text = f":{lo}" if chance(draw, 50) else f"{lo}:"
    return Part(("-m", "length", *_neg(draw), "--length", text), "length", (("length", lo),))


@st.composite
def ttl_part(draw: Callable, fam: Family) -> Part:
    """-m ttl (IPv4) or -m hl (IPv6): eq (maybe negated), gt, lt."""
    module = "ttl" if fam is Family.IPV4 else "hl"
    op = draw(st.sampled_from(["eq", "gt", "lt"]))
    n = draw(st.sampled_from(TTLS))
    neg = _neg(draw) if op == "eq" else ()
    return Part(("-m", module, *neg, f"--{module}-{op}", str(n)), module, (("ttl", n),))


@st.composite
def pkttype_part(draw: Callable) -> Part:
    """-m pkttype --pkt-type."""
    name = draw(st.sampled_from(sorted(PKTTYPES)))
    aim = (("mac", PKTTYPES[name]),) if PKTTYPES[name] else ()
    return Part(("-m", "pkttype", *_neg(draw), "--pkt-type", name), "pkttype", aim)


@st.composite
def mark_part(draw: Callable) -> Part:
    """-m mark --mark value[/mask] (packets carry mark 0 on both sides)."""
    value, mask = draw(st.sampled_from(MARKS)), draw(st.sampled_from(MARK_MASKS))
    text = f"{value:#x}" if mask is None else f"{value:#x}/{mask:#x}"
    return Part(("-m", "mark", *_neg(draw), "--mark", text), "mark")


@st.composite
def comment_part(draw: Callable) -> Part:
    """-m comment (no effect on matching)."""
    text = draw(st.sampled_from(["c1", '"two words"', "x-y_z"]))
    return Part(("-m", "comment", "--comment", text), "comment")


# -- rules and rulesets ---------------------------------------------------------------------


@st.composite
def rule_spec(draw: Callable, fam: Family, kinds: frozenset[str],
              targets: tuple[str, ...]) -> RuleSpec:
    """A rule: an optional transport match (with its -p), independent matches, a target."""
    l4 = [k for k in ("tcp", "udp", "icmp", "icmp6", "multiport") if k in kinds]
    parts: list[Part] = []
    if l4 and chance(draw, 45):
        k = draw(st.sampled_from(l4))
        strat = {"tcp": tcp_part(), "udp": udp_part(), "icmp": icmp_part(fam),
                 "icmp6": icmp_part(fam), "multiport": multiport_part()}[k]
        parts.append(draw(strat))
    elif "proto" in kinds and chance(draw, 25):
        parts.append(draw(proto_part(fam)))
    optional: list[tuple[str, int, Any]] = [
        ("src", 20, addr_part(fam, "-s")), ("dst", 20, addr_part(fam, "-d")),
        ("iif", 12, iface_part()), ("frag", 10, None), ("iprange", 8, iprange_part(fam)),
        ("length", 10, length_part()), ("ttl", 8, ttl_part(fam)), ("hl", 8, ttl_part(fam)),
        ("pkttype", 8, pkttype_part()), ("mark", 5, mark_part()), ("comment", 5, comment_part()),
    ]
    for kind, pct, strat in optional:
        if kind in kinds and chance(draw, pct):
            parts.append(Part((*_neg(draw), "-f"), "frag") if kind == "frag" else draw(strat))
    # Built-in options first (any order), then the modules in drawn order.
    builtin = [p for p in parts if p.needs in ("src", "dst", "iif", "frag", "proto")]
    modules = [p for p in parts if p not in builtin]
    builtin = draw(st.permutations(builtin)) if builtin else []
    args = tuple(w for p in [*builtin, *modules] for w in p.args)
    target = draw(st.sampled_from((None, *targets))) if chance(draw, 90) else None
    goto = target not in (None, ACCEPT, DROP, RETURN) and chance(draw, 30)
    return RuleSpec(args, target, goto, frozenset(p.needs for p in parts),
                    tuple(a for p in parts for a in p.aim))


@st.composite
def ruleset_spec(draw: Callable, fam: Family, kinds: frozenset[str], *, table: str = "filter",
                 chain: str = "INPUT") -> RulesetSpec:
    """A table: the built-in chain with a policy and 0-4 user chains, 1-40 rules in all.

    Jumps only go to chains declared later, so there are no loops.
    """
    n_user = draw(st.integers(0, 4))
    names = [chain] + [f"c{i}" for i in range(1, n_user + 1)]
    chains = []
    for i, name in enumerate(names):
        targets = (ACCEPT, DROP, RETURN, *names[i + 1 :])
        lo = 1 if i == 0 else 0
        rules = draw(st.lists(rule_spec(fam, kinds, targets), min_size=lo,
                              max_size=15 if i == 0 else 6))
        chains.append((name, tuple(rules)))
    policy = draw(st.sampled_from([ACCEPT, DROP]))
    return RulesetSpec(fam, table, chain, policy, tuple(chains))
