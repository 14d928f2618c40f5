"""Set members as ipset writes them (`1.2.3.4,udp:53`, `10.0.0.0/8 nomatch`) ↔ `Parts`.

Parsing follows the ipset command: IPv4 address dimensions take `a.b.c.d`, `a.b.c.d/cidr` and
`from-to` (hash:ip and the first address of the other types expand these into addresses;
network dimensions into the fewest prefixes covering them), IPv6 ones a plain address or a
prefix; ports are `[proto:]port[-port]` with tcp the default protocol, ICMP a type name or
`type/code`, and other protocols the pseudo port 0. Printing gives what `ipset list` prints.
"""

from __future__ import annotations

import ipaddress
import itertools
import socket
from collections.abc import Iterator

from ...ir.model import Family
from ...ir.sets import ICMP, ICMPV6, PORT_PROTOS, Dim, Part, Parts, SetDef
from ...matches.registry import MatchError
from ...matches.values import format_addr, parse_port, parse_proto, proto_name


class SetError(ValueError):
    """A bad set definition or member; `token` names the offending word."""

    def __init__(self, message: str, token: str | None = None) -> None:
        super().__init__(message)
        self.token = token


# ipset's ICMP names (first name of a type/code is the one printed; input may abbreviate).
ICMP_NAMES: tuple[tuple[str, int, int], ...] = (
    ("echo-reply", 0, 0), ("pong", 0, 0), ("network-unreachable", 3, 0),
    ("host-unreachable", 3, 1), ("protocol-unreachable", 3, 2), ("port-unreachable", 3, 3),
    ("fragmentation-needed", 3, 4), ("source-route-failed", 3, 5), ("network-unknown", 3, 6),
    ("host-unknown", 3, 7), ("network-prohibited", 3, 9), ("host-prohibited", 3, 10),
    ("TOS-network-unreachable", 3, 11), ("TOS-host-unreachable", 3, 12),
    ("communication-prohibited", 3, 13), ("host-precedence-violation", 3, 14),
    ("precedence-cutoff", 3, 15), ("source-quench", 4, 0), ("network-redirect", 5, 0),
    ("host-redirect", 5, 1), ("TOS-network-redirect", 5, 2), ("TOS-host-redirect", 5, 3),
    ("echo-request", 8, 0), ("ping", 8, 0), ("router-advertisement", 9, 0),
    ("router-solicitation", 10, 0), ("ttl-zero-during-transit", 11, 0),
    ("ttl-zero-during-reassembly", 11, 1), ("ip-header-bad", 12, 0),
    ("required-option-missing", 12, 1), ("timestamp-request", 13, 0),
    ("timestamp-reply", 14, 0), ("address-mask-request", 17, 0), ("address-mask-reply", 18, 0),
)
ICMPV6_NAMES: tuple[tuple[str, int, int], ...] = (
    ("no-route", 1, 0), ("communication-prohibited", 1, 1), ("address-unreachable", 1, 3),
    ("port-unreachable", 1, 4), ("packet-too-big", 2, 0), ("ttl-zero-during-transit", 3, 0),
    ("ttl-zero-during-reassembly", 3, 1), ("bad-header", 4, 0), ("unknown-header-type", 4, 1),
    ("unknown-option", 4, 2), ("echo-request", 128, 0), ("ping", 128, 0),
    ("echo-reply", 129, 0), ("pong", 129, 0), ("router-solicitation", 133, 0),
    ("router-advertisement", 134, 0), ("neighbour-solicitation", 135, 0),
    ("neigbour-solicitation", 135, 0), ("neighbour-advertisement", 136, 0),
    ("neigbour-advertisement", 136, 0), ("redirect", 137, 0),
)
ELEMENT_FLAGS = ("timeout", "packets", "bytes", "comment", "skbmark", "skbprio", "skbqueue")


# --- parsing -----------------------------------------------------------------------------------


def parse_member(d: SetDef, text: str, limit: int | None = None) -> list[Parts]:
    """The members `text` stands for in set `d` (ranges and prefixes expanded), at most `limit`."""
    items = text.split(",")
    dims = d.type.dims
    if len(items) != len(dims):
        raise SetError(f"{d.type.name} members have {len(dims)} part(s) separated by commas, "
                       f"got {text!r}", text)
    choices: list[list[Part]] = []
    for i, (dim, item) in enumerate(zip(dims, items, strict=True)):
        if dim is Dim.IP:
            choices.append(_ip_values(d, item, expand=i == 0))
        elif dim is Dim.NET:
            choices.append(list(_net_values(d, item)))
        else:
            choices.append(_port_values(d, item))
    count = 1
    for c in choices:
        count *= len(c)
    cap = limit if limit is not None else d.capacity()
    if count > cap:
        raise SetError(f"{text!r} stands for {count} members, more than the set can hold "
                       f"({cap})", text)
    return [tuple(p) for p in itertools.product(*choices)]


def _family(d: SetDef) -> Family:
    return d.family or Family.IPV4


def _addr(d: SetDef, text: str) -> bytes:
    try:
        # inet_pton: strict numeric forms, and fast (sets may hold 100,000s of members).
        return socket.inet_pton(socket.AF_INET if _family(d) is Family.IPV4 else socket.AF_INET6,
                                text)
    except OSError:
        raise SetError(f"cannot parse {text!r} as an {_family(d).value} address", text) from None


def _cidr(d: SetDef, text: str, whole: str) -> int:
    bits = d.addr_len * 8
    if not text.isdigit() or not 1 <= int(text) <= bits:
        raise SetError(f"the prefix length of {whole!r} is invalid (1-{bits})", whole)
    return int(text)


def _mask(value: int, plen: int, bits: int) -> int:
    return value & (((1 << bits) - 1) ^ ((1 << (bits - plen)) - 1))


def addr_range(d: SetDef, text: str) -> tuple[int, int]:
    """First and last address of `a`, `a/cidr` or `a-b` (IPv4; IPv6 takes a plain address)."""
    bits = d.addr_len * 8
    if "-" in text or "/" in text:
        if _family(d) is Family.IPV6:
            raise SetError(f"a plain IPv6 address must be given, not {text!r}", text)
        if "-" in text:
            lo_s, _, hi_s = text.partition("-")
            lo = int.from_bytes(_addr(d, lo_s), "big")
            hi = int.from_bytes(_addr(d, hi_s), "big")
            return (lo, hi) if lo <= hi else (hi, lo)
        a_s, _, c_s = text.partition("/")
        plen = _cidr(d, c_s, text)
        lo = _mask(int.from_bytes(_addr(d, a_s), "big"), plen, bits)
        return lo, lo | ((1 << (bits - plen)) - 1)
    v = int.from_bytes(_addr(d, text), "big")
    return v, v


def _ip_values(d: SetDef, text: str, *, expand: bool) -> list[Part]:
    if not expand and ("-" in text or "/" in text):
        raise SetError(f"a plain address must be given, not {text!r}", text)
    lo, hi = addr_range(d, text)
    bits = d.addr_len * 8
    step = 1
    if d.netmask is not None:
        step = 1 << (bits - d.netmask)
        lo, hi = _mask(lo, d.netmask, bits), _mask(hi, d.netmask, bits)
    if d.range is not None and (lo < d.range[0] or hi > d.range[1]):
        raise SetError(f"{text!r} is outside the range of the set", text)
    count = (hi - lo) // step + 1
    if count > d.capacity():
        raise SetError(f"{text!r} stands for {count} addresses, more than the set can hold "
                       f"({d.capacity()})", text)
    out: list[Part] = []
    for v in range(lo, hi + 1, step):
        if v == 0 and not d.type.bitmap:
            raise SetError("a zero address cannot be stored in a hash type of set", text)
        out.append(v.to_bytes(d.addr_len, "big"))
    return out


def _net_values(d: SetDef, text: str) -> Iterator[Part]:
    bits = d.addr_len * 8
    if "-" in text and _family(d) is Family.IPV4:
        lo, hi = addr_range(d, text)
        for n in ipaddress.summarize_address_range(ipaddress.IPv4Address(lo),
                                                   ipaddress.IPv4Address(hi)):
            if n.prefixlen == 0:
                raise SetError(f"{text!r} needs the prefix /0, which sets cannot hold", text)
            yield n.network_address.packed, n.prefixlen
        return
    a_s, slash, c_s = text.partition("/")
    plen = _cidr(d, c_s, text) if slash else bits
    v = _mask(int.from_bytes(_addr(d, a_s), "big"), plen, bits)
    yield v.to_bytes(d.addr_len, "big"), plen


def _icmp(names: tuple[tuple[str, int, int], ...], text: str, what: str) -> int:
    if "/" in text:
        t_s, _, c_s = text.partition("/")
        if t_s.isdigit() and c_s.isdigit() and int(t_s) < 256 and int(c_s) < 256:
            return int(t_s) << 8 | int(c_s)
    else:
        low = text.lower()
        for name, t, c in names:
            if low and name.lower().startswith(low):
                return t << 8 | c
    raise SetError(f"cannot parse {text!r} as an {what} type/code", text)


def _port_values(d: SetDef, text: str) -> list[Part]:
    proto_s, colon, port_s = text.partition(":")
    if not colon:
        proto_s, port_s = "tcp", text
    try:
        proto = parse_proto(proto_s)
    except MatchError:
        raise SetError(f"unknown protocol {proto_s!r}", text) from None
    if d.type.port_only:
        if proto not in (6, 17):
            raise SetError(f"bitmap:port members take tcp or udp ports, not {text!r}", text)
        proto = 0
    elif proto == 0:
        raise SetError(f"invalid protocol in {text!r}", text)
    if proto in (ICMP, ICMPV6):
        want = Family.IPV4 if proto == ICMP else Family.IPV6
        if _family(d) is not want:
            raise SetError(f"protocol {'ICMP' if proto == ICMP else 'ICMPv6'} can be used with "
                           f"family {'inet' if want is Family.IPV4 else 'inet6'} only", text)
        names = ICMP_NAMES if proto == ICMP else ICMPV6_NAMES
        return [(proto, _icmp(names, port_s, "ICMP" if proto == ICMP else "ICMPv6"))]
    if proto and proto not in PORT_PROTOS:
        if port_s != "0":
            raise SetError(f"protocol {proto_name(proto)} can be used with pseudo port value "
                           "0 only", text)
        return [(proto, 0)]
    pname = "udp" if proto == 17 else "tcp"
    lo_s, dash, hi_s = port_s.partition("-")
    try:
        lo = parse_port(lo_s, pname)
        hi = parse_port(hi_s, pname) if dash else lo
    except MatchError as e:
        raise SetError(f"cannot parse {port_s!r} as a port", e.token or port_s) from None
    lo, hi = min(lo, hi), max(lo, hi)
    if d.range is not None and (lo < d.range[0] or hi > d.range[1]):
        raise SetError(f"{text!r} is outside the range of the set", text)
    return [(proto, p) for p in range(lo, hi + 1)]


# --- printing ----------------------------------------------------------------------------------


def format_member(d: SetDef, parts: Parts, nomatch: bool = False) -> str:
    """A member as `ipset list` prints it."""
    out = []
    for dim, part in zip(d.type.dims, parts, strict=True):
        if dim is Dim.IP:
            assert isinstance(part, bytes)
            out.append(format_addr(part))
        elif dim is Dim.NET:
            addr, plen = part  # type: ignore[misc]
            out.append(format_addr(addr) + ("" if plen == len(addr) * 8 else f"/{plen}"))
        else:
            out.append(format_port(d, part))  # type: ignore[arg-type]
    return ",".join(out) + (" nomatch" if nomatch else "")


def format_port(d: SetDef, part: tuple[int, int]) -> str:
    """`tcp:80`, `icmp:echo-request`, `gre:0`; bitmap:port prints the bare port."""
    proto, port = part
    if d.type.port_only:
        return str(port)
    if proto in (ICMP, ICMPV6):
        names = ICMP_NAMES if proto == ICMP else ICMPV6_NAMES
        t, c = port >> 8, port & 0xFF
        name = next((n for n, nt, nc in names if (nt, nc) == (t, c)), f"{t}/{c}")
        return f"{proto_name(proto)}:{name}"
    return f"{proto_name(proto)}:{port}"
