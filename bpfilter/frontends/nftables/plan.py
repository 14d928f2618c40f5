"""One nft rule → the iptables rule lines (arguments) that do the same, helper chains included.

`plan_rule` reads the rule's expressions and statements in order: matches first, then `limit`
and `counter`, then `log` statements, then at most one verdict (`reject` included). `emit`
turns the plan into lines:

- one line when the matches fit one iptables rule and there is at most one target;
- a `log` followed by a verdict: the matches jump to a helper chain holding the LOG (or NFLOG)
  rules and the verdict, so the matches (and a `limit`) are evaluated once and the nft rule's
  packets are counted once, by the jumping rule. A `goto` or `return` verdict is reached by
  goto into the helper: when the helper's chain ends it returns where the nft rule's chain
  would have returned to;
- an anonymous set needing several rules (addresses, interfaces, ICMP types, more than 15 ports)
  with a terminal verdict: one rule per element (the elements are disjoint, so each packet
  meets at most one; the nft rule's count is their sum). With a non-terminal target on
  elements that may overlap (interface wildcards), or a `limit` to share, the rule jumps to a
  selector chain whose rules goto the helper: the first element that matches wins.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from ...ir.model import Counters, Family
from ..iptables.rule import MAX_CHAIN_NAME
from . import exprs, stmts
from .errors import Unsupported
from .exprs import Piece

MAX_EXPANSION = 256  # rules one nft rule may become through sets
TERMINAL = ("accept", "drop", "reject", "return", "goto")
TABLE_FAMILIES = {"ip": (Family.IPV4,), "ip6": (Family.IPV6,),
                  "inet": (Family.IPV4, Family.IPV6)}


@dataclass
class NftRule:
    """A rule as read from the JSON, with what messages need to name it."""

    chain: str  # "chain inet filter input"
    index: int  # position of its object in the `nftables` array
    pos: int  # 1-based position in its chain
    handle: Any
    expr: list
    comment: str | None = None

    def location(self, expr_index: int | None = None) -> str:
        """`nftables[7] rule 3 of chain inet filter input (handle 9), expression 2`."""
        out = f"nftables[{self.index}] rule {self.pos} of {self.chain}"
        if self.handle is not None:
            out += f" (handle {self.handle})"
        if expr_index is not None:
            out += f", expression {expr_index + 1}"
        return out

    def describe(self) -> str:
        """Short text for a rule's origin."""
        h = f" handle {self.handle}" if self.handle is not None else f" rule {self.pos}"
        return f"{self.chain.removeprefix('chain ')}{h}"


@dataclass
class Line:
    """One iptables rule: its arguments and, per argument, the index of the nft expression it
    came from (-1: made up by the translation)."""

    args: tuple[str, ...]
    owners: tuple[int, ...]
    rule: NftRule
    counters: Counters | None = None
    dest: str | None = None  # the chain it jumps or goes to

    @staticmethod
    def of(parts: list[tuple[tuple[str, ...], int]], rule: NftRule) -> Line:
        """A line from (arguments, expression index) parts."""
        args = tuple(a for p, _ in parts for a in p)
        owners = tuple(i for p, i in parts for _ in p)
        dest = None
        for p, _ in parts:
            if len(p) == 2 and p[0] in ("-j", "-g"):
                dest = p[1]
        return Line(args, owners, rule, dest=dest)


@dataclass
class Plan:
    """What one nft rule does in one family."""

    alts: list[list[tuple[tuple[str, ...], int]]]  # alternatives of match arguments
    overlap: bool
    stateful: list[tuple[tuple[str, ...], int]] = field(default_factory=list)
    targets: list[tuple[tuple[str, ...], int]] = field(default_factory=list)
    verdict: stmts.Verdict | None = None
    counters: Counters | None = None


def _tag(e: Exception, i: int) -> Exception:
    e.expr_index = i  # type: ignore[attr-defined]
    return e


def plan_rule(rule: NftRule, family: Family, table_family: str,
              chains: dict[str, str]) -> Plan | None:
    """The plan of `rule` in `family`; None when the rule only holds for the other family.
    Raises Unsupported (with `expr_index`) for anything out of scope."""
    pieces: list[tuple[Piece, int]] = []
    plan = Plan([], False)
    after_stmt = after_log = done = None
    for i, e in enumerate(rule.expr):
        try:
            if not isinstance(e, dict) or len(e) != 1:
                raise Unsupported("each expression must be an object with one key", str(e))
            key, body = next(iter(e.items()))
            if done is not None:
                raise Unsupported(f"'{key}' after the verdict is not supported", key)
            if key == "match":
                if after_stmt is not None:
                    # A statement before a match acts on packets the match then refuses.
                    raise Unsupported(f"a match after the '{after_stmt}' statement is not "
                                      "supported", "match")
                pieces.append((exprs.match(body, table_family), i))
            elif key == "counter":
                if not isinstance(body, (dict, type(None))):
                    raise Unsupported(f"named counter {body!r} is not supported", str(body))
                body = body or {}
                plan.counters = Counters(int(body.get("packets", 0)), int(body.get("bytes", 0)))
                after_stmt = after_stmt or key
            elif key == "limit":
                if after_log is not None:
                    raise Unsupported("limit after log is not supported", key)
                plan.stateful.append((stmts.limit(body).args, i))
                after_stmt = after_stmt or key
            elif key == "log":
                plan.targets.append((stmts.log(body), i))
                after_stmt = after_log = after_stmt or key
            elif key in stmts.VERDICTS:
                plan.verdict = stmts.verdict(key, body, chains)
                done = key
            elif key == "reject":
                plan.verdict, dep = stmts.reject(body, family, table_family)
                if dep is not None:
                    pieces.append((dep, i))
                done = key
            else:
                raise Unsupported(f"'{key}' is not supported", key)
        except Unsupported as err:
            raise _tag(err, i) from None
        except (TypeError, KeyError, ValueError, AttributeError, IndexError) as err:
            # Malformed JSON for a known kind (a named object where a value is expected, a
            # missing field): refused by name like an unsupported one, never a crash.
            key = next(iter(e)) if isinstance(e, dict) and e else str(e)
            raise _tag(Unsupported(f"malformed or unsupported '{key}' ({err})", key), i) \
                from None
    if plan.verdict is not None:
        plan.targets.append((plan.verdict.args, len(rule.expr) - 1))
    implied = {(p.family, i) for p, i in pieces if p.family is not None}
    fams = {f for f, _ in implied}
    if len(fams) > 1:
        i = max(i for _, i in implied)
        raise _tag(Unsupported("the rule mixes IPv4 and IPv6 expressions (matches nothing)",
                               "family"), i)
    if fams and not fams & set(TABLE_FAMILIES[table_family]):
        i = min(i for _, i in implied)
        raise _tag(Unsupported(f"the expression only holds for {next(iter(fams)).value}, "
                               f"never in a {table_family} table", "family"), i)
    if fams and family not in fams:
        return None
    plan.overlap = any(p.overlap for p, _ in pieces)
    plan.alts = _combine(pieces, family)
    return plan


def _combine(pieces: list[tuple[Piece, int]], family: Family
             ) -> list[list[tuple[tuple[str, ...], int]]]:
    """Every combination of the pieces' alternatives, as argument parts with `-p` first."""
    total = 1
    for p, i in pieces:
        total *= len(p.alts)
        if total > MAX_EXPANSION:
            raise _tag(Unsupported(f"the rule's sets expand to more than {MAX_EXPANSION} "
                                   "iptables rules", "set"), i)
    out = []
    for combo in itertools.product(*[[(c, i) for c in p.alts] for p, i in pieces]):
        proto: tuple[str, bool, int] | None = None
        parts: list[tuple[tuple[str, ...], int]] = []
        for c, i in combo:
            if c.proto is not None:
                if proto is not None and (proto[0], proto[1]) != (c.proto, c.proto_neg):
                    raise _tag(Unsupported(f"protocol {c.proto} conflicts with protocol "
                                           f"{proto[0]} earlier in the rule", c.proto), i)
                proto = proto or (c.proto, c.proto_neg, i)
            if c.args:
                parts.append((c.args, i))
        if proto is not None:
            parts.insert(0, ((*(("!",) if proto[1] else ()), "-p", proto[0]), proto[2]))
        out.append(parts)
    return out


def _helper(base: str, rule: NftRule, taken: set[str]) -> str:
    """A fresh user chain name for `rule`'s helper."""
    tag = rule.handle if rule.handle is not None else f"r{rule.pos}"
    for n in itertools.count():
        name = f"{base}.{tag}" + (f".{n}" if n else "")
        if len(name) > MAX_CHAIN_NAME:
            name = f"nft.{tag}.{n}"[-MAX_CHAIN_NAME:]
        if name not in taken:
            taken.add(name)
            return name
    raise AssertionError("unreachable")


def emit(plan: Plan, rule: NftRule, chain: str, taken: set[str],
         helpers: dict[str, list[Line]]) -> list[Line]:
    """The lines of `plan` in `chain`; helper chains it needs are added to `helpers`."""
    comment: list[tuple[tuple[str, ...], int]] = []
    if rule.comment:
        comment = [(("-m", "comment", "--comment", rule.comment), -1)]
    kind = plan.verdict.kind if plan.verdict is not None else None
    goto_mode = kind in ("goto", "return")
    targets, stateful = plan.targets, plan.stateful
    mk = Line.of

    def helper(lines: list[list[tuple[tuple[str, ...], int]]]) -> str:
        name = _helper(chain, rule, taken)
        helpers[name] = [mk(p, rule) for p in lines]
        return name

    def into(name: str, goto: bool) -> tuple[tuple[str, ...], int]:
        return ("-g" if goto else "-j", name), -1

    out: list[list[tuple[tuple[str, ...], int]]]
    alts = plan.alts
    selector = ""
    if len(alts) == 1:
        head = alts[0] + stateful + comment
        if len(targets) <= 1:
            out = [head + targets]
        else:
            out = [[*head, into(helper([[t] for t in targets]), goto_mode)]]
    elif not stateful and len(targets) <= 1 and (kind in TERMINAL or not plan.overlap):
        out = [a + comment + targets for a in alts]
    elif not stateful and (goto_mode or not plan.overlap):
        name = helper([[t] for t in targets])
        out = [a + comment + [into(name, goto_mode)] for a in alts]
    else:
        if goto_mode:
            raise _tag(Unsupported(f"{kind} with a limit (or overlapping interface wildcards) "
                                   "on a set that needs several rules is not supported", kind),
                       len(rule.expr) - 1)
        if stateful:
            if len(targets) <= 1:
                inner = [stateful + targets]
            else:
                inner = [[*stateful, into(helper([[t] for t in targets]), True)]]
            shared = helper(inner)  # one limit for every element
            sel = [[*a, into(shared, True)] for a in alts]
        elif not targets:
            sel = [[*a, (("-j", "RETURN"), -1)] for a in alts]
        elif len(targets) == 1 and kind == "jump":
            sel = [[*a, (("-g", targets[0][0][1]), targets[0][1])] for a in alts]
        else:
            name = helper([[t] for t in targets])
            sel = [[*a, into(name, True)] for a in alts]
        selector = helper(sel)
        out = [[*comment, into(selector, False)]]
    lines = [mk(p, rule) for p in out]
    if plan.counters is not None:
        # The rule that counts the nft rule's packets (a selector's first element when the
        # jump into the selector counts every packet that gets there).
        counting = helpers[selector] if len(alts) > 1 and selector else lines
        counting[0].counters = plan.counters
    return lines

