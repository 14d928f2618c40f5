"""Frames of the differential suite, packed by hand from a `PacketSpec`.

The scapy builders of helpers/packets.py make well-formed packets; here any transport header may
be cut short, a fragment may start at any offset, TCP options may be malformed and the IPv6
header chain may hold any extension headers, and the bytes are exactly what the spec says. The
IP header itself is always valid (version, length, checksum): the stack drops anything else
before netfilter sees it. Transport checksums are filled in where the header is whole.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from enum import IntEnum

from bpfilter.ir.model import Family

from .addresses import BCAST_MAC, MCAST_MAC


class EtherType(IntEnum):
    """Ethernet types of the frames built here."""

    IPV4 = 0x0800
    IPV6 = 0x86DD


class IpProto(IntEnum):
    """IP protocol numbers (IPv6 extension headers included)."""

    HOPOPTS = 0
    ICMP = 1
    TCP = 6
    UDP = 17
    ROUTING = 43
    FRAGMENT = 44
    GRE = 47
    AH = 51
    ICMPV6 = 58
    NONE = 59
    DSTOPTS = 60
    SCTP = 132


IPV4_DF, IPV4_MF = 0x4000, 0x2000
IPV6_FRAG_M = 1
EXT_PROTO = {"hop": IpProto.HOPOPTS, "dst": IpProto.DSTOPTS, "routing": IpProto.ROUTING,
             "ah": IpProto.AH}
# Checksum field offsets in the transport headers.
CSUM_AT = {IpProto.TCP: 16, IpProto.UDP: 6, IpProto.ICMP: 2, IpProto.ICMPV6: 2}
TCP_FLAG_BITS = {"F": 0x01, "S": 0x02, "R": 0x04, "P": 0x08, "A": 0x10, "U": 0x20, "E": 0x40,
                 "C": 0x80}


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071)."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def tcp_bytes(sport: int, dport: int, flags: int, options: bytes = b"", *, doff: int | None = None,
              payload: bytes = b"", seq: int = 1, ack: int = 0) -> bytes:
    """A TCP header (options padded with EOL to whole words; `doff` may lie) and payload."""
    opts = options + b"\0" * (-len(options) % 4)
    words = 5 + len(opts) // 4 if doff is None else doff
    return struct.pack("!HHIIBBHHH", sport, dport, seq, ack, words << 4, flags, 512, 0,
                       0) + opts + payload


def udp_bytes(sport: int, dport: int, payload: bytes = b"") -> bytes:
    """A UDP header and payload."""
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def icmp_bytes(type_: int, code: int, rest: bytes = b"\0\0\0\1", payload: bytes = b"") -> bytes:
    """An ICMP or ICMPv6 header (type, code, checksum, four bytes) and payload."""
    return struct.pack("!BBH", type_, code, 0) + rest[:4].ljust(4, b"\0") + payload


def _ext_header(name: str, nh: int) -> bytes:
    if name in ("hop", "dst"):
        return bytes([nh, 0, 1, 4, 0, 0, 0, 0])  # one PadN option filling the 8 bytes
    if name == "routing":
        return bytes([nh, 0, 0, 0, 0, 0, 0, 0])  # type 0, no segments left
    if name == "ah":
        return bytes([nh, 1, 0, 0]) + struct.pack("!II", 1, 1)  # (1 + 2) * 4 = 12 bytes
    raise ValueError(f"unknown extension header {name!r}")


@dataclass(frozen=True)
class PacketSpec:
    """One test packet: network header fields and the transport bytes it carries.

    `l4` is what follows the network headers: a whole transport header and payload, a truncated
    one, or (for a later fragment) any data. `frag` makes it a fragment: (offset in 8-byte
    units, more-fragments). `ext` lists IPv6 extension headers before the transport header (and
    before the fragment header, for a fragment).
    """

    family: Family
    src: str
    dst: str
    proto: int
    l4: bytes
    ttl: int = 64
    tos: int = 0
    ip_id: int = 1
    df: bool = False
    dst_mac: str = "host"  # host, bcast or mcast
    frag: tuple[int, bool] | None = None
    ip_options: bytes = b""
    ext: tuple[str, ...] = ()
    note: str = ""

    @property
    def fragment_offset(self) -> int:
        """The fragment offset in 8-byte units (0 when not a fragment)."""
        return self.frag[0] if self.frag else 0

    def frame(self, src_mac: str, host_mac: str) -> bytes:
        """The Ethernet frame; `host_mac` is the destination of a unicast ("host") frame."""
        mac = {"host": host_mac, "bcast": BCAST_MAC, "mcast": MCAST_MAC[self.family]}
        eth = (bytes.fromhex(mac[self.dst_mac].replace(":", ""))
               + bytes.fromhex(src_mac.replace(":", "")))
        if self.family is Family.IPV4:
            return eth + struct.pack("!H", EtherType.IPV4) + self.ipv4()
        return eth + struct.pack("!H", EtherType.IPV6) + self.ipv6()

    def _l4(self, pseudo: bytes) -> bytes:
        """The transport bytes, with the checksum filled when the header is whole."""
        at = CSUM_AT.get(self.proto)  # type: ignore[call-overload]
        data = self.l4
        if self.frag is not None or at is None or len(data) < at + 2:
            return data
        if self.proto == IpProto.TCP and len(data) < 20:
            return data
        if self.proto == IpProto.UDP and len(data) < 8:
            return data
        data = data[:at] + b"\0\0" + data[at + 2 :]
        if self.proto == IpProto.ICMP:
            pseudo = b""
        c = checksum(pseudo + data)
        if self.proto == IpProto.UDP and c == 0:
            c = 0xFFFF
        return data[:at] + struct.pack("!H", c) + data[at + 2 :]

    def ipv4(self) -> bytes:
        """The IPv4 packet."""
        opts = self.ip_options + b"\0" * (-len(self.ip_options) % 4)
        src, dst = ipaddress.IPv4Address(self.src).packed, ipaddress.IPv4Address(self.dst).packed
        pseudo = src + dst + struct.pack("!BBH", 0, self.proto, len(self.l4))
        l4 = self._l4(pseudo)
        ihl = 5 + len(opts) // 4
        frag = (IPV4_DF if self.df else 0)
        if self.frag:
            frag |= self.frag[0] | (IPV4_MF if self.frag[1] else 0)
        head = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, self.tos, ihl * 4 + len(l4), self.ip_id,
                           frag, self.ttl, self.proto, 0, src, dst) + opts
        head = head[:10] + struct.pack("!H", checksum(head)) + head[12:]
        return head + l4

    def ipv6(self) -> bytes:
        """The IPv6 packet."""
        src, dst = ipaddress.IPv6Address(self.src).packed, ipaddress.IPv6Address(self.dst).packed
        pseudo = src + dst + struct.pack("!I3xB", len(self.l4), self.proto)
        names = list(self.ext) + (["frag"] if self.frag else [])
        nexts = [EXT_PROTO.get(n, IpProto.FRAGMENT) for n in names[1:]] + [self.proto]
        chain = b""
        for name, nh in zip(names, nexts[: len(names)], strict=True):
            if name == "frag":
                assert self.frag is not None
                off = (self.frag[0] << 3) | (IPV6_FRAG_M if self.frag[1] else 0)
                chain += struct.pack("!BBHI", nh, 0, off, self.ip_id)
            else:
                chain += _ext_header(name, nh)
        first = EXT_PROTO.get(names[0], IpProto.FRAGMENT) if names else self.proto
        payload = chain + self._l4(pseudo)
        head = struct.pack("!IHBB16s16s", (6 << 28) | (self.tos << 20), len(payload), first,
                           self.ttl, src, dst)
        return head + payload

    def describe(self) -> str:
        """A one-line summary for reports."""
        bits = [f"{self.family.value} {self.src} -> {self.dst} proto {self.proto}",
                f"l4 {len(self.l4)}B", f"ttl {self.ttl}", f"mac {self.dst_mac}"]
        if self.frag:
            bits.append(f"frag off {self.frag[0]}{' MF' if self.frag[1] else ''}")
        if self.ip_options:
            bits.append(f"ipopts {self.ip_options.hex()}")
        if self.ext:
            bits.append(f"ext {','.join(self.ext)}")
        if self.note:
            bits.append(self.note)
        return "; ".join(bits)
