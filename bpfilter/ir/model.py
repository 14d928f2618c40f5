"""The ruleset model every front-end produces and the compiler consumes.

Structure: `Ruleset` → `Table` → `Chain` → `Rule` (matches, target). A match or target is a kind
(its entry in the matcher/target table) and a frozen, typed parameter value, so two rules compare
equal exactly when they mean the same thing; where a rule came from (`Origin`) and its counters do
not take part in that comparison.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Family(StrEnum):
    """Address family of a ruleset."""

    IPV4 = "ipv4"
    IPV6 = "ipv6"

    @property
    def addr_len(self) -> int:
        """Bytes in an address of this family."""
        return 4 if self is Family.IPV4 else 16


@dataclass(frozen=True)
class Origin:
    """Where a rule was written: file, line and the line's text."""

    file: str
    line: int
    text: str = ""

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class Counters:
    """Packet and byte counters (as `[packets:bytes]` in iptables-save)."""

    packets: int = 0
    bytes: int = 0

    def __add__(self, other: Counters) -> Counters:
        return Counters(self.packets + other.packets, self.bytes + other.bytes)


@dataclass(frozen=True)
class Match:
    """One match of a rule: `kind` names its matcher entry, `params` is that entry's value."""

    kind: str
    params: Any


@dataclass(frozen=True)
class Target:
    """What a rule does when it matches: `kind` names its target entry."""

    kind: str
    params: Any = None


# Target kinds with a meaning the compiler must know (others come from the target table).
ACCEPT, DROP, RETURN, JUMP, GOTO = "ACCEPT", "DROP", "RETURN", "JUMP", "GOTO"


@dataclass(frozen=True)
class ChainRef:
    """Parameters of a JUMP or GOTO target."""

    chain: str


@dataclass
class Rule:
    """A rule: all matches must hold for the target to apply; no target only counts."""

    matches: tuple[Match, ...]
    target: Target | None
    counters: Counters = field(default_factory=Counters, compare=False)
    origin: Origin | None = field(default=None, compare=False)

    def match(self, kind: str) -> Match | None:
        """The first match of `kind`, if any."""
        return next((m for m in self.matches if m.kind == kind), None)


BUILTIN_CHAINS: dict[str, tuple[str, ...]] = {
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
    "raw": ("PREROUTING", "OUTPUT"),
    "security": ("INPUT", "FORWARD", "OUTPUT"),
}


@dataclass
class Chain:
    """A chain: built-in ones have a policy (and policy counters), user chains have none."""

    name: str
    policy: str | None = None
    rules: list[Rule] = field(default_factory=list)
    counters: Counters = field(default_factory=Counters, compare=False)
    origin: Origin | None = field(default=None, compare=False)

    @property
    def builtin(self) -> bool:
        """True for a built-in chain (one with a policy)."""
        return self.policy is not None


@dataclass
class Table:
    """A table (filter, nat, ...) and its chains in declaration order."""

    name: str
    chains: dict[str, Chain] = field(default_factory=dict)

    def chain(self, name: str) -> Chain:
        """The chain called `name` (KeyError if absent)."""
        return self.chains[name]


@dataclass
class Ruleset:
    """A whole ruleset of one family."""

    family: Family
    tables: dict[str, Table] = field(default_factory=dict)
    source: str | None = field(default=None, compare=False)
    # Named sets rules may reference (`-m set`), by name: bpfilter.ir.sets.IpSet.
    sets: dict[str, Any] = field(default_factory=dict)

    def table(self, name: str) -> Table:
        """The table called `name`, created empty if absent."""
        return self.tables.setdefault(name, Table(name))

    def rule_count(self) -> int:
        """Number of rules in all tables."""
        return sum(len(c.rules) for t in self.tables.values() for c in t.chains.values())


def jump_target(rule: Rule) -> str | None:
    """The chain a rule jumps or goes to, if any."""
    t = rule.target
    if t is not None and t.kind in (JUMP, GOTO):
        assert isinstance(t.params, ChainRef)
        return t.params.chain
    return None


def jump_loop(table: Table, starts: Iterable[str]) -> tuple[Rule, list[str]] | None:
    """A chain that reaches itself through jumps and gotos, walking from `starts`: the rule
    that closes the loop and the chains on it (first and last the same); None if none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> tuple[Rule, list[str]] | None:
        state[name] = 1
        for rule in table.chains[name].rules:
            dest = jump_target(rule)
            if dest is None:
                continue
            if state.get(dest) == 1:
                return rule, [*path[path.index(dest):], dest]
            if state.get(dest) is None and (found := visit(dest, [*path, dest])):
                return found
        state[name] = 2
        return None

    for name in starts:
        if state.get(name) is None and (found := visit(name, [name])):
            return found
    return None
