"""The BTF reader, and the kernel constants and attr structs of bpfilter.bpf checked against it.

The synthetic-blob tests run anywhere; the rest read the running kernel's BTF (no root needed)
and skip when /sys/kernel/btf/vmlinux is absent.
"""

from __future__ import annotations

import ctypes
import enum
import platform
import struct
import time

import pytest

from bpfilter.bpf import consts, syscall
from bpfilter.bpf.btf import VMLINUX, Btf, BtfError, BtfKind, vmlinux

needs_vmlinux = pytest.mark.skipif(not VMLINUX.exists(),
                                   reason=f"{VMLINUX} absent (kernel built without BTF)")

# --- a hand-made blob: every decoding path, independent of the kernel ---------------------


class _Blob:
    """Builds a raw BTF blob type by type (ids in call order, from 1)."""

    def __init__(self) -> None:
        self.strs = bytearray(b"\0")
        self.types = bytearray()

    def s(self, name: str) -> int:
        if not name:
            return 0
        off = len(self.strs)
        self.strs += name.encode() + b"\0"
        return off

    def t(self, name: str, kind: BtfKind, vlen: int, size_or_type: int, extra: bytes = b"",
          kflag: bool = False) -> None:
        info = kflag << 31 | kind << 24 | vlen
        self.types += struct.pack("<III", self.s(name), info, size_or_type) + extra

    def blob(self, magic: int = 0xEB9F) -> bytes:
        hdr = struct.pack("<HBBIIIII", magic, 1, 0, 24, 0, len(self.types), len(self.types),
                          len(self.strs))
        return hdr + bytes(self.types) + bytes(self.strs)


def _synthetic(magic: int = 0xEB9F) -> bytes:
    b = _Blob()
    b.t("u32", BtfKind.INT, 0, 4, struct.pack("<I", 32))  # 1
    b.t("u8", BtfKind.INT, 0, 1, struct.pack("<I", 8))  # 2
    b.t("", BtfKind.INT, 0, 1, struct.pack("<I", 3 << 16 | 3))  # 3: old-style 3-bit field at +3
    # 4: union { u32 c; u32 d; }
    b.t("", BtfKind.UNION, 2, 4, struct.pack("<III", b.s("c"), 1, 0) +
        struct.pack("<III", b.s("d"), 1, 0))
    # 5: struct s { u32 a; u8 :3 bf (old style, bits 32+3..); union {c, d}; u8 k:2 (kflag) }
    b.t("s", BtfKind.STRUCT, 3, 12,
        struct.pack("<III", b.s("a"), 1, 0) + struct.pack("<III", b.s("bf"), 3, 32) +
        struct.pack("<III", 0, 4, 64))
    b.t("t", BtfKind.TYPEDEF, 0, 5)  # 6
    b.t("const_t", BtfKind.CONST, 0, 6)  # 7 (named only so tests can find it)
    # 8: struct k { u8 x:2 at bit 5, t inner at byte 4 } with kflag bitfield encoding
    b.t("k", BtfKind.STRUCT, 2, 16,
        struct.pack("<III", b.s("x"), 2, 2 << 24 | 5) + struct.pack("<III", b.s("inner"), 7, 32),
        kflag=True)
    b.t("e", BtfKind.ENUM, 2, 4, struct.pack("<Ii", b.s("E_NEG"), -1) +
        struct.pack("<Ii", b.s("E_ONE"), 1), kflag=True)  # 9: signed
    b.t("ue", BtfKind.ENUM, 1, 4, struct.pack("<Ii", b.s("UE_BIG"), -1))  # 10: unsigned
    b.t("big", BtfKind.ENUM64, 1, 8, struct.pack("<III", b.s("BIG"), 0, 1 << 8))  # 11
    b.t("", BtfKind.ARRAY, 0, 0, struct.pack("<III", 1, 1, 6))  # 12: u32[6]
    b.t("", BtfKind.PTR, 0, 5)  # 13
    b.t("", BtfKind.FUNC_PROTO, 1, 1, struct.pack("<II", b.s("arg"), 13))  # 14
    b.t("f", BtfKind.FUNC, 0, 14)  # 15
    b.t("s", BtfKind.FWD, 0, 0)  # 16: same name, other kind
    return b.blob(magic)


def test_synthetic_types() -> None:
    btf = Btf(_synthetic())
    assert len(btf) == 17
    assert btf.find("s", BtfKind.STRUCT) == 5
    assert btf.find("s", BtfKind.FWD) == 16
    assert btf.ids_named("s") == [5, 16]
    assert btf.func_id("f") == 15
    assert btf.kind(0) == BtfKind.UNKN and btf.type_name(0) == "void"
    assert btf.kind(12) == BtfKind.ARRAY and btf.type_name(12) == ""
    assert btf.type_size(12) == 24
    assert btf.type_size(13) == 8
    assert btf.type_size(7) == 12  # const -> typedef -> struct
    assert btf.resolve(7) == 5
    with pytest.raises(BtfError, match="has no size"):
        btf.type_size(15)


def test_synthetic_members() -> None:
    btf = Btf(_synthetic())
    a = btf.member_offset("s", "a")
    assert (a.offset, a.size, a.bit_size, a.is_bitfield) == (0, 4, 0, False)
    bf = btf.member_offset("s", "bf")  # width and position from the INT encoding
    assert (bf.offset, bf.bit_offset, bf.bit_size, bf.is_bitfield) == (4, 35, 3, True)
    d = btf.member_offset("s", "d")  # inside the anonymous union
    assert (d.offset, d.size) == (8, 4)
    x = btf.member_offset("k", "x")  # kflag encoding
    assert (x.offset, x.bit_offset, x.bit_size, x.size) == (0, 5, 2, 1)
    nested = btf.member_offset("k", "inner.d")  # through const and typedef, then transparent
    assert (nested.offset, nested.size, nested.bit_offset) == (12, 4, 96)
    assert btf.member_offset(8, "inner").size == 12
    with pytest.raises(BtfError, match="no member 'zz'"):
        btf.member_offset("s", "zz")
    with pytest.raises(BtfError, match="not inside a struct"):
        btf.member_offset("s", "a.b")


def test_synthetic_enums() -> None:
    btf = Btf(_synthetic())
    assert btf.enum_values("e") == {"E_NEG": -1, "E_ONE": 1}
    assert btf.enum_values("ue") == {"UE_BIG": 0xFFFFFFFF}
    assert btf.enum_values("big") == {"BIG": 1 << 40}
    assert btf.enum_value("E_ONE") == 1
    with pytest.raises(BtfError, match="no BTF enumerator named 'NOPE'"):
        btf.enum_value("NOPE")


def test_errors() -> None:
    btf = Btf(_synthetic())
    with pytest.raises(KeyError):  # BtfError is a KeyError, for callers probing names
        btf.find("nope", BtfKind.STRUCT)
    with pytest.raises(BtfError) as err:
        btf.func_id("s")
    assert str(err.value) == "no BTF FUNC named 's'"
    with pytest.raises(BtfError, match="magic"):
        Btf(_synthetic(magic=0x9FEB))
    data = bytearray(_synthetic())
    struct.pack_into("<I", data, 12, struct.unpack_from("<I", data, 12)[0] - 4)  # type_len
    with pytest.raises(BtfError, match="inside a type record"):
        Btf(bytes(data))
    with pytest.raises(BtfError, match="out of range"):
        btf.kind(99)


# --- the running kernel -------------------------------------------------------------------


@needs_vmlinux
def test_vmlinux_parses_fast() -> None:
    start = time.perf_counter()
    btf = Btf.load()
    btf.find("sk_buff", BtfKind.STRUCT)  # builds the name index too
    elapsed = time.perf_counter() - start
    assert len(btf) > 10_000
    assert elapsed < 2.0, f"parsing vmlinux BTF took {elapsed:.2f}s"
    assert vmlinux() is vmlinux()


@needs_vmlinux
@pytest.mark.parametrize(("struct_name", "path", "size"), [
    ("sk_buff", "mark", 4), ("sk_buff", "len", 4), ("sk_buff", "head", 8),
    ("sk_buff", "data", 8), ("sk_buff", "mac_header", 2), ("sk_buff", "network_header", 2),
    ("sk_buff", "protocol", 2), ("nf_hook_state", "hook", 1), ("nf_hook_state", "pf", 1),
    ("nf_hook_state", "in", 8), ("nf_hook_state", "out", 8), ("net_device", "ifindex", 4),
    ("net_device", "name", 16), ("bpf_nf_ctx", "state", 8), ("bpf_nf_ctx", "skb", 8),
])
def test_kernel_members(struct_name: str, path: str, size: int) -> None:
    m = vmlinux().member_offset(struct_name, path)
    assert m.size == size
    assert not m.is_bitfield
    assert 0 <= m.offset < vmlinux().type_size(vmlinux().find(struct_name, BtfKind.STRUCT))


@needs_vmlinux
def test_kernel_layout_facts() -> None:
    btf = vmlinux()
    assert btf.member_offset("bpf_nf_ctx", "skb").offset == 8
    assert btf.member_offset("nf_hook_state", "in").offset == 8
    assert btf.member_offset("nf_hook_state", "out").offset == 16
    pkt_type = btf.member_offset("sk_buff", "pkt_type")  # bitfield in an anonymous struct
    assert pkt_type.is_bitfield and pkt_type.bit_size == 3 and pkt_type.size == 1
    assert pkt_type.offset == pkt_type.bit_offset // 8
    # mac/network headers are offsets from skb->head, declared next to each other
    net = btf.member_offset("sk_buff", "network_header").offset
    assert btf.member_offset("sk_buff", "mac_header").offset == net + 2


@needs_vmlinux
@pytest.mark.parametrize("name", ["bpf_dynptr_from_skb", "bpf_dynptr_slice",
                                  "bpf_skb_ct_lookup"])
def test_kfuncs(name: str) -> None:
    btf = vmlinux()
    func = btf.func_id(name)
    assert func > 0
    assert btf.kind(func) == BtfKind.FUNC and btf.type_name(func) == name
    assert btf.kind(btf.ref_type(func)) == BtfKind.FUNC_PROTO


# --- consts.py against the kernel ---------------------------------------------------------

# Each consts enum that mirrors a kernel enum: the kernel's enumerator name for each member.
_MIRRORED: dict[type[enum.Enum], str] = {
    consts.Cmd: "BPF_{}",
    consts.MapType: "BPF_MAP_TYPE_{}",
    consts.ProgType: "BPF_PROG_TYPE_{}",
    consts.AttachType: "BPF_{}",
    consts.LinkType: "BPF_LINK_TYPE_{}",
    consts.XdpAction: "XDP_{}",
    consts.NfHook: "NF_INET_{}",
    consts.NfProto: "NFPROTO_{}",  # an anonymous enum: looked up by enumerator
    consts.MapFlags: "BPF_F_{}",
    consts.UpdateFlags: "BPF_{}",
    consts.Helper: "BPF_FUNC_{}",
    consts.SkbStoreFlags: "BPF_F_{}",  # anonymous UAPI enums: looked up by enumerator
    consts.RedirectFlags: "BPF_F_{}",
}
_RENAMED = {  # tc return codes are #defines; tcx's enum tcx_action_base has the same values
    consts.TcAction.NEXT: "TCX_NEXT", consts.TcAction.OK: "TCX_PASS",
    consts.TcAction.SHOT: "TCX_DROP", consts.TcAction.REDIRECT: "TCX_REDIRECT",
    consts.LinkFlags.LINK: "BPF_F_LINK",
}
# #defines in the UAPI, absent from BTF: checked by the kernel tests that use them instead.
_NOT_IN_BTF = {consts.ProgFlags, consts.TestRunFlags, consts.NfVerdict, consts.CgroupSkbVerdict,
               consts.LinkFlags.REPLACE, consts.LinkFlags.BEFORE, consts.LinkFlags.AFTER,
               consts.LinkFlags.ID}


def _kernel_name(member: enum.Enum) -> str | None:
    if member in _RENAMED:
        return _RENAMED[member]
    cls = type(member)
    if cls in _MIRRORED:
        return _MIRRORED[cls].format(member.name)
    return None


def _mismatches(cls: type[enum.Enum]) -> list[str]:
    btf, out = vmlinux(), []
    for member in cls:
        if member.value == 0 and issubclass(cls, enum.Flag):
            continue  # NONE is not a kernel flag
        name = _kernel_name(member)
        if name is None:
            continue
        try:
            value = btf.enum_value(name)
        except BtfError:
            out.append(f"consts.{cls.__name__}.{member.name}: the kernel has no {name}")
            continue
        if value != member.value:
            out.append(f"consts.{cls.__name__}.{member.name} = {member.value}, "
                       f"but this kernel's {name} = {value}")
    return out


_ENUMS = sorted((v for v in vars(consts).values()
                 if isinstance(v, type) and issubclass(v, enum.Enum)
                 and v.__module__ == consts.__name__), key=lambda c: c.__name__)


@needs_vmlinux
@pytest.mark.parametrize("cls", _ENUMS, ids=lambda c: c.__name__)
def test_consts_match_kernel(cls: type[enum.Enum]) -> None:
    problems = _mismatches(cls)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("cls", _ENUMS, ids=lambda c: c.__name__)
def test_consts_are_classified(cls: type[enum.Enum]) -> None:
    # A new enum (or member) in consts.py must say how it is checked against the kernel.
    unclassified = [m.name for m in cls
                    if _kernel_name(m) is None and m not in _NOT_IN_BTF and cls not in _NOT_IN_BTF
                    and not (m.value == 0 and issubclass(cls, enum.Flag))]
    assert not unclassified, f"consts.{cls.__name__}: {unclassified} not mapped in test_btf.py"


@needs_vmlinux
def test_helper_names_match_kernel() -> None:
    func_ids = vmlinux().enum_values("bpf_func_id")
    wrong = [f"HELPER_NAMES[{i}] = {name!r}, but this kernel's BPF_FUNC_{name} = "
             f"{func_ids.get('BPF_FUNC_' + name, 'absent')}"
             for i, name in enumerate(consts.HELPER_NAMES) if func_ids.get(f"BPF_FUNC_{name}") != i]
    assert not wrong, "\n".join(wrong)
    assert consts.helper_name(consts.Helper.tail_call) == "tail_call"


@needs_vmlinux
def test_wrong_constant_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    class MapType(enum.IntEnum):
        HASH = 1
        LPM_TRIE = 12  # really 11

    monkeypatch.setitem(_MIRRORED, MapType, "BPF_MAP_TYPE_{}")
    assert _mismatches(MapType) == [
        "consts.MapType.LPM_TRIE = 12, but this kernel's BPF_MAP_TYPE_LPM_TRIE = 11"]


def test_sys_bpf_number() -> None:
    if platform.machine() != "x86_64":
        pytest.skip(f"SYS_BPF is pinned for x86_64, not {platform.machine()}")
    assert consts.SYS_BPF == 321


# --- syscall.py ctypes structs against the kernel -----------------------------------------

# Our names for unions the UAPI declares anonymously: C finds their members directly.
_TRANSPARENT = {(syscall.LinkCreateAttr, "opts"), (syscall.LinkInfo, "u")}


def _leaves(cls: type[ctypes.Structure | ctypes.Union], prefix: str = "",
            base: int = 0) -> list[tuple[str, int, int]]:
    """(dotted path as C would name it, byte offset, size) of each declared field."""
    out = []
    for name, ctype in cls._fields_:
        field = getattr(cls, name)
        if name.startswith("_"):
            continue  # padding and size fillers
        is_aggregate = isinstance(ctype, type) and issubclass(
            ctype, ctypes.Structure | ctypes.Union)
        if is_aggregate and (cls, name) in _TRANSPARENT:
            out += _leaves(ctype, prefix, base + field.offset)
        elif is_aggregate:
            out += _leaves(ctype, f"{prefix}{name}.", base + field.offset)
        else:
            out.append((prefix + name, base + field.offset, field.size))
    return out


def _layout_mismatches(cls: type[ctypes.Structure], btf_struct: str | int) -> list[str]:
    btf, out = vmlinux(), []
    for path, offset, size in _leaves(cls):
        try:
            m = btf.member_offset(btf_struct, path)
        except BtfError as e:
            out.append(f"syscall.{cls.__name__}.{path}: {e}")
            continue
        if (m.offset, m.size) != (offset, size):
            out.append(f"syscall.{cls.__name__}.{path} at {offset} size {size}, "
                       f"but the kernel's is at {m.offset} size {m.size}")
    return out


@needs_vmlinux
@pytest.mark.parametrize(("cls", "btf_struct"), [
    (syscall.ProgInfo, "bpf_prog_info"), (syscall.MapInfo, "bpf_map_info"),
    (syscall.LinkInfo, "bpf_link_info"),
], ids=lambda v: v if isinstance(v, str) else v.__name__)
def test_info_structs_match_kernel(cls: type[ctypes.Structure], btf_struct: str) -> None:
    problems = _layout_mismatches(cls, btf_struct)
    assert not problems, "\n".join(problems)


@needs_vmlinux
def test_wrong_layout_is_named() -> None:
    class LinkInfo(ctypes.Structure):
        _fields_ = [("type", ctypes.c_uint32), ("prog_id", ctypes.c_uint32)]

    assert _layout_mismatches(LinkInfo, "bpf_link_info") == [
        "syscall.LinkInfo.prog_id at 4 size 4, but the kernel's is at 8 size 4"]


# Which struct of `union bpf_attr` each attr class is: a named member, or for the anonymous
# ones a member name only that struct has.
_ATTRS = [
    (syscall.MapCreateAttr, "map_type"), (syscall.MapElemAttr, "key"),
    (syscall.MapBatchAttr, "batch"), (syscall.ProgLoadAttr, "prog_type"),
    (syscall.ObjAttr, "pathname"), (syscall.TestRunAttr, "test"),
    (syscall.GetIdAttr, "start_id"), (syscall.InfoAttr, "info"), (syscall.QueryAttr, "query"),
    (syscall.LinkCreateAttr, "link_create"), (syscall.LinkUpdateAttr, "link_update"),
    (syscall.LinkDetachAttr, "link_detach"), (syscall.ProgBindMapAttr, "prog_bind_map"),
    (syscall.BtfLoadAttr, "btf"),
]


def _bpf_attr_part(key: str) -> int:
    """The type id of the struct inside `union bpf_attr` that `key` identifies."""
    btf = vmlinux()
    union = btf.find("bpf_attr", BtfKind.UNION)
    members = list(btf.members(union))
    for m in members:
        if m.name == key:
            return m.type_id
    for m in members:
        if not m.name and btf.kind(btf.resolve(m.type_id)) == BtfKind.STRUCT:
            try:
                btf.member_offset(m.type_id, key)
            except BtfError:
                continue
            return m.type_id
    raise AssertionError(f"union bpf_attr has no struct with {key!r}")


@needs_vmlinux
@pytest.mark.parametrize(("cls", "key"), _ATTRS, ids=[c.__name__ for c, _ in _ATTRS])
def test_attr_structs_match_kernel(cls: type[ctypes.Structure], key: str) -> None:
    btf = vmlinux()
    part = _bpf_attr_part(key)
    union_size = btf.type_size(btf.find("bpf_attr", BtfKind.UNION))
    assert ctypes.sizeof(cls) <= union_size, (
        f"sizeof(syscall.{cls.__name__}) = {ctypes.sizeof(cls)} > sizeof(union bpf_attr) = "
        f"{union_size}")
    assert ctypes.sizeof(cls) <= btf.type_size(part), (
        f"sizeof(syscall.{cls.__name__}) = {ctypes.sizeof(cls)} > the kernel's "
        f"{btf.type_size(part)}")
    problems = _layout_mismatches(cls, part)
    assert not problems, "\n".join(problems)
