"""Two routers side by side, for whole filter tables (INPUT and FORWARD) on real traffic.

Real rulesets keep most of their rules in FORWARD (Docker, kube-proxy) and read conntrack
states, which a BPF_PROG_TEST_RUN skb cannot carry (it has no conntrack entry). So, like
ctrig.py, one sender namespace feeds two identically configured *router* namespaces: one runs
the filter table with `iptables-legacy-restore`, the other with pybpfilter's netfilter programs
(`Runtime(...).restore`, private bpffs). The kernel's conntrack keeps the state in each; both get
the same frames in the same order.

A router has the receiver's addresses (RX_NETS) on the interface the frames arrive on, so frames
to those addresses go to INPUT; every other unicast destination is forwarded (FORWARD) out of a
veth whose peer is down (no dummy driver in this kernel; NOARP, so it never resolves
neighbours). Interface names are the ruleset's own:
`set_interfaces` renames the arrival interface to the name under test and creates one veth per
other name, with routes to the subnets the rules put behind it, and a default route out of an
interface named by no rule. Observers as in netfilter.py: mangle INPUT and FORWARD (priority
-150) count arrivals, security INPUT and FORWARD (50) what filter accepted; a marker frame of the
other family, dropped in mangle PREROUTING, tells that a frame has been handled completely;
everything the routers generate themselves is dropped in mangle OUTPUT (filter OUTPUT sees none).
"""

from __future__ import annotations

import socket
import subprocess
from dataclasses import dataclass, field

from helpers import topology as topo_mod
from helpers.names import unique_name
from helpers.packets import build
from scapy.layers.inet import UDP

from bpfilter import netns
from bpfilter.ir.model import Family
from bpfilter.runtime import conntrack
from bpfilter.runtime.loader import Runtime

from .addresses import MARKER_SRC, RX_ADDRS, RX_IFNAME, RX_NETS
from .ctrig import RX_MAC, SIDES, TX_MAC
from .netfilter import MARKER_DPORT, empty_table, restore
from .twin import TwinRig
from .xtables import XtReader

# Default routes leave through one of these (whichever no rule names and is not the arrival
# interface).
DEFAULT_IFS = ("bfext0", "bfext1")
OBSERVED = ("INPUT", "FORWARD")

ROUTER_SYSCTLS = {
    "net.ipv4.ip_forward": 1,
    "net.ipv6.conf.all.forwarding": 1,
    "net.ipv4.conf.all.rp_filter": 0,
    "net.ipv4.conf.default.rp_filter": 0,
    "net.ipv4.conf.all.accept_redirects": 0,
    "net.ipv4.conf.all.send_redirects": 0,
    "net.ipv6.conf.all.accept_ra": 0,
    "net.ipv6.conf.default.accept_ra": 0,
    "net.ipv6.conf.all.accept_redirects": 0,
    "net.ipv6.conf.all.accept_dad": 0,
    "net.ipv6.conf.default.accept_dad": 0,
    # Renaming the arrival interface takes it down: its IPv6 addresses must survive that.
    "net.ipv6.conf.all.keep_addr_on_down": 1,
    "net.ipv6.conf.default.keep_addr_on_down": 1,
}


def environment() -> str:
    """mangle (marker drop, OUTPUT DROP) and empty security: observers only."""
    return ("*mangle\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n"
            ":OUTPUT DROP [0:0]\n:POSTROUTING ACCEPT [0:0]\n-A PREROUTING -s {marker} -j DROP\n"
            "COMMIT\n*security\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n"
            ":OUTPUT ACCEPT [0:0]\nCOMMIT\n")


@dataclass
class Router:
    """One router namespace and the sender's socket towards it."""

    side: str
    ns: str
    tx: socket.socket
    ifname: str = RX_IFNAME  # the arrival interface's current name
    dummies: list[str] = field(default_factory=list)
    readers: dict[Family, XtReader] = field(default_factory=dict)

    def close(self) -> None:
        """Close the sockets."""
        self.tx.close()
        for r in self.readers.values():
            r.close()


class RouterRig(TwinRig):
    """A sender and two routers (netfilter, pybpfilter); see the module docstring."""

    watched = OBSERVED

    def __init__(self, bpffs_root: str) -> None:
        super().__init__()
        self.sender = topo_mod.create_netns(unique_name("s"))
        self.namespaces.append(self.sender)
        self.routers: dict[str, Router] = self.sides  # type: ignore[assignment]
        try:
            for i, side in enumerate(SIDES):
                self.routers[side] = self._router(side, i)
            self.runtime = Runtime("nf", netns_name=self.routers["pybpfilter"].ns,
                                   root=bpffs_root)
            self.markers = {fam: build(UDP(sport=MARKER_DPORT, dport=MARKER_DPORT),
                                       MARKER_SRC[fam], RX_ADDRS[fam][0], src_mac=TX_MAC,
                                       dst_mac=RX_MAC) for fam in Family}
        except BaseException:
            self.close()
            raise

    def _router(self, side: str, i: int) -> Router:
        ns = topo_mod.create_netns(unique_name("r"))
        self.namespaces.append(ns)
        for key, value in ROUTER_SYSCTLS.items():
            topo_mod.write_sysctl(ns, key, value)
        tx_if, rx_if = unique_name("t"), unique_name("v")
        subprocess.run(["ip", "link", "add", tx_if, "index", str(10 + i), "address", TX_MAC,
                        "netns", self.sender, "type", "veth", "peer", "name", rx_if,
                        "index", "20", "address", RX_MAC, "netns", ns],
                       check=True, capture_output=True, text=True)
        topo_mod.write_sysctl(self.sender, f"net.ipv6.conf.{tx_if}.disable_ipv6", 1)
        topo_mod.ip_batch(self.sender, [f"link set {tx_if} up"])
        cmds = [f"link set {rx_if} name {RX_IFNAME}"]
        cmds += [f"addr add {a} dev {RX_IFNAME}" for a in RX_NETS[Family.IPV4]]
        cmds += [f"addr add {a} dev {RX_IFNAME} nodad" for a in RX_NETS[Family.IPV6]]
        cmds.append(f"link set {RX_IFNAME} up")
        topo_mod.ip_batch(ns, cmds)
        topo_mod.write_sysctl(ns, f"net.ipv4.conf.{RX_IFNAME}.rp_filter", 0)
        topo_mod.write_sysctl(ns, f"net.ipv6.conf.{RX_IFNAME}.router_solicitations", 0)
        for fam in Family:
            restore(ns, fam, environment().format(marker=MARKER_SRC[fam]))
        # Conntrack on from the start on both sides, whatever the ruleset reads.
        conntrack.enable(ns)
        with netns.enter(self.sender):
            tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        tx.bind((tx_if, 0))
        topo_mod.wait_running(self.sender, tx_if)
        topo_mod.wait_running(ns, RX_IFNAME)
        return Router(side, ns, tx, readers={fam: XtReader(ns, fam) for fam in Family})

    # -- interfaces --------------------------------------------------------------------------

    def set_interfaces(self, arrival: str, behind: dict[str, list[str]]) -> str:
        """Name the arrival interface `arrival`; one veth per other name of `behind`, routing
        its subnets there; returns the interface the default routes leave through."""
        default = next(n for n in DEFAULT_IFS if n != arrival and n not in behind)
        outs = {n: nets for n, nets in behind.items() if n != arrival}
        outs[default] = []
        for r in self.routers.values():
            # Whatever an earlier, failed call left: -force goes on past missing devices.
            subprocess.run(["ip", "-n", r.ns, "-force", "-batch", "-"], check=False,
                           input="".join(f"link del {d}\n" for d in r.dummies),
                           capture_output=True, text=True)
            r.dummies = list(outs)
            cmds = []
            if r.ifname != arrival:
                cmds += [f"link set {r.ifname} down", f"link set {r.ifname} name {arrival}",
                         f"link set {arrival} up"]
            for name, nets in outs.items():
                # No dummy driver here: a veth whose peer stays down drops what it is given;
                # NOARP, so nothing waits for a neighbour.
                cmds += [f"link add {name} type veth peer name {unique_name('p')}",
                         f"link set {name} arp off", f"link set {name} up"]
                # Routes are tried in order of prefix length anyway: a clash is harmless.
                cmds += [f"route replace {net} dev {name}" for net in nets]
            cmds += [f"route replace default dev {default}",
                     f"route replace ::/0 dev {default}"]
            topo_mod.ip_batch(r.ns, cmds)
            # (rp_filter stays 0: the device's settings follow it through the rename)
            r.ifname = arrival
            topo_mod.wait_running(r.ns, arrival)
        return default

    # -- rulesets ----------------------------------------------------------------------------

    def load(self, text: str, family: Family) -> None:
        """Load filter-table restore text into both routers (LoadError if iptables refuses)."""
        from .compare import parse_ruleset

        if self.family is not None and self.family is not family:
            restore(self.routers["netfilter"].ns, self.family, empty_table("filter"))
        # iptables-restore keeps the policy of a built-in chain the text does not declare
        # (kube-proxy's files declare none): start from ACCEPT, as pybpfilter does.
        restore(self.routers["netfilter"].ns, family, empty_table("filter"))
        restore(self.routers["netfilter"].ns, family, text)
        self.load_bpf(parse_ruleset(text, family), text, family)
