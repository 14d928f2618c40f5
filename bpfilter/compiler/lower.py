"""Lowering one rule's matches to a predicate, in netfilter's evaluation order."""

from __future__ import annotations

from ..ir.model import Family, Rule
from ..ir.pred import (
    AllOf,
    AnyOf,
    Cmp,
    Field,
    Not,
    Pred,
    Range,
    RateLimit,
    TcpOption,
    all_of,
    fields_of,
)
from ..matches import REGISTRY, Context, MatchError
from ..matches.ip import BUILTIN_ORDER
from .validate import CompileError

_BUILTIN_RANK = {k: i for i, k in enumerate(BUILTIN_ORDER)}


def rule_context(rule: Rule, family: Family, table: str, chain: str, hook: str | None,
                 cache: dict | None = None) -> Context:
    """The context `rule`'s matches are lowered in (with its `-p`, None when absent or
    negated); equal contexts are shared through `cache`."""
    proto, inverted = None, False
    for m in rule.matches:
        if m.kind == "proto":
            proto = m.params.proto or None
            inverted = m.params.invert
            break
    key = (family, table, chain, hook, proto, inverted)
    ctx = cache.get(key) if cache is not None else None
    if ctx is None:
        ctx = Context(family, table, chain, None if inverted else proto, inverted, hook)
        if cache is not None:
            cache[key] = ctx
    return ctx


def lower_rule(rule: Rule, ctx: Context) -> Pred:
    """The conjunction of a rule's matches; raises CompileError naming the rule."""
    # ip_packet_match() tests the built-in part first (-s -d -i -o -p -f, in that order),
    # then the matches in rule order; only the order of hotdrops depends on it.
    rank = _BUILTIN_RANK
    builtins = [m for m in rule.matches if m.kind in rank]
    if len(builtins) > 1:
        builtins.sort(key=lambda m: rank[m.kind])
    parts: list[Pred] = []
    for m in [*builtins, *(m for m in rule.matches if m.kind not in rank)]:
        entry = REGISTRY.matches.get(m.kind)
        if entry is None:
            raise CompileError(f"match {m.kind!r} is not supported", rule.origin)
        try:
            parts.append(entry.lower(m.params, ctx))
        except MatchError as e:
            raise CompileError(f"match {m.kind!r}: {e}", rule.origin) from None
    return all_of(*parts)


def pred_info(pred: Pred) -> tuple[set[Field], bool, bool]:
    """Fields `pred` reads, whether it scans TCP options, whether it has rate limits."""
    fields: set[Field] = set()
    opts = limits = False
    todo = [pred]
    while todo:
        p = todo.pop()
        t = type(p)
        if t is AllOf or t is AnyOf:
            todo.extend(p.preds)
        elif t is Not:
            todo.append(p.pred)
        elif t is TcpOption:
            opts = True
        elif t is RateLimit:
            limits = True
        elif t is Cmp or t is Range:
            fields.add(p.field)
        else:
            fields |= fields_of(p)
    return fields, opts, limits


def key_limits(pred: Pred, rule: tuple) -> Pred:
    """Give each rate limit of a rule its own key (rule, position): its bucket."""
    count = 0

    def walk(p: Pred) -> Pred:
        nonlocal count
        if isinstance(p, RateLimit):
            count += 1
            return RateLimit(p.interval_ns, p.burst, (*rule, count))
        if isinstance(p, AllOf | AnyOf):
            return type(p)(tuple(walk(q) for q in p.preds))
        if isinstance(p, Not):
            return Not(walk(p.pred))
        return p

    return walk(pred)
