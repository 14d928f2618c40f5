"""The nat table on tc ingress: BPF decides a new connection's binding, the kernel translates.

Programs cannot rewrite packets at the netfilter hooks, and rewriting them at tc would leave the
replies untranslated. Instead the binding is made the way nf_nat makes it, only earlier: for the
first packet of a connection (a TCP SYN or a UDP datagram conntrack has no entry for), tcx
ingress evaluates the nat table's PREROUTING rules (DNAT, REDIRECT) and, when the route says the
packet is forwarded, POSTROUTING (SNAT, MASQUERADE), or when it is delivered here, INPUT (SNAT),
then creates the conntrack entry with `bpf_skb_ct_alloc`, records each translation with
`bpf_ct_set_nat_info` and inserts it with `bpf_ct_insert_entry`. The kernel's nf_nat then
translates every packet of the connection, both directions, fixing the IPv4 header and TCP/UDP
checksums (INPUT's SNAT is a MANIP_SRC binding like POSTROUTING's: nf_nat applies it at
LOCAL_IN for a delivered packet, and undoes it on the replies at LOCAL_OUT); it runs because a
dormant nftables table with empty `type nat` chains keeps its hooks registered for both families
(runtime/nat.py). A ruleset replace leaves the bindings, which live in conntrack, untouched.
IPv4 and IPv6 run the same code; natbind.py holds what differs (address size, the kfuncs'
tuple part) and the binding itself.

The chains are three programs: PREROUTING leaves its decision in skb->cb (five words) and
tail-calls POSTROUTING (slot `nat/POSTROUTING` of the family in the current generation), which
applies it to the packet struct (the rules and the route see the DNAT view), routes and binds.
As netfilter routes after DNAT, the route is the DNAT destination's: when bpf_fib_lookup does not
forward it (NOT_FWDED: a local, broadcast or multicast destination, or no route; FWD_DISABLED:
the input interface does not forward, so the kernel delivers the packet or drops it) and INPUT
has rules, POSTROUTING tail-calls INPUT (slot `nat/INPUT`), which applies the same decision,
runs its rules and binds with the same code. INPUT's program is loaded even without rules, as
POSTROUTING's is: the runtime then never detaches the link the three share when a restore drops
a chain's rules.

    IPv4  cb[0] MAGIC | 1 when PREROUTING chose a destination    cb[1] its address
          cb[2] its ports, low | high << 16 (0: keep the port)    cb[3] MASQUERADE's source
    IPv6  cb[0] its ports, or NO_DNAT when it chose none           cb[1..4] its address, then
          (once POSTROUTING has copied it) MASQUERADE's source
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..bpf import insn as I
from ..bpf.asm import Assembler, Label
from ..bpf.btf import vmlinux
from ..bpf.consts import Helper, TcAction
from ..bpf.insn import AluOp, JmpOp
from ..ir.model import Chain, Family, Table
from ..ir.pred import Field
from ..matches.nat import Nat
from . import layout as L
from . import natbind as NB
from .hooks.base import HookPoint, Verdict
from .hooks.tcxdp import SKB_IFINDEX, TcFlavour
from .natbind import TCP, UDP, NatFamily, copy_words, le32, nat_family
from .validate import CompileError

SKB_CB = 48  # offsetof(struct __sk_buff, cb)
MAGIC = 0x4E415400  # "NAT": cb[0] was written by this ruleset's PREROUTING program
NO_DNAT = 1  # IPv6 cb[0] without a destination: port lo 1 > hi 0, which no range has
TCP_TIME_WAIT, TCP_CLOSE = 7, 8  # enum tcp_conntrack
SYN_ACK_RST_FIN, SYN = 0x17, 0x02
FIB_SIZE = 64  # sizeof(struct bpf_fib_lookup)
FIB_LOOKUP_SKIP_NEIGH, FIB_LOOKUP_SRC = 4, 16
FIB_IFINDEX, FIB_FLOW, FIB_SRC, FIB_DST = 8, 12, 16, 32
IPV6_FLOWINFO = le32(bytes.fromhex("0fffffff"))  # traffic class and flow label
K = L.KEYBUF

NAT_CHAINS = ("PREROUTING", "POSTROUTING", "INPUT")
FIB_NOT_FWDED, FIB_FWD_DISABLED = 4, 5  # BPF_FIB_LKUP_RET_*
# The targets each binding chain may run (iptables refuses the others there, xt_nat's hooks).
SOURCE_TARGETS = {"POSTROUTING": ("SNAT", "MASQUERADE"), "INPUT": ("SNAT",)}


@dataclass(frozen=True)
class CbLayout:
    """Where PREROUTING's decision sits in skb->cb (offsets in struct __sk_buff)."""

    flags: int | None  # MAGIC | 1 (IPv4); None: the ports word says NO_DNAT instead (IPv6)
    daddr: int
    ports: int
    masq: int  # MASQUERADE's source, written by POSTROUTING once routed


CB4 = CbLayout(SKB_CB, SKB_CB + 4, SKB_CB + 8, SKB_CB + 12)
CB6 = CbLayout(None, SKB_CB + 4, SKB_CB, SKB_CB + 4)  # 16-byte addresses: cb has 20 bytes


def busy(chain: Chain | None) -> bool:
    """Whether a chain does anything (rules, or a policy other than ACCEPT)."""
    return chain is not None and bool(chain.rules or chain.policy not in (None, "ACCEPT"))


def check_nat_table(table: Table, family: Family, hook: str) -> None:
    """Refuse, by name, nat rules this implementation cannot run."""
    busy_chains = [c for c in table.chains.values() if busy(c)]
    if not busy_chains:
        return
    # OUTPUT alone runs on any --hook: its programs attach to sockets (see natoutput.py).
    if hook != "tc" and any(c.builtin and c.name != "OUTPUT" for c in busy_chains):
        raise CompileError(f"table nat needs --hook tc (NAT is bound at tcx ingress; {hook} "
                           "programs cannot set up a connection's translation)")
    for c in table.chains.values():
        for n, rule in enumerate(c.rules, 1):
            t = rule.target
            if isinstance(getattr(t, "params", None), Nat) and t.params.range.base is not None:
                raise CompileError(f"rule {c.name} #{n}: {t.kind} with a base port (/N) is not "
                                   "supported", rule.origin)


def with_nat_chains(table: Table) -> Table:
    """The table with the three programs' chains present (PREROUTING always tail-calls
    POSTROUTING, which binds or hands a delivered connection to INPUT)."""
    chains = dict(table.chains)
    for name in NAT_CHAINS:
        if name not in chains:
            chains[name] = Chain(name, "ACCEPT")
    return Table(table.name, chains)


@dataclass(frozen=True)
class TailCall:
    """Where POSTROUTING's program is: the runtime's generation words and program array
    (map keys), the slots per generation, POSTROUTING's IPv4 slot in one and the distance to
    the next family's slots (its generation word is the next u32); INPUT's IPv4 slot."""

    gen_map: str
    progs_map: str
    gen_stride: int
    slot: int
    family_stride: int = 0
    input_slot: int | None = None


@dataclass
class NatFlavour(TcFlavour):
    """tcx ingress programs of the nat table (IPv4 or IPv6)."""

    # ifindex -> name of the namespace's interfaces when compiling (for `-o`), and the
    # ingress interface's address of the family (REDIRECT's destination).
    ifnames: dict[int, str] = field(default_factory=dict)
    local_addr: bytes | None = None
    tail: TailCall | None = None
    input_rules: bool = False  # INPUT does something: POSTROUTING hands it delivered packets
    nat_chain: str = ""
    _bind: Label | None = field(default=None, init=False, repr=False)

    def chains(self, table: str) -> dict[str, HookPoint]:
        """PREROUTING, POSTROUTING and INPUT, all at ingress."""
        if table != "nat":
            return {}
        return {c: HookPoint(c) for c in NAT_CHAINS}

    def for_hook(self, hook: HookPoint) -> NatFlavour:
        """A copy compiling one of the two chains."""
        return dataclasses.replace(self, egress=False, nat_chain=hook.chain)

    def static_fields(self) -> dict[Field, bytes]:
        """The input interface is known; POSTROUTING's output interface comes from the route
        (INPUT has none: `-o` never matches there, as in netfilter's user chains)."""
        out = super().static_fields()
        if self.nat_chain == "POSTROUTING":
            out.pop(Field.OIFNAME, None)
        return out

    @property
    def nf(self) -> NatFamily:
        """The family's facts for the binding code."""
        return nat_family(self.family)

    @property
    def cb(self) -> CbLayout:
        """Where PREROUTING leaves its decision for this family."""
        return CB4 if self.family is Family.IPV4 else CB6

    # -- prologue ----------------------------------------------------------------------------

    def emit_meta(self, a: Assembler, fields: set[Field]) -> None:
        """Leave at once unless this is a connection's first packet; the chains after
        PREROUTING apply its decision, and POSTROUTING routes."""
        skip = a.label("nat_skip")
        go = a.label("nat_go")
        if self.nat_chain == "PREROUTING":
            self._emit_candidate(a, skip)
        else:
            self._bind = a.label("nat_bind")
            self._emit_dnat_view(a, skip)
            if self.nat_chain == "POSTROUTING":
                self._emit_route(a)
        a.goto(go)
        a.place(skip)
        a.emit(I.mov64_imm(I.R0, TcAction.NEXT), I.exit_())
        a.place(go)
        super().emit_meta(a, fields)

    def _emit_candidate(self, a: Assembler, skip: Label) -> None:
        """A first fragment of UDP or a TCP SYN, with no conntrack entry yet."""
        a.emit(I.ldx(I.H, I.R1, L.R_PKT, L.FRAGOFF))
        a.jump(JmpOp.JNE, I.R1, 0, skip)
        a.emit(I.ldx(I.B, I.R1, L.R_PKT, L.L4AVAIL))
        a.jump(JmpOp.JLT, I.R1, 4, skip)
        a.emit(I.ldx(I.B, I.R2, L.R_PKT, L.L4PROTO))
        ok = a.label("nat_new")
        a.jump(JmpOp.JEQ, I.R2, UDP, ok)
        a.jump(JmpOp.JNE, I.R2, TCP, skip)
        a.jump(JmpOp.JLT, I.R1, L.TCP_HDR, skip)
        a.emit(I.ldx(I.B, I.R1, L.R_PKT, L.L4 + 13), I.alu32(AluOp.AND, I.R1, SYN_ACK_RST_FIN,
                                                           reg=False))
        a.jump(JmpOp.JNE, I.R1, SYN, skip)
        a.place(ok)
        nf = self.nf
        copy_words(a, L.R_PKT, nf.src, L.R_PKT, nf.tuple, 2 * nf.alen)  # source, destination
        copy_words(a, L.R_PKT, L.L4, L.R_PKT, nf.tuple + 2 * nf.alen, 4)  # ports
        NB.lookup(a, nf, nf.tuple)
        fresh = a.label("nat_fresh")
        a.jump(JmpOp.JEQ, I.R0, 0, fresh)
        self._emit_reopen(a, skip)
        a.place(fresh)

    def _emit_reopen(self, a: Assembler, skip: Label) -> None:
        """r0: the entry a packet of a new connection found. A TCP SYN over a TIME_WAIT or CLOSE
        entry is a new connection: conntrack would replace the entry with an unbound one, so it
        is expired first (then the lookup no longer finds it) and the SYN is bound anew."""
        btf = vmlinux()
        release = btf.func_id("bpf_ct_release")
        keep = a.label("nat_known")
        a.emit(I.mov64(I.R8, I.R0))
        a.emit(I.ldx(I.B, I.R1, L.R_PKT, L.L4PROTO))
        a.jump(JmpOp.JNE, I.R1, TCP, keep)
        a.emit(I.ldx(I.B, I.R1, I.R8, btf.member_offset("nf_conn", "proto.tcp.state").offset))
        a.jump(JmpOp.JLT, I.R1, TCP_TIME_WAIT, keep)
        a.jump(JmpOp.JGT, I.R1, TCP_CLOSE, keep)
        a.emit(I.mov64(I.R1, I.R8), I.mov64_imm(I.R2, 0))
        a.emit(I.call_kfunc(btf.func_id("bpf_ct_change_timeout")))
        a.emit(I.mov64(I.R1, I.R8), I.call_kfunc(release))
        NB.lookup(a, self.nf, self.nf.tuple)  # skips, and reaps, the expired entry
        gone = a.label("nat_reopened")
        a.jump(JmpOp.JEQ, I.R0, 0, gone)
        a.emit(I.mov64(I.R8, I.R0))
        a.place(keep)
        a.emit(I.mov64(I.R1, I.R8), I.call_kfunc(release))
        a.goto(skip)
        a.place(gone)

    def _emit_dnat_view(self, a: Assembler, skip: Label) -> None:
        """Apply PREROUTING's decision (skb->cb) to the packet struct's destination."""
        nf, cb = self.nf, self.cb
        plain = a.label("nat_nodnat")
        if cb.flags is not None:
            a.emit(I.ldx(I.W, I.R1, L.R_CTX, cb.flags), I.mov32(I.R2, I.R1))
            a.emit(I.alu32(AluOp.AND, I.R2, ~1, reg=False))
            a.jump(JmpOp.JNE, I.R2, MAGIC, skip)
            a.emit(I.alu32(AluOp.AND, I.R1, 1, reg=False))
            a.jump(JmpOp.JEQ, I.R1, 0, plain)
        else:
            a.emit(I.ldx(I.W, I.R1, L.R_CTX, cb.ports))
            a.jump(JmpOp.JEQ, I.R1, NO_DNAT, plain)
        copy_words(a, L.R_CTX, cb.daddr, L.R_PKT, nf.dst, nf.alen)
        a.emit(I.ldx(I.W, I.R1, L.R_CTX, cb.ports), I.alu32(AluOp.AND, I.R1, 0xFFFF, reg=False))
        a.jump(JmpOp.JEQ, I.R1, 0, plain)
        a.emit(I.endian(I.R1, 16, big=True), I.stx(I.H, L.R_PKT, I.R1, L.L4 + 2))
        a.place(plain)

    def _emit_route(self, a: Assembler) -> None:
        """Route the DNAT view (bpf_fib_lookup with the source the kernel would pick): hand a
        delivered packet to INPUT, else fill the output interface's name."""
        nf, cb = self.nf, self.cb
        for off in range(0, FIB_SIZE, 8):
            a.emit(I.st(I.DW, L.R_PKT, K + off, 0))
        a.emit(I.st(I.B, L.R_PKT, K, nf.af))
        a.emit(I.ldx(I.B, I.R1, L.R_PKT, L.L4PROTO), I.stx(I.B, L.R_PKT, I.R1, K + 1))
        for i in (0, 2):  # sport, dport (2-byte aligned there)
            a.emit(I.ldx(I.H, I.R1, L.R_PKT, L.L4 + i), I.stx(I.H, L.R_PKT, I.R1, K + 2 + i))
        a.emit(I.ldx(I.W, I.R1, L.R_CTX, SKB_IFINDEX), I.stx(I.W, L.R_PKT, I.R1, K + FIB_IFINDEX))
        if self.family is Family.IPV4:
            a.emit(I.ldx(I.B, I.R1, L.R_PKT, L.L3 + 1), I.stx(I.B, L.R_PKT, I.R1, K + FIB_FLOW))
        else:  # flowinfo, as ip6_route_input takes it from the header
            a.emit(I.ldx(I.W, I.R1, L.R_PKT, L.L3), I.alu32(AluOp.AND, I.R1, IPV6_FLOWINFO,
                                                          reg=False))
            a.emit(I.stx(I.W, L.R_PKT, I.R1, K + FIB_FLOW))
        copy_words(a, L.R_PKT, nf.src, L.R_PKT, K + FIB_SRC, nf.alen)
        copy_words(a, L.R_PKT, nf.dst, L.R_PKT, K + FIB_DST, nf.alen)
        a.emit(I.mov64(I.R1, L.R_CTX))
        a.emit(I.mov64(I.R2, L.R_PKT), I.alu64(AluOp.ADD, I.R2, K, reg=False))
        a.emit(I.mov64_imm(I.R3, FIB_SIZE))
        a.emit(I.mov64_imm(I.R4, FIB_LOOKUP_SRC | FIB_LOOKUP_SKIP_NEIGH))
        a.emit(I.call_helper(Helper.fib_lookup))
        # Delivered here (or dropped by the kernel: no route, blackhole, ...): the packet never
        # reaches POSTROUTING; a delivered one goes through INPUT.
        a.emit(I.mov64_imm(I.R7, Verdict.ACCEPT))
        forwarded = a.label("nat_forwarded")
        a.jump(JmpOp.JEQ, I.R0, 0, forwarded)
        if self.input_rules:
            local = a.label("nat_local")
            a.jump(JmpOp.JEQ, I.R0, FIB_NOT_FWDED, local)
            a.jump(JmpOp.JNE, I.R0, FIB_FWD_DISABLED, self._bind)
            a.place(local)
            t = self.tail
            self._emit_tail(a, None if t is None else t.input_slot)
        a.goto(self._bind)
        a.place(forwarded)
        # The DNAT address is in the packet struct now: IPv6 reuses its cb words.
        copy_words(a, L.R_PKT, K + FIB_SRC, L.R_CTX, cb.masq, nf.alen)
        a.emit(I.ldx(I.W, I.R1, L.R_PKT, K + FIB_IFINDEX))
        a.emit(I.st(I.DW, L.R_PKT, L.OIFNAME, 0), I.st(I.DW, L.R_PKT, L.OIFNAME + 8, 0))
        named = a.label("nat_oif")
        for idx, name in sorted(self.ifnames.items()):
            other = a.label("nat_oif_next")
            a.jump(JmpOp.JNE, I.R1, idx, other)
            raw = name.encode()[:15].ljust(16, b"\0")
            for i in range(0, 16, 4):
                a.emit(I.st(I.W, L.R_PKT, L.OIFNAME + i, le32(raw[i:i + 4])))
            a.goto(named)
            a.place(other)
        a.place(named)

    # -- the verdict -------------------------------------------------------------------------

    def emit_nat(self, a: Assembler, targets: Sequence) -> bool:
        """PREROUTING: record the destination chosen and tail-call POSTROUTING. POSTROUTING:
        choose the source, then create and insert the translated conntrack entry."""
        if not self.nat_chain:
            return True  # the capability probe
        if self.nat_chain == "PREROUTING":
            self._emit_prerouting(a, targets)
        else:  # POSTROUTING, or INPUT for a connection delivered here: both choose the source
            self._emit_source(a, targets)
        return True

    def _targets(self, a: Assembler, targets: Sequence, emit_one) -> None:
        """Dispatch on the NAT target number in r7 (nothing happens for ACCEPT)."""
        done = a.label("nat_decided")
        a.emit(I.mov64(I.R1, I.R7), I.alu64(AluOp.AND, I.R1, 0xFF, reg=False))
        a.jump(JmpOp.JNE, I.R1, Verdict.NAT, done)
        a.emit(I.mov64(I.R8, I.R7), I.alu64(AluOp.RSH, I.R8, 8, reg=False))
        for i, (kind, params) in enumerate(targets):
            other = a.label("nat_target")
            a.jump(JmpOp.JNE, I.R8, i, other)
            emit_one(kind, params)
            a.goto(done)
            a.place(other)
        a.place(done)

    def _emit_prerouting(self, a: Assembler, targets: Sequence) -> None:
        nf, cb = self.nf, self.cb
        if cb.flags is not None:
            a.emit(I.st(I.W, L.R_CTX, cb.flags, MAGIC))
        else:
            a.emit(I.st(I.W, L.R_CTX, cb.ports, NO_DNAT))

        def one(kind: str, p: Nat) -> None:
            r = p.range
            if kind == "REDIRECT":
                if self.local_addr is None:
                    v = "IPv4" if self.family is Family.IPV4 else "usable IPv6"
                    raise CompileError(f"REDIRECT: interface {self.ifname} has no {v} address")
                NB.store_const(a, L.R_CTX, cb.daddr, self.local_addr)
            elif r.lo is None:
                copy_words(a, L.R_PKT, nf.dst, L.R_CTX, cb.daddr, nf.alen)
            else:
                NB.pick_addr(a, nf, r.lo, r.hi, L.R_CTX, cb.daddr)
            ports = 0 if r.port_lo is None else r.port_lo | r.port_hi << 16
            a.emit(I.st(I.W, L.R_CTX, cb.ports, I.s32(ports)))
            if cb.flags is not None:
                a.emit(I.st(I.W, L.R_CTX, cb.flags, MAGIC | 1))

        self._targets(a, targets, one)
        self._emit_tail(a, None if self.tail is None else self.tail.slot)

    def _emit_tail(self, a: Assembler, slot: int | None) -> None:
        """Tail-call the next chain's program (`slot`: its IPv4 slot) of the current
        generation; it binds, so without it the decision cannot stand: drop."""
        t = self.tail
        if t is None or slot is None:
            raise CompileError(f"table nat: no program slot to reach the chain after "
                               f"{self.nat_chain} through")
        fi = 0 if self.family is Family.IPV4 else 1
        a.ld_map_value(I.R1, t.gen_map, 0)
        a.emit(I.ldx(I.W, I.R3, I.R1, 4 * fi), I.alu64(AluOp.AND, I.R3, 1, reg=False))
        a.emit(I.alu64(AluOp.MUL, I.R3, t.gen_stride, reg=False))
        a.emit(I.alu64(AluOp.ADD, I.R3, slot + fi * t.family_stride, reg=False))
        a.emit(I.mov64(I.R1, L.R_CTX))
        a.ld_map(I.R2, t.progs_map)
        a.emit(I.call_helper(Helper.tail_call))
        a.emit(I.mov64_imm(I.R0, TcAction.SHOT), I.exit_())

    def _emit_source(self, a: Assembler, targets: Sequence) -> None:
        nf, cb = self.nf, self.cb
        a.place(self._bind)
        NB.clear(a, nf)
        allowed = SOURCE_TARGETS[self.nat_chain]

        def one(kind: str, p: Nat) -> None:
            if kind not in allowed:  # iptables refuses these; IR from elsewhere might not
                raise CompileError(f"table nat: {kind} is not valid in chain {self.nat_chain} "
                                   f"(only {', '.join(allowed)})")
            r = p.range
            if kind == "MASQUERADE":
                copy_words(a, L.R_CTX, cb.masq, L.R_PKT, nf.new_src, nf.alen)
            elif r.lo is not None:  # else the packet's own source, as cleared
                NB.pick_addr(a, nf, r.lo, r.hi, L.R_PKT, nf.new_src)
            if r.port_lo is not None:
                a.emit(I.st(I.H, L.R_PKT, nf.sports, r.port_lo),
                       I.st(I.H, L.R_PKT, nf.sports + 2, r.port_hi))
            a.emit(I.st(I.B, L.R_PKT, nf.has_snat, 1))

        self._targets(a, targets, one)
        nodnat = a.label("nat_nodnat2")
        a.emit(I.ldx(I.W, I.R1, L.R_CTX, cb.ports))
        if cb.flags is not None:
            a.emit(I.ldx(I.W, I.R2, L.R_CTX, cb.flags), I.alu32(AluOp.AND, I.R2, 1, reg=False))
            a.jump(JmpOp.JEQ, I.R2, 0, nodnat)
        else:
            a.jump(JmpOp.JEQ, I.R1, NO_DNAT, nodnat)
        # The destination chosen is the packet struct's (cleared into new_dst).
        a.emit(I.st(I.B, L.R_PKT, nf.has_dnat, 1), I.stx(I.W, L.R_PKT, I.R1, nf.dports))
        a.place(nodnat)
        NB.emit_bind(a, self, nf)


def compile_nat(table: Table, family: Family, hook: str, iface: str | None,
                mac: bytes | None, env: tuple | None, tail: TailCall | None):
    """Compile the nat table for tc ingress of `iface`; `env` is (ifnames, local address)."""
    from . import natoutput  # the OUTPUT chain runs at the sockets
    from .codegen import compile_table

    check_nat_table(table, family, hook)
    if hook != "tc":
        return natoutput.compile_output(table, family)
    ifnames, local = env if env is not None else ({}, None)
    fl = NatFlavour(family, ifname=iface or "", mac=mac, ifnames=dict(ifnames), local_addr=local,
                    tail=tail, input_rules=busy(table.chains.get("INPUT")))
    return natoutput.compile_tc(with_nat_chains(table), fl, compile_table)
