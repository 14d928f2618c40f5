"""The standard targets (ACCEPT, DROP, RETURN, jumps and gotos), REJECT and MARK."""

from __future__ import annotations

from dataclasses import dataclass

from ..ir.model import ACCEPT, DROP, GOTO, JUMP, RETURN, Family
from .kernel import IpProto
from .registry import REGISTRY, Context, MatchError, Option, TargetEntry
from .util import Opts, exclusive, need, one
from .values import parse_uint, parse_value_mask

REGISTRY.add_target(TargetEntry(ACCEPT))
REGISTRY.add_target(TargetEntry(DROP))
REGISTRY.add_target(TargetEntry(RETURN))
# Jumps and gotos name a chain; the front-end builds their ChainRef parameter itself.
REGISTRY.add_target(TargetEntry(JUMP, terminal=False))
REGISTRY.add_target(TargetEntry(GOTO))

# --- REJECT ----------------------------------------------------------------------------------

# name, alias, (ICMP type, code) or None for a TCP reset; in iptables' table order.
REJECT4: tuple[tuple[str, str, tuple[int, int] | None], ...] = (
    ("icmp-net-unreachable", "net-unreach", (3, 0)),
    ("icmp-host-unreachable", "host-unreach", (3, 1)),
    ("icmp-proto-unreachable", "proto-unreach", (3, 2)),
    ("icmp-port-unreachable", "port-unreach", (3, 3)),
    ("icmp-net-prohibited", "net-prohib", (3, 9)),
    ("icmp-host-prohibited", "host-prohib", (3, 10)),
    ("tcp-reset", "tcp-rst", None),
    ("icmp-admin-prohibited", "admin-prohib", (3, 13)),
)
REJECT6: tuple[tuple[str, str, tuple[int, int] | None], ...] = (
    ("icmp6-no-route", "no-route", (1, 0)),
    ("icmp6-adm-prohibited", "adm-prohibited", (1, 1)),
    ("icmp6-addr-unreachable", "addr-unreach", (1, 3)),
    ("icmp6-port-unreachable", "port-unreach", (1, 4)),
    ("tcp-reset", "tcp-reset", None),
    ("icmp6-policy-fail", "policy-fail", (1, 5)),
    ("icmp6-reject-route", "reject-route", (1, 6)),
)
REJECT_CHAINS = ("INPUT", "FORWARD", "OUTPUT")


@dataclass(frozen=True)
class Reject:
    """REJECT --reject-with `name` (canonical): an ICMP error (`icmp` = type, code) or a TCP
    reset (`icmp` None)."""

    name: str
    icmp: tuple[int, int] | None


def _build_reject(opts: Opts, ctx: Context) -> Reject:
    table = REJECT4 if ctx.family is Family.IPV4 else REJECT6
    v = one(opts, "reject-with")
    if v is None:
        name, _, icmp = table[3]
        return Reject(name, icmp)
    text = v.args[0]
    if text.lower() in ("echo-reply", "echoreply"):
        raise MatchError(f"REJECT: --reject-with {text} no longer supported", text)
    for name, alias, icmp in table:
        if text and (name.startswith(text.lower()) or alias.startswith(text.lower())):
            if icmp is None and (ctx.proto != IpProto.TCP or ctx.proto_inverted):
                raise MatchError("REJECT: tcp-reset is only valid with -p tcp", text)
            return Reject(name, icmp)
    raise MatchError(f"REJECT: unknown reject type {text!r}", text)


def _check_reject(p: Reject, ctx: Context) -> str | None:
    if ctx.chain and ctx.chain not in REJECT_CHAINS:
        return f"REJECT: used from {ctx.chain}, but only valid from INPUT/FORWARD/OUTPUT"
    return None


REJECT = REGISTRY.add_target(TargetEntry(
    "REJECT", (Option(("--reject-with",), "reject-with", invert=False),),
    _build_reject, lambda p, c: ["--reject-with", p.name],
    tables=frozenset({"filter"}), check_hook=_check_reject,
    describe=lambda p, c, n: f"reject-with {p.name}"))

# --- MARK ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MarkSet:
    """skb->mark = (skb->mark & ~mask) ^ value (xt_MARK revision 2)."""

    value: int
    mask: int


_MARK_OPS = ("set-xmark", "set-mark", "and-mark", "or-mark", "xor-mark")


def _build_mark(opts: Opts, ctx: Context) -> MarkSet:
    exclusive("MARK", opts, *_MARK_OPS)
    need("MARK", opts, *_MARK_OPS, names="--set-xmark or --set-mark")
    for op in _MARK_OPS:
        v = one(opts, op)
        if v is None:
            continue
        if op in ("set-xmark", "set-mark"):
            value, mask = parse_value_mask(v.args[0])
            return MarkSet(value, mask if op == "set-xmark" else mask | value)
        bits = parse_uint(v.args[0], 0, 0xFFFFFFFF, "mark")
        if op == "and-mark":
            return MarkSet(0, ~bits & 0xFFFFFFFF)
        return MarkSet(bits, bits if op == "or-mark" else 0)
    raise AssertionError("unreachable")


def describe_xmark(who: str, value: int, mask: int) -> str:
    """How MARK and CONNMARK print `(mark & ~mask) ^ value`: as the simplest operation."""
    if value == 0:
        return f"{who} and 0x{~mask & 0xFFFFFFFF:x}"
    if value == mask:
        return f"{who} or 0x{value:x}"
    if mask == 0:
        return f"{who} xor 0x{value:x}"
    if mask == 0xFFFFFFFF:
        return f"{who} set 0x{value:x}"
    return f"{who} xset 0x{value:x}/0x{mask:x}"


def _check_mark(p: MarkSet, ctx: Context) -> str | None:
    if ctx.hook == "xdp":
        return "MARK: the packet mark does not exist at the XDP hook"
    return None


MARK = REGISTRY.add_target(TargetEntry(
    "MARK", tuple(Option((f"--{op}",), op, invert=False) for op in _MARK_OPS),
    _build_mark, lambda p, c: ["--set-xmark", f"0x{p.value:x}/0x{p.mask:x}"],
    terminal=False, check_hook=_check_mark,
    describe=lambda p, c, n: describe_xmark("MARK", p.value, p.mask)))
