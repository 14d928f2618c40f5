"""`bpfilter refresh`: copy the namespace's local routing table into the loaded addrtype maps
again (once, or after every change with --watch); see runtime/localtable.py."""

from __future__ import annotations

import argparse
import os
import sys
import time

from .. import netns
from ..runtime import localtable
from ..runtime.state import bpffs_root


def _hook_dirs(args: argparse.Namespace) -> list[str]:
    """Every hook directory of the namespace (or only --hook/--iface's when given)."""
    base = os.path.join(args.bpffs or bpffs_root(), netns.ns_id(args.netns))
    dirs = sorted(os.listdir(base)) if os.path.isdir(base) else []
    if args.iface:
        dirs = [d for d in dirs if d == f"{args.hook}@{args.iface}"]
    elif args.hook:
        dirs = [d for d in dirs if d.partition("@")[0] == args.hook]
    return [os.path.join(base, d) for d in dirs]


def _report(done: dict[str, dict]) -> None:
    for d, fams in done.items():
        for fam, n in fams.items():
            print(f"{os.path.basename(d)} {fam.value}: {n} local routes", flush=True)


def cmd_refresh(args: argparse.Namespace) -> int:
    """Refill the maps now; with --watch, again after every address or route change."""
    dirs = _hook_dirs(args)
    _report({d: localtable.refresh(d, args.netns) for d in dirs})
    if args.watch:
        end = time.monotonic() + args.duration if args.duration else None
        try:
            localtable.watch(dirs, args.netns, on_refresh=_report,
                             stop=lambda: end is not None and time.monotonic() > end)
        except KeyboardInterrupt:
            print(file=sys.stderr)
    return 0


def add_parser(sub: argparse._SubParsersAction, common) -> None:
    """The `refresh` subcommand's arguments."""
    p = sub.add_parser("refresh", help="copy the local routing table into the addrtype maps "
                                       "again (after address or route changes)")
    common(p, family=False)
    p.set_defaults(hook=None)
    p.add_argument("--watch", action="store_true",
                   help="keep running: refresh after every address or route change")
    p.add_argument("--duration", type=float, help="with --watch: stop after this many seconds")
