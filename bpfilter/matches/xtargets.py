"""Non-terminal and queueing targets that parse and print but are not compiled yet: LOG, NFLOG,
CONNMARK, CT, NOTRACK, TRACE, TCPMSS, CHECKSUM, NFQUEUE."""

from __future__ import annotations

from dataclasses import dataclass

from .kernel import IpProto
from .registry import REGISTRY, Context, MatchError, Option, TargetEntry
from .targets import describe_xmark
from .util import Opts, arg, exclusive, need
from .values import bare, parse_uint, parse_uint_range, parse_value_mask, quote


def _flag(name: str) -> Option:
    return Option((f"--{name}",), name, nargs=0, invert=False)


def _opt(name: str, *aliases: str) -> Option:
    return Option((f"--{name}", *aliases), name, invert=False)


def _hooks(who: str, chains: tuple[str, ...]):
    def check(p: object, ctx: Context) -> str | None:
        if ctx.chain and ctx.chain not in chains:
            return f"{who}: used from {ctx.chain}, but only valid from {'/'.join(chains)}"
        return None

    return check


# --- LOG -------------------------------------------------------------------------------------

LOG_LEVELS = {"emerg": 0, "panic": 0, "alert": 1, "crit": 2, "err": 3, "error": 3,
              "warning": 4, "warn": 4, "notice": 5, "info": 6, "debug": 7}
LOG_FLAGS = ("log-tcp-sequence", "log-tcp-options", "log-ip-options", "log-uid",
             "log-macdecode")
LOG_PREFIX_MAX = 29


@dataclass(frozen=True)
class Log:
    """LOG: syslog level, prefix and the --log-* flags set (in print order)."""

    level: int = 4
    prefix: str = ""
    flags: tuple[str, ...] = ()


def _prefix(opts: Opts, key: str, who: str, limit: int) -> str:
    text = arg(opts, key)
    if text is None:
        return ""
    if not text:
        raise MatchError(f"{who}: --{key} must not be empty", key)
    if "\n" in text:
        raise MatchError(f"{who}: newlines not allowed in --{key}", text)
    return text[:limit]  # the kernel's buffer holds `limit` characters; iptables truncates


def _build_log(opts: Opts, ctx: Context) -> Log:
    level = 4
    text = arg(opts, "log-level")
    if text is not None:
        if text.lower() in LOG_LEVELS:
            level = LOG_LEVELS[text.lower()]
        else:
            try:
                level = parse_uint(text, 0, 7, "log level")
            except MatchError:
                raise MatchError(f"LOG: log level {text!r} unknown", text) from None
    prefix = _prefix(opts, "log-prefix", "LOG", LOG_PREFIX_MAX)
    return Log(level, prefix, tuple(f for f in LOG_FLAGS if f in opts))


def _save_log(p: Log, ctx: Context) -> list[str]:
    out: list[str] = []
    if p.prefix:
        out += ["--log-prefix", quote(p.prefix)]
    if p.level != 4:
        out += ["--log-level", str(p.level)]
    return out + [f"--{f}" for f in p.flags]


# Bits of the kernel's logflags, in LOG_FLAGS order (XT_LOG_TCPSEQ ... XT_LOG_MACDECODE).
LOG_FLAG_BITS = (0x01, 0x02, 0x04, 0x08, 0x20)
LOG_LEVEL_NAMES = ("emerg", "alert", "crit", "err", "warn", "notice", "info", "debug")


def _describe_log(p: Log, ctx: Context, numeric: bool) -> str:
    if numeric:
        flags = sum(b for f, b in zip(LOG_FLAGS, LOG_FLAG_BITS, strict=True) if f in p.flags)
        out = f"LOG flags {flags} level {p.level}"
    else:
        out = f"LOG level {LOG_LEVEL_NAMES[p.level]}"
        out += "".join(" " + f.removeprefix("log-") for f in p.flags)
    return out + (f' prefix "{p.prefix}"' if p.prefix else "")


LOG = REGISTRY.add_target(TargetEntry(
    "LOG", (_opt("log-level"), _opt("log-prefix"), *(_flag(f) for f in LOG_FLAGS)),
    _build_log, _save_log, terminal=False, describe=_describe_log))

# --- NFLOG -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Nflog:
    """NFLOG: netlink group, prefix, copy length (`size`, or the legacy `range`), threshold."""

    group: int = 0
    prefix: str = ""
    size: int | None = None
    range: int | None = None
    threshold: int = 0


def _build_nflog(opts: Opts, ctx: Context) -> Nflog:
    def num(key: str, hi: int) -> int | None:
        text = arg(opts, key)
        return None if text is None else parse_uint(text, 0, hi, f"--{key}")

    threshold = num("nflog-threshold", 0xFFFF)
    return Nflog(num("nflog-group", 0xFFFF) or 0, _prefix(opts, "nflog-prefix", "NFLOG", 63),
                 num("nflog-size", 0xFFFFFFFF), num("nflog-range", 0xFFFFFFFF),
                 threshold or 0)


def _save_nflog(p: Nflog, ctx: Context) -> list[str]:
    out: list[str] = []
    if p.prefix:
        out += ["--nflog-prefix", quote(p.prefix)]
    if p.group:
        out += ["--nflog-group", str(p.group)]
    if p.size is not None:
        out += ["--nflog-size", str(p.size)]
    elif p.range:
        out += ["--nflog-range", str(p.range)]
    if p.threshold:
        out += ["--nflog-threshold", str(p.threshold)]
    return out


NFLOG = REGISTRY.add_target(TargetEntry(
    "NFLOG", tuple(_opt(f"nflog-{k}") for k in ("group", "prefix", "range", "size", "threshold")),
    _build_nflog, _save_nflog, terminal=False,
    describe=lambda p, c, n: " ".join(w.removeprefix("--") for w in _save_nflog(p, c))))

# --- CONNMARK --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Connmark:
    """CONNMARK revision 1: mode "set" (ctmark = (ctmark & ~ctmask) ^ mark), "save" or
    "restore" (copy between the packet and connection marks through the masks)."""

    mode: str
    mark: int = 0
    ctmask: int = 0xFFFFFFFF
    nfmask: int = 0xFFFFFFFF


_CONNMARK_OPS = ("set-xmark", "set-mark", "and-mark", "or-mark", "xor-mark", "save-mark",
                 "restore-mark")


def _build_connmark(opts: Opts, ctx: Context) -> Connmark:
    exclusive("CONNMARK", opts, *_CONNMARK_OPS)
    need("CONNMARK", opts, *_CONNMARK_OPS, names="an operation (--set-mark, --save-mark, ...)")
    op = next(o for o in _CONNMARK_OPS if o in opts)
    text = arg(opts, op)
    if op in ("save-mark", "restore-mark"):
        full = arg(opts, "mask")
        nfmask = ctmask = parse_uint(full, 0, 0xFFFFFFFF, "mask") if full else 0xFFFFFFFF
        if (t := arg(opts, "nfmask")) is not None:
            nfmask = parse_uint(t, 0, 0xFFFFFFFF, "nfmask")
        if (t := arg(opts, "ctmask")) is not None:
            ctmask = parse_uint(t, 0, 0xFFFFFFFF, "ctmask")
        return Connmark(op.split("-")[0], 0, ctmask, nfmask)
    for key in ("mask", "nfmask", "ctmask"):
        if key in opts:
            raise MatchError(f"CONNMARK: --{key} is only valid with --save-mark or "
                             "--restore-mark", f"--{key}")
    if op in ("set-xmark", "set-mark"):
        value, mask = parse_value_mask(text)
        return Connmark("set", value, mask if op == "set-xmark" else mask | value)
    bits = parse_uint(text, 0, 0xFFFFFFFF, "mark")
    if op == "and-mark":
        return Connmark("set", 0, ~bits & 0xFFFFFFFF)
    return Connmark("set", bits, bits if op == "or-mark" else 0)


def _save_connmark(p: Connmark, ctx: Context) -> list[str]:
    if p.mode == "set":
        return ["--set-xmark", f"0x{p.mark:x}/0x{p.ctmask:x}"]
    return [f"--{p.mode}-mark", "--nfmask", f"0x{p.nfmask:x}", "--ctmask", f"0x{p.ctmask:x}"]


def _describe_connmark(p: Connmark, ctx: Context, numeric: bool) -> str:
    if p.mode == "set":
        return describe_xmark("CONNMARK", p.mark, p.ctmask)
    out = f"CONNMARK {p.mode}"
    if (p.nfmask, p.ctmask) == (0xFFFFFFFF, 0xFFFFFFFF):
        return out
    if p.nfmask == p.ctmask:
        return out + f" mask 0x{p.nfmask:x}"
    # The mask copied from is printed plainly, the one copied to with a `~`.
    first, second = (("nfmask", p.nfmask), ("ctmask", p.ctmask)) if p.mode == "save" else (
        ("ctmask", p.ctmask), ("nfmask", p.nfmask))
    return out + f" {first[0]} 0x{first[1]:x} {second[0]} ~0x{second[1]:x}"


CONNMARK = REGISTRY.add_target(TargetEntry(
    "CONNMARK",
    (*(_opt(o) if "mark" in o and o not in ("save-mark", "restore-mark") else _flag(o)
       for o in _CONNMARK_OPS), _opt("mask"), _opt("nfmask"), _opt("ctmask")),
    _build_connmark, _save_connmark, terminal=False, describe=_describe_connmark))

# --- CT, NOTRACK, TRACE ----------------------------------------------------------------------

CT_EVENTS = ("new", "related", "destroy", "reply", "assured", "protoinfo", "helper", "mark",
             "natseqinfo", "secmark")
EXP_EVENTS = ("new",)
RAW_CHAINS = ("PREROUTING", "OUTPUT")


@dataclass(frozen=True)
class Ct:
    """CT: notrack, helper, timeout policy, event masks and zone (`zone_dir` "", "orig" or
    "reply"; zone "mark" takes the zone from the packet mark)."""

    notrack: bool = False
    helper: str = ""
    timeout: str = ""
    ctevents: tuple[str, ...] = ()
    expevents: tuple[str, ...] = ()
    zone: int | str = 0
    zone_dir: str = ""


def _events(text: str | None, table: tuple[str, ...]) -> tuple[str, ...]:
    if text is None:
        return ()
    names = text.split(",")
    for n in names:
        if n not in table:
            raise MatchError(f"CT: unknown event type {n!r}", n)
    return tuple(e for e in table if e in names)


def _build_ct(opts: Opts, ctx: Context) -> Ct:
    exclusive("CT", opts, "zone", "zone-orig", "zone-reply")
    zone: int | str = 0
    zone_dir = ""
    for key in ("zone", "zone-orig", "zone-reply"):
        text = arg(opts, key)
        if text is not None:
            zone = "mark" if text == "mark" else parse_uint(text, 0, 0xFFFF, "zone")
            zone_dir = key[5:]
    return Ct("notrack" in opts, arg(opts, "helper") or "", arg(opts, "timeout") or "",
              _events(arg(opts, "ctevents"), CT_EVENTS),
              _events(arg(opts, "expevents"), EXP_EVENTS), zone, zone_dir)


def _save_ct(p: Ct, ctx: Context) -> list[str]:
    out: list[str] = ["--notrack"] if p.notrack else []
    if p.helper:
        out += ["--helper", bare(p.helper)]
    if p.timeout:
        out += ["--timeout", bare(p.timeout)]
    if p.ctevents:
        out += ["--ctevents", ",".join(p.ctevents)]
    if p.expevents:
        out += ["--expevents", ",".join(p.expevents)]
    if p.zone:
        out += ["--zone" + (f"-{p.zone_dir}" if p.zone_dir else ""), str(p.zone)]
    return out


def _describe_ct(p: Ct, ctx: Context, numeric: bool) -> str:
    out = "CT" + (" notrack" if p.notrack else "")
    out += f" helper {p.helper}" if p.helper else ""
    out += f" timeout {p.timeout}" if p.timeout else ""
    out += f" ctevents {','.join(p.ctevents)}" if p.ctevents else ""
    out += f" expevents {','.join(p.expevents)}" if p.expevents else ""
    if p.zone:
        out += " zone" + (f"-{p.zone_dir}" if p.zone_dir else "") + f" {p.zone}"
    return out


CT = REGISTRY.add_target(TargetEntry(
    "CT", (_flag("notrack"), _opt("helper"), _opt("timeout"), _opt("ctevents"),
           _opt("expevents"), _opt("zone"), _opt("zone-orig"), _opt("zone-reply")),
    _build_ct, _save_ct, terminal=False, tables=frozenset({"raw"}),
    check_hook=_hooks("CT", RAW_CHAINS), describe=_describe_ct))
NOTRACK = REGISTRY.add_target(TargetEntry(
    "NOTRACK", terminal=False, tables=frozenset({"raw"}),
    check_hook=_hooks("NOTRACK", RAW_CHAINS), describe=lambda p, c, n: "NOTRACK"))
TRACE = REGISTRY.add_target(TargetEntry(
    "TRACE", terminal=False, tables=frozenset({"raw"}), check_hook=_hooks("TRACE", RAW_CHAINS)))

# --- TCPMSS, CHECKSUM ------------------------------------------------------------------------

CLAMP = "clamp-mss-to-pmtu"


def _syn_match(ctx: Context) -> bool:
    for m in ctx.matches:
        flags = getattr(m.params, "flags", None) if m.kind == "tcp" else None
        if flags is not None and flags.comp & 0x02 and not flags.invert:
            return True
    return False


def _build_tcpmss(opts: Opts, ctx: Context) -> int | str:
    exclusive("TCPMSS", opts, "set-mss", CLAMP)
    need("TCPMSS", opts, "set-mss", CLAMP, names="--set-mss or --clamp-mss-to-pmtu")
    if ctx.proto != IpProto.TCP or ctx.proto_inverted:
        raise MatchError("TCPMSS: only valid for -p tcp", "TCPMSS")
    if not _syn_match(ctx):
        raise MatchError("TCPMSS: only works on TCP SYN packets (add --tcp-flags SYN,RST SYN)",
                         "TCPMSS")
    text = arg(opts, "set-mss")
    return CLAMP if text is None else parse_uint(text, 0, 0xFFFF, "MSS")


def _check_tcpmss(p: int | str, ctx: Context) -> str | None:
    if p == CLAMP and ctx.chain and ctx.chain not in ("FORWARD", "OUTPUT", "POSTROUTING"):
        return "TCPMSS: path-MTU clamping only supported in FORWARD, OUTPUT and POSTROUTING"
    return None


TCPMSS = REGISTRY.add_target(TargetEntry(
    "TCPMSS", (_opt("set-mss"), _flag(CLAMP)), _build_tcpmss,
    lambda p, c: [f"--{CLAMP}"] if p == CLAMP else ["--set-mss", str(p)],
    terminal=False, check_hook=_check_tcpmss,
    describe=lambda p, c, n: "TCPMSS clamp to PMTU" if p == CLAMP else f"TCPMSS set {p}"))


def _build_checksum(opts: Opts, ctx: Context) -> bool:
    need("CHECKSUM", opts, "checksum-fill")
    return True


CHECKSUM = REGISTRY.add_target(TargetEntry(
    "CHECKSUM", (_flag("checksum-fill"),), _build_checksum, lambda p, c: ["--checksum-fill"],
    terminal=False, tables=frozenset({"mangle"}), describe=lambda p, c, n: "CHECKSUM fill"))

# --- NFQUEUE ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Nfqueue:
    """NFQUEUE: queues first..last, --queue-bypass, --queue-cpu-fanout."""

    first: int = 0
    last: int = 0
    bypass: bool = False
    fanout: bool = False


def _build_nfqueue(opts: Opts, ctx: Context) -> Nfqueue:
    exclusive("NFQUEUE", opts, "queue-num", "queue-balance")
    first = last = 0
    if (text := arg(opts, "queue-num")) is not None:
        first = last = parse_uint(text, 0, 0xFFFF, "queue number")
    if (text := arg(opts, "queue-balance")) is not None:
        if ":" not in text:
            raise MatchError(f"NFQUEUE: bad range {text!r}", text)
        first, last = parse_uint_range(text, 0xFFFE, "queue number")
        if first == last:
            raise MatchError(f"NFQUEUE: bad range {text!r}", text)
    if "queue-cpu-fanout" in opts and first == last:
        raise MatchError("NFQUEUE: --queue-cpu-fanout needs --queue-balance",
                         "--queue-cpu-fanout")
    return Nfqueue(first, last, "queue-bypass" in opts, "queue-cpu-fanout" in opts)


def _save_nfqueue(p: Nfqueue, ctx: Context) -> list[str]:
    out = (["--queue-balance", f"{p.first}:{p.last}"] if p.last != p.first
           else ["--queue-num", str(p.first)])
    return out + (["--queue-bypass"] if p.bypass else []) + (
        ["--queue-cpu-fanout"] if p.fanout else [])


NFQUEUE = REGISTRY.add_target(TargetEntry(
    "NFQUEUE", (_opt("queue-num"), _opt("queue-balance"), _flag("queue-bypass"),
                _flag("queue-cpu-fanout")), _build_nfqueue, _save_nfqueue,
    describe=lambda p, c, n: " ".join(
        ["NFQUEUE", *(w.removeprefix("--queue-") for w in _save_nfqueue(p, c))])))

