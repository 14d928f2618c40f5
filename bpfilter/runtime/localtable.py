"""The local routing table map `-m addrtype` looks addresses up in (compiler/hooks/localtable.py).

What is copied, per family, from the namespace's routing tables (`ip -j route show`):

- IPv4: inet_dev_addr_type() looks the address up in table `local` (longest prefix first, the
  first route of a prefix whose nexthop is alive and that has no TOS). While the namespace has
  only the default policy rules the kernel keeps tables `local` and `main` in one trie, and the
  lookup sees both (a `local` route added to table main is LOCAL; tested): then table main is
  copied too, local's route first for an equal prefix. Only main's routes that change an answer
  are kept (non-unicast types, and unicast routes inside one), so a full BGP table costs little.
  Reject routes (blackhole, unreachable, prohibit, throw) make the lookup fail: UNICAST.
- IPv6: the route lookup xt_addrtype does answers LOCAL for a `local` route, ANYCAST for an
  `anycast` route and for the first address of the chosen on-link prefix shorter than /127
  (ipv6_anycast_destination). The chosen route is table local's longest prefix, else main's
  (the default policy rules; other tables that custom rules would consult are not read).
- --limit-iface-in/out: each entry keeps the device of its route's first nexthop (IPv4: the
  type holds only on that device, UNICAST elsewhere) or, for IPv6, of the address it is (LOCAL
  only for an address of that device, as nf_ipv6_chk_addr answers).

Not modelled (documented differences): custom IPv4 rules that were deleted again (the kernel
keeps the tables apart once split, the copy then reads main too); VRF devices, whose own table
inet_dev_addr_type reads under --limit-iface; one IPv6 address on two devices (one is kept);
IPv6 ANYCAST under --limit-iface (a lookup preferring that device: the plain answer is used);
routes skipped for a down link (ignore_routes_with_linkdown).

Staleness: the map is a copy. It is rebuilt at every `restore` of a ruleset that reads address
types, and by `bpfilter refresh` (once, or `--watch`: again after every route or address change
the namespace announces on rtnetlink). Between a change and the next refresh, packets see the
old table: an address added to an interface is UNICAST until then, a removed one still LOCAL.
Where the answer can come from the packet's own route (IPv4 --dst-type on the nf hook after the
routing decision, see hooks/route.py) the program reads the route instead and is always current.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import select
import socket
import struct
import subprocess
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass

from .. import netns
from ..bpf.maps import Map
from ..compiler.compiled import CompiledTable
from ..compiler.hooks.localtable import LOCAL_TABLE, MAX_ENTRIES, map_spec
from ..ir.model import Family
from ..matches.kernel import RouteType
from .state import locked, pin_name, unlink_quiet

PREFIX = "localtable"
_V4_ANSWERS = {"unicast", "local", "broadcast", "anycast", "multicast"}
_REJECT = {"blackhole", "unreachable", "prohibit", "throw"}
_DEFAULT_RULES = {0: "local", 32766: "main", 32767: "default"}
# rtnetlink multicast groups (linux/rtnetlink.h): addresses and routes of both families.
RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE = 0x10, 0x40
RTMGRP_IPV6_IFADDR, RTMGRP_IPV6_ROUTE = 0x100, 0x400
NETLINK_ROUTE = 0


class LocalTableError(RuntimeError):
    """The routing table cannot be read or does not fit the map."""


@dataclass(frozen=True)
class Route:
    """One route of a dump, as far as an address type lookup cares."""

    table: str
    net: ipaddress.IPv4Network | ipaddress.IPv6Network
    type: str
    gateway: bool
    dev: str | None


def _ip_json(family: Family, *args: str) -> list[dict]:
    """`ip -j [-6] ARGS` in the current thread's namespace."""
    cmd = ["ip", "-j", "-4" if family is Family.IPV4 else "-6", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise LocalTableError(f"{' '.join(cmd)}: {proc.stderr.strip()}")
    return json.loads(proc.stdout or "[]")


def _net(dst: str, family: Family) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if dst == "default":
        dst = "0.0.0.0/0" if family is Family.IPV4 else "::/0"
    return ipaddress.ip_network(dst, strict=False)


def parse_routes(raw: Iterable[dict], family: Family, table: str) -> list[Route]:
    """The routes of one table's JSON dump that a lookup can choose (alive, no TOS)."""
    out = []
    for r in raw:
        if "dead" in r.get("flags", []) or r.get("tos") or r.get("dsfield"):
            continue
        hops = r.get("nexthops") or []
        gateway = "gateway" in r or "via" in r or any("gateway" in h for h in hops)
        dev = r.get("dev") or (hops[0].get("dev") if hops else None)
        out.append(Route(table, _net(r["dst"], family), r.get("type", "unicast"), gateway, dev))
    return out


def _custom_rules(family: Family) -> bool:
    """Whether policy rules other than the default three exist (the kernel then keeps IPv4's
    local and main tables apart)."""
    for r in _ip_json(family, "rule", "show"):
        if _DEFAULT_RULES.get(r.get("priority", -1)) != r.get("table") or len(r) > 3:
            return True
    return False


def _bits_v4(t: str) -> int:
    return 1 << RouteType[t.upper()] if t in _V4_ANSWERS else 1 << RouteType.UNICAST


def _bits_v6(t: str) -> int:
    return {"local": 1 << RouteType.LOCAL, "anycast": 1 << RouteType.ANYCAST}.get(t, 0)


def _first_per_prefix(routes: Iterable[Route]) -> dict:
    out: dict = {}
    for r in routes:
        out.setdefault(r.net, r)
    return out


def _inside(net, nets: Iterable) -> bool:
    return any(o.prefixlen < net.prefixlen and net.subnet_of(o) for o in nets)


def entries_v4(local: list[Route], main: list[Route], merged: bool,
               ifindex: Callable[[str | None], int]) -> dict:
    """{network: (type bits, ifindex)} for the IPv4 map."""
    chosen = _first_per_prefix([*local, *(main if merged else [])])
    special = [n for n, r in chosen.items() if _bits_v4(r.type) != 1 << RouteType.UNICAST]
    local_nets = {r.net for r in local}
    out = {}
    for n, r in chosen.items():
        bits = _bits_v4(r.type)
        if n in local_nets or bits != 1 << RouteType.UNICAST or _inside(n, special):
            out[n] = (bits, ifindex(r.dev))
    return out


def _lpm(nets: dict, addr) -> object | None:
    best = None
    for n in nets:
        if addr in n and (best is None or n.prefixlen > best.prefixlen):
            best = n
    return best


def entries_v6(local: list[Route], main: list[Route], addresses: set[tuple[str, str]],
               ifindex: Callable[[str | None], int]) -> dict:
    """{network: (type bits, ifindex)} for the IPv6 map; the ifindex is only given for an
    address (`addresses`: (address, device) pairs), which is what --limit-iface asks about
    (nf_ipv6_chk_addr on the device), not for other local routes."""
    out: dict = {}
    for r in local:
        addr = (str(r.net.network_address), r.dev or "")
        idx = ifindex(r.dev) if r.type == "local" and r.net.prefixlen == 128 and \
            addr in addresses else 0
        bits, idx = out.get(r.net, (0, idx))
        out[r.net] = (bits | _bits_v6(r.type), idx)
    by_table = {"local": _first_per_prefix(local), "main": _first_per_prefix(main)}
    # The first address of an on-link prefix is anycast when that prefix's route is the one the
    # lookup chooses for it (local's longest match, else main's).
    for r in [*local, *main]:
        if r.gateway or r.type in _REJECT or r.net.prefixlen >= 127:
            continue
        first = r.net.network_address
        hit = _lpm(by_table["local"], first)
        table = "local" if hit is not None else "main"
        if hit is None:
            hit = _lpm(by_table["main"], first)
        if hit != r.net or table != r.table:
            continue
        host = ipaddress.ip_network(first)
        bits, idx = out.get(host, (_bits_v6(r.type), 0))
        out[host] = (bits | 1 << RouteType.ANYCAST, idx)
    return out


def _addresses(family: Family) -> set[tuple[str, str]]:
    """(address, device) of every address in use (not tentative, DAD not failed)."""
    out = set()
    for link in _ip_json(family, "addr", "show"):
        for a in link.get("addr_info", []):
            if a.get("local") and not (a.get("tentative") or a.get("dadfailed")):
                out.add((str(ipaddress.ip_address(a["local"])), link.get("ifname", "")))
    return out


def _ifindex(dev: str | None) -> int:
    if not dev:
        return 0
    try:
        return socket.if_nametoindex(dev)
    except OSError:
        return 0


def read_entries(family: Family, netns_name: str | None) -> dict[bytes, bytes]:
    """The map's contents for the namespace's routing tables now: {LPM key: value}."""
    with netns.enter(netns_name) if netns_name else contextlib.nullcontext():
        local = parse_routes(_ip_json(family, "route", "show", "table", "local"), family,
                             "local")
        if family is Family.IPV4:
            merged = not _custom_rules(family)
            main = parse_routes(_ip_json(family, "route", "show", "table", "main"), family,
                                "main") if merged else []
            nets = entries_v4(local, main, merged, _ifindex)
        else:
            main = parse_routes(_ip_json(family, "route", "show", "table", "main"), family,
                                "main")
            nets = entries_v6(local, main, _addresses(family), _ifindex)
    if len(nets) > MAX_ENTRIES:
        raise LocalTableError(f"{len(nets)} local routes do not fit the map ({MAX_ENTRIES})")
    return {struct.pack("<I", n.prefixlen) + n.network_address.packed:
            struct.pack("<II", bits, idx) for n, (bits, idx) in nets.items()}


def fill(m: Map, want: dict[bytes, bytes]) -> None:
    """Make the map hold exactly `want`: new and changed entries first, stale ones last (a
    lookup in between sees either answer, never a hole where both tables have a route)."""
    have = dict(m.items())
    for k, v in want.items():
        if have.get(k) != v:
            m.update(k, v)
    for k in have.keys() - want.keys():
        m.delete(k)


def pin_path(directory: str, family: Family) -> str:
    """Where a hook directory pins the family's map."""
    return os.path.join(directory, pin_name(PREFIX, family.value))


class LocalTableSync:
    """The family's map for a restore, when its programs read address types: opened from its
    pin (or created and pinned) and refilled from the namespace now. `maps` is closed by the
    caller with the other shared maps; `finish()` unpins the map a ruleset no longer uses."""

    def __init__(self, directory: str, family: Family, compiled: list[CompiledTable],
                 netns_name: str | None) -> None:
        self.path = pin_path(directory, family)
        self.maps: dict[Hashable, Map] = {}
        if not any(LOCAL_TABLE in ct.maps for ct in compiled):
            return
        want = read_entries(family, netns_name)
        m = Map.open_or_create(self.path, map_spec(family))
        try:
            fill(m, want)
        except Exception:
            m.close()
            raise
        self.maps[LOCAL_TABLE] = m

    def finish(self) -> None:
        """Unpin the map when the new ruleset reads no address type."""
        if not self.maps:
            unlink_quiet(self.path)


def refresh(directory: str, netns_name: str | None) -> dict[Family, int]:
    """Refill the maps pinned in a hook directory; {family: entries} of those refreshed.
    Holds the directory's lock (a restore refills them itself)."""
    out: dict[Family, int] = {}
    if not os.path.isdir(directory):  # flushed meanwhile
        return out
    with locked(directory):
        for fam in Family:
            path = pin_path(directory, fam)
            if os.path.exists(path):
                want = read_entries(fam, netns_name)
                with Map.open_pinned(path) as m:
                    fill(m, want)
                out[fam] = len(want)
    return out


def watch(directories: list[str], netns_name: str | None, *, settle: float = 0.05,
          stop: Callable[[], bool] = lambda: False,
          on_refresh: Callable[[dict], None] | None = None) -> None:
    """Refresh the directories' maps after every address or route change the namespace
    announces (rtnetlink), until `stop()`; changes within `settle` seconds count as one."""
    groups = RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_IFADDR | RTMGRP_IPV6_ROUTE
    with netns.enter(netns_name) if netns_name else contextlib.nullcontext():
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
    with sock:
        sock.bind((0, groups))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        while not stop():
            ready, _, _ = select.select([sock], [], [], 0.2)
            if not ready:
                continue
            # Drain until the namespace is quiet for `settle` (one refresh per burst).
            while select.select([sock], [], [], settle)[0]:
                with contextlib.suppress(OSError):  # ENOBUFS: lost messages; refresh reads all
                    sock.recv(1 << 16)
            done = {d: refresh(d, netns_name) for d in directories}
            if on_refresh is not None:
                on_refresh(done)
