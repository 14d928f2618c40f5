"""The fixed names and addresses of the differential topology, and which sources are deliverable.

Everything is fixed (documentation ranges, living only inside the test namespaces) so that a
ruleset and packet drawn once reproduce in any later run, whatever the topology's own names.
"""

from __future__ import annotations

import ipaddress

from bpfilter.ir.model import Family

# The receiver's interface, renamed inside its own namespace.
RX_IFNAME = "bfrx0"

# The receiver's addresses, with their prefix lengths.
RX_NETS = {
    Family.IPV4: ("192.0.2.2/24", "192.0.2.3/24", "198.51.100.130/25", "203.0.113.9/24"),
    Family.IPV6: ("2001:db8:a::2/64", "2001:db8:a::3/64", "2001:db8:b::8002/64", "fd42:1::9/64"),
}
RX_ADDRS = {fam: tuple(n.split("/")[0] for n in nets) for fam, nets in RX_NETS.items()}

# Destinations the receiver delivers locally besides its own addresses, and the link-layer
# destination they go with.
BROADCASTS = ("192.0.2.255", "255.255.255.255", "198.51.100.255")
MULTICASTS = {Family.IPV4: ("224.0.0.1",), Family.IPV6: ("ff02::1",)}
BCAST_MAC = "ff:ff:ff:ff:ff:ff"
MCAST_MAC = {Family.IPV4: "01:00:5e:00:00:01", Family.IPV6: "33:33:00:00:00:01"}

# Sources: other hosts on the receiver's subnets and further away.
SOURCES = {
    Family.IPV4: ("192.0.2.1", "192.0.2.4", "192.0.2.100", "192.0.2.254", "198.51.100.129",
                  "198.51.100.131", "198.51.100.1", "203.0.113.8", "203.0.113.10", "10.1.2.3",
                  "172.16.0.1", "100.64.0.1", "192.168.1.1"),
    Family.IPV6: ("2001:db8:a::1", "2001:db8:a::4", "2001:db8:a::100", "2001:db8:b::1",
                  "2001:db8:b::8001", "2001:db8:c::5", "fd42:1::8", "fe80::1",
                  "2001:db8:a:1::1", "2001:db8:a::ffff"),
}

# Marker frames (see netfilter.py) come from here; nothing else may.
MARKER_SRC = {Family.IPV4: "198.18.255.1", Family.IPV6: "2001:db8:ffff::1"}

_LOCAL = {fam: {ipaddress.ip_address(a) for a in addrs} for fam, addrs in RX_ADDRS.items()}
_V4_BAD = [ipaddress.ip_network(n) for n in ("0.0.0.0/8", "127.0.0.0/8", "224.0.0.0/3")]
_V4_SUBNET_EDGES = {ipaddress.ip_address(a) for a in BROADCASTS} | {
    ipaddress.ip_interface(n).network.network_address for n in RX_NETS[Family.IPV4]}


def deliverable_source(addr: str) -> bool:
    """True when the receiver takes a packet from `addr` (not martian, not its own, no marker)."""
    ip = ipaddress.ip_address(addr)
    fam = Family.IPV4 if ip.version == 4 else Family.IPV6
    if ip in _LOCAL[fam] or addr == MARKER_SRC[fam]:
        return False
    if fam is Family.IPV4:
        return not any(ip in n for n in _V4_BAD) and ip not in _V4_SUBNET_EDGES
    assert isinstance(ip, ipaddress.IPv6Address)
    return not (ip.is_multicast or ip.is_loopback or ip.is_unspecified
                or ip.ipv4_mapped is not None)


def destinations(family: Family) -> tuple[str, ...]:
    """Every destination the receiver delivers to its INPUT chain."""
    extra = BROADCASTS if family is Family.IPV4 else ()
    return RX_ADDRS[family] + extra + MULTICASTS[family]
