"""The packet builders of tests/helpers/packets.py produce the frames they promise."""

from __future__ import annotations

from helpers import packets as P
from helpers.traffic import wait_for
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment
from scapy.layers.l2 import ARP, Dot1Q, Ether

from bpfilter import netns as ns_api

V4 = ("10.0.0.1", "10.0.0.2")
V6 = ("fd00::1", "fd00::2")


def ethertype_at(frame: bytes, offset: int) -> int:
    """The 16-bit type field at `offset`."""
    return int.from_bytes(frame[offset : offset + 2], "big")


def test_tcp_v4_flags_and_options():
    frame = P.tcp(*V4, 1234, 443, flags="SA", tcp_options=[("MSS", 1460), ("SAckOK", b"")])
    pkt = Ether(frame)
    assert ethertype_at(frame, 12) == 0x0800
    assert pkt[IP].src == V4[0] and pkt[IP].proto == 6
    assert (pkt[TCP].sport, pkt[TCP].dport, str(pkt[TCP].flags)) == (1234, 443, "SA")
    assert ("MSS", 1460) in pkt[TCP].options
    assert pkt[TCP].dataofs > 5


def test_udp_v6_with_payload():
    pkt = Ether(P.udp(*V6, 5000, 53, payload=b"hello"))
    assert pkt[IPv6].nh == 17 and pkt[IPv6].dst == V6[1]
    assert pkt[UDP].dport == 53 and bytes(pkt[UDP].payload) == b"hello"


def test_icmp_types():
    assert Ether(P.icmp(*V4))[ICMP].type == 8
    p4 = Ether(P.icmp(*V4, type=3, code=13))[ICMP]
    assert (p4.type, p4.code) == (3, 13)
    f6 = P.icmp(*V6, type=1, code=4)
    assert Ether(f6)[IPv6].nh == 58
    assert f6[54:56] == bytes([1, 4])  # type and code right after the 40-byte IPv6 header
    assert len(f6) == 14 + 40 + 8  # a full ICMPv6 header
    assert Ether(P.icmp(*V6, echo_id=7))[IPv6].payload.id == 7


def test_ipv4_options_and_header_fields():
    pkt = Ether(P.udp(*V4, ip_options=b"\x94\x04\x00\x00", ttl=3, tos=0x10, df=True))
    assert pkt[IP].ihl == 6  # 4 bytes of router-alert option
    assert (pkt[IP].ttl, pkt[IP].tos, str(pkt[IP].flags)) == (3, 0x10, "DF")


def test_ipv6_extension_header_chain():
    frame = P.tcp(*V6, ext=("hop", "dst", "routing"))
    ip6 = Ether(frame)[IPv6]
    chain = [ip6.nh]
    layer = ip6.payload
    while hasattr(layer, "nh"):
        chain.append(layer.nh)
        layer = layer.payload
    assert chain == [0, 60, 43, 6]  # hop-by-hop -> destination -> routing -> TCP


def test_vlan_tags():
    one = P.udp(*V4, vlan=100)
    assert ethertype_at(one, 12) == P.ETH_P_8021Q and Ether(one)[Dot1Q].vlan == 100
    assert ethertype_at(one, 16) == 0x0800
    qinq = P.icmp(*V6, vlan=[10, 20])
    assert ethertype_at(qinq, 12) == P.ETH_P_8021AD
    assert ethertype_at(qinq, 16) == P.ETH_P_8021Q
    assert int.from_bytes(qinq[18:20], "big") & 0xFFF == 20
    assert ethertype_at(qinq, 20) == 0x86DD


def test_ipv4_fragments_cover_the_datagram():
    frame = P.udp(*V4, payload=bytes(range(256)) * 4, vlan=7)
    frags = P.fragments(frame, 256)
    assert len(frags) > 3
    ips = [Ether(f)[IP] for f in frags]
    assert all(Ether(f)[Dot1Q].vlan == 7 for f in frags)
    assert [ip.frag * 8 for ip in ips] == sorted(ip.frag * 8 for ip in ips)
    assert all(str(ip.flags) == "MF" for ip in ips[:-1]) and not ips[-1].flags.MF
    original = bytes(Ether(frame)[IP].payload)
    assert b"".join(bytes(ip.payload) for ip in ips) == original


def test_ipv6_fragments_have_fragment_headers():
    frame = P.udp(*V6, payload=bytes(1500), ext=("hop",))
    frags = P.fragments(frame, 600)
    assert len(frags) >= 3
    for f in frags:
        pkt = Ether(f)
        assert IPv6ExtHdrFragment in pkt
        assert pkt[IPv6].nh == 0  # hop-by-hop stays in front of the fragment header
        assert pkt[IPv6].plen == len(f) - 14 - 40
    hdrs = [Ether(f)[IPv6ExtHdrFragment] for f in frags]
    offsets = [h.offset for h in hdrs]
    assert offsets[0] == 0 and offsets == sorted(offsets)
    assert [h.m for h in hdrs] == [1] * (len(hdrs) - 1) + [0]
    assert hdrs[0].nh == 17 and len({h.id for h in hdrs}) == 1
    original = bytes(Ether(frame)[IPv6].payload.payload)  # UDP header and data
    assert b"".join(bytes(h.payload) for h in hdrs) == original


def test_raw_and_arp_frames():
    frame = P.raw(0x88B5, b"\x01\x02", vlan=5)
    assert len(frame) == 60
    assert ethertype_at(frame, 12) == P.ETH_P_8021Q and ethertype_at(frame, 16) == 0x88B5
    assert frame[18:20] == b"\x01\x02"
    arp = Ether(P.arp_request("10.0.0.1", "10.0.0.2"))
    assert arp.dst == "ff:ff:ff:ff:ff:ff"
    assert (arp[ARP].op, arp[ARP].pdst) == (1, "10.0.0.2")


def snmp(ns: str) -> dict[str, int]:
    """The receiving stack's SNMP counters (IPv4 as `Proto.Name`, IPv6 as in snmp6)."""
    with ns_api.enter(ns):
        # thread-self: /proc/self/net would follow the main thread's namespace.
        with open("/proc/thread-self/net/snmp") as f:
            lines = f.read().splitlines()
        with open("/proc/thread-self/net/snmp6") as f:
            v6 = f.read().splitlines()
    out: dict[str, int] = {}
    for head, vals in zip(lines[::2], lines[1::2], strict=True):
        proto, names = head.split(":", 1)
        out.update({f"{proto}.{n}": int(v) for n, v in
                    zip(names.split(), vals.split(":", 1)[1].split(), strict=True)})
    out.update({k: int(v) for k, v in (line.split() for line in v6)})
    return out


def test_kernel_accepts_built_frames(topology):
    """Checksums and lengths are right: the receiver's stack answers what the builders make."""
    s, r = topology.sender, topology.receiver
    l2 = {"src_mac": s.mac, "dst_mac": r.mac}
    before = snmp(r.ns)
    frames = [P.icmp(s.ip4, r.ip4, **l2) for _ in range(3)]
    frames += [P.icmp(s.ip6, r.ip6, **l2) for _ in range(3)]
    frames += [P.tcp(s.ip4, r.ip4, 40000 + i, 9, flags="S", **l2) for i in range(2)]
    frames += P.fragments(P.udp(s.ip4, r.ip4, 40000, 9, payload=bytes(1000), **l2), 400)
    P.send_frames(s.ns, s.ifname, frames)

    def delta(key: str) -> int:
        return snmp(r.ns)[key] - before[key]

    assert wait_for(lambda: delta("Icmp.InEchos") == 3 and delta("Icmp6InEchos") == 3
                    and delta("Tcp.InSegs") == 2 and delta("Ip.ReasmOKs") == 1)
    assert delta("Icmp.InCsumErrors") == delta("Tcp.InCsumErrors") == 0
