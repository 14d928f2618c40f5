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
  selector chain whose rules goto the helper: the first element that matches wins;
- a verdict map (`vmap`): one rule per element with the element's verdict (elements never
  overlap; the catch-all `*` goes last). A `counter` or `limit` before the map puts the elements
  in a helper chain the rule's matches jump (or goto, for goto/return elements) into, so the
  nft rule's packets are counted once whichever element they meet.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from ...ir.model import Counters, Family
from ..iptables.rule import MAX_CHAIN_NAME
from . import exprs, stmts
from . import sets as nsets
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


Parts = list[tuple[tuple[str, ...], int]]  # one iptables rule's argument parts


@dataclass
class Plan:
    """What one nft rule does in one family."""

    alts: list[list[tuple[tuple[str, ...], int]]]  # alternatives of match arguments
    overlap: bool
    stateful: list[tuple[tuple[str, ...], int]] = field(default_factory=list)
    targets: list[tuple[tuple[str, ...], int]] = field(default_factory=list)
    verdict: stmts.Verdict | None = None
    counters: Counters | None = None
    # A verdict map: per element, the rule's alternatives with the element's match, the
    # element's match alone, and the element's verdict (None: continue).
    vmap: list[tuple[list[Parts], list[Parts], stmts.Verdict | None]] | None = None


def _tag(e: Exception, i: int) -> Exception:
    e.expr_index = i  # type: ignore[attr-defined]
    return e


def plan_rule(rule: NftRule, family: Family, table_family: str,
              chains: dict[str, str], sets: dict[str, nsets.NftSet] | None = None
              ) -> Plan | None:
    """The plan of `rule` in `family`; None when the rule only holds for the other family;
    `sets` are the named sets of the rule's table. Raises Unsupported (with `expr_index`) for
    anything out of scope."""
    pieces: list[tuple[Piece, int]] = []
    vmap: list[tuple[Piece, stmts.Verdict | None, int]] = []
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
                right = body.get("right")
                if isinstance(right, str) and right.startswith("@"):
                    pieces.append((nsets.lookup(body.get("op", "=="), body.get("left"), right,
                                                sets or {}), i))
                else:
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
            elif key == "vmap":
                if plan.targets:
                    raise Unsupported("a verdict map after log is not supported", key)
                vmap = [(p, v, i) for p, v in _vmap(body, table_family, chains)]
                pieces.append((Piece((exprs.Cond(),), vmap[0][0].family), i))
                done = key
            elif key in ("set", "map"):
                raise Unsupported(f"updating a {key} from the packet path ({body.get('op')} "
                                  f"{body.get(key)}) is not supported", key)
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
    if vmap:
        plan.vmap = [(_combine([*pieces, (p, i)], family), _combine([(p, i)], family), v)
                     for p, v, i in vmap]
    return plan


def _vmap(body: dict, table_family: str, chains: dict[str, str]
          ) -> list[tuple[Piece, stmts.Verdict | None]]:
    """An anonymous verdict map's elements: the key compared with each element's value (as
    the match `key == value` would be) and the element's verdict."""
    data = body.get("data")
    if isinstance(data, str):
        raise Unsupported(f"named verdict map {data} is not supported (only anonymous ones)",
                          data)
    if not isinstance(data, dict) or not isinstance(data.get("set"), list) or not data["set"]:
        raise Unsupported("a verdict map without elements is not supported", "vmap")
    out: list[tuple[Piece, stmts.Verdict | None]] = []
    default: stmts.Verdict | bool | None = False  # the catch-all element's verdict
    for item in data["set"]:
        if not isinstance(item, list) or len(item) != 2 or not isinstance(item[1], dict):
            raise Unsupported(f"verdict map element {item!r} is not supported", str(item))
        value, verdict = item
        if isinstance(value, dict) and "elem" in value:
            raise Unsupported("verdict map elements with options are not supported", "elem")
        kind, vbody = next(iter(verdict.items()))
        if kind not in stmts.VERDICTS:
            raise Unsupported(f"verdict map element verdict {kind!r} is not supported", kind)
        if value == "*":
            default = stmts.verdict(kind, vbody, chains)
            continue
        piece = exprs.match({"op": "==", "left": body.get("key"), "right": value}, table_family)
        # nft refuses a map whose keys overlap: each packet meets at most one element.
        out.append((Piece(piece.alts, piece.family), stmts.verdict(kind, vbody, chains)))
    if not out:
        raise Unsupported("a verdict map with only the catch-all element is not supported", "*")
    fams = {p.family for p, _ in out}
    if len(fams) > 1:
        raise Unsupported("a verdict map whose elements imply different families is not "
                          "supported", "vmap")
    if default is not False:
        # `*` takes the packets no other element matched (of the key's protocol): last, and
        # only after elements that end the rule (a jump would come back and meet it).
        if any(v is None or v.kind == "jump" for _, v in out):
            raise Unsupported("a verdict map's catch-all element after jump or continue "
                              "elements is not supported", "*")
        first = out[0][0]
        protos = {(c.proto, c.proto_neg) for c in first.alts}
        if len(protos) > 1:
            raise Unsupported("a verdict map's catch-all element on this key is not supported",
                              "*")
        proto, neg = protos.pop()
        out.append((Piece((exprs.Cond((), proto, neg),), first.family),
                    default if isinstance(default, stmts.Verdict) else None))
    return out


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
    if plan.vmap is not None:
        return _emit_vmap(plan, rule, chain, taken, helpers, comment)
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


def _emit_vmap(plan: Plan, rule: NftRule, chain: str, taken: set[str],
               helpers: dict[str, list[Line]], comment: Parts) -> list[Line]:
    """A verdict map: one rule per element with the element's verdict. Elements never overlap,
    so each packet meets at most one and the order does not matter (the map's is kept). With a
    `counter` or `limit` before the map, the rule's matches jump to a helper chain holding the
    elements, so the nft rule's packets (matched by an element or not) are counted once."""
    assert plan.vmap is not None
    last = len(rule.expr) - 1
    verdicts = [v for _, _, v in plan.vmap]
    if plan.overlap:
        raise _tag(Unsupported("a verdict map in a rule whose sets may overlap (interface "
                               "wildcards) is not supported", "vmap"), last)
    if plan.counters is None and not plan.stateful:
        out = [[*a, *comment, (v.args, last)] for alts, _, v in plan.vmap if v is not None
               for a in alts]
        return [Line.of(p, rule) for p in out]
    kinds = {v.kind for v in verdicts if v is not None}
    goto_mode = bool(kinds & {"goto", "return"})
    if goto_mode and ("jump" in kinds or None in verdicts):
        # In a helper entered by goto, a jump would come back to the helper's caller's
        # caller; entered by jump, a goto or return would come back to the nft rule's chain.
        raise _tag(Unsupported("a counted verdict map mixing goto/return with jump/continue "
                               "is not supported", "vmap"), last)
    if plan.stateful and len(plan.alts) > 1:
        raise _tag(Unsupported("a limit before a verdict map in a rule with a set that needs "
                               "several rules is not supported", "limit"), last)
    name = _helper(chain, rule, taken)
    helpers[name] = [Line.of([*a, (v.args, last)], rule) for _, own, v in plan.vmap
                     if v is not None for a in own]
    into = (("-g" if goto_mode else "-j", name), -1)
    lines = [Line.of([*a, *plan.stateful, *comment, into], rule) for a in plan.alts]
    if plan.counters is not None:
        lines[0].counters = plan.counters
    return lines
