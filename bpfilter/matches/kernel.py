"""Kernel constants the match and target entries need (UAPI values, named)."""

from __future__ import annotations

from enum import IntEnum, IntFlag


class IpProto(IntEnum):
    """IP protocol numbers (IPPROTO_*) the entries refer to."""

    ICMP = 1
    TCP = 6
    UDP = 17
    DCCP = 33
    ESP = 50
    AH = 51
    ICMPV6 = 58
    SCTP = 132
    UDPLITE = 136


class PacketType(IntEnum):
    """skb->pkt_type (PACKET_* in linux/if_packet.h)."""

    HOST = 0
    BROADCAST = 1
    MULTICAST = 2
    OTHERHOST = 3
    OUTGOING = 4
    LOOPBACK = 5


class RouteType(IntEnum):
    """Route types (RTN_* in linux/rtnetlink.h); xt_addrtype tests bit (1 << type)."""

    UNSPEC = 0
    UNICAST = 1
    LOCAL = 2
    BROADCAST = 3
    ANYCAST = 4
    MULTICAST = 5
    BLACKHOLE = 6
    UNREACHABLE = 7
    PROHIBIT = 8
    THROW = 9
    NAT = 10
    XRESOLVE = 11


class CtState(IntFlag):
    """xt_conntrack / xt_state state bits (XT_CONNTRACK_STATE_BIT and friends)."""

    INVALID = 1 << 0
    ESTABLISHED = 1 << 1
    RELATED = 1 << 2
    NEW = 1 << 3
    UNTRACKED = 1 << 8
    SNAT = 1 << 6
    DNAT = 1 << 7


class CtStatus(IntFlag):
    """Conntrack status bits (IPS_*) that --ctstatus names."""

    EXPECTED = 1 << 0
    SEEN_REPLY = 1 << 1
    ASSURED = 1 << 2
    CONFIRMED = 1 << 3
