"""nftables match expressions → iptables options of the existing match entries.

Each `match` expression becomes a `Piece`: one or more alternative `Cond`s (an anonymous set
that no single iptables match covers gives several) plus the address family the expression
implies (in an `inet` table `ip saddr` only holds for IPv4). A Cond is iptables arguments and
the protocol (`-p`) it needs, so the rule is built by the iptables front-end's own option
parser and every match object is exactly the one `iptables-restore` would build.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from ...ir.model import Family
from ...matches.values import parse_proto, proto_name
from .errors import Unsupported

V4, V6 = Family.IPV4, Family.IPV6
MULTIPORT_SLOTS = 15  # XT_MULTI_PORTS: a range takes two

# nft's icmp_type / icmpv6_type symbols (the kernel's ICMP and ICMPv6 type numbers).
ICMP_TYPES = {
    "echo-reply": 0, "destination-unreachable": 3, "source-quench": 4, "redirect": 5,
    "echo-request": 8, "router-advertisement": 9, "router-solicitation": 10,
    "time-exceeded": 11, "parameter-problem": 12, "timestamp-request": 13,
    "timestamp-reply": 14, "info-request": 15, "info-reply": 16, "address-mask-request": 17,
    "address-mask-reply": 18}
ICMPV6_TYPES = {
    "destination-unreachable": 1, "packet-too-big": 2, "time-exceeded": 3,
    "parameter-problem": 4, "echo-request": 128, "echo-reply": 129, "mld-listener-query": 130,
    "mld-listener-report": 131, "mld-listener-done": 132, "mld-listener-reduction": 132,
    "nd-router-solicit": 133, "nd-router-advert": 134, "nd-neighbor-solicit": 135,
    "nd-neighbor-advert": 136, "nd-redirect": 137, "router-renumbering": 138,
    "ind-neighbor-solicit": 141, "ind-neighbor-advert": 142, "mld2-listener-report": 143}
# TCP flags xt_tcp can test (nft's ecn and cwr have no iptables name).
TCP_FLAGS = {"fin": "FIN", "syn": "SYN", "rst": "RST", "psh": "PSH", "ack": "ACK", "urg": "URG"}
CT_STATES = {"invalid": "INVALID", "established": "ESTABLISHED", "related": "RELATED",
             "new": "NEW", "untracked": "UNTRACKED"}
# ct status bits xt_conntrack tests with --ctstatus; snat/dnat are its virtual --ctstate bits.
CT_STATUS = {"expected": "EXPECTED", "seen-reply": "SEEN_REPLY", "assured": "ASSURED",
             "confirmed": "CONFIRMED"}
CT_NAT = {"snat": "SNAT", "dnat": "DNAT"}
PKTTYPES = {"host": "unicast", "unicast": "unicast", "broadcast": "broadcast",
            "multicast": "multicast"}
NFPROTO = {"ipv4": V4, "ipv6": V6}
POSITIVE, NEGATIVE = ("==", "in"), ("!=",)
ORDERED = ("<", ">", "<=", ">=")


@dataclass(frozen=True)
class Cond:
    """One conjunction of iptables options, and the `-p` protocol it needs (if any)."""

    args: tuple[str, ...] = ()
    proto: str | None = None
    proto_neg: bool = False


@dataclass(frozen=True)
class Piece:
    """What one expression stands for: any of `alts` (one Cond when no expansion is needed),
    restricted to `family` when the expression implies one."""

    alts: tuple[Cond, ...]
    family: Family | None = None
    # True when the Conds of `alts` may overlap (a packet can satisfy two of them).
    overlap: bool = False


def _one(args: tuple[str, ...] = (), proto: str | None = None, neg: bool = False,
         family: Family | None = None) -> Piece:
    return Piece((Cond(args, proto, neg),), family)


def _neg(op: str) -> tuple[str, ...]:
    return ("!",) if op in NEGATIVE else ()


def _check_op(op: str, allowed: tuple[str, ...], what: str) -> None:
    if op not in allowed:
        raise Unsupported(f"operator '{op}' on {what} is not supported", op)


def _elements(right: Any) -> list[Any] | None:
    """The elements of an anonymous set (None when `right` is not a set)."""
    if isinstance(right, dict) and "set" in right:
        elems = right["set"]
        elems = elems if isinstance(elems, list) else [elems]
        for e in elems:
            if isinstance(e, dict) and "elem" in e:
                raise Unsupported("set elements with options (timeout, counter, ...) are not "
                                  "supported", "elem")
        return elems
    return None


def _reject_named(right: Any) -> None:
    if isinstance(right, str) and right.startswith("@"):
        raise Unsupported(f"named set {right} is not supported (only anonymous sets)", right)
    if isinstance(right, dict):
        for key in right:
            if key not in ("set", "range", "prefix"):
                raise Unsupported(f"'{key}' on the right of a match is not supported", key)


# --- addresses ------------------------------------------------------------------------------

def _addr_text(v: Any) -> str:
    if isinstance(v, dict) and "prefix" in v:
        return f"{v['prefix']['addr']}/{v['prefix']['len']}"
    if isinstance(v, str):
        return v
    raise Unsupported(f"address {v!r} is not supported", str(v))


def _addr_range(v: Any) -> tuple[str, str]:
    if isinstance(v, dict) and "range" in v:
        lo, hi = v["range"]
        return str(lo), str(hi)
    net = ipaddress.ip_network(_addr_text(v), strict=False)
    return str(net.network_address), str(net.broadcast_address)


def _address(field: str, op: str, right: Any, family: Family) -> Piece:
    short, rng = ("-s", "--src-range") if field == "saddr" else ("-d", "--dst-range")
    _check_op(op, POSITIVE + NEGATIVE, "an address")
    elems = _elements(right)
    if elems is None:
        if isinstance(right, dict) and "range" in right:
            lo, hi = _addr_range(right)
            return _one(("-m", "iprange", *_neg(op), rng, f"{lo}-{hi}"), family=family)
        return _one((*_neg(op), short, _addr_text(right)), family=family)
    if op in NEGATIVE:
        # Not in any element: one negated iprange per element, all in the one rule.
        args: tuple[str, ...] = ()
        for e in elems:
            lo, hi = _addr_range(e)
            args += ("-m", "iprange", "!", rng, f"{lo}-{hi}")
        return _one(args, family=family)
    alts = []
    for e in elems:
        if isinstance(e, dict) and "range" in e:
            lo, hi = _addr_range(e)
            alts.append(Cond(("-m", "iprange", rng, f"{lo}-{hi}")))
        else:
            alts.append(Cond((short, _addr_text(e))))
    # nft refuses overlapping intervals in an anonymous set: the alternatives are disjoint.
    return Piece(tuple(alts), family)


# --- ports ----------------------------------------------------------------------------------

def _port(v: Any) -> str:
    if isinstance(v, dict) and "range" in v:
        lo, hi = v["range"]
        return f"{lo}:{hi}"
    if isinstance(v, (int, str)) and not isinstance(v, bool):
        return str(v)
    raise Unsupported(f"port {v!r} is not supported", str(v))


def _ordered(op: str, v: Any, top: int) -> str:
    """`< v` and friends as an inclusive `lo:hi` range."""
    if not isinstance(v, int):
        raise Unsupported(f"'{op}' needs a number, not {v!r}", str(v))
    lo, hi = {"<": (0, v - 1), "<=": (0, v), ">": (v + 1, top), ">=": (v, top)}[op]
    if lo > hi:
        raise Unsupported(f"'{op} {v}' never matches", str(v))
    return f"{lo}:{hi}"


def _ports(proto: str, field: str, op: str, right: Any) -> Piece:
    elems = _elements(right)
    if elems is None:
        if op in ORDERED:
            return _one(("-m", proto, f"--{field}", _ordered(op, right, 0xFFFF)), proto)
        _check_op(op, POSITIVE + NEGATIVE, f"{proto} {field}")
        return _one(("-m", proto, *_neg(op), f"--{field}", _port(right)), proto)
    _check_op(op, POSITIVE + NEGATIVE, f"a set of {proto} {field}s")
    chunks: list[list[str]] = [[]]
    used = 0
    for e in elems:
        cost = 2 if isinstance(e, dict) and "range" in e else 1
        if used + cost > MULTIPORT_SLOTS:
            chunks.append([])
            used = 0
        chunks[-1].append(_port(e))
        used += cost
    opts = [("-m", "multiport", *_neg(op), f"--{field}s", ",".join(c)) for c in chunks]
    if op in NEGATIVE:  # in none of the chunks: every chunk negated in one rule
        return _one(tuple(a for o in opts for a in o), proto)
    return Piece(tuple(Cond(o, proto) for o in opts))


# --- protocols, ICMP, TCP flags -------------------------------------------------------------

def _proto(v: Any, family: Family | None) -> str:
    try:
        return proto_name(parse_proto(str(v)), family or V4)
    except ValueError:
        raise Unsupported(f"unknown protocol {v!r}", str(v)) from None


def _protocol(op: str, right: Any, family: Family | None) -> Piece:
    elems = _elements(right)
    if elems is None:
        _check_op(op, POSITIVE + NEGATIVE, "a protocol")
        return _one(proto=_proto(right, family), neg=op in NEGATIVE, family=family)
    if op in NEGATIVE:
        raise Unsupported("'!=' with a set of protocols is not supported", "!=")
    return Piece(tuple(Cond((), _proto(e, family)) for e in elems), family)


def _icmp(kind: str, field: str, op: str, right: Any) -> Piece:
    v6 = kind == "icmpv6"
    if field != "type":
        raise Unsupported(f"{kind} {field} is not supported (only {kind} type)", f"{kind} {field}")
    table, module, opt = (ICMPV6_TYPES, "icmp6", "--icmpv6-type") if v6 else \
        (ICMP_TYPES, "icmp", "--icmp-type")
    proto, family = ("ipv6-icmp", V6) if v6 else ("icmp", V4)

    def number(v: Any) -> str:
        if isinstance(v, int) and 0 <= v <= 255:
            return str(v)
        if isinstance(v, str) and v in table:
            return str(table[v])
        raise Unsupported(f"unknown {kind} type {v!r}", str(v))

    elems = _elements(right)
    _check_op(op, POSITIVE + NEGATIVE, f"{kind} type")
    if elems is None:
        return _one(("-m", module, *_neg(op), opt, number(right)), proto, family=family)
    if op in NEGATIVE:
        return _one(tuple(a for e in elems for a in ("-m", module, "!", opt, number(e))),
                    proto, family=family)
    return Piece(tuple(Cond(("-m", module, opt, number(e)), proto) for e in elems), family)


def _flag_names(v: Any) -> list[str]:
    items = v if isinstance(v, list) else [v]
    out = []
    for f in items:
        if f not in TCP_FLAGS:
            raise Unsupported(f"tcp flag {f!r} has no iptables equivalent", str(f))
        out.append(TCP_FLAGS[f])
    return out


def _tcp_flags(op: str, mask: Any, right: Any) -> Piece:
    if _elements(right) is not None:
        raise Unsupported("a set of tcp flags is not supported", "set")
    if mask is None:
        # `tcp flags syn`: some of the listed flags are set; one flag is --tcp-flags F F.
        names = _flag_names(right)
        if op != "in" or len(names) != 1:
            raise Unsupported("tcp flags without a mask: only one flag ('tcp flags syn') is "
                              "supported", op)
        return _one(("-m", "tcp", "--tcp-flags", names[0], names[0]), "tcp")
    _check_op(op, POSITIVE + NEGATIVE, "tcp flags")
    m, c = _flag_names(mask), _flag_names(right) if right not in ([], 0) else []
    if not set(c) <= set(m):
        raise Unsupported("tcp flags compared outside their mask never match", str(right))
    return _one(("-m", "tcp", *_neg(op), "--tcp-flags", ",".join(m), ",".join(c) or "NONE"),
                "tcp")


def _hop(kind: str, op: str, right: Any, family: Family) -> Piece:
    module = "ttl" if family is V4 else "hl"
    if not isinstance(right, int) or not 0 <= right <= 255:
        raise Unsupported(f"{kind} needs a number, not {right!r}", str(right))
    if op in ("<=", ">="):
        op, right = op[0], right + (1 if op == "<=" else -1)
    forms = {"==": ("eq",), "in": ("eq",), "!=": ("!", "eq"), "<": ("lt",), ">": ("gt",)}
    if op not in forms or not 0 <= right <= 255:
        raise Unsupported(f"operator '{op}' on {kind} is not supported", op)
    *neg, mode = forms[op]
    return _one(("-m", module, *neg, f"--{module}-{mode}", str(right)), family=family)


# --- payload --------------------------------------------------------------------------------

def payload(op: str, left: dict, right: Any, mask: Any = None) -> Piece:
    """A `payload` match (protocol header field)."""
    proto, field = left.get("protocol"), left.get("field")
    name = f"{proto} {field}"
    if "base" in left:
        raise Unsupported("raw payload expressions are not supported", "payload")
    if mask is not None and name != "tcp flags":
        raise Unsupported(f"a bitmask on {name} is not supported", "&")
    if proto in ("ip", "ip6"):
        family = V4 if proto == "ip" else V6
        if field in ("saddr", "daddr"):
            return _address(field, op, right, family)
        if (proto, field) == ("ip", "protocol"):
            return _protocol(op, right, family)
        if (proto, field) == ("ip6", "nexthdr"):
            # The first next-header field only: a packet with extension headers (hop-by-hop
            # in MLD, routing, ...) differs from ip6tables -p, which looks past them.
            raise Unsupported("ip6 nexthdr (the first header only) has no ip6tables "
                              "equivalent; meta l4proto is what ip6tables -p matches", name)
        if (proto, field) in (("ip", "ttl"), ("ip6", "hoplimit")):
            return _hop(name, op, right, family)
    elif proto in ("tcp", "udp") and field in ("sport", "dport"):
        return _ports(proto, field, op, right)
    elif name == "tcp flags":
        return _tcp_flags(op, mask, right)
    elif proto in ("icmp", "icmpv6"):
        return _icmp(proto, field, op, right)
    raise Unsupported(f"payload field '{name}' is not supported", name)


# --- meta and ct ----------------------------------------------------------------------------

def _iface(v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise Unsupported(f"interface {v!r} is not supported", str(v))
    if v.endswith("\\*"):
        v = v[:-2] + "*"  # an escaped star is a literal one
    elif v.endswith("*"):
        v = v[:-1] + "+"  # nft's wildcard is iptables' trailing +
    elif v.endswith("+"):
        raise Unsupported(f"interface name {v!r} ends in '+' (an iptables wildcard)", v)
    if "*" in v[:-1]:
        raise Unsupported(f"interface name {v!r}: only a trailing '*' wildcard is supported", v)
    return v


def _interface(key: str, op: str, right: Any) -> Piece:
    opt = "-i" if key.startswith("i") else "-o"
    _check_op(op, POSITIVE + NEGATIVE, f"meta {key}")
    elems = _elements(right)
    if elems is None:
        return _one((*_neg(op), opt, _iface(right)))
    if op in NEGATIVE:
        raise Unsupported("'!=' with a set of interfaces is not supported", "!=")
    # Wildcards may overlap: the rule builder keeps the first-match semantics.
    return Piece(tuple(Cond((opt, _iface(e))) for e in elems), overlap=True)


def _mark(op: str, right: Any, mask: Any) -> Piece:
    def value(v: Any) -> str:
        if not isinstance(v, int):
            raise Unsupported(f"mark {v!r} is not a number", str(v))
        return f"{v:#x}/{mask:#x}" if mask is not None else f"{v:#x}"

    if mask is not None and not isinstance(mask, int):
        raise Unsupported(f"mark mask {mask!r} is not a number", str(mask))
    _check_op(op, POSITIVE + NEGATIVE, "meta mark")
    elems = _elements(right)
    if elems is None:
        return _one(("-m", "mark", *_neg(op), "--mark", value(right)))
    if op in NEGATIVE:
        return _one(tuple(a for e in elems for a in ("-m", "mark", "!", "--mark", value(e))))
    return Piece(tuple(Cond(("-m", "mark", "--mark", value(e))) for e in elems))


def meta(op: str, key: str, right: Any, mask: Any = None, table_family: str = "inet") -> Piece:
    """A `meta` match."""
    if mask is not None and key != "mark":
        raise Unsupported(f"a bitmask on meta {key} is not supported", "&")
    if key in ("iifname", "oifname", "iif", "oif"):
        # iif/oif compare the interface index nft resolved when loading; pybpfilter compares
        # the name (the same unless the interface is renamed or recreated).
        return _interface(key, op, right)
    if key == "l4proto":
        return _protocol(op, right, None)
    if key == "nfproto":
        _check_op(op, POSITIVE + NEGATIVE, "meta nfproto")
        if not isinstance(right, str) or right not in NFPROTO:
            raise Unsupported(f"meta nfproto {right!r} is not supported", str(right))
        fam = NFPROTO[right]
        return _one(family=fam if op not in NEGATIVE else (V6 if fam is V4 else V4))
    if key == "mark":
        return _mark(op, right, mask)
    if key == "pkttype":
        _check_op(op, POSITIVE + NEGATIVE, "meta pkttype")
        elems = _elements(right)
        values = elems if elems is not None else [right]
        for v in values:
            if v not in PKTTYPES:
                raise Unsupported(f"meta pkttype {v!r} has no iptables equivalent", str(v))
        if op in NEGATIVE:
            return _one(tuple(a for v in values
                              for a in ("-m", "pkttype", "!", "--pkt-type", PKTTYPES[v])))
        return Piece(tuple(Cond(("-m", "pkttype", "--pkt-type", PKTTYPES[v])) for v in values))
    raise Unsupported(f"meta {key} is not supported", f"meta {key}")


def _flags_list(right: Any) -> list[Any]:
    elems = _elements(right)
    if elems is not None:
        return elems
    return right if isinstance(right, list) else [right]


def ct(op: str, expr: dict, right: Any) -> Piece:
    """A `ct` match (the packet's conntrack entry)."""
    key = expr.get("key")
    if "dir" in expr or "family" in expr:
        raise Unsupported(f"ct {expr.get('dir', '')} {key} is not supported",
                          f"ct {expr.get('dir', '')} {key}".replace("  ", " "))
    set_form = _elements(right) is not None
    values = _flags_list(right)
    if key in ("state", "status"):
        # `in` (and a set) match when any listed bit is set; `==` with one bit is the same
        # (a packet has one state); `==` with several bits wants all of them: no equivalent.
        if op == "==" and len(values) > 1 and not set_form:
            raise Unsupported(f"'==' with several ct {key} bits is not supported (use "
                              "'ct state a,b')", "==")
        _check_op(op, POSITIVE + NEGATIVE, f"ct {key}")
        if key == "state":
            names = [CT_STATES.get(v) for v in values]
            opt = "--ctstate"
        elif all(v in CT_NAT for v in values):
            names, opt = [CT_NAT[v] for v in values], "--ctstate"
        elif any(v in CT_NAT for v in values):
            # xt_conntrack tests snat/dnat with --ctstate and the rest with --ctstatus: "any
            # of them" across the two options has no single-rule equivalent.
            raise Unsupported("ct status mixing snat/dnat with other bits is not supported",
                              next(str(v) for v in values if v in CT_NAT))
        else:
            names, opt = [CT_STATUS.get(v) for v in values], "--ctstatus"
        for v, n in zip(values, names, strict=True):
            if n is None:
                raise Unsupported(f"ct {key} {v!r} has no iptables equivalent", str(v))
        return _one(("-m", "conntrack", *_neg(op), opt, ",".join(n for n in names if n)))
    if key == "direction":
        _check_op(op, POSITIVE + NEGATIVE, "ct direction")
        if right not in ("original", "reply") or set_form:
            raise Unsupported(f"ct direction {right!r} is not supported", str(right))
        reply = (right == "reply") != (op in NEGATIVE)
        return _one(("-m", "conntrack", "--ctdir", "REPLY" if reply else "ORIGINAL"))
    raise Unsupported(f"ct {key} is not supported", f"ct {key}")


def _or_list(v: Any) -> list[Any]:
    if isinstance(v, dict) and "|" in v:
        return [x for part in v["|"] for x in _or_list(part)]
    return [v]


def match(m: dict, table_family: str) -> Piece:
    """Translate one `match` expression."""
    op = m.get("op", "in")
    left, right = m.get("left"), m.get("right")
    if isinstance(right, dict) and "|" in right:
        right = _or_list(right)  # `syn | ack`: the flags as a list
    _reject_named(right)
    mask = None
    if isinstance(left, dict) and "&" in left:
        left, mask = left["&"]
        if isinstance(mask, dict) and "|" in mask:
            mask = _or_list(mask)
        if isinstance(mask, dict):
            raise Unsupported("a computed bitmask is not supported", "&")
    if not isinstance(left, dict) or len(left) != 1:
        raise Unsupported(f"match on {left!r} is not supported", str(left))
    kind, body = next(iter(left.items()))
    if kind == "payload":
        return payload(op, body, right, mask)
    if kind == "meta":
        return meta(op, body.get("key"), right, mask, table_family)
    if kind == "ct":
        if mask is not None:
            raise Unsupported("a bitmask on ct is not supported", "&")
        return ct(op, body, right)
    raise Unsupported(f"'{kind}' expressions are not supported", kind)
