"""libnftables JSON (`nft -j list ruleset`) → one `Ruleset` per address family.

The whole document is read and translated before anything is returned; anything outside the
supported subset raises `NftParseError` naming the file, the JSON location and the token.

Named sets become the IR's named sets (ipset types, `sets.py`) of each family that may use them,
and lookups `@name` the `set` match; one family's tables share one set namespace (a name
declared by two of them is refused).

Mapping: tables of family `ip` feed the IPv4 ruleset, `ip6` the IPv6 one, `inet` both (a rule
whose expressions imply one family, such as `ip saddr` or `icmpv6 type`, goes to that family
only). Base chains become the built-in chains of the iptables table running at their hook
(input/forward/output: filter; prerouting/postrouting: mangle), regular chains user chains.
One base chain per hook and family: two would need netfilter's "accept in one base chain
does not skip the next" semantics, which one iptables table cannot express, so they are refused.

A rule that an iptables rule cannot hold in one piece (a `log` followed by a verdict, an
anonymous set that needs several rules, a `limit` shared by several rules) is split with helper
user chains, named `<chain>.<handle>`, so that its matches and `limit` are evaluated once and
its packets are counted once; see `plan.emit`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ...ir.model import (
    BUILTIN_CHAINS,
    Chain,
    Counters,
    Family,
    Origin,
    Ruleset,
    Table,
    jump_loop,
    jump_target,
)
from ...matches import REGISTRY
from ...matches.registry import Context
from ..iptables.errors import ParseError
from ..iptables.parser import parse_rule_args
from ..iptables.rule import valid_chain_name
from .errors import NftParseError, Unsupported
from .plan import Line, NftRule, emit, plan_rule
from .sets import NftSet, read_set

FAMILIES = {"ip": (Family.IPV4,), "ip6": (Family.IPV6,), "inet": (Family.IPV4, Family.IPV6)}
# nft base chain hook → the iptables table and built-in chain that runs there.
HOOKS = {"input": ("filter", "INPUT"), "forward": ("filter", "FORWARD"),
         "output": ("filter", "OUTPUT"), "prerouting": ("mangle", "PREROUTING"),
         "postrouting": ("mangle", "POSTROUTING")}
NF_IP_PRI_CONNTRACK = -200  # a base chain at or before it would see no conntrack state
OWN_TABLES = "pybpfilter_"
OBJECTS = ("map", "element", "flowtable", "counter", "quota", "ct helper", "limit",
           "ct timeout", "ct expectation", "secmark", "synproxy", "tunnel")


@dataclass
class NftChain:
    """A chain as declared in the JSON."""

    family: str
    table: str
    name: str
    index: int  # position of its object in the `nftables` array
    handle: Any = None
    hook: str | None = None
    prio: int = 0
    policy: str = "accept"
    rules: list[NftRule] = field(default_factory=list)

    @property
    def where(self) -> str:
        """How messages name the chain."""
        return f"chain {self.family} {self.table} {self.name}"


class _Reader:
    def __init__(self, filename: str) -> None:
        self.file = filename
        self.tables: dict[tuple[str, str], list[NftChain]] = {}
        self.chains: dict[tuple[str, str, str], NftChain] = {}
        self.sets: dict[tuple[str, str], dict[str, NftSet]] = {}  # (family, table) → sets
        self.set_where: dict[tuple[str, str, str], str] = {}  # set → its JSON location
        self.fam_sets: dict[str, Any] = {}  # the sets of the family being translated

    def error(self, message: str, location: str, token: str | None = None,
              text: str = "") -> NftParseError:
        """An NftParseError at `location`."""
        return NftParseError(message, self.file, location, token, text)

    # --- the document -------------------------------------------------------------------------

    def read(self, text: str) -> None:
        """Collect tables, chains and rules (refusing objects out of scope)."""
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise NftParseError(f"not JSON: {e.msg}", self.file,
                                f"line {e.lineno} column {e.colno}") from None
        items = doc.get("nftables") if isinstance(doc, dict) else None
        if not isinstance(items, list):
            raise self.error("no \"nftables\" array (want the output of nft -j list ruleset)",
                             "top level", "nftables")
        for i, item in enumerate(items):
            where = f"nftables[{i}]"
            if not isinstance(item, dict) or len(item) != 1:
                raise self.error("each element must be an object with one key", where)
            key, body = next(iter(item.items()))
            if key in ("add", "create") and isinstance(body, dict) and len(body) == 1:
                key, body = next(iter(body.items()))  # `nft -j -f` input: a command wrapper
            elif key == "flush" and body == {"ruleset": None}:
                continue  # a restore replaces the ruleset of each family anyway
            if key == "metainfo" or self._own(body):
                continue
            if key == "table":
                self._table(body, where)
            elif key == "chain":
                self._chain(body, i, where)
            elif key == "rule":
                self._rule(body, i, where)
            elif key == "set":
                self._set(body, where)
            elif key in OBJECTS:
                name = body.get("name", "") if isinstance(body, dict) else ""
                raise self.error(f"{key} '{name}': named {key}s are not supported", where, key)
            else:
                raise self.error(f"'{key}' is not supported", where, key)

    @staticmethod
    def _own(body: Any) -> bool:
        """An object of pybpfilter's own dormant tables (runtime/conntrack.py, runtime/nat.py:
        they keep conntrack and nf_nat hooked in), listed when pybpfilter runs here: skipped."""
        if not isinstance(body, dict):
            return False
        name = body.get("name") if "table" not in body else body.get("table")
        return isinstance(name, str) and name.startswith(OWN_TABLES)

    def _table(self, body: dict, where: str) -> None:
        fam, name = body.get("family"), body.get("name")
        if fam not in FAMILIES:
            raise self.error(f"table {fam} {name}: family '{fam}' is not supported (ip, ip6, "
                             "inet)", where, str(fam))
        if body.get("flags"):
            raise self.error(f"table {fam} {name}: flags {body['flags']} are not supported",
                             where, "flags")
        self.tables.setdefault((fam, name), [])

    def _chain(self, body: dict, index: int, where: str) -> None:
        fam, table, name = body.get("family"), body.get("table"), body.get("name")
        if (fam, table) not in self.tables:
            raise self.error(f"chain {name}: table {fam} {table} is not declared", where, table)
        chain = NftChain(fam, table, name, index, body.get("handle"))
        if (fam, table, name) in self.chains:
            raise self.error(f"{chain.where} is declared twice", where, name)
        if "hook" in body or "type" in body:
            kind, hook = body.get("type"), body.get("hook")
            if kind != "filter":
                raise self.error(f"{chain.where}: type {kind} chains are not supported (only "
                                 "type filter)", where, str(kind))
            if hook not in HOOKS:
                raise self.error(f"{chain.where}: hook {hook} is not supported", where, str(hook))
            prio = body.get("prio", 0)
            if not isinstance(prio, int) or prio <= NF_IP_PRI_CONNTRACK:
                raise self.error(f"{chain.where}: priority {prio} is not supported (the chain "
                                 f"would run before conntrack; want > {NF_IP_PRI_CONNTRACK})",
                                 where, str(prio))
            policy = body.get("policy", "accept")
            if policy not in ("accept", "drop"):
                raise self.error(f"{chain.where}: policy {policy} is not supported", where,
                                 str(policy))
            if body.get("dev"):
                raise self.error(f"{chain.where}: device-bound base chains are not supported",
                                 where, "dev")
            chain.hook, chain.prio, chain.policy = hook, prio, policy
        self.chains[(fam, table, name)] = chain
        self.tables[(fam, table)].append(chain)

    def _set(self, body: dict, where: str) -> None:
        fam, table, name = body.get("family"), body.get("table"), body.get("name")
        if (fam, table) not in self.tables:
            raise self.error(f"set {name}: table {fam} {table} is not declared", where,
                             str(table))
        sets = self.sets.setdefault((fam, table), {})
        if name in sets:
            raise self.error(f"set {name} of table {fam} {table} is declared twice", where,
                             str(name))
        try:
            sets[name] = read_set(body, Origin(self.file, 0, f"set {fam} {table} {name}"))
            self.set_where[(fam, table, name)] = where
        except Unsupported as e:
            text = json.dumps(body, separators=(",", ":"))
            raise self.error(e.message, f"{where} (set {fam} {table} {name})", e.token,
                             text[:200]) from None

    def _family_sets(self, family: Family, tables: list) -> dict[str, Any]:
        """The IR sets of `family`: every named set of its tables that the family can use
        (an inet table's ipv6_addr set only in IPv6; inet_service sets in both)."""
        out: dict[str, Any] = {}
        where: dict[str, tuple[str, str]] = {}
        for key, _ in tables:
            for name, s in self.sets.get(key, {}).items():
                if not s.ipset.definition.fits(family):
                    continue
                if name in out:
                    raise self.error(f"set {name} is declared in table {' '.join(where[name])} "
                                     f"and table {' '.join(key)}: one {family.value} ruleset "
                                     "has one set namespace", self.set_where[(*key, name)], name)
                out[name], where[name] = s.ipset, key
        return out

    def _rule(self, body: dict, index: int, where: str) -> None:
        key = (body.get("family"), body.get("table"), body.get("chain"))
        chain = self.chains.get(key)  # type: ignore[arg-type]
        if chain is None:
            raise self.error(f"rule for chain {' '.join(map(str, key))}, which is not declared",
                             where, str(key[2]))
        expr = body.get("expr")
        if not isinstance(expr, list):
            raise self.error("rule without an expression list", where, "expr")
        chain.rules.append(NftRule(chain.where, index, len(chain.rules) + 1, body.get("handle"),
                                   expr, body.get("comment")))

    # --- one family ---------------------------------------------------------------------------

    def ruleset(self, family: Family) -> Ruleset | None:
        """The ruleset of `family` (None when no table feeds it)."""
        tables = [(k, chains) for k, chains in self.tables.items() if family in FAMILIES[k[0]]]
        if not tables:
            return None
        names: dict[tuple[str, str, str], str] = {}  # nft chain → IR chain
        owner: dict[str, NftChain] = {}  # IR chain → the nft chain it comes from
        ir_table: dict[str, str] = {}  # built-in IR chain → its IR table
        for _, chains in tables:
            for c in chains:
                if c.hook is not None:
                    tname, ir = HOOKS[c.hook]
                    ir_table[ir] = tname
                else:
                    ir = c.name
                    why = valid_chain_name(ir)
                    if why or any(ir in v for v in BUILTIN_CHAINS.values()):
                        raise self.error(f"{c.where}: {why or 'name of a built-in chain'} (an "
                                         "iptables chain name is needed)",
                                         f"nftables[{c.index}]", c.name)
                if ir in owner:
                    other = owner[ir]
                    what = f"hook {c.hook}" if c.hook else f"name {ir}"
                    raise self.error(
                        f"{other.where} and {c.where} share {what} in the {family.value} "
                        "ruleset: several base chains on one hook (or one chain name in two "
                        "tables) are not supported", f"nftables[{c.index}]", c.name)
                owner[ir] = c
                names[(c.family, c.table, c.name)] = ir
        user: dict[str, list[Line]] = {}
        body: dict[str, list[Line]] = {}
        taken = set(owner)
        self.fam_sets = self._family_sets(family, tables)
        for (tfam, tname), chains in tables:
            regular = {c.name: names[(tfam, tname, c.name)] for c in chains if c.hook is None}
            for c in chains:
                lines: list[Line] = []
                for r in c.rules:
                    try:
                        plan = plan_rule(r, family, tfam, regular,
                                         self.sets.get((tfam, tname), {}))
                        if plan is not None:
                            lines += emit(plan, r, names[(tfam, tname, c.name)], taken, user)
                    except Unsupported as e:
                        raise self._unsupported(r, e) from None
                body[names[(tfam, tname, c.name)]] = lines
        for ir, lines in user.items():
            body[ir] = lines
        return self._build(family, body, ir_table, owner)

    def _unsupported(self, rule: NftRule, e: Unsupported) -> NftParseError:
        idx = getattr(e, "expr_index", None)
        loc = rule.location(idx)
        text = json.dumps(rule.expr[idx], separators=(",", ":")) if idx is not None else ""
        return self.error(e.message, loc, e.token, text[:200])

    def _build(self, family: Family, body: dict[str, list[Line]], ir_table: dict[str, str],
               owner: dict[str, NftChain]) -> Ruleset:
        rs = Ruleset(family, source=self.file, sets=dict(self.fam_sets))
        builtins = {n for v in BUILTIN_CHAINS.values() for n in v}
        # Which IR tables reach each user chain (a chain reached from prerouting and input
        # exists in both mangle and filter).
        reach: dict[str, set[str]] = {}
        for start, tname in ir_table.items():
            seen, todo = {start}, [start]
            while todo:
                name = todo.pop()
                reach.setdefault(name, set()).add(tname)
                for ln in body.get(name, ()):
                    if ln.dest is not None and ln.dest not in seen:
                        seen.add(ln.dest)
                        todo.append(ln.dest)
        for tname in sorted({"filter", *ir_table.values()}):
            table = Table(tname)
            for b in BUILTIN_CHAINS[tname]:
                c = owner.get(b) if ir_table.get(b) == tname else None
                policy = c.policy.upper() if c else "ACCEPT"
                # Declared: an nft ruleset without the chain accepts, whatever was loaded.
                table.chains[b] = Chain(b, policy, origin=Origin(self.file, 0, f"hook {b}"))
            for name in body:
                if name in builtins:
                    continue
                if tname in reach.get(name, ()) or (not reach.get(name) and tname == "filter"):
                    table.chains[name] = Chain(name, None)
            user = [n for n, c in table.chains.items() if not c.builtin]
            for name, chain in table.chains.items():
                if chain.builtin and ir_table.get(name) != tname:
                    continue
                for ln in body.get(name, ()):
                    chain.rules += self._rules(ln, family, tname, name, user)
            self._check(table, family)
            rs.tables[tname] = table
        self._check_shared_limits(rs)
        return rs

    def _check_shared_limits(self, rs: Ruleset) -> None:
        """A chain reached from hooks of two iptables tables is copied into both; a `limit` in
        it would get two buckets where nft has one: refused."""
        if len(rs.tables) < 2:
            return
        copies: dict[str, int] = {}
        for t in rs.tables.values():
            for name, chain in t.chains.items():
                if not chain.builtin:
                    copies[name] = copies.get(name, 0) + 1
        for name, n in copies.items():
            if n < 2:
                continue
            for r in rs.tables["filter"].chains[name].rules:
                if r.match("limit") is not None:
                    raise self.error(f"chain {name} is reached from prerouting/postrouting and "
                                     "from input/forward/output: its limit would be counted "
                                     "twice", _where(r), "limit")

    def _rules(self, ln: Line, family: Family, table: str, chain: str, user: list[str]) -> list:
        try:
            rules = parse_rule_args(list(ln.args), family=family, table=table, chain=chain,
                                    chains=user, filename=self.file, sets=self.fam_sets)
        except ParseError as e:
            col = e.column
            idx = ln.owners[col - 1] if col and 0 < col <= len(ln.owners) else None
            idx = idx if idx is not None and idx >= 0 else None
            loc = ln.rule.location(idx)
            text = json.dumps(ln.rule.expr[idx], separators=(",", ":")) if idx is not None \
                else " ".join(ln.args)
            raise self.error(e.message, loc, e.token, text[:200]) from None
        for r in rules:
            r.origin = Origin(self.file, ln.rule.index + 1, ln.rule.describe())
            if ln.counters is not None:
                r.counters = ln.counters
        return rules

    def _check(self, table: Table, family: Family) -> None:
        """What the kernel checks when a table is loaded: loops, hooks of user chains' rules."""
        found = jump_loop(table, [n for n, c in table.chains.items() if c.builtin])
        if found is not None:
            rule, path = found
            raise self.error(f"jump loop: {' -> '.join(path)}", _where(rule), path[-1])
        for start, chain in table.chains.items():
            if not chain.builtin:
                continue
            seen, todo = {start}, [start]
            while todo:
                name = todo.pop()
                for r in table.chains[name].rules:
                    if name != start:
                        self._check_rule(r, Context(family, table.name, start))
                    dest = jump_target(r)
                    if dest is not None and dest not in seen:
                        seen.add(dest)
                        todo.append(dest)

    def _check_rule(self, rule: Any, ctx: Context) -> None:
        for m in rule.matches:
            entry = REGISTRY.matches[m.kind]
            if entry.check_hook is not None and (msg := entry.check_hook(m.params, ctx)):
                raise self.error(f"{msg} (chain reached from {ctx.chain})", _where(rule),
                                 entry.module or entry.name)
        t = rule.target
        entry_t = REGISTRY.targets.get(t.kind) if t is not None else None
        if entry_t is not None and entry_t.check_hook is not None and \
                (msg := entry_t.check_hook(t.params, ctx)):
            raise self.error(f"{msg} (chain reached from {ctx.chain})", _where(rule), t.kind)


def _where(rule: Any) -> str:
    o = rule.origin
    return f"nftables[{o.line - 1}] ({o.text})" if o else "?"


def parse(text: str, *, filename: str = "<stdin>",
          families: tuple[Family, ...] = (Family.IPV4, Family.IPV6)) -> dict[Family, Ruleset]:
    """Translate a whole `nft -j list ruleset` document: one Ruleset per family that a table
    feeds (of `families`). Raises NftParseError on the first problem."""
    r = _Reader(filename)
    r.read(text)
    out: dict[Family, Ruleset] = {}
    for fam in families:
        rs = r.ruleset(fam)
        if rs is not None:
            out[fam] = rs
    return out


def looks_like_json(text: str) -> bool:
    """True when `text` is JSON (an nft -j document) rather than iptables-save text."""
    return text.lstrip().startswith("{")


__all__ = ["Counters", "looks_like_json", "parse"]
