"""The fast classifier build gives exactly what the first implementation gave.

`rule_rows`/`fold_static`/`build_groups` were rewritten for speed (rows instead of one object
per packet class, signatures by field rank, groups filled in one pass). Here both versions see
the same predicates — random rulesets over every key field, multiport, ranges, ICMP, interfaces
with compile-time folding, IPv4 and IPv6, and the benchmark's shapes — and must give the same
entries and the same groups: fields, masks, classes, probe order and every (key, value) stored.
Same groups means the same maps and the same lookups in the generated program.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
from helpers import classify_reference as ref

from bpfilter.compiler.classify.atoms import (
    KEY_FIELDS,
    NotClassifiable,
    fold_static,
    rule_rows,
)
from bpfilter.compiler.classify.groups import build_groups
from bpfilter.compiler.codegen import TableCompiler
from bpfilter.frontends.iptables.parser import parse
from bpfilter.ir.model import Family
from bpfilter.runtime.checker import _flavour

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from rulesets import SHAPES

NETS4 = ["10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "10.1.2.3", "192.0.2.0/24", "192.0.2.7",
         "0.0.0.0/1", "10.1.2.128/25", "10.1.2.0/255.255.0.255"]
NETS6 = ["2001:db8::/32", "2001:db8:1::/48", "2001:db8:1::3", "fd00::/8", "2001:db8:1:2::/64"]
PORTS = [0, 22, 53, 80, 443, 1000, 1023, 1024, 8080, 65535]


def _rule(r: random.Random, fam: Family, hook: str) -> str:
    nets = NETS4 if fam is Family.IPV4 else NETS6
    parts: list[str] = []
    if r.random() < .6:
        parts += ["-s", r.choice(nets)]
    if r.random() < .4:
        parts += ["-d", r.choice(nets)]
    if r.random() < .2:
        parts += ["-i", r.choice(["eth0", "eth+", "lo", "veth0", "vet+"])]
    if fam is Family.IPV4 and r.random() < .05:
        parts += r.choice([["-f"], ["!", "-f"]])
    proto = r.choice(["", "tcp", "udp", "icmp"])
    if proto == "icmp":
        if fam is Family.IPV4:
            parts += ["-p", "icmp", "-m", "icmp", "--icmp-type",
                      r.choice(["8", "0", "3/3", "any", "3"])]
        else:
            parts += ["-p", "ipv6-icmp", "-m", "icmp6", "--icmpv6-type",
                      r.choice(["128", "129", "1/4"])]
    elif proto:
        parts += ["-p", proto]
        kind = r.choice(["dport", "sport", "range", "multi", "none"])
        if kind in ("dport", "sport"):
            parts += [f"--{kind}", str(r.choice(PORTS))]
        elif kind == "range":
            lo = r.choice(PORTS[:-1])
            parts += ["--dport", f"{lo}:{min(65535, lo + r.randint(1, 40000))}"]
        elif kind == "multi":
            ps = [str(p) for p in r.sample(PORTS, r.randint(1, 4))]
            if r.random() < .5:
                ps.append("2000:2100")
            parts += ["-m", "multiport", r.choice(["--dports", "--sports", "--ports"]),
                      ",".join(ps)]
        if proto == "tcp" and r.random() < .25:
            parts += ["--syn"]
    if r.random() < .05 and hook != "xdp":
        parts += ["-m", "mark", "--mark", "0x1/0xff"]
    if r.random() < .05:
        parts += ["-m", "ttl", "--ttl-eq" if fam is Family.IPV4 else "--hl-eq", "64"] \
            if fam is Family.IPV4 else ["-m", "hl", "--hl-eq", "64"]
    return " ".join([*parts, "-j", r.choice(["ACCEPT", "DROP", "RETURN"])])


def _rulesets(hook: str) -> list[tuple[str, Family]]:
    out = []
    for fam in (Family.IPV4, Family.IPV6):
        for seed in range(25):
            r = random.Random(seed)
            lines = ["*filter", ":INPUT DROP [0:0]", ":FORWARD ACCEPT [0:0]",
                     ":OUTPUT ACCEPT [0:0]"]
            lines += [f"-A INPUT {_rule(r, fam, hook)}" for _ in range(r.randint(20, 120))]
            out.append(("\n".join([*lines, "COMMIT", ""]), fam))
    out += [(SHAPES[s](n).text, Family.IPV4) for s in SHAPES for n in (40, 700)]
    return out


def _expand(rows) -> list[tuple]:
    """Rows as the reference's entries: (constraints, class, hotdrop), comparable."""
    out = []
    for sig, vals, classes, hot in rows:
        f_v = tuple(sorted((KEY_FIELDS[r].name, m, v) for (r, m), v in zip(sig, vals,
                                                                            strict=True)))
        out += [(f_v, -1 if c is None else int(c), hot) for c in classes]
    return sorted(out)


def _expand_ref(entries) -> list[tuple]:
    out = []
    for e in entries:
        cons = tuple(sorted((c.field.name, c.mask, ref.mem_bytes(c.field, c.value))
                            for c in e.constraints if any(c.mask)))
        out.append((cons, -1 if e.pclass is None else int(e.pclass), int(e.hotdrop)))
    return sorted(out)


def _group(g) -> tuple:
    entries = sorted(g.values.items()) if g.lpm_field is None else sorted(g.prefixes.items())
    return (tuple((f.name, m) for f, m in g.fields), g.class_exact,
            g.lpm_field.name if g.lpm_field else None,
            sorted(-1 if c is None else int(c) for c in g.classes), entries)


@pytest.mark.parametrize("hook,iif", [("nf", None), ("tc", "veth0"), ("xdp", "eth0")])
def test_rows_and_groups_match_the_first_implementation(hook, iif):
    compared = 0
    for text, fam in _rulesets(hook):
        rs = parse(text, family=fam)
        fl = _flavour(hook, fam, iif, None)
        tc = TableCompiler(rs.tables["filter"], fl)
        static = fl.static_fields()
        new_run, old_run = [], []
        for n, rule in enumerate(rs.tables["filter"].chains["INPUT"].rules, 1):
            pred = tc.rule_pred("INPUT", n, rule)
            try:
                old = ref.fold_static(ref.rule_entries(pred, fam), static)
            except ref.NotClassifiable:
                with pytest.raises(NotClassifiable):
                    rule_rows(pred, fam)
                continue
            new = fold_static(rule_rows(pred, fam), static)
            assert _expand(new) == _expand_ref(old), rule
            new_run.append(new)
            old_run.append(old)
            compared += 1
        got = [_group(g) for g in build_groups(new_run)]
        want = [_group(g) for g in ref.build_groups(old_run)]
        assert got == want, text
        # The stored contents as loaded: hash entries and folded LPM prefixes.
        for g in build_groups(new_run):
            assert len(dict(g.entries())) == len(g.entries())
    assert compared > 3000
