"""Named sets: what `ipset` calls a set (and nftables a named set), as rules reference them.

A set has a type (how its members are shaped: one value per *dimension*, each an address, a
network or a protocol and port), a family, a few creation options, and members. Rules refer to
it by name; the compiler needs only the definition (`SetDef`), the members live in a map that
can change while the programs run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from .model import Family, Origin


class Dim(StrEnum):
    """One dimension of a set's members."""

    IP = "ip"  # an address (hash:ip may store it masked to `netmask`)
    NET = "net"  # an address prefix (ipset's hash:net: longest prefix wins)
    PORT = "port"  # a transport protocol and port (ICMP: type and code)


@dataclass(frozen=True)
class SetType:
    """An ipset type: its name and dimensions; bitmap types hold a range instead of a family."""

    name: str
    dims: tuple[Dim, ...]
    bitmap: bool = False

    @property
    def has_net(self) -> bool:
        """True when a dimension is a network (members may be flagged `nomatch`)."""
        return Dim.NET in self.dims

    @property
    def port_only(self) -> bool:
        """bitmap:port: ports without a protocol (only TCP and UDP packets have them)."""
        return self.bitmap and self.dims == (Dim.PORT,)


SET_TYPES: dict[str, SetType] = {t.name: t for t in (
    SetType("hash:ip", (Dim.IP,)),
    SetType("hash:net", (Dim.NET,)),
    SetType("hash:ip,port", (Dim.IP, Dim.PORT)),
    SetType("hash:net,port", (Dim.NET, Dim.PORT)),
    SetType("hash:ip,port,ip", (Dim.IP, Dim.PORT, Dim.IP)),
    SetType("hash:ip,port,net", (Dim.IP, Dim.PORT, Dim.NET)),
    SetType("bitmap:ip", (Dim.IP,), bitmap=True),
    SetType("bitmap:port", (Dim.PORT,), bitmap=True),
)}

# ipset types this implementation refuses, and why.
_NO_MAC = "MAC addresses are not looked up by the compiler"
REFUSED_TYPES: dict[str, str] = {
    "hash:mac": _NO_MAC,
    "hash:ip,mac": _NO_MAC,
    "bitmap:ip,mac": _NO_MAC,
    "hash:ip,mark": "packet marks are not a set dimension here",
    "hash:net,iface": "interface names are not a set dimension here",
    "hash:net,net": "two network dimensions need one lookup per pair of prefix lengths "
                    "(one LPM trie answers one prefix)",
    "hash:net,port,net": "two network dimensions need one lookup per pair of prefix lengths "
                         "(one LPM trie answers one prefix)",
    "list:set": "sets of sets are not supported",
}

DEFAULT_HASHSIZE = 1024
DEFAULT_MAXELEM = 65536
MAX_NAME = 31  # IPSET_MAXNAMELEN - 1
PORT_PROTOS = (6, 17, 132, 136)  # TCP, UDP, SCTP, UDP-Lite: members carry a real port
ICMP, ICMPV6 = 1, 58


@dataclass(frozen=True)
class SetDef:
    """What a set is, without its members: what rules and maps depend on."""

    name: str
    type: SetType
    family: Family | None  # None: bitmap:port, usable from both families
    maxelem: int = DEFAULT_MAXELEM
    hashsize: int = DEFAULT_HASHSIZE
    netmask: int | None = None  # hash:ip, bitmap:ip: addresses are stored masked to this
    range: tuple[int, int] | None = None  # bitmap types: first and last address or port

    @property
    def addr_len(self) -> int:
        """Bytes of an address dimension (4 for family-less bitmap:port, which has none)."""
        return 16 if self.family is Family.IPV6 else 4

    def fits(self, family: Family) -> bool:
        """True when rules of `family` may use the set (libxt_set's family check)."""
        return self.family is None or self.family is family

    def capacity(self) -> int:
        """How many members the set can hold."""
        if self.range is not None:
            lo, hi = self.range
            step = 1 << (8 * self.addr_len - self.netmask) if self.netmask is not None else 1
            return (hi - lo) // step + 1
        return self.maxelem


# One member's value per dimension: IP -> address bytes, NET -> (address bytes, prefix
# length), PORT -> (protocol, port); bitmap:port uses protocol 0.
Part = bytes | tuple[bytes, int] | tuple[int, int]
Parts = tuple[Part, ...]


@dataclass
class IpSet:
    """A set with its members (insertion order kept); members map to their `nomatch` flag."""

    definition: SetDef
    members: dict[Parts, bool] = field(default_factory=dict)
    origin: Origin | None = field(default=None, compare=False)
    # True when a restore replaces the members instead of adding them to the loaded ones (an
    # nftables ruleset states whole sets; an ipset file adds, as `ipset restore -exist`).
    replace: bool = field(default=False, compare=False)

    @property
    def name(self) -> str:
        """The set's name."""
        return self.definition.name

    def add(self, parts: Parts, nomatch: bool = False) -> None:
        """Add a member (an existing one takes the new `nomatch` flag)."""
        self.members[parts] = nomatch

    def remove(self, parts: Parts) -> bool:
        """Remove a member; False when it was not there."""
        return self.members.pop(parts, None) is not None
