"""Traffic generator: BPF_PROG_TEST_RUN with live frames on an XDP_TX program (baseline.md).

Run inside the sender's namespace with the sender veth's ifindex as the ingress interface: every
repeat transmits the frame into the veth peer. Runs until SIGTERM; pinned to one CPU.

    python bench/gen.py --netns NS --ifindex N --frame HEX [--cpu 0] [--rt] [--batch B]
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import os
import signal
import struct
import sys

from bpfilter import netns
from bpfilter.bpf import insn as I
from bpfilter.bpf.consts import Cmd, ProgType, TestRunFlags, XdpAction
from bpfilter.bpf.prog import Prog
from bpfilter.bpf.syscall import BpfError, TestRunAttr, addr, bpf

RT_PRIORITY = 10
REPEAT = 1 << 20  # one call: ~0.1 s at 10 Mpps, so SIGTERM is seen soon


def xdp_md(ifindex: int, size: int) -> bytes:
    """struct xdp_md for a live-frames run: data 0..size, ingress on `ifindex`."""
    # data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex
    return struct.pack("<6I", 0, size, 0, ifindex, 0, 0)


def _live_run(fd: int, data: bytes, ctx: bytes, repeat: int, batch: int) -> None:
    # Prog.run has no batch_size; the attr is filled here for that one field.
    din = ctypes.create_string_buffer(data, len(data))
    cin = ctypes.create_string_buffer(ctx, len(ctx))
    attr = TestRunAttr(prog_fd=fd, data_size_in=len(data), data_in=addr(din), repeat=repeat,
                       ctx_size_in=len(ctx), ctx_in=addr(cin),
                       flags=TestRunFlags.XDP_LIVE_FRAMES, batch_size=batch)
    bpf(Cmd.PROG_TEST_RUN, attr)


def main(argv: list[str] | None = None) -> int:
    """Transmit the frame as fast as the test run goes until terminated."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--netns", required=True)
    ap.add_argument("--ifindex", type=int, required=True)
    ap.add_argument("--frame", required=True, help="the frame, hex")
    ap.add_argument("--cpu", type=int, default=0)
    ap.add_argument("--rt", action="store_true", help="run as SCHED_FIFO")
    ap.add_argument("--batch", type=int, default=0, help="frames per batch (0: the kernel's 64)")
    args = ap.parse_args(argv)
    os.sched_setaffinity(0, {args.cpu})
    if args.rt:
        # Other work on the machine must not thin out the offered load between measurements.
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(RT_PRIORITY))
    stop = False

    def on_term(signum, frame) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    data = bytes.fromhex(args.frame)
    prog = Prog.load(ProgType.XDP, [I.mov64_imm(I.R0, XdpAction.TX), I.exit_()],
                     name="bench_gen")
    ctx = xdp_md(args.ifindex, len(data))
    sent = 0
    with prog, netns.enter(args.netns):
        print("ready", flush=True)
        while not stop:
            try:
                _live_run(prog.fd, data, ctx, REPEAT, args.batch)
            except BpfError as e:
                if e.errno == errno.EINTR:
                    continue
                raise
            sent += REPEAT
    print(sent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
