"""Binding a new connection's translation into conntrack, for IPv4 and IPv6 (see compiler/nat.py).

The code is the same for both families; what differs is in `NatFamily`: the address size, the
part of `struct bpf_sock_tuple` the conntrack kfuncs take (12 or 36 bytes, which is how they tell
the family), and where the addresses sit in the packet struct. Scratch in KEYBUF while binding
(the rules are done with it), for an address of A bytes and a tuple of T = 2A + 4:

    +0 the original tuple   +T rounded up to 8: bpf_ct_opts
    CHECK = opts + 12: the reply tuple checked for collisions. Its source is the destination
          chosen (DNAT's address, or the packet's own) and its destination the source chosen,
          so both serve as bpf_ct_set_nat_info's union nf_inet_addr (16 bytes read from each)
    then: SNAT ports lo, hi | DNAT ports lo, hi | has SNAT, has DNAT | SNAT port | DNAT port
"""

from __future__ import annotations

from dataclasses import dataclass

from ..bpf import insn as I
from ..bpf.asm import Assembler
from ..bpf.btf import vmlinux
from ..bpf.consts import Helper, TcAction
from ..bpf.insn import AluOp, JmpOp
from ..ir.model import Family
from . import layout as L

TCP, UDP = 6, 17
AF_INET, AF_INET6 = 2, 10
MANIP_SRC, MANIP_DST = 0, 1  # enum nf_nat_manip_type
CURRENT_NETNS = -1
OPTS_SIZE = 12  # bpf_ct_opts without the zone fields: the default zone
PORT_TRIES = 8  # reply tuples tried before a port range counts as exhausted
GOLDEN = 0x9E3779B1  # multiplicative hash of the source address
K = L.KEYBUF


def le32(b: bytes) -> int:
    """A 4-byte network-order value as the u32 a little-endian load sees."""
    return I.s32(int.from_bytes(b, "little"))


@dataclass(frozen=True)
class NatFamily:
    """One family's facts for the binding code, and its scratch offsets."""

    family: Family
    alen: int  # address bytes
    af: int  # for bpf_fib_lookup
    src: int  # source address in the packet struct (the destination follows it)
    hdr_src: int  # the same, in the network header itself

    @property
    def dst(self) -> int:
        """The destination address in the packet struct."""
        return self.src + self.alen

    @property
    def tlen(self) -> int:
        """Size of bpf_sock_tuple's ipv4 or ipv6 part."""
        return 2 * self.alen + 4

    @property
    def tuple(self) -> int:
        """The original tuple."""
        return K

    @property
    def opts(self) -> int:
        """bpf_ct_opts."""
        return K + (self.tlen + 7) // 8 * 8

    @property
    def check(self) -> int:
        """The reply tuple tried."""
        return self.opts + OPTS_SIZE

    @property
    def new_dst(self) -> int:
        """The destination chosen (the reply's source)."""
        return self.check

    @property
    def new_src(self) -> int:
        """The source chosen (the reply's destination)."""
        return self.check + self.alen

    @property
    def sports(self) -> int:
        """SNAT's port range, lo and hi (host order); DNAT's follows."""
        return self.check + max(self.tlen, self.alen + 16)

    @property
    def dports(self) -> int:
        return self.sports + 4

    @property
    def has_snat(self) -> int:
        return self.sports + 8

    @property
    def has_dnat(self) -> int:
        return self.sports + 9

    @property
    def sport(self) -> int:
        """The SNAT port chosen (0: the kernel's choice); the DNAT one follows."""
        return self.sports + 10

    @property
    def dport(self) -> int:
        return self.sports + 12

    @property
    def end(self) -> int:
        return self.sports + 14


NAT4 = NatFamily(Family.IPV4, 4, AF_INET, L.L3 + 12, 12)
NAT6 = NatFamily(Family.IPV6, 16, AF_INET6, L.L3 + 8, 8)
for _nf in (NAT4, NAT6):
    assert _nf.end <= K + L.KEYBUF_SIZE, _nf


def nat_family(family: Family) -> NatFamily:
    """The binding facts of `family`."""
    return NAT4 if family is Family.IPV4 else NAT6


def copy_words(a: Assembler, src_reg: int, src: int, dst_reg: int, dst: int, n: int) -> None:
    """Copy `n` bytes (a multiple of 4, both ends 4-aligned) through r1."""
    for i in range(0, n, 4):
        a.emit(I.ldx(I.W, I.R1, src_reg, src + i), I.stx(I.W, dst_reg, I.R1, dst + i))


def store_const(a: Assembler, reg: int, off: int, value: bytes) -> None:
    """Store a constant (network order, a multiple of 4 bytes) at reg + off."""
    for i in range(0, len(value), 4):
        a.emit(I.st(I.W, reg, off + i, le32(value[i:i + 4])))


def opts(a: Assembler, nf: NatFamily) -> None:
    """bpf_ct_opts for the packet's protocol in the current namespace, default zone."""
    a.emit(I.st(I.W, L.R_PKT, nf.opts, CURRENT_NETNS), I.st(I.W, L.R_PKT, nf.opts + 4, 0))
    a.emit(I.ldx(I.B, I.R1, L.R_PKT, L.L4PROTO), I.stx(I.W, L.R_PKT, I.R1, nf.opts + 8))


def lookup(a: Assembler, nf: NatFamily, tuple_off: int) -> None:
    """r0 = bpf_skb_ct_lookup(ctx, r9 + tuple_off, tuple size, opts, 12)."""
    opts(a, nf)
    a.emit(I.mov64(I.R1, L.R_CTX))
    a.emit(I.mov64(I.R2, L.R_PKT), I.alu64(AluOp.ADD, I.R2, tuple_off, reg=False))
    a.emit(I.mov64_imm(I.R3, nf.tlen))
    a.emit(I.mov64(I.R4, L.R_PKT), I.alu64(AluOp.ADD, I.R4, nf.opts, reg=False))
    a.emit(I.mov64_imm(I.R5, OPTS_SIZE))
    a.emit(I.call_kfunc(vmlinux().func_id("bpf_skb_ct_lookup")))


def hash_source(a: Assembler, nf: NatFamily, reg: int, tmp: int, at: int | None = None) -> None:
    """reg = a 24-bit hash of the address at r9 + `at` (the packet's source by default), its
    words folded by xor."""
    at = nf.src if at is None else at
    a.emit(I.ldx(I.W, reg, L.R_PKT, at))
    for i in range(4, nf.alen, 4):
        a.emit(I.ldx(I.W, tmp, L.R_PKT, at + i), I.alu32(AluOp.XOR, reg, tmp, reg=True))
    a.emit(I.endian(reg, 32, big=True))
    a.emit(I.alu32(AluOp.MUL, reg, I.s32(GOLDEN), reg=False))
    a.emit(I.alu32(AluOp.RSH, reg, 8, reg=False))


def pick_addr(a: Assembler, nf: NatFamily, lo: bytes, hi: bytes, reg: int, off: int,
              at: int | None = None) -> None:
    """Store at reg + off an address of lo..hi: the same one for every connection from a source
    address, as nf_nat's hash of the source does (`at`: hash another address of r9 instead)."""
    n = int.from_bytes(hi, "big") - int.from_bytes(lo, "big") + 1
    if n <= 1:
        store_const(a, reg, off, lo)
        return
    hash_source(a, nf, I.R1, I.R2, at)
    if n < 1 << 32:
        a.emit(I.alu32(AluOp.MOD, I.R1, I.s32(n), reg=False))
    # lo + r1, word by word from the least significant, carrying in r1 (the hash is below
    # 2**24, so a range of 2**32 addresses or more takes it as it is).
    for i in reversed(range(0, nf.alen, 4)):
        a.emit(I.mov32_imm(I.R3, I.s32(int.from_bytes(lo[i:i + 4], "big"))))
        a.emit(I.alu64(AluOp.ADD, I.R3, I.R1, reg=True))
        a.emit(I.mov64(I.R1, I.R3), I.alu64(AluOp.RSH, I.R1, 32, reg=False))
        a.emit(I.endian(I.R3, 32, big=True), I.stx(I.W, reg, I.R3, off + i))


def first_port(a: Assembler, nf: NatFamily, ranges: int, port: int, *, random: bool) -> None:
    """r9[port] = the first port to try in r9[ranges] (lo, hi): random for sources, a hash of
    the source address for destinations; 0 without a range."""
    done = a.label("nat_port")
    a.emit(I.ldx(I.H, I.R1, L.R_PKT, ranges), I.stx(I.H, L.R_PKT, I.R1, port))
    a.emit(I.ldx(I.H, I.R2, L.R_PKT, ranges + 2))
    a.jump(JmpOp.JGE, I.R1, I.R2, done, reg=True)
    if random:
        a.emit(I.call_helper(Helper.get_prandom_u32))
    else:
        hash_source(a, nf, I.R0, I.R1)
    a.emit(I.ldx(I.H, I.R1, L.R_PKT, ranges), I.ldx(I.H, I.R2, L.R_PKT, ranges + 2))
    a.emit(I.alu32(AluOp.SUB, I.R2, I.R1, reg=True), I.alu32(AluOp.ADD, I.R2, 1, reg=False))
    a.emit(I.alu32(AluOp.MOD, I.R0, I.R2, reg=True), I.alu32(AluOp.ADD, I.R0, I.R1, reg=True))
    a.emit(I.stx(I.H, L.R_PKT, I.R0, port))
    a.place(done)


def clear(a: Assembler, nf: NatFamily) -> None:
    """Zero the binding scratch; the source chosen starts as the packet's own and the
    destination as the packet struct's (PREROUTING's choice, applied by POSTROUTING)."""
    for off in range(nf.check, nf.end + 2, 4):
        a.emit(I.st(I.W, L.R_PKT, off, 0))
    copy_words(a, L.R_PKT, nf.src, L.R_PKT, nf.new_src, nf.alen)
    copy_words(a, L.R_PKT, nf.dst, L.R_PKT, nf.new_dst, nf.alen)


def emit_bind(a: Assembler, fl, nf: NatFamily) -> None:
    """With has SNAT / has DNAT, the addresses and port ranges in scratch: find a free reply
    tuple, create the conntrack entry with its translations and insert it."""
    a.emit(I.ldx(I.B, I.R1, L.R_PKT, nf.has_snat), I.ldx(I.B, I.R2, L.R_PKT, nf.has_dnat))
    a.emit(I.alu32(AluOp.OR, I.R1, I.R2, reg=True))
    bind = a.label("nat_alloc")
    a.jump(JmpOp.JNE, I.R1, 0, bind)
    a.emit(I.mov64_imm(I.R0, TcAction.NEXT), I.exit_())  # no translation: plain conntrack
    a.place(bind)
    _emit_tuple(a, fl, nf)
    first_port(a, nf, nf.sports, nf.sport, random=True)
    first_port(a, nf, nf.dports, nf.dport, random=False)
    _emit_free_ports(a, nf)


def _emit_tuple(a: Assembler, fl, nf: NatFamily) -> None:
    """The original tuple, from the packet itself (the struct holds the DNAT view)."""
    a.emit(I.ldx(I.W, I.R8, L.R_PKT, L.L3OFF), I.alu64(AluOp.ADD, I.R8, nf.hdr_src, reg=False))
    fl.emit_load(a, I.R8, nf.tuple, 2 * nf.alen)
    drop = a.label("nat_drop_early")
    a.jump(JmpOp.JNE, I.R0, 0, drop)
    a.emit(I.ldx(I.W, I.R8, L.R_PKT, L.L3OFF), I.ldx(I.W, I.R1, L.R_PKT, L.L4OFF))
    a.emit(I.alu64(AluOp.ADD, I.R8, I.R1, reg=True))
    fl.emit_load(a, I.R8, nf.tuple + 2 * nf.alen, 4)
    ok = a.label("nat_tuple")
    a.jump(JmpOp.JEQ, I.R0, 0, ok)
    a.place(drop)
    a.emit(I.mov64_imm(I.R0, TcAction.SHOT), I.exit_())
    a.place(ok)


def _emit_free_ports(a: Assembler, nf: NatFamily) -> None:
    """Try reply tuples until one is free, moving through the SNAT port range (or else the
    DNAT one); a single port or none is left to the kernel, as nf_nat would."""
    alloc, drop = a.label("nat_ct_alloc"), a.label("nat_drop")
    ports = 2 * nf.alen  # the ports' offset in a tuple
    for _ in range(PORT_TRIES):
        # reply: new destination port -> new source port
        for dst, port, orig in ((nf.check + ports, nf.dport, nf.tuple + ports + 2),
                                (nf.check + ports + 2, nf.sport, nf.tuple + ports)):
            keep, put = a.label("nat_keep"), a.label("nat_put")
            a.emit(I.ldx(I.H, I.R1, L.R_PKT, port))
            a.jump(JmpOp.JEQ, I.R1, 0, keep)
            a.emit(I.endian(I.R1, 16, big=True))
            a.goto(put)
            a.place(keep)
            a.emit(I.ldx(I.H, I.R1, L.R_PKT, orig))
            a.place(put)
            a.emit(I.stx(I.H, L.R_PKT, I.R1, dst))
        lookup(a, nf, nf.check)
        a.jump(JmpOp.JEQ, I.R0, 0, alloc)
        a.emit(I.mov64(I.R1, I.R0), I.call_kfunc(vmlinux().func_id("bpf_ct_release")))
        # Taken: the next port of a range, or the kernel's choice.
        nxt = a.label("nat_next")
        for ranges, port in ((nf.sports, nf.sport), (nf.dports, nf.dport)):
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
    _emit_insert(a, nf, drop)


def _emit_insert(a: Assembler, nf: NatFamily, drop) -> None:
    btf = vmlinux()
    opts(a, nf)
    a.emit(I.mov64(I.R1, L.R_CTX))
    a.emit(I.mov64(I.R2, L.R_PKT), I.alu64(AluOp.ADD, I.R2, nf.tuple, reg=False))
    a.emit(I.mov64_imm(I.R3, nf.tlen))
    a.emit(I.mov64(I.R4, L.R_PKT), I.alu64(AluOp.ADD, I.R4, nf.opts, reg=False))
    a.emit(I.mov64_imm(I.R5, OPTS_SIZE))
    a.emit(I.call_kfunc(btf.func_id("bpf_skb_ct_alloc")))
    a.jump(JmpOp.JEQ, I.R0, 0, drop)
    a.emit(I.mov64(I.R8, I.R0))
    for has, addr, port, manip in ((nf.has_dnat, nf.new_dst, nf.dport, MANIP_DST),
                                   (nf.has_snat, nf.new_src, nf.sport, MANIP_SRC)):
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
    # Not inserted: another CPU bound the same flow first (its entry translates this packet
    # too), or the entry could not be made (drop rather than leak it untranslated).
    a.place(raced)
    lookup(a, nf, nf.tuple)
    a.jump(JmpOp.JNE, I.R0, 0, accept)
    a.place(drop)
    a.emit(I.mov64_imm(I.R0, TcAction.SHOT), I.exit_())
