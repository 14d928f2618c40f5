"""Single-rule changes applied in place give what a fresh compile of the new ruleset gives.

A classified ruleset is loaded (nf hook, private namespace and bpffs), then a random sequence of
appends, inserts, deletes and replaces is applied with `apply_change`. After each change the
same random packets run through the loaded program (BPF_PROG_TEST_RUN on the live generation)
and through a fresh compile of the resulting ruleset: verdict and deciding rule must agree, and
the per-rule counters of the loaded ruleset must be what the fresh runs added up to, rule by rule
across the moves. Changes that cannot be made in place (linear parts, new shapes, jump targets)
must be detected and still be right.
"""

from __future__ import annotations

import os
import random
import struct
import subprocess
import sys

import pytest
from helpers.packets import tcp, udp

from bpfilter.bpf.consts import NfHook, NfProto
from bpfilter.bpf.maps import Map, possible_cpus
from bpfilter.bpf.prog import Prog
from bpfilter.frontends.iptables.parser import parse
from bpfilter.ir.model import Counters, Family
from bpfilter.runtime import dispatch as D
from bpfilter.runtime.checker import Checker
from bpfilter.runtime.incremental import Change, apply_change
from bpfilter.runtime.loader import Runtime
from bpfilter.runtime.state import pin_name

NETS = ["10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "10.1.2.3", "10.2.0.0/15", "10.3.4.0/22",
        "10.1.2.128/25", "192.0.2.0/24", "192.0.2.7"]
HOSTS = ["10.1.2.3", "10.1.2.200", "10.2.9.9", "10.3.5.1", "10.200.0.1", "192.0.2.7",
         "192.0.2.8", "198.51.100.1"]
PORTS = [22, 53, 80, 443, 1000, 8080]
TARGETS = ["ACCEPT", "DROP", "DROP", "RETURN", "blk", "-g tail"]


def _target(t: str) -> str:
    return t if t.startswith("-g") else f"-j {t}"


def fitting_rule(rnd: random.Random) -> str:
    """A rule of one of the loaded segments' shapes."""
    t = _target(rnd.choice(TARGETS))
    shape = rnd.randrange(4)
    if shape < 2:
        return f"-s {rnd.choice(NETS)} {t}"
    if shape == 2:
        return f"-p udp -m udp --dport {rnd.choice(PORTS)} {t}"
    return f"-s {rnd.choice(HOSTS)}/32 -p tcp -m tcp --dport {rnd.choice(PORTS)} {t}"


def odd_rule(rnd: random.Random) -> str:
    """A rule no segment can take in place (new shape, negation, LOG)."""
    return rnd.choice([f"-d {rnd.choice(HOSTS)}/32 -p udp -m udp --sport 53 -j DROP",
                       f"! -s {rnd.choice(NETS)} -p tcp -j ACCEPT",
                       "-p tcp -m tcp --dport 22 -j LOG"])


def ruleset(rnd: random.Random) -> str:
    rules = ["! -s 10.0.0.0/8 -p icmp -j ACCEPT"]  # linear (negated) first
    rules += [fitting_rule(rnd) for _ in range(40)]
    rules += ["! -s 10.0.0.0/8 -p udp -j DROP"]  # negated: linear, splits the chain
    rules += [fitting_rule(rnd) for _ in range(30)]
    lines = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]",
             ":OUTPUT ACCEPT [0:0]", ":blk - [0:0]", ":tail - [0:0]"]
    lines += [f"-A INPUT {r}" for r in rules]
    lines += ["-A blk -p udp -m udp --dport 53 -j ACCEPT", "-A blk -j DROP",
              "-A tail -p tcp -j DROP"]
    return "\n".join([*lines, "COMMIT", ""])


def packets(rnd: random.Random, n: int) -> list[bytes]:
    out = []
    for _ in range(n):
        src = rnd.choice(HOSTS)
        port = rnd.choice(PORTS)
        out.append(udp(src, "192.0.2.1", dport=port) if rnd.random() < 0.5
                   else tcp(src, "192.0.2.1", dport=port))
    return out


class LoadedRun:
    """Runs frames through the live INPUT program of a loaded IPv4 filter table."""

    def __init__(self, rt: Runtime, fam: Family = Family.IPV4) -> None:
        self.rt = rt
        self.nf = rt.hook == "nf"
        self.pf = NfProto.IPV4 if fam is Family.IPV4 else NfProto.IPV6
        gen = rt._active_gen(fam)
        with Map.open_pinned(rt._path(D.PROGS_MAP)) as progs:
            raw = progs.lookup(struct.pack(
                "<I", gen * D.GEN_STRIDE + D.slot_id(fam, "filter", "INPUT")))
        self.prog = Prog.from_id(int.from_bytes(raw, "little"))
        self.trace = Map.open_pinned(rt._path(pin_name("trace", fam.value, "filter", str(gen))))

    def close(self) -> None:
        self.prog.close()
        self.trace.close()

    def run(self, frame: bytes) -> tuple[int, int]:
        """(verdict, deciding slot)."""
        self.trace.update(bytes(4), bytes(8) * possible_cpus())
        if self.nf:
            ctx = struct.pack("<BB6x5Q", NfHook.LOCAL_IN, self.pf, 0, 0, 0, 0, 0)
            self.prog.run(frame, ctx=ctx, data_out_size=0)
        else:
            self.prog.run(frame)
        for v in self.trace.lookup_percpu(bytes(4)) or []:
            d, vv = struct.unpack("<II", v)
            if vv:
                return vv & 0xFF, d
        return 0, 0


def _loaded_counters(rt: Runtime) -> dict[tuple[str, int], Counters]:
    loaded = rt.loaded(Family.IPV4)
    tr = loaded.record.tables["filter"]
    return {(c, r): loaded.counters["filter"][i] for i, (c, r) in enumerate(tr.slots)
            if c and r is not None}


def _moved(expected: dict, ch: Change, pos: int) -> dict:
    """Expected counters after a change at 0-based `pos` of ch.chain."""
    out = {}
    for (c, r), v in expected.items():
        if c != ch.chain:
            out[(c, r)] = v
            continue
        if ch.op in "DR" and r == pos + 1:
            continue
        if ch.op in "AI" and r >= pos + 1:
            r += 1
        elif ch.op == "D" and r > pos + 1:
            r -= 1
        out[(c, r)] = v
    return out


def _check(rt: Runtime, text: str, frames: list[bytes], expected: dict,
           fam: Family = Family.IPV4) -> None:
    rs = parse(text, family=fam)
    run = LoadedRun(rt, fam)
    slots = rt.loaded(fam).record.tables["filter"].slots
    try:
        with Checker(rs, chain="INPUT", hook=rt.hook, iif=rt.iface) as chk:
            for f in frames:
                want = chk.run(f)
                verdict, slot = run.run(f)
                chain, rule = slots[slot] if slot else (None, None)
                got = ({1: "ACCEPT", 2: "DROP"}.get(verdict, "PASS"), chain or None, rule)
                assert got == (want.verdict, want.chain, want.rule), (f.hex(), text)
            for key, c in chk.counters().items():
                if key[1] is not None and c.packets:
                    old = expected.get(key, Counters(0, 0))
                    expected[key] = Counters(old.packets + c.packets, old.bytes + c.bytes)
    finally:
        run.close()


def _runtime(hook: str, netns: str, bpffs: str) -> Runtime:
    iface = None
    if hook != "nf":  # a device inside the test's namespace: nothing touches the host's
        iface = "veth0"
        subprocess.run(["ip", "-n", netns, "link", "add", iface, "type", "veth", "peer",
                        "name", "veth1"], check=True)
        subprocess.run(["ip", "-n", netns, "link", "set", iface, "up"], check=True)
    return Runtime(hook, netns_name=netns, iface=iface, root=os.path.join(bpffs, "pybpfilter"))


@pytest.mark.parametrize(("hook", "seed"), [("nf", 1), ("nf", 2), ("nf", 3), ("tc", 4),
                                            ("xdp", 5)])
def test_random_changes_match_fresh_compile(netns: str, bpffs: str, hook: str,
                                            seed: int) -> None:
    rnd = random.Random(seed)
    rt = _runtime(hook, netns, bpffs)
    text = ruleset(rnd)
    rt.restore(parse(text, family=Family.IPV4), text=text)
    expected: dict = {}
    _check(rt, text, packets(rnd, 40), expected)
    in_place = fell_back = 0
    for _ in range(50):
        n = text.count("-A INPUT ")
        op = rnd.choice("AIDR")
        rule = odd_rule(rnd) if rnd.random() < 0.1 else fitting_rule(rnd)
        if op == "A":
            ch, pos = Change("A", "INPUT", args=rule.split()), n
        elif op == "I":
            k = rnd.randrange(1, n + 2)
            ch, pos = Change("I", "INPUT", index=k, args=rule.split()), k - 1
        elif op == "D":
            k = rnd.randrange(1, n + 1)
            ch, pos = Change("D", "INPUT", index=k), k - 1
        else:
            k = rnd.randrange(1, n + 1)
            ch, pos = Change("R", "INPUT", index=k, args=rule.split()), k - 1
        out = apply_change(rt, Family.IPV4, ch)
        in_place += out.in_place
        fell_back += not out.in_place
        text = out.text
        expected = _moved(expected, ch, pos)
        _check(rt, text, packets(rnd, 60), expected)
        got = _loaded_counters(rt)
        for key, c in expected.items():
            assert got.get(key, Counters(0, 0)) == c, (key, ch)
    assert in_place >= 25 and fell_back >= 1, (in_place, fell_back)


def _change(op: str, chain: str, rule: str, index: int | None = None) -> Change:
    return Change(op, chain, index=index, args=rule.split())


def test_fallback_cases(netns: str, bpffs: str) -> None:
    rnd = random.Random(7)
    rt = Runtime("nf", netns_name=netns, root=os.path.join(bpffs, "pybpfilter"))
    text = ruleset(rnd)
    rt.restore(parse(text, family=Family.IPV4), text=text)
    cases = [
        (_change("I", "INPUT", "-p udp -m udp --dport 9 -j DROP", 1), "linear"),
        (_change("I", "INPUT", "-d 192.0.2.9/32 -p udp -m udp --sport 53 -j DROP", 10),
         "shape"),
        (_change("I", "INPUT", "-p tcp -m tcp --dport 22 -j LOG", 5), "LOG"),
        (_change("A", "blk", "-j ACCEPT"), "jump"),
        (_change("I", "INPUT", "-s 10.9.0.0/16 -j ACCEPT", 60), ""),
        (_change("D", "INPUT", "-s 10.9.0.0/16 -j ACCEPT"), ""),
        (_change("R", "INPUT", "-s 10.9.0.0/16 -j ACCEPT", 62), ""),
    ]
    for ch, why in cases:
        out = apply_change(rt, Family.IPV4, ch)
        assert out.in_place == (not why), (ch, out.why)
        assert why.lower() in out.why.lower() or why == "", out.why
        text = out.text
        _check(rt, text, packets(rnd, 30), {})
    saved = rt.loaded(Family.IPV4).record.text
    rules = [line for line in saved.splitlines() if line.startswith("-A INPUT ")]
    assert saved == text and rules[61] == "-A INPUT -s 10.9.0.0/16 -j ACCEPT"


def test_cli_single_rule_commands(netns: str, bpffs: str) -> None:
    env = dict(os.environ, BPFILTER_BPFFS=os.path.join(bpffs, "pybpfilter"))

    def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        r = subprocess.run([sys.executable, "-m", "bpfilter.cli.main", *args], input=stdin,
                           capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr
        return r

    text = ruleset(random.Random(3))
    cli("restore", "--netns", netns, stdin=text)
    r = cli("-A", "INPUT", "-s", "10.9.0.0/16", "-j", "DROP", "--netns", netns, "-v")
    assert "in place" in r.stderr
    r = cli("-I", "INPUT", "--netns", netns, "-p", "tcp", "-m", "tcp", "--dport", "22",
            "-j", "LOG")
    assert "full reload" in r.stderr
    r = cli("rule", "-t", "filter", "-R", "INPUT", "50", "-p", "udp", "-m", "udp", "--dport",
            "53", "-j", "ACCEPT", "--netns", netns)
    saved = cli("save", "--netns", netns).stdout
    rules = [line for line in saved.splitlines() if line.startswith("-A INPUT ")]
    assert rules[0] == "-A INPUT -p tcp -m tcp --dport 22 -j LOG"
    assert rules[49] == "-A INPUT -p udp -m udp --dport 53 -j ACCEPT"
    assert rules[-1] == "-A INPUT -s 10.9.0.0/16 -j DROP"
    cli("-D", "INPUT", "-s", "10.9.0.0/16", "-j", "DROP", "--netns", netns)
    cli("-D", "INPUT", "1", "--netns", netns)
    saved = cli("save", "--netns", netns).stdout
    assert "10.9.0.0/16" not in saved and "-j LOG" not in saved
    listing = cli("list", "-n", "--line-numbers", "--netns", netns, "INPUT").stdout
    assert len([x for x in listing.splitlines() if x[:1].isdigit()]) == len(rules) - 2


def test_rule_command_arguments() -> None:
    from bpfilter.cli.rulecmd import RuleCommandError, is_rule_command, parse_args

    argv = ["-t", "filter", "-6", "-I", "INPUT", "3", "-s", "2001:db8::/32", "--netns", "x",
            "-j", "DROP"]
    assert is_rule_command(argv) and not is_rule_command(["list", "-v"])
    ch, opts = parse_args(argv)
    assert (ch.op, ch.chain, ch.index, ch.args) == ("I", "INPUT", 3,
                                                    ["-s", "2001:db8::/32", "-j", "DROP"])
    assert opts["ipv6"] and opts["netns"] == "x"
    ch, _ = parse_args(["rule", "-D", "INPUT", "-p", "udp", "-j", "ACCEPT"])
    assert ch.index is None and ch.args == ["-p", "udp", "-j", "ACCEPT"]
    for bad in (["-R", "INPUT", "-j", "DROP"], ["-D", "INPUT", "2", "-j", "DROP"],
                ["-A", "INPUT"], ["-A", "INPUT", "-j", "DROP", "-D", "INPUT"]):
        with pytest.raises(RuleCommandError):
            parse_args(bad)


def test_ipv6_prefixes_in_place(netns: str, bpffs: str) -> None:
    rnd = random.Random(11)
    nets = ["2001:db8::/32", "2001:db8:1::/48", "2001:db8:1:2::/64", "2001:db8:1:2::3",
            "2001:db8:2::/47", "fd00::/8"]
    hosts = ["2001:db8:1:2::3", "2001:db8:1:2::9", "2001:db8:1:5::1", "2001:db8:3::1",
             "fd00::1", "2001:db9::1"]

    def rule() -> str:
        t = rnd.choice(["ACCEPT", "DROP", "RETURN"])
        if rnd.random() < 0.6:
            return f"-s {rnd.choice(nets)} -j {t}"
        return f"-p udp -m udp --dport {rnd.choice(PORTS)} -j {t}"

    lines = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
    lines += [f"-A INPUT {rule()}" for _ in range(40)]
    text = "\n".join([*lines, "COMMIT", ""])
    rt = Runtime("nf", netns_name=netns, root=os.path.join(bpffs, "pybpfilter"))
    rt.restore(parse(text, family=Family.IPV6), text=text)

    def frames() -> list[bytes]:
        return [udp(rnd.choice(hosts), "2001:db8:ff::1", dport=rnd.choice(PORTS))
                for _ in range(40)]

    in_place = 0
    for _ in range(20):
        n = text.count("-A INPUT ")
        op = rnd.choice("AIDR")
        index = None if op == "A" else rnd.randrange(1, n + (2 if op == "I" else 1))
        ch = _change(op, "INPUT", "" if op == "D" else rule(), index)
        out = apply_change(rt, Family.IPV6, ch)
        in_place += out.in_place
        text = out.text
        _check(rt, text, frames(), {}, Family.IPV6)
    assert in_place >= 15
