"""Connection-tracking matches: conntrack, state, connlimit (lowered), connmark and helper
(parsed and printed; the compiler does not lower them yet)."""

from __future__ import annotations

from dataclasses import dataclass

from ..ir.model import BUILTIN_CHAINS, Family
from ..ir.pred import Cmp, Const, Field, Not, Pred, Range, all_of, any_of, negate
from ..ir.state import Connlimit
from .kernel import CtState, CtStatus
from .names import net_text
from .registry import REGISTRY, Context, MatchEntry, MatchError, Option, Unsupported
from .util import Opts, arg, bang, exclusive, need, not_lowered, one
from .values import (
    Net,
    format_addr,
    format_range,
    parse_net,
    parse_proto,
    parse_uint,
    parse_uint_range,
    parse_value_mask,
    quote,
)

# Names in the order iptables tries them (prefixes allowed) and prints them.
STATE_PARSE = ("INVALID", "NEW", "ESTABLISHED", "RELATED", "UNTRACKED", "SNAT", "DNAT")
STATE_PRINT = ("INVALID", "NEW", "RELATED", "ESTABLISHED", "UNTRACKED", "SNAT", "DNAT")
STATUS_PRINT = ("EXPECTED", "SEEN_REPLY", "ASSURED", "CONFIRMED")


def _names(text: str, names: tuple[str, ...], who: str, allow_none: bool = False) -> int:
    mask = 0
    for item in text.split(","):
        if allow_none and item.upper() == "NONE":
            continue
        hit = next((n for n in names if item and n.startswith(item.upper())), None)
        if hit is None:
            raise MatchError(f"{who}: bad value {item!r}", item)
        mask |= (CtState[hit] if hit in CtState.__members__ else CtStatus[hit]).value
    return mask


def parse_states(text: str, who: str = "conntrack") -> int:
    """A comma list of connection states as a CtState bit mask."""
    return _names(text, STATE_PARSE, who)


def format_states(mask: int) -> str:
    """States in iptables' print order."""
    return ",".join(n for n in STATE_PRINT if mask & CtState[n])


@dataclass(frozen=True)
class CtTest:
    """One conntrack criterion: its value (type depends on the option) and negation."""

    value: object
    invert: bool = False


_ADDR_KEYS = ("ctorigsrc", "ctorigdst", "ctreplsrc", "ctrepldst")
_PORT_KEYS = ("ctorigsrcport", "ctorigdstport", "ctreplsrcport", "ctrepldstport")
CT_KEYS = ("ctstate", "ctproto", *_ADDR_KEYS, *_PORT_KEYS, "ctstatus", "ctexpire", "ctdir")


@dataclass(frozen=True)
class ConntrackMatch:
    """xt_conntrack revision 3: the criteria given, as (option key, test) in print order."""

    tests: tuple[tuple[str, CtTest], ...]

    def get(self, key: str) -> CtTest | None:
        """The test for option `key`, if given."""
        return next((t for k, t in self.tests if k == key), None)


def _build_conntrack(opts: Opts, ctx: Context) -> ConntrackMatch:
    if not any(k in opts for k in CT_KEYS):
        raise MatchError("conntrack: at least one option is required", "conntrack")
    tests: list[tuple[str, CtTest]] = []
    for key in CT_KEYS:
        v = one(opts, key)
        if v is None:
            continue
        text = v.args[0]
        value: object
        if key == "ctstate":
            value = parse_states(text)
        elif key == "ctproto":
            value = parse_proto(text)
            if value == 0:
                raise MatchError("conntrack: --ctproto 0 would never match", text)
        elif key in _ADDR_KEYS:
            value = parse_net(text, ctx.family)
        elif key in _PORT_KEYS:
            value = parse_uint_range(text, 0xFFFF, "port")
        elif key == "ctstatus":
            value = _names(text, STATUS_PRINT, "conntrack", allow_none=True)
        elif key == "ctexpire":
            value = parse_uint_range(text, 0xFFFFFFFF, "expiry")
        else:
            if text.upper() not in ("ORIGINAL", "REPLY"):
                raise MatchError(f"conntrack: bad --ctdir {text!r}", text)
            value = text.upper()
        tests.append((key, CtTest(value, v.invert)))
    return ConntrackMatch(tuple(tests))


def _ct_net(n: Net) -> str:
    plen = n.prefixlen
    if plen == len(n.addr) * 8:
        return format_addr(n.addr)
    return str(n)


def _save_conntrack(p: ConntrackMatch, ctx: Context) -> list[str]:
    out: list[str] = []
    for key, t in p.tests:
        v = t.value
        if key == "ctstate":
            text = format_states(v)
        elif key == "ctstatus":
            text = ",".join(n for n in STATUS_PRINT if v & CtStatus[n]) or "NONE"
        elif key in _ADDR_KEYS:
            text = _ct_net(v)
        elif key in (*_PORT_KEYS, "ctexpire"):
            text = format_range(*v)
        else:
            text = str(v)
        out += [*bang(t.invert), f"--{key}", text]
    return out


def _describe_conntrack(p: ConntrackMatch, ctx: Context, numeric: bool) -> str:
    out = ""
    for key, t in p.tests:
        v = t.value
        out += " !" if t.invert else ""
        if key == "ctstate":
            out += " ctstate " + format_states(v)
        elif key == "ctstatus":
            out += " ctstatus " + (",".join(n for n in STATUS_PRINT if v & CtStatus[n]) or "NONE")
        elif key in _ADDR_KEYS:
            # An all-zero address is `anywhere` whatever its mask (libxt_conntrack's test).
            anywhere = not numeric and not any(v.addr)
            out += f" {key} " + ("anywhere" if anywhere else net_text(v, numeric))
        elif key in (*_PORT_KEYS, "ctexpire"):
            out += f" {key} {format_range(*v)}"
        else:
            out += f" {key} {v}"
    return out[1:]


_CT_ADDR = {"ctorigsrc": Field.CTORIGSRC, "ctorigdst": Field.CTORIGDST,
            "ctreplsrc": Field.CTREPLSRC, "ctrepldst": Field.CTREPLDST}
_CT_PORT = {"ctorigsrcport": Field.CTORIGSPORT, "ctorigdstport": Field.CTORIGDPORT,
            "ctreplsrcport": Field.CTREPLSPORT, "ctrepldstport": Field.CTREPLDPORT}


def _any_bit(field: Field, mask: int) -> Pred:
    """(field & mask) != 0."""
    return Not(Cmp(field, 0, mask))


def _lower_conntrack(p: ConntrackMatch, ctx: Context) -> Pred:
    """xt_conntrack revision 3 (conntrack_mt): the state test first; without an entry only a
    state test can hold; then direction, addresses, protocol and ports, status."""
    state = p.get("ctstate")
    state_pred: Pred = Const(True)
    if state is not None:
        state_pred = negate(_any_bit(Field.CTBITS, int(state.value)), state.invert)
    rest: list[Pred] = []
    d = p.get("ctdir")
    if d is not None:
        rest.append(Cmp(Field.CTDIR, 0 if d.value == "ORIGINAL" else 1))
    for key, field in _CT_ADDR.items():
        t = p.get(key)
        if t is not None:
            n = t.value
            rest.append(negate(Cmp(field, n.addr.ljust(16, b"\0"), n.mask.ljust(16, b"\0")),
                               t.invert))
    t = p.get("ctproto")
    if t is not None:
        rest.append(negate(Cmp(Field.CTPROTO, int(t.value)), t.invert))
    for key, field in _CT_PORT.items():
        t = p.get(key)
        if t is not None:
            lo, hi = t.value
            rest.append(negate(Range(field, lo, hi), t.invert))
    t = p.get("ctstatus")
    if t is not None:
        rest.append(negate(_any_bit(Field.CTSTATUS, int(t.value)), t.invert))
    if p.get("ctexpire") is not None:
        raise Unsupported("conntrack --ctexpire")
    if not rest:
        return state_pred
    with_entry = all_of(Cmp(Field.CTHAS, 1), *rest)
    # No entry: the match holds exactly when a state test was given (and passed).
    without = Const(state is not None)
    return all_of(state_pred, any_of(with_entry, all_of(Cmp(Field.CTHAS, 0), without)))


def _lower_state(p: StateMatch, ctx: Context) -> Pred:
    """xt_state: the state bit against the mask (iptables inverts the mask for `!`)."""
    mask = ~p.states & 0xFFFF if p.invert else p.states
    return _any_bit(Field.CTSTATE, mask)


CONNTRACK = REGISTRY.add_match(MatchEntry(
    "conntrack", tuple(Option((f"--{k}",), k, invert=k != "ctdir") for k in CT_KEYS),
    _build_conntrack, _save_conntrack, _lower_conntrack,
    describe=_describe_conntrack))


@dataclass(frozen=True)
class StateMatch:
    """-m state: a CtState mask."""

    states: int
    invert: bool = False


def _build_state(opts: Opts, ctx: Context) -> StateMatch:
    need("state", opts, "state")
    v = one(opts, "state")
    return StateMatch(_names(v.args[0], STATE_PARSE[:5], "state"), v.invert)


STATE = REGISTRY.add_match(MatchEntry(
    "state", (Option(("--state",), "state"),), _build_state,
    lambda p, c: [*bang(p.invert), "--state", format_states(p.states)], _lower_state,
    # iptables implements -m state with conntrack, which prints it this way.
    describe=lambda p, c, n: ("! " if p.invert else "") + "state " + format_states(p.states)))


@dataclass(frozen=True)
class ConnmarkMatch:
    """(ct->mark & mask) == value."""

    value: int
    mask: int = 0xFFFFFFFF
    invert: bool = False


def _build_connmark(opts: Opts, ctx: Context) -> ConnmarkMatch:
    need("connmark", opts, "mark")
    v = one(opts, "mark")
    return ConnmarkMatch(*parse_value_mask(v.args[0], "connmark"), v.invert)


def _save_connmark(p: ConnmarkMatch, ctx: Context) -> list[str]:
    text = f"0x{p.value:x}" + (f"/0x{p.mask:x}" if p.mask != 0xFFFFFFFF else "")
    return [*bang(p.invert), "--mark", text]


CONNMARK = REGISTRY.add_match(MatchEntry(
    "connmark", (Option(("--mark",), "mark"),), _build_connmark, _save_connmark,
    not_lowered("connmark"),
    # "connmark match  0x1": the value comes with a space of its own.
    describe=lambda p, c, n: "connmark match " + "!" * p.invert + " "
    + _save_connmark(ConnmarkMatch(p.value, p.mask), c)[-1]))


@dataclass(frozen=True)
class HelperMatch:
    """The connection's helper name."""

    name: str
    invert: bool = False


def _build_helper(opts: Opts, ctx: Context) -> HelperMatch:
    need("helper", opts, "helper")
    v = one(opts, "helper")
    return HelperMatch(v.args[0][:29], v.invert)


HELPER = REGISTRY.add_match(MatchEntry(
    "helper", (Option(("--helper",), "helper"),), _build_helper,
    lambda p, c: [*bang(p.invert), "--helper", quote(p.name)], not_lowered("helper"),
    describe=lambda p, c, n: f'helper match {"! " if p.invert else ""}"{p.name}"'))


@dataclass(frozen=True)
class ConnlimitMatch:
    """Number of connections per address group: above `limit` (or up to it), grouped by
    the source or destination address under a prefix of `mask` bits."""

    limit: int
    above: bool
    mask: int
    daddr: bool = False


def _build_connlimit(opts: Opts, ctx: Context) -> ConnlimitMatch:
    exclusive("connlimit", opts, "connlimit-upto", "connlimit-above")
    exclusive("connlimit", opts, "connlimit-saddr", "connlimit-daddr")
    need("connlimit", opts, "connlimit-upto", "connlimit-above",
         names="--connlimit-upto or --connlimit-above")
    key = "connlimit-upto" if "connlimit-upto" in opts else "connlimit-above"
    v = one(opts, key)
    above = (key == "connlimit-above") != v.invert
    width = 32 if ctx.family is Family.IPV4 else 128
    text = arg(opts, "connlimit-mask")
    mask = width if text is None else parse_uint(text, 0, width, "connlimit mask")
    return ConnlimitMatch(parse_uint(v.args[0], 0, 0xFFFFFFFF, "connection limit"), above,
                          mask, "connlimit-daddr" in opts)


def _save_connlimit(p: ConnlimitMatch, ctx: Context) -> list[str]:
    return ["--connlimit-above" if p.above else "--connlimit-upto", str(p.limit),
            "--connlimit-mask", str(p.mask),
            "--connlimit-daddr" if p.daddr else "--connlimit-saddr"]


# The largest limit compiled: a group remembers limit + 1 + CONNLIMIT_SPARE connections, each
# checked alive whenever the rule is evaluated (a loop whose verifier cost does not grow with
# it, see compiler/connlimit.py); at this one a rule's maps hold four full groups.
MAX_CONNLIMIT = 65535
CONNLIMIT_SPARE = 4
TCP, UDP = 6, 17


def _lower_connlimit(p: ConnlimitMatch, ctx: Context) -> Pred:
    """xt_connlimit as a Connlimit predicate (its list of connections named by the compiler)."""
    if ctx.table == "raw":
        raise Unsupported("connlimit in the raw table",
                          " (conntrack has not seen the packet yet: its connection is unknown)")
    if p.limit > MAX_CONNLIMIT:
        raise Unsupported(f"connlimit above {MAX_CONNLIMIT} connections",
                          " (a group remembers that many connections, each checked at every "
                          "evaluation, in maps of bounded size)")
    hook = ctx.hook or "nf"
    if hook in ("tc", "xdp"):
        if ctx.proto not in (TCP, UDP):
            raise Unsupported(f"connlimit on {hook} without -p tcp or -p udp",
                              " (connections are checked with the conntrack lookup kfuncs, "
                              "which find TCP and UDP entries only)")
        if ctx.chain not in BUILTIN_CHAINS.get(ctx.table, ()):
            raise Unsupported(f"connlimit in a user chain on {hook}",
                              " (the conntrack lookups need the program's context, which user "
                              "chains do not get)")
    width = 32 if ctx.family is Family.IPV4 else 128
    mask = (((1 << width) - 1) ^ ((1 << (width - p.mask)) - 1)).to_bytes(width // 8, "big")
    return Connlimit(p.limit, p.above, mask, p.daddr, hook,
                     slots=p.limit + 1 + CONNLIMIT_SPARE)


CONNLIMIT = REGISTRY.add_match(MatchEntry(
    "connlimit",
    (Option(("--connlimit-upto",), "connlimit-upto"),
     Option(("--connlimit-above",), "connlimit-above"),
     Option(("--connlimit-mask",), "connlimit-mask", invert=False),
     Option(("--connlimit-saddr",), "connlimit-saddr", nargs=0, invert=False),
     Option(("--connlimit-daddr",), "connlimit-daddr", nargs=0, invert=False)),
    _build_connlimit, _save_connlimit, _lower_connlimit,
    describe=lambda p, c, n: f"#conn {'dst' if p.daddr else 'src'}/{p.mask} "
    f"{'>' if p.above else '<='} {p.limit}"))
