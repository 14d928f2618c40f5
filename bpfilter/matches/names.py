"""Names `iptables -L` prints without -n: services, hosts, networks, in xtables' lookup order.

Everything is read from the files the C library's `files` backend reads (/etc/services,
/etc/hosts, /etc/networks), first matching line first, as getservbyport, gethostbyaddr and
getnetbyaddr return it. No DNS query is ever made: iptables would also ask the resolver for
addresses that /etc/hosts does not name, so an address with only a DNS reverse name prints
numerically here.
"""

from __future__ import annotations

import ipaddress
from functools import cache

from .values import Net, format_addr

HOSTS = "/etc/hosts"
NETWORKS = "/etc/networks"
SERVICES = "/etc/services"


def _lines(path: str) -> list[list[str]]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return [p for line in f if (p := line.split("#", 1)[0].split())]
    except OSError:
        return []


@cache
def _services() -> dict[tuple[int, str], str]:
    out: dict[tuple[int, str], str] = {}
    for parts in _lines(SERVICES):
        port, _, proto = parts[1].partition("/") if len(parts) > 1 else ("", "", "")
        if port.isdigit() and proto:
            out.setdefault((int(port), proto), parts[0])
    return out


def service_name(port: int, proto: str | None) -> str | None:
    """The service /etc/services names `port` by for `proto` (getservbyport), if any."""
    if proto is None:
        return None
    return _services().get((port, proto))


def port_text(port: int, proto: str | None, numeric: bool) -> str:
    """A port as the tcp, udp, multiport and sctp matches print it."""
    name = None if numeric else service_name(port, proto)
    return name if name is not None else str(port)


@cache
def _hosts() -> dict[bytes, str]:
    out: dict[bytes, str] = {}
    for parts in _lines(HOSTS):
        if len(parts) < 2:
            continue
        try:
            packed = ipaddress.ip_address(parts[0].split("%", 1)[0]).packed
        except ValueError:
            continue
        out.setdefault(packed, parts[1])
    return out


def _inet_network(text: str) -> int | None:
    """inet_network(3): dotted parts (decimal, 0x hex or 0 octal) folded 8 bits at a time."""
    value = 0
    parts = text.split(".")
    if not 1 <= len(parts) <= 4:
        return None
    for p in parts:
        try:
            n = int(p, 16) if p.lower().startswith("0x") else int(p, 8) if \
                len(p) > 1 and p.startswith("0") else int(p, 10)
        except ValueError:
            return None
        if not 0 <= n <= 255:
            return None
        value = (value << 8) | n
    return value


@cache
def _networks() -> dict[int, str]:
    out: dict[int, str] = {}
    for parts in _lines(NETWORKS):
        if len(parts) >= 2 and (n := _inet_network(parts[1])) is not None:
            out.setdefault(n, parts[0])
    return out


def addr_anyname(addr: bytes) -> str:
    """xtables_ipaddr_to_anyname / ip6addr_to_anyname: host name, (IPv4) network name, else
    the number."""
    name = _hosts().get(addr)
    if name is None and len(addr) == 4:
        name = _networks().get(int.from_bytes(addr, "big"))
    return name if name is not None else format_addr(addr)


def mask_suffix(mask: bytes) -> str:
    """xtables_ipmask_to_numeric / ip6mask_to_numeric: "" for a host, `/len`, or `/mask`."""
    bits = int.from_bytes(mask, "big")
    width = len(mask) * 8
    if bits == (1 << width) - 1:
        return ""
    plen = Net(mask, mask).prefixlen
    return f"/{plen}" if plen is not None else f"/{format_addr(mask)}"


def net_text(net: Net, numeric: bool) -> str:
    """An address with its mask as print_firewall and the matches print it (no `anywhere`)."""
    addr = format_addr(net.addr) if numeric else addr_anyname(net.addr)
    return addr + mask_suffix(net.mask)
