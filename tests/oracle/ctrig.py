"""Two receivers side by side for stateful rulesets: legacy iptables in one, pybpfilter in the
other.

BPF_PROG_TEST_RUN gives a netfilter program an skb without a conntrack entry, so stateful rules
are compared on real traffic instead. One sender namespace has a veth pair to each receiver; the
receivers are configured identically (addresses, static neighbours, sysctls, and an environment
of legacy tables: NOTRACK and conntrack-helper rules in raw, DNAT/SNAT in nat, observers in
mangle and security) and differ only in who runs the tested filter ruleset: `iptables-legacy-
restore` in one, pybpfilter's netfilter programs (`Runtime(...).restore`, private bpffs) in the
other. The kernel's conntrack keeps the state in each; what is compared is how each ruleset reads
it, packet by packet.

Unlike the stateless oracle (netfilter.py), locally generated traffic is not dropped: the
receivers' own replies (SYN-ACK, RST, ICMP errors, echo replies) are part of every connection's
state. They are captured on the receivers' interfaces (a packet socket sees an outgoing frame
synchronously, while the packet that caused it is being handled), so the peer emulation can
acknowledge each receiver's own sequence numbers. Verdicts are read with the same observers as
the stateless oracle: mangle INPUT counts arrivals, security INPUT what the tested chain accepted,
and a marker frame of the other family, dropped in mangle PREROUTING, tells that a frame has been
handled completely.
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
from .netfilter import MARKER_DPORT, RX_SYSCTLS, other, restore
from .twin import TwinRig
from .xtables import XtReader

ETH_P_ALL = 0x0003  # <linux/if_ether.h>: every protocol, for the capture sockets

# Both receivers answer to the same MAC on their own segment, and both sender ports use one MAC:
# a frame is byte for byte the same whichever receiver it is sent to.
TX_MAC, RX_MAC = "02:bf:c7:00:00:01", "02:bf:c7:00:00:02"
SIDES = ("netfilter", "pybpfilter")

# Peers the sender speaks for (on the receivers' subnets: static neighbours point at TX_MAC).
PEERS = {
    Family.IPV4: ("192.0.2.1", "192.0.2.4", "198.51.100.129"),
    Family.IPV6: ("2001:db8:a::1", "2001:db8:a::4", "2001:db8:b::8001"),
}
LOCALS = {fam: addrs[:3] for fam, addrs in RX_ADDRS.items()}

# The environment both receivers share. DNAT: TCP to the second local address, port 8080, goes to
# the first one's port 80 (prerouting: filter INPUT already sees it translated). SNAT: the third
# peer's TCP to port 22 gets another source (nat INPUT runs after filter INPUT: the first packet
# is not SNATed yet, the following ones are). UDP port 7 is not tracked; TFTP (69) has its helper,
# whose expectations make RELATED connections with the EXPECTED status.
DNAT_PORT, DNAT_TO_PORT = 8080, 80
SNAT_TO = {Family.IPV4: "198.51.100.200", Family.IPV6: "2001:db8:b::8200"}
NOTRACK_PORT, TFTP_PORT = 7, 69


def _bracket(fam: Family, addr: str) -> str:
    return f"[{addr}]" if fam is Family.IPV6 else addr


def environment(fam: Family) -> str:
    """Restore text of the environment tables of `fam` (raw, nat, mangle, security)."""
    dnat_to = f"{_bracket(fam, LOCALS[fam][0])}:{DNAT_TO_PORT}"
    return (
        "*raw\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
        f"-A PREROUTING -p udp --dport {NOTRACK_PORT} -j CT --notrack\n"
        f"-A PREROUTING -p udp --dport {TFTP_PORT} -j CT --helper tftp\n"
        f"-A OUTPUT -p udp --dport {TFTP_PORT} -j CT --helper tftp\n"
        "COMMIT\n"
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
        ":POSTROUTING ACCEPT [0:0]\n"
        f"-A PREROUTING -d {LOCALS[fam][1]} -p tcp --dport {DNAT_PORT} -j DNAT "
        f"--to-destination {dnat_to}\n"
        f"-A INPUT -s {PEERS[fam][2]} -p tcp --dport 22 -j SNAT --to-source {SNAT_TO[fam]}\n"
        "COMMIT\n"
        "*mangle\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n"
        ":OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n"
        f"-A PREROUTING -s {MARKER_SRC[fam]} -j DROP\n"
        "COMMIT\n"
        "*security\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
        "COMMIT\n")


# Replies must not depend on what a receiver sent recently: no ICMP or challenge-ACK limits.
QUIET_SYSCTLS = {
    "net.ipv4.icmp_ratelimit": 0,
    "net.ipv4.icmp_msgs_burst": 100000,
    "net.ipv4.icmp_msgs_per_sec": 100000,
    "net.ipv6.icmp.ratelimit": 0,
    "net.ipv4.tcp_invalid_ratelimit": 0,
    "net.ipv4.tcp_challenge_ack_limit": 2147483647,
    "net.ipv6.conf.all.accept_dad": 0,
}
# Conntrack timeouts a test may lower, and what they are restored to.
CT_TIMEOUT_PREFIX = "net.netfilter.nf_conntrack_"


@dataclass
class Receiver:
    """One receiver namespace and the sockets that feed and watch it."""

    side: str
    ns: str
    tx_if: str
    tx: socket.socket  # packet socket on the sender's port towards this receiver
    cap: socket.socket  # packet socket on the receiver's interface (outgoing frames)
    readers: dict[Family, XtReader] = field(default_factory=dict)

    def close(self) -> None:
        """Close the sockets."""
        self.tx.close()
        self.cap.close()
        for r in self.readers.values():
            r.close()

    def captured(self) -> list[bytes]:
        """The frames this receiver sent since the last call."""
        out = []
        while True:
            try:
                data, addr = self.cap.recvfrom(65535)
            except BlockingIOError:
                return out
            if addr[2] == socket.PACKET_OUTGOING:
                out.append(data)


class CtRig(TwinRig):
    """A sender and two receivers (netfilter, pybpfilter); see the module docstring."""

    def __init__(self, bpffs_root: str, hook: str = "nf") -> None:
        super().__init__()
        self.hook = hook  # pybpfilter's hook: nf, or tc/xdp on the receiver's interface
        self.sender = topo_mod.create_netns(unique_name("s"))
        self.namespaces.append(self.sender)
        self.receivers: dict[str, Receiver] = self.sides  # type: ignore[assignment]
        self.loaded: tuple[Family, str] | None = None  # what both receivers run
        try:
            for i, side in enumerate(SIDES):
                self.receivers[side] = self._receiver(side, i)
            self.runtime = Runtime(hook, netns_name=self.receivers["pybpfilter"].ns,
                                   iface=None if hook == "nf" else RX_IFNAME, root=bpffs_root)
            self.markers = {fam: build(UDP(sport=MARKER_DPORT, dport=MARKER_DPORT),
                                       MARKER_SRC[fam], RX_ADDRS[fam][0], src_mac=TX_MAC,
                                       dst_mac=RX_MAC) for fam in Family}
        except BaseException:
            self.close()
            raise

    # -- setup -------------------------------------------------------------------------------

    def _receiver(self, side: str, i: int) -> Receiver:
        ns = topo_mod.create_netns(unique_name("r"))
        self.namespaces.append(ns)
        tx_if, rx_if = unique_name("t"), unique_name("v")
        subprocess.run(["ip", "link", "add", tx_if, "index", str(10 + i), "address", TX_MAC,
                        "netns", self.sender, "type", "veth", "peer", "name", rx_if,
                        "index", "20", "address", RX_MAC, "netns", ns],
                       check=True, capture_output=True, text=True)
        # The sender only injects frames: no addresses, no IPv6 chatter of its own.
        topo_mod.write_sysctl(self.sender, f"net.ipv6.conf.{tx_if}.disable_ipv6", 1)
        topo_mod.ip_batch(self.sender, [f"link set {tx_if} up"])
        topo_mod.write_sysctl(ns, f"net.ipv6.conf.{rx_if}.accept_dad", 0)
        topo_mod.write_sysctl(ns, f"net.ipv6.conf.{rx_if}.router_solicitations", 0)
        cmds = [f"link set {rx_if} name {RX_IFNAME}"]
        cmds += [f"addr add {a} dev {RX_IFNAME}" for a in RX_NETS[Family.IPV4]]
        cmds += [f"addr add {a} dev {RX_IFNAME} nodad" for a in RX_NETS[Family.IPV6]]
        cmds.append(f"link set {RX_IFNAME} up")
        for fam in Family:
            for addr in (*PEERS[fam], SNAT_TO[fam]):
                cmds.append(f"neigh replace {addr} lladdr {TX_MAC} dev {RX_IFNAME} "
                            "nud permanent")
        topo_mod.ip_batch(ns, cmds)
        for key, value in {**RX_SYSCTLS, **QUIET_SYSCTLS}.items():
            topo_mod.write_sysctl(ns, key.format(ifname=RX_IFNAME), value)
        for fam in Family:
            restore(ns, fam, environment(fam))
        with netns.enter(self.sender):
            tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        tx.bind((tx_if, 0))
        with netns.enter(ns):
            cap = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        cap.bind((RX_IFNAME, 0))
        cap.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        cap.setblocking(False)
        rx = Receiver(side, ns, tx_if, tx, cap, {fam: XtReader(ns, fam) for fam in Family})
        topo_mod.wait_running(self.sender, tx_if)
        topo_mod.wait_running(ns, RX_IFNAME)
        return rx

    # -- rulesets ----------------------------------------------------------------------------

    def load(self, text: str, family: Family) -> None:
        """Load filter-table restore text into both receivers (LoadError if iptables refuses)."""
        from .compare import parse_ruleset

        restore(self.receivers["netfilter"].ns, family, text)
        rs = parse_ruleset(text, family)
        if self.hook != "nf" and self.family not in (None, family):
            # tc/XDP see the other family's marker frames before mangle PREROUTING counts them:
            # that family's last ruleset must not drop them.
            empty = ("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
                     "COMMIT\n")
            self.runtime.restore(parse_ruleset(empty, other(self.family)), text=empty)
        self.load_bpf(rs, text, family)
        self.loaded = (family, text)

    def set_sysctl(self, key: str, value: int) -> None:
        """Set a sysctl in both receivers (conntrack timeouts are per namespace)."""
        for rx in self.receivers.values():
            topo_mod.write_sysctl(rx.ns, key, value)

    def sysctl(self, key: str) -> str:
        """A sysctl's value (the same in both receivers)."""
        return topo_mod.read_sysctl(self.receivers["netfilter"].ns, key)

    def conntrack_entries(self, side: str) -> list[str]:
        """The receiver's conntrack table, as `conntrack -L` prints it."""
        ns = self.receivers[side].ns
        return conntrack.entries(ns, "ipv4") + conntrack.entries(ns, "ipv6")

    # -- observing ---------------------------------------------------------------------------

    def counter_keys(self, side: str) -> set[tuple[str, int | None]]:
        """Every (chain, rule) counter of the loaded filter table; rule None for a policy."""
        assert self.family is not None
        return set(self.counters(side, self.family))

    def _reached(self, side: str, reached: int, deltas: dict) -> int:
        if side == "pybpfilter" and self.hook != "nf":
            # tc/XDP decide before mangle INPUT: the frame reached the chain if it counted.
            return int(any(d.packets for (c, _), d in deltas.items() if c != "OUTPUT"))
        return reached
