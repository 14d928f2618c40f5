"""The systems compared with real traffic: how each loads a ruleset into the receiver namespace,
and how many packets reached its final drop.

Every loader acts inside the receiver namespace only (`ip netns exec`, or pybpfilter's
`--netns`), with pybpfilter's pins in the benchmark's private bpffs mount.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

from rulesets import NFT_COUNTER, NFT_TABLE, Ruleset
from topo import Pair

from bpfilter import netns
from bpfilter.bpf import insn as I
from bpfilter.bpf.consts import ProgType, XdpAction
from bpfilter.bpf.link import Link
from bpfilter.bpf.prog import Prog
from bpfilter.ir.model import Family
from bpfilter.runtime.loader import Runtime

BPFILTER = os.path.join(os.path.dirname(sys.executable), "bpfilter")


class LoadError(RuntimeError):
    """A system refused or could not load a ruleset in time."""


@dataclass(frozen=True)
class System:
    """One column of the traffic table."""

    key: str
    label: str
    kind: str  # bpfilter, iptables, nft, or floor (a reference, not a firewall)
    variant: str  # hook for bpfilter; legacy/nft for iptables; linear/set for nft

    def available(self, rs: Ruleset) -> bool:
        """Whether this system has a translation of the ruleset's shape."""
        if self.kind == "nft":
            return (rs.nft_set if self.variant == "set" else rs.nft_linear) is not None
        return True

    def load(self, pair: Pair, rs: Ruleset, bpffs: str, timeout: float) -> float:
        """Load `rs` into the receiver namespace; returns the wall time it took."""
        ns = pair.receiver_ns
        if self.kind == "floor":
            return _attach_floor(pair)
        if self.kind == "bpfilter":
            argv = [BPFILTER, "restore", "--netns", ns, "--bpffs", bpffs, "--hook", self.variant]
            if self.variant != "nf":
                argv += ["--iface", pair.receiver_if]
            text = rs.text
        elif self.kind == "iptables":
            argv = ["ip", "netns", "exec", ns, f"iptables-{self.variant}-restore"]
            text = rs.text
        else:
            argv = ["ip", "netns", "exec", ns, "nft", "-f", "-"]
            text = rs.nft_set if self.variant == "set" else rs.nft_linear
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(argv, input=text, capture_output=True, text=True,
                                  timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise LoadError(f"load took more than {timeout:.0f} s") from None
        dt = time.perf_counter() - t0
        if proc.returncode != 0:
            raise LoadError(f"{argv[-1] if self.kind != 'nft' else 'nft'}: "
                            f"{proc.stderr.strip()[-300:]}")
        pair.pin_napi()  # an XDP attach may have restarted the receive path
        return dt

    def release(self, pair: Pair) -> None:
        """Close what the benchmark holds for this pair (the floor's XDP link)."""
        for obj in _HELD.pop(pair.receiver_ns, []):
            obj.close()

    def final_drops(self, pair: Pair, bpffs: str) -> int | None:
        """Packets the ruleset's final drop has counted so far (None: it has no counter)."""
        ns = pair.receiver_ns
        if self.kind == "floor":
            return None
        if self.kind == "bpfilter":
            rt = Runtime(self.variant, netns_name=ns,
                         iface=pair.receiver_if if self.variant != "nf" else None, root=bpffs)
            loaded = rt.loaded(Family.IPV4)
            if loaded is None:
                raise LoadError("nothing loaded")
            slots = loaded.record.tables["filter"].slots
            return loaded.counters["filter"][slots.index(("INPUT", None))].packets
        if self.kind == "iptables":
            out = netns.run(ns, [f"iptables-{self.variant}", "-w", "-L", "INPUT", "-n", "-v",
                                 "-x"]).stdout
            m = re.search(r"policy DROP (\d+) packets", out)
            if m is None:
                raise LoadError(f"no policy counter in: {out[:200]}")
            return int(m.group(1))
        out = netns.run(ns, ["nft", "list", "counter", "ip", NFT_TABLE, NFT_COUNTER]).stdout
        m = re.search(r"packets (\d+)", out)
        if m is None:
            raise LoadError(f"no counter in: {out[:200]}")
        return int(m.group(1))


_HELD: dict[str, list] = {}


def _attach_floor(pair: Pair) -> float:
    """Attach a two-instruction XDP_DROP program to the receiving veth (the path's ceiling)."""
    t0 = time.perf_counter()
    prog = Prog.load(ProgType.XDP, [I.mov64_imm(I.R0, XdpAction.DROP), I.exit_()],
                     name="bench_floor")
    try:
        with netns.enter(pair.receiver_ns):
            link = Link.xdp(prog.fd, socket.if_nametoindex(pair.receiver_if))
    except BaseException:
        prog.close()
        raise
    _HELD.setdefault(pair.receiver_ns, []).extend([link, prog])
    pair.pin_napi()
    return time.perf_counter() - t0


FLOOR = System("floor", "XDP drop-all (floor)", "floor", "xdp")
SYSTEMS = [
    System("bpf-xdp", "pybpfilter XDP", "bpfilter", "xdp"),
    System("bpf-tc", "pybpfilter tc", "bpfilter", "tc"),
    System("bpf-nf", "pybpfilter nf", "bpfilter", "nf"),
    System("ipt-legacy", "iptables-legacy", "iptables", "legacy"),
    System("ipt-nft", "iptables-nft", "iptables", "nft"),
    System("nft-linear", "nftables linear", "nft", "linear"),
    System("nft-set", "nftables set", "nft", "set"),
]
BY_KEY = {s.key: s for s in [*SYSTEMS, FLOOR]}
