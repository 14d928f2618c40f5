"""Rate and state-table matches: limit, hashlimit, recent (lowered; see statelower.py),
statistic, quota, nfacct (parsed and printed; the compiler does not lower them yet)."""

from __future__ import annotations

from dataclasses import dataclass

from ..ir.model import Family
from ..ir.pred import RateLimit
from .registry import REGISTRY, Context, MatchEntry, MatchError, Option
from .statelower import lower_hashlimit, lower_recent
from .util import Opts, arg, bang, exclusive, need, not_lowered, one
from .values import bare, format_addr, parse_addr, parse_uint, quote

LIMIT_SCALE = 10000  # XT_LIMIT_SCALE
HASHLIMIT_SCALE = 1000000  # XT_HASHLIMIT_SCALE_v2
UNITS = (("day", 24 * 60 * 60), ("hour", 60 * 60), ("min", 60), ("sec", 1))


def parse_rate(text: str, scale: int, who: str) -> int:
    """`N[/second|minute|hour|day]` (unit prefixes allowed) as a period in 1/scale seconds."""
    num, slash, unit = text.partition("/")
    mult = 1
    if slash:
        hit = [m for name, m in (("second", 1), ("minute", 60), ("hour", 3600),
                                 ("day", 86400)) if unit and name.startswith(unit.lower())]
        if not hit:
            raise MatchError(f"{who}: bad rate {text!r}", text)
        mult = hit[0]
    if not num.isdigit() or int(num) == 0:
        raise MatchError(f"{who}: bad rate {text!r}", text)
    period = scale * mult // int(num)
    if period == 0:
        raise MatchError(f"{who}: rate too fast {text!r}", text)
    return period


def format_rate(period: int, scale: int) -> tuple[str, int]:
    """The rate as iptables prints it, and its unit in milliseconds (hashlimit's quantum)."""
    units = [(name, secs * scale) for name, secs in UNITS]
    i = 1
    while i < len(units):
        mult = units[i][1]
        if period > mult or mult // period < mult % period:
            break
        i += 1
    name, mult = units[i - 1]
    return f"{mult // period}/{name}", mult // scale * 1000


@dataclass(frozen=True)
class LimitMatch:
    """Token bucket: one token per `period` (1/10000 s), bucket size `burst`."""

    period: int
    burst: int = 5


def _build_limit(opts: Opts, ctx: Context) -> LimitMatch:
    text = arg(opts, "limit")
    period = parse_rate(text, LIMIT_SCALE, "limit") if text else LIMIT_SCALE * 3600 // 3
    burst = arg(opts, "limit-burst")
    b = parse_uint(burst, 0, 10000, "limit-burst") if burst is not None else 5
    if b == 0:
        raise MatchError("limit: --limit-burst must be at least 1", burst)
    return LimitMatch(period, b)


def _save_limit(p: LimitMatch, ctx: Context) -> list[str]:
    out = ["--limit", format_rate(p.period, LIMIT_SCALE)[0]]
    return out + (["--limit-burst", str(p.burst)] if p.burst != 5 else [])


LIMIT = REGISTRY.add_match(MatchEntry(
    "limit", (Option(("--limit",), "limit", invert=False),
              Option(("--limit-burst",), "limit-burst", invert=False)),
    _build_limit, _save_limit,
    # The period is in 1/10000 s (XT_LIMIT_SCALE): one token per period, `burst` at most.
    lambda p, c: RateLimit(p.period * 100_000, p.burst),
    describe=lambda p, c, n: f"limit: avg {format_rate(p.period, LIMIT_SCALE)[0]} burst {p.burst}"))

# --- hashlimit -------------------------------------------------------------------------------

HL_MODES = ("srcip", "srcport", "dstip", "dstport")
BYTE_UNITS = (("mb", 1 << 20), ("kb", 1 << 10), ("b", 1))


@dataclass(frozen=True)
class HashlimitMatch:
    """xt_hashlimit revision 3. In byte mode `rate` is bytes per second and `burst` bytes (0:
    none); otherwise `rate` is a period in 1/1000000 s and `burst` packets. Optional numbers
    are None when left at their defaults."""

    name: str
    rate: int
    bytes_mode: bool
    above: bool
    burst: int
    modes: tuple[str, ...] = ()
    size: int = 0
    max: int = 0
    gcinterval: int = 1000
    expire: int | None = None
    srcmask: int | None = None
    dstmask: int | None = None
    rate_match: bool = False
    rate_interval: int = 1


def _parse_bytes(text: str) -> int | None:
    for suffix, mult in BYTE_UNITS:
        if text.lower().endswith(suffix):
            num = text[: -len(suffix)]
            if num.isdigit():
                return int(num) * mult
    return None


def _format_bytes(n: int) -> str:
    for suffix, mult in BYTE_UNITS:
        if n >= mult and n % mult == 0:
            return f"{n // mult}{suffix}"
    return f"{n}b"


def _build_hashlimit(opts: Opts, ctx: Context) -> HashlimitMatch:
    exclusive("hashlimit", opts, "upto", "above")
    need("hashlimit", opts, "upto", "above", names="--hashlimit-upto or --hashlimit-above")
    need("hashlimit", opts, "name", names="--hashlimit-name")
    key = "upto" if "upto" in opts else "above"
    v = one(opts, key)
    above = (key == "above") != v.invert
    text = v.args[0]
    per = _parse_bytes(text[:-2]) if text.lower().endswith("/s") else None
    burst_s = arg(opts, "burst")
    if per is not None:
        rate, bytes_mode = per, True
        burst = 0
        if burst_s is not None:
            b = _parse_bytes(burst_s)
            if b is None:
                raise MatchError(f"hashlimit: bad burst {burst_s!r}", burst_s)
            burst = b
        quantum = 30000 if burst else 15000
    else:
        rate, bytes_mode = parse_rate(text, HASHLIMIT_SCALE, "hashlimit"), False
        burst = parse_uint(burst_s, 1, 0xFFFFFFFF, "burst") if burst_s is not None else 5
        quantum = format_rate(rate, HASHLIMIT_SCALE)[1]
    modes: tuple[str, ...] = ()
    if (m := arg(opts, "mode")) is not None:
        given = m.split(",")
        for g in given:
            if g not in HL_MODES:
                raise MatchError(f"hashlimit: bad mode {g!r}", g)
        modes = tuple(x for x in HL_MODES if x in given)
    width = 32 if ctx.family is Family.IPV4 else 128

    def num(k: str, hi: int = 0xFFFFFFFF) -> int | None:
        t = arg(opts, k)
        return None if t is None else parse_uint(t, 0, hi, f"--hashlimit-{k}")

    expire = num("htable-expire")
    srcmask, dstmask = num("srcmask", width), num("dstmask", width)
    name = arg(opts, "name")
    if len(name) > 31 or not name:
        raise MatchError(f"hashlimit: bad name {name!r}", name)
    return HashlimitMatch(
        name, rate, bytes_mode, above, burst, modes, num("htable-size") or 0,
        num("htable-max") or 0, g if (g := num("htable-gcinterval")) is not None else 1000,
        None if expire == quantum else expire,
        None if srcmask == width else srcmask, None if dstmask == width else dstmask,
        # Without --hashlimit-rate-match the interval has no effect (and is not printed).
        "rate-match" in opts, (num("rate-interval") or 1) if "rate-match" in opts else 1)


def _save_hashlimit(p: HashlimitMatch, ctx: Context) -> list[str]:
    out = ["--hashlimit-above" if p.above else "--hashlimit-upto"]
    if p.bytes_mode:
        out.append(_format_bytes(p.rate) + "/s")
        if p.burst:
            out += ["--hashlimit-burst", _format_bytes(p.burst)]
    else:
        out += [format_rate(p.rate, HASHLIMIT_SCALE)[0], "--hashlimit-burst", str(p.burst)]
    if p.modes:
        out += ["--hashlimit-mode", ",".join(p.modes)]
    out += ["--hashlimit-name", bare(p.name)]
    for key, value, default in (("htable-size", p.size, 0), ("htable-max", p.max, 0),
                                ("htable-gcinterval", p.gcinterval, 1000)):
        if value != default:
            out += [f"--hashlimit-{key}", str(value)]
    for key, opt in (("htable-expire", p.expire), ("srcmask", p.srcmask),
                     ("dstmask", p.dstmask)):
        if opt is not None:
            out += [f"--hashlimit-{key}", str(opt)]
    if p.rate_match:
        out.append("--hashlimit-rate-match")
        if p.rate_interval != 1:
            out += ["--hashlimit-rate-interval", str(p.rate_interval)]
    return out


# Byte mode: the kernel keeps a cost per byte rate, not the rate (xt_hashlimit.h).
_U32 = 0xFFFFFFFF
BYTE_SHIFT = 4  # XT_HASHLIMIT_BYTE_SHIFT


def _bytes_to_cost(n: int) -> int:
    return _U32 // ((n >> BYTE_SHIFT) + 1)


def _cost_to_bytes(cost: int) -> int:
    return ((_U32 // cost if cost else _U32) - 1) << BYTE_SHIFT


def _describe_bytes(rate: int, burst: int) -> str:
    """` 4kb/s burst 400kb` from what the kernel holds: the rounded rate, burst in rates."""
    cost = _bytes_to_cost(rate)
    r = _cost_to_bytes(cost)
    suffix, mult = next(((s, m) for s, m in BYTE_UNITS
                         if r >= m and _bytes_to_cost(r & ~(m - 1)) == cost), BYTE_UNITS[-1])
    out = f" {r // mult}{suffix}/s"
    if burst:
        total = r * -(-burst // r)  # the kernel keeps burst as a whole number of rates
        suffix, mult = next((s, m) for s, m in BYTE_UNITS if total >= m or m == 1)
        out += f" burst {total // mult}{suffix}"
    return out


def _describe_hashlimit(p: HashlimitMatch, ctx: Context, numeric: bool) -> str:
    out = "limit: above" if p.above else "limit: up to"
    if p.bytes_mode:
        out += _describe_bytes(p.rate, p.burst)
        quantum = 30000 if p.burst else 15000
        expire = p.expire if p.expire is not None else quantum
    else:
        # With --hashlimit-rate-match iptables prints the rate over the whole interval.
        period = p.rate * (p.rate_interval if p.rate_match else 1)
        text, quantum = format_rate(period, HASHLIMIT_SCALE)
        out += f" {text} burst {p.burst}"
        expire = p.expire if p.expire is not None else format_rate(p.rate, HASHLIMIT_SCALE)[1]
    if p.modes:
        out += " mode " + "-".join(p.modes)
    for key, value, default in (("htable-size", p.size, 0), ("htable-max", p.max, 0),
                                ("htable-gcinterval", p.gcinterval, 1000),
                                ("htable-expire", expire, quantum)):
        if value != default:
            out += f" {key} {value}"
    for key, mask in (("srcmask", p.srcmask), ("dstmask", p.dstmask)):
        if mask is not None:
            out += f" {key} {mask}"
    if p.rate_match:
        out += " rate-match" + (f" rate-interval {p.rate_interval}"
                                if p.rate_interval != 1 else "")
    return out


def _hl(key: str, *extra: str, nargs: int = 1, invert: bool = False) -> Option:
    return Option((f"--hashlimit-{key}", *extra), key, nargs=nargs, invert=invert)


HASHLIMIT = REGISTRY.add_match(MatchEntry(
    "hashlimit",
    (_hl("upto", "--hashlimit", invert=True), _hl("above", invert=True), _hl("burst"),
     _hl("mode"), _hl("name"), _hl("htable-size"), _hl("htable-max"),
     _hl("htable-gcinterval"), _hl("htable-expire"), _hl("srcmask"), _hl("dstmask"),
     _hl("rate-match", nargs=0), _hl("rate-interval")),
    _build_hashlimit, _save_hashlimit, lower_hashlimit,
    describe=_describe_hashlimit))

# --- recent ----------------------------------------------------------------------------------

RECENT_MODES = ("set", "rcheck", "update", "remove")


@dataclass(frozen=True)
class RecentMatch:
    """xt_recent: a mode on list `name` keyed by the source (or destination) address under
    `mask`; `seconds`/`hitcount`/`rttl`/`reap` refine rcheck and update."""

    mode: str
    invert: bool = False
    seconds: int = 0
    reap: bool = False
    hitcount: int = 0
    rttl: bool = False
    name: str = "DEFAULT"
    mask: bytes = b""
    rdest: bool = False


def _build_recent(opts: Opts, ctx: Context) -> RecentMatch:
    exclusive("recent", opts, *RECENT_MODES)
    exclusive("recent", opts, "rsource", "rdest")
    need("recent", opts, *RECENT_MODES, names="one of --set, --rcheck, --update or --remove")
    mode = next(m for m in RECENT_MODES if m in opts)
    modifiers = [k for k in ("seconds", "hitcount", "rttl", "reap") if k in opts]
    if mode in ("set", "remove") and modifiers:
        raise MatchError(f"recent: --{modifiers[0]} is only valid with --rcheck or --update",
                         f"--{modifiers[0]}")
    if "reap" in opts and "seconds" not in opts:
        raise MatchError('recent: option "--reap" also requires "--seconds"', "--reap")
    name = arg(opts, "name") or "DEFAULT"
    if len(name) > 199 or not name:
        raise MatchError(f"recent: bad list name {name!r}", name)
    full = b"\xff" * ctx.family.addr_len
    mask_s = arg(opts, "mask")
    mask = full if mask_s is None else parse_addr(mask_s, ctx.family)
    return RecentMatch(
        mode, one(opts, mode).invert,
        parse_uint(arg(opts, "seconds"), 0, 0xFFFFFFFF, "seconds") if "seconds" in opts else 0,
        "reap" in opts,
        parse_uint(arg(opts, "hitcount"), 0, 0xFFFF, "hitcount") if "hitcount" in opts else 0,
        "rttl" in opts, name, mask, "rdest" in opts)


def _save_recent(p: RecentMatch, ctx: Context) -> list[str]:
    out = [*bang(p.invert), f"--{p.mode}"]
    if p.seconds:
        out += ["--seconds", str(p.seconds)]
    if p.reap:
        out.append("--reap")
    if p.hitcount:
        out += ["--hitcount", str(p.hitcount)]
    if p.rttl:
        out.append("--rttl")
    side = "--rdest" if p.rdest else "--rsource"
    return [*out, "--name", bare(p.name), "--mask", format_addr(p.mask), side]


def _describe_recent(p: RecentMatch, ctx: Context, numeric: bool) -> str:
    mode = {"set": "SET", "rcheck": "CHECK", "update": "UPDATE", "remove": "REMOVE"}[p.mode]
    out = ("! " if p.invert else "") + f"recent: {mode}"
    out += f" seconds: {p.seconds}" if p.seconds else ""
    out += " reap" if p.reap else ""
    out += f" hit_count: {p.hitcount}" if p.hitcount else ""
    out += " TTL-Match" if p.rttl else ""
    side = "dest" if p.rdest else "source"
    return out + f" name: {p.name} side: {side} mask: {format_addr(p.mask)}"


def _flag(name: str) -> Option:
    return Option((f"--{name}",), name, nargs=0, invert=False)


RECENT = REGISTRY.add_match(MatchEntry(
    "recent",
    (*(Option((f"--{m}",), m, nargs=0) for m in RECENT_MODES),
     Option(("--seconds",), "seconds", invert=False), _flag("reap"),
     Option(("--hitcount",), "hitcount", invert=False), _flag("rttl"),
     Option(("--name",), "name", invert=False), Option(("--mask",), "mask", invert=False),
     _flag("rsource"), _flag("rdest")),
    _build_recent, _save_recent, lower_recent, describe=_describe_recent))

# --- statistic, quota, nfacct ----------------------------------------------------------------


@dataclass(frozen=True)
class StatisticMatch:
    """Random mode: probability as a fraction of 2^31; nth mode: every `every`, from `packet`."""

    mode: str
    invert: bool = False
    probability: int = 0
    every: int = 0
    packet: int = 0


def _build_statistic(opts: Opts, ctx: Context) -> StatisticMatch:
    need("statistic", opts, "mode")
    exclusive("statistic", opts, "probability", "every")
    mode = arg(opts, "mode")
    if mode == "random":
        need("statistic", opts, "probability")
        v = one(opts, "probability")
        try:
            prob = float(v.args[0])
        except ValueError:
            raise MatchError(f"statistic: bad probability {v.args[0]!r}", v.args[0]) from None
        if not 0.0 <= prob <= 1.0:
            raise MatchError("statistic: --probability must be between 0 and 1", v.args[0])
        return StatisticMatch(mode, v.invert, probability=int(prob * 0x80000000 + 0.5))
    if mode == "nth":
        need("statistic", opts, "every")
        need("statistic", opts, "packet")
        v = one(opts, "every")
        every = parse_uint(v.args[0], 1, 0xFFFFFFFF, "--every")
        packet = parse_uint(arg(opts, "packet"), 0, 0xFFFFFFFF, "--packet")
        if packet >= every:
            raise MatchError("statistic: --packet must be below --every", arg(opts, "packet"))
        return StatisticMatch(mode, v.invert, every=every, packet=packet)
    raise MatchError(f"statistic: bad mode {mode!r}", mode)


def _save_statistic(p: StatisticMatch, ctx: Context) -> list[str]:
    if p.mode == "random":
        return ["--mode", "random", *bang(p.invert), "--probability",
                f"{p.probability / 0x80000000:.11f}"]
    return ["--mode", "nth", *bang(p.invert), "--every", str(p.every), "--packet",
            str(p.packet)]


def _describe_statistic(p: StatisticMatch, ctx: Context, numeric: bool) -> str:
    inv = " !" if p.invert else ""
    if p.mode == "random":
        return f"statistic mode random{inv} probability {p.probability / 0x80000000:.11f}"
    return f"statistic mode nth{inv} every {p.every}" + (
        f" packet {p.packet}" if p.packet else "")


STATISTIC = REGISTRY.add_match(MatchEntry(
    "statistic",
    (Option(("--mode",), "mode", invert=False), Option(("--probability",), "probability"),
     Option(("--every",), "every"), Option(("--packet",), "packet", invert=False)),
    _build_statistic, _save_statistic, not_lowered("statistic"),
    describe=_describe_statistic))


def _build_quota(opts: Opts, ctx: Context) -> tuple[int, bool]:
    need("quota", opts, "quota")
    v = one(opts, "quota")
    return parse_uint(v.args[0], 0, (1 << 64) - 1, "quota"), v.invert


QUOTA = REGISTRY.add_match(MatchEntry(
    "quota", (Option(("--quota",), "quota"),), _build_quota,
    lambda p, c: [*bang(p[1]), "--quota", str(p[0])], not_lowered("quota"),
    describe=lambda p, c, n: f"quota: {p[0]} bytes"))  # the negation is not printed


def _build_nfacct(opts: Opts, ctx: Context) -> str:
    need("nfacct", opts, "nfacct-name")
    name = arg(opts, "nfacct-name")
    if not name or len(name) > 31:
        raise MatchError(f"nfacct: bad accounting object name {name!r}", name)
    return name


NFACCT = REGISTRY.add_match(MatchEntry(
    "nfacct", (Option(("--nfacct-name",), "nfacct-name", invert=False),), _build_nfacct,
    lambda p, c: ["--nfacct-name", quote(p)], not_lowered("nfacct"),
    # Two spaces: the name is printed by a helper that brings its own.
    describe=lambda p, c, n: f"nfacct-name  {quote(p)}"))
