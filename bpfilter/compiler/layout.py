"""Where the packet parser leaves what rules read: one struct on the main program's stack.

The prologue of every hook flavour copies the headers into this struct; rule code reads only from
it (through r9, which points at it in the main program and is passed to user-chain subprograms),
so predicates compile the same way on every hook.

    r10 - 16  .. r10 - 1    bpf_dynptr (netfilter)
    r10 - 24  .. r10 - 17   scratch: map keys
    r10 - 24 - PKT_SIZE     the packet struct (r9)
"""

from __future__ import annotations

from ..bpf import insn as I
from ..ir.model import Family
from ..ir.pred import Field

DYNPTR_OFF = -16
KEY_OFF = -24
PKT_SIZE = 416
PKT_OFF = KEY_OFF - PKT_SIZE  # from r10

# Offsets inside the packet struct.
L3 = 0  # 40 bytes: IPv4 header (first 20 bytes) or IPv6 fixed header
L4 = 40  # 24 bytes: the first bytes of the transport header (zero when absent)
L4PROTO = 64  # u8
L4AVAIL = 65  # u8: bytes of transport header present (0, 4, 8 or 20)
FRAGOFF = 66  # u16, host order; IPv4 in 8-byte units, IPv6 in bytes; 0 for first/unfragmented
IPLEN = 68  # u16, host order
V6ERR = 70  # u8: 1 when the IPv6 header chain could not be walked (netfilter hotdrops `-p`)
L4OFF = 72  # u32: transport header offset from the start of the network header
L3OFF = 76  # u32: network header offset in the data the flavour loads from
DECIDER = 80  # u32: counter slot of the rule (or policy) that gave the verdict
MARK = 84  # u32
IIFNAME = 88  # 16 bytes
OIFNAME = 104  # 16 bytes
SMAC = 120  # 8 bytes (6 used)
PKTTYPE = 128  # u8
TCPOPTLEN = 129  # u8: bytes of TCP options copied
MARKSET = 131  # u8: a MARK target changed the mark (the epilogue writes it back)
ETHOK = 132  # u8: an Ethernet header precedes the network header (xt_mac's condition)
RTDSTDEV = 134  # u16: the destination's type for --limit-iface-in/out (see hooks/localtable.py)
PCLASS = 130  # u8: the packet class the classifier keys on (see classify.atoms.PacketClass)
TCPOPTS = 136  # 40 bytes of TCP options
# 176..191: scratch for the link-layer and extension-header parsers
# The counter map's key, once parsing is done; kept here rather than on the stack so that
# user-chain subprograms need no stack of their own (the verifier caps the frames' sum at 512).
SLOTKEY = 188
KEYBUF = 192  # 112 bytes: classifier lookup keys (shared by user chains through r9)
KEYBUF_SIZE = 112
CT = 304  # 88 bytes: the packet's conntrack entry, filled when rules read it
CTSTATE, CTBITS, CTHAS, CTDIR, CTPROTO, CTSTATUS = CT, CT + 2, CT + 4, CT + 5, CT + 6, CT + 8
CTORIGSRC, CTORIGDST, CTREPLSRC, CTREPLDST = CT + 12, CT + 28, CT + 44, CT + 60
CTORIGSPORT, CTORIGDPORT, CTREPLSPORT, CTREPLDPORT = CT + 76, CT + 78, CT + 80, CT + 82
# 392..415: route type, socket owner (nf metadata) and the IPv6 routing header (parser);
# zeroed by the parser.
RTDST = 392  # u16: xt_addrtype's type bits of the destination (see hooks/localtable.py)
OWNSTATE = 394  # u8: 0 no socket, 1 a socket without a file, 2 with a file (UID/GID valid)
RHSTATE = 395  # u8: routing header 0 absent, 1 read, 2 unreadable (hotdrop), 3 longer than packet
RHTYPE, RHSEGS, RHLEN, RHRESOK = 396, 397, 398, 399  # u8 each; RHLEN as in the header
OWNUID = 400  # u32: the socket file's fsuid (8-aligned: scratch for pointers before)
OWNGID = 404  # u32: its fsgid
RHRES = 408  # u32: the type 0 header's reserved word (valid when RHRESOK)
RTSRC = 412  # u16: the source address's type bits (as RTDST)
RTSRCDEV = 414  # u16: the source's type for --limit-iface-in/out (as RTDSTDEV)

L4_BUF = 24  # size of the transport buffer
TCP_HDR = 20


def field_offset(field: Field, family: Family) -> int:
    """Offset of `field` in the packet struct for `family`."""
    v4 = family is Family.IPV4
    offsets = {
        Field.SADDR4: L3 + 12,
        Field.DADDR4: L3 + 16,
        Field.SADDR6: L3 + 8,
        Field.DADDR6: L3 + 24,
        Field.L4PROTO: L4PROTO,
        Field.FRAGOFF: FRAGOFF,
        Field.IPLEN: IPLEN,
        Field.TTL: L3 + 8 if v4 else L3 + 7,
        Field.SPORT: L4 + 0,
        Field.DPORT: L4 + 2,
        Field.TCPFLAGS: L4 + 13,
        Field.ICMPTYPE: L4 + 0,
        Field.ICMPCODE: L4 + 1,
        Field.IIFNAME: IIFNAME,
        Field.OIFNAME: OIFNAME,
        Field.MARK: MARK,
        Field.PKTTYPE: PKTTYPE,
        Field.SMAC: SMAC,
        Field.CTSTATE: CTSTATE,
        Field.CTBITS: CTBITS,
        Field.CTHAS: CTHAS,
        Field.CTDIR: CTDIR,
        Field.CTPROTO: CTPROTO,
        Field.CTSTATUS: CTSTATUS,
        Field.CTORIGSRC: CTORIGSRC,
        Field.CTORIGDST: CTORIGDST,
        Field.CTREPLSRC: CTREPLSRC,
        Field.CTREPLDST: CTREPLDST,
        Field.CTORIGSPORT: CTORIGSPORT,
        Field.CTORIGDPORT: CTORIGDPORT,
        Field.CTREPLSPORT: CTREPLSPORT,
        Field.CTREPLDPORT: CTREPLDPORT,
        Field.RTDST: RTDST,
        Field.RTSRC: RTSRC,
        Field.RTSRCDEV: RTSRCDEV,
        Field.RTDSTDEV: RTDSTDEV,
        Field.OWNSTATE: OWNSTATE,
        Field.OWNUID: OWNUID,
        Field.OWNGID: OWNGID,
        Field.RHSTATE: RHSTATE,
        Field.RHTYPE: RHTYPE,
        Field.RHSEGS: RHSEGS,
        Field.RHLEN: RHLEN,
        Field.RHRES: RHRES,
    }
    if field in (Field.SADDR4, Field.DADDR4) and not v4:
        raise ValueError(f"{field.name} read in an IPv6 program")
    if field in (Field.SADDR6, Field.DADDR6) and v4:
        raise ValueError(f"{field.name} read in an IPv4 program")
    if field not in offsets:
        raise ValueError(f"field {field.name} has no place in the packet struct")
    return offsets[field]


# Registers with a fixed role in generated code.
R_CTX = I.R6  # the program's context (main program only)
R_PKT = I.R9  # the packet struct
