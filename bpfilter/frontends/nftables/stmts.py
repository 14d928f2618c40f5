"""nftables statements → iptables targets (verdicts, LOG/NFLOG, REJECT) and `limit`.

A statement either decides (a verdict, `reject`), logs (`log` does not end the rule: the rule
goes on to its verdict), limits (`limit` ends the rule for packets over the rate, as a match
would) or counts (`counter`, which every pybpfilter rule does anyway).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...ir.model import Family
from ...matches.xtargets import LOG_PREFIX_MAX
from .errors import Unsupported
from .exprs import Cond, Piece

V4, V6 = Family.IPV4, Family.IPV6
NFLOG_PREFIX_MAX = 63  # the NFLOG target's buffer (64 with the terminating zero)
LOG_LEVELS = ("emerg", "alert", "crit", "err", "warn", "notice", "info", "debug")
# nft log flags → LOG options.
LOG_FLAGS = {"tcp sequence": ("--log-tcp-sequence",), "tcp options": ("--log-tcp-options",),
             "ip options": ("--log-ip-options",), "skuid": ("--log-uid",),
             "ether": ("--log-macdecode",)}
LOG_FLAGS["all"] = tuple(o for v in list(LOG_FLAGS.values()) for o in v)
LIMIT_UNITS = ("second", "minute", "hour", "day")

# reject types: nft's names → iptables --reject-with names, per family.
REJECT_ICMP = {"net-unreachable": "icmp-net-unreachable", "host-unreachable":
               "icmp-host-unreachable", "prot-unreachable": "icmp-proto-unreachable",
               "port-unreachable": "icmp-port-unreachable", "net-prohibited":
               "icmp-net-prohibited", "host-prohibited": "icmp-host-prohibited",
               "admin-prohibited": "icmp-admin-prohibited"}
REJECT_ICMP_CODES = {0: "net-unreachable", 1: "host-unreachable", 2: "prot-unreachable",
                     3: "port-unreachable", 9: "net-prohibited", 10: "host-prohibited",
                     13: "admin-prohibited"}
REJECT_ICMPV6 = {"no-route": "icmp6-no-route", "admin-prohibited": "icmp6-adm-prohibited",
                 "addr-unreachable": "icmp6-addr-unreachable", "port-unreachable":
                 "icmp6-port-unreachable", "policy-fail": "icmp6-policy-fail",
                 "reject-route": "icmp6-reject-route"}
REJECT_ICMPV6_CODES = {0: "no-route", 1: "admin-prohibited", 3: "addr-unreachable",
                       4: "port-unreachable", 5: "policy-fail", 6: "reject-route"}
# icmpx: one name for both families (nft_reject_icmpx_icmp_unreach / _icmpv6_unreach).
REJECT_ICMPX = {"port-unreachable": ("icmp-port-unreachable", "icmp6-port-unreachable"),
                "admin-prohibited": ("icmp-admin-prohibited", "icmp6-adm-prohibited"),
                "no-route": ("icmp-net-unreachable", "icmp6-no-route"),
                "host-unreachable": ("icmp-host-unreachable", "icmp6-addr-unreachable")}
REJECT_ICMPX_CODES = {0: "no-route", 1: "port-unreachable", 2: "host-unreachable",
                      3: "admin-prohibited"}

VERDICTS = ("accept", "drop", "return", "continue", "jump", "goto")


@dataclass(frozen=True)
class Verdict:
    """The rule's decision as iptables target arguments; `kind` as nft names it."""

    kind: str
    args: tuple[str, ...]


def log(body: Any) -> tuple[str, ...]:
    """`log` → LOG (or NFLOG with `group`) target arguments."""
    body = body or {}
    for key in body:
        if key not in ("prefix", "level", "group", "snaplen", "queue-threshold", "flags"):
            raise Unsupported(f"log {key} is not supported", f"log {key}")
    prefix = body.get("prefix", "")
    if not isinstance(prefix, str):
        raise Unsupported("a computed log prefix is not supported", "prefix")
    if "group" in body:
        for key in ("level", "flags"):
            if key in body:
                raise Unsupported(f"log {key} with group (NFLOG) is not supported", key)
        if len(prefix) > NFLOG_PREFIX_MAX:
            raise Unsupported(f"log prefix longer than {NFLOG_PREFIX_MAX} characters (NFLOG "
                              "would cut it)", prefix)
        out: tuple[str, ...] = ("-j", "NFLOG", "--nflog-group", str(body["group"]))
        if prefix:
            out += ("--nflog-prefix", prefix)
        if "snaplen" in body:
            out += ("--nflog-size", str(body["snaplen"]))
        if "queue-threshold" in body:
            out += ("--nflog-threshold", str(body["queue-threshold"]))
        return out
    for key in ("snaplen", "queue-threshold"):
        if key in body:
            raise Unsupported(f"log {key} without group is not supported", key)
    if len(prefix) > LOG_PREFIX_MAX:
        # nft logs up to 127 characters, LOG only 29: refused rather than cut.
        raise Unsupported(f"log prefix longer than {LOG_PREFIX_MAX} characters (LOG would cut "
                          "it)", prefix)
    out = ("-j", "LOG")
    if prefix:
        out += ("--log-prefix", prefix)
    level = body.get("level", "warn")
    if level not in LOG_LEVELS:
        raise Unsupported(f"log level {level!r} is not supported", str(level))
    if level != "warn":
        out += ("--log-level", level)
    flags = body.get("flags", [])
    for f in flags if isinstance(flags, list) else [flags]:
        if f not in LOG_FLAGS:
            raise Unsupported(f"log flags {f!r} is not supported", str(f))
        out += tuple(o for o in LOG_FLAGS[f] if o not in out)
    return out


def limit(body: Any) -> Cond:
    """`limit rate N/unit burst B packets` → `-m limit`."""
    body = body or {}
    if body.get("inv"):
        raise Unsupported("limit rate over is not supported (xt_limit cannot invert)", "over")
    if body.get("rate_unit", "packets") != "packets":
        raise Unsupported("byte rates are not supported", str(body.get("rate_unit")))
    per = body.get("per", "second")
    if per not in LIMIT_UNITS:
        raise Unsupported(f"limit per {per} is not supported", str(per))
    rate, burst = body.get("rate"), body.get("burst", 5)
    if not isinstance(rate, int) or rate < 1 or not isinstance(burst, int) or burst < 1:
        raise Unsupported(f"limit rate {rate} burst {burst} is not supported", str(rate))
    return Cond(("-m", "limit", "--limit", f"{rate}/{per}", "--limit-burst", str(burst)))


def _code(expr: Any, names: dict[str, Any], codes: dict[int, str], what: str) -> Any:
    if isinstance(expr, int):
        if expr not in codes:
            raise Unsupported(f"reject with {what} code {expr} has no iptables equivalent",
                              str(expr))
        expr = codes[expr]
    if expr not in names:
        raise Unsupported(f"reject with {what} {expr!r} has no iptables equivalent", str(expr))
    return names[expr]


def reject(body: Any, family: Family, table_family: str) -> tuple[Verdict, Piece | None]:
    """`reject` → REJECT, and the match nft adds as a dependency (tcp, or the family)."""
    body = body or {}
    kind = body.get("type")
    expr = body.get("expr", "port-unreachable")
    if kind is None:
        kind = {"ip": "icmp", "ip6": "icmpv6"}.get(table_family, "icmpx")
    if kind == "tcp reset":
        return Verdict("reject", ("-j", "REJECT", "--reject-with", "tcp-reset")), \
            Piece((Cond((), "tcp"),))
    if kind == "icmp":
        name = _code(expr, REJECT_ICMP, REJECT_ICMP_CODES, "icmp")
        return Verdict("reject", ("-j", "REJECT", "--reject-with", name)), Piece((Cond(),), V4)
    if kind == "icmpv6":
        name = _code(expr, REJECT_ICMPV6, REJECT_ICMPV6_CODES, "icmpv6")
        return Verdict("reject", ("-j", "REJECT", "--reject-with", name)), Piece((Cond(),), V6)
    if kind == "icmpx":
        names = _code(expr, REJECT_ICMPX, REJECT_ICMPX_CODES, "icmpx")
        return Verdict("reject", ("-j", "REJECT", "--reject-with",
                                  names[0 if family is V4 else 1])), None
    raise Unsupported(f"reject type {kind!r} is not supported", str(kind))


def verdict(kind: str, body: Any, chains: dict[str, str]) -> Verdict | None:
    """A verdict statement; `chains` maps the table's regular nft chains to IR chain names.
    None for `continue` (the rule only counts)."""
    if kind == "accept":
        return Verdict(kind, ("-j", "ACCEPT"))
    if kind == "drop":
        return Verdict(kind, ("-j", "DROP"))
    if kind == "return":
        return Verdict(kind, ("-j", "RETURN"))
    if kind == "continue":
        return None
    target = (body or {}).get("target")
    if not isinstance(target, str):
        raise Unsupported(f"{kind} to a computed chain is not supported", kind)
    if target not in chains:
        raise Unsupported(f"{kind} to '{target}', which is not a regular chain of this table",
                          target)
    return Verdict(kind, ("-j" if kind == "jump" else "-g", chains[target]))
