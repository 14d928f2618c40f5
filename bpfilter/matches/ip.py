"""The built-in part of a rule: -s, -d, -i, -o, -p, -f (netfilter's ip_packet_match)."""

from __future__ import annotations

from dataclasses import dataclass

from ..ir.model import Family
from ..ir.pred import Cmp, Const, Field, NonFirstFragment, Pred, Proto, negate
from .registry import REGISTRY, Context, MatchEntry, MatchError, Option, OptVal
from .values import Iface, Net, parse_iface, parse_net, parse_proto, proto_name

# Order in which iptables-save prints the built-in options.
BUILTIN_ORDER = ("src", "dst", "iif", "oif", "proto", "frag")


@dataclass(frozen=True)
class AddrMatch:
    """-s / -d: one network (lists are expanded into one rule each by the front-end)."""

    net: Net
    invert: bool = False


@dataclass(frozen=True)
class IfaceMatch:
    """-i / -o."""

    iface: Iface
    invert: bool = False


@dataclass(frozen=True)
class ProtoMatch:
    """-p (0 is `all`)."""

    proto: int
    invert: bool = False


@dataclass(frozen=True)
class FragMatch:
    """-f: the packet is a second or further fragment."""

    invert: bool = False


def _one(opts: dict, key: str) -> OptVal:
    v = opts[key]
    return v[-1] if isinstance(v, list) else v


def _addr_entry(kind: str, flag: str, long: str, f4: Field, f6: Field) -> MatchEntry:
    def build(opts: dict, ctx: Context) -> AddrMatch:
        v = _one(opts, kind)
        if "," in v.args[0]:
            raise MatchError(f"{flag}: address lists must be expanded by the front-end", v.args[0])
        return AddrMatch(parse_net(v.args[0], ctx.family), v.invert)

    def save(p: AddrMatch, ctx: Context) -> list[str]:
        return [*(["!"] if p.invert else []), flag, str(p.net)]

    def lower(p: AddrMatch, ctx: Context) -> Pred:
        field = f4 if ctx.family is Family.IPV4 else f6
        if not any(p.net.mask):
            return Const(not p.invert)
        return negate(Cmp(field, p.net.addr, p.net.mask), p.invert)

    return MatchEntry(kind, (Option((flag, long), kind),), build, save, lower, builtin=True)


def _iface_entry(kind: str, flag: str, long: str, field: Field) -> MatchEntry:
    def build(opts: dict, ctx: Context) -> IfaceMatch:
        v = _one(opts, kind)
        return IfaceMatch(parse_iface(v.args[0]), v.invert)

    def save(p: IfaceMatch, ctx: Context) -> list[str]:
        return [*(["!"] if p.invert else []), flag, str(p.iface)]

    def lower(p: IfaceMatch, ctx: Context) -> Pred:
        if p.iface.name == "+":
            return Const(not p.invert)
        value, mask = p.iface.pattern()
        return negate(Cmp(field, value, mask), p.invert)

    return MatchEntry(kind, (Option((flag, long), kind),), build, save, lower, builtin=True)


def _build_proto(opts: dict, ctx: Context) -> ProtoMatch:
    v = _one(opts, "proto")
    proto = parse_proto(v.args[0])
    if proto == 0 and v.invert:
        raise MatchError("rule would never match protocol", v.args[0])
    return ProtoMatch(proto, v.invert)


def _save_proto(p: ProtoMatch, ctx: Context) -> list[str]:
    if p.proto == 0:
        return ["-p", "all"] if ctx.family is Family.IPV6 else []
    return [*(["!"] if p.invert else []), "-p", proto_name(p.proto, ctx.family)]


def _lower_proto(p: ProtoMatch, ctx: Context) -> Pred:
    if p.proto == 0 and ctx.family is Family.IPV4:
        return Const(True)
    # ip6tables walks the extension headers whenever -p is given, `all` included.
    return Proto(p.proto, p.invert)


def _build_frag(opts: dict, ctx: Context) -> FragMatch:
    if ctx.family is Family.IPV6:
        raise MatchError("-f is not supported by ip6tables (use -m frag)", "-f")
    return FragMatch(_one(opts, "frag").invert)


def _save_frag(p: FragMatch, ctx: Context) -> list[str]:
    return [*(["!"] if p.invert else []), "-f"]


def _lower_frag(p: FragMatch, ctx: Context) -> Pred:
    return negate(NonFirstFragment(), p.invert)


def _check_oif(p: IfaceMatch, ctx: Context) -> str | None:
    if ctx.chain in ("INPUT", "PREROUTING"):
        return f"Can't use -o with {ctx.chain}"
    return None


def _check_iif(p: IfaceMatch, ctx: Context) -> str | None:
    if ctx.chain in ("OUTPUT", "POSTROUTING"):
        return f"Can't use -i with {ctx.chain}"
    return None


SRC = REGISTRY.add_match(_addr_entry("src", "-s", "--source", Field.SADDR4, Field.SADDR6))
DST = REGISTRY.add_match(_addr_entry("dst", "-d", "--destination", Field.DADDR4, Field.DADDR6))
# iptables also takes --src / --dst as synonyms.
object.__setattr__(SRC, "options", (Option(("-s", "--source", "--src"), "src"),))
object.__setattr__(DST, "options", (Option(("-d", "--destination", "--dst"), "dst"),))
IIF = REGISTRY.add_match(_iface_entry("iif", "-i", "--in-interface", Field.IIFNAME))
OIF = REGISTRY.add_match(_iface_entry("oif", "-o", "--out-interface", Field.OIFNAME))
PROTO = REGISTRY.add_match(MatchEntry(
    "proto", (Option(("-p", "--protocol"), "proto"),), _build_proto, _save_proto, _lower_proto,
    builtin=True))
FRAG = REGISTRY.add_match(MatchEntry(
    "frag", (Option(("-f", "--fragments"), "frag", nargs=0),), _build_frag, _save_frag,
    _lower_frag, builtin=True, families=frozenset({Family.IPV4})))
object.__setattr__(IIF, "check_hook", _check_iif)
object.__setattr__(OIF, "check_hook", _check_oif)
