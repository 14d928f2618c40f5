"""REJECT on hooks that can transmit: the offending frame becomes the kernel's reply and goes back.

The replies are the ones the kernel's REJECT builds at the ingress hook (nf_reject_ipv4.c and
nf_reject_ipv6.c: nf_reject_skb_v{4,6}_tcp_reset, nf_reject_skb_v{4,6}_unreach):

- IPv4 header: no options, TOS 0, ID 0, DF, TTL 64 (net.ipv4.ip_default_ttl's default);
  IPv6 header: traffic class and flow label 0, hop limit 64 (net.ipv6.conf.all.hop_limit).
  Source = the packet's destination, destination = its source.
- TCP reset: ports swapped, no options, window 0; when the segment had ACK, seq = its ack_seq
  and only RST is set; otherwise seq 0, ack = seq + SYN + FIN + payload length, RST|ACK.
- ICMP destination unreachable quoting the offending packet from its network header: at most
  536 bytes (IPv4, the reply stays within 576) or 1220 bytes (IPv6, within the minimum MTU).

No reply is sent where the kernel sends none (the packet is just dropped): for a non-first
fragment, a TCP reset, an ICMP error (icmp_send, is_ineligible), a packet from or to a multicast,
broadcast or unspecified address; an ICMP error answers only frames addressed to this host's MAC
address, a reset any frame but one for another host. Unlike the kernel, the offending packet's
transport checksum is not verified and replies are not rate limited.

The reply is built in a per-CPU buffer (its link-layer header right-aligned at HEAD, the network
header from HEAD on), then the flavour resizes the packet, the buffer is stored over it from
offset 0, and the flavour returns the action that sends it back out of the interface.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from ..bpf import insn as I
from ..bpf.asm import Assembler
from ..bpf.consts import Helper, MapType
from ..bpf.insn import AluOp, JmpOp
from ..bpf.maps import MapSpec
from ..ir.model import Family
from ..matches.kernel import IpProto, PacketType
from . import layout as L
from .hooks.base import Verdict

if TYPE_CHECKING:
    from ..matches.targets import Reject

REJECT_BUF = "reject_buf"  # map key of the per-CPU reply buffer

ETH_HLEN = 14
MAC_LEN = 6
MAX_L2 = 22  # Ethernet header and two VLAN tags: the most the parser accepts
HEAD = 24  # buffer offset of the reply's network header (the link-layer header ends here)
PSEUDO = 1600  # 40 bytes: the pseudo-header of the transport checksum
CSUM_CHUNK = 512  # bpf_csum_diff sums at most 512 bytes per call
BUF_SIZE = PSEUDO + 64

IPDEFTTL = 64
QUOTE = {Family.IPV4: 536, Family.IPV6: 1220}  # bytes of the offending packet an error quotes
IPHL = {Family.IPV4: 20, Family.IPV6: 40}
ICMP_HLEN = 8
TCP_HLEN = 20

IP_DF = 0x4000
TCP_FIN, TCP_SYN, TCP_RST, TCP_ACK = 0x01, 0x02, 0x04, 0x10
# icmp_send answers no ICMP error (icmp_pointers[type].error) and no type above NR_ICMP_TYPES.
ICMP_ERRORS = (3, 4, 5, 11, 12)
NR_ICMP_TYPES = 18
ICMPV6_INFOMSG_MASK = 0x80  # ICMPv6 types below it are errors
IPV4_MULTICAST_FIRST, IPV4_LOOPBACK_FIRST = 224, 127
IPV6_MULTICAST_FIRST = 0xFF


class ReplyPath(Protocol):
    """What a flavour that can send replies provides to the builders below."""

    family: Family
    egress: bool
    reply_load: Helper  # (ctx, offset, to, len): 0 when the bytes were copied
    reply_store: Helper  # (ctx, offset, from, len, flags)
    reply_store_flags: int

    def verdict_code(self, verdict: Verdict) -> int:
        """The program return code for an ACCEPT or DROP."""

    def emit_resize(self, a: Assembler) -> None:
        """Make the packet r2 bytes long; r0 = 0 on success (r1-r5 clobbered)."""

    def emit_send(self, a: Assembler) -> None:
        """Return the action that sends the packet back where it came from."""


def buffer_spec() -> MapSpec:
    """The per-CPU buffer replies are built in."""
    return MapSpec(MapType.PERCPU_ARRAY, 4, BUF_SIZE, 1, name="bpfilter_rej")


def verdict_code(index: int) -> int:
    """The internal verdict of the program's REJECT kind number `index`."""
    return Verdict.REJECT | index << 8


def emit_replies(a: Assembler, path: ReplyPath, kinds: Sequence[Reject]) -> None:
    """Turn the packet into the reply of kind number r7 >> 8 and send it, or drop it.

    Runs at the end of the main program: r6 is the context, r9 the packet struct."""
    _Builder(a, path).emit(kinds)


class _Builder:
    def __init__(self, a: Assembler, path: ReplyPath) -> None:
        self.a = a
        self.path = path
        self.v4 = path.family is Family.IPV4
        self.iphl = IPHL[path.family]
        self.l4 = HEAD + self.iphl  # buffer offset of the reply's transport header
        self.drop = a.label("reject_drop")

    def emit(self, kinds: Sequence[Reject]) -> None:
        a = self.a
        a.emit(I.st(I.W, I.R10, L.KEY_OFF, 0))
        a.emit(I.mov64(I.R2, I.R10), I.alu64(AluOp.ADD, I.R2, L.KEY_OFF, reg=False))
        a.ld_map(I.R1, REJECT_BUF)
        a.emit(I.call_helper(Helper.map_lookup_elem))
        a.jump(JmpOp.JEQ, I.R0, 0, self.drop)
        a.emit(I.mov64(I.R8, I.R0))
        self._addresses()
        a.emit(I.ldx(I.H, I.R1, L.R_PKT, L.FRAGOFF))
        a.jump(JmpOp.JNE, I.R1, 0, self.drop)
        self._link_header()
        labels = [a.label(f"reject_{k.name}") for k in kinds]
        a.emit(I.mov64(I.R1, I.R7), I.alu64(AluOp.RSH, I.R1, 8, reg=False))
        for i, lab in enumerate(labels):
            a.jump(JmpOp.JEQ, I.R1, i, lab)
        a.goto(self.drop)
        for kind, lab in zip(kinds, labels, strict=True):
            a.place(lab)
            a.comment(f"REJECT --reject-with {kind.name}")
            if kind.icmp is None:
                self._tcp_reset()
            else:
                self._unreachable(*kind.icmp)
            self._send()
        a.place(self.drop)
        a.emit(I.mov64_imm(I.R0, self.path.verdict_code(Verdict.DROP)), I.exit_())

    # -- pieces shared by every kind ------------------------------------------------------

    def _addresses(self) -> None:
        """No reply to or from multicast, broadcast, unspecified (or IPv4 loopback) addresses:
        the stack drops those packets (martians) or refuses to answer them."""
        a, drop = self.a, self.drop
        if self.v4:
            for off, loopback_too in ((12, True), (16, False)):
                a.emit(I.ldx(I.B, I.R1, L.R_PKT, L.L3 + off))
                a.jump(JmpOp.JEQ, I.R1, 0, drop)
                if loopback_too:
                    a.jump(JmpOp.JEQ, I.R1, IPV4_LOOPBACK_FIRST, drop)
                a.jump(JmpOp.JGE, I.R1, IPV4_MULTICAST_FIRST, drop)  # and 255.255.255.255
            return
        a.emit(I.ldx(I.B, I.R1, L.R_PKT, L.V6ERR))
        a.jump(JmpOp.JNE, I.R1, 0, drop)  # the header chain could not be walked
        for off in (8, 24):
            a.emit(I.ldx(I.B, I.R1, L.R_PKT, L.L3 + off))
            a.jump(JmpOp.JEQ, I.R1, IPV6_MULTICAST_FIRST, drop)
            a.emit(I.ldx(I.DW, I.R1, L.R_PKT, L.L3 + off),
                   I.ldx(I.DW, I.R2, L.R_PKT, L.L3 + off + 8))
            a.emit(I.alu64(AluOp.OR, I.R1, I.R2, reg=True))
            a.jump(JmpOp.JEQ, I.R1, 0, drop)

    def _pkttype(self, *, host_only: bool) -> None:
        """ICMP errors answer frames for this host only (icmp_send, icmp6_send); a reset any
        frame the stack accepts (it drops those for other hosts)."""
        if self.path.egress:
            return  # leaving this host: the frame is addressed to the next hop
        self.a.emit(I.ldx(I.B, I.R1, L.R_PKT, L.PKTTYPE))
        if host_only:
            self.a.jump(JmpOp.JNE, I.R1, PacketType.HOST, self.drop)
        else:
            self.a.jump(JmpOp.JEQ, I.R1, PacketType.OTHERHOST, self.drop)

    def _l2len(self, reg: int) -> None:
        """reg = the link-layer header's length, bounded for the verifier."""
        self.a.emit(I.ldx(I.W, reg, L.R_PKT, L.L3OFF))
        self.a.jump(JmpOp.JGT, reg, MAX_L2, self.drop)
        self.a.jump(JmpOp.JLT, reg, ETH_HLEN, self.drop)

    def _l2ptr(self, reg: int, tmp: int) -> None:
        """reg = where the link-layer header starts in the buffer (tmp = its length)."""
        self._l2len(tmp)
        self.a.emit(I.mov64_imm(reg, HEAD), I.alu64(AluOp.SUB, reg, tmp, reg=True))
        self.a.emit(I.alu64(AluOp.ADD, reg, I.R8, reg=True))

    def _link_header(self) -> None:
        """The frame's link-layer header (VLAN tags kept), source and destination swapped."""
        a = self.a
        self._l2ptr(I.R3, I.R4)
        a.emit(I.mov64(I.R1, L.R_CTX), I.mov64_imm(I.R2, 0))
        a.emit(I.call_helper(self.path.reply_load))
        a.jump(JmpOp.JNE, I.R0, 0, self.drop)
        self._l2ptr(I.R5, I.R1)
        a.emit(I.ldx(I.W, I.R1, I.R5, 0), I.ldx(I.H, I.R2, I.R5, 4))
        a.emit(I.ldx(I.W, I.R3, I.R5, MAC_LEN), I.ldx(I.H, I.R4, I.R5, MAC_LEN + 4))
        a.emit(I.stx(I.W, I.R5, I.R3, 0), I.stx(I.H, I.R5, I.R4, 4))
        a.emit(I.stx(I.W, I.R5, I.R1, MAC_LEN), I.stx(I.H, I.R5, I.R2, MAC_LEN + 4))

    def _put(self, off: int, data: bytes) -> None:
        """Constant bytes at buffer offset `off`."""
        i = 0
        while i < len(data):
            size, width = (I.W, 4) if len(data) - i >= 4 else (I.H, 2) if len(data) - i >= 2 \
                else (I.B, 1)
            value = int.from_bytes(data[i:i + width], "little")
            self.a.emit(I.st(size, I.R8, off + i, I.s32(value) if width == 4 else value))
            i += width

    def _copy(self, dst: int, src: int, length: int) -> None:
        """Packet-struct bytes [src, src+length) to buffer offset `dst` (8-byte aligned src)."""
        for i in range(0, length, 8):
            size = I.DW if length - i >= 8 else I.W
            self.a.emit(I.ldx(size, I.R1, L.R_PKT, src + i), I.stx(size, I.R8, I.R1, dst + i))

    def _network_header(self, proto: int, payload_reg: int | None, payload: int) -> None:
        """The reply's IP header; its length field from `payload_reg` + `payload` bytes after
        it (or the constant `payload`)."""
        a = self.a
        if self.v4:
            self._put(HEAD, bytes([0x45, 0]))
            self._put(HEAD + 4, (0).to_bytes(2, "big") + IP_DF.to_bytes(2, "big")
                      + bytes([IPDEFTTL, proto, 0, 0]))
            size_off, extra = HEAD + 2, self.iphl + payload
        else:
            self._put(HEAD, bytes([0x60, 0, 0, 0]))
            self._put(HEAD + 6, bytes([proto, IPDEFTTL]))
            size_off, extra = HEAD + 4, payload
        if payload_reg is None:
            self._put(size_off, extra.to_bytes(2, "big"))
        else:
            a.emit(I.mov64(I.R1, payload_reg), I.alu64(AluOp.ADD, I.R1, extra, reg=False))
            a.emit(I.endian(I.R1, 16, big=True), I.stx(I.H, I.R8, I.R1, size_off))
        if self.v4:
            a.emit(I.ldx(I.W, I.R1, L.R_PKT, L.L3 + 16), I.stx(I.W, I.R8, I.R1, HEAD + 12))
            a.emit(I.ldx(I.W, I.R1, L.R_PKT, L.L3 + 12), I.stx(I.W, I.R8, I.R1, HEAD + 16))
        else:
            self._copy(HEAD + 8, L.L3 + 24, 16)
            self._copy(HEAD + 24, L.L3 + 8, 16)

    def _pseudo_header(self, proto: int, length_reg: int | None, length: int) -> int:
        """The transport pseudo-header at PSEUDO (addresses from the reply); its size."""
        a = self.a
        if self.v4:
            a.emit(I.ldx(I.DW, I.R1, I.R8, HEAD + 12), I.stx(I.DW, I.R8, I.R1, PSEUDO))
            self._put(PSEUDO + 8, bytes([0, proto]) + length.to_bytes(2, "big"))
            return 12
        for i in range(0, 32, 8):
            a.emit(I.ldx(I.DW, I.R1, I.R8, HEAD + 8 + i), I.stx(I.DW, I.R8, I.R1, PSEUDO + i))
        if length_reg is None:
            self._put(PSEUDO + 32, length.to_bytes(4, "big"))
        else:
            a.emit(I.mov64(I.R1, length_reg), I.alu64(AluOp.ADD, I.R1, length, reg=False))
            a.emit(I.endian(I.R1, 32, big=True), I.stx(I.W, I.R8, I.R1, PSEUDO + 32))
        self._put(PSEUDO + 36, proto.to_bytes(4, "big"))
        return 40

    def _sum(self, off: int, size: int) -> None:
        """r5 = the checksum of `size` buffer bytes at `off` (a multiple of 4), seeded with r5."""
        a = self.a
        a.emit(I.mov64_imm(I.R1, 0), I.mov64_imm(I.R2, 0))
        a.emit(I.mov64(I.R3, I.R8), I.alu64(AluOp.ADD, I.R3, off, reg=False))
        a.emit(I.mov64_imm(I.R4, size), I.call_helper(Helper.csum_diff))
        a.jump(JmpOp.JSLT, I.R0, 0, self.drop)
        a.emit(I.mov64(I.R5, I.R0))

    def _store_csum(self, off: int) -> None:
        """Fold the sum in r5 to 16 bits and store its complement at buffer offset `off`."""
        a = self.a
        for _ in range(2):  # 32 bits -> 17 -> 16
            a.emit(I.mov64(I.R1, I.R5), I.alu64(AluOp.RSH, I.R1, 16, reg=False))
            a.emit(I.alu64(AluOp.AND, I.R5, 0xFFFF, reg=False))
            a.emit(I.alu64(AluOp.ADD, I.R5, I.R1, reg=True))
        a.emit(I.alu64(AluOp.XOR, I.R5, 0xFFFF, reg=False), I.stx(I.H, I.R8, I.R5, off))

    def _ip_checksum(self) -> None:
        if self.v4:
            self.a.emit(I.mov64_imm(I.R5, 0))
            self._sum(HEAD, self.iphl)
            self._store_csum(HEAD + 10)

    # -- the kinds ------------------------------------------------------------------------

    def _tcp_reset(self) -> None:
        """nf_reject_ip_tcphdr_put / nf_reject_ip6_tcphdr_put."""
        a, t = self.a, self.l4
        self._pkttype(host_only=False)
        a.emit(I.ldx(I.B, I.R1, L.R_PKT, L.L4PROTO))
        a.jump(JmpOp.JNE, I.R1, IpProto.TCP, self.drop)
        a.emit(I.ldx(I.B, I.R1, L.R_PKT, L.L4AVAIL))
        a.jump(JmpOp.JLT, I.R1, TCP_HLEN, self.drop)
        a.emit(I.ldx(I.B, I.R1, L.R_PKT, L.L4 + 13))
        a.jump(JmpOp.JSET, I.R1, TCP_RST, self.drop)  # no reset for a reset
        self._network_header(IpProto.TCP, None, TCP_HLEN)
        a.emit(I.ldx(I.H, I.R2, L.R_PKT, L.L4 + 2), I.stx(I.H, I.R8, I.R2, t))
        a.emit(I.ldx(I.H, I.R2, L.R_PKT, L.L4), I.stx(I.H, I.R8, I.R2, t + 2))
        acked, flags_done = a.label("acked"), a.label("rst_flags")
        a.emit(I.ldx(I.B, I.R1, L.R_PKT, L.L4 + 13))
        a.jump(JmpOp.JSET, I.R1, TCP_ACK, acked)
        # ack = seq + SYN + FIN + payload length (mod 2^32), seq 0
        a.emit(I.ldx(I.W, I.R2, L.R_PKT, L.L4 + 4), I.endian(I.R2, 32, big=True))
        a.emit(I.mov64(I.R3, I.R1), I.alu64(AluOp.AND, I.R3, TCP_FIN, reg=False))
        a.emit(I.alu64(AluOp.ADD, I.R2, I.R3, reg=True))
        a.emit(I.mov64(I.R3, I.R1), I.alu64(AluOp.RSH, I.R3, 1, reg=False))
        a.emit(I.alu64(AluOp.AND, I.R3, TCP_SYN >> 1, reg=False))
        a.emit(I.alu64(AluOp.ADD, I.R2, I.R3, reg=True))
        a.emit(I.ldx(I.H, I.R3, L.R_PKT, L.IPLEN), I.alu64(AluOp.ADD, I.R2, I.R3, reg=True))
        a.emit(I.ldx(I.W, I.R3, L.R_PKT, L.L4OFF), I.alu64(AluOp.SUB, I.R2, I.R3, reg=True))
        a.emit(I.ldx(I.B, I.R3, L.R_PKT, L.L4 + 12), I.alu64(AluOp.RSH, I.R3, 4, reg=False))
        a.emit(I.alu64(AluOp.LSH, I.R3, 2, reg=False), I.alu64(AluOp.SUB, I.R2, I.R3, reg=True))
        a.emit(I.endian(I.R2, 32, big=True), I.stx(I.W, I.R8, I.R2, t + 8))
        a.emit(I.st(I.W, I.R8, t + 4, 0), I.st(I.B, I.R8, t + 13, TCP_RST | TCP_ACK))
        a.goto(flags_done)
        a.place(acked)  # seq = the segment's ack_seq, RST alone
        a.emit(I.ldx(I.W, I.R2, L.R_PKT, L.L4 + 8), I.stx(I.W, I.R8, I.R2, t + 4))
        a.emit(I.st(I.W, I.R8, t + 8, 0), I.st(I.B, I.R8, t + 13, TCP_RST))
        a.place(flags_done)
        a.emit(I.st(I.B, I.R8, t + 12, (TCP_HLEN // 4) << 4))
        self._put(t + 14, bytes(6))  # window, checksum, urgent pointer
        size = self._pseudo_header(IpProto.TCP, None, TCP_HLEN)
        a.emit(I.mov64_imm(I.R5, 0))
        self._sum(PSEUDO, size)
        self._sum(t, TCP_HLEN)
        self._store_csum(t + 16)
        self._ip_checksum()
        a.emit(I.mov64_imm(I.R7, self.iphl + TCP_HLEN))

    def _unreachable(self, icmp_type: int, code: int) -> None:
        """nf_reject_skb_v4_unreach / nf_reject_skb_v6_unreach, refusing what icmp_send and
        icmp6_send refuse."""
        a, t = self.a, self.l4
        proto = IpProto.ICMP if self.v4 else IpProto.ICMPV6
        self._pkttype(host_only=True)
        eligible = a.label("eligible")
        a.emit(I.ldx(I.B, I.R1, L.R_PKT, L.L4PROTO))
        a.jump(JmpOp.JNE, I.R1, proto, eligible)
        a.emit(I.ldx(I.B, I.R1, L.R_PKT, L.L4AVAIL))
        a.jump(JmpOp.JEQ, I.R1, 0, self.drop)  # its type is unreadable
        a.emit(I.ldx(I.B, I.R1, L.R_PKT, L.L4))
        if self.v4:
            a.jump(JmpOp.JGT, I.R1, NR_ICMP_TYPES, self.drop)
            for e in ICMP_ERRORS:
                a.jump(JmpOp.JEQ, I.R1, e, self.drop)
        else:
            a.jump(JmpOp.JLT, I.R1, ICMPV6_INFOMSG_MASK, self.drop)
        a.place(eligible)
        # r7 = the quoted length: the datagram (without link-layer padding), capped
        fits = a.label("fits")
        a.emit(I.ldx(I.H, I.R7, L.R_PKT, L.IPLEN))
        a.jump(JmpOp.JLE, I.R7, QUOTE[self.path.family], fits)
        a.emit(I.mov64_imm(I.R7, QUOTE[self.path.family]))
        a.place(fits)
        a.jump(JmpOp.JLT, I.R7, self.iphl, self.drop)
        quote = t + ICMP_HLEN
        # csum_diff sums whole words: the bytes after the quote up to the next word are zero.
        a.emit(I.mov64(I.R1, I.R7), I.alu64(AluOp.AND, I.R1, -4, reg=False))
        a.emit(I.alu64(AluOp.ADD, I.R1, I.R8, reg=True), I.st(I.W, I.R1, quote, 0))
        self._l2len(I.R2)
        a.emit(I.mov64(I.R1, L.R_CTX))
        a.emit(I.mov64(I.R3, I.R8), I.alu64(AluOp.ADD, I.R3, quote, reg=False))
        a.emit(I.mov64(I.R4, I.R7), I.call_helper(self.path.reply_load))
        a.jump(JmpOp.JNE, I.R0, 0, self.drop)
        self._network_header(proto, I.R7, ICMP_HLEN)
        self._put(t, bytes([icmp_type, code]) + bytes(6))
        a.emit(I.mov64_imm(I.R5, 0))
        if not self.v4:
            self._sum(PSEUDO, self._pseudo_header(proto, I.R7, ICMP_HLEN))
        done = a.label("summed")
        total = ICMP_HLEN + QUOTE[self.path.family]
        for k in range(0, total, CSUM_CHUNK):
            # chunk size: the rest of the message rounded up to a word, at most CSUM_CHUNK
            small = a.label("chunk")
            a.emit(I.mov64(I.R4, I.R7), I.alu64(AluOp.ADD, I.R4, ICMP_HLEN + 3 - k, reg=False))
            a.jump(JmpOp.JSLE, I.R4, 0, done)
            a.emit(I.alu64(AluOp.AND, I.R4, -4, reg=False))
            a.jump(JmpOp.JLE, I.R4, CSUM_CHUNK, small)
            a.emit(I.mov64_imm(I.R4, CSUM_CHUNK))
            a.place(small)
            a.emit(I.mov64_imm(I.R1, 0), I.mov64_imm(I.R2, 0))
            a.emit(I.mov64(I.R3, I.R8), I.alu64(AluOp.ADD, I.R3, t + k, reg=False))
            a.emit(I.call_helper(Helper.csum_diff))
            a.jump(JmpOp.JSLT, I.R0, 0, self.drop)
            a.emit(I.mov64(I.R5, I.R0))
        a.place(done)
        self._store_csum(t + 2)
        self._ip_checksum()
        a.emit(I.alu64(AluOp.ADD, I.R7, self.iphl + ICMP_HLEN, reg=False))

    def _send(self) -> None:
        """r7 = the reply's length after the link-layer header: resize, store, send."""
        a = self.a
        self._l2len(I.R2)
        a.emit(I.alu64(AluOp.ADD, I.R2, I.R7, reg=True))
        self.path.emit_resize(a)
        a.jump(JmpOp.JNE, I.R0, 0, self.drop)
        self._l2ptr(I.R3, I.R4)
        a.emit(I.alu64(AluOp.ADD, I.R4, I.R7, reg=True))
        a.emit(I.mov64(I.R1, L.R_CTX), I.mov64_imm(I.R2, 0))
        a.emit(I.mov64_imm(I.R5, self.path.reply_store_flags))
        a.emit(I.call_helper(self.path.reply_store))
        a.jump(JmpOp.JNE, I.R0, 0, self.drop)
        self.path.emit_send(a)

