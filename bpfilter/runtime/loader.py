"""Loading rulesets into the kernel: compile, verify, swap atomically, pin, read back.

`Runtime` acts on one hook of one network namespace (the caller's, or a named one). A restore
compiles and loads every program of the new ruleset before touching anything live; the switch is
the single write of the family's generation word, so the old ruleset stays whole until then and a
failure leaves it in place.
"""

from __future__ import annotations

import contextlib
import os
import struct
from dataclasses import dataclass, field

from .. import netns
from ..bpf.bpffs import is_bpffs, mount_bpffs
from ..bpf.consts import MapType, NfProto
from ..bpf.link import Link
from ..bpf.maps import Map, MapSpec
from ..bpf.prog import Prog
from ..bpf.syscall import BpfError
from ..compiler import nat as natc
from ..compiler import natoutput as natoutc
from ..compiler.codegen import compile_table
from ..compiler.compiled import COUNTERS, TRACE, CompiledTable
from ..compiler.hooks.base import Flavour, Verdict
from ..compiler.hooks.nf import NetfilterFlavour
from ..compiler.hooks.tcxdp import TcFlavour, XdpFlavour
from ..compiler.logging import LOG_MAP
from ..compiler.validate import CompileError
from ..ir.model import Counters, Family, Ruleset
from . import conntrack, ctrecorder, localtable, planstore, sets, statetables
from . import dispatch as D
from . import nat as natrt
from . import natoutput as natout
from .state import (
    Record,
    TableRecord,
    bpffs_root,
    hook_dir_name,
    locked,
    pin_name,
    read_record,
    unlink_quiet,
    write_record,
)

# Netfilter priorities of the iptables tables (NF_IP_PRI_*), so ordering matches iptables.
NF_PRIORITY = {"raw": -300, "mangle": -150, "filter": 0, "security": 50}
SUPPORTED_TABLES = ("filter", "mangle", "raw", "security")


class RuntimeError_(RuntimeError):
    """A ruleset cannot be loaded or read back."""


@dataclass
class Loaded:
    """What is loaded for one family: the record and, per table, counters by slot."""

    record: Record
    counters: dict[str, list[Counters]] = field(default_factory=dict)


def make_flavour(hook: str, family: Family, iface: str | None, *, egress: bool = False,
                 mac: bytes | None = None) -> Flavour:
    """The flavour object for a hook name."""
    if hook == "nf":
        return NetfilterFlavour(family)
    if not iface:
        raise RuntimeError_(f"--hook {hook} needs --iface")
    if hook == "tc":
        return TcFlavour(family, ifname=iface, egress=egress, mac=mac)
    if hook == "xdp":
        return XdpFlavour(family, ifname=iface, mac=mac)
    raise RuntimeError_(f"unknown hook {hook!r} (nf, tc or xdp)")


def compile_ruleset(rs: Ruleset, hook: str, iface: str | None,
                    mac: bytes | None = None, nat_env: tuple | None = None) -> list[CompiledTable]:
    """Compile every table of `rs` for `hook`; refuse tables the hook cannot run."""
    out: list[CompiledTable] = []
    fl = make_flavour(hook, rs.family, iface, mac=mac)
    for name, table in rs.tables.items():
        busy = any(c.rules or c.policy not in (None, "ACCEPT") for c in table.chains.values())
        if name == "nat" and busy:  # see compiler/nat.py
            out.append(natc.compile_nat(table, rs.family, hook, iface, mac, nat_env,
                                        natrt.tail_call()))
            continue
        if name not in SUPPORTED_TABLES or not fl.chains(name):
            if busy:
                if name == "nat":
                    raise CompileError("table 'nat' is not supported yet: NAT needs "
                                       "connection tracking")
                where = "yet" if name not in SUPPORTED_TABLES else f"on hook {hook}"
                raise CompileError(f"table {name!r} is not supported {where}")
            continue
        out.append(compile_table(table, fl))
    return out


def ensure_bpffs(root: str) -> None:
    """Make sure `root` lies on a bpffs, mounting /sys/fs/bpf when that is where it goes."""
    probe = root
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if is_bpffs(probe):
        return
    if root.startswith("/sys/fs/bpf/") or root == "/sys/fs/bpf":
        mount_bpffs("/sys/fs/bpf")
        return
    raise RuntimeError_(f"{root} is not on a bpf filesystem")


class Runtime:
    """Loaded rulesets at one hook of one namespace."""

    def __init__(self, hook: str = "nf", *, netns_name: str | None = None,
                 iface: str | None = None, root: str | None = None,
                 cgroup: str | None = None) -> None:
        if hook not in ("nf", "tc", "xdp"):
            raise RuntimeError_(f"unknown hook {hook!r} (nf, tc or xdp)")
        if hook != "nf" and not iface:
            raise RuntimeError_(f"--hook {hook} needs --iface")
        self.hook = hook
        self.iface = iface if hook != "nf" else None
        self.netns_name = netns_name
        self.root = root or bpffs_root()
        self.dir = os.path.join(self.root, netns.ns_id(netns_name),
                                hook_dir_name(hook, self.iface))
        # nat OUTPUT's cgroup (None: where its links are, else the cgroup v2 root).
        if cgroup is not None and not os.path.isfile(os.path.join(cgroup, "cgroup.procs")):
            raise RuntimeError_(f"--cgroup {cgroup}: not a cgroup v2 directory")
        self.cgroup = cgroup

    # -- namespaces ----------------------------------------------------------------------

    def _enter(self):
        return netns.enter(self.netns_name) if self.netns_name else contextlib.nullcontext()

    def _iface_info(self) -> tuple[int, bytes | None]:
        assert self.iface is not None
        with self._enter():
            ifindex = socket_ifindex(self.iface)
            mac = _iface_mac(self.iface)
        return ifindex, mac

    def _path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    # -- shared objects ------------------------------------------------------------------

    def _open_or_create(self, name: str, spec: MapSpec) -> Map:
        return Map.open_or_create(self._path(name), spec)

    def _accept_code(self, family: Family) -> int:
        return make_flavour(self.hook, family, self.iface or "x").verdict_code(Verdict.ACCEPT)

    # -- restore -------------------------------------------------------------------------

    def restore(self, rs: Ruleset, *, text: str, counters: bool = False,
                original: str | None = None) -> Record:
        """Compile, load and switch to `rs` (whole, or not at all). `text` is its save form."""
        mac = None
        if self.iface:
            _, mac = self._iface_info()
        nat_env = natrt.environment_for(rs, self.hook, self.netns_name, self.iface)
        compiled = compile_ruleset(rs, self.hook, self.iface, mac, nat_env)
        ensure_bpffs(self.root)
        os.makedirs(self.dir, exist_ok=True)
        with locked(self.dir):
            return self._restore_locked(rs, compiled, text, counters, original)

    def keep_policies(self, rs: Ruleset) -> list[str]:
        """Give the built-in chains `rs` leaves undeclared (no `:CHAIN` line, no -P) the policy
        loaded now, as iptables-restore keeps it; returns the chains changed (table/chain)."""
        old = self._record(rs.family, None)
        if old is None:
            return []
        loaded: dict[tuple[str, str], str] = {}
        table = ""
        for line in old.text.splitlines():
            if line.startswith("*"):
                table = line[1:].strip()
            elif line.startswith(":") and len(line.split()) >= 2:
                name, policy = line[1:].split()[:2]
                loaded[(table, name)] = policy
        changed = []
        for t in rs.tables.values():
            for c in t.chains.values():
                policy = loaded.get((t.name, c.name))
                if c.builtin and c.origin is None and policy not in (None, "-", c.policy):
                    c.policy = policy
                    changed.append(f"{t.name}/{c.name}")
        return changed

    def _restore_locked(self, rs: Ruleset, compiled: list[CompiledTable], text: str,
                        counters: bool, original: str | None) -> Record:
        fam = rs.family
        fi = D.family_index(fam)
        gen_map = self._open_or_create(D.GEN_MAP, MapSpec(MapType.ARRAY, 4, 8, 1, name="bpf_gen"))
        progs = self._open_or_create(
            D.PROGS_MAP, MapSpec(MapType.PROG_ARRAY, 4, 4, D.PROG_ARRAY_SIZE, name="bpf_progs"))
        with gen_map, progs:
            words = struct.unpack("<II", gen_map.lookup(b"\0\0\0\0") or bytes(8))
            cur = words[fi] & 1
            new = 1 - cur
            old_record = self._record(fam, cur)
            loaded: list[tuple[str, str, Prog]] = []
            maps: dict[str, Map] = {}
            extra: list[Map] = []
            # Maps that outlive a ruleset: the log ring buffer `monitor` reads.
            shared: dict = {}
            log_path = self._path(pin_name("log", fam.value))
            if os.path.exists(log_path):
                shared[LOG_MAP] = Map.open_pinned(log_path)
            # nat OUTPUT: cgroup socket programs beside the hook's (runtime/natoutput.py).
            try:
                sock = natout.SockHooks(self.dir, fam, compiled, self.netns_name, self.cgroup)
            except natout.NotACgroup as e:
                for m in shared.values():
                    m.close()
                raise RuntimeError_(str(e)) from None
            shared.update(sock.maps)
            neutral = Prog.load(make_flavour(self.hook, fam, self.iface or "x").prog_type,
                                D.neutral(self._accept_code(fam)), name="bpf_neutral",
                                attach_type=make_flavour(self.hook, fam, self.iface or "x")
                                .attach_type)
            try:
                # Named sets: shared by the family's programs, kept across restores.
                setsync = sets.SetSync(self.dir, fam, rs.sets)
                shared.update(setsync.maps)
                # hashlimit and recent tables: shared by the family's tables, kept by name.
                statesync = statetables.StateSync(self.dir, fam, compiled)
                shared.update(statesync.maps)
                # addrtype's copy of the local routing table: refilled at every restore.
                localsync = localtable.LocalTableSync(self.dir, fam, compiled, self.netns_name)
                shared.update(localsync.maps)
                # tc ingress/XDP conntrack: ICMP query entries recorded at tcx egress.
                recsync = ctrecorder.RecorderSync(self.dir, fam, compiled, self.iface,
                                                  self.netns_name)
                shared.update(recsync.maps)
                tables: dict[str, TableRecord] = {}
                plans: dict[str, planstore.TablePlans] = {}
                for ct in compiled:
                    tname = ct.table.name
                    tmaps = ct.create_maps(shared)
                    # Classifier maps are pinned so single-rule changes can edit them in place.
                    pins = planstore.classifier_pins(ct, fam.value, tname)
                    plans[tname] = planstore.table_plans(ct, pins)
                    for k, m in tmaps.items():
                        if k == LOG_MAP:
                            if LOG_MAP not in shared:
                                shared[LOG_MAP] = m
                                m.pin(self._path(pin_name("log", fam.value)))
                            continue
                        if k in (COUNTERS, TRACE):
                            maps[pin_name("cnt" if k == COUNTERS else "trace", fam.value,
                                          tname)] = m
                        elif k in pins:
                            maps[pins[k]] = m
                        else:
                            extra.append(m)  # classifier tables: held by the programs
                    if counters:
                        _seed_counters(tmaps[COUNTERS], ct)
                    fds = {k: m.fd for k, m in tmaps.items()}
                    # nat PREROUTING tail-calls POSTROUTING through the dispatchers' maps.
                    fds.update({D.GEN_MAP: gen_map.fd, D.PROGS_MAP: progs.fd})
                    for chain, cp in ct.programs.items():
                        fl = cp.flavour
                        if natoutc.is_sock(fl):
                            sock.load(cp, fds)
                            continue
                        prog = Prog.load(fl.prog_type, cp.program.resolve(fds), name=cp.name,
                                         attach_type=fl.attach_type, source=cp.program)
                        loaded.append((tname, chain, prog))
                    tables[tname] = TableRecord([(s.chain, s.rule) for s in ct.slots],
                                                list(ct.programs))
                record = Record(fam.value, self.hook, self.iface, text, tables, rs.source,
                                original)
                meta = write_record(record, f"bpf_meta{fi}{new}")
                maps[pin_name("meta", fam.value)] = meta
                maps[pin_name("plan", fam.value)] = planstore.write_blob(
                    planstore.encode(plans), f"bpf_plan{fi}{new}")
                # Fill the new generation: chain programs, and neutral ones where a hook that
                # stays attached has no chain in the new ruleset.
                base = new * D.GEN_STRIDE
                wanted = {(t, c) for t, c, _ in loaded}
                for t, c, prog in loaded:
                    progs.update(_u32(base + D.slot_id(fam, t, c)), _u32(prog.fd))
                attached = self._attached_hooks(fam)
                for t, c in attached - wanted:
                    progs.update(_u32(base + D.slot_id(fam, t, c)), _u32(neutral.fd))
                # New hooks: their live slot must hold something before the link exists.
                for t, c in sorted(wanted - attached, key=D.TABLE_CHAINS.index):
                    slot = _u32(cur * D.GEN_STRIDE + D.slot_id(fam, t, c))
                    if progs.lookup(slot) is None:
                        progs.update(slot, _u32(neutral.fd))
                    self._attach(fam, t, c)
                if any(ct.uses_conntrack for ct in compiled):
                    conntrack.enable(self.netns_name)
                if any(ct.table.name == "nat" and set(ct.programs) - {"OUTPUT"}
                       for ct in compiled):
                    natrt.enable(self.netns_name)
                for name, m in maps.items():
                    path = self._path(pin_name(name, str(new)))
                    unlink_quiet(path)
                    m.pin(path)
                setsync.commit()
                statesync.commit()
                recsync.commit()
                sock.install(new)
                # The switch.
                words = list(words)
                words[fi] = new
                gen_map.update(b"\0\0\0\0", struct.pack("<II", *words))
            finally:
                for _, _, p in loaded:
                    p.close()
                for m in [*maps.values(), *extra, *shared.values()]:
                    m.close()
                neutral.close()
                sock.close()
            # After the switch: drop the old generation and hooks the new ruleset left.
            setsync.finish()
            statesync.finish()
            localsync.finish()
            recsync.finish()
            sock.finish(cur)
            for t, c in D.TABLE_CHAINS:
                with contextlib.suppress(OSError):
                    progs.delete(_u32(cur * D.GEN_STRIDE + D.slot_id(fam, t, c)))
            for name in os.listdir(self.dir):
                if name.endswith(f"_{cur}") and f"_{fam.value}_" in name:
                    unlink_quiet(self._path(name))
            for t, c in self._attached_hooks(fam) - wanted:
                self._detach(fam, t, c)
            del old_record
            return record

    def refresh_local_table(self) -> dict[Family, int]:
        """Copy the namespace's local routing table into the loaded addrtype maps again;
        {family: entries} of the maps refreshed (see runtime/localtable.py)."""
        return localtable.refresh(self.dir, self.netns_name)

    # -- links ---------------------------------------------------------------------------

    def _link_name(self, fam: Family, table: str, chain: str) -> str:
        if self.hook == "nf":
            return pin_name("link", fam.value, table, chain)
        if self.hook == "tc":
            if table == "nat":
                return "link_nat"  # PREROUTING's; POSTROUTING is tail-called
            return "link_egress" if chain == "OUTPUT" else "link_ingress"
        return "link_xdp"

    def _attached_hooks(self, fam: Family) -> set[tuple[str, str]]:
        """(table, chain) pairs of `fam` whose dispatcher is attached."""
        out = set()
        rec = self._record(fam, None)
        if rec is None:
            return out
        for t, tr in rec.tables.items():
            for c in tr.chains:
                if (t, c) == ("nat", "OUTPUT"):
                    continue  # cgroup links of their own (runtime/natoutput.py)
                if os.path.exists(self._path(self._link_name(fam, t, c))):
                    out.add((t, c))
        return out

    def _attach(self, fam: Family, table: str, chain: str) -> None:
        path = self._path(self._link_name(fam, table, chain))
        if os.path.exists(path):
            return
        from ..compiler.hooks.nf import _CHAINS

        accept = self._accept_code(fam)
        if self.hook == "nf":
            disp = D.nf_dispatcher(fam, table, chain, accept)
            fl = make_flavour("nf", fam, None)
        elif self.hook == "tc":
            if table == "nat" and chain != "PREROUTING":
                return
            disp = D.tc_dispatcher(chain, accept, table)
            fl = make_flavour("tc", fam, self.iface, egress=chain == "OUTPUT")
        else:
            disp = D.xdp_dispatcher(accept)
            fl = make_flavour("xdp", fam, self.iface)
        gen_map = Map.open_pinned(self._path(D.GEN_MAP))
        progs = Map.open_pinned(self._path(D.PROGS_MAP))
        with gen_map, progs:
            insns = disp.resolve({D.GEN_MAP: gen_map.fd, D.PROGS_MAP: progs.fd})
            with Prog.load(fl.prog_type, insns, name=f"bpf_disp_{chain.lower()}"[:15],
                           attach_type=fl.attach_type, source=disp) as prog:
                # Links bind to the namespace of the caller; pinning must happen back home
                # (the kernel refuses pins from a thread that moved into another namespace).
                with self._enter():
                    if self.hook == "nf":
                        pf = NfProto.IPV4 if fam is Family.IPV4 else NfProto.IPV6
                        link = Link.netfilter(prog.fd, pf, _CHAINS[table][chain],
                                              NF_PRIORITY[table])
                    elif self.hook == "tc":
                        link = Link.tcx(prog.fd, socket_ifindex(self.iface),
                                        egress=chain == "OUTPUT")
                    else:
                        link = Link.xdp(prog.fd, socket_ifindex(self.iface))
                with link:
                    link.pin(path)

    def _detach(self, fam: Family, table: str, chain: str) -> None:
        path = self._path(self._link_name(fam, table, chain))
        if self.hook != "nf" and self._other_family_uses(fam, chain):
            return
        if os.path.exists(path):
            with Link.open_pinned(path) as link, contextlib.suppress(BpfError):
                link.detach()
            unlink_quiet(path)

    def _other_family_uses(self, fam: Family, chain: str) -> bool:
        other = Family.IPV6 if fam is Family.IPV4 else Family.IPV4
        rec = self._record(other, None)
        return rec is not None and any(chain in tr.chains for tr in rec.tables.values())

    # -- reading back ----------------------------------------------------------------------

    def _active_gen(self, fam: Family) -> int | None:
        path = self._path(D.GEN_MAP)
        if not os.path.exists(path):
            return None
        with Map.open_pinned(path) as m:
            words = struct.unpack("<II", m.lookup(b"\0\0\0\0") or bytes(8))
        return words[D.family_index(fam)] & 1

    def _record(self, fam: Family, gen: int | None) -> Record | None:
        if gen is None:
            gen = self._active_gen(fam)
            if gen is None:
                return None
        path = self._path(pin_name("meta", fam.value, str(gen)))
        if not os.path.exists(path):
            return None
        with Map.open_pinned(path) as m:
            return read_record(m)

    def loaded(self, fam: Family) -> Loaded | None:
        """The active record of `fam` with per-slot counters summed over CPUs, or None."""
        gen = self._active_gen(fam)
        if gen is None:
            return None
        rec = self._record(fam, gen)
        if rec is None:
            return None
        out = Loaded(rec)
        for t, tr in rec.tables.items():
            path = self._path(pin_name("cnt", fam.value, t, str(gen)))
            if not os.path.exists(path):
                continue
            with Map.open_pinned(path) as m:
                out.counters[t] = read_counters(m, len(tr.slots))
        return out

    def program_stats(self, fam: Family) -> dict[tuple[str, str], dict[str, int]]:
        """Kernel statistics of each loaded program of `fam`, by (table, chain)."""
        gen = self._active_gen(fam)
        path = self._path(D.PROGS_MAP)
        if gen is None or not os.path.exists(path):
            return {}
        out: dict[tuple[str, str], dict[str, int]] = {}
        with Map.open_pinned(path) as progs:
            for t, c in D.TABLE_CHAINS:
                raw = progs.lookup(_u32(gen * D.GEN_STRIDE + D.slot_id(fam, t, c)))
                if raw is None:
                    continue
                with Prog.from_id(int.from_bytes(raw, "little")) as p:
                    info = p.info()
                    out[(t, c)] = {"prog_id": info.id, "verified_insns": info.verified_insns,
                                   "xlated_insns": info.xlated_prog_len // 8,
                                   "jited_bytes": info.jited_prog_len}
        return out

    def log_path(self, fam: Family) -> str | None:
        """Pin path of the family's log ring buffer, if a logging ruleset was loaded."""
        p = self._path(pin_name("log", fam.value))
        return p if os.path.exists(p) else None

    def map_path(self, fam: Family, kind: str, table: str = "filter") -> str | None:
        """Pin path of the active `cnt`/`trace` map of a table, if loaded."""
        gen = self._active_gen(fam)
        if gen is None:
            return None
        p = self._path(pin_name(kind, fam.value, table, str(gen)))
        return p if os.path.exists(p) else None

    # -- flush ---------------------------------------------------------------------------

    def flush(self) -> bool:
        """Detach and unpin everything at this hook; False if nothing was loaded."""
        if not os.path.isdir(self.dir):
            return False
        if self.hook == "nf":
            conntrack.disable(self.netns_name)
        if os.path.exists(self._path("link_nat")) and not natrt.used_elsewhere(self.dir):
            natrt.disable(self.netns_name)
        with locked(self.dir):
            for name in sorted(os.listdir(self.dir)):
                path = self._path(name)
                if name.startswith("link_"):
                    try:
                        with Link.open_pinned(path) as link, contextlib.suppress(BpfError):
                            link.detach()
                    except OSError:
                        pass
                unlink_quiet(path)
        with contextlib.suppress(OSError):
            os.rmdir(self.dir)
            os.rmdir(os.path.dirname(self.dir))
        return True


def read_counters(m: Map, n: int) -> list[Counters]:
    """Per-slot counters summed over CPUs."""
    out = []
    for i in range(n):
        vals = m.lookup_percpu(_u32(i)) or []
        p = b = 0
        for v in vals:
            vp, vb = struct.unpack("<QQ", v)
            p += vp
            b += vb
        out.append(Counters(p, b))
    return out


def _seed_counters(m: Map, ct: CompiledTable) -> None:
    """Start counters at the values the ruleset carries (restore -c)."""
    t = ct.table
    for s in ct.slots[1:]:
        chain = t.chains[s.chain]
        c = chain.counters if s.rule is None else chain.rules[s.rule - 1].counters
        if c.packets or c.bytes:
            per_cpu = [struct.pack("<QQ", c.packets, c.bytes)] + [bytes(16)] * (
                _ncpu() - 1)
            m.update(_u32(s.index), b"".join(per_cpu))


def _ncpu() -> int:
    from ..bpf.maps import possible_cpus

    return possible_cpus()


def _iface_mac(name: str) -> bytes | None:
    """The MAC address of `name` in the current namespace (via its ioctl)."""
    import fcntl
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            raw = fcntl.ioctl(s.fileno(), 0x8927, struct.pack("256s", name.encode()[:15]))
        except OSError:
            return None
    return raw[18:24]  # SIOCGIFHWADDR: ifr_hwaddr.sa_data


def _u32(v: int) -> bytes:
    return struct.pack("<I", v)


def socket_ifindex(name: str | None) -> int:
    """ifindex of `name` in the current namespace."""
    import socket

    if not name:
        raise RuntimeError_("no interface given")
    try:
        return socket.if_nametoindex(name)
    except OSError:
        raise RuntimeError_(f"no interface {name!r} in this network namespace") from None
