"""IPv6 NAT (ip6tables -t nat) on tc ingress, with real sockets: client -> router -> server.

Every scenario runs twice: with pybpfilter at the router's client-facing tc ingress, and with
the kernel's own ip6tables nat table in an identical twin topology. The assertions are the
same for both, so what the server (or the redirected listener) sees is the kernel's answer.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Callable, Iterator

import pytest
from helpers.topology import ip_batch
from test_cli import bpfilter
from test_conntrack import sock_in
from test_nat import (
    Net,
    Plan,
    client_to,
    listener,
    nat,
    peer_of,
    three_namespaces,
    udp_echo_once,
    udp_round,
)

# Unique-local addresses, only ever inside the test's own namespaces.
CLIENT, ROUTER_IN = "fd77:1::2", "fd77:1::1"
ROUTER_OUT, SERVER = "fd77:2::1", "fd77:2::2"
SNAT_LO, SNAT_HI = "fd77:2::10", "fd77:2::11"
V6 = Plan(CLIENT, ROUTER_IN, ROUTER_OUT, SERVER, (SNAT_LO, SNAT_HI), 64, 128)
# The router's source for the server, as the kernel selects it (RFC 6724 rule 8, longest
# matching prefix, counts at most an address's prefix length: the /128 beats fd77:2::1/64).
MASQ_SRC = SNAT_HI


@pytest.fixture
def net6() -> Iterator[Net]:
    """client fd77:1::2 -- fd77:1::1 router fd77:2::1 -- fd77:2::2 server."""
    with three_namespaces(V6) as n:
        yield n


Loader = Callable[[str], None]


@pytest.fixture(params=["bpfilter", "ip6tables"])
def router6(request, net6, bpffs) -> Iterator[Loader]:
    """load(text) installs a nat table on the router: pybpfilter (restore -6 --hook tc at the
    client-facing interface) or, as the reference twin, the kernel's ip6tables."""
    if request.param == "ip6tables":
        if shutil.which("ip6tables-restore") is None:
            pytest.skip("the reference twin needs ip6tables-restore")

        def kernel(text: str) -> None:
            subprocess.run(["ip", "netns", "exec", net6.router, "ip6tables-restore"],
                           input=text, check=True, capture_output=True, text=True)

        yield kernel  # the namespace takes its tables with it
        return
    args = ("-6", "--netns", net6.router, "--hook", "tc", "--iface", net6.rin)

    def ours(text: str) -> None:
        bpfilter("restore", *args, stdin=text, bpffs=bpffs)

    try:
        yield ours
    finally:
        bpfilter("flush", *args, bpffs=bpffs, check=False)


def accepted(srv: socket.socket) -> socket.socket:
    """The next connection a listener gets."""
    srv.settimeout(2.0)
    return srv.accept()[0]


def test_dnat6_tcp_and_udp(net6, router6):
    router6(nat(f"-A PREROUTING -p tcp -m tcp --dport 8080 -j DNAT --to-destination "
                f"[{SERVER}]:80",
                f"-A PREROUTING -p udp -m udp --dport 5353 -j DNAT --to-destination "
                f"[{SERVER}]:53"))
    srv = listener(net6.server, SERVER, 80)
    usrv = udp_echo_once(net6.server, SERVER, 53)
    try:
        c = client_to(net6.client, ROUTER_IN, 8080)
        with c:
            assert c.getpeername()[:2] == (ROUTER_IN, 8080)
            assert peer_of(srv)[0] == CLIENT  # no SNAT: the server sees the client
            assert c.recv(2) == b"hi"
        seen, got = udp_round(net6, usrv, ROUTER_IN, 5353)
        assert seen is not None and seen[0] == CLIENT
        assert got == (b"re:q", (ROUTER_IN, 5353)), "the reply must come from the original"
    finally:
        srv.close()
        usrv.close()


def test_dnat6_to_address_only(net6, router6):
    # No port: the destination port is kept.
    router6(nat(f"-A PREROUTING -d {ROUTER_IN} -p tcp -j DNAT --to-destination {SERVER}"))
    srv = listener(net6.server, SERVER, 8081)
    try:
        with client_to(net6.client, ROUTER_IN, 8081) as c, accepted(srv) as conn:
            assert conn.getpeername()[0] == CLIENT
            conn.sendall(b"x")
            assert c.recv(1) == b"x"
    finally:
        srv.close()


def test_masquerade6_behind_router(net6, router6):
    router6(nat(f"-A POSTROUTING -o {net6.rout} -j MASQUERADE"))
    srv = listener(net6.server, SERVER, 80)
    usrv = udp_echo_once(net6.server, SERVER, 53)
    try:
        with client_to(net6.client, SERVER, 80) as c:
            addr = peer_of(srv)
            assert addr[0] == MASQ_SRC, f"the server must see the router, saw {addr}"
            assert c.recv(2) == b"hi"
        seen, got = udp_round(net6, usrv, SERVER, 53)
        assert seen is not None and seen[0] == MASQ_SRC
        assert got == (b"re:q", (SERVER, 53))
    finally:
        srv.close()
        usrv.close()


def test_masquerade6_only_matching_output(net6, router6):
    router6(nat("-A POSTROUTING -o nosuchif0 -j MASQUERADE"))
    srv = listener(net6.server, SERVER, 80)
    try:
        with client_to(net6.client, SERVER, 80):
            assert peer_of(srv)[0] == CLIENT
    finally:
        srv.close()


def test_snat6_address_and_port_range(net6, router6):
    router6(nat(f"-A POSTROUTING -o {net6.rout} -p tcp -j SNAT --to-source "
                f"[{SNAT_LO}-{SNAT_HI}]:40000-40003",
                f"-A POSTROUTING -o {net6.rout} -p udp -j SNAT --to-source "
                f"[{SNAT_LO}]:41000-41001"))
    srv = listener(net6.server, SERVER, 80)
    clients = []
    try:
        seen = set()
        for _ in range(4):  # four connections from one client: four distinct ports
            c = client_to(net6.client, SERVER, 80)
            clients.append(c)
            ip, port = peer_of(srv)
            assert ip in (SNAT_LO, SNAT_HI) and 40000 <= port <= 40003, (ip, port)
            assert c.recv(2) == b"hi"
            seen.add((ip, port))
        assert len(seen) == 4, seen
        # One source address, one translated address (nf_nat hashes the source).
        assert len({ip for ip, _ in seen}) == 1, seen
        usrv = udp_echo_once(net6.server, SERVER, 53)
        with usrv:
            who, got = udp_round(net6, usrv, SERVER, 53)
            assert who is not None and who[0] == SNAT_LO and 41000 <= who[1] <= 41001, who
            assert got == (b"re:q", (SERVER, 53))
    finally:
        for c in clients:
            c.close()
        srv.close()


def test_redirect6_to_local_listener(net6, router6):
    # A second address on the client-facing interface: nf_nat_redirect_ipv6 takes the first of
    # the interface's list (the latest global address comes first), as pybpfilter must.
    second = "fd77:1::99"
    ip_batch(net6.router, [f"addr add {second}/64 dev {net6.rin} nodad"])
    router6(nat("-A PREROUTING -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 9000"))
    local = listener(net6.router, "::", 9000)
    try:
        with client_to(net6.client, SERVER, 80) as c:
            assert c.getpeername()[:2] == (SERVER, 80)
            local.settimeout(2.0)
            conn, addr = local.accept()
            with conn:
                assert addr[0] == CLIENT
                assert conn.getsockname()[:2] == (second, 9000), conn.getsockname()
                conn.sendall(b"abc")
                assert c.recv(3) == b"abc"
    finally:
        local.close()


def test_connection6_survives_replace(net6, router6):
    dnat = f"-A PREROUTING -p tcp -m tcp --dport 8080 -j DNAT --to-destination [{SERVER}]:80"
    router6(nat(dnat))
    srv = listener(net6.server, SERVER, 80)
    try:
        with client_to(net6.client, ROUTER_IN, 8080) as c, accepted(srv) as conn:
            c.sendall(b"one")
            assert conn.recv(3) == b"one"
            router6(nat(f"-A PREROUTING -p tcp -m tcp --dport 8081 -j DNAT --to-destination "
                        f"[{SERVER}]:80"))
            conn.sendall(b"two")
            assert c.recv(3) == b"two", "the established connection must survive the replace"
            with pytest.raises(OSError):  # 8080 is no longer translated for new connections
                client_to(net6.client, ROUTER_IN, 8080).close()
            with client_to(net6.client, ROUTER_IN, 8081), accepted(srv):
                pass
    finally:
        srv.close()


def test_ipv4_and_ipv6_nat_side_by_side(net6, bpffs):
    # Both families' nat tables at the same ingress: each family's PREROUTING reaches its own
    # POSTROUTING.
    ip_batch(net6.client, ["addr add 192.168.78.2/24 dev " + net6.cif])
    ip_batch(net6.router, [f"addr add 192.168.78.1/24 dev {net6.rin}"])
    args = ("--netns", net6.router, "--hook", "tc", "--iface", net6.rin)
    bpfilter("restore", "-6", *args, bpffs=bpffs,
             stdin=nat(f"-A PREROUTING -p tcp -j DNAT --to-destination [{SERVER}]:80"))
    bpfilter("restore", *args, bpffs=bpffs,
             stdin=nat("-A PREROUTING -p tcp -j REDIRECT --to-ports 9000"))
    srv = listener(net6.server, SERVER, 80)
    local4 = listener(net6.router, "0.0.0.0", 9000)
    try:
        with client_to(net6.client, ROUTER_IN, 1234), accepted(srv):
            pass
        c4 = sock_in(net6.client, socket.AF_INET, socket.SOCK_STREAM)
        c4.settimeout(2.0)
        with c4:
            c4.connect(("192.168.78.1", 1234))
            local4.settimeout(2.0)
            conn, _ = local4.accept()
            conn.close()
        # Flushing removes both, and the dormant nft table with them.
        bpfilter("flush", *args, bpffs=bpffs)
        out = subprocess.run(["ip", "netns", "exec", net6.router, "nft", "list", "tables"],
                             capture_output=True, text=True).stdout
        assert "pybpfilter_nat" not in out, out
    finally:
        bpfilter("flush", *args, bpffs=bpffs, check=False)
        srv.close()
        local4.close()


def test_ipv6_nat_listing_round_trip(net6, bpffs):
    text = nat(f"-A PREROUTING -p tcp -m tcp --dport 8080 -j DNAT --to-destination "
               f"[{SERVER}-fd77:2::5]:80-81",
               f"-A POSTROUTING -o {net6.rout} -p udp -j SNAT --to-source {SNAT_LO}",
               f"-A POSTROUTING -o {net6.rout} -p tcp -j MASQUERADE --to-ports 1024-2047")
    args = ("-6", "--netns", net6.router, "--hook", "tc", "--iface", net6.rin)
    try:
        bpfilter("restore", *args, stdin=text, bpffs=bpffs)
        out = bpfilter("save", *args, bpffs=bpffs).stdout
        assert f"--to-destination [{SERVER}-fd77:2::5]:80-81" in out, out
        assert f"--to-source {SNAT_LO}" in out, out
    finally:
        bpfilter("flush", *args, bpffs=bpffs, check=False)


def test_dnat6_address_range_across_a_word(net6, router6, request):
    # The range's addresses differ in their last two 32-bit words (a carry when picking),
    # all on the server; each client address maps to one of them, every time.
    if request.node.callspec.params["router6"] == "ip6tables":
        pytest.skip("nf_nat picks IPv6 range addresses word by word: once a word is below the "
                    "range's, the next is any value, so it leaves a range crossing a word")
    lo, hi = "fd77:2::ffff:fffe", "fd77:2::1:0:1"
    targets = ["fd77:2::ffff:fffe", "fd77:2::ffff:ffff", "fd77:2::1:0:0", "fd77:2::1:0:1"]
    sources = [f"fd77:1::{i:x}" for i in range(0x10, 0x18)]
    ip_batch(net6.server, [f"addr add {t}/128 dev {net6.sif} nodad" for t in targets])
    ip_batch(net6.client, [f"addr add {x}/64 dev {net6.cif} nodad" for x in sources])
    router6(nat(f"-A PREROUTING -p tcp -m tcp --dport 8080 -j DNAT --to-destination "
                f"[{lo}-{hi}]:80"))
    srv = listener(net6.server, "::", 80)
    srv.settimeout(2.0)
    landed: dict[str, set[str]] = {}
    try:
        for _ in range(2):
            for src in sources:
                c = sock_in(net6.client, socket.AF_INET6, socket.SOCK_STREAM)
                c.settimeout(2.0)
                with c:
                    c.bind((src, 0))
                    c.connect((ROUTER_IN, 8080))
                    conn, addr = srv.accept()
                    with conn:
                        assert addr[0] == src
                        landed.setdefault(src, set()).add(conn.getsockname()[0])
        assert all(len(v) == 1 and v <= set(targets) for v in landed.values()), landed
    finally:
        srv.close()


def test_redirect_address_choice():
    # nf_nat_redirect_ipv6 for a global destination: the first address of the interface's list
    # that is not IPv4-mapped and not still in duplicate address detection (unless optimistic).
    from bpfilter.runtime.nat import IFA_F_OPTIMISTIC, IFA_F_TENTATIVE, Ipv6Addr, redirect_ipv6

    mapped = Ipv6Addr(socket.inet_pton(socket.AF_INET6, "::ffff:192.0.2.1"), 0)
    tentative = Ipv6Addr(socket.inet_pton(socket.AF_INET6, "fd00::1"), IFA_F_TENTATIVE)
    optimistic = Ipv6Addr(socket.inet_pton(socket.AF_INET6, "fd00::2"),
                          IFA_F_TENTATIVE | IFA_F_OPTIMISTIC)
    plain = Ipv6Addr(socket.inet_pton(socket.AF_INET6, "fd00::3"), 0)
    assert redirect_ipv6([mapped, tentative, plain]) == plain.addr
    assert redirect_ipv6([tentative, optimistic, plain]) == optimistic.addr
    assert redirect_ipv6([mapped, tentative]) is None


def test_redirect6_needs_a_usable_address(net6, bpffs):
    ip_batch(net6.router, [f"addr flush dev {net6.rin}"])
    r = bpfilter("restore", "-6", "--netns", net6.router, "--hook", "tc", "--iface", net6.rin,
                 stdin=nat("-A PREROUTING -p tcp -j REDIRECT --to-ports 9000"), bpffs=bpffs,
                 check=False)
    assert r.returncode != 0 and "no usable IPv6 address" in r.stderr, r.stderr
