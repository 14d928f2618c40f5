"""The bpf layer against the running kernel: maps, test runs, helpers, calls, pins, info, errors."""

from __future__ import annotations

import errno
import ipaddress
import os
import time

import pytest
from helpers.progs import count, counter_map, counting_prog

from bpfilter.bpf import insn as I
from bpfilter.bpf.asm import Assembler, Origin
from bpfilter.bpf.consts import Helper, MapType, ProgType, UpdateFlags, XdpAction
from bpfilter.bpf.insn import AluOp, JmpOp
from bpfilter.bpf.maps import Map, MapSpec, lpm_key, possible_cpus, u32
from bpfilter.bpf.prog import Prog, VerifierError
from bpfilter.bpf.syscall import BpfError

pytestmark = pytest.mark.kernel

FRAME = bytes(64)  # XDP test runs need at least an Ethernet header
# struct xdp_md: the context fields XDP programs read.
XDP_MD_DATA, XDP_MD_DATA_END = 0, 4
ETH_HLEN = 14


def load_xdp(a: Assembler, maps: dict[str, Map] | None = None, name: str = "t") -> Prog:
    """Assemble and load an XDP program whose map relocations are keyed by name."""
    src = a.assemble()
    fds = {k: m.fd for k, m in (maps or {}).items()}
    return Prog.load(ProgType.XDP, src.resolve(fds), name=name, source=src)


def emit_lookup(a: Assembler, map_key: str, key_off: int) -> None:
    """r0 = bpf_map_lookup_elem(map, fp + key_off)."""
    a.emit(I.mov64(I.R2, I.FP), I.alu64(AluOp.ADD, I.R2, key_off, reg=False))
    a.ld_map(I.R1, map_key)
    a.emit(I.call_helper(Helper.map_lookup_elem))


def return_u32_or(a: Assembler, miss: int) -> None:
    """return r0 ? *(u32 *)r0 : miss."""
    nil = a.label("miss")
    a.jump(JmpOp.JEQ, I.R0, 0, nil)
    a.emit(I.ldx(I.W, I.R0, I.R0, 0), I.exit_())
    a.place(nil)
    a.emit(I.mov64_imm(I.R0, miss), I.exit_())


# --- programs using maps, helpers and calls, run with BPF_PROG_TEST_RUN ---------------------


def test_counting_program_increments_array_slot():
    with counter_map() as m, counting_prog(ProgType.XDP, m, 3, XdpAction.PASS) as p:
        res = p.run(FRAME, repeat=25)
        assert res.retval == XdpAction.PASS
        assert res.data_out == FRAME
        assert count(m, 3) == 25
        assert [count(m, s) for s in (0, 1, 2, 4)] == [0, 0, 0, 0]


def test_hash_map_lookup_from_program():
    with Map.create(MapSpec(MapType.HASH, 4, 4, 8, name="h")) as h:
        a = Assembler()
        a.emit(I.st(I.W, I.FP, -4, 7))
        emit_lookup(a, "h", -4)
        return_u32_or(a, 1000)
        with load_xdp(a, {"h": h}) as p:
            assert p.run(FRAME).retval == 1000
            h.update(u32(7), u32(77))
            assert p.run(FRAME).retval == 77
            h.update(u32(7), u32(78), UpdateFlags.EXIST)
            assert p.run(FRAME).retval == 78
            assert h.delete(u32(7))
            assert p.run(FRAME).retval == 1000
            assert h.id in p.map_ids()


def test_percpu_array_counts_per_cpu():
    spec = MapSpec(MapType.PERCPU_ARRAY, 4, 8, 1, name="pc")
    with Map.create(spec) as m:
        a = Assembler()
        a.emit(I.st(I.W, I.FP, -4, 0))
        emit_lookup(a, "pc", -4)
        out = a.label("out")
        a.jump(JmpOp.JEQ, I.R0, 0, out)
        # This CPU's copy: no other CPU writes it, so a plain add is exact.
        a.emit(I.ldx(I.DW, I.R1, I.R0, 0), I.alu64(AluOp.ADD, I.R1, 1, reg=False),
               I.stx(I.DW, I.R0, I.R1, 0))
        a.place(out)
        a.emit(I.mov64_imm(I.R0, XdpAction.PASS), I.exit_())
        with load_xdp(a, {"pc": m}) as p:
            p.run(FRAME, repeat=40)
        values = m.lookup_percpu(u32(0))
        assert values is not None and len(values) == possible_cpus()
        assert sum(int.from_bytes(v, "little") for v in values) == 40


def test_lpm_trie_lookup_from_packet():
    """The program looks up the IPv4 address at offset 14 of the packet in an LPM trie."""
    with Map.create(MapSpec(MapType.LPM_TRIE, 8, 4, 16, name="lpm")) as lpm:
        for net, val in (("10.0.0.0/8", 8), ("10.1.0.0/16", 16), ("10.1.2.0/24", 24)):
            n = ipaddress.ip_network(net)
            lpm.update(lpm_key(n.prefixlen, n.network_address.packed), u32(val))
        a = Assembler()
        miss = a.label("miss")
        a.emit(I.ldx(I.W, I.R2, I.R1, XDP_MD_DATA), I.ldx(I.W, I.R3, I.R1, XDP_MD_DATA_END))
        a.emit(I.mov64(I.R4, I.R2), I.alu64(AluOp.ADD, I.R4, ETH_HLEN + 4, reg=False))
        a.jump(JmpOp.JGT, I.R4, I.R3, miss, reg=True)
        a.emit(I.ldx(I.W, I.R5, I.R2, ETH_HLEN), I.stx(I.W, I.FP, I.R5, -4),
               I.st(I.W, I.FP, -8, 32))
        emit_lookup(a, "lpm", -8)
        return_u32_or(a, 0)
        a.place(miss)
        a.emit(I.mov64_imm(I.R0, 999), I.exit_())
        with load_xdp(a, {"lpm": lpm}) as p:
            def run(addr: str) -> int:
                pkt = bytes(ETH_HLEN) + ipaddress.ip_address(addr).packed + bytes(46)
                return p.run(pkt).retval

            assert run("10.1.2.3") == 24
            assert run("10.1.3.3") == 16
            assert run("10.200.0.1") == 8
            assert run("11.0.0.1") == 0
            assert p.run(bytes(ETH_HLEN + 2)).retval == 999  # too short: bounds check holds
            lpm.delete(lpm_key(24, bytes([10, 1, 2, 0])))
            assert run("10.1.2.3") == 16


def test_ktime_helper_and_direct_map_value():
    with Map.create(MapSpec(MapType.ARRAY, 4, 8, 1, name="t")) as m:
        a = Assembler()
        a.emit(I.call_helper(Helper.ktime_get_ns), I.mov64(I.R6, I.R0))
        a.emit(I.call_helper(Helper.ktime_get_ns), I.mov64(I.R7, I.R0))
        a.ld_map_value(I.R1, "t", 0)
        a.emit(I.stx(I.DW, I.R1, I.R6, 0))
        ok = a.label("ok")
        a.jump(JmpOp.JGE, I.R7, I.R6, ok, reg=True)
        a.emit(I.mov64_imm(I.R0, 0), I.exit_())
        a.place(ok)
        a.emit(I.mov64_imm(I.R0, 1), I.exit_())
        with load_xdp(a, {"t": m}) as p:
            before = time.monotonic_ns()
            assert p.run(FRAME).retval == 1  # monotonic
            after = time.monotonic_ns()
        stamp = int.from_bytes(m.lookup(u32(0)), "little")
        assert before <= stamp <= after  # ktime_get_ns is CLOCK_MONOTONIC


def test_bpf_to_bpf_call():
    a = Assembler()
    sub = a.label("double")
    a.emit(I.mov64_imm(I.R1, 20))
    a.call(sub)
    a.emit(I.alu64(AluOp.ADD, I.R0, 1, reg=False), I.exit_())
    a.place(sub)
    # The callee has its own frame: use stack there too.
    a.emit(I.stx(I.DW, I.FP, I.R1, -8), I.ldx(I.DW, I.R0, I.FP, -8),
           I.alu64(AluOp.MUL, I.R0, 2, reg=False), I.exit_())
    with load_xdp(a, name="calls") as p:
        assert p.run(FRAME).retval == 41
        assert p.info().nr_jited_ksyms in (0, 2)  # 2 functions when JITed


def test_prog_array_tail_call():
    with Map.create(MapSpec(MapType.PROG_ARRAY, 4, 4, 4, name="jt")) as jt:
        a = Assembler()
        a.ld_map(I.R2, "jt")
        a.emit(I.mov64_imm(I.R3, 1), I.call_helper(Helper.tail_call))
        a.emit(I.mov64_imm(I.R0, 7), I.exit_())  # reached only if the tail call fails
        t = Assembler()
        t.emit(I.mov64_imm(I.R0, 42), I.exit_())
        with load_xdp(a, {"jt": jt}, "caller") as caller, load_xdp(t, name="callee") as callee:
            assert caller.run(FRAME).retval == 7
            jt.update(u32(1), u32(callee.fd))
            assert caller.run(FRAME).retval == 42
            # Read back from user space, a prog array slot holds the program's id.
            assert jt.lookup(u32(1)) == u32(callee.id)
            assert jt.delete(u32(1))
            assert caller.run(FRAME).retval == 7


def test_ringbuf_map_and_output():
    size = 4 * os.sysconf("SC_PAGE_SIZE")
    with Map.create(MapSpec(MapType.RINGBUF, 0, 0, size, name="rb")) as rb:
        info = rb.info()
        assert MapType(info.type) == MapType.RINGBUF
        assert info.max_entries == size
        a = Assembler()
        a.emit(I.st(I.DW, I.FP, -8, 0x1234))
        a.ld_map(I.R1, "rb")
        a.emit(I.mov64(I.R2, I.FP), I.alu64(AluOp.ADD, I.R2, -8, reg=False),
               I.mov64_imm(I.R3, 8), I.mov64_imm(I.R4, 0),
               I.call_helper(Helper.ringbuf_output), I.exit_())
        with load_xdp(a, {"rb": rb}, "rbout") as p:
            assert p.run(FRAME).retval == 0  # bpf_ringbuf_output succeeded


def test_verifier_rejection_carries_message():
    a = Assembler()
    with a.origin(Origin("-A INPUT -j BROKEN", chain="INPUT", rule=3)):
        a.emit(I.exit_())  # r0 never written
    src = a.assemble()
    with pytest.raises(VerifierError) as exc:
        Prog.load(ProgType.XDP, src.insns, name="broken", source=src)
    err = exc.value
    assert "R0 !read_ok" in err.log
    assert "R0 !read_ok" in str(err)
    assert "-A INPUT -j BROKEN" in str(err)
    assert err.insn_index == 0
    assert err.errno == errno.EACCES


# --- the map API from user space -------------------------------------------------------------


def test_array_map_api():
    with Map.create(MapSpec(MapType.ARRAY, 4, 8, 4, name="arr")) as m:
        assert m.lookup(u32(0)) == bytes(8)
        assert m.lookup(u32(4)) is None
        m.update(u32(2), (5).to_bytes(8, "little"))
        assert m.lookup(u32(2)) == (5).to_bytes(8, "little")
        assert list(m.keys()) == [u32(i) for i in range(4)]
        assert m.next_key(u32(3)) is None
        with pytest.raises(BpfError) as exc:
            m.delete(u32(2))  # array elements always exist
        assert exc.value.errno == errno.EINVAL
        with pytest.raises(BpfError) as exc:
            m.update(u32(1), bytes(8), UpdateFlags.NOEXIST)
        assert exc.value.errno == errno.EEXIST
        m.clear()
        assert m.lookup(u32(2)) == bytes(8)
        with pytest.raises(ValueError):
            m.update(u32(0), bytes(4))


def test_hash_map_api():
    with Map.create(MapSpec(MapType.HASH, 4, 8, 4, name="hash")) as m:
        assert m.next_key(None) is None
        for k in range(4):
            m.update(u32(k), (k * 10).to_bytes(8, "little"), UpdateFlags.NOEXIST)
        with pytest.raises(BpfError) as exc:
            m.update(u32(9), bytes(8))
        assert exc.value.errno == errno.E2BIG  # full
        with pytest.raises(BpfError) as exc:
            m.update(u32(1), bytes(8), UpdateFlags.NOEXIST)
        assert exc.value.errno == errno.EEXIST
        with pytest.raises(BpfError) as exc:
            m.update(u32(8), bytes(8), UpdateFlags.EXIST)
        assert exc.value.errno == errno.ENOENT
        assert sorted(m.keys()) == [u32(k) for k in range(4)]
        assert dict(m.items())[u32(3)] == (30).to_bytes(8, "little")
        first = m.next_key(None)
        assert m.next_key(first) in {u32(k) for k in range(4)} - {first}
        assert m.delete(u32(2)) is True
        assert m.delete(u32(2)) is False
        assert m.lookup(u32(2)) is None
        m.clear()
        assert list(m.keys()) == []


def test_batch_operations_on_hash_and_array():
    with Map.create(MapSpec(MapType.HASH, 4, 8, 128, name="bh")) as h:
        pairs = [(u32(k), (k * k).to_bytes(8, "little")) for k in range(100)]
        assert h.update_batch(pairs) == 100
        assert dict(h.lookup_batch(chunk=7)) == dict(pairs)
        assert h.delete_batch([u32(k) for k in range(0, 100, 2)]) == 50
        assert sorted(h.keys()) == sorted(u32(k) for k in range(1, 100, 2))
        assert dict(h.lookup_batch()) == dict(pairs[1::2])
    with Map.create(MapSpec(MapType.ARRAY, 4, 4, 10, name="ba")) as arr:
        assert arr.update_batch([(u32(i), u32(100 + i)) for i in range(10)]) == 10
        assert arr.lookup_batch(chunk=3) == [(u32(i), u32(100 + i)) for i in range(10)]


@pytest.mark.parametrize("map_type", [MapType.PERCPU_ARRAY, MapType.PERCPU_HASH])
def test_percpu_values(map_type):
    ncpu = possible_cpus()
    with Map.create(MapSpec(map_type, 4, 4, 4, name="pcpu")) as m:
        # Values are 8-byte aligned per CPU: a 4-byte value takes 8 bytes in the buffer.
        per_cpu = b"".join((c + 1).to_bytes(4, "little") + bytes(4) for c in range(ncpu))
        m.update(u32(1), per_cpu)
        assert m.lookup_percpu(u32(1)) == [(c + 1).to_bytes(4, "little") for c in range(ncpu)]
        m.update(u32(2), u32(9))  # one value: the same on every CPU
        assert m.lookup_percpu(u32(2)) == [u32(9)] * ncpu
        if map_type == MapType.PERCPU_HASH:
            got = dict(m.lookup_batch())
            assert set(got) == {u32(1), u32(2)}
            assert got[u32(1)] == per_cpu


def test_lpm_longest_prefix_from_user_space():
    with Map.create(MapSpec(MapType.LPM_TRIE, 4 + 16, 4, 32, name="lpm6")) as m:
        for net, val in (("2001:db8::/32", 32), ("2001:db8:1::/48", 48), ("::/0", 1)):
            n = ipaddress.ip_network(net)
            m.update(lpm_key(n.prefixlen, n.network_address.packed), u32(val))

        def best(addr: str) -> int:
            v = m.lookup(lpm_key(128, ipaddress.ip_address(addr).packed))
            return int.from_bytes(v, "little") if v else -1

        assert best("2001:db8:1::5") == 48
        assert best("2001:db8:2::5") == 32
        assert best("fe80::1") == 1
        assert len(list(m.keys())) == 3
        m.delete(lpm_key(0, bytes(16)))
        assert best("fe80::1") == -1


# --- pins and object info ----------------------------------------------------------------------


def test_pin_and_get_in_private_bpffs(bpffs):
    m = Map.create(MapSpec(MapType.HASH, 4, 4, 4, name="pinned"))
    m.update(u32(1), u32(11))
    map_id = m.id
    m.pin(os.path.join(bpffs, "m"))
    m.close()  # the pin keeps the map alive
    with Map.open_pinned(os.path.join(bpffs, "m")) as again:
        assert again.id == map_id
        assert again.spec.name == "pinned" and again.spec.type == MapType.HASH
        assert again.lookup(u32(1)) == u32(11)
    with counter_map() as cm, counting_prog(ProgType.XDP, cm, 0, XdpAction.PASS) as p:
        os.makedirs(os.path.join(bpffs, "sub"))
        p.pin(os.path.join(bpffs, "sub", "prog"))
        with Prog.open_pinned(os.path.join(bpffs, "sub", "prog")) as q:
            assert q.id == p.id and q.name == "count0" and q.prog_type == ProgType.XDP
            assert q.run(FRAME).retval == XdpAction.PASS
        assert count(cm, 0) == 1
    os.unlink(os.path.join(bpffs, "m"))
    with pytest.raises(BpfError) as exc:
        Map.from_id(map_id)  # unpinned and unreferenced: gone
    assert exc.value.errno == errno.ENOENT


def test_object_info_by_fd_and_id():
    with counter_map("infomap") as m, counting_prog(ProgType.XDP, m, 1, XdpAction.PASS) as p:
        info = p.info()
        assert ProgType(info.type) == ProgType.XDP
        assert info.name == b"count1"
        assert p.stats.insns_processed > 0
        with Prog.from_id(info.id) as q:
            assert q.id == info.id and q.name == "count1"
            assert [x.pack() for x in q.xlated()] == [x.pack() for x in p.xlated()]
        assert p.map_ids() == [m.id]
        with Map.from_id(m.id) as m2:
            assert m2.spec == MapSpec(MapType.ARRAY, 4, 8, 8, name="infomap")
            m2.update(u32(5), (3).to_bytes(8, "little"))
        assert count(m, 5) == 3
