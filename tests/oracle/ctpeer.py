"""Both ends of a scenario's flows, for one receiver: the emulated peer and the receiver's sockets.

`Peer` turns a peer step into the frame for this receiver. Its own sequence numbers are the same
for every receiver; the receiver's are learned from the frames the receiver sent (`absorb`), so
`ack next` acknowledges exactly what this receiver sent and an ICMP error quotes the packet this
receiver really sent. `LocalHost` runs the local steps with real sockets inside the receiver's
namespace.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket
import struct
from dataclasses import dataclass, field

from bpfilter import netns
from bpfilter.ir.model import Family

from .ctflows import Flow, Scenario, Step
from .ctrig import LOCALS, RX_MAC, TX_MAC
from .frames import CSUM_AT, TCP_FLAG_BITS, EtherType, IpProto, PacketSpec, checksum, icmp_bytes

MOD = 1 << 32
FAR = 0x40000000  # a quarter of the sequence space: outside any window
AHEAD = 1000  # out of order, but inside the window
PEER_ISN = 0x1000_0000
MSS = b"\x02\x04\x05\xb4"
WINDOW = 65535
TFTP_RRQ = b"\x00\x01file\x00octet\x00"

# (type, code) of the ICMP errors a peer sends: Step.code 0 unreachable, 1 time exceeded.
ICMP4_ERRORS = {("udp", 0): (3, 3), ("tcp", 0): (3, 1), ("icmp", 0): (3, 1), (None, 1): (11, 0)}
ICMP6_ERRORS = {("udp", 0): (1, 4), ("tcp", 0): (1, 1), ("icmp", 0): (1, 3), (None, 1): (3, 0)}
ECHO = {Family.IPV4: (8, 0), Family.IPV6: (128, 129)}  # (request, reply)
ICMP_PROTO = {Family.IPV4: IpProto.ICMP, Family.IPV6: IpProto.ICMPV6}
PROTO_NUM = {"tcp": IpProto.TCP, "udp": IpProto.UDP}


def tcp_segment(sport: int, dport: int, seq: int, ack: int, flags: str,
                payload: bytes = b"") -> bytes:
    """A TCP header (an MSS option on SYNs, a full window) and payload."""
    bits = sum(TCP_FLAG_BITS[f] for f in flags)
    opts = MSS if "S" in flags else b""
    return struct.pack("!HHIIBBHHH", sport, dport, seq % MOD, ack % MOD if "A" in flags else 0,
                       (5 + len(opts) // 4) << 4, bits, WINDOW, 0, 0) + opts + payload


def udp_payload(flow: Flow, size: int) -> bytes:
    """TFTP read requests to port 69 (the helper parses them), filler bytes otherwise."""
    if TFTP_PORT in (flow.local_port, flow.peer_port):
        return TFTP_RRQ
    return b"u" * max(size, 4)


TFTP_PORT = 69


def echo(fam: Family, reply: bool, ident: int, seq: int) -> bytes:
    """An ICMP/ICMPv6 echo request or reply (checksum left to the frame builder)."""
    return icmp_bytes(ECHO[fam][1 if reply else 0], 0, struct.pack("!HH", ident, seq), b"ping")


@dataclass(frozen=True)
class Parsed:
    """What the peer needs from a frame the receiver sent."""

    src: str
    dst: str
    proto: int
    l4: bytes
    packet: bytes  # the IP packet (for quoting in ICMP errors)


def parse_frame(frame: bytes) -> Parsed | None:
    """The IP packet in an Ethernet frame (None for anything else)."""
    return parse_ip(int.from_bytes(frame[12:14], "big"), frame[14:])


def parse_ip(etype: int, ip: bytes) -> Parsed | None:
    """An IPv4 or IPv6 packet (by its Ethernet type), without extension headers."""
    if etype == EtherType.IPV4 and len(ip) >= 20:
        ihl, total = (ip[0] & 0xF) * 4, int.from_bytes(ip[2:4], "big")
        ip = ip[:total]
        return Parsed(str(ipaddress.IPv4Address(ip[12:16])), str(ipaddress.IPv4Address(ip[16:20])),
                      ip[9], ip[ihl:], ip)
    if etype == EtherType.IPV6 and len(ip) >= 40:
        ip = ip[:40 + int.from_bytes(ip[4:6], "big")]
        return Parsed(str(ipaddress.IPv6Address(ip[8:24])), str(ipaddress.IPv6Address(ip[24:40])),
                      ip[6], ip[40:], ip)
    return None


def _after(a: int, b: int) -> bool:
    """Sequence number a comes after b (modulo 2^32)."""
    return 0 < (a - b) % MOD < MOD // 2


@dataclass
class TcpEnd:
    """The peer's side of a TCP flow, and what it learned of the receiver's."""

    nxt: int
    last: int
    their: int | None = None  # the receiver's next sequence number


@dataclass
class Peer:
    """The emulated peer of a scenario, facing one receiver."""

    scenario: Scenario
    tcp: dict[int, TcpEnd] = field(default_factory=dict)
    last_out: dict[int, bytes] = field(default_factory=dict)  # the receiver's last packet
    echo_seq: dict[int, int] = field(default_factory=dict)
    heard: list[str] = field(default_factory=list)  # what the receiver sent, for reports

    @property
    def fam(self) -> Family:
        """The scenario's family."""
        return self.scenario.family

    def _end(self, i: int) -> TcpEnd:
        if i not in self.tcp:
            isn = PEER_ISN + i * 0x100000
            self.tcp[i] = TcpEnd(isn, isn)
        return self.tcp[i]

    def frame(self, step: Step) -> bytes:
        """The frame of a peer step, for this receiver."""
        f = self.scenario.flows[step.flow]
        sport = step.sport if step.sport is not None else f.peer_port
        dst = f.local
        if step.op == "tcp":
            l4, proto = self._tcp(step, f, sport), IpProto.TCP
        elif step.op == "udp":
            l4 = struct.pack("!HHHH", sport, f.local_port, 8 + len(p := udp_payload(f, step.size)),
                             0) + p
            proto = IpProto.UDP
        elif step.op in ("echo", "echo-reply"):
            reply = step.op == "echo-reply"
            n = self.echo_seq.get(step.flow, 0) + (0 if reply else 1)
            if not reply:
                self.echo_seq[step.flow] = n
            ident = f.local_port if reply else f.peer_port
            l4, proto = echo(self.fam, reply, ident, max(n, 1)), ICMP_PROTO[self.fam]
        elif step.op == "icmp-error":
            l4, dst = self._icmp_error(step, f)
            proto = ICMP_PROTO[self.fam]
        else:
            raise ValueError(f"not a peer step: {step.op}")
        spec = PacketSpec(self.fam, f.peer, dst, int(proto), l4, df=proto == IpProto.TCP)
        frame = spec.frame(TX_MAC, RX_MAC)
        if step.badsum:
            head = 14 + (20 if self.fam is Family.IPV4 else 40)
            at = head + CSUM_AT[IpProto(proto)]
            frame = frame[:at] + bytes([frame[at] ^ 0x5A]) + frame[at + 1 :]
        return frame

    def _tcp(self, step: Step, f: Flow, sport: int) -> bytes:
        end = self._end(step.flow)
        seq = {"next": end.nxt, "old": end.last, "ahead": end.nxt + AHEAD,
               "far": end.nxt + FAR}[step.seq]
        their = end.their or 0
        ack = {"next": their, "old": their - 1, "far": their + FAR, "zero": 0}[step.ack]
        if step.seq == "next":
            end.last = end.nxt
            end.nxt = (end.nxt + step.size + ("S" in step.flags) + ("F" in step.flags)) % MOD
        return tcp_segment(sport, f.local_port, seq, ack, step.flags, b"d" * step.size)

    def _quoted(self, step: Step, f: Flow) -> bytes:
        """The packet an ICMP error quotes: the receiver's own, or one made up for the flow."""
        if step.about == "last" and step.flow in self.last_out:
            return self.last_out[step.flow]
        lport = f.local_port + (1000 if step.about == "stranger" else 0)
        if f.proto == "tcp":
            their = self.tcp[step.flow].their if step.flow in self.tcp else None
            l4, proto = tcp_segment(lport, f.peer_port, their or 1, 0, "S"), IpProto.TCP
        elif f.proto == "udp":
            l4 = struct.pack("!HHHH", lport, f.peer_port, 12, 0) + b"quot"
            proto = IpProto.UDP
        else:
            l4, proto = echo(self.fam, False, lport, 1), ICMP_PROTO[self.fam]
        spec = PacketSpec(self.fam, f.local, f.peer, int(proto), l4)
        return spec.ipv4() if self.fam is Family.IPV4 else spec.ipv6()

    def _icmp_error(self, step: Step, f: Flow) -> tuple[bytes, str]:
        quoted = self._quoted(step, f)
        table = ICMP4_ERRORS if self.fam is Family.IPV4 else ICMP6_ERRORS
        type_, code = table[(f.proto, 0) if step.code == 0 else (None, 1)]
        inner = parse_ip(EtherType.IPV4 if self.fam is Family.IPV4 else EtherType.IPV6, quoted)
        dst = inner.src if inner else f.local
        if step.wrong_dst:
            dst = next(a for a in LOCALS[self.fam] if a != dst)
        return icmp_bytes(type_, code, b"\0\0\0\0", quoted[:512]), dst

    # -- what the receiver sent ------------------------------------------------------------

    def absorb(self, frames: list[bytes]) -> None:
        """Learn from frames the receiver sent: its sequence numbers, its last packets."""
        for frame in frames:
            p = parse_frame(frame)
            if p is None:
                continue
            i = self._flow_of(p)
            self.heard.append(self._summary(p, i))
            if i is None:
                continue
            self.last_out[i] = p.packet
            if p.proto == IpProto.TCP and len(p.l4) >= 20:
                seq = int.from_bytes(p.l4[4:8], "big")
                flags = p.l4[13]
                size = len(p.l4) - (p.l4[12] >> 4) * 4
                end_seq = (seq + size + bool(flags & TCP_FLAG_BITS["S"])
                           + bool(flags & TCP_FLAG_BITS["F"])) % MOD
                end = self._end(i)
                if end.their is None or _after(end_seq, end.their) or flags & TCP_FLAG_BITS["S"]:
                    end.their = end_seq

    def _flow_of(self, p: Parsed) -> int | None:
        for i, f in enumerate(self.scenario.flows):
            if p.src != f.local or p.dst != f.peer:
                continue
            if f.proto == "icmp" and p.proto == ICMP_PROTO[self.fam] and len(p.l4) >= 8 \
                    and p.l4[0] in ECHO[self.fam] \
                    and int.from_bytes(p.l4[4:6], "big") == f.local_port:
                return i
            if f.proto in PROTO_NUM and p.proto == PROTO_NUM[f.proto] and len(p.l4) >= 4 \
                    and struct.unpack("!HH", p.l4[:4]) == (f.local_port, f.peer_port):
                return i
        return None

    def _summary(self, p: Parsed, flow: int | None) -> str:
        where = f"flow {flow}" if flow is not None else f"{p.src} -> {p.dst}"
        if p.proto == IpProto.TCP and len(p.l4) >= 14:
            flags = "".join(n for n, b in TCP_FLAG_BITS.items() if p.l4[13] & b and n in "FSRPA")
            return f"{where}: tcp {flags}"
        if p.proto in (IpProto.ICMP, IpProto.ICMPV6) and p.l4:
            return f"{where}: icmp type {p.l4[0]} code {p.l4[1]}"
        return f"{where}: proto {p.proto}"


# -- the receiver's own sockets -------------------------------------------------------------

LISTEN_PORTS = (22, 80)  # TCP services of the receivers (other ports are closed)
UDP_OPEN_PORT = 53  # bound by incoming UDP flows to it (never read: nothing answers by itself)


def _af(fam: Family) -> int:
    return socket.AF_INET if fam is Family.IPV4 else socket.AF_INET6


def _err(e: OSError) -> str:
    return errno.errorcode.get(e.errno or 0, str(e.errno))


class LocalHost:
    """The sockets of one receiver for one scenario; `close` resets and closes them all."""

    def __init__(self, ns: str, scenario: Scenario) -> None:
        self.ns = ns
        self.scenario = scenario
        self.fam = scenario.family
        self.socks: dict[tuple, socket.socket] = {}
        self.pings: dict[int, int] = {}

    def _sock(self, key: tuple, kind: int, proto: int = 0) -> socket.socket:
        if key not in self.socks:
            with netns.enter(self.ns):
                s = socket.socket(_af(self.fam), kind, proto)
            self.socks[key] = s
        return self.socks[key]

    def open(self) -> None:
        """Listen on the TCP services; bind UDP sockets for incoming flows to the open port."""
        wild = "0.0.0.0" if self.fam is Family.IPV4 else "::"
        for port in LISTEN_PORTS:
            s = self._sock(("listen", port), socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.fam is Family.IPV6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind((wild, port))
            s.listen(256)
        for f in self.scenario.flows:
            if f.proto == "udp" and not f.outgoing and f.local_port == UDP_OPEN_PORT:
                self._udp(f)

    def _udp(self, f: Flow) -> socket.socket:
        key = ("udp", f.local, f.local_port)
        new = key not in self.socks
        s = self._sock(key, socket.SOCK_DGRAM)
        if new:
            s.setblocking(False)
            s.bind((f.local, f.local_port))
        return s

    def do(self, step: Step) -> str:
        """Run a local step; returns what happened (an errno name, or ok)."""
        f = self.scenario.flows[step.flow]
        try:
            self._do(step, f)
        except OSError as e:
            return _err(e)
        return "ok"

    def _do(self, step: Step, f: Flow) -> None:
        key = ("tcp", step.flow)
        if step.op == "connect" and f.proto == "tcp":
            s = self._sock(key, socket.SOCK_STREAM)
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.bind((f.local, f.local_port))
            rc = s.connect_ex((f.peer, f.peer_port))
            if rc not in (0, errno.EINPROGRESS):
                raise OSError(rc, "connect")
        elif step.op == "send" and f.proto == "tcp":
            self._sock(key, socket.SOCK_STREAM).send(b"L" * max(step.size, 1))
        elif step.op in ("send", "reply") and f.proto == "udp":
            self._udp(f).sendto(udp_payload(f, step.size), (f.peer, f.peer_port))
        elif step.op == "send" and f.proto == "icmp":
            self._ping(step.flow, f)
        elif step.op == "close" and key in self.socks:
            self.socks[key].shutdown(socket.SHUT_WR)
        elif step.op == "reset" and key in self.socks:
            self._reset(self.socks.pop(key))
        else:
            raise OSError(errno.EINVAL, f"{step.op} on a {f.proto} flow")

    def _ping(self, i: int, f: Flow) -> None:
        proto = socket.IPPROTO_ICMP if self.fam is Family.IPV4 else socket.IPPROTO_ICMPV6
        key = ("icmp", f.local)
        new = key not in self.socks
        s = self._sock(key, socket.SOCK_RAW, proto)
        if new:
            s.setblocking(False)
            s.bind((f.local, 0))
        n = self.pings[i] = self.pings.get(i, 0) + 1
        msg = echo(self.fam, False, f.local_port, n)
        if self.fam is Family.IPV4:  # the kernel sums ICMPv6 raw sockets itself, not ICMP ones
            msg = msg[:2] + struct.pack("!H", checksum(msg)) + msg[4:]
        s.sendto(msg, (f.peer, 0))

    @staticmethod
    def _reset(s: socket.socket) -> None:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()

    def close(self) -> None:
        """Abort every connection (RST, no TIME_WAIT) and close every socket."""
        for key, s in self.socks.items():
            with contextlib.suppress(OSError):
                if key[0] == "tcp":
                    self._reset(s)
                else:
                    s.close()
        self.socks.clear()
