"""Links on real hooks inside test namespaces, observed with real traffic.

Every link is created while the thread is inside a test namespace: XDP and tcx resolve the ifindex
in the caller's namespace and netfilter links bind to it, so creating one outside would hook the
machine's own interfaces.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from collections.abc import Callable, Iterator

import pytest
from helpers import packets, udp_server
from helpers.progs import count, counter_map, counting_prog
from helpers.topology import Topology, assert_not_home
from helpers.traffic import ping, settle, udp_send, wait_for

from bpfilter import netns as ns_api
from bpfilter.bpf.consts import (
    AttachType,
    CgroupSkbVerdict,
    LinkType,
    NfHook,
    NfProto,
    NfVerdict,
    ProgType,
    TcAction,
    XdpAction,
)
from bpfilter.bpf.link import Link, link_ids, query
from bpfilter.bpf.maps import Map
from bpfilter.bpf.prog import Prog
from bpfilter.bpf.syscall import BpfError

pytestmark = pytest.mark.kernel

N = 20  # frames per burst
NF_PRIORITY = -150  # any value but NF_IP_PRI_FIRST/LAST


@pytest.fixture
def counters() -> Iterator[Map]:
    """A fresh counter array."""
    with counter_map() as m:
        yield m


def attach_in(ns: str, make: Callable[[], Link]) -> Link:
    """Create a link while the thread is inside test namespace `ns`."""
    with ns_api.enter(ns):
        assert_not_home()
        return make()


def udp_frames(topo: Topology, n: int = N, dport: int = 9, v6: bool = False) -> list[bytes]:
    """`n` UDP frames from the sender to the receiver, correctly addressed at every layer."""
    s, r = topo.sender, topo.receiver
    src, dst = (s.ip6, r.ip6) if v6 else (s.ip4, r.ip4)
    return [packets.udp(src, dst, 40000 + i, dport, src_mac=s.mac, dst_mac=r.mac,
                        payload=b"frame%d" % i) for i in range(n)]


def blast(topo: Topology, n: int = N) -> None:
    """Send `n` raw UDP frames from the sender namespace to the receiver."""
    packets.send_frames(topo.sender.ns, topo.sender.ifname, udp_frames(topo, n))


def grows_to(m: Map, slot: int, target: int) -> bool:
    """Wait until counter `slot` reaches `target`."""
    return wait_for(lambda: count(m, slot) >= target)


def make_link(kind: str, topo: Topology, prog: Prog) -> Link:
    """Attach `prog` on the receiver side with an XDP or a tcx ingress link."""
    r = topo.receiver
    if kind == "xdp":
        return attach_in(r.ns, lambda: Link.xdp(prog.fd, r.ifindex))
    return attach_in(r.ns, lambda: Link.tcx(prog.fd, r.ifindex))


PASS_VERDICT = {"xdp": (ProgType.XDP, XdpAction.PASS), "tcx": (ProgType.SCHED_CLS, TcAction.OK)}


# --- XDP -----------------------------------------------------------------------------------------


def test_xdp_link_counts_receiver_traffic(topology, counters):
    r = topology.receiver
    with counting_prog(ProgType.XDP, counters, 0, XdpAction.PASS) as prog:
        link = attach_in(r.ns, lambda: Link.xdp(prog.fd, r.ifindex))
        with link:
            blast(topology)
            assert grows_to(counters, 0, N), count(counters, 0)
            ping(topology.sender.ns, r.ip4)  # XDP_PASS lets traffic through
            desc = link.describe()
            assert (desc.type, desc.ifindex, desc.prog_id) == (LinkType.XDP, r.ifindex, prog.id)
            with Link.from_id(desc.id) as same:
                assert same.describe() == desc
        assert desc.id not in link_ids()  # closing the last fd detached and freed it


@pytest.mark.parametrize("verdict", [XdpAction.PASS, XdpAction.DROP])
def test_xdp_verdict_decides_delivery(topology, counters, verdict):
    """Frames built by the packet helpers reach a socket behind XDP_PASS, none behind XDP_DROP."""
    r = topology.receiver
    with ns_api.enter(r.ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock, counting_prog(ProgType.XDP, counters, 0, verdict) as prog:
        sock.bind((r.ip4, 0))
        sock.settimeout(0.3)
        with attach_in(r.ns, lambda: Link.xdp(prog.fd, r.ifindex)):
            frames = udp_frames(topology, 5, dport=sock.getsockname()[1])
            packets.send_frames(topology.sender.ns, topology.sender.ifname, frames)
            assert grows_to(counters, 0, 5)
            got = []
            with contextlib.suppress(TimeoutError):
                while len(got) < 5:
                    got.append(sock.recv(100))
        assert len(got) == (5 if verdict == XdpAction.PASS else 0)


# --- tcx -----------------------------------------------------------------------------------------


def test_tcx_ingress_counts(topology, counters):
    r = topology.receiver
    with counting_prog(ProgType.SCHED_CLS, counters, 0, TcAction.OK) as prog, \
            attach_in(r.ns, lambda: Link.tcx(prog.fd, r.ifindex)) as link:
        blast(topology)
        assert grows_to(counters, 0, N)
        ping(topology.sender.ns, r.ip6)
        desc = link.describe()
        assert (desc.type, desc.ifindex, desc.attach_type) == \
            (LinkType.TCX, r.ifindex, AttachType.TCX_INGRESS)
        with ns_api.enter(r.ns):
            ids, _revision = query(r.ifindex, AttachType.TCX_INGRESS)
        assert ids == [prog.id]


def test_tcx_egress_counts_replies(topology, counters):
    r = topology.receiver
    with counting_prog(ProgType.SCHED_CLS, counters, 0, TcAction.OK) as prog, \
            attach_in(r.ns, lambda: Link.tcx(prog.fd, r.ifindex, egress=True)) as link:
        assert link.describe().attach_type == AttachType.TCX_EGRESS
        ping(topology.sender.ns, r.ip4, count=5)
        assert count(counters, 0) >= 5  # the echo replies left through the receiver's egress


# --- update, detach, pin ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["xdp", "tcx"])
def test_link_update_swaps_program(topology, counters, kind):
    ptype, ok = PASS_VERDICT[kind]
    with counting_prog(ptype, counters, 0, ok) as old, \
            counting_prog(ptype, counters, 1, ok) as new, \
            make_link(kind, topology, old) as link:
        blast(topology)
        assert grows_to(counters, 0, N)
        link.update(new.fd, old_prog_fd=old.fd)
        assert link.describe().prog_id == new.id
        settle()  # a packet already inside the old program may still count there
        before = count(counters, 0)
        blast(topology)
        assert grows_to(counters, 1, N)
        assert count(counters, 0) == before
        with pytest.raises(BpfError) as exc:
            link.update(old.fd, old_prog_fd=old.fd)  # `old` is no longer attached
        assert exc.value.errno == errno.EPERM
        link.update(old.fd)
        assert link.describe().prog_id == old.id


@pytest.mark.parametrize("kind", ["xdp", "tcx"])
def test_link_detach_stops_counting(topology, counters, kind):
    ptype, ok = PASS_VERDICT[kind]
    with counting_prog(ptype, counters, 0, ok) as prog, make_link(kind, topology, prog) as link:
        blast(topology)
        assert grows_to(counters, 0, N)
        link.detach()
        settle()
        before = count(counters, 0)
        blast(topology)
        ping(topology.sender.ns, topology.receiver.ip4)  # traffic flows without the program
        assert count(counters, 0) == before


def test_pinned_link_survives_closing_its_fd(topology, bpffs, counters):
    r = topology.receiver
    path = os.path.join(bpffs, "xdp_link")
    with counting_prog(ProgType.XDP, counters, 0, XdpAction.PASS) as prog:
        link = attach_in(r.ns, lambda: Link.xdp(prog.fd, r.ifindex))
        desc = link.describe()
        link.pin(path)
        link.close()
    # Neither the program's nor the link's fd is open now: only the pin holds them.
    blast(topology)
    assert grows_to(counters, 0, N)
    assert desc.id in link_ids()
    with Link.open_pinned(path) as again:
        assert again.describe() == desc
        again.detach()
    os.unlink(path)
    assert wait_for(lambda: desc.id not in link_ids())


# --- netfilter -----------------------------------------------------------------------------------


@pytest.mark.parametrize("pf", [NfProto.IPV4, NfProto.IPV6])
def test_netfilter_local_in_counts(topology, counters, pf):
    r = topology.receiver
    addr, other = (r.ip4, r.ip6) if pf == NfProto.IPV4 else (r.ip6, r.ip4)
    with counting_prog(ProgType.NETFILTER, counters, 0, NfVerdict.ACCEPT) as prog, \
            attach_in(r.ns, lambda: Link.netfilter(prog.fd, pf, NfHook.LOCAL_IN,
                                                   NF_PRIORITY)) as link:
        desc = link.describe()
        assert (desc.type, desc.pf, desc.hooknum, desc.priority) == \
            (LinkType.NETFILTER, pf, NfHook.LOCAL_IN, NF_PRIORITY)
        ping(topology.sender.ns, addr, count=4)  # accepted: replies come back
        assert count(counters, 0) >= 4
        before = count(counters, 0)
        ping(topology.sender.ns, other, count=4)
        assert count(counters, 0) == before  # the other family has its own hook


def test_netfilter_link_is_bound_to_its_namespace(topology, counters):
    """A LOCAL_IN hook made in the receiver does not see the sender's input."""
    r = topology.receiver
    with counting_prog(ProgType.NETFILTER, counters, 0, NfVerdict.ACCEPT) as prog, \
            attach_in(r.ns, lambda: Link.netfilter(prog.fd, NfProto.IPV4, NfHook.LOCAL_IN,
                                                   NF_PRIORITY)):
        # Traffic into the sender only (its own loopback): nothing reaches the receiver.
        udp_send(topology.sender.ns, "127.0.0.1", 9, count=5)
        settle()
        assert count(counters, 0) == 0
        udp_send(topology.sender.ns, r.ip4, 9, count=5)
        assert grows_to(counters, 0, 5)


# --- cgroup --------------------------------------------------------------------------------------


@pytest.mark.parametrize("verdict", [CgroupSkbVerdict.ALLOW, CgroupSkbVerdict.DROP])
def test_cgroup_inet_ingress_counts_member_sockets(topology, cgroup2, counters, verdict):
    r = topology.receiver
    at = AttachType.CGROUP_INET_INGRESS
    cg_fd = os.open(cgroup2, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with counting_prog(ProgType.CGROUP_SKB, counters, 0, verdict,
                           attach_type=at) as prog, Link.cgroup(prog.fd, cg_fd, at) as link:
            desc = link.describe()
            assert (desc.type, desc.attach_type) == (LinkType.CGROUP, at)
            assert desc.cgroup_id == os.stat(cgroup2).st_ino  # a cgroup's id is its inode
            allowed = verdict == CgroupSkbVerdict.ALLOW
            # Nothing arrives when dropping: the server gives up after a short silence.
            server = udp_server.start(r.ns, cgroup2, r.ip4, expect=N,
                                      timeout=2.0 if allowed else 0.3)
            try:
                udp_send(topology.sender.ns, r.ip4, server.port, count=N)
                assert server.result() == (N if allowed else 0)
            finally:
                server.stop()
            assert count(counters, 0) == N
            # A socket of a process outside the cgroup (this one) is not counted.
            with ns_api.enter(r.ns):
                outsider = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            with outsider:
                outsider.bind((r.ip4, 0))
                outsider.settimeout(2)
                udp_send(topology.sender.ns, r.ip4, outsider.getsockname()[1], count=3)
                for _ in range(3):
                    outsider.recv(100)
            assert count(counters, 0) == N
    finally:
        os.close(cg_fd)
