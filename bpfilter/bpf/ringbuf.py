"""Reading a BPF ring buffer map from user space (mmap + epoll), without libbpf.

Layout (kernel/bpf/ringbuf.c): page 0 holds the consumer position (writable by user space),
page 1 the producer position; the data area follows, mapped twice in a row so a record that wraps
around the end reads contiguously. Each record starts with an 8-byte header: u32 length (bit 31:
still being written, bit 30: discarded) and u32 page offset; records are 8-byte aligned.
"""

from __future__ import annotations

import mmap
import os
import select
import struct
from collections.abc import Iterator

from .consts import MapType
from .maps import Map

BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
HDR_SIZE = 8


class RingBuffer:
    """A consumer of one ring buffer map (the map stays owned by the caller)."""

    def __init__(self, m: Map) -> None:
        if m.spec.type != MapType.RINGBUF:
            raise ValueError(f"map {m.spec.name!r} is not a ring buffer")
        self.map = m
        self.size = m.spec.max_entries
        page = mmap.PAGESIZE
        self._cons = mmap.mmap(m.fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                               offset=0)
        self._prod = mmap.mmap(m.fd, page + 2 * self.size, mmap.MAP_SHARED, mmap.PROT_READ,
                               offset=page)
        self._page = page
        self._epoll = select.epoll()
        self._epoll.register(m.fd, select.EPOLLIN)

    def close(self) -> None:
        """Unmap and stop polling."""
        self._epoll.close()
        self._cons.close()
        self._prod.close()

    def __enter__(self) -> RingBuffer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _positions(self) -> tuple[int, int]:
        cons = struct.unpack_from("<Q", self._cons, 0)[0]
        prod = struct.unpack_from("<Q", self._prod, 0)[0]
        return cons, prod

    def drain(self) -> Iterator[bytes]:
        """Every complete record now in the buffer, consuming them."""
        cons, prod = self._positions()
        mask = self.size - 1
        while cons < prod:
            off = self._page + (cons & mask)
            length, _ = struct.unpack_from("<II", self._prod, off)
            if length & BUSY_BIT:
                break
            size = length & ~(BUSY_BIT | DISCARD_BIT)
            if not length & DISCARD_BIT:
                yield bytes(self._prod[off + HDR_SIZE : off + HDR_SIZE + size])
            cons += (size + HDR_SIZE + 7) & ~7
            struct.pack_into("<Q", self._cons, 0, cons)

    def poll(self, timeout: float | None = None) -> list[bytes]:
        """Wait up to `timeout` seconds for records, then return what is there."""
        records = list(self.drain())
        if records:
            return records
        self._epoll.poll(-1 if timeout is None else timeout)
        return list(self.drain())


def ring_size(requested: int) -> int:
    """A valid ring size: a power of two, at least one page."""
    size = max(requested, os.sysconf("SC_PAGE_SIZE"))
    return 1 << (size - 1).bit_length()
