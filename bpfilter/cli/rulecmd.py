"""iptables-style single-rule commands: `bpfilter -A|-I|-D|-R CHAIN ... [rule]`.

    bpfilter [-t TABLE] [-4|-6] [--hook H] [--iface IF] [--netns NS] [--bpffs DIR] [-v] \\
        -A CHAIN RULE... | -I CHAIN [N] RULE... | -D CHAIN N | -D CHAIN RULE... | -R CHAIN N RULE...

(`bpfilter rule ...` is the same.) The change is applied to the loaded maps in place when the
loaded programs allow it, else by a full atomic restore; one line on stderr says which.
Our options are taken from anywhere on the line (as iptables does); everything else is the rule.
"""

from __future__ import annotations

import sys
import time

from ..bpf.prog import VerifierError
from ..bpf.syscall import BpfError
from ..compiler.validate import CompileError
from ..frontends.iptables.errors import ParseError
from ..ir.model import Family
from ..matches.registry import MatchError
from ..runtime.incremental import Change, apply_change
from ..runtime.loader import Runtime, RuntimeError_

COMMANDS = ("-A", "-I", "-D", "-R", "--append", "--insert", "--delete", "--replace")
_LONG = {"--append": "-A", "--insert": "-I", "--delete": "-D", "--replace": "-R"}
_VALUED = {"-t": "table", "--table": "table", "--hook": "hook", "--iface": "iface",
           "--netns": "netns", "--bpffs": "bpffs"}


class RuleCommandError(Exception):
    """A malformed single-rule command."""


def is_rule_command(argv: list[str]) -> bool:
    """Whether `argv` is a single-rule command (it names -A/-I/-D/-R before any subcommand)."""
    if argv and argv[0] == "rule":
        return True
    return bool(argv) and argv[0].startswith("-") and any(a in COMMANDS for a in argv)


def parse_args(argv: list[str]) -> tuple[Change, dict]:
    """The change and our options."""
    if argv and argv[0] == "rule":
        argv = argv[1:]
    opts: dict = {"table": "filter", "hook": "nf", "iface": None, "netns": None,
                  "bpffs": None, "ipv6": False, "verbose": False}
    op = chain = None
    rest: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in _VALUED:
            if i + 1 >= len(argv):
                raise RuleCommandError(f"option {a} needs a value")
            opts[_VALUED[a]] = argv[i + 1]
            i += 2
            continue
        if a in ("-6", "--ipv6", "-4", "--ipv4"):
            opts["ipv6"] = a in ("-6", "--ipv6")
        elif a in ("-v", "--verbose"):
            opts["verbose"] = True
        elif a in COMMANDS:
            if op is not None:
                raise RuleCommandError("only one of -A, -I, -D, -R may be given")
            if i + 1 >= len(argv):
                raise RuleCommandError(f"option {a} needs a chain")
            op, chain = _LONG.get(a, a)[1], argv[i + 1]
            i += 2
            continue
        else:
            rest.append(a)
        i += 1
    if op is None or chain is None:
        raise RuleCommandError("no command given (-A, -I, -D or -R)")
    index = None
    if op in "IDR" and rest and rest[0].isdigit():
        index = int(rest.pop(0))
        if index < 1:
            raise RuleCommandError("rule numbers start at 1")
    if op == "R" and index is None:
        raise RuleCommandError("-R needs a rule number")
    if op == "D" and index is not None and rest:
        raise RuleCommandError("-D takes a rule number or a rule, not both")
    if op in "AIR" and not rest:
        raise RuleCommandError(f"-{op} needs a rule")
    return Change(op, chain, opts["table"], index, rest), opts


def main(argv: list[str]) -> int:
    """Run a single-rule command; 0 on success."""
    from .setcmd import pinned_sets

    try:
        change, opts = parse_args(argv)
        rt = Runtime(opts["hook"], netns_name=opts["netns"], iface=opts["iface"],
                     root=opts["bpffs"])
        fam = Family.IPV6 if opts["ipv6"] else Family.IPV4
        t0 = time.perf_counter()
        out = apply_change(rt, fam, change, pinned_sets(rt, fam))
        ms = (time.perf_counter() - t0) * 1000
    except (RuleCommandError, RuntimeError_, ParseError) as e:
        print(f"bpfilter: {e}", file=sys.stderr)
        return 1
    except (CompileError, MatchError, VerifierError, BpfError) as e:  # of a full restore
        print(f"bpfilter: {e}", file=sys.stderr)
        return 1
    how = "in place" if out.in_place else f"by a full reload ({out.why})"
    print(f"bpfilter -{change.op} {change.chain}: applied {how}"
          + (f" in {ms:.1f} ms" if opts["verbose"] else ""), file=sys.stderr)
    return 0
