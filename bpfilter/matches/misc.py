"""Other matches: owner (nf hook, see compiler/hooks/route.py) and rt (the IPv6 routing header)
compile; physdev, rpfilter, sctp, esp, ah, tcpmss, dscp, tos, cpu parse and print only."""

from __future__ import annotations

import grp
import pwd
from dataclasses import dataclass

from ..ir.model import Family
from ..ir.pred import Cmp, Const, Field, Pred, Range, RoutingHeader, all_of, any_of, negate
from .kernel import IpProto
from .registry import REGISTRY, Context, MatchEntry, MatchError, Option, Unsupported
from .tcpudp import PortTest, describe_ports
from .util import Opts, bang, exclusive, need, not_lowered, one
from .values import (
    PortRange,
    format_addr,
    format_range,
    parse_addr,
    parse_iface,
    parse_port_range,
    parse_uint,
    parse_uint_range,
)


def _flag(name: str, invert: bool = False) -> Option:
    return Option((f"--{name}",), name, nargs=0, invert=invert)


@dataclass(frozen=True)
class Test:
    """A value with its negation (what most options of these matches carry)."""

    value: object
    invert: bool = False


# --- owner -----------------------------------------------------------------------------------


def _id_range(text: str, db: str) -> tuple[int, int]:
    lo_s, dash, hi_s = text.partition("-")
    if not lo_s.isdigit():
        try:
            n = pwd.getpwnam(text).pw_uid if db == "uid" else grp.getgrnam(text).gr_gid
        except KeyError:
            raise MatchError(f"owner: bad {db} {text!r}", text) from None
        return n, n
    lo = parse_uint(lo_s, 0, 0xFFFFFFFE, db)
    hi = parse_uint(hi_s, 0, 0xFFFFFFFE, db) if dash else lo
    if hi < lo:
        raise MatchError(f"owner: bad {db} range {text!r}", text)
    return lo, hi


def _build_owner(opts: Opts, ctx: Context) -> tuple[tuple[str, Test], ...]:
    if not opts:
        raise MatchError("owner: at least one option is required", "owner")
    supp = one(opts, "suppl-groups")
    gid = one(opts, "gid-owner")
    if supp is not None and (gid is None or gid.index > supp.index):
        raise MatchError("owner: --suppl-groups requires --gid-owner before it",
                         "--suppl-groups")
    out: list[tuple[str, Test]] = []
    for key in ("socket-exists", "uid-owner", "gid-owner", "suppl-groups"):
        v = one(opts, key)
        if v is not None:
            value = _id_range(v.args[0], key[:3]) if v.args else None
            out.append((key, Test(value, v.invert)))
    return tuple(out)


def _save_owner(p: tuple[tuple[str, Test], ...], ctx: Context) -> list[str]:
    out: list[str] = []
    for key, t in p:
        out += [*bang(t.invert), f"--{key}"]
        if t.value is not None:
            out.append(format_range(*t.value, sep="-"))
    return out


_OWNER_LABELS = {"socket-exists": "owner socket exists", "uid-owner": "owner UID match",
                 "gid-owner": "owner GID match", "suppl-groups": "incl. suppl. groups"}


def _id_name(key: str, n: int) -> str | None:
    try:
        return pwd.getpwuid(n).pw_name if key == "uid-owner" else grp.getgrgid(n).gr_name
    except KeyError:
        return None


def _describe_owner(p: tuple[tuple[str, Test], ...], ctx: Context, numeric: bool) -> str:
    out = ""
    for key, t in p:
        out += f"{' !' if t.invert else ''} {_OWNER_LABELS[key]}"
        if t.value is not None:
            lo, hi = t.value
            name = None if numeric or lo != hi else _id_name(key, lo)
            out += f" {lo}-{hi}" if lo != hi else f" {name if name is not None else lo}"
    return out[1:]


def _check_owner(p: object, ctx: Context) -> str | None:
    if ctx.chain and ctx.chain not in ("OUTPUT", "POSTROUTING"):
        return f"owner: used from {ctx.chain}, but only valid from OUTPUT/POSTROUTING"
    return None


def _lower_owner(p: tuple[tuple[str, Test], ...], ctx: Context) -> Pred:
    """xt_owner's decision from the socket's state (none / no file / file) and the file's
    fsuid and fsgid; --suppl-groups is refused."""
    if ctx.hook not in ("nf", None):
        raise Unsupported("owner", f" on hook {ctx.hook}: the socket is read from the skb at "
                          "netfilter's hooks (use --hook nf)")
    d = dict(p)
    if "suppl-groups" in d:
        raise Unsupported("owner --suppl-groups", ": the supplementary groups of the socket's "
                          "file credentials are not read")
    match = {k for k in d}
    inv = {k for k, t in d.items() if t.invert}
    diff = match ^ inv  # bits of (info->match ^ info->invert)
    ids = {"uid-owner", "gid-owner"}
    no_socket = Const(not diff)
    socket_neg = "socket-exists" in inv
    no_file = Const(not socket_neg and not diff & ids)
    with_file: list[Pred] = [Const(not socket_neg)]
    for key, f in (("uid-owner", Field.OWNUID), ("gid-owner", Field.OWNGID)):
        t = d.get(key)
        if t is not None:
            lo, hi = t.value  # type: ignore[misc]
            preds_in = Range(f, lo, hi)
            with_file.append(negate(preds_in, t.invert))
    return any_of(all_of(Cmp(Field.OWNSTATE, 0), no_socket),
                  all_of(Cmp(Field.OWNSTATE, 1), no_file),
                  all_of(Cmp(Field.OWNSTATE, 2), *with_file))


OWNER = REGISTRY.add_match(MatchEntry(
    "owner", (Option(("--uid-owner",), "uid-owner"), Option(("--gid-owner",), "gid-owner"),
              _flag("socket-exists", True), _flag("suppl-groups")),
    _build_owner, _save_owner, _lower_owner, check_hook=_check_owner,
    describe=_describe_owner))

# --- physdev ---------------------------------------------------------------------------------

PHYSDEV_KEYS = ("physdev-is-in", "physdev-in", "physdev-is-out", "physdev-out",
                "physdev-is-bridged")


def _build_physdev(opts: Opts, ctx: Context) -> tuple[tuple[str, Test], ...]:
    need("physdev", opts, *PHYSDEV_KEYS, names="one of --physdev-in, --physdev-out, ...")
    out = []
    for key in PHYSDEV_KEYS:
        v = one(opts, key)
        if v is not None:
            out.append((key, Test(parse_iface(v.args[0]).name if v.args else None, v.invert)))
    return tuple(out)


def _save_physdev(p: tuple[tuple[str, Test], ...], ctx: Context) -> list[str]:
    out: list[str] = []
    for key, t in p:
        out += [*bang(t.invert), f"--{key}", *([t.value] if t.value is not None else [])]
    return out


def _check_physdev(p: tuple[tuple[str, Test], ...], ctx: Context) -> str | None:
    d = dict(p)
    bridged = d.get("physdev-is-bridged")
    out = "physdev-out" in d or "physdev-is-out" in d
    if (out and (bridged is None or bridged.invert)
            and ctx.chain in ("OUTPUT", "FORWARD", "POSTROUTING")):
        return ("physdev: --physdev-out and --physdev-is-out are only supported in the "
                "OUTPUT, FORWARD and POSTROUTING chains for bridged traffic")
    return None


PHYSDEV = REGISTRY.add_match(MatchEntry(
    "physdev", (Option(("--physdev-in",), "physdev-in"),
                Option(("--physdev-out",), "physdev-out"), _flag("physdev-is-in", True),
                _flag("physdev-is-out", True), _flag("physdev-is-bridged", True)),
    _build_physdev, _save_physdev, not_lowered("physdev"), check_hook=_check_physdev,
    describe=lambda p, c, n: "PHYSDEV match" + "".join(
        f"{' !' if t.invert else ''} --{k}" + (f" {t.value}" if t.value is not None else "")
        for k, t in p)))

# --- rpfilter --------------------------------------------------------------------------------

RPF_FLAGS = ("loose", "validmark", "accept-local", "invert")


def _check_rpfilter(p: object, ctx: Context) -> str | None:
    if ctx.table not in ("raw", "mangle"):
        return "rpfilter: only valid in the raw and mangle tables"
    if ctx.chain and ctx.chain != "PREROUTING":
        return f"rpfilter: used from {ctx.chain}, but only valid from PREROUTING"
    return None


RPFILTER = REGISTRY.add_match(MatchEntry(
    "rpfilter", tuple(_flag(f) for f in RPF_FLAGS),
    lambda o, c: tuple(f for f in RPF_FLAGS if f in o),
    lambda p, c: [f"--{f}" for f in p], not_lowered("rpfilter"), check_hook=_check_rpfilter,
    describe=lambda p, c, n: " ".join(("rpfilter", *p))))

# --- rt (IPv6 routing header) ----------------------------------------------------------------


def _build_rt(opts: Opts, ctx: Context) -> tuple[tuple[str, Test], ...]:
    out: list[tuple[str, Test]] = []
    for key in ("rt-type", "rt-segsleft", "rt-len", "rt-0-res", "rt-0-addrs", "rt-0-not-strict"):
        v = one(opts, key)
        if v is None:
            continue
        value: object = None
        if key in ("rt-type",):
            value = parse_uint(v.args[0], 0, 255, "type")
        elif key == "rt-len":
            value = parse_uint(v.args[0], 0, 0xFFFFFFFF, "length")
        elif key == "rt-segsleft":
            value = parse_uint_range(v.args[0], 0xFFFFFFFF, "segments left")
            if value == (0, 0xFFFFFFFF) and not v.invert:
                continue
        elif key == "rt-0-addrs":
            value = tuple(parse_addr(a, Family.IPV6) for a in v.args[0].split(","))
        out.append((key, Test(value, v.invert)))
    return tuple(out)


def _save_rt(p: tuple[tuple[str, Test], ...], ctx: Context) -> list[str]:
    out: list[str] = []
    for key, t in p:
        out += [*bang(t.invert), f"--{key}"]
        if key == "rt-segsleft":
            out.append(format_range(*t.value))
        elif key == "rt-0-addrs":
            out.append(",".join(format_addr(a) for a in t.value))
        elif t.value is not None:
            out.append(str(t.value))
    return out


def describe_nums(name: str, lo: int, hi: int, invert: bool) -> str:
    """` segsleft:3` / ` segslefts:!1:23`: a 32-bit range as the rt match prints it."""
    inv = "!" if invert else ""
    if (lo, hi) == (0, 0xFFFFFFFF) and not invert:
        return ""
    return f" {name}:{inv}{lo}" if lo == hi else f" {name}s:{inv}{lo}:{hi}"


def _describe_rt(p: tuple[tuple[str, Test], ...], ctx: Context, numeric: bool) -> str:
    out = "rt"
    for key, t in p:
        inv = "!" if t.invert else ""
        if key == "rt-type":
            out += f" type:{inv}{t.value}"
        elif key == "rt-segsleft":
            out += describe_nums("segsleft", *t.value, t.invert)
        elif key == "rt-len":
            out += f" length:{inv}{t.value}"
        elif key == "rt-0-addrs":
            out += " 0-addrs " + ",".join(format_addr(a) for a in t.value)
        else:
            out += {"rt-0-res": " reserved", "rt-0-not-strict": " 0-not-strict"}[key]
    return out


def _lower_rt(p: tuple[tuple[str, Test], ...], ctx: Context) -> Pred:
    """ip6t_rt: the first routing header's segments left, length and type, then (type 0)
    its reserved word; the addresses of a type 0 header are not read."""
    d = dict(p)
    for key in ("rt-0-addrs", "rt-0-not-strict"):
        if key in d:
            raise Unsupported(f"rt --{key}", ": the addresses of a type 0 routing header are "
                              "not read (the header is deprecated, RFC 5095)")
    preds: list[Pred] = [RoutingHeader()]
    seg = d.get("rt-segsleft")
    if seg is not None:
        lo, hi = seg.value  # type: ignore[misc]
        preds.append(negate(Range(Field.RHSEGS, lo, hi), seg.invert))
    ln = d.get("rt-len")
    if ln is not None:
        n = int(ln.value)  # type: ignore[arg-type]
        # The header's length is (hdrlen + 1) * 8 bytes.
        ok = n % 8 == 0 and 8 <= n <= 2048
        preds.append(negate(Cmp(Field.RHLEN, n // 8 - 1) if ok else Const(False), ln.invert))
    typ = d.get("rt-type")
    if typ is not None:
        preds.append(negate(Cmp(Field.RHTYPE, int(typ.value)), typ.invert))  # type: ignore
    if "rt-0-res" in d:
        preds.append(RoutingHeader(reserved=True))
    return all_of(*preds)


RT = REGISTRY.add_match(MatchEntry(
    "rt", (Option(("--rt-type",), "rt-type"), Option(("--rt-segsleft",), "rt-segsleft"),
           Option(("--rt-len",), "rt-len"), _flag("rt-0-res"),
           Option(("--rt-0-addrs",), "rt-0-addrs", invert=False), _flag("rt-0-not-strict")),
    _build_rt, _save_rt, _lower_rt, families=frozenset({Family.IPV6}),
    describe=_describe_rt))

# --- sctp ------------------------------------------------------------------------------------

SCTP_CHUNKS = {"DATA": 0, "INIT": 1, "INIT_ACK": 2, "SACK": 3, "HEARTBEAT": 4,
               "HEARTBEAT_ACK": 5, "ABORT": 6, "SHUTDOWN": 7, "SHUTDOWN_ACK": 8, "ERROR": 9,
               "COOKIE_ECHO": 10, "COOKIE_ACK": 11, "ECN_ECNE": 12, "ECN_CWR": 13,
               "SHUTDOWN_COMPLETE": 14, "I_DATA": 64, "RE_CONFIG": 130, "PAD": 132,
               "ASCONF": 193, "ASCONF_ACK": 128, "FORWARD_TSN": 192, "I_FORWARD_TSN": 194}


def _chunks(text_match: str, text_list: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    if text_match.lower() not in ("all", "any", "only"):
        raise MatchError(f"sctp: bad chunk match type {text_match!r}", text_match)
    items: dict[str, str] = {}
    for item in text_list.split(","):
        name, _, flags = item.partition(":")
        if name.upper() in ("ALL", "NONE"):
            items.update({n: "" for n in SCTP_CHUNKS} if name.upper() == "ALL" else {})
            continue
        if name.upper() not in SCTP_CHUNKS or not all(c.isalpha() for c in flags):
            raise MatchError(f"sctp: unknown chunk type {item!r}", item)
        items[name.upper()] = flags
    ordered = sorted(items.items(), key=lambda kv: SCTP_CHUNKS[kv[0]])
    return text_match.lower(), tuple(ordered)


def _build_sctp(opts: Opts, ctx: Context) -> tuple[tuple[str, Test], ...]:
    out: list[tuple[str, Test]] = []
    for key in ("sport", "dport", "chunk-types"):
        v = one(opts, key)
        if v is None:
            continue
        if key == "chunk-types":
            out.append((key, Test(_chunks(*v.args), v.invert)))
        else:
            r = parse_port_range(v.args[0], "sctp")
            out.append((key, Test((r.lo, r.hi), v.invert)))
    return tuple(out)


def _save_sctp(p: tuple[tuple[str, Test], ...], ctx: Context) -> list[str]:
    out: list[str] = []
    for key, t in p:
        if key == "chunk-types":
            kind, chunks = t.value
            text = ",".join(n + (f":{f}" if f else "") for n, f in chunks) or "NONE"
            out += [*bang(t.invert), "--chunk-types", kind, text]
        else:
            out += [*bang(t.invert), f"--{key}", format_range(*t.value)]
    return out


# Flag letters per chunk type, most significant bit first ("-": no flag at that bit).
SCTP_FLAGS = {"DATA": "----IUBE", "I_DATA": "----IUBE", "ABORT": "-------T",
              "SHUTDOWN_COMPLETE": "-------T"}


def _chunk_flags(name: str, given: str) -> str:
    """Flags as iptables prints them: by bit, upper case set, lower case clear."""
    letters = SCTP_FLAGS.get(name, "")
    out = ""
    for letter in letters:
        hits = [c for c in given if c.upper() == letter]
        if hits:
            out += hits[-1]
    return ":" + out if out else ""


def _describe_sctp(p: tuple[tuple[str, Test], ...], ctx: Context, numeric: bool) -> str:
    out = "sctp"
    for key, t in p:
        if key != "chunk-types":
            name = "spt" if key == "sport" else "dpt"
            out += describe_ports(name, PortTest(PortRange(*t.value), t.invert), "sctp", numeric)
            continue
        kind, chunks = t.value
        out += f"{' !' if t.invert else ''} {kind}"
        if not chunks:
            out += " NONE"
        elif len(chunks) == len(SCTP_CHUNKS) and not any(f for _, f in chunks):
            out += " ALL"  # `ALL` sets every chunk bit (the model keeps the named ones)
        else:
            out += " " + ",".join((f"0x{SCTP_CHUNKS[n]:04X}" if numeric else n)
                                  + _chunk_flags(n, f) for n, f in chunks)
    return out


SCTP = REGISTRY.add_match(MatchEntry(
    "sctp", (Option(("--source-port", "--sport"), "sport"),
             Option(("--destination-port", "--dport"), "dport"),
             Option(("--chunk-types",), "chunk-types", nargs=2)),
    _build_sctp, _save_sctp, not_lowered("sctp"), proto=(IpProto.SCTP,),
    describe=_describe_sctp))

# --- esp, ah, tcpmss: one numeric range each -------------------------------------------------


def _range_entry(name: str, key: str, hi: int, proto: tuple[int, ...] | None,
                 families: frozenset[Family] = frozenset(Family),
                 keep_full: bool = False) -> MatchEntry:
    def build(opts: Opts, ctx: Context) -> Test | None:
        if name == "tcpmss":
            need(name, opts, key)
        if name == "ah" and ctx.family is Family.IPV4 and (
                ctx.proto != IpProto.AH or ctx.proto_inverted):
            raise MatchError("ah: only valid for -p ah", "ah")
        v = one(opts, key)
        if v is None:
            return None
        r = parse_uint_range(v.args[0], hi, key)
        if r == (0, hi) and not v.invert and not keep_full:
            return None
        return Test(r, v.invert)

    def save(p: Test | None, ctx: Context) -> list[str]:
        return [] if p is None else [*bang(p.invert), f"--{key}", format_range(*p.value)]

    def describe(p: Test | None, ctx: Context, numeric: bool) -> str:
        if name == "tcpmss":
            return f"tcpmss match {'!' if p.invert else ''}{format_range(*p.value)}"
        return name + ("" if p is None else describe_nums("spi", *p.value, p.invert))

    return MatchEntry(name, (Option((f"--{key}",), key),), build, save, not_lowered(name),
                      proto=proto, families=families, describe=describe)


ESP = REGISTRY.add_match(_range_entry("esp", "espspi", 0xFFFFFFFF, (IpProto.ESP,)))
TCPMSS = REGISTRY.add_match(_range_entry("tcpmss", "mss", 0xFFFF, (IpProto.TCP,),
                                         keep_full=True))


@dataclass(frozen=True)
class AhMatch:
    """AH: SPI range; IPv6 also the header length and the reserved-field test."""

    spi: Test | None = None
    length: Test | None = None
    res: bool = False


_AH_SPI = _range_entry("ah", "ahspi", 0xFFFFFFFF, None)


def _build_ah(opts: Opts, ctx: Context) -> AhMatch:
    spi = _AH_SPI.build(opts, ctx)
    length = None
    if ctx.family is Family.IPV4 and ("ahlen" in opts or "ahres" in opts):
        raise MatchError("ah: --ahlen and --ahres are IPv6 only", "--ahlen")
    if (v := one(opts, "ahlen")) is not None:
        length = Test(parse_uint(v.args[0], 0, 0xFFFFFFFF, "ahlen"), v.invert)
    return AhMatch(spi, length, "ahres" in opts)


def _save_ah(p: AhMatch, ctx: Context) -> list[str]:
    out = _AH_SPI.save(p.spi, ctx)
    if p.length is not None:
        out += [*bang(p.length.invert), "--ahlen", str(p.length.value)]
    return out + (["--ahres"] if p.res else [])


def _describe_ah(p: AhMatch, ctx: Context, numeric: bool) -> str:
    # "ah spi:5length:6": ah prints its parts without separating spaces.
    out = "ah " + ("" if p.spi is None else describe_nums("spi", *p.spi.value,
                                                          p.spi.invert)[1:])
    if p.length is not None and (p.length.value or p.length.invert):
        out += f"length:{'!' if p.length.invert else ''}{p.length.value}"
    return out + (" reserved" if p.res else "")


AH = REGISTRY.add_match(MatchEntry(
    "ah", (Option(("--ahspi",), "ahspi"), Option(("--ahlen",), "ahlen"), _flag("ahres")),
    _build_ah, _save_ah, not_lowered("ah"), describe=_describe_ah))

# --- dscp, tos, cpu --------------------------------------------------------------------------

DSCP_CLASSES = {"CS0": 0, "CS1": 8, "CS2": 16, "CS3": 24, "CS4": 32, "CS5": 40, "CS6": 48,
                "CS7": 56, "BE": 0, "AF11": 10, "AF12": 12, "AF13": 14, "AF21": 18,
                "AF22": 20, "AF23": 22, "AF31": 26, "AF32": 28, "AF33": 30, "AF41": 34,
                "AF42": 36, "AF43": 38, "EF": 46}
TOS_NAMES = {"minimize-delay": 0x10, "maximize-throughput": 0x08,
             "maximize-reliability": 0x04, "minimize-cost": 0x02, "normal-service": 0x00}


def parse_dscp(opts: Opts, key: str, class_key: str, who: str) -> tuple[int, bool]:
    """A DSCP value (0-63) or class name, and its negation."""
    exclusive(who, opts, key, class_key)
    need(who, opts, key, class_key, names=f"--{key} or --{class_key}")
    v = one(opts, key) or one(opts, class_key)
    if v.name.endswith("class"):
        if v.args[0].upper() not in DSCP_CLASSES:
            raise MatchError(f"{who}: bad DSCP class {v.args[0]!r}", v.args[0])
        return DSCP_CLASSES[v.args[0].upper()], v.invert
    return parse_uint(v.args[0], 0, 63, "DSCP"), v.invert


def parse_tos(text: str) -> tuple[int, int]:
    """A TOS `value[/mask]` (mask 0xff by default) or symbolic name (mask 0x3f)."""
    if text.lower() in TOS_NAMES:
        return TOS_NAMES[text.lower()], 0x3F
    v_s, slash, m_s = text.partition("/")
    return parse_uint(v_s, 0, 255, "TOS"), parse_uint(m_s, 0, 255, "TOS mask") if slash else 0xFF


DSCP = REGISTRY.add_match(MatchEntry(
    "dscp", (Option(("--dscp",), "dscp"), Option(("--dscp-class",), "dscp-class")),
    lambda o, c: parse_dscp(o, "dscp", "dscp-class", "dscp"),
    lambda p, c: [*bang(p[1]), "--dscp", f"0x{p[0]:02x}"], not_lowered("dscp"),
    describe=lambda p, c, n: f"DSCP match {'!' if p[1] else ''}0x{p[0]:02x}"))


# The names `tos` and `TOS` print for a value under mask 0x3f (iptables' spelling).
TOS_SYMBOLS = {0x10: "Minimize-Delay", 0x08: "Maximize-Throughput",
               0x04: "Maximize-Reliability", 0x02: "Minimize-Cost", 0x00: "Normal-Service"}


def tos_symbol(value: int, mask: int, numeric: bool) -> str | None:
    """The symbolic name iptables prints for (value, mask), if any."""
    return None if numeric or mask != 0x3F else TOS_SYMBOLS.get(value)


def _describe_tos(p: tuple[int, int, bool], ctx: Context, numeric: bool) -> str:
    sym = tos_symbol(p[0], p[1], numeric)
    return "tos match" + ("!" if p[2] else "") + (
        f" {sym}" if sym is not None else f"0x{p[0]:02x}/0x{p[1]:02x}")


def _build_tos(opts: Opts, ctx: Context) -> tuple[int, int, bool]:
    need("tos", opts, "tos")
    v = one(opts, "tos")
    return (*parse_tos(v.args[0]), v.invert)


TOS = REGISTRY.add_match(MatchEntry(
    "tos", (Option(("--tos",), "tos"),), _build_tos,
    lambda p, c: [*bang(p[2]), "--tos", f"0x{p[0]:02x}/0x{p[1]:02x}"], not_lowered("tos"),
    describe=_describe_tos))


def _build_cpu(opts: Opts, ctx: Context) -> tuple[int, bool]:
    need("cpu", opts, "cpu")
    v = one(opts, "cpu")
    return parse_uint(v.args[0], 0, 0xFFFFFFFF, "cpu"), v.invert


CPU = REGISTRY.add_match(MatchEntry(
    "cpu", (Option(("--cpu",), "cpu"),), _build_cpu,
    lambda p, c: [*bang(p[1]), "--cpu", str(p[0])], not_lowered("cpu"),
    describe=lambda p, c, n: f"cpu {'! ' if p[1] else ''}{p[0]}"))

