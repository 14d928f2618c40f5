"""Code for -m connlimit: xt_connlimit's count of a group's connections, as nf_conncount keeps it.

The kernel keeps, per rule, a list of remembered connection tuples for every address group (the
packet's source or destination address under the rule's mask). When the rule is evaluated it
walks the group's list, forgets the connections conntrack no longer holds (not found, or TCP in
TIME_WAIT or CLOSE), adds the packet's own connection when it is not listed yet, and compares
the list's length with the limit. A packet without a conntrack entry (untracked, invalid) is
counted by its own tuple; when even that cannot be taken the packet is hotdropped.

Here a rule has two LRU hash maps, pinned under a name made of the rule itself (table, chain,
matches, target), so a restore that keeps the rule keeps its connections counted (the kernel
starts every rule's lists afresh at each restore, forgetting open connections):

- groups (key: the masked address): a lock word, the group's list length `n` and an id drawn
  when the group is created (so that the remembered connections of an evicted group, still in
  the second map, never show up in a later group of the same address);
- remembered connections (key: group id, position 0..n-1 in the list): the connection's
  original tuple, the CPU and jiffies it was added at, and on the netfilter hook the
  `struct nf_conn` pointer. A list of thousands is thus stored entry by entry (a value of
  thousands of slots per group would not fit a hash map's value, or would reserve megabytes for
  every group of two connections), and memory follows the connections remembered.

Whether a remembered connection is still alive is asked where the kernel asks it, at each
evaluation:

- tc and XDP: `bpf_skb_ct_lookup` / `bpf_xdp_ct_lookup` with the remembered tuple (the kernel's
  own `nf_conntrack_find_get`); these find TCP and UDP only, which is why such rules must say
  `-p tcp` or `-p udp` there.
- netfilter programs cannot call those kfuncs; the pointer is read with probes instead. nf_conn
  objects are SLAB_TYPESAFE_BY_RCU: a freed one has a zero reference count and a reused one
  another tuple, so the entry is the remembered connection when its reference count is not zero,
  its original tuple is the remembered one, it is confirmed, not dying and not expired (what
  the kernel's lookup checks).

The walk follows __nf_conncount_add: positions oldest first; a connection not found is kept
(and counted) while it may still be about to be confirmed (added less than two jiffies ago by
another CPU), else forgotten, as is a closed TCP one; the walk stops checking at the packet's
own connection when conntrack still has it (found, or pending), counting the connections added
after it unchecked, dead ones included. Forgotten positions are closed up as the walk goes (a
kept connection moves down to the next free position), so the list stays dense and in the
kernel's order. A group remembers `slots` connections (limit + 1 + a few spare): enough to tell
the comparison's answer; a connection arriving while all of them are alive is counted but not
remembered, so once the remembered ones close it is not counted any more (the kernel's list has
no bound). Not followed: the kernel stops checking after evicting more than eight connections in
one walk, and within the jiffy of its last addition to a list it skips the walk altogether and
adds the packet's connection unseen (dead connections stay counted, and a connection evaluated
twice in that jiffy is listed twice).

The walk is an open-coded loop over the `bpf_iter_num` kfuncs (Linux 6.4): the verifier checks
its body until the states at `bpf_iter_num_next` repeat, a few passes whatever the limit (a
program with one such rule: 21,000 to 40,000 steps in all), where the earlier unrolled checks
cost about 2,300 steps per remembered connection and capped limits at 123. Not `bpf_loop`: its
callback is a subprogram of its own, entered with only the loop index and one pointer, so the ct
lookup kfuncs' first argument (the program's context, PTR_TO_CTX, r6 in the rule's frame) would
have to be spilled to the packet struct and reloaded through that pointer (a spill keeps its
type), and the callback's address needs an `ld_imm64` relocation to a subprogram the assembler
does not have. The iterator's body stays in the rule's own frame, r6 included, and its state
lives in the packet struct (in the main program's frame, also when a user chain's subprogram
runs the rule). The lookups still need the main program's context, so tc/XDP refuse connlimit in
user chains.

A group is updated under its lock word as recent's entries are (a CPU that cannot take it after
a few tries goes on without it). The maps hold at most MAX_ENTRIES connections and as many
groups; when full, they evict the least recently used: a group not evaluated for a while, or
the oldest remembered connections of such groups, which are then forgotten (the kernel's tree
and lists have no bound). Orphans of an evicted group are never touched again and go first.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable

from ..bpf import insn as I
from ..bpf.asm import Assembler, Label
from ..bpf.btf import vmlinux
from ..bpf.consts import HELPER_NAMES, Helper, MapType
from ..bpf.insn import AluOp, JmpOp
from ..bpf.maps import MapSpec
from ..ir.model import Family, Rule
from ..ir.state import Connlimit
from . import layout as L
from .hooks import ctread
from .hooks.nf import NF_CTPTR
from .layout import R_CTX, R_PKT
from .statematch import NOEXIST, _copy_addr, _lock, _unlock, map_key

JIFFIES64 = HELPER_NAMES.index("jiffies64")
TCP, UDP, ICMP, ICMPV6 = 6, 17, 1, 58
PORTED = (6, 17, 33, 132, 136)  # TCP, UDP, DCCP, SCTP, UDP-Lite: 4 bytes of ports or hotdrop
TCP_TIME_WAIT, TCP_CLOSE = 7, 8  # enum tcp_conntrack: what already_closed() ditches
IPS_CONFIRMED, IPS_DYING = 1 << 3, 1 << 9
PENDING_JIFFIES = 2  # find_or_evict keeps another CPU's unconfirmed entry this long
BPF_ANY = 0
# A group: {u32 lock, u32 n, u64 id}.
GROUP_VALUE, G_N, G_ID = 16, 4, 8
# A remembered connection (key {u64 group id, u32 position, u32 0}): {src[16], dst[16], sport,
# dport, u8 proto, u8, u16 cpu, u32, u32 jiffies, u64 nf_conn}.
SLOT_KEY, SLOT = 16, 56
S_SRC, S_DST, S_PORTS, S_PROTO, S_CPU, S_JIF, S_PTR = 0, 16, 32, 36, 38, 44, 48
# Connections a rule's maps remember (4 full groups at the largest limit), and at most as many
# groups: LRU maps are preallocated, 136 bytes per connection and 96 per group (3.7 MB for a
# small limit's rule, 40 MB at the largest).
MIN_ENTRIES, MAX_ENTRIES, MAX_GROUPS = 16384, 1 << 18, 65536
# Scratch in the packet struct's key buffer (free while a predicate runs; LOCKED at +96 is the
# lock helpers' flag).
KEY = L.KEYBUF  # the masked address, until the group is found
ITER = L.KEYBUF  # then: struct bpf_iter_num (8 bytes on the stack, 8-aligned)
GROUP = L.KEYBUF + 8  # the group's pointer, spilled (its type survives the spill)
PROBE = L.KEYBUF + 16  # nf: 71 bytes of nf_conn read at once; tc/XDP: the lookup tuple; or
#                        a map key (a remembered connection's, a new group's value)
VALUE = L.KEYBUF + 32  # a new remembered connection (56 bytes, after its key at PROBE)
OPTS = L.KEYBUF + 56  # tc/XDP: struct bpf_ct_opts
STATUS = L.KEYBUF + 88  # nf: the status word, then the TCP state
KEPT = L.KEYBUF + 92  # u32: connections kept so far: the next free position, and the count
CPU = L.KEYBUF + 100  # u32: this CPU
JIFFIES = L.KEYBUF + 104  # u32: jiffies now
INDEX = L.KEYBUF + 108  # u32: the position being walked
FOUND = NF_CTPTR + 8  # u8: the packet's own connection is listed and alive (the parsers'
#                       scratch after nf's skb->_nfct, free once parsing is done)
# The CT area's original tuple: the packet's own connection.
OWN_SRC, OWN_DST, OWN_PORTS, OWN_PROTO = L.CTORIGSRC, L.CTORIGDST, L.CTORIGSPORT, L.CTPROTO


def rule_name(table: str, chain: str, rule: Rule, nth: int) -> str:
    """The name of a rule's connection lists: the same rule (the `nth` such in its chain) in the
    next restore finds them again."""
    target = None if rule.target is None else (rule.target.kind, rule.target.params)
    text = repr((table, chain, [(m.kind, m.params) for m in rule.matches], target, nth))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def entries(p: Connlimit) -> int:
    """Connections the rule's maps remember, over all groups."""
    return max(MIN_ENTRIES, min(MAX_ENTRIES, 4 * p.slots))


def connlimit_maps(p: Connlimit) -> dict[Hashable, MapSpec]:
    """The rule's map of groups and its map of remembered connections."""
    n = entries(p)
    return {map_key("connlimit", p.rule): MapSpec(MapType.LRU_HASH, 16, GROUP_VALUE,
                                                  min(MAX_GROUPS, n), name="bpfilter_connl"),
            map_key("connlist", p.rule): MapSpec(MapType.LRU_HASH, SLOT_KEY, SLOT, n,
                                                 name="bpfilter_connc")}


def emit_connlimit(a: Assembler, family: Family, p: Connlimit, fail: Label,
                   hotdrop: Label) -> None:
    """Fall through when the group's count (the packet's connection included) is above the
    limit (without `above`: up to it), updating the group's remembered connections."""
    gkey, skey = map_key("connlimit", p.rule), map_key("connlist", p.rule)
    btf = vmlinux()
    a.emit(I.st(I.DW, R_PKT, KEY, 0), I.st(I.DW, R_PKT, KEY + 8, 0))
    bits = sum(bin(b).count("1") for b in p.mask)
    _copy_addr(a, family, not p.daddr, bits, KEY)
    has = a.label("cl_has")
    a.emit(I.ldx(I.B, I.R1, R_PKT, L.CTHAS))
    a.jump(JmpOp.JNE, I.R1, 0, has)
    _tuple_from_packet(a, family, hotdrop)
    a.place(has)
    a.emit(I.call_helper(JIFFIES64), I.stx(I.W, R_PKT, I.R0, JIFFIES))
    a.emit(I.call_helper(Helper.get_smp_processor_id), I.stx(I.W, R_PKT, I.R0, CPU))
    found = a.label("cl_group")
    _lookup(a, gkey, KEY)
    a.jump(JmpOp.JNE, I.R0, 0, found)
    # A new group: an empty list, and an id from the clock and the CPU (two CPUs would have to
    # create groups of one rule in the same 256 ns).
    a.emit(I.call_helper(Helper.ktime_get_ns), I.alu64(AluOp.AND, I.R0, -256, reg=False))
    a.emit(I.ldx(I.W, I.R1, R_PKT, CPU), I.alu64(AluOp.AND, I.R1, 0xFF, reg=False),
           I.alu64(AluOp.OR, I.R0, I.R1, reg=True))
    a.emit(I.st(I.DW, R_PKT, PROBE, 0), I.stx(I.DW, R_PKT, I.R0, PROBE + G_ID))
    a.ld_map(I.R1, gkey)
    a.emit(I.mov64(I.R2, R_PKT), I.alu64(AluOp.ADD, I.R2, KEY, reg=False))
    a.emit(I.mov64(I.R3, R_PKT), I.alu64(AluOp.ADD, I.R3, PROBE, reg=False))
    a.emit(I.mov64_imm(I.R4, NOEXIST), I.call_helper(Helper.map_update_elem))
    _lookup(a, gkey, KEY)
    a.jump(JmpOp.JEQ, I.R0, 0, hotdrop)  # the kernel drops what it cannot count
    a.place(found)
    a.emit(I.stx(I.DW, R_PKT, I.R0, GROUP), I.mov64(I.R2, I.R0))
    _lock(a)
    a.emit(I.st(I.W, R_PKT, KEPT, 0), I.st(I.B, R_PKT, FOUND, 0))
    # Walk positions 0..n-1 (n bounded by the slots, whatever a racing CPU wrote). r8: the
    # remembered connection, kept across helper and kfunc calls (r6-r9 are callee-saved; r7 and
    # r8 are not live while a rule's predicate runs); r7: the conntrack entry being checked.
    short = a.label("cl_n")
    a.emit(I.ldx(I.DW, I.R2, R_PKT, GROUP), I.ldx(I.W, I.R3, I.R2, G_N))
    a.jump(JmpOp.JLE, I.R3, p.slots, short)
    a.emit(I.mov64_imm(I.R3, p.slots))
    a.place(short)
    a.emit(I.mov64(I.R1, R_PKT), I.alu64(AluOp.ADD, I.R1, ITER, reg=False),
           I.mov64_imm(I.R2, 0), I.call_kfunc(btf.func_id("bpf_iter_num_new")))
    walk, done = a.here("cl_walk"), a.label("cl_walked")
    a.emit(I.mov64(I.R1, R_PKT), I.alu64(AluOp.ADD, I.R1, ITER, reg=False),
           I.call_kfunc(btf.func_id("bpf_iter_num_next")))
    a.jump(JmpOp.JEQ, I.R0, 0, done)
    a.emit(I.ldx(I.W, I.R1, I.R0, 0), I.stx(I.W, R_PKT, I.R1, INDEX))
    _slot_key(a, INDEX)
    _lookup(a, skey, PROBE)
    a.jump(JmpOp.JEQ, I.R0, 0, walk)  # evicted from the full map: forgotten
    a.emit(I.mov64(I.R8, I.R0))
    keep, evict, other = a.label("cl_keep"), a.label("cl_evict"), a.label("cl_other")
    a.emit(I.ldx(I.B, I.R1, R_PKT, FOUND))
    a.jump(JmpOp.JNE, I.R1, 0, keep)  # after the own connection: counted unchecked
    check = _check_nf if p.hook == "nf" else _check_lookup
    _if_own(a, family, other)
    check(a, family, p, evict, own=True)
    a.emit(I.st(I.B, R_PKT, FOUND, 1))
    a.goto(keep)
    a.place(other)
    check(a, family, p, evict)
    a.goto(keep)
    a.place(evict)
    _slot_key(a, INDEX)
    _delete(a, skey)
    a.goto(walk)
    a.place(keep)
    moved = a.label("cl_moved")
    a.emit(I.ldx(I.W, I.R1, R_PKT, KEPT), I.ldx(I.W, I.R2, R_PKT, INDEX))
    a.jump(JmpOp.JEQ, I.R1, I.R2, moved, reg=True)
    # Close up the list: the connection moves down to the first free position.
    _slot_key(a, KEPT)
    a.ld_map(I.R1, skey)
    a.emit(I.mov64(I.R2, R_PKT), I.alu64(AluOp.ADD, I.R2, PROBE, reg=False))
    a.emit(I.mov64(I.R3, I.R8), I.mov64_imm(I.R4, BPF_ANY),
           I.call_helper(Helper.map_update_elem))
    _slot_key(a, INDEX)
    _delete(a, skey)
    a.place(moved)
    a.emit(I.ldx(I.W, I.R1, R_PKT, KEPT), I.alu64(AluOp.ADD, I.R1, 1, reg=False),
           I.stx(I.W, R_PKT, I.R1, KEPT))
    a.goto(walk)
    a.place(done)
    a.emit(I.mov64(I.R1, R_PKT), I.alu64(AluOp.ADD, I.R1, ITER, reg=False),
           I.call_kfunc(btf.func_id("bpf_iter_num_destroy")))
    a.emit(I.ldx(I.DW, I.R8, R_PKT, GROUP), I.ldx(I.W, I.R1, R_PKT, KEPT),
           I.stx(I.W, I.R8, I.R1, G_N))
    counted = a.label("cl_counted")
    a.emit(I.ldx(I.B, I.R1, R_PKT, FOUND))
    a.jump(JmpOp.JNE, I.R1, 0, counted)
    a.emit(I.ldx(I.B, I.R1, R_PKT, L.CTHAS))
    a.jump(JmpOp.JEQ, I.R1, 0, counted)  # no entry: counted, not remembered
    a.emit(I.ldx(I.W, I.R1, R_PKT, KEPT))
    a.jump(JmpOp.JGE, I.R1, p.slots, counted)  # a full group: counted, not remembered
    _remember(a, p, skey)
    a.place(counted)
    a.emit(I.mov64(I.R2, I.R8))
    _unlock(a)
    # The count: the connections kept, and the packet's own when it was not among them.
    a.emit(I.ldx(I.W, I.R1, R_PKT, KEPT), I.ldx(I.B, I.R2, R_PKT, FOUND))
    a.emit(I.alu64(AluOp.ADD, I.R1, 1, reg=False), I.alu64(AluOp.SUB, I.R1, I.R2, reg=True))
    a.jump(JmpOp.JLE if p.above else JmpOp.JGT, I.R1, p.limit, fail)


def _lookup(a: Assembler, mkey: Hashable, at: int) -> None:
    """r0 = the value of the key at `at` in map `mkey` (or 0)."""
    a.ld_map(I.R1, mkey)
    a.emit(I.mov64(I.R2, R_PKT), I.alu64(AluOp.ADD, I.R2, at, reg=False))
    a.emit(I.call_helper(Helper.map_lookup_elem))


def _delete(a: Assembler, skey: Hashable) -> None:
    """Forget the remembered connection whose key is at PROBE."""
    a.ld_map(I.R1, skey)
    a.emit(I.mov64(I.R2, R_PKT), I.alu64(AluOp.ADD, I.R2, PROBE, reg=False))
    a.emit(I.call_helper(Helper.map_delete_elem))


def _slot_key(a: Assembler, position: int) -> None:
    """PROBE = the key of the group's remembered connection at the u32 at `position`."""
    a.emit(I.ldx(I.DW, I.R2, R_PKT, GROUP), I.ldx(I.DW, I.R1, I.R2, G_ID),
           I.stx(I.DW, R_PKT, I.R1, PROBE))
    a.emit(I.ldx(I.W, I.R1, R_PKT, position), I.stx(I.W, R_PKT, I.R1, PROBE + 8),
           I.st(I.W, R_PKT, PROBE + 12, 0))


def _tuple_from_packet(a: Assembler, family: Family, hotdrop: Label) -> None:
    """No conntrack entry: the CT area's original tuple from the packet, as nf_ct_get_tuplepr
    takes it (hotdrop when the ports or the ICMP header it needs are missing)."""
    v4 = family is Family.IPV4
    s_off, d_off, alen = (L.L3 + 12, L.L3 + 16, 4) if v4 else (L.L3 + 8, L.L3 + 24, 16)
    for o in range(0, 16, 4):
        for to, frm in ((OWN_SRC, s_off), (OWN_DST, d_off)):
            if o < alen:
                a.emit(I.ldx(I.W, I.R1, R_PKT, frm + o), I.stx(I.W, R_PKT, I.R1, to + o))
            else:
                a.emit(I.st(I.W, R_PKT, to + o, 0))
    a.emit(I.ldx(I.B, I.R1, R_PKT, L.L4PROTO), I.stx(I.B, R_PKT, I.R1, OWN_PROTO))
    a.emit(I.st(I.W, R_PKT, OWN_PORTS, 0))
    done, ported, icmp = a.label("clt_done"), a.label("clt_ports"), a.label("clt_icmp")
    a.emit(I.ldx(I.H, I.R2, R_PKT, L.FRAGOFF))
    a.jump(JmpOp.JNE, I.R2, 0, done)  # a later fragment (tc, XDP): no ports to take
    for proto in PORTED:
        a.jump(JmpOp.JEQ, I.R1, proto, ported)
    a.jump(JmpOp.JEQ, I.R1, ICMP if v4 else ICMPV6, icmp)
    a.goto(done)
    a.place(ported)
    a.emit(I.ldx(I.B, I.R1, R_PKT, L.L4AVAIL))
    a.jump(JmpOp.JLT, I.R1, 4, hotdrop)
    a.emit(I.ldx(I.W, I.R1, R_PKT, L.L4), I.stx(I.W, R_PKT, I.R1, OWN_PORTS))
    a.goto(done)
    a.place(icmp)
    # The echo identifier as the source "port", type and code as the destination's.
    a.emit(I.ldx(I.B, I.R1, R_PKT, L.L4AVAIL))
    a.jump(JmpOp.JLT, I.R1, 8, hotdrop)
    a.emit(I.ldx(I.H, I.R1, R_PKT, L.L4 + 4), I.stx(I.H, R_PKT, I.R1, OWN_PORTS))
    a.emit(I.ldx(I.H, I.R1, R_PKT, L.L4), I.stx(I.H, R_PKT, I.R1, OWN_PORTS + 2))
    a.place(done)


def _not_found(a: Assembler, alive: Label, evict: Label) -> None:
    """find_or_evict for a connection conntrack does not hold: kept (to `alive`) when another
    CPU added it less than two jiffies ago (it may be about to be confirmed), else evicted."""
    a.emit(I.ldx(I.H, I.R1, I.R8, S_CPU), I.ldx(I.H, I.R2, R_PKT, CPU))
    a.jump(JmpOp.JEQ, I.R1, I.R2, evict, reg=True, wide=True)
    a.emit(I.ldx(I.W, I.R1, R_PKT, JIFFIES), I.ldx(I.W, I.R2, I.R8, S_JIF))
    a.emit(I.alu32(AluOp.SUB, I.R1, I.R2, reg=True))
    a.jump(JmpOp.JGE, I.R1, PENDING_JIFFIES, evict, wide=True)
    a.goto(alive)


def _check_lookup(a: Assembler, family: Family, p: Connlimit, dead: Label, *,
                  own: bool = False) -> None:
    """tc/XDP: fall through when the remembered connection (r8) is one to count, else go to
    `dead`. The packet's `own` connection is kept in TIME_WAIT and CLOSE too (the kernel
    compares the tuple before asking whether it is closed)."""
    btf = vmlinux()
    kfunc = btf.func_id("bpf_xdp_ct_lookup" if p.hook == "xdp" else "bpf_skb_ct_lookup")
    release = btf.func_id("bpf_ct_release")
    alive, missing = a.label("cl_alive"), a.label("cl_missing")
    # struct bpf_sock_tuple: IPv4 {saddr, daddr, sport, dport}; IPv6 the slot's own layout.
    if family is Family.IPV4:
        moves, size = ((S_SRC, 0), (S_DST, 4), (S_PORTS, 8)), 12
    else:
        moves, size = (*((o, o) for o in range(0, 32, 4)), (S_PORTS, 32)), 36
    for frm, to in moves:
        a.emit(I.ldx(I.W, I.R1, I.R8, frm), I.stx(I.W, R_PKT, I.R1, PROBE + to))
    a.emit(I.st(I.W, R_PKT, OPTS, -1), I.st(I.W, R_PKT, OPTS + 4, 0))  # this netns; no error
    a.emit(I.ldx(I.B, I.R1, I.R8, S_PROTO), I.stx(I.W, R_PKT, I.R1, OPTS + 8))
    a.emit(I.mov64(I.R1, R_CTX))
    a.emit(I.mov64(I.R2, R_PKT), I.alu64(AluOp.ADD, I.R2, PROBE, reg=False))
    a.emit(I.mov64_imm(I.R3, size))
    a.emit(I.mov64(I.R4, R_PKT), I.alu64(AluOp.ADD, I.R4, OPTS, reg=False))
    a.emit(I.mov64_imm(I.R5, 12), I.call_kfunc(kfunc))  # NF_BPF_CT_OPTS_OLD_SZ
    a.jump(JmpOp.JEQ, I.R0, 0, missing)
    a.emit(I.mov64(I.R7, I.R0))
    if not own:
        kept = a.label("cl_kept")
        _closed_tcp(a, kept, dead, release)
        a.place(kept)
    a.emit(I.mov64(I.R1, I.R7), I.call_kfunc(release))
    a.goto(alive)
    a.place(missing)
    _not_found(a, alive, dead)
    a.place(alive)


def _check_nf(a: Assembler, family: Family, p: Connlimit, dead: Label, *,
              own: bool = False) -> None:
    """Netfilter: as _check_lookup, with the remembered nf_conn read by probes."""
    btf = vmlinux()
    use = btf.member_offset("nf_conn", "ct_general.use").offset
    timeout = btf.member_offset("nf_conn", "timeout").offset
    tup = (btf.member_offset("nf_conn", "tuplehash").offset
           + btf.member_offset("nf_conntrack_tuple_hash", "tuple").offset)
    m = {k: tup + btf.member_offset("nf_conntrack_tuple", k).offset
         for k in ("src.u3", "src.u", "dst.u3", "dst.u", "dst.protonum")}
    span = m["dst.protonum"] + 1
    if max(use, timeout) + 4 > span or span > STATUS - PROBE:
        raise ValueError("struct nf_conn is laid out unlike any kernel pybpfilter knows")
    alive, missing = a.label("cl_alive"), a.label("cl_missing")
    a.emit(I.ldx(I.DW, I.R7, I.R8, S_PTR))
    a.jump(JmpOp.JEQ, I.R7, 0, missing)
    ctread.probe(a, PROBE, span, 0)
    a.jump(JmpOp.JNE, I.R0, 0, missing)
    a.emit(I.ldx(I.W, I.R1, R_PKT, PROBE + use))
    a.jump(JmpOp.JEQ, I.R1, 0, missing)  # freed
    # Still (or again) the remembered connection: its original tuple.
    alen = family.addr_len
    pairs = [(m["src.u3"] + o, S_SRC + o, I.W) for o in range(0, alen, 4)]
    pairs += [(m["dst.u3"] + o, S_DST + o, I.W) for o in range(0, alen, 4)]
    pairs += [(m["src.u"], S_PORTS, I.H), (m["dst.u"], S_PORTS + 2, I.H),
              (m["dst.protonum"], S_PROTO, I.B)]
    for at, slot, size in pairs:
        a.emit(I.ldx(size, I.R1, R_PKT, PROBE + at), I.ldx(size, I.R2, I.R8, slot))
        a.jump(JmpOp.JNE, I.R1, I.R2, missing, reg=True)
    ctread.probe(a, STATUS, 4, btf.member_offset("nf_conn", "status").offset)
    a.jump(JmpOp.JNE, I.R0, 0, missing)
    a.emit(I.ldx(I.W, I.R1, R_PKT, STATUS))
    a.jump(JmpOp.JSET, I.R1, IPS_DYING, missing)
    confirmed = a.label("cl_confirmed")
    a.jump(JmpOp.JSET, I.R1, IPS_CONFIRMED, confirmed)
    a.goto(missing)  # not in conntrack's table (yet)
    a.place(confirmed)
    # nf_ct_is_expired: (s32)(timeout - jiffies) <= 0; the lookup treats it as gone.
    a.emit(I.ldx(I.W, I.R1, R_PKT, PROBE + timeout), I.ldx(I.W, I.R2, R_PKT, JIFFIES))
    a.emit(I.alu32(AluOp.SUB, I.R1, I.R2, reg=True))
    a.jump(JmpOp.JSLE, I.R1, 0, missing, wide=True)
    if own:
        a.goto(alive)
    else:
        _closed_tcp(a, alive, dead)
    a.place(missing)
    _not_found(a, alive, dead)
    a.place(alive)


def _if_own(a: Assembler, family: Family, nxt: Label) -> None:
    """Fall through when r8 remembers the packet's own connection, else go to `nxt`."""
    pairs = [(S_SRC + o, OWN_SRC + o) for o in range(0, family.addr_len, 4)]
    pairs += [(S_DST + o, OWN_DST + o) for o in range(0, family.addr_len, 4)]
    for slot, own in [*pairs, (S_PORTS, OWN_PORTS)]:
        a.emit(I.ldx(I.W, I.R1, I.R8, slot), I.ldx(I.W, I.R2, R_PKT, own))
        a.jump(JmpOp.JNE, I.R1, I.R2, nxt, reg=True)
    a.emit(I.ldx(I.B, I.R1, I.R8, S_PROTO), I.ldx(I.B, I.R2, R_PKT, OWN_PROTO))
    a.jump(JmpOp.JNE, I.R1, I.R2, nxt, reg=True)


def _remember(a: Assembler, p: Connlimit, skey: Hashable) -> None:
    """Remember the packet's own connection at position KEPT, the end of the list (r8: the
    group, whose length grows by one)."""
    _slot_key(a, KEPT)
    for o in range(0, 16, 4):
        a.emit(I.ldx(I.W, I.R1, R_PKT, OWN_SRC + o), I.stx(I.W, R_PKT, I.R1, VALUE + S_SRC + o))
        a.emit(I.ldx(I.W, I.R1, R_PKT, OWN_DST + o), I.stx(I.W, R_PKT, I.R1, VALUE + S_DST + o))
    a.emit(I.ldx(I.W, I.R1, R_PKT, OWN_PORTS), I.stx(I.W, R_PKT, I.R1, VALUE + S_PORTS))
    a.emit(I.st(I.W, R_PKT, VALUE + S_PROTO, 0), I.st(I.W, R_PKT, VALUE + S_PROTO + 4, 0))
    a.emit(I.ldx(I.B, I.R1, R_PKT, OWN_PROTO), I.stx(I.B, R_PKT, I.R1, VALUE + S_PROTO))
    a.emit(I.ldx(I.H, I.R1, R_PKT, CPU), I.stx(I.H, R_PKT, I.R1, VALUE + S_CPU))
    a.emit(I.ldx(I.W, I.R1, R_PKT, JIFFIES), I.stx(I.W, R_PKT, I.R1, VALUE + S_JIF))
    if p.hook == "nf":  # skb->_nfct: the entry, with the ctinfo in its low bits
        a.emit(I.ldx(I.DW, I.R1, R_PKT, NF_CTPTR),
               I.alu64(AluOp.AND, I.R1, ~ctread.NFCT_INFOMASK, reg=False))
        a.emit(I.stx(I.DW, R_PKT, I.R1, VALUE + S_PTR))
    else:
        a.emit(I.st(I.DW, R_PKT, VALUE + S_PTR, 0))
    a.ld_map(I.R1, skey)
    a.emit(I.mov64(I.R2, R_PKT), I.alu64(AluOp.ADD, I.R2, PROBE, reg=False))
    a.emit(I.mov64(I.R3, R_PKT), I.alu64(AluOp.ADD, I.R3, VALUE, reg=False))
    a.emit(I.mov64_imm(I.R4, BPF_ANY), I.call_helper(Helper.map_update_elem))
    a.emit(I.ldx(I.W, I.R1, R_PKT, KEPT), I.alu64(AluOp.ADD, I.R1, 1, reg=False),
           I.stx(I.W, I.R8, I.R1, G_N))


def _closed_tcp(a: Assembler, alive: Label, dead: Label, release: int | None = None) -> None:
    """nf_conncount's already_closed(): a remembered TCP connection (r8: its slot, the entry
    probed through r7) in TIME_WAIT or CLOSE is gone; `release` drops a kfunc's reference."""
    a.emit(I.ldx(I.B, I.R1, I.R8, S_PROTO))
    a.jump(JmpOp.JNE, I.R1, TCP, alive)
    ctread.probe(a, STATUS, 1, vmlinux().member_offset("nf_conn", "proto.tcp.state").offset)
    a.emit(I.ldx(I.B, I.R1, R_PKT, STATUS))
    a.jump(JmpOp.JLT, I.R1, TCP_TIME_WAIT, alive)
    a.jump(JmpOp.JGT, I.R1, TCP_CLOSE, alive)
    if release is not None:
        a.emit(I.mov64(I.R1, I.R7), I.call_kfunc(release))
    a.goto(dead)
