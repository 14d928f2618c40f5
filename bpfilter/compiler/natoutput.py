"""The nat table's OUTPUT chain: DNAT and REDIRECT of locally generated connections at the socket.

The chain compiles with the socket-address flavour (hooks/sockaddr.py) into one program, loaded
twice by the runtime: for connect4/6 (TCP, and UDP sockets that connect) and for udp sendmsg4/6
(unconnected UDP). A DNAT or REDIRECT verdict rewrites the call's destination, which the kernel
then uses as if the application had asked for it, and records the translation in an LRU hash
keyed by the socket's cookie and the translated address; two fixed programs read it back:
udp recvmsg4/6 gives a reply's source as the original destination, getpeername4/6 shows the
address the application connected to. Each program acts only on sockets of the namespace the
ruleset was loaded into (bpf_get_netns_cookie against the cookie the runtime stores), because
cgroup programs see every socket of their cgroup, whatever its namespace.

The connect and sendmsg programs are reached through dispatchers that read the same generation
word as the ruleset's other hooks (runtime/dispatch.py), so a restore switches nat OUTPUT with
everything else in one write. Each attach type has its own two-slot program array: the kernel
lets a program array hold programs of a single expected attach type.

Scratch in KEYBUF while translating (the rules are done with it):

    +0  the reverse map's key: u64 socket cookie, translated address, be16 port, zero pad
    +32 its value: the original address, be16 port, zero pad
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from ..bpf import insn as I
from ..bpf.asm import Assembler, Origin, Program
from ..bpf.consts import Helper, MapType
from ..bpf.insn import AluOp, JmpOp
from ..bpf.maps import MapSpec
from ..ir.model import GOTO, JUMP, Chain, Family, Table
from ..matches.nat import Nat
from . import layout as L
from .hooks.base import HookPoint, Verdict
from .hooks.sockaddr import (
    ALLOW,
    CFG_MAP,
    CONNECT4,
    CONNECT6,
    CTX_USER_IP4,
    CTX_USER_IP6,
    CTX_USER_PORT,
    GETPEERNAME4,
    GETPEERNAME6,
    HELPER_GET_SOCKET_COOKIE,
    RECVMSG4,
    RECVMSG6,
    REV_ENTRIES,
    REV_KEY,
    REV_MAP,
    REV_VALUE,
    SENDMSG4,
    SENDMSG6,
    SockAddrFlavour,
    emit_netns_check,
)
from .nat import NatFlavour
from .natbind import copy_words, nat_family, pick_addr, store_const
from .validate import CompileError

K = L.KEYBUF
KEY, VALUE = K, K + 32
LOOPBACK = {Family.IPV4: bytes([127, 0, 0, 1]), Family.IPV6: bytes(15) + b"\1"}
ADDR_LEN = {Family.IPV4: 4, Family.IPV6: 16}
# Targets the kernel accepts in nat OUTPUT (xt_nat: SNAT and MASQUERADE are POSTROUTING/INPUT).
OUTPUT_TARGETS = ("DNAT", "REDIRECT")
# Targets the socket hooks cannot carry out (no packet to mark or to answer).
REFUSED_TARGETS = {"SNAT": "is valid only in POSTROUTING and INPUT",
                   "MASQUERADE": "is valid only in POSTROUTING",
                   "MARK": "needs a packet; nat OUTPUT runs at connect/sendmsg",
                   "REJECT": "needs a packet to answer; nat OUTPUT runs at connect/sendmsg",
                   "LOG": "is not supported in the nat table yet",
                   "NFLOG": "is not supported in the nat table yet"}

# Attach types by program role and family.
ATTACH = {("connect", Family.IPV4): CONNECT4, ("connect", Family.IPV6): CONNECT6,
          ("sendmsg", Family.IPV4): SENDMSG4, ("sendmsg", Family.IPV6): SENDMSG6,
          ("recvmsg", Family.IPV4): RECVMSG4, ("recvmsg", Family.IPV6): RECVMSG6,
          ("getpeername", Family.IPV4): GETPEERNAME4,
          ("getpeername", Family.IPV6): GETPEERNAME6}
DISPATCHED = ("connect", "sendmsg")  # run the rules (through the generation word)
REVERSE = ("recvmsg", "getpeername")  # fixed: read the translations back


def _le16(port: int) -> int:
    """A port as the immediate a little-endian 2-byte store writes in network order."""
    return int.from_bytes(port.to_bytes(2, "big"), "little")


def busy(chain: Chain | None) -> bool:
    """Whether a chain does anything (rules, or a policy other than ACCEPT)."""
    return chain is not None and (bool(chain.rules) or chain.policy not in (None, "ACCEPT"))


def has_output(table: Table) -> bool:
    """Whether the nat table's OUTPUT chain has rules (or a DROP policy)."""
    return busy(table.chains.get("OUTPUT"))


def is_sock(flavour) -> bool:
    """Whether a compiled program belongs to nat OUTPUT (loaded by runtime/natoutput.py)."""
    return isinstance(flavour, SockAddrFlavour)


def progs_map(role: str, family: Family) -> str:
    """The program array (and its pin name) of a dispatched role."""
    return f"natout_progs_{role}{4 if family is Family.IPV4 else 6}"


def check_output(table: Table) -> None:
    """Refuse, with the rule's file and line, targets nat OUTPUT cannot run at the socket."""
    seen: set[str] = set()
    todo = ["OUTPUT"]
    while todo:
        name = todo.pop()
        if name in seen or name not in table.chains:
            continue
        seen.add(name)
        for n, rule in enumerate(table.chains[name].rules, 1):
            t = rule.target
            if t is None:
                continue
            if t.kind in (JUMP, GOTO):
                todo.append(t.params.chain)
            elif t.kind in REFUSED_TARGETS:
                via = "" if name == "OUTPUT" else " (reached from OUTPUT)"
                raise CompileError(f"rule {name} #{n}{via}: target {t.kind} in nat OUTPUT "
                                   f"{REFUSED_TARGETS[t.kind]}", rule.origin)
            elif t.kind in OUTPUT_TARGETS and t.params.range.base is not None:
                raise CompileError(f"rule {name} #{n}: {t.kind} with a base port (/N) is not "
                                   "supported", rule.origin)


def add_maps(ct, family: Family) -> None:
    """Declare the maps nat OUTPUT's programs use (the runtime passes its pinned ones; a
    verification-only load gets stand-ins)."""
    ct.maps[CFG_MAP] = MapSpec(MapType.ARRAY, 4, 8, 1, name="natout_cfg")
    ct.maps[REV_MAP[family]] = rev_spec(family)


def rev_spec(family: Family) -> MapSpec:
    """The reverse translation map of a family."""
    return MapSpec(MapType.LRU_HASH, REV_KEY[family], REV_VALUE[family], REV_ENTRIES,
                   name=REV_MAP[family])


def compile_output(table: Table, family: Family):
    """Compile a nat table whose only busy built-in chain is OUTPUT (any --hook)."""
    from .codegen import compile_table

    check_output(table)
    ct = compile_table(table, SockAddrFlavour(family))
    add_maps(ct, family)
    return ct


def compile_tc(table: Table, fl: NatFlavour, compile_table):
    """Compile the nat table for tc; with OUTPUT rules, that chain for the sockets."""
    if not has_output(table):
        return compile_table(table, fl)
    check_output(table)
    both = NatWithOutput(**{f.name: getattr(fl, f.name) for f in dataclasses.fields(fl)
                            if f.init})
    ct = compile_table(table, both)
    add_maps(ct, fl.family)
    return ct


@dataclasses.dataclass
class NatWithOutput(NatFlavour):
    """The nat table on tc: PREROUTING and POSTROUTING at ingress, OUTPUT at the sockets."""

    def chains(self, table: str) -> dict[str, HookPoint]:
        """The tc chains and OUTPUT."""
        out = super().chains(table)
        if table == "nat":
            out["OUTPUT"] = HookPoint("OUTPUT")
        return out

    def for_hook(self, hook: HookPoint):
        """OUTPUT: the socket flavour; the others as NatFlavour compiles them."""
        if hook.chain == "OUTPUT":
            return SockAddrFlavour(self.family)
        return super().for_hook(hook)


# -- the translation ---------------------------------------------------------------------------


def emit_translate(a: Assembler, fl: SockAddrFlavour, targets: Sequence) -> None:
    """With the internal verdict in r7: for NAT target r7 >> 8, choose the destination, record
    it with the original in the reverse map and rewrite the call's address; allow the call."""
    fam = fl.family
    alen = ADDR_LEN[fam]
    done, bind = a.label("natout_done"), a.label("natout_bind")
    a.emit(I.mov64(I.R1, I.R7), I.alu64(AluOp.AND, I.R1, 0xFF, reg=False))
    a.jump(JmpOp.JNE, I.R1, Verdict.NAT, done)
    for off in range(0, 64, 8):
        a.emit(I.st(I.DW, L.R_PKT, K + off, 0))
    daddr = L.L3 + (16 if fam is Family.IPV4 else 24)
    for i in range(0, alen, 4):  # the original destination, as the application gave it
        a.emit(I.ldx(I.W, I.R1, L.R_PKT, daddr + i), I.stx(I.W, L.R_PKT, I.R1, VALUE + i))
    a.emit(I.ldx(I.H, I.R1, L.R_PKT, L.L4 + 2), I.stx(I.H, L.R_PKT, I.R1, VALUE + alen))
    a.emit(I.mov64(I.R8, I.R7), I.alu64(AluOp.RSH, I.R8, 8, reg=False))
    for i, (kind, p) in enumerate(targets):
        other = a.label("natout_target")
        a.jump(JmpOp.JNE, I.R8, i, other)
        _target(a, fam, kind, p)
        a.goto(bind)
        a.place(other)
    a.goto(done)
    a.place(bind)
    a.emit(I.mov64(I.R1, L.R_CTX), I.call_helper(HELPER_GET_SOCKET_COOKIE))
    a.emit(I.stx(I.DW, L.R_PKT, I.R0, KEY))
    a.ld_map(I.R1, REV_MAP[fam])
    a.emit(I.mov64(I.R2, L.R_PKT), I.alu64(AluOp.ADD, I.R2, KEY, reg=False))
    a.emit(I.mov64(I.R3, L.R_PKT), I.alu64(AluOp.ADD, I.R3, VALUE, reg=False))
    a.emit(I.mov64_imm(I.R4, 0), I.call_helper(Helper.map_update_elem))
    # Without its record a reply would show the translated address: still better than failing
    # the call, which the application would see as the firewall refusing it.
    if fam is Family.IPV4:
        a.emit(I.ldx(I.W, I.R1, L.R_PKT, KEY + 8), I.stx(I.W, L.R_CTX, I.R1, CTX_USER_IP4))
    else:
        for i in range(0, 16, 4):
            a.emit(I.ldx(I.W, I.R1, L.R_PKT, KEY + 8 + i),
                   I.stx(I.W, L.R_CTX, I.R1, CTX_USER_IP6 + i))
    a.emit(I.ldx(I.H, I.R1, L.R_PKT, KEY + 8 + alen), I.stx(I.W, L.R_CTX, I.R1, CTX_USER_PORT))
    a.place(done)
    a.emit(I.mov64_imm(I.R0, ALLOW), I.exit_())


def _target(a: Assembler, fam: Family, kind: str, p: Nat) -> None:
    """The new destination into the key: address at KEY + 8, port after it."""
    if kind not in OUTPUT_TARGETS:
        raise CompileError(f"target {kind} in nat OUTPUT {REFUSED_TARGETS.get(kind, '')}")
    alen = ADDR_LEN[fam]
    addr, port = KEY + 8, KEY + 8 + alen
    r = p.range
    if kind == "REDIRECT":
        # nf_nat_redirect: locally generated connections go to the loopback address.
        store_const(a, L.R_PKT, addr, LOOPBACK[fam])
    elif r.lo is None:
        copy_words(a, L.R_PKT, VALUE, L.R_PKT, addr, alen)
    elif r.lo == r.hi:
        store_const(a, L.R_PKT, addr, r.lo)
    else:
        # The same address for every connection to a destination (nf_nat hashes source and
        # destination; the source is not chosen yet).
        pick_addr(a, nat_family(fam), r.lo, r.hi, L.R_PKT, addr, at=VALUE)
    if r.port_lo is None:
        a.emit(I.ldx(I.H, I.R1, L.R_PKT, VALUE + alen), I.stx(I.H, L.R_PKT, I.R1, port))
        return
    # As nf_nat does for a destination: keep the port when the range holds it, else the
    # range's first port (a connection of this socket cannot clash: its source is yet to come).
    first, kept = a.label("natout_first"), a.label("natout_port")
    a.emit(I.ldx(I.H, I.R1, L.R_PKT, VALUE + alen), I.stx(I.H, L.R_PKT, I.R1, port))
    a.emit(I.endian(I.R1, 16, big=True))
    a.jump(JmpOp.JLT, I.R1, r.port_lo, first)
    a.jump(JmpOp.JGT, I.R1, r.port_hi, first)
    a.goto(kept)
    a.place(first)
    a.emit(I.st(I.H, L.R_PKT, port, _le16(r.port_lo)))
    a.place(kept)


# -- the fixed programs ------------------------------------------------------------------------


def reverse_program(family: Family) -> Program:
    """recvmsg/getpeername: the address the kernel reports back becomes the original
    destination when this socket's translation made it."""
    alen = ADDR_LEN[family]
    key = -56  # 32 bytes on the stack: cookie, address, port, pad
    a = Assembler()
    with a.origin(Origin(f"nat OUTPUT: translate back ({family.value})")):
        leave = a.label("leave")
        a.emit(I.mov64(L.R_CTX, I.R1))
        emit_netns_check(a, leave)
        for off in range(0, 32, 8):
            a.emit(I.st(I.DW, I.R10, key + off, 0))
        a.emit(I.mov64(I.R1, L.R_CTX), I.call_helper(HELPER_GET_SOCKET_COOKIE))
        a.emit(I.stx(I.DW, I.R10, I.R0, key))
        src = CTX_USER_IP4 if family is Family.IPV4 else CTX_USER_IP6
        for i in range(0, alen, 4):
            a.emit(I.ldx(I.W, I.R1, L.R_CTX, src + i), I.stx(I.W, I.R10, I.R1, key + 8 + i))
        a.emit(I.ldx(I.W, I.R1, L.R_CTX, CTX_USER_PORT))
        a.emit(I.stx(I.H, I.R10, I.R1, key + 8 + alen))
        a.ld_map(I.R1, REV_MAP[family])
        a.emit(I.mov64(I.R2, I.R10), I.alu64(AluOp.ADD, I.R2, key, reg=False))
        a.emit(I.call_helper(Helper.map_lookup_elem))
        a.jump(JmpOp.JEQ, I.R0, 0, leave)
        for i in range(0, alen, 4):
            a.emit(I.ldx(I.W, I.R1, I.R0, i), I.stx(I.W, L.R_CTX, I.R1, src + i))
        a.emit(I.ldx(I.H, I.R1, I.R0, alen), I.stx(I.W, L.R_CTX, I.R1, CTX_USER_PORT))
        a.place(leave)
        a.emit(I.mov64_imm(I.R0, ALLOW), I.exit_())
    return a.assemble()


def dispatcher(family: Family, role: str, gen_map: str) -> Program:
    """connect/sendmsg: tail-call the current generation's program of this attach type (an
    empty slot, no nat OUTPUT in that generation, leaves the call alone)."""
    from ..runtime.dispatch import family_index

    fi = family_index(family)
    a = Assembler()
    with a.origin(Origin(f"dispatch nat OUTPUT {role} ({family.value})")):
        leave = a.label("leave")
        a.emit(I.mov64(L.R_CTX, I.R1))
        emit_netns_check(a, leave)
        a.ld_map_value(I.R1, gen_map, 0)
        a.emit(I.ldx(I.W, I.R3, I.R1, 4 * fi), I.alu64(AluOp.AND, I.R3, 1, reg=False))
        a.emit(I.mov64(I.R1, L.R_CTX))
        a.ld_map(I.R2, progs_map(role, family))
        a.emit(I.call_helper(Helper.tail_call))
        a.place(leave)
        a.emit(I.mov64_imm(I.R0, ALLOW), I.exit_())
    return a.assemble()
