"""The matcher and target tables: one entry per kind, declaring options, printing and lowering.

An entry says how its iptables options parse (`options` and `build`), how it prints back in
iptables-save's canonical form (`save`), and what it reads from a packet (`lower` returns a
predicate over `Field`s, see `bpfilter.ir.pred`). Code generation is generic over predicates, so
adding a match touches one module. Stateful matches (conntrack, limits) return predicates of their
own that the compiler lowers specially.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..ir.model import Family
from ..ir.pred import Pred


class MatchError(ValueError):
    """A match or target's options are invalid; `token` names the offending option or value."""

    def __init__(self, message: str, token: str | None = None) -> None:
        super().__init__(message)
        self.token = token


class Unsupported(MatchError):
    """A match or target that parses and prints but that the compiler cannot lower (yet)."""

    def __init__(self, feature: str, detail: str = "") -> None:
        super().__init__(f"{feature}: not supported by the compiler{detail}", feature)
        self.feature = feature


@dataclass(frozen=True)
class Option:
    """One command-line option of a match or target.

    `key` is where the parsed value goes; `nargs` how many arguments follow (0 for a flag);
    `invert` whether `!` may negate it (before the option, or before its value, the old style).
    """

    names: tuple[str, ...]
    key: str
    nargs: int = 1
    invert: bool = True
    repeat: bool = False  # may be given several times (values accumulate)


@dataclass(frozen=True)
class OptVal:
    """A parsed option: its arguments and whether it was negated."""

    args: tuple[str, ...]
    invert: bool = False
    name: str = ""  # the spelling used, for messages
    index: int = 0  # position among the rule's arguments (some options depend on order)


@dataclass(frozen=True)
class Context:
    """What a match or target may depend on when built, printed or lowered."""

    family: Family
    table: str = "filter"
    chain: str = ""
    proto: int | None = None  # from `-p`, None when absent or negated
    proto_inverted: bool = False
    hook: str | None = None  # the hook flavour when compiling (nf, tc, xdp), None when parsing
    # The rule's other matches (targets such as TCPMSS depend on them).
    matches: tuple[Any, ...] = ()
    # Named sets `-m set` may reference: name -> bpfilter.ir.sets.SetDef.
    sets: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)


# `describe(params, ctx, numeric)`: the text the extension's print function writes into the
# last column of `iptables -L` (`numeric` is -n), without the one space every print starts
# with: "tcp dpt:22", "reject-with icmp-port-unreachable"; "" when it prints nothing.
Describe = Callable[[Any, Context, bool], str]


@dataclass(frozen=True)
class MatchEntry:
    """A match kind."""

    name: str
    options: tuple[Option, ...]
    build: Callable[[dict[str, OptVal | list[OptVal]], Context], Any]
    save: Callable[[Any, Context], list[str]]
    lower: Callable[[Any, Context], Pred]
    families: frozenset[Family] = frozenset(Family)
    # Protocol the match requires from `-p` (netfilter refuses the rule otherwise).
    proto: tuple[int, ...] | None = None
    # Printed module name when it differs from `name` (e.g. "icmp6" for kind icmpv6).
    module: str | None = None
    aliases: tuple[str, ...] = ()
    # Hooks (hook flavour, chain) it cannot run on; a function returning an error or None.
    check_hook: Callable[[Any, Context], str | None] | None = None
    builtin: bool = False  # printed without `-m` (the ip/ip6 header part of a rule)
    # `-p` must precede the match's options (multiport checks it while parsing them).
    proto_first: bool = False
    # What `iptables -L` prints for it (the extension's print function), see `Describe`.
    describe: Describe | None = None

    def option(self, name: str) -> Option | None:
        """The option spelled `name`, if this entry has it."""
        for o in self.options:
            if name in o.names:
                return o
        return None


@dataclass(frozen=True)
class TargetEntry:
    """A target kind (ACCEPT, DROP, REJECT, ...). `terminal` targets end rule traversal."""

    name: str
    options: tuple[Option, ...] = ()
    build: Callable[[dict[str, OptVal | list[OptVal]], Context], Any] = lambda o, c: None
    save: Callable[[Any, Context], list[str]] = lambda p, c: []
    terminal: bool = True
    families: frozenset[Family] = frozenset(Family)
    tables: frozenset[str] | None = None  # tables it is valid in (None: all)
    check_hook: Callable[[Any, Context], str | None] | None = None
    describe: Describe | None = None  # see `Describe`; None: iptables -L prints nothing


@dataclass
class Registry:
    """All known match and target entries, by every name they answer to."""

    matches: dict[str, MatchEntry] = field(default_factory=dict)
    targets: dict[str, TargetEntry] = field(default_factory=dict)

    def add_match(self, entry: MatchEntry) -> MatchEntry:
        """Register a match entry under its name and aliases."""
        for n in (entry.name, *entry.aliases):
            if n in self.matches:
                raise ValueError(f"match {n!r} registered twice")
            self.matches[n] = entry
        return entry

    def add_target(self, entry: TargetEntry) -> TargetEntry:
        """Register a target entry."""
        if entry.name in self.targets:
            raise ValueError(f"target {entry.name!r} registered twice")
        self.targets[entry.name] = entry
        return entry

    def match(self, name: str) -> MatchEntry:
        """The match entry called `name` (KeyError if unknown)."""
        return self.matches[name]


REGISTRY = Registry()
