"""A reader of raw BTF, the kernel's type information (/sys/kernel/btf/vmlinux).

The code generator needs a few facts that differ between kernel builds: member offsets of
kernel structs (`sk_buff`, `nf_hook_state`, ...), the BTF ids of kfuncs, and enum values. They
are read here instead of being hard-coded. Parsing only records where each type record starts;
names, members and enumerators are decoded on demand, so loading vmlinux BTF stays cheap.
"""

from __future__ import annotations

import functools
import struct
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

VMLINUX = Path("/sys/kernel/btf/vmlinux")
BTF_MAGIC = 0xEB9F
POINTER_SIZE = 8  # vmlinux BTF of a 64-bit kernel

_HEADER = struct.Struct("<HBBIIIII")
_U32 = struct.Struct("<I")
_TRIPLE = struct.Struct("<III")  # btf_type; also btf_member, btf_array, btf_enum64, datasec var
_PAIR = struct.Struct("<Ii")  # btf_enum (value signed or not per kflag), btf_param


class BtfKind(IntEnum):
    """BTF type kinds (BTF_KIND_*, include/uapi/linux/btf.h)."""

    UNKN = 0  # also "void" as type id 0
    INT = 1
    PTR = 2
    ARRAY = 3
    STRUCT = 4
    UNION = 5
    ENUM = 6
    FWD = 7
    TYPEDEF = 8
    VOLATILE = 9
    CONST = 10
    RESTRICT = 11
    FUNC = 12
    FUNC_PROTO = 13
    VAR = 14
    DATASEC = 15
    FLOAT = 16
    DECL_TAG = 17
    TYPE_TAG = 18
    ENUM64 = 19


# Bytes of kind-specific data after a btf_type: a fixed part plus a part per `vlen` entry.
_FIXED_EXTRA = {BtfKind.INT: 4, BtfKind.ARRAY: 12, BtfKind.VAR: 4, BtfKind.DECL_TAG: 4}
_PER_VLEN = {BtfKind.STRUCT: 12, BtfKind.UNION: 12, BtfKind.ENUM: 8, BtfKind.FUNC_PROTO: 8,
             BtfKind.DATASEC: 12, BtfKind.ENUM64: 12}
_FIXED_TAB = tuple(_FIXED_EXTRA.get(k, 0) for k in range(32))
_VLEN_TAB = tuple(_PER_VLEN.get(k, 0) for k in range(32))

# Kinds that only qualify or rename another type; sizes and members are looked up through them.
_MODIFIERS = frozenset({BtfKind.TYPEDEF, BtfKind.VOLATILE, BtfKind.CONST, BtfKind.RESTRICT,
                        BtfKind.TYPE_TAG})
_SIZED = frozenset({BtfKind.INT, BtfKind.STRUCT, BtfKind.UNION, BtfKind.ENUM, BtfKind.ENUM64,
                    BtfKind.FLOAT, BtfKind.DATASEC})
_COMPOSITE = (BtfKind.STRUCT, BtfKind.UNION)


class BtfError(KeyError):
    """A name, member or type is absent from the BTF, or the blob is malformed."""

    def __str__(self) -> str:
        # KeyError would print the message quoted, like a dict key.
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Member:
    """One member of a struct or union, as declared (offsets relative to that struct)."""

    name: str  # "" for an anonymous struct/union member
    type_id: int
    bit_offset: int
    bit_size: int  # 0 unless a bitfield


@dataclass(frozen=True)
class MemberInfo:
    """Where a member lives inside the outermost struct it was looked up from."""

    path: str
    type_id: int  # the member's declared type (may be a typedef)
    offset: int  # bytes; for a bitfield, the byte holding its first bit
    size: int  # bytes of the member's type, resolved through typedefs and qualifiers
    bit_offset: int  # bits from the start of the outermost struct
    bit_size: int  # 0 unless a bitfield

    @property
    def is_bitfield(self) -> bool:
        """True when the member is a bitfield (read it with a shift and a mask)."""
        return self.bit_size != 0


class Btf:
    """A parsed BTF blob; type ids index `kind`, `type_name`, `type_size`, `members`, ..."""

    def __init__(self, data: bytes) -> None:
        if len(data) < _HEADER.size:
            raise BtfError("BTF blob too short for a header")
        magic, version, _flags, hdr_len, type_off, type_len, str_off, str_len = (
            _HEADER.unpack_from(data, 0))
        if magic != BTF_MAGIC:
            raise BtfError(f"bad BTF magic {magic:#x} (big-endian BTF is not supported)")
        if version != 1:
            raise BtfError(f"unsupported BTF version {version}")
        self._data = data
        self._str_base = hdr_len + str_off
        self._str_end = self._str_base + str_len
        types_base = hdr_len + type_off
        if types_base + type_len > len(data) or self._str_end > len(data):
            raise BtfError("BTF sections run past the end of the blob")
        # Index 0 is void, which has no record.
        self._pos = array("I", [0])
        self._index_types(types_base, types_base + type_len)
        self._names: dict[str, list[int]] | None = None
        self._enumerators_index: dict[str, int] | None = None

    @classmethod
    def load(cls, path: str | Path = VMLINUX) -> Btf:
        """Read and parse a raw BTF file (by default the running kernel's)."""
        return cls(Path(path).read_bytes())

    def _index_types(self, pos: int, end: int) -> None:
        """Record where each type record starts; only `info` is decoded here."""
        data, unpack, positions = self._data, _U32.unpack_from, self._pos
        fixed, per_vlen, append = _FIXED_TAB, _VLEN_TAB, positions.append
        while pos < end:
            append(pos)
            info = unpack(data, pos + 4)[0]
            kind = (info >> 24) & 0x1F
            pos += 12 + fixed[kind] + per_vlen[kind] * (info & 0xFFFF)
        if pos != end:
            raise BtfError("BTF type section ends inside a type record")

    # --- raw access ------------------------------------------------------------------------

    def __len__(self) -> int:
        """Number of type ids, counting void (id 0)."""
        return len(self._pos)

    def _record(self, type_id: int) -> tuple[int, int, int]:
        """(name_off, info, size_or_type) of a type."""
        if not 0 < type_id < len(self._pos):
            raise BtfError(f"BTF type id {type_id} out of range")
        return _TRIPLE.unpack_from(self._data, self._pos[type_id])

    def _str(self, off: int) -> str:
        start = self._str_base + off
        if start >= self._str_end:
            raise BtfError(f"BTF string offset {off} out of range")
        return self._data[start:self._data.index(b"\0", start)].decode()

    def kind(self, type_id: int) -> BtfKind:
        """The kind of a type (UNKN for void, id 0)."""
        if type_id == 0:
            return BtfKind.UNKN
        return BtfKind((self._record(type_id)[1] >> 24) & 0x1F)

    def type_name(self, type_id: int) -> str:
        """The name of a type ("" when anonymous, "void" for id 0)."""
        if type_id == 0:
            return "void"
        return self._str(self._record(type_id)[0])

    def ref_type(self, type_id: int) -> int:
        """The type a PTR, modifier, TYPEDEF, FUNC, VAR or DECL_TAG refers to."""
        return self._record(type_id)[2]

    def resolve(self, type_id: int) -> int:
        """Strip typedefs and qualifiers (const, volatile, restrict, type tags)."""
        while type_id and self.kind(type_id) in _MODIFIERS:
            type_id = self.ref_type(type_id)
        return type_id

    def type_size(self, type_id: int) -> int:
        """Size in bytes of a type, through typedefs and qualifiers; arrays multiply out."""
        type_id = self.resolve(type_id)
        kind = self.kind(type_id)
        if kind in _SIZED:
            return self._record(type_id)[2]
        if kind == BtfKind.PTR:
            return POINTER_SIZE
        if kind == BtfKind.ARRAY:
            elem, _index, nelems = self._array(type_id)
            return nelems * self.type_size(elem)
        raise BtfError(f"BTF type {type_id} ({kind.name} {self.type_name(type_id)!r}) "
                       "has no size")

    def _array(self, type_id: int) -> tuple[int, int, int]:
        """(element type, index type, number of elements) of an ARRAY."""
        return _TRIPLE.unpack_from(self._data, self._pos[type_id] + 12)

    def _int_encoding(self, type_id: int) -> tuple[int, int]:
        """(bit offset, bits) of an INT, as stored after its btf_type."""
        word = _U32.unpack_from(self._data, self._pos[type_id] + 12)[0]
        return (word >> 16) & 0xFF, word & 0xFF

    # --- lookups by name ---------------------------------------------------------------------

    def _name_index(self) -> dict[str, list[int]]:
        if self._names is None:
            names: dict[str, list[int]] = {}
            data, pos, base = self._data, self._pos, self._str_base
            unpack = _U32.unpack_from
            for type_id in range(1, len(pos)):
                off = unpack(data, pos[type_id])[0]
                if off:
                    start = base + off
                    name = data[start:data.index(b"\0", start)].decode()
                    names.setdefault(name, []).append(type_id)
            self._names = names
        return self._names

    def ids_named(self, name: str) -> list[int]:
        """All type ids with this name, of any kind, in id order."""
        return list(self._name_index().get(name, ()))

    def find(self, name: str, kind: BtfKind) -> int:
        """The id of the first type called `name` of `kind`, or raise `BtfError`."""
        for type_id in self._name_index().get(name, ()):
            if self.kind(type_id) == kind:
                return type_id
        raise BtfError(f"no BTF {kind.name} named {name!r}")

    def func_id(self, name: str) -> int:
        """The BTF id of a kernel function (kfuncs are called by this id)."""
        return self.find(name, BtfKind.FUNC)

    def _composite(self, name: str) -> int:
        """A struct by name, else a union by name."""
        for type_id in self._name_index().get(name, ()):
            if self.kind(type_id) in _COMPOSITE:
                return type_id
        raise BtfError(f"no BTF struct or union named {name!r}")

    # --- structs and unions ------------------------------------------------------------------

    def members(self, type_id: int) -> Iterator[Member]:
        """The members of a struct or union, in declaration order."""
        type_id = self.resolve(type_id)
        _name_off, info, _size = self._record(type_id)
        kind = (info >> 24) & 0x1F
        if kind not in _COMPOSITE:
            raise BtfError(f"BTF type {type_id} ({self.type_name(type_id)!r}) is a "
                           f"{BtfKind(kind).name}, not a struct or union")
        kflag = info >> 31
        pos = self._pos[type_id] + 12
        for i in range(info & 0xFFFF):
            name_off, mtype, offset = _TRIPLE.unpack_from(self._data, pos + 12 * i)
            if kflag:
                bit_offset, bit_size = offset & 0xFFFFFF, offset >> 24
            else:
                # Without kflag a bitfield shows as an INT whose encoding holds its width.
                bit_offset, bit_size = offset, 0
                target = self.resolve(mtype)
                if self.kind(target) == BtfKind.INT:
                    int_off, bits = self._int_encoding(target)
                    if int_off or bits != 8 * self._record(target)[2]:
                        bit_offset, bit_size = offset + int_off, bits
            yield Member(self._str(name_off), mtype, bit_offset, bit_size)

    def _lookup_member(self, type_id: int, name: str) -> tuple[Member, int] | None:
        """A member by name, looking inside anonymous members; with its bit offset."""
        for m in self.members(type_id):
            if m.name == name:
                return m, m.bit_offset
            if not m.name and self.kind(self.resolve(m.type_id)) in _COMPOSITE:
                found = self._lookup_member(m.type_id, name)
                if found is not None:
                    return found[0], m.bit_offset + found[1]
        return None

    def member_offset(self, struct_name: str | int, member_path: str) -> MemberInfo:
        """Offset and size of `member_path` (dotted for nested members) in a struct or union.

        `struct_name` is a struct/union name or a type id. Anonymous structs and unions are
        searched transparently, as C does.
        """
        type_id = self._composite(struct_name) if isinstance(struct_name, str) else struct_name
        bits = 0
        member: Member | None = None
        for part in member_path.split("."):
            if member is not None:
                type_id = member.type_id
            if self.kind(self.resolve(type_id)) not in _COMPOSITE:
                raise BtfError(f"{member_path!r}: {part!r} is not inside a struct or union")
            found = self._lookup_member(type_id, part)
            if found is None:
                raise BtfError(f"struct {self.type_name(self.resolve(type_id))!r} has no "
                               f"member {part!r} (looking up {member_path!r})")
            member, rel_bits = found
            bits += rel_bits
        assert member is not None
        return MemberInfo(path=member_path, type_id=member.type_id, offset=bits // 8,
                          size=self.type_size(member.type_id), bit_offset=bits,
                          bit_size=member.bit_size)

    # --- enums -------------------------------------------------------------------------------

    def _enumerators(self, type_id: int) -> Iterator[tuple[str, int]]:
        _name_off, info, _size = self._record(type_id)
        kind, signed, pos = (info >> 24) & 0x1F, info >> 31, self._pos[type_id] + 12
        for i in range(info & 0xFFFF):
            if kind == BtfKind.ENUM:
                name_off, value = _PAIR.unpack_from(self._data, pos + 8 * i)
                if not signed:
                    value &= 0xFFFFFFFF
            else:
                name_off, lo, hi = _TRIPLE.unpack_from(self._data, pos + 12 * i)
                value = hi << 32 | lo
                if signed and value >> 63:
                    value -= 1 << 64
            yield self._str(name_off), value

    def enum_values(self, enum_name: str) -> dict[str, int]:
        """Enumerators of a named enum (ENUM or ENUM64), in declaration order."""
        for type_id in self._name_index().get(enum_name, ()):
            if self.kind(type_id) in (BtfKind.ENUM, BtfKind.ENUM64):
                return dict(self._enumerators(type_id))
        raise BtfError(f"no BTF enum named {enum_name!r}")

    def enum_value(self, enumerator: str) -> int:
        """The value of an enumerator of any enum, named or anonymous (first one found)."""
        if self._enumerators_index is None:
            index: dict[str, int] = {}
            for type_id in range(1, len(self._pos)):
                if self.kind(type_id) in (BtfKind.ENUM, BtfKind.ENUM64):
                    for name, value in self._enumerators(type_id):
                        index.setdefault(name, value)
            self._enumerators_index = index
        try:
            return self._enumerators_index[enumerator]
        except KeyError:
            raise BtfError(f"no BTF enumerator named {enumerator!r}") from None


@functools.cache
def vmlinux() -> Btf:
    """The running kernel's BTF, parsed once per process."""
    return Btf.load(VMLINUX)


__all__ = ["Btf", "BtfError", "BtfKind", "Member", "MemberInfo", "vmlinux"]
