"""Predicates over named state tables that packets update: xt_hashlimit and xt_recent.

A table is shared by every rule of the ruleset that names it (per family, as in the kernel).
Lowering gives each predicate the rule's own view; the compiler replaces the table-wide parts
(`HashLimit.cfg`, `Recent.mask`, `Recent.nstamps`) with what the kernel's table has: the
configuration of the first rule naming the table, and the most timestamps any rule needs.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HashLimitCfg:
    """The configuration a hashlimit table is created with (xt_hashlimit's hinfo->cfg).

    `modes` are the key parts (srcip, srcport, dstip, dstport); `srcmask`/`dstmask` prefix
    lengths; `interval_ns` the time one packet's credit takes to come back; `burst` packets;
    `expire_ms` how long an idle bucket is kept; `max_entries` buckets at most. With
    `bytes_mode`, a bucket holds one second of credit: `interval_ns` is what a 16-byte chunk
    of a packet costs and `burst` how often an empty bucket may be refilled whole.
    """

    modes: tuple[str, ...]
    srcmask: int
    dstmask: int
    interval_ns: int
    burst: int
    expire_ms: int
    max_entries: int
    bytes_mode: bool = False


@dataclass(frozen=True)
class HashLimit:
    """xt_hashlimit: the packet's bucket in table `name` has credit left (taking it); with
    `above`, the opposite (an over-limit packet takes nothing)."""

    name: str
    above: bool
    cfg: HashLimitCfg


@dataclass(frozen=True)
class Recent:
    """xt_recent: `mode` (set, rcheck, update, remove) on list `name`, keyed by the source
    (or with `rdest` the destination) address under the list's `mask`. `seconds`, `hitcount`
    and `rttl` refine rcheck and update; `invert` is the rule's `!`. `nstamps` is how many
    timestamps an entry of the list keeps (a power of two); `ttl_used` whether any rule of
    the list compares TTLs (then every rule stores them)."""

    name: str
    mode: str
    invert: bool
    seconds: int
    hitcount: int
    rttl: bool
    rdest: bool
    mask: bytes
    nstamps: int = 32
    ttl_used: bool = False


@dataclass(frozen=True)
class Connlimit:
    """xt_connlimit: the number of connections conntrack holds for the packet's address group
    (its source, or with `daddr` its destination, under `mask`), the packet's own included,
    is above `limit` (or, without `above`, up to it). `hook` is the flavour compiled for (nf,
    tc, xdp: how a remembered connection is found alive); `rule` names the rule's own list of
    remembered connections (every rule has its own, as every xt_connlimit match does) and
    `slots` how many connections a group remembers; both are set by the compiler."""

    limit: int
    above: bool
    mask: bytes
    daddr: bool
    hook: str = "nf"
    rule: str = ""
    slots: int = 0
