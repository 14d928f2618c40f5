"""How a named set becomes a BPF map: its key layout, and members ↔ key/value bytes.

A set without a network dimension is a hash map keyed by the member itself; with one, an LPM
trie whose key holds the exact dimensions first and the network last, so the longest stored
prefix among members agreeing on the exact part answers (as ipset's hash:net searches its
prefix lengths from the longest). Key parts, in dimension order:

    ip / net    the address (4 or 16 bytes, network order)
    port        port (2 bytes, network order; ICMP: type, code), protocol (1 byte), 1 pad byte
                bitmap:port: the port only (2 bytes)

The value is one byte of flags: `NOMATCH` marks ipset's `nomatch` members. The runtime
(`bpfilter set add`) and the code generator both use this module, so they cannot disagree.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from functools import cache

from ..bpf.consts import MapFlags, MapType
from ..bpf.maps import MapSpec
from ..ir.sets import Dim, IpSet, Part, Parts, SetDef

NOMATCH = 0x01
VALUE_SIZE = 1
PORT_PART = 4  # port, protocol, pad


@dataclass(frozen=True)
class KeyPart:
    """Where one dimension sits in the key data (after the LPM prefix length, if any)."""

    dim: Dim
    offset: int
    size: int


@dataclass(frozen=True)
class Layout:
    """A set's key layout."""

    lpm: bool
    parts: tuple[KeyPart, ...]  # in dimension order
    data_size: int

    @property
    def key_size(self) -> int:
        """Bytes of a key, the LPM prefix length word included."""
        return self.data_size + (4 if self.lpm else 0)

    @property
    def data_offset(self) -> int:
        """Where the dimensions start in a key."""
        return 4 if self.lpm else 0


def _size(d: SetDef, dim: Dim) -> int:
    if dim is Dim.PORT:
        return 2 if d.type.port_only else PORT_PART
    return d.addr_len


@cache
def layout(d: SetDef) -> Layout:
    """The key layout of set `d`."""
    dims = d.type.dims
    order = [i for i, x in enumerate(dims) if x is not Dim.NET] + \
            [i for i, x in enumerate(dims) if x is Dim.NET]
    offsets: dict[int, int] = {}
    pos = 0
    for i in order:
        offsets[i] = pos
        pos += _size(d, dims[i])
    parts = tuple(KeyPart(dim, offsets[i], _size(d, dim)) for i, dim in enumerate(dims))
    return Layout(d.type.has_net, parts, pos)


def map_name(d: SetDef) -> str:
    """A kernel map name for the set (15 characters of [A-Za-z0-9_.])."""
    clean = "".join(c if c.isascii() and (c.isalnum() or c in "_.") else "_" for c in d.name)
    return ("set_" + clean)[:15]


def map_spec(d: SetDef) -> MapSpec:
    """The map that holds set `d`'s members."""
    lay = layout(d)
    kind = MapType.LPM_TRIE if lay.lpm else MapType.HASH
    return MapSpec(kind, lay.key_size, VALUE_SIZE, d.capacity(), MapFlags.NO_PREALLOC,
                   name=map_name(d))


def encode(d: SetDef, parts: Parts, nomatch: bool = False) -> tuple[bytes, bytes]:
    """The (key, value) a member is stored under."""
    lay = layout(d)
    data = bytearray(lay.data_size)
    plen = 8 * lay.data_size
    for kp, part in zip(lay.parts, parts, strict=True):
        if kp.dim is Dim.IP:
            raw = part
        elif kp.dim is Dim.NET:
            raw, cidr = part  # type: ignore[misc]
            plen = 8 * kp.offset + cidr
        elif d.type.port_only:
            raw = part[1].to_bytes(2, "big")  # type: ignore[index]
        else:
            proto, port = part  # type: ignore[misc]
            raw = port.to_bytes(2, "big") + bytes((proto, 0))
        data[kp.offset:kp.offset + kp.size] = raw  # type: ignore[assignment]
    key = (plen.to_bytes(4, "little") if lay.lpm else b"") + bytes(data)
    return key, bytes((NOMATCH if nomatch else 0,))


def decode(d: SetDef, key: bytes, value: bytes) -> tuple[Parts, bool]:
    """The member stored under `key` (inverse of `encode`)."""
    lay = layout(d)
    data = key[lay.data_offset:]
    plen = int.from_bytes(key[:4], "little") if lay.lpm else 0
    out: list[Part] = []
    for kp in lay.parts:
        raw = data[kp.offset:kp.offset + kp.size]
        if kp.dim is Dim.IP:
            out.append(bytes(raw))
        elif kp.dim is Dim.NET:
            out.append((bytes(raw), plen - 8 * kp.offset))
        elif d.type.port_only:
            out.append((0, int.from_bytes(raw, "big")))
        else:
            out.append((raw[2], int.from_bytes(raw[:2], "big")))
    return tuple(out), bool(value[0] & NOMATCH)


def contents(s: IpSet) -> list[tuple[bytes, bytes]]:
    """Every member of `s` as (key, value) pairs."""
    d = s.definition
    return [encode(d, parts, nm) for parts, nm in s.members.items()]


def set_map_key(d: SetDef) -> tuple[str, str]:
    """The key a set's map has in a table's maps."""
    return ("set", d.name)


def initial_data(sets: Mapping[str, IpSet],
                 keys: Iterable[Hashable]) -> dict[Hashable, list[tuple[bytes, bytes]]]:
    """The members of every set map among `keys` (to fill maps made from scratch)."""
    out: dict[Hashable, list[tuple[bytes, bytes]]] = {}
    for k in keys:
        if isinstance(k, tuple) and len(k) == 2 and k[0] == "set" and k[1] in sets:
            out[k] = contents(sets[k[1]])
    return out
