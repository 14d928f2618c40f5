"""The interface every hook flavour (netfilter, tc, XDP) implements for code generation."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING

from ...bpf import insn as I
from ...bpf.asm import Assembler, Label
from ...bpf.consts import AttachType, ProgType
from ...ir.model import Family
from ...ir.pred import Field
from .. import layout as L

if TYPE_CHECKING:
    from ...matches.targets import Reject


class Verdict(IntEnum):
    """Internal verdict codes between chains; each flavour maps them to its return codes."""

    CONTINUE = 0  # fell off the end of a user chain, or RETURN
    ACCEPT = 1
    DROP = 2
    REJECT = 4  # the program's REJECT kind number in bits 8 and up (see compiler.reject)
    NAT = 5  # the program's NAT target number in bits 8 and up (see compiler.nat)


@dataclass
class HookPoint:
    """Where a chain's program runs: the flavour and, for netfilter, the hook number."""

    chain: str
    nf_hook: int | None = None  # NfHook for netfilter programs
    egress: bool = False  # tc: egress side


@dataclass
class Flavour(ABC):
    """A hook flavour: program type, how packet bytes and metadata are read, verdict codes."""

    family: Family
    # Interface names known when compiling (tc/XDP: the interface attached to; check runs).
    iif: str | None = None
    oif: str | None = None
    opts: dict = field(default_factory=dict)

    name: str = "?"
    prog_type: ProgType = ProgType.XDP
    attach_type: AttachType | None = None

    @abstractmethod
    def chains(self, table: str) -> dict[str, HookPoint]:
        """Built-in chains of `table` this flavour can run, and where."""

    @abstractmethod
    def verdict_code(self, verdict: Verdict) -> int:
        """The program return code for an ACCEPT or DROP."""

    def pass_code(self) -> int:
        """Return code for traffic the ruleset does not cover (non-IP, the other family)."""
        return self.verdict_code(Verdict.ACCEPT)

    @abstractmethod
    def emit_setup(self, a: Assembler) -> None:
        """First instructions: keep the context in r6, prepare packet access."""

    @abstractmethod
    def emit_l3_offset(self, a: Assembler, on_pass: Label) -> None:
        """Leave the network header's offset in r7 (jump to `on_pass` for non-IP/other family)."""

    @abstractmethod
    def emit_load(self, a: Assembler, off_reg: int, dst: int, length: int | None,
                  len_reg: int | None = None) -> None:
        """Copy `length` (or `len_reg`) packet bytes at offset `off_reg` to r9 + dst; r0 = 0 on
        success. r1-r5 are clobbered; `off_reg` must not be r1-r5."""

    def static_fields(self) -> dict[Field, bytes]:
        """Fields whose value is known when compiling (interface names of a tc/XDP program)."""
        out: dict[Field, bytes] = {}
        if self.iif is not None:
            out[Field.IIFNAME] = self.iif.encode().ljust(16, b"\0")
        if self.oif is not None:
            out[Field.OIFNAME] = self.oif.encode().ljust(16, b"\0")
        return out

    def unsupported_field(self, f: Field) -> str | None:
        """Why field `f` cannot be read on this hook, or None if it can."""
        return None

    @abstractmethod
    def emit_meta(self, a: Assembler, fields: set[Field]) -> None:
        """Fill the metadata fields (interfaces, mark, packet type, MAC) the rules read."""

    def emit_store_mark(self, a: Assembler) -> bool:
        """Write the struct's mark back to the packet; False if this hook cannot set marks."""
        return False

    def emit_reject(self, a: Assembler, kinds: Sequence[Reject]) -> bool:
        """Turn the packet into the reply of REJECT kind number r7 >> 8 (of `kinds`) and return
        the action that sends it (r6: context, r9: packet struct); False if this hook cannot
        send replies."""
        return False

    def emit_nat(self, a: Assembler, targets: Sequence) -> bool:
        """Code reached with the internal verdict in r7: NAT target number r7 >> 8 (of
        `targets`, (kind, params) pairs) or ACCEPT; False if this hook cannot translate."""
        return False

    def for_hook(self, hook: HookPoint) -> Flavour:
        """The flavour as configured for one hook point (tc: the ingress or egress side)."""
        return self

    def describe(self) -> str:
        """A short name for messages."""
        return self.name


def store_zero(a: Assembler, start: int, end: int) -> None:
    """Zero r9[start:end] (8-byte aligned bounds) so the verifier sees initialised memory."""
    for off in range(start, end, 8):
        a.emit(I.st(I.DW, L.R_PKT, off, 0))
