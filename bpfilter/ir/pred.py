"""Predicates over packet fields: what a match reads, in a form code generation is generic over.

A matcher entry lowers its parameters to a `Pred`. The compiler knows how to read each `Field`
(where the packet parser left it, its width and byte order) and how to test each predicate form;
adding a match therefore means declaring which fields it reads and how it compares them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from .sets import SetDef
from .state import Connlimit, HashLimit, Recent


class Order(Enum):
    """How a field's bytes are stored."""

    NET = "net"  # big endian, as on the wire
    HOST = "host"  # little endian (x86_64)
    BYTES = "bytes"  # a byte string compared as is (addresses, names)


class Field(Enum):
    """Packet and metadata fields a predicate may read: (id, width in bytes, byte order).

    The id keeps members with the same shape distinct (Enum would make them aliases).
    """

    SADDR4 = (1, 4, Order.BYTES)
    DADDR4 = (2, 4, Order.BYTES)
    SADDR6 = (3, 16, Order.BYTES)
    DADDR6 = (4, 16, Order.BYTES)
    L4PROTO = (5, 1, Order.HOST)  # transport protocol after IPv6 extension headers
    FRAGOFF = (6, 2, Order.HOST)  # IPv4: fragment offset in 8-byte units; IPv6: in bytes; 0: first
    IPLEN = (7, 2, Order.HOST)  # IPv4 total length, IPv6 payload length + 40
    TTL = (8, 1, Order.HOST)  # IPv4 TTL or IPv6 hop limit
    TOS = (9, 1, Order.HOST)  # IPv4 TOS or IPv6 traffic class
    SPORT = (10, 2, Order.NET)
    DPORT = (11, 2, Order.NET)
    TCPFLAGS = (12, 1, Order.HOST)  # byte 13 of the TCP header
    TCPDOFF = (13, 1, Order.HOST)  # data offset in 32-bit words
    ICMPTYPE = (14, 1, Order.HOST)
    ICMPCODE = (15, 1, Order.HOST)
    IIFNAME = (16, 16, Order.BYTES)
    OIFNAME = (17, 16, Order.BYTES)
    MARK = (18, 4, Order.HOST)
    PKTTYPE = (19, 1, Order.HOST)
    SMAC = (20, 6, Order.BYTES)
    # Connection tracking (the kernel's conntrack entry of the packet, where the hook has one).
    CTSTATE = (21, 2, Order.HOST)  # xt_state's state bit (INVALID, ESTABLISHED, ... UNTRACKED)
    CTBITS = (22, 2, Order.HOST)  # xt_conntrack's: the state bit plus SNAT/DNAT bits
    CTHAS = (23, 1, Order.HOST)  # 1 when the packet has a conntrack entry
    CTDIR = (24, 1, Order.HOST)  # 0 original, 1 reply
    CTPROTO = (25, 1, Order.HOST)
    CTSTATUS = (26, 4, Order.HOST)  # IPS_* bits
    CTORIGSRC = (27, 16, Order.BYTES)  # IPv4 in the first 4 bytes
    CTORIGDST = (28, 16, Order.BYTES)
    CTREPLSRC = (29, 16, Order.BYTES)
    CTREPLDST = (30, 16, Order.BYTES)
    CTORIGSPORT = (31, 2, Order.NET)
    CTORIGDPORT = (32, 2, Order.NET)
    CTREPLSPORT = (33, 2, Order.NET)
    CTREPLDPORT = (34, 2, Order.NET)
    # Netfilter hooks only: the packet's route and socket (see hooks/nf.py).
    # xt_addrtype's type bits of the destination / source: 1 << RTN_* (IPv4), the LOCAL and
    # ANYCAST bits of a route lookup (IPv6); see compiler/hooks/localtable.py.
    RTDST = (35, 2, Order.HOST)
    OWNSTATE = (36, 1, Order.HOST)  # 0 no socket, 1 socket without a file, 2 with one
    OWNUID = (37, 4, Order.HOST)  # the socket file's fsuid (xt_owner's uid)
    OWNGID = (38, 4, Order.HOST)  # its fsgid
    # The first IPv6 routing header (ip6t_rt's view; filled by the parser when read).
    RHSTATE = (39, 1, Order.HOST)  # 0 absent, 1 read, 2 unreadable, 3 longer than the packet
    RHTYPE = (40, 1, Order.HOST)
    RHSEGS = (41, 1, Order.HOST)  # segments left
    RHLEN = (42, 1, Order.HOST)  # header length in 8-byte units, not counting the first 8
    RHRES = (43, 4, Order.HOST)  # type 0: the reserved word (valid when its read succeeded)
    RTSRC = (60, 2, Order.HOST)  # the source's address type bits, as RTDST
    # --limit-iface-in/out: the local table's type bits, bit 15 set when the route's device (an
    # IPv6 address's device) is the packet's input device, bit 14 its output device.
    RTSRCDEV = (61, 2, Order.HOST)
    RTDSTDEV = (62, 2, Order.HOST)

    def __init__(self, ident: int, width: int, order: Order) -> None:
        # Plain attributes: the classifier reads them millions of times on big rulesets.
        self.ident = ident
        self.width = width
        self.order = order

    def __hash__(self) -> int:
        return self.ident


CT_FIELDS = frozenset(f for f in Field if f.name.startswith("CT"))
RH_FIELDS = frozenset(f for f in Field if f.name.startswith("RH"))
OWNER_FIELDS = frozenset({Field.OWNSTATE, Field.OWNUID, Field.OWNGID})


class L4(Enum):
    """How much of the transport header a match needs (netfilter drops the packet when absent)."""

    PORTS = 4  # multiport reads only the two ports
    SMALL = 8  # udp, icmp, icmpv6 headers
    TCP = 20  # a whole TCP header


@dataclass(frozen=True)
class Cmp:
    """(field & mask) == value; `value`/`mask` are ints for numeric fields, bytes for BYTES ones."""

    field: Field
    value: int | bytes
    mask: int | bytes | None = None


@dataclass(frozen=True)
class Range:
    """lo <= field <= hi (numeric fields compared as numbers; BYTES fields as big-endian
    unsigned numbers, e.g. addresses for iprange)."""

    field: Field
    lo: int
    hi: int


@dataclass(frozen=True)
class Not:
    """Negation."""

    pred: Pred


@dataclass(frozen=True)
class AnyOf:
    """Disjunction (empty: false)."""

    preds: tuple[Pred, ...]


@dataclass(frozen=True)
class AllOf:
    """Conjunction (empty: true)."""

    preds: tuple[Pred, ...]


@dataclass(frozen=True)
class Const:
    """A predicate known when compiling."""

    value: bool


@dataclass(frozen=True)
class NonFirstFragment:
    """The packet is a fragment other than the first (it carries no transport header)."""


@dataclass(frozen=True)
class TransportHeader:
    """Netfilter's guard of transport matches: false on a non-first fragment, and a *hotdrop*
    (the packet is dropped at once) when the header is shorter than `need`; with `evil_frag`,
    an IPv4 fragment at offset 1 (8 bytes) is hotdropped too, as xt_tcpudp does for TCP."""

    need: L4
    evil_frag: bool = False


@dataclass(frozen=True)
class Proto:
    """Transport protocol test as the built-in `-p` does it (IPv6: after extension headers;
    an unparsable IPv6 header chain is hotdropped when it is not a later fragment)."""

    proto: int
    negate: bool = False


@dataclass(frozen=True)
class TcpOption:
    """The TCP header carries option `kind` (a scan of the options, as xt_tcpudp does it; a data
    offset below 5 words or unreadable options are hotdropped)."""

    kind: int


@dataclass(frozen=True)
class EtherHeader:
    """The packet carries an Ethernet header: its device is ARPHRD_ETHER and the MAC header lies
    in front of the network header (xt_mac's precondition; false otherwise, even when negated)."""


@dataclass(frozen=True)
class RoutingHeader:
    """ip6t_rt's guard: the packet has an IPv6 routing header (false when absent or longer
    than the packet, a hotdrop when the header chain up to it cannot be read); with
    `reserved`, its type 0 reserved word is zero (a hotdrop when unreadable)."""

    reserved: bool = False


@dataclass(frozen=True)
class RateLimit:
    """A token bucket (xt_limit): true while tokens remain, taking one. One token every
    `interval_ns`, at most `burst` stored. `key` names the rule it belongs to: each rule has its
    own bucket, shared by every program that contains the rule."""

    interval_ns: int
    burst: int
    key: tuple = ()


@dataclass(frozen=True)
class SetLookup:
    """xt_set: the packet's member of set `definition` (per dimension an address, network or
    protocol and port, from the source where `src[i]`, else the destination) is stored there,
    and is not a `nomatch` member (with `return_nomatch`: is one). A packet without the ports
    a dimension needs (ip_set_get_ip_port's cases) is not in the set; nothing hotdrops."""

    definition: SetDef
    src: tuple[bool, ...]
    return_nomatch: bool = False


Pred = (Cmp | Range | Not | AnyOf | AllOf | Const | NonFirstFragment | TransportHeader | Proto
        | TcpOption | EtherHeader | RateLimit | SetLookup | HashLimit | Recent | Connlimit
        | RoutingHeader)


def all_of(*preds: Pred) -> Pred:
    """A conjunction, flattened and without trivially true parts."""
    out: list[Pred] = []
    for p in preds:
        if isinstance(p, AllOf):
            out.extend(p.preds)
        elif type(p) is Const:
            if p.value:
                continue
            # What came before still runs in netfilter (a hotdrop there drops the packet).
            if not out:
                return p
            return AllOf((*out, p))
        else:
            out.append(p)
    return out[0] if len(out) == 1 else AllOf(tuple(out))


def any_of(*preds: Pred) -> Pred:
    """A disjunction, flattened and without trivially false parts."""
    out: list[Pred] = []
    for p in preds:
        if isinstance(p, AnyOf):
            out.extend(p.preds)
        elif type(p) is Const:
            if not p.value:
                continue
            return p
        else:
            out.append(p)
    if not out:
        return Const(False)
    return out[0] if len(out) == 1 else AnyOf(tuple(out))


def negate(pred: Pred, invert: bool = True) -> Pred:
    """`pred` negated when `invert` (double negations cancel)."""
    if not invert:
        return pred
    if isinstance(pred, Not):
        return pred.pred
    if isinstance(pred, Const):
        return Const(not pred.value)
    return Not(pred)


def fields_of(pred: Pred) -> set[Field]:
    """Every field `pred` reads."""
    if isinstance(pred, Cmp | Range):
        return {pred.field}
    if isinstance(pred, RoutingHeader):
        return {Field.RHSTATE}
    if isinstance(pred, Connlimit):  # the packet's own connection: the CT area's tuple
        return {Field.CTHAS, Field.CTPROTO, Field.CTORIGSRC, Field.CTORIGDST,
                Field.CTORIGSPORT, Field.CTORIGDPORT}
    if isinstance(pred, Not):
        return fields_of(pred.pred)
    if isinstance(pred, AnyOf | AllOf):
        out: set[Field] = set()
        for p in pred.preds:
            out |= fields_of(p)
        return out
    return set()
