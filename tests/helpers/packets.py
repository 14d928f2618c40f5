"""Test frames built with scapy, returned as bytes, and a raw sender for a test namespace.

Every builder takes the same link-layer keywords (`src_mac`, `dst_mac`, `vlan`) and network-layer
keywords (`ttl`, `tos`, `ip_id`, `df`, `ip_options` for IPv4, `ext` for IPv6); the address family
follows the addresses given.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Sequence

from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption, fragment
from scapy.layers.inet6 import (
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6Unknown,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
    fragment6,
)
from scapy.layers.l2 import ARP, Dot1AD, Dot1Q, Ether
from scapy.packet import Packet, Raw

from bpfilter import netns

SRC_MAC = "02:00:00:00:00:01"
DST_MAC = "02:00:00:00:00:02"
ETH_P_8021Q, ETH_P_8021AD = 0x8100, 0x88A8

# IPv6 extension headers by short name, in the order RFC 8200 recommends.
EXT_HEADERS = {
    "hop": IPv6ExtHdrHopByHop,
    "dst": IPv6ExtHdrDestOpt,
    "routing": IPv6ExtHdrRouting,
    "frag": IPv6ExtHdrFragment,
}

IPV6_NH_FRAGMENT = 44
ICMP_ECHO_REQUEST = 8
ICMPV6_ECHO_REQUEST = 128
ICMPV6_ECHO_REPLY = 129


def is_v6(addr: str) -> bool:
    """True for an IPv6 address."""
    return ipaddress.ip_address(addr).version == 6


def _tags(vlan: int | Sequence[int] | None) -> list[int]:
    return [vlan] if isinstance(vlan, int) else list(vlan or ())


def _l2(inner: Packet, src_mac: str, dst_mac: str, vlan: int | Sequence[int] | None) -> Packet:
    tags = _tags(vlan)
    head: Packet = Ether(src=src_mac, dst=dst_mac)
    for n, vid in enumerate(tags):
        # QinQ: the outer tag is 802.1ad, the inner ones 802.1Q.
        outer = n == 0 and len(tags) > 1
        head = head / (Dot1AD(vlan=vid) if outer else Dot1Q(vlan=vid))
    return head / inner


def _l3(src: str, dst: str, *, ttl: int, tos: int, ip_id: int, df: bool,
        ip_options: bytes | None, ext: Sequence[str]) -> Packet:
    if is_v6(src) != is_v6(dst):
        raise ValueError(f"mixed address families: {src} -> {dst}")
    if is_v6(src):
        if ip_options:
            raise ValueError("ip_options is IPv4 only; use ext for IPv6")
        pkt: Packet = IPv6(src=src, dst=dst, hlim=ttl, tc=tos)
        for name in ext:
            pkt = pkt / EXT_HEADERS[name]()
        return pkt
    if ext:
        raise ValueError("ext is IPv6 only; use ip_options for IPv4")
    opts = [IPOption(ip_options)] if ip_options else []
    return IP(src=src, dst=dst, ttl=ttl, tos=tos, id=ip_id, flags="DF" if df else 0,
              options=opts)


def build(l4: Packet | None, src: str, dst: str, *, src_mac: str = SRC_MAC,
          dst_mac: str = DST_MAC, vlan: int | Sequence[int] | None = None, ttl: int = 64,
          tos: int = 0, ip_id: int = 1, df: bool = False, ip_options: bytes | None = None,
          ext: Sequence[str] = (), payload: bytes = b"") -> bytes:
    """An Ethernet frame carrying `l4` (any scapy layer, or nothing) over IPv4 or IPv6."""
    pkt = _l3(src, dst, ttl=ttl, tos=tos, ip_id=ip_id, df=df, ip_options=ip_options, ext=ext)
    if l4 is not None:
        pkt = pkt / l4
    if payload:
        pkt = pkt / Raw(payload)
    return bytes(_l2(pkt, src_mac, dst_mac, vlan))


def tcp(src: str, dst: str, sport: int = 40000, dport: int = 80, *, flags: str = "S",
        seq: int = 1, ack: int = 0, tcp_options: Sequence[tuple] = (), **kw) -> bytes:
    """A TCP segment; `flags` in scapy letters ("S", "SA", "FPU"...), options as scapy tuples."""
    return build(TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack,
                     options=list(tcp_options)), src, dst, **kw)


def udp(src: str, dst: str, sport: int = 40000, dport: int = 53, **kw) -> bytes:
    """A UDP datagram."""
    return build(UDP(sport=sport, dport=dport), src, dst, **kw)


def icmp(src: str, dst: str, *, type: int | None = None, code: int = 0, echo_id: int = 1,
         echo_seq: int = 1, **kw) -> bytes:
    """An ICMP (IPv4) or ICMPv6 message; the default type is an echo request.

    Echo messages carry `echo_id`/`echo_seq`; other types four zero bytes of rest-of-header.
    """
    if is_v6(src):
        t = ICMPV6_ECHO_REQUEST if type is None else type
        if t in (ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY):
            cls = ICMPv6EchoRequest if t == ICMPV6_ECHO_REQUEST else ICMPv6EchoReply
            return build(cls(code=code, id=echo_id, seq=echo_seq), src, dst, **kw)
        return build(ICMPv6Unknown(type=t, code=code, msgbody=bytes(4)), src, dst, **kw)
    t = ICMP_ECHO_REQUEST if type is None else type
    return build(ICMP(type=t, code=code, id=echo_id, seq=echo_seq), src, dst, **kw)


def fragments(frame: bytes, size: int) -> list[bytes]:
    """Split the IP packet in `frame` into fragments of at most `size` payload bytes (IPv4) or
    `size` bytes of fragment (IPv6), each in a frame with the original link-layer header."""
    eth = Ether(frame)
    ip_layer = eth.getlayer(IP) or eth.getlayer(IPv6)
    if ip_layer is None:
        raise ValueError("frame carries no IP packet")
    # Everything before the IP header (Ether and any VLAN tags) is reused for each fragment.
    head = eth.copy()
    head.getlayer(type(ip_layer)).underlayer.remove_payload()
    if isinstance(ip_layer, IP):
        pieces = fragment(ip_layer.copy(), fragsize=size)
    else:
        pkt = ip_layer.copy()
        if IPv6ExtHdrFragment not in pkt:
            pkt = _insert_frag_header(pkt)
        pieces = fragment6(pkt, size)
    return [bytes(head.copy() / p) for p in pieces]


def _insert_frag_header(pkt: Packet) -> Packet:
    # The fragment header goes after the per-fragment headers (hop-by-hop, routing).
    layer = pkt
    while isinstance(layer.payload, IPv6ExtHdrHopByHop | IPv6ExtHdrRouting):
        layer = layer.payload
    rest = layer.payload
    layer.remove_payload()
    # The values parsed from bytes are explicit now: relink the chain by hand.
    layer.add_payload(IPv6ExtHdrFragment(nh=layer.nh) / rest)
    layer.nh = IPV6_NH_FRAGMENT
    pkt.plen = None
    return pkt


def raw(ethertype: int, payload: bytes = b"", *, src_mac: str = SRC_MAC, dst_mac: str = DST_MAC,
        vlan: int | Sequence[int] | None = None) -> bytes:
    """A non-IP frame of `ethertype` with `payload` (padded to the 60-byte Ethernet minimum)."""
    tags = _tags(vlan)
    head = bytes.fromhex(dst_mac.replace(":", "")) + bytes.fromhex(src_mac.replace(":", ""))
    for n, vid in enumerate(tags):
        tpid = ETH_P_8021AD if n == 0 and len(tags) > 1 else ETH_P_8021Q
        head += tpid.to_bytes(2, "big") + vid.to_bytes(2, "big")
    return (head + ethertype.to_bytes(2, "big") + payload).ljust(60, b"\0")


def arp_request(sender_ip: str, target_ip: str, *, src_mac: str = SRC_MAC,
                vlan: int | Sequence[int] | None = None) -> bytes:
    """A broadcast ARP who-has."""
    return bytes(_l2(ARP(op=1, hwsrc=src_mac, psrc=sender_ip, pdst=target_ip), src_mac,
                     "ff:ff:ff:ff:ff:ff", vlan))


def send_frames(ns: str, ifname: str, frames: Iterable[bytes]) -> int:
    """Transmit raw frames out of `ifname` in namespace `ns`; returns how many were sent."""
    # The socket belongs to the namespace it is created in, and stays bound there after we leave.
    with netns.enter(ns):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    with sock:
        sock.bind((ifname, 0))
        n = 0
        for frame in frames:
            sock.send(frame)
            n += 1
    return n
