"""nat OUTPUT at the sockets: the cgroup links, program arrays and maps behind them.

Pinned in the hook's directory next to the rest of the ruleset:

    natout_cfg                  the namespace's cookie (what the programs compare with)
    natout_rev4, natout_rev6    translations made (kept across restores: open connections and
                                UDP flows keep answering with the original address)
    natout_progs_<role><4|6>    two-slot program arrays, indexed by the generation word
    link_sock_<role><4|6>       cgroup links: connect and sendmsg dispatchers, recvmsg and
                                getpeername programs

A restore loads the OUTPUT program into the new generation's slot of the connect and sendmsg
arrays before the generation word flips, so nat OUTPUT switches with every other hook of the
ruleset (dispatch.py). The recvmsg and getpeername programs do not depend on the rules: they
stay attached until `flush`, so connections made under an older ruleset keep their addresses.

A namespace's sockets get one nat OUTPUT per family: when the nat table is restored at several
interfaces (`--hook tc --iface A`, then `--iface B`), the first restore that carries OUTPUT
attaches the links and later ones at other interfaces leave them in place (SockHooks.
_carried_elsewhere); OUTPUT's counters are those of that first interface.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from collections.abc import Hashable

from .. import netns
from ..bpf.consts import MapType, ProgType
from ..bpf.link import Link
from ..bpf.maps import Map, MapSpec
from ..bpf.prog import Prog
from ..bpf.syscall import BpfError
from ..compiler import natoutput as C
from ..compiler.compiled import CompiledTable
from ..compiler.hooks.sockaddr import CFG_MAP, REV_MAP
from ..ir.model import Family
from . import dispatch as D

SO_NETNS_COOKIE = 71
DEFAULT_CGROUP = "/sys/fs/cgroup"


def netns_cookie(netns_name: str | None) -> int:
    """The cookie of a network namespace (SO_NETNS_COOKIE of a socket made inside it)."""
    ctx = netns.enter(netns_name) if netns_name else contextlib.nullcontext()
    with ctx:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with s:
        return struct.unpack("<Q", s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8))[0]


def cgroup2_mount() -> str | None:
    """Where the cgroup v2 hierarchy is mounted, or None."""
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 2 and parts[2] == "cgroup2":
                return parts[1]
    return None


def default_cgroup() -> str:
    """$BPFILTER_CGROUP, else the root of the cgroup v2 hierarchy: where cgroup2 is mounted,
    else /sys/fs/cgroup."""
    return os.environ.get("BPFILTER_CGROUP") or cgroup2_mount() or DEFAULT_CGROUP


def wanted(compiled: list[CompiledTable]) -> bool:
    """Whether a compiled ruleset has a nat OUTPUT program."""
    return any(C.is_sock(cp.flavour) for ct in compiled for cp in ct.programs.values())


def _suffix(fam: Family) -> str:
    return "4" if fam is Family.IPV4 else "6"


def link_name(role: str, fam: Family) -> str:
    """The pin of a role's cgroup link."""
    return f"link_sock_{role}{_suffix(fam)}"


class NotACgroup(RuntimeError):
    """The cgroup nat OUTPUT would attach to does not exist or is not cgroup v2."""


class SockHooks:
    """nat OUTPUT's part of one restore of one family."""

    def __init__(self, hook_dir: str, fam: Family, compiled: list[CompiledTable],
                 netns_name: str | None, cgroup: str | None) -> None:
        self.dir = hook_dir
        self.fam = fam
        self.netns_name = netns_name
        self.cgroup = cgroup
        self.active = wanted(compiled)
        self.maps: dict[Hashable, Map] = {}  # shared with the compiled tables
        self.progs: dict[str, Prog] = {}  # role -> the OUTPUT program loaded for it
        if self.active:
            cg = self._cgroup_target()
            if cg is not None and not os.path.isfile(os.path.join(cg, "cgroup.procs")):
                raise NotACgroup(f"nat OUTPUT: {cg} is not a cgroup v2 directory (--cgroup)")
            self.maps[CFG_MAP] = self._open_or_create(
                CFG_MAP, MapSpec(MapType.ARRAY, 4, 8, 1, name="natout_cfg"))
            self.maps[CFG_MAP].update(bytes(4), struct.pack("<Q", netns_cookie(netns_name)))
            self.maps[REV_MAP[fam]] = self._open_or_create(REV_MAP[fam], C.rev_spec(fam))

    def _path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def _open_or_create(self, name: str, spec: MapSpec) -> Map:
        return Map.open_or_create(self._path(name), spec)

    # -- restore ---------------------------------------------------------------------------

    def load(self, cp, fds: dict) -> None:
        """Load the OUTPUT program for connect and for sendmsg (one attach type each)."""
        insns = cp.program.resolve(fds)
        for role in C.DISPATCHED:
            self.progs[role] = Prog.load(ProgType.CGROUP_SOCK_ADDR, insns,
                                         name=f"bpf_nat_{role}"[:15],
                                         attach_type=C.ATTACH[(role, self.fam)],
                                         source=cp.program)

    def install(self, new_gen: int) -> None:
        """Fill the new generation's slots, and attach what is not attached yet (before the
        generation word flips: an empty live slot leaves calls alone meanwhile)."""
        if not self.active:
            return
        for role, prog in self.progs.items():
            with self._progs_map(role) as arr:
                arr.update(struct.pack("<I", new_gen), struct.pack("<I", prog.fd))
        if self._carried_elsewhere():
            return  # the slots are filled, but no dispatcher of this directory reads them
        cg = self._cgroup_target()
        for role in (*C.DISPATCHED, *C.REVERSE):
            self._attach(role, cg)

    def _carried_elsewhere(self) -> bool:
        """Whether the nat table restored at another interface of the namespace (a sibling
        hook directory) already carries this family's nat OUTPUT, at --cgroup if given.

        Docker-style rulesets restore one nat table at several interfaces; each restore
        attaching its own dispatchers would run the chain once per interface on every connect
        (the second program seeing the first one's translation, counting it again, and
        translating again where a rule matches the new address). The first restore keeps the
        links; later ones compile and verify OUTPUT but leave them alone (and never fall back to
        the cgroup v2 root when --cgroup is not given)."""
        if os.path.exists(self._path(link_name("connect", self.fam))):
            return False
        parent, mine = os.path.split(self.dir)
        want = os.stat(self.cgroup).st_ino if self.cgroup is not None else None
        for d in os.listdir(parent):
            path = os.path.join(parent, d, link_name("connect", self.fam))
            if d == mine or not os.path.exists(path):
                continue
            with Link.open_pinned(path) as link:
                if want is None or link.describe().cgroup_id == want:
                    return True
        return False

    def finish(self, old_gen: int) -> None:
        """After the flip: empty the old generation's slots; without nat OUTPUT in the new
        ruleset, detach the connect and sendmsg dispatchers."""
        for role in C.DISPATCHED:
            path = self._path(C.progs_map(role, self.fam))
            if not os.path.exists(path):
                continue
            with Map.open_pinned(path) as arr:
                arr.delete(struct.pack("<I", old_gen))
                if not self.active:
                    arr.delete(struct.pack("<I", 1 - old_gen))
            if not self.active:
                _detach(self._path(link_name(role, self.fam)))

    def close(self) -> None:
        """Release this process's references (pins and links keep what is live)."""
        for p in self.progs.values():
            p.close()
        for m in self.maps.values():
            m.close()
        self.progs.clear()
        self.maps.clear()

    # -- links -----------------------------------------------------------------------------

    def _progs_map(self, role: str) -> Map:
        return self._open_or_create(C.progs_map(role, self.fam),
                                    MapSpec(MapType.PROG_ARRAY, 4, 4, 2,
                                            name=f"natout_{role}"[:15]))

    def _cgroup_target(self) -> str | None:
        """The cgroup to attach to: --cgroup, else where the links are (None: keep them), else
        the root of the cgroup v2 hierarchy."""
        if self.cgroup is not None:
            return self.cgroup
        if any(os.path.exists(self._path(link_name(r, self.fam)))
               for r in (*C.DISPATCHED, *C.REVERSE)):
            return None
        return default_cgroup()

    def _attach(self, role: str, cgroup: str | None) -> None:
        path = self._path(link_name(role, self.fam))
        if os.path.exists(path):
            if cgroup is None:
                return
            with Link.open_pinned(path) as link:
                if link.describe().cgroup_id == os.stat(cgroup).st_ino:
                    return
            _detach(path)  # restored for another cgroup: move there
        if cgroup is None:
            cgroup = default_cgroup()
        if role in C.DISPATCHED:
            program = C.dispatcher(self.fam, role, D.GEN_MAP)
        else:
            program = C.reverse_program(self.fam)
        keys = {CFG_MAP: self.maps[CFG_MAP].fd, REV_MAP[self.fam]: self.maps[REV_MAP[self.fam]].fd}
        extra: list[Map] = []
        try:
            if role in C.DISPATCHED:
                gen = Map.open_pinned(self._path(D.GEN_MAP))
                arr = self._progs_map(role)
                extra += [gen, arr]
                keys |= {D.GEN_MAP: gen.fd, C.progs_map(role, self.fam): arr.fd}
            fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
            try:
                with Prog.load(ProgType.CGROUP_SOCK_ADDR, program.resolve(keys),
                               name=f"bpf_sock_{role}"[:15],
                               attach_type=C.ATTACH[(role, self.fam)], source=program) as prog, \
                        Link.cgroup(prog.fd, fd, C.ATTACH[(role, self.fam)]) as link:
                    link.pin(path)
            finally:
                os.close(fd)
        finally:
            for m in extra:
                m.close()


def _detach(path: str) -> None:
    if not os.path.exists(path):
        return
    with contextlib.suppress(OSError, BpfError), Link.open_pinned(path) as link:
        link.detach()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
