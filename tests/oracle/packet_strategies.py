"""Hypothesis strategies for packets aimed at a ruleset's rules and at their boundaries.

A packet picks a rule of the ruleset (or none) and takes each field from that rule's values,
their neighbours (± 1), the values of any rule, a fixed pool or anywhere. On top: random TCP
flags and options (well-formed and malformed), ICMP types and codes, truncated transport
headers, IPv4 options and fragments (first, later, the "evil" offset 1), IPv6 extension header
chains and fragments, lengths and TTLs. Only packets the receiver delivers to its hooks are made:
valid IP headers, sources that are not martian, destinations it owns.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

from hypothesis import strategies as st

from bpfilter.ir.model import Family

from .addresses import (
    BROADCASTS,
    MULTICASTS,
    RX_ADDRS,
    SOURCES,
    deliverable_source,
)
from .frames import IpProto, PacketSpec, icmp_bytes, tcp_bytes, udp_bytes
from .rules import RulesetSpec
from .strategies import ICMP6_TYPES, ICMP_CODES, ICMP_TYPES, LENGTHS, PORTS, TTLS, chance

TCP_OPTIONS = (
    b"\x01", b"\x00", b"\x02\x04\x05\xb4", b"\x03\x03\x07", b"\x04\x02",
    b"\x08\x0a" + bytes(8), b"\xfe\x04\xab\xcd", b"\x1e\x02", b"\xff\x02",
    b"\x05\x00",  # length 0: the scan steps one byte
    b"\x08\x01",  # length 1
    b"\x02\x28\x00",  # length beyond the options
)
# IPv6 next header 0 is a hop-by-hop header the stack parses before any hook: not here.
OTHER_PROTOS = {Family.IPV4: (47, 132, 2, 0, 255), Family.IPV6: (47, 132, 59, 60, 43)}
EXT_NAMES = ("hop", "dst", "routing", "ah")
V4_OPTIONS = (b"\x01\x01\x01\x01", b"\x94\x04\x00\x00", b"\x07\x07\x04" + bytes(4) + b"\x01",
              b"\x01\x00\x00\x00")


def _pick_int(draw: Callable, aimed: list[int], pool: tuple[int, ...], lo: int, hi: int) -> int:
    """An aimed value (exact or ± 1), a pool value, or anything in [lo, hi]."""
    way = draw(st.integers(0, 3))
    if way <= 1 and aimed:
        v = draw(st.sampled_from(aimed)) + (draw(st.sampled_from((-1, 1))) if way == 1 else 0)
        return min(max(v, lo), hi)
    if way <= 2:
        return draw(st.sampled_from(pool))
    return draw(st.integers(lo, hi))


def _near_addr(draw: Callable, aimed: list[str]) -> list[str]:
    out = []
    for a in aimed:
        ip = ipaddress.ip_address(a)
        out.append(str(ip))
        for d in (-1, 1):
            try:
                out.append(str(ip + d))
            except ipaddress.AddressValueError:
                continue
    return out


def _source(draw: Callable, fam: Family, aim: dict[str, list], spec: RulesetSpec) -> str:
    way = draw(st.integers(0, 3))
    if way == 0 and aim.get("src"):
        cands = _near_addr(draw, aim["src"])
    elif way == 1 and spec.aims("src"):
        cands = _near_addr(draw, spec.aims("src"))
    else:
        cands = list(SOURCES[fam])
    cands = [c for c in cands if _family(c) is fam and deliverable_source(c)]
    return draw(st.sampled_from(cands or list(SOURCES[fam])))


def _family(addr: str) -> Family:
    return Family.IPV4 if ipaddress.ip_address(addr).version == 4 else Family.IPV6


def _destination(draw: Callable, fam: Family, aim: dict[str, list]) -> tuple[str, str]:
    """A destination the receiver owns (or a broadcast/multicast it takes), and the MAC kind."""
    local = RX_ADDRS[fam]
    special = (BROADCASTS if fam is Family.IPV4 else ()) + MULTICASTS[fam]
    aimed = [a for a in aim.get("dst", []) if a in local + special]
    if aimed and chance(draw, 70):
        dst = draw(st.sampled_from(aimed))
    elif chance(draw, 85):
        dst = draw(st.sampled_from(local))
    else:
        dst = draw(st.sampled_from(special))
    mac = "bcast" if dst in BROADCASTS else "mcast" if dst in MULTICASTS[fam] else "host"
    wanted = [m for m in aim.get("mac", []) if m]
    if wanted and chance(draw, 60):
        mac = draw(st.sampled_from(wanted))
    elif chance(draw, 5):
        mac = draw(st.sampled_from(["host", "bcast", "mcast"]))
    return dst, mac


def _tcp(draw: Callable, aim: dict[str, list], spec: RulesetSpec) -> tuple[bytes, str]:
    sport = _pick_int(draw, aim.get("sport", []) or spec.aims("sport"), PORTS, 0, 65535)
    dport = _pick_int(draw, aim.get("dport", []) or spec.aims("dport"), PORTS, 0, 65535)
    if aim.get("flags") and chance(draw, 60):
        flags = draw(st.sampled_from(aim["flags"])) | (draw(st.integers(0, 0xC0))
                                                        if chance(draw, 20) else 0)
    else:
        flags = draw(st.integers(0, 0xFF))
    opts = b""
    note = ""
    if aim.get("tcpopt") and chance(draw, 50):
        kind = draw(st.sampled_from(aim["tcpopt"]))
        opts = bytes([kind]) if kind < 2 else bytes([kind, 2])
    if chance(draw, 40):
        for o in draw(st.lists(st.sampled_from(TCP_OPTIONS), max_size=5)):
            opts += o
    if chance(draw, 20):
        opts = bytes(draw(st.permutations(list(opts))))  # malformed at random
    opts = opts[:40]
    doff = None
    if chance(draw, 8):
        doff = draw(st.sampled_from([0, 4, 5, 6, 15]))
        note = f"doff {doff}"
    payload = bytes(draw(st.integers(0, 24)))
    return tcp_bytes(sport, dport, flags, opts, doff=doff, payload=payload), note


def _l4(draw: Callable, fam: Family, proto: int, aim: dict[str, list],
        spec: RulesetSpec) -> tuple[bytes, str]:
    note = ""
    if proto == IpProto.TCP:
        data, note = _tcp(draw, aim, spec)
    elif proto == IpProto.UDP:
        sport = _pick_int(draw, aim.get("sport", []) or spec.aims("sport"), PORTS, 0, 65535)
        dport = _pick_int(draw, aim.get("dport", []) or spec.aims("dport"), PORTS, 0, 65535)
        data = udp_bytes(sport, dport, bytes(draw(st.integers(0, 24))))
    elif proto in (IpProto.ICMP, IpProto.ICMPV6):
        types = ICMP_TYPES if proto == IpProto.ICMP else ICMP6_TYPES
        aimed = aim.get("icmp", []) or spec.aims("icmp")
        if aimed and chance(draw, 60):
            t, c = draw(st.sampled_from(aimed))
            c = min(max(c + draw(st.sampled_from((0, 0, -1, 1))), 0), 255)
        else:
            t = _pick_int(draw, [], types, 0, 255)
            c = _pick_int(draw, [], ICMP_CODES, 0, 255)
        data = icmp_bytes(t, c, payload=bytes(draw(st.integers(0, 16))))
    else:
        data = bytes(draw(st.integers(0, 24)))
    if chance(draw, 12):
        cut = draw(st.integers(0, max(len(data) - 1, 0)))
        note = (note + f" cut to {cut}").strip()
        data = data[:cut]
    return data, note


def _proto(draw: Callable, fam: Family, aim: dict[str, list], spec: RulesetSpec) -> int:
    main = (6, 17, 1) if fam is Family.IPV4 else (6, 17, 58)
    aimed = [p for p in aim.get("proto", []) if p]
    if aimed and chance(draw, 75):
        return draw(st.sampled_from(aimed))
    if chance(draw, 85):
        return draw(st.sampled_from(main))
    return draw(st.sampled_from(OTHER_PROTOS[fam]))


def _pad_to_length(draw: Callable, data: bytes, head: int, aim: dict[str, list],
                   spec: RulesetSpec) -> bytes:
    """Grow the payload so the IP length hits an aimed --length value (± 1) when one is near."""
    aimed = aim.get("length", []) or spec.aims("length")
    if not aimed or not chance(draw, 50):
        return data
    want = _pick_int(draw, aimed, LENGTHS, 0, 600)
    extra = want - head - len(data)
    return data + bytes(extra) if 0 < extra <= 600 else data


@st.composite
def packet_spec(draw: Callable, spec: RulesetSpec, *, fragments: bool) -> PacketSpec:
    """A packet for `spec`'s family, aimed at one of its rules (or none)."""
    fam = spec.family
    rules = spec.rules()
    aim: dict[str, list[Any]] = {}
    if rules and chance(draw, 80):
        for k, v in draw(st.sampled_from(rules)).aim:
            aim.setdefault(k, []).append(v)
    src = _source(draw, fam, aim, spec)
    dst, mac = _destination(draw, fam, aim)
    proto = _proto(draw, fam, aim, spec)
    l4, note = _l4(draw, fam, proto, aim, spec)
    ttl = _pick_int(draw, aim.get("ttl", []) or spec.aims("ttl"), TTLS, 1, 255)
    kw: dict[str, Any] = {}
    frag = None
    if fam is Family.IPV4:
        if chance(draw, 10):
            kw["ip_options"] = draw(st.sampled_from(V4_OPTIONS))
        kw["df"] = chance(draw, 30)
        if fragments and chance(draw, 60):
            off = draw(st.sampled_from([0, 1, 1, 2, 3, 185]))
            frag = (off, True if off == 0 else chance(draw, 50))
            kw["df"] = False
        head = 20 + len(kw.get("ip_options", b""))
    else:
        if chance(draw, 25):
            kw["ext"] = tuple(draw(st.lists(st.sampled_from(EXT_NAMES), min_size=1, max_size=3)))
        if fragments and chance(draw, 20):
            off = draw(st.sampled_from([0, 1, 2, 100]))
            frag = (off, True if off == 0 else chance(draw, 50))
            if off and chance(draw, 20):
                proto = draw(st.sampled_from([IpProto.DSTOPTS, IpProto.ROUTING,
                                              IpProto.NONE]))
        head = 40 + sum(12 if e == "ah" else 8 for e in kw.get("ext", ())) + (8 if frag else 0)
    if frag and frag[0]:
        note = "later fragment"
    l4 = _pad_to_length(draw, l4, head, aim, spec)
    return PacketSpec(fam, src, dst, int(proto), l4, ttl=ttl, tos=draw(st.sampled_from([0, 0x10])),
                      ip_id=draw(st.integers(1, 0xFFFF)), dst_mac=mac, frag=frag, note=note,
                      **kw)
