"""REJECT on tc and XDP: the kernel's reply, built in BPF, byte for byte, and really received.

The frame tests run the compiled program with BPF_PROG_TEST_RUN and compare the rewritten frame
with the reply scapy builds from the facts of net/ipv{4,6}/netfilter/nf_reject_ipv{4,6}.c (every
header field, every checksum byte). The traffic tests load rulesets with `bpfilter restore` into a
receiver namespace and check that the sender's sockets get the RST (ECONNREFUSED at once, not a
timeout) or the ICMP error (type, code and the address it came from, through IP_RECVERR).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from helpers.kernel import require_kernel
from helpers.packets import build, icmp, tcp, udp
from helpers.topology import Topology, assert_not_home
from helpers.traffic import wait_for
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6DestUnreach, IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from bpfilter import netns
from bpfilter.bpf import insn as I
from bpfilter.bpf.consts import AttachType, ProgType, TcAction, XdpAction
from bpfilter.bpf.link import Link
from bpfilter.bpf.prog import Prog
from bpfilter.cli.pcap import write_pcap
from bpfilter.compiler.codegen import compile_table
from bpfilter.compiler.hooks.tcxdp import TcFlavour, XdpFlavour
from bpfilter.compiler.validate import CompileError
from bpfilter.frontends.iptables.parser import parse
from bpfilter.ir.model import Family
from bpfilter.matches.kernel import IpProto
from bpfilter.matches.targets import REJECT4, REJECT6
from bpfilter.runtime.checker import Checker

HOOKS = ("tc", "xdp")
SENT = {"tc": TcAction.REDIRECT, "xdp": XdpAction.TX}
DROPPED = {"tc": TcAction.SHOT, "xdp": XdpAction.DROP}
A4, B4 = "192.0.2.1", "198.51.100.7"
A6, B6 = "2001:db8::1", "2001:db8:1::7"
KINDS = {Family.IPV4: REJECT4, Family.IPV6: REJECT6}
ICMP_BASE = 7100  # UDP port of the first ICMP kind; the others follow in table order
TCP_RESET_PORT, TCP_DEFAULT_PORT = 80, 81
FIN, SYN, ACK = 0x01, 0x02, 0x10
# Bytes of the offending datagram an ICMP error quotes (nf_reject_skb_v4_unreach: 576 bytes in
# all; nf_reject_skb_v6_unreach: within the 1280-byte minimum MTU).
QUOTE = {Family.IPV4: 536, Family.IPV6: 1220}


def ruleset(family: Family) -> str:
    """One rule per --reject-with kind: UDP ports for the ICMP errors, TCP for the reset."""
    lines = ["*filter", ":INPUT ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
    for i, (name, _, _) in enumerate(k for k in KINDS[family] if k[2] is not None):
        lines.append(f"-A INPUT -p udp --dport {ICMP_BASE + i} -j REJECT --reject-with {name}")
    lines.append(f"-A INPUT -p tcp --dport {TCP_RESET_PORT} -j REJECT --reject-with tcp-reset")
    lines.append(f"-A INPUT -p tcp --dport {TCP_DEFAULT_PORT} -j REJECT")
    lines.append("-A INPUT -p icmp --icmp-type echo-request -j REJECT"
                 if family is Family.IPV4 else
                 "-A INPUT -p ipv6-icmp --icmpv6-type echo-request -j REJECT")
    return "\n".join([*lines, "COMMIT", ""])


CATCH_ALL = """\
*filter
:INPUT ACCEPT [0:0]
-A INPUT -p tcp -j REJECT --reject-with tcp-reset
-A INPUT -j REJECT
COMMIT
"""


def icmp_kinds(family: Family) -> list[tuple[int, str, tuple[int, int]]]:
    """(UDP port, name, (type, code)) of each ICMP kind in `ruleset`."""
    kinds = [(name, err) for name, _, err in KINDS[family] if err is not None]
    return [(ICMP_BASE + i, name, err) for i, (name, err) in enumerate(kinds)]


# -- the reply, as the kernel builds it ---------------------------------------------------------


def link_len(frame: bytes) -> int:
    """Length of the Ethernet header and its VLAN tags."""
    n = 14
    while int.from_bytes(frame[n - 2:n], "big") in (0x8100, 0x88A8):
        n += 4
    return n


def expected_reply(frame: bytes, err: tuple[int, int] | None) -> bytes:
    """The reply to `frame`: a TCP reset (err None) or the ICMP error (type, code)."""
    n = link_len(frame)
    link = frame[6:12] + frame[0:6] + frame[12:n]  # addresses swapped, VLAN tags kept
    v6 = frame[n] >> 4 == 6
    ip = IPv6(frame[n:]) if v6 else IP(frame[n:])
    length = 40 + ip.plen if v6 else ip.len
    datagram = frame[n:n + length]  # without Ethernet padding
    if err is None:
        seg = (IPv6 if v6 else IP)(datagram)[TCP]
        payload = len(bytes(seg.payload))
        if int(seg.flags) & ACK:
            l4 = TCP(sport=seg.dport, dport=seg.sport, seq=seg.ack, ack=0, flags="R", window=0)
        else:
            ack = seg.seq + bool(seg.flags & SYN) + bool(seg.flags & FIN) + payload
            l4 = TCP(sport=seg.dport, dport=seg.sport, seq=0, ack=ack % (1 << 32), flags="RA",
                     window=0)
    elif v6:
        l4 = ICMPv6DestUnreach(code=err[1]) / Raw(datagram[:QUOTE[Family.IPV6]])
    else:
        l4 = ICMP(type=err[0], code=err[1]) / Raw(datagram[:QUOTE[Family.IPV4]])
    if v6:
        head = IPv6(src=ip.dst, dst=ip.src, hlim=64, tc=0, fl=0)
    else:
        head = IP(src=ip.dst, dst=ip.src, ttl=64, id=0, flags="DF", tos=0)
    return link + bytes(head / l4)


def assert_same_frame(got: bytes, want: bytes) -> None:
    """Byte equality; on a difference, both frames decoded."""
    if got != want:
        raise AssertionError(f"reply differs at byte {_first_diff(got, want)}\n--- got:\n"
                             f"{Ether(got).show2(dump=True)}\n--- want:\n"
                             f"{Ether(want).show2(dump=True)}")


def _first_diff(a: bytes, b: bytes) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                min(len(a), len(b)))


@pytest.fixture(scope="module")
def checkers() -> Iterator[dict[tuple[str, Family, bool], Checker]]:
    """`ruleset` (or CATCH_ALL) of each family loaded for test runs on each hook."""
    require_kernel()
    made: dict[tuple[str, Family, bool], Checker] = {}
    try:
        for hook in HOOKS:
            for fam in Family:
                for catch_all in (False, True):
                    rs = parse(CATCH_ALL if catch_all else ruleset(fam), family=fam)
                    made[hook, fam, catch_all] = Checker(rs, hook=hook, iif="eth0")
        yield made
    finally:
        for c in made.values():
            c.close()


def family_of(frame: bytes) -> Family:
    """The family of the datagram in `frame`."""
    return Family.IPV6 if frame[link_len(frame)] >> 4 == 6 else Family.IPV4


def run(checkers, hook: str, frame: bytes, *, catch_all: bool = False):
    """(retval, frame out) of one test run."""
    r = checkers[hook, family_of(frame), catch_all].prog.run(frame)
    return r.retval, r.data_out


# -- frames -----------------------------------------------------------------------------------

TCP_CASES = {
    "syn": lambda s, d: tcp(s, d, dport=80, flags="S", seq=0xFFFFFFFF),  # ack wraps to 0
    "ack+payload": lambda s, d: tcp(s, d, dport=80, flags="PA", seq=1000, ack=0xDEADBEEF,
                                    payload=b"x" * 100),
    "fin+payload, options": lambda s, d: tcp(s, d, dport=80, flags="F", seq=7, payload=b"abc",
                                             tcp_options=[("MSS", 1460), ("NOP", None)]),
    "vlan": lambda s, d: tcp(s, d, dport=80, vlan=5),
    "qinq": lambda s, d: tcp(s, d, dport=80, vlan=(5, 6)),
    "small, padded": lambda s, d: tcp(s, d, dport=80).ljust(80, b"\0"),
}


@pytest.mark.parametrize("hook", HOOKS)
@pytest.mark.parametrize("case", list(TCP_CASES))
@pytest.mark.parametrize("fam", list(Family), ids=lambda f: f.value)
def test_tcp_reset_frame(checkers, hook, case, fam):
    s, d = (A4, B4) if fam is Family.IPV4 else (A6, B6)
    frame = TCP_CASES[case](s, d)
    retval, out = run(checkers, hook, frame)
    assert retval == SENT[hook]
    assert_same_frame(out, expected_reply(frame, None))


def test_tcp_reset_frame_with_ip_options_and_extension_headers(checkers):
    for hook in HOOKS:
        for frame in (tcp(A4, B4, dport=80, ip_options=b"\x94\x04\0\0"),  # router alert
                      tcp(A6, B6, dport=80, ext=("hop", "dst"), payload=b"12345")):
            retval, out = run(checkers, hook, frame)
            assert retval == SENT[hook]
            assert_same_frame(out, expected_reply(frame, None))


@pytest.mark.parametrize("hook", HOOKS)
@pytest.mark.parametrize("fam", list(Family), ids=lambda f: f.value)
def test_every_icmp_kind_frame(checkers, hook, fam):
    s, d = (A4, B4) if fam is Family.IPV4 else (A6, B6)
    for port, name, err in icmp_kinds(fam):
        frame = udp(s, d, dport=port)
        retval, out = run(checkers, hook, frame)
        assert retval == SENT[hook], name
        assert_same_frame(out, expected_reply(frame, err))


# UDP payload sizes: around the word size (checksum padding), the 512-byte bpf_csum_diff
# chunks (IPv4 476; IPv6 456, 968) and the end of the quote (IPv4 508, IPv6 1172), beyond it.
SIZES = [0, 1, 2, 3, 5, 200, 455, 456, 457, 475, 476, 477, 507, 508, 509, 967, 968, 969, 1171,
         1172, 1173, 1400]
PAYLOAD = bytes(range(256)) * 6


@pytest.mark.parametrize("hook", HOOKS)
@pytest.mark.parametrize("fam", list(Family), ids=lambda f: f.value)
def test_icmp_quote_lengths(checkers, hook, fam):
    s, d = (A4, B4) if fam is Family.IPV4 else (A6, B6)
    port, _, err = icmp_kinds(fam)[0]
    for size in SIZES:
        frame = udp(s, d, dport=port, payload=PAYLOAD[:size])
        retval, out = run(checkers, hook, frame)
        assert retval == SENT[hook], size
        assert_same_frame(out, expected_reply(frame, err))
    # Ethernet padding is not part of the datagram; VLAN tags and extension headers are kept.
    for frame in (udp(s, d, dport=port).ljust(60, b"\xee"), udp(s, d, dport=port, vlan=(1, 2)),
                  build(UDP(sport=1, dport=port), s, d, ext=("hop", "routing", "dst"))
                  if fam is Family.IPV6 else udp(s, d, dport=port, ip_options=b"\x01" * 8)):
        retval, out = run(checkers, hook, frame)
        assert retval == SENT[hook]
        assert_same_frame(out, expected_reply(frame, err))


@pytest.mark.parametrize("hook", HOOKS)
def test_icmp_error_for_tcp_and_icmp_queries(checkers, hook):
    for frame in (tcp(A4, B4, dport=TCP_DEFAULT_PORT), tcp(A6, B6, dport=TCP_DEFAULT_PORT),
                  icmp(A4, B4), icmp(A6, B6)):
        default = next(err for name, _, err in KINDS[family_of(frame)] if "port-unreach" in name)
        retval, out = run(checkers, hook, frame)
        assert retval == SENT[hook]
        assert_same_frame(out, expected_reply(frame, default))


MCAST_MAC = {"dst_mac": "01:00:5e:00:00:01"}
REFUSED = {
    "reset for a reset": tcp(A4, B4, dport=80, flags="R"),
    "reset for a reset+ack": tcp(A6, B6, dport=80, flags="RA"),
    "error for dest-unreach": icmp(A4, B4, type=3, code=3),
    "error for time-exceeded": icmp(A4, B4, type=11),
    "error for an unknown type": icmp(A4, B4, type=40),
    "error for an ICMPv6 error": icmp(A6, B6, type=1, code=4),
    "error for packet-too-big": icmp(A6, B6, type=2),
    "error to a multicast frame": udp(A4, B4, dport=ICMP_BASE, **MCAST_MAC),
    "error to a broadcast frame": udp(A4, B4, dport=ICMP_BASE, dst_mac="ff:ff:ff:ff:ff:ff"),
    "multicast destination": udp(A4, "224.0.0.9", dport=ICMP_BASE),
    "broadcast destination": tcp(A4, "255.255.255.255", dport=80),
    "unspecified source": udp("0.0.0.0", B4, dport=ICMP_BASE),
    "loopback source": tcp("127.0.0.1", B4, dport=80),
    "multicast source": tcp("224.1.2.3", B4, dport=80),
    "v6 multicast destination": udp(A6, "ff02::1", dport=ICMP_BASE),
    "v6 unspecified source": tcp("::", B6, dport=80),
    "v6 multicast source": udp("ff02::5", B6, dport=ICMP_BASE),
}


@pytest.mark.parametrize("hook", HOOKS)
@pytest.mark.parametrize("case", list(REFUSED))
def test_no_reply_where_the_kernel_sends_none(checkers, hook, case):
    frame = REFUSED[case]
    retval, out = run(checkers, hook, frame, catch_all=True)
    assert retval == DROPPED[hook]
    assert out == frame
    assert checkers[hook, family_of(frame), True].run(frame).verdict == "REJECT"


@pytest.mark.parametrize("hook", HOOKS)
def test_frames_for_another_host(hook):
    """With the interface's MAC known (as `restore` knows it): no reply at all to a frame for
    another host (the stack drops it); a reset, but no ICMP error, to a broadcast frame."""
    require_kernel()
    mac = "02:00:00:00:00:02"  # helpers.packets' default destination
    fl = {"tc": TcFlavour, "xdp": XdpFlavour}[hook](Family.IPV4, ifname="eth0",
                                                   mac=bytes.fromhex(mac.replace(":", "")))
    ct = compile_table(parse(CATCH_ALL, family=Family.IPV4).tables["filter"], fl)
    maps = ct.create_maps()
    try:
        cp = ct.programs["INPUT"]
        insns = cp.program.resolve({k: m.fd for k, m in maps.items()})
        with Prog.load(cp.flavour.prog_type, insns, name="otherhost",
                       attach_type=cp.flavour.attach_type) as prog:
            for frame, sent in ((tcp(A4, B4), True), (udp(A4, B4), True),
                                (tcp(A4, B4, dst_mac="02:00:00:00:00:09"), False),
                                (udp(A4, B4, dst_mac="02:00:00:00:00:09"), False),
                                (tcp(A4, B4, dst_mac="ff:ff:ff:ff:ff:ff"), True),
                                (udp(A4, B4, dst_mac="ff:ff:ff:ff:ff:ff"), False)):
                r = prog.run(frame)
                assert r.retval == (SENT if sent else DROPPED)[hook], Ether(frame).summary()
                if sent:
                    assert_same_frame(r.data_out, expected_reply(
                        frame, None if frame[23] == IpProto.TCP else (3, 3)))
    finally:
        for m in maps.values():
            m.close()


@pytest.mark.parametrize("hook", HOOKS)
def test_no_reply_to_later_fragments(checkers, hook):
    from helpers.packets import fragments

    for s, d in ((A4, B4), (A6, B6)):
        first, *later = fragments(udp(s, d, dport=ICMP_BASE, payload=bytes(100)), 40)
        retval, out = run(checkers, hook, first, catch_all=True)
        assert retval == SENT[hook]
        assert_same_frame(out, expected_reply(first, (3, 3) if s == A4 else (1, 4)))
        for frag in later:
            assert run(checkers, hook, frag, catch_all=True) == (DROPPED[hook], frag)


# -- user chains, the verdict in `check` and the hooks that cannot send -----------------------

CHAINS = """\
*filter
:INPUT ACCEPT [0:0]
:HOSTS - [0:0]
:ADMIN - [0:0]
-A INPUT -p udp --dport 1 -j HOSTS
-A INPUT -p udp --dport 2 -g ADMIN
-A INPUT -p tcp -j REJECT --reject-with tcp-reset
-A HOSTS -p udp -j REJECT --reject-with icmp-host-unreachable
-A ADMIN -j REJECT --reject-with icmp-admin-prohibited
COMMIT
"""


@pytest.mark.parametrize("hook", HOOKS)
def test_reject_from_user_chains(hook):
    require_kernel()
    with Checker(parse(CHAINS, family=Family.IPV4), hook=hook, iif="eth0") as c:
        for frame, err, where in ((udp(A4, B4, dport=1), (3, 1), ("HOSTS", 1)),
                                  (udp(A4, B4, dport=2), (3, 13), ("ADMIN", 1)),
                                  (tcp(A4, B4), None, ("INPUT", 3))):
            r = c.prog.run(frame)
            assert r.retval == SENT[hook]
            assert_same_frame(r.data_out, expected_reply(frame, err))
            res = c.run(frame)
            assert (res.verdict, res.chain, res.rule) == ("REJECT", *where)


def test_netfilter_hook_refuses_reject_by_name():
    require_kernel()
    rs = parse(CHAINS, family=Family.IPV4, filename="rules.v4")
    with pytest.raises(CompileError, match=r"rules\.v4:7: .*REJECT.*--hook tc or --hook xdp"):
        Checker(rs, hook="nf")


def cli(*args: str, bpffs: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the `bpfilter` command with a private pin root."""
    env = dict(os.environ, BPFILTER_BPFFS=os.path.join(bpffs, "pybpfilter"))
    r = subprocess.run([sys.executable, "-m", "bpfilter.cli.main", *args], capture_output=True,
                       text=True, env=env)
    if check and r.returncode:
        raise AssertionError(f"bpfilter {' '.join(args)} failed:\n{r.stderr}")
    return r


def test_check_json_names_the_reject_verdict(tmp_path, bpffs):
    rules = tmp_path / "rules.v4"
    rules.write_text(CHAINS)
    pcap = tmp_path / "in.pcap"
    write_pcap(str(pcap), [udp(A4, B4, dport=1), udp(A4, B4, dport=2), tcp(A4, B4),
                           udp(A4, B4, dport=3)])
    want = [{"packet": 1, "verdict": "REJECT", "chain": "HOSTS", "rule": 1},
            {"packet": 2, "verdict": "REJECT", "chain": "ADMIN", "rule": 1},
            {"packet": 3, "verdict": "REJECT", "chain": "INPUT", "rule": 3},
            {"packet": 4, "verdict": "ACCEPT", "chain": "INPUT", "rule": None}]
    for hook in HOOKS:
        r = cli("check", "--hook", hook, "--json", "--pcap", str(pcap), str(rules), bpffs=bpffs)
        assert [json.loads(x) for x in r.stdout.splitlines()] == want
    r = cli("check", "--hook", "tc", "--pcap", str(pcap), str(rules), bpffs=bpffs)
    assert "packet 1: REJECT HOSTS rule 1" in r.stdout
    r = cli("check", "--json", "--pcap", str(pcap), str(rules), bpffs=bpffs, check=False)
    assert r.returncode == 1 and "rules.v4:7" in r.stderr and "--hook tc" in r.stderr


# -- the sender really receives the reply -----------------------------------------------------

SOL_IP, IP_RECVERR = 0, 11  # <linux/in.h>
SOL_IPV6, IPV6_RECVERR = 41, 25  # <linux/in6.h>
SO_EE_ORIGIN = {Family.IPV4: 2, Family.IPV6: 3}  # SO_EE_ORIGIN_ICMP, SO_EE_ORIGIN_ICMP6
EE = struct.Struct("=IBBBBII")  # struct sock_extended_err
# The errno a socket gets for each error (icmp_err_convert, icmpv6_err_convert).
ERRNO = {
    Family.IPV4: {0: errno.ENETUNREACH, 1: errno.EHOSTUNREACH, 2: errno.ENOPROTOOPT,
                  3: errno.ECONNREFUSED, 9: errno.ENETUNREACH, 10: errno.EHOSTUNREACH,
                  13: errno.EHOSTUNREACH},
    Family.IPV6: {0: errno.ENETUNREACH, 1: errno.EACCES, 3: errno.EHOSTUNREACH,
                  4: errno.ECONNREFUSED, 5: errno.EACCES, 6: errno.EACCES},
}
FAST = 0.5  # a reply to the first packet arrives well before any retransmission (1 s)


def addresses(topo: Topology, fam: Family) -> tuple[str, str]:
    """(sender, receiver) addresses of the family."""
    if fam is Family.IPV4:
        return topo.sender.ip4, topo.receiver.ip4
    return topo.sender.ip6, topo.receiver.ip6


def sock_in(ns: str, fam: Family, kind: int) -> socket.socket:
    """A socket of the family made inside namespace `ns`."""
    with netns.enter(ns):
        return socket.socket(socket.AF_INET if fam is Family.IPV4 else socket.AF_INET6, kind)


def assert_refused(ns: str, fam: Family, addr: str, port: int, *, fast: bool = True) -> None:
    """connect() fails with ECONNREFUSED (`fast`: from the first SYN's reply)."""
    with sock_in(ns, fam, socket.SOCK_STREAM) as s:
        s.settimeout(3)
        start = time.monotonic()
        with pytest.raises(ConnectionRefusedError):
            s.connect((addr, port))
        if fast:
            assert time.monotonic() - start < FAST


def icmp_error(ns: str, fam: Family, addr: str, port: int) -> tuple[int, int, int, int, str]:
    """Send one datagram from a connected UDP socket with IP(V6)_RECVERR; the error it gets:
    (errno, origin, type, code, the address the ICMP message came from)."""
    with sock_in(ns, fam, socket.SOCK_DGRAM) as s:
        if fam is Family.IPV4:
            s.setsockopt(SOL_IP, IP_RECVERR, 1)
        else:
            s.setsockopt(SOL_IPV6, IPV6_RECVERR, 1)
        s.connect((addr, port))
        s.setblocking(False)
        s.send(b"reject me")
        got: list = []

        def arrived() -> bool:
            with contextlib.suppress(BlockingIOError):
                got.append(s.recvmsg(64, 512, socket.MSG_ERRQUEUE))
            return bool(got)

        assert wait_for(arrived, timeout=2), f"no ICMP error for port {port}"
        _, ancdata, _, _ = got[0]
        cdata = ancdata[0][2]
        ee_errno, origin, icmp_type, code, *_ = EE.unpack_from(cdata)
        offender = cdata[EE.size:]
        if fam is Family.IPV4:
            where = socket.inet_ntop(socket.AF_INET, offender[4:8])
        else:
            where = socket.inet_ntop(socket.AF_INET6, offender[8:24])
        return ee_errno, origin, icmp_type, code, where


@contextlib.contextmanager
def xdp_on_peer(topo: Topology) -> Iterator[None]:
    """An XDP program on the sender's veth: veth delivers XDP_TX frames only to a peer that
    runs XDP (its NAPI receive queue exists then); without one the reply is dropped."""
    insns = [I.mov64_imm(I.R0, XdpAction.PASS), I.exit_()]
    with Prog.load(ProgType.XDP, insns, name="peer_pass", attach_type=AttachType.XDP) as prog:
        with netns.enter(topo.sender.ns):
            assert_not_home()
            link = Link.xdp(prog.fd, socket.if_nametoindex(topo.sender.ifname))
        with link:
            yield


def restore(topo: Topology, bpffs: str, tmp_path, hook: str, fam: Family, text: str,
            side: str = "receiver") -> None:
    """`bpfilter restore` of `text` at `hook` on one end of the topology."""
    ep = getattr(topo, side)
    rules = tmp_path / f"rules.{fam.value}.{side}"
    rules.write_text(text)
    cli("restore", *(["-6"] if fam is Family.IPV6 else []), "--netns", ep.ns, "--hook", hook,
        "--iface", ep.ifname, str(rules), bpffs=bpffs)


@pytest.mark.parametrize("hook", HOOKS)
@pytest.mark.parametrize("fam", list(Family), ids=lambda f: f.value)
def test_sender_receives_every_reply(topology, bpffs, tmp_path, hook, fam):
    restore(topology, bpffs, tmp_path, hook, fam, ruleset(fam))
    _, dst = addresses(topology, fam)
    with xdp_on_peer(topology) if hook == "xdp" else contextlib.nullcontext():
        assert_refused(topology.sender.ns, fam, dst, TCP_RESET_PORT)
        # An ICMP error that arrives while connect() still holds the socket is only a soft
        # error (tcp_v4_err, tcp_v6_err): over veth it can come back that fast, and then the
        # SYN retransmitted a second later gets the one that aborts the connection.
        assert_refused(topology.sender.ns, fam, dst, TCP_DEFAULT_PORT, fast=False)
        for port, name, (icmp_type, code) in icmp_kinds(fam):
            got = icmp_error(topology.sender.ns, fam, dst, port)
            assert got == (ERRNO[fam][code], SO_EE_ORIGIN[fam], icmp_type, code, dst), name


@pytest.mark.parametrize("fam", list(Family), ids=lambda f: f.value)
def test_reject_on_tc_egress_answers_the_local_sender(topology, bpffs, tmp_path, fam):
    """OUTPUT at tc egress: the reply goes up into this host, as if the peer had sent it."""
    text = ("*filter\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
            f"-A OUTPUT -p tcp --dport {TCP_RESET_PORT} -j REJECT --reject-with tcp-reset\n"
            f"-A OUTPUT -p udp --dport {ICMP_BASE} -j REJECT\nCOMMIT\n")
    restore(topology, bpffs, tmp_path, "tc", fam, text, side="sender")
    _, dst = addresses(topology, fam)
    assert_refused(topology.sender.ns, fam, dst, TCP_RESET_PORT)
    port_unreach = (3, 3) if fam is Family.IPV4 else (1, 4)
    assert icmp_error(topology.sender.ns, fam, dst, ICMP_BASE) == (
        errno.ECONNREFUSED, SO_EE_ORIGIN[fam], *port_unreach, dst)
