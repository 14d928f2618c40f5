"""`make demo`: a host firewall compiled to BPF between two throwaway namespaces.

Creates a client and a server namespace joined by a veth pair, loads the built-in ruleset into
the server (netfilter hooks, through `bpfilter restore --netns`), sends traffic the ruleset
allows and traffic it blocks, prints the per-rule counters (`bpfilter list -v`), and removes
everything it created, also when something fails. Nothing touches the root namespace.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack

from . import netns
from .bpf.bpffs import mount_bpffs, umount

RULESET = """\
# A host firewall: stateful, the services this host offers, ICMP in moderation, a logged drop.
*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:SERVICES - [0:0]
:ICMP - [0:0]
:LOGDROP - [0:0]
-A INPUT -i lo -j ACCEPT
-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A INPUT -m conntrack --ctstate INVALID -j DROP
-A INPUT -p icmp -j ICMP
-A INPUT -s 192.0.2.0/24 -m comment --comment "a blocklisted network" -j DROP
-A INPUT -m conntrack --ctstate NEW -j SERVICES
-A INPUT -j LOGDROP
-A SERVICES -p tcp -s {client_net} --dport 22 -j ACCEPT
-A SERVICES -p tcp -m multiport --dports 80,443 -j ACCEPT
-A SERVICES -p udp --dport 53 -j ACCEPT
-A ICMP -p icmp --icmp-type echo-request -m length --length 0:1000 -j ACCEPT
-A ICMP -p icmp --icmp-type destination-unreachable -j ACCEPT
-A ICMP -j DROP
-A LOGDROP -m limit --limit 10/second -j LOG --log-prefix "demo drop: "
-A LOGDROP -j DROP
COMMIT
"""


def _ruleset(client_net: str) -> str:
    return RULESET.format(client_net=client_net)


def _sh(*argv: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(argv)
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def _bpfilter(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bpfilter.cli.main", *argv],
                          capture_output=True, text=True)


def _serve_tcp(ns: str, ports: list[int], stop: threading.Event) -> None:
    with netns.enter(ns):
        socks = []
        for p in ports:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("0.0.0.0", p))
            s.listen()
            s.settimeout(0.2)
            socks.append(s)
    while not stop.is_set():
        for s in socks:
            try:
                c, _ = s.accept()
                c.sendall(b"hello\n")
                c.close()
            except TimeoutError:
                pass
    for s in socks:
        s.close()


def _try_tcp(ns: str, addr: str, port: int) -> bool:
    with netns.enter(ns):
        s = socket.socket()
    s.settimeout(1.0)
    try:
        s.connect((addr, port))
        return s.recv(16) == b"hello\n"
    except OSError:
        return False
    finally:
        s.close()


def main() -> int:
    """Run the demo; returns 0 when every expectation held."""
    if os.geteuid() != 0:
        print("the demo needs root (namespaces and BPF)", file=sys.stderr)
        return 1
    tag = f"{os.getpid() % 100000}"
    client, server = f"bpfdemo-c{tag}", f"bpfdemo-s{tag}"
    vc, vs = f"dmc{tag}", f"dms{tag}"
    net = "10.231.0"
    ok = True
    with ExitStack() as stack:
        for ns in (client, server):
            netns.create(ns)
            stack.callback(netns.delete, ns)
        _sh("ip", "link", "add", vc, "netns", client, "type", "veth", "peer", "name", vs,
            "netns", server)
        for ns, dev, addr in ((client, vc, f"{net}.1"), (server, vs, f"{net}.2")):
            _sh("ip", "addr", "add", f"{addr}/24", "dev", dev, ns=ns)
            _sh("ip", "link", "set", dev, "up", ns=ns)
            _sh("ip", "link", "set", "lo", "up", ns=ns)
        pins = tempfile.mkdtemp(prefix="bpfdemo-")
        mount_bpffs(pins)
        stack.callback(os.rmdir, pins)
        stack.callback(umount, pins)
        os.environ["BPFILTER_BPFFS"] = os.path.join(pins, "pybpfilter")
        stop = threading.Event()
        server_thread = threading.Thread(target=_serve_tcp, args=(server, [22, 23, 80], stop))
        server_thread.start()
        stack.callback(server_thread.join)
        stack.callback(stop.set)
        time.sleep(0.3)

        rules = _ruleset(f"{net}.0/24")
        print("== the ruleset (iptables-save format) ==")
        print(rules)
        path = os.path.join(pins + "-rules.v4")
        with open(path, "w") as f:
            f.write(rules)
        stack.callback(os.unlink, path)
        r = _bpfilter("restore", "--netns", server, path)
        if r.returncode:
            print(r.stderr, file=sys.stderr)
            return 1
        stack.callback(_bpfilter, "flush", "--netns", server)
        print(f"== loaded into namespace {server} (netfilter hooks) ==\n")

        checks = [
            ("ping (ICMP echo, 56 bytes)", lambda: _sh("ping", "-c", "2", "-i", "0.2", "-W", "1",
                                                      f"{net}.2", ns=client, check=False)
             .returncode == 0, True),
            ("ping with 1400 bytes (over the length limit)",
             lambda: _sh("ping", "-c", "1", "-W", "1", "-s", "1400", f"{net}.2", ns=client,
                         check=False).returncode == 0, False),
            ("TCP port 22 from the client network", lambda: _try_tcp(client, f"{net}.2", 22),
             True),
            ("TCP port 80 (multiport 80,443)", lambda: _try_tcp(client, f"{net}.2", 80), True),
            ("TCP port 23 (dropped, and logged)", lambda: _try_tcp(client, f"{net}.2", 23),
             False),
        ]
        monitor = subprocess.Popen(
            [sys.executable, "-m", "bpfilter.cli.main", "monitor", "--netns", server,
             "--count", "1", "--duration", "5"], stdout=subprocess.PIPE, text=True)
        time.sleep(0.5)
        for name, fn, want in checks:
            got = fn()
            mark = "ok " if got == want else "BAD"
            ok &= got == want
            print(f"[{mark}] {name}: {'passed' if got else 'blocked'}"
                  f" (expected {'passed' if want else 'blocked'})")
        print("\n== bpfilter monitor (the first logged drop) ==")
        print(monitor.communicate(timeout=10)[0].strip())
        print("\n== bpfilter conntrack list ==")
        print(_bpfilter("conntrack", "list", "--netns", server).stdout.strip())
        print("\n== bpfilter list -v -n --line-numbers ==")
        print(_bpfilter("list", "-v", "-n", "--line-numbers", "--netns", server).stdout)
        print("== bpfilter save -c ==")
        print(_bpfilter("save", "-c", "--netns", server).stdout)
    print("cleaned up: namespaces, veth pair, programs, links and pins removed")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
