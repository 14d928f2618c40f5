"""State-table cases: -m hashlimit and -m recent rules, a packet sequence and netfilter's verdicts.

Shared by tests/test_statematch.py (pybpfilter's programs through BPF_PROG_TEST_RUN, against
the verdicts written here) and tests/test_statematch_differential.py (the kernel's xt_hashlimit
and xt_recent under legacy iptables, which must give the verdicts written here, and pybpfilter
packet by packet against it). Each case names its own tables: the kernel keeps a table across
restores as long as some rule names it. Rates are slow (per hour) so that timing cannot matter.
"""

from __future__ import annotations

from dataclasses import dataclass

from bpfilter.ir.model import Family

from .frames import IpProto, PacketSpec, udp_bytes
from .set_cases import icmp, pkt, tcp, udp

V4, V6 = Family.IPV4, Family.IPV6
A, D = "ACCEPT", "DROP"
# Sources and destinations the differential topology delivers (tests/oracle/addresses.py).
S1, S2, S3, S4 = "192.0.2.1", "192.0.2.4", "192.0.2.100", "198.51.100.1"
R1, R2, R3 = "192.0.2.2", "192.0.2.3", "198.51.100.130"
S61, S62, S63 = "2001:db8:a::1", "2001:db8:a::4", "2001:db8:b::1"


@dataclass(frozen=True)
class StateCase:
    """Rules for filter INPUT (policy ACCEPT), packets in order and netfilter's verdicts."""

    name: str
    rules: tuple[str, ...]
    packets: tuple[tuple[PacketSpec, str], ...]
    family: Family = V4
    table: str = "filter"
    chain: str = "INPUT"

    def text(self) -> str:
        """iptables-restore text of the tested table."""
        lines = [f"*{self.table}", f":{self.chain} ACCEPT [0:0]",
                 *(f"-A {self.chain} {r}" for r in self.rules), "COMMIT"]
        return "\n".join(lines) + "\n"


def ssh(src: str, ttl: int = 64) -> PacketSpec:
    """A TCP SYN to port 22 (a new SSH connection attempt)."""
    return tcp(dport=22, src=src, ttl=ttl)


def u(src: str, dport: int = 53, *, dst: str | None = None, ttl: int = 64,
      fam: Family = V4) -> PacketSpec:
    """A UDP datagram."""
    return udp(fam, dport=dport, src=src, dst=dst, ttl=ttl)


def big(src: str, size: int = 500) -> PacketSpec:
    """A UDP datagram with `size` bytes of payload (byte-rate cases)."""
    return pkt(V4, IpProto.UDP, udp_bytes(40000, 53, bytes(size)), src=src)


HL = "-m hashlimit --hashlimit-{} 1/hour --hashlimit-burst {} --hashlimit-name {}"

CASES = [
    StateCase(
        "recent_ssh_bruteforce",
        ("-p tcp --dport 22 -m recent --set --name ssh1",
         "-p tcp --dport 22 -m recent --update --seconds 60 --hitcount 4 --name ssh1 -j DROP"),
        (*((ssh(S1), v) for v in (A, A, A, D, D)), *((ssh(S2), A) for _ in range(3)),
         (ssh(S1), D), (ssh(S2), D))),
    StateCase(
        "recent_rcheck_remove_invert",
        ("-p udp --dport 1 -m recent --set --name rc2",
         "-p udp --dport 2 -m recent --remove --name rc2 -j DROP",
         "-p udp --dport 3 -m recent --rcheck --name rc2 -j DROP",
         "-p udp --dport 4 -m recent ! --rcheck --name rc2 -j DROP"),
        ((u(S1, 3), A), (u(S1, 4), D), (u(S1, 2), A), (u(S1, 1), A), (u(S1, 3), D),
         (u(S1, 4), A), (u(S2, 3), A), (u(S1, 2), D), (u(S1, 3), A), (u(S1, 2), A))),
    StateCase(
        "recent_rdest_mask",
        ("-p udp --dport 1 -m recent --set --rdest --mask 255.255.255.0 --name rc3",
         "-p udp --dport 3 -m recent --rcheck --rdest --name rc3 -j DROP"),
        ((u(S1, 3, dst=R2), A), (u(S1, 1, dst=R1), A), (u(S4, 3, dst=R2), D),
         (u(S4, 3, dst=R3), A))),
    StateCase(
        "recent_rttl",
        ("-p udp --dport 1 -m recent --set --name rc4",
         "-p udp --dport 3 -m recent --rcheck --rttl --name rc4 -j DROP"),
        ((u(S1, 1, ttl=64), A), (u(S1, 3, ttl=63), A), (u(S1, 3, ttl=64), D),
         (u(S1, 1, ttl=50), A), (u(S1, 3, ttl=64), A), (u(S1, 3, ttl=50), D))),
    StateCase(
        "recent_update_counts_only_hits",
        ("-p udp --dport 1 -m recent --set --name rc5",
         "-p udp --dport 3 -m recent --update --hitcount 3 --name rc5 -j DROP"),
        ((u(S1, 1), A), (u(S1, 3), A), (u(S1, 3), A), (u(S1, 1), A), (u(S1, 3), A),
         (u(S1, 1), A), (u(S1, 3), D), (u(S1, 3), D))),
    StateCase(
        "recent_hitcount_above_32",
        ("-p udp --dport 1 -m recent --set --name rc6",
         "-p udp --dport 3 -m recent --rcheck --hitcount 40 --name rc6 -j DROP"),
        (*((u(S1, 1), A) for _ in range(39)), (u(S1, 3), A), (u(S1, 1), A), (u(S1, 3), D))),
    StateCase(
        "recent_v6",
        ("-p udp --dport 1 -m recent --set --name rc7 --mask ffff:ffff:ffff:ffff::",
         "-p udp --dport 3 -m recent --rcheck --name rc7 -j DROP"),
        ((u(S61, 1, fam=V6), A), (u(S62, 3, fam=V6), D), (u(S63, 3, fam=V6), A)), V6),
    StateCase(
        "hashlimit_per_source",
        (f"-p udp {HL.format('upto', 3, 'hl1')} --hashlimit-mode srcip -j ACCEPT",
         "-p udp -j DROP"),
        (*((u(S1), v) for v in (A, A, A, D)), *((u(S2), v) for v in (A, A, A, D)),
         (u(S1), D))),
    StateCase(
        "hashlimit_above_per_source_and_port",
        (f"-p udp {HL.format('above', 2, 'hl2')} --hashlimit-mode srcip,dstport -j DROP",),
        ((u(S1, 53), A), (u(S1, 53), A), (u(S1, 53), D), (u(S1, 54), A), (u(S2, 53), A),
         (u(S1, 53), D))),
    StateCase(
        "hashlimit_srcmask",
        (f"-p udp {HL.format('above', 2, 'hl3')} --hashlimit-mode srcip "
         "--hashlimit-srcmask 24 -j DROP",),
        ((u(S1), A), (u(S2), A), (u(S3), D), (u(S4), A))),
    StateCase(
        "hashlimit_name_shared_first_rule_configures",
        (f"-p udp --dport 1 {HL.format('above', 2, 'hl4')} --hashlimit-mode srcip -j DROP",
         f"-p udp --dport 2 {HL.format('above', 5, 'hl4')} --hashlimit-mode dstip -j DROP"),
        ((u(S1, 1), A), (u(S1, 1), A), (u(S1, 1), D), (u(S1, 2), D), (u(S2, 2), A),
         (u(S2, 2), A), (u(S2, 2), D))),
    StateCase(
        "hashlimit_ports_of_portless_protocols",
        (f"{HL.format('above', 1, 'hl5')} --hashlimit-mode dstport -j DROP",),
        ((icmp(src=S1), A), (icmp(src=S2), D), (u(S1, 53), A), (u(S2, 53), D),
         (tcp(dport=53, src=S1), D))),
    StateCase(
        # 1kb/s: a second of credit pays 65 chunks of 16 bytes; a 528-byte datagram costs 34.
        # The burst (2kb: two refills of an empty bucket) lets two more through.
        "hashlimit_bytes_burst_refills",
        ("-p udp -m hashlimit --hashlimit-above 1kb/s --hashlimit-burst 2kb "
         "--hashlimit-mode srcip --hashlimit-name hl7 -j DROP",),
        ((big(S1), A), (big(S1), A), (big(S1), A), (big(S1), D), (big(S2), A),
         (big(S2, 100), A), (big(S2, 400), A), (big(S2, 500), A), (big(S2, 500), A),
         (big(S2, 500), D), (big(S1, 20), A))),
    StateCase(
        "hashlimit_bytes_no_burst",
        ("-p udp -m hashlimit --hashlimit-upto 2kb/s --hashlimit-name hl8 -j ACCEPT",
         "-p udp -j DROP"),
        # One bucket for all (no mode): a second's credit pays 129 chunks; 1228 bytes cost 77.
        ((big(S1, 1200), A), (big(S2, 1000), D), (big(S1, 100), A), (big(S1, 900), D),
         (big(S1, 0), A))),
    StateCase(
        "hashlimit_v6_srcmask",
        (f"-p udp {HL.format('above', 1, 'hl6')} --hashlimit-mode srcip "
         "--hashlimit-srcmask 64 -j DROP",),
        ((u(S61, fam=V6), A), (u(S62, fam=V6), D), (u(S63, fam=V6), A)), V6),
]
