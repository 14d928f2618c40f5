"""Running packets through a compiled ruleset without attaching it (BPF_PROG_TEST_RUN).

The programs are the ones `restore` would attach; only the interface names come from the command
line (a test run has no real device behind it), so `-i`/`-o` are decided when compiling.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..bpf.consts import NfHook, NfProto
from ..bpf.maps import possible_cpus
from ..bpf.prog import Prog
from ..compiler.codegen import compile_table
from ..compiler.compiled import COUNTERS, PASSED, TRACE, CompiledTable
from ..compiler.hooks.base import Flavour, Verdict
from ..compiler.hooks.localtable import LOCAL_TABLE
from ..compiler.hooks.nf import NetfilterFlavour
from ..compiler.hooks.tcxdp import TcFlavour, XdpFlavour
from ..compiler.setmaps import initial_data
from ..compiler.validate import CompileError
from ..ir.model import Counters, Family, Ruleset
from .localtable import read_entries

ETH_HLEN = 14


@dataclass(frozen=True)
class CheckResult:
    """The verdict for one packet and the rule that gave it (rule None: the chain's policy)."""

    verdict: str  # ACCEPT, DROP, REJECT, or PASS (not covered by the ruleset: non-IP, other family)
    chain: str | None
    rule: int | None
    retval: int


def _flavour(hook: str, family: Family, iif: str | None, oif: str | None) -> Flavour:
    if hook == "nf":
        return NetfilterFlavour(family, iif=iif, oif=oif)
    if hook == "tc":
        return TcFlavour(family, iif=iif, oif=oif, ifname=iif or oif or "")
    if hook == "xdp":
        return XdpFlavour(family, iif=iif, oif=oif, ifname=iif or "")
    raise ValueError(f"unknown hook {hook!r}")


class Checker:
    """One built-in chain of a ruleset, loaded for test runs."""

    def __init__(self, rs: Ruleset, *, chain: str = "INPUT", table: str = "filter",
                 hook: str = "nf", iif: str | None = None, oif: str | None = None,
                 opts: dict | None = None) -> None:
        if table not in rs.tables or chain not in rs.tables[table].chains:
            raise CompileError(f"no chain {chain!r} in table {table!r}")
        if table == "nat":
            raise CompileError("table nat cannot be test-run: its programs bind connections in "
                               "the kernel's conntrack (see README, NAT)")
        self.family = rs.family
        self.hook = hook
        self.chain = chain
        fl = _flavour(hook, rs.family, iif if iif is not None else "",
                      oif if oif is not None else "")
        fl.opts.update(opts or {})
        self.compiled: CompiledTable = compile_table(rs.tables[table], fl)
        if chain not in self.compiled.programs:
            raise CompileError(f"chain {chain} has no program on hook {hook}")
        cp = self.compiled.programs[chain]
        self.nf_hook = cp.hook.nf_hook
        self.compiled.map_data.update(initial_data(rs.sets, self.compiled.maps))
        if LOCAL_TABLE in self.compiled.maps:
            # addrtype answers for the addresses of the namespace the check runs in.
            self.compiled.map_data[LOCAL_TABLE] = list(read_entries(rs.family, None).items())
        self.maps = self.compiled.create_maps()
        try:
            self.prog = Prog.load(cp.flavour.prog_type,
                                  cp.program.resolve({k: m.fd for k, m in self.maps.items()}),
                                  name=cp.name, attach_type=cp.flavour.attach_type,
                                  source=cp.program)
        except Exception:
            self.close()
            raise
        self.flavour = cp.flavour
        self.program = cp.program

    def close(self) -> None:
        """Release the program and maps."""
        if hasattr(self, "prog"):
            self.prog.close()
        for m in self.maps.values():
            m.close()

    def __enter__(self) -> Checker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _ctx(self) -> bytes | None:
        if self.hook != "nf":
            return None
        pf = NfProto.IPV4 if self.family is Family.IPV4 else NfProto.IPV6
        # struct nf_hook_state: hook, pf, then pointers the kernel fills itself.
        return struct.pack("<BB6x5Q", self.nf_hook or 0, pf, 0, 0, 0, 0, 0)

    def run(self, frame: bytes) -> CheckResult:
        """Run one Ethernet frame through the program."""
        data = frame
        if self.hook == "nf" and not self._family_frame(frame):
            # The family's netfilter hooks never see it (another protocol, a VLAN-tagged
            # frame still in front of its VLAN device): the ruleset does not apply.
            return CheckResult("PASS", None, None, 0)
        if self.hook == "nf" and self.nf_hook == NfHook.LOCAL_OUT:
            data = frame[ETH_HLEN:]  # locally generated packets have no link-layer header yet
        trace = self.maps[TRACE]
        zero = bytes(8) * possible_cpus()
        trace.update(b"\0\0\0\0", zero)
        res = self.prog.run(data, ctx=self._ctx(), data_out_size=0 if self.hook == "nf" else None)
        decider, verdict = 0, PASSED
        for v in trace.lookup_percpu(b"\0\0\0\0") or []:
            d, vv = struct.unpack("<II", v)
            if vv:
                decider, verdict = d, vv
        slot = self.compiled.slots[decider] if decider else None
        # A REJECT carries its kind's number in the bits above the verdict.
        name = {Verdict.ACCEPT: "ACCEPT", Verdict.DROP: "DROP",
                Verdict.REJECT: "REJECT"}.get(verdict & 0xFF, "PASS")
        return CheckResult(name, slot.chain if slot else None, slot.rule if slot else None,
                           res.retval)

    def _family_frame(self, frame: bytes) -> bool:
        ethertype = int.from_bytes(frame[12:14], "big") if len(frame) >= ETH_HLEN else 0
        return ethertype == (0x0800 if self.family is Family.IPV4 else 0x86DD)

    def counters(self) -> dict[tuple[str, int | None], Counters]:
        """Counters by (chain, rule) — rule None for a policy — summed over CPUs."""
        from .loader import read_counters

        vals = read_counters(self.maps[COUNTERS], len(self.compiled.slots))
        return {(s.chain, s.rule): vals[s.index] for s in self.compiled.slots[1:]}
