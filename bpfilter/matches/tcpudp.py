"""The tcp and udp matches (xt_tcpudp): ports, TCP flags, --syn, --tcp-option."""

from __future__ import annotations

from dataclasses import dataclass

from ..ir.pred import (
    L4,
    Cmp,
    Field,
    Pred,
    Range,
    TcpOption,
    TransportHeader,
    all_of,
    negate,
)
from .names import port_text
from .registry import REGISTRY, Context, MatchEntry, MatchError, Option, OptVal
from .values import PortRange, parse_port_range

TCP, UDP = 6, 17

# TCP flag bits of header byte 13, in the order iptables prints them.
TCP_FLAGS = {"FIN": 0x01, "SYN": 0x02, "RST": 0x04, "PSH": 0x08, "ACK": 0x10, "URG": 0x20,
             "ECE": 0x40, "CWR": 0x80}
ALL_FLAGS = 0x3F  # iptables' ALL: the six classic flags


@dataclass(frozen=True)
class PortTest:
    """A port range test, possibly negated."""

    range: PortRange
    invert: bool = False


@dataclass(frozen=True)
class FlagsTest:
    """(flags & mask) == comp, possibly negated."""

    mask: int
    comp: int
    invert: bool = False


@dataclass(frozen=True)
class TcpUdpMatch:
    """Parameters of `-m tcp` / `-m udp`."""

    sport: PortTest | None = None
    dport: PortTest | None = None
    flags: FlagsTest | None = None  # tcp only
    option: tuple[int, bool] | None = None  # tcp only: (option kind, invert)


def parse_flags(text: str) -> int:
    """A comma-separated TCP flag list (`ALL`, `NONE` too; iptables knows no ECE or CWR)."""
    value = 0
    for name in text.upper().split(","):
        if name == "ALL":
            value |= ALL_FLAGS
        elif name == "NONE":
            continue
        elif name in TCP_FLAGS and TCP_FLAGS[name] & ALL_FLAGS:
            value |= TCP_FLAGS[name]
        else:
            raise MatchError(f"Unknown TCP flag {name!r}", name)
    return value


def print_flags(value: int) -> str:
    """Flags as iptables-save prints them."""
    if value == 0:
        return "NONE"
    names = [n for n, bit in TCP_FLAGS.items() if value & bit]
    return ",".join(names)


def _one(v: OptVal | list[OptVal]) -> OptVal:
    return v[-1] if isinstance(v, list) else v


def _ports(opts: dict, key: str, proto: str) -> PortTest | None:
    if key not in opts:
        return None
    v = _one(opts[key])
    r = parse_port_range(v.args[0], proto)
    if (r.lo, r.hi) == (0, 65535) and not v.invert:
        return None  # matches every port: iptables prints nothing
    return PortTest(r, v.invert)


def _build(proto: str):
    def build(opts: dict, ctx: Context) -> TcpUdpMatch:
        sport = _ports(opts, "sport", proto)
        dport = _ports(opts, "dport", proto)
        flags = None
        option = None
        if proto == "tcp":
            if "flags" in opts and "syn" in opts:
                raise MatchError("Only one of `--syn' or `--tcp-flags' may be specified", "--syn")
            if "syn" in opts:
                v = _one(opts["syn"])
                flags = FlagsTest(0x17, 0x02, v.invert)  # SYN,RST,ACK,FIN == SYN
            elif "flags" in opts:
                v = _one(opts["flags"])
                flags = FlagsTest(parse_flags(v.args[0]), parse_flags(v.args[1]), v.invert)
                if flags == FlagsTest(0, 0):
                    flags = None  # always true: iptables prints nothing
            if "option" in opts:
                v = _one(opts["option"])
                if not v.args[0].isdigit() or not 1 <= int(v.args[0]) <= 255:
                    raise MatchError(f"tcp: bad TCP option {v.args[0]!r}", v.args[0])
                option = (int(v.args[0]), v.invert)
        return TcpUdpMatch(sport, dport, flags, option)

    return build


def _save(p: TcpUdpMatch, ctx: Context) -> list[str]:
    out: list[str] = []
    for name, t in (("--sport", p.sport), ("--dport", p.dport)):
        if t is not None:
            out += [*(["!"] if t.invert else []), name, str(t.range)]
    if p.option is not None:
        out += [*(["!"] if p.option[1] else []), "--tcp-option", str(p.option[0])]
    if p.flags is not None:
        out += [*(["!"] if p.flags.invert else []), "--tcp-flags", print_flags(p.flags.mask),
                print_flags(p.flags.comp)]
    return out


def describe_ports(name: str, t: PortTest | None, proto: str | None, numeric: bool) -> str:
    """` spt:22` / ` dpts:!1:1023` as the tcp, udp and sctp matches print a port test."""
    if t is None or ((t.range.lo, t.range.hi) == (0, 0xFFFF) and not t.invert):
        return ""
    inv = "!" if t.invert else ""
    lo = port_text(t.range.lo, proto, numeric)
    if t.range.lo == t.range.hi:
        return f" {name}:{inv}{lo}"
    return f" {name}s:{inv}{lo}:{port_text(t.range.hi, proto, numeric)}"


def _describe(proto: str):
    def describe(p: TcpUdpMatch, ctx: Context, numeric: bool) -> str:
        out = proto + describe_ports("spt", p.sport, proto, numeric)
        out += describe_ports("dpt", p.dport, proto, numeric)
        if p.option is not None:
            out += f" option={'!' if p.option[1] else ''}{p.option[0]}"
        if p.flags is not None:
            f = p.flags
            text = (f"0x{f.mask:02X}/0x{f.comp:02X}" if numeric
                    else f"{print_flags(f.mask)}/{print_flags(f.comp)}")
            out += f" flags:{'!' if f.invert else ''}{text}"
        return out

    return describe


def _port_pred(field: Field, t: PortTest | None) -> Pred | None:
    if t is None or (t.range.lo == 0 and t.range.hi == 65535 and not t.invert):
        return None
    r = t.range
    base = Cmp(field, r.lo) if r.lo == r.hi else Range(field, r.lo, r.hi)
    return negate(base, t.invert)


def _lower(tcp: bool):
    def lower(p: TcpUdpMatch, ctx: Context) -> Pred:
        preds: list[Pred] = [TransportHeader(L4.TCP if tcp else L4.SMALL, evil_frag=tcp)]
        for f, t in ((Field.SPORT, p.sport), (Field.DPORT, p.dport)):
            pr = _port_pred(f, t)
            if pr is not None:
                preds.append(pr)
        if p.flags is not None:
            preds.append(negate(Cmp(Field.TCPFLAGS, p.flags.comp, p.flags.mask), p.flags.invert))
        if p.option is not None:
            preds.append(negate(TcpOption(p.option[0]), p.option[1]))
        return all_of(*preds)

    return lower


_PORT_OPTS = (
    Option(("--source-port", "--sport"), "sport"),
    Option(("--destination-port", "--dport"), "dport"),
)

TCP_MATCH = REGISTRY.add_match(MatchEntry(
    "tcp",
    (*_PORT_OPTS,
     Option(("--tcp-flags",), "flags", nargs=2),
     Option(("--syn",), "syn", nargs=0),
     Option(("--tcp-option",), "option")),
    _build("tcp"), _save, _lower(True), proto=(TCP,), describe=_describe("tcp")))

UDP_MATCH = REGISTRY.add_match(MatchEntry(
    "udp", _PORT_OPTS, _build("udp"), _save, _lower(False), proto=(UDP,),
    describe=_describe("udp")))
