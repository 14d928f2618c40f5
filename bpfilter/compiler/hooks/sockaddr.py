"""Socket-address programs (BPF_PROG_TYPE_CGROUP_SOCK_ADDR): the nat OUTPUT chain.

A locally generated connection cannot be translated at the netfilter hooks (programs there cannot
change packets) nor at tc egress (conntrack has bound the connection by then). It can be where
the socket API hands the kernel its destination: connect() (TCP, and UDP sockets that connect)
and sendmsg() of an unconnected UDP socket. Rewriting the address there is what nf_nat's DNAT
and REDIRECT in OUTPUT would make of the connection's packets; netfilter evaluates the nat table
once per connection, the programs once per connect or sendmsg.

There is no packet: the prologue synthesises the headers the connection's first packet will
carry into the packet struct (destination address and port, protocol, a TCP SYN), so the
generic rule code and predicates run unchanged. What a socket does not know yet (the source the
route will choose, the output interface, the packet's length, marks set later) is refused by
name (`unsupported_field`); there is no input interface, so `-i X` never matches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ...bpf import insn as I
from ...bpf.asm import Assembler, Label
from ...bpf.consts import ProgType
from ...bpf.insn import AluOp, JmpOp
from ...ir.model import Family
from ...ir.pred import Field
from .. import layout as L
from . import localtable
from .base import Flavour, HookPoint, Verdict

# Offsets in struct bpf_sock_addr (the context) and struct bpf_sock (behind its `sk`).
CTX_USER_IP4, CTX_USER_IP6, CTX_USER_PORT, CTX_PROTOCOL, CTX_SK = 4, 8, 24, 36, 64
SK_SRC_IP4, SK_SRC_IP6, SK_SRC_PORT = 24, 28, 44

# Attach types (enum bpf_attach_type) of the programs the nat OUTPUT chain needs.
CONNECT4, CONNECT6, SENDMSG4, SENDMSG6 = 10, 11, 14, 15
RECVMSG4, RECVMSG6, GETPEERNAME4, GETPEERNAME6 = 19, 20, 29, 30
HELPER_GET_SOCKET_COOKIE, HELPER_GET_NETNS_COOKIE = 46, 122

TCP, UDP = 6, 17
ALLOW, DENY = 1, 0  # cgroup sock_addr return codes (DENY: the call fails with EPERM)

# Maps the runtime provides (runtime/natoutput.py): the namespace's cookie, and per family the
# translations made, so replies and getpeername() show the address the application asked for.
CFG_MAP = "natout_cfg"
REV_MAP = {Family.IPV4: "natout_rev4", Family.IPV6: "natout_rev6"}
# Reverse map layout: key {u64 socket cookie, translated address, be16 port, pad},
# value {original address, be16 port, pad}.
REV_KEY = {Family.IPV4: 16, Family.IPV6: 32}
REV_VALUE = {Family.IPV4: 8, Family.IPV6: 24}
REV_ENTRIES = 65536

# Fields a rule may read here, and why the others cannot be known at connect/sendmsg time.
_KNOWN = {Field.DADDR4, Field.DADDR6, Field.L4PROTO, Field.DPORT, Field.FRAGOFF,
          Field.TCPFLAGS, Field.TCPDOFF, Field.ICMPTYPE, Field.ICMPCODE, Field.IIFNAME,
          Field.RTDST}
_WHY = {
    Field.SADDR4: "-s: the source address is chosen by the route after connect/sendmsg "
                  "(unless the socket is bound, which the rule cannot rely on)",
    Field.SADDR6: "-s: the source address is chosen by the route after connect/sendmsg "
                  "(unless the socket is bound, which the rule cannot rely on)",
    Field.SPORT: "the source port is chosen after connect/sendmsg",
    Field.OIFNAME: "-o: the output interface is chosen by the route after connect/sendmsg",
    Field.MARK: "-m mark: marks are set on the packets later (mangle OUTPUT, SO_MARK)",
    Field.IPLEN: "the packets' lengths are not known at connect/sendmsg",
    Field.TTL: "the packets' TTL is set later",
    Field.TOS: "the packets' TOS is set later",
}


def _le(b: bytes) -> int:
    """A 4-byte network-order value as the signed immediate a little-endian store writes."""
    v = int.from_bytes(b, "little")
    return v - (1 << 32) if v >= 1 << 31 else v


@dataclass
class SockAddrFlavour(Flavour):
    """connect4/6 and udp sendmsg4/6 programs of the nat OUTPUT chain (the same code is loaded
    for both attach types: it reads nothing that differs between them)."""

    name: str = "sock"
    prog_type: ProgType = ProgType.CGROUP_SOCK_ADDR
    attach_type: int | None = None  # set in __post_init__ from the family
    iif: str | None = ""  # locally generated: no input interface (`-i X` never matches)

    def __post_init__(self) -> None:
        if self.attach_type is None:
            self.attach_type = CONNECT4 if self.family is Family.IPV4 else CONNECT6

    @property
    def sendmsg_attach_type(self) -> int:
        """The other attach type the chain's program is loaded for."""
        return SENDMSG4 if self.family is Family.IPV4 else SENDMSG6

    def chains(self, table: str) -> dict[str, HookPoint]:
        """The nat table's OUTPUT chain."""
        return {"OUTPUT": HookPoint("OUTPUT")} if table == "nat" else {}

    def verdict_code(self, verdict: Verdict) -> int:
        """ACCEPT leaves the call alone, DROP makes it fail (EPERM)."""
        return ALLOW if verdict == Verdict.ACCEPT else DENY

    def unsupported_field(self, f: Field) -> str | None:
        """Only what the socket call itself says is known."""
        if f in _KNOWN:
            return None
        if f.name == "RTSRC":
            return "-m addrtype --src-type: the source address is chosen after connect/sendmsg"
        why = _WHY.get(f)
        if why is None:
            why = f"{f.name.lower()} is not known when a socket connects or sends"
        return f"{why} (nat OUTPUT runs at connect/sendmsg)"

    # -- prologue ----------------------------------------------------------------------------

    def emit_setup(self, a: Assembler) -> None:
        """Keep the bpf_sock_addr context in r6."""
        a.emit(I.mov64(L.R_CTX, I.R1))

    def emit_l3_offset(self, a: Assembler, on_pass: Label) -> None:
        """Leave at once unless the socket is TCP or UDP and of the ruleset's namespace."""
        leave, ours = a.label("sock_leave"), a.label("sock_ours")
        emit_netns_check(a, leave)
        a.emit(I.ldx(I.W, I.R1, L.R_CTX, CTX_PROTOCOL))
        a.jump(JmpOp.JEQ, I.R1, TCP, ours)
        a.jump(JmpOp.JEQ, I.R1, UDP, ours)
        a.place(leave)
        a.emit(I.mov64_imm(I.R0, ALLOW), I.exit_())
        a.place(ours)
        a.emit(I.mov64_imm(I.R7, 0))

    def emit_load(self, a: Assembler, off_reg: int, dst: int, length: int | None,
                  len_reg: int | None = None) -> None:
        """Synthesise the first packet's network or transport header at r9 + dst (the parser
        asks for those two only; anything else reads as absent)."""
        if dst == L.L3:
            self._emit_l3(a)
        elif dst == L.L4:
            self._emit_l4(a)
        else:
            a.emit(I.mov64_imm(I.R0, -1))
            return
        a.emit(I.mov64_imm(I.R0, 0))

    def _emit_l3(self, a: Assembler) -> None:
        """The IP header: destination from the call, protocol from the socket, the bound source
        (0 when unbound), a length that holds a whole TCP or UDP header."""
        done = a.label("sock_l3len")
        a.emit(I.ldx(I.W, I.R2, L.R_CTX, CTX_PROTOCOL))
        a.emit(I.mov64_imm(I.R3, 8))
        a.jump(JmpOp.JNE, I.R2, TCP, done)
        a.emit(I.mov64_imm(I.R3, L.TCP_HDR))
        a.place(done)
        a.emit(I.ldx(I.DW, I.R4, L.R_CTX, CTX_SK))
        if self.family is Family.IPV4:
            a.emit(I.st(I.DW, L.R_PKT, L.L3, 0), I.st(I.DW, L.R_PKT, L.L3 + 8, 0))
            a.emit(I.st(I.B, L.R_PKT, L.L3, 0x45), I.st(I.B, L.R_PKT, L.L3 + 8, 64))
            a.emit(I.alu32(AluOp.ADD, I.R3, 20, reg=False), I.stx(I.B, L.R_PKT, I.R3, L.L3 + 3))
            a.emit(I.stx(I.B, L.R_PKT, I.R2, L.L3 + 9))
            a.emit(I.ldx(I.W, I.R1, I.R4, SK_SRC_IP4), I.stx(I.W, L.R_PKT, I.R1, L.L3 + 12))
            a.emit(I.ldx(I.W, I.R1, L.R_CTX, CTX_USER_IP4), I.stx(I.W, L.R_PKT, I.R1, L.L3 + 16))
        else:
            a.emit(I.st(I.DW, L.R_PKT, L.L3, 0))
            a.emit(I.st(I.B, L.R_PKT, L.L3, 0x60), I.st(I.B, L.R_PKT, L.L3 + 7, 64))
            a.emit(I.stx(I.B, L.R_PKT, I.R3, L.L3 + 5), I.stx(I.B, L.R_PKT, I.R2, L.L3 + 6))
            for i in range(0, 16, 4):
                a.emit(I.ldx(I.W, I.R1, I.R4, SK_SRC_IP6 + i),
                       I.stx(I.W, L.R_PKT, I.R1, L.L3 + 8 + i))
                a.emit(I.ldx(I.W, I.R1, L.R_CTX, CTX_USER_IP6 + i),
                       I.stx(I.W, L.R_PKT, I.R1, L.L3 + 24 + i))

    def _emit_l4(self, a: Assembler) -> None:
        """The transport header: the bound source port (0 when unbound), the destination port,
        and for TCP the SYN that opens the connection (data offset 5: no options)."""
        udp, done = a.label("sock_udp"), a.label("sock_l4")
        for off in range(0, L.L4_BUF, 8):
            a.emit(I.st(I.DW, L.R_PKT, L.L4 + off, 0))
        a.emit(I.ldx(I.DW, I.R4, L.R_CTX, CTX_SK))
        a.emit(I.ldx(I.W, I.R1, I.R4, SK_SRC_PORT), I.endian(I.R1, 16, big=True))
        a.emit(I.stx(I.H, L.R_PKT, I.R1, L.L4))
        a.emit(I.ldx(I.W, I.R1, L.R_CTX, CTX_USER_PORT), I.stx(I.H, L.R_PKT, I.R1, L.L4 + 2))
        a.emit(I.ldx(I.W, I.R2, L.R_CTX, CTX_PROTOCOL))
        a.jump(JmpOp.JNE, I.R2, TCP, udp)
        a.emit(I.st(I.B, L.R_PKT, L.L4 + 12, 0x50), I.st(I.B, L.R_PKT, L.L4 + 13, 0x02))
        a.goto(done)
        a.place(udp)
        a.emit(I.st(I.B, L.R_PKT, L.L4 + 5, 8))  # UDP length, big endian: header only
        a.place(done)

    def emit_meta(self, a: Assembler, fields: set[Field]) -> None:
        """The input interface is static (none); the destination's type comes from the copy of
        the local routing table; everything else rules may read is in L3/L4."""
        if Field.RTDST in fields:
            localtable.emit_types(a, self.family, {Field.RTDST})

    # -- the verdict -------------------------------------------------------------------------

    def emit_nat(self, a: Assembler, targets: Sequence) -> bool:
        """Rewrite the call's destination for DNAT/REDIRECT number r7 >> 8 (see natoutput)."""
        if not targets and len(a) == 0:
            return True  # the capability probe (an empty assembler, no targets)
        from ..natoutput import emit_translate

        emit_translate(a, self, targets)
        return True


def emit_netns_check(a: Assembler, other: Label) -> None:
    """Jump to `other` unless the socket belongs to the namespace whose cookie the runtime put
    in the config map: cgroup programs see every socket of the cgroup, whatever namespace."""
    a.emit(I.mov64(I.R1, L.R_CTX), I.call_helper(HELPER_GET_NETNS_COOKIE))
    a.ld_map_value(I.R1, CFG_MAP, 0)
    a.emit(I.ldx(I.DW, I.R1, I.R1, 0))
    a.jump(JmpOp.JNE, I.R0, I.R1, other, reg=True)
