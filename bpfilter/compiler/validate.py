"""Checks a table before code generation: chain references, loops, what the hook can evaluate."""

from __future__ import annotations

from dataclasses import dataclass

from ..ir.model import GOTO, JUMP, Chain, Origin, Rule, Table, jump_loop, jump_target


class CompileError(ValueError):
    """The ruleset cannot be compiled; the message names the rule (file:line) and the reason."""

    def __init__(self, message: str, origin: Origin | None = None) -> None:
        where = f"{origin}: " if origin is not None else ""
        super().__init__(f"{where}{message}")
        self.origin = origin


def rule_label(chain: str, index: int, rule: Rule) -> str:
    """`-A CHAIN ...` text of a rule for messages (its source line when known)."""
    if rule.origin is not None and rule.origin.text:
        return rule.origin.text.strip()
    return f"rule {index} of chain {chain}"


@dataclass
class Reach:
    """User chains reachable from each built-in chain, in first-reached order."""

    from_builtin: dict[str, list[str]]


def check_references(table: Table) -> None:
    """Every jump names an existing user chain, and no chain reaches itself."""
    for chain in table.chains.values():
        for n, rule in enumerate(chain.rules, 1):
            target = jump_target(rule)
            if target is None:
                continue
            if target not in table.chains:
                raise CompileError(f"chain {chain.name}, rule {n}: jump to undefined chain "
                                   f"{target!r}", rule.origin)
            if table.chains[target].builtin:
                raise CompileError(f"chain {chain.name}, rule {n}: cannot jump to built-in "
                                   f"chain {target!r}", rule.origin)
    found = jump_loop(table, table.chains)
    if found is not None:
        rule, path = found
        raise CompileError(f"chain loop: {' -> '.join(path)}", rule.origin)


def reachable(table: Table, start: Chain) -> list[str]:
    """User chains reachable from `start`, depth first in rule order."""
    seen: list[str] = []

    def walk(chain: Chain) -> None:
        for rule in chain.rules:
            target = jump_target(rule)
            if target is not None and target not in seen:
                seen.append(target)
                walk(table.chains[target])

    walk(start)
    return seen


def call_depth(table: Table, name: str, memo: dict[str, int] | None = None) -> int:
    """Longest chain of nested jumps below `name` (the verifier allows 8 frames)."""
    memo = {} if memo is None else memo
    if name in memo:
        return memo[name]
    depth = 0
    for rule in table.chains[name].rules:
        target = jump_target(rule)
        if target is not None:
            depth = max(depth, 1 + call_depth(table, target, memo))
    memo[name] = depth
    return depth


def always_decides(table: Table, name: str, memo: dict[str, bool] | None = None) -> bool:
    """True if chain `name` can never return to its caller (every path ends in a verdict).

    Conservative: no RETURN, no goto to a chain that may return, and a last rule without
    matches (comments aside) whose target decides.
    """
    memo = {} if memo is None else memo
    if name in memo:
        return memo[name]
    memo[name] = False  # no loops exist, but be safe while recursing
    chain = table.chains[name]
    ok = bool(chain.rules)
    for rule in chain.rules:
        t = rule.target
        if t is not None and t.kind == "RETURN":
            ok = False
        if t is not None and t.kind == GOTO and not always_decides(table, t.params.chain, memo):
            ok = False
    if ok:
        last = chain.rules[-1]
        t = last.target
        unconditional = all(m.kind == "comment" for m in last.matches)
        if not unconditional or t is None:
            ok = False
        elif t.kind in (JUMP, GOTO):
            ok = always_decides(table, t.params.chain, memo)
        else:
            ok = t.kind in ("ACCEPT", "DROP")
    memo[name] = ok
    return ok
