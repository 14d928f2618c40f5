"""`-m addrtype` on every hook, both addresses, both families: compared with netfilter.

The kernel answers xt_addrtype from its local routing table, which a BPF_PROG_TEST_RUN cannot
stand in for, so the rules are compared on real frames. The same counting rules (no targets) are
loaded into one receiver namespace twice: with legacy iptables in raw PREROUTING and filter INPUT,
and with pybpfilter where it sees the same packets (nf: mangle PREROUTING and security INPUT, at
other priorities; tc ingress and XDP: filter INPUT, which runs before the stack and so compares
with PREROUTING). Frames with every kind of source and destination come from the sender's raw
socket; the per-rule counters of both must be equal. Then an address is added to the receiver:
until `bpfilter refresh`, pybpfilter's copy of the local table does not know it (shown), after
the refresh the counters agree again; `refresh --watch` follows changes by itself.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers.kernel import require_kernel
from helpers.packets import build
from helpers.topology import Topology, ip_batch
from scapy.layers.inet import UDP
from test_addrtype_owner_rt import _counts
from test_cli import bpfilter

from bpfilter import netns
from bpfilter import netns as netns_mod
from bpfilter.bpf.maps import Map
from bpfilter.compiler.validate import CompileError
from bpfilter.frontends.iptables import parse
from bpfilter.ir.model import Family
from bpfilter.runtime import localtable
from bpfilter.runtime.checker import Checker
from bpfilter.runtime.loader import compile_ruleset

pytestmark = pytest.mark.kernel

PORT = 7000
CORPUS = Path(__file__).resolve().parents[1] / ".." / "shared" / "corpus" / "rulesets"
ANYCAST4 = "192.0.2.77"  # an anycast route of table local
LO6 = "fd99::1"  # an address of another device (lo): LOCAL, but not on the receiving interface
MAIN_LOCAL4 = "198.18.0.0/16"  # a local route in table main: LOCAL while the tables are merged
NEW_ADDR = {Family.IPV4: "203.0.113.9", Family.IPV6: "fd77::9"}  # added after the load

TYPES = {
    Family.IPV4: ("LOCAL", "BROADCAST", "MULTICAST", "UNICAST", "ANYCAST", "BLACKHOLE"),
    Family.IPV6: ("LOCAL", "MULTICAST", "UNICAST", "ANYCAST", "UNSPEC"),
}
SEEN = {  # what the frames must exercise (in PREROUTING: martians never reach INPUT)
    Family.IPV4: ("--src-type LOCAL", "--dst-type LOCAL", "--src-type BROADCAST",
                  "--dst-type BROADCAST", "--src-type MULTICAST", "--dst-type MULTICAST",
                  "--src-type UNICAST", "--dst-type UNICAST", "--src-type ANYCAST",
                  "--dst-type ANYCAST"),
    Family.IPV6: ("--src-type LOCAL", "--dst-type LOCAL", "--src-type UNICAST",
                  "--dst-type UNICAST", "--src-type ANYCAST", "--dst-type ANYCAST",
                  "--dst-type MULTICAST", "--src-type UNSPEC"),
}
COMBOS = {
    Family.IPV4: ("! --src-type UNICAST", "! --dst-type UNICAST", "! --dst-type LOCAL,BROADCAST",
                  "--src-type UNICAST --dst-type LOCAL",
                  "! --src-type LOCAL ! --dst-type MULTICAST,BROADCAST,LOCAL",
                  "--dst-type LOCAL --limit-iface-in", "--src-type LOCAL --limit-iface-in",
                  "! --dst-type UNICAST --limit-iface-in",
                  "--dst-type BROADCAST,ANYCAST --limit-iface-in"),
    Family.IPV6: ("! --src-type UNICAST", "! --dst-type LOCAL", "--dst-type LOCAL,ANYCAST",
                  "--dst-type UNICAST,LOCAL", "--src-type UNICAST --dst-type LOCAL",
                  "! --src-type ANYCAST ! --dst-type MULTICAST",
                  "--dst-type LOCAL --limit-iface-in", "--src-type LOCAL --limit-iface-in",
                  "! --dst-type LOCAL --limit-iface-in", "--dst-type ANYCAST --limit-iface-in",
                  "--dst-type UNICAST,LOCAL --limit-iface-in"),
}


def _rules(fam: Family, chain: str, ifname: str | None) -> list[str]:
    out = []
    for t in TYPES[fam]:
        out += [f"--src-type {t}", f"--dst-type {t}"]
    dev = f" -i {ifname}" if ifname else ""
    rules = [f"-A {chain}{dev} -m addrtype {m}" for m in [*out, *COMBOS[fam]]]
    if chain in ("OUTPUT", "POSTROUTING"):  # no input device there
        rules = [r.replace("--limit-iface-in", "--limit-iface-out") for r in rules]
    return rules


def _table(name: str, chains: dict[str, list[str]]) -> str:
    heads = "".join(f":{c} ACCEPT [0:0]\n" for c in chains)
    return f"*{name}\n{heads}" + "".join(r + "\n" for rs in chains.values() for r in rs) + \
        "COMMIT\n"


def _texts(fam: Family, hook: str, ifname: str) -> tuple[str, str]:
    """(legacy iptables text, pybpfilter text) of the same counting rules."""
    pre, inp = _rules(fam, "PREROUTING", ifname), _rules(fam, "INPUT", ifname)
    legacy = _table("raw", {"PREROUTING": pre})
    if hook == "nf":
        legacy += _table("filter", {"INPUT": inp})
        ours = _table("mangle", {"PREROUTING": pre}) + _table("security", {"INPUT": inp})
    else:  # tc ingress / XDP: before the stack, like PREROUTING
        ours = _table("filter", {"INPUT": _rules(fam, "INPUT", ifname)})
    return legacy, ours


def _legacy_save(fam: Family) -> str:
    return "iptables-legacy-save" if fam is Family.IPV4 else "ip6tables-legacy-save"


class Pair:
    """The receiver's two counting rulesets and how to read them side by side."""

    def __init__(self, topo: Topology, fam: Family, hook: str, bpffs: str, tmp_path) -> None:
        self.topo, self.fam, self.hook, self.bpffs = topo, fam, hook, bpffs
        r = topo.receiver
        legacy, ours = _texts(fam, hook, r.ifname)
        restore = "iptables-legacy-restore" if fam is Family.IPV4 else "ip6tables-legacy-restore"
        netns.run(r.ns, [restore], input=legacy)
        path = tmp_path / f"ours.{fam.value}"
        path.write_text(ours)
        self.where = ["--netns", r.ns, *(["-6"] if fam is Family.IPV6 else []),
                      *(["--hook", hook, "--iface", r.ifname] if hook != "nf" else [])]
        bpfilter("restore", *self.where, str(path), bpffs=bpffs)
        self.rules = [line for line in legacy.splitlines() if line.startswith("-A ")]

    def read(self) -> tuple[list[int], list[int]]:
        """Per-rule packet counts: (netfilter, pybpfilter), in the legacy text's order."""
        theirs = _counts(netns.run(self.topo.receiver.ns, [_legacy_save(self.fam), "-c"]).stdout)
        ours = _counts(bpfilter("save", "-c", *self.where, bpffs=self.bpffs).stdout)
        if self.hook != "nf":  # only PREROUTING's rules have a counterpart
            theirs = [t for t in theirs if t[1] == "PREROUTING"]
        # Tables come in either order: PREROUTING's rules first, as in the legacy text.
        theirs.sort(key=lambda t: t[1] != "PREROUTING")
        ours.sort(key=lambda t: t[1] != "PREROUTING")
        assert [c for _, c, _ in theirs] == [("PREROUTING" if self.hook != "nf" else c)
                                            for _, c, _ in ours]
        return [n for *_, n in theirs], [n for *_, n in ours]

    def stable(self) -> tuple[list[int], list[int]]:
        """Counters read twice alike (replies and neighbour discovery may be in flight)."""
        last = self.read()
        for _ in range(25):
            time.sleep(0.2)
            now = self.read()
            if now == last:
                return now
            last = now
        return last

    def diff(self, a: list[int], b: list[int]) -> str:
        """The rules whose counts differ, for messages."""
        return "\n".join(f"  {self.rules[i]}: netfilter {x} pybpfilter {y}"
                         for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)


def _frames(topo: Topology, fam: Family, extra: str | None = None) -> list[bytes]:
    """Frames from the sender: every kind of destination from the sender's address, every kind
    of source towards the receiver's (`extra`: only to and from that address)."""
    s, r = topo.sender, topo.receiver
    if fam is Family.IPV4:
        me, peer = r.ip4, s.ip4
        bcast = r.ip4.rsplit(".", 1)[0] + ".255"
        dsts = [me, bcast, "255.255.255.255", "224.0.0.1", "239.1.2.3", "10.250.0.1",
                "127.0.0.1", ANYCAST4, "198.18.0.5", "0.0.0.0"]
        srcs = ["0.0.0.0", me, bcast, "224.1.1.1", "10.250.0.1", "127.0.0.1", ANYCAST4,
                "198.18.0.5", "255.255.255.255"]
    else:
        me, peer = r.ip6, s.ip6
        net = str(ipaddress.ip_network(f"{r.ip6}/64", strict=False).network_address)
        other = net + "99"
        # Multicast sources and ::1 are dropped before PREROUTING: not sent.
        dsts = [me, "ff02::1", "ff02::1:ff00:2", other, net, "2001:db8:77::1", "fe80::2", LO6]
        srcs = ["::", me, net, "fe80::1", other, "2001:db8:77::1", LO6]
    if extra is not None:
        dsts, srcs = [extra], [extra]
    frames = []
    for src, dst in [*((peer, d) for d in dsts), *((x, me) for x in srcs)]:
        frames.append(build(UDP(sport=PORT, dport=PORT), src, dst, src_mac=s.mac,
                            dst_mac=r.mac))
    return frames


def _send(topo: Topology, frames: list[bytes]) -> None:
    with netns.enter(topo.sender.ns):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    with sock:
        sock.bind((topo.sender.ifname, 0))
        for f in frames:
            sock.send(f)


def _prepare(topo: Topology) -> None:
    """The receiver gets an anycast route (table local), a local route in table main and an
    IPv6 address on lo."""
    r = topo.receiver
    ip_batch(r.ns, [f"route add anycast {ANYCAST4} dev {r.ifname} table local",
                    f"route add local {MAIN_LOCAL4} dev lo table main",
                    f"addr add {LO6}/128 dev lo"])


@pytest.mark.parametrize("hook", ["nf", "tc", "xdp"])
@pytest.mark.parametrize("fam", [Family.IPV4, Family.IPV6], ids=["ipv4", "ipv6"])
def test_addrtype_like_netfilter_then_refresh(topology, bpffs, tmp_path, fam, hook):
    """Equal counters on every kind of frame; an address added later is known after refresh."""
    require_kernel()
    _prepare(topology)
    pair = Pair(topology, fam, hook, bpffs, tmp_path)
    r = topology.receiver
    try:
        start = pair.stable()
        _send(topology, _frames(topology, fam))
        theirs, ours = pair.stable()
        theirs = [a - b for a, b in zip(theirs, start[0], strict=True)]
        ours = [a - b for a, b in zip(ours, start[1], strict=True)]
        print(f"{fam.value} {hook}: counters {theirs}")
        assert theirs == ours, "\n" + pair.diff(theirs, ours)
        seen = {pair.rules[i].split("addrtype ")[1] for i, n in enumerate(theirs)
                if n and "PREROUTING" in pair.rules[i]}
        assert set(SEEN[fam]) <= seen, f"every type must be seen: {set(SEEN[fam]) - seen}"

        # An address added after the load: netfilter knows it at once, the map after refresh.
        new = NEW_ADDR[fam]
        ip_batch(r.ns, [f"addr add {new}/{32 if fam is Family.IPV4 else 128} dev {r.ifname}"
                        + (" nodad" if fam is Family.IPV6 else "")])
        stale = _delta(pair, topology, fam, new)
        # One frame to it, one from it (to the receiver's first address): the copy lags.
        rule = f"-A PREROUTING -i {r.ifname} -m addrtype --%s-type LOCAL"
        local = [pair.rules.index(rule % d) for d in ("src", "dst")]
        # (Neighbour discovery may add packets to the receiver's first address to both.)
        assert [stale[0][i] - stale[1][i] for i in local] == [1, 1], "before the refresh the " \
            "map still calls the new address UNICAST\n" + pair.diff(*stale)
        out = bpfilter("refresh", "--netns", r.ns, bpffs=bpffs).stdout
        assert f"{fam.value}:" in out, out
        fresh = _delta(pair, topology, fam, new)
        assert fresh[0] == fresh[1], "\n" + pair.diff(*fresh)
        assert all(fresh[0][i] for i in local)
    finally:
        bpfilter("flush", "--netns", r.ns, "--all-hooks", bpffs=bpffs)


def _delta(pair: Pair, topo: Topology, fam: Family, addr: str) -> tuple[list[int], list[int]]:
    before = pair.stable()
    _send(topo, _frames(topo, fam, addr))
    after = pair.stable()
    return tuple([a - b for a, b in zip(x, y, strict=True)]  # type: ignore[return-value]
                 for x, y in zip(after, before, strict=True))


def test_refresh_watch_follows_address_changes(netns, bpffs, tmp_path):
    """`refresh --watch`: an address added or removed is in the map moments later."""
    require_kernel()
    rules = tmp_path / "r.v4"
    rules.write_text("*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -m addrtype --src-type LOCAL\n"
                     "COMMIT\n")
    bpfilter("restore", "--netns", netns, str(rules), bpffs=bpffs)
    proc = subprocess.Popen(
        [sys.executable, "-m", "bpfilter.cli.main", "refresh", "--netns", netns, "--watch",
         "--duration", "20"], env=dict(os.environ, BPFILTER_BPFFS=f"{bpffs}/pybpfilter"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        path = _pin(bpffs, netns)
        key = b"\x20\0\0\0" + socket.inet_aton("203.0.113.10")
        time.sleep(0.5)  # the watcher subscribes
        ip_batch(netns, ["addr add 203.0.113.10/32 dev lo"])
        assert _wait_key(path, key, present=True), "the watcher did not add the address"
        ip_batch(netns, ["addr del 203.0.113.10/32 dev lo"])
        assert _wait_key(path, key, present=False), "the watcher did not remove the address"
    finally:
        proc.terminate()
        proc.wait(5)
        bpfilter("flush", "--netns", netns, bpffs=bpffs)
    assert any("ipv4:" in line for line in lines), lines


def _pin(bpffs: str, ns: str) -> str:
    return localtable.pin_path(os.path.join(bpffs, "pybpfilter", netns_mod.ns_id(ns), "nf"),
                               Family.IPV4)


def _wait_key(path: str, key: bytes, *, present: bool) -> bool:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with Map.open_pinned(path) as m:
            if (m.lookup(key) is not None) == present:
                return True
        time.sleep(0.05)
    return False


# --- what compiles where, and what is refused --------------------------------------------------


@pytest.mark.parametrize(("hook", "table", "chain"), [
    ("nf", "raw", "PREROUTING"), ("nf", "mangle", "PREROUTING"), ("nf", "filter", "INPUT"),
    ("nf", "filter", "OUTPUT"), ("nf", "mangle", "POSTROUTING"), ("tc", "filter", "INPUT"),
    ("tc", "filter", "OUTPUT"), ("xdp", "filter", "INPUT")])
@pytest.mark.parametrize("fam", [Family.IPV4, Family.IPV6], ids=["ipv4", "ipv6"])
def test_every_hook_loads(fam, hook, table, chain):
    """Both addresses, every type the family allows, pass the verifier on every hook."""
    require_kernel()
    text = _table(table, {chain: _rules(fam, chain, None)})
    with Checker(parse(text, family=fam, filename="t"), chain=chain, table=table, hook=hook,
                 iif="eth0", oif="eth0"):
        pass


@pytest.mark.parametrize("hook", ["nf", "tc", "xdp"])
def test_check_reads_the_local_table(hook):
    """`bpfilter check` test runs answer from the routing table of the namespace they run in."""
    require_kernel()
    rs = parse("*filter\n:INPUT ACCEPT [0:0]\n"
               "-A INPUT -m addrtype --src-type LOCAL -j DROP\nCOMMIT\n", family=Family.IPV4,
               filename="t")
    with Checker(rs, chain="INPUT", hook=hook, iif="eth0") as chk:
        assert chk.run(build(UDP(dport=9), "127.0.0.1", "10.9.9.9")).verdict == "DROP"
        assert chk.run(build(UDP(dport=9), "10.9.9.8", "10.9.9.9")).verdict == "ACCEPT"


@pytest.mark.parametrize(("family", "text", "words"), [
    (Family.IPV6, "-A INPUT -m addrtype --dst-type UNREACHABLE", "IPv6 UNREACHABLE"),
    (Family.IPV6, "-A INPUT -m addrtype ! --src-type LOCAL,UNREACHABLE", "IPv6 UNREACHABLE"),
])
def test_refused_by_name(family, text, words):
    """What the local table map cannot answer is refused, with the reason."""
    require_kernel()
    rs = parse(f"*filter\n:INPUT ACCEPT [0:0]\n{text}\nCOMMIT\n", family=family, filename="t")
    with pytest.raises(CompileError, match=re.escape(words)):
        Checker(rs, chain="INPUT", hook="tc", iif="eth0").close()


def test_docker_nat_prerouting_addrtype_compiles():
    """Docker's nat PREROUTING rule (`-m addrtype --dst-type LOCAL -j DOCKER`) compiles on tc;
    what still stops the whole nat table, if anything, is not addrtype in PREROUTING."""
    require_kernel()
    path = CORPUS / "docker-usernet-portmap.v4.rules"
    if not path.exists():
        pytest.skip(f"ruleset corpus not found at {CORPUS}")
    text = path.read_text()
    nat = text[text.index("*nat"):]
    nat = nat[:nat.index("COMMIT") + len("COMMIT\n")]
    pre = "\n".join(x for x in nat.splitlines() if not x.startswith("-A OUTPUT")) + "\n"
    compile_ruleset(parse(pre, family=Family.IPV4, filename="docker"), "tc", "eth0",
                    b"\x02\0\0\0\0\1", None)
    try:
        compile_ruleset(parse(nat, family=Family.IPV4, filename="docker"), "tc", "eth0",
                        b"\x02\0\0\0\0\1", None)
    except CompileError as e:
        assert "PREROUTING" not in str(e) and "hook tc" not in str(e), str(e)
