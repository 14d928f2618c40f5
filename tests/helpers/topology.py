"""Test namespaces and a two-namespace veth topology (sender -> receiver)."""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import subprocess
import time
import zlib
from dataclasses import dataclass

from bpfilter import netns

from .names import unique_name

SIOCGIFFLAGS = 0x8913  # <linux/sockios.h>
IFF_RUNNING = 0x40  # <net/if.h>: operationally up

# Home of this test process, before any test enters anything: what must never be touched.
HOME_NS_INODE = netns.current_ns_inode()


def assert_not_home() -> None:
    """Refuse to go on unless the calling thread is inside a test namespace."""
    if netns.current_ns_inode() == HOME_NS_INODE:
        raise AssertionError("refusing to attach in the test runner's own network namespace")


def ip_batch(ns: str, commands: list[str]) -> None:
    """Run `ip` commands inside namespace `ns` with one process (`ip -n NS -batch -`)."""
    proc = subprocess.run(["ip", "-n", ns, "-batch", "-"], input="\n".join(commands) + "\n",
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"ip -n {ns} -batch failed: {proc.stderr.strip()}\n"
                           + "\n".join(commands))


def write_sysctl(ns: str, key: str, value: str | int) -> None:
    """Set a net.* sysctl inside `ns` (/proc/sys/net resolves against the thread's namespace)."""
    path = "/proc/sys/" + key.replace(".", "/")
    with netns.enter(ns), open(path, "w") as f:
        f.write(str(value))


def read_sysctl(ns: str, key: str) -> str:
    """Read a net.* sysctl inside `ns`."""
    path = "/proc/sys/" + key.replace(".", "/")
    with netns.enter(ns), open(path) as f:
        return f.read().strip()


def ifindex(ns: str, ifname: str) -> int:
    """The index of `ifname` inside `ns`."""
    with netns.enter(ns):
        return socket.if_nametoindex(ifname)


def wait_running(ns: str, ifname: str, timeout: float = 3.0) -> None:
    """Wait until `ifname` in `ns` is operationally up (IPv6 does not send before that)."""
    with netns.enter(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        req = struct.pack("16sH14x", ifname.encode(), 0)
        deadline = time.monotonic() + timeout
        while True:
            flags = struct.unpack("16sH14x", fcntl.ioctl(sock, SIOCGIFFLAGS, req))[1]
            if flags & IFF_RUNNING:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{ifname} in {ns} is not running after {timeout} s")
            time.sleep(0.005)


def create_netns(name: str | None = None) -> str:
    """A fresh named namespace with `lo` up."""
    name = name or unique_name("n")
    netns.create(name)
    try:
        ip_batch(name, ["link set lo up"])
    except Exception:
        netns.delete(name)
        raise
    return name


def delete_netns(name: str) -> None:
    """Delete a test namespace if it is still there."""
    if netns.exists(name):
        netns.delete(name)


@dataclass(frozen=True)
class Endpoint:
    """One end of the veth pair, inside its namespace."""

    ns: str
    ifname: str
    ifindex: int
    mac: str
    ip4: str
    ip6: str


@dataclass(frozen=True)
class Topology:
    """Two namespaces joined by a veth pair: traffic flows sender -> receiver."""

    sender: Endpoint
    receiver: Endpoint
    prefix4: int = 24
    prefix6: int = 64

    @property
    def namespaces(self) -> tuple[str, str]:
        """Both namespace names."""
        return self.sender.ns, self.receiver.ns


SENDER_IFINDEX, RECEIVER_IFINDEX = 10, 20


def _quiet_sysctls(ns: str, ifname: str) -> None:
    for key in ("net.ipv4.conf.all.rp_filter", "net.ipv4.conf.default.rp_filter",
                f"net.ipv4.conf.{ifname}.rp_filter"):
        write_sysctl(ns, key, 0)
    # No router solicitations: keep unsolicited traffic off the link.
    write_sysctl(ns, f"net.ipv6.conf.{ifname}.router_solicitations", 0)
    write_sysctl(ns, f"net.ipv6.conf.{ifname}.accept_dad", 0)


def create_topology() -> Topology:
    """Two fresh namespaces and a veth pair with IPv4 and IPv6 addresses, links up."""
    base = unique_name()
    s_ns, r_ns = base + "s", base + "r"
    # Address bytes from the name counter keep concurrent topologies apart in captures.
    x, y = os.getpid() % 250 + 1, zlib.crc32(base.encode()) % 250 + 1
    ends = {
        "s": (s_ns, base + "s", f"02:bf:{x:02x}:{y:02x}:00:01", f"10.{x}.{y}.1",
              f"fd00:{x:x}:{y:x}::1"),
        "r": (r_ns, base + "r", f"02:bf:{x:02x}:{y:02x}:00:02", f"10.{x}.{y}.2",
              f"fd00:{x:x}:{y:x}::2"),
    }
    made: list[str] = []
    try:
        for ns, *_ in ends.values():
            create_netns(ns)
            made.append(ns)
        s, r = ends["s"], ends["r"]
        # Create both ends directly inside their namespaces: nothing appears in ours. Distinct
        # ifindexes make the kernel treat carrier changes as urgent (a veth whose peer has its
        # own index is "stacked"); with equal ones linkwatch may wait a second to bring the
        # link to operational state, and IPv6 waits for that.
        subprocess.run(["ip", "link", "add", s[1], "index", str(SENDER_IFINDEX), "address", s[2],
                        "netns", s[0], "type", "veth", "peer", "name", r[1],
                        "index", str(RECEIVER_IFINDEX), "address", r[2], "netns", r[0]],
                       check=True, capture_output=True, text=True)
        endpoints = {}
        for key, (ns, ifname, mac, ip4, ip6) in ends.items():
            _quiet_sysctls(ns, ifname)
            ip_batch(ns, [f"addr add {ip4}/24 dev {ifname}",
                          f"addr add {ip6}/64 dev {ifname} nodad",
                          f"link set {ifname} up"])
            endpoints[key] = Endpoint(ns, ifname, ifindex(ns, ifname), mac, ip4, ip6)
        for ep in endpoints.values():
            wait_running(ep.ns, ep.ifname)
        return Topology(endpoints["s"], endpoints["r"])
    except BaseException:
        for ns in made:
            delete_netns(ns)
        raise


def destroy_topology(topo: Topology) -> None:
    """Delete both namespaces (the veth pair goes with them)."""
    errors = []
    for ns in topo.namespaces:
        try:
            delete_netns(ns)
        except Exception as e:  # delete the other one anyway
            errors.append(e)
    if errors:
        raise errors[0]
