"""An nft ruleset restored through the CLI: its `log` statements reach `bpfilter monitor`, and
`save` shows the translation with its counters."""

from __future__ import annotations

import json
import time

from test_cli import _hook_args, bpfilter, delivered
from test_logging import start_monitor


def ruleset() -> str:
    """What `nft -j list ruleset` prints for a small inet table with two log statements."""
    def rule(handle: int, *expr: dict) -> dict:
        return {"rule": {"family": "inet", "table": "filter", "chain": "input",
                         "handle": handle, "expr": list(expr)}}

    def dport(port: int) -> dict:
        return {"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}},
                          "right": port}}

    return json.dumps({"nftables": [
        {"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
        {"table": {"family": "inet", "name": "filter", "handle": 1}},
        {"chain": {"family": "inet", "table": "filter", "name": "input", "handle": 1,
                   "type": "filter", "hook": "input", "prio": 0, "policy": "accept"}},
        rule(4, dport(7001), {"log": {"prefix": "nft-drop: ", "level": "info"}},
             {"counter": {"packets": 0, "bytes": 0}}, {"drop": None}),
        rule(5, dport(7002), {"log": {"prefix": "seen", "group": 5}}),
    ]}, indent=1)


def test_monitor_shows_nft_log_statements(topology, bpffs, tmp_path):
    path = tmp_path / "ruleset.json"
    path.write_text(ruleset())
    args = _hook_args("nf", topology)
    bpfilter("restore", *args, str(path), bpffs=bpffs)  # JSON is detected
    mon = start_monitor(bpffs, args, 2)
    time.sleep(0.8)  # let the monitor map the ring buffer
    assert delivered(topology, [7000, 7001, 7002]) == {7000: True, 7001: False, 7002: True}
    out, err = mon.communicate(timeout=15)
    events = [json.loads(x) for x in out.splitlines()]
    assert len(events) == 2, err
    drop = next(e for e in events if e["target"] == "LOG")
    assert drop["prefix"] == "nft-drop: " and drop["level"] == 6 and drop["dport"] == 7001
    assert (drop["chain"], drop["rule"], drop["table"]) == ("INPUT.4", 1, "filter")
    nflog = next(e for e in events if e["target"] == "NFLOG")
    assert nflog["prefix"] == "seen" and nflog["group"] == 5 and nflog["dport"] == 7002

    # The nft rule's packets are counted once, by the rule holding its matches.
    saved = bpfilter("save", "-c", *args, bpffs=bpffs).stdout
    assert "[1:29] -A INPUT -p udp -m udp --dport 7001 -j INPUT.4" in saved
    assert '[1:29] -A INPUT.4 -j LOG --log-prefix "nft-drop: " --log-level 6' in saved
    assert "[1:29] -A INPUT.4 -j DROP" in saved


def test_restore_format_option_and_refusal(topology, bpffs, tmp_path):
    path = tmp_path / "ruleset.txt"
    path.write_text(ruleset())
    args = _hook_args("nf", topology)
    bpfilter("restore", "--format", "nft", "-6", *args, str(path), bpffs=bpffs)
    assert "INPUT.4" in bpfilter("save", "-6", *args, bpffs=bpffs).stdout
    # Out of scope: refused by name, and what is loaded stays.
    bad = json.loads(ruleset())
    bad["nftables"][3]["rule"]["expr"][0]["match"]["left"] = {"fib": {"result": "oif",
                                                                      "flags": ["daddr"]}}
    path.write_text(json.dumps(bad))
    r = bpfilter("restore", "-6", *args, str(path), bpffs=bpffs, check=False)
    assert r.returncode == 1
    assert f"{path}: nftables[3] rule 1 of chain inet filter input (handle 4), expression 1: " \
           "'fib' expressions are not supported" in r.stderr
    assert "INPUT.4" in bpfilter("save", "-6", *args, bpffs=bpffs).stdout


def test_check_reads_nft_json(tmp_path, bpffs):
    """`bpfilter check` runs an nft ruleset's packets through the compiled program too."""
    from helpers.packets import build
    from scapy.layers.inet import UDP

    from bpfilter.cli.pcap import write_pcap

    path = tmp_path / "ruleset.json"
    path.write_text(ruleset())
    pcap = tmp_path / "in.pcap"
    write_pcap(str(pcap), [build(UDP(dport=p), "192.0.2.1", "198.51.100.1")
                           for p in (7000, 7001, 7002)])
    r = bpfilter("check", "--json", "--iif", "eth0", "--pcap", str(pcap), str(path),
                 bpffs=bpffs)
    got = [(e["verdict"], e["chain"], e["rule"]) for e in map(json.loads, r.stdout.splitlines())]
    assert got == [("ACCEPT", "INPUT", None), ("DROP", "INPUT.4", 2), ("ACCEPT", "INPUT", None)]
