"""nftables named sets → the IR's named sets (ipset types), and `@name` lookups → `-m set`.

A named set becomes an `IpSet` of the ruleset of each family that may use it, so it is pinned,
kept across restores and changed with `bpfilter set` like a set from ipset text:

    ipv4_addr / ipv6_addr                         hash:ip (hash:net with `flags interval`)
    inet_service                                  bitmap:port (range 0-65535, both families)
    ipv4_addr . inet_service                      hash:ip,port (hash:net,port with interval)
    ipv4_addr . inet_service . ipv4_addr          hash:ip,port,ip

ipset's port dimension carries a protocol and nft's does not (`ip daddr . udp dport @s` takes
the protocol from the lookup): each element is stored for TCP and for UDP, and the rule's own
`-p` picks the one a packet can meet. Address ranges become the fewest prefixes covering them
(an interval set's elements never overlap, so longest-prefix lookup answers membership); port
ranges become their ports. Anything an ipset type cannot hold is refused by name.

A restore replaces the members of each set with the listing's (`IpSet.replace`), as loading the
ruleset with `nft -f` does: elements added at run time with `bpfilter set add` last until then.
"""

from __future__ import annotations

import ipaddress
import itertools
from dataclasses import dataclass
from typing import Any

from ...ir.model import Family, Origin
from ...ir.sets import DEFAULT_MAXELEM, MAX_NAME, SET_TYPES, IpSet, Part, Parts, SetDef
from .errors import Unsupported
from .exprs import Cond, Piece

V4, V6 = Family.IPV4, Family.IPV6
ADDR_TYPES = {"ipv4_addr": V4, "ipv6_addr": V6}
PORT_TYPE = "inet_service"
TCP, UDP = 6, 17
MAX_MEMBERS = 1 << 20  # members one set may expand to (ranges of ports and addresses)
# Set object fields that change nothing a packet sees (handle, hash policy, comment).
NEUTRAL_FIELDS = ("family", "name", "table", "type", "handle", "flags", "elem", "size",
                  "policy", "comment", "auto-merge")
FLAGS_OK = ("interval", "constant")
FLAG_WHY = {"timeout": "elements with timeouts", "dynamic": "sets updated from the packet path",
            "eval": "sets updated from the packet path"}
FIELD_WHY = {"timeout": "elements with timeouts", "gc-interval": "elements with timeouts",
             "stmt": "statements on elements (counters, quotas)", "map": "maps",
             "typeof": "typeof declarations"}


@dataclass(frozen=True)
class NftSet:
    """A named set of one table: its IR set and the nft key types it was declared with."""

    ipset: IpSet
    types: tuple[str, ...]


def _types(body: dict) -> tuple[str, ...]:
    t = body.get("type")
    types = tuple(t) if isinstance(t, list) else (t,)
    for x in types:
        if x not in ADDR_TYPES and x != PORT_TYPE:
            raise Unsupported(f"set type {x!r} has no ipset equivalent (ipv4_addr, ipv6_addr, "
                              "inet_service and their concatenations are supported)", str(x))
    return types


def read_set(body: dict, origin: Origin) -> NftSet:
    """A `set` object → NftSet; raises Unsupported naming the field or value refused."""
    name = body.get("name")
    if not isinstance(name, str) or not name:
        raise Unsupported(f"set name {name!r} is not supported", str(name))
    for key in body:
        if key not in NEUTRAL_FIELDS:
            why = FIELD_WHY.get(key, f"the field '{key}'")
            raise Unsupported(f"set {name}: {why} are not supported", key)
    if len(name) > MAX_NAME:
        raise Unsupported(f"set {name}: names longer than {MAX_NAME} characters are not "
                          "supported (an ipset name)", name)
    flags = body.get("flags", [])
    for f in flags if isinstance(flags, list) else [flags]:
        if f not in FLAGS_OK:
            why = FLAG_WHY.get(f, f"flags {f}")
            raise Unsupported(f"set {name}: {why} are not supported", str(f))
    interval = "interval" in (flags if isinstance(flags, list) else [flags])
    types = _types(body)
    fams = {ADDR_TYPES[t] for t in types if t in ADDR_TYPES}
    if len(fams) > 1:
        raise Unsupported(f"set {name}: IPv4 and IPv6 addresses in one key are not supported",
                          "type")
    if types == (PORT_TYPE,):
        tname, family, rng = "bitmap:port", None, (0, 0xFFFF)
    else:
        dims = ["net" if t in ADDR_TYPES and interval else "ip" if t in ADDR_TYPES else "port"
                for t in types]
        tname, family, rng = "hash:" + ",".join(dims), next(iter(fams), None), None
        if tname not in SET_TYPES:
            shown = " . ".join(types) + (" flags interval" if interval else "")
            raise Unsupported(f"set {name}: type {shown} has no ipset equivalent", tname)
    probe = SetDef(name, SET_TYPES[tname], family, range=rng)
    elems = body.get("elem", [])
    members: list[Parts] = []
    for e in elems if isinstance(elems, list) else [elems]:
        members += _members(probe, types, e)
        if len(members) > MAX_MEMBERS:
            raise Unsupported(f"set {name}: more than {MAX_MEMBERS} members once ranges are "
                              "expanded", "elem")
    size = body.get("size")
    maxelem = max(size if isinstance(size, int) else DEFAULT_MAXELEM, len(members), 1)
    d = SetDef(name, probe.type, family, maxelem=maxelem, range=rng)
    s = IpSet(d, origin=origin, replace=True)  # nft states the whole set, as `nft -f` loads it
    for parts in members:
        s.add(parts)
    return NftSet(s, types)


def _members(d: SetDef, types: tuple[str, ...], e: Any) -> list[Parts]:
    if isinstance(e, dict) and "elem" in e:
        inner = e["elem"]
        extra = [k for k in inner if k not in ("val", "comment")] if isinstance(inner, dict) \
            else ["elem"]
        if extra:
            raise Unsupported(f"set {d.name}: element options ({', '.join(extra)}) are not "
                              "supported", extra[0])
        e = inner["val"]
    values = e["concat"] if isinstance(e, dict) and "concat" in e else [e]
    if len(values) != len(types):
        raise Unsupported(f"set {d.name}: element {e!r} does not have {len(types)} part(s)",
                          str(e))
    choices = [_parts(d, dim, t, v) for dim, t, v in zip(d.type.dims, types, values, strict=True)]
    count = 1
    for c in choices:
        count *= len(c)
    if count > MAX_MEMBERS:
        raise Unsupported(f"set {d.name}: element {e!r} stands for {count} members", str(e))
    return [tuple(p) for p in itertools.product(*choices)]


def _network(v: Any, family: Family) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    try:
        if isinstance(v, dict) and "prefix" in v:
            return [ipaddress.ip_network(f"{v['prefix']['addr']}/{v['prefix']['len']}",
                                         strict=False)]
        if isinstance(v, dict) and "range" in v:
            lo, hi = (ipaddress.ip_address(x) for x in v["range"])
            return list(ipaddress.summarize_address_range(lo, hi))  # type: ignore[arg-type]
        if isinstance(v, str):
            return [ipaddress.ip_network(v)]
    except (ValueError, TypeError):
        pass
    raise Unsupported(f"address {v!r} is not supported", str(v))


def _parts(d: SetDef, dim: str, t: str, v: Any) -> list[Part]:
    if t == PORT_TYPE:
        if isinstance(v, dict) and "range" in v:
            lo, hi = v["range"]
        else:
            lo = hi = v
        if not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= 0xFFFF
                   for x in (lo, hi)):
            raise Unsupported(f"port {v!r} is not supported (a number or a range)", str(v))
        protos = (0,) if d.type.port_only else (TCP, UDP)
        return [(p, port) for port in range(lo, hi + 1) for p in protos]
    fam = ADDR_TYPES[t]
    nets = _network(v, fam)
    want = 4 if fam is V4 else 6
    out: list[Part] = []
    for n in nets:
        if n.version != want:
            raise Unsupported(f"address {v!r} is not an {fam.value} address", str(v))
        if dim == "ip":
            if n.num_addresses != 1:
                raise Unsupported(f"set {d.name}: {v!r} needs `flags interval`", str(v))
            if int(n.network_address) == 0:
                raise Unsupported(f"set {d.name}: the zero address cannot be stored in "
                                  f"{d.type.name}", str(v))
            out.append(n.network_address.packed)
        else:
            if n.prefixlen == 0:
                raise Unsupported(f"set {d.name}: {v!r} needs the prefix /0, which sets "
                                  "cannot hold", str(v))
            out.append((n.network_address.packed, n.prefixlen))
    return out


# --- lookups ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Key:
    kind: str  # "addr" or "port"
    src: bool
    family: Family | None
    proto: str | None


def _key(x: Any) -> _Key:
    p = x.get("payload") if isinstance(x, dict) else None
    if isinstance(p, dict) and "base" not in p:
        proto, field = p.get("protocol"), p.get("field")
        if proto in ("ip", "ip6") and field in ("saddr", "daddr"):
            return _Key("addr", field == "saddr", V4 if proto == "ip" else V6, None)
        if proto in ("tcp", "udp") and field in ("sport", "dport"):
            return _Key("port", field == "sport", None, proto)
    shown = next(iter(x)) if isinstance(x, dict) and x else str(x)
    if isinstance(p, dict):
        shown = f"{p.get('protocol')} {p.get('field')}"
    elif isinstance(x, dict) and isinstance(x.get(shown), dict) and "key" in x[shown]:
        shown = f"{shown} {x[shown]['key']}"  # meta iifname, ct mark, ...
    raise Unsupported(f"a named set looked up with {shown} is not supported (ip/ip6 saddr, "
                      "daddr, tcp/udp sport, dport and their concatenations)", str(shown))


def lookup(op: str, left: Any, ref: str, sets: dict[str, NftSet]) -> Piece:
    """`left @name` (or `!=`) → the `set` match on the directions `left` reads."""
    name = ref[1:]
    if op not in ("==", "!=", "in"):
        raise Unsupported(f"operator '{op}' on a named set is not supported", op)
    s = sets.get(name)
    if s is None:
        raise Unsupported(f"set @{name} is not declared in the rule's table", ref)
    parts = left["concat"] if isinstance(left, dict) and "concat" in left else [left]
    keys = [_key(x) for x in parts]
    if len(keys) != len(s.types):
        raise Unsupported(f"set @{name} has {len(s.types)} part(s), the lookup {len(keys)}", ref)
    for k, t in zip(keys, s.types, strict=True):
        want = "port" if t == PORT_TYPE else "addr"
        if k.kind != want or (k.family is not None and k.family is not ADDR_TYPES.get(t)):
            raise Unsupported(f"set @{name} holds {' . '.join(s.types)}, which the lookup's "
                              "keys do not read", ref)
    protos = {k.proto for k in keys if k.proto is not None}
    if len(protos) > 1:
        raise Unsupported("a lookup reading tcp and udp ports never matches", ref)
    dirs = ",".join("src" if k.src else "dst" for k in keys)
    neg = ("!",) if op == "!=" else ()
    family = s.ipset.definition.family
    return Piece((Cond(("-m", "set", *neg, "--match-set", name, dirs), next(iter(protos), None)),),
                 family)
