"""The icmp (ip_tables' icmp_match) and icmp6 (ip6_tables' icmp6_match) matches."""

from __future__ import annotations

from dataclasses import dataclass

from ..ir.model import Family
from ..ir.pred import (
    L4,
    AllOf,
    Cmp,
    Const,
    Field,
    Pred,
    Range,
    TransportHeader,
    all_of,
    negate,
)
from .kernel import IpProto
from .registry import REGISTRY, Context, MatchEntry, MatchError, Option
from .util import Opts, bang, one
from .values import parse_uint

ANY = 0xFF  # type 255 matches every type and code (icmp_type_code_match)

# (name, type, lowest code, highest code) in iptables' table order (prefixes resolve in it).
ICMP_TYPES: tuple[tuple[str, int, int, int], ...] = (
    ("any", 0xFF, 0, 0xFF),
    ("echo-reply", 0, 0, 0xFF), ("pong", 0, 0, 0xFF),
    ("destination-unreachable", 3, 0, 0xFF),
    ("network-unreachable", 3, 0, 0), ("host-unreachable", 3, 1, 1),
    ("protocol-unreachable", 3, 2, 2), ("port-unreachable", 3, 3, 3),
    ("fragmentation-needed", 3, 4, 4), ("source-route-failed", 3, 5, 5),
    ("network-unknown", 3, 6, 6), ("host-unknown", 3, 7, 7),
    ("network-prohibited", 3, 9, 9), ("host-prohibited", 3, 10, 10),
    ("TOS-network-unreachable", 3, 11, 11), ("TOS-host-unreachable", 3, 12, 12),
    ("communication-prohibited", 3, 13, 13), ("host-precedence-violation", 3, 14, 14),
    ("precedence-cutoff", 3, 15, 15),
    ("source-quench", 4, 0, 0xFF),
    ("redirect", 5, 0, 0xFF),
    ("network-redirect", 5, 0, 0), ("host-redirect", 5, 1, 1),
    ("TOS-network-redirect", 5, 2, 2), ("TOS-host-redirect", 5, 3, 3),
    ("echo-request", 8, 0, 0xFF), ("ping", 8, 0, 0xFF),
    ("router-advertisement", 9, 0, 0xFF), ("router-solicitation", 10, 0, 0xFF),
    ("time-exceeded", 11, 0, 0xFF), ("ttl-exceeded", 11, 0, 0xFF),
    ("ttl-zero-during-transit", 11, 0, 0), ("ttl-zero-during-reassembly", 11, 1, 1),
    ("parameter-problem", 12, 0, 0xFF),
    ("ip-header-bad", 12, 0, 0), ("required-option-missing", 12, 1, 1),
    ("timestamp-request", 13, 0, 0xFF), ("timestamp-reply", 14, 0, 0xFF),
    ("address-mask-request", 17, 0, 0xFF), ("address-mask-reply", 18, 0, 0xFF),
)

ICMPV6_TYPES: tuple[tuple[str, int, int, int], ...] = (
    ("destination-unreachable", 1, 0, 0xFF),
    ("no-route", 1, 0, 0), ("communication-prohibited", 1, 1, 1),
    ("beyond-scope", 1, 2, 2), ("address-unreachable", 1, 3, 3),
    ("port-unreachable", 1, 4, 4), ("failed-policy", 1, 5, 5), ("reject-route", 1, 6, 6),
    ("packet-too-big", 2, 0, 0xFF),
    ("time-exceeded", 3, 0, 0xFF), ("ttl-exceeded", 3, 0, 0xFF),
    ("ttl-zero-during-transit", 3, 0, 0), ("ttl-zero-during-reassembly", 3, 1, 1),
    ("parameter-problem", 4, 0, 0xFF),
    ("bad-header", 4, 0, 0), ("unknown-header-type", 4, 1, 1), ("unknown-option", 4, 2, 2),
    ("echo-request", 128, 0, 0xFF), ("ping", 128, 0, 0xFF),
    ("echo-reply", 129, 0, 0xFF), ("pong", 129, 0, 0xFF),
    ("mld-listener-query", 130, 0, 0xFF), ("mld-listener-report", 131, 0, 0xFF),
    ("mld-listener-done", 132, 0, 0xFF), ("mld-listener-reduction", 132, 0, 0xFF),
    ("router-solicitation", 133, 0, 0xFF), ("router-advertisement", 134, 0, 0xFF),
    ("neighbour-solicitation", 135, 0, 0xFF), ("neighbor-solicitation", 135, 0, 0xFF),
    ("neighbour-advertisement", 136, 0, 0xFF), ("neighbor-advertisement", 136, 0, 0xFF),
    ("redirect", 137, 0, 0xFF),
)


@dataclass(frozen=True)
class IcmpMatch:
    """An ICMP (or ICMPv6) type with a code range, possibly negated."""

    type: int
    code_lo: int = 0
    code_hi: int = 0xFF
    invert: bool = False


def parse_icmp_type(text: str, table: tuple[tuple[str, int, int, int], ...],
                    what: str) -> tuple[int, int, int]:
    """A type name (unambiguous prefix, any case) or `type[/code[:code]]`."""
    if text and not text[0].isdigit():
        hits = [e for e in table if e[0].lower().startswith(text.lower())]
        exact = [e for e in hits if e[0].lower() == text.lower()]
        if len(hits) > 1 and not exact:
            raise MatchError(f"Ambiguous {what} type {text!r}: {hits[0][0]!r} or {hits[1][0]!r}?",
                             text)
        if not hits:
            raise MatchError(f"Unknown {what} type {text!r}", text)
        _, t, lo, hi = (exact or hits)[0]
        return t, lo, hi
    type_s, slash, code_s = text.partition("/")
    t = parse_uint(type_s, 0, 255, f"{what} type")
    if not slash:
        return t, 0, 0xFF
    lo_s, colon, hi_s = code_s.partition(":")
    lo = parse_uint(lo_s, 0, 255, f"{what} code")
    hi = parse_uint(hi_s, 0, 255, f"{what} code") if colon else lo
    return t, lo, hi


def _builder(table: tuple[tuple[str, int, int, int], ...], key: str, what: str):
    def build(opts: Opts, ctx: Context) -> IcmpMatch:
        v = one(opts, key)
        if v is None:
            raise MatchError(f'{what.lower()}: option "--{key}" must be specified', key)
        t, lo, hi = parse_icmp_type(v.args[0], table, what)
        return IcmpMatch(t, lo, hi, v.invert)

    return build


def _save_icmp(p: IcmpMatch, ctx: Context) -> list[str]:
    if p.type == ANY and p.code_lo == 0 and p.code_hi == 0xFF:
        text = "any"
    elif p.code_lo == 0 and p.code_hi == 0xFF:
        text = str(p.type)
    elif p.code_lo == p.code_hi:
        text = f"{p.type}/{p.code_lo}"
    else:
        # iptables prints only the lower code here; the range keeps save/parse faithful.
        text = f"{p.type}/{p.code_lo}:{p.code_hi}"
    return [*bang(p.invert), "--icmp-type", text]


def _save_icmp6(p: IcmpMatch, ctx: Context) -> list[str]:
    text = str(p.type)
    if p.code_lo == p.code_hi:
        text += f"/{p.code_lo}"
    elif (p.code_lo, p.code_hi) != (0, 0xFF):
        text += f"/{p.code_lo}:{p.code_hi}"
    return [*bang(p.invert), "--icmpv6-type", text]


def _describer(module: str, table: tuple[tuple[str, int, int, int], ...]):
    # ip6tables 1.8.9 names no MLD types (it does not even parse them).
    names = [e for e in table if not e[0].startswith("mld-")]

    def describe(p: IcmpMatch, ctx: Context, numeric: bool) -> str:
        inv = "!" if p.invert else ""
        if not numeric:
            for name, t, lo, hi in names:
                if (t, lo, hi) == (p.type, p.code_lo, p.code_hi):
                    return f"{module} {inv}{name}"
        # The missing space after the module name is iptables' own.
        out = f"{module} !type {p.type}" if p.invert else f"{module}type {p.type}"
        if p.code_lo == p.code_hi:
            out += f" code {p.code_lo}"
        elif (p.code_lo, p.code_hi) != (0, 0xFF):
            out += f" codes {p.code_lo}-{p.code_hi}"
        return out

    return describe


def lower_icmp(p: IcmpMatch, ctx: Context) -> Pred:
    """A later fragment never matches, a short header drops; for ICMP (not ICMPv6: ip6_tables
    has no wildcard) type 255 matches every message."""
    if p.type == ANY and ctx.family is Family.IPV4:
        test: Pred = Const(True)
    else:
        code: Pred = Const(True)
        if (p.code_lo, p.code_hi) != (0, 0xFF):
            code = (Cmp(Field.ICMPCODE, p.code_lo) if p.code_lo == p.code_hi
                    else Range(Field.ICMPCODE, p.code_lo, p.code_hi))
        test = all_of(Cmp(Field.ICMPTYPE, p.type), code)
    test = negate(test, p.invert)
    if test == Const(False):
        # `! --icmp-type any` never matches, but a truncated header is still dropped.
        return AllOf((TransportHeader(L4.SMALL), test))
    return all_of(TransportHeader(L4.SMALL), test)


ICMP = REGISTRY.add_match(MatchEntry(
    "icmp", (Option(("--icmp-type",), "icmp-type"),),
    _builder(ICMP_TYPES, "icmp-type", "ICMP"), _save_icmp, lower_icmp,
    families=frozenset({Family.IPV4}), proto=(IpProto.ICMP,),
    describe=_describer("icmp", ICMP_TYPES)))

ICMP6 = REGISTRY.add_match(MatchEntry(
    "icmp6", (Option(("--icmpv6-type",), "icmpv6-type"),),
    _builder(ICMPV6_TYPES, "icmpv6-type", "ICMPv6"), _save_icmp6, lower_icmp,
    families=frozenset({Family.IPV6}), proto=(IpProto.ICMPV6,),
    aliases=("icmpv6", "ipv6-icmp"), describe=_describer("ipv6-icmp", ICMPV6_TYPES)))
