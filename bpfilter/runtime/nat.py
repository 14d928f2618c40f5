"""What the nat table needs outside BPF: nf_nat's hooks, and facts about the namespace.

BPF binds a connection's translation into its conntrack entry (compiler/nat.py); the kernel's
nf_nat applies it to every packet, but only where nat hooks are registered. A dormant nftables
table with empty `type nat` base chains registers them (an empty chain adds no binding of its
own: connections BPF did not bind get nf_nat's null binding, as under iptables), and a regular
chain no packet traverses holds a `ct state` rule so conntrack runs. The table is `inet`, so
both families' nat hooks are registered (nf_nat registers a family's hooks only for a nat chain
of that family). `flush` removes the table.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import struct
from dataclasses import dataclass

from .. import netns
from ..compiler.nat import TailCall
from ..ir.model import Family
from . import dispatch as D
from .conntrack import _nft

TABLE = "pybpfilter_nat"
_ENABLE = f"""\
add table inet {TABLE}
add chain inet {TABLE} prerouting {{ type nat hook prerouting priority dstnat; }}
add chain inet {TABLE} input {{ type nat hook input priority 100; }}
add chain inet {TABLE} output {{ type nat hook output priority -100; }}
add chain inet {TABLE} postrouting {{ type nat hook postrouting priority srcnat; }}
add chain inet {TABLE} keep
flush chain inet {TABLE} keep
add rule inet {TABLE} keep ct state new comment "keeps conntrack and nf_nat on for pybpfilter"
"""
SIOCGIFADDR = 0x8915
# rtnetlink, to list an interface's IPv6 addresses in the kernel's order
NETLINK_ROUTE, RTM_NEWADDR, RTM_GETADDR, NLMSG_DONE, NLMSG_ERROR = 0, 20, 22, 3, 2
NLM_F_REQUEST, NLM_F_DUMP = 1, 0x300
IFA_ADDRESS, IFA_FLAGS = 1, 8
IFA_F_OPTIMISTIC, IFA_F_TENTATIVE = 0x04, 0x40


def enable(netns_name: str | None) -> None:
    """Register nf_nat's hooks (and conntrack) in the namespace."""
    from .conntrack import ConntrackError

    try:
        _nft(netns_name, _ENABLE, check=True)
    except ConntrackError as e:
        raise ConntrackError(str(e).replace("connection tracking", "NAT")) from None


def disable(netns_name: str | None) -> None:
    """Remove the dormant nat table."""
    _nft(netns_name, f"delete table inet {TABLE}\n", check=False)
    # Before IPv6 NAT the table was `ip`: one left by an older version goes too.
    _nft(netns_name, f"delete table ip {TABLE}\n", check=False)


@dataclass(frozen=True)
class Ipv6Addr:
    """One address of an interface as rtnetlink lists it."""

    addr: bytes
    flags: int


def ipv6_addresses(ifindex: int) -> list[Ipv6Addr]:
    """The interface's IPv6 addresses in its list's order (the calling thread's namespace)."""
    out: list[Ipv6Addr] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                       NETLINK_ROUTE) as s:
        s.settimeout(2.0)
        req = struct.pack("=BBBBI", socket.AF_INET6, 0, 0, 0, ifindex)
        s.send(struct.pack("=IHHII", 16 + len(req), RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP,
                           1, 0) + req)
        while True:
            data = s.recv(65536)
            pos = 0
            while pos + 16 <= len(data):
                length, kind = struct.unpack_from("=IH", data, pos)
                if kind in (NLMSG_DONE, NLMSG_ERROR) or length < 16:
                    return out
                if kind == RTM_NEWADDR:
                    ent = _addr_msg(data[pos + 16:pos + length], ifindex)
                    if ent is not None:
                        out.append(ent)
                pos += (length + 3) & ~3


def _addr_msg(msg: bytes, ifindex: int) -> Ipv6Addr | None:
    """An RTM_NEWADDR payload (ifaddrmsg, then attributes) if it is `ifindex`'s."""
    family, _, flags, _, index = struct.unpack_from("=BBBBI", msg)
    if family != socket.AF_INET6 or index != ifindex:
        return None  # a dump without strict checking lists every interface
    addr = None
    pos = 8
    while pos + 4 <= len(msg):
        alen, atype = struct.unpack_from("=HH", msg, pos)
        if alen < 4:
            break
        value = msg[pos + 4:pos + alen]
        if atype == IFA_ADDRESS:
            addr = value
        elif atype == IFA_FLAGS:
            flags = struct.unpack("=I", value[:4])[0]
        pos += (alen + 3) & ~3
    return Ipv6Addr(addr, flags) if addr is not None and len(addr) == 16 else None


def redirect_ipv6(addrs: list[Ipv6Addr]) -> bytes | None:
    """The address nf_nat_redirect_ipv6 gives a packet to a global destination: the first of
    the list that is not IPv4-mapped and has finished (or skips) duplicate detection."""
    for a in addrs:
        if a.addr[:12] == bytes(10) + b"\xff\xff":
            continue
        if a.flags & IFA_F_TENTATIVE and not a.flags & IFA_F_OPTIMISTIC:
            continue
        return a.addr
    return None


def environment(netns_name: str | None, iface: str | None,
                family: Family = Family.IPV4) -> tuple[dict[int, str], bytes | None]:
    """The namespace's interfaces by ifindex, and `iface`'s address of `family` (REDIRECT's
    target)."""
    ctx = netns.enter(netns_name) if netns_name else contextlib.nullcontext()
    with ctx:
        names = dict(socket.if_nameindex())
        addr = None
        if iface and family is Family.IPV6:
            index = {n: i for i, n in names.items()}.get(iface)
            addr = redirect_ipv6(ipv6_addresses(index)) if index is not None else None
        elif iface:
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
    return environment(netns_name, iface, rs.family)


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
    """Where the nat PREROUTING program finds POSTROUTING's, and POSTROUTING INPUT's (see
    dispatch)."""
    return TailCall(D.GEN_MAP, D.PROGS_MAP, D.GEN_STRIDE,
                    D.slot_id(Family.IPV4, "nat", "POSTROUTING"), D.FAMILY_STRIDE,
                    D.slot_id(Family.IPV4, "nat", "INPUT"))
