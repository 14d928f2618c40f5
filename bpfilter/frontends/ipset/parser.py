"""`ipset save` / `ipset restore` text → named sets.

Lines are ipset commands: `create NAME TYPE [options]`, `add NAME MEMBER [nomatch]`, and also
`del`, `flush` and `destroy` (with ipset's short and `-X` spellings). As `ipset restore` does
without `-exist`, creating a set twice or adding a member twice is an error; with `exist` both
are quietly accepted. Errors name the file, line and token, and nothing is returned on error.
"""

from __future__ import annotations

from ...ir.model import Family, Origin
from ...ir.sets import (
    DEFAULT_HASHSIZE,
    DEFAULT_MAXELEM,
    MAX_NAME,
    REFUSED_TYPES,
    SET_TYPES,
    IpSet,
    SetDef,
)
from ..iptables.errors import ParseError
from ..iptables.lexer import LexError, tokenize
from .elements import ELEMENT_FLAGS, SetError, addr_range, parse_member

COMMANDS = {"create": "create", "n": "create", "-N": "create", "add": "add", "a": "add",
            "-A": "add", "del": "del", "d": "del", "-D": "del", "flush": "flush", "f": "flush",
            "-F": "flush", "destroy": "destroy", "x": "destroy", "-X": "destroy"}
OTHER_COMMANDS = ("rename", "swap", "list", "save", "restore", "test", "help", "version",
                  "e", "w", "l", "s", "t", "-E", "-W", "-L", "-S", "-T", "-R", "-H", "-V")
LINE_WORDS = ("create", "add", "del", "flush", "destroy", "rename", "swap")
OLD_TYPES = {"iphash": "hash:ip", "nethash": "hash:net", "ipporthash": "hash:ip,port",
             "ipmap": "bitmap:ip", "portmap": "bitmap:port"}
# Creation options other than these are refused by name: they change what members carry.
REFUSED_OPTIONS = {
    "timeout": "members that expire", "counters": "per-member packet and byte counters",
    "comment": "per-member comments", "skbinfo": "per-member skb marks and queues",
    "forceadd": "evicting a random member when the set is full",
    "bitmask": "bit masks other than a prefix (use netmask)",
    "markmask": "hash:ip,mark sets",
}
MAX_BITMAP = 65536  # members of a bitmap:ip set
_HASH_OPTIONS = ("family", "hashsize", "maxelem", "bucketsize", "initval")


def parse_sets(text: str, *, filename: str = "<stdin>", exist: bool = False,
               sets: dict[str, IpSet] | None = None) -> dict[str, IpSet]:
    """Parse ipset restore text (on top of `sets`, which is left untouched); raise ParseError."""
    out = {name: IpSet(s.definition, dict(s.members), s.origin)
           for name, s in (sets or {}).items()}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            # The quote-aware lexer only where quotes are (sets may have 100,000s of lines).
            words = [t.text for t in tokenize(line)] if '"' in line else line.split()
            _line(out, words, Origin(filename, lineno, line), exist)
        except SetError as e:
            col = line.find(e.token) + 1 if e.token and e.token in line else None
            raise ParseError(str(e), filename, lineno, e.token, col or None, line) from None
        except LexError as e:
            raise ParseError(str(e), filename, lineno, '"', e.column, line) from None
    return out


def is_ipset_line(line: str) -> bool:
    """True for a line that is an ipset command (for files mixing ipset and iptables text)."""
    words = line.split()
    # Only the long spellings: -A, -N, ... are iptables' too, and one letter is too little.
    return bool(words) and words[0] in LINE_WORDS


def _line(sets: dict[str, IpSet], words: list[str], origin: Origin, exist: bool) -> None:
    cmd_s = words[0]
    cmd = COMMANDS.get(cmd_s)
    if cmd is None:
        if cmd_s in OTHER_COMMANDS:
            raise SetError(f"ipset command {cmd_s!r} is not supported in a set file", cmd_s)
        raise SetError(f"unknown ipset command {cmd_s!r}", cmd_s)
    args = words[1:]
    if cmd in ("flush", "destroy"):
        names = args[:1] or list(sets)
        for name in names:
            if name not in sets:
                raise SetError(f"the set with the given name does not exist: {name}", name)
            if cmd == "flush":
                sets[name].members.clear()
            else:
                del sets[name]
        if len(args) > 1:
            raise SetError(f"unexpected {args[1]!r} after the set name", args[1])
        return
    if not args:
        raise SetError(f"{cmd} needs a set name", cmd_s)
    name = args[0]
    if cmd == "create":
        d = parse_create(name, args[1:])
        old = sets.get(name)
        if old is not None:
            if exist and old.definition == d:
                return
            raise SetError(f"set {name!r} cannot be created: a set with the same name already "
                           "exists", name)
        sets[name] = IpSet(d, {}, origin)
        return
    s = sets.get(name)
    if s is None:
        raise SetError(f"the set with the given name does not exist: {name}", name)
    if len(args) < 2:
        raise SetError(f"{cmd} needs a member", name)
    nomatch = _member_flags(s.definition, args[2:], cmd)
    members = parse_member(s.definition, args[1])
    if cmd == "add":
        for parts in members:
            if parts in s.members and not exist:
                raise SetError(f"member {args[1]!r} cannot be added to set {name!r}: it is "
                               "already added", args[1])
            s.add(parts, nomatch)
        if len(s.members) > s.definition.capacity():
            raise SetError(f"set {name!r} is full ({s.definition.capacity()} members): "
                           f"cannot add {args[1]!r}", args[1])
    else:
        for parts in members:
            if not s.remove(parts) and not exist:
                raise SetError(f"member {args[1]!r} cannot be deleted from set {name!r}: it "
                               "is not added", args[1])


def _member_flags(d: SetDef, words: list[str], cmd: str) -> bool:
    nomatch = False
    for w in words:
        if w == "nomatch":
            if not d.type.has_net:
                raise SetError(f"{d.type.name} members cannot be flagged nomatch", w)
            nomatch = cmd == "add"
        elif w in ELEMENT_FLAGS:
            raise SetError(f"member option {w!r} is not supported (it needs a creation option "
                           "this implementation refuses)", w)
        else:
            raise SetError(f"unknown member option {w!r}", w)
    return nomatch


def _uint(value: str | None, opt: str, lo: int = 1, hi: int = (1 << 32) - 1) -> int:
    try:
        if value is None:
            raise ValueError
        v = int(value, 0)
    except ValueError:
        raise SetError(f"option {opt} needs a number, got {value!r}", value or opt) from None
    if not lo <= v <= hi:
        raise SetError(f"option {opt}: {value} is out of range ({lo}-{hi})", value)
    return v


def parse_create(name: str, words: list[str]) -> SetDef:
    """The definition a `create NAME TYPE options...` line gives."""
    if not name or len(name) > MAX_NAME:
        raise SetError(f"set name {name!r} must have 1-{MAX_NAME} characters", name or "create")
    if not words:
        raise SetError(f"create {name}: the set type is missing", name)
    tname = OLD_TYPES.get(words[0], words[0])
    if tname in REFUSED_TYPES:
        raise SetError(f"set type {tname} is not supported: {REFUSED_TYPES[tname]}", words[0])
    stype = SET_TYPES.get(tname)
    if stype is None:
        raise SetError(f"unknown set type {words[0]!r}", words[0])
    opts: dict[str, str | None] = {}
    i = 1
    while i < len(words):
        opt = words[i]
        if opt in REFUSED_OPTIONS:
            raise SetError(f"set option {opt!r} is not supported: {REFUSED_OPTIONS[opt]}", opt)
        valid = ("netmask",) if tname in ("hash:ip", "bitmap:ip") else ()
        valid += ("range",) if stype.bitmap else _HASH_OPTIONS
        if opt not in valid:
            raise SetError(f"option {opt!r} is not valid for {tname}", opt)
        if opt in opts:
            raise SetError(f"option {opt!r} given twice", opt)
        opts[opt] = words[i + 1] if i + 1 < len(words) else None
        i += 2
    family = Family.IPV4
    if "family" in opts:
        fam = {"inet": Family.IPV4, "inet6": Family.IPV6}.get(opts["family"] or "")
        if fam is None:
            raise SetError(f"family {opts['family']!r}: inet or inet6", opts["family"] or "family")
        family = fam
    if tname == "bitmap:port":
        family = None
    bits = 128 if family is Family.IPV6 else 32
    netmask = _uint(opts["netmask"], "netmask", 1, bits) if "netmask" in opts else None
    rng = None
    if stype.bitmap:
        if "range" not in opts:
            raise SetError(f"create {name}: {tname} needs a range", tname)
        rng = _range(tname, opts["range"] or "", netmask)
    for opt in ("bucketsize", "initval"):
        if opt in opts:
            _uint(opts[opt], opt, 0)
    return SetDef(name, stype, family,
                  maxelem=_uint(opts.get("maxelem", str(DEFAULT_MAXELEM)), "maxelem"),
                  hashsize=_uint(opts.get("hashsize", str(DEFAULT_HASHSIZE)), "hashsize"),
                  netmask=netmask, range=rng)


def _range(tname: str, text: str, netmask: int | None) -> tuple[int, int]:
    if tname == "bitmap:port":
        lo_s, dash, hi_s = text.partition("-")
        lo, hi = _uint(lo_s, "range", 0, 65535), _uint(hi_s if dash else lo_s, "range", 0, 65535)
        lo, hi = min(lo, hi), max(lo, hi)
        return lo, hi
    lo, hi = addr_range(SetDef("", SET_TYPES["hash:net"], Family.IPV4), text)
    shift = 0
    if netmask is not None:
        # The range holds whole blocks of the netmask.
        shift = 32 - netmask
        lo, hi = lo >> shift << shift, hi | ((1 << shift) - 1)
    if (hi - lo) >> shift >= MAX_BITMAP:
        raise SetError(f"range {text!r} of bitmap:ip holds more than {MAX_BITMAP} members", text)
    return lo, hi
