"""The kernel's conntrack entries of ICMP queries, for tc ingress and XDP.

bpf_skb_ct_lookup / bpf_xdp_ct_lookup look up TCP and UDP only, so the entry of an ICMP query
flow (echo, timestamp, information, address mask; ICMPv6 echo and node information) is found
another way: a *recorder* runs at tcx egress of the same interface, after the kernel's
conntrack (OUTPUT/FORWARD and POSTROUTING come first), reads the entry attached to each
outgoing ICMP packet (`skb->_nfct`) and remembers it in an LRU hash keyed by the entry's two
tuples, byte for byte as struct nf_conntrack_tuple lays them out (with `dst.dir` zeroed):
{nf_conn pointer, its namespace, the tuple's direction}.

At ingress the packet's tuple (or, for an ICMP error, the inverse of the quoted packet's, as
nf_conntrack_inet_error looks it up) is the key. The remembered pointer is not a reference:
nf_conn is SLAB_TYPESAFE_BY_RCU, so the object may have been freed, reused for another flow,
or its slab page given back. It is only trusted after probe reads (which never fault) show
what the kernel's own lookup checks (____nf_conntrack_find, nf_ct_key_equal): the tuple of the
remembered direction equals the key, the entry is CONFIRMED, not DYING, still in the same
namespace and not expired (`(s32)(timeout - (u32)jiffies) > 0`, nf_ct_is_expired). An entry
freed and reused for the same tuple is the flow's new entry, which is what the kernel would
find too.

What this covers: flows whose packets left through this interface while the recorder ran (this
host's pings, its answers to incoming ones, forwarded flows routed out here). A flow whose
packets all leave elsewhere, or were sent before the recorder was attached, or that the LRU
evicted, is not found: requests are then NEW (as netfilter for a flow without an answer, but
without the entry's status bits), answers and errors quoting them INVALID.
"""

from __future__ import annotations

from ...bpf import insn as I
from ...bpf.asm import Assembler, Label, Origin, Program
from ...bpf.btf import Btf, BtfError, BtfKind, vmlinux
from ...bpf.consts import HELPER_NAMES, Helper, MapType, ProgType, TcAction
from ...bpf.insn import AluOp, JmpOp
from ...bpf.maps import MapSpec
from ...ir.pred import CT_FIELDS, Field
from .. import layout as L
from .base import Flavour

CT_QUERY = "ctquery"  # the map's key in a compiled table's maps (shared, pinned)
KEY_SIZE = 40  # struct nf_conntrack_tuple
VALUE_SIZE = 24  # {u64 nf_conn, u64 struct net, u32 direction, u32 pad}
MAX_ENTRIES = 32768  # two per flow; nf_conntrack_icmp_timeout is 30 s
ICMP, ICMPV6 = 1, 58
IPS_CONFIRMED, IPS_DYING = 1 << 3, 1 << 9
NFCT_PTRMASK = ~7
JIFFIES64 = HELPER_NAMES.index("jiffies64")  # bpf_jiffies64: nf_ct_is_expired's clock


def map_spec() -> MapSpec:
    """The recorded entries: one map per hook directory, for both families."""
    return MapSpec(MapType.LRU_HASH, KEY_SIZE, VALUE_SIZE, MAX_ENTRIES, name="bpf_ctquery")


def looks_up(fl: Flavour) -> bool:
    """True where conntrack has not seen the packet yet: tc ingress and XDP."""
    if fl.prog_type is ProgType.XDP:
        return True
    return fl.prog_type is ProgType.SCHED_CLS and not getattr(fl, "egress", False)


def maps_for(fields: set[Field], fl: Flavour) -> dict[str, MapSpec]:
    """The recorded entries, for a tc ingress or XDP program whose rules read conntrack."""
    return {CT_QUERY: map_spec()} if fields & CT_FIELDS and looks_up(fl) else {}


class _Conn:
    """Offsets in struct nf_conn and its tuples, from the kernel's BTF."""

    def __init__(self) -> None:
        btf = vmlinux()
        m = btf.member_offset
        self.tuple0 = m("nf_conn", "tuplehash").offset + m("nf_conntrack_tuple_hash",
                                                          "tuple").offset
        self.th_size = btf.type_size(btf.find("nf_conntrack_tuple_hash", BtfKind.STRUCT))
        self.status = m("nf_conn", "status").offset
        self.timeout = m("nf_conn", "timeout").offset
        self.net = m("nf_conn", "ct_net").offset
        self.zone = m("nf_conn", "zone.id").offset if _has(btf, "nf_conn", "zone.id") else None
        t = {k: m("nf_conntrack_tuple", k).offset for k in (
            "src.u3", "src.u.icmp.id", "src.l3num", "dst.u3", "dst.u.icmp.type",
            "dst.u.icmp.code", "dst.protonum", "dst.dir")}
        self.tuple = t
        self.dir, self.proto = t["dst.dir"], t["dst.protonum"]
        self.nfct = m("sk_buff", "_nfct").offset
        if self.dir != KEY_SIZE - 1:
            raise BtfError("struct nf_conntrack_tuple is laid out unlike any kernel "
                           "pybpfilter knows")


def tuple_offsets() -> dict[str, int]:
    """Offsets in struct nf_conntrack_tuple (the key): src.u3, src.u.icmp.id, src.l3num,
    dst.u3, dst.u.icmp.type, dst.u.icmp.code, dst.protonum, dst.dir."""
    return dict(_Conn().tuple)


def _has(btf: Btf, struct: str, path: str) -> bool:
    try:
        btf.member_offset(struct, path)
    except BtfError:  # CONFIG_NF_CONNTRACK_ZONES off
        return False
    return True


def _probe(a: Assembler, dst_reg: int, dst: int, size: int, base: int, off: int) -> None:
    """dst_reg[dst:dst+size] = kernel memory at base + off (zeros if unreadable)."""
    a.emit(I.mov64(I.R1, dst_reg), I.alu64(AluOp.ADD, I.R1, dst, reg=False))
    a.emit(I.mov64_imm(I.R2, size))
    a.emit(I.mov64(I.R3, base), I.alu64(AluOp.ADD, I.R3, off, reg=False))
    a.emit(I.call_helper(Helper.probe_read_kernel))


# -- the recorder (tcx egress) ----------------------------------------------------------------

# Stack of the recorder: key at -64, value at -24, scratch at -32.
R_KEY, R_VAL, R_TMP = -64, -24, -32


def recorder() -> Program:
    """The tcx egress program that remembers the entries of outgoing ICMP query flows."""
    c = _Conn()
    btf = vmlinux()
    a = Assembler()
    with a.origin(Origin("conntrack: record ICMP query entries (tc egress)")):
        out = a.label("out")
        a.emit(I.call_kfunc(btf.func_id("bpf_cast_to_kern_ctx")))
        a.emit(I.ldx(I.DW, I.R7, I.R0, c.nfct))
        a.emit(I.alu64(AluOp.AND, I.R7, NFCT_PTRMASK, reg=False))
        a.jump(JmpOp.JEQ, I.R7, 0, out)
        _probe(a, I.R10, R_TMP, 8, I.R7, c.tuple0 + c.proto)
        a.emit(I.ldx(I.B, I.R1, I.R10, R_TMP))
        icmp = a.label("icmp")
        a.jump(JmpOp.JEQ, I.R1, ICMP, icmp)
        a.jump(JmpOp.JNE, I.R1, ICMPV6, out)
        a.place(icmp)
        if c.zone is not None:  # the kfuncs and this lookup know the default zone only
            _probe(a, I.R10, R_TMP, 8, I.R7, c.zone)
            a.emit(I.ldx(I.H, I.R1, I.R10, R_TMP))
            a.jump(JmpOp.JNE, I.R1, 0, out)
        a.emit(I.stx(I.DW, I.R10, I.R7, R_VAL))
        _probe(a, I.R10, R_VAL + 8, 8, I.R7, c.net)
        for d in (0, 1):
            _probe(a, I.R10, R_KEY, KEY_SIZE, I.R7, c.tuple0 + d * c.th_size)
            a.emit(I.st(I.B, I.R10, R_KEY + c.dir, 0))
            a.emit(I.st(I.DW, I.R10, R_VAL + 16, d))
            a.ld_map(I.R1, CT_QUERY)
            a.emit(I.mov64(I.R2, I.R10), I.alu64(AluOp.ADD, I.R2, R_KEY, reg=False))
            a.emit(I.mov64(I.R3, I.R10), I.alu64(AluOp.ADD, I.R3, R_VAL, reg=False))
            a.emit(I.mov64_imm(I.R4, 0), I.call_helper(Helper.map_update_elem))
        a.place(out)
        a.emit(I.mov64_imm(I.R0, TcAction.NEXT), I.exit_())
    return a.assemble()


# -- the lookup (tc ingress, XDP) -------------------------------------------------------------


def emit_find(a: Assembler, key: int, *, tup: int, tmp: int, net: int, dir_at: int,
              miss: Label) -> None:
    """r7 = the recorded entry of the tuple at r9+key (KEY_SIZE bytes, dir zero) and the
    byte at r9+dir_at = its direction, when the kernel would find it; else goto miss.
    Scratch (8-aligned, in the packet struct): `tup` KEY_SIZE bytes, `tmp` and `net` 8 bytes
    each; clobbers r0-r5 and r8."""
    c = _Conn()
    a.ld_map(I.R1, CT_QUERY)
    a.emit(I.mov64(I.R2, L.R_PKT), I.alu64(AluOp.ADD, I.R2, key, reg=False))
    a.emit(I.call_helper(Helper.map_lookup_elem))
    a.jump(JmpOp.JEQ, I.R0, 0, miss)
    a.emit(I.ldx(I.DW, I.R7, I.R0, 0), I.ldx(I.DW, I.R8, I.R0, 16))
    a.emit(I.stx(I.B, L.R_PKT, I.R8, dir_at))
    a.emit(I.ldx(I.DW, I.R1, I.R0, 8), I.stx(I.DW, L.R_PKT, I.R1, net))
    # The tuple of the remembered direction must still be the key (nf_ct_tuple_equal).
    a.jump(JmpOp.JGT, I.R8, 1, miss)
    a.emit(I.alu64(AluOp.MUL, I.R8, c.th_size, reg=False))
    a.emit(I.alu64(AluOp.ADD, I.R8, I.R7, reg=True))
    _probe(a, L.R_PKT, tup, KEY_SIZE, I.R8, c.tuple0)
    a.emit(I.st(I.B, L.R_PKT, tup + c.dir, 0))
    for o in range(0, KEY_SIZE, 8):
        a.emit(I.ldx(I.DW, I.R1, L.R_PKT, tup + o), I.ldx(I.DW, I.R2, L.R_PKT, key + o))
        a.jump(JmpOp.JNE, I.R1, I.R2, miss, reg=True)
    # The same namespace (a reused object may belong to another).
    _probe(a, L.R_PKT, tmp, 8, I.R7, c.net)
    a.emit(I.ldx(I.DW, I.R1, L.R_PKT, tmp), I.ldx(I.DW, I.R2, L.R_PKT, net))
    a.jump(JmpOp.JNE, I.R1, I.R2, miss, reg=True)
    # Confirmed (in the hash table) and not being deleted (conntrack -F, gc, a TCP reopen).
    _probe(a, L.R_PKT, tmp, 8, I.R7, c.status)
    a.emit(I.ldx(I.DW, I.R1, L.R_PKT, tmp))
    a.emit(I.mov64(I.R2, I.R1), I.alu64(AluOp.AND, I.R2, IPS_CONFIRMED | IPS_DYING, reg=False))
    a.jump(JmpOp.JNE, I.R2, IPS_CONFIRMED, miss)
    # Not expired: the kernel's lookup drops an entry whose timeout has passed.
    _probe(a, L.R_PKT, tmp, 8, I.R7, c.timeout)
    a.emit(I.call_helper(JIFFIES64))
    a.emit(I.ldx(I.W, I.R1, L.R_PKT, tmp), I.alu32(AluOp.SUB, I.R1, I.R0, reg=True))
    a.jump(JmpOp.JSLE, I.R1, 0, miss, wide=True)
