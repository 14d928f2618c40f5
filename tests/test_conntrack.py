"""Stateful filtering on the netfilter hook, with real sockets between namespaces.

The protected host (the receiver) allows NEW connections only to TCP port 22 and accepts
ESTABLISHED and RELATED traffic everywhere; everything else is dropped by policy.
"""

from __future__ import annotations

import json
import socket
import threading

import pytest
from test_cli import bpfilter

from bpfilter import netns

RULES = """\
*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -i lo -j ACCEPT
-A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
-A INPUT -m conntrack --ctstate INVALID -j DROP
-A INPUT -p tcp -m tcp --dport 22 -m conntrack --ctstate NEW -j ACCEPT
COMMIT
"""


def sock_in(ns: str, family: int, kind: int) -> socket.socket:
    """A socket that belongs to namespace `ns`."""
    with netns.enter(ns):
        return socket.socket(family, kind)


def tcp_server(ns: str, addr: str, port: int) -> socket.socket:
    """A listening socket that answers each connection with b"hi" and keeps it open."""
    s = sock_in(ns, socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port))
    s.listen()

    def serve() -> None:
        while True:
            try:
                c, _ = s.accept()
            except OSError:
                return
            c.sendall(b"hi")
            threading.Thread(target=_echo, args=(c,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return s


def _echo(c: socket.socket) -> None:
    with c:
        while data := c.recv(64):
            c.sendall(data)


def connect(ns: str, addr: str, port: int, timeout: float = 1.0) -> socket.socket | None:
    """A connected TCP socket from namespace `ns`, or None if the connection failed."""
    s = sock_in(ns, socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect((addr, port))
        assert s.recv(2) == b"hi"
        return s
    except OSError:
        s.close()
        return None


@pytest.fixture
def protected(topology, bpffs, tmp_path):
    """The receiver with the stateful ruleset loaded on the netfilter hook."""
    rules = tmp_path / "stateful.v4"
    rules.write_text(RULES)
    args = ("--netns", topology.receiver.ns)
    bpfilter("restore", *args, str(rules), bpffs=bpffs)
    yield topology, args, rules
    bpfilter("flush", *args, bpffs=bpffs)


def test_new_only_to_port_22(protected):
    topo, _, _ = protected
    servers = [tcp_server(topo.receiver.ns, topo.receiver.ip4, p) for p in (22, 23)]
    try:
        ok = connect(topo.sender.ns, topo.receiver.ip4, 22)
        assert ok is not None, "port 22 must accept new connections"
        ok.sendall(b"ping")
        assert ok.recv(4) == b"ping"  # the rest of the connection is ESTABLISHED
        ok.close()
        assert connect(topo.sender.ns, topo.receiver.ip4, 23, timeout=0.5) is None
    finally:
        for s in servers:
            s.close()


def test_outgoing_connections_and_their_replies(protected):
    topo, _, _ = protected
    server = tcp_server(topo.sender.ns, topo.sender.ip4, 8000)
    try:
        c = connect(topo.receiver.ns, topo.sender.ip4, 8000)
        assert c is not None, "replies to the protected host's own connection are ESTABLISHED"
        c.close()
    finally:
        server.close()
    # UDP: a reply to the host's own datagram passes.
    echo = sock_in(topo.sender.ns, socket.AF_INET, socket.SOCK_DGRAM)
    echo.bind((topo.sender.ip4, 9000))
    cli = sock_in(topo.receiver.ns, socket.AF_INET, socket.SOCK_DGRAM)
    cli.settimeout(1.0)
    with echo, cli:
        cli.sendto(b"q", (topo.sender.ip4, 9000))
        _, peer = echo.recvfrom(8)
        echo.sendto(b"a", peer)
        assert cli.recv(8) == b"a"
        # Not a reply: a datagram from another port of the sender is NEW, and dropped.
        other = sock_in(topo.sender.ns, socket.AF_INET, socket.SOCK_DGRAM)
        with other:
            other.sendto(b"x", peer)
        cli.settimeout(0.3)
        with pytest.raises(TimeoutError):
            cli.recv(8)


def test_ping_replies_and_related_icmp(protected):
    topo, _, _ = protected
    r = netns.run(topo.receiver.ns, ["ping", "-c", "2", "-i", "0.2", "-W", "1",
                                      topo.sender.ip4], check=False, capture=True)
    assert r.returncode == 0, r.stdout
    # The sender pinging the protected host is NEW: dropped.
    r = netns.run(topo.sender.ns, ["ping", "-c", "1", "-W", "1", topo.receiver.ip4],
                  check=False, capture=True)
    assert r.returncode != 0
    # ICMP port unreachable for the host's own UDP flow is RELATED: the socket hears of it.
    cli = sock_in(topo.receiver.ns, socket.AF_INET, socket.SOCK_DGRAM)
    cli.settimeout(1.0)
    with cli:
        cli.connect((topo.sender.ip4, 9))  # nothing listens there
        cli.send(b"x")
        with pytest.raises(ConnectionRefusedError):
            cli.recv(8)


def test_conntrack_list_and_flush(protected, bpffs):
    topo, args, _ = protected
    server = tcp_server(topo.receiver.ns, topo.receiver.ip4, 22)
    try:
        c = connect(topo.sender.ns, topo.receiver.ip4, 22)
        assert c is not None
        out = bpfilter("conntrack", "list", *args, bpffs=bpffs).stdout
        line = next(x for x in out.splitlines() if "dport=22 " in x)
        assert line.startswith("tcp      6 ") and " ESTABLISHED " in line
        entries = [json.loads(x) for x in
                   bpfilter("conntrack", "list", "--json", *args, bpffs=bpffs).stdout.split("\n")
                   if x]
        e = next(x for x in entries if x["original"].get("dport") == 22)
        assert e["state"] == "ESTABLISHED" and e["original"]["src"] == topo.sender.ip4
        bpfilter("conntrack", "flush", *args, bpffs=bpffs)
        assert "dport=22 " not in bpfilter("conntrack", "list", *args, bpffs=bpffs).stdout
        c.close()
    finally:
        server.close()


def test_connections_survive_a_ruleset_replace(protected, bpffs):
    topo, args, rules = protected
    server = tcp_server(topo.receiver.ns, topo.receiver.ip4, 22)
    try:
        c = connect(topo.sender.ns, topo.receiver.ip4, 22)
        assert c is not None
        # The new ruleset no longer admits new connections to port 22 at all.
        rules.write_text(RULES.replace("--dport 22", "--dport 2222"))
        bpfilter("restore", *args, str(rules), bpffs=bpffs)
        c.sendall(b"still")
        assert c.recv(5) == b"still"
        c.close()
        assert connect(topo.sender.ns, topo.receiver.ip4, 22, timeout=0.5) is None
    finally:
        server.close()

