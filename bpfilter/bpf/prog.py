"""BPF programs: load (with the verifier's log and statistics), test runs, info, xlated dump."""

from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass, field

from .asm import Program as AsmProgram
from .consts import AttachType, Cmd, ProgFlags, ProgType, TestRunFlags
from .fd import FdObject, fd_by_id, obj_get
from .insn import Insn, pack, unpack
from .syscall import (
    BpfError,
    ProgBindMapAttr,
    ProgInfo,
    ProgLoadAttr,
    TestRunAttr,
    addr,
    bpf,
    str_c,
)

LOG_SIZE_DEFAULT = 1 << 20
LOG_SIZE_MAX = (1 << 30) - 1  # the kernel's UINT_MAX >> 2


class VerifierError(BpfError):
    """The verifier refused a program; `log` holds its full output."""

    def __init__(self, err: int, log: str, name: str, hint: str = "") -> None:
        self.log = log
        self.prog_name = name
        self.insn_index = _last_insn_index(log)
        tail = "\n".join(log.rstrip().splitlines()[-12:])
        detail = f"program {name!r} rejected by the verifier"
        if hint:
            detail += f" {hint}"
        super().__init__(Cmd.PROG_LOAD, err, f"{detail}\n{tail}")


def _last_insn_index(log: str) -> int | None:
    found = re.findall(r"^(\d+): \(", log, re.M)
    return int(found[-1]) if found else None


@dataclass
class VerifierStats:
    """What the verifier reported about an accepted program."""

    insns_processed: int = 0
    total_states: int = 0
    peak_states: int = 0
    mark_read: int = 0
    stack_depth: list[int] = field(default_factory=list)
    verification_time_us: int = 0

    @classmethod
    def parse(cls, log: str) -> VerifierStats:
        """Read the summary lines of a verifier log (log level >= 1 or stats)."""
        s = cls()
        m = re.search(r"processed (\d+) insns .*?total_states (\d+) peak_states (\d+) "
                      r"mark_read (\d+)", log)
        if m:
            s.insns_processed, s.total_states, s.peak_states, s.mark_read = map(int, m.groups())
        m = re.search(r"verification time (\d+) usec", log)
        if m:
            s.verification_time_us = int(m.group(1))
        m = re.search(r"stack depth ([\d+]+)", log)
        if m:
            s.stack_depth = [int(x) for x in m.group(1).split("+")]
        return s


@dataclass
class TestResult:
    """The outcome of one BPF_PROG_TEST_RUN."""

    retval: int
    duration_ns: int
    data_out: bytes
    ctx_out: bytes


class Prog(FdObject):
    """A loaded program."""

    def __init__(self, fd: int, name: str = "", prog_type: ProgType | None = None,
                 stats: VerifierStats | None = None, source: AsmProgram | None = None) -> None:
        super().__init__(fd)
        self.name = name
        self.prog_type = prog_type
        self.stats = stats or VerifierStats()
        self.source = source

    @classmethod
    def load(
        cls,
        prog_type: ProgType,
        insns: list[Insn],
        *,
        name: str = "",
        license: str = "GPL",
        attach_type: AttachType | None = None,
        flags: ProgFlags = ProgFlags.NONE,
        log_level: int = 0,
        log_size: int = LOG_SIZE_DEFAULT,
        source: AsmProgram | None = None,
        ifindex: int = 0,
    ) -> Prog:
        """Load `insns`; raises `VerifierError` with the verifier's log if refused.

        Statistics come from a second pass only when asked (log_level), because a verbose log of a
        large program costs as much as verifying it.
        """
        code = pack(insns)
        code_buf = ctypes.create_string_buffer(code, len(code))
        lic = ctypes.create_string_buffer(license.encode())
        # Level 4 (BPF_LOG_STATS) gives the summary line cheaply on success.
        level = log_level | 4
        log = ctypes.create_string_buffer(log_size)
        attr = ProgLoadAttr(
            prog_type=prog_type, insn_cnt=len(insns), insns=addr(code_buf), license=addr(lic),
            log_level=level, log_size=log_size, log_buf=addr(log), prog_flags=flags,
            prog_name=re.sub(r"[^A-Za-z0-9_.]", "_", name).encode()[:15],
            expected_attach_type=int(attach_type) if attach_type is not None else 0,
            prog_ifindex=ifindex,
        )
        try:
            fd = bpf(Cmd.PROG_LOAD, attr)
        except BpfError as e:
            text = log.value.decode(errors="replace")
            if e.errno == 28 and log_size < LOG_SIZE_MAX:  # ENOSPC: log too small
                return cls.load(prog_type, insns, name=name, license=license,
                                attach_type=attach_type, flags=flags, log_level=log_level,
                                log_size=min(log_size * 8, LOG_SIZE_MAX), source=source,
                                ifindex=ifindex)
            if log_level == 0:
                # Level 4 logs only the summary; ask again for the reason.
                return cls.load(prog_type, insns, name=name, license=license,
                                attach_type=attach_type, flags=flags, log_level=1,
                                log_size=log_size, source=source, ifindex=ifindex)
            hint = ""
            if source is not None:
                idx = _last_insn_index(text)
                origin = source.origin_of(idx) if idx is not None else None
                if origin is not None:
                    hint = f"at insn {idx}, generated for {origin}"
            raise VerifierError(e.errno, text, name, hint) from None
        stats = VerifierStats.parse(log.value.decode(errors="replace"))
        return cls(fd, name, prog_type, stats, source)

    @classmethod
    def open_pinned(cls, path: str) -> Prog:
        """Open a program pinned in bpffs."""
        p = cls(obj_get(path))
        p._fill_from_info()
        return p

    @classmethod
    def from_id(cls, prog_id: int) -> Prog:
        """Open a program by id."""
        p = cls(fd_by_id(Cmd.PROG_GET_FD_BY_ID, prog_id))
        p._fill_from_info()
        return p

    def _fill_from_info(self) -> None:
        info = self.info()
        self.name = str_c(info.name)
        self.prog_type = ProgType(info.type) if info.type in ProgType._value2member_map_ else None
        self.stats = VerifierStats(insns_processed=info.verified_insns)

    def info(self) -> ProgInfo:
        """The kernel's program info."""
        return self._info(ProgInfo())

    @property
    def id(self) -> int:
        """The program's kernel id."""
        return self.info().id

    def map_ids(self) -> list[int]:
        """Ids of the maps the program uses."""
        n = self.info().nr_map_ids
        ids = (ctypes.c_uint32 * max(n, 1))()
        info = ProgInfo(nr_map_ids=n, map_ids=addr(ids))
        self._info(info)
        return list(ids[: info.nr_map_ids])

    def xlated(self) -> list[Insn]:
        """The program as the kernel holds it after verification (BPF_OBJ_GET_INFO_BY_FD)."""
        size = self.info().xlated_prog_len
        buf = ctypes.create_string_buffer(size)
        self._info(ProgInfo(xlated_prog_len=size, xlated_prog_insns=addr(buf)))
        return unpack(buf.raw)

    def bind_map(self, map_fd: int) -> None:
        """Keep a map alive with the program although no instruction references it."""
        bpf(Cmd.PROG_BIND_MAP, ProgBindMapAttr(prog_fd=self.fd, map_fd=map_fd))

    def run(
        self,
        data: bytes = b"",
        *,
        ctx: bytes | None = None,
        repeat: int = 1,
        data_out_size: int | None = None,
        ctx_out_size: int | None = None,
        flags: TestRunFlags = TestRunFlags.NONE,
    ) -> TestResult:
        """Run the program on `data` in the kernel (BPF_PROG_TEST_RUN)."""
        din = ctypes.create_string_buffer(data, len(data)) if data else None
        out_size = len(data) + 256 if data_out_size is None else data_out_size
        dout = ctypes.create_string_buffer(out_size) if out_size else None
        cin = ctypes.create_string_buffer(ctx, len(ctx)) if ctx else None
        csize = (len(ctx) if ctx else 0) if ctx_out_size is None else ctx_out_size
        cout = ctypes.create_string_buffer(csize) if csize else None
        attr = TestRunAttr(
            prog_fd=self.fd, data_size_in=len(data), data_in=addr(din),
            data_size_out=out_size if dout else 0, data_out=addr(dout), repeat=repeat,
            ctx_size_in=len(ctx) if ctx else 0, ctx_in=addr(cin),
            ctx_size_out=csize if cout else 0, ctx_out=addr(cout), flags=flags,
        )
        bpf(Cmd.PROG_TEST_RUN, attr)
        data_out = dout.raw[: attr.data_size_out] if dout else b""
        ctx_out = cout.raw[: attr.ctx_size_out] if cout else b""
        return TestResult(attr.retval, attr.duration, data_out, ctx_out)

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self._fd}"
        return f"<Prog {self.name!r} {state}>"
