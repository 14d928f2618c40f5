"""Helpers shared by the match and target entries: option access, checks, printing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn

from ..ir.pred import Pred
from .registry import Context, MatchError, OptVal, Unsupported

Opts = dict[str, OptVal | list[OptVal]]


def one(opts: Opts, key: str) -> OptVal | None:
    """The (last) value given for `key`, if any."""
    v = opts.get(key)
    if isinstance(v, list):
        return v[-1] if v else None
    return v


def many(opts: Opts, key: str) -> list[OptVal]:
    """Every value given for `key`, in order."""
    v = opts.get(key)
    if v is None:
        return []
    return v if isinstance(v, list) else [v]


def arg(opts: Opts, key: str) -> str | None:
    """The first argument of option `key`, if given."""
    v = one(opts, key)
    return v.args[0] if v is not None and v.args else None


def bang(invert: bool) -> list[str]:
    """`["!"]` when inverted: the prefix iptables-save prints before a negated option."""
    return ["!"] if invert else []


def spelled(opts: Opts, key: str, default: str) -> str:
    """How option `key` was written (for messages)."""
    v = one(opts, key)
    return v.name if v is not None and v.name else default


def exclusive(who: str, opts: Opts, *keys: str) -> None:
    """At most one of `keys` may be given (iptables: "cannot be used together with")."""
    given = sorted((v.index, k) for k in keys if (v := one(opts, k)) is not None)
    if len(given) > 1:
        a, b = given[0][1], given[1][1]
        name_a, name_b = spelled(opts, a, a), spelled(opts, b, b)
        raise MatchError(
            f'{who}: option "{name_b}" cannot be used together with "{name_a}"', name_b)


def need(who: str, opts: Opts, *keys: str, names: str | None = None) -> None:
    """At least one of `keys` must be given."""
    if not any(k in opts for k in keys):
        raise MatchError(f"{who}: option {names or '--' + keys[0]} must be specified", who)


def fail(message: str, token: str | None = None) -> NoReturn:
    """Raise a MatchError."""
    raise MatchError(message, token)


def not_lowered(feature: str) -> Callable[[Any, Context], Pred]:
    """A `lower` for entries that parse and print but do not compile yet."""

    def lower(params: Any, ctx: Context) -> Pred:
        raise Unsupported(feature)

    return lower
