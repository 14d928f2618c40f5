"""Parsing and printing of the values options take: addresses, ports, protocols, interfaces."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from functools import cache

from ..ir.model import Family
from .registry import MatchError

# Protocol names iptables knows without /etc/protocols, and the numbers it prints them for.
PROTO_NAMES: dict[str, int] = {
    "tcp": 6, "udp": 17, "udplite": 136, "icmp": 1, "icmpv6": 58, "ipv6-icmp": 58, "esp": 50,
    "ah": 51, "sctp": 132, "mh": 135, "ipv6-mh": 135, "all": 0, "gre": 47, "igmp": 2,
    "ipv6": 41, "ipencap": 4, "ospf": 89, "vrrp": 112, "pim": 103, "l2tp": 115, "dccp": 33,
}
# What iptables-save prints for a protocol number (xtables_chain_protos, then /etc/protocols).
_CANONICAL = {6: "tcp", 17: "udp", 136: "udplite", 1: "icmp", 58: "ipv6-icmp", 50: "esp",
              51: "ah", 132: "sctp", 135: "mh"}


@cache
def _etc_protocols() -> dict[int, str]:
    out: dict[int, str] = {}
    try:
        with open("/etc/protocols") as f:
            for line in f:
                parts = line.split("#", 1)[0].split()
                if len(parts) >= 2 and parts[1].isdigit():
                    out.setdefault(int(parts[1]), parts[0])
    except OSError:
        pass
    return out


def parse_proto(text: str) -> int:
    """A protocol name or number (0-255); `all` is 0."""
    t = text.lower()
    if t in PROTO_NAMES:
        return PROTO_NAMES[t]
    if t.isdigit() and 0 <= int(t) <= 255:
        return int(t)
    by_name = {v: k for k, v in _etc_protocols().items()}
    if t in by_name:
        return by_name[t]
    raise MatchError(f"unknown protocol {text!r} specified", text)


def proto_name(proto: int, family: Family = Family.IPV4) -> str:
    """How iptables-save prints protocol `proto` (/etc/protocols first, as iptables does)."""
    name = _etc_protocols().get(proto)
    if name is not None:
        return name
    if proto == 58:
        return "ipv6-icmp"
    return _CANONICAL.get(proto, str(proto))


def parse_uint(text: str, lo: int = 0, hi: int = 0xFFFFFFFF, what: str = "value") -> int:
    """An unsigned number as iptables' strtoul with base 0 takes it (decimal, 0x hex, 0 octal)."""
    t = text.strip()
    try:
        if not t or not (t[0].isdigit()):
            raise ValueError
        if t.lower().startswith("0x"):
            value = int(t[2:], 16)
        elif len(t) > 1 and t.startswith("0"):
            value = int(t[1:], 8)
        else:
            value = int(t, 10)
    except ValueError:
        raise MatchError(f"invalid {what} {text!r}", text) from None
    if not lo <= value <= hi:
        raise MatchError(f"{what} {text!r} out of range {lo}-{hi}", text)
    return value


def parse_uint_range(text: str, hi: int = 0xFFFFFFFF, what: str = "value") -> tuple[int, int]:
    """`n`, `lo:hi`, `:hi`, `lo:` or `:` (bounds default to 0 and `hi`); lo must not exceed hi."""
    if ":" not in text:
        v = parse_uint(text, 0, hi, what)
        return v, v
    lo_s, hi_s = text.split(":", 1)
    lo = parse_uint(lo_s, 0, hi, what) if lo_s else 0
    top = parse_uint(hi_s, 0, hi, what) if hi_s else hi
    if lo > top:
        raise MatchError(f"invalid {what} range {text!r}: start above end", text)
    return lo, top


def format_range(lo: int, hi: int, sep: str = ":") -> str:
    """`lo` when the range holds one value, else `lo:hi`."""
    return str(lo) if lo == hi else f"{lo}{sep}{hi}"


def parse_value_mask(text: str, what: str = "mark", bits: int = 32) -> tuple[int, int]:
    """`value[/mask]` (mask defaults to all ones), as mark and connmark take them."""
    top = (1 << bits) - 1
    v_s, slash, m_s = text.partition("/")
    value = parse_uint(v_s, 0, top, what)
    mask = parse_uint(m_s, 0, top, what + " mask") if slash else top
    return value, mask


def quote(value: str) -> str:
    """A string as iptables-save prints it: bare when safe, else double-quoted and escaped."""
    if value and all(c.isascii() and (c.isalnum() or c in "_-") for c in value):
        return value
    escaped = "".join("\\" + c if c in "\"\\'" else c for c in value)
    return f'"{escaped}"'


def bare(value: str) -> str:
    """A name iptables prints as is (printf %s): quoted only where the lexer would split it."""
    if value and not any(c.isspace() or c in "\"\\" for c in value):
        return value
    return quote(value)


def format_addr(addr: bytes) -> str:
    """An address as inet_ntop prints it (glibc: IPv4-mapped and -compatible tails dotted)."""
    if len(addr) == 4:
        return ".".join(str(b) for b in addr)
    words = [int.from_bytes(addr[i:i + 2], "big") for i in range(0, 16, 2)]
    best, best_len, cur, cur_len = -1, 0, -1, 0
    for i, w in enumerate(words):
        if w == 0:
            if cur < 0:
                cur, cur_len = i, 0
            cur_len += 1
            if cur_len > best_len:
                best, best_len = cur, cur_len
        else:
            cur = -1
    if best_len < 2:
        best = -1
    if best == 0 and (best_len == 6 or (best_len == 5 and words[5] == 0xFFFF)):
        head = "::" if best_len == 6 else "::ffff:"
        return head + ".".join(str(b) for b in addr[12:])
    parts: list[str] = []
    i = 0
    while i < 8:
        if i == best:
            parts.append("")
            if i == 0:
                parts.append("")
            i += best_len
            if i == 8:
                parts.append("")
            continue
        parts.append(f"{words[i]:x}")
        i += 1
    return ":".join(parts)


def parse_addr(text: str, family: Family) -> bytes:
    """One numeric address of `family` (IPv4 may be abbreviated: `10` is 10.0.0.0)."""
    if family is Family.IPV4:
        parts = text.split(".")
        if 1 <= len(parts) <= 4 and all(p.isdigit() and int(p) <= 255 for p in parts):
            return bytes(int(p) for p in parts).ljust(4, b"\0")
        raise MatchError(f"host/network {text!r} not found", text)
    try:
        return ipaddress.IPv6Address(text).packed
    except ValueError:
        raise MatchError(f"host/network {text!r} not found", text) from None


def parse_mac(text: str) -> bytes:
    """A MAC address `xx:xx:xx:xx:xx:xx`."""
    parts = text.split(":")
    if len(parts) != 6 or not all(1 <= len(p) <= 2 and _is_hex(p) for p in parts):
        raise MatchError(f"bad mac address {text!r}", text)
    return bytes(int(p, 16) for p in parts)


def _is_hex(s: str) -> bool:
    return all(c in "0123456789abcdefABCDEF" for c in s)


def format_mac(mac: bytes) -> str:
    """A MAC address as iptables prints it (lower-case hex)."""
    return ":".join(f"{b:02x}" for b in mac)


@dataclass(frozen=True)
class Net:
    """An address with a mask (the mask need not be a prefix)."""

    addr: bytes
    mask: bytes

    @property
    def family(self) -> Family:
        """IPv4 or IPv6, by length."""
        return Family.IPV4 if len(self.addr) == 4 else Family.IPV6

    @property
    def prefixlen(self) -> int | None:
        """The prefix length when the mask is contiguous, else None."""
        bits = int.from_bytes(self.mask, "big")
        n = len(self.mask) * 8
        plen = bin(bits).count("1")
        if bits != ((1 << n) - 1) ^ ((1 << (n - plen)) - 1):
            return None
        return plen

    def contains(self, addr: bytes) -> bool:
        """True if `addr` is in this network."""
        return all((a & m) == (b & m) for a, b, m in zip(addr, self.addr, self.mask, strict=True))

    def __str__(self) -> str:
        plen = self.prefixlen
        if plen is not None:
            return f"{format_addr(self.addr)}/{plen}"
        return f"{format_addr(self.addr)}/{format_addr(self.mask)}"


def _mask_bytes(plen: int, n: int) -> bytes:
    bits = ((1 << (n * 8)) - 1) ^ ((1 << (n * 8 - plen)) - 1)
    return bits.to_bytes(n, "big")


def parse_net(text: str, family: Family) -> Net:
    """`addr`, `addr/len` or `addr/dotted-mask`, with host bits cleared as iptables does."""
    addr_s, slash, mask_s = text.partition("/")
    n = family.addr_len
    addr = parse_addr(addr_s, family)
    if not slash:
        mask = _mask_bytes(n * 8, n)
    elif mask_s.isdigit():
        if int(mask_s) > n * 8:
            raise MatchError(f"invalid mask {mask_s!r} specified", text)
        mask = _mask_bytes(int(mask_s), n)
    else:
        try:
            mask = parse_addr(mask_s, family)
        except MatchError:
            raise MatchError(f"invalid mask {mask_s!r} specified", text) from None
        if family is Family.IPV4 and mask_s.count(".") != 3:
            raise MatchError(f"invalid mask {mask_s!r} specified", text)
    packed = bytes(a & m for a, m in zip(addr, mask, strict=True))
    return Net(packed, mask)


def parse_nets(text: str, family: Family) -> list[Net]:
    """A comma-separated address list (iptables makes one rule per address)."""
    return [parse_net(t, family) for t in text.split(",")]


@dataclass(frozen=True)
class Iface:
    """An interface name, `+` at the end matching any suffix."""

    name: str

    @property
    def wildcard(self) -> bool:
        """True for a prefix pattern (`eth+`)."""
        return self.name.endswith("+")

    def pattern(self) -> tuple[bytes, bytes]:
        """(value, mask) over the 16-byte name field, as netfilter compares interface names."""
        if self.wildcard:
            stem = self.name[:-1].encode()
            return stem.ljust(16, b"\0"), (b"\xff" * len(stem)).ljust(16, b"\0")
        raw = self.name.encode()
        # The mask covers the terminating NUL too, so "eth0" does not match "eth00".
        return raw.ljust(16, b"\0"), (b"\xff" * min(len(raw) + 1, 16)).ljust(16, b"\0")

    def matches(self, ifname: str) -> bool:
        """Whether interface `ifname` matches."""
        if self.wildcard:
            return ifname.startswith(self.name[:-1])
        return ifname == self.name

    def __str__(self) -> str:
        return self.name


def parse_iface(text: str) -> Iface:
    """An interface name as `-i`/`-o` take it."""
    if len(text) > 15 or not text:
        raise MatchError(f"interface name {text!r} must be shorter than 16 characters", text)
    if any(c in text for c in " /") or text in (".", ".."):
        raise MatchError(f"invalid interface name {text!r}", text)
    return Iface(text)


@dataclass(frozen=True)
class PortRange:
    """An inclusive port range (a single port has lo == hi)."""

    lo: int
    hi: int

    def __str__(self) -> str:
        return str(self.lo) if self.lo == self.hi else f"{self.lo}:{self.hi}"


_SERVICES: dict[str, int] | None = None


def _service(name: str, proto: str | None) -> int | None:
    global _SERVICES
    if _SERVICES is None:
        _SERVICES = {}
        try:
            with open("/etc/services") as f:
                for line in f:
                    parts = line.split("#", 1)[0].split()
                    if len(parts) >= 2 and "/" in parts[1]:
                        port, pr = parts[1].split("/", 1)
                        for n in (parts[0], *parts[2:]):
                            _SERVICES.setdefault(f"{n}/{pr}", int(port))
        except OSError:
            pass
    for pr in ((proto,) if proto else ("tcp", "udp")):
        if f"{name}/{pr}" in _SERVICES:
            return _SERVICES[f"{name}/{pr}"]
    return None


def parse_port(text: str, proto: str | None = None) -> int:
    """A port number or service name."""
    if text.isdigit():
        port = int(text)
        if port > 65535:
            raise MatchError(f"invalid port/service {text!r} specified", text)
        return port
    port = _service(text, proto)
    if port is None:
        raise MatchError(f"invalid port/service {text!r} specified", text)
    return port


def parse_port_range(text: str, proto: str | None = None) -> PortRange:
    """`port`, `lo:hi`, `:hi` or `lo:` (iptables' port range syntax)."""
    if ":" not in text:
        p = parse_port(text, proto)
        return PortRange(p, p)
    lo_s, hi_s = text.split(":", 1)
    lo = parse_port(lo_s, proto) if lo_s else 0
    hi = parse_port(hi_s, proto) if hi_s else 65535
    if lo > hi:
        raise MatchError(f"invalid port range {text!r}: start above end", text)
    return PortRange(lo, hi)
