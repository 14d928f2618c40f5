"""The ipset front-end (`ipset save` / `ipset restore` text), the `-m set` match's parsing and
printing, and the set map key layout. The last test feeds the same text to the real `ipset`
(in a test namespace) and compares what both print back."""

from __future__ import annotations

import shutil

import pytest

from bpfilter import netns
from bpfilter.compiler.setmaps import decode, encode, layout, map_spec
from bpfilter.frontends.ipset import (
    ParseError,
    SetError,
    format_member,
    parse_create,
    parse_member,
    parse_sets,
    save_sets,
    split_combined,
)
from bpfilter.frontends.iptables import parse, parse_rule_args, rule_text, save
from bpfilter.ir.model import Family
from bpfilter.ir.sets import Dim
from bpfilter.matches import REGISTRY, Context

V4, V6 = Family.IPV4, Family.IPV6

# Real `ipset save` output (bucketsize and initval are accepted and not kept).
SAVED = """\
create a hash:ip family inet hashsize 1024 maxelem 65536 bucketsize 12 initval 0x393f344d
add a 10.0.0.3
add a 1.2.3.4
create b hash:net family inet6 hashsize 64 maxelem 1000 bucketsize 12 initval 0x748f5e71
add b 2001:db8::/32
add b 2001:db8:1::/48 nomatch
create c hash:ip,port family inet hashsize 1024 maxelem 65536 bucketsize 12 initval 0xf71f7065
add c 1.2.3.6,sctp:1
add c 1.2.3.5,icmp:fragmentation-needed
add c 1.2.3.4,tcp:80
add c 1.2.3.4,gre:0
add c 1.2.3.7,icmp:250/0
create d bitmap:port range 1000-2000
add d 1500
create e hash:net,port family inet hashsize 1024 maxelem 65536 bucketsize 12 initval 0xf5651384
add e 10.0.0.0/8,tcp:22
add e 10.1.0.0/16,tcp:22 nomatch
create f bitmap:ip range 192.168.0.0-192.168.255.255
add f 192.168.1.1
create g hash:ip,port,net family inet hashsize 1024 maxelem 65536 bucketsize 12 initval 0x86
add g 1.1.1.1,tcp:80,10.0.0.0/24
create h hash:ip family inet hashsize 1024 maxelem 65536 netmask 24 bucketsize 12 initval 0x7
add h 10.9.8.0
create j hash:ip,port family inet6 hashsize 1024 maxelem 65536 bucketsize 12 initval 0xfc1a
add j 2001:db8::1,ipv6-icmp:echo-request
create r hash:ip,port,ip family inet hashsize 1024 maxelem 65536 bucketsize 12 initval 0x28
add r 1.1.1.1,udp:53,2.2.2.2
"""


def test_ipset_save_output_parses_and_prints_back() -> None:
    sets = parse_sets(SAVED, filename="saved")
    assert [s.definition.type.name for s in sets.values()] == [
        "hash:ip", "hash:net", "hash:ip,port", "bitmap:port", "hash:net,port", "bitmap:ip",
        "hash:ip,port,net", "hash:ip", "hash:ip,port", "hash:ip,port,ip"]
    assert sets["b"].definition.family is V6 and sets["b"].definition.maxelem == 1000
    assert sets["d"].definition.family is None and sets["d"].definition.range == (1000, 2000)
    assert sets["h"].definition.netmask == 24
    text = save_sets(sets.values())
    assert "create b hash:net family inet6 hashsize 64 maxelem 1000\n" in text
    assert "add b 2001:db8:1::/48 nomatch\n" in text
    assert "add c 1.2.3.7,icmp:250/0\n" in text
    assert "create f bitmap:ip range 192.168.0.0-192.168.255.255\n" in text
    assert parse_sets(text) == sets


def _members(type_and_opts: str, member: str) -> list[str]:
    name, *words = type_and_opts.split()
    d = parse_create("x", [name, *words])
    return [format_member(d, p) for p in parse_member(d, member)]


@pytest.mark.parametrize(("create", "member", "want"), [
    ("hash:ip", "10.0.0.0/30", ["10.0.0.0", "10.0.0.1", "10.0.0.2", "10.0.0.3"]),
    ("hash:ip", "10.0.0.254-10.0.1.1", ["10.0.0.254", "10.0.0.255", "10.0.1.0", "10.0.1.1"]),
    ("hash:ip netmask 30", "10.0.0.1-10.0.0.9", ["10.0.0.0", "10.0.0.4", "10.0.0.8"]),
    ("hash:net", "10.0.0.1-10.0.0.9", ["10.0.0.1", "10.0.0.2/31", "10.0.0.4/30", "10.0.0.8/31"]),
    ("hash:net", "10.1.2.3/8", ["10.0.0.0/8"]),
    ("hash:net family inet6", "2001:db8::1/32", ["2001:db8::/32"]),
    ("hash:ip,port", "1.2.3.4,80-81", ["1.2.3.4,tcp:80", "1.2.3.4,tcp:81"]),
    ("hash:ip,port", "1.2.3.4,udp:domain", ["1.2.3.4,udp:53"]),
    ("hash:ip,port", "1.2.3.4,icmp:ping", ["1.2.3.4,icmp:echo-request"]),
    ("hash:ip,port", "1.2.3.4,icmp:echo", ["1.2.3.4,icmp:echo-reply"]),  # ipset's prefix rule
    ("hash:ip,port", "1.2.3.4,icmp:3/4", ["1.2.3.4,icmp:fragmentation-needed"]),
    ("hash:ip,port", "1.2.3.4,50:0", ["1.2.3.4,esp:0"]),
    ("hash:ip,port family inet6", "::1,icmpv6:1/3", ["::1,ipv6-icmp:address-unreachable"]),
    ("bitmap:port range 0-100", "udp:7-8", ["7", "8"]),
    ("bitmap:ip range 10.0.0.0/24 netmask 26", "10.0.0.70", ["10.0.0.64"]),
])
def test_members_expand_like_ipset(create: str, member: str, want: list[str]) -> None:
    assert sorted(_members(create, member)) == sorted(want)


@pytest.mark.parametrize(("text", "line", "token", "message"), [
    ("create x hash:mac\n", 1, "hash:mac", "not supported"),
    ("create x hash:net,net\n", 1, "hash:net,net", "LPM"),
    ("create x hash:ip timeout 300\n", 1, "timeout", "not supported"),
    ("create x hash:ip counters\n", 1, "counters", "not supported"),
    ("create x hash:ip comment\n", 1, "comment", "not supported"),
    ("create x hash:ip range 1-2\n", 1, "range", "not valid"),
    ("create x bitmap:port\n", 1, "bitmap:port", "range"),
    ("create x hash:foo\n", 1, "hash:foo", "unknown set type"),
    ("create x hash:ip\ncreate x hash:ip\n", 2, "x", "already exists"),
    ("create x hash:ip\nadd x 1.2.3.4\nadd x 1.2.3.4\n", 3, "1.2.3.4", "already added"),
    ("add y 1.2.3.4\n", 1, "y", "does not exist"),
    ("create x hash:net\nadd x 0.0.0.0/0\n", 2, "0.0.0.0/0", "prefix length"),
    ("create x hash:ip\nadd x 0.0.0.0\n", 2, "0.0.0.0", "zero address"),
    ("create x hash:ip\nadd x 1.2.3.4 nomatch\n", 2, "nomatch", "cannot be flagged"),
    ("create x hash:ip\nadd x 1.2.3.4 timeout 5\n", 2, "timeout", "not supported"),
    ("create x hash:ip,port\nadd x 1.2.3.4,icmpv6:ping\n", 2, "icmpv6:ping", "inet6 only"),
    ("create x hash:ip,port\nadd x 1.2.3.4,esp:7\n", 2, "esp:7", "pseudo port"),
    ("create x hash:ip,port\nadd x 1.2.3.4\n", 2, "1.2.3.4", "2 part"),
    ("create x bitmap:port range 10-20\nadd x 21\n", 2, "21", "outside the range"),
    ("create x hash:ip maxelem 2\nadd x 10.0.0.0/30\n", 2, "10.0.0.0/30", "more than"),
    ("create x hash:ip family inet6\nadd x 2001:db8::/64\n", 2, "2001:db8::/64", "plain"),
    ("swap a b\n", 1, "swap", "not supported"),
])
def test_errors_name_file_line_and_token(text: str, line: int, token: str,
                                         message: str) -> None:
    with pytest.raises(ParseError) as e:
        parse_sets(text, filename="sets.txt")
    assert (e.value.file, e.value.line, e.value.token) == ("sets.txt", line, token)
    assert message in e.value.message


def test_exist_mode_and_other_commands() -> None:
    text = ("create x hash:ip\nadd x 1.2.3.4\ncreate x hash:ip\nadd x 1.2.3.4\n"
            "create y hash:ip\nadd y 1.1.1.1\nflush y\nadd x 5.6.7.8\ndel x 1.2.3.4\n"
            "create z hash:ip\ndestroy z\n")
    sets = parse_sets(text, exist=True)
    assert list(sets) == ["x", "y"]
    assert [format_member(sets["x"].definition, p) for p in sets["x"].members] == ["5.6.7.8"]
    assert not sets["y"].members


def test_combined_file_keeps_line_numbers() -> None:
    text = ("# sets\ncreate s hash:ip\nadd s 192.0.2.1\n*filter\n:INPUT ACCEPT [0:0]\n"
            "-A INPUT -m set --match-set s src -j DROP\n-A INPUT -m set --match-set t src\n"
            "COMMIT\n")
    set_text, rule_text_ = split_combined(text)
    assert set_text.splitlines()[1] == "create s hash:ip" and rule_text_.splitlines()[1] == ""
    sets = parse_sets(set_text, filename="f")
    with pytest.raises(ParseError) as e:
        parse(rule_text_, family=V4, filename="f", sets=sets)
    assert (e.value.line, e.value.token) == (7, "t") and "Set t doesn't exist" in str(e.value)


SETS = parse_sets("create s hash:ip,port\ncreate n hash:net\ncreate six hash:ip family inet6\n"
                  "create p bitmap:port range 0-1023\n")


@pytest.mark.parametrize(("args", "saved", "listed"), [
    ("-m set --match-set s src,dst", None, "match-set s src,dst"),
    ("-m set --set s srcx,dstfoo", "-m set --match-set s src,dst", "match-set s src,dst"),
    ("-m set ! --match-set n dst --return-nomatch ! --update-counters --packets-gt 5",
     None, "! match-set n dst return-nomatch ! update-counters packets-gt 5"),
    ("-m set --match-set n src --update-counters ! --update-subcounters ! --bytes-eq 3",
     "-m set --match-set n src ! --update-subcounters ! --bytes-eq 3",
     "match-set n src ! update-subcounters ! bytes-eq 3"),
    ("-m set --match-set p dst --packets-lt 7 --bytes-gt 0x10",
     "-m set --match-set p dst --packets-lt 7 --bytes-gt 16",
     "match-set p dst packets-lt 7 bytes-gt 16"),
])
def test_set_match_prints_like_iptables(args: str, saved: str | None, listed: str) -> None:
    [rule] = parse_rule_args(args.split(), family=V4, sets=SETS)
    assert rule_text(rule, family=V4) == (saved or args)
    m = rule.matches[0]
    entry = REGISTRY.matches["set"]
    assert entry.describe(m.params, Context(V4), True) == listed


@pytest.mark.parametrize(("args", "message"), [
    ("-m set --match-set foo src", "Set foo doesn't exist."),
    ("-m set --match-set six src", "The protocol family of set six is IPv6"),
    ("-m set --match-set s", "requires an argument"),
    ("-m set --match-set s src,foo", "'src' or 'dst'"),
    ("-m set --match-set s src,src,src,src,src,src,src", "more src/dst options than 6"),
    ("-m set --match-set s src --match-set s dst", "only be specified once"),
    ("-m set --match-set s src ! --return-nomatch", "cannot be inverted"),
    ("-m set --match-set s src ! --packets-lt 2", "cannot be inverted"),
    ("-m set --match-set s src --bytes-eq 1 --bytes-gt 2", "only one of the --bytes"),
    ("-m set --return-nomatch", "You must specify `--match-set'"),
])
def test_set_match_errors(args: str, message: str) -> None:
    with pytest.raises(ParseError) as e:
        parse_rule_args(args.split(), family=V4, sets=SETS)
    assert message in str(e.value)


def test_ruleset_with_sets_saves_and_parses_back() -> None:
    text = ("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
            "-A INPUT -p udp -m set --match-set s src,dst -m set ! --match-set p dst -j DROP\n"
            "COMMIT\n")
    rs = parse(text, family=V4, sets=SETS)
    assert save(rs) == text
    assert parse(save(rs), family=V4, sets=SETS) == rs
    # bitmap:port has no family: ip6tables rules may use it too.
    v6 = text.replace("-m set --match-set s src,dst ", "")
    assert parse(v6, family=V6, sets=SETS).rule_count() == 1


@pytest.mark.parametrize("create", [
    "hash:ip", "hash:ip family inet6", "hash:net", "hash:net family inet6", "hash:ip,port",
    "hash:net,port family inet6", "hash:ip,port,ip", "hash:ip,port,net family inet6",
    "bitmap:ip range 10.0.0.0/16", "bitmap:port range 0-65535"])
def test_keys_round_trip_and_nets_come_last(create: str) -> None:
    name, *words = create.split()
    d = parse_create("x", [name, *words])
    lay = layout(d)
    spec = map_spec(d)
    assert spec.key_size == lay.key_size and lay.lpm == (Dim.NET in d.type.dims)
    if lay.lpm:
        net = next(p for p in lay.parts if p.dim is Dim.NET)
        assert net.offset + net.size == lay.data_size  # the prefix is the key's last part
    samples = {
        Dim.IP: (b"\x0a\0\0\x01" if d.addr_len == 4 else bytes(15) + b"\1"),
        Dim.NET: ((b"\x0a\x01\0\0" if d.addr_len == 4 else b"\x20\x01" + bytes(14)), 16),
        Dim.PORT: ((0, 80) if d.type.port_only else (17, 53)),
    }
    parts = tuple(samples[dim] for dim in d.type.dims)
    for nomatch in (False, True):
        key, value = encode(d, parts, nomatch and d.type.has_net)
        assert len(key) == lay.key_size
        assert decode(d, key, value) == (parts, nomatch and d.type.has_net)


def test_set_errors_carry_the_token() -> None:
    d = parse_create("x", ["hash:ip,port"])
    with pytest.raises(SetError) as e:
        parse_member(d, "1.2.3.4,tcp:99999")
    assert e.value.token == "99999"


@pytest.mark.kernel
def test_same_text_as_the_real_ipset(netns_name: str) -> None:
    """`ipset restore` then `ipset save` in a test namespace prints the members we print."""
    out = netns.run(netns_name, ["ipset", "restore"], input=SAVED, check=False)
    assert out.returncode == 0, out.stderr
    theirs = netns.run(netns_name, ["ipset", "save"]).stdout
    ours = save_sets(parse_sets(SAVED).values())

    def norm(text: str) -> list[str]:
        lines = []
        for line in text.splitlines():
            words = line.split()
            if words[0] == "create":  # the kernel adds bucketsize and initval
                cut = [i for i, w in enumerate(words) if w in ("bucketsize", "initval")]
                words = words[:cut[0]] if cut else words
            lines.append(" ".join(words))
        return sorted(lines)

    assert norm(ours) == norm(theirs)


@pytest.fixture
def netns_name(netns: str) -> str:
    """A test namespace, if the ipset tool is there."""
    if shutil.which("ipset") is None:
        pytest.skip("kernel test: needs ipset (scripts/setup.sh installs it)")
    return netns
