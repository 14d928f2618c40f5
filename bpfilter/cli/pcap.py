"""A minimal reader of classic pcap files (Ethernet link type), for `bpfilter check`."""

from __future__ import annotations

import struct

LINKTYPE_ETHERNET = 1
_MAGIC = {0xA1B2C3D4: "<", 0xA1B23C4D: "<", 0xD4C3B2A1: ">", 0x4D3CB2A1: ">"}


class PcapError(ValueError):
    """The file is not a readable pcap of Ethernet frames."""


def read_pcap(path: str) -> list[bytes]:
    """Every captured frame of a pcap file, in order."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise PcapError(f"cannot read {path}: {e.strerror}") from None
    if len(data) < 24:
        raise PcapError(f"{path}: too short for a pcap file")
    magic = struct.unpack("<I", data[:4])[0]
    if magic == 0x0A0D0D0A:
        raise PcapError(f"{path}: pcapng is not supported; convert with "
                        "`tcpdump -r FILE -w OUT.pcap` or `editcap -F pcap`")
    if magic not in _MAGIC:
        raise PcapError(f"{path}: not a pcap file (magic 0x{magic:08x})")
    e = _MAGIC[magic]
    linktype = struct.unpack(e + "I", data[20:24])[0]
    if linktype != LINKTYPE_ETHERNET:
        raise PcapError(f"{path}: link type {linktype}, only Ethernet (1) is supported")
    frames = []
    pos = 24
    while pos + 16 <= len(data):
        _, _, incl, _ = struct.unpack(e + "IIII", data[pos : pos + 16])
        pos += 16
        if pos + incl > len(data):
            raise PcapError(f"{path}: truncated record {len(frames) + 1}")
        frames.append(data[pos : pos + incl])
        pos += incl
    return frames


def write_pcap(path: str, frames: list[bytes]) -> None:
    """Write Ethernet frames as a pcap file (used by tests and the demo)."""
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, LINKTYPE_ETHERNET))
        for fr in frames:
            f.write(struct.pack("<IIII", 0, 0, len(fr), len(fr)))
            f.write(fr)
