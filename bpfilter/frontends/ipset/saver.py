"""Sets → `ipset save` and `ipset list` text."""

from __future__ import annotations

from collections.abc import Iterable

from ...ir.model import Family
from ...ir.sets import IpSet, Parts, SetDef
from ...matches.values import format_addr
from .elements import format_member


def header(d: SetDef) -> str:
    """The creation options, as `ipset save` prints them after the type."""
    if d.range is not None:
        lo, hi = d.range
        if d.type.port_only:
            text = f"range {lo}-{hi}"
        else:
            first, last = (format_addr(v.to_bytes(4, "big")) for v in (lo, hi))
            text = f"range {first}-{last}"
        return text + (f" netmask {d.netmask}" if d.netmask is not None else "")
    fam = "inet" if d.family is Family.IPV4 else "inet6"
    text = f"family {fam} hashsize {d.hashsize} maxelem {d.maxelem}"
    return text + (f" netmask {d.netmask}" if d.netmask is not None else "")


def create_line(d: SetDef) -> str:
    """`create NAME TYPE options`."""
    return f"create {d.name} {d.type.name} {header(d)}"


def sorted_members(d: SetDef, members: Iterable[tuple[Parts, bool]]) -> list[tuple[Parts, bool]]:
    """Members in a stable order (ipset prints hash sets in bucket order; this sorts them)."""
    def key(item: tuple[Parts, bool]) -> tuple:
        out: list = []
        for part in item[0]:
            if isinstance(part, bytes):
                out.append((part, 0))
            else:
                out.append(part)
        return tuple(out)

    return sorted(members, key=key)


def save_set(s: IpSet) -> str:
    """One set as `ipset save` prints it: its create line, then an add line per member."""
    d = s.definition
    lines = [create_line(d)]
    lines += [f"add {d.name} {format_member(d, p, nm)}"
              for p, nm in sorted_members(d, s.members.items())]
    return "\n".join(lines) + "\n"


def save_sets(sets: Iterable[IpSet]) -> str:
    """Every set, in order, as `ipset save` prints them."""
    return "".join(save_set(s) for s in sets)


def list_set(s: IpSet, references: int = 0) -> str:
    """One set as `ipset list` prints it (name, type, header, members)."""
    d = s.definition
    lines = [f"Name: {d.name}", f"Type: {d.type.name}", f"Header: {header(d)}",
             f"References: {references}", f"Number of entries: {len(s.members)}", "Members:"]
    lines += [format_member(d, p, nm) for p, nm in sorted_members(d, s.members.items())]
    return "\n".join(lines) + "\n"
