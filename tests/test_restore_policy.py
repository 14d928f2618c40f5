"""`restore` keeps the loaded policy of a built-in chain the text does not declare, as
iptables-restore does (it flushes the table's rules; only `:CHAIN POLICY` lines and `-P` set
policies)."""

from __future__ import annotations

from test_cli import bpfilter

FIRST = "*filter\n:INPUT DROP [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"


def _policies(out: str) -> dict[str, str]:
    return {w[0][1:]: w[1] for w in (t.split() for t in out.splitlines() if t.startswith(":"))}


def test_undeclared_chains_keep_their_policy(netns, bpffs, tmp_path):
    """INPUT and FORWARD stay DROP when the next restore leaves them out; a declared or -P
    policy wins."""
    first = tmp_path / "first.v4"
    first.write_text(FIRST)
    bpfilter("restore", "--netns", netns, str(first), bpffs=bpffs)
    try:
        second = tmp_path / "second.v4"
        second.write_text("*filter\n:OUTPUT DROP [0:0]\n-A INPUT -p tcp --dport 22 -j ACCEPT\n"
                          "COMMIT\n")
        bpfilter("restore", "--netns", netns, str(second), bpffs=bpffs)
        out = bpfilter("save", "--netns", netns, bpffs=bpffs).stdout
        assert _policies(out) == {"INPUT": "DROP", "FORWARD": "DROP", "OUTPUT": "DROP"}, out
        assert "-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT" in out
        third = tmp_path / "third.v4"
        third.write_text("*filter\n-P FORWARD ACCEPT\nCOMMIT\n")
        bpfilter("restore", "--netns", netns, str(third), bpffs=bpffs)
        out = bpfilter("save", "--netns", netns, bpffs=bpffs).stdout
        assert _policies(out) == {"INPUT": "DROP", "FORWARD": "ACCEPT", "OUTPUT": "DROP"}, out
        assert "-A INPUT" not in out
    finally:
        bpfilter("flush", "--netns", netns, bpffs=bpffs)
