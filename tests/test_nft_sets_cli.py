"""End to end: an nftables JSON ruleset with named sets restored by the CLI into a namespace,
then `bpfilter set` changing those sets in place, verdicts read from real traffic."""

from __future__ import annotations

import json

import pytest
from test_cli import _hook_args, bpfilter, delivered

pytestmark = pytest.mark.kernel


def _ruleset(sender: str) -> str:
    """`nft -j list ruleset` of an inet table with an address set, a port set and a
    concatenated set, each looked up by one drop rule."""
    def rule(handle: int, match: dict) -> dict:
        return {"rule": {"family": "inet", "table": "t", "chain": "input", "handle": handle,
                         "expr": [{"match": match}, {"counter": {"packets": 0, "bytes": 0}},
                                  {"drop": None}]}}

    def lookup(left: dict, name: str) -> dict:
        return {"op": "==", "left": left, "right": f"@{name}"}

    saddr = {"payload": {"protocol": "ip", "field": "saddr"}}
    dport = {"payload": {"protocol": "udp", "field": "dport"}}
    return json.dumps({"nftables": [
        {"metainfo": {"json_schema_version": 1}},
        {"table": {"family": "inet", "name": "t", "handle": 1}},
        {"set": {"family": "inet", "table": "t", "name": "blk", "type": "ipv4_addr",
                 "flags": ["interval"], "handle": 2,
                 "elem": [{"prefix": {"addr": "203.0.113.0", "len": 24}}]}},
        {"set": {"family": "inet", "table": "t", "name": "ports", "type": "inet_service",
                 "handle": 3, "elem": [7001]}},
        {"set": {"family": "inet", "table": "t", "name": "svc",
                 "type": ["ipv4_addr", "inet_service"], "handle": 4,
                 "elem": [{"concat": [sender, 7002]}]}},
        {"chain": {"family": "inet", "table": "t", "name": "input", "handle": 5,
                   "type": "filter", "hook": "input", "prio": 0, "policy": "accept"}},
        rule(6, lookup(saddr, "blk")),
        rule(7, lookup(dport, "ports")),
        rule(8, lookup({"concat": [saddr, dport]}, "svc")),
    ]})


@pytest.mark.parametrize("hook", ["nf"])
def test_set_add_to_an_nft_set_changes_the_next_verdict(topology, bpffs, tmp_path, hook):
    args = _hook_args(hook, topology)
    me = topology.sender.ip4
    path = tmp_path / "ruleset.json"
    path.write_text(_ruleset(me))
    bpfilter("restore", "-4", *args, str(path), bpffs=bpffs)
    ports = [7000, 7001, 7002, 7003, 7004, 7005]
    assert delivered(topology, ports) == {7000: True, 7001: False, 7002: False, 7003: True,
                                          7004: True, 7005: True}

    # The nft sets are listed like ipset ones, with their ipset types.
    listed = bpfilter("set", "list", *args, bpffs=bpffs).stdout
    assert "Name: blk\nType: hash:net" in listed and "203.0.113.0/24" in listed
    assert "Name: ports\nType: bitmap:port" in listed
    assert f"{me},udp:7002" in listed and f"{me},tcp:7002" in listed

    # Each change applies from the next packet on, without a reload.
    bpfilter("set", "add", *args, "ports", "7003", bpffs=bpffs)
    assert delivered(topology, [7003]) == {7003: False}
    bpfilter("set", "add", *args, "svc", f"{me},udp:7004", bpffs=bpffs)
    assert delivered(topology, [7004, 7005]) == {7004: False, 7005: True}
    bpfilter("set", "del", *args, "ports", "7001", bpffs=bpffs)
    assert delivered(topology, [7001]) == {7001: True}
    bpfilter("set", "add", *args, "blk", f"{me}/32", bpffs=bpffs)
    assert delivered(topology, [7000, 7005]) == {7000: False, 7005: False}
    bpfilter("set", "del", *args, "blk", f"{me}/32", bpffs=bpffs)
    assert delivered(topology, [7000]) == {7000: True}

    # The counters of the nft rules moved with the drops (save re-reads the loaded ruleset,
    # whose set matches resolve against the pinned sets).
    saved = bpfilter("save", "-c", *args, bpffs=bpffs).stdout
    assert "-m set --match-set ports dst -j DROP" in saved
    assert "[2:58] -A INPUT -m set --match-set blk src -j DROP" in saved, saved

    # A restore of the listing states each set whole, as `nft -f` would load it: the member
    # added at run time goes, and the listing's members are back.
    bpfilter("restore", "-4", *args, str(path), bpffs=bpffs)
    assert delivered(topology, [7001, 7003, 7004]) == {7001: False, 7003: True, 7004: True}
