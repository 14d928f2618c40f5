"""Hypothesis strategies for the stateful suite: scenarios of flows and steps, and rulesets of
conntrack/state matches (every option) mixed with ordinary matches and user chains.

Scenarios start from a script per kind of flow (a handshake, request and reply, echo), then
steps are dropped, repeated (a TCP repeat is a retransmission), bent (other flags, sequence or
acknowledgement numbers out of window, a wrong checksum) and extra frames inserted (RST, ICMP
errors quoting the flow, a made-up one or another local address); the flows' scripts are then
interleaved. Rules draw their values from the flows' addresses and ports, and from ranges that
hold for every relocated ephemeral port (see ctcompare.relocate).
"""

from __future__ import annotations

from collections.abc import Callable

from hypothesis import strategies as st

from bpfilter.ir.model import ACCEPT, DROP, RETURN, Family

from .ctcompare import EPHEMERAL
from .ctflows import ACK_RELS, SEQ_RELS, Flow, Scenario, Step
from .ctrig import DNAT_PORT, LOCALS, NOTRACK_PORT, PEERS, SNAT_TO, TFTP_PORT
from .rules import RulesetSpec, RuleSpec
from .strategies import chance

KINDS = ("tcp-in", "tcp-out", "udp-in", "udp-out", "icmp-in", "icmp-out")
TCP_IN_PORTS = (22, 80, 23, DNAT_PORT)  # listening, listening, closed, DNAT to LOCALS[0]:80
UDP_IN_PORTS = (53, 54, NOTRACK_PORT, TFTP_PORT)  # bound, closed, not tracked, TFTP helper
TCP_OUT_PORTS, UDP_OUT_PORTS = (80, 443), (53, TFTP_PORT)
TCP_FLAGS = ("S", "SA", "A", "PA", "FA", "R", "RA", "F", "", "SF", "SR", "PAU", "FPU")
OTHER_PORT = EPHEMERAL + 5000  # a peer datagram from another port than the flow's

# (op, extra Step fields) per kind of flow.
SCRIPTS: dict[str, tuple[tuple[str, dict], ...]] = {
    "tcp-in": (("tcp", {"flags": "S"}), ("tcp", {"flags": "A"}),
               ("tcp", {"flags": "PA", "size": 5}), ("tcp", {"flags": "FA"}),
               ("tcp", {"flags": "A"})),
    "tcp-out": (("connect", {}), ("tcp", {"flags": "SA"}), ("tcp", {"flags": "PA", "size": 5}),
                ("send", {"size": 3}), ("tcp", {"flags": "A"}), ("close", {}),
                ("tcp", {"flags": "FA"})),
    "udp-in": (("udp", {}), ("reply", {}), ("udp", {}), ("udp", {})),
    "udp-out": (("send", {}), ("udp", {}), ("udp", {"sport": OTHER_PORT}),
                ("icmp-error", {})),
    "icmp-in": (("echo", {}), ("echo", {}), ("echo-reply", {})),
    "icmp-out": (("send", {}), ("echo-reply", {}), ("send", {}), ("echo-reply", {}),
                 ("icmp-error", {})),
}


@st.composite
def flow_spec(draw: Callable, fam: Family, i: int) -> tuple[str, Flow]:
    """A flow of a drawn kind; ephemeral ports are EPHEMERAL + 10 * i."""
    kind = draw(st.sampled_from(KINDS))
    peer = draw(st.sampled_from(PEERS[fam]))
    local = draw(st.sampled_from(LOCALS[fam]))
    eph = EPHEMERAL + 10 * i
    proto, direction = kind.split("-")
    if proto == "icmp":
        return kind, Flow("icmp", peer, local, eph, eph, direction == "out")
    if direction == "out":
        port = draw(st.sampled_from(TCP_OUT_PORTS if proto == "tcp" else UDP_OUT_PORTS))
        return kind, Flow(proto, peer, local, port, eph, True)
    port = draw(st.sampled_from(TCP_IN_PORTS if proto == "tcp" else UDP_IN_PORTS))
    if port == DNAT_PORT:
        local = LOCALS[fam][1]
    return kind, Flow(proto, peer, local, eph, port)


@st.composite
def tcp_step(draw: Callable, i: int, flags: str | None = None) -> Step:
    """A TCP segment from the peer, with any flags and sequence relations."""
    return Step("tcp", i, draw(st.sampled_from(TCP_FLAGS)) if flags is None else flags,
                seq=draw(st.sampled_from(SEQ_RELS)), ack=draw(st.sampled_from(ACK_RELS)),
                size=draw(st.sampled_from((0, 0, 4))), badsum=chance(draw, 10))


@st.composite
def icmp_error_step(draw: Callable, i: int) -> Step:
    """An ICMP error about flow i: its last packet, a made-up one, or a stranger's."""
    return Step("icmp-error", i, about=draw(st.sampled_from(("last", "made", "stranger"))),
                wrong_dst=chance(draw, 20), code=draw(st.sampled_from((0, 1))))


def _bend(draw: Callable, s: Step) -> Step:
    if s.op == "tcp":
        return draw(tcp_step(s.flow))
    if s.op == "icmp-error":
        return draw(icmp_error_step(s.flow))
    if s.op in ("udp", "echo", "echo-reply"):
        return Step(**{**s.__dict__, "badsum": True}) if chance(draw, 50) else \
            Step(**{**s.__dict__, "sport": OTHER_PORT + s.flow})
    return s


@st.composite
def flow_steps(draw: Callable, kind: str, i: int) -> list[Step]:
    """The flow's script with steps dropped, repeated, bent and inserted."""
    out: list[Step] = []
    for op, kw in SCRIPTS[kind]:
        s = Step(op, i, **kw)
        roll = draw(st.integers(0, 99))
        if roll >= 92:
            continue  # dropped
        if roll >= 84:
            out.append(_bend(draw, s))
            continue
        out.append(s)
        if roll >= 76 and s.is_peer:  # repeated: for TCP a retransmission
            out.append(Step(**{**s.__dict__, "seq": "old"}) if s.op == "tcp" else s)
    for _ in range(draw(st.integers(0, 2))):
        extra = draw(st.sampled_from(("tcp", "rst", "error", "reset")))
        if kind.startswith("tcp") and extra in ("tcp", "rst"):
            step = draw(tcp_step(i, draw(st.sampled_from(("R", "RA"))) if extra == "rst"
                                 else None))
        elif extra == "reset" and kind == "tcp-out":
            step = Step("reset", i)
        else:
            step = draw(icmp_error_step(i))
        out.insert(draw(st.integers(0, len(out))), step)
    return out


@st.composite
def scenario(draw: Callable, fam: Family, max_flows: int = 3) -> Scenario:
    """1-`max_flows` flows and their interleaved steps."""
    flows, scripts = [], []
    for i in range(draw(st.integers(1, max_flows))):
        kind, f = draw(flow_spec(fam, i))
        flows.append(f)
        scripts.append(draw(flow_steps(kind, i)))
    order = draw(st.permutations([i for i, s in enumerate(scripts) for _ in s]))
    pos = [0] * len(scripts)
    steps = []
    for i in order:
        steps.append(scripts[i][pos[i]])
        pos[i] += 1
    return Scenario(fam, tuple(flows), tuple(steps))


# -- rules ------------------------------------------------------------------------------------

STATES = ("INVALID", "NEW", "ESTABLISHED", "RELATED", "UNTRACKED", "SNAT", "DNAT")
STATUSES = ("EXPECTED", "SEEN_REPLY", "ASSURED", "CONFIRMED", "NONE")
PORT_VALUES = ("22", "80", "8080", "53", "69", "7", "443", "23", "0", "2048", "32768",
               "1024:65535", "40000:65535", "0:1023", "20:80", "1:39999")
PROTOS = {Family.IPV4: ("tcp", "udp", "icmp", "6", "17", "1"),
          Family.IPV6: ("tcp", "udp", "ipv6-icmp", "6", "17", "58")}
PLENS = {Family.IPV4: ("", "/24", "/25", "/16", "/0"), Family.IPV6: ("", "/64", "/48", "/0")}
ESTABLISHED_RELATED = (("-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED"),
                       ("-m", "state", "--state", "RELATED,ESTABLISHED"))


def _neg(draw: Callable, percent: int = 25) -> tuple[str, ...]:
    return ("!",) if chance(draw, percent) else ()


def _list(draw: Callable, names: tuple[str, ...]) -> str:
    return ",".join(draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True)))


@st.composite
def conntrack_part(draw: Callable, fam: Family) -> tuple[str, ...]:
    """-m conntrack with 1-3 criteria, maybe negated."""
    addrs = (*PEERS[fam], *LOCALS[fam], SNAT_TO[fam])
    keys = draw(st.lists(st.sampled_from(
        ("ctstate", "ctstate", "ctstatus", "ctdir", "ctproto", "ctorigsrc", "ctorigdst",
         "ctreplsrc", "ctrepldst", "ctorigsrcport", "ctorigdstport", "ctreplsrcport",
         "ctrepldstport")), min_size=1, max_size=3, unique=True))
    words: list[str] = ["-m", "conntrack"]
    for key in keys:
        if key == "ctstate":
            words += [*_neg(draw), "--ctstate", _list(draw, STATES)]
        elif key == "ctstatus":
            words += [*_neg(draw), "--ctstatus", _list(draw, STATUSES)]
        elif key == "ctdir":
            words += ["--ctdir", draw(st.sampled_from(("ORIGINAL", "REPLY")))]
        elif key == "ctproto":
            words += [*_neg(draw), "--ctproto", draw(st.sampled_from(PROTOS[fam]))]
        elif key.endswith("port"):
            words += [*_neg(draw), f"--{key}", draw(st.sampled_from(PORT_VALUES))]
        else:
            addr = draw(st.sampled_from(addrs)) + draw(st.sampled_from(PLENS[fam]))
            words += [*_neg(draw), f"--{key}", addr]
    return tuple(words)


@st.composite
def state_part(draw: Callable) -> tuple[str, ...]:
    """-m state, maybe negated."""
    return ("-m", "state", *_neg(draw), "--state", _list(draw, STATES[:5]))


@st.composite
def plain_part(draw: Callable, fam: Family) -> tuple[str, ...]:
    """An ordinary match: protocol and ports, --syn, addresses."""
    kind = draw(st.integers(0, 4))
    if kind == 0:
        port = draw(st.sampled_from(("22", "80", "23", "8080", "1024:65535")))
        return ("-p", "tcp", *_neg(draw), "--dport", port)
    if kind == 1:
        return ("-p", "tcp", *_neg(draw), "--syn")
    if kind == 2:
        return ("-p", "udp", *_neg(draw), "--dport", draw(st.sampled_from(("53", "69", "7"))))
    if kind == 3:
        return (*_neg(draw), "-p", "icmp" if fam is Family.IPV4 else "ipv6-icmp")
    return (*_neg(draw), "-s", draw(st.sampled_from(PEERS[fam])))


@st.composite
def ct_rule(draw: Callable, fam: Family, targets: tuple[str, ...]) -> RuleSpec:
    """A rule: maybe an ordinary match, 1-2 conntrack/state matches, maybe a limit."""
    words: list[str] = []
    if chance(draw, 40):
        words += draw(plain_part(fam))
    mods = [draw(conntrack_part(fam)) if chance(draw, 75) else draw(state_part())
            for _ in range(draw(st.integers(1, 2)))]
    if chance(draw, 10):
        # The bucket is only spent when the matches before it hold: its place matters.
        burst = draw(st.integers(1, 3))
        mods.insert(draw(st.integers(0, len(mods))),
                    ("-m", "limit", "--limit", "1/hour", "--limit-burst", str(burst)))
    for m in mods:
        words += m
    target = draw(st.sampled_from((None, *targets))) if chance(draw, 92) else None
    goto = target not in (None, ACCEPT, DROP, RETURN, "LOG") and chance(draw, 30)
    return RuleSpec(tuple(words), target, goto)


@st.composite
def ct_ruleset(draw: Callable, fam: Family) -> RulesetSpec:
    """filter INPUT with 1-8 rules (one of them the ESTABLISHED,RELATED accept) and 0-2 user
    chains; jumps only go to chains declared later."""
    names = ["INPUT"] + [f"c{i}" for i in range(1, draw(st.integers(0, 2)) + 1)]
    chains = []
    for n, name in enumerate(names):
        targets = (ACCEPT, DROP, RETURN, "LOG", *names[n + 1 :])
        rules = draw(st.lists(ct_rule(fam, targets), min_size=0 if n else 1,
                              max_size=7 if n == 0 else 4))
        if n == 0:
            est = RuleSpec(draw(st.sampled_from(ESTABLISHED_RELATED)), ACCEPT)
            rules.insert(draw(st.integers(0, len(rules))), est)
        chains.append((name, tuple(rules)))
    return RulesetSpec(fam, "filter", "INPUT", draw(st.sampled_from((ACCEPT, DROP))),
                       tuple(chains))
