"""Benchmark frames, built by hand: Ethernet + IPv4 + UDP/TCP, padded to one frame size."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

ETH_P_IP = 0x0800
IPPROTO_TCP, IPPROTO_UDP = 6, 17
TCP_ACK = 0x10
FRAME_LEN = 64  # what baseline.md sends: the smallest Ethernet frame (FCS not counted here)
SRC_MAC = bytes.fromhex("02bb00000001")
DST_MAC = bytes.fromhex("02bb00000002")
SRC_IP = "198.18.0.1"  # RFC 2544 benchmarking range: the sender end of the veth
DST_IP = "198.18.0.2"  # the receiver end


@dataclass(frozen=True)
class Probe:
    """One packet of a shape: where it comes from and goes, and what it should hit."""

    src: str
    dport: int
    proto: int = IPPROTO_UDP
    sport: int = 40000
    dst: str = DST_IP


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def frame(p: Probe, *, src_mac: bytes = SRC_MAC, dst_mac: bytes = DST_MAC,
          size: int = FRAME_LEN) -> bytes:
    """A frame of `size` bytes carrying `p` with valid IPv4 checksum (UDP checksum 0: none)."""
    if p.proto == IPPROTO_UDP:
        l4_len = 8
    elif p.proto == IPPROTO_TCP:
        l4_len = 20
    else:
        raise ValueError(f"protocol {p.proto} not supported")
    payload = max(size - 14 - 20 - l4_len, 0)
    total = 20 + l4_len + payload
    if p.proto == IPPROTO_UDP:
        l4 = struct.pack("!HHHH", p.sport, p.dport, l4_len + payload, 0)
    else:
        # An ACK segment (not a SYN), so `--syn` rules do not take it. The checksum stays 0:
        # nothing before the socket layer checks it, and the ruleset drops the packet first.
        l4 = struct.pack("!HHIIBBHHH", p.sport, p.dport, 1, 1, 5 << 4, TCP_ACK, 65535, 0, 0)
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 1, 0, 64, p.proto, 0,
                      socket.inet_aton(p.src), socket.inet_aton(p.dst))
    hdr = hdr[:10] + struct.pack("!H", _csum(hdr)) + hdr[12:]
    return dst_mac + src_mac + struct.pack("!H", ETH_P_IP) + hdr + l4 + bytes(payload)
