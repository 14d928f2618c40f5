"""Throwaway namespaces for the traffic runs: sender -> veth -> receiver, and their cleanup.

Everything is created through a `Sandbox`, which deletes what it made (namespaces, the private
bpffs mount, child processes) when it closes — also on an exception or Ctrl-C. Nothing is ever
attached in, or sent toward, the caller's own namespace.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import signal
import socket
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass

from packets import DST_IP, DST_MAC, SRC_IP, SRC_MAC

from bpfilter import netns
from bpfilter.bpf.bpffs import mount_bpffs, remove_tree, umount

# <linux/sockios.h> and <linux/ethtool.h>: the legacy one-feature ioctl is enough for GRO.
SIOCETHTOOL = 0x8946
ETHTOOL_SGRO = 0x0000002C
SIOCGIFFLAGS = 0x8913
IFF_RUNNING = 0x40
SENDER_CPU, RECEIVER_CPU = 0, 1
HOME_NS = netns.current_ns_inode()


def _ip(ns: str, *cmds: str) -> None:
    proc = subprocess.run(["ip", "-n", ns, "-batch", "-"], input="\n".join(cmds) + "\n",
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"ip -n {ns}: {proc.stderr.strip()}")


def _sysctl(ns: str, key: str, value: int) -> None:
    with netns.enter(ns), open("/proc/sys/" + key.replace(".", "/"), "w") as f:
        f.write(str(value))


def _napi_threads() -> dict[int, str]:
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        with contextlib.suppress(OSError), open(f"/proc/{pid}/comm") as f:
            comm = f.read().strip()
            if comm.startswith("napi/"):
                out[int(pid)] = comm
    return out


@dataclass
class Pair:
    """Two namespaces joined by a veth: frames go sender -> receiver."""

    sender_ns: str
    receiver_ns: str
    sender_if: str
    receiver_if: str
    sender_ifindex: int = 0
    napi_pids: tuple[int, ...] = ()

    def rx_stats(self) -> tuple[int, int]:
        """(rx_packets, rx_dropped) of the receiving veth, from its namespace's /proc/net/dev."""
        with netns.enter(self.receiver_ns), open("/proc/thread-self/net/dev") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name.strip() == self.receiver_if:
                    v = rest.split()
                    return int(v[1]), int(v[3])
        raise RuntimeError(f"{self.receiver_if} not in {self.receiver_ns}")

    def pin_napi(self) -> None:
        """Pin the receiver's NAPI threads to the receiving CPU (again, after an XDP attach)."""
        for pid in self.napi_pids:
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(pid, {RECEIVER_CPU})


class Sandbox:
    """Owner of every namespace, mount and process the benchmark makes."""

    def __init__(self) -> None:
        self.prefix = f"bb{os.getpid():x}"
        self._n = itertools.count()
        self._namespaces: list[str] = []
        self._procs: list[subprocess.Popen] = []
        self._tmp = tempfile.mkdtemp(prefix="pybpfilter-bench-")
        self.bpffs = os.path.join(self._tmp, "bpffs")
        self._mounted = False

    def __enter__(self) -> Sandbox:
        # Ctrl-C and kill end the run through the same finally: blocks.
        signal.signal(signal.SIGTERM, _raise_interrupt)
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def private_bpffs(self) -> str:
        """A bpffs mounted for this run only (never /sys/fs/bpf)."""
        if not self._mounted:
            mount_bpffs(self.bpffs)
            self._mounted = True
        return self.bpffs

    def spawn(self, argv: list[str], **kw) -> subprocess.Popen:
        """Start a child process that `close` ends (by its pid) if it is still running."""
        p = subprocess.Popen(argv, **kw)
        self._procs.append(p)
        return p

    def stop(self, p: subprocess.Popen, timeout: float = 5.0) -> None:
        """End one child we started."""
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if p in self._procs:
            self._procs.remove(p)

    def pair(self) -> Pair:
        """A fresh sender/receiver pair, GRO and threaded NAPI on the receiver, pinned to CPU 1."""
        k = next(self._n)
        base = f"{self.prefix}_{k}"
        s_ns, r_ns = base + "s", base + "r"
        s_if, r_if = f"{self.prefix}s{k}"[:15], f"{self.prefix}r{k}"[:15]
        for ns in (s_ns, r_ns):
            netns.create(ns)
            self._namespaces.append(ns)
            _ip(ns, "link set lo up")
        subprocess.run(["ip", "link", "add", s_if, "address", SRC_MAC.hex(":"), "netns", s_ns,
                        "type", "veth", "peer", "name", r_if, "address", DST_MAC.hex(":"),
                        "netns", r_ns], check=True, capture_output=True, text=True)
        for ns in (s_ns, r_ns):
            for key in ("all", "default"):
                _sysctl(ns, f"net.ipv4.conf.{key}.rp_filter", 0)
        _ip(s_ns, f"addr add {SRC_IP}/24 dev {s_if}", f"link set {s_if} up",
            f"neigh add {DST_IP} lladdr {DST_MAC.hex(':')} dev {s_if}")
        _ip(r_ns, f"addr add {DST_IP}/24 dev {r_if}", f"link set {r_if} up",
            f"neigh add {SRC_IP} lladdr {SRC_MAC.hex(':')} dev {r_if}")
        pair = Pair(s_ns, r_ns, s_if, r_if)
        with netns.enter(s_ns):
            pair.sender_ifindex = socket.if_nametoindex(s_if)
        _wait_running(r_ns, r_if)
        _set_gro(r_ns, r_if)
        before = _napi_threads()
        # /sys shows the caller's namespace; `ip netns exec` mounts the receiver's.
        netns.run(r_ns, ["sh", "-c", f"echo 1 > /sys/class/net/{r_if}/threaded"])
        tag = f"napi/{r_if}"[:15]
        new = {p for p, c in _napi_threads().items() if p not in before and c.startswith(tag)}
        if not new:
            raise RuntimeError(f"no threaded NAPI kthread appeared for {r_if}")
        pair.napi_pids = tuple(sorted(new))
        pair.pin_napi()
        return pair

    def close(self) -> None:
        """Remove everything: children, namespaces (their veths and hooks go with them), bpffs."""
        for p in list(self._procs):
            with contextlib.suppress(Exception):
                self.stop(p)
        for ns in reversed(self._namespaces):
            with contextlib.suppress(Exception):
                if netns.exists(ns):
                    netns.delete(ns)
        self._namespaces.clear()
        if self._mounted:
            with contextlib.suppress(OSError):
                remove_tree_contents(self.bpffs)
            with contextlib.suppress(OSError):
                umount(self.bpffs)
            self._mounted = False
        with contextlib.suppress(OSError):
            os.rmdir(self.bpffs)
        with contextlib.suppress(OSError):
            os.rmdir(self._tmp)

    def delete_pair(self, pair: Pair) -> None:
        """Delete one pair's namespaces now (their rulesets go with them)."""
        for ns in (pair.sender_ns, pair.receiver_ns):
            if netns.exists(ns):
                netns.delete(ns)
            if ns in self._namespaces:
                self._namespaces.remove(ns)


def remove_tree_contents(path: str) -> None:
    """Unpin everything under a bpffs mount, keeping the mount point."""
    for name in os.listdir(path):
        full = os.path.join(path, name)
        if os.path.isdir(full):
            remove_tree(full)
        else:
            os.unlink(full)


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _wait_running(ns: str, ifname: str, timeout: float = 5.0) -> None:
    with netns.enter(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        req = struct.pack("16sH14x", ifname.encode(), 0)
        deadline = time.monotonic() + timeout
        while not struct.unpack("16sH14x", fcntl.ioctl(sock, SIOCGIFFLAGS, req))[1] & IFF_RUNNING:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{ifname} in {ns} is not running")
            time.sleep(0.01)


def _set_gro(ns: str, ifname: str) -> None:
    """Turn GRO on: veth then receives through its NAPI path (what baseline.md measured)."""
    with netns.enter(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        val = struct.pack("II", ETHTOOL_SGRO, 1)
        buf = bytearray(val)
        addr = ctypes_addr(buf)
        ifr = struct.pack("16sQ16x", ifname.encode(), addr)
        fcntl.ioctl(sock, SIOCETHTOOL, ifr)


def ctypes_addr(buf: bytearray) -> int:
    """Address of a bytearray's storage, for ioctls that take a pointer."""
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def cpu_busy() -> list[tuple[int, int]]:
    """(busy, total) jiffies per CPU from /proc/stat."""
    out = []
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                v = [int(x) for x in line.split()[1:]]
                idle = v[3] + v[4]
                out.append((sum(v) - idle, sum(v)))
    return out
