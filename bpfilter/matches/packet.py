"""Matches on packet header fields and metadata: iprange, comment, length, ttl, hl, pkttype,
mac, mark, addrtype (xt_iprange, xt_comment, xt_length, xt_hl, xt_pkttype, xt_mac, xt_mark,
xt_addrtype)."""

from __future__ import annotations

from dataclasses import dataclass

from ..ir.model import Family
from ..ir.pred import (
    Cmp,
    Const,
    EtherHeader,
    Field,
    Not,
    Pred,
    Range,
    all_of,
    any_of,
    negate,
)
from .kernel import PacketType, RouteType
from .registry import REGISTRY, Context, MatchEntry, MatchError, Option, Unsupported
from .util import Opts, bang, exclusive, need, one
from .values import (
    format_addr,
    format_mac,
    parse_addr,
    parse_mac,
    parse_uint,
    parse_uint_range,
    parse_value_mask,
    quote,
)

# --- iprange ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class AddrRange:
    """An inclusive address range, possibly negated."""

    lo: bytes
    hi: bytes
    invert: bool = False


@dataclass(frozen=True)
class IprangeMatch:
    """--src-range and/or --dst-range."""

    src: AddrRange | None = None
    dst: AddrRange | None = None


def _addr_range(text: str, family: Family, invert: bool) -> AddrRange:
    lo_s, dash, hi_s = text.partition("-")
    lo = parse_addr(lo_s, family)
    hi = parse_addr(hi_s, family) if dash else lo
    return AddrRange(lo, hi, invert)


def _build_iprange(opts: Opts, ctx: Context) -> IprangeMatch:
    need("iprange", opts, "src-range", "dst-range", names="--src-range or --dst-range")
    out = {}
    for key in ("src-range", "dst-range"):
        v = one(opts, key)
        out[key] = _addr_range(v.args[0], ctx.family, v.invert) if v is not None else None
    return IprangeMatch(out["src-range"], out["dst-range"])


def _save_iprange(p: IprangeMatch, ctx: Context) -> list[str]:
    out: list[str] = []
    for name, r in (("--src-range", p.src), ("--dst-range", p.dst)):
        if r is not None:
            out += [*bang(r.invert), name, f"{format_addr(r.lo)}-{format_addr(r.hi)}"]
    return out


def _lower_iprange(p: IprangeMatch, ctx: Context) -> Pred:
    v4 = ctx.family is Family.IPV4
    preds: list[Pred] = []
    for r, field in ((p.src, Field.SADDR4 if v4 else Field.SADDR6),
                     (p.dst, Field.DADDR4 if v4 else Field.DADDR6)):
        if r is not None:
            lo, hi = int.from_bytes(r.lo, "big"), int.from_bytes(r.hi, "big")
            preds.append(negate(Range(field, lo, hi), r.invert))
    return all_of(*preds)


def _describe_iprange(p: IprangeMatch, ctx: Context, numeric: bool) -> str:
    out = []
    for name, r in (("source", p.src), ("destination", p.dst)):
        if r is not None:
            out.append(f"{name} IP range {'! ' if r.invert else ''}"
                       f"{format_addr(r.lo)}-{format_addr(r.hi)}")
    return " ".join(out)


IPRANGE = REGISTRY.add_match(MatchEntry(
    "iprange",
    (Option(("--src-range",), "src-range"), Option(("--dst-range",), "dst-range")),
    _build_iprange, _save_iprange, _lower_iprange, describe=_describe_iprange))

# --- comment ---------------------------------------------------------------------------------

MAX_COMMENT = 255  # XT_MAX_COMMENT_LEN - 1


def _build_comment(opts: Opts, ctx: Context) -> str:
    need("comment", opts, "comment")
    text = one(opts, "comment").args[0]
    if len(text.encode()) > MAX_COMMENT:
        raise MatchError(f"comment: comment may not exceed {MAX_COMMENT} characters", text)
    return text


COMMENT = REGISTRY.add_match(MatchEntry(
    "comment", (Option(("--comment",), "comment", invert=False),),
    _build_comment, lambda p, c: ["--comment", quote(p)], lambda p, c: Const(True),
    describe=lambda p, c, n: f"/* {p} */"))

# --- length ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LengthMatch:
    """IPv4 total length / IPv6 payload length + 40 within [lo, hi]."""

    lo: int
    hi: int
    invert: bool = False


def _build_length(opts: Opts, ctx: Context) -> LengthMatch:
    need("length", opts, "length")
    v = one(opts, "length")
    lo, hi = parse_uint_range(v.args[0], 0xFFFF, "length")
    return LengthMatch(lo, hi, v.invert)


def _save_length(p: LengthMatch, ctx: Context) -> list[str]:
    text = str(p.lo) if p.lo == p.hi else f"{p.lo}:{p.hi}"
    return [*bang(p.invert), "--length", text]


def _describe_length(p: LengthMatch, ctx: Context, numeric: bool) -> str:
    return f"length {'!' if p.invert else ''}{p.lo}" + ("" if p.lo == p.hi else f":{p.hi}")


LENGTH = REGISTRY.add_match(MatchEntry(
    "length", (Option(("--length",), "length"),), _build_length, _save_length,
    lambda p, c: negate(Range(Field.IPLEN, p.lo, p.hi), p.invert), describe=_describe_length))

# --- ttl / hl --------------------------------------------------------------------------------


@dataclass(frozen=True)
class HopMatch:
    """TTL / hop limit test: mode is "eq", "ne", "lt" or "gt"."""

    mode: str
    value: int


def _hop_entry(name: str, family: Family) -> MatchEntry:
    keys = ("eq", "lt", "gt")
    flags = {k: f"--{name}-{k}" for k in keys}

    def build(opts: Opts, ctx: Context) -> HopMatch:
        exclusive(name, opts, *keys)
        need(name, opts, *keys, names=", ".join(flags.values()))
        for k in keys:
            v = one(opts, k)
            if v is not None:
                mode = "ne" if v.invert else k
                return HopMatch(mode, parse_uint(v.args[0], 0, 255, f"{name} value"))
        raise AssertionError("unreachable")

    def save(p: HopMatch, ctx: Context) -> list[str]:
        if p.mode == "ne":
            return ["!", flags["eq"], str(p.value)]
        return [flags[p.mode], str(p.value)]

    def lower(p: HopMatch, ctx: Context) -> Pred:
        if p.mode in ("eq", "ne"):
            return negate(Cmp(Field.TTL, p.value), p.mode == "ne")
        if p.mode == "lt":
            return Range(Field.TTL, 0, p.value - 1) if p.value > 0 else Const(False)
        return Range(Field.TTL, p.value + 1, 255) if p.value < 255 else Const(False)

    def describe(p: HopMatch, ctx: Context, numeric: bool) -> str:
        op = {"eq": "==", "ne": "!=", "lt": "<", "gt": ">"}[p.mode]
        return f"{name.upper()} match {name.upper()} {op} {p.value}"

    options = (Option((flags["eq"],), "eq"), Option((flags["lt"],), "lt", invert=False),
               Option((flags["gt"],), "gt", invert=False))
    return MatchEntry(name, options, build, save, lower, families=frozenset({family}),
                      describe=describe)


TTL = REGISTRY.add_match(_hop_entry("ttl", Family.IPV4))
HL = REGISTRY.add_match(_hop_entry("hl", Family.IPV6))

# --- pkttype ---------------------------------------------------------------------------------

PKT_TYPES = {"unicast": PacketType.HOST, "host": PacketType.HOST,
             "broadcast": PacketType.BROADCAST, "multicast": PacketType.MULTICAST,
             "otherhost": PacketType.OTHERHOST}
_PKT_NAMES = {PacketType.HOST: "unicast", PacketType.BROADCAST: "broadcast",
              PacketType.MULTICAST: "multicast", PacketType.OTHERHOST: "otherhost"}
_MCAST4 = (b"\xe0\0\0\0", b"\xf0\0\0\0")


@dataclass(frozen=True)
class PktTypeMatch:
    """skb->pkt_type, with xt_pkttype's reading of looped-back packets."""

    type: PacketType
    invert: bool = False


def _build_pkttype(opts: Opts, ctx: Context) -> PktTypeMatch:
    need("pkttype", opts, "pkt-type")
    v = one(opts, "pkt-type")
    t = PKT_TYPES.get(v.args[0].lower())
    if t is None:
        raise MatchError(f"Bad packet type {v.args[0]!r}", v.args[0])
    return PktTypeMatch(t, v.invert)


def _lower_pkttype(p: PktTypeMatch, ctx: Context) -> Pred:
    # A looped-back packet counts as multicast (IPv6, or IPv4 to 224/4), else as broadcast.
    loop = Cmp(Field.PKTTYPE, PacketType.LOOPBACK)
    if ctx.family is Family.IPV6:
        as_mcast: Pred = loop
        as_bcast: Pred = Const(False)
    else:
        mcast = Cmp(Field.DADDR4, *_MCAST4)
        as_mcast = all_of(loop, mcast)
        as_bcast = all_of(loop, negate(mcast))
    test = Cmp(Field.PKTTYPE, p.type)
    if p.type is PacketType.MULTICAST:
        test = any_of(test, as_mcast)
    elif p.type is PacketType.BROADCAST:
        test = any_of(test, as_bcast)
    return negate(test, p.invert)


def _skb_only(what: str):
    def check(p: object, ctx: Context) -> str | None:
        if ctx.hook == "xdp":
            return f"{what} is not known at the XDP hook"
        return None

    return check


PKTTYPE = REGISTRY.add_match(MatchEntry(
    "pkttype", (Option(("--pkt-type",), "pkt-type"),), _build_pkttype,
    lambda p, c: [*bang(p.invert), "--pkt-type", _PKT_NAMES[p.type]], _lower_pkttype,
    check_hook=_skb_only("pkttype"),
    describe=lambda p, c, n: f"PKTTYPE {'!' if p.invert else ''}= {_PKT_NAMES[p.type]}"))

# --- mac -------------------------------------------------------------------------------------

MAC_CHAINS = ("PREROUTING", "INPUT", "FORWARD")


@dataclass(frozen=True)
class MacMatch:
    """Source MAC address of an Ethernet frame."""

    mac: bytes
    invert: bool = False


def _build_mac(opts: Opts, ctx: Context) -> MacMatch:
    need("mac", opts, "mac-source")
    v = one(opts, "mac-source")
    return MacMatch(parse_mac(v.args[0]), v.invert)


def _check_mac(p: MacMatch, ctx: Context) -> str | None:
    if ctx.chain and ctx.chain not in MAC_CHAINS:
        return f"mac match: used from {ctx.chain}, but only valid from PREROUTING/INPUT/FORWARD"
    return None


MAC = REGISTRY.add_match(MatchEntry(
    "mac", (Option(("--mac-source",), "mac-source"),), _build_mac,
    lambda p, c: [*bang(p.invert), "--mac-source", format_mac(p.mac)],
    lambda p, c: all_of(EtherHeader(), negate(Cmp(Field.SMAC, p.mac), p.invert)),
    check_hook=_check_mac,
    describe=lambda p, c, n: f"MAC {'! ' if p.invert else ''}{format_mac(p.mac)}"))

# --- mark ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MarkMatch:
    """(skb->mark & mask) == value, possibly negated."""

    value: int
    mask: int = 0xFFFFFFFF
    invert: bool = False


def format_mark(value: int, mask: int) -> str:
    """`0xV` or `0xV/0xM` (the mask only when not all ones), as xt_mark prints it."""
    return f"0x{value:x}" if mask == 0xFFFFFFFF else f"0x{value:x}/0x{mask:x}"


def _build_mark(opts: Opts, ctx: Context) -> MarkMatch:
    need("mark", opts, "mark")
    v = one(opts, "mark")
    value, mask = parse_value_mask(v.args[0])
    return MarkMatch(value, mask, v.invert)


MARK = REGISTRY.add_match(MatchEntry(
    "mark", (Option(("--mark",), "mark"),), _build_mark,
    lambda p, c: [*bang(p.invert), "--mark", format_mark(p.value, p.mask)],
    lambda p, c: negate(Cmp(Field.MARK, p.value, p.mask), p.invert),
    check_hook=_skb_only("the packet mark"),
    describe=lambda p, c, n: "mark match " + "! " * p.invert + format_mark(p.value, p.mask)))

# --- addrtype --------------------------------------------------------------------------------


@dataclass(frozen=True)
class AddrTypeMatch:
    """Route types of the source / destination address (bit masks of RouteType)."""

    src: int = 0
    dst: int = 0
    src_invert: bool = False
    dst_invert: bool = False
    dev: str | None = None  # "in" / "out": --limit-iface-in / --limit-iface-out


def parse_types(text: str) -> int:
    """A comma list of route type names (case-insensitive prefixes, first match wins)."""
    mask = 0
    for name in text.split(","):
        hit = next((t for t in RouteType if name and t.name.startswith(name.upper())), None)
        if hit is None:
            raise MatchError(f"addrtype: bad type {name!r}", name)
        mask |= 1 << hit
    return mask


def format_types(mask: int) -> str:
    """Route types in bit order, comma-separated."""
    return ",".join(t.name for t in RouteType if mask & (1 << t))


def _build_addrtype(opts: Opts, ctx: Context) -> AddrTypeMatch:
    need("addrtype", opts, "src-type", "dst-type", names="--src-type or --dst-type")
    exclusive("addrtype", opts, "limit-iface-in", "limit-iface-out")
    src, dst = one(opts, "src-type"), one(opts, "dst-type")
    m = AddrTypeMatch(
        parse_types(src.args[0]) if src else 0, parse_types(dst.args[0]) if dst else 0,
        bool(src and src.invert), bool(dst and dst.invert),
        "in" if "limit-iface-in" in opts else "out" if "limit-iface-out" in opts else None)
    if ctx.family is Family.IPV6:
        both = m.src | m.dst
        if both & (1 << RouteType.BLACKHOLE):
            raise MatchError("addrtype: ipv6 BLACKHOLE matching not supported", "BLACKHOLE")
        if both >= 1 << RouteType.PROHIBIT:
            raise MatchError("addrtype: ipv6 PROHIBIT (THROW, NAT ..) matching not supported",
                             "addrtype")
        if both & (1 << RouteType.BROADCAST):
            raise MatchError("addrtype: ipv6 does not support BROADCAST matching", "BROADCAST")
    return m


def _save_addrtype(p: AddrTypeMatch, ctx: Context) -> list[str]:
    out: list[str] = []
    if p.src:
        out += [*bang(p.src_invert), "--src-type", format_types(p.src)]
    if p.dst:
        out += [*bang(p.dst_invert), "--dst-type", format_types(p.dst)]
    if p.dev:
        out.append(f"--limit-iface-{p.dev}")
    return out


_V6_BY_ADDRESS = (1 << RouteType.UNSPEC) | (1 << RouteType.UNICAST) | (1 << RouteType.MULTICAST)
_LOCAL, _ANYCAST, _UNICAST = 1 << RouteType.LOCAL, 1 << RouteType.ANYCAST, 1 << RouteType.UNICAST
# Bits of RTSRCDEV / RTDSTDEV (compiler/hooks/localtable.py): the route's device is the
# packet's input / output device.
_DEV_BIT = {"in": 1 << 15, "out": 1 << 14}


def _has(types: Field, bits: int) -> Pred:
    """(types & bits) != 0."""
    return Not(Cmp(types, 0, bits)) if bits else Const(False)


def _v4_lookup(types: Field, mask: int, dev: str | None) -> Pred:
    """inet_dev_addr_type(): the type, or with a device UNICAST unless the route is on it."""
    if dev is None:
        return _has(types, mask)
    on = _DEV_BIT[dev]
    return any_of(all_of(Cmp(types, on, on), _has(types, mask)),
                  all_of(Cmp(types, 0, on), Const(bool(mask & _UNICAST))))


def _v6_lookup(types: Field, mask: int, dev: str | None) -> Pred:
    """match_lookup_rt6(): LOCAL from the route (without a device) or from the address being
    on the device (with one); ANYCAST from the route either way."""
    local = mask & _LOCAL
    if dev is not None and local:
        on = _DEV_BIT[dev]
        return any_of(Cmp(types, on, on), _has(types, mask & _ANYCAST))
    return _has(types, mask & (_LOCAL | _ANYCAST))


def _v6_type(field: Field, types: Field, mask: int, dev: str | None) -> Pred:
    """IPv6 (match_type6): each of UNSPEC, UNICAST, MULTICAST in the mask is a requirement on
    the address itself (ipv6_addr_type); LOCAL and ANYCAST, when asked, must be among the route
    lookup's answers (`types`, filled from the local table, see compiler/hooks/localtable.py)."""
    if mask & (1 << RouteType.UNREACHABLE):
        raise Unsupported("addrtype", ": IPv6 UNREACHABLE is the failure of a full route "
                          "lookup (every table, every policy rule), which programs cannot do; "
                          "UNSPEC, UNICAST, MULTICAST, LOCAL and ANYCAST are supported")
    multicast = Cmp(field, b"\xff", b"\xff")
    preds: list[Pred] = []
    if mask & (1 << RouteType.MULTICAST):
        preds.append(multicast)
    if mask & _UNICAST:  # IPV6_ADDR_UNICAST or LOOPBACK: not ::, ::ffff:0:0/96
        preds += [Not(multicast), Not(Cmp(field, bytes(16))),
                  Not(Cmp(field, bytes(10) + b"\xff\xff", b"\xff" * 12))]
    if mask & (1 << RouteType.UNSPEC):
        preds.append(Cmp(field, bytes(16)))
    if mask & (_LOCAL | _ANYCAST):
        preds.append(_v6_lookup(types, mask, dev))
    return all_of(*preds)


def _lower_addrtype(p: AddrTypeMatch, ctx: Context) -> Pred:
    v4 = ctx.family is Family.IPV4
    preds: list[Pred] = []
    for mask, invert, addr, types in (
            (p.src, p.src_invert, Field.SADDR4 if v4 else Field.SADDR6,
             Field.RTSRCDEV if p.dev else Field.RTSRC),
            (p.dst, p.dst_invert, Field.DADDR4 if v4 else Field.DADDR6,
             Field.RTDSTDEV if p.dev else Field.RTDST)):
        if not mask:
            continue
        if v4:
            # types holds 1 << the address's RTN_* type (and the device bits).
            preds.append(negate(_v4_lookup(types, mask, p.dev), invert))
        else:
            preds.append(negate(_v6_type(addr, types, mask, p.dev), invert))
    return all_of(*preds)


def _describe_addrtype(p: AddrTypeMatch, ctx: Context, numeric: bool) -> str:
    out = "ADDRTYPE match"
    if p.src:
        out += f" src-type {'!' if p.src_invert else ''}{format_types(p.src)}"
    if p.dst:
        out += f" dst-type {'!' if p.dst_invert else ''}{format_types(p.dst)}"
    return out + (f" limit-{p.dev}" if p.dev else "")


def _check_addrtype(p: AddrTypeMatch, ctx: Context) -> str | None:
    if p.dev == "out" and ctx.chain in ("PREROUTING", "INPUT"):
        return "addrtype: output interface limitation not valid in PREROUTING and INPUT"
    if p.dev == "in" and ctx.chain in ("POSTROUTING", "OUTPUT"):
        return "addrtype: input interface limitation not valid in POSTROUTING and OUTPUT"
    return None


ADDRTYPE = REGISTRY.add_match(MatchEntry(
    "addrtype",
    (Option(("--src-type",), "src-type"), Option(("--dst-type",), "dst-type"),
     Option(("--limit-iface-in",), "limit-iface-in", nargs=0, invert=False),
     Option(("--limit-iface-out",), "limit-iface-out", nargs=0, invert=False)),
    _build_addrtype, _save_addrtype, _lower_addrtype, check_hook=_check_addrtype,
    describe=_describe_addrtype))
