"""Set cases: ipset definitions, `-m set` rules and packets with the verdict netfilter gives.

Shared by tests/test_sets.py (pybpfilter's programs through BPF_PROG_TEST_RUN, checked against
the verdicts written here) and tests/test_sets_differential.py (the same against the kernel's
ipset and legacy iptables, which must also give the verdicts written here). Most cases' rules
DROP what matches under an ACCEPT policy: DROP means "in the set".

Addresses are the differential topology's (tests/oracle/addresses.py): packets go from its
sources to the receiver's own addresses, so the kernel delivers them to the tested chain.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from bpfilter.ir.model import Family

from .frames import IpProto, PacketSpec, icmp_bytes, tcp_bytes, udp_bytes

V4, V6 = Family.IPV4, Family.IPV6
A, D = "ACCEPT", "DROP"
SRC = {V4: "192.0.2.1", V6: "2001:db8:a::1"}
DST = {V4: "192.0.2.2", V6: "2001:db8:a::2"}
SCTP, UDPLITE, GRE, NONE = 132, 136, 47, 59


def pkt(fam: Family, proto: int, l4: bytes, *, src: str | None = None, dst: str | None = None,
        cut: int | None = None, **kw) -> PacketSpec:
    """A packet carrying `l4` (cut to `cut` bytes)."""
    return PacketSpec(fam, src or SRC[fam], dst or DST[fam], proto, l4[:cut], **kw)


def udp(fam: Family = V4, dport: int = 53, sport: int = 40000, **kw) -> PacketSpec:
    """A UDP datagram."""
    return pkt(fam, IpProto.UDP, udp_bytes(sport, dport, b"x"), **kw)


def udplite(fam: Family = V4, dport: int = 53, sport: int = 40000, **kw) -> PacketSpec:
    """A UDP-Lite datagram (its header is UDP's; checksum coverage 0 means all)."""
    return pkt(fam, UDPLITE, struct.pack("!HHHH", sport, dport, 0, 0) + b"x", **kw)


def tcp(fam: Family = V4, dport: int = 80, sport: int = 40000, **kw) -> PacketSpec:
    """A TCP SYN."""
    return pkt(fam, IpProto.TCP, tcp_bytes(sport, dport, 0x02), **kw)


def sctp(fam: Family = V4, dport: int = 9, sport: int = 40000, **kw) -> PacketSpec:
    """An SCTP common header (12 bytes) and a little data."""
    return pkt(fam, SCTP, struct.pack("!HHII", sport, dport, 1, 0) + bytes(8), **kw)


def icmp(fam: Family = V4, type_: int = 8, code: int = 0, **kw) -> PacketSpec:
    """An ICMP or ICMPv6 message."""
    proto = IpProto.ICMP if fam is V4 else IpProto.ICMPV6
    return pkt(fam, proto, icmp_bytes(type_, code), **kw)


def other(fam: Family = V4, proto: int = GRE, **kw) -> PacketSpec:
    """A packet of a protocol without ports (GRE by default) and some bytes."""
    return pkt(fam, proto, bytes(16), **kw)


@dataclass(frozen=True)
class SetCase:
    """ipset restore text, rules for the tested chain, packets and netfilter's verdicts."""

    name: str
    sets: str
    rules: tuple[str, ...]
    packets: tuple[tuple[PacketSpec, str], ...]
    family: Family = V4
    table: str = "filter"  # raw: PREROUTING, where IPv4 fragments are seen one by one

    @property
    def chain(self) -> str:
        """The tested built-in chain."""
        return "PREROUTING" if self.table == "raw" else "INPUT"

    def text(self) -> str:
        """iptables-restore text of the tested table."""
        lines = [f"*{self.table}", f":{self.chain} ACCEPT [0:0]",
                 *(f"-A {self.chain} {r}" for r in self.rules), "COMMIT"]
        return "\n".join(lines) + "\n"


def sets(*lines: str) -> str:
    """ipset restore text."""
    return "\n".join(lines) + "\n"


NETS4 = sets("create s hash:net", "add s 192.0.2.0/24", "add s 192.0.2.0/28 nomatch",
             "add s 192.0.2.0/30", "add s 10.0.0.0/8")
PORTS4 = sets("create s hash:ip,port", "add s 192.0.2.2,udp:53", "add s 192.0.2.2,80",
              "add s 192.0.2.2,sctp:9", "add s 192.0.2.2,udplite:7",
              "add s 192.0.2.2,icmp:echo-request", "add s 192.0.2.2,gre:0",
              "add s 192.0.2.3,udp:40000")

CASES = [
    SetCase("hash-ip-src", sets("create s hash:ip", "add s 192.0.2.1", "add s 10.1.2.3"),
            ("-m set --match-set s src -j DROP",),
            ((udp(), D), (udp(src="192.0.2.4"), A), (tcp(src="10.1.2.3"), D),
             (icmp(src="10.1.2.3"), D))),
    SetCase("hash-ip-dst-negated", sets("create s hash:ip", "add s 192.0.2.2"),
            ("-m set ! --match-set s dst -j DROP",),
            ((udp(), A), (udp(dst="192.0.2.3"), D))),
    SetCase("hash-ip-netmask", sets("create s hash:ip netmask 24", "add s 192.0.2.77"),
            ("-m set --match-set s src -j DROP",),
            ((udp(), D), (udp(src="198.51.100.1"), A))),
    SetCase("hash-net-longest-prefix-and-nomatch", NETS4,
            ("-m set --match-set s src -j DROP",),
            ((udp(), D), (udp(src="192.0.2.4"), A), (udp(src="192.0.2.100"), D),
             (udp(src="10.1.2.3"), D), (udp(src="172.16.0.1"), A))),
    SetCase("hash-net-return-nomatch", NETS4,
            ("-m set --match-set s src --return-nomatch -j DROP",),
            ((udp(), A), (udp(src="192.0.2.4"), D), (udp(src="192.0.2.100"), A),
             (udp(src="172.16.0.1"), A))),
    SetCase("hash-net-negated-return-nomatch", NETS4,
            ("-m set ! --match-set s src --return-nomatch -j DROP",),
            ((udp(), D), (udp(src="192.0.2.4"), A), (udp(src="172.16.0.1"), D))),
    SetCase("hash-ip-port-protocols", PORTS4,
            ("-m set --match-set s dst,dst -j DROP",),
            ((udp(), D), (udp(dport=54), A), (tcp(), D), (udp(dport=80), A),
             (tcp(cut=10), A), (tcp(cut=19), A), (sctp(), D), (sctp(cut=10), A),
             (udplite(dport=7), D), (udplite(dport=7, cut=6), A), (icmp(), D),
             (icmp(type_=0), A), (icmp(cut=4), A), (other(), D), (other(proto=50), A),
             (udp(dst="192.0.2.3"), A), (udp(ip_options=b"\x01" * 8), D),
             (tcp(ip_options=b"\x01" * 4, cut=19), A))),
    SetCase("hash-ip-port-source-port", PORTS4,
            ("-m set --match-set s dst,src -j DROP",),
            ((udp(dst="192.0.2.3"), D), (tcp(dst="192.0.2.3"), A), (udp(), A),
             (icmp(), D))),
    SetCase("hash-ip-port-fragments", PORTS4,
            ("-m set --match-set s dst,dst -j DROP",),
            ((udp(frag=(0, True)), D), (udp(frag=(1, False)), A), (udp(frag=(3, True)), A),
             (other(frag=(2, False)), D), (icmp(frag=(1, False)), A), (other(), D)),
            table="raw"),
    SetCase("hash-ip-port-fragments-negated", PORTS4,
            ("-m set ! --match-set s dst,dst -j DROP",),
            ((udp(frag=(1, False)), D), (other(frag=(2, False)), A), (udp(frag=(0, True)), A)),
            table="raw"),
    SetCase("hash-net-port-overlaps", sets(
        "create s hash:net,port", "add s 10.0.0.0/8,tcp:22", "add s 10.1.0.0/16,tcp:22 nomatch",
        "add s 10.1.2.0/24,tcp:22", "add s 192.0.2.0/24,udp:53", "add s 10.1.0.0/16,tcp:23"),
        ("-m set --match-set s src,dst -j DROP",),
        ((tcp(src="10.1.2.3", dport=22), D), (tcp(src="10.1.3.3", dport=22), A),
         (tcp(src="10.9.9.9", dport=22), D), (tcp(src="10.1.3.3", dport=23), D),
         (tcp(src="10.9.9.9", dport=23), A), (udp(), D), (tcp(dport=53), A))),
    SetCase("hash-ip-port-ip", sets("create s hash:ip,port,ip",
                                    "add s 192.0.2.1,udp:53,192.0.2.2"),
            ("-m set --match-set s src,dst,dst -j DROP",),
            ((udp(), D), (udp(dst="192.0.2.3"), A), (udp(src="192.0.2.4"), A))),
    SetCase("fewer-flags-than-dimensions", sets("create s hash:ip,port,ip",
                                               "add s 192.0.2.1,udp:53,192.0.2.2"),
            ("-m set --match-set s src,dst -j DROP", "-m set ! --match-set s src -j DROP"),
            ((udp(), D),)),
    SetCase("more-flags-than-dimensions", sets("create s hash:ip", "add s 192.0.2.1"),
            ("-m set --match-set s src,dst,dst -j DROP",),
            ((udp(), D), (udp(src="192.0.2.4"), A))),
    SetCase("hash-ip-port-net", sets(
        "create s hash:ip,port,net", "add s 192.0.2.2,tcp:80,192.0.2.0/24",
        "add s 192.0.2.2,tcp:80,192.0.2.0/28 nomatch"),
        ("-m set --match-set s dst,dst,src -j DROP",),
        ((tcp(src="192.0.2.100"), D), (tcp(), A), (tcp(src="198.51.100.1"), A),
         (tcp(src="192.0.2.100", dport=81), A))),
    SetCase("return-nomatch-and-counters-without-effect", sets(
        "create s hash:ip", "add s 192.0.2.1"),
        ("-m set --match-set s src --return-nomatch ! --update-counters --packets-gt 5 "
         "! --bytes-eq 0 -j DROP",),
        ((udp(), D), (udp(src="192.0.2.4"), A))),
    SetCase("two-sets-in-one-rule", sets(
        "create a hash:net", "add a 192.0.2.0/24", "create b bitmap:port range 0-1023",
        "add b 53"),
        ("-p udp -m set --match-set a src -m set ! --match-set b dst -j DROP",
         "-m set --match-set b dst -j ACCEPT", "-j DROP"),
        ((udp(), A), (udp(dport=54), D), (tcp(dport=53), A), (udp(src="10.1.2.3", dport=54), D),
         (icmp(), D))),
    SetCase("bitmap-ip", sets("create s bitmap:ip range 192.0.2.0-192.0.2.255",
                              "add s 192.0.2.1", "add s 192.0.2.100"),
            ("-m set --match-set s src -j DROP",),
            ((udp(), D), (udp(src="192.0.2.4"), A), (udp(src="10.1.2.3"), A))),
    SetCase("bitmap-ip-netmask", sets("create s bitmap:ip range 192.0.2.0/24 netmask 26",
                                      "add s 192.0.2.70"),
            ("-m set --match-set s src -j DROP",),
            ((udp(src="192.0.2.100"), D), (udp(), A))),
    SetCase("bitmap-port", sets("create s bitmap:port range 1000-2000", "add s 1500"),
            ("-m set --match-set s dst -j DROP",),
            ((tcp(dport=1500), D), (udp(dport=1500), D), (sctp(dport=1500), A),
             (udplite(dport=1500), A), (tcp(dport=1499), A), (tcp(dport=1500, cut=10), A),
             (udp(sport=1500, dport=9), A))),
    SetCase("bitmap-port-negated-source", sets("create s bitmap:port range 1000-2000",
                                               "add s 1500"),
            ("-m set ! --match-set s src -j DROP",),
            ((udp(sport=1500), A), (udp(), D), (icmp(), D))),
    SetCase("ipv6-hash-ip", sets("create s hash:ip family inet6", "add s 2001:db8:a::1"),
            ("-m set --match-set s src -j DROP",),
            ((udp(V6), D), (udp(V6, src="2001:db8:a::4"), A)), family=V6),
    SetCase("ipv6-hash-ip-netmask", sets("create s hash:ip family inet6 netmask 64",
                                         "add s 2001:db8:a::77"),
            ("-m set --match-set s src -j DROP",),
            ((udp(V6), D), (udp(V6, src="2001:db8:b::1"), A)), family=V6),
    SetCase("ipv6-hash-net-overlaps", sets(
        "create s hash:net family inet6", "add s 2001:db8::/32", "add s 2001:db8:a::/48 nomatch",
        "add s 2001:db8:a::/120"),
        ("-m set --match-set s src -j DROP",),
        ((udp(V6), D), (udp(V6, src="2001:db8:a::ffff"), A), (udp(V6, src="2001:db8:b::1"), D),
         (udp(V6, src="fd42:1::8"), A)), family=V6),
    SetCase("ipv6-hash-ip-port", sets(
        "create s hash:ip,port family inet6", "add s 2001:db8:a::2,udp:53",
        "add s 2001:db8:a::2,icmpv6:echo-request", "add s 2001:db8:a::2,ipv6-nonxt:0",
        "add s 2001:db8:a::2,gre:0", "add s 2001:db8:a::2,tcp:80"),
        ("-m set --match-set s dst,dst -j DROP",),
        ((udp(V6), D), (udp(V6, dport=54), A), (icmp(V6, 128), D), (icmp(V6, 129), A),
         (udp(V6, ext=("hop",)), D), (udp(V6, ext=("hop", "dst")), D),
         (other(V6, proto=NONE, ext=("hop",)), A), (other(V6, proto=NONE), A),
         (udp(V6, frag=(0, True)), D), (udp(V6, frag=(1, False)), A),
         (other(V6, frag=(0, True)), D), (other(V6, frag=(2, False)), A),
         (udp(V6, cut=6), A), (tcp(V6, ext=("ah",)), D), (tcp(V6, cut=12), A),
         (tcp(V6, ext=("routing", "dst")), D)), family=V6),
    SetCase("ipv6-bitmap-port", sets("create s bitmap:port range 0-1024", "add s 53"),
            ("-m set --match-set s dst -j DROP",),
            ((udp(V6), D), (tcp(V6, dport=53), D), (tcp(V6), A)), family=V6),
]
