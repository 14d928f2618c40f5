"""A UDP receiver run as its own process: join a cgroup, enter a namespace, count datagrams.

Usage: udp_server.py NETNS CGROUP_DIR BIND_ADDR EXPECT TIMEOUT. Prints the bound port once ready,
then, on exit, the number of datagrams received (stopping at EXPECT or after TIMEOUT seconds of
silence).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass

from bpfilter import netns


def main(argv: list[str]) -> int:
    """Serve until EXPECT datagrams arrived or the line went quiet."""
    ns, cgroup, addr, expect, timeout = argv[0], argv[1], argv[2], int(argv[3]), float(argv[4])
    # Join before creating the socket: a socket belongs to its creator's cgroup.
    with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with netns.enter(ns):
        sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((addr, 0))
    sock.settimeout(timeout)
    print(sock.getsockname()[1], flush=True)
    n = 0
    while n < expect:
        try:
            sock.recv(2048)
        except TimeoutError:
            break
        n += 1
    print(n, flush=True)
    return 0


@dataclass
class UdpServer:
    """A running udp_server.py process."""

    proc: subprocess.Popen
    port: int

    def result(self, timeout: float = 10.0) -> int:
        """Wait for the server to finish; the number of datagrams it received."""
        out, _ = self.proc.communicate(timeout=timeout)
        return int(out.strip().splitlines()[-1])

    def stop(self) -> None:
        """Kill the server if it still runs."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()


def start(ns: str, cgroup: str, addr: str, expect: int, timeout: float = 2.0) -> UdpServer:
    """Start a server in `ns`, inside `cgroup`, bound to `addr`; returns once it listens."""
    proc = subprocess.Popen(
        [sys.executable, __file__, ns, cgroup, addr, str(expect), str(timeout)],
        stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline() if proc.stdout else ""
    if not line.strip().isdigit():
        proc.kill()
        proc.wait()
        raise RuntimeError(f"udp server did not start (exit {proc.returncode}): {line!r}")
    return UdpServer(proc, int(line))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
