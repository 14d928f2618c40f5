"""The nat table on tc ingress, with real sockets: client -> router -> server namespaces.

The router runs the ruleset at tcx ingress of the interface facing the client; its kernel's
nf_nat translates the connections the programs bind (see bpfilter/compiler/nat.py).
"""

from __future__ import annotations

import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
from conftest import require_kernel
from helpers.names import unique_name
from helpers.topology import create_netns, delete_netns, ip_batch, wait_running, write_sysctl
from test_cli import bpfilter
from test_conntrack import connect, sock_in, tcp_server

from bpfilter.runtime import conntrack

# Addresses only ever exist inside the test's own namespaces.
CLIENT, ROUTER_IN = "192.168.77.2", "192.168.77.1"
ROUTER_OUT, SERVER = "172.31.77.1", "172.31.77.2"
SNAT_LO, SNAT_HI = "172.31.77.10", "172.31.77.11"


@dataclass(frozen=True)
class Net:
    """Three namespaces: client | router (rin, rout) | server."""

    client: str
    router: str
    server: str
    rin: str
    rout: str
    cif: str = ""  # the client's and the server's interfaces
    sif: str = ""


@dataclass(frozen=True)
class Plan:
    """The addresses of a three-namespace topology (one family)."""

    client: str
    router_in: str
    router_out: str
    server: str
    extra_out: tuple[str, ...]  # more router addresses facing the server (SNAT targets)
    plen: int  # prefix length of both links
    host: int  # prefix length of the extra addresses


V4 = Plan(CLIENT, ROUTER_IN, ROUTER_OUT, SERVER, (SNAT_LO, SNAT_HI), 24, 32)


def _veth(a_ns: str, a: str, b_ns: str, b: str) -> None:
    # Both ends are created directly inside their namespaces: nothing appears in ours.
    subprocess.run(["ip", "link", "add", a, "netns", a_ns, "type", "veth", "peer", "name", b,
                    "netns", b_ns], check=True, capture_output=True, text=True)


@contextmanager
def three_namespaces(plan: Plan) -> Iterator[Net]:
    """client -- router -- server with `plan`'s addresses; everything is removed after."""
    require_kernel()
    v6 = ":" in plan.client
    base = unique_name()  # interface names must stay within 15 characters
    names = [base + "nc", base + "nr", base + "ns"]
    made: list[str] = []
    try:
        for n in names:
            create_netns(n)
            made.append(n)
            if v6:  # interfaces made from here on skip duplicate address detection
                write_sysctl(n, "net.ipv6.conf.default.accept_dad", 0)
        c, r, s = names
        cif, rin, rout, sif = base + "c", base + "i", base + "o", base + "s"
        _veth(c, cif, r, rin)
        _veth(r, rout, s, sif)
        # nodad: the addresses are usable (and REDIRECT's candidates) at once.
        opt = " nodad" if v6 else ""
        ip_batch(c, [f"addr add {plan.client}/{plan.plen} dev {cif}{opt}", f"link set {cif} up",
                     f"route add default via {plan.router_in}"])
        ip_batch(r, [f"addr add {plan.router_in}/{plan.plen} dev {rin}{opt}",
                     f"link set {rin} up",
                     f"addr add {plan.router_out}/{plan.plen} dev {rout}{opt}",
                     f"link set {rout} up",
                     *(f"addr add {x}/{plan.host} dev {rout}{opt}" for x in plan.extra_out)])
        ip_batch(s, [f"addr add {plan.server}/{plan.plen} dev {sif}{opt}", f"link set {sif} up",
                     f"route add default via {plan.router_out}"])
        if v6:
            write_sysctl(r, "net.ipv6.conf.all.forwarding", 1)
        else:
            write_sysctl(r, "net.ipv4.ip_forward", 1)
        for ns, ifs in ((c, [cif]), (r, [rin, rout]), (s, [sif])):
            for i in ifs:
                if not v6:
                    write_sysctl(ns, f"net.ipv4.conf.{i}.rp_filter", 0)
                wait_running(ns, i)
        yield Net(c, r, s, rin, rout, cif, sif)
    finally:
        for n in made:
            delete_netns(n)


@pytest.fixture
def net() -> Iterator[Net]:
    """client 192.168.77.2 -- 192.168.77.1 router 172.31.77.1 -- 172.31.77.2 server."""
    with three_namespaces(V4) as n:
        yield n


@pytest.fixture
def router(net, bpffs):
    """restore(text) loads a ruleset at the router's client-facing tc ingress."""
    args = ("--netns", net.router, "--hook", "tc", "--iface", net.rin)

    def restore(text: str, check: bool = True):
        return bpfilter("restore", *args, stdin=text, bpffs=bpffs, check=check)

    try:
        yield restore
    finally:
        bpfilter("flush", *args, bpffs=bpffs, check=False)


def nat(*rules: str) -> str:
    """A nat table with `rules` (an empty filter table keeps INPUT open)."""
    return ("*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
            ":POSTROUTING ACCEPT [0:0]\n" + "".join(r + "\n" for r in rules) + "COMMIT\n")


def family_of(addr: str) -> int:
    """The socket family of a textual address."""
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def peer_of(server: socket.socket) -> tuple[str, int]:
    """Accept one connection on a plain listening socket; the client's address as seen."""
    server.settimeout(2.0)
    c, addr = server.accept()
    with c:
        c.sendall(b"hi")
    return addr[:2]


def listener(ns: str, addr: str, port: int) -> socket.socket:
    """A listening TCP socket in `ns`."""
    s = sock_in(ns, family_of(addr), socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port))
    s.listen()
    return s


def udp_echo_once(ns: str, addr: str, port: int) -> socket.socket:
    """A UDP socket in `ns` (answer with answer_udp)."""
    s = sock_in(ns, family_of(addr), socket.SOCK_DGRAM)
    s.bind((addr, port))
    s.settimeout(2.0)
    return s


def answer_udp(s: socket.socket) -> tuple[str, int]:
    """Receive one datagram and send it back; the sender's address as seen."""
    data, addr = s.recvfrom(100)
    s.sendto(b"re:" + data, addr)
    return addr[:2]


def udp_ask(ns: str, addr: str, port: int) -> tuple[bytes, tuple[str, int]] | None:
    """Send a datagram from `ns`, return (reply, who replied) or None."""
    s = sock_in(ns, family_of(addr), socket.SOCK_DGRAM)
    s.settimeout(2.0)
    with s:
        s.sendto(b"q", (addr, port))
        try:
            data, who = s.recvfrom(100)
        except OSError:
            return None
        return data, who[:2]


def udp_round(net: Net, usrv: socket.socket, addr: str, port: int):
    """One datagram from the client to addr:port answered by `usrv`: (sender the server saw,
    (reply, who the client saw reply))."""
    seen: list = []
    t = threading.Thread(target=lambda: seen.append(answer_udp(usrv)))
    t.start()
    got = udp_ask(net.client, addr, port)
    t.join()
    return (seen[0] if seen else None), got


def client_to(ns: str, addr: str, port: int) -> socket.socket:
    """A TCP socket from `ns` connected to addr:port (raises when the connection fails)."""
    c = sock_in(ns, family_of(addr), socket.SOCK_STREAM)
    c.settimeout(2.0)
    try:
        c.connect((addr, port))
    except OSError:
        c.close()
        raise
    return c


def test_dnat_tcp_and_udp(net, router):
    router(nat("-A PREROUTING -p tcp -m tcp --dport 8080 -j DNAT --to-destination "
               f"{SERVER}:80",
               f"-A PREROUTING -p udp -m udp --dport 5353 -j DNAT --to-destination {SERVER}:53"))
    srv = tcp_server(net.server, SERVER, 80)
    usrv = udp_echo_once(net.server, SERVER, 53)
    try:
        c = connect(net.client, ROUTER_IN, 8080, timeout=2.0)
        assert c is not None, "DNAT of TCP 8080 to the server failed"
        with c:
            assert c.getpeername() == (ROUTER_IN, 8080)
            c.sendall(b"echo")
            assert c.recv(4) == b"echo"
        seen, got = udp_round(net, usrv, ROUTER_IN, 5353)
        assert seen and seen[0] == CLIENT  # no SNAT: the server sees the client
        assert got is not None and got[0] == b"re:q"
        assert got[1] == (ROUTER_IN, 5353), "the reply must come from the original address"
        # The router's kernel holds the bindings: original tuple to the router, reply from
        # the server.
        lines = conntrack.entries(net.router)
        assert any(f"dst={ROUTER_IN}" in x and f"src={SERVER}" in x and "dport=8080" in x
                   for x in lines), lines
    finally:
        srv.close()
        usrv.close()


def test_masquerade_behind_router(net, router):
    router(nat(f"-A POSTROUTING -o {net.rout} -j MASQUERADE"))
    srv = listener(net.server, SERVER, 80)
    usrv = udp_echo_once(net.server, SERVER, 53)
    try:
        c = sock_in(net.client, socket.AF_INET, socket.SOCK_STREAM)
        c.settimeout(2.0)
        with c:
            c.connect((SERVER, 80))
            addr = peer_of(srv)
            assert addr[0] == ROUTER_OUT, f"the server must see the router, saw {addr}"
            assert c.recv(2) == b"hi"
        seen, got = udp_round(net, usrv, SERVER, 53)
        assert seen and seen[0] == ROUTER_OUT
        assert got is not None and got == (b"re:q", (SERVER, 53))
    finally:
        srv.close()
        usrv.close()


def test_user_chain_return_and_counters(net, router, bpffs):
    # nat rules keep netfilter's traversal: a user chain, RETURN, then the next rule.
    router(nat("-N masq", f"-A POSTROUTING -o {net.rout} -j masq",
               "-A masq -p tcp -m tcp --dport 81 -j RETURN", "-A masq -j MASQUERADE"))
    servers = {p: listener(net.server, SERVER, p) for p in (80, 81)}
    try:
        for port, want in ((80, ROUTER_OUT), (81, CLIENT)):
            c = sock_in(net.client, socket.AF_INET, socket.SOCK_STREAM)
            c.settimeout(2.0)
            with c:
                c.connect((SERVER, port))
                assert peer_of(servers[port])[0] == want, port
        # Only a connection's first packet traverses the nat table, as in netfilter.
        out = bpfilter("list", "--netns", net.router, "--hook", "tc", "--iface", net.rin,
                       "-t", "nat", "-v", "-n", "-x", "masq", bpffs=bpffs).stdout
        counts = [int(x.split()[0]) for x in out.splitlines()[2:] if x.strip()]
        assert counts == [1, 1], out
    finally:
        for s in servers.values():
            s.close()


def test_masquerade_only_matching_output(net, router):
    # -o names another interface: nothing is translated, the server sees the client.
    router(nat("-A POSTROUTING -o nosuchif0 -j MASQUERADE"))
    srv = listener(net.server, SERVER, 80)
    try:
        c = sock_in(net.client, socket.AF_INET, socket.SOCK_STREAM)
        c.settimeout(2.0)
        with c:
            c.connect((SERVER, 80))
            assert peer_of(srv)[0] == CLIENT
    finally:
        srv.close()


def test_snat_address_and_port_range(net, router):
    router(nat(f"-A POSTROUTING -o {net.rout} -p tcp -j SNAT --to-source "
               f"{SNAT_LO}-{SNAT_HI}:40000-40003",
               f"-A POSTROUTING -o {net.rout} -p udp -j SNAT --to-source {SNAT_LO}:41000-41001"))
    srv = listener(net.server, SERVER, 80)
    lo, hi = (int(x.rsplit(".", 1)[1]) for x in (SNAT_LO, SNAT_HI))
    try:
        ports = set()
        clients = []
        for _ in range(4):  # four connections from one client: four distinct ports
            c = sock_in(net.client, socket.AF_INET, socket.SOCK_STREAM)
            c.settimeout(2.0)
            c.connect((SERVER, 80))
            clients.append(c)
            ip, port = peer_of(srv)
            assert ip.startswith("172.31.77.") and lo <= int(ip.rsplit(".", 1)[1]) <= hi, ip
            assert 40000 <= port <= 40003, port
            assert c.recv(2) == b"hi"
            ports.add((ip, port))
        assert len(ports) == 4, ports
        for c in clients:
            c.close()
        usrv = udp_echo_once(net.server, SERVER, 53)
        with usrv:
            seen, got = udp_round(net, usrv, SERVER, 53)
            assert seen and seen[0] == SNAT_LO and 41000 <= seen[1] <= 41001, seen
            assert got == (b"re:q", (SERVER, 53))
    finally:
        srv.close()


def test_redirect_to_local_port(net, router):
    router(nat("-A PREROUTING -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 9000"))
    local = tcp_server(net.router, "0.0.0.0", 9000)
    try:
        c = connect(net.client, SERVER, 80, timeout=2.0)
        assert c is not None, "REDIRECT to the router's port 9000 failed"
        with c:
            assert c.getpeername() == (SERVER, 80)
            c.sendall(b"abc")
            assert c.recv(3) == b"abc"
    finally:
        local.close()


def test_connection_survives_replace(net, router):
    dnat = "-A PREROUTING -p tcp -m tcp --dport 8080 -j DNAT --to-destination " + SERVER + ":80"
    router(nat(dnat))
    srv = tcp_server(net.server, SERVER, 80)
    try:
        c = connect(net.client, ROUTER_IN, 8080, timeout=2.0)
        assert c is not None
        with c:
            c.sendall(b"one")
            assert c.recv(3) == b"one"
            # A different ruleset (this port no longer translated for new connections).
            router(nat("-A PREROUTING -p tcp -m tcp --dport 8081 -j DNAT --to-destination "
                       f"{SERVER}:80"))
            c.sendall(b"two")
            assert c.recv(3) == b"two", "the established connection must survive the replace"
            router(nat(dnat))
            c.sendall(b"six")
            assert c.recv(3) == b"six"
        d = connect(net.client, ROUTER_IN, 8080, timeout=2.0)
        assert d is not None, "new connections follow the restored ruleset"
        d.close()
    finally:
        srv.close()


def test_source_port_reused_after_close(net, router):
    # The second connection's SYN meets the first one's TIME_WAIT entry: it is bound anew.
    router(nat("-A PREROUTING -p tcp -m tcp --dport 8080 -j DNAT --to-destination "
               f"{SERVER}:80"))
    srv = listener(net.server, SERVER, 80)
    try:
        for round_ in range(2):
            c = sock_in(net.client, socket.AF_INET, socket.SOCK_STREAM)
            c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            c.settimeout(2.0)
            with c:
                c.bind((CLIENT, 45678))
                c.connect((ROUTER_IN, 8080))
                srv.settimeout(2.0)
                conn, addr = srv.accept()
                assert addr == (CLIENT, 45678), (round_, addr)
                conn.close()  # the server closes first: TIME_WAIT on its side
                assert c.recv(10) == b""
        states = [x for x in conntrack.entries(net.router) if "sport=45678" in x]
        assert states and all(f"src={SERVER}" in x for x in states), states
    finally:
        srv.close()


def test_filter_and_nat_together(net, router):
    # The filter table's INPUT (every packet at this ingress) runs before nat.
    router("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
           "-A INPUT -p tcp -m tcp --dport 8081 -j DROP\nCOMMIT\n"
           + nat("-A PREROUTING -p tcp -j DNAT --to-destination " + SERVER + ":80"))
    srv = tcp_server(net.server, SERVER, 80)
    try:
        c = connect(net.client, ROUTER_IN, 8080, timeout=2.0)
        assert c is not None
        c.close()
        assert connect(net.client, ROUTER_IN, 8081, timeout=0.5) is None
    finally:
        srv.close()


@pytest.mark.parametrize(("hook", "rules", "words"), [
    ("nf", nat("-A PREROUTING -p tcp -j DNAT --to-destination 10.0.0.1"), "needs --hook tc"),
    ("xdp", nat("-A POSTROUTING -j MASQUERADE"), "needs --hook tc"),
    ("nf", nat("-A INPUT -j SNAT --to-source 10.0.0.1"), "needs --hook tc"),
])
def test_refusals_name_the_feature(net, bpffs, hook, rules, words):
    args = ["--netns", net.router, "--hook", hook]
    if hook != "nf":
        args += ["--iface", net.rin]
    r = bpfilter("restore", *args, stdin=rules, bpffs=bpffs, check=False)
    assert r.returncode != 0
    assert words in r.stderr and "nat" in r.stderr, r.stderr
