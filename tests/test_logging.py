"""LOG and NFLOG: events reach `bpfilter monitor` from real traffic, on every hook."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from test_cli import _hook_args, bpfilter, delivered

RULES = """\
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:LOGDROP - [0:0]
-A INPUT -p udp --dport 7001 -j LOGDROP
-A INPUT -p udp --dport 7002 -j NFLOG --nflog-group 5 --nflog-prefix "seen"
-A LOGDROP -j LOG --log-prefix "dropped: " --log-level 6
-A LOGDROP -j DROP
COMMIT
"""


def start_monitor(bpffs: str, args: list[str], count: int) -> subprocess.Popen:
    env = dict(os.environ, BPFILTER_BPFFS=os.path.join(bpffs, "pybpfilter"))
    return subprocess.Popen(
        [sys.executable, "-m", "bpfilter.cli.main", "monitor", "--json", "--count", str(count),
         "--duration", "10", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env)


@pytest.mark.parametrize("hook", ["nf", "tc", "xdp"])
def test_monitor_shows_log_events(topology, bpffs, tmp_path, hook):
    rules = tmp_path / "log.v4"
    rules.write_text(RULES)
    args = _hook_args(hook, topology)
    bpfilter("restore", *args, str(rules), bpffs=bpffs)
    mon = start_monitor(bpffs, args, 2)
    time.sleep(0.8)  # let the monitor map the ring buffer (events are kept anyway)
    assert delivered(topology, [7000, 7001, 7002]) == {7000: True, 7001: False, 7002: True}
    out, err = mon.communicate(timeout=15)
    events = [json.loads(x) for x in out.splitlines()]
    assert len(events) == 2, err
    drop = next(e for e in events if e["target"] == "LOG")
    assert drop["prefix"] == "dropped: " and drop["level"] == 6
    assert (drop["chain"], drop["rule"], drop["table"]) == ("LOGDROP", 1, "filter")
    assert drop["src"] == topology.sender.ip4 and drop["dst"] == topology.receiver.ip4
    assert drop["dport"] == 7001 and drop["proto"] == "udp" and drop["len"] == 29
    assert drop["in"] == topology.receiver.ifname and drop["out"] == ""
    nflog = next(e for e in events if e["target"] == "NFLOG")
    assert nflog["prefix"] == "seen" and nflog["group"] == 5 and nflog["dport"] == 7002


def test_monitor_lines_and_replace_keeps_the_stream(topology, bpffs, tmp_path):
    rules = tmp_path / "log.v4"
    rules.write_text(RULES)
    args = _hook_args("nf", topology)
    bpfilter("restore", *args, str(rules), bpffs=bpffs)
    env = dict(os.environ, BPFILTER_BPFFS=os.path.join(bpffs, "pybpfilter"))
    mon = subprocess.Popen(
        [sys.executable, "-m", "bpfilter.cli.main", "monitor", "--count", "2", "--duration",
         "10", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    time.sleep(0.8)
    delivered(topology, [7001])
    # A new ruleset (different prefix) keeps the same ring buffer: the monitor goes on.
    rules.write_text(RULES.replace('"dropped: "', '"second: "'))
    bpfilter("restore", *args, str(rules), bpffs=bpffs)
    delivered(topology, [7001])
    out, err = mon.communicate(timeout=15)
    lines = out.splitlines()
    assert len(lines) == 2, err
    assert 'LOG "dropped: " level 6' in lines[0] and "rule filter/LOGDROP #1" in lines[0]
    assert f"{topology.sender.ip4}:" in lines[0] and f"-> {topology.receiver.ip4}:7001 udp" \
        in lines[0]
    assert 'LOG "second: "' in lines[1]


def test_monitor_without_logging_rules(bpffs, topology):
    r = bpfilter("monitor", "--count", "1", *_hook_args("nf", topology), bpffs=bpffs,
                 check=False)
    assert r.returncode == 1 and "LOG" in r.stderr
