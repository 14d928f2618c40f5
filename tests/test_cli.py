"""End to end: the `bpfilter` command on real namespaces, with real traffic, on every hook."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from helpers.packets import arp_request, tcp, udp
from helpers.traffic import udp_send

from bpfilter import netns
from bpfilter.cli.pcap import write_pcap

RULES = """\
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:BLOCK - [0:0]
-A INPUT -p udp --dport 7001 -j DROP
-A INPUT -p udp -m multiport --dports 7002,7003 -j BLOCK
-A BLOCK -p udp --dport 7003 -j RETURN
-A BLOCK -j DROP
COMMIT
"""

RULES2 = RULES.replace("--dport 7001 -j DROP", "--dport 7004 -j DROP")


def bpfilter(*args: str, bpffs: str, stdin: str | None = None, check: bool = True):
    """Run the CLI with a private pin root."""
    env = dict(os.environ, BPFILTER_BPFFS=os.path.join(bpffs, "pybpfilter"))
    r = subprocess.run([sys.executable, "-m", "bpfilter.cli.main", *args], input=stdin,
                       capture_output=True, text=True, env=env)
    if check and r.returncode:
        raise AssertionError(f"bpfilter {' '.join(args)} failed:\n{r.stderr}")
    return r


def delivered(topo, ports: list[int]) -> dict[int, bool]:
    """Send one UDP datagram to each port; which ones reached a socket in the receiver."""
    socks = {}
    with netns.enter(topo.receiver.ns):
        for p in ports:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((topo.receiver.ip4, p))
            s.settimeout(0.3)
            socks[p] = s
    try:
        for p in ports:
            udp_send(topo.sender.ns, topo.receiver.ip4, p)
        out = {}
        for p, s in socks.items():
            try:
                s.recv(64)
                out[p] = True
            except TimeoutError:
                out[p] = False
        return out
    finally:
        for s in socks.values():
            s.close()


def _hook_args(hook: str, topo) -> list[str]:
    args = ["--netns", topo.receiver.ns, "--hook", hook]
    if hook != "nf":
        args += ["--iface", topo.receiver.ifname]
    return args


@pytest.mark.parametrize("hook", ["nf", "tc", "xdp"])
def test_restore_filters_traffic_and_replaces_atomically(topology, bpffs, tmp_path, hook):
    rules = tmp_path / "rules.v4"
    rules.write_text(RULES)
    args = _hook_args(hook, topology)
    bpfilter("restore", *args, str(rules), bpffs=bpffs)
    assert delivered(topology, [7000, 7001, 7002, 7003]) == {
        7000: True, 7001: False, 7002: False, 7003: True}

    # Counters: save -c shows what the traffic did, rule by rule.
    saved = bpfilter("save", "-c", *args, bpffs=bpffs).stdout
    assert "[1:29] -A INPUT -p udp -m udp --dport 7001 -j DROP" in saved
    assert "[1:29] -A BLOCK -p udp -m udp --dport 7003 -j RETURN" in saved
    assert "[1:29] -A BLOCK -j DROP" in saved

    # Replacing swaps the whole ruleset; the old one filtered until then.
    rules.write_text(RULES2)
    bpfilter("restore", *args, str(rules), bpffs=bpffs)
    assert delivered(topology, [7001, 7004]) == {7001: True, 7004: False}

    # A broken ruleset changes nothing, and says where it is broken.
    bad = tmp_path / "bad.v4"
    bad.write_text(RULES.replace("--dport 7001", "--dport 7001 --frobnicate 3"))
    r = bpfilter("restore", *args, str(bad), bpffs=bpffs, check=False)
    assert r.returncode == 1
    assert "bad.v4:6" in r.stderr and "--frobnicate" in r.stderr
    assert delivered(topology, [7001, 7004]) == {7001: True, 7004: False}

    bpfilter("flush", *args, bpffs=bpffs)
    assert delivered(topology, [7001, 7004]) == {7001: True, 7004: True}
    assert not os.listdir(os.path.join(bpffs, "pybpfilter")) if os.path.isdir(
        os.path.join(bpffs, "pybpfilter")) else True


def test_save_output_restores_to_the_same_ruleset(topology, bpffs, tmp_path):
    rules = tmp_path / "rules.v4"
    rules.write_text(RULES)
    args = _hook_args("nf", topology)
    bpfilter("restore", *args, str(rules), bpffs=bpffs)
    first = bpfilter("save", *args, bpffs=bpffs).stdout
    bpfilter("restore", *args, "-", bpffs=bpffs, stdin=first)
    assert bpfilter("save", *args, bpffs=bpffs).stdout == first


def test_restore_counters_and_list(topology, bpffs, tmp_path):
    rules = tmp_path / "rules.v4"
    rules.write_text(RULES.replace("-A INPUT -p udp --dport 7001", "[5:500] -A INPUT -p udp "
                                   "--dport 7001"))
    args = _hook_args("nf", topology)
    bpfilter("restore", "-c", *args, str(rules), bpffs=bpffs)
    delivered(topology, [7001])
    out = bpfilter("list", "-v", "-x", "-n", "--line-numbers", *args, bpffs=bpffs).stdout
    line = next(x for x in out.splitlines() if x.startswith("1 "))
    assert line.split()[:4] == ["1", "6", "529", "DROP"], out
    assert "Chain BLOCK (1 references)" in out


def test_ipv6_ruleset(topology, bpffs, tmp_path):
    rules = tmp_path / "rules.v6"
    rules.write_text(RULES)
    args = _hook_args("nf", topology)
    bpfilter("restore", "-6", *args, str(rules), bpffs=bpffs)
    socks = {}
    with netns.enter(topology.receiver.ns):
        for p in (7000, 7001):
            s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            s.bind((topology.receiver.ip6, p))
            s.settimeout(0.5)
            socks[p] = s
    try:
        with netns.enter(topology.sender.ns):
            out = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        with out:
            for p in socks:
                out.sendto(b"x", (topology.receiver.ip6, p))
        got = {}
        for p, s in socks.items():
            try:
                s.recv(8)
                got[p] = True
            except TimeoutError:
                got[p] = False
    finally:
        for s in socks.values():
            s.close()
    assert got == {7000: True, 7001: False}
    saved = bpfilter("save", "-6", "-c", *args, bpffs=bpffs).stdout
    assert "-A INPUT -p udp -m udp --dport 7001 -j DROP" in saved


@pytest.mark.parametrize("hook", ["nf", "tc", "xdp"])
def test_check_pcap(tmp_path, bpffs, hook):
    rules = tmp_path / "rules.v4"
    rules.write_text(RULES)
    pcap = tmp_path / "in.pcap"
    a, b = "192.0.2.1", "198.51.100.1"
    frames = [udp(a, b, dport=7001), udp(a, b, dport=7002), udp(a, b, dport=7003),
              tcp(a, b, dport=80), udp(a, b, dport=7001, vlan=10),
              udp(a, b, dport=7002, vlan=[100, 10]), udp("2001:db8::1", "2001:db8::2", dport=7001),
              arp_request(a, b)]
    write_pcap(str(pcap), frames)
    r = bpfilter("check", "--json", "--hook", hook, "--iif", "eth0", "--pcap", str(pcap),
                 str(rules), bpffs=bpffs)
    got = [json.loads(x) for x in r.stdout.splitlines()]
    want = [
        {"packet": 1, "verdict": "DROP", "chain": "INPUT", "rule": 1},
        {"packet": 2, "verdict": "DROP", "chain": "BLOCK", "rule": 2},
        {"packet": 3, "verdict": "ACCEPT", "chain": "INPUT", "rule": None},
        {"packet": 4, "verdict": "ACCEPT", "chain": "INPUT", "rule": None},
    ]
    passed = {"verdict": "PASS", "chain": None, "rule": None}
    if hook != "nf":
        # tc and XDP see link-layer frames: VLAN tags are skipped; what is not IPv4 passes.
        want += [
            {"packet": 5, "verdict": "DROP", "chain": "INPUT", "rule": 1},
            {"packet": 6, "verdict": "DROP", "chain": "BLOCK", "rule": 2},
        ]
    else:
        # The IPv4 netfilter hooks never see VLAN-tagged frames (their VLAN device does).
        want += [{"packet": n, **passed} for n in (5, 6)]
    want += [{"packet": n, **passed} for n in (7, 8)]
    assert got == want


def test_dump_is_annotated_with_rules(tmp_path, bpffs, topology):
    rules = tmp_path / "rules.v4"
    rules.write_text(RULES)
    args = _hook_args("nf", topology)
    bpfilter("restore", *args, str(rules), bpffs=bpffs)
    out = bpfilter("dump", *args, bpffs=bpffs).stdout
    assert "; INPUT #1: -A INPUT -p udp --dport 7001 -j DROP" in out
    assert "verifier processed" in out
    assert "map[counters.ipv4.filter]" in out


def test_errors_name_the_problem(tmp_path, bpffs):
    rules = tmp_path / "r.v4"
    rules.write_text(RULES.replace("-j BLOCK", "-j NOWHERE"))
    r = bpfilter("restore", "--test", str(rules), bpffs=bpffs, check=False)
    assert r.returncode == 1 and "r.v4:7" in r.stderr and "NOWHERE" in r.stderr


@pytest.mark.parametrize("hook", ["nf", "tc"])
def test_mac_source_with_real_traffic(topology, bpffs, tmp_path, hook):
    rules = tmp_path / "mac.v4"
    rules.write_text(
        "*filter\n:INPUT ACCEPT [0:0]\n"
        f"-A INPUT -p udp --dport 7001 -m mac --mac-source {topology.sender.mac} -j DROP\n"
        "-A INPUT -p udp --dport 7002 -m mac ! --mac-source 02:00:00:00:00:99 -j DROP\n"
        "-A INPUT -p udp --dport 7003 -m mac --mac-source 02:00:00:00:00:99 -j DROP\n"
        "COMMIT\n")
    bpfilter("restore", *_hook_args(hook, topology), str(rules), bpffs=bpffs)
    assert delivered(topology, [7001, 7002, 7003]) == {7001: False, 7002: False, 7003: True}
