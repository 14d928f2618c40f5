"""Code for state-table matches: xt_hashlimit buckets and xt_recent lists in LRU hash maps
(xt_connlimit's per-rule lists are resolved and mapped here, their code is in connlimit.py).

A table (hashlimit `--hashlimit-name`, recent `--name`) is one map shared by every rule and
program of the compiled table that names it. What the kernel fixes when it creates the table
(hashlimit: mode, masks, rate, burst, expiry, size; recent: the mask) comes from the first rule
naming it, in ruleset order, as netfilter's checkentry creates it; recent entries keep as many
timestamps as the most demanding rule needs (recent_mt_check grows and flushes the table).

hashlimit: a packet bucket is {u64 tat, u64 last}: GCRA over the theoretical arrival time
`tat` (admits `burst` packets at once, then one per interval: what the kernel's credits admit,
at nanosecond rather than jiffy resolution), updated by compare-and-swap. A byte bucket is
{u32 lock, u32, u64 credit, u64 prev, u64 refills} and follows xt_hashlimit's byte mode under
the entry's try-lock (below), with credit in nanoseconds. A bucket idle for
`expire` is fresh again (the kernel frees it at the next garbage collection, up to
gcinterval later). A full table evicts its least recently used bucket where the kernel would
drop the packet of a new flow.

recent: an entry is {u32 lock, u8 ttl, u8, u16 index, u16 nstamps, u16, u64 stamps[N]},
stamps in ktime nanoseconds; recent_mt's lookup, check and update are followed step by step
(the check in one load: see emit_recent), under a per-entry try-lock (taken with
compare-and-swap; a CPU that cannot get it after a few tries goes on without it, as BPF
programs must not spin unboundedly).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field, replace

from ..bpf import insn as I
from ..bpf.asm import Assembler, Label
from ..bpf.consts import Helper, MapType
from ..bpf.insn import AluOp, JmpOp
from ..bpf.maps import MapSpec
from ..ir.model import Family, Table
from ..ir.pred import AllOf, AnyOf, Field, Not, Pred
from ..ir.state import Connlimit, HashLimit, HashLimitCfg, Recent
from ..matches.registry import Context, MatchError
from ..matches.statelower import lower_hashlimit, lower_recent
from . import gcra
from . import layout as L
from .layout import R_PKT

STATE_MATCHES = frozenset({"hashlimit", "recent", "connlimit"})
RECENT_ENTRIES = 100  # xt_recent's ip_list_tot: entries per list
RECENT_HEADER = 16
HL_VALUE = 16  # {u64 tat, u64 last}
HL_BYTES_VALUE = 32  # {u32 lock, u32, u64 credit, u64 prev, u64 refills}
SECOND = 1_000_000_000  # a byte bucket's whole credit, in nanoseconds
CAS_RETRIES = 4
LOCK_TRIES = 8
NOEXIST = 1  # BPF_NOEXIST
# Scratch in the packet struct's key buffer (free while a predicate runs).
KEY = L.KEYBUF
HL_INIT = L.KEYBUF + 48  # a new bucket's value
LOCKED = L.KEYBUF + 96  # u32: 1 when this packet holds the entry's lock
NOW = L.KEYBUF + 104  # u64: ktime of the packet
# Ports at these transport offsets (proto_ports_offset): TCP, UDP, DCCP, ESP (its SPI), SCTP,
# UDP-Lite at 0; AH's SPI at 4; no ports (zeros) for other protocols.
PORTS_AT_0 = (6, 17, 33, 50, 132, 136)
AH = 51
# Chains whose packets have no output device: there the kernel compares the TTL as it is
# (recent_mt adds one to it when the packet has an output device and no local socket).
NO_OUT_DEV = frozenset({"INPUT", "PREROUTING"})


class StateError(ValueError):
    """A state-table match this hook cannot compile as the kernel runs it."""


def _addr_off(family: Family, src: bool) -> int:
    if family is Family.IPV4:
        return L.L3 + (12 if src else 16)
    return L.L3 + (8 if src else 24)


def _prefix_mask(bits: int, width: int) -> bytes:
    full = (1 << width) - 1
    return (full ^ ((1 << (width - bits)) - 1)).to_bytes(width // 8, "big")


def map_key(kind: str, name: str) -> tuple:
    """The key of a state table's map among a compiled table's maps."""
    return ("state", kind, name)


# -- table-wide resolution ------------------------------------------------------------------


@dataclass
class StateTables:
    """What the kernel's state tables of one compiled table are made of."""

    family: Family
    hashlimit: dict[str, HashLimitCfg] = field(default_factory=dict)
    recent_mask: dict[str, bytes] = field(default_factory=dict)
    recent_stamps: dict[str, int] = field(default_factory=dict)
    recent_ttl: set[str] = field(default_factory=set)
    recent_hooks: dict[str, set[str]] = field(default_factory=dict)  # built-in chains reaching
    connlimit: dict[tuple[str, int], str] = field(default_factory=dict)  # (chain, n): list name

    @classmethod
    def scan(cls, table: Table, family: Family) -> StateTables:
        """Read every hashlimit and recent match of `table` in ruleset order."""
        out = cls(family)
        ctx = Context(family, table.name)
        builtins = [c for c in table.chains.values() if c.builtin]
        from .validate import reachable

        reach = {c.name: {c.name, *reachable(table, c)} for c in builtins}
        seen: dict[str, int] = {}
        for chain in table.chains.values():
            hooks = {b for b, names in reach.items() if chain.name in names}
            for n, rule in enumerate(chain.rules, 1):
                if rule.match("connlimit") is not None:  # every rule has lists of its own
                    from .connlimit import rule_name

                    first = rule_name(table.name, chain.name, rule, 0)
                    seen[first] = seen.get(first, -1) + 1
                    out.connlimit[(chain.name, n)] = rule_name(table.name, chain.name, rule,
                                                               seen[first])
                for m in rule.matches:
                    if m.kind not in ("hashlimit", "recent"):
                        continue
                    try:
                        pred = (lower_hashlimit if m.kind == "hashlimit" else lower_recent)(
                            m.params, ctx)
                    except MatchError:
                        continue  # refused again, with the rule, when the rule is lowered
                    if isinstance(pred, HashLimit):
                        out.hashlimit.setdefault(pred.name, pred.cfg)
                    elif isinstance(pred, Recent):
                        out._add_recent(pred, hooks)
        return out

    def _add_recent(self, r: Recent, hooks: set[str]) -> None:
        self.recent_mask.setdefault(r.name, r.mask)
        # recent_mt_check: 32 timestamps, or hitcount rounded up to a power of two.
        need = 1 << (r.hitcount - 1).bit_length() if r.hitcount else 32
        self.recent_stamps[r.name] = max(self.recent_stamps.get(r.name, 0), need)
        if r.rttl:
            self.recent_ttl.add(r.name)
        self.recent_hooks.setdefault(r.name, set()).update(hooks)

    def resolve(self, pred: Pred, rule: tuple[str, int] | None = None) -> Pred:
        """`pred` (of rule `rule`: chain, number) with its state matches completed by their
        tables' configuration."""
        if isinstance(pred, Connlimit):
            if rule not in self.connlimit:
                raise StateError("connlimit outside the rules of its table")
            return replace(pred, rule=self.connlimit[rule])
        if isinstance(pred, HashLimit):
            cfg = self.hashlimit.get(pred.name, pred.cfg)
            if cfg.bytes_mode != pred.cfg.bytes_mode:
                raise StateError(f"hashlimit table {pred.name!r} is shared by packet and byte "
                                 "rates")
            return replace(pred, cfg=cfg)
        if isinstance(pred, Recent):
            ttl_used = pred.name in self.recent_ttl
            if ttl_used:
                odd = sorted(self.recent_hooks.get(pred.name, set()) - NO_OUT_DEV)
                if odd:
                    raise StateError(
                        f"recent list {pred.name!r} is used with --rttl and in {', '.join(odd)}: "
                        "there the kernel compares the TTL before forwarding (one more than the "
                        "packet's when it has no local socket), which a program cannot tell")
            return replace(pred, mask=self.recent_mask.get(pred.name, pred.mask),
                           nstamps=self.recent_stamps.get(pred.name, 32), ttl_used=ttl_used)
        if isinstance(pred, AllOf | AnyOf):
            return type(pred)(tuple(self.resolve(p, rule) for p in pred.preds))
        if isinstance(pred, Not):
            return Not(self.resolve(pred.pred, rule))
        return pred


def state_maps(pred: Pred) -> dict[Hashable, MapSpec]:
    """The maps of the state tables `pred` uses, by their key in a table's maps."""
    if isinstance(pred, HashLimit):
        fam_key = 2 * 16 + 4  # room for IPv6 addresses; IPv4 keys leave them zero
        value = HL_BYTES_VALUE if pred.cfg.bytes_mode else HL_VALUE
        return {map_key("hashlimit", pred.name): MapSpec(
            MapType.LRU_HASH, fam_key, value, pred.cfg.max_entries, name="bpfilter_hlim")}
    if isinstance(pred, Recent):
        size = RECENT_HEADER + 8 * pred.nstamps
        return {map_key("recent", pred.name): MapSpec(
                    MapType.LRU_HASH, 16, size, RECENT_ENTRIES, name="bpfilter_recent"),
                ("state", "zero", size): MapSpec(MapType.ARRAY, 4, size, 1,
                                                 name="bpfilter_zero")}
    if isinstance(pred, Connlimit):
        from .connlimit import connlimit_maps

        return connlimit_maps(pred)
    out: dict[Hashable, MapSpec] = {}
    for sub in getattr(pred, "preds", ()):
        out.update(state_maps(sub))
    inner = getattr(pred, "pred", None)
    if inner is not None:
        out.update(state_maps(inner))
    return out


# -- code -----------------------------------------------------------------------------------


def _copy_addr(a: Assembler, family: Family, src: bool, bits: int, dst_off: int) -> None:
    """Copy the packet's source or destination address under a prefix mask to the struct."""
    n = family.addr_len
    mask = _prefix_mask(bits, 8 * n)
    for i in range(0, n, 4):
        m = int.from_bytes(mask[i:i + 4], "little")
        if m == 0:
            a.emit(I.st(I.W, R_PKT, dst_off + i, 0))
            continue
        a.emit(I.ldx(I.W, I.R1, R_PKT, _addr_off(family, src) + i))
        if m != 0xFFFFFFFF:
            a.emit(I.alu32(AluOp.AND, I.R1, I.s32(m), reg=False))
        a.emit(I.stx(I.W, R_PKT, I.R1, dst_off + i))


def _now(a: Assembler) -> None:
    a.emit(I.call_helper(Helper.ktime_get_ns), I.stx(I.DW, R_PKT, I.R0, NOW))


def _lookup(a: Assembler, key: Hashable) -> None:
    """r0 = the entry of the key at KEY in map `key` (or 0)."""
    a.ld_map(I.R1, key)
    a.emit(I.mov64(I.R2, R_PKT), I.alu64(AluOp.ADD, I.R2, KEY, reg=False))
    a.emit(I.call_helper(Helper.map_lookup_elem))


def _insert(a: Assembler, key: Hashable, value: Hashable | int) -> None:
    """map[KEY] = a value, if absent (a concurrent insert wins): the first entry of array map
    `value`, or the bytes at that offset of the packet struct."""
    a.ld_map(I.R1, key)
    a.emit(I.mov64(I.R2, R_PKT), I.alu64(AluOp.ADD, I.R2, KEY, reg=False))
    if isinstance(value, int):
        a.emit(I.mov64(I.R3, R_PKT), I.alu64(AluOp.ADD, I.R3, value, reg=False))
    else:
        a.ld_map_value(I.R3, value, 0)
    a.emit(I.mov64_imm(I.R4, NOEXIST), I.call_helper(Helper.map_update_elem))


def _hashlimit_ports(a: Assembler, family: Family, modes: tuple[str, ...], off: int,
                     hotdrop: Label) -> None:
    """The ports of the key as hashlimit_init_dst takes them (hotdrop where it fails)."""
    a.emit(I.st(I.W, R_PKT, off, 0))
    if "srcport" not in modes and "dstport" not in modes:
        return
    if family is Family.IPV6:
        a.emit(I.ldx(I.B, I.R1, R_PKT, L.V6ERR))
        a.jump(JmpOp.JNE, I.R1, 0, hotdrop)
    a.emit(I.ldx(I.H, I.R1, R_PKT, L.FRAGOFF))
    a.jump(JmpOp.JNE, I.R1, 0, hotdrop)  # a later fragment
    done, at0, at4 = a.label("hl_ports"), a.label("hl_p0"), a.label("hl_p4")
    a.emit(I.ldx(I.B, I.R1, R_PKT, L.L4PROTO))
    for proto in PORTS_AT_0:
        a.jump(JmpOp.JEQ, I.R1, proto, at0)
    a.jump(JmpOp.JEQ, I.R1, AH, at4)
    a.goto(done)
    for lab, start in ((at0, 0), (at4, 4)):
        a.place(lab)
        a.emit(I.ldx(I.B, I.R1, R_PKT, L.L4AVAIL))
        a.jump(JmpOp.JLT, I.R1, start + 4, hotdrop)  # skb_header_pointer failed
        for mode, pos in (("srcport", 0), ("dstport", 2)):
            if mode in modes:
                a.emit(I.ldx(I.H, I.R1, R_PKT, L.L4 + start + pos),
                       I.stx(I.H, R_PKT, I.R1, off + pos))
        a.goto(done)
    a.place(done)


def emit_hashlimit(a: Assembler, family: Family, p: HashLimit, fail: Label,
                   hotdrop: Label) -> None:
    """Fall through when the packet is under (with `above`: over) its bucket's limit."""
    cfg = p.cfg
    mkey = map_key("hashlimit", p.name)
    # The key: source, destination (16 bytes each), ports, all zero where the mode omits them.
    for off in range(0, 40, 8):
        a.emit(I.st(I.DW, R_PKT, KEY + off, 0))
    for i, (mode, src, bits) in enumerate((("srcip", True, cfg.srcmask),
                                           ("dstip", False, cfg.dstmask))):
        if mode in cfg.modes:
            _copy_addr(a, family, src, bits, KEY + 16 * i)
    _hashlimit_ports(a, family, cfg.modes, KEY + 32, hotdrop)
    _now(a)
    have = a.label("hl_have")
    _lookup(a, mkey)
    a.jump(JmpOp.JNE, I.R0, 0, have)
    a.emit(I.ldx(I.DW, I.R1, R_PKT, NOW))
    if cfg.bytes_mode:  # rateinfo_init: a second of credit, `burst` refills
        a.emit(I.st(I.DW, R_PKT, HL_INIT, 0), I.ld_imm64(I.R2, SECOND),
               I.stx(I.DW, R_PKT, I.R2, HL_INIT + 8), I.stx(I.DW, R_PKT, I.R1, HL_INIT + 16),
               I.ld_imm64(I.R2, cfg.burst), I.stx(I.DW, R_PKT, I.R2, HL_INIT + 24))
    else:
        a.emit(I.st(I.DW, R_PKT, HL_INIT, 0), I.stx(I.DW, R_PKT, I.R1, HL_INIT + 8))
    _insert(a, mkey, HL_INIT)
    _lookup(a, mkey)
    a.jump(JmpOp.JEQ, I.R0, 0, hotdrop)  # the kernel drops what it cannot make a bucket for
    a.place(have)
    conform, over = a.label("hl_conform"), a.label("hl_over")
    if cfg.bytes_mode:
        _byte_bucket(a, cfg, conform, over)
    else:
        _gcra(a, cfg, conform, over)
    a.place(over)
    if not p.above:
        a.goto(fail)
    else:
        done = a.label("hl_done")
        a.goto(done)
        a.place(conform)
        a.goto(fail)  # under the limit: --hashlimit-above does not match (credit taken)
        a.place(done)
        return
    a.place(conform)


def _gcra(a: Assembler, cfg: HashLimitCfg, conform: Label, over: Label) -> None:
    """The packet bucket at r0: jump to `conform` taking a packet's credit, or to `over`."""
    interval = cfg.interval_ns
    tau = (cfg.burst - 1) * interval
    a.emit(I.mov64(I.R2, I.R0), I.ldx(I.DW, I.R3, R_PKT, NOW))
    # Every packet that finds its bucket pushes the expiry back (dh->expires = now + expire).
    a.emit(I.ldx(I.DW, I.R4, I.R2, 8), I.stx(I.DW, I.R2, I.R3, 8))
    a.emit(I.mov64(I.R5, I.R3), I.alu64(AluOp.SUB, I.R5, I.R4, reg=True))
    a.emit(I.mov64_imm(I.R4, 0), I.ld_imm64(I.R1, cfg.expire_ms * 1_000_000))
    fresh = a.label("hl_fresh")
    a.jump(JmpOp.JLT, I.R5, I.R1, fresh, reg=True)
    a.emit(I.mov64_imm(I.R4, 1))  # idle past expiry: a new, full bucket
    a.place(fresh)
    a.emit(I.ldx(I.DW, I.R0, I.R2, 0))
    for _ in range(CAS_RETRIES):
        as_is = a.label("hl_asis")
        a.emit(I.mov64(I.R1, I.R0))  # what the swap expects
        a.jump(JmpOp.JEQ, I.R4, 0, as_is)
        a.jump(JmpOp.JLE, I.R0, I.R3, as_is, reg=True)
        a.emit(I.mov64(I.R0, I.R3))
        a.place(as_is)
        gcra.emit_try(a, tau, interval, over, conform)
    a.goto(over)  # lost the race too often: count it as over the limit


def _byte_bucket(a: Assembler, cfg: HashLimitCfg, conform: Label, over: Label) -> None:
    """The byte bucket at r0, under its lock: rateinfo_recalc, hashlimit_byte_cost and the
    credit check of hashlimit_mt_common, with credit in nanoseconds (a second at most)."""
    a.emit(I.mov64(I.R2, I.R0))
    _lock(a)
    recalced, capped, paid, short = (a.label(n) for n in ("hb_recalc", "hb_cap", "hb_pay",
                                                          "hb_short"))
    a.emit(I.ldx(I.DW, I.R3, R_PKT, NOW), I.ldx(I.DW, I.R4, I.R2, 16))
    a.emit(I.mov64(I.R5, I.R3), I.alu64(AluOp.SUB, I.R5, I.R4, reg=True))
    a.emit(I.stx(I.DW, I.R2, I.R3, 16))
    a.emit(I.ld_imm64(I.R1, cfg.expire_ms * 1_000_000))
    fresh = a.label("hb_live")
    a.jump(JmpOp.JLT, I.R5, I.R1, fresh, reg=True)
    # Idle past expiry: the kernel would have freed it; a new bucket.
    a.emit(I.ld_imm64(I.R1, cfg.burst), I.stx(I.DW, I.R2, I.R1, 24))
    a.emit(I.ld_imm64(I.R1, SECOND), I.stx(I.DW, I.R2, I.R1, 8))
    a.goto(recalced)
    a.place(fresh)
    a.emit(I.ldx(I.DW, I.R1, I.R2, 8), I.alu64(AluOp.ADD, I.R1, I.R5, reg=True))
    a.emit(I.ld_imm64(I.R4, SECOND))
    a.jump(JmpOp.JLE, I.R1, I.R4, capped, reg=True)
    a.emit(I.mov64(I.R1, I.R4))
    a.place(capped)
    a.emit(I.stx(I.DW, I.R2, I.R1, 8))
    a.place(recalced)
    # The packet's cost: a chunk per 16 bytes begun (plus one), a second's credit at most.
    a.emit(I.ldx(I.H, I.R4, R_PKT, L.IPLEN), I.alu64(AluOp.RSH, I.R4, 4, reg=False),
           I.alu64(AluOp.ADD, I.R4, 1, reg=False),
           I.alu64(AluOp.MUL, I.R4, I.s32(cfg.interval_ns), reg=False))
    a.emit(I.ld_imm64(I.R5, SECOND))
    a.jump(JmpOp.JLE, I.R4, I.R5, short, reg=True)
    a.emit(I.mov64(I.R4, I.R5))
    a.place(short)
    a.emit(I.ldx(I.DW, I.R1, I.R2, 8))
    a.jump(JmpOp.JGE, I.R1, I.R4, paid, reg=True)
    refused = a.label("hb_over")
    a.emit(I.ldx(I.DW, I.R5, I.R2, 24))
    a.jump(JmpOp.JEQ, I.R5, 0, refused)
    a.emit(I.alu64(AluOp.SUB, I.R5, 1, reg=False), I.stx(I.DW, I.R2, I.R5, 24))
    a.emit(I.ld_imm64(I.R1, SECOND))  # an empty bucket refilled whole, once per refill
    a.place(paid)
    a.emit(I.alu64(AluOp.SUB, I.R1, I.R4, reg=True), I.stx(I.DW, I.R2, I.R1, 8))
    _unlock(a)
    a.goto(conform)
    a.place(refused)
    _unlock(a)
    a.goto(over)


def _ttl(a: Assembler, family: Family, reg: int) -> None:
    a.emit(I.ldx(I.B, reg, R_PKT, L.field_offset(Field.TTL, family)))


def _lock(a: Assembler) -> None:
    """Try to take the entry's lock (r2: the entry); LOCKED says whether this packet has it."""
    got = a.label("rc_locked")
    a.emit(I.st(I.W, R_PKT, LOCKED, 1))
    for _ in range(LOCK_TRIES):
        a.emit(I.mov64_imm(I.R0, 0), I.mov64_imm(I.R1, 1))
        a.emit(I.atomic(I.W, I.Atomic.CMPXCHG, I.R2, I.R1, 0))
        a.jump(JmpOp.JEQ, I.R0, 0, got)
    a.emit(I.st(I.W, R_PKT, LOCKED, 0))
    a.place(got)


def _unlock(a: Assembler) -> None:
    """Release the entry's lock (r2: the entry) if this packet holds it."""
    skip = a.label("rc_unlocked")
    a.emit(I.ldx(I.W, I.R1, R_PKT, LOCKED))
    a.jump(JmpOp.JEQ, I.R1, 0, skip)
    # A plain store releases: x86-64 keeps stores in order with the entry's earlier writes.
    a.emit(I.st(I.W, I.R2, 0, 0))
    a.place(skip)


def _update(a: Assembler, family: Family, n: int) -> None:
    """recent_entry_update and the TTL (r2: the entry): stamps[index++ & (n-1)] = now."""
    a.emit(I.ldx(I.H, I.R1, I.R2, 8), I.alu64(AluOp.AND, I.R1, n - 1, reg=False))
    a.emit(I.mov64(I.R3, I.R1), I.alu64(AluOp.LSH, I.R3, 3, reg=False),
           I.alu64(AluOp.ADD, I.R3, I.R2, reg=True))
    a.emit(I.ldx(I.DW, I.R4, R_PKT, NOW), I.stx(I.DW, I.R3, I.R4, RECENT_HEADER))
    a.emit(I.alu64(AluOp.ADD, I.R1, 1, reg=False), I.stx(I.H, I.R2, I.R1, 8))
    keep = a.label("rc_n")
    a.emit(I.ldx(I.H, I.R5, I.R2, 10))
    a.jump(JmpOp.JLE, I.R1, I.R5, keep, reg=True)
    a.emit(I.stx(I.H, I.R2, I.R1, 10))
    a.place(keep)
    _ttl(a, family, I.R1)
    a.emit(I.stx(I.B, I.R2, I.R1, 4))


def emit_recent(a: Assembler, family: Family, p: Recent, fail: Label, hotdrop: Label) -> None:
    """Fall through when xt_recent's answer (after `!`) is true, updating the list as it does."""
    mkey = map_key("recent", p.name)
    n = p.nstamps
    size = RECENT_HEADER + 8 * n
    hit, miss = a.label("rc_hit"), a.label("rc_miss")  # the match before `!`
    a.emit(I.st(I.DW, R_PKT, KEY, 0), I.st(I.DW, R_PKT, KEY + 8, 0))
    _copy_addr(a, family, not p.rdest, 8 * family.addr_len, KEY)
    # The list's mask on the address (nf_inet_addr_mask with the table's mask).
    for i in range(0, family.addr_len, 4):
        m = int.from_bytes(p.mask[i:i + 4], "little")
        if m != 0xFFFFFFFF:
            a.emit(I.ldx(I.W, I.R1, R_PKT, KEY + i), I.alu32(AluOp.AND, I.R1, I.s32(m), reg=False),
                   I.stx(I.W, R_PKT, I.R1, KEY + i))
    _now(a)
    found = a.label("rc_found")
    _lookup(a, mkey)
    a.jump(JmpOp.JNE, I.R0, 0, found)
    if p.mode != "set":
        a.goto(miss)
    else:
        # recent_entry_init: a new entry holding one timestamp (the LRU map makes room).
        _insert(a, mkey, ("state", "zero", size))
        _lookup(a, mkey)
        a.jump(JmpOp.JEQ, I.R0, 0, hotdrop)  # the kernel drops what it cannot list
        a.emit(I.mov64(I.R2, I.R0), I.ldx(I.DW, I.R1, R_PKT, NOW),
               I.stx(I.DW, I.R2, I.R1, RECENT_HEADER), I.st(I.H, I.R2, 8, 1),
               I.st(I.H, I.R2, 10, 1))
        _ttl(a, family, I.R1)
        a.emit(I.stx(I.B, I.R2, I.R1, 4))
        a.goto(hit)
    a.place(found)
    a.emit(I.mov64(I.R2, I.R0))
    if p.rttl:
        same = a.label("rc_ttl")
        _ttl(a, family, I.R1)
        a.jump(JmpOp.JEQ, I.R1, 0, same)
        a.emit(I.ldx(I.B, I.R3, I.R2, 4))
        a.jump(JmpOp.JEQ, I.R3, 0, same)
        a.jump(JmpOp.JNE, I.R1, I.R3, miss, reg=True)  # another TTL: as if not listed
        a.place(same)
    if p.mode == "remove":
        a.ld_map(I.R1, mkey)
        a.emit(I.mov64(I.R2, R_PKT), I.alu64(AluOp.ADD, I.R2, KEY, reg=False))
        a.emit(I.call_helper(Helper.map_delete_elem))
        a.goto(hit)
    elif p.mode == "set":
        _lock(a)
        _update(a, family, n)
        _unlock(a)
        a.goto(hit)
    else:
        _lock(a)
        counted, none = a.label("rc_counted"), a.label("rc_none")
        # recent_mt counts the entry's stamps no older than `seconds` and matches at the
        # hitcount-th. Stamps go into the ring in time order, so the recent ones are the last
        # written: it matches iff the entry has `k` stamps and the k-th latest is recent
        # enough (one load instead of a loop over the ring).
        k = max(p.hitcount, 1)
        a.emit(I.ldx(I.H, I.R5, I.R2, 10))
        a.jump(JmpOp.JLT, I.R5, k, none)
        if p.seconds:
            a.emit(I.ldx(I.H, I.R4, I.R2, 8), I.alu64(AluOp.SUB, I.R4, k, reg=False),
                   I.alu64(AluOp.AND, I.R4, n - 1, reg=False),
                   I.alu64(AluOp.LSH, I.R4, 3, reg=False), I.alu64(AluOp.ADD, I.R4, I.R2, reg=True),
                   I.ldx(I.DW, I.R0, I.R4, RECENT_HEADER))
            a.emit(I.ldx(I.DW, I.R3, R_PKT, NOW), I.ld_imm64(I.R1, p.seconds * 1_000_000_000),
                   I.alu64(AluOp.SUB, I.R3, I.R1, reg=True))
            a.jump(JmpOp.JSLT, I.R0, I.R3, none, reg=True)  # time_after(now - seconds, stamp)
        a.goto(counted)
        a.place(none)
        _unlock(a)
        a.goto(miss)
        a.place(counted)
        if p.mode == "update":
            _update(a, family, n)
        _unlock(a)
        a.goto(hit)
    if p.invert:
        a.place(hit)
        a.goto(fail)
        a.place(miss)
    else:
        a.place(miss)
        a.goto(fail)
        a.place(hit)
