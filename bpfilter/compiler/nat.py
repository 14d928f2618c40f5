"""The nat table on tc ingress: BPF decides a new connection's binding, the kernel translates.

Programs cannot rewrite packets at the netfilter hooks, and rewriting them at tc would leave the
replies untranslated. Instead the binding is made the way nf_nat makes it, only earlier: for the
first packet of a connection (a TCP SYN or a UDP datagram conntrack has no entry for), tcx
ingress evaluates the nat table's PREROUTING rules (DNAT, REDIRECT) and, when the route says the
packet is forwarded, POSTROUTING (SNAT, MASQUERADE), then creates the conntrack entry with
`bpf_skb_ct_alloc`, records each translation with `bpf_ct_set_nat_info` and inserts it with
`bpf_ct_insert_entry`. The kernel's nf_nat then translates every packet of the connection, both
directions, fixing the IPv4 and TCP/UDP checksums; it runs because a dormant nftables table with
empty `type nat` chains keeps its hooks registered (runtime/nat.py). A ruleset replace leaves
the bindings, which live in conntrack, untouched.

The two chains are two programs: PREROUTING leaves its decision in skb->cb and tail-calls
POSTROUTING (slot `nat/POSTROUTING` of the current generation), which binds:

    cb[0] MAGIC | 1 when PREROUTING chose a destination    cb[1] its address (network order)
    cb[2] its ports, low | high << 16 (0: keep the port)    cb[3] MASQUERADE's source address

Scratch in KEYBUF while binding (the rules are done with it):

    +0 the original tuple  +16 bpf_ct_opts  +32 DNAT address (nf_inet_addr)  +48 SNAT address
    +64 SNAT ports lo, hi  +68 DNAT ports lo, hi  +72 has SNAT  +73 has DNAT
    +76 SNAT port chosen   +78 DNAT port chosen   +80 the reply tuple checked for collisions
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
from .hooks.base import HookPoint, Verdict
from .hooks.tcxdp import SKB_IFINDEX, TcFlavour
from .validate import CompileError

SKB_CB = 48  # offsetof(struct __sk_buff, cb)
CB_FLAGS, CB_DADDR, CB_DPORTS, CB_MASQ = SKB_CB, SKB_CB + 4, SKB_CB + 8, SKB_CB + 12
MAGIC = 0x4E415400  # "NAT": cb[0] was written by this ruleset's PREROUTING program
TCP, UDP = 6, 17
TCP_TIME_WAIT, TCP_CLOSE = 7, 8  # enum tcp_conntrack
SYN_ACK_RST_FIN, SYN = 0x17, 0x02
AF_INET = 2
FIB_SIZE = 64  # sizeof(struct bpf_fib_lookup)
FIB_LOOKUP_SKIP_NEIGH, FIB_LOOKUP_SRC = 4, 16
FIB_IFINDEX, FIB_SRC, FIB_DST = 8, 16, 32
MANIP_SRC, MANIP_DST = 0, 1  # enum nf_nat_manip_type
CURRENT_NETNS = -1
OPTS_SIZE = 12  # bpf_ct_opts without the zone fields: the default zone
PORT_TRIES = 8  # reply tuples tried before a port range counts as exhausted

K = L.KEYBUF
TUPLE, OPTS, DADDR, SADDR = K, K + 16, K + 32, K + 48
SPORTS, DPORTS, HAS_SNAT, HAS_DNAT, SPORT, DPORT, CHECK = (
    K + 64, K + 68, K + 72, K + 73, K + 76, K + 78, K + 80)

NAT_CHAINS = ("PREROUTING", "POSTROUTING")


def _s32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


def _le(b: bytes) -> int:
    """A 4-byte network-order value as the u32 a little-endian load sees."""
    return _s32(int.from_bytes(b, "little"))


def check_nat_table(table: Table, family: Family, hook: str) -> None:
    """Refuse, by name, nat rules this implementation cannot run."""
    busy = [c for c in table.chains.values() if c.rules or c.policy not in (None, "ACCEPT")]
    if not busy:
        return
    if hook != "tc":
        raise CompileError(f"table nat needs --hook tc (NAT is bound at tcx ingress; {hook} "
                           "programs cannot set up a connection's translation)")
    if family is not Family.IPV4:
        raise CompileError("table nat: IPv6 NAT (ip6tables -t nat) is not supported yet")
    for name in ("OUTPUT", "INPUT"):
        c = table.chains.get(name)
        if c is not None and (c.rules or c.policy not in (None, "ACCEPT")):
            what = ("locally generated connections" if name == "OUTPUT"
                    else "SNAT of connections to this host")
            raise CompileError(f"table nat: chain {name} ({what}) is not supported: "
                               "connections are bound at tc ingress, which these never cross",
                               c.origin)
    for c in table.chains.values():
        for n, rule in enumerate(c.rules, 1):
            t = rule.target
            if isinstance(getattr(t, "params", None), Nat) and t.params.range.base is not None:
                raise CompileError(f"rule {c.name} #{n}: {t.kind} with a base port (/N) is not "
                                   "supported", rule.origin)


def with_nat_chains(table: Table) -> Table:
    """The table with both programs' chains present (PREROUTING always tail-calls
    POSTROUTING, which binds)."""
    chains = dict(table.chains)
    for name in NAT_CHAINS:
        if name not in chains:
            chains[name] = Chain(name, "ACCEPT")
    return Table(table.name, chains)


@dataclass(frozen=True)
class TailCall:
    """Where POSTROUTING's program is: the runtime's generation word and program array
    (map keys), the slots per generation and POSTROUTING's slot in one."""

    gen_map: str
    progs_map: str
    gen_stride: int
    slot: int


@dataclass
class NatFlavour(TcFlavour):
    """tcx ingress programs of the nat table (IPv4)."""

    # ifindex -> name of the namespace's interfaces when compiling (for `-o`), and the
    # ingress interface's address (REDIRECT's destination).
    ifnames: dict[int, str] = field(default_factory=dict)
    local_addr: bytes | None = None
    tail: TailCall | None = None
    nat_chain: str = ""
    _bind: Label | None = field(default=None, init=False, repr=False)

    def chains(self, table: str) -> dict[str, HookPoint]:
        """PREROUTING and POSTROUTING, both at ingress."""
        if table != "nat":
            return {}
        return {c: HookPoint(c) for c in NAT_CHAINS}

    def for_hook(self, hook: HookPoint) -> NatFlavour:
        """A copy compiling one of the two chains."""
        return dataclasses.replace(self, egress=False, nat_chain=hook.chain)

    def static_fields(self) -> dict[Field, bytes]:
        """The input interface is known; POSTROUTING's output interface comes from the route."""
        out = super().static_fields()
        if self.nat_chain == "POSTROUTING":
            out.pop(Field.OIFNAME, None)
        return out

    # -- prologue ----------------------------------------------------------------------------

    def emit_meta(self, a: Assembler, fields: set[Field]) -> None:
        """Leave at once unless this is a connection's first packet; POSTROUTING also routes."""
        skip = a.label("nat_skip")
        go = a.label("nat_go")
        if self.nat_chain == "PREROUTING":
            self._emit_candidate(a, skip)
        else:
            self._bind = a.label("nat_bind")
            self._emit_route(a, skip)
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
        a.emit(I.ldx(I.W, I.R1, L.R_PKT, L.L3 + 12), I.stx(I.W, L.R_PKT, I.R1, TUPLE))
        a.emit(I.ldx(I.W, I.R1, L.R_PKT, L.L3 + 16), I.stx(I.W, L.R_PKT, I.R1, TUPLE + 4))
        a.emit(I.ldx(I.W, I.R1, L.R_PKT, L.L4), I.stx(I.W, L.R_PKT, I.R1, TUPLE + 8))
        _lookup(a, TUPLE)
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
        _lookup(a, TUPLE)  # skips, and reaps, the expired entry
        gone = a.label("nat_reopened")
        a.jump(JmpOp.JEQ, I.R0, 0, gone)
        a.emit(I.mov64(I.R8, I.R0))
        a.place(keep)
        a.emit(I.mov64(I.R1, I.R8), I.call_kfunc(release))
        a.goto(skip)
        a.place(gone)

    def _emit_route(self, a: Assembler, skip: Label) -> None:
        """Apply PREROUTING's decision to the packet struct, route it (bpf_fib_lookup with the
        source the kernel would pick), and fill the output interface's name."""
        a.emit(I.ldx(I.W, I.R1, L.R_CTX, CB_FLAGS), I.mov32(I.R2, I.R1))
        a.emit(I.alu32(AluOp.AND, I.R2, ~1, reg=False))
        a.jump(JmpOp.JNE, I.R2, MAGIC, skip)
        plain = a.label("nat_nodnat")
        a.emit(I.alu32(AluOp.AND, I.R1, 1, reg=False))
        a.jump(JmpOp.JEQ, I.R1, 0, plain)
        a.emit(I.ldx(I.W, I.R1, L.R_CTX, CB_DADDR), I.stx(I.W, L.R_PKT, I.R1, L.L3 + 16))
        a.emit(I.ldx(I.W, I.R1, L.R_CTX, CB_DPORTS), I.alu32(AluOp.AND, I.R1, 0xFFFF, reg=False))
        a.jump(JmpOp.JEQ, I.R1, 0, plain)
        a.emit(I.endian(I.R1, 16, big=True), I.stx(I.H, L.R_PKT, I.R1, L.L4 + 2))
        a.place(plain)
        for off in range(0, FIB_SIZE, 8):
            a.emit(I.st(I.DW, L.R_PKT, K + off, 0))
        a.emit(I.st(I.B, L.R_PKT, K, AF_INET))
        a.emit(I.ldx(I.B, I.R1, L.R_PKT, L.L4PROTO), I.stx(I.B, L.R_PKT, I.R1, K + 1))
        for i in (0, 2):  # sport, dport (2-byte aligned there)
            a.emit(I.ldx(I.H, I.R1, L.R_PKT, L.L4 + i), I.stx(I.H, L.R_PKT, I.R1, K + 2 + i))
        a.emit(I.ldx(I.W, I.R1, L.R_CTX, SKB_IFINDEX), I.stx(I.W, L.R_PKT, I.R1, K + FIB_IFINDEX))
        a.emit(I.ldx(I.B, I.R1, L.R_PKT, L.L3 + 1), I.stx(I.B, L.R_PKT, I.R1, K + 12))
        a.emit(I.ldx(I.W, I.R1, L.R_PKT, L.L3 + 12), I.stx(I.W, L.R_PKT, I.R1, K + FIB_SRC))
        a.emit(I.ldx(I.W, I.R1, L.R_PKT, L.L3 + 16), I.stx(I.W, L.R_PKT, I.R1, K + FIB_DST))
        a.emit(I.mov64(I.R1, L.R_CTX))
        a.emit(I.mov64(I.R2, L.R_PKT), I.alu64(AluOp.ADD, I.R2, K, reg=False))
        a.emit(I.mov64_imm(I.R3, FIB_SIZE))
        a.emit(I.mov64_imm(I.R4, FIB_LOOKUP_SRC | FIB_LOOKUP_SKIP_NEIGH))
        a.emit(I.call_helper(Helper.fib_lookup))
        # Delivered here (or not routable): the packet never reaches POSTROUTING.
        a.emit(I.mov64_imm(I.R7, Verdict.ACCEPT))
        a.jump(JmpOp.JNE, I.R0, 0, self._bind)
        a.emit(I.ldx(I.W, I.R1, L.R_PKT, K + FIB_SRC), I.stx(I.W, L.R_CTX, I.R1, CB_MASQ))
        a.emit(I.ldx(I.W, I.R1, L.R_PKT, K + FIB_IFINDEX))
        a.emit(I.st(I.DW, L.R_PKT, L.OIFNAME, 0), I.st(I.DW, L.R_PKT, L.OIFNAME + 8, 0))
        named = a.label("nat_oif")
        for idx, name in sorted(self.ifnames.items()):
            other = a.label("nat_oif_next")
            a.jump(JmpOp.JNE, I.R1, idx, other)
            raw = name.encode()[:15].ljust(16, b"\0")
            for i in range(0, 16, 4):
                a.emit(I.st(I.W, L.R_PKT, L.OIFNAME + i, _le(raw[i:i + 4])))
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
        else:
            self._emit_postrouting(a, targets)
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
        a.emit(I.st(I.W, L.R_CTX, CB_FLAGS, MAGIC))

        def one(kind: str, p: Nat) -> None:
            r = p.range
            if kind == "REDIRECT":
                if self.local_addr is None:
                    raise CompileError(f"REDIRECT: interface {self.ifname} has no IPv4 address")
                a.emit(I.st(I.W, L.R_CTX, CB_DADDR, _le(self.local_addr)))
            elif r.lo is None:
                a.emit(I.ldx(I.W, I.R1, L.R_PKT, L.L3 + 16), I.stx(I.W, L.R_CTX, I.R1, CB_DADDR))
            else:
                _pick_addr(a, r.lo, r.hi)
                a.emit(I.stx(I.W, L.R_CTX, I.R1, CB_DADDR))
            ports = 0 if r.port_lo is None else r.port_lo | r.port_hi << 16
            a.emit(I.st(I.W, L.R_CTX, CB_DPORTS, _s32(ports)))
            a.emit(I.st(I.W, L.R_CTX, CB_FLAGS, MAGIC | 1))

        self._targets(a, targets, one)
        # POSTROUTING of the same generation binds; without it the decision cannot stand.
        t = self.tail
        if t is None:
            raise CompileError("table nat: no program slot to reach POSTROUTING through")
        a.ld_map_value(I.R1, t.gen_map, 0)  # the IPv4 word
        a.emit(I.ldx(I.W, I.R3, I.R1, 0), I.alu64(AluOp.AND, I.R3, 1, reg=False))
        a.emit(I.alu64(AluOp.MUL, I.R3, t.gen_stride, reg=False))
        a.emit(I.alu64(AluOp.ADD, I.R3, t.slot, reg=False))
        a.emit(I.mov64(I.R1, L.R_CTX))
        a.ld_map(I.R2, t.progs_map)
        a.emit(I.call_helper(Helper.tail_call))
        a.emit(I.mov64_imm(I.R0, TcAction.SHOT), I.exit_())

    def _emit_postrouting(self, a: Assembler, targets: Sequence) -> None:
        a.place(self._bind)
        for off in range(DADDR, CHECK, 8):
            a.emit(I.st(I.DW, L.R_PKT, off, 0))

        def one(kind: str, p: Nat) -> None:
            r = p.range
            if kind == "MASQUERADE":
                a.emit(I.ldx(I.W, I.R1, L.R_CTX, CB_MASQ), I.stx(I.W, L.R_PKT, I.R1, SADDR))
            elif r.lo is None:
                a.emit(I.ldx(I.W, I.R1, L.R_PKT, L.L3 + 12), I.stx(I.W, L.R_PKT, I.R1, SADDR))
            else:
                _pick_addr(a, r.lo, r.hi)
                a.emit(I.stx(I.W, L.R_PKT, I.R1, SADDR))
            if r.port_lo is not None:
                a.emit(I.st(I.H, L.R_PKT, SPORTS, r.port_lo), I.st(I.H, L.R_PKT, SPORTS + 2,
                                                                   r.port_hi))
            a.emit(I.st(I.B, L.R_PKT, HAS_SNAT, 1))

        self._targets(a, targets, one)
        a.emit(I.ldx(I.W, I.R1, L.R_CTX, CB_FLAGS), I.alu32(AluOp.AND, I.R1, 1, reg=False))
        nodnat = a.label("nat_nodnat2")
        a.jump(JmpOp.JEQ, I.R1, 0, nodnat)
        a.emit(I.st(I.B, L.R_PKT, HAS_DNAT, 1))
        a.emit(I.ldx(I.W, I.R1, L.R_CTX, CB_DADDR), I.stx(I.W, L.R_PKT, I.R1, DADDR))
        a.emit(I.ldx(I.W, I.R1, L.R_CTX, CB_DPORTS), I.stx(I.W, L.R_PKT, I.R1, DPORTS))
        a.place(nodnat)
        a.emit(I.ldx(I.B, I.R1, L.R_PKT, HAS_SNAT), I.ldx(I.B, I.R2, L.R_PKT, HAS_DNAT))
        a.emit(I.alu32(AluOp.OR, I.R1, I.R2, reg=True))
        bind = a.label("nat_alloc")
        a.jump(JmpOp.JNE, I.R1, 0, bind)
        a.emit(I.mov64_imm(I.R0, TcAction.NEXT), I.exit_())  # no translation: plain conntrack
        a.place(bind)
        self._emit_tuple(a)
        _first_port(a, SPORTS, SPORT, random=True)
        _first_port(a, DPORTS, DPORT, random=False)
        self._emit_free_ports(a)

    def _emit_tuple(self, a: Assembler) -> None:
        """The original tuple, from the packet itself (the struct holds the DNAT view)."""
        a.emit(I.ldx(I.W, I.R8, L.R_PKT, L.L3OFF), I.alu64(AluOp.ADD, I.R8, 12, reg=False))
        self.emit_load(a, I.R8, TUPLE, 8)
        drop = a.label("nat_drop_early")
        a.jump(JmpOp.JNE, I.R0, 0, drop)
        a.emit(I.ldx(I.W, I.R8, L.R_PKT, L.L3OFF), I.ldx(I.W, I.R1, L.R_PKT, L.L4OFF))
        a.emit(I.alu64(AluOp.ADD, I.R8, I.R1, reg=True))
        self.emit_load(a, I.R8, TUPLE + 8, 4)
        ok = a.label("nat_tuple")
        a.jump(JmpOp.JEQ, I.R0, 0, ok)
        a.place(drop)
        a.emit(I.mov64_imm(I.R0, TcAction.SHOT), I.exit_())
        a.place(ok)

    def _emit_free_ports(self, a: Assembler) -> None:
        """Try reply tuples until one is free, moving through the SNAT port range (or else
        the DNAT one); a single port or none is left to the kernel, as nf_nat would."""
        alloc, drop = a.label("nat_ct_alloc"), a.label("nat_drop")
        for _ in range(PORT_TRIES):
            # reply: new destination -> new source
            for dst, has, new, orig in ((CHECK, HAS_DNAT, DADDR, TUPLE + 4),
                                        (CHECK + 4, HAS_SNAT, SADDR, TUPLE)):
                _select(a, has, I.W, new, orig, dst)
            for dst, port, orig in ((CHECK + 8, DPORT, TUPLE + 10), (CHECK + 10, SPORT, TUPLE + 8)):
                keep, put = a.label("nat_keep"), a.label("nat_put")
                a.emit(I.ldx(I.H, I.R1, L.R_PKT, port))
                a.jump(JmpOp.JEQ, I.R1, 0, keep)
                a.emit(I.endian(I.R1, 16, big=True))
                a.goto(put)
                a.place(keep)
                a.emit(I.ldx(I.H, I.R1, L.R_PKT, orig))
                a.place(put)
                a.emit(I.stx(I.H, L.R_PKT, I.R1, dst))
            _lookup(a, CHECK)
            a.jump(JmpOp.JEQ, I.R0, 0, alloc)
            a.emit(I.mov64(I.R1, I.R0), I.call_kfunc(vmlinux().func_id("bpf_ct_release")))
            # Taken: the next port of a range, or the kernel's choice.
            nxt = a.label("nat_next")
            for ranges, port in ((SPORTS, SPORT), (DPORTS, DPORT)):
                other = a.label("nat_norange")
                a.emit(I.ldx(I.H, I.R1, L.R_PKT, ranges), I.ldx(I.H, I.R2, L.R_PKT, ranges + 2))
                a.jump(JmpOp.JGE, I.R1, I.R2, other, reg=True)
                a.emit(I.ldx(I.H, I.R3, L.R_PKT, port), I.alu32(AluOp.ADD, I.R3, 1, reg=False))
                wrap = a.label("nat_wrap")
                a.jump(JmpOp.JGT, I.R3, I.R2, wrap, reg=True)
                a.emit(I.stx(I.H, L.R_PKT, I.R3, port))
                a.goto(nxt)
                a.place(wrap)
                a.emit(I.stx(I.H, L.R_PKT, I.R1, port))
                a.goto(nxt)
                a.place(other)
            a.goto(alloc)
            a.place(nxt)
        a.goto(drop)  # every port tried is taken
        a.place(alloc)
        btf = vmlinux()
        _opts(a)
        a.emit(I.mov64(I.R1, L.R_CTX))
        a.emit(I.mov64(I.R2, L.R_PKT), I.alu64(AluOp.ADD, I.R2, TUPLE, reg=False))
        a.emit(I.mov64_imm(I.R3, 12))
        a.emit(I.mov64(I.R4, L.R_PKT), I.alu64(AluOp.ADD, I.R4, OPTS, reg=False))
        a.emit(I.mov64_imm(I.R5, OPTS_SIZE))
        a.emit(I.call_kfunc(btf.func_id("bpf_skb_ct_alloc")))
        a.jump(JmpOp.JEQ, I.R0, 0, drop)
        a.emit(I.mov64(I.R8, I.R0))
        for has, addr, port, manip in ((HAS_DNAT, DADDR, DPORT, MANIP_DST),
                                       (HAS_SNAT, SADDR, SPORT, MANIP_SRC)):
            skip = a.label("nat_manip")
            a.emit(I.ldx(I.B, I.R1, L.R_PKT, has))
            a.jump(JmpOp.JEQ, I.R1, 0, skip)
            a.emit(I.mov64(I.R1, I.R8))
            a.emit(I.mov64(I.R2, L.R_PKT), I.alu64(AluOp.ADD, I.R2, addr, reg=False))
            a.emit(I.ldx(I.H, I.R3, L.R_PKT, port), I.mov64_imm(I.R4, manip))
            a.emit(I.call_kfunc(btf.func_id("bpf_ct_set_nat_info")))
            a.place(skip)
        a.emit(I.mov64(I.R1, I.R8), I.call_kfunc(btf.func_id("bpf_ct_insert_entry")))
        raced, accept = a.label("nat_raced"), a.label("nat_bound")
        a.jump(JmpOp.JEQ, I.R0, 0, raced)
        a.place(accept)
        a.emit(I.mov64(I.R1, I.R0), I.call_kfunc(btf.func_id("bpf_ct_release")))
        a.emit(I.mov64_imm(I.R0, TcAction.NEXT), I.exit_())
        # Not inserted: another CPU bound the same flow first (its entry translates this
        # packet too), or the entry could not be made (drop rather than leak it untranslated).
        a.place(raced)
        _lookup(a, TUPLE)
        a.jump(JmpOp.JNE, I.R0, 0, accept)
        a.place(drop)
        a.emit(I.mov64_imm(I.R0, TcAction.SHOT), I.exit_())


def _opts(a: Assembler) -> None:
    """bpf_ct_opts for the packet's protocol in the current namespace, default zone."""
    a.emit(I.st(I.W, L.R_PKT, OPTS, CURRENT_NETNS), I.st(I.W, L.R_PKT, OPTS + 4, 0))
    a.emit(I.ldx(I.B, I.R1, L.R_PKT, L.L4PROTO), I.stx(I.W, L.R_PKT, I.R1, OPTS + 8))


def _lookup(a: Assembler, tuple_off: int) -> None:
    """r0 = bpf_skb_ct_lookup(ctx, r9 + tuple_off, 12, opts, 12)."""
    _opts(a)
    a.emit(I.mov64(I.R1, L.R_CTX))
    a.emit(I.mov64(I.R2, L.R_PKT), I.alu64(AluOp.ADD, I.R2, tuple_off, reg=False))
    a.emit(I.mov64_imm(I.R3, 12))
    a.emit(I.mov64(I.R4, L.R_PKT), I.alu64(AluOp.ADD, I.R4, OPTS, reg=False))
    a.emit(I.mov64_imm(I.R5, OPTS_SIZE))
    a.emit(I.call_kfunc(vmlinux().func_id("bpf_skb_ct_lookup")))


def _select(a: Assembler, has: int, size: int, new: int, orig: int, dst: int) -> None:
    """r9[dst] = r9[has] ? r9[new] : r9[orig]."""
    take, put = a.label("nat_orig"), a.label("nat_sel")
    a.emit(I.ldx(I.B, I.R1, L.R_PKT, has))
    a.jump(JmpOp.JEQ, I.R1, 0, take)
    a.emit(I.ldx(size, I.R1, L.R_PKT, new))
    a.goto(put)
    a.place(take)
    a.emit(I.ldx(size, I.R1, L.R_PKT, orig))
    a.place(put)
    a.emit(I.stx(size, L.R_PKT, I.R1, dst))


def _pick_addr(a: Assembler, lo: bytes, hi: bytes) -> None:
    """r1 = an address of lo..hi (network order): the same one for every connection from a
    source address, as nf_nat's hash of the source does."""
    n = int.from_bytes(hi, "big") - int.from_bytes(lo, "big") + 1
    if n <= 1:
        a.emit(I.mov32_imm(I.R1, _le(lo)))
        return
    a.emit(I.ldx(I.W, I.R1, L.R_PKT, L.L3 + 12), I.endian(I.R1, 32, big=True))
    a.emit(I.alu32(AluOp.MUL, I.R1, _s32(0x9E3779B1), reg=False))
    a.emit(I.alu32(AluOp.RSH, I.R1, 8, reg=False))
    a.emit(I.alu32(AluOp.MOD, I.R1, n, reg=False))
    a.emit(I.alu32(AluOp.ADD, I.R1, _s32(int.from_bytes(lo, "big")), reg=False))
    a.emit(I.endian(I.R1, 32, big=True))


def _first_port(a: Assembler, ranges: int, port: int, *, random: bool) -> None:
    """r9[port] = the first port to try in r9[ranges] (lo, hi): random for sources, a hash of
    the source address for destinations; 0 without a range."""
    done = a.label("nat_port")
    a.emit(I.ldx(I.H, I.R1, L.R_PKT, ranges), I.stx(I.H, L.R_PKT, I.R1, port))
    a.emit(I.ldx(I.H, I.R2, L.R_PKT, ranges + 2))
    a.jump(JmpOp.JGE, I.R1, I.R2, done, reg=True)
    if random:
        a.emit(I.call_helper(Helper.get_prandom_u32))
    else:
        a.emit(I.ldx(I.W, I.R0, L.R_PKT, L.L3 + 12), I.endian(I.R0, 32, big=True))
        a.emit(I.alu32(AluOp.MUL, I.R0, _s32(0x9E3779B1), reg=False))
        a.emit(I.alu32(AluOp.RSH, I.R0, 8, reg=False))
    a.emit(I.ldx(I.H, I.R1, L.R_PKT, ranges), I.ldx(I.H, I.R2, L.R_PKT, ranges + 2))
    a.emit(I.alu32(AluOp.SUB, I.R2, I.R1, reg=True), I.alu32(AluOp.ADD, I.R2, 1, reg=False))
    a.emit(I.alu32(AluOp.MOD, I.R0, I.R2, reg=True), I.alu32(AluOp.ADD, I.R0, I.R1, reg=True))
    a.emit(I.stx(I.H, L.R_PKT, I.R0, port))
    a.place(done)


def compile_nat(table: Table, family: Family, hook: str, iface: str | None,
                mac: bytes | None, env: tuple | None, tail: TailCall | None):
    """Compile the nat table for tc ingress of `iface`; `env` is (ifnames, local address)."""
    from .codegen import compile_table

    check_nat_table(table, family, hook)
    ifnames, local = env if env is not None else ({}, None)
    fl = NatFlavour(family, ifname=iface or "", mac=mac, ifnames=dict(ifnames), local_addr=local,
                    tail=tail)
    return compile_table(with_nat_chains(table), fl)
