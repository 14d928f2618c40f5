"""bpfilter.netns against the kernel: named namespaces, entering per thread, running commands."""

from __future__ import annotations

import errno
import json
import subprocess
import threading

import pytest
from helpers import topology as topo_mod
from helpers.names import unique_name
from helpers.traffic import ping

from bpfilter import netns as ns_api


@pytest.mark.kernel
def test_create_exists_list_delete():
    name = unique_name("x")
    assert not ns_api.exists(name)
    ns_api.create(name)
    try:
        assert ns_api.exists(name)
        assert name in ns_api.list_names()
        assert name in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                      text=True, check=True).stdout
        with pytest.raises(ns_api.NetnsError) as exc:
            ns_api.create(name)
        assert exc.value.errno == errno.EEXIST
    finally:
        ns_api.delete(name)
    assert not ns_api.exists(name)
    assert name not in ns_api.list_names()


@pytest.mark.parametrize("bad", ["", "a/b", ".", ".."])
def test_invalid_names_are_refused(bad):
    with pytest.raises(ValueError):
        ns_api.exists(bad)


def test_enter_switches_and_restores(netns):
    home = ns_api.current_ns_inode()
    target = ns_api.ns_inode(netns)
    assert target != home
    with ns_api.enter(netns):
        assert ns_api.current_ns_inode() == target
        assert ns_api.ns_id(None) == f"ino{target}"
    assert ns_api.current_ns_inode() == home
    with pytest.raises(RuntimeError), ns_api.enter(ns_api.path_of(netns)):
        assert ns_api.current_ns_inode() == target
        raise RuntimeError("boom")
    assert ns_api.current_ns_inode() == home  # restored although the block failed


def test_enter_affects_only_the_calling_thread(netns):
    home = ns_api.current_ns_inode()
    inside, release = threading.Event(), threading.Event()
    seen: list[int] = []

    def worker() -> None:
        with ns_api.enter(netns):
            seen.append(ns_api.current_ns_inode())
            inside.set()
            release.wait(5)
        seen.append(ns_api.current_ns_inode())

    t = threading.Thread(target=worker)
    t.start()
    try:
        assert inside.wait(5)
        assert ns_api.current_ns_inode() == home  # main thread untouched meanwhile
    finally:
        release.set()
        t.join(5)
    assert seen == [ns_api.ns_inode(netns), home]


def test_enter_by_proc_path_and_missing(netns):
    home = ns_api.current_ns_inode()
    # A /proc path works too: a child's, which stays in our namespace while we move.
    child = subprocess.Popen(["sleep", "30"])
    try:
        with ns_api.enter(netns), ns_api.enter(f"/proc/{child.pid}/ns/net"):
            assert ns_api.current_ns_inode() == home
    finally:
        child.kill()
        child.wait()
    with pytest.raises(ns_api.NetnsError) as exc, ns_api.enter(unique_name("m")):
        pass
    assert exc.value.errno == errno.ENOENT


def test_ns_id():
    assert ns_api.ns_id("blue") == "blue"
    assert ns_api.ns_id(None) == f"ino{ns_api.current_ns_inode()}"
    assert ns_api.ns_id(None) == ns_api.ns_id(None)  # stable


def test_run_inside_namespace(netns):
    out = ns_api.run(netns, ["ip", "-j", "link", "show"]).stdout
    assert [link["ifname"] for link in json.loads(out)] == ["lo"]
    link = ns_api.run(netns, ["readlink", "/proc/self/ns/net"]).stdout.strip()
    assert link == f"net:[{ns_api.ns_inode(netns)}]"
    assert ns_api.run(netns, ["false"], check=False).returncode == 1
    with pytest.raises(subprocess.CalledProcessError):
        ns_api.run(netns, ["false"])


def test_topology_fixture_is_what_it_says(topology):
    for ep, peer in ((topology.sender, topology.receiver), (topology.receiver, topology.sender)):
        assert ns_api.exists(ep.ns)
        links = json.loads(ns_api.run(ep.ns, ["ip", "-j", "addr", "show"]).stdout)
        by_name = {link["ifname"]: link for link in links}
        assert set(by_name) == {"lo", ep.ifname}  # the peer lives only in the other namespace
        veth = by_name[ep.ifname]
        assert (veth["ifindex"], veth["address"], veth["operstate"]) == (ep.ifindex, ep.mac, "UP")
        addrs = {(a["local"], a["prefixlen"]) for a in veth["addr_info"]}
        assert {(ep.ip4, topology.prefix4), (ep.ip6, topology.prefix6)} <= addrs
        for key in ("all", ep.ifname):
            assert topo_mod.read_sysctl(ep.ns, f"net.ipv4.conf.{key}.rp_filter") == "0"
        assert ping(ep.ns, peer.ip4, count=1) and ping(ep.ns, peer.ip6, count=1)
