"""addrtype, owner and rt: compiled, then compared with netfilter.

addrtype and owner read the packet's route and socket, which a BPF_PROG_TEST_RUN skb does not
have: the same counting ruleset is loaded into the receiver namespace twice, with legacy
iptables and with pybpfilter's netfilter programs, real traffic of every kind flows (unicast,
subnet and limited broadcast, multicast to a joined group, the host's own traffic as root and
as another user, kernel replies without a socket file, IGMP reports without a socket), and the
per-rule counters of both must be equal. `-m rt` reads packet bytes only: test runs of crafted
IPv6 routing headers on every hook, checked against ip6t_rt's rules.
"""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import time

import pytest
from helpers.kernel import require_kernel
from scapy.layers.inet import UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop, IPv6ExtHdrRouting
from scapy.layers.l2 import Ether
from test_cli import bpfilter

from bpfilter import netns
from bpfilter.compiler.validate import CompileError
from bpfilter.frontends.iptables import parse
from bpfilter.ir.model import Family
from bpfilter.runtime.checker import Checker

pytestmark = pytest.mark.kernel

GROUP = "239.1.2.3"
PORT = 7000
USER = 1500

# The kernel refuses a BPF netfilter hook at the priority of another hook (EBUSY): netfilter
# runs the rules in table filter, pybpfilter the same rules in table security (priority 50, also
# after the routing decision, and with the same socket).
RULES = f"""*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:types - [0:0]
-A INPUT -j types
-A INPUT -m addrtype ! --dst-type LOCAL,MULTICAST
-A OUTPUT -j types
-A OUTPUT -m owner --socket-exists
-A OUTPUT -m owner ! --socket-exists
-A OUTPUT -m owner --uid-owner 0
-A OUTPUT -m owner --uid-owner 1000-2000
-A OUTPUT -m owner ! --uid-owner {USER}
-A OUTPUT -m owner --gid-owner {USER}
-A OUTPUT -m owner ! --gid-owner 0 --uid-owner 0-{USER}
-A OUTPUT -m owner --socket-exists ! --uid-owner 0
-A OUTPUT -p icmp -m owner --socket-exists
-A types -m addrtype --dst-type LOCAL
-A types -m addrtype --dst-type BROADCAST
-A types -m addrtype --dst-type MULTICAST
-A types -m addrtype --dst-type UNICAST
-A types -m addrtype ! --dst-type UNICAST
COMMIT
"""


def _counts(text: str) -> list[tuple[str, str, int]]:
    """(table, chain, packets) per rule of an iptables-save -c text, in order."""
    out, table = [], ""
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:]
        m = re.match(r"\[(\d+):\d+\] -A (\S+)", line)
        if m:
            out.append((table, m.group(2), int(m.group(1))))
    return out


def _ns(ns: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True,
                          check=check)


def _udp(ns: str, dst: str, *, bcast: bool = False, dev: str | None = None,
         mcast_if: str | None = None) -> None:
    with netns.enter(ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with s:
        if bcast:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        if dev is not None:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, dev.encode())
        if mcast_if is not None:
            s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(mcast_if))
            s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
        s.sendto(b"x", (dst, PORT))


def _traffic(topo) -> None:
    s, r = topo.sender, topo.receiver
    bcast = r.ip4.rsplit(".", 1)[0] + ".255"
    with netns.enter(r.ns):
        member = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    member.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    member.bind(("", PORT))
    mreq = socket.inet_aton(GROUP) + socket.inet_aton(r.ip4)
    member.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)  # IGMP reports
    try:
        time.sleep(0.2)
        # INPUT: unicast, subnet and limited broadcast, multicast to the joined group.
        _udp(s.ns, r.ip4)
        _udp(s.ns, bcast, bcast=True)
        _udp(s.ns, "255.255.255.255", bcast=True, dev=s.ifname)
        _udp(s.ns, GROUP, mcast_if=s.ip4)
        # Kernel replies: an echo reply and a TCP reset (sockets without a file).
        _ns(s.ns, "ping", "-c", "1", "-W", "1", r.ip4, check=False)
        with netns.enter(s.ns):
            c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        c.settimeout(1)
        with c, contextlib.suppress(OSError):
            c.connect((r.ip4, 9))
        # OUTPUT as root: to itself, to the peer, broadcast, multicast (looped back).
        _udp(r.ns, r.ip4)
        _udp(r.ns, "127.0.0.1")
        _udp(r.ns, s.ip4)
        _udp(r.ns, bcast, bcast=True)
        _udp(r.ns, GROUP, mcast_if=r.ip4)
        # ... and as another user and group.
        code = (f"import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
                f"s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1); "
                f"[s.sendto(b'u', (a, {PORT})) for a in ('{r.ip4}', '{s.ip4}', '{bcast}')]")
        _ns(r.ns, "setpriv", f"--reuid={USER}", f"--regid={USER}", "--clear-groups",
            "/usr/bin/python3", "-c", code)  # not a venv under /root
        time.sleep(0.3)
    finally:
        member.close()


def _stable(read) -> list:
    """Counters read twice alike (IGMP and ND may still be in flight)."""
    last = read()
    for _ in range(20):
        time.sleep(0.2)
        now = read()
        if now == last:
            return now
        last = now
    return last


def test_addrtype_and_owner_like_netfilter(topology, bpffs, tmp_path):
    """The same counting rules in both: equal counters on real traffic of every kind."""
    require_kernel()
    r = topology.receiver
    rules = tmp_path / "types.v4"
    rules.write_text(RULES.replace("*filter", "*security"))
    subprocess.run(["ip", "netns", "exec", r.ns, "iptables-legacy-restore"], input=RULES,
                   text=True, check=True, capture_output=True)
    bpfilter("restore", "--netns", r.ns, str(rules), bpffs=bpffs)
    try:
        _traffic(topology)

        def read() -> tuple[list, list]:
            theirs = _counts(_ns(r.ns, "iptables-legacy-save", "-c").stdout)
            ours = _counts(bpfilter("save", "-c", "--netns", r.ns, bpffs=bpffs).stdout)
            return theirs, [("filter", c, n) for _, c, n in ours]

        theirs, ours = _stable(read)
        print("counters (netfilter = pybpfilter):", ours)
        assert [(t, c) for t, c, _ in theirs] == [(t, c) for t, c, _ in ours]
        assert ours == theirs, "\n".join(
            f"{t} {c} #{i}: netfilter {a} pybpfilter {b}"
            for i, ((t, c, a), (_, _, b)) in enumerate(zip(theirs, ours, strict=True)) if a != b)
        hits = dict.fromkeys(("LOCAL", "BROADCAST", "MULTICAST"), 0)
        for (_, chain, n), line in zip(ours, [x for x in RULES.splitlines() if x[:3] == "-A "],
                                       strict=True):
            for k in hits:
                if chain == "types" and line.endswith(f"--dst-type {k}"):
                    hits[k] += n
        assert all(hits.values()), f"every type must be seen: {hits}"
    finally:
        bpfilter("flush", "--netns", r.ns, bpffs=bpffs)


# --- refusals, by name ----------------------------------------------------------------------


@pytest.mark.parametrize(("family", "text", "chain", "hook", "words"), [
    (Family.IPV6, "-A INPUT -m addrtype --dst-type UNREACHABLE", "INPUT", "nf",
     "IPv6 UNREACHABLE"),
    (Family.IPV4, "-A OUTPUT -m owner --gid-owner 1 --suppl-groups", "OUTPUT", "nf",
     "suppl-groups"),
    (Family.IPV4, "-A OUTPUT -m owner --uid-owner 1", "OUTPUT", "tc", "hook tc"),
    (Family.IPV6, "-A INPUT -m rt --rt-type 0 --rt-0-addrs ::1", "INPUT", "nf", "rt-0-addrs"),
])
def test_refused_by_name(family, text, chain, hook, words):
    """What cannot be exact is refused, with the rule and the reason."""
    require_kernel()
    rs = parse(f"*filter\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n{text}\nCOMMIT\n",
               family=family, filename="t")
    with pytest.raises(CompileError, match=re.escape(words)):
        Checker(rs, chain=chain, hook=hook, iif="eth0", oif="eth0").close()


def test_postrouting_loads():
    """mangle POSTROUTING reads the same route and socket as OUTPUT."""
    require_kernel()
    rs = parse("*mangle\n:POSTROUTING ACCEPT [0:0]\n-A POSTROUTING -m addrtype --dst-type LOCAL\n"
               f"-A POSTROUTING -m owner --uid-owner {USER}\nCOMMIT\n", family=Family.IPV4,
               filename="t")
    Checker(rs, chain="POSTROUTING", table="mangle").close()


def test_addrtype_in_prerouting_loads():
    """PREROUTING runs before the routing decision: the type comes from the local table map
    (see test_addrtype_everywhere.py for the comparison with netfilter)."""
    require_kernel()
    rs = parse("*mangle\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -m addrtype --dst-type LOCAL\n"
               "COMMIT\n", family=Family.IPV4, filename="t")
    Checker(rs, chain="PREROUTING", table="mangle").close()


# --- rt: test runs ---------------------------------------------------------------------------

RT_RULES = """*filter
:INPUT ACCEPT [0:0]
-A INPUT -m rt --rt-type 0 -j DROP
-A INPUT -m rt --rt-type 2 --rt-segsleft 1:3 -j DROP
-A INPUT -m rt ! --rt-type 2 --rt-len 24 --rt-0-res -j DROP
-A INPUT -m rt --rt-segsleft 9 -j ACCEPT
COMMIT
"""
SRC, DST, VIA = "2001:db8::1", "2001:db8::2", "2001:db8::3"


def _rt_frames() -> list[tuple[str, bytes, int | None]]:
    """(what, frame, the deciding rule ip6t_rt gives: None for the policy)."""
    e = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IPv6(src=SRC, dst=DST)

    def rh(**kw):
        return IPv6ExtHdrRouting(**{"addresses": [VIA], **kw})

    short = bytearray(bytes(e / rh(type=0, segleft=1)))
    short[18:20] = (8).to_bytes(2, "big")  # payload length 8: the header's 24 bytes do not fit
    trunc = Ether(bytes(e))  # next header 43, one byte of it
    trunc[IPv6].nh, trunc[IPv6].plen = 43, 1
    return [
        ("no routing header", bytes(e / UDP()), None),
        ("type 0", bytes(e / rh(type=0, segleft=1) / UDP()), 1),
        ("type 2, 1 segment left", bytes(e / rh(type=2, segleft=1) / UDP()), 2),
        ("type 2, none left", bytes(e / rh(type=2, segleft=0) / UDP()), None),
        ("type 3, 24 bytes, reserved 0", bytes(e / rh(type=3, segleft=0) / UDP()), 3),
        ("type 3, reserved set", bytes(e / rh(type=3, segleft=0, reserved=1) / UDP()), None),
        ("type 4, 9 left, 40 bytes", bytes(e / rh(type=4, segleft=9, addresses=[VIA, VIA])
                                             / UDP()), 4),
        ("after hop-by-hop", bytes(e / IPv6ExtHdrHopByHop() / rh(type=0) / UDP()), 1),
        ("after a first fragment",
         bytes(e / IPv6ExtHdrFragment(offset=0, m=1) / rh(type=0) / UDP()), 1),
        ("behind a later fragment",
         bytes(e / IPv6ExtHdrFragment(offset=8, nh=43) / rh(type=0) / UDP()), None),
        ("longer than the packet", bytes(short[:14 + 48]), None),
        ("unreadable: hotdrop at rule 1", bytes(trunc) + b"\x11", 1),
    ]


@pytest.mark.parametrize("hook", ["nf", "tc", "xdp"])
def test_rt_matches_like_ip6t_rt(hook):
    """Type, segments left, length and reserved word; absent and truncated headers."""
    require_kernel()
    rs = parse(RT_RULES, family=Family.IPV6, filename="rt")
    with Checker(rs, hook=hook, iif="eth0") as c:
        for what, frame, rule in _rt_frames():
            res = c.run(frame)
            assert res.rule == rule, f"{hook}: {what}: rule {res.rule}, expected {rule}"
