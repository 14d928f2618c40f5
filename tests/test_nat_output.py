"""The nat OUTPUT chain at the sockets (cgroup sock_addr programs), with real sockets.

Namespaces: client | server | twin. The ruleset is loaded for the client's namespace with
`--cgroup` a child cgroup of the test's own; the client runs as a separate process inside that
cgroup (a socket belongs to its creator's cgroup). The server namespace holds the real servers
and, on the virtual address, decoys that answer when a connection was not translated. The twin
namespace runs the kernel's iptables nat OUTPUT with the same rule, for comparison.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from conftest import require_kernel
from helpers.names import unique_name
from helpers.topology import create_netns, delete_netns, ip_batch, wait_running, write_sysctl
from test_cli import bpfilter
from test_conntrack import sock_in

# Addresses only ever exist inside the test's own namespaces.
CLIENT, SERVER = "10.77.1.2", "10.77.1.1"
TWIN, SERVER_T = "10.77.2.2", "10.77.2.1"
VIP = "10.77.9.9"  # the virtual address: decoys answer there when nothing translates
RANGE_LO, RANGE_HI = "10.77.1.11", "10.77.1.12"
CLIENT6, SERVER6, VIP6 = "fd77:1::2", "fd77:1::1", "fd77:9::9"


@dataclass(frozen=True)
class Net:
    """Client, server and twin namespaces."""

    client: str
    server: str
    twin: str
    cif: str  # the client's interface


def _veth(a_ns: str, a: str, b_ns: str, b: str) -> None:
    # Both ends are created directly inside their namespaces: nothing appears in ours.
    subprocess.run(["ip", "link", "add", a, "netns", a_ns, "type", "veth", "peer", "name", b,
                    "netns", b_ns], check=True, capture_output=True, text=True)


@pytest.fixture
def net() -> Iterator[Net]:
    """client 10.77.1.2 -- 10.77.1.1 server 10.77.2.1 -- 10.77.2.2 twin; VIP on the server."""
    require_kernel()
    base = unique_name()
    names = [base + "c", base + "s", base + "t"]
    made: list[str] = []
    try:
        for n in names:
            create_netns(n)
            made.append(n)
        c, s, t = names
        cif, scif, stif, tif = base + "c", base + "x", base + "y", base + "t"
        _veth(c, cif, s, scif)
        _veth(s, stif, t, tif)
        ip_batch(c, [f"addr add {CLIENT}/24 dev {cif}", f"addr add {CLIENT6}/64 dev {cif} nodad",
                     f"link set {cif} up", f"route add 10.77.0.0/16 via {SERVER}",
                     f"route add fd77::/16 via {SERVER6}"])
        ip_batch(s, [f"addr add {SERVER}/24 dev {scif}", f"addr add {SERVER6}/64 dev {scif} nodad",
                     f"link set {scif} up", f"addr add {SERVER_T}/24 dev {stif}",
                     f"link set {stif} up", f"addr add {VIP}/32 dev lo",
                     f"addr add {VIP6}/128 dev lo", f"addr add {RANGE_LO}/32 dev lo",
                     f"addr add {RANGE_HI}/32 dev lo"])
        ip_batch(t, [f"addr add {TWIN}/24 dev {tif}", f"link set {tif} up",
                     f"route add 10.77.0.0/16 via {SERVER_T}"])
        for ns, ifs in ((c, [cif]), (s, [scif, stif]), (t, [tif])):
            for i in ifs:
                write_sysctl(ns, f"net.ipv4.conf.{i}.rp_filter", 0)
                wait_running(ns, i)
        yield Net(c, s, t, cif)
    finally:
        for n in made:
            delete_netns(n)


# -- servers that say who they are -------------------------------------------------------------


class Servers:
    """Tagged TCP and UDP servers in the server namespace: TCP sends `tag\\n`, then echoes;
    UDP answers `tag:data`."""

    def __init__(self, ns: str) -> None:
        self.ns = ns
        self.socks: list[socket.socket] = []

    def tcp(self, addr: str, port: int, tag: str) -> None:
        """Listen on addr:port."""
        fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
        s = sock_in(self.ns, fam, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((addr, port))
        s.listen()
        self.socks.append(s)

        def echo(c: socket.socket) -> None:
            with c:
                c.sendall(tag.encode() + b"\n")
                while data := c.recv(100):
                    c.sendall(data)

        def serve() -> None:
            while True:
                try:
                    c, _ = s.accept()
                except OSError:
                    return
                threading.Thread(target=echo, args=(c,), daemon=True).start()

        threading.Thread(target=serve, daemon=True).start()

    def udp(self, addr: str, port: int, tag: str) -> None:
        """Answer datagrams on addr:port."""
        fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
        s = sock_in(self.ns, fam, socket.SOCK_DGRAM)
        s.bind((addr, port))
        self.socks.append(s)

        def serve() -> None:
            while True:
                try:
                    data, peer = s.recvfrom(100)
                    s.sendto(tag.encode() + b":" + data, peer)
                except OSError:
                    return

        threading.Thread(target=serve, daemon=True).start()

    def close(self) -> None:
        """Stop every server."""
        for s in self.socks:
            s.close()


@pytest.fixture
def servers(net) -> Iterator[Servers]:
    """Real servers on SERVER, decoys on VIP (answering only what was not translated)."""
    srv = Servers(net.server)
    srv.tcp(SERVER, 8080, "real")
    srv.tcp(SERVER, 8081, "real2")
    srv.tcp(VIP, 80, "decoy")
    srv.tcp(VIP, 81, "decoy")
    srv.udp(SERVER, 5353, "real")
    srv.udp(VIP, 53, "decoy")
    srv.tcp(RANGE_LO, 8080, "lo")
    srv.tcp(RANGE_HI, 8080, "hi")
    srv.tcp(SERVER6, 8080, "real6")
    srv.tcp(VIP6, 80, "decoy6")
    srv.udp(SERVER6, 5353, "real6")
    try:
        yield srv
    finally:
        srv.close()


# -- a client process inside the cgroup --------------------------------------------------------

CLIENT_CODE = r"""
import json, os, socket, sys
from bpfilter import netns
cgroup, ns = sys.argv[1], sys.argv[2]
if cgroup != "-":  # join before making sockets: a socket belongs to its creator's cgroup
    with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))
held = {}
def fam(addr):
    return socket.AF_INET6 if ":" in addr else socket.AF_INET
def peer(s):
    return list(s.getpeername()[:2])
def do(req):
    op = req["op"]
    if op == "tcp":
        s = socket.socket(fam(req["addr"]), socket.SOCK_STREAM)
        s.settimeout(2)
        s.connect((req["addr"], req["port"]))
        tag = b""
        while not tag.endswith(b"\n"):
            tag += s.recv(1)
        out = {"peer": peer(s), "tag": tag.decode().strip()}
        if req.get("hold"):
            held[len(held)] = s
            out["id"] = len(held) - 1
        else:
            s.close()
        return out
    if op == "echo":
        s = held[req["id"]]
        s.sendall(req["data"].encode())
        return {"data": s.recv(100).decode(), "peer": peer(s)}
    if op == "udp":
        s = socket.socket(fam(req["addr"]), socket.SOCK_DGRAM)
        s.settimeout(2)
        with s:
            out = {}
            if req.get("connect"):
                s.connect((req["addr"], req["port"]))
                out["peer"] = peer(s)
                s.send(b"q")
            else:
                s.sendto(b"q", (req["addr"], req["port"]))
            data, src = s.recvfrom(100)
            out.update(data=data.decode(), src=list(src[:2]))
            return out
    raise ValueError(op)
with netns.enter(ns):
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "quit":
            break
        try:
            out = {"ok": True, **do(req)}
        except Exception as e:
            out = {"ok": False, "err": f"{type(e).__name__}: {e}"}
        print(json.dumps(out), flush=True)
"""


class Client:
    """A client process in namespace `ns` and cgroup `cgroup` (None: this test's own)."""

    def __init__(self, ns: str, cgroup: str | None) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", CLIENT_CODE, cgroup or "-", ns],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert json.loads(self._line()) == {"ready": True}

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"client exited ({self.proc.poll()})"
        return line

    def ask(self, **req) -> dict:
        """Run one request; its answer."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return json.loads(self._line())

    def tcp(self, addr: str, port: int, hold: bool = False) -> dict:
        """Connect; the server's tag and getpeername()."""
        return self.ask(op="tcp", addr=addr, port=port, hold=hold)

    def udp(self, addr: str, port: int, connect: bool = False) -> dict:
        """One datagram and its answer: data and the source recvfrom() reports."""
        return self.ask(op="udp", addr=addr, port=port, connect=connect)

    def close(self) -> None:
        """Stop the process."""
        if self.proc.poll() is None:
            with contextlib.suppress(AssertionError, OSError, ValueError):
                self.ask(op="quit")
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            if f:
                f.close()


@pytest.fixture
def clients(net, cgroup2) -> Iterator:
    """make(ns, inside=True) starts a client in the test cgroup (or outside it)."""
    made: list[Client] = []

    def make(ns: str | None = None, inside: bool = True) -> Client:
        c = Client(ns or net.client, cgroup2 if inside else None)
        made.append(c)
        return c

    try:
        yield make
    finally:
        for c in made:
            c.close()


@pytest.fixture
def load(net, bpffs, cgroup2):
    """load(text) restores a ruleset for the client's namespace, nat OUTPUT at the cgroup."""
    assert cgroup2 != "/sys/fs/cgroup" and cgroup2.count("/") > 3  # never the root cgroup

    def restore(text: str, *extra: str, check: bool = True, six: bool = False):
        args = ("-6",) if six else ()
        return bpfilter("restore", *args, "--netns", net.client, "--cgroup", cgroup2, *extra,
                        stdin=text, bpffs=bpffs, check=check)

    try:
        yield restore
    finally:
        bpfilter("flush", "--netns", net.client, "--all-hooks", bpffs=bpffs, check=False)


def nat(*rules: str) -> str:
    """A nat table with `rules`."""
    return ("*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
            ":POSTROUTING ACCEPT [0:0]\n" + "".join(r + "\n" for r in rules) + "COMMIT\n")


DNAT_TCP = f"-A OUTPUT -p tcp -d {VIP}/32 --dport 80 -j DNAT --to-destination {SERVER}:8080"
DNAT_UDP = f"-A OUTPUT -p udp -d {VIP}/32 --dport 53 -j DNAT --to-destination {SERVER}:5353"


# -- tests ---------------------------------------------------------------------------------------


def test_tcp_dnat_reaches_server_and_keeps_peer_name(net, servers, load, clients, bpffs):
    load(nat(DNAT_TCP))
    c = clients()
    r = c.tcp(VIP, 80)
    assert r == {"ok": True, "peer": [VIP, 80], "tag": "real"}, r
    # Rules are evaluated per connect: other destinations are left alone.
    assert c.tcp(VIP, 81)["tag"] == "decoy"
    dump = bpfilter("dump", "--netns", net.client, bpffs=bpffs).stdout
    assert "table nat chain OUTPUT (sock)" in dump, dump[:500]


def test_udp_dnat_reply_comes_from_virtual_address(net, servers, load, clients):
    load(nat(DNAT_UDP))
    c = clients()
    r = c.udp(VIP, 53)
    assert r == {"ok": True, "data": "real:q", "src": [VIP, 53]}, r
    # A connected UDP socket is translated at connect(): same answer, same names.
    r = c.udp(VIP, 53, connect=True)
    assert r == {"ok": True, "peer": [VIP, 53], "data": "real:q", "src": [VIP, 53]}, r


def test_redirect_to_local_listener(net, servers, load, clients):
    load(nat(f"-A OUTPUT -p tcp -d {VIP} --dport 81 -j REDIRECT --to-ports 9000"))
    local = Servers(net.client)
    local.tcp("127.0.0.1", 9000, "local")
    try:
        r = clients().tcp(VIP, 81)
        assert r == {"ok": True, "peer": [VIP, 81], "tag": "local"}, r
    finally:
        local.close()


def test_user_chain_return_and_docker_shape(net, servers, load, clients, bpffs):
    # Docker's OUTPUT shape: a user chain, `-i` (never matches: no input interface) and
    # `! -i` (always matches), RETURN, then the next rule.
    load(nat("-N DOCKER", "-A OUTPUT ! -d 127.0.0.0/8 -j DOCKER",
             "-A DOCKER -i lo -j RETURN",
             "-A DOCKER -p tcp --dport 81 -j RETURN",
             f"-A DOCKER ! -i nosuch0 -p tcp -m tcp --dport 80 -j DNAT --to-destination "
             f"{SERVER}:8080",
             f"-A OUTPUT -p tcp --dport 81 -j DNAT --to-destination {SERVER}:8081"))
    c = clients()
    assert c.tcp(VIP, 80)["tag"] == "real"
    assert c.tcp(VIP, 81)["tag"] == "real2"
    out = bpfilter("list", "--netns", net.client, "-t", "nat", "-v", "-n", "-x", "DOCKER",
                   bpffs=bpffs).stdout
    counts = [int(x.split()[0]) for x in out.splitlines()[2:] if x.strip()]
    assert counts == [0, 1, 1], out  # one evaluation per connect, as netfilter's per connection


def test_docker_local_destination_type(net, servers, load, clients):
    # Docker's `-A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER`: only
    # connections to the host's own addresses are published ports.
    load(nat("-N DOCKER", "-A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER",
             f"-A DOCKER ! -i nosuch0 -p tcp -m tcp --dport 80 -j DNAT --to-destination "
             f"{SERVER}:8080"))
    c = clients()
    assert c.tcp(CLIENT, 80)["tag"] == "real"  # the client's own address: LOCAL
    assert c.tcp(VIP, 80)["tag"] == "decoy"  # elsewhere: UNICAST, untranslated


def test_address_and_port_ranges(net, servers, load, clients):
    # nf_nat keeps a destination port the range holds, else takes its first port; addresses of
    # a range are chosen by a hash (one destination: always the same one).
    load(nat(f"-A OUTPUT -p tcp -d {VIP} --dport 80 -j DNAT --to-destination "
             f"{RANGE_LO}-{RANGE_HI}:8080-8090"))
    c = clients()
    tags = {c.tcp(VIP, 80)["tag"] for _ in range(4)}
    assert len(tags) == 1 and tags <= {"lo", "hi"}, tags


def test_outside_cgroup_and_other_namespace_untouched(net, servers, load, clients):
    load(nat(DNAT_TCP, DNAT_UDP))
    assert clients().tcp(VIP, 80)["tag"] == "real"
    # This test process is not in the cgroup.
    s = sock_in(net.client, socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(2)
    with s:
        s.connect((VIP, 80))
        assert s.recv(6) == b"decoy\n"
    # A process in the cgroup, but in another namespace (the twin, without any rule).
    twin = clients(net.twin)
    assert twin.tcp(VIP, 80) == {"ok": True, "peer": [VIP, 80], "tag": "decoy"}
    assert twin.udp(VIP, 53)["data"] == "decoy:q"


def test_restore_switches_new_connections_keeps_open_one(net, servers, load, clients):
    load(nat(DNAT_TCP))
    c = clients()
    held = c.tcp(VIP, 80, hold=True)
    assert held["tag"] == "real"
    load(nat(f"-A OUTPUT -p tcp -d {VIP} --dport 80 -j DNAT --to-destination {SERVER}:8081"))
    assert c.ask(op="echo", id=held["id"], data="still") == \
        {"ok": True, "data": "still", "peer": [VIP, 80]}
    assert c.tcp(VIP, 80)["tag"] == "real2"
    # Without nat OUTPUT rules new connections go where they were addressed; the open one,
    # made by the first ruleset, still answers and keeps its name.
    load(nat())
    assert c.tcp(VIP, 80)["tag"] == "decoy"
    assert c.ask(op="echo", id=held["id"], data="again")["peer"] == [VIP, 80]


def test_same_as_kernel_nat_output(net, servers, load, clients):
    rules = nat(DNAT_TCP, DNAT_UDP)
    load(rules)
    subprocess.run(["ip", "netns", "exec", net.twin, "iptables-restore"], input=rules,
                   text=True, check=True, capture_output=True)
    ours, kernel = clients(), clients(net.twin, inside=False)
    for ask in (lambda c: c.tcp(VIP, 80), lambda c: c.tcp(VIP, 81),
                lambda c: c.udp(VIP, 53), lambda c: c.udp(VIP, 53, connect=True)):
        assert ask(ours) == ask(kernel)


def test_with_tc_nat_table(net, servers, load, clients, bpffs):
    # One nat table, both halves: PREROUTING bound at tc ingress of the client's interface,
    # OUTPUT at the sockets; one counter table for both.
    load(nat(f"-A PREROUTING -p tcp --dport 7000 -j DNAT --to-destination {CLIENT}:9000",
             DNAT_TCP), "--hook", "tc", "--iface", net.cif)
    local = Servers(net.client)
    local.tcp(CLIENT, 9000, "local")
    try:
        assert clients().tcp(VIP, 80)["tag"] == "real"
        inbound = clients(net.server, inside=False).tcp(CLIENT, 7000)
        assert inbound == {"ok": True, "peer": [CLIENT, 7000], "tag": "local"}, inbound
    finally:
        local.close()
    out = bpfilter("list", "--netns", net.client, "--hook", "tc", "--iface", net.cif, "-t", "nat",
                   "-v", "-n", "-x", bpffs=bpffs).stdout
    rules = [x.split()[0] for x in out.splitlines() if "DNAT" in x and "dpt:" in x]
    assert rules == ["1", "1"], out
    bpfilter("flush", "--netns", net.client, "--hook", "tc", "--iface", net.cif, bpffs=bpffs)
    assert clients().tcp(VIP, 80)["tag"] == "decoy"


def test_drop_policy_refuses_connect(net, servers, load, clients):
    load(nat("-A OUTPUT -p tcp --dport 81 -j DROP"))
    c = clients()
    r = c.tcp(VIP, 81)
    assert not r["ok"] and "PermissionError" in r["err"], r
    assert c.tcp(VIP, 80)["tag"] == "decoy"


@pytest.mark.parametrize(("rule", "words"), [
    (f"-A OUTPUT -s {CLIENT} -p tcp -j DNAT --to-destination {SERVER}", "-s: the source"),
    (f"-A OUTPUT -o lo -p tcp -j DNAT --to-destination {SERVER}", "-o: the output interface"),
    ("-A OUTPUT -m mark --mark 1 -j DNAT --to-destination 10.0.0.1", "-m mark"),
    ("-A OUTPUT -j SNAT --to-source 10.0.0.1", "SNAT"),
    ("-A OUTPUT -m addrtype --src-type LOCAL -j DNAT --to-destination 10.0.0.1", "--src-type"),
])
def test_refusals_name_rule_and_line(rule, words, tmp_path, bpffs):
    f = tmp_path / "rules"
    f.write_text(nat(rule))
    r = bpfilter("restore", "--test", str(f), bpffs=bpffs, check=False)
    assert r.returncode != 0 and words in r.stderr and f"{f}:6" in r.stderr, r.stderr


def test_ipv6_dnat(net, servers, load, clients):
    load(nat(f"-A OUTPUT -p tcp -d {VIP6} --dport 80 -j DNAT --to-destination "
             f"[{SERVER6}]:8080",
             f"-A OUTPUT -p udp -d {VIP6} --dport 53 -j DNAT --to-destination "
             f"[{SERVER6}]:5353",
             f"-A OUTPUT -p tcp -d {VIP6} --dport 81 -j REDIRECT --to-ports 9000"), six=True)
    local = Servers(net.client)
    local.tcp("::1", 9000, "local6")
    try:
        c = clients()
        assert c.tcp(VIP6, 80) == {"ok": True, "peer": [VIP6, 80], "tag": "real6"}
        assert c.udp(VIP6, 53) == {"ok": True, "data": "real6:q", "src": [VIP6, 53]}
        assert c.tcp(VIP6, 81) == {"ok": True, "peer": [VIP6, 81], "tag": "local6"}
    finally:
        local.close()
