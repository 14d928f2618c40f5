"""The kernel's connection tracking, as rulesets on the netfilter hook use it.

Programs at the netfilter hooks read the conntrack entry netfilter attached to the packet, so
states are netfilter's own. The kernel tracks connections in a namespace only while something
needs it; a loaded ruleset that matches on conntrack keeps it on with a dormant nftables rule
(`table inet pybpfilter_conntrack`: a regular chain no packet traverses, holding `ct state`),
which registers the conntrack hooks and costs nothing per packet. `flush` removes it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
import subprocess

from .. import netns

TABLE = "pybpfilter_conntrack"
_ENABLE = f"""\
add table inet {TABLE}
add chain inet {TABLE} keep
flush chain inet {TABLE} keep
add rule inet {TABLE} keep ct state new comment "keeps conntrack on for pybpfilter"
"""


class ConntrackError(RuntimeError):
    """Conntrack could not be switched on or read."""


def _nft(netns_name: str | None, script: str, *, check: bool) -> subprocess.CompletedProcess:
    cmd = (["ip", "netns", "exec", netns_name] if netns_name else []) + ["nft", "-f", "-"]
    try:
        r = subprocess.run(cmd, input=script, capture_output=True, text=True)
    except FileNotFoundError:
        raise ConntrackError("nft is not installed (package nftables)") from None
    if check and r.returncode:
        raise ConntrackError(f"cannot enable connection tracking: {r.stderr.strip()}")
    return r


def enable(netns_name: str | None) -> None:
    """Keep the kernel's conntrack running in the namespace."""
    _nft(netns_name, _ENABLE, check=True)


def disable(netns_name: str | None) -> None:
    """Drop the dormant rule (conntrack stops unless something else needs it)."""
    _nft(netns_name, f"delete table inet {TABLE}\n", check=False)


def _proc_lines(netns_name: str | None) -> list[str]:
    ctx = netns.enter(netns_name) if netns_name else contextlib.nullcontext()
    with ctx:
        try:
            with open("/proc/thread-self/net/nf_conntrack") as f:
                return f.read().splitlines()
        except FileNotFoundError:
            return []  # conntrack not loaded: no entries


def entries(netns_name: str | None, family: str = "ipv4") -> list[str]:
    """Entries as `conntrack -L` prints them (the kernel's text without the family columns)."""
    out = []
    for line in _proc_lines(netns_name):
        parts = line.split(None, 2)
        if len(parts) == 3 and parts[0] == family:
            out.append(parts[2])
    return out


def parse_entry(text: str) -> dict:
    """One `conntrack -L` line as a dict: protocol, timeout, state, original/reply tuples, flags."""
    words = text.split()
    d: dict = {"protocol": words[0], "protonum": int(words[1]), "timeout": int(words[2])}
    rest = words[3:]
    if rest and "=" not in rest[0] and not rest[0].startswith("["):
        d["state"] = rest.pop(0)
    tuples: list[dict] = [{}, {}]
    flags: list[str] = []
    side = -1
    for w in rest:
        if w.startswith("["):
            flags.append(w.strip("[]"))
            continue
        key, _, value = w.partition("=")
        if key == "src":
            side += 1
        if side in (0, 1) and key in ("src", "dst", "sport", "dport", "type", "code", "id"):
            tuples[side][key] = int(value) if value.isdigit() else value
        else:
            d[key] = int(value) if value.isdigit() else value
    d["original"], d["reply"], d["flags"] = tuples[0], tuples[1], flags
    return d


NETLINK_NETFILTER = 12
NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_DELETE = 2
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLMSG_ERROR = 2
NFNETLINK_V0 = 0


def flush(netns_name: str | None) -> int:
    """Delete every conntrack entry of the namespace; returns how many there were.

    A ctnetlink delete without attributes flushes the table. The netlink socket is opened while
    this thread is inside the namespace, so it can only ever act there.
    """
    before = len(entries(netns_name, "ipv4")) + len(entries(netns_name, "ipv6"))
    ctx = netns.enter(netns_name) if netns_name else contextlib.nullcontext()
    with ctx:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    with sock:
        # nlmsghdr + nfgenmsg {family AF_UNSPEC, version, res_id}
        msg_type = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE
        body = struct.pack("<BBH", socket.AF_UNSPEC, NFNETLINK_V0, 0)
        hdr = struct.pack("<IHHII", 16 + len(body), msg_type, NLM_F_REQUEST | NLM_F_ACK, 1, 0)
        sock.send(hdr + body)
        reply = sock.recv(4096)
        _, kind, _, _, _ = struct.unpack_from("<IHHII", reply)
        if kind == NLMSG_ERROR:
            err = -struct.unpack_from("<i", reply, 16)[0]
            if err and err != errno.ENOENT:
                raise ConntrackError(f"conntrack flush: {os.strerror(err)}")
    return before
