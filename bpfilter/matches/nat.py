"""NAT targets: SNAT, DNAT, MASQUERADE, REDIRECT, for ip(6)tables (compiled by compiler/nat.py)."""

from __future__ import annotations

from dataclasses import dataclass

from ..ir.model import Family
from .kernel import IpProto
from .registry import REGISTRY, Context, MatchError, Option, TargetEntry
from .util import Opts, need, one
from .values import format_addr, parse_addr, parse_port, parse_uint

PORT_PROTOS = (IpProto.TCP, IpProto.UDP, IpProto.SCTP, IpProto.DCCP, IpProto.UDPLITE)


@dataclass(frozen=True)
class NatRange:
    """An address range and/or port range (with DNAT's optional base port `/N`)."""

    lo: bytes | None = None
    hi: bytes | None = None
    port_lo: int | None = None
    port_hi: int | None = None
    base: int | None = None


@dataclass(frozen=True)
class Nat:
    """SNAT/DNAT/MASQUERADE/REDIRECT parameters; flags are "random", "random-fully",
    "persistent" in iptables' print order."""

    range: NatRange
    flags: tuple[str, ...] = ()


_FLAG_ORDER = ("random", "random-fully", "persistent")


def parse_ports(text: str, who: str, base: bool = False) -> tuple[int, int, int | None]:
    """`port` (number or service), `lo-hi` (numbers) and with `base`, `lo-hi/N`."""
    spec, slash, base_s = text.partition("/")
    if slash and not base:
        raise MatchError(f"{who}: garbage after port value: {'/' + base_s!r}", text)
    lo_s, dash, hi_s = spec.partition("-")
    if not dash or not lo_s.isdigit():
        if slash:
            raise MatchError(f"{who}: port {text!r} not valid", text)
        p = parse_port(spec)
        return p, p, None
    lo = parse_uint(lo_s, 0, 0xFFFF, "port")
    hi = parse_uint(hi_s, 0, 0xFFFF, "port")
    if hi < lo:
        raise MatchError(f"{who}: port range {text!r} funky", text)
    b = None
    if slash:
        b = parse_port(base_s)
        if b == 0:
            raise MatchError(f"{who}: base port 0 not valid", text)
    return lo, hi, b


def _addr(text: str, family: Family, who: str) -> bytes:
    if family is Family.IPV4 and text.count(".") != 3:
        raise MatchError(f"{who}: bad IP address {text!r}", text)
    return parse_addr(text, family)


def parse_nat_range(text: str, family: Family, who: str, base: bool) -> NatRange:
    """`addr[-addr][:ports]` (IPv4) or `addr[-addr]` / `[addr[-addr]]:ports` (IPv6)."""
    if family is Family.IPV6 and text.startswith("["):
        addrs, close, rest = text[1:].partition("]")
        if not close or (rest and not rest.startswith(":")):
            raise MatchError(f"{who}: bad address {text!r}", text)
        ports = rest[1:] if rest else ""
    elif family is Family.IPV6 and text.startswith(":") and not text.startswith("::"):
        addrs, ports = "", text[1:]  # ports only: ":80"
    elif family is Family.IPV6:
        addrs, ports = text, ""
    else:
        addrs, _, ports = text.partition(":")
    lo = hi = None
    if addrs:
        lo_s, dash, hi_s = addrs.partition("-")
        lo = _addr(lo_s, family, who)
        hi = _addr(hi_s, family, who) if dash else lo
    plo = phi = b = None
    if ports:
        plo, phi, b = parse_ports(ports, who, base)
    elif text.endswith(":") or not addrs:
        raise MatchError(f"{who}: bad address {text!r}", text)
    return NatRange(lo, hi, plo, phi, b)


def format_nat_range(r: NatRange, family: Family) -> str:
    """The range as iptables prints --to-source / --to-destination."""
    addrs = ""
    if r.lo is not None:
        addrs = format_addr(r.lo)
        if r.hi != r.lo:
            addrs += "-" + format_addr(r.hi)
    if r.port_lo is None:
        return addrs
    ports = str(r.port_lo) if r.port_lo == r.port_hi else f"{r.port_lo}-{r.port_hi}"
    if r.base is not None:
        ports += f"/{r.base}"
    if family is Family.IPV6 and addrs:
        addrs = f"[{addrs}]"
    return f"{addrs}:{ports}"


def _need_port_proto(who: str, ctx: Context, token: str) -> None:
    if ctx.proto not in PORT_PROTOS or ctx.proto_inverted:
        raise MatchError(f"{who}: Need TCP, UDP, SCTP or DCCP with port specification", token)


def _flags(opts: Opts) -> tuple[str, ...]:
    return tuple(f for f in _FLAG_ORDER if f in opts)


def _flag_opts(*names: str) -> tuple[Option, ...]:
    return tuple(Option((f"--{n}",), n, nargs=0, invert=False) for n in names)


def _nat_entry(name: str, opt: str, flags: tuple[str, ...], chains: tuple[str, ...],
               base: bool) -> TargetEntry:
    key = opt[2:]

    def build(opts: Opts, ctx: Context) -> Nat:
        need(name, opts, key)
        v = one(opts, key)
        r = parse_nat_range(v.args[0], ctx.family, name, base)
        if r.port_lo is not None:
            _need_port_proto(name, ctx, v.args[0])
        return Nat(r, _flags(opts))

    def save(p: Nat, ctx: Context) -> list[str]:
        return [opt, format_nat_range(p.range, ctx.family), *(f"--{f}" for f in p.flags)]

    def check(p: Nat, ctx: Context) -> str | None:
        if ctx.chain and ctx.chain not in chains:
            return f"{name}: used from {ctx.chain}, but only valid from {'/'.join(chains)}"
        return None

    def describe(p: Nat, ctx: Context, numeric: bool) -> str:
        return " ".join([f"to:{format_nat_range(p.range, ctx.family)}", *p.flags])

    aliases = ("--to",) if name == "DNAT" else ()
    options = (Option((opt, *aliases), key, invert=False), *_flag_opts(*flags))
    return TargetEntry(name, options, build, save, tables=frozenset({"nat"}), check_hook=check,
                       describe=describe)


SNAT = REGISTRY.add_target(_nat_entry(
    "SNAT", "--to-source", ("random", "random-fully", "persistent"),
    ("POSTROUTING", "INPUT"), base=False))
DNAT = REGISTRY.add_target(_nat_entry(
    "DNAT", "--to-destination", ("random", "persistent"), ("PREROUTING", "OUTPUT"), base=True))


def _ports_entry(name: str, flags: tuple[str, ...], chains: tuple[str, ...]) -> TargetEntry:
    def build(opts: Opts, ctx: Context) -> Nat:
        v = one(opts, "to-ports")
        r = NatRange()
        if v is not None:
            lo, hi, _ = parse_ports(v.args[0], name)
            _need_port_proto(name, ctx, v.args[0])
            r = NatRange(port_lo=lo, port_hi=hi)
        return Nat(r, _flags(opts))

    def save(p: Nat, ctx: Context) -> list[str]:
        out: list[str] = []
        if p.range.port_lo is not None:
            lo, hi = p.range.port_lo, p.range.port_hi
            out += ["--to-ports", str(lo) if lo == hi else f"{lo}-{hi}"]
        return out + [f"--{f}" for f in p.flags]

    def check(p: Nat, ctx: Context) -> str | None:
        if ctx.chain and ctx.chain not in chains:
            return f"{name}: used from {ctx.chain}, but only valid from {'/'.join(chains)}"
        return None

    def describe(p: Nat, ctx: Context, numeric: bool) -> str:
        words = list(p.flags)
        if p.range.port_lo is not None:
            lo, hi = p.range.port_lo, p.range.port_hi
            label = "masq ports:" if name == "MASQUERADE" else "redir ports"
            words.insert(0, f"{label} {lo}" + ("" if lo == hi else f"-{hi}"))
        return " ".join(words)

    options = (Option(("--to-ports",), "to-ports", invert=False), *_flag_opts(*flags))
    return TargetEntry(name, options, build, save, tables=frozenset({"nat"}), check_hook=check,
                       describe=describe)


MASQUERADE = REGISTRY.add_target(_ports_entry(
    "MASQUERADE", ("random", "random-fully"), ("POSTROUTING",)))
REDIRECT = REGISTRY.add_target(_ports_entry("REDIRECT", ("random",), ("PREROUTING", "OUTPUT")))
