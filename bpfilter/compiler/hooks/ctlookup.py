"""Conntrack state on the tc and XDP hooks.

tc egress runs after netfilter's OUTPUT and POSTROUTING hooks: the skb carries its conntrack
entry, read as on the netfilter hooks (bpf_cast_to_kern_ctx gives the kernel's sk_buff).

tc ingress and XDP run before conntrack has seen the packet. The flow is looked up with the
bpf_skb_ct_lookup / bpf_xdp_ct_lookup kfuncs (TCP and UDP only, default zone, the
context's namespace), and the state netfilter will give the packet is derived from the entry,
or from the packet when there is none, as nf_conntrack_in, tcp_new, icmp_error do:

- an entry, packet in the reply direction: ESTABLISHED; original direction: ESTABLISHED once the
  entry has seen a reply, NEW before (a TCP SYN on a TIME_WAIT/CLOSE entry closed by FIN or
  reset from the SYN's side starts a new one, as tcp_packet kills the old entry);
- no entry: UDP is NEW; TCP is NEW for a SYN and, in conntrack's default loose mode, for a bare
  ACK (mid-stream pickup); SYN-ACK, FIN, RST without an entry, invalid flag combinations and
  truncated headers are INVALID;
- ICMP queries and their answers (echo, timestamp, information, address mask; ICMPv6 echo and
  node information): the kfuncs refuse ICMP, so the kernel's entry is taken from the map the
  tcx egress recorder fills (ctquery: a remembered nf_conn pointer, trusted only once probe
  reads show the tuple, CONFIRMED and not DYING, the namespace and an unexpired timeout), then
  judged as a TCP/UDP entry. Without one a request is NEW and an answer INVALID (icmp_new
  opens entries for requests only); other ICMP types are INVALID; ICMPv6 neighbour discovery
  and MLD are UNTRACKED;
- ICMP errors are RELATED when the inverse of the quoted packet's tuple is a flow conntrack
  knows (TCP/UDP through the kfuncs, ICMP queries through ctquery) and the error is addressed to
  the quoted packet's sender (nf_conntrack_inet_error), in the reply direction when found in
  the entry's reply tuple; other errors are INVALID;
- other protocols are NEW (no lookup either); later fragments, which netfilter sees reassembled,
  are ESTABLISHED: a later fragment is never delivered without its first one, which is judged.

The kfuncs' entry is released before the rules run (ctquery's pointer is no reference); the CT
area is filled with ctread's routines. What the state can still miss: ICMP query flows the
recorder did not see (see ctquery and README, "Connection tracking").
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...bpf import insn as I
from ...bpf.asm import Assembler, Label
from ...bpf.btf import BtfError, BtfKind, vmlinux
from ...bpf.consts import ProgType
from ...bpf.insn import AluOp, JmpOp
from ...ir.model import Family
from ...ir.pred import Field
from .. import layout as L
from . import ctquery, ctread
from .ctread import CtBit

if TYPE_CHECKING:
    from .l2 import EthernetFlavour

TCP, UDP, ICMP, ICMPV6 = 6, 17, 1, 58
FIN, SYN, RST, ACK = 0x01, 0x02, 0x04, 0x10
# tcp_valid_flags of nf_conntrack_proto_tcp.c (ECE and CWR masked off).
TCP_VALID_FLAGS = (0x02, 0x22, 0x12, 0x04, 0x14, 0x1C, 0x11, 0x31, 0x10, 0x30, 0x18, 0x38,
                   0x19, 0x39)
TCP_SYN_RECV, TCP_ESTABLISHED, TCP_TIME_WAIT, TCP_CLOSE = 2, 3, 7, 8
IPS_ASSURED = 1 << 2
IP_CT_TCP_FLAG_CLOSE_INIT, TCP_RST_SET = 0x04, 4  # enum tcp_bit_set
TCP_SEEN_COPY = 44  # ip_ct_tcp from seen[] to last_index, copied into QUOTED
IP_CT_IS_REPLY = ctread.IP_CT_IS_REPLY

# Scratch in KEYBUF (free while the prologue runs): the lookup tuple, bpf_ct_opts, the header
# an ICMP error quotes and its ports, an ICMP answer's type and code.
TUPLE = L.KEYBUF
OPTS = L.KEYBUF + 40
OPTS_SIZE = 12  # NF_BPF_CT_OPTS_OLD_SZ: the default zone
OPTS_DIR = OPTS + 9
QUOTED = L.KEYBUF + 56
QPORTS = L.KEYBUF + 96
ICMP_INV = L.KEYBUF + 104
CURRENT_NETNS = -1  # BPF_F_CURRENT_NETNS
AF_INET, AF_INET6 = 2, 10  # nf_conntrack_tuple.src.l3num

# ICMP types: errors, queries and their answers (icmp_is_err, invmap), as conntrack knows them.
ICMP4_ERRORS = (3, 4, 5, 11, 12)
ICMP4_PAIRS = ((8, 0), (13, 14), (15, 16), (17, 18))
ICMP6_PAIRS = ((128, 129), (139, 140))
ICMP6_UNTRACKED = (130, 131, 132, 133, 134, 135, 136, 143)  # noct_valid_new: MLD, NDP


def emit_ct(a: Assembler, fl: EthernetFlavour, fields: set[Field]) -> None:
    """Fill the CT area for a tc or XDP program (r7, r8 and r1-r5 are clobbered)."""
    if fl.prog_type is ProgType.SCHED_CLS and fl.egress:
        _emit_egress(a, fields)
    else:
        _Lookup(a, fl, fields).emit()


def _emit_egress(a: Assembler, fields: set[Field]) -> None:
    """tc egress: skb->_nfct of the kernel's sk_buff."""
    btf = vmlinux()
    a.emit(I.mov64(I.R1, L.R_CTX), I.call_kfunc(btf.func_id("bpf_cast_to_kern_ctx")))
    a.emit(I.ldx(I.DW, I.R7, I.R0, btf.member_offset("sk_buff", "_nfct").offset))
    ctread.emit_from_nfct(a, fields)


class _Lookup:
    """Code for tc ingress and XDP: the state conntrack is about to give the packet."""

    def __init__(self, a: Assembler, fl: EthernetFlavour, fields: set[Field]) -> None:
        self.a, self.fl, self.fields = a, fl, fields
        self.v4 = fl.family is Family.IPV4
        btf = vmlinux()
        name = "bpf_xdp_ct_lookup" if fl.prog_type is ProgType.XDP else "bpf_skb_ct_lookup"
        self.kfunc = btf.func_id(name)
        self.release = btf.func_id("bpf_ct_release")
        tcp = {m: btf.member_offset("nf_conn", f"proto.tcp.{m}").offset
               for m in ("seen", "state", "last_dir", "last_index")}
        self.tcp_seen, self.tcp_state = tcp["seen"], tcp["state"]
        self.last_dir, self.last_index = tcp["last_dir"], tcp["last_index"]
        self.seen_size = btf.type_size(btf.find("ip_ct_tcp_state", BtfKind.STRUCT))
        self.seen_flags = btf.member_offset("ip_ct_tcp_state", "flags").offset
        if max(tcp.values()) - self.tcp_seen >= TCP_SEEN_COPY:
            raise BtfError("struct ip_ct_tcp is laid out unlike any kernel pybpfilter knows")
        self.done = a.label("ct_done")
        self.invalid = a.label("ct_invalid")
        self.found = a.label("ct_found")  # r7: the entry, packet in its own flow
        self.related = a.label("ct_related")  # r7: the entry an ICMP error quotes
        # The same, r7 an ICMP query's entry the egress recorder remembered (see ctquery):
        # a pointer checked with probe reads, not a reference to release.
        self.tuple = ctquery.tuple_offsets()
        self.found_raw = a.label("ct_found_query")
        self.related_raw = a.label("ct_related_query")

    def emit(self) -> None:
        """The whole block: dispatch on the protocol, then the shared endings."""
        a = self.a
        tcp, udp, icmp, frag = (a.label(n) for n in ("ct_tcp", "ct_udp", "ct_icmp", "ct_frag"))
        a.emit(I.ldx(I.H, I.R1, L.R_PKT, L.FRAGOFF))
        a.jump(JmpOp.JNE, I.R1, 0, frag)
        a.emit(I.ldx(I.B, I.R1, L.R_PKT, L.L4PROTO))
        a.jump(JmpOp.JEQ, I.R1, TCP, tcp)
        a.jump(JmpOp.JEQ, I.R1, UDP, udp)
        a.jump(JmpOp.JEQ, I.R1, ICMP if self.v4 else ICMPV6, icmp)
        # Tracked by the generic protocol (or SCTP, DCCP, GRE): no lookup available.
        self._new(ports=False)
        a.place(frag)
        ctread.emit_no_entry(a, CtBit.ESTABLISHED)
        a.goto(self.done)
        a.place(tcp)
        self._tcp()
        a.place(udp)
        self._udp()
        a.place(icmp)
        self._icmp()
        a.place(self.invalid)
        ctread.emit_no_entry(a, CtBit.INVALID)
        a.goto(self.done)
        self._endings()
        a.place(self.done)

    # -- the lookup ------------------------------------------------------------------------

    def _tuple_from_packet(self) -> None:
        """The lookup tuple: the packet's addresses and ports."""
        a = self.a
        if self.v4:
            a.emit(I.ldx(I.W, I.R1, L.R_PKT, L.L3 + 12), I.stx(I.W, L.R_PKT, I.R1, TUPLE))
            a.emit(I.ldx(I.W, I.R1, L.R_PKT, L.L3 + 16), I.stx(I.W, L.R_PKT, I.R1, TUPLE + 4))
            a.emit(I.ldx(I.W, I.R1, L.R_PKT, L.L4), I.stx(I.W, L.R_PKT, I.R1, TUPLE + 8))
            return
        for o in (0, 8, 16, 24):
            a.emit(I.ldx(I.DW, I.R1, L.R_PKT, L.L3 + 8 + o), I.stx(I.DW, L.R_PKT, I.R1, TUPLE + o))
        a.emit(I.ldx(I.W, I.R1, L.R_PKT, L.L4), I.stx(I.W, L.R_PKT, I.R1, TUPLE + 32))

    def _lookup(self, proto_reg: int | None, proto: int = 0) -> None:
        """r0 = lookup(tuple) with bpf_ct_opts for `proto` (or the protocol in `proto_reg`)."""
        a = self.a
        a.emit(I.st(I.W, L.R_PKT, OPTS, CURRENT_NETNS), I.st(I.W, L.R_PKT, OPTS + 4, 0))
        if proto_reg is None:
            a.emit(I.st(I.W, L.R_PKT, OPTS + 8, proto))
        else:
            a.emit(I.stx(I.W, L.R_PKT, proto_reg, OPTS + 8))
        a.emit(I.mov64(I.R1, L.R_CTX))
        a.emit(I.mov64(I.R2, L.R_PKT), I.alu64(AluOp.ADD, I.R2, TUPLE, reg=False))
        a.emit(I.mov64_imm(I.R3, 12 if self.v4 else 36))
        a.emit(I.mov64(I.R4, L.R_PKT), I.alu64(AluOp.ADD, I.R4, OPTS, reg=False))
        a.emit(I.mov64_imm(I.R5, OPTS_SIZE))
        a.emit(I.call_kfunc(self.kfunc))

    def _new(self, *, ports: bool = True, sport: int = L.L4, dport: int = L.L4 + 2,
             rport: int | None = None) -> None:
        """No entry, and conntrack would create one: NEW."""
        a = self.a
        if not ports:
            # The generic protocol has no ports: point the tuples at zeros.
            a.emit(I.st(I.W, L.R_PKT, ICMP_INV, 0))
            sport = dport = ICMP_INV
        ctread.emit_from_packet(a, self.fields, self.fl.family, reply=False, status=0,
                                sport_off=sport, dport_off=dport, rport_off=rport)
        ctread.store_state(a, CtBit.NEW)
        a.goto(self.done)

    def _query_key(self, src: int, dst: int, ident: int, code: int, type_reg: int) -> None:
        """TUPLE = the struct nf_conntrack_tuple of an ICMP query or answer (ctquery's key):
        addresses at r9+src/dst, identifier at r9+ident, code at r9+code, type in a register."""
        a, alen, t = self.a, 4 if self.v4 else 16, self.tuple
        # Zeros first: the kernel clears a tuple before filling it (unused address words, dir).
        for o in range(0, ctquery.KEY_SIZE, 8):
            a.emit(I.st(I.DW, L.R_PKT, TUPLE + o, 0))
        for o in range(0, alen, 4):
            for to, frm in ((TUPLE + t["src.u3"] + o, src + o), (TUPLE + t["dst.u3"] + o,
                                                                  dst + o)):
                a.emit(I.ldx(I.W, I.R1, L.R_PKT, frm), I.stx(I.W, L.R_PKT, I.R1, to))
        a.emit(I.ldx(I.H, I.R1, L.R_PKT, ident),
               I.stx(I.H, L.R_PKT, I.R1, TUPLE + t["src.u.icmp.id"]))
        a.emit(I.st(I.H, L.R_PKT, TUPLE + t["src.l3num"], AF_INET if self.v4 else AF_INET6))
        a.emit(I.stx(I.B, L.R_PKT, type_reg, TUPLE + t["dst.u.icmp.type"]))
        a.emit(I.ldx(I.B, I.R1, L.R_PKT, code),
               I.stx(I.B, L.R_PKT, I.R1, TUPLE + t["dst.u.icmp.code"]))
        a.emit(I.st(I.B, L.R_PKT, TUPLE + t["dst.protonum"], ICMP if self.v4 else ICMPV6))

    def _find_query(self, miss: Label) -> None:
        """r7 = the kernel's entry of the tuple in TUPLE, OPTS_DIR its direction, or miss."""
        ctquery.emit_find(self.a, TUPLE, tup=QUOTED, tmp=QPORTS, net=OPTS, dir_at=OPTS_DIR,
                          miss=miss)

    # -- protocols -------------------------------------------------------------------------

    def _tcp(self) -> None:
        a = self.a
        none, fresh = a.label("tcp_none"), a.label("tcp_new")
        a.emit(I.ldx(I.B, I.R1, L.R_PKT, L.L4AVAIL))
        a.jump(JmpOp.JLT, I.R1, L.TCP_HDR, self.invalid)
        a.emit(I.ldx(I.B, I.R1, L.R_PKT, L.L4 + 12), I.alu32(AluOp.RSH, I.R1, 4, reg=False))
        a.jump(JmpOp.JLT, I.R1, 5, self.invalid)
        a.emit(I.ldx(I.B, I.R8, L.R_PKT, L.L4 + 13), I.alu32(AluOp.AND, I.R8, 0x3F, reg=False))
        valid = a.label("tcp_flags_ok")
        for f in TCP_VALID_FLAGS:
            a.jump(JmpOp.JEQ, I.R8, f, valid)
        a.goto(self.invalid)
        a.place(valid)
        self._tuple_from_packet()
        self._lookup(None, TCP)
        a.jump(JmpOp.JEQ, I.R0, 0, none)
        a.emit(I.mov64(I.R7, I.R0))
        # A SYN opening a new connection over a closed one: conntrack kills the old entry.
        a.emit(I.ldx(I.B, I.R1, L.R_PKT, OPTS_DIR))
        a.jump(JmpOp.JNE, I.R1, 0, self.found)
        a.emit(I.ldx(I.B, I.R1, L.R_PKT, L.L4 + 13))
        a.emit(I.alu32(AluOp.AND, I.R1, SYN | ACK | RST | FIN, reg=False))
        a.jump(JmpOp.JNE, I.R1, SYN, self.found)
        # tcp_packet reopens only after a close (CLOSE_INIT seen) or the peer's own RST.
        seen = self.tcp_seen
        ctread.probe(a, QUOTED, TCP_SEEN_COPY, seen)
        a.emit(I.ldx(I.B, I.R1, L.R_PKT, QUOTED + self.tcp_state - seen))
        a.jump(JmpOp.JLT, I.R1, TCP_TIME_WAIT, self.found)
        a.jump(JmpOp.JGT, I.R1, TCP_CLOSE, self.found)
        reopen = a.label("tcp_reopen")
        a.emit(I.ldx(I.B, I.R1, L.R_PKT, QUOTED + self.seen_flags))
        a.emit(I.ldx(I.B, I.R2, L.R_PKT, QUOTED + self.seen_size + self.seen_flags))
        a.emit(I.alu32(AluOp.OR, I.R1, I.R2, reg=True))
        a.jump(JmpOp.JSET, I.R1, IP_CT_TCP_FLAG_CLOSE_INIT, reopen)
        a.emit(I.ldx(I.B, I.R1, L.R_PKT, QUOTED + self.last_dir - seen))
        a.jump(JmpOp.JNE, I.R1, 0, self.found)
        a.emit(I.ldx(I.B, I.R1, L.R_PKT, QUOTED + self.last_index - seen))
        a.jump(JmpOp.JNE, I.R1, TCP_RST_SET, self.found)
        a.place(reopen)
        a.emit(I.mov64(I.R1, I.R7), I.call_kfunc(self.release))
        a.goto(fresh)
        a.place(none)
        # get_conntrack_index, then tcp_conntracks[0][index][NONE].
        a.emit(I.ldx(I.B, I.R1, L.R_PKT, L.L4 + 13))
        a.jump(JmpOp.JSET, I.R1, RST, self.invalid)
        syn = a.label("tcp_syn")
        a.jump(JmpOp.JSET, I.R1, SYN, syn)
        a.jump(JmpOp.JSET, I.R1, FIN, self.invalid)
        a.jump(JmpOp.JSET, I.R1, ACK, fresh)  # mid-stream pickup (nf_conntrack_tcp_loose)
        a.goto(self.invalid)
        a.place(syn)
        a.jump(JmpOp.JSET, I.R1, ACK, self.invalid)
        a.place(fresh)
        self._new()

    def _udp(self) -> None:
        a = self.a
        a.emit(I.ldx(I.B, I.R1, L.R_PKT, L.L4AVAIL))
        a.jump(JmpOp.JLT, I.R1, 8, self.invalid)
        self._tuple_from_packet()
        self._lookup(None, UDP)
        none = a.label("udp_none")
        a.jump(JmpOp.JEQ, I.R0, 0, none)
        a.emit(I.mov64(I.R7, I.R0))
        a.goto(self.found)
        a.place(none)
        self._new()

    def _icmp(self) -> None:
        a = self.a
        error = a.label("icmp_error")
        a.emit(I.ldx(I.B, I.R1, L.R_PKT, L.L4AVAIL))
        a.jump(JmpOp.JLT, I.R1, 8, self.invalid)
        a.emit(I.ldx(I.B, I.R2, L.R_PKT, L.L4))
        if self.v4:
            for t in ICMP4_ERRORS:
                a.jump(JmpOp.JEQ, I.R2, t, error)
            pairs = ICMP4_PAIRS
        else:
            a.jump(JmpOp.JLT, I.R2, 128, error)
            untracked = a.label("icmp_untracked")
            for t in ICMP6_UNTRACKED:
                a.jump(JmpOp.JEQ, I.R2, t, untracked)
            pairs = ICMP6_PAIRS
        # Queries and answers: the tuple's "ports" are the id and the type and code; the
        # inverse tuple has the other type of the pair (invert_tuple's invmap).
        request, answer = a.label("icmp_request"), a.label("icmp_answer")
        for query, reply in pairs:
            for t, inv, kind in ((query, reply, request), (reply, query, answer)):
                nxt = a.label("icmp_type")
                a.jump(JmpOp.JNE, I.R2, t, nxt)
                a.emit(I.st(I.B, L.R_PKT, ICMP_INV, inv))
                a.goto(kind)
                a.place(nxt)
        a.goto(self.invalid)
        if not self.v4:
            a.place(untracked)
            ctread.emit_no_entry(a, CtBit.UNTRACKED)
            a.goto(self.done)
        # The kernel's entry, if the egress recorder saw one (see ctquery): looked up by the
        # packet's own tuple. Without it a request is NEW and an answer INVALID (icmp_new
        # accepts only requests).
        src, dst = (L.L3 + 12, L.L3 + 16) if self.v4 else (L.L3 + 8, L.L3 + 24)
        new = a.label("icmp_new")
        for kind, miss in ((request, new), (answer, self.invalid)):
            a.place(kind)
            a.emit(I.ldx(I.B, I.R2, L.R_PKT, L.L4))
            self._query_key(src, dst, L.L4 + 4, L.L4 + 1, I.R2)
            self._find_query(miss)
            a.goto(self.found_raw)
        a.place(new)
        a.emit(I.ldx(I.B, I.R1, L.R_PKT, L.L4 + 1), I.stx(I.B, L.R_PKT, I.R1, ICMP_INV + 1))
        self._new(sport=L.L4 + 4, dport=L.L4, rport=ICMP_INV)
        a.place(error)
        self._icmp_error()

    def _icmp_error(self) -> None:
        """Look up the flow of the quoted packet, seen from the error's side (its inverse)."""
        a, v4 = self.a, self.v4
        hdr = 20 if v4 else 40
        a.emit(I.ldx(I.W, I.R8, L.R_PKT, L.L4OFF), I.ldx(I.W, I.R1, L.R_PKT, L.L3OFF))
        a.emit(I.alu64(AluOp.ADD, I.R8, I.R1, reg=True), I.alu64(AluOp.ADD, I.R8, 8, reg=False))
        self.fl.emit_load(a, I.R8, QUOTED, hdr)
        a.jump(JmpOp.JNE, I.R0, 0, self.invalid)
        a.emit(I.ldx(I.B, I.R1, L.R_PKT, QUOTED))
        if v4:
            a.emit(I.mov64(I.R2, I.R1), I.alu32(AluOp.RSH, I.R2, 4, reg=False))
            a.jump(JmpOp.JNE, I.R2, 4, self.invalid)
            a.emit(I.alu32(AluOp.AND, I.R1, 0x0F, reg=False))
            a.emit(I.alu32(AluOp.LSH, I.R1, 2, reg=False))
            a.jump(JmpOp.JLT, I.R1, 20, self.invalid)
            a.emit(I.alu64(AluOp.ADD, I.R8, I.R1, reg=True))
            proto_off, src, dst = QUOTED + 9, QUOTED + 12, QUOTED + 16
            outer_dst, alen = L.L3 + 16, 4
        else:
            a.emit(I.alu32(AluOp.RSH, I.R1, 4, reg=False))
            a.jump(JmpOp.JNE, I.R1, 6, self.invalid)
            a.emit(I.alu64(AluOp.ADD, I.R8, hdr, reg=False))
            proto_off, src, dst = QUOTED + 6, QUOTED + 8, QUOTED + 24
            outer_dst, alen = L.L3 + 24, 16
        # TCP and UDP are looked up with the kfuncs, ICMP queries in ctquery's map (quoted
        # IPv6 extension headers are not walked).
        a.emit(I.ldx(I.B, I.R1, L.R_PKT, proto_off))
        ok, query = a.label("quoted_proto"), a.label("quoted_query")
        a.jump(JmpOp.JEQ, I.R1, TCP, ok)
        a.jump(JmpOp.JEQ, I.R1, ICMP if v4 else ICMPV6, query)
        a.jump(JmpOp.JNE, I.R1, UDP, self.invalid)
        a.place(ok)
        self.fl.emit_load(a, I.R8, QPORTS, 4)
        a.jump(JmpOp.JNE, I.R0, 0, self.invalid)
        self._error_addressed_to_sender(outer_dst, src, alen)
        for o in range(0, alen, 4):
            a.emit(I.ldx(I.W, I.R1, L.R_PKT, dst + o), I.stx(I.W, L.R_PKT, I.R1, TUPLE + o))
            a.emit(I.ldx(I.W, I.R1, L.R_PKT, src + o),
                   I.stx(I.W, L.R_PKT, I.R1, TUPLE + alen + o))
        a.emit(I.ldx(I.H, I.R1, L.R_PKT, QPORTS + 2), I.stx(I.H, L.R_PKT, I.R1, TUPLE + 2 * alen))
        a.emit(I.ldx(I.H, I.R1, L.R_PKT, QPORTS), I.stx(I.H, L.R_PKT, I.R1, TUPLE + 2 * alen + 2))
        a.emit(I.ldx(I.B, I.R1, L.R_PKT, proto_off))
        self._lookup(I.R1)
        a.jump(JmpOp.JEQ, I.R0, 0, self.invalid)
        a.emit(I.mov64(I.R7, I.R0))
        a.goto(self.related)
        a.place(query)
        # The quoted query's header (icmp_pkt_to_tuple reads 8 bytes), then the inverse tuple:
        # the other type of the pair (a quoted error or unknown type has none: INVALID).
        self.fl.emit_load(a, I.R8, QPORTS, 8)
        a.jump(JmpOp.JNE, I.R0, 0, self.invalid)
        self._error_addressed_to_sender(outer_dst, src, alen)
        a.emit(I.ldx(I.B, I.R1, L.R_PKT, QPORTS))
        inverted = a.label("quoted_inverted")
        for q, r in ICMP4_PAIRS if v4 else ICMP6_PAIRS:
            for t, inv in ((q, r), (r, q)):
                nxt = a.label("quoted_type")
                a.jump(JmpOp.JNE, I.R1, t, nxt)
                a.emit(I.mov64_imm(I.R2, inv))
                a.goto(inverted)
                a.place(nxt)
        a.goto(self.invalid)
        a.place(inverted)
        self._query_key(dst, src, QPORTS + 4, QPORTS + 1, I.R2)
        self._find_query(self.invalid)
        a.goto(self.related_raw)

    def _error_addressed_to_sender(self, outer_dst: int, src: int, alen: int) -> None:
        """nf_conntrack_inet_error: the error must go to the quoted packet's sender."""
        a = self.a
        for o in range(0, alen, 4):
            a.emit(I.ldx(I.W, I.R1, L.R_PKT, outer_dst + o), I.ldx(I.W, I.R2, L.R_PKT, src + o))
            a.jump(JmpOp.JNE, I.R1, I.R2, self.invalid, reg=True)

    # -- an entry was found: r7 holds it (a reference to release, or a checked pointer) ------

    def _endings(self) -> None:
        self._ending(self.found, self.related, release=True)
        self._ending(self.found_raw, self.related_raw, release=False)

    def _ending(self, found: Label, related: Label, *, release: bool) -> None:
        a = self.a
        fill = a.label("ct_fill")
        a.place(related)
        a.emit(I.mov64_imm(I.R8, ctread.IP_CT_RELATED))
        self._plus_reply(fill)
        a.place(found)
        # ESTABLISHED once the entry has seen a reply (or the packet is one), NEW before.
        ctread.probe(a, L.CTSTATUS, 4, vmlinux().member_offset("nf_conn", "status").offset)
        a.emit(I.mov64_imm(I.R8, ctread.IP_CT_NEW))
        a.emit(I.ldx(I.W, I.R1, L.R_PKT, L.CTSTATUS))
        seen = a.label("ct_seen")
        a.jump(JmpOp.JSET, I.R1, ctread.IPS_SEEN_REPLY, seen)
        a.emit(I.ldx(I.B, I.R1, L.R_PKT, OPTS_DIR))
        a.jump(JmpOp.JEQ, I.R1, 0, fill)
        a.place(seen)
        a.emit(I.mov64_imm(I.R8, ctread.IP_CT_ESTABLISHED))
        self._plus_reply(fill)
        a.place(fill)
        ctread.emit_from_conn(a, self.fields)
        if Field.CTSTATUS in self.fields:
            self._status_after_packet()
        if release:
            a.emit(I.mov64(I.R1, I.R7), I.call_kfunc(self.release))
        a.goto(self.done)

    def _status_after_packet(self) -> None:
        """The status bits conntrack sets while handling this packet, before INPUT sees it:
        SEEN_REPLY on a reply (nf_conntrack_in), ASSURED on a TCP ACK that keeps or makes the
        connection ESTABLISHED (tcp_packet). r8: ctinfo; r7: the entry."""
        a = self.a
        done, orig = a.label("st_done"), a.label("st_orig")
        a.jump(JmpOp.JEQ, I.R8, ctread.IP_CT_RELATED, done)
        a.jump(JmpOp.JEQ, I.R8, ctread.IP_CT_RELATED_REPLY, done)
        a.jump(JmpOp.JLT, I.R8, IP_CT_IS_REPLY, orig)
        a.emit(I.ldx(I.W, I.R1, L.R_PKT, L.CTSTATUS))
        a.emit(I.alu32(AluOp.OR, I.R1, ctread.IPS_SEEN_REPLY, reg=False))
        a.emit(I.stx(I.W, L.R_PKT, I.R1, L.CTSTATUS))
        a.place(orig)
        a.emit(I.ldx(I.B, I.R1, L.R_PKT, L.L4PROTO))
        a.jump(JmpOp.JNE, I.R1, TCP, done)
        a.emit(I.ldx(I.B, I.R1, L.R_PKT, L.L4 + 13))
        a.jump(JmpOp.JSET, I.R1, SYN | FIN | RST, done)
        ack = a.label("st_ack")
        a.jump(JmpOp.JSET, I.R1, ACK, ack)
        a.goto(done)
        a.place(ack)
        ctread.probe(a, ICMP_INV, 1, self.tcp_state)
        a.emit(I.ldx(I.B, I.R1, L.R_PKT, ICMP_INV))
        a.jump(JmpOp.JLT, I.R1, TCP_SYN_RECV, done)
        a.jump(JmpOp.JGT, I.R1, TCP_ESTABLISHED, done)
        a.emit(I.ldx(I.W, I.R1, L.R_PKT, L.CTSTATUS))
        a.emit(I.alu32(AluOp.OR, I.R1, IPS_ASSURED, reg=False))
        a.emit(I.stx(I.W, L.R_PKT, I.R1, L.CTSTATUS))
        a.place(done)

    def _plus_reply(self, fill: Label) -> None:
        """r8 += IP_CT_IS_REPLY when the packet travels in the entry's reply direction."""
        a = self.a
        a.emit(I.ldx(I.B, I.R1, L.R_PKT, OPTS_DIR))
        a.jump(JmpOp.JEQ, I.R1, 0, fill)
        a.emit(I.alu64(AluOp.ADD, I.R8, ctread.IP_CT_IS_REPLY, reg=False))
        a.goto(fill)
