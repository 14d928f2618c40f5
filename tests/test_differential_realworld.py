"""Real rulesets (../shared/corpus/rulesets) compile, load and behave like netfilter.

Two checks per corpus file, on its filter table only (nat and the other tables are left out):

1. `test_corpus_compiles`: every built-in chain compiles and loads for the nf hook
   (BPF_PROG_TEST_RUN's Checker), or the compiler refuses it by name (a CompileError naming the
   file and line, e.g. REJECT on nf, `addrtype --src-type`); anything else fails.
2. `test_corpus_differential`: the table, made loadable by documented rewrites, runs in two
   routers side by side (tests/oracle/forward.py), one with legacy iptables and one with
   pybpfilter; frames aimed at the rules (their addresses, protocols, ports, ICMP types and
   interfaces) and random ones, plus a reply to every forwarded frame netfilter accepted (so
   conntrack's ESTABLISHED is seen too), must get the same verdict, per-rule counters and
   deciding rule on both.

Rewrites, applied to both sides alike:
- defects of the wild (a censored MAC address, lines a terminal wrapped) are repaired or
  commented out, as the parser test does;
- `-j REJECT ...` becomes `-j DROP`: netfilter's REJECT drops the packet and sends a reply, which
  the routers drop in mangle OUTPUT anyway, so the observed verdict is the same;
- every other rule the compiler refuses is commented out (listed in the test's output);
- `-m nfacct --nfacct-name X` is dropped (it only counts; this kernel has no xt_nfacct, so
  legacy iptables-restore refuses kube-proxy's rule otherwise).
Interface names are not rewritten: the routers' interfaces carry the ruleset's own names (the
arrival interface is renamed per group of frames, the others are veths whose peers are down;
`+` wildcards get a concrete instance; `lo` is never an arrival or exit).

Environment: BPFILTER_DIFF_SEED to replay the random frames, BPFILTER_REALWORLD_FRAMES frames
aimed per file (default 40).
"""

from __future__ import annotations

import ipaddress
import os
import random
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers.kernel import require_kernel
from oracle.addresses import BROADCASTS, MARKER_SRC, MULTICASTS, RX_ADDRS, SOURCES
from oracle.compare import Disagreement, _fmt_deltas, _fmt_key
from oracle.ctrig import RX_MAC, TX_MAC
from oracle.forward import RouterRig
from oracle.frames import TCP_FLAG_BITS, IpProto, PacketSpec, icmp_bytes, tcp_bytes, udp_bytes
from oracle.rules import RulesetSpec, spec_from_text
from oracle.twin import Seen, private_bpffs, require_twin_tools

from bpfilter.frontends.iptables import ParseError, parse
from bpfilter.ir.model import BUILTIN_CHAINS, Counters, Family
from bpfilter.runtime.checker import Checker

CORPUS = Path(__file__).resolve().parents[1] / ".." / "shared" / "corpus" / "rulesets"
SKIP_NO_CORPUS = pytest.mark.skipif(not CORPUS.is_dir(),
                                    reason=f"ruleset corpus not found at {CORPUS}")
V4, V6 = Family.IPV4, Family.IPV6
CENSORED = "XX:XX:XX:XX:XX:XX"
SEED = int(os.environ.get("BPFILTER_DIFF_SEED") or random.randrange(1 << 32))
FRAMES = int(os.environ.get("BPFILTER_REALWORLD_FRAMES", "40"))
# Too big for this file's time budget (thousands of rules: a minute to compile and verify).
TOO_BIG = 2000

# Known compiler problems, each with its reproducer in the reason (strict: a fix shows up).
XFAIL: dict[str, str] = {}
# Files whose filter table must load whole (no rule commented out as refused).
WHOLE = {"ufw-default-enabled.v4.rules", "ufw-default-enabled.v6.rules",
         "netnet-srvs-ufw-server1.v4.rules"}

pytestmark = pytest.mark.kernel


def _corpus_files() -> list[str]:
    if not CORPUS.is_dir():
        return []
    return sorted(p.name for p in [*CORPUS.glob("*.rules"), *CORPUS.glob("*.restore")])


def family_of(name: str) -> Family:
    """The family a corpus file is for."""
    return V6 if ".v6." in name else V4


def filter_lines(text: str) -> list[str]:
    """The file's lines with everything outside its filter table blanked (numbers kept)."""
    out, on = [], False
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("*"):
            on = s == "*filter"
        # `[packets:bytes] -A ...` (iptables-save -c): the counters are not what is compared.
        out.append(re.sub(r"^\[\d+:\d+\] ", "", line) if on else "#")
        if on and s == "COMMIT":
            on = False
    return out


def _error_line(e: Exception) -> int | None:
    """The corpus line an error names (CompileError: `file:N:`; verifier: `(file:N)`)."""
    m = re.search(r"\.(?:rules|restore):(\d+)[:)]", str(e))
    return int(m.group(1)) if m else None


def _feature(e: Exception) -> str:
    """What the compiler refused, by name."""
    msg = str(e).split("\n")[0]
    for pat in (r"target (\w+) needs", r"target '?(\w+)'?", r"match '(\w+)'", r"(\w+): not supp"):
        m = re.search(pat, msg)
        if m:
            return m.group(1)
    return msg[:80]


@dataclass
class Prepared:
    """A corpus file's filter table as both sides load it, and what it took to get there."""

    name: str
    family: Family
    lines: list[str]
    defects: list[int] = field(default_factory=list)
    rejects: int = 0
    refused: dict[str, list[int]] = field(default_factory=dict)  # feature -> corpus lines
    problem: str | None = None  # neither loads nor is refused by name

    @property
    def text(self) -> str:
        """The restore text."""
        return "\n".join(self.lines) + "\n"


def _compile_all(text: str, fam: Family, name: str) -> None:
    rs = parse(text, family=fam, filename=name)
    for chain in BUILTIN_CHAINS["filter"]:
        if chain in rs.tables["filter"].chains:
            Checker(rs, chain=chain, hook="nf", iif="eth0", oif="eth1").close()


def prepare(name: str) -> Prepared:
    """Read the file, repair its defects, REJECT -> DROP, comment out what is refused."""
    fam = family_of(name)
    p = Prepared(name, fam, filter_lines((CORPUS / name).read_text()))
    # This kernel has no xt_nfacct (legacy iptables-restore fails); the match only counts.
    p.lines = [re.sub(r" -m nfacct --nfacct-name \S+", "", t) for t in p.lines]
    for _ in range(len(p.lines)):
        try:
            _compile_all(p.text, fam, name)
            return p
        except ParseError as e:
            if e.token and CENSORED in e.token:
                p.lines = [t.replace(CENSORED, "00:00:00:00:00:00") for t in p.lines]
            elif re.search(r"not supported|needs", e.message):
                p.refused.setdefault(_feature(e), []).append(e.line)
                p.lines[e.line - 1] = "# refused: " + p.lines[e.line - 1]
            else:
                p.defects.append(e.line)
                p.lines[e.line - 1] = "# defect: " + p.lines[e.line - 1]
        except Exception as e:
            line = _error_line(e)
            feature = _feature(e)
            if line is None or type(e).__name__ == "VerifierError":
                p.problem = f"{type(e).__name__}: {str(e)[:2000]}"
                return p
            if feature == "REJECT":
                p.rejects += 1
                p.lines[line - 1] = re.sub(r"-j REJECT.*$", "-j DROP", p.lines[line - 1])
            else:
                p.refused.setdefault(feature, []).append(line)
                p.lines[line - 1] = "# refused: " + p.lines[line - 1]
    p.problem = "could not be made loadable"
    return p


# --- 1. compile and load, or refuse by name --------------------------------------------------


@SKIP_NO_CORPUS
@pytest.mark.parametrize("name", _corpus_files())
def test_corpus_compiles(name: str) -> None:
    """The filter table compiles and loads on nf, or is refused by name with file and line."""
    require_kernel()
    fam = family_of(name)
    lines = filter_lines((CORPUS / name).read_text())
    lines = [t.replace(CENSORED, "00:00:00:00:00:00") for t in lines]
    text = "\n".join(lines) + "\n"
    try:
        rs = parse(text, family=fam, filename=name)
    except ParseError as e:
        # Defects of the wild: the parser names file, line and token (test_iptables_parse).
        assert e.file == name and e.line > 0 and e.token, e
        return
    if "filter" not in rs.tables:
        pytest.skip(f"{name} has no filter table")
    try:
        _compile_all(text, fam, name)
    except Exception as e:
        if type(e).__name__ == "VerifierError":
            raise
        assert _error_line(e) is not None, f"refusal without a line: {e}"
        print(f"{name}: refused: {_feature(e)} (line {_error_line(e)})")


# --- 2. the differential ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RouterRig]:
    """The sender and both routers, with a private bpffs for pybpfilter."""
    require_twin_tools()
    with private_bpffs(tmp_path_factory, "rwbpffs") as root, RouterRig(root) as r:
        yield r


@dataclass
class Aim:
    """What a rule asks of a packet, read off its words (negated options left out)."""

    chain: str
    src: str | None = None
    dst: str | None = None
    proto: str | None = None
    sport: int | None = None
    dport: int | None = None
    icmp: int | None = None
    flags: int | None = None
    iif: str | None = None
    oif: str | None = None
    dst_type: str | None = None  # addrtype --dst-type: the first type named


PROTOS = {"tcp": IpProto.TCP, "udp": IpProto.UDP, "icmp": IpProto.ICMP,
          "ipv6-icmp": IpProto.ICMPV6, "icmpv6": IpProto.ICMPV6, "6": IpProto.TCP,
          "17": IpProto.UDP, "1": IpProto.ICMP, "58": IpProto.ICMPV6}
ICMP_NAMES = {"echo-request": 8, "echo-reply": 0, "destination-unreachable": 3,
              "time-exceeded": 11, "parameter-problem": 12, "source-quench": 4,
              "router-advertisement": 9, "router-solicitation": 10}
ICMP6_NAMES = {"echo-request": 128, "echo-reply": 129, "destination-unreachable": 1,
               "packet-too-big": 2, "time-exceeded": 3, "parameter-problem": 4,
               "router-solicitation": 133, "router-advertisement": 134,
               "neighbour-solicitation": 135, "neighbor-solicitation": 135,
               "neighbour-advertisement": 136, "neighbor-advertisement": 136}


def _port(word: str) -> int | None:
    first = re.split(r"[,:]", word)[0]
    return int(first) if first.isdigit() else None


def aims(lines: list[str]) -> list[Aim]:
    """One Aim per rule."""
    out = []
    for line in lines:
        if not line.startswith("-A "):
            continue
        words = shlex.split(line)
        a = Aim(words[1])
        neg = False
        for i, w in enumerate(words[2:-1], 2):
            if w == "!":
                neg = True
                continue
            v = words[i + 1]
            if not neg:
                if w in ("-s", "--source"):
                    a.src = v.split(",")[0]
                elif w in ("-d", "--destination"):
                    a.dst = v.split(",")[0]
                elif w in ("-p", "--protocol"):
                    a.proto = v.lower()
                elif w in ("--dport", "--dports", "--destination-port", "--destination-ports"):
                    a.dport = _port(v)
                elif w in ("--sport", "--sports", "--source-port", "--source-ports"):
                    a.sport = _port(v)
                elif w in ("--icmp-type", "--icmpv6-type"):
                    t = v.split("/")[0]
                    names = ICMP6_NAMES if a.proto in ("ipv6-icmp", "icmpv6", "58") \
                        else ICMP_NAMES
                    a.icmp = int(t) if t.isdigit() else names.get(t)
                elif w == "--syn":
                    a.flags = TCP_FLAG_BITS["S"]
                elif w == "--tcp-flags" and i + 2 < len(words):
                    a.flags = sum(TCP_FLAG_BITS.get(f[0], 0) for f in words[i + 2].split(",")
                                  if f not in ("NONE", "ALL"))
                elif w in ("-i", "--in-interface"):
                    a.iif = concrete(v)
                elif w in ("-o", "--out-interface"):
                    a.oif = concrete(v)
                elif w == "--dst-type":
                    a.dst_type = v.split(",")[0].upper()
            neg = False
        out.append(a)
    return out


def concrete(pattern: str) -> str | None:
    """An interface name `pattern` matches (a `+` wildcard gets an instance), or None."""
    if pattern == "+":
        return None
    name = pattern[:-1] + "0" if pattern.endswith("+") else pattern
    # lo exists already (frames never arrive on it); the rig's own names are taken.
    taken = name == "lo" or name.startswith("bf")
    return name if 0 < len(name) <= 15 and not taken else None


def _net(text: str, fam: Family) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None
    return net if net.version == (4 if fam is V4 else 6) else None


def host_in(text: str | None, fam: Family, rnd: random.Random) -> str | None:
    """A host address inside `text` (an address or a network), or None."""
    net = _net(text, fam) if text else None
    if net is None:
        return None
    if net.num_addresses <= 2:
        return str(net.network_address)
    return str(net.network_address + rnd.randrange(1, min(net.num_addresses - 1, 1 << 16)))


def behind(rules: list[Aim], fam: Family) -> dict[str, list[str]]:
    """The subnets the rules put behind each interface: `-o IF -d NET`, `-i IF -s NET`."""
    out: dict[str, list[str]] = {}
    for a in rules:
        for name in (a.iif, a.oif):
            if name is not None:
                out.setdefault(name, [])
        for name, addr in ((a.oif, a.dst), (a.iif, a.src)):
            net = _net(addr, fam) if name and addr else None
            if net is not None and net.prefixlen > 0 and str(net) not in out[name]:
                out[name].append(str(net))
    return out


def route(dst: str, table: dict[str, list[str]], default: str) -> str:
    """The interface a forwarded packet to `dst` leaves through (longest prefix)."""
    ip = ipaddress.ip_address(dst)
    best, out = -1, default
    for name, nets in table.items():
        for n in nets:
            net = ipaddress.ip_network(n)
            if net.version == ip.version and ip in net and net.prefixlen > best:
                best, out = net.prefixlen, name
    return out


def packet(fam: Family, a: Aim, rnd: random.Random, *, local: bool) -> PacketSpec:
    """A frame aimed at rule `a` (to a local address when `local` and the rule names none)."""
    src = host_in(a.src, fam, rnd) or rnd.choice(SOURCES[fam])
    if src == MARKER_SRC[fam] or src in RX_ADDRS[fam]:
        src = SOURCES[fam][0]
    dst = host_in(a.dst, fam, rnd)
    if dst is None and a.dst_type == "BROADCAST" and fam is V4:
        dst = rnd.choice(BROADCASTS)
    elif dst is None and a.dst_type == "MULTICAST":
        dst = rnd.choice(MULTICASTS[fam])
    elif dst is None and a.dst_type == "LOCAL":
        dst = rnd.choice(RX_ADDRS[fam])
    if dst is None:
        dst = rnd.choice(RX_ADDRS[fam]) if local else host_in(
            "198.18.0.0/16" if fam is V4 else "2001:db8:9::/48", fam, rnd)
    assert dst is not None
    proto = PROTOS.get(a.proto or "")
    if proto is None:
        proto = rnd.choice([IpProto.TCP, IpProto.UDP, IpProto.ICMP if fam is V4
                            else IpProto.ICMPV6])
    sport = a.sport if a.sport is not None else rnd.randrange(32768, 61000)
    dport = a.dport if a.dport is not None else rnd.choice((22, 53, 80, 443, 8080, 3306))
    if proto == IpProto.TCP:
        flags = a.flags if a.flags is not None else TCP_FLAG_BITS["S"]
        l4 = tcp_bytes(sport, dport, flags, seq=rnd.randrange(1 << 32))
    elif proto == IpProto.UDP:
        l4 = udp_bytes(sport, dport, b"x")
    else:
        echo = 8 if fam is V4 else 128
        l4 = icmp_bytes(a.icmp if a.icmp is not None else echo, 0,
                        rest=sport.to_bytes(2, "big") + b"\0\1")
    return PacketSpec(fam, src, dst, int(proto), l4, note=f"aimed at {a.chain}")


def reply(p: PacketSpec) -> PacketSpec | None:
    """The answer to `p` (SYN-ACK, UDP back, echo reply), or None."""
    if p.proto == IpProto.TCP:
        sport, dport, seq = int.from_bytes(p.l4[:2]), int.from_bytes(p.l4[2:4]), \
            int.from_bytes(p.l4[4:8])
        if p.l4[13] != TCP_FLAG_BITS["S"]:
            return None
        l4 = tcp_bytes(dport, sport, TCP_FLAG_BITS["S"] | TCP_FLAG_BITS["A"], seq=7,
                       ack=(seq + 1) & 0xFFFFFFFF)
    elif p.proto == IpProto.UDP:
        l4 = udp_bytes(int.from_bytes(p.l4[2:4]), int.from_bytes(p.l4[:2]), b"y")
    elif p.l4[0] in (8, 128):
        l4 = icmp_bytes(0 if p.l4[0] == 8 else 129, 0, rest=p.l4[4:8])
    else:
        return None
    return PacketSpec(p.family, p.dst, p.src, p.proto, l4, note="reply")


@dataclass
class FileStats:
    """What a file's differential compared."""

    frames: int = 0
    replies: int = 0
    excluded: int = 0
    verdicts: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def decider(spec: RulesetSpec, deltas: dict[tuple[str, int | None], Counters]
            ) -> tuple[str, int | None] | None:
    """The ACCEPT/DROP rule or built-in policy netfilter's counters say decided."""
    names = dict(spec.chains)
    for (chain, n), c in deltas.items():
        if c.packets and n is not None and chain in names and spec.rule(chain, n).decides:
            return chain, n
    for chain in ("INPUT", "FORWARD"):
        pol = deltas.get((chain, None))
        if pol is not None and pol.packets:
            return chain, None
    return None


def compare(rig: RouterRig, spec: RulesetSpec, text: str, p: PacketSpec, ifs: str,
            st: FileStats) -> Seen | None:
    """Send `p` to both routers; a problem description goes to `st` (None: not reached)."""
    frame = p.frame(TX_MAC, RX_MAC)
    nf, ours = (rig.observe(side, frame) for side in ("netfilter", "pybpfilter"))
    if not nf.reached and not ours.reached:
        st.excluded += 1
        return None
    st.frames += 1
    st.verdicts[nf.verdict] = st.verdicts.get(nf.verdict, 0) + 1
    keys = sorted(nf.deltas, key=lambda k: (k[0], k[1] or 0))
    theirs = {k: nf.deltas.get(k, Counters()) for k in keys}
    mine = {k: ours.deltas.get(k, Counters()) for k in keys}
    nf_dec = decider(spec, theirs)
    problems = []
    if nf.reached != ours.reached:
        problems.append(f"reached: netfilter {nf.reached}, pybpfilter {ours.reached}")
    if nf.verdict != ours.verdict:
        problems.append(f"verdict: netfilter {nf.verdict}, pybpfilter {ours.verdict}")
    if theirs != mine:
        problems.append("counters differ")
    if nf_dec is not None and ours.decider is not None and nf_dec != ours.decider:
        problems.append(f"deciding rule: netfilter {_fmt_key(nf_dec)}, pybpfilter "
                        f"{_fmt_key(ours.decider)}")
    if problems and len(st.problems) < 5:
        st.problems.append(
            "; ".join(problems) + f"\n--- packet ({ifs}): {p.describe()}\n    frame "
            f"{frame.hex()}\n--- netfilter: {nf.verdict} by "
            f"{_fmt_key(nf_dec) if nf_dec else 'no rule'}; {_fmt_deltas(theirs)}\n"
            f"--- pybpfilter: {ours.verdict} by "
            f"{_fmt_key(ours.decider) if ours.decider else 'none'}; {_fmt_deltas(mine)}")
    return nf


def run_file(rig: RouterRig, prep: Prepared, rnd: random.Random) -> FileStats:
    """Load the prepared table in both routers and compare aimed, random and reply frames."""
    fam, text = prep.family, prep.text
    spec = spec_from_text(text, fam, chain="FORWARD")
    rig.load(text, fam)
    nf_keys = set(rig.counters("netfilter", fam))
    our_keys = set(rig.counters("pybpfilter", fam))
    if nf_keys != our_keys:
        raise Disagreement(f"{prep.name}: the table's shape differs: netfilter only "
                           f"{sorted(nf_keys - our_keys, key=str)}, pybpfilter only "
                           f"{sorted(our_keys - nf_keys, key=str)}")
    rig.flush_conntrack()
    rules = aims(prep.lines)
    table = behind(rules, fam)
    picked = rules if len(rules) <= FRAMES else rnd.sample(rules, FRAMES)
    random_aim = [Aim(rnd.choice(("INPUT", "FORWARD"))) for _ in range(max(4, FRAMES // 8))]
    groups: dict[str, list[PacketSpec]] = {}
    for a in picked + random_aim:
        arrival = a.iif or "bfext0"
        for local in (False, True) if a.dst is None else (False,):
            groups.setdefault(arrival, []).append(packet(fam, a, rnd, local=local))
    st = FileStats()
    answers: dict[str, list[PacketSpec]] = {}
    for arrival, pkts in groups.items():
        default = rig.set_interfaces(arrival, table)
        for p in pkts:
            nf = compare(rig, spec, text, p, f"in {arrival}", st)
            local = p.dst in RX_ADDRS[fam] or p.dst in BROADCASTS or p.dst in MULTICASTS[fam]
            r = reply(p)
            if nf is not None and nf.verdict == "ACCEPT" and not local and r is not None:
                answers.setdefault(route(p.dst, table, default), []).append(r)
    for arrival, pkts in answers.items():
        rig.set_interfaces(arrival, table)
        for p in pkts:
            st.replies += 1
            compare(rig, spec, text, p, f"in {arrival}", st)
    return st


def _diff_params() -> list:
    out = []
    for name in _corpus_files():
        size = sum(1 for t in (CORPUS / name).read_text().splitlines() if t.startswith("-A "))
        marks = []
        if size > TOO_BIG:
            marks.append(pytest.mark.skip(reason=f"{size} rules: beyond this file's time budget"))
        if name in XFAIL:
            marks.append(pytest.mark.xfail(strict=True, reason=XFAIL[name]))
        out.append(pytest.param(name, marks=marks))
    return out


@SKIP_NO_CORPUS
@pytest.mark.parametrize("name", _diff_params())
def test_corpus_differential(rig: RouterRig, name: str) -> None:
    """netfilter and pybpfilter agree on every frame through the file's filter table."""
    prep = prepare(name)
    assert prep.problem is None, f"{name}: {prep.problem}"
    assert name not in WHOLE or not prep.refused, f"{name}: refused {prep.refused}"
    if not any(t.startswith("-A ") for t in prep.lines):
        pytest.skip(f"{name}: no filter rules")
    rnd = random.Random(f"{SEED}/{name}")
    st = run_file(rig, prep, rnd)
    print(f"{name}: defects {prep.defects} REJECT->DROP {prep.rejects} refused "
          f"{ {k: len(v) for k, v in prep.refused.items()} } frames {st.frames} "
          f"(replies {st.replies}, excluded {st.excluded}) verdicts {st.verdicts} "
          f"disagreements {len(st.problems)}")
    if st.problems:
        raise Disagreement(f"{name} (seed {SEED}): netfilter and pybpfilter disagree\n"
                           f"--- ruleset as loaded:\n{prep.text}\n" + "\n".join(st.problems))
