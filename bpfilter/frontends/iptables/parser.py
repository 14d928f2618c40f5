"""iptables-restore / ip6tables-restore text → `Ruleset`.

The whole text is parsed before anything is returned: any error raises `ParseError` (file,
line, token) and no partial ruleset exists. Each `*table` section replaces that table, as
iptables-restore does, and must end with `COMMIT`; at `COMMIT` the checks the kernel makes
when a table is loaded run too (jump loops, hook restrictions of matches and targets used in
user chains).
"""

from __future__ import annotations

import gc
import re
from collections.abc import Iterable, Mapping
from typing import Any

from ...ir.model import (
    BUILTIN_CHAINS,
    Chain,
    ChainRef,
    Counters,
    Family,
    Origin,
    Rule,
    Ruleset,
    Table,
    Target,
    jump_loop,
    jump_target,
)
from ...matches import REGISTRY
from ...matches.registry import Context
from .errors import ParseError, RuleError
from .lexer import LexError, Token, tokenize
from .rule import Command, RuleParser, valid_chain_name

__all__ = ["ParseError", "parse", "parse_rule_args"]

_COUNTERS = re.compile(r"\[(\d+):(\d+)\]")
POLICIES = ("ACCEPT", "DROP")


def parse(text: str, *, family: Family, filename: str = "<stdin>",
          sets: Mapping[str, Any] | None = None) -> Ruleset:
    """Parse a whole iptables-restore file; raise ParseError on the first problem. `sets`
    (name -> bpfilter.ir.sets.IpSet) are the named sets rules may reference."""
    p = _FileParser(family, filename, sets)
    lineno = 0
    # The parse allocates many long-lived objects and no cycles: collecting during it only
    # costs time (half of a 100,000-rule parse).
    enabled = gc.isenabled()
    gc.disable()
    try:
        for lineno, line in enumerate(text.splitlines(), 1):
            p.line(lineno, line)
        p.finish(lineno + 1)
    finally:
        if enabled:
            gc.enable()
    return p.ruleset


def parse_rule_args(args: list[str], *, family: Family, table: str = "filter",
                    chain: str = "INPUT", chains: Iterable[str] = (),
                    filename: str = "<args>", sets: Mapping[str, Any] | None = None
                    ) -> list[Rule]:
    """The rules one `-A CHAIN ...` line stands for, from the arguments after the chain
    (several when -s/-d hold address lists: for each source, for each destination).
    `chains` names the user chains jumps may go to."""
    text = " ".join(args)
    if table not in BUILTIN_CHAINS:
        raise ParseError(f"unknown table '{table}'", filename, 1, table, None, text)
    tokens = [Token(a, i + 1) for i, a in enumerate(args)]
    known = {c: True for c in BUILTIN_CHAINS.get(table, ())}
    known.update({c: False for c in chains})
    known.setdefault(chain, False)
    cmd = Command("A", Token("-A", 0), chain)
    try:
        rp = RuleParser(tokens, family=family, table=table, chains=known, command=cmd,
                        sets={n: s.definition for n, s in (sets or {}).items()})
        rules = rp.parse().rules(chain)
    except RuleError as e:
        tok = e.token if isinstance(e.token, Token) else None
        raise ParseError(e.message, filename, 1, tok.text if tok else None,
                         tok.column if tok else None, text) from None
    return [] if rp.skip else rules


class _FileParser:
    def __init__(self, family: Family, filename: str,
                 sets: Mapping[str, Any] | None = None) -> None:
        self.family = family
        self.file = filename
        self.ruleset = Ruleset(family, source=filename, sets=dict(sets or {}))
        self.setdefs = {n: s.definition for n, s in self.ruleset.sets.items()}
        self.table: Table | None = None
        self.table_line = 0
        self.lineno = 0
        self.text = ""

    def error(self, message: str, token: Token | None = None) -> ParseError:
        """A ParseError for the current line."""
        return ParseError(message, self.file, self.lineno, token.text if token else None,
                          token.column if token else None, self.text)

    def line(self, lineno: int, raw: str) -> None:
        """Handle one line."""
        self.lineno, self.text = lineno, raw.strip()
        line = raw.rstrip("\r\n")
        if not line.strip() or line.startswith("#"):
            return
        try:
            if line.startswith("*"):
                self._table(line)
            elif self.table is None:
                raise RuleError("no table selected (a *table line must come first)",
                                Token(line.split()[0], 1))
            elif line.split()[0] == "COMMIT":
                if len(line.split()) > 1:
                    raise RuleError("garbage after COMMIT", Token(line.split()[1], 8))
                self._commit()
            elif line.startswith(":"):
                self._chain(line)
            else:
                self._rule_line(line)
        except RuleError as e:
            tok = e.token if isinstance(e.token, Token) else None
            raise self.error(e.message, tok) from None
        except LexError as e:
            raise ParseError(str(e), self.file, lineno, '"', e.column, self.text) from None

    def finish(self, end_line: int) -> None:
        """Check the text did not stop inside a table."""
        if self.table is not None:
            self.lineno, self.text = end_line, ""
            raise self.error(f"COMMIT expected: table '{self.table.name}' (line "
                             f"{self.table_line}) is not committed")

    # --- table and chain lines ---------------------------------------------------------------

    def _table(self, line: str) -> None:
        words = line[1:].split()
        name = words[0] if words else ""
        if self.table is not None:
            raise RuleError(f"table '{name}' starts before COMMIT of table "
                            f"'{self.table.name}'", Token(line.strip(), 1))
        if name not in BUILTIN_CHAINS:
            raise RuleError(f"unknown table '{name}'", Token(line.strip(), 1))
        self.table = Table(name, {c: Chain(c, "ACCEPT") for c in BUILTIN_CHAINS[name]})
        self.table_line = self.lineno

    def _chain(self, line: str) -> None:
        assert self.table is not None
        words = line[1:].split()
        col = 2
        toks = []
        for w in words:
            col = line.index(w, col - 1) + 1
            toks.append(Token(w, col))
            col += len(w)
        if not toks:
            raise RuleError("chain line without a chain name", Token(":", 1))
        name = toks[0]
        if len(toks) < 2:
            raise RuleError(f"chain '{name.text}': policy missing", name)
        policy = toks[1]
        counters = Counters()
        if len(toks) > 2:
            m = _COUNTERS.fullmatch(toks[2].text)
            if m is None:
                raise RuleError(f'bad counters "{toks[2].text}" (want [packets:bytes])', toks[2])
            counters = Counters(int(m[1]), int(m[2]))
        if len(toks) > 3:
            raise RuleError(f'unexpected "{toks[3].text}" after the chain\'s counters', toks[3])
        origin = Origin(self.file, self.lineno, self.text)
        chain = self.table.chains.get(name.text)
        if chain is not None and chain.builtin:
            if policy.text not in (*POLICIES, "-"):
                raise RuleError(f"bad policy '{policy.text}' for chain {name.text} (ACCEPT or "
                                "DROP)", policy)
            if policy.text != "-":
                chain.policy = policy.text
            chain.counters, chain.origin = counters, origin
            return
        if policy.text != "-":
            raise RuleError(f"cannot set policy '{policy.text}' on user-defined chain "
                            f"'{name.text}'", policy)
        self._new_chain(name, counters, origin)

    def _new_chain(self, name: Token, counters: Counters, origin: Origin) -> None:
        assert self.table is not None
        if name.text in self.table.chains:
            raise RuleError(f"chain '{name.text}' already exists", name)
        why = valid_chain_name(name.text)
        if why:
            raise RuleError(why, name)
        self.table.chains[name.text] = Chain(name.text, None, [], counters, origin)

    # --- command lines -----------------------------------------------------------------------

    def _rule_line(self, line: str) -> None:
        assert self.table is not None
        counters = None
        offset = 0
        if line.startswith("["):
            m = _COUNTERS.match(line)
            if m is None:
                raise RuleError("bad counters (want [packets:bytes] before the command)",
                                Token(line.split()[0], 1))
            counters = Counters(int(m[1]), int(m[2]))
            offset = m.end()
        tokens = tokenize(line[offset:], offset)
        if not tokens:
            raise RuleError("counters without a command", Token(line.strip(), 1))
        known = {n: c.builtin for n, c in self.table.chains.items()}
        rp = RuleParser(tokens, family=self.family, table=self.table.name, chains=known,
                        sets=self.setdefs)
        rp.parse()
        if rp.skip:
            return
        if rp.counters is None and counters is not None:
            rp.counters = counters
        cmd = rp.command
        if cmd is None:
            raise RuleError("no command (expected -A, -I, -D, -R, -N, -X, -F, -Z, -P or -E)",
                            tokens[0])
        if cmd.op in "LSCVh":
            raise RuleError(f"command {cmd.token.text} is not supported in a ruleset",
                            cmd.token)
        if cmd.op not in "AIDR" and rp.has_spec:
            raise RuleError(f"rule options are not allowed with {cmd.token.text}", cmd.token)
        getattr(self, f"_cmd_{cmd.op}")(rp, cmd)

    def _chain_of(self, cmd: Command, user_only: bool = False) -> Chain:
        assert self.table is not None
        chain = self.table.chains.get(cmd.chain or "")
        tok = Token(cmd.chain or "", cmd.token.column)
        if chain is None:
            raise RuleError(f"chain '{cmd.chain}' does not exist in table "
                            f"'{self.table.name}'", tok)
        if user_only and chain.builtin:
            raise RuleError(f"'{cmd.chain}' is a built-in chain", tok)
        return chain

    def _new_rules(self, rp: RuleParser, chain: Chain) -> list[Rule]:
        rules = rp.rules(chain.name)
        origin = Origin(self.file, self.lineno, self.text)
        for r in rules:
            r.origin = origin
        return rules

    def _number(self, cmd: Command, limit: int, what: str) -> int:
        tok = cmd.args[0]
        if not tok.text.isdigit() or not 1 <= int(tok.text) <= limit:
            raise RuleError(f"{what} {tok.text} out of range (1-{limit})", tok)
        return int(tok.text)

    def _cmd_A(self, rp: RuleParser, cmd: Command) -> None:
        chain = self._chain_of(cmd)
        chain.rules.extend(self._new_rules(rp, chain))

    def _cmd_I(self, rp: RuleParser, cmd: Command) -> None:
        chain = self._chain_of(cmd)
        pos = self._number(cmd, len(chain.rules) + 1, "insertion index") if cmd.args else 1
        # Each expanded rule is inserted at the same index, as iptables does.
        for r in self._new_rules(rp, chain):
            chain.rules.insert(pos - 1, r)

    def _cmd_D(self, rp: RuleParser, cmd: Command) -> None:
        chain = self._chain_of(cmd)
        if cmd.args:
            if rp.has_spec:
                raise RuleError("-D takes a rule number or a rule, not both", cmd.args[0])
            del chain.rules[self._number(cmd, len(chain.rules), "rule number") - 1]
            return
        for r in rp.rules(chain.name):
            if r not in chain.rules:
                raise RuleError(f"no matching rule to delete in chain '{chain.name}'",
                                cmd.token)
            chain.rules.remove(r)

    def _cmd_R(self, rp: RuleParser, cmd: Command) -> None:
        chain = self._chain_of(cmd)
        pos = self._number(cmd, len(chain.rules), "rule number")
        rules = self._new_rules(rp, chain)
        if len(rules) != 1:
            raise RuleError("-R needs a single source and destination address", cmd.token)
        chain.rules[pos - 1] = rules[0]

    def _cmd_N(self, rp: RuleParser, cmd: Command) -> None:
        self._new_chain(Token(cmd.chain or "", cmd.token.column), Counters(),
                        Origin(self.file, self.lineno, self.text))

    def _cmd_X(self, rp: RuleParser, cmd: Command) -> None:
        assert self.table is not None
        chains = ([self._chain_of(cmd, user_only=True)] if cmd.chain
                  else [c for c in self.table.chains.values() if not c.builtin])
        doomed = {c.name for c in chains}
        for c in chains:
            if c.rules:
                raise RuleError(f"cannot delete chain '{c.name}': it is not empty", cmd.token)
        for other in self.table.chains.values():
            for r in other.rules:
                if other.name not in doomed and jump_target(r) in doomed:
                    raise RuleError(f"cannot delete chain '{jump_target(r)}': rules of "
                                    f"'{other.name}' jump to it", cmd.token)
        for name in doomed:
            del self.table.chains[name]

    def _cmd_F(self, rp: RuleParser, cmd: Command) -> None:
        assert self.table is not None
        for c in [self._chain_of(cmd)] if cmd.chain else self.table.chains.values():
            c.rules.clear()

    def _cmd_Z(self, rp: RuleParser, cmd: Command) -> None:
        assert self.table is not None
        chains = [self._chain_of(cmd)] if cmd.chain else list(self.table.chains.values())
        if cmd.args:
            rules = [chains[0].rules[self._number(cmd, len(chains[0].rules), "rule number") - 1]]
        else:
            rules = [r for c in chains for r in c.rules]
            for c in chains:
                c.counters = Counters()
        for r in rules:
            r.counters = Counters()

    def _cmd_P(self, rp: RuleParser, cmd: Command) -> None:
        chain = self._chain_of(cmd)
        policy = cmd.args[0]
        if not chain.builtin:
            raise RuleError(f"cannot set a policy on user-defined chain '{chain.name}'",
                            cmd.token)
        if policy.text not in POLICIES:
            raise RuleError(f"bad policy '{policy.text}' (ACCEPT or DROP)", policy)
        chain.policy = policy.text
        # Declared now: a restore keeps the loaded policy of built-in chains it leaves out.
        chain.origin = chain.origin or Origin(self.file, self.lineno, self.text)

    def _cmd_E(self, rp: RuleParser, cmd: Command) -> None:
        assert self.table is not None
        chain = self._chain_of(cmd, user_only=True)
        new = cmd.args[0]
        if new.text in self.table.chains:
            raise RuleError(f"chain '{new.text}' already exists", new)
        why = valid_chain_name(new.text)
        if why:
            raise RuleError(why, new)
        old = chain.name
        chain.name = new.text
        self.table.chains = {(new.text if k == old else k): v
                             for k, v in self.table.chains.items()}
        for c in self.table.chains.values():
            for r in c.rules:
                if jump_target(r) == old:
                    r.target = Target(r.target.kind, ChainRef(new.text))

    # --- COMMIT ------------------------------------------------------------------------------

    def _commit(self) -> None:
        assert self.table is not None
        table = self.table
        reach = _reaching_hooks(table)
        self._check_loops(table)
        for chain in table.chains.values():
            if chain.builtin:
                continue
            for hook in sorted(reach.get(chain.name, ())):
                ctx = Context(self.family, table.name, hook)
                for r in chain.rules:
                    self._check_rule_hook(r, ctx)
        self.ruleset.tables[table.name] = table
        self.table = None

    def _rule_error(self, rule: Rule, message: str, token: str | None) -> ParseError:
        o = rule.origin
        return ParseError(message, self.file, o.line if o else self.lineno, token, None,
                          o.text if o else "")

    def _check_rule_hook(self, rule: Rule, ctx: Context) -> None:
        for m in rule.matches:
            entry = REGISTRY.matches[m.kind]
            if entry.builtin or entry.check_hook is None:
                continue
            if msg := entry.check_hook(m.params, ctx):
                raise self._rule_error(rule, f"{msg} (chain reached from {ctx.chain})",
                                       entry.module or entry.name)
        t = rule.target
        entry_t = REGISTRY.targets.get(t.kind) if t is not None else None
        check = entry_t.check_hook if entry_t is not None else None
        if t is not None and check is not None and (msg := check(t.params, ctx)):
            raise self._rule_error(rule, f"{msg} (chain reached from {ctx.chain})", t.kind)

    def _check_loops(self, table: Table) -> None:
        # Like iptables, only chains reached from a built-in chain count.
        found = jump_loop(table, [n for n, c in table.chains.items() if c.builtin])
        if found is not None:
            rule, path = found
            raise self._rule_error(rule, f"jump loop: {' -> '.join(path)}", path[-1])


def _reaching_hooks(table: Table) -> dict[str, set[str]]:
    """For each chain, the built-in chains from which it can be reached."""
    out: dict[str, set[str]] = {}
    for start, chain in table.chains.items():
        if not chain.builtin:
            continue
        todo = [start]
        seen = {start}
        while todo:
            name = todo.pop()
            out.setdefault(name, set()).add(start)
            for r in table.chains[name].rules:
                dest = jump_target(r)
                if dest is not None and dest not in seen:
                    seen.add(dest)
                    todo.append(dest)
    return out
