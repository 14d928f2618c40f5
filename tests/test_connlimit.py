"""-m connlimit against the kernel's xt_connlimit, on the nf, tc and xdp hooks.

The same ruleset runs under legacy iptables in one receiver and under pybpfilter in the other
(tests/oracle/ctrig.py); emulated peers open TCP connections to the receivers' listening port
22 (or send UDP datagrams to port 53), keep them open, reset some and open more. Every frame
must get the same verdict, counters and deciding rule on both sides (tests/oracle/
ctcompare.py), and netfilter must give the verdicts stated here, so that each scenario really
crosses the limit. A large limit (300) is compared with real sockets: hundreds of connections
opened, some reset, more opened, under xt_connlimit and under pybpfilter in fresh namespaces.
The other tests: what is refused by name, the verifier on the largest limit, and a restore
keeping a rule's connections (pybpfilter only: the kernel forgets them).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from oracle.ctcompare import EPHEMERAL, StatefulDifferential
from oracle.ctflows import Flow, Scenario, Step
from oracle.ctpeer import UDP_OPEN_PORT
from oracle.ctrig import LOCALS, PEERS, CtRig
from oracle.rules import spec_from_text
from oracle.twin import private_bpffs, require_twin_tools

from bpfilter.compiler.validate import CompileError
from bpfilter.frontends.iptables import parse
from bpfilter.ir.model import Family
from bpfilter.runtime.checker import Checker

# Seconds between evaluations of a group: more than two jiffies, so that a refused connection is
# forgotten (not pending), and past the jiffy of the group's last addition, within which the
# kernel skips its walk (counting dead and duplicate entries; see compiler/connlimit.py).
SETTLE = 0.03
A, D = "ACCEPT", "DROP"


def _table(*rules: str) -> str:
    body = "".join(f"-A INPUT {r}\n" for r in rules)
    head = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
    return f"{head}{body}COMMIT\n"


@dataclass(frozen=True)
class Case:
    """A connlimit rule set and a scenario: (peer, local) of each connection, and what happens."""

    name: str
    rules: tuple[str, ...]
    conns: tuple[tuple[int, int], ...]  # indexes into PEERS / LOCALS
    # ("open", i, verdict of the SYN) / ("reset", i) / ("fin", i) / ("badsum", i, verdict of a
    # SYN with a wrong checksum: conntrack calls it INVALID) / ("udp", i, verdict of a datagram)
    script: tuple[tuple, ...]
    proto: str = "tcp"

    def text(self, refuse: str) -> str:
        """Restore text, `refuse` as the over-limit target."""
        return _table(*(r.replace("REFUSE", refuse) for r in self.rules))

    def scenario(self, fam: Family) -> tuple[Scenario, list[str]]:
        """The flows and steps, and netfilter's verdict for every peer frame."""
        port = 22 if self.proto == "tcp" else UDP_OPEN_PORT
        flows = tuple(Flow(self.proto, PEERS[fam][p], LOCALS[fam][lo], EPHEMERAL + i, port)
                      for i, (p, lo) in enumerate(self.conns))
        steps: list[Step] = []
        want: list[str] = []
        for op, i, *rest in self.script:
            if op == "udp":  # every datagram is counted (a refused one's entry is never confirmed)
                steps.append(Step("udp", flow=i, size=8))
                want.append(rest[0])
            elif op == "open":
                steps.append(Step("tcp", flow=i, flags="S"))
                want.append(rest[0])
                if rest[0] == A:  # complete the handshake; the connection stays open
                    steps.append(Step("tcp", flow=i, flags="A"))
                    want.append(A)
            elif op == "badsum":  # no conntrack entry: counted by its own tuple, not remembered
                steps.append(Step("tcp", flow=i, flags="S", badsum=True))
                want.append(rest[0])
            elif op == "fin":  # half closed (CLOSE_WAIT): still counted
                steps.append(Step("tcp", flow=i, flags="FA"))
                want.append(A)
            else:  # a reset from the peer: conntrack's CLOSE, which connlimit no longer counts
                steps.append(Step("tcp", flow=i, flags="R"))
                want.append(A)
            steps.append(Step("wait", seconds=SETTLE))
        return Scenario(fam, flows, tuple(steps)), want


SYN22 = "-p tcp --syn --dport 22"
CASES = (
    Case("above-2-per-source", (f"{SYN22} -m connlimit --connlimit-above 2 -j REFUSE",),
         ((0, 0),) * 6 + ((1, 0),),
         (("open", 0, A), ("open", 1, A), ("open", 2, D), ("open", 6, A), ("reset", 0),
          ("open", 3, A), ("open", 4, D), ("reset", 1), ("reset", 3), ("open", 5, A))),
    Case("upto-2-accepts", (f"{SYN22} -m connlimit --connlimit-upto 2 -j ACCEPT",
                            f"{SYN22} -j REFUSE"),
         ((0, 0),) * 5,
         (("open", 0, A), ("open", 1, A), ("open", 2, D), ("reset", 1), ("open", 3, A),
          ("open", 4, D))),
    Case("mask-groups-neighbours", (f"{SYN22} -m connlimit --connlimit-above 1 "
                                    "--connlimit-mask MASK -j REFUSE",),
         ((0, 0), (1, 0), (2, 0), (2, 0), (1, 0)),
         (("open", 0, A), ("open", 1, D), ("open", 2, A), ("open", 3, D), ("reset", 0),
          ("open", 4, A))),
    Case("daddr-per-local-address", (f"{SYN22} -m connlimit --connlimit-above 2 "
                                     "--connlimit-daddr -j REFUSE",),
         ((0, 0), (1, 0), (2, 0), (0, 1), (2, 0)),
         (("open", 0, A), ("open", 1, A), ("open", 2, D), ("open", 3, A), ("reset", 0),
          ("open", 4, A))),
    Case("half-closed-counts-invalid-counts-once",
         (f"{SYN22} -m connlimit --connlimit-above 2 -j REFUSE",), ((0, 0),) * 5,
         (("open", 0, A), ("fin", 0), ("badsum", 1, A), ("open", 2, A), ("badsum", 3, D),
          ("open", 4, D), ("reset", 0), ("open", 4, A))),
    # The kernel walks its list oldest first and stops at the packet's own connection: the
    # refused datagram's connection, listed after it, stays counted until its own next packet.
    Case("udp-own-connection-stops-the-walk",
         ("-p udp --dport 53 -m connlimit --connlimit-above 1 -j DROP",),
         ((0, 0), (0, 0)),
         (("udp", 0, A), ("udp", 0, A), ("udp", 1, D), ("udp", 0, D), ("udp", 1, D),
          ("udp", 0, D)), proto="udp"),
)
MASKS = {Family.IPV4: "24", Family.IPV6: "64"}  # peers 0 and 1 share it, peer 2 does not


@pytest.fixture(scope="module", params=["nf", "tc", "xdp"])
def rig(request: pytest.FixtureRequest,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[CtRig]:
    """The sender and both receivers, pybpfilter on the given hook."""
    require_twin_tools()
    with private_bpffs(tmp_path_factory, "clbpffs") as root, CtRig(root, hook=request.param) as r:
        yield r


@pytest.mark.kernel
@pytest.mark.parametrize("fam", [Family.IPV4, Family.IPV6], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_connlimit_agrees_with_netfilter(rig: CtRig, case: Case, fam: Family) -> None:
    """Connections over the limit are refused where netfilter refuses them, and closed ones stop
    counting, frame by frame."""
    refuse = "DROP" if rig.hook == "nf" else "REJECT --reject-with tcp-reset"
    text = case.text(refuse).replace("MASK", MASKS[fam])
    sc, want = case.scenario(fam)
    seen = StatefulDifferential(rig).run(text, spec_from_text(text, fam), sc)
    assert [s.verdict for s in seen] == want, "netfilter did not do what the scenario states"


def _compile(text: str, hook: str, fam: Family = Family.IPV4) -> None:
    with Checker(parse(text, family=fam), chain="INPUT", hook=hook, iif="eth0"):
        pass


@pytest.mark.kernel
@pytest.mark.parametrize(("rule", "hook", "why"), [
    (f"{SYN22} -m connlimit --connlimit-above 65536 -j DROP", "nf", "connlimit above 65535"),
    ("-m connlimit --connlimit-above 2 -j DROP", "tc", "without -p tcp or -p udp"),
    ("-p icmp -m connlimit --connlimit-above 2 -j DROP", "xdp", "without -p tcp or -p udp"),
])
def test_refused_by_name(rule: str, hook: str, why: str) -> None:
    """What cannot run as the kernel runs it is refused, saying why."""
    from helpers.kernel import require_kernel

    require_kernel()
    with pytest.raises(CompileError, match=why):
        _compile(_table(rule), hook)


@pytest.mark.kernel
@pytest.mark.parametrize("hook", ["nf", "tc"])
def test_many_large_rules_in_one_table(hook: str) -> None:
    """Every rule's walk is a loop the verifier checks once: large limits add up freely (the
    unrolled checks bounded a table's rules to 256 remembered connections together)."""
    from helpers.kernel import require_kernel

    require_kernel()
    _compile(_table(*(f"-p tcp --syn --dport {p} -m connlimit --connlimit-above {n} -j DROP"
                      for p, n in ((22, 100), (80, 1000), (443, 6298), (8080, 65535)))), hook)


@pytest.mark.kernel
def test_user_chain_refused_on_tc_only() -> None:
    """A user chain has no program context for the lookups on tc/XDP; nf reads no context."""
    from helpers.kernel import require_kernel

    require_kernel()
    text = ("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
            ":LIM - [0:0]\n-A INPUT -j LIM\n"
            f"-A LIM {SYN22} -m connlimit --connlimit-above 2 -j DROP\nCOMMIT\n")
    _compile(text, "nf")
    with pytest.raises(CompileError, match="user chain"):
        _compile(text, "tc")


@pytest.mark.kernel
@pytest.mark.parametrize("hook", ["nf", "tc", "xdp"])
@pytest.mark.parametrize("fam", [Family.IPV4, Family.IPV6], ids=["ipv4", "ipv6"])
def test_largest_limit_verifies(hook: str, fam: Family) -> None:
    """The largest limit's walk passes the verifier on every hook."""
    from helpers.kernel import require_kernel

    require_kernel()
    _compile(_table(f"{SYN22} -m connlimit --connlimit-above 65535 --connlimit-daddr -j DROP",
                    "-p udp -m connlimit --connlimit-upto 0 -j ACCEPT"), hook, fam)


def _connect(topo, port: int):
    """A TCP connection from the sender to the receiver's `port` (None when refused or
    unanswered within a short time)."""
    import socket

    from bpfilter import netns

    with netns.enter(topo.sender.ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(0.5)
    try:
        s.connect((topo.receiver.ip4, port))
    except OSError:
        s.close()
        return None
    return s


@pytest.mark.parametrize("hook", ["nf", "tc"])
def test_restore_of_the_same_rule_keeps_its_connections(topology, bpffs, tmp_path, hook) -> None:
    """Real sockets: a restore that keeps the rule keeps counting its open connections (the
    kernel would start afresh); a changed rule starts with nothing remembered."""
    import socket

    from test_cli import _hook_args, bpfilter

    from bpfilter import netns

    port = 7200
    rules = {n: tmp_path / f"limit{n}.v4" for n in (1, 2)}
    for n, path in rules.items():  # the second rule differs only by a comment
        note = "-m comment --comment changed " if n == 2 else ""
        path.write_text(_table(f"-p tcp --syn --dport {port} {note}-m connlimit "
                               "--connlimit-above 1 -j DROP"))
    with netns.enter(topology.receiver.ns):
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind((topology.receiver.ip4, port))
    server.listen(16)
    args = _hook_args(hook, topology)
    opened = []
    try:
        bpfilter("restore", *args, str(rules[1]), bpffs=bpffs)
        opened.append(_connect(topology, port))
        assert opened[0] is not None, "the first connection is under the limit"
        bpfilter("restore", *args, str(rules[1]), bpffs=bpffs)
        refused = _connect(topology, port)
        assert refused is None, "the open connection was forgotten by the restore"
        bpfilter("restore", *args, str(rules[2]), bpffs=bpffs)
        opened.append(_connect(topology, port))
        assert opened[1] is not None, "a changed rule starts afresh"
    finally:
        for s in opened:
            if s is not None:
                s.close()
        server.close()


# --- a large limit, real sockets ------------------------------------------------------------

LARGE, EXTRA = 300, 10  # the limit, and connections opened past it


def _open_many(topo, fam: Family, port: int, n: int,
               refused_wait: float) -> tuple[list[bool], list]:
    """Open `n` TCP connections from the sender to the receiver's `port`, one after the other:
    which ones were established, and their sockets. After a refused one, wait SETTLE so that
    the kernel walks its list at the next (it forgets one dead connection per refusal, where
    it would stop after eight in one walk)."""
    import socket
    import time

    from bpfilter import netns

    v4 = fam is Family.IPV4
    done, socks = [], []
    for _ in range(n):
        with netns.enter(topo.sender.ns):
            s = socket.socket(socket.AF_INET if v4 else socket.AF_INET6, socket.SOCK_STREAM)
        s.settimeout(refused_wait)
        try:
            s.connect((topo.receiver.ip4 if v4 else topo.receiver.ip6, port))
        except OSError:
            s.close()
            done.append(False)
            time.sleep(SETTLE)
            continue
        done.append(True)
        socks.append(s)
    return done, socks


def _reset(socks: list) -> None:
    """Close with a reset (conntrack's CLOSE: no longer counted)."""
    import socket
    import struct

    for s in socks:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()


def _large_limit_run(side: str, fam: Family, bpffs: str, tmp_path) -> list[bool]:
    """Under netfilter's xt_connlimit (`side` "netfilter") or pybpfilter on hook `side`, in a
    fresh pair of namespaces: LARGE + EXTRA connections, five of the first ones reset, seven
    more. Which connections were established, in order."""
    import socket
    import subprocess
    import time

    from helpers.topology import create_topology, destroy_topology
    from test_cli import _hook_args, bpfilter

    from bpfilter import netns

    port = 7300
    # A dropped SYN leaves the client waiting (a short while: it is not answered at all). nf
    # has no REJECT, and XDP's replies leave a veth only when its peer runs XDP too.
    reject = side in ("netfilter", "tc")
    refuse = "REJECT --reject-with tcp-reset" if reject else "DROP"
    text = _table(f"-p tcp --syn --dport {port} -m connlimit --connlimit-above {LARGE} "
                  f"-j {refuse}")
    v4 = fam is Family.IPV4
    topo = create_topology()
    opened: list = []
    fam_args = [] if v4 else ["-6"]
    try:
        with netns.enter(topo.receiver.ns):
            server = socket.socket(socket.AF_INET if v4 else socket.AF_INET6, socket.SOCK_STREAM)
        server.bind((topo.receiver.ip4 if v4 else topo.receiver.ip6, port))
        server.listen(1024)  # never accepted: the handshakes complete in the backlog
        if side == "netfilter":
            tool = "iptables-legacy-restore" if v4 else "ip6tables-legacy-restore"
            subprocess.run(["ip", "netns", "exec", topo.receiver.ns, tool],
                           input=text, text=True, check=True, capture_output=True)
        else:
            rules = tmp_path / f"large-{side}.{'v4' if v4 else 'v6'}"
            rules.write_text(text)
            bpfilter("restore", *fam_args, *_hook_args(side, topo), str(rules), bpffs=bpffs)
        wait = 2.0 if reject else 0.25
        first, opened = _open_many(topo, fam, port, LARGE + EXTRA, wait)
        _reset(opened[:5])
        opened = opened[5:]
        time.sleep(SETTLE)
        second, more = _open_many(topo, fam, port, 7, wait)
        opened += more
        server.close()
        return first + second
    finally:
        for s in opened:
            s.close()
        if side != "netfilter":
            bpfilter("flush", *_hook_args(side, topo), bpffs=bpffs, check=False)
        destroy_topology(topo)


@pytest.mark.kernel
@pytest.mark.parametrize("hook", ["nf", "tc", "xdp"])
@pytest.mark.parametrize("fam", [Family.IPV4, Family.IPV6], ids=["ipv4", "ipv6"])
def test_large_limit_agrees_with_netfilter(bpffs, tmp_path, fam: Family, hook: str) -> None:
    """`--connlimit-above 300` with 310 open connections, then five reset and seven more: the
    same connections are established as under xt_connlimit (the walk, not unrolled checks)."""
    from helpers.kernel import require_kernel

    require_kernel()
    require_twin_tools()
    theirs = _large_limit_run("netfilter", fam, bpffs, tmp_path)
    want = [True] * LARGE + [False] * EXTRA + [True] * 5 + [False] * 2
    assert theirs == want, "netfilter did not do what the scenario states"
    ours = _large_limit_run(hook, fam, bpffs, tmp_path)
    assert ours == theirs, [i for i, (a, b) in enumerate(zip(ours, theirs, strict=True))
                            if a != b]
