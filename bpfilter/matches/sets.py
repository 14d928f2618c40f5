"""The set match (xt_set revision 4): `[!] --match-set NAME src,dst[,...]` and its flags.

The set must exist when the rule is parsed (the iptables front-end gets the ruleset's sets) and
be of the rule's family (or family-less, bitmap:port), as libxt_set checks with the kernel.
Members live in a map the programs look up, so they can change without recompiling.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..ir.model import Family
from ..ir.pred import Const, Pred, SetLookup, negate
from ..ir.sets import MAX_NAME, SetDef
from .registry import REGISTRY, Context, MatchEntry, MatchError, Option
from .util import Opts, bang, one
from .values import bare, parse_uint

DIM_MAX = 6  # IPSET_DIM_MAX
COUNTER_OPS = ("eq", "ne", "lt", "gt")


@dataclass(frozen=True)
class CounterTest:
    """--packets-* / --bytes-*: compare the member's counter with `value` (`op` as above)."""

    op: str
    value: int


@dataclass(frozen=True)
class SetMatch:
    """One `-m set` match; `src[i]` is True when dimension i is taken from the source."""

    name: str
    src: tuple[bool, ...]
    invert: bool = False
    return_nomatch: bool = False
    skip_counters: bool = False  # ! --update-counters
    skip_subcounters: bool = False  # ! --update-subcounters
    packets: CounterTest | None = None
    bytes: CounterTest | None = None
    definition: SetDef | None = None  # the set, as the ruleset defines it


def parse_dirs(text: str) -> tuple[bool, ...]:
    """`src,dst,...` as libxt_set reads it (each word only needs to start with src or dst)."""
    items = text.split(",")
    if len(items) > DIM_MAX:
        raise MatchError(f"Can't be more src/dst options than {DIM_MAX}.", text)
    out = []
    for item in items:
        if not item.startswith(("src", "dst")):
            raise MatchError("You must specify (the comma separated list of) 'src' or 'dst'.",
                             text)
        out.append(item.startswith("src"))
    return tuple(out)


def _counter(opts: Opts, what: str) -> CounterTest | None:
    given = [(op, v) for op in ("eq", "lt", "gt") if (v := one(opts, f"{what}-{op}")) is not None]
    if not given:
        return None
    if len(given) > 1:
        raise MatchError(f"only one of the --{what}-[eq|lt|gt] is allowed",
                         f"--{what}-{given[1][0]}")
    op, v = given[0]
    if v.invert:
        if op != "eq":
            raise MatchError(f"--{what}-{op} option cannot be inverted", f"--{what}-{op}")
        op = "ne"
    return CounterTest(op, parse_uint(v.args[0], 0, (1 << 64) - 1, "counter value"))


def _build(opts: Opts, ctx: Context) -> SetMatch:
    v = one(opts, "match-set")
    if v is None:
        raise MatchError("You must specify `--match-set' with proper arguments", "set")
    name, dirs = v.args
    if dirs.startswith(("-", "!")):
        raise MatchError("--match-set requires two args.", dirs)
    if len(name) > MAX_NAME:
        raise MatchError(f"setname `{name}' too long, max {MAX_NAME} characters.", name)
    d = ctx.sets.get(name)
    if d is None:
        raise MatchError(f"Set {name} doesn't exist.", name)
    if not d.fits(ctx.family):
        fam = "IPv4" if d.family is Family.IPV4 else "IPv6"
        raise MatchError(f"The protocol family of set {name} is {fam}, which is not "
                         "applicable.", name)
    rn = one(opts, "return-nomatch")
    uc, usc = one(opts, "update-counters"), one(opts, "update-subcounters")
    return SetMatch(name, parse_dirs(dirs), v.invert, rn is not None,
                    bool(uc and uc.invert), bool(usc and usc.invert),
                    _counter(opts, "packets"), _counter(opts, "bytes"), d)


def _counter_words(c: CounterTest | None, what: str, sep: str) -> list[str]:
    if c is None:
        return []
    if c.op == "ne":
        return ["!", f"{sep}{what}-eq", str(c.value)]
    return [f"{sep}{what}-{c.op}", str(c.value)]


def _words(p: SetMatch, sep: str) -> list[str]:
    out = [*bang(p.invert), f"{sep}match-set", bare(p.name),
           ",".join("src" if s else "dst" for s in p.src)]
    if p.return_nomatch:
        out.append(f"{sep}return-nomatch")
    if p.skip_counters:
        out += ["!", f"{sep}update-counters"]
    if p.skip_subcounters:
        out += ["!", f"{sep}update-subcounters"]
    return out + _counter_words(p.packets, "packets", sep) + _counter_words(p.bytes, "bytes", sep)


def _lower(p: SetMatch, ctx: Context) -> Pred:
    d = p.definition
    if d is None:
        raise MatchError(f"set {p.name!r} is not defined", p.name)
    if len(p.src) < len(d.type.dims):
        # ip_set_test: a rule naming fewer dimensions than the set has never matches.
        return Const(p.invert)
    # Counter tests and counter updates only act on sets created with `counters`, which are
    # refused: the kernel skips them for every other set, and so does this lookup.
    lookup = SetLookup(d, p.src[:len(d.type.dims)], p.return_nomatch and d.type.has_net)
    return negate(lookup, p.invert)


SET = REGISTRY.add_match(MatchEntry(
    "set",
    (Option(("--match-set", "--set"), "match-set", nargs=2),
     Option(("--return-nomatch",), "return-nomatch", nargs=0, invert=False),
     Option(("--update-counters",), "update-counters", nargs=0),
     Option(("--update-subcounters",), "update-subcounters", nargs=0),
     *(Option((f"--{w}-{op}",), f"{w}-{op}", invert=op == "eq")
       for w in ("packets", "bytes") for op in ("eq", "lt", "gt"))),
    _build, lambda p, c: _words(p, "--"), _lower,
    describe=lambda p, c, n: " ".join(_words(p, ""))))
