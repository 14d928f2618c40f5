"""Targets beyond the standard verdicts, run in the kernel with BPF_PROG_TEST_RUN."""

from __future__ import annotations

import struct

import pytest
from helpers.kernel import require_kernel
from helpers.packets import udp

from bpfilter.compiler.validate import CompileError
from bpfilter.frontends.iptables.parser import parse
from bpfilter.ir.model import Family
from bpfilter.runtime.checker import Checker

SKB_SIZE, SKB_MARK = 192, 8  # sizeof(struct __sk_buff), offsetof(mark)

MARKS = """\
*filter
:INPUT ACCEPT [0:0]
-A INPUT -p udp --dport 5 -j MARK --set-xmark 0x7/0xf
-A INPUT -m mark --mark 0x7/0xf -j DROP
COMMIT
"""


@pytest.fixture(autouse=True)
def _kernel() -> None:
    require_kernel()


def test_mark_target_sets_the_skb_mark_on_tc():
    rs = parse(MARKS, family=Family.IPV4)
    with Checker(rs, hook="tc", iif="eth0") as c:
        ctx = bytearray(SKB_SIZE)
        struct.pack_into("<I", ctx, SKB_MARK, 0x130)
        r = c.prog.run(udp("192.0.2.1", "192.0.2.2", dport=5), ctx=bytes(ctx),
                       ctx_out_size=SKB_SIZE)
        assert struct.unpack_from("<I", r.ctx_out, SKB_MARK)[0] == 0x137
        # The next rule sees the new mark.
        res = c.run(udp("192.0.2.1", "192.0.2.2", dport=5))
        assert (res.verdict, res.chain, res.rule) == ("DROP", "INPUT", 2)
        res = c.run(udp("192.0.2.1", "192.0.2.2", dport=6))
        assert (res.verdict, res.rule) == ("ACCEPT", None)


@pytest.mark.parametrize("hook", ["nf", "xdp"])
def test_mark_target_is_refused_where_the_hook_cannot_set_it(hook):
    rs = parse(MARKS, family=Family.IPV4, filename="marks.v4")
    with pytest.raises(CompileError, match=r"marks.v4:3: .*MARK"):
        Checker(rs, hook=hook, iif="eth0")


@pytest.mark.parametrize("hook", ["nf", "tc", "xdp"])
def test_the_deepest_chain_of_jumps_the_verifier_allows_loads(hook):
    # Subprograms keep nothing on their own stack: 7 nested chains fit the 512-byte budget.
    depth = 7
    lines = ["*filter", ":INPUT ACCEPT [0:0]", *(f":c{i} - [0:0]" for i in range(1, depth + 1)),
             "-A INPUT -p udp -j c1"]
    lines += [f"-A c{i} -p udp -j c{i + 1}" for i in range(1, depth)]
    lines += [f"-A c{depth} -p udp --dport 1 -j DROP", "COMMIT", ""]
    rs = parse("\n".join(lines), family=Family.IPV4)
    with Checker(rs, hook=hook, iif="eth0") as c:
        res = c.run(udp("192.0.2.1", "192.0.2.2", dport=1))
        assert (res.verdict, res.chain, res.rule) == ("DROP", f"c{depth}", 1)
        res = c.run(udp("192.0.2.1", "192.0.2.2", dport=2))
        assert (res.verdict, res.chain, res.rule) == ("ACCEPT", "INPUT", None)
