"""Lowering of -m hashlimit and -m recent to state-table predicates (see bpfilter.ir.state)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ..ir.model import Family
from ..ir.pred import Pred
from ..ir.state import HashLimit, HashLimitCfg, Recent
from .registry import Context, MatchError, Unsupported

if TYPE_CHECKING:
    from .ratelimit import HashlimitMatch, RecentMatch

HASHLIMIT_SCALE = 1_000_000  # XT_HASHLIMIT_SCALE_v2: the rate's period is in microseconds
HASHLIMIT_MAX_SIZE = 1 << 20  # HASHLIMIT_MAX_SIZE: size and max are truncated to it
MAX_STAMPS = 256  # timestamps per recent entry we keep at most (hitcount up to 256)


def default_htable_size() -> int:
    """htable_create's bucket count when --hashlimit-htable-size is 0 (from the RAM size)."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 8192
    return max(16, min(8192, ram // 16384 // 8))  # bytes / 16384 / sizeof(struct hlist_head)


def lower_hashlimit(p: HashlimitMatch, ctx: Context) -> Pred:
    """The rule's hashlimit as a HashLimit predicate (its table's configuration resolved later)."""
    if p.rate_match:
        raise Unsupported("hashlimit --hashlimit-rate-match")
    width = 32 if ctx.family is Family.IPV4 else 128
    from .ratelimit import format_rate  # here: ratelimit imports this module

    if p.bytes_mode:
        interval, burst = _byte_rate(p.rate, p.burst)
        quantum = 30000 if p.burst else 15000  # what iptables makes the default expiry
    else:
        interval, burst = p.rate * (1_000_000_000 // HASHLIMIT_SCALE), p.burst
        quantum = format_rate(p.rate, HASHLIMIT_SCALE)[1]
    expire = p.expire if p.expire is not None else quantum
    if expire == 0 or p.gcinterval == 0:
        raise MatchError("hashlimit: --hashlimit-htable-expire and -gcinterval must not be 0",
                         "hashlimit")
    size = min(p.size, HASHLIMIT_MAX_SIZE) or default_htable_size()
    max_entries = min(p.max, HASHLIMIT_MAX_SIZE) or 8 * size
    cfg = HashLimitCfg(p.modes, width if p.srcmask is None else p.srcmask,
                       width if p.dstmask is None else p.dstmask,
                       interval, burst, expire, max_entries, p.bytes_mode)
    return HashLimit(p.name, p.above, cfg)


def _byte_rate(rate: int, burst: int) -> tuple[int, int]:
    """Byte mode as the kernel holds it: (nanoseconds of credit one 16-byte chunk costs, how
    many times an empty bucket may be refilled whole). libxt_hashlimit passes the rate as a
    cost (U32_MAX / chunks per second) and the burst in whole rates, rounded up."""
    u32 = 0xFFFFFFFF
    cost = u32 // ((rate >> 4) + 1)
    rounded = ((u32 // cost) - 1) << 4  # the rate the kernel reports
    chunk_ns = cost * 1_000_000_000 >> 32
    if chunk_ns == 0:
        raise MatchError(f"hashlimit: rate too high: {rate}b/s", str(rate))
    if burst and burst < rounded:
        raise MatchError(f"hashlimit: burst cannot be smaller than {rounded}b", str(burst))
    return chunk_ns, -(-burst // rounded) if burst else 0


def lower_recent(p: RecentMatch, ctx: Context) -> Pred:
    """The rule's recent as a Recent predicate (the list's mask and size resolved later)."""
    if p.reap:
        raise Unsupported("recent --reap", " (it removes the list's least recently seen "
                          "entry, which a BPF LRU hash cannot name)")
    if p.hitcount > MAX_STAMPS:
        raise Unsupported(f"recent --hitcount above {MAX_STAMPS}")
    return Recent(p.name, p.mode, p.invert, p.seconds, p.hitcount, p.rttl, p.rdest, p.mask)
