"""BPF maps: create, look up, update, delete, iterate, batch operations, info."""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache

from .consts import Cmd, MapFlags, MapType, UpdateFlags
from .fd import FdObject, fd_by_id, obj_get
from .syscall import (
    BpfError,
    MapBatchAttr,
    MapCreateAttr,
    MapElemAttr,
    MapInfo,
    addr,
    bpf,
    str_c,
)


@cache
def possible_cpus() -> int:
    """Number of possible CPUs: the number of values a per-CPU map holds per key."""
    with open("/sys/devices/system/cpu/possible") as f:
        text = f.read().strip()
    count = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        count += int(hi or lo) - int(lo) + 1
    return count


@dataclass(frozen=True)
class MapSpec:
    """What a map is: enough to create it."""

    type: MapType
    key_size: int
    value_size: int
    max_entries: int
    flags: MapFlags = MapFlags.NONE
    name: str = ""
    inner_map_fd: int = 0
    map_extra: int = 0


class Map(FdObject):
    """A BPF map owned through its fd. Keys and values are bytes of the declared sizes."""

    def __init__(self, fd: int, spec: MapSpec) -> None:
        super().__init__(fd)
        self.spec = spec

    @classmethod
    def create(cls, spec: MapSpec) -> Map:
        """Create a new map."""
        flags = spec.flags
        if spec.type == MapType.LPM_TRIE:
            flags |= MapFlags.NO_PREALLOC  # the kernel requires it for LPM tries
        attr = MapCreateAttr(
            map_type=spec.type, key_size=spec.key_size, value_size=spec.value_size,
            max_entries=spec.max_entries, map_flags=flags, inner_map_fd=spec.inner_map_fd,
            map_name=spec.name.encode()[:15], map_extra=spec.map_extra,
        )
        try:
            fd = bpf(Cmd.MAP_CREATE, attr)
        except BpfError as e:
            raise BpfError(Cmd.MAP_CREATE, e.errno, f"{spec.type.name} map {spec.name!r}") from None
        return cls(fd, spec)

    @classmethod
    def from_fd(cls, fd: int) -> Map:
        """Wrap an fd (taking ownership), reading the map's shape from the kernel."""
        info = MapInfo()
        m = cls(fd, MapSpec(MapType.HASH, 0, 0, 0))
        m._info(info)
        m.spec = MapSpec(MapType(info.type), info.key_size, info.value_size, info.max_entries,
                         MapFlags(info.map_flags), str_c(info.name))
        return m

    @classmethod
    def open_pinned(cls, path: str) -> Map:
        """Open a map pinned in bpffs."""
        return cls.from_fd(obj_get(path))

    @classmethod
    def open_or_create(cls, path: str, spec: MapSpec) -> Map:
        """The map pinned at `path`, or a new one of `spec` pinned there."""
        if os.path.exists(path):
            return cls.open_pinned(path)
        m = cls.create(spec)
        try:
            m.pin(path)
        except Exception:
            m.close()
            raise
        return m

    @classmethod
    def from_id(cls, map_id: int) -> Map:
        """Open a map by its id."""
        return cls.from_fd(fd_by_id(Cmd.MAP_GET_FD_BY_ID, map_id))

    def info(self) -> MapInfo:
        """The kernel's map info (id, type, sizes, name)."""
        return self._info(MapInfo())

    @property
    def id(self) -> int:
        """The map's kernel id."""
        return self.info().id

    # -- element access ------------------------------------------------------------------

    @property
    def _stored_value_size(self) -> int:
        if self.spec.type.per_cpu:
            return ((self.spec.value_size + 7) & ~7) * possible_cpus()
        if self.spec.type in (MapType.PROG_ARRAY, MapType.ARRAY_OF_MAPS, MapType.HASH_OF_MAPS):
            return 4
        return self.spec.value_size

    def _key(self, key: bytes) -> ctypes.Array:
        if len(key) != self.spec.key_size:
            raise ValueError(f"map {self.spec.name!r}: key of {len(key)} bytes, "
                             f"expected {self.spec.key_size}")
        return ctypes.create_string_buffer(key, len(key))

    def lookup(self, key: bytes) -> bytes | None:
        """The value under `key` (all CPUs' values concatenated for per-CPU maps), or None."""
        k = self._key(key)
        v = ctypes.create_string_buffer(self._stored_value_size)
        try:
            bpf(Cmd.MAP_LOOKUP_ELEM, MapElemAttr(map_fd=self.fd, key=addr(k), value=addr(v)))
        except BpfError as e:
            if e.errno == errno.ENOENT:
                return None
            raise
        return v.raw

    def lookup_percpu(self, key: bytes) -> list[bytes] | None:
        """The per-CPU values under `key`, one per possible CPU."""
        raw = self.lookup(key)
        if raw is None:
            return None
        step = (self.spec.value_size + 7) & ~7
        return [raw[i : i + self.spec.value_size] for i in range(0, len(raw), step)]

    def update(self, key: bytes, value: bytes, flags: UpdateFlags = UpdateFlags.ANY) -> None:
        """Set `key` to `value` (for per-CPU maps a value per CPU, or one value for all)."""
        k = self._key(key)
        size = self._stored_value_size
        if self.spec.type.per_cpu and len(value) == self.spec.value_size:
            step = (self.spec.value_size + 7) & ~7
            value = (value.ljust(step, b"\0")) * possible_cpus()
        if len(value) != size:
            raise ValueError(f"map {self.spec.name!r}: value of {len(value)} bytes, "
                             f"expected {size}")
        v = ctypes.create_string_buffer(value, size)
        bpf(Cmd.MAP_UPDATE_ELEM,
            MapElemAttr(map_fd=self.fd, key=addr(k), value=addr(v), flags=flags))

    def delete(self, key: bytes) -> bool:
        """Remove `key`; False if it was not there."""
        k = self._key(key)
        try:
            bpf(Cmd.MAP_DELETE_ELEM, MapElemAttr(map_fd=self.fd, key=addr(k)))
        except BpfError as e:
            if e.errno == errno.ENOENT:
                return False
            raise
        return True

    def next_key(self, key: bytes | None) -> bytes | None:
        """The key after `key` (the first key for None), or None at the end."""
        nxt = ctypes.create_string_buffer(self.spec.key_size)
        k = self._key(key) if key is not None else None
        try:
            bpf(Cmd.MAP_GET_NEXT_KEY, MapElemAttr(map_fd=self.fd, key=addr(k), value=addr(nxt)))
        except BpfError as e:
            if e.errno == errno.ENOENT:
                return None
            raise
        return nxt.raw

    def keys(self) -> Iterator[bytes]:
        """All keys (a snapshot may miss concurrent changes)."""
        key = self.next_key(None)
        while key is not None:
            yield key
            key = self.next_key(key)

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """All (key, value) pairs."""
        for key in self.keys():
            value = self.lookup(key)
            if value is not None:
                yield key, value

    # -- batch operations ----------------------------------------------------------------

    def update_batch(self, pairs: list[tuple[bytes, bytes]],
                     flags: UpdateFlags = UpdateFlags.ANY) -> int:
        """Set many elements in one call; returns how many were written."""
        if not pairs:
            return 0
        ks = b"".join(k for k, _ in pairs)
        vs = b"".join(v for _, v in pairs)
        if len(ks) != len(pairs) * self.spec.key_size:
            raise ValueError(f"map {self.spec.name!r}: a key has the wrong size")
        if len(vs) != len(pairs) * self._stored_value_size:
            raise ValueError(f"map {self.spec.name!r}: a value has the wrong size")
        kb = ctypes.create_string_buffer(ks, len(ks))
        vb = ctypes.create_string_buffer(vs, len(vs))
        attr = MapBatchAttr(keys=addr(kb), values=addr(vb), count=len(pairs), map_fd=self.fd,
                            elem_flags=flags)
        bpf(Cmd.MAP_UPDATE_BATCH, attr)
        return attr.count

    def lookup_batch(self, chunk: int = 256) -> list[tuple[bytes, bytes]]:
        """All elements, read `chunk` at a time with BPF_MAP_LOOKUP_BATCH."""
        out: list[tuple[bytes, bytes]] = []
        ksz, vsz = self.spec.key_size, self._stored_value_size
        # Hash maps use a u32 bucket cursor; arrays their key: 8 bytes covers both.
        in_b, out_b = ctypes.create_string_buffer(8), ctypes.create_string_buffer(8)
        first = True
        while True:
            kb = ctypes.create_string_buffer(ksz * chunk)
            vb = ctypes.create_string_buffer(vsz * chunk)
            attr = MapBatchAttr(in_batch=0 if first else addr(in_b), out_batch=addr(out_b),
                                keys=addr(kb), values=addr(vb), count=chunk, map_fd=self.fd)
            done = False
            try:
                bpf(Cmd.MAP_LOOKUP_BATCH, attr)
            except BpfError as e:
                if e.errno != errno.ENOENT:
                    raise
                done = True
            for i in range(attr.count):
                out.append((kb.raw[i * ksz : (i + 1) * ksz], vb.raw[i * vsz : (i + 1) * vsz]))
            if done:
                return out
            ctypes.memmove(in_b, out_b, 8)
            first = False

    def delete_batch(self, keys: list[bytes]) -> int:
        """Remove many keys in one call; returns how many were removed."""
        if not keys:
            return 0
        ks = b"".join(keys)
        kb = ctypes.create_string_buffer(ks, len(ks))
        attr = MapBatchAttr(keys=addr(kb), count=len(keys), map_fd=self.fd)
        bpf(Cmd.MAP_DELETE_BATCH, attr)
        return attr.count

    def clear(self) -> None:
        """Delete every key (arrays cannot shrink: their values are zeroed instead)."""
        if self.spec.type in (MapType.ARRAY, MapType.PERCPU_ARRAY):
            zero = bytes(self.spec.value_size)
            for i in range(self.spec.max_entries):
                self.update(i.to_bytes(4, "little"), zero)
            return
        for key in list(self.keys()):
            self.delete(key)

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self._fd}"
        return f"<Map {self.spec.name!r} {self.spec.type.name} {state}>"


def lpm_key(prefixlen: int, data: bytes) -> bytes:
    """An LPM trie key: u32 prefix length (host order) then the address bytes."""
    return prefixlen.to_bytes(4, "little") + data


def u32(value: int) -> bytes:
    """A u32 key in host order (array indices)."""
    return value.to_bytes(4, "little")


def host_is_little_endian() -> bool:
    """Keys are in host byte order; this project targets x86_64."""
    return os.sys.byteorder == "little"
