"""The ipset front-end: `ipset save` / `ipset restore` text ↔ named sets (`bpfilter.ir.sets`)."""

from __future__ import annotations

from ..iptables.errors import ParseError
from .elements import SetError, format_member, parse_member
from .parser import is_ipset_line, parse_create, parse_sets
from .saver import create_line, list_set, save_set, save_sets

__all__ = ["ParseError", "SetError", "create_line", "format_member", "is_ipset_line",
           "list_set", "parse_create", "parse_member", "parse_sets", "save_set", "save_sets",
           "split_combined"]


def split_combined(text: str) -> tuple[str, str]:
    """Split a file holding ipset commands before its first `*table` line into the ipset part
    and the iptables part; both keep every line's number (the other part's lines are blank)."""
    sets, rules = [], []
    in_tables = False
    for line in text.splitlines():
        in_tables = in_tables or line.lstrip().startswith("*")
        if not in_tables and is_ipset_line(line):
            sets.append(line)
            rules.append("")
        else:
            sets.append("")
            rules.append(line)
    return "\n".join(sets) + "\n", "\n".join(rules) + "\n"
