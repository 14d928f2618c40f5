"""xt_addrtype's address types from a map of the namespace's local routing table, on any hook.

The kernel answers `--src-type`/`--dst-type` with a lookup of the address, not with the
packet's route: for IPv4 inet_dev_addr_type() (0.0.0.0/8 and 255.255.255.255 BROADCAST,
224.0.0.0/4 MULTICAST, else the longest-prefix route of table `local`, UNICAST when none or
when that route is a reject type), for IPv6 a route lookup whose RTF_LOCAL / anycast flags
give LOCAL and ANYCAST. Programs cannot call those lookups, so the runtime copies the table
into a pinned LPM trie (runtime/localtable.py) and the program looks the address up:

    key    {u32 prefix length, address (4 or 16 bytes, network order)}
    value  {u32 type bits, u32 ifindex: the device of the route's first nexthop (IPv4), of
            the address (IPv6 addresses; 0 for other routes)}

IPv4 values hold 1 << RTN_* (what xt_addrtype tests); a miss is UNICAST. IPv6 values hold the
LOCAL and ANYCAST bits; a miss is neither (UNSPEC, UNICAST and MULTICAST are tests of the
address itself, compiled as predicates by the match). The routine reads the address from the
packet struct's L3 fields only, so any flavour that fills them (from the packet, or from a
socket address) can call it.
"""

from __future__ import annotations

from collections.abc import Callable

from ...bpf import insn as I
from ...bpf.asm import Assembler
from ...bpf.consts import Helper, MapFlags, MapType
from ...bpf.insn import AluOp, JmpOp
from ...bpf.maps import MapSpec
from ...ir.model import Family
from ...ir.pred import Field
from ...matches.kernel import RouteType
from .. import layout as L

LOCAL_TABLE = "localtable"  # the map's key in a compiled table's maps (shared, pinned)
VALUE_SIZE = 8  # u32 type bits, u32 ifindex
MAX_ENTRIES = 1 << 16
KEY = L.KEYBUF  # the lookup key; KEYBUF is free while the prologue runs
ADDR_FIELDS = (Field.RTSRC, Field.RTDST, Field.RTSRCDEV, Field.RTDSTDEV)


def key_size(family: Family) -> int:
    """Bytes of an LPM key: the prefix length and the address."""
    return 4 + (4 if family is Family.IPV4 else 16)


def map_spec(family: Family) -> MapSpec:
    """The local table map of `family`."""
    return MapSpec(MapType.LPM_TRIE, key_size(family), VALUE_SIZE, MAX_ENTRIES,
                   MapFlags.NO_PREALLOC, name=f"bpf_lt_{family.value}")


def address_offset(family: Family, which: str) -> int:
    """Offset of the source ("src") or destination ("dst") address in the packet struct."""
    v4 = family is Family.IPV4
    if which == "src":
        return L.L3 + (12 if v4 else 8)
    if which == "dst":
        return L.L3 + (16 if v4 else 24)
    raise ValueError(f"address {which!r}: src or dst")


DEV_IN, DEV_OUT = 1 << 15, 1 << 14  # the --limit-iface bits of RTSRCDEV / RTDSTDEV
NO_DEV = -1  # an ifindex no route has: the hook has no such device
# Loads the ifindex of the packet's input ("in") or output ("out") device into a register
# (NO_DEV when the hook has none); may clobber r1 and r2 besides.
DevLoader = Callable[[Assembler, str, int], None]


def emit_addr_type(a: Assembler, family: Family, which: str, dst: int,
                   dev: DevLoader | None = None) -> None:
    """r9[dst] (u16) = xt_addrtype's type bits of the packet's `which` address ("src"/"dst").

    With `dev`, bits 15 and 14 also say whether the route's device is the packet's input or
    output device (--limit-iface-in/out: IPv4 then answers the route's type only on that device,
    UNICAST elsewhere; IPv6 LOCAL needs the address on that device). Reads only the L3 address
    in the packet struct, the LOCAL_TABLE map and the devices; clobbers r0-r5."""
    v4 = family is Family.IPV4
    off = address_offset(family, which)
    store = a.label("at_store")
    both = (DEV_IN | DEV_OUT) if dev is not None and v4 else 0  # dev-independent answers
    if v4:
        a.emit(I.ldx(I.W, I.R2, L.R_PKT, off))  # first byte lowest
        a.emit(I.mov64(I.R1, I.R2), I.alu32(AluOp.AND, I.R1, 0xFF, reg=False))
        a.emit(I.mov64_imm(I.R3, both | 1 << RouteType.BROADCAST))
        a.jump(JmpOp.JEQ, I.R1, 0, store)  # 0.0.0.0/8
        a.emit(I.mov64(I.R4, I.R2), I.alu32(AluOp.ADD, I.R4, 1, reg=False))
        a.jump(JmpOp.JEQ, I.R4, 0, store)  # 255.255.255.255
        a.emit(I.alu32(AluOp.AND, I.R1, 0xF0, reg=False))
        a.emit(I.mov64_imm(I.R3, both | 1 << RouteType.MULTICAST))
        a.jump(JmpOp.JEQ, I.R1, 0xE0, store)
        a.emit(I.stx(I.W, L.R_PKT, I.R2, KEY + 4))
        a.emit(I.st(I.W, L.R_PKT, KEY, 32))
        miss = both | 1 << RouteType.UNICAST
    else:
        for i in range(0, 16, 4):  # word copies: stack accesses must be aligned
            a.emit(I.ldx(I.W, I.R1, L.R_PKT, off + i), I.stx(I.W, L.R_PKT, I.R1, KEY + 4 + i))
        a.emit(I.st(I.W, L.R_PKT, KEY, 128))
        miss = 0
    a.ld_map(I.R1, LOCAL_TABLE)
    a.emit(I.mov64(I.R2, L.R_PKT), I.alu64(AluOp.ADD, I.R2, KEY, reg=False))
    a.emit(I.call_helper(Helper.map_lookup_elem))
    a.emit(I.mov64_imm(I.R3, miss))
    a.jump(JmpOp.JEQ, I.R0, 0, store)
    a.emit(I.ldx(I.W, I.R3, I.R0, 0))
    if dev is not None:
        a.emit(I.ldx(I.W, I.R4, I.R0, 4))
        for side, bit in (("in", DEV_IN), ("out", DEV_OUT)):
            other = a.label("at_dev")
            dev(a, side, I.R5)
            a.jump(JmpOp.JNE, I.R4, I.R5, other, reg=True)
            a.emit(I.alu32(AluOp.OR, I.R3, bit, reg=False))
            a.place(other)
    a.place(store)
    a.emit(I.stx(I.H, L.R_PKT, I.R3, dst))


_FILLS = (("src", Field.RTSRC, L.RTSRC, Field.RTSRCDEV, L.RTSRCDEV),
          ("dst", Field.RTDST, L.RTDST, Field.RTDSTDEV, L.RTDSTDEV))


def emit_types(a: Assembler, family: Family, fields: set[Field], *,
               skip: frozenset[Field] = frozenset(), dev: DevLoader | None = None) -> None:
    """Fill the address type fields the rules read from the map (not those in `skip`, which
    the flavour fills another way); `dev` loads device ifindexes (see emit_addr_type)."""
    for which, plain, plain_at, limited, limited_at in _FILLS:
        want_plain = plain in fields and plain not in skip
        if limited in fields:
            if dev is None:
                raise ValueError("--limit-iface-in/out needs the hook's devices")
            emit_addr_type(a, family, which, limited_at, dev)
            if want_plain:  # one lookup for both: the same bits without the device's
                a.emit(I.ldx(I.H, I.R3, L.R_PKT, limited_at))
                a.emit(I.alu32(AluOp.AND, I.R3, ~(DEV_IN | DEV_OUT) & 0xFFFF, reg=False))
                a.emit(I.stx(I.H, L.R_PKT, I.R3, plain_at))
        elif want_plain:
            emit_addr_type(a, family, which, plain_at)


def maps_for(fields: set[Field], family: Family) -> dict[str, MapSpec]:
    """The map a program needs when its rules read an address type."""
    return {LOCAL_TABLE: map_spec(family)} if fields & set(ADDR_FIELDS) else {}
