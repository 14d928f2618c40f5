"""The `bpfilter` command: argument parsing and error reporting; commands live in `commands`."""

from __future__ import annotations

import argparse
import sys

from .. import __version__


def _common(p: argparse.ArgumentParser, *, family: bool = True, hook: bool = True) -> None:
    if family:
        g = p.add_mutually_exclusive_group()
        g.add_argument("-6", "--ipv6", dest="ipv6", action="store_true", help="IPv6 ruleset")
        g.add_argument("-4", "--ipv4", dest="ipv4", action="store_true", help="IPv4 (default)")
    if hook:
        p.add_argument("--hook", choices=("nf", "tc", "xdp"), default="nf",
                       help="where the programs run (default: nf, the netfilter hooks)")
        p.add_argument("--iface", help="interface for --hook tc/xdp")
    p.add_argument("--netns", metavar="NAME", help="act on network namespace NAME (ip netns)")
    p.add_argument("--bpffs", metavar="DIR", help="pin root (default /sys/fs/bpf/pybpfilter, "
                   "or $BPFILTER_BPFFS)")


def _cgroup_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cgroup", metavar="PATH",
                   help="cgroup v2 directory whose sockets the nat OUTPUT chain translates "
                        "(default: where it is attached now, else $BPFILTER_CGROUP, else the "
                        "cgroup v2 root, /sys/fs/cgroup); only sockets of --netns are translated")


def _sets_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sets", metavar="FILE",
                   help="named sets in `ipset save` format (the ruleset file may also start "
                        "with ipset commands)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    ap = argparse.ArgumentParser(
        prog="bpfilter",
        description="Compile iptables rulesets to eBPF and run them in the kernel.")
    ap.add_argument("--version", action="version", version=f"bpfilter {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("restore", help="compile, load and attach a ruleset (atomically)")
    _common(p)
    p.add_argument("-c", "--counters", action="store_true",
                   help="start the counters at the values in the input")
    p.add_argument("-t", "--test", action="store_true",
                   help="compile and verify only; change nothing")
    _sets_option(p)
    _cgroup_option(p)
    p.add_argument("--format", choices=("auto", "iptables", "nft"), default="auto",
                   help="input format: iptables-save text, or nft -j list ruleset JSON "
                        "(default: JSON when the file starts with '{', else iptables)")
    p.add_argument("file", nargs="?", default="-", help="iptables-save file (- for stdin)")

    p = sub.add_parser("save", help="print the loaded ruleset in iptables-save format")
    _common(p)
    p.add_argument("-c", "--counters", action="store_true", help="include counters")

    p = sub.add_parser("list", help="list rules like iptables -L")
    _common(p)
    p.add_argument("-v", "--verbose", action="store_true", help="counters and interfaces")
    p.add_argument("-x", "--exact", action="store_true", help="exact counter values")
    p.add_argument("-n", "--numeric", action="store_true", help="numeric addresses and ports")
    p.add_argument("--line-numbers", action="store_true", help="number the rules")
    p.add_argument("-t", "--table", default="filter", help="table (default filter)")
    p.add_argument("chain", nargs="?", help="only this chain")

    p = sub.add_parser("flush", help="detach and remove every loaded program")
    _common(p, family=False)
    p.add_argument("--all-hooks", action="store_true",
                   help="every hook of the namespace (default: the --hook given, or all)")
    p.add_argument("--cgroup", metavar="PATH",
                   help="accepted as restore takes it; nat OUTPUT's cgroup links are found "
                        "through their pins, wherever they are attached")

    p = sub.add_parser("check", help="run the packets of a pcap through a compiled ruleset")
    _common(p, hook=False)
    p.add_argument("--hook", choices=("nf", "tc", "xdp"), default="nf")
    p.add_argument("--chain", default="INPUT", help="built-in chain to run (default INPUT)")
    p.add_argument("-t", "--table", default="filter")
    p.add_argument("--iif", help="input interface name the packets arrive on")
    p.add_argument("--oif", help="output interface name")
    p.add_argument("--pcap", required=True, help="pcap file of Ethernet frames")
    p.add_argument("--json", action="store_true", help="one JSON object per packet")
    _sets_option(p)
    p.add_argument("file", help="iptables-save file (- for stdin)")

    p = sub.add_parser("conntrack", help="list or flush connection tracking entries")
    p.add_argument("action", choices=("list", "flush"))
    g = p.add_mutually_exclusive_group()
    g.add_argument("-6", "--ipv6", dest="ipv6", action="store_true", help="IPv6 entries")
    g.add_argument("-4", "--ipv4", dest="ipv4", action="store_true", help="IPv4 (default)")
    p.add_argument("--json", action="store_true", help="one JSON object per entry")
    p.add_argument("--netns", metavar="NAME", help="act on network namespace NAME (ip netns)")

    p = sub.add_parser("monitor", help="stream LOG/NFLOG events, one line each")
    _common(p)
    p.add_argument("--json", action="store_true", help="one JSON object per event")
    p.add_argument("--count", type=int, help="stop after this many events")
    p.add_argument("--duration", type=float, help="stop after this many seconds")

    p = sub.add_parser("dump", help="print the loaded programs as annotated assembly")
    _common(p)
    p.add_argument("--json", action="store_true", help="JSON output")
    p.add_argument("-f", "--file", help="compile FILE instead of reading what is loaded")
    _sets_option(p)

    from .setcmd import add_parser

    add_parser(sub, _common)
    from . import refreshcmd

    refreshcmd.add_parser(sub, _common)

    return ap


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    from . import commands, rulecmd

    args_in = sys.argv[1:] if argv is None else argv
    if rulecmd.is_rule_command(args_in):  # iptables-style -A/-I/-D/-R: not a subcommand
        return rulecmd.main(args_in)
    ap = build_parser()
    args, extra = ap.parse_known_args(argv)
    if extra and getattr(args, "command", None) == "set" and not any(
            e.startswith("-") for e in extra):
        args.args += extra  # `set add --netns X NAME MEMBER`: argparse stops at the option
    elif extra:
        ap.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        ap.print_help()
        return 2
    try:
        return commands.run(args)
    except commands.UserError as e:
        print(f"bpfilter {args.command}: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
