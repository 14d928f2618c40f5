"""Scenarios of the stateful differential suite: flows and the steps that make them happen.

A scenario is a list of flows (peer <-> receiver, either side opening) and a sequence of steps.
*Peer steps* are frames the sender injects for the peer (a TCP segment, a datagram, an echo, an
ICMP error quoting a packet of a flow); each is observed on both receivers and compared. *Local
steps* are what the receiver's own sockets do (connect, send, close, reset, reply): they run in
both receivers and are not compared themselves, but the state they create is. `wait` lets
conntrack timeouts pass; `reload` restores the loaded ruleset again on both receivers (state
must survive a replace).

Sequence and acknowledgement numbers are relations (`next`, `old`, `ahead`, `far`, `zero`): each
receiver picks its own initial sequence numbers, so the peer emulation (ctpeer.py) turns a
relation into the number each receiver expects, from the frames it captured.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from bpfilter.ir.model import Family

PEER_OPS = ("tcp", "udp", "echo", "echo-reply", "icmp-error")
LOCAL_OPS = ("connect", "send", "close", "reset", "reply")
SEQ_RELS = ("next", "old", "ahead", "far")
ACK_RELS = ("next", "old", "far", "zero")


@dataclass(frozen=True)
class Flow:
    """One conversation between a peer and the receiver: proto tcp, udp or icmp; for icmp the
    ports are the echo identifier. `outgoing`: the receiver's own socket opens it."""

    proto: str
    peer: str
    local: str
    peer_port: int
    local_port: int
    outgoing: bool = False

    @property
    def family(self) -> Family:
        """The address family."""
        return Family.IPV6 if ipaddress.ip_address(self.peer).version == 6 else Family.IPV4

    def describe(self) -> str:
        """A one-line summary for reports."""
        arrow = "<-" if self.outgoing else "->"
        if self.proto == "icmp":
            return f"icmp echo id {self.peer_port}: peer {self.peer} {arrow} {self.local}"
        return (f"{self.proto} peer {self.peer}:{self.peer_port} {arrow} "
                f"{self.local}:{self.local_port}")


@dataclass(frozen=True)
class Step:
    """One step; fields beyond `op` and `flow` only mean something for some ops."""

    op: str
    flow: int = 0
    flags: str = ""  # tcp: flag letters F S R P A U
    seq: str = "next"  # tcp: a SEQ_RELS relation to the peer's own sequence
    ack: str = "next"  # tcp: an ACK_RELS relation to what the receiver sent
    size: int = 0  # payload bytes
    sport: int | None = None  # a peer packet from another port than the flow's
    about: str = "last"  # icmp-error: quote the receiver's `last` packet, or a `forged` one
    wrong_dst: bool = False  # icmp-error: sent to another local address than the quoted source
    code: int = 0  # icmp-error: 0 unreachable, 1 time exceeded
    badsum: bool = False  # a wrong transport checksum
    seconds: float = 0.0  # wait

    @property
    def is_peer(self) -> bool:
        """True for a frame the peer sends (observed and compared)."""
        return self.op in PEER_OPS

    def describe(self, flows: tuple[Flow, ...]) -> str:
        """A one-line summary for reports."""
        if self.op == "wait":
            return f"wait {self.seconds} s"
        if self.op == "reload":
            return "reload the ruleset"
        bits = [self.op, f"flow {self.flow}"]
        if self.op == "tcp":
            bits += [self.flags or "-", f"seq {self.seq}"]
            if "A" in self.flags:
                bits.append(f"ack {self.ack}")
        if self.size:
            bits.append(f"{self.size} B")
        if self.sport is not None:
            bits.append(f"from port {self.sport}")
        if self.op == "icmp-error":
            bits += [f"quoting {self.about}", "time-exceeded" if self.code else "unreachable"]
            if self.wrong_dst:
                bits.append("to another local address")
        if self.badsum:
            bits.append("bad checksum")
        return " ".join(bits)


@dataclass(frozen=True)
class Scenario:
    """Flows and steps, for one family."""

    family: Family
    flows: tuple[Flow, ...]
    steps: tuple[Step, ...] = field(default=())

    def describe(self) -> str:
        """Flows and steps, one per line."""
        lines = [f"flow {i}: {f.describe()}" for i, f in enumerate(self.flows)]
        lines += [f"  {n}. {s.describe(self.flows)}" for n, s in enumerate(self.steps, 1)]
        return "\n".join(lines)
