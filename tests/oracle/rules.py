"""Rulesets of the differential suite as data: rendered to iptables-restore text for both sides.

A rule keeps, besides its option words, the packet field values that make its matches hold
(`aim`), so packet strategies can aim at rules and at their boundaries.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import Any

from bpfilter.ir.model import ACCEPT, BUILTIN_CHAINS, DROP, Family

TERMINAL = (ACCEPT, DROP)


@dataclass(frozen=True)
class RuleSpec:
    """One rule: option words in order, and what it does when it matches."""

    args: tuple[str, ...]
    target: str | None = None  # ACCEPT, DROP, RETURN, a chain name, or None (count only)
    goto: bool = False
    needs: frozenset[str] = frozenset()  # match kinds (registry names) the rule uses
    aim: tuple[tuple[str, Any], ...] = field(default=(), compare=False)

    def line(self, chain: str) -> str:
        """The rule as an iptables-restore line."""
        words = ["-A", chain, *self.args]
        if self.target is not None:
            words += ["-g" if self.goto else "-j", self.target]
        return " ".join(words)

    @property
    def decides(self) -> bool:
        """True when the rule ends traversal with a verdict."""
        return self.target in TERMINAL


@dataclass(frozen=True)
class RulesetSpec:
    """One table holding a built-in chain (with its policy) and user chains, in order."""

    family: Family
    table: str
    chain: str
    policy: str
    chains: tuple[tuple[str, tuple[RuleSpec, ...]], ...]  # the built-in chain first

    def text(self) -> str:
        """iptables-restore input for this table."""
        lines = [f"*{self.table}"]
        for name in BUILTIN_CHAINS[self.table]:
            lines.append(f":{name} {self.policy if name == self.chain else ACCEPT} [0:0]")
        lines += [f":{name} - [0:0]" for name, _ in self.chains[1:]]
        for name, rules in self.chains:
            lines += [r.line(name) for r in rules]
        lines.append("COMMIT")
        return "\n".join(lines) + "\n"

    def rule(self, chain: str, n: int) -> RuleSpec:
        """Rule `n` (1-based) of `chain`."""
        return dict(self.chains)[chain][n - 1]

    @property
    def chain_names(self) -> tuple[str, ...]:
        """The built-in chain and the user chains."""
        return tuple(name for name, _ in self.chains)

    def rules(self) -> list[RuleSpec]:
        """Every rule of every chain."""
        return [r for _, rules in self.chains for r in rules]

    def needs(self) -> set[str]:
        """Match kinds used anywhere."""
        out: set[str] = set()
        for r in self.rules():
            out |= r.needs
        return out

    def aims(self, key: str) -> list[Any]:
        """Every aimed value of field `key` across the rules."""
        return [v for r in self.rules() for k, v in r.aim if k == key]


def nf_decider(spec: RulesetSpec,
               deltas: dict[tuple[str, int | None], Any]) -> tuple[str, int | None] | None:
    """The rule (or policy) that gave netfilter's verdict, read off the counter deltas.

    Only an ACCEPT/DROP rule or the policy decides, and a decision is the last thing a packet
    does; None when nothing decided: a hotdrop (the dropping match bumps no counter).
    """
    for (chain, n), c in deltas.items():
        if c.packets and n is not None and chain in spec.chain_names \
                and spec.rule(chain, n).decides:
            return chain, n
    pol = deltas.get((spec.chain, None))
    if pol is not None and pol.packets:
        return spec.chain, None
    return None


def spec_from_text(text: str, family: Family, chain: str = "INPUT") -> RulesetSpec:
    """Describe hand-written restore text of one table (tested built-in chain `chain`)."""
    table = ""
    policy = ACCEPT
    chains: dict[str, list[RuleSpec]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith(":"):
            name, pol = line[1:].split()[:2]
            if name == chain:
                policy = pol
            elif name not in BUILTIN_CHAINS[table]:
                chains[name] = []
        elif line.startswith("-A"):
            words = shlex.split(line)
            args, target, goto = words[2:], None, False
            for i, w in enumerate(args[:-1]):
                if w in ("-j", "-g"):
                    args, target, goto = args[:i], args[i + 1], w == "-g"
                    break
            chains.setdefault(words[1], []).append(RuleSpec(tuple(args), target, goto))
    main = (chain, tuple(chains.pop(chain, [])))
    return RulesetSpec(family, table, chain, policy,
                       (main, *((n, tuple(r)) for n, r in chains.items())))
