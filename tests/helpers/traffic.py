"""Real traffic between test namespaces: ping, UDP, and waiting for counters to move."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

from bpfilter import netns

from .packets import is_v6


def ping(ns: str, addr: str, count: int = 3, *, check: bool = True) -> bool:
    """Ping `addr` from inside `ns` (fast interval, 2 s deadline); True if all replies came."""
    proc = netns.run(ns, ["ping", "-n", "-q", "-c", str(count), "-i", "0.01", "-w", "2", addr],
                     check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"ping {addr} from {ns} failed:\n{proc.stdout}{proc.stderr}")
    return proc.returncode == 0


def udp_send(ns: str, addr: str, port: int, count: int = 1, payload: bytes = b"x") -> None:
    """Send `count` UDP datagrams to addr:port from a socket made inside `ns`."""
    family = socket.AF_INET6 if is_v6(addr) else socket.AF_INET
    with netns.enter(ns):
        sock = socket.socket(family, socket.SOCK_DGRAM)
    with sock:
        for _ in range(count):
            sock.sendto(payload, (addr, port))


def wait_for(cond: Callable[[], bool], timeout: float = 3.0, interval: float = 0.01) -> bool:
    """Poll `cond` until it holds or `timeout` passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if cond():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def settle(seconds: float = 0.05) -> None:
    """Give in-flight packets time to reach a hook before asserting nothing more arrives."""
    time.sleep(seconds)
