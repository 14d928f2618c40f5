"""End to end: a ruleset with sets restored into a namespace, real traffic, and `bpfilter set`
changing the sets in place: no program is reloaded (the program ids stay), and a restore keeps
the members added at run time unless it redefines the set."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from helpers import topology
from test_cli import _hook_args, bpfilter, delivered
from test_listing import OPTIONS, bpfilter_list, diff, xtables

from bpfilter import netns as netns_mod
from bpfilter.frontends.ipset import split_combined
from bpfilter.ir.model import Family
from bpfilter.runtime.loader import Runtime

pytestmark = pytest.mark.kernel


def _files(tmp_path, sender: str) -> tuple[str, str]:
    combined = tmp_path / "with-sets.v4"
    combined.write_text(
        "# ipset commands before the first table\n"
        "create blk hash:ip,port\n"
        f"add blk {sender},udp:7001\n"
        "create spare bitmap:port range 0-1023\n"
        "*filter\n:INPUT ACCEPT [0:0]\n"
        "-A INPUT -p udp -m set --match-set blk src,dst -j DROP\n"
        "COMMIT\n")
    rules_only = tmp_path / "rules-only.v4"
    rules_only.write_text("*filter\n:INPUT ACCEPT [0:0]\n"
                          "-A INPUT -p udp -m set --match-set blk src,dst -j DROP\n"
                          "-A INPUT -p udp --dport 7009 -j DROP\nCOMMIT\n")
    return str(combined), str(rules_only)


def _prog_ids(topo, bpffs: str, hook: str) -> dict:
    iface = topo.receiver.ifname if hook != "nf" else None
    rt = Runtime(hook, netns_name=topo.receiver.ns, iface=iface,
                 root=os.path.join(bpffs, "pybpfilter"))
    return {k: v["prog_id"] for k, v in rt.program_stats(Family.IPV4).items()}


@pytest.mark.parametrize("hook", ["nf", "tc", "xdp"])
def test_set_changes_apply_at_once_without_reload(topology, bpffs, tmp_path, hook):
    args = _hook_args(hook, topology)
    me = topology.sender.ip4
    combined, rules_only = _files(tmp_path, me)
    bpfilter("restore", *args, combined, bpffs=bpffs)
    assert delivered(topology, [7000, 7001, 7002]) == {7000: True, 7001: False, 7002: True}
    ids = _prog_ids(topology, bpffs, hook)
    assert ids

    bpfilter("set", "del", *args, "blk", f"{me},udp:7001", bpffs=bpffs)
    assert delivered(topology, [7001]) == {7001: True}
    bpfilter("set", "add", *args, "blk", f"{me},udp:7002-7003", bpffs=bpffs)
    assert delivered(topology, [7001, 7002, 7003]) == {7001: True, 7002: False, 7003: False}
    assert _prog_ids(topology, bpffs, hook) == ids  # nothing was reloaded

    listed = bpfilter("set", "list", *args, "blk", bpffs=bpffs).stdout
    assert listed.splitlines()[:2] == ["Name: blk", "Type: hash:ip,port"]
    assert listed.splitlines()[-2:] == [f"{me},udp:7002", f"{me},udp:7003"]
    assert "References: 1" in listed
    r = bpfilter("set", "add", *args, "blk", f"{me},udp:7002", bpffs=bpffs, check=False)
    assert r.returncode == 1 and "already added" in r.stderr
    bpfilter("set", "add", *args, "--exist", "blk", f"{me},udp:7002", bpffs=bpffs)
    assert bpfilter("set", "test", *args, "blk", f"{me},udp:7003", bpffs=bpffs).returncode == 0
    r = bpfilter("set", "test", *args, "blk", f"{me},udp:7001", bpffs=bpffs, check=False)
    assert r.returncode == 1 and "is NOT in set blk" in r.stdout

    # A restore without set definitions uses (and keeps) the loaded sets and their members.
    bpfilter("restore", *args, rules_only, bpffs=bpffs)
    assert delivered(topology, [7001, 7002, 7009]) == {7001: True, 7002: False, 7009: False}
    # Restoring the sets unchanged adds the file's members to those added at run time.
    bpfilter("restore", *args, combined, bpffs=bpffs)
    assert delivered(topology, [7001, 7002]) == {7001: False, 7002: False}
    saved = bpfilter("set", "save", *args, bpffs=bpffs).stdout
    assert saved == (f"create blk hash:ip,port family inet hashsize 1024 maxelem 65536\n"
                     f"add blk {me},udp:7001\nadd blk {me},udp:7002\nadd blk {me},udp:7003\n"
                     "create spare bitmap:port range 0-1023\n")
    # iptables-save never prints sets: `save` prints the rules only.
    assert "create" not in bpfilter("save", *args, bpffs=bpffs).stdout

    # A set redefined by a restore starts over with the file's members.
    redefined = tmp_path / "redefined.v4"
    redefined.write_text(Path(combined).read_text().replace(
        "create blk hash:ip,port\n", "create blk hash:ip,port maxelem 1000\n"))
    bpfilter("restore", *args, str(redefined), bpffs=bpffs)
    assert delivered(topology, [7001, 7002]) == {7001: False, 7002: True}

    # Sets are pinned under the hook's directory; flush removes them with everything else.
    bpfilter("flush", *args, bpffs=bpffs)
    assert delivered(topology, [7001]) == {7001: True}
    r = bpfilter("set", "list", *args, bpffs=bpffs, check=False)
    assert r.returncode == 1


def test_restore_errors_name_the_set_file(topology, bpffs, tmp_path):
    args = _hook_args("nf", topology)
    sets = tmp_path / "sets.txt"
    sets.write_text("create blk hash:ip\nadd blk 10.0.0.0/33\n")
    rules = tmp_path / "r.v4"
    rules.write_text("*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -m set --match-set blk src "
                     "-j DROP\nCOMMIT\n")
    r = bpfilter("restore", *args, "--sets", str(sets), str(rules), bpffs=bpffs, check=False)
    assert r.returncode == 1 and "sets.txt:2" in r.stderr and "10.0.0.0/33" in r.stderr
    r = bpfilter("restore", *args, str(rules), bpffs=bpffs, check=False)
    assert r.returncode == 1 and "r.v4:3" in r.stderr and "Set blk doesn't exist" in r.stderr
    sets.write_text("create blk hash:ip\nadd blk 10.0.0.1\n")
    bpfilter("restore", *args, "--sets", str(sets), str(rules), bpffs=bpffs)
    out = bpfilter("list", "-n", *args, bpffs=bpffs).stdout
    assert "match-set blk src" in out
    assert "add blk 10.0.0.1" in bpfilter("set", "save", *args, bpffs=bpffs).stdout


LISTED = """\
create blk hash:ip{fam}
add blk {a}
create nets hash:net{fam}
create svc hash:ip,port{fam}
create ports bitmap:port range 0-1023
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
[7:700] -A INPUT -m set --match-set blk src -j DROP
[5:500] -A INPUT -m set ! --match-set nets dst,src --return-nomatch ! --update-counters \
--packets-gt 5 -j ACCEPT
-A INPUT -p udp -m set --match-set svc dst,dst ! --bytes-eq 3 ! --update-subcounters
-A INPUT -m set --match-set ports src --packets-lt 2 --bytes-gt 7 -m set --match-set blk dst
COMMIT
"""


@pytest.mark.parametrize("family", [Family.IPV4, Family.IPV6], ids=["ipv4", "ipv6"])
def test_list_is_iptables_list(family, netns, bpffs, tmp_path):
    """`bpfilter list` prints set matches as iptables-legacy -L does, for every option."""
    for tool in ("iptables-legacy-restore", "ipset"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool} to compare with")
    v6 = family is Family.IPV6
    text = LISTED.format(fam=" family inet6" if v6 else "", a="2001:db8::1" if v6 else "192.0.2.1")
    rules = tmp_path / "rules"
    rules.write_text(text)
    root = os.path.join(bpffs, "pybpfilter")
    bpfilter("restore", "-c", *(["-6"] if v6 else []), "--netns", netns, str(rules),
             bpffs=bpffs)
    legacy = topology.create_netns()
    try:
        set_text, rule_text = split_combined(text)
        netns_mod.run(legacy, ["ipset", "restore"], input=set_text)
        xtables(legacy, family, "-c", stdin=rule_text, suffix="-restore")
        for opts in OPTIONS:
            want = xtables(legacy, family, "-L", "INPUT", *opts)
            got = bpfilter_list(root, netns, family, *opts, "INPUT")
            assert got == want, f"list {' '.join(opts)}:\n{diff(want, got)}"
    finally:
        topology.delete_netns(legacy)
