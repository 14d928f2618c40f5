"""`bpfilter list`: the text of `iptables -L` (legacy iptables 1.8's print_header and
print_firewall), byte for byte, for -v, -x, -n and --line-numbers.

Columns: without -v there are no counters and no interfaces; -x prints exact counters instead
of K/M/G/T; the last column is what each match and target prints about itself (its registry
entry's `describe`). Without -n, protocols, ports and addresses are named from /etc/protocols,
/etc/services, /etc/hosts and /etc/networks (see `bpfilter.matches.names`); unlike iptables,
no DNS query is made, so an address only DNS can name prints as a number.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..frontends.iptables.saver import chain_order, rule_context
from ..ir.model import GOTO, JUMP, Chain, Family, Rule, Table
from ..matches import REGISTRY
from ..matches.names import net_text
from ..matches.values import proto_name

# Targets the kernel knows by another name: `-j NOTRACK` is `CT --notrack` in the kernel,
# and iptables -L prints the kernel's name in the target column.
KERNEL_TARGET_NAMES = {"NOTRACK": "CT"}
U64_MAX = (1 << 64) - 1  # counters are u64


@dataclass(frozen=True)
class Format:
    """The listing options (iptables' FMT_* flags)."""

    verbose: bool = False  # -v: counters, interfaces, policy counters
    exact: bool = False  # -x: counters without K/M/G/T
    numeric: bool = False  # -n: no names for addresses, ports, protocols
    line_numbers: bool = False


def num(n: int, *, exact: bool, table: bool = True) -> str:
    """A counter as xtables_print_num prints it; `table` pads it to its column."""
    if exact:
        return f"{n:8d}" if table else str(n)
    if n <= 99999:
        return f"{n:5d}" if table else str(n)
    for unit in "KMGT":
        # Rounded in 64 bits as iptables does: the largest counters wrap to 0K.
        n = ((n + 500) & U64_MAX) // 1000
        if n <= 9999 or unit == "T":
            return f"{n:4d}{unit}" if table else f"{n}{unit}"
    raise AssertionError("unreachable")


def header(table: Table, chain: Chain, fmt: Format) -> list[str]:
    """The chain's title line and column heads."""
    title = f"Chain {chain.name}"
    if chain.builtin:
        title += f" (policy {chain.policy}"
        if fmt.verbose:
            c = chain.counters
            title += (f" {num(c.packets, exact=fmt.exact, table=False)} packets, "
                      f"{num(c.bytes, exact=fmt.exact, table=False)} bytes")
        title += ")"
    else:
        title += f" ({references(table, chain.name)} references)"
    heads = f"{'num':<4s} " if fmt.line_numbers else ""
    if fmt.verbose:
        heads += f"{'pkts':>8s} {'bytes':>10s} " if fmt.exact else f"{'pkts':>5s} {'bytes':>5s} "
    heads += f"{'target':<9s}  prot opt"
    if fmt.verbose:
        heads += f" {'in':<6s} {'out':<6s} "
    heads += f" {'source':<19s}  {'destination':<19s} "
    return [title, heads]


def references(table: Table, name: str) -> int:
    """How many rules jump or go to chain `name` (iptc_get_references)."""
    return sum(1 for c in table.chains.values() for r in c.rules
               if r.target is not None and r.target.kind in (JUMP, GOTO)
               and r.target.params.chain == name)


def _addr(rule: Rule, kind: str, family: Family, numeric: bool) -> str:
    m = rule.match(kind)
    inv = "!" if m is not None and m.params.invert else " "
    if m is None:
        text = "anywhere" if not numeric else "0.0.0.0/0" if family is Family.IPV4 else "::/0"
    elif not numeric and not any(m.params.net.mask if family is Family.IPV4
                                 else m.params.net.addr):
        # ip6tables looks at the address, iptables at the mask.
        text = "anywhere"
    else:
        text = net_text(m.params.net, numeric)
    return f"{inv}{text:<19s} "


def _iface(rule: Rule, kind: str, numeric: bool) -> str:
    m = rule.match(kind)
    inv = "!" if m is not None and m.params.invert else ""
    name = str(m.params.iface) if m is not None else "*" if numeric else "any"
    return inv + name


def _proto(rule: Rule, numeric: bool, family: Family) -> str:
    m = rule.match("proto")
    inv = "!" if m is not None and m.params.invert else " "
    proto = m.params.proto if m is not None else 0
    text = str(proto) if numeric else "all" if proto == 0 else proto_name(proto, family)
    return f"{inv}{text:<4s} "


def _target_name(rule: Rule) -> str:
    t = rule.target
    if t is None:
        return ""
    if t.kind in (JUMP, GOTO):
        return t.params.chain
    return KERNEL_TARGET_NAMES.get(t.kind, t.kind)


def extensions(rule: Rule, family: Family, table: str, chain: str, numeric: bool) -> str:
    """What the matches and the target print after the address columns."""
    ctx = rule_context(rule, family, table, chain)
    out = "[goto] " if rule.target is not None and rule.target.kind == GOTO else ""
    texts = [REGISTRY.matches[m.kind].describe for m in rule.matches]
    params = [m.params for m in rule.matches]
    if rule.target is not None and rule.target.kind not in (JUMP, GOTO):
        texts.append(REGISTRY.targets[rule.target.kind].describe)
        params.append(rule.target.params)
    for describe, p in zip(texts, params, strict=True):
        text = describe(p, ctx, numeric) if describe is not None else ""
        if text:
            out += " " + text
    return out


def rule_line(rule: Rule, n: int, family: Family, table: str, chain: str, fmt: Format) -> str:
    """One rule as print_firewall prints it."""
    line = f"{n:<4d} " if fmt.line_numbers else ""
    if fmt.verbose:
        line += f"{num(rule.counters.packets, exact=fmt.exact)} "
        line += f"{num(rule.counters.bytes, exact=fmt.exact)} "
    line += f"{_target_name(rule):<9s} "
    line += _proto(rule, fmt.numeric, family)
    fm = rule.match("frag")
    line += ("!" if fm is not None and fm.params.invert else "-") + ("f" if fm else "-") + " "
    if fmt.verbose:
        line += f" {_iface(rule, 'iif', fmt.numeric):<6s} {_iface(rule, 'oif', fmt.numeric):<6s} "
    line += _addr(rule, "src", family, fmt.numeric) + _addr(rule, "dst", family, fmt.numeric)
    return line + extensions(rule, family, table, chain, fmt.numeric)


def list_table(table: Table, family: Family, *, chain: str | None = None, verbose: bool = False,
               exact: bool = False, numeric: bool = False, line_numbers: bool = False) -> str:
    """The text `iptables -L` prints for `table` (or only its chain `chain`)."""
    fmt = Format(verbose, exact, numeric, line_numbers)
    chains = [table.chains[chain]] if chain else chain_order(table)
    blocks = []
    for c in chains:
        lines = header(table, c, fmt)
        lines += [rule_line(r, n, family, table.name, c.name, fmt)
                  for n, r in enumerate(c.rules, 1)]
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)
