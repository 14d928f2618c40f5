"""Header-rewriting and marking targets that parse and print (not compiled yet): TTL, HL,
TOS, DSCP, CLASSIFY, AUDIT."""

from __future__ import annotations

from dataclasses import dataclass

from ..ir.model import Family
from .misc import parse_dscp, parse_tos, tos_symbol
from .registry import REGISTRY, Context, MatchError, Option, TargetEntry
from .util import Opts, arg, exclusive, need
from .values import parse_uint

MANGLE = frozenset({"mangle"})


@dataclass(frozen=True)
class HopSet:
    """TTL / HL target: mode "set", "inc" or "dec" by `value`."""

    mode: str
    value: int


_HOP_WORDS = {"set": "set to", "inc": "increment by", "dec": "decrement by"}


def _hop_target(name: str, prefix: str, family: Family) -> TargetEntry:
    modes = ("set", "inc", "dec")

    def build(opts: Opts, ctx: Context) -> HopSet:
        if ctx.family is not family:
            raise MatchError(f"{name} is not available for {ctx.family.value}", name)
        exclusive(name, opts, *modes)
        need(name, opts, *modes, names=f"--{prefix}-set, --{prefix}-inc or --{prefix}-dec")
        mode = next(m for m in modes if m in opts)
        lo = 0 if mode == "set" else 1
        return HopSet(mode, parse_uint(arg(opts, mode), lo, 255, f"{name} value"))

    return TargetEntry(
        name, tuple(Option((f"--{prefix}-{m}",), m, invert=False) for m in modes), build,
        lambda p, c: [f"--{prefix}-{p.mode}", str(p.value)], terminal=False, tables=MANGLE,
        families=frozenset({family}),
        describe=lambda p, c, n: f"{name} {_HOP_WORDS[p.mode]} {p.value}")


TTL = REGISTRY.add_target(_hop_target("TTL", "ttl", Family.IPV4))
HL = REGISTRY.add_target(_hop_target("HL", "hl", Family.IPV6))

_TOS_OPS = ("set-tos", "and-tos", "or-tos", "xor-tos")


def _build_tos(opts: Opts, ctx: Context) -> tuple[int, int]:
    exclusive("TOS", opts, *_TOS_OPS)
    need("TOS", opts, *_TOS_OPS, names="--set-tos")
    op = next(o for o in _TOS_OPS if o in opts)
    if op == "set-tos":
        return parse_tos(arg(opts, op))
    bits = parse_uint(arg(opts, op), 0, 255, "TOS")
    return {"and-tos": (0, ~bits & 0xFF), "or-tos": (bits, bits), "xor-tos": (bits, 0)}[op]


def _describe_tos(p: tuple[int, int], ctx: Context, numeric: bool) -> str:
    value, mask = p
    if numeric:
        return f"TOS set 0x{value:02x}/0x{mask:02x}"
    if (sym := tos_symbol(value, mask, numeric)) is not None:
        return f" TOS set{sym}"  # iptables' spacing, as printed
    if value == 0:
        return f"TOS and 0x{~mask & 0xFF:02x}"
    if value == mask:
        return f"TOS or 0x{value:02x}"
    if mask == 0:
        return f"TOS xor 0x{value:02x}"
    return f"TOS set 0x{value:02x}/0x{mask:02x}"


TOS = REGISTRY.add_target(TargetEntry(
    "TOS", tuple(Option((f"--{o}",), o, invert=False) for o in _TOS_OPS), _build_tos,
    lambda p, c: ["--set-tos", f"0x{p[0]:02x}/0x{p[1]:02x}"], terminal=False, tables=MANGLE,
    describe=_describe_tos))

DSCP = REGISTRY.add_target(TargetEntry(
    "DSCP", (Option(("--set-dscp",), "set-dscp", invert=False),
             Option(("--set-dscp-class",), "set-dscp-class", invert=False)),
    lambda o, c: parse_dscp(o, "set-dscp", "set-dscp-class", "DSCP")[0],
    lambda p, c: ["--set-dscp", f"0x{p:02x}"], terminal=False, tables=MANGLE,
    describe=lambda p, c, n: f"DSCP set 0x{p:02x}"))


def _build_classify(opts: Opts, ctx: Context) -> tuple[int, int]:
    need("CLASSIFY", opts, "set-class")
    text = arg(opts, "set-class")
    major, colon, minor = text.partition(":")
    try:
        if not colon:
            raise ValueError
        return int(major, 16), int(minor, 16)
    except ValueError:
        raise MatchError(f"CLASSIFY: bad class value {text!r}", text) from None


def _check_classify(p: object, ctx: Context) -> str | None:
    if ctx.chain and ctx.chain not in ("FORWARD", "OUTPUT", "POSTROUTING"):
        return f"CLASSIFY: used from {ctx.chain}, but only valid from FORWARD/OUTPUT/POSTROUTING"
    return None


CLASSIFY = REGISTRY.add_target(TargetEntry(
    "CLASSIFY", (Option(("--set-class",), "set-class", invert=False),), _build_classify,
    lambda p, c: ["--set-class", f"{p[0]:04x}:{p[1]:04x}"], terminal=False, tables=MANGLE,
    check_hook=_check_classify, describe=lambda p, c, n: f"CLASSIFY set {p[0]:x}:{p[1]:x}"))


def _build_audit(opts: Opts, ctx: Context) -> str:
    need("AUDIT", opts, "type")
    t = arg(opts, "type").lower()
    if t not in ("accept", "drop", "reject"):
        raise MatchError(f"AUDIT: bad --type {t!r}", arg(opts, "type"))
    return t


AUDIT = REGISTRY.add_target(TargetEntry(
    "AUDIT", (Option(("--type",), "type", invert=False),), _build_audit,
    lambda p, c: ["--type", p], terminal=False, describe=lambda p, c, n: f"AUDIT {p}"))
