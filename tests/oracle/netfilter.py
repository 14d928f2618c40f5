"""The kernel's own netfilter as an oracle: what legacy iptables does with one packet.

A ruleset is loaded with `iptables-legacy-restore` / `ip6tables-legacy-restore` in the receiver
namespace of a topology; each frame is sent from the sender namespace (a raw AF_PACKET socket)
and the oracle reports the verdict of the tested chain and the per-rule counter deltas.

How a packet is observed, without the observers changing what they observe:
- *reached*: an empty ACCEPT-policy table that runs just before the tested chain counts the
  packet in its policy counter (mangle INPUT, priority -150, before filter INPUT at 0). Packets
  the stack drops before the hook (malformed, martian) are reported as not reached, to exclude.
  Nothing runs before raw PREROUTING (-300); there every frame counts as reached (a frame the
  stack dropped would look like a hotdrop: the generators only make valid IP headers).
- *passed*: an empty ACCEPT-policy table just after it (security INPUT at 50 after filter INPUT;
  mangle PREROUTING at -150 after raw PREROUTING) counts what the tested chain accepted.
- *done*: a marker frame of the *other* family is sent after each packet and dropped by a rule
  of that family's mangle PREROUTING; both frames go through one CPU's backlog queue in order
  (they are sent from one CPU), so once the marker is counted the packet has been handled
  completely, hotdrops included (they move no counter at all). Only one tested ruleset is
  loaded at a time, so nothing the marker meets before mangle (raw) can drop it.
- *quiet*: both namespaces drop every locally generated IP packet (mangle OUTPUT policy DROP),
  so no reply, neighbour solicitation or MLD report comes back into the tested chains.

IPv4 fragments never reach filter INPUT (ip_local_deliver reassembles them first), so rulesets
meant for fragments are placed in raw PREROUTING, where they are seen one by one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

from helpers import topology as topo_mod
from helpers.packets import build
from scapy.layers.inet import UDP

from bpfilter import netns
from bpfilter.ir.model import BUILTIN_CHAINS, Counters, Family

from .addresses import BCAST_MAC, MARKER_SRC, RX_ADDRS, RX_IFNAME, RX_NETS
from .xtables import TableCounters, XtReader

MARKER_DPORT = 9

WAIT_TIMEOUT = 2.0
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
RX_SYSCTLS = {
    "net.ipv4.conf.{ifname}.rp_filter": 0,
    "net.ipv4.conf.all.accept_redirects": 0,
    "net.ipv4.conf.{ifname}.accept_redirects": 0,
    "net.ipv6.conf.{ifname}.accept_ra": 0,
    "net.ipv6.conf.{ifname}.accept_redirects": 0,
}


def other(family: Family) -> Family:
    """The other address family."""
    return Family.IPV6 if family is Family.IPV4 else Family.IPV4


@dataclass(frozen=True)
class Placement:
    """Where the tested ruleset is loaded, and which empty tables observe around it."""

    table: str
    chain: str
    reached: tuple[str, str] | None  # (table, chain) whose policy counts arrivals
    passed: tuple[str, str]  # (table, chain) whose policy counts what was accepted


FILTER_INPUT = Placement("filter", "INPUT", ("mangle", "INPUT"), ("security", "INPUT"))
RAW_PREROUTING = Placement("raw", "PREROUTING", None, ("mangle", "PREROUTING"))
PLACEMENTS = {p.table: p for p in (FILTER_INPUT, RAW_PREROUTING)}


class OracleError(RuntimeError):
    """The oracle could not judge a packet (no marker seen, stray traffic)."""


class LoadError(ValueError):
    """iptables-restore refused the ruleset."""


@dataclass(frozen=True)
class Observation:
    """What netfilter did with one packet."""

    reached: bool  # the packet got to the tested chain at all
    verdict: str  # ACCEPT or DROP
    deltas: dict[tuple[str, int | None], Counters]  # every counter of the tested table


def _guard_tables(marker: str | None) -> str:
    """mangle with the marker rule and OUTPUT DROP; empty security (observers only)."""
    rule = f"-A PREROUTING -s {marker} -j DROP\n" if marker else ""
    return ("*mangle\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n"
            ":OUTPUT DROP [0:0]\n:POSTROUTING ACCEPT [0:0]\n" + rule + "COMMIT\n"
            "*security\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
            "COMMIT\n")


def restore_cmd(family: Family) -> str:
    """The legacy restore command of a family."""
    return "iptables-legacy-restore" if family is Family.IPV4 else "ip6tables-legacy-restore"


def restore(ns: str, family: Family, text: str) -> None:
    """Load `text` with the legacy restore command inside `ns` (only the tables it names)."""
    proc = netns.run(ns, [restore_cmd(family)], input=text, check=False)
    if proc.returncode != 0:
        raise LoadError(f"{restore_cmd(family)} refused the ruleset: "
                        f"{(proc.stderr or proc.stdout).strip()}\n{text}")


def empty_table(table: str) -> str:
    """restore text that empties `table` and sets its built-in policies back to ACCEPT."""
    chains = "".join(f":{c} ACCEPT [0:0]\n" for c in BUILTIN_CHAINS[table])
    return f"*{table}\n{chains}COMMIT\n"


def _diff(after: TableCounters, before: TableCounters) -> dict[tuple[str, int | None], Counters]:
    a, b = after.flat(), before.flat()
    return {k: Counters(v.packets - b[k].packets, v.bytes - b[k].bytes) for k, v in a.items()}


class NetfilterOracle:
    """Legacy iptables in the receiver namespace of `topo`, fed from the sender namespace."""

    def __init__(self, topo: topo_mod.Topology) -> None:
        self.topo = topo
        self.rx_ns, self.tx_ns = topo.receiver.ns, topo.sender.ns
        self.rx_mac, self.tx_mac = topo.receiver.mac, topo.sender.mac
        self.testrun_ns = self.tx_ns
        self._setup_links()
        for fam in Family:
            restore(self.rx_ns, fam, _guard_tables(MARKER_SRC[fam]))
            restore(self.tx_ns, fam, _guard_tables(None))
        self.readers = {fam: XtReader(self.rx_ns, fam) for fam in Family}
        with netns.enter(self.tx_ns):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        self.sock.bind((topo.sender.ifname, 0))
        self.markers = {fam: self._marker_frame(fam) for fam in Family}
        self._affinity = os.sched_getaffinity(0)
        self.loaded: dict[Family, Placement] = {}

    def _setup_links(self) -> None:
        r = self.topo.receiver
        topo_mod.ip_batch(self.rx_ns, [f"link set {r.ifname} down",
                                       f"link set {r.ifname} name {RX_IFNAME}"])
        cmds = [f"addr add {a} dev {RX_IFNAME}" for a in RX_NETS[Family.IPV4]]
        cmds += [f"addr add {a} dev {RX_IFNAME} nodad" for a in RX_NETS[Family.IPV6]]
        topo_mod.ip_batch(self.rx_ns, [*cmds, f"link set {RX_IFNAME} up"])
        # No reverse-path filter; and random ICMP (redirects, router advertisements) must not
        # reconfigure the receiver between packets.
        for key, value in RX_SYSCTLS.items():
            topo_mod.write_sysctl(self.rx_ns, key.format(ifname=RX_IFNAME), value)
        # Test runs of our programs happen in the sender namespace (see compare.py): there
        # the loopback device, which BPF_PROG_TEST_RUN classifies frames against, must call
        # ff:ff:ff:ff:ff:ff broadcast, as every Ethernet device does.
        topo_mod.ip_batch(self.tx_ns, [f"link set lo broadcast {BCAST_MAC}"])
        topo_mod.wait_running(self.rx_ns, RX_IFNAME)
        topo_mod.wait_running(self.tx_ns, self.topo.sender.ifname)

    def _marker_frame(self, fam: Family) -> bytes:
        dst = RX_ADDRS[fam][0]
        return build(UDP(sport=MARKER_DPORT, dport=MARKER_DPORT), MARKER_SRC[fam], dst,
                     src_mac=self.tx_mac, dst_mac=self.rx_mac)

    def close(self) -> None:
        """Close the sockets (the namespaces belong to the topology)."""
        self.sock.close()
        for r in self.readers.values():
            r.close()

    def __enter__(self) -> NetfilterOracle:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def load(self, text: str, family: Family, placement: Placement = FILTER_INPUT) -> None:
        """Load iptables-restore text (one table) for `family` at `placement`.

        Whatever was loaded before in another table, or for the other family, is emptied: a
        ruleset left in the other family's raw table would drop this family's markers.
        """
        for fam, old in list(self.loaded.items()):
            if fam is not family or old is not placement:
                restore(self.rx_ns, fam, empty_table(old.table))
                del self.loaded[fam]
        restore(self.rx_ns, family, text)
        self.loaded[family] = placement

    def load_sets(self, text: str) -> None:
        """Replace every ipset set of the receiver with those of `ipset restore` text `text`.

        Sets are per namespace; rules referencing a set keep it alive, so the tested tables
        are emptied first (the next `load` fills them again).
        """
        for fam, old in list(self.loaded.items()):
            restore(self.rx_ns, fam, empty_table(old.table))
            del self.loaded[fam]
        netns.run(self.rx_ns, ["ipset", "destroy"])
        proc = netns.run(self.rx_ns, ["ipset", "restore"], input=text, check=False)
        if proc.returncode != 0:
            raise LoadError(f"ipset restore refused the sets: "
                            f"{(proc.stderr or proc.stdout).strip()}\n{text}")

    def counter_keys(self, family: Family) -> set[tuple[str, int | None]]:
        """Every (chain, rule) of the loaded table; rule None for a policy."""
        return set(self.readers[family].read(self.loaded[family].table).flat())

    def _marker_count(self, fam: Family) -> int:
        return self.readers[fam].read("mangle").get("PREROUTING", 1).packets

    def _policy(self, fam: Family, where: tuple[str, str]) -> int:
        return self.readers[fam].read(where[0]).get(where[1], None).packets

    def observe(self, frame: bytes, family: Family) -> Observation:
        """Send one frame of `family` and report what the loaded ruleset did with it."""
        pl = self.loaded[family]
        reader = self.readers[family]
        mfam = other(family)
        before = reader.read(pl.table)
        reached0 = self._policy(family, pl.reached) if pl.reached else 0
        passed0 = self._policy(family, pl.passed)
        marks0 = self._marker_count(mfam)
        # Both frames from one CPU (the one we are on: no migration): they must share its
        # backlog queue to stay in order. Only for the sends: processes started meanwhile
        # (iptables-restore) would inherit the mask.
        cpu = _libc.sched_getcpu()
        os.sched_setaffinity(0, {cpu if cpu >= 0 else min(self._affinity)})
        try:
            self.sock.send(frame)
            self.sock.send(self.markers[mfam])
        finally:
            os.sched_setaffinity(0, self._affinity)
        deadline = time.monotonic() + WAIT_TIMEOUT
        while (marks := self._marker_count(mfam)) == marks0:
            if time.monotonic() > deadline:
                raise OracleError("the marker frame was not counted: is the receiver up, does a "
                                  "ruleset of the other family drop it?")
            time.sleep(0.0002)
        if marks != marks0 + 1:
            raise OracleError(f"{marks - marks0} markers counted for one sent")
        after = reader.read(pl.table)
        reached = self._policy(family, pl.reached) - reached0 if pl.reached else 1
        passed = self._policy(family, pl.passed) - passed0
        if reached > 1 or passed > 1:
            raise OracleError(f"stray traffic: {reached} arrivals, {passed} passes for one frame")
        return Observation(reached == 1, "ACCEPT" if passed else "DROP", _diff(after, before))


def oracle_session(tools: tuple[str, ...] = ()) -> Iterator[NetfilterOracle]:
    """A NetfilterOracle in a fresh sender -> receiver topology, for a module fixture; skips
    when the kernel or a tool (legacy xtables, plus `tools`) is missing."""
    import shutil

    import pytest
    from helpers.kernel import require_kernel

    require_kernel()
    for tool in ("iptables-legacy-restore", "ip6tables-legacy-restore", *tools):
        if shutil.which(tool) is None:
            pytest.skip(f"kernel test: needs {tool} (scripts/setup.sh installs it)")
    topo = topo_mod.create_topology()
    try:
        with NetfilterOracle(topo) as o:
            yield o
    finally:
        topo_mod.destroy_topology(topo)
