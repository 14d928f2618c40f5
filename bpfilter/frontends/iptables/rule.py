"""One iptables command line's arguments, parsed the way iptables' getopt_long loop does.

Options are looked up, exactly or by unambiguous prefix, among the built-in options and the
options of every match and target loaded so far (the newest first); a match is loaded by `-m`,
or implicitly from `-p` when an option is unknown. `!` negates the next option (or, the old
style, stands before an option's value). Matches and targets are built once the whole line is
read, so `-m tcp --dport 1 -p tcp` works as in iptables.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ...ir.model import (
    ACCEPT,
    BUILTIN_CHAINS,
    DROP,
    GOTO,
    JUMP,
    RETURN,
    ChainRef,
    Counters,
    Family,
    Match,
    Rule,
    Target,
)
from ...matches import REGISTRY
from ...matches.registry import Context, MatchEntry, MatchError, Option, OptVal, TargetEntry
from ...matches.values import parse_proto, proto_name
from .errors import RuleError
from .lexer import Token

VERDICTS = (ACCEPT, DROP, RETURN)
MAX_CHAIN_NAME = 28  # XT_EXTENSION_MAXNAMELEN - 1
# iptables targets this front-end does not implement: refused by name, never taken for chains.
KNOWN_TARGETS = frozenset({
    "QUEUE", "CLUSTERIP", "CONNSECMARK", "DNPT", "ECN", "HMARK", "IDLETIMER", "LED", "NETMAP",
    "RATEEST", "SECMARK", "SET", "SNPT", "SYNPROXY", "TCPOPTSTRIP", "TEE", "TPROXY", "ULOG",
    "MIRROR", "SAME", "BALANCE", "IPMARK", "ROUTE", "XOR", "CHAOS", "DELUDE", "TARPIT", "DHCPMAC",
    "ECHO", "IPV4OPTSSTRIP", "LOGMARK", "SYSRQ", "STEAL", "JLOG"})

COMMANDS = {"append": "A", "delete": "D", "check": "C", "insert": "I", "replace": "R",
            "list": "L", "list-rules": "S", "flush": "F", "zero": "Z", "new-chain": "N",
            "delete-chain": "X", "rename-chain": "E", "policy": "P", "help": "h",
            "version": "V"}
_LONG = {"source": "s", "src": "s", "destination": "d", "dst": "d", "protocol": "p",
         "in-interface": "i", "out-interface": "o", "fragments": "f", "jump": "j", "goto": "g",
         "match": "m", "set-counters": "c", "ipv4": "4", "ipv6": "6", "numeric": "n",
         "verbose": "v", "exact": "x", "table": "t", "wait": "w", "wait-interval": "W",
         "line-numbers": "0", "modprobe": "M", **COMMANDS}
_WITH_ARG = set("sdpiojgmctMADCIRNEP")
_BUILTIN_KEY = {"s": "src", "d": "dst", "i": "iif", "o": "oif", "p": "proto", "f": "frag"}
_BUILTIN_ORDER = ("src", "dst", "iif", "oif", "proto", "frag")


@dataclass
class Loaded:
    """A match or target loaded on this line, with the options given to it so far."""

    entry: MatchEntry | TargetEntry
    token: Token
    is_target: bool = False
    opts: dict[str, OptVal | list[OptVal]] = field(default_factory=dict)
    tokens: list[Token] = field(default_factory=list)

    @property
    def who(self) -> str:
        """The module name as written in messages."""
        return self.entry.name


@dataclass
class Command:
    """The line's command (`A`, `I`, `D`, ...), its chain and its further positional args."""

    op: str
    token: Token
    chain: str | None = None
    args: list[Token] = field(default_factory=list)


class RuleParser:
    """Parse one line's arguments; `chains` maps the table's chain names to "is built-in"."""

    def __init__(self, tokens: list[Token], *, family: Family, table: str,
                 chains: Mapping[str, bool], command: Command | None = None,
                 sets: Mapping[str, Any] | None = None) -> None:
        self.tokens = tokens
        self.sets = sets if sets is not None else {}  # name -> SetDef, for `-m set`
        self.family = family
        self.table = table
        self.chains = chains
        self.command = command
        self.builtin: dict[str, tuple[OptVal, list[Token]]] = {}
        self.loaded: list[Loaded] = []
        self.target: Loaded | None = None
        self.jump: tuple[str, str, Token] | None = None  # (JUMP/GOTO/verdict, chain, token)
        self.counters: Counters | None = None
        self.skip = False  # -4 / -6 for the other family: iptables ignores the line
        self.has_spec = False
        self._implicit_done = False
        self._i = 0
        self._invert: Token | None = None

    # --- the option loop ---------------------------------------------------------------------

    def parse(self) -> RuleParser:
        """Consume every argument."""
        while self._i < len(self.tokens):
            tok = self.tokens[self._i]
            self._i += 1
            if tok.text == "!":
                if self._invert is not None:
                    raise RuleError("multiple consecutive ! not allowed", tok)
                self._invert = tok
            elif tok.text.startswith("--") and len(tok.text) > 2:
                self._long(tok)
            elif tok.text.startswith("-") and len(tok.text) > 1 and tok.text != "--":
                self._short(tok)
            else:
                raise RuleError(f'bad argument "{tok.text}"', tok)
        if self._invert is not None:
            raise RuleError("nothing appropriate following !", self._invert)
        return self

    def _take(self, tok: Token, what: str) -> Token:
        if self._i >= len(self.tokens):
            raise RuleError(f'option "{what}" requires an argument', tok)
        self._i += 1
        return self.tokens[self._i - 1]

    def _has_arg(self) -> bool:
        return (self._i < len(self.tokens)
                and not self.tokens[self._i].text.startswith(("-", "!")))

    def _short(self, tok: Token) -> None:
        text = tok.text[1:]
        for pos, letter in enumerate(text):
            if letter not in _WITH_ARG and letter not in "f46nvxhVLSFZX0wW":
                raise RuleError(f'unknown option "-{letter}"', tok)
            if letter == "f" and self.family is Family.IPV6:
                raise RuleError('unknown option "-f" (ip6tables has no -f; use -m frag)', tok)
            rest = text[pos + 1:]
            if letter in _WITH_ARG or (letter in "FZXLS" and rest):
                # getopt: the rest of the word is the (required or optional) argument
                value = Token(rest, tok.column + pos + 2) if rest else None
                self._builtin(letter, f"-{letter}", tok, value)
                return
            self._builtin(letter, f"-{letter}", tok, None)

    def _long(self, tok: Token) -> None:
        name, eq, value = tok.text[2:].partition("=")
        attached = Token(value, tok.column + len(name) + 3) if eq else None
        hit = self._resolve(name, tok)
        if hit is None and self._load_proto_match(tok):
            hit = self._resolve(name, tok)
        if hit is None:
            raise RuleError(f'unknown option "--{name}"', tok)
        owner, opt, spelled = hit
        if owner is None:
            letter = _LONG[spelled]
            if letter not in _WITH_ARG and attached is not None:
                raise RuleError(f'option "--{spelled}" doesn\'t allow an argument', tok)
            self._builtin(letter, f"--{spelled}", tok, attached)
        else:
            self._ext_option(owner, opt, f"--{spelled}", tok, attached)

    def _resolve(self, name: str, tok: Token) -> tuple[Loaded | None, Option | None, str] | None:
        # perf: the answer depends only on the name, the family and the entries loaded so
        # far, which repeat from line to line; computing it costs a fifth of a rule's parse.
        entries = tuple(o.entry for o in reversed(self.loaded))
        key = (name, self.family, tuple(map(id, entries)))
        hit = _RESOLVED.get(key)
        if hit is None:
            if len(_RESOLVED) > 4096:
                _RESOLVED.clear()
            hit = _RESOLVED[key] = (*_resolve(name, self.family, entries), entries)
        kind, pos, opt, spelled, _ = hit
        if kind == "ambiguous":
            raise RuleError(spelled, tok)
        if kind is None:
            return None
        if kind == "builtin":
            return None, None, spelled
        return self.loaded[len(self.loaded) - 1 - pos], opt, spelled

    def _load_proto_match(self, tok: Token) -> bool:
        """iptables loads the match named after `-p` when an option is unknown (once)."""
        if self._implicit_done or "proto" not in self.builtin:
            return False
        val, toks = self.builtin["proto"]
        # Loaded even after `! -p`, as iptables does; building the rule then refuses it.
        self._implicit_done = True
        text = val.args[0].lower()
        if text.isdigit():
            text = proto_name(int(text), self.family)
        entry = _match_entry(text, self.family)
        if entry is None:
            return False
        self.loaded.append(Loaded(entry, toks[-1]))
        return True

    # --- built-in options --------------------------------------------------------------------

    def _builtin(self, letter: str, spelled: str, tok: Token, value: Token | None) -> None:
        invert = self._pop_invert()
        if letter in _WITH_ARG and value is None:
            value = self._take(tok, spelled)
        if letter in "ADCIRLSFZNXEPhV":
            if invert is not None:
                raise RuleError(f"cannot have ! before {spelled}", invert)
            self._command(letter, spelled, tok, value)
            return
        if letter in _BUILTIN_KEY:
            key = _BUILTIN_KEY[letter]
            self.has_spec = True
            if key in self.builtin:
                raise RuleError(f"multiple -{letter} flags not allowed", tok)
            toks = [tok]
            if value is not None and value.text == "!" and invert is None:
                invert = value  # old style: -s ! 10.0.0.1
                value = self._take(tok, spelled)
            if value is not None:
                toks.append(value)
            args = (value.text if letter != "p" else value.text.lower(),) if value else ()
            self.builtin[key] = (OptVal(args, invert is not None, spelled, tok.column), toks)
            return
        if invert is not None and letter not in "46nvx":
            raise RuleError(f"unexpected ! flag before {spelled}", invert)
        if letter == "m":
            self.has_spec = True
            if invert is not None:
                raise RuleError("unexpected ! flag before --match", invert)
            entry = _match_entry(value.text, self.family)
            if entry is None:
                other = _match_entry(value.text, None)
                what = (f"match '{value.text}' is not available for {self.family.value}"
                        if other is not None else f"unsupported match '{value.text}'")
                raise RuleError(what, value)
            self.loaded.append(Loaded(entry, value))
        elif letter in "jg":
            self.has_spec = True
            self._jump(letter, value)
        elif letter == "c":
            self._set_counters(tok, value)
        elif letter in "46":
            if (letter == "4") != (self.family is Family.IPV4):
                self.skip = True
        elif letter == "t":
            raise RuleError("the -t option cannot be used in a ruleset (use *table lines)", tok)
        elif letter in "nvx":
            pass  # listing flags: no effect on a ruleset
        else:
            raise RuleError(f'option "{spelled}" is not supported in a ruleset', tok)

    def _pop_invert(self) -> Token | None:
        inv, self._invert = self._invert, None
        return inv

    def _command(self, letter: str, spelled: str, tok: Token, value: Token | None) -> None:
        if self.command is not None:
            raise RuleError(f"cannot use {spelled} with -{self.command.op}", tok)
        cmd = Command(letter, tok, value.text if value is not None else None)
        if letter in "FZX" and value is None and self._has_arg():
            cmd.chain = self._take(tok, spelled).text
        numbered = letter in "IDZ" and self._has_arg() and self.tokens[self._i].text.isdigit()
        if numbered or letter in "REP":
            cmd.args.append(self._take(tok, spelled))
        self.command = cmd

    def _set_counters(self, tok: Token, value: Token) -> None:
        pkts, comma, byts = value.text.partition(",")
        if not comma:
            byts = self._take(tok, "-c").text if self._has_arg() else ""
        if not pkts.isdigit() or not byts.isdigit():
            raise RuleError(f'bad counters "{value.text}" (want -c packets,bytes)', value)
        self.counters = Counters(int(pkts), int(byts))

    def _jump(self, letter: str, value: Token) -> None:
        if self.jump is not None or self.target is not None:
            raise RuleError("multiple -j/-g flags not allowed", value)
        name = value.text
        if letter == "g":
            if self.chains.get(name) is not False:
                raise RuleError(f"goto '{name}' is not a user-defined chain", value)
            self.jump = (GOTO, name, value)
            return
        if name in VERDICTS:
            self.jump = (name, "", value)
            return
        entry = REGISTRY.targets.get(name)
        if entry is not None and name not in (JUMP, GOTO):
            if self.family not in entry.families:
                raise RuleError(f"target '{name}' is not available for {self.family.value}",
                                value)
            if entry.tables is not None and self.table not in entry.tables:
                raise RuleError(f"target '{name}' is only valid in the "
                                f"{'/'.join(sorted(entry.tables))} table", value)
            self.target = Loaded(entry, value, is_target=True)
            self.loaded.append(self.target)
            return
        builtin = self.chains.get(name)
        if builtin is False:
            self.jump = (JUMP, name, value)
        elif builtin is True:
            raise RuleError(f"cannot jump to built-in chain '{name}'", value)
        elif name in KNOWN_TARGETS:
            raise RuleError(f"unsupported target '{name}'", value)
        else:
            raise RuleError(f"target '{name}' is neither a declared chain nor a supported "
                            "target", value)

    # --- options of matches and targets ------------------------------------------------------

    def _ext_option(self, owner: Loaded, opt: Option, spelled: str, tok: Token,
                    attached: Token | None) -> None:
        invert = self._pop_invert()
        if invert is not None and not opt.invert:
            raise RuleError(f'{owner.who}: option "{spelled}" cannot be inverted', invert)
        entry = owner.entry
        if isinstance(entry, MatchEntry) and entry.proto_first:
            self._check_proto(owner, tok)
        args: list[Token] = []
        if opt.nargs == 0 and attached is not None:
            raise RuleError(f'option "{spelled}" doesn\'t allow an argument', tok)
        if attached is not None:
            args.append(attached)
        elif (opt.nargs and opt.invert and invert is None and self._i < len(self.tokens)
              and self.tokens[self._i].text == "!"):
            invert = self._take(tok, spelled)  # old style: --dport ! 22
        while len(args) < opt.nargs:
            args.append(self._take(tok, spelled))
        old = owner.opts.get(opt.key)
        if old is not None and not opt.repeat:
            raise RuleError(f'{owner.who}: option "{spelled}" may only be specified once', tok)
        val = OptVal(tuple(a.text for a in args), invert is not None, spelled, tok.column)
        if opt.repeat:
            owner.opts.setdefault(opt.key, []).append(val)  # type: ignore[union-attr]
        else:
            owner.opts[opt.key] = val
        owner.tokens += [tok, *args]

    def _check_proto(self, owner: Loaded, tok: Token) -> None:
        proto, inverted = self._proto()
        entry = owner.entry
        if proto not in (entry.proto or ()) or inverted:
            names = ", ".join(f"-p {proto_name(p, self.family)}" for p in entry.proto or ())
            raise RuleError(f"{entry.name} needs {names} before its options", tok)

    def _proto(self) -> tuple[int | None, bool]:
        if "proto" not in self.builtin:
            return None, False
        val, toks = self.builtin["proto"]
        try:
            proto = parse_proto(val.args[0])
        except MatchError as e:
            raise RuleError(str(e), toks[-1]) from None
        return (None if val.invert or proto == 0 else proto), val.invert

    # --- building the rules ------------------------------------------------------------------

    def context(self, chain: str) -> Context:
        """The context matches and targets are built in."""
        proto, inverted = self._proto()
        return Context(self.family, self.table, chain, proto, inverted, sets=self.sets)

    def rules(self, chain: str) -> list[Rule]:
        """The rules this line's rule specification stands for (address lists expanded)."""
        ctx = self.context(chain)
        builtin_chain = chain in BUILTIN_CHAINS.get(self.table, ())
        fixed: list[Match] = []
        lists: dict[str, list[Match | None]] = {}
        for key in _BUILTIN_ORDER:
            if key not in self.builtin:
                continue
            val, toks = self.builtin[key]
            entry = REGISTRY.matches[key]
            if key in ("src", "dst"):
                items = val.args[0].split(",")
                if len(items) > 1 and val.invert:
                    raise RuleError("! not allowed with multiple source or destination "
                                    "addresses", toks[-1])
                lists[key] = [self._builtin_match(entry, key, val, toks, ctx, item)
                              for item in items]
                continue
            m = self._builtin_match(entry, key, val, toks, ctx, val.args[0] if val.args else "")
            if m is not None:
                fixed.append(m)
        built: list[Match] = []
        for owner in self.loaded:
            if owner.is_target:
                continue
            entry = owner.entry
            assert isinstance(entry, MatchEntry)
            if entry.proto is not None and (ctx.proto not in entry.proto or ctx.proto_inverted):
                names = " or ".join(f"-p {proto_name(p, self.family)}" for p in entry.proto)
                raise RuleError(f"match '{entry.name}' is only valid with {names}", owner.token)
            params = self._build(owner, ctx)
            built.append(Match(entry.name, params))
        target = self._target(ctx, (*fixed, *built))
        if builtin_chain:
            self._check_hooks(ctx, fixed, built, target)
        rules: list[Rule] = []
        for src in lists.get("src", [None]):
            for dst in lists.get("dst", [None]):
                head = [m for m in (src, dst) if m is not None]
                rules.append(Rule((*head, *fixed, *built), target,
                                  self.counters or Counters()))
        return rules

    def _builtin_match(self, entry: MatchEntry, key: str, val: OptVal, toks: list[Token],
                       ctx: Context, text: str) -> Match | None:
        one = OptVal((text,), val.invert, val.name, val.index) if val.args else val
        try:
            params = entry.build({key: one}, ctx)
        except MatchError as e:
            raise RuleError(str(e), _find(toks, e.token)) from None
        # Options that match everything are not printed by iptables-save: drop them here so
        # that parse(save(r)) == r.
        if key in ("src", "dst") and not params.invert and not any(params.net.mask):
            return None
        if key in ("iif", "oif") and not params.invert and params.iface.name == "+":
            return None
        if key == "proto" and params.proto == 0 and ctx.family is Family.IPV4:
            return None  # ip6tables keeps it: `-p all` still walks the extension headers
        return Match(key, params)

    def _build(self, owner: Loaded, ctx: Context) -> object:
        try:
            return owner.entry.build(owner.opts, ctx)
        except MatchError as e:
            raise RuleError(str(e), _find([owner.token, *owner.tokens], e.token)) from None

    def _target(self, ctx: Context, matches: tuple[Match, ...]) -> Target | None:
        if self.jump is not None:
            kind, chain, _ = self.jump
            return Target(kind, ChainRef(chain)) if chain else Target(kind)
        if self.target is None:
            return None
        tctx = Context(ctx.family, ctx.table, ctx.chain, ctx.proto, ctx.proto_inverted,
                       matches=matches)
        return Target(self.target.entry.name, self._build(self.target, tctx))

    def _check_hooks(self, ctx: Context, fixed: list[Match], built: list[Match],
                     target: Target | None) -> None:
        for m in (*fixed, *built):
            entry = REGISTRY.matches[m.kind]
            if entry.check_hook is not None and (msg := entry.check_hook(m.params, ctx)):
                owner = next((o for o in self.loaded if o.entry is entry), None)
                tok = owner.token if owner else self.builtin[m.kind][1][0]
                raise RuleError(msg, tok)
        if target is not None and self.target is not None:
            entry = self.target.entry
            if entry.check_hook is not None and (msg := entry.check_hook(target.params, ctx)):
                raise RuleError(msg, self.target.token)


_RESOLVED: dict[tuple, tuple] = {}


def _resolve(name: str, family: Family, entries: tuple) -> tuple:
    """How `--name` resolves given the entries loaded (newest first): ("builtin", None, None,
    long name), ("ext", position, option, long name), ("ambiguous", None, None, message) or
    (None, None, None, None)."""
    cands: list[tuple[int | None, Option | None, str]] = []
    for long in _LONG:
        if long == "fragments" and family is Family.IPV6:
            continue
        cands.append((None, None, long))
    for pos, entry in enumerate(entries):
        for opt in entry.options:
            for spelling in opt.names:
                if spelling.startswith("--"):
                    cands.append((pos, opt, spelling[2:]))
    exact = [c for c in cands if c[2] == name]
    prefixed = exact or [c for c in cands if c[2].startswith(name)]
    if not exact:
        groups = {(_LONG.get(c[2]) if c[0] is None else (entries[c[0]].name, c[1].key))
                  for c in prefixed}
        if len(groups) > 1:
            names = ", ".join(sorted({"--" + c[2] for c in prefixed}))
            return "ambiguous", None, None, f'option "--{name}" is ambiguous ({names})'
    if not prefixed:
        return None, None, None, None
    pos, opt, spelled = prefixed[0]
    return ("builtin" if pos is None else "ext"), pos, opt, spelled


def _match_entry(name: str, family: Family | None) -> MatchEntry | None:
    entry = REGISTRY.matches.get(name)
    if entry is None or entry.builtin:
        return None
    if family is not None and family not in entry.families:
        return None
    return entry


def _find(tokens: list[Token], text: str | None) -> Token:
    """The token that carries `text` (the first one when nothing does)."""
    if text:
        for t in tokens:
            if t.text == text:
                return t
        for t in tokens:
            if text in t.text:
                return t
    return tokens[0]


def valid_chain_name(name: str) -> str | None:
    """Why `name` cannot name a user chain, or None."""
    if not name:
        return "empty chain name"
    if len(name) > MAX_CHAIN_NAME:
        return f"chain name '{name}' is longer than {MAX_CHAIN_NAME} characters"
    if name[0] in "-!":
        return f"chain name '{name}' may not start with '{name[0]}'"
    if any(c.isspace() for c in name):
        return f"chain name '{name}' contains blanks"
    if name in VERDICTS or name == "QUEUE" or name in REGISTRY.targets:
        return f"chain name '{name}' clashes with a target name"
    return None
