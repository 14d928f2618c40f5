"""`bpfilter set`: list, save and change the named sets loaded at a hook, in place.

    bpfilter set list [NAME]            like `ipset list` (every set without NAME)
    bpfilter set save [NAME]            like `ipset save`
    bpfilter set add NAME MEMBER [nomatch] [--exist]
    bpfilter set del NAME MEMBER [--exist]
    bpfilter set test NAME MEMBER       exit status 0 when the member is in the set
    bpfilter set flush [NAME]

Changes go straight into the set's pinned map: the programs see them with the next packet,
nothing is recompiled or reloaded.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..frontends.ipset import SetError, list_set, parse_member, parse_sets, save_set
from ..frontends.iptables.errors import ParseError
from ..ir.model import Family, Ruleset
from ..ir.sets import IpSet
from ..runtime.loader import Runtime
from ..runtime.sets import SetStateError, SetStore
from ..runtime.state import locked


class SetCommandError(Exception):
    """A `bpfilter set` failure to report in one line."""


def read_set_file(path: str) -> dict[str, IpSet]:
    """The sets of an `ipset save` file."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise SetCommandError(f"cannot read {path}: {e.strerror}") from None
    try:
        return parse_sets(text, filename=path)
    except ParseError as e:
        raise SetCommandError(str(e)) from None


def pinned_sets(rt: Runtime, family: Family) -> dict[str, IpSet]:
    """The definitions of the sets loaded at `rt`'s hook (without their members)."""
    return {n: IpSet(d) for n, d in SetStore(rt.dir, family).definitions().items()}


def _references(rs: Ruleset | None, name: str) -> int:
    if rs is None:
        return 0
    return sum(1 for t in rs.tables.values() for c in t.chains.values() for r in c.rules
               for m in r.matches if m.kind == "set" and m.params.name == name)


def cmd_set(args: argparse.Namespace, rt: Runtime, family: Family,
            loaded: Ruleset | None) -> int:
    """Run `bpfilter set ACTION ...` against the sets pinned at `rt`'s hook."""
    store = SetStore(rt.dir, family)
    if not os.path.isdir(rt.dir):
        raise SetCommandError(f"nothing is loaded at hook {rt.hook}")
    action, words = args.action, list(args.args)
    try:
        if action in ("list", "save"):
            names = words or list(store.definitions())
            for name in names:
                s = store.read(name)
                sys.stdout.write(list_set(s, _references(loaded, name)) if action == "list"
                                 else save_set(s))
            return 0
        if action == "flush":
            with locked(rt.dir):
                for name in words or list(store.definitions()):
                    store.flush(name)
            return 0
        if len(words) < 2:
            raise SetCommandError(f"set {action} needs a set name and a member")
        name, member, flags = words[0], words[1], words[2:]
        d = store.definition(name)
        nomatch = False
        for f in flags:
            if f != "nomatch" or action != "add" or not d.type.has_net:
                raise SetCommandError(f"unexpected {f!r} after the member")
            nomatch = True
        members = parse_member(d, member)
        if action == "test":
            found = store.test(name, members)
            print(f"{member} is {'' if found else 'NOT '}in set {name}.")
            return 0 if found else 1
        with locked(rt.dir):
            if action == "add":
                store.add(name, members, nomatch, exist=args.exist)
            else:
                store.delete(name, members, exist=args.exist)
        return 0
    except (SetError, SetStateError) as e:
        raise SetCommandError(str(e)) from None


def add_parser(sub: argparse._SubParsersAction, common) -> None:
    """The `set` subcommand's arguments."""
    p = sub.add_parser("set", help="list or change the named sets loaded at a hook")
    common(p)
    p.add_argument("action", choices=("list", "save", "add", "del", "test", "flush"))
    p.add_argument("args", nargs="*", metavar="NAME [MEMBER [nomatch]]")
    p.add_argument("--exist", "-exist", action="store_true",
                   help="no error for a member already added (add) or not there (del)")
