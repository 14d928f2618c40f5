"""What the nat table needs outside BPF: nf_nat's hooks, and facts about the namespace.

BPF binds a connection's translation into its conntrack entry (compiler/nat.py); the kernel's
nf_nat applies it to every packet, but only where nat hooks are registered. A dormant nftables
table with empty `type nat` base chains registers them (an empty chain adds no binding of its
own: connections BPF did not bind get nf_nat's null binding, as under iptables), and a regular
chain no packet traverses holds a `ct state` rule so conntrack runs. `flush` removes the table.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import struct

from .. import netns
from ..compiler.nat import TailCall
from ..ir.model import Family
from . import dispatch as D
from .conntrack import _nft

TABLE = "pybpfilter_nat"
_ENABLE = f"""\
add table ip {TABLE}
add chain ip {TABLE} prerouting {{ type nat hook prerouting priority dstnat; }}
add chain ip {TABLE} input {{ type nat hook input priority 100; }}
add chain ip {TABLE} output {{ type nat hook output priority -100; }}
add chain ip {TABLE} postrouting {{ type nat hook postrouting priority srcnat; }}
add chain ip {TABLE} keep
flush chain ip {TABLE} keep
add rule ip {TABLE} keep ct state new comment "keeps conntrack and nf_nat on for pybpfilter"
"""
SIOCGIFADDR = 0x8915


def enable(netns_name: str | None) -> None:
    """Register nf_nat's hooks (and conntrack) in the namespace."""
    from .conntrack import ConntrackError

    try:
        _nft(netns_name, _ENABLE, check=True)
    except ConntrackError as e:
        raise ConntrackError(str(e).replace("connection tracking", "NAT")) from None


def disable(netns_name: str | None) -> None:
    """Remove the dormant nat table."""
    _nft(netns_name, f"delete table ip {TABLE}\n", check=False)


def environment(netns_name: str | None, iface: str | None) -> tuple[dict[int, str], bytes | None]:
    """The namespace's interfaces by ifindex, and `iface`'s IPv4 address (REDIRECT's target)."""
    ctx = netns.enter(netns_name) if netns_name else contextlib.nullcontext()
    with ctx:
        names = dict(socket.if_nameindex())
        addr = None
        if iface:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                try:
                    raw = fcntl.ioctl(s.fileno(), SIOCGIFADDR,
                                      struct.pack("256s", iface.encode()[:15]))
                    addr = raw[20:24]  # ifr_addr: sockaddr_in's sin_addr
                except OSError:
                    addr = None
    return names, addr


def environment_for(rs, hook: str, netns_name: str | None,
                    iface: str | None) -> tuple[dict[int, str], bytes | None] | None:
    """environment() when `rs` has nat rules to compile for tc, else None."""
    t = rs.tables.get("nat")
    if hook != "tc" or t is None:
        return None
    if not any(c.rules or c.policy not in (None, "ACCEPT") for c in t.chains.values()):
        return None
    return environment(netns_name, iface)


def verify(ct) -> None:
    """Load a compiled nat table's programs through the verifier (restore --test), with
    throwaway stand-ins for the dispatchers' maps PREROUTING tail-calls through."""
    from ..bpf.consts import MapType
    from ..bpf.maps import Map, MapSpec
    from ..bpf.prog import Prog
    maps = ct.create_maps()
    try:
        maps[D.GEN_MAP] = Map.create(MapSpec(MapType.ARRAY, 4, 8, 1, name="bpf_gen"))
        maps[D.PROGS_MAP] = Map.create(MapSpec(MapType.PROG_ARRAY, 4, 4, D.PROG_ARRAY_SIZE,
                                               name="bpf_progs"))
        fds = {k: m.fd for k, m in maps.items()}
        for cp in ct.programs.values():
            fl = cp.flavour
            with Prog.load(fl.prog_type, cp.program.resolve(fds), name=cp.name,
                           attach_type=fl.attach_type, source=cp.program):
                pass
    finally:
        for m in maps.values():
            m.close()


def used_elsewhere(hook_dir: str) -> bool:
    """Whether another tc hook of the namespace (a sibling of `hook_dir`) binds NAT too."""
    parent, mine = os.path.split(hook_dir)
    try:
        siblings = os.listdir(parent)
    except OSError:
        return False
    return any(os.path.exists(os.path.join(parent, d, "link_nat")) for d in siblings if d != mine)


def tail_call() -> TailCall:
    """Where the nat PREROUTING program finds POSTROUTING's (see dispatch)."""
    return TailCall(D.GEN_MAP, D.PROGS_MAP, D.GEN_STRIDE,
                    D.slot_id(Family.IPV4, "nat", "POSTROUTING"))
