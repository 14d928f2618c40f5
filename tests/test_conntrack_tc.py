"""Stateful filtering on the tc and XDP hooks (conntrack looked up at ingress, read at egress).

The scenario of test_conntrack.py: NEW connections only to TCP port 22, ESTABLISHED and RELATED
everywhere; here refused TCP gets a REJECT (the sender sees the RST), which only tc and XDP can
send.
"""

from __future__ import annotations

import socket

import pytest
from test_cli import bpfilter
from test_conntrack import connect, sock_in, tcp_server

from bpfilter import netns

RULES = """\
*filter
:INPUT DROP [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
-A INPUT -m conntrack --ctstate INVALID -j DROP
-A INPUT -p tcp -m tcp --dport 22 -m conntrack --ctstate NEW -j ACCEPT
-A INPUT -p tcp -j REJECT --reject-with tcp-reset
-A INPUT -p udp -j REJECT
-A OUTPUT -p tcp -m tcp --sport 22 -m conntrack --ctstate NEW -j DROP
-A OUTPUT -p udp -m udp --dport 9999 -m conntrack --ctstate NEW -j DROP
-A OUTPUT -p udp -m udp --sport 9999 -m conntrack --ctstate ESTABLISHED -j DROP
COMMIT
"""


@pytest.fixture(params=["tc", "xdp"])
def protected(request, topology, bpffs, tmp_path):
    """The receiver with the stateful ruleset on its interface (tc: both directions)."""
    hook = request.param
    rules = tmp_path / "stateful.v4"
    text = RULES if hook == "tc" else "\n".join(
        x for x in RULES.splitlines() if not x.startswith("-A OUTPUT")) + "\n"
    rules.write_text(text)
    args = ("--netns", topology.receiver.ns, "--hook", hook, "--iface", topology.receiver.ifname)
    peer = None
    if hook == "xdp":
        # XDP_TX frames reach the veth peer only if it runs an XDP program too.
        peer = ("--netns", topology.sender.ns, "--hook", "xdp", "--iface",
                topology.sender.ifname)
        bpfilter("restore", *peer, stdin="*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n", bpffs=bpffs)
    bpfilter("restore", *args, str(rules), bpffs=bpffs)
    try:
        yield topology, hook
    finally:
        bpfilter("flush", *args, bpffs=bpffs)
        if peer:
            bpfilter("flush", *peer, bpffs=bpffs)


def _refused(ns: str, addr: str, port: int) -> bool:
    """Whether a TCP connection attempt is answered with a reset (not silently dropped)."""
    s = sock_in(ns, socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(1.0)
    with s:
        try:
            s.connect((addr, port))
        except ConnectionRefusedError:
            return True
        except OSError:
            return False
    return False


def test_new_only_to_port_22_and_reject(protected):
    topo, _ = protected
    servers = [tcp_server(topo.receiver.ns, topo.receiver.ip4, p) for p in (22, 23)]
    try:
        ok = connect(topo.sender.ns, topo.receiver.ip4, 22)
        assert ok is not None, "port 22 must accept new connections"
        ok.sendall(b"ping")
        assert ok.recv(4) == b"ping"  # the rest of the connection is ESTABLISHED
        ok.close()
        assert _refused(topo.sender.ns, topo.receiver.ip4, 23), "port 23: the sender gets a RST"
    finally:
        for s in servers:
            s.close()


def _egress_states(topo) -> None:
    """tc egress reads the entry OUTPUT gave the packet: NEW to port 9999 is dropped, and so is
    the receiver's ESTABLISHED answer from its port 9999, not the NEW datagram before it."""
    sink = sock_in(topo.sender.ns, socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind((topo.sender.ip4, 9999))
    sink.settimeout(0.3)
    with sink:
        out = sock_in(topo.receiver.ns, socket.AF_INET, socket.SOCK_DGRAM)
        with out:
            out.sendto(b"n", (topo.sender.ip4, 9999))
            with pytest.raises(TimeoutError):
                sink.recv(8)
    srv = sock_in(topo.receiver.ns, socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind((topo.receiver.ip4, 9999))
    with srv:
        # Inbound to 9999 is NEW and rejected at INPUT... so talk first from the receiver.
        peer = sock_in(topo.sender.ns, socket.AF_INET, socket.SOCK_DGRAM)
        peer.bind((topo.sender.ip4, 9100))
        peer.settimeout(0.5)
        with peer:
            srv.sendto(b"1", (topo.sender.ip4, 9100))  # NEW from port 9999: allowed
            assert peer.recv(8) == b"1"
            peer.sendto(b"2", (topo.receiver.ip4, 9999))  # ESTABLISHED reply: accepted
            srv.settimeout(0.5)
            assert srv.recv(8) == b"2"
            srv.sendto(b"3", (topo.sender.ip4, 9100))  # now ESTABLISHED from 9999: dropped
            with pytest.raises(TimeoutError):
                peer.recv(8)


def test_outgoing_connections_replies_and_related_icmp(protected):
    topo, hook = protected
    server = tcp_server(topo.sender.ns, topo.sender.ip4, 8000)
    try:
        c = connect(topo.receiver.ns, topo.sender.ip4, 8000)
        assert c is not None, "replies to the protected host's own connection are ESTABLISHED"
        c.close()
    finally:
        server.close()
    echo = sock_in(topo.sender.ns, socket.AF_INET, socket.SOCK_DGRAM)
    echo.bind((topo.sender.ip4, 9000))
    cli = sock_in(topo.receiver.ns, socket.AF_INET, socket.SOCK_DGRAM)
    cli.settimeout(1.0)
    with echo, cli:
        cli.sendto(b"q", (topo.sender.ip4, 9000))
        _, peer = echo.recvfrom(8)
        echo.sendto(b"a", peer)
        assert cli.recv(8) == b"a"
        # Not a reply: a datagram from another port of the sender is NEW, and rejected.
        other = sock_in(topo.sender.ns, socket.AF_INET, socket.SOCK_DGRAM)
        other.settimeout(1.0)
        with other:
            other.bind((topo.sender.ip4, 0))
            other.connect(peer)
            other.send(b"x")
            with pytest.raises(ConnectionRefusedError):
                other.recv(8)  # the port unreachable REJECT sent back
        cli.settimeout(0.3)
        with pytest.raises(TimeoutError):
            cli.recv(8)
    if hook == "tc":
        _egress_states(topo)
    # ICMP port unreachable for the host's own UDP flow is RELATED: the socket hears of it.
    cli = sock_in(topo.receiver.ns, socket.AF_INET, socket.SOCK_DGRAM)
    cli.settimeout(1.0)
    with cli:
        cli.connect((topo.sender.ip4, 9))
        cli.send(b"x")
        with pytest.raises(ConnectionRefusedError):
            cli.recv(8)


def test_ping_replies_pass_and_unsolicited_pings_do_not(protected):
    topo, _ = protected
    r = netns.run(topo.receiver.ns, ["ping", "-c", "2", "-i", "0.2", "-W", "1",
                                      topo.sender.ip4], check=False, capture=True)
    assert r.returncode == 0, r.stdout
    r = netns.run(topo.sender.ns, ["ping", "-c", "1", "-W", "1", topo.receiver.ip4],
                  check=False, capture=True)
    assert r.returncode != 0


def test_conntrack_compiles_on_every_flavour(tmp_path, bpffs):
    """Compiles on every flavour and family (the verifier accepts the lookup code)."""
    for hook, fam in (("tc", "4"), ("tc", "6"), ("xdp", "4"), ("xdp", "6")):
        text = RULES.replace("-j REJECT --reject-with tcp-reset", "-j DROP")
        if hook == "xdp":
            text = "\n".join(x for x in text.splitlines() if not x.startswith("-A OUTPUT")) + "\n"
        rules = tmp_path / f"s.v{fam}"
        rules.write_text(text.replace("-p udp -j REJECT", "-p udp -j DROP"))
        extra = ("-6",) if fam == "6" else ()
        bpfilter("restore", *extra, "--test", "--hook", hook, "--iface", "x0", str(rules),
                 bpffs=bpffs)
