"""`bpfilter list` prints what `iptables -L` prints, byte for byte.

Each ruleset, counters included, is loaded twice: into iptables-legacy in a namespace of its own
(`iptables-legacy-restore -c`), and into our code, then both listings are compared for all 16
combinations of -v, -x, -n and --line-numbers, and for single chains. Rulesets the compiler can
lower go through `bpfilter restore -c` and `bpfilter list` on a private bpffs; the others (every
remaining match and target) through the parser and `listing.list_table`. Nothing sends a packet
in these namespaces, so the counters stay as loaded.

Without -n both sides name things from the same /etc/services, /etc/protocols, /etc/hosts,
/etc/networks and user database. The addresses are documentation ones, which have no reverse
name; iptables would also ask DNS for them, which fails inside a test namespace (no route), and
we never ask it. 127.0.0.1 and 169.254.0.0/16 are there for the /etc/hosts and /etc/networks
names.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import shutil
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator

import pytest
from helpers import topology

from bpfilter import netns
from bpfilter.cli import listing
from bpfilter.cli.main import main
from bpfilter.frontends.iptables.parser import parse
from bpfilter.ir.model import GOTO, JUMP, Family
from bpfilter.matches import REGISTRY

V4, V6 = Family.IPV4, Family.IPV6
TOOLS = {V4: "iptables-legacy", V6: "ip6tables-legacy"}

# Only what the compiler lowers on the netfilter hooks; counters across the K/M/G/T steps.
LOWERED = {V4: """\
*filter
:INPUT DROP [123456789:98765432100]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [99999:100000]
:zeta - [0:0]
:ALPHA - [0:0]
[1:2] -A INPUT -i lo -j ACCEPT
[99999:100000] -A INPUT -s 192.0.2.1 -d 198.51.100.0/24 -p tcp -m tcp --sport 1024:65535 \
--dport 22 -j ACCEPT
[100000:99999499] -A INPUT ! -s 203.0.113.0/255.255.0.255 -p udp -m udp ! --dport 53 -j DROP
[9999499:9999500] -A INPUT -p icmp -m icmp --icmp-type 8 -m length --length 0:1000 -j ACCEPT
[9999500000:9999499999999] -A INPUT -p tcp -m multiport --dports 80,443,8000:8080 \
-m comment --comment "web ports" -j ALPHA
[18446744073709551615:1234567890123456] -A INPUT -m iprange --src-range 192.0.2.10-192.0.2.20 \
-m ttl --ttl-gt 5 -g zeta
-A INPUT -m pkttype --pkt-type broadcast -m mark --mark 0x1/0xff -j RETURN
-A INPUT -m mac --mac-source 02:00:00:aa:bb:cc -j DROP
[3:4] -A INPUT ! -i veth+ -p tcp -m tcp --tcp-flags SYN,RST SYN -j ACCEPT
-A INPUT -s 127.0.0.1 -d 169.254.0.0/16 -f
-A INPUT ! -f -p 47
-A FORWARD ! -p tcp -s 192.0.2.0/25 -o eth0
-A FORWARD -o eth0 -j zeta
-A OUTPUT -p icmp -m icmp ! --icmp-type 3/4 -d 192.0.2.77 -j zeta
-A zeta -j RETURN
-A ALPHA -m tcp -p tcp --syn -j ACCEPT
-A ALPHA -p udp -m multiport ! --sports 53,123 -j DROP
COMMIT
""", V6: """\
*filter
:INPUT ACCEPT [5:600]
:FORWARD DROP [100000:100000000000]
:OUTPUT ACCEPT [0:0]
:chain-b - [0:0]
:Chain-A - [0:0]
[7:8] -A INPUT -s 2001:db8::1 -d 2001:db8:1::/48 -p tcp -m tcp --dport 22 -j ACCEPT
[123456:7654321] -A INPUT ! -s 2001:db8::/ffff:ffff::ff -p udp -m udp --sport 53 \
--dport 1000:2000 -j DROP
[99999:99999] -A INPUT -s ::/64 -p ipv6-icmp -m icmp6 --icmpv6-type 128 -j ACCEPT
[1000000000000:999999999999999] -A INPUT -p ipv6-icmp -m icmp6 ! --icmpv6-type 1/3 \
-m hl --hl-lt 64 -j Chain-A
-A INPUT -p tcp -m multiport --sports 80,443 -m length ! --length 1280:65535 -g chain-b
-A INPUT -m iprange --dst-range 2001:db8::10-2001:db8::20 -m comment --comment "v6 range" -j RETURN
-A INPUT -i veth0 -m mac ! --mac-source 02:00:00:00:00:01 -m pkttype ! --pkt-type multicast
-A INPUT ! -d 2001:db8::2 -m mark ! --mark 0x2 -m hl --hl-eq 1 -j DROP
-A INPUT -p all -j ACCEPT
-A FORWARD ! -o veth+ -p 132 -j chain-b
-A Chain-A -j RETURN
COMMIT
"""}

# Every other match and target, each in a table and chain it is valid in.
EVERYTHING = {V4: """\
*raw
-A PREROUTING -j NOTRACK
-A PREROUTING -j CT --notrack --helper ftp --ctevents new,related --expevents new --zone-orig 5
-A PREROUTING -m rpfilter --loose --validmark --accept-local --invert -j CT --zone mark
-A OUTPUT -j TRACE
COMMIT
*mangle
[10:20] -A PREROUTING -j TOS --set-tos 0x12/0x34
-A PREROUTING -j TOS --set-tos Minimize-Delay
-A PREROUTING -j TOS --and-tos 0x12
-A PREROUTING -m dscp ! --dscp 0x2e -m tos --tos 0x10/0x3f -j DSCP --set-dscp-class AF41
-A PREROUTING -m tos ! --tos 0x0f/0xff -j TTL --ttl-dec 1
-A PREROUTING -j CHECKSUM --checksum-fill
-A PREROUTING -m connmark ! --mark 0x5/0xff -j CONNMARK --restore-mark
-A PREROUTING -m connmark --mark 0x1 -j CONNMARK --set-xmark 0x5/0x7
-A PREROUTING -j MARK --and-mark 0x5
-A PREROUTING -j MARK --set-mark 0x7
-A FORWARD -p tcp -m tcp --tcp-flags SYN,RST SYN -j TCPMSS --clamp-mss-to-pmtu
-A FORWARD -p tcp -m tcp --tcp-flags SYN,RST SYN -j TCPMSS --set-mss 1400
-A FORWARD -j CLASSIFY --set-class 1:abc
-A POSTROUTING -j CONNMARK --save-mark --nfmask 0xff --ctmask 0xf
COMMIT
*nat
-A PREROUTING -p tcp -m tcp --dport 8080 -j DNAT --to-destination 192.0.2.1:80 --random \
--persistent
-A PREROUTING -p tcp -j REDIRECT --to-ports 3128
-A OUTPUT -p udp -j DNAT --to-destination :53
-A POSTROUTING -s 198.51.100.0/24 -p tcp -j SNAT --to-source 192.0.2.1-192.0.2.5:1024-65535 \
--random-fully
-A POSTROUTING -o eth0 -j MASQUERADE
-A POSTROUTING -p udp -j MASQUERADE --to-ports 1024-2048 --random
COMMIT
*filter
:INPUT DROP [17:2000000]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:LOGDROP - [0:0]
[5:300] -A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A INPUT -m conntrack ! --ctstate NEW --ctproto tcp ! --ctorigsrc 10.0.0.0/8 --ctorigdst \
0.0.0.0/8 --ctreplsrc 127.0.0.1 --ctrepldst 169.254.0.0/16 ! --ctorigdstport 5:10 \
--ctstatus ASSURED ! --ctexpire 5 --ctdir REPLY
-A INPUT -m state ! --state INVALID -m helper ! --helper ftp
-A INPUT -m connlimit --connlimit-above 10 --connlimit-mask 24 -j REJECT
-A INPUT -m limit --limit 3/hour --limit-burst 7 -j LOG --log-prefix "in: " --log-level info \
--log-tcp-options --log-uid
-A INPUT -m hashlimit --hashlimit-upto 5/min --hashlimit-name h1 --hashlimit-mode srcip,dstport \
--hashlimit-srcmask 24 -j ACCEPT
-A INPUT -m hashlimit ! --hashlimit-above 4kb/s --hashlimit-burst 400kb --hashlimit-name h2 \
--hashlimit-htable-expire 5000
-A INPUT -m recent --update --seconds 60 --hitcount 3 --rttl --name SSH --rdest -j DROP
-A INPUT -m statistic --mode nth --every 5 --packet 2 -m quota --quota 1000000
-A INPUT -m statistic --mode random ! --probability 0.25 -j RETURN
-A INPUT -p esp -m esp --espspi 5:10
-A INPUT -p ah -m ah ! --ahspi 7
-A INPUT -p sctp -m sctp --dport 80 ! --chunk-types any DATA:Be,INIT
-A INPUT -p tcp -m tcpmss --mss 1000:1500 -m tcp --tcp-option 2 ! --tcp-flags SYN,ACK SYN
-A INPUT -m cpu ! --cpu 1 -m physdev --physdev-in eth0 ! --physdev-is-bridged
-A INPUT -m nfacct --nfacct-name acct1
-A INPUT -m addrtype --src-type LOCAL ! --dst-type UNICAST,BROADCAST --limit-iface-in
-A INPUT -p udp -m multiport ! --ports 53,67:68 -m udp --sport 123
-A INPUT -p icmp -m icmp ! --icmp-type echo-request -m iprange ! --src-range 192.0.2.1-192.0.2.9
-A INPUT -m length --length 64 -m ttl ! --ttl-eq 1 -m pkttype --pkt-type multicast \
-m mac ! --mac-source 02:00:00:00:00:0a -m mark --mark 0x1 -m comment --comment "a \\"b\\""
-A INPUT -j NFLOG --nflog-group 3 --nflog-prefix "nf log" --nflog-threshold 2
-A INPUT -j NFQUEUE --queue-balance 2:5 --queue-bypass
-A INPUT -j AUDIT --type drop
-A INPUT -s 192.0.2.3 -g LOGDROP
-A OUTPUT -m owner --uid-owner 0 --gid-owner 0-10 --suppl-groups -j ACCEPT
-A OUTPUT -m owner ! --socket-exists -j LOGDROP
-A OUTPUT -p tcp -j REJECT --reject-with tcp-reset
-A LOGDROP -j LOG
-A LOGDROP -j DROP
COMMIT
""", V6: """\
*raw
-A PREROUTING -j NOTRACK
COMMIT
*mangle
-A PREROUTING -j HL --hl-inc 3
-A PREROUTING -m hl ! --hl-eq 5 -j HL --hl-set 64
COMMIT
*nat
-A PREROUTING -p tcp -j DNAT --to-destination [2001:db8::1]:80 --persistent
-A POSTROUTING -j SNAT --to-source 2001:db8::1-2001:db8::5
-A POSTROUTING -j MASQUERADE --random
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -m ah --ahspi 5 --ahlen 6 --ahres
-A INPUT -m ah ! --ahlen 6
-A INPUT -m rt --rt-type 0 --rt-segsleft 2:5 --rt-0-addrs ::1,2001:db8::1 --rt-0-not-strict
-A INPUT -m rt ! --rt-len 5
-A INPUT -p ipv6-icmp -m icmp6 --icmpv6-type 130 -j REJECT --reject-with icmp6-adm-prohibited
-A INPUT -p ipv6-icmp -m icmp6 --icmpv6-type 1/2:5 -j REJECT
-A INPUT -m conntrack --ctorigsrc 2001:db8::/32 ! --ctorigdst ::1 --ctreplsrc ::/0
-A INPUT -m recent --set --mask ffff:: -m connlimit --connlimit-upto 3 --connlimit-daddr
-A INPUT -m hashlimit --hashlimit-upto 1/sec --hashlimit-name a --hashlimit-srcmask 64
-A INPUT -j LOG --log-level 7 --log-macdecode --log-ip-options --log-tcp-sequence
-A INPUT -p tcp -j REJECT --reject-with tcp-reset
COMMIT
"""}

# Entries whose listing another test compares with iptables' (they need kernel objects first).
LISTED_ELSEWHERE = {"set"}  # tests/test_sets_cli.py: ipset sets in the legacy namespace

OPTIONS = [[flag for flag, on in zip(("-v", "-x", "-n", "--line-numbers"), combo, strict=True)
            if on] for combo in itertools.product((False, True), repeat=4)]

# nfnetlink accounting objects (`-m nfacct` needs one): linux/netfilter/nfnetlink_acct.h.
NETLINK_NETFILTER = 12
NFNL_SUBSYS_ACCT = 7
NFNL_MSG_ACCT_NEW = 0
NFACCT_NAME = 1
NLM_F_REQUEST, NLM_F_ACK, NLM_F_CREATE = 0x1, 0x4, 0x400
NLMSG_ERROR = 2


def create_nfacct(ns: str, name: str) -> None:
    """Create the accounting object `name` inside namespace `ns`."""
    with netns.enter(ns):
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    with sock:
        value = name.encode() + b"\0"
        attr = struct.pack("HH", 4 + len(value), NFACCT_NAME) + value
        attr += b"\0" * (-len(attr) % 4)
        body = struct.pack("BBH", socket.AF_UNSPEC, 0, 0) + attr
        kind = (NFNL_SUBSYS_ACCT << 8) | NFNL_MSG_ACCT_NEW
        flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE
        sock.send(struct.pack("IHHII", 16 + len(body), kind, flags, 1, 0) + body)
        reply = sock.recv(4096)
    msg_type = struct.unpack_from("H", reply, 4)[0]
    error = struct.unpack_from("i", reply, 16)[0]
    if msg_type != NLMSG_ERROR or error:
        raise OSError(-error, f"creating accounting object {name!r}: {os.strerror(-error)}")


def xtables(ns: str, family: Family, *args: str, stdin: str | None = None,
            suffix: str = "") -> str:
    """Run iptables-legacy (or its -restore) inside `ns`; its output."""
    r = subprocess.run(["ip", "netns", "exec", ns, TOOLS[family] + suffix, *args], input=stdin,
                       capture_output=True, text=True, check=False)
    if r.returncode:
        raise AssertionError(f"{TOOLS[family]}{suffix} {' '.join(args)}: {r.stderr}")
    return r.stdout


@pytest.fixture
def legacy_ns() -> Iterator[str]:
    """A namespace of its own for iptables-legacy's rules."""
    if shutil.which("iptables-legacy-restore") is None:
        pytest.skip("needs iptables-legacy (iptables 1.8) to compare with")
    name = topology.create_netns()
    try:
        yield name
    finally:
        topology.delete_netns(name)


def bpfilter_list(bpffs: str, ns: str, family: Family, *args: str) -> str:
    """`bpfilter list ARGS` run in this process (the test runs many), its stdout."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["list", "--bpffs", bpffs, "--netns", ns,
                   *(["-6"] if family is V6 else []), *args])
    assert rc == 0
    return out.getvalue()


def diff(want: str, got: str) -> str:
    """The differing lines, for the assertion message."""
    pairs = itertools.zip_longest(want.splitlines(), got.splitlines(), fillvalue="<none>")
    return "\n".join(f"iptables: {a!r}\nbpfilter: {b!r}" for a, b in pairs if a != b)


@pytest.mark.parametrize("family", [V4, V6], ids=["ipv4", "ipv6"])
def test_list_is_iptables_list(family, netns, legacy_ns, bpffs, tmp_path) -> None:
    """The loaded ruleset and counters list as iptables-legacy lists the same ones."""
    rules = tmp_path / "rules"
    rules.write_text(LOWERED[family])
    root = os.path.join(bpffs, "pybpfilter")
    fam = ["-6"] if family is V6 else []
    r = subprocess.run([sys.executable, "-m", "bpfilter.cli.main", "restore", "-c", *fam,
                        "--netns", netns, "--bpffs", root, str(rules)],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    xtables(legacy_ns, family, "-c", stdin=LOWERED[family], suffix="-restore")
    user = "zeta" if family is V4 else "chain-b"
    for opts, chain in itertools.product(OPTIONS, ([], ["INPUT"], [user])):
        want = xtables(legacy_ns, family, "-L", *chain, *opts)
        got = bpfilter_list(root, netns, family, *opts, *chain)
        assert got == want, f"list {' '.join(opts + chain)}:\n{diff(want, got)}"
    # The command itself, once, as a user runs it.
    r = subprocess.run([sys.executable, "-m", "bpfilter.cli.main", "list", *fam, "-v",
                        "--netns", netns, "--bpffs", root], capture_output=True, text=True,
                       check=False)
    assert r.stdout == xtables(legacy_ns, family, "-L", "-v"), r.stderr


@pytest.mark.parametrize("family", [V4, V6], ids=["ipv4", "ipv6"])
def test_every_match_and_target_lists_like_iptables(family, legacy_ns) -> None:
    """The matches and targets the compiler cannot lower yet print like iptables too."""
    create_nfacct(legacy_ns, "acct1")
    xtables(legacy_ns, family, "-c", stdin=EVERYTHING[family], suffix="-restore")
    rs = parse(EVERYTHING[family], family=family, filename="everything")
    for (name, table), opts in itertools.product(rs.tables.items(), OPTIONS):
        want = xtables(legacy_ns, family, "-t", name, "-L", *opts)
        got = listing.list_table(table, family, verbose="-v" in opts, exact="-x" in opts,
                                 numeric="-n" in opts, line_numbers="--line-numbers" in opts)
        assert got == want, f"-t {name} -L {' '.join(opts)}:\n{diff(want, got)}"
    chain = "LOGDROP" if family is V4 else "INPUT"
    want = xtables(legacy_ns, family, "-L", chain, "-v", "-n")
    got = listing.list_table(rs.tables["filter"], family, chain=chain, verbose=True, numeric=True)
    assert got == want, diff(want, got)


def test_every_entry_is_listed_by_a_test() -> None:
    """The rulesets above use every match and target: a new entry needs a line there."""
    used: set[str] = set()
    for family, text in (*LOWERED.items(), *EVERYTHING.items()):
        for table in parse(text, family=family).tables.values():
            for rule in (r for c in table.chains.values() for r in c.rules):
                used.update(REGISTRY.matches[m.kind].name for m in rule.matches)
                used.update([rule.target.kind] if rule.target is not None else [])
    matches = {e.name for e in REGISTRY.matches.values() if not e.builtin}
    targets = set(REGISTRY.targets)
    used |= LISTED_ELSEWHERE
    assert matches - used == set() and targets - used == set()
    assert {GOTO, JUMP} <= used


def test_counter_columns() -> None:
    """xtables_print_num: five digits, then K, M, G, T rounded, or exact with -x."""
    assert [listing.num(n, exact=False) for n in (0, 99999, 100000, 9999499, 9999500,
                                                   9999000000, 9999500000000, 10**19)] == [
        "    0", "99999", " 100K", "9999K", "  10M", "9999M", "  10T", "10000000T"]
    assert listing.num(123456789, exact=True) == "123456789"
    assert listing.num(1, exact=True) == "       1"
    assert listing.num(100000, exact=False, table=False) == "100K"
