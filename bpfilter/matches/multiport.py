"""The multiport match (xt_multiport revision 1: up to 15 port slots, ranges take two)."""

from __future__ import annotations

from dataclasses import dataclass

from ..ir.pred import L4, Cmp, Field, Pred, Range, TransportHeader, all_of, any_of, negate
from .kernel import IpProto
from .names import port_text
from .registry import REGISTRY, Context, MatchEntry, MatchError, Option
from .util import Opts, bang, exclusive, one
from .values import PortRange, parse_port, proto_name

MAX_SLOTS = 15  # XT_MULTI_PORTS
PROTOS = (IpProto.TCP, IpProto.UDP, IpProto.UDPLITE, IpProto.SCTP, IpProto.DCCP)
_FLAGS = {"sports": "--sports", "dports": "--dports", "ports": "--ports"}


@dataclass(frozen=True)
class MultiportMatch:
    """Which ports to test ("sports", "dports" or "ports": either) against a list of ranges."""

    which: str
    ports: tuple[PortRange, ...]
    invert: bool = False


def parse_ports(text: str, proto: str | None) -> tuple[PortRange, ...]:
    """A comma list of ports and `lo:hi` ranges (a range needs lo < hi and two slots)."""
    out: list[PortRange] = []
    slots = 0
    for item in text.split(","):
        if slots >= MAX_SLOTS:
            raise MatchError("multiport: too many ports specified", text)
        lo_s, colon, hi_s = item.partition(":")
        if colon and slots == MAX_SLOTS - 1:
            raise MatchError("multiport: too many ports specified", text)
        lo = parse_port(lo_s, proto)
        if colon:
            hi = parse_port(hi_s, proto)
            if lo >= hi:
                raise MatchError(f"multiport: invalid portrange {item!r} specified", item)
            out.append(PortRange(lo, hi))
            slots += 2
        else:
            out.append(PortRange(lo, lo))
            slots += 1
    return tuple(out)


def _build(opts: Opts, ctx: Context) -> MultiportMatch:
    exclusive("multiport", opts, *_FLAGS)
    for key in _FLAGS:
        v = one(opts, key)
        if v is not None:
            pname = proto_name(ctx.proto) if ctx.proto is not None else None
            return MultiportMatch(key, parse_ports(v.args[0], pname), v.invert)
    raise MatchError("multiport expects an option", "multiport")


def _save(p: MultiportMatch, ctx: Context) -> list[str]:
    return [*bang(p.invert), _FLAGS[p.which], ",".join(str(r) for r in p.ports)]


# The protocols multiport looks service names up for (by `-p`); others print numbers.
_PROTO_NAMES = {IpProto.TCP: "tcp", IpProto.UDP: "udp", IpProto.UDPLITE: "udplite",
                IpProto.SCTP: "sctp", IpProto.DCCP: "dccp"}


def _describe(p: MultiportMatch, ctx: Context, numeric: bool) -> str:
    proto = _PROTO_NAMES.get(ctx.proto) if ctx.proto is not None else None
    ports = ",".join(
        port_text(r.lo, proto, numeric) + ("" if r.lo == r.hi else
                                           ":" + port_text(r.hi, proto, numeric))
        for r in p.ports)
    # "dports  !80": iptables prints the negation after a space of its own.
    return f"multiport {p.which} {' !' if p.invert else ''}{ports}"


def _lower(p: MultiportMatch, ctx: Context) -> Pred:
    fields = {"sports": (Field.SPORT,), "dports": (Field.DPORT,),
              "ports": (Field.SPORT, Field.DPORT)}[p.which]
    tests: list[Pred] = []
    for r in p.ports:
        for f in fields:
            tests.append(Cmp(f, r.lo) if r.lo == r.hi else Range(f, r.lo, r.hi))
    # Only the four port bytes are read; a later fragment is false even when negated.
    return all_of(TransportHeader(L4.PORTS), negate(any_of(*tests), p.invert))


MULTIPORT = REGISTRY.add_match(MatchEntry(
    "multiport",
    (Option(("--source-ports", "--sports"), "sports"),
     Option(("--destination-ports", "--dports"), "dports"),
     Option(("--ports",), "ports")),
    _build, _save, _lower, proto=PROTOS, proto_first=True, describe=_describe))
