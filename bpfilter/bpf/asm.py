"""An assembler for eBPF: symbolic labels, a layout pass, map relocations and annotations.

Code is emitted into a list of items: plain instructions, label definitions and branches to labels.
`assemble()` lays the program out, repeating until no branch changes size: a conditional branch
whose distance does not fit the 16-bit `off` becomes an inverted short branch over a `gotol`, and an
unconditional one becomes a `gotol` (32-bit range). Each instruction carries the origin that was
current when it was emitted, so a verifier error or a dump line leads back to the rule.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field

from . import insn as I
from .insn import Insn, JmpOp

S16_MIN, S16_MAX = -(1 << 15), (1 << 15) - 1
S32_MIN, S32_MAX = -(1 << 31), (1 << 31) - 1

_label_ids = itertools.count()


class AsmError(ValueError):
    """A program cannot be assembled (missing or duplicate label, jump out of range)."""


@dataclass(eq=False)
class Label:
    """A position in the program, placed once with `Assembler.place`."""

    name: str
    uid: int = field(default_factory=lambda: next(_label_ids))

    def __repr__(self) -> str:
        return f"Label({self.name!r})"


@dataclass(frozen=True)
class Origin:
    """Where a block of code comes from: a rule, a chain's policy or a fixed part of the program."""

    text: str
    chain: str | None = None
    rule: int | None = None  # 1-based, as `iptables -L --line-numbers`
    file: str | None = None
    line: int | None = None

    def __str__(self) -> str:
        where = f" ({self.file}:{self.line})" if self.file and self.line else ""
        return f"{self.text}{where}"


@dataclass
class _Branch:
    op: JmpOp  # JA for unconditional
    dst: int
    src_or_imm: int
    reg: bool
    wide: bool  # JMP32 class compare
    target: Label
    long: bool = False  # decided by layout

    def size(self) -> int:
        if not self.long:
            return 1
        if self.op == JmpOp.JA:
            return 1
        return 2 if self.op in I.INVERSE else 3


@dataclass
class _Call:
    target: Label


@dataclass
class _Place:
    label: Label


@dataclass
class _Reloc:
    """An `ld_imm64` whose constant is a map fd known only at load time."""

    dst: int
    key: Hashable
    value_offset: int | None  # None: map pointer; else pointer into element 0


@dataclass
class Reloc:
    """A slot whose `imm` must be replaced by the fd of map `key` before load."""

    index: int
    key: Hashable
    value_offset: int | None


@dataclass
class Program:
    """An assembled program: instructions, map relocations, annotations and origins."""

    insns: list[Insn]
    relocs: list[Reloc]
    comments: dict[int, list[str]]
    origins: list[Origin | None]
    labels: dict[str, int]

    def resolve(self, fds: dict[Hashable, int]) -> list[Insn]:
        """Instructions with every map relocation replaced by the fd `fds` gives for its key."""
        out = list(self.insns)
        for r in self.relocs:
            try:
                fd = fds[r.key]
            except KeyError:
                raise AsmError(f"no map fd for relocation {r.key!r} at insn {r.index}") from None
            out[r.index] = Insn(out[r.index].opcode, out[r.index].dst, out[r.index].src, 0, fd)
        return out

    def origin_of(self, index: int) -> Origin | None:
        """The origin of the instruction at `index`, or of the closest one before it."""
        for i in range(min(index, len(self.origins) - 1), -1, -1):
            if self.origins[i] is not None:
                return self.origins[i]
        return None

    def __len__(self) -> int:
        return len(self.insns)


class Assembler:
    """Collects instructions and labels; `assemble()` resolves them into a `Program`."""

    def __init__(self, *, near: int = S16_MAX) -> None:
        """`near`: the longest branch distance left in the 16-bit form. Programs the verifier
        will rewrite (it inlines helper calls, growing the code) need headroom below 32767:
        the verifier refuses to patch a branch whose distance then overflows."""
        self.near = near
        self._items: list[tuple[object, Origin | None, list[str]]] = []
        self._placed: set[int] = set()
        self._used: set[int] = set()
        self._origin: Origin | None = None
        self._pending_comments: list[str] = []

    # -- labels ---------------------------------------------------------------------------

    def label(self, name: str = "L") -> Label:
        """A new, not yet placed label."""
        return Label(name)

    def place(self, label: Label) -> None:
        """Bind `label` to the next instruction emitted."""
        if label.uid in self._placed:
            raise AsmError(f"label {label.name!r} placed twice")
        self._placed.add(label.uid)
        self._items.append((_Place(label), None, []))

    def here(self, name: str = "L") -> Label:
        """A new label placed at the current position."""
        lab = self.label(name)
        self.place(lab)
        return lab

    # -- origins and comments -------------------------------------------------------------

    @contextlib.contextmanager
    def origin(self, origin: Origin | None) -> Iterator[None]:
        """Attribute everything emitted inside the block to `origin`, announced by a comment."""
        saved = self._origin
        self._origin = origin
        if origin is not None:
            self.comment(str(origin))
        try:
            yield
        finally:
            self._origin = saved

    def comment(self, text: str) -> None:
        """Attach a comment line to the next instruction emitted."""
        self._pending_comments.append(text)

    # -- emission -------------------------------------------------------------------------

    def _add(self, item: object) -> None:
        self._items.append((item, self._origin, self._pending_comments))
        self._pending_comments = []

    def emit(self, *insns: Insn | list[Insn]) -> None:
        """Append instructions (a two-slot `ld_imm64` comes as a list)."""
        for x in insns:
            if isinstance(x, list):
                for y in x:
                    self._add(y)
            else:
                if x.is_ld_imm64:
                    raise AsmError("ld_imm64 must be emitted as a two-slot list")
                self._add(x)

    def __iadd__(self, x: Insn | list[Insn]) -> Assembler:
        self.emit(x)
        return self

    def jump(self, op: JmpOp, dst: int, src_or_imm: int, target: Label, *, reg: bool = False,
             wide: bool = False) -> None:
        """if dst <op> src goto target; `wide=True` compares the low 32 bits (JMP32)."""
        if op in (JmpOp.CALL, JmpOp.EXIT, JmpOp.JCOND):
            raise AsmError(f"{op.name} is not a conditional branch")
        # Encode once now so that a bad operand is reported here, not at assemble().
        (I.jmp32 if wide else I.jmp)(op, dst, src_or_imm, 0, reg=reg)
        self._used.add(target.uid)
        self._add(_Branch(op, dst, src_or_imm, reg, wide, target))

    def goto(self, target: Label) -> None:
        """Unconditional branch."""
        self._used.add(target.uid)
        self._add(_Branch(JmpOp.JA, 0, 0, False, False, target))

    def call(self, target: Label) -> None:
        """bpf-to-bpf call of the subprogram starting at `target`."""
        self._used.add(target.uid)
        self._add(_Call(target))

    def referenced(self, label: Label) -> bool:
        """True once some branch or call targets `label`."""
        return label.uid in self._used

    def __len__(self) -> int:
        """Instruction slots emitted so far (far branches counted short)."""
        return sum(self._size(item) for item, _, _ in self._items)

    def ld_map(self, dst: int, key: Hashable) -> None:
        """dst = pointer to map `key` (its fd is filled in at load)."""
        self._add(_Reloc(dst, key, None))

    def ld_map_value(self, dst: int, key: Hashable, offset: int = 0) -> None:
        """dst = address of byte `offset` of element 0 of array map `key`."""
        self._add(_Reloc(dst, key, offset))

    # -- layout ---------------------------------------------------------------------------

    @staticmethod
    def _size(item: object) -> int:
        if isinstance(item, _Branch):
            return item.size()
        if isinstance(item, _Place):
            return 0
        if isinstance(item, _Reloc):
            return 2
        return 1

    def _prune(self, items: list) -> list:
        """Drop instructions no path reaches (the verifier refuses unreachable code).

        Paths start at the entry; a subprogram lives if a live call reaches it. A raw jump
        instruction (an offset rather than a label) makes the analysis impossible: then nothing
        is dropped.
        """
        items = list(items)  # comments move below; the assembler's own list stays as emitted
        where: dict[int, int] = {}
        for n, (item, _, _) in enumerate(items):
            if isinstance(item, _Place):
                where[item.label.uid] = n
            elif isinstance(item, Insn) and I.is_jump(item):
                return items
        live = [False] * len(items)
        todo = [0]  # subprograms become live when a live call reaches them
        while todo:
            n = todo.pop()
            while n < len(items) and not live[n]:
                live[n] = True
                item = items[n][0]
                if isinstance(item, _Branch):
                    todo.append(where[item.target.uid])
                    if item.op == JmpOp.JA:
                        break
                elif isinstance(item, _Call):
                    todo.append(where[item.target.uid])
                elif isinstance(item, Insn) and item.opcode == I.JMP | JmpOp.EXIT:
                    break
                n += 1
        out = []
        for n, entry in enumerate(items):
            if live[n] or isinstance(entry[0], _Place):
                out.append(entry)
            elif entry[2] and n + 1 < len(items):
                # Keep the comments of a dropped instruction for whatever follows.
                nxt = items[n + 1]
                items[n + 1] = (nxt[0], nxt[1], [*entry[2], *nxt[2]])
        return out

    def assemble(self, *, prune: bool = True) -> Program:
        """Resolve labels and branch sizes; return the finished program.

        With `prune`, unreachable instructions are dropped first.
        """
        items = self._items
        if self._pending_comments:
            raise AsmError(f"comment {self._pending_comments[0]!r} is followed by no instruction")
        for item, _, _ in items:
            target = getattr(item, "target", None)
            if target is not None and target.uid not in self._placed:
                raise AsmError(f"label {target.name!r} is used but never placed")
        if prune:
            items = self._prune(items)
        while True:
            pos: dict[int, int] = {}
            addr: list[int] = []
            pc = 0
            for item, _, _ in items:
                addr.append(pc)
                if isinstance(item, _Place):
                    pos[item.label.uid] = pc
                pc += self._size(item)
            changed = False
            for n, (item, _, _) in enumerate(items):
                if isinstance(item, _Branch) and not item.long:
                    dist = pos[item.target.uid] - (addr[n] + 1)
                    if not -self.near - 1 <= dist <= self.near:
                        item.long = True
                        changed = True
            if not changed:
                break
        return self._emit_final(items, pos, addr, pc)

    def _emit_final(self, items: list, pos: dict[int, int], addr: list[int], total: int) -> Program:
        out: list[Insn] = []
        origins: list[Origin | None] = []
        comments: dict[int, list[str]] = {}
        relocs: list[Reloc] = []
        labels: dict[str, int] = {}
        for n, (item, origin, notes) in enumerate(items):
            start = len(out)
            if notes:
                comments.setdefault(start, []).extend(notes)
            if isinstance(item, _Place):
                labels.setdefault(item.label.name, pos[item.label.uid])
                continue
            if isinstance(item, Insn):
                out.append(item)
            elif isinstance(item, _Branch):
                out.extend(self._encode_branch(item, pos[item.target.uid], addr[n]))
            elif isinstance(item, _Call):
                rel = pos[item.target.uid] - (addr[n] + 1)
                out.append(I.call_local(rel))
            elif isinstance(item, _Reloc):
                relocs.append(Reloc(start, item.key, item.value_offset))
                if item.value_offset is None:
                    out.extend(I.ld_map_fd(item.dst, 0))
                else:
                    out.extend(I.ld_map_value(item.dst, 0, item.value_offset))
            origins.extend([origin] * (len(out) - start))
        if len(out) != total:
            raise AsmError(f"internal: layout size {total} != emitted {len(out)}")
        return Program(out, relocs, comments, origins, labels)

    @staticmethod
    def _encode_branch(b: _Branch, target: int, at: int) -> list[Insn]:
        dist = target - (at + 1)
        if b.op == JmpOp.JA:
            if b.long:
                if not S32_MIN <= dist <= S32_MAX:
                    raise AsmError(f"jump to {b.target.name!r}: distance {dist} exceeds 32 bits")
                return [I.gotol(dist)]
            return [I.ja(dist)]
        make = I.jmp32 if b.wide else I.jmp
        if not b.long:
            return [make(b.op, b.dst, b.src_or_imm, dist, reg=b.reg)]
        inverse = I.INVERSE.get(b.op)
        if inverse is None:
            # JSET has no inverse: branch onto the gotol, otherwise hop over it.
            return [make(b.op, b.dst, b.src_or_imm, 1, reg=b.reg), I.ja(1), I.gotol(dist - 2)]
        # Skip the gotol when the condition fails; the gotol sits one slot further on.
        return [make(inverse, b.dst, b.src_or_imm, 1, reg=b.reg), I.gotol(dist - 1)]
