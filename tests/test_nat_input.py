"""The nat INPUT chain (SNAT of connections delivered to this host), with real sockets.

Namespaces client -- router -- server (tests/test_nat.py). The ruleset runs either at the
server's own interface (forwarding off there: bpf_fib_lookup answers FWD_DISABLED) or at the
router's client-facing interface (forwarding on: a local destination answers NOT_FWDED, a
forwarded one is routed). Every scenario runs for IPv4 and IPv6, and twice: with pybpfilter
and, in an identical topology, with the kernel's own ip(6)tables nat table; the assertions are
the same for both, so what the sockets see is the kernel's answer.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from helpers.topology import ip_batch
from test_cli import bpfilter
from test_nat import (
    V4,
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
from test_nat6 import V6

from bpfilter.frontends.iptables.parser import ParseError, parse
from bpfilter.ir.model import Family

# Addresses only ever exist inside the test's own namespaces: one more address of the server
# (its SNAT target) per family.
SERVER_SNAT = {4: "172.31.77.20", 6: "fd77:2::20"}


@dataclass(frozen=True)
class Fam:
    """One family's addresses and commands."""

    v: int
    plan: Plan
    snat: str  # the server's second address

    @property
    def router_snat(self) -> str:
        """The router's extra address facing the server (its SNAT target)."""
        return self.plan.extra_out[0]

    def to(self, addr: str, ports: str = "") -> str:
        """--to-source's argument in the family's syntax."""
        if not ports:
            return addr
        return f"[{addr}]:{ports}" if self.v == 6 else f"{addr}:{ports}"

    @property
    def any(self) -> str:
        """The wildcard address."""
        return "::" if self.v == 6 else "0.0.0.0"


@pytest.fixture(params=[4, 6], ids=["ipv4", "ipv6"])
def fam(request) -> Fam:
    """The family under test."""
    return Fam(request.param, V4 if request.param == 4 else V6, SERVER_SNAT[request.param])


@pytest.fixture
def net(fam) -> Iterator[Net]:
    """client -- router -- server; the server also owns `fam.snat`."""
    with three_namespaces(fam.plan) as n:
        opt = " nodad" if fam.v == 6 else ""
        ip_batch(n.server, [f"addr add {fam.snat}/{fam.plan.host} dev {n.sif}{opt}"])
        yield n


Loader = Callable[[str, str, str], None]


@pytest.fixture(params=["bpfilter", "iptables"])
def load(request, fam, net, bpffs) -> Iterator[Loader]:
    """load(namespace, interface, text) installs a nat table: pybpfilter at the interface's tc
    ingress or, as the reference twin, the kernel's ip(6)tables in that namespace."""
    if request.param == "iptables":
        cmd = "iptables-restore" if fam.v == 4 else "ip6tables-restore"
        if shutil.which(cmd) is None:
            pytest.skip(f"the reference twin needs {cmd}")

        def kernel(ns: str, iface: str, text: str) -> None:
            subprocess.run(["ip", "netns", "exec", ns, cmd], input=text, check=True,
                           capture_output=True, text=True)

        yield kernel  # the namespaces take their tables with them
        return
    loaded: list[tuple[str, ...]] = []

    def ours(ns: str, iface: str, text: str) -> None:
        args = (*(("-6",) if fam.v == 6 else ()), "--netns", ns, "--hook", "tc",
                "--iface", iface)
        loaded.append(args)
        bpfilter("restore", *args, stdin=text, bpffs=bpffs)

    try:
        yield ours
    finally:
        for args in loaded:
            bpfilter("flush", *args, bpffs=bpffs, check=False)


def test_input_snat_at_the_server(fam, net, load):
    # The server's accepted socket sees the SNAT address; replies reach the client. A port
    # no rule matches keeps the client's address.
    load(net.server, net.sif, nat(
        f"-A INPUT -p tcp -m tcp --dport 80 -j SNAT --to-source {fam.to(fam.snat)}",
        f"-A INPUT -p udp -m udp --dport 53 -j SNAT --to-source {fam.to(fam.snat)}"))
    srv = {p: listener(net.server, fam.plan.server, p) for p in (80, 81)}
    usrv = udp_echo_once(net.server, fam.plan.server, 53)
    other = udp_echo_once(net.server, fam.plan.server, 54)
    try:
        with client_to(net.client, fam.plan.server, 80) as c:
            assert peer_of(srv[80])[0] == fam.snat
            assert c.recv(2) == b"hi", "the reply must reach the client"
        with client_to(net.client, fam.plan.server, 81) as c:
            assert peer_of(srv[81])[0] == fam.plan.client, "no rule matched: no SNAT"
            assert c.recv(2) == b"hi"
        seen, got = udp_round(net, usrv, fam.plan.server, 53)
        assert seen is not None and seen[0] == fam.snat, seen
        assert got == (b"re:q", (fam.plan.server, 53)), got
        seen, got = udp_round(net, other, fam.plan.server, 54)
        assert seen is not None and seen[0] == fam.plan.client, seen
        assert got == (b"re:q", (fam.plan.server, 54)), got
    finally:
        for s in (*srv.values(), usrv, other):
            s.close()


def test_input_snat_port_range(fam, net, load):
    load(net.server, net.sif, nat(
        f"-A INPUT -p tcp -j SNAT --to-source {fam.to(fam.snat, '40000-40003')}"))
    srv = listener(net.server, fam.plan.server, 80)
    clients = []
    try:
        seen = set()
        for _ in range(4):  # four connections from one client: four distinct ports
            c = client_to(net.client, fam.plan.server, 80)
            clients.append(c)
            ip, port = peer_of(srv)
            assert ip == fam.snat and 40000 <= port <= 40003, (ip, port)
            assert c.recv(2) == b"hi"
            seen.add(port)
        assert len(seen) == 4, seen
    finally:
        for c in clients:
            c.close()
        srv.close()


def test_input_leaves_forwarded_connections_alone(fam, net, load):
    # At the router: a connection to the router itself takes INPUT's SNAT, one it forwards to
    # the server does not (nor does POSTROUTING run for the delivered one).
    load(net.router, net.rin, nat(
        f"-A INPUT -j SNAT --to-source {fam.to(fam.router_snat)}",
        f"-A POSTROUTING -o {net.rout} -j SNAT --to-source {fam.to(fam.plan.router_out)}"))
    local = listener(net.router, fam.any, 80)
    # Bound to the address the client asks: a wildcard socket's reply to the (local) SNAT
    # address would take that address as its source and miss the connection, kernel or not.
    ulocal = udp_echo_once(net.router, fam.plan.router_in, 53)
    far = listener(net.server, fam.plan.server, 80)
    try:
        with client_to(net.client, fam.plan.router_in, 80) as c:
            assert peer_of(local)[0] == fam.router_snat
            assert c.recv(2) == b"hi"
        seen, got = udp_round(net, ulocal, fam.plan.router_in, 53)
        assert seen is not None and seen[0] == fam.router_snat, seen
        assert got == (b"re:q", (fam.plan.router_in, 53)), got
        with client_to(net.client, fam.plan.server, 80) as c:
            assert peer_of(far)[0] == fam.plan.router_out, "forwarded: POSTROUTING's SNAT only"
            assert c.recv(2) == b"hi"
    finally:
        for s in (local, ulocal, far):
            s.close()


def test_input_follows_the_route_after_dnat(fam, net, load):
    # Netfilter routes after DNAT: a connection to the router DNATed to the server is
    # forwarded (INPUT does not run), one to the server REDIRECTed here is delivered (it does).
    load(net.router, net.rin, nat(
        f"-A PREROUTING -p tcp -m tcp --dport 8080 -j DNAT --to-destination "
        f"{fam.to(fam.plan.server, '80')}",
        "-A PREROUTING -p tcp -m tcp --dport 8081 -j REDIRECT --to-ports 9000",
        f"-A INPUT -p tcp -j SNAT --to-source {fam.to(fam.router_snat)}"))
    far = listener(net.server, fam.plan.server, 80)
    local = listener(net.router, fam.any, 9000)
    try:
        with client_to(net.client, fam.plan.router_in, 8080) as c:
            assert peer_of(far)[0] == fam.plan.client, "forwarded after DNAT: no INPUT SNAT"
            assert c.recv(2) == b"hi"
        with client_to(net.client, fam.plan.server, 8081) as c:
            local.settimeout(2.0)
            conn, addr = local.accept()
            with conn:
                assert addr[0] == fam.router_snat, addr
                assert conn.getsockname()[1] == 9000
                conn.sendall(b"abc")
                assert c.recv(3) == b"abc"
            assert c.getpeername()[:2] == (fam.plan.server, 8081)
    finally:
        far.close()
        local.close()


def test_input_user_chain_return_accept_and_iif(fam, net, load, request, bpffs):
    # Netfilter's traversal: ACCEPT ends it (no SNAT), a user chain's RETURN continues after
    # the jump, `-i` is the ingress interface.
    load(net.server, net.sif, nat(
        "-N snat",
        "-A INPUT -p tcp -m tcp --dport 82 -j ACCEPT",
        "-A INPUT -i nosuchif0 -j RETURN",
        f"-A INPUT -i {net.sif} -j snat",
        "-A snat -p tcp -m tcp --dport 81 -j RETURN",
        f"-A snat -j SNAT --to-source {fam.to(fam.snat)}"))
    srv = {p: listener(net.server, fam.plan.server, p) for p in (80, 81, 82)}
    try:
        for port, want in ((80, fam.snat), (81, fam.plan.client), (82, fam.plan.client)):
            with client_to(net.client, fam.plan.server, port) as c:
                assert peer_of(srv[port])[0] == want, port
                assert c.recv(2) == b"hi"
        if request.node.callspec.params["load"] == "bpfilter":
            # Only a connection's first packet traverses the nat table, as in netfilter.
            out = bpfilter("list", *(("-6",) if fam.v == 6 else ()), "--netns", net.server,
                           "--hook", "tc", "--iface", net.sif, "-t", "nat", "-v", "-n", "-x",
                           "snat", bpffs=bpffs).stdout
            counts = [int(x.split()[0]) for x in out.splitlines()[2:] if x.strip()]
            assert counts == [1, 1], out
    finally:
        for s in srv.values():
            s.close()


def test_input_rules_follow_a_replace(fam, net, load, request, bpffs):
    # INPUT's rules come and go with the ruleset; an established connection keeps its binding.
    snat = nat(f"-A INPUT -p tcp -j SNAT --to-source {fam.to(fam.router_snat)}")
    load(net.router, net.rin, snat)
    local = listener(net.router, fam.any, 80)
    try:
        with client_to(net.client, fam.plan.router_in, 80) as c:
            local.settimeout(2.0)
            conn, addr = local.accept()
            with conn:
                assert addr[0] == fam.router_snat
                # Another nat rule stays: an empty nat table of iptables-nft has no chains, so
                # the kernel would unhook nf_nat and stop translating the connection.
                load(net.router, net.rin, nat("-A PREROUTING -p tcp -m tcp --dport 7 "
                                              "-j REDIRECT --to-ports 9000"))
                conn.sendall(b"one")
                assert c.recv(3) == b"one", "the established connection must survive"
            with client_to(net.client, fam.plan.router_in, 80):
                assert peer_of(local)[0] == fam.plan.client, "no INPUT rules any more"
        load(net.router, net.rin, snat)
        with client_to(net.client, fam.plan.router_in, 80):
            assert peer_of(local)[0] == fam.router_snat
        if request.node.callspec.params["load"] == "bpfilter":
            out = bpfilter("save", *(("-6",) if fam.v == 6 else ()), "--netns", net.router,
                           "--hook", "tc", "--iface", net.rin, bpffs=bpffs).stdout
            assert f"-A INPUT -p tcp -j SNAT --to-source {fam.router_snat}" in out, out
    finally:
        local.close()


# Rules iptables refuses in nat INPUT, and what pybpfilter's message says ({a}: an address).
REFUSED = [
    ("-A INPUT -o lo -j SNAT --to-source {a}", "Can't use -o with INPUT"),
    ("-A INPUT -j MASQUERADE", "only valid from POSTROUTING"),
    ("-A INPUT -p tcp -j DNAT --to-destination {a}", "only valid from PREROUTING/OUTPUT"),
    ("-A INPUT -p tcp -j REDIRECT --to-ports 80", "only valid from PREROUTING/OUTPUT"),
    ("-N x\n-A x -j MASQUERADE\n-A INPUT -j x", "only valid from POSTROUTING"),
]


@pytest.mark.parametrize(("rule", "words"), REFUSED)
@pytest.mark.parametrize("v", [4, 6])
def test_input_refuses_what_iptables_refuses(rule, words, v):
    a = "192.0.2.1" if v == 4 else "2001:db8::1"
    text = nat(*rule.format(a=a).split("\n"))
    with pytest.raises(ParseError) as e:
        parse(text, family=Family.IPV4 if v == 4 else Family.IPV6, filename="t")
    assert words in str(e.value), str(e.value)


def test_input_refusals_match_the_kernel(net, fam):
    # The kernel refuses the same rules (iptables-nft's --test does not ask it, so each is
    # loaded for real, in a namespace of ours; a refused restore commits nothing).
    cmd = "iptables-restore" if fam.v == 4 else "ip6tables-restore"
    if shutil.which(cmd) is None:
        pytest.skip(f"needs {cmd}")
    a = fam.router_snat
    for rule, _ in REFUSED:
        r = subprocess.run(["ip", "netns", "exec", net.server, cmd],
                           input=nat(*rule.format(a=a).split("\n")), capture_output=True,
                           text=True)
        assert r.returncode != 0, rule
    # ... and takes SNAT there.
    subprocess.run(["ip", "netns", "exec", net.server, cmd], check=True, capture_output=True,
                   input=nat(f"-A INPUT -j SNAT --to-source {a}"), text=True)


@pytest.mark.parametrize("v", [4, 6])
def test_input_program_refuses_targets_from_other_chains(v):
    # IR that did not come through the iptables parser (which refuses these) still cannot bind a
    # destination in INPUT: the compiler names the target instead of treating it as SNAT.
    from bpfilter.compiler.nat import compile_nat
    from bpfilter.compiler.validate import CompileError
    from bpfilter.runtime.nat import tail_call

    family = Family.IPV4 if v == 4 else Family.IPV6
    a = "192.0.2.1" if v == 4 else "2001:db8::1"
    table = parse(nat(f"-A PREROUTING -p tcp -j DNAT --to-destination {a}"), family=family,
                  filename="t").tables["nat"]
    table.chains["INPUT"].rules.append(table.chains["PREROUTING"].rules.pop())
    with pytest.raises(CompileError, match="DNAT is not valid in chain INPUT"):
        compile_nat(table, family, "tc", "lo", None, ({1: "lo"}, None), tail_call())
