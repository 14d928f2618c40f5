"""What each `bpfilter` subcommand does."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

from ..bpf.prog import VerifierError
from ..bpf.syscall import BpfError
from ..compiler.validate import CompileError
from ..ir.model import Counters, Family, Ruleset
from ..matches.registry import MatchError
from ..runtime.conntrack import ConntrackError
from ..runtime.loader import Loaded, Runtime, RuntimeError_
from ..runtime.localtable import LocalTableError
from .pcap import PcapError
from .setcmd import SetCommandError


class UserError(Exception):
    """An error to report in one line (or a few, for verifier logs) without a traceback."""


def _family(args: argparse.Namespace) -> Family:
    return Family.IPV6 if getattr(args, "ipv6", False) else Family.IPV4


def _read(path: str) -> tuple[str, str]:
    if path == "-":
        return sys.stdin.read(), "<stdin>"
    try:
        with open(path) as f:
            return f.read(), path
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None


def parse_file(path: str, family: Family, sets: dict | None = None,
               default_sets: Callable[[], dict] | None = None,
               source: tuple[str, str] | None = None) -> tuple[Ruleset, str, str]:
    """Parse an iptables-save file (ipset commands may come before its first table, on top of
    `sets`; with neither, rules see `default_sets()`); returns the ruleset, its canonical text
    and the original. `source` is (text, name) when the file was read already."""
    from ..frontends.ipset import parse_sets, split_combined
    from ..frontends.iptables.parser import ParseError, parse
    from ..frontends.iptables.saver import save

    text, name = source or _read(path)
    if text.lstrip().startswith("{"):  # nft -j list ruleset: the family's tables
        rs = _nft_family(text, name, family)
        rs.source = os.path.abspath(path) if path != "-" else None
        return rs, save(rs), text
    try:
        set_text, rule_text = split_combined(text)
        if set_text.strip():
            sets = parse_sets(set_text, filename=name, sets=sets)
        elif sets is None and default_sets is not None:
            sets = default_sets()
        rs = parse(rule_text, family=family, filename=name, sets=sets)
    except ParseError as e:
        raise UserError(str(e)) from None
    rs.source = os.path.abspath(path) if path != "-" else None
    return rs, save(rs), text


def _nft_family(text: str, name: str, family: Family) -> Ruleset:
    """The ruleset of one family from nftables JSON (for check and dump)."""
    from ..frontends.iptables.parser import ParseError
    from ..frontends.nftables import parse as parse_nft

    try:
        rulesets = parse_nft(text, filename=name, families=(family,))
    except ParseError as e:
        raise UserError(str(e)) from None
    if family not in rulesets:
        raise UserError(f"{name}: no table of family {family.value} (ip, ip6 or inet)")
    return rulesets[family]


def _loaded_sets(args: argparse.Namespace, fam: Family) -> dict:
    """The definitions of the sets loaded at the hook `args` name (none if it names none)."""
    from .setcmd import pinned_sets

    try:
        rt = Runtime(args.hook, netns_name=args.netns, iface=args.iface, root=args.bpffs)
    except RuntimeError_:
        return {}
    return pinned_sets(rt, fam)


def _given_sets(args: argparse.Namespace) -> dict | None:
    """The sets of `--sets FILE`, if given."""
    from .setcmd import read_set_file

    path = getattr(args, "sets", None)
    return read_set_file(path) if path else None


def _runtime(args: argparse.Namespace, hook: str | None = None) -> Runtime:
    try:
        return Runtime(hook or args.hook, netns_name=args.netns, iface=getattr(args, "iface", None),
                       root=args.bpffs, cgroup=getattr(args, "cgroup", None))
    except RuntimeError_ as e:
        raise UserError(str(e)) from None


def _loaded_ruleset(rt: Runtime, fam: Family) -> tuple[Ruleset, Loaded]:
    """The loaded ruleset of `fam`, with its counters filled in."""
    from ..frontends.iptables.parser import parse

    loaded = rt.loaded(fam)
    if loaded is None:
        raise UserError(f"no {fam.value} ruleset is loaded at hook {rt.hook}"
                        + (f" of namespace {rt.netns_name}" if rt.netns_name else ""))
    from .setcmd import pinned_sets

    rs = parse(loaded.record.text, family=fam, filename="<loaded>", sets=pinned_sets(rt, fam))
    for tname, tr in loaded.record.tables.items():
        counts = loaded.counters.get(tname)
        table = rs.tables.get(tname)
        if counts is None or table is None:
            continue
        for i, (chain, rule) in enumerate(tr.slots):
            if not chain:
                continue
            c = table.chains[chain]
            if rule is None:
                c.counters = counts[i]
            else:
                c.rules[rule - 1].counters = counts[i]
    return rs, loaded


def _restore_nft(args: argparse.Namespace, source: tuple[str, str]) -> int:
    """Restore an nftables JSON ruleset: each family it has a table for (or the one of -4/-6)."""
    from ..frontends.iptables.parser import ParseError
    from ..frontends.iptables.saver import save
    from ..frontends.nftables import parse as parse_nft

    if getattr(args, "sets", None):
        raise UserError("--sets cannot be combined with an nftables ruleset (its sets come "
                        "from the JSON)")
    only = Family.IPV6 if args.ipv6 else Family.IPV4 if args.ipv4 else None
    try:
        rulesets = parse_nft(source[0], filename=source[1],
                             families=(only,) if only else tuple(Family))
    except ParseError as e:
        raise UserError(str(e)) from None
    if not rulesets:
        raise UserError(f"{source[1]}: no table of family ip, ip6 or inet"
                        + (f" for {only.value}" if only else ""))
    for rs in rulesets.values():
        rs.source = os.path.abspath(args.file) if args.file != "-" else None
        # Two families load one after the other: both are verified before either is.
        if args.test or len(rulesets) > 1:
            _restore_one(args, rs, save(rs), source[0], keep=False, dry=True)
    if args.test:
        return 0
    for rs in rulesets.values():
        _restore_one(args, rs, save(rs), source[0], keep=False)
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    """Compile, load and attach (or with --test only compile and verify)."""
    fam = _family(args)
    fmt = getattr(args, "format", "auto")
    source = None
    if fmt != "iptables":
        source = _read(args.file)
        if fmt == "nft" or source[0].lstrip().startswith("{"):  # JSON: nft -j list ruleset
            return _restore_nft(args, source)
    # Without set definitions, rules may use the sets already loaded (which are then kept).
    rs, text, original = parse_file(args.file, fam, _given_sets(args),
                                    lambda: _loaded_sets(args, fam), source)
    return _restore_one(args, rs, text, original)


def _restore_one(args: argparse.Namespace, rs: Ruleset, text: str, original: str,
                 keep: bool = True, dry: bool = False) -> int:
    """Restore one parsed ruleset (`keep`: undeclared built-in chains keep their policy;
    `dry`: only what --test does)."""
    if args.test or dry:
        from ..runtime.checker import Checker
        from ..runtime.loader import compile_ruleset

        # The same checks as a real restore, then every program through the verifier.
        for ct in compile_ruleset(rs, args.hook, args.iface or "test0"):
            if ct.table.name == "nat":  # no test runs of NAT: verified as loaded
                from ..runtime import nat

                nat.verify(ct)
                continue
            for chain in ct.programs:
                with Checker(rs, chain=chain, table=ct.table.name, hook=args.hook,
                             iif=args.iface):
                    pass
        return 0
    rt = _runtime(args)
    if keep and rt.keep_policies(rs):
        from ..frontends.iptables.saver import save

        text = save(rs)
    rt.restore(rs, text=text, counters=args.counters, original=original)
    return 0


def cmd_save(args: argparse.Namespace) -> int:
    """Print what is loaded in iptables-save format."""
    from ..frontends.iptables.saver import save

    rs, _ = _loaded_ruleset(_runtime(args), _family(args))
    sys.stdout.write(save(rs, counters=args.counters))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """Print rules like `iptables -L`."""
    from .listing import list_table

    rs, _ = _loaded_ruleset(_runtime(args), _family(args))
    table = rs.tables.get(args.table)
    if table is None:
        raise UserError(f"table {args.table!r} is not loaded")
    if args.chain and args.chain not in table.chains:
        raise UserError(f"chain {args.chain!r} does not exist")
    sys.stdout.write(list_table(table, rs.family, chain=args.chain, verbose=args.verbose,
                                exact=args.exact, numeric=args.numeric,
                                line_numbers=args.line_numbers))
    return 0


def cmd_flush(args: argparse.Namespace) -> int:
    """Detach and unpin everything at the hook (all hooks unless --hook was given)."""
    from .. import netns
    from ..runtime.state import bpffs_root

    hooks = ["nf"]
    if args.iface:
        hooks = [args.hook]
    root = args.bpffs or bpffs_root()
    base = os.path.join(root, netns.ns_id(args.netns))
    dirs = sorted(os.listdir(base)) if os.path.isdir(base) else []
    explicit = "--hook" in sys.argv or args.iface
    for d in dirs:
        hook, _, iface = d.partition("@")
        if explicit and not args.all_hooks and (hook not in hooks or
                                                (args.iface and iface != args.iface)):
            continue
        Runtime(hook, netns_name=args.netns, iface=iface or None, root=root).flush()
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Run a pcap through the compiled chain and print each packet's verdict and rule."""
    from ..runtime.checker import Checker
    from .pcap import read_pcap

    fam = _family(args)
    rs, _, _ = parse_file(args.file, fam, _given_sets(args))
    frames = read_pcap(args.pcap)
    with Checker(rs, chain=args.chain, table=args.table, hook=args.hook, iif=args.iif,
                 oif=args.oif) as chk:
        for n, frame in enumerate(frames, 1):
            r = chk.run(frame)
            if args.json:
                print(json.dumps({"packet": n, "verdict": r.verdict, "chain": r.chain,
                                  "rule": r.rule}))
            else:
                who = (f"{r.chain} rule {r.rule}" if r.rule is not None
                       else f"{r.chain} policy" if r.chain else "not covered by the ruleset")
                print(f"packet {n}: {r.verdict:6s} {who}")
    return 0


def cmd_dump(args: argparse.Namespace) -> int:
    """Print the programs (loaded, or compiled from --file) as annotated assembly."""
    from .dump import dump

    fam = _family(args)
    if args.file:
        rs, _, _ = parse_file(args.file, fam, _given_sets(args))
        loaded = None
    else:
        from ..frontends.ipset import split_combined
        from ..frontends.iptables.parser import parse
        from .setcmd import pinned_sets

        rt = _runtime(args)
        _, loaded = _loaded_ruleset(rt, fam)
        rec = loaded.record
        # Recompile from the operator's own text, so each block cites their file and line.
        name = rec.source or "<loaded>"
        rs = parse(split_combined(rec.original or rec.text)[1], family=fam, filename=name,
                   sets=pinned_sets(rt, fam))
    sys.stdout.write(dump(rs, args.hook, getattr(args, "iface", None),
                          _runtime(args) if loaded else None, as_json=args.json))
    return 0


def cmd_conntrack(args: argparse.Namespace) -> int:
    """`conntrack list` prints entries like `conntrack -L`; `conntrack flush` deletes them."""
    from ..runtime import conntrack

    if args.action == "flush":
        n = conntrack.flush(args.netns)
        print(f"bpfilter conntrack: {n} flow entries have been deleted.", file=sys.stderr)
        return 0
    lines = conntrack.entries(args.netns, "ipv6" if args.ipv6 else "ipv4")
    for line in lines:
        print(json.dumps(conntrack.parse_entry(line)) if args.json else line)
    if not args.json:
        print(f"bpfilter conntrack: {len(lines)} flow entries have been shown.", file=sys.stderr)
    return 0


def cmd_monitor(args: argparse.Namespace) -> int:
    """Stream log events of the rulesets loaded at the hook."""
    from .monitor import monitor

    if args.ipv6:
        fams = [Family.IPV6]
    elif args.ipv4:
        fams = [Family.IPV4]
    else:
        fams = [Family.IPV4, Family.IPV6]
    try:
        monitor(_runtime(args), fams, as_json=args.json, count=args.count,
                duration=args.duration, emit=lambda line: print(line, flush=True))
    except ValueError as e:
        raise UserError(str(e)) from None
    except KeyboardInterrupt:
        pass
    return 0


def cmd_set(args: argparse.Namespace) -> int:
    """`bpfilter set ...`: list or change the sets loaded at a hook (see `setcmd`)."""
    from .setcmd import cmd_set as run_set

    rt, fam = _runtime(args), _family(args)
    loaded = _loaded_ruleset(rt, fam)[0] if rt.loaded(fam) is not None else None
    return run_set(args, rt, fam, loaded)


COMMANDS = {"restore": cmd_restore, "save": cmd_save, "list": cmd_list, "flush": cmd_flush,
            "check": cmd_check, "dump": cmd_dump, "conntrack": cmd_conntrack,
            "monitor": cmd_monitor, "set": cmd_set}


def _cmd_refresh(args: argparse.Namespace) -> int:
    from .refreshcmd import cmd_refresh

    return cmd_refresh(args)


COMMANDS["refresh"] = _cmd_refresh


def run(args: argparse.Namespace) -> int:
    """Run a parsed command, turning known errors into UserError."""
    try:
        return COMMANDS[args.command](args)
    except (CompileError, MatchError, RuntimeError_, PcapError, ConntrackError,
            SetCommandError, LocalTableError) as e:
        raise UserError(str(e)) from None
    except VerifierError as e:
        raise UserError(str(e)) from None
    except BpfError as e:
        hint = " (are you root?)" if e.errno in (1, 13) else ""
        raise UserError(f"{e}{hint}") from None
    except PermissionError as e:
        raise UserError(f"{e} (are you root?)") from None


__all__ = ["Counters", "UserError", "run"]
