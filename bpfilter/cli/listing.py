"""`bpfilter list`: the layout of `iptables -L` (legacy iptables' print_header/print_firewall).

Columns and widths follow iptables: without -v there are no counters and no interfaces; -n
prints addresses and ports as numbers; -x prints exact counters instead of K/M/G; the last
column is what each match prints about itself (`tcp dpt:22`).
"""

from __future__ import annotations

import socket

from ..ir.model import GOTO, JUMP, Family, Rule, Table
from ..matches import REGISTRY, Context
from ..matches.values import proto_name


def _num(n: int, *, exact: bool) -> str:
    """A counter as xtables_print_num prints it (column text without the trailing space)."""
    if exact:
        return f"{n:8d}"
    if n <= 99999:
        return f"{n:5d}"
    for unit in "KMG":
        n = (n + 500) // 1000
        if n <= 9999:
            return f"{n:4d}{unit}"
    n = (n + 500) // 1000
    return f"{n:4d}T"


def _addr(rule: Rule, kind: str, family: Family, numeric: bool) -> str:
    m = rule.match(kind)
    inv = "!" if m is not None and m.params.invert else " "
    if m is None or not any(m.params.net.mask):
        text = ("::/0" if family is Family.IPV6 else "0.0.0.0/0") if numeric else "anywhere"
        return inv + f"{text:<19s}"
    net = m.params.net
    text = str(net)
    if not numeric and net.prefixlen == family.addr_len * 8:
        text = text.rsplit("/", 1)[0]
        if family is Family.IPV4 and numeric is False:
            pass
    return inv + f"{text:<19s}"


def _iface(rule: Rule, kind: str, numeric: bool) -> str:
    m = rule.match(kind)
    if m is None:
        return "*" if numeric else "any"
    return ("!" if m.params.invert else "") + str(m.params.iface)


def _target_name(rule: Rule) -> str:
    t = rule.target
    if t is None:
        return ""
    if t.kind in (JUMP, GOTO):
        return t.params.chain
    return t.kind


def _extra(rule: Rule, family: Family, numeric: bool, chain: str) -> str:
    """The match and target column: each match's own description."""
    parts: list[str] = []
    if rule.target is not None and rule.target.kind == GOTO:
        parts.append("[goto]")
    ctx = Context(family, chain=chain)
    for m in rule.matches:
        entry = REGISTRY.matches.get(m.kind)
        if entry is None or entry.builtin:
            continue
        describe = getattr(entry, "describe", None)
        if describe is not None:
            text = describe(m.params, ctx, numeric)
        else:
            text = " ".join([entry.module or entry.name, *entry.save(m.params, ctx)])
        if text:
            parts.append(text)
    t = rule.target
    if t is not None and t.kind not in (JUMP, GOTO):
        tentry = REGISTRY.targets.get(t.kind)
        tdesc = getattr(tentry, "describe", None) if tentry else None
        if tdesc is not None:
            text = tdesc(t.params, ctx, numeric)
            if text:
                parts.append(text)
        elif tentry is not None and tentry.options:
            parts.extend(tentry.save(t.params, ctx))
    return " ".join(parts)


def _references(table: Table, name: str) -> int:
    n = 0
    for c in table.chains.values():
        for r in c.rules:
            if r.target is not None and r.target.kind in (JUMP, GOTO) and \
                    r.target.params.chain == name:
                n += 1
    return n


def list_table(table: Table, family: Family, *, chain: str | None = None, verbose: bool = False,
               exact: bool = False, numeric: bool = False, line_numbers: bool = False) -> str:
    """The text `iptables -L` prints for `table` (or one chain of it)."""
    out: list[str] = []
    names = [chain] if chain else list(table.chains)
    for i, name in enumerate(names):
        c = table.chains[name]
        if i:
            out.append("")
        head = f"Chain {name}"
        if c.builtin:
            head += f" (policy {c.policy}"
            if verbose:
                head += (f" {_num(c.counters.packets, exact=exact).strip()} packets, "
                         f"{_num(c.counters.bytes, exact=exact).strip()} bytes")
            head += ")"
        else:
            head += f" ({_references(table, name)} references)"
        out.append(head)
        cols = ""
        if line_numbers:
            cols += f"{'num':<4s} "
        if verbose:
            cols += f"{'pkts':>8s} {'bytes':>10s} " if exact else f"{'pkts':>5s} {'bytes':>5s} "
        cols += f"{'target':<9s}  prot opt"
        if verbose:
            cols += f" {'in':<6s} {'out':<6s}"
        cols += f"  {'source':<19s}  {'destination':<19s} "
        out.append(cols)
        for n, rule in enumerate(c.rules, 1):
            line = ""
            if line_numbers:
                line += f"{n:<4d} "
            if verbose:
                line += f"{_num(rule.counters.packets, exact=exact)} "
                line += f"{_num(rule.counters.bytes, exact=exact)} "
            line += f"{_target_name(rule):<9s} "
            pm = rule.match("proto")
            inv = "!" if pm is not None and pm.params.invert else " "
            proto = pm.params.proto if pm is not None else 0
            pname = _proto(proto, family, numeric)
            line += f"{inv}{pname:<5s}"
            fm = rule.match("frag")
            frag = ("!" if fm is not None and fm.params.invert else "-") + (
                "f" if fm is not None else "-")
            line += f"{frag} "
            if verbose:
                line += f" {_iface(rule, 'iif', numeric):<6s} {_iface(rule, 'oif', numeric):<6s} "
            line += _addr(rule, "src", family, numeric) + " "
            line += _addr(rule, "dst", family, numeric) + " "
            extra = _extra(rule, family, numeric, name)
            if extra:
                line += extra + " "
            out.append(line.rstrip() if not extra else line.rstrip(" ") + " ")
        del c
    return "\n".join(out) + "\n"


def _proto(proto: int, family: Family, numeric: bool) -> str:
    if proto == 0:
        return "all"
    if numeric:
        return str(proto)
    return proto_name(proto, family)


__all__ = ["list_table", "socket"]
