"""The iptables front-end: lexing, parsing, errors, printing, and the real-ruleset corpus."""

from __future__ import annotations

from pathlib import Path

import pytest

from bpfilter.frontends.iptables import ParseError, parse, parse_rule_args, rule_text, save
from bpfilter.frontends.iptables.lexer import tokenize
from bpfilter.frontends.iptables.saver import rule_context
from bpfilter.ir.model import GOTO, JUMP, ChainRef, Counters, Family, Target
from bpfilter.ir.pred import (
    L4,
    AllOf,
    Cmp,
    Const,
    EtherHeader,
    Field,
    Not,
    Range,
    TransportHeader,
)
from bpfilter.matches import REGISTRY, Unsupported
from bpfilter.matches.values import format_addr

V4, V6 = Family.IPV4, Family.IPV6
CORPUS = Path(__file__).resolve().parents[1] / ".." / "shared" / "corpus" / "rulesets"


def rules(text: str, family: Family = V4, table: str = "filter", chain: str = "INPUT",
          chains: tuple[str, ...] = ()):
    """Parse one rule's arguments (split as iptables-restore splits them)."""
    args = [t.text for t in tokenize(text)]
    return parse_rule_args(args, family=family, table=table, chain=chain, chains=chains)


def canon(text: str, family: Family = V4, table: str = "filter", chain: str = "INPUT",
          chains: tuple[str, ...] = ()) -> list[str]:
    """How iptables-save would print the rules of `text`."""
    return [rule_text(r, family=family, table=table, chain=chain)
            for r in rules(text, family, table, chain, chains)]


def restore(body: str, family: Family = V4, name: str = "rules.v4"):
    """Parse a filter table holding `body`."""
    return parse(f"*filter\n{body}COMMIT\n", family=family, filename=name)


def refused(text: str, family: Family = V4, name: str = "rules.v4") -> ParseError:
    """The error parsing `text` as a whole file raises."""
    with pytest.raises(ParseError) as info:
        parse(text, family=family, filename=name)
    return info.value


# --- lexing ----------------------------------------------------------------------------------


def test_lexer_quotes_escapes_and_columns() -> None:
    toks = tokenize('-A X -m comment --comment "a \\"b\\" c" -j  ACCEPT')
    assert [t.text for t in toks] == ["-A", "X", "-m", "comment", "--comment", 'a "b" c', "-j",
                                      "ACCEPT"]
    assert [t.column for t in toks] == [1, 4, 6, 9, 17, 27, 39, 43]
    assert [t.text for t in tokenize('a "" b"c d"e')] == ["a", "", "bc d", "e"]


def test_unterminated_quote_names_its_column() -> None:
    e = refused('*filter\n-A INPUT -m comment --comment "oops\nCOMMIT\n')
    assert (e.file, e.line, e.column) == ("rules.v4", 2, 31)


def test_comment_only_at_line_start() -> None:
    rs = restore("# a comment\n:INPUT ACCEPT [0:0]\n-A INPUT -m comment --comment #x -j DROP\n")
    assert rule_text(rs.table("filter").chain("INPUT").rules[0], family=V4) == \
        '-m comment --comment "#x" -j DROP'


# --- errors name file, line and token --------------------------------------------------------


def test_error_names_file_line_and_token() -> None:
    text = ("*filter\n:INPUT ACCEPT [0:0]\n" + "#\n" * 9 +
            "-A INPUT -p tcp --foo 1 -j ACCEPT\nCOMMIT\n")
    e = refused(text)
    assert str(e) == 'rules.v4:12: unknown option "--foo" in "-A INPUT -p tcp --foo 1 -j ACCEPT"'
    assert (e.token, e.column) == ("--foo", 17)


@pytest.mark.parametrize(("rule", "token", "words"), [
    ("-m nosuch --x 1", "nosuch", "unsupported match 'nosuch'"),
    ("-j TEE --gateway 1.2.3.4", "TEE", "unsupported target 'TEE'"),
    ("-j NOWHERE", "NOWHERE", "neither a declared chain"),
    ("-j FORWARD", "FORWARD", "built-in chain"),
    ("-g ACCEPT", "ACCEPT", "not a user-defined chain"),
    ("-p tcp --dport 65536", "65536", "65536"),
    ("-s 1.2.3.4/33", "1.2.3.4/33", "invalid mask"),
    ("-m tcp --dport 22", "tcp", "-p tcp"),
    ("-p udp -m multiport --ports 1,2 -p tcp", "-p", "multiple -p"),
    ("-m icmp6 --icmpv6-type 1", "icmp6", "not available for ipv4"),
    ("-p tcp --dport", "--dport", "requires an argument"),
    ("-p tcp ! ! --dport 1", "!", "consecutive"),
    ("-p tcp --dport 1 !", "!", "following !"),
    ("! -m tcp", "!", "before -m"),
    ("-m comment ! --comment x", "!", "cannot be inverted"),
    ("-p tcp --s 1", "--s", "ambiguous"),
    ("-o eth0", "-o", "-o with INPUT"),
    ("-m mac --mac-source 01:02:03:04:05", "01:02:03:04:05", "mac"),
    ("-j REJECT --reject-with tcp-reset", "tcp-reset", "-p tcp"),
    ("-j DNAT --to-destination 1.2.3.4", "DNAT", "nat"),
    ("-p all ! -p tcp", "-p", "multiple"),
    ("! -p 0", "0", "never match"),
    ("-t nat -j ACCEPT", "-t", "-t option"),
    ("-c 1,x -j ACCEPT", "1,x", "counters"),
    ("! -p tcp --dport 22", "tcp", "only valid with -p tcp"),
])
def test_bad_rules_are_refused_by_token(rule: str, token: str, words: str) -> None:
    with pytest.raises(ParseError) as info:
        rules(rule)
    assert info.value.token == token, info.value
    assert words in info.value.message


def test_file_level_errors() -> None:
    assert refused("-A INPUT -j ACCEPT\n").line == 1  # no *table yet
    e = refused("*filter\n-A INPUT -j ACCEPT\n")
    assert e.line == 3 and "COMMIT" in e.message
    assert "unknown table" in refused("*nosuch\nCOMMIT\n").message
    e = refused("*filter\n*nat\nCOMMIT\n")
    assert e.line == 2 and "before COMMIT" in e.message
    e = refused("*filter\n:FOO ACCEPT [0:0]\nCOMMIT\n")
    assert (e.line, e.token) == (2, "ACCEPT") and "user-defined" in e.message
    e = refused("*filter\n:INPUT QUEUE [0:0]\nCOMMIT\n")
    assert e.token == "QUEUE"
    assert "policy missing" in refused("*filter\n:INPUT\nCOMMIT\n").message
    assert "already exists" in refused("*filter\n:A - [0:0]\n:A - [0:0]\nCOMMIT\n").message
    assert "clashes" in refused("*filter\n:LOG - [0:0]\nCOMMIT\n").message
    assert "longer than 28" in refused("*filter\n:" + "A" * 29 + " - [0:0]\nCOMMIT\n").message
    e = refused("*filter\n-P FOO DROP\nCOMMIT\n")
    assert e.token == "FOO" and "does not exist" in e.message
    e = refused("*filter\n:FOO - [0:0]\n-P FOO DROP\nCOMMIT\n")
    assert "user-defined" in e.message
    e = refused("*filter\n-A INPUT -L\nCOMMIT\n")
    assert "-L" in e.message
    e = refused("*filter\n[1:x] -A INPUT\nCOMMIT\n")
    assert "counters" in e.message


def test_nothing_is_returned_when_a_later_table_fails() -> None:
    text = "*filter\n-A INPUT -j ACCEPT\nCOMMIT\n*nat\n-A INPUT -j BOGUS\nCOMMIT\n"
    e = refused(text)
    assert (e.line, e.token) == (5, "BOGUS")


# --- negation, protocols, implicit matches ---------------------------------------------------


def test_negation_before_option_and_old_style_before_value() -> None:
    assert canon("-p tcp ! --dport 22") == canon("-p tcp --dport ! 22") == \
        ["-p tcp -m tcp ! --dport 22"]
    assert canon("! -s 10.0.0.0/8") == canon("-s ! 10.0.0.0/8") == ["! -s 10.0.0.0/8"]
    assert canon("! -i eth+ -p udp ! --sport 53") == ["! -i eth+ -p udp -m udp ! --sport 53"]
    assert canon("-m iprange ! --src-range 1.1.1.1-1.1.1.9") == \
        ["-m iprange ! --src-range 1.1.1.1-1.1.1.9"]


def test_implicit_protocol_match_and_option_forms() -> None:
    assert canon("-p tcp --dport 22") == ["-p tcp -m tcp --dport 22"]
    assert canon("-m tcp --dport 1 -p 6") == ["-p tcp -m tcp --dport 1"]
    assert canon("--protocol=tcp --source=1.2.3.4 --dpo 22 --jump=ACCEPT") == \
        ["-s 1.2.3.4/32 -p tcp -m tcp --dport 22 -j ACCEPT"]
    assert canon("-ptcp -s1.2.3.4 -jACCEPT") == ["-s 1.2.3.4/32 -p tcp -j ACCEPT"]
    assert canon("-p icmp --icmp-type echo-request") == ["-p icmp -m icmp --icmp-type 8"]
    assert canon("-p ipv6-icmp --icmpv6-type ping", V6) == \
        ["-p ipv6-icmp -m icmp6 --icmpv6-type 128"]
    # Options bind to the newest module that has them; -m order is kept.
    assert canon("-p tcp --sport 1 -m comment --comment x --dport 2") == \
        ["-p tcp -m tcp --sport 1 --dport 2 -m comment --comment x"]
    assert canon("-p tcp -m tcp --sport 1 -m tcp --dport 2") == \
        ["-p tcp -m tcp --sport 1 -m tcp --dport 2"]


def test_match_everything_options_print_nothing() -> None:
    assert canon("-i + -s 0/0 -p all -j ACCEPT") == ["-j ACCEPT"]
    assert canon("! -i +") == ["! -i +"]
    assert canon("! -s 0.0.0.0/0") == ["! -s 0.0.0.0/0"]
    assert canon("-p tcp --sport :") == ["-p tcp -m tcp"]


def test_addresses() -> None:
    assert canon("-s 10.11.12.13/255.0.255.0 -d 10") == ["-s 10.0.12.0/255.0.255.0 -d 10.0.0.0/32"]
    assert canon("-s ::ffff:1.2.3.4 -d 2001:db8::1/64", V6) == \
        ["-s ::ffff:1.2.3.4/128 -d 2001:db8::/64"]
    assert format_addr(bytes(12) + b"\x01\x02\x03\x04") == "::1.2.3.4"
    assert format_addr(bytes(15) + b"\x01") == "::1"
    with pytest.raises(ParseError):
        rules("-s 1.2.3.4", V6)


def test_address_lists_expand_source_major() -> None:
    assert canon("-s 1.1.1.1,2.2.2.2 -d 3.3.3.3,4.4.4.4 -j DROP") == [
        "-s 1.1.1.1/32 -d 3.3.3.3/32 -j DROP", "-s 1.1.1.1/32 -d 4.4.4.4/32 -j DROP",
        "-s 2.2.2.2/32 -d 3.3.3.3/32 -j DROP", "-s 2.2.2.2/32 -d 4.4.4.4/32 -j DROP"]
    with pytest.raises(ParseError, match="multiple source"):
        rules("! -s 1.1.1.1,2.2.2.2")


def test_every_table_and_ipv6() -> None:
    text = ("*raw\n-A PREROUTING -j CT --notrack\nCOMMIT\n"
            "*mangle\n-A POSTROUTING -p tcp --syn -j TCPMSS --clamp-mss-to-pmtu\nCOMMIT\n"
            "*security\n-A INPUT -j ACCEPT\nCOMMIT\n"
            "*nat\n-A POSTROUTING -s fd00::/8 -j MASQUERADE\nCOMMIT\n"
            "*filter\n:INPUT DROP [0:0]\n-A INPUT -p ipv6-icmp --icmpv6-type 135 -j ACCEPT\n"
            "-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\nCOMMIT\n")
    rs = parse(text, family=V6, filename="rules.v6")
    assert list(rs.tables) == ["raw", "mangle", "security", "nat", "filter"]
    out = save(rs)
    assert "-A POSTROUTING -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -j TCPMSS " \
           "--clamp-mss-to-pmtu" in out
    assert "-A INPUT -p ipv6-icmp -m icmp6 --icmpv6-type 135 -j ACCEPT" in out
    assert parse(out, family=V6) == rs and save(parse(out, family=V6)) == out


def test_other_family_lines_are_ignored() -> None:
    assert rules("-6 -j ACCEPT") == []
    assert len(rules("-4 -j ACCEPT")) == 1


# --- targets and chains ----------------------------------------------------------------------


def test_jumps_gotos_and_targets() -> None:
    [r] = rules("-j FOO", chains=("FOO",))
    assert r.target == Target(JUMP, ChainRef("FOO"))
    [r] = rules("-g FOO", chains=("FOO",))
    assert r.target == Target(GOTO, ChainRef("FOO"))
    assert canon("-j REJECT") == ["-j REJECT --reject-with icmp-port-unreachable"]
    assert canon("-j REJECT", V6) == ["-j REJECT --reject-with icmp6-port-unreachable"]
    assert canon("-p tcp -j REJECT --reject-with tcp-rst") == \
        ["-p tcp -j REJECT --reject-with tcp-reset"]
    assert canon("-j MARK --set-mark 2/3") == ["-j MARK --set-xmark 0x2/0x3"]
    assert canon("-j MARK --or-mark 0x4000") == ["-j MARK --set-xmark 0x4000/0x4000"]
    assert canon('-j LOG --log-prefix "x: " --log-level debug') == \
        ['-j LOG --log-prefix "x: " --log-level 7']
    assert canon("-p tcp -j DNAT --to-destination 10.0.0.1:8080", table="nat",
                 chain="PREROUTING") == ["-p tcp -j DNAT --to-destination 10.0.0.1:8080"]
    assert canon("-o eth0 -j MASQUERADE", table="nat", chain="POSTROUTING") == \
        ["-o eth0 -j MASQUERADE"]


def test_rule_without_target_and_counters() -> None:
    [r] = rules("-c 2,3 -p udp")
    assert r.target is None and r.counters == Counters(2, 3)
    [r] = rules("-c 4 5")
    assert r.counters == Counters(4, 5)


def test_restore_commands() -> None:
    rs = restore(
        ":INPUT DROP [7:8]\n:A - [0:0]\n:B - [0:0]\n:C - [0:0]\n"
        "[3:4] -A INPUT -s 1.1.1.1 -j A\n-A INPUT -s 2.2.2.2 -j B\n"
        "-A INPUT -s 3.3.3.3 -j DROP\n-I INPUT 2 -s 5.5.5.5,6.6.6.6 -j ACCEPT\n"
        "-D INPUT -s 3.3.3.3 -j DROP\n-D INPUT 1\n-R INPUT 1 -s 7.7.7.7 -j RETURN\n"
        "-A A -j RETURN\n-F A\n-X C\n-N D\n-E D E\n-A E -j ACCEPT\n-A B -j E\n"
        "-P FORWARD DROP\n")
    assert save(rs, counters=True) == (
        "*filter\n:INPUT DROP [7:8]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n"
        ":A - [0:0]\n:B - [0:0]\n:E - [0:0]\n"
        "[0:0] -A INPUT -s 7.7.7.7/32 -j RETURN\n[0:0] -A INPUT -s 5.5.5.5/32 -j ACCEPT\n"
        "[0:0] -A INPUT -s 2.2.2.2/32 -j B\n[0:0] -A B -j E\n[0:0] -A E -j ACCEPT\nCOMMIT\n")
    e = refused("*filter\n:A - [0:0]\n-A INPUT -j A\n-X A\nCOMMIT\n")
    assert e.line == 4 and "jump to it" in e.message
    assert "not empty" in refused("*filter\n:A - [0:0]\n-A A -j DROP\n-X A\nCOMMIT\n").message
    e = refused("*filter\n-I INPUT 2 -j DROP\nCOMMIT\n")
    assert (e.token, e.message) == ("2", "insertion index 2 out of range (1-1)")


def test_counters_round_trip() -> None:
    rs = restore(":INPUT ACCEPT [10:20]\n[1:2] -A INPUT -p tcp -j ACCEPT\n")
    chain = rs.table("filter").chain("INPUT")
    assert chain.counters == Counters(10, 20) and chain.rules[0].counters == Counters(1, 2)
    text = save(rs, counters=True)
    assert "[1:2] -A INPUT -p tcp -j ACCEPT" in text and ":INPUT ACCEPT [10:20]" in text
    assert parse(text, family=V4) == rs
    assert "[1:2]" not in save(rs)


def test_tables_are_replaced_and_chains_ordered_like_iptables_save() -> None:
    text = ("*filter\n:Z - [0:0]\n:B - [0:0]\n-A INPUT -j Z\n-A Z -j B\nCOMMIT\n"
            "*nat\n-A POSTROUTING -o eth0 -j MASQUERADE\nCOMMIT\n")
    out = save(parse(text, family=V4))
    assert out.splitlines()[1:7] == [":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]",
                                     ":OUTPUT ACCEPT [0:0]", ":B - [0:0]", ":Z - [0:0]",
                                     "-A INPUT -j Z"]
    again = parse(text + "*filter\n-A INPUT -j DROP\nCOMMIT\n", family=V4)
    assert [c.name for c in again.table("filter").chains.values()] == ["INPUT", "FORWARD",
                                                                       "OUTPUT"]


# --- checks the kernel makes at COMMIT -------------------------------------------------------


def test_jump_loops_are_refused() -> None:
    e = refused("*filter\n:A - [0:0]\n:B - [0:0]\n-A INPUT -j A\n-A A -j B\n-A B -g A\n"
                "COMMIT\n")
    assert e.line == 6 and "A -> B -> A" in e.message


def test_hook_restrictions_follow_jumps() -> None:
    e = refused("*filter\n:A - [0:0]\n-A OUTPUT -j A\n"
                "-A A -m mac --mac-source 01:02:03:04:05:06\nCOMMIT\n")
    assert (e.line, e.token) == (4, "mac") and "OUTPUT" in e.message
    # -i/-o are checked only in built-in chains, as iptables does.
    restore(":A - [0:0]\n-A OUTPUT -j A\n-A A -i eth0\n")
    restore(":A - [0:0]\n-A INPUT -j A\n-A A -m mac --mac-source 01:02:03:04:05:06\n")
    e = refused("*nat\n:A - [0:0]\n-A PREROUTING -j A\n-A A -j MASQUERADE\nCOMMIT\n")
    assert e.line == 4 and e.token == "MASQUERADE"


# --- lowering --------------------------------------------------------------------------------


def lowered(text: str, family: Family = V4, chain: str = "INPUT") -> list:
    """The predicates of a rule's non-built-in matches."""
    [r] = rules(text, family, chain=chain)
    ctx = rule_context(r, family, "filter", chain)
    return [REGISTRY.matches[m.kind].lower(m.params, ctx) for m in r.matches
            if not REGISTRY.matches[m.kind].builtin]


def test_lowering_follows_netfilter() -> None:
    [p] = lowered("-p tcp ! --sport 1:1023 --dport 22")
    assert p == AllOf((TransportHeader(L4.TCP, evil_frag=True),
                       Not(Range(Field.SPORT, 1, 1023)), Cmp(Field.DPORT, 22)))
    assert lowered("-p icmp --icmp-type any") == [TransportHeader(L4.SMALL)]
    # ip6_tables has no type-255 wildcard.
    assert lowered("-p ipv6-icmp --icmpv6-type 255", V6) == [
        AllOf((TransportHeader(L4.SMALL), Cmp(Field.ICMPTYPE, 255)))]
    [p] = lowered("-p udp -m multiport ! --dports 53,67:68")
    assert p.preds[0] == TransportHeader(L4.PORTS) and isinstance(p.preds[1], Not)
    [p] = lowered("-m iprange --src-range 10.0.0.1-10.0.0.9")
    assert p == Range(Field.SADDR4, 0x0A000001, 0x0A000009)
    assert lowered("-m ttl --ttl-lt 0") == [Const(False)]
    assert lowered("-m hl --hl-gt 254", V6) == [Range(Field.TTL, 255, 255)]
    assert lowered("-m mac --mac-source 01:02:03:04:05:06") == [
        AllOf((EtherHeader(), Cmp(Field.SMAC, bytes.fromhex("010203040506"))))]
    assert lowered("-m addrtype --dst-type LOCAL,BROADCAST") == [
        Not(Cmp(Field.RTDST, 0, (1 << 2) | (1 << 3)))]  # (1 << the route's type) & mask
    assert lowered("-m mark ! --mark 1/3") == [Not(Cmp(Field.MARK, 1, 3))]
    assert lowered("-m comment --comment x") == [Const(True)]


def test_parse_only_matches_raise_unsupported_by_name() -> None:
    with pytest.raises(Unsupported) as info:
        lowered("-m statistic --mode random --probability 0.5")
    assert info.value.feature == "statistic"


# --- the corpus of real rulesets -------------------------------------------------------------

# Files with defects of the wild: (line, token) of each defect in order, and why.
DEFECTS: dict[str, tuple[str, list[tuple[int, str]]]] = {
    "netnet-openwrt-AA.v4.rules": (
        "a shell prompt pasted on line 1, then long lines wrapped by a terminal",
        [(1, "root@gmgt"), (24, "8.1.1:22"), (25, "168.1.1:55555"), (26, "168.1.1:55555"),
         (27, ".1.1:1194"), (28, "8.1.1:21"), (29, "8.1.1:21"), (86, "ACC"), (88, "--cts"),
         (103, "ec"), (118, "AT"), (122, "AT"), (123, "AT")]),
    "netnet-tum-i8-2016-06-27.v4.rules": (
        "MAC addresses censored as XX:XX:XX:XX:XX:XX", [(1826, "XX:XX:XX:XX:XX:XX")]),
    "netnet-tum-i8-2016-06-27.v6.rules": (
        "MAC addresses censored as XX:XX:XX:XX:XX:XX", [(2486, "XX:XX:XX:XX:XX:XX")]),
}
CENSORED = "XX:XX:XX:XX:XX:XX"


def _corpus_files() -> list[str]:
    if not CORPUS.is_dir():
        return []
    return sorted(p.name for p in [*CORPUS.glob("*.rules"), *CORPUS.glob("*.restore")])


@pytest.mark.skipif(not CORPUS.is_dir(), reason=f"ruleset corpus not found at {CORPUS}")
@pytest.mark.parametrize("name", _corpus_files())
def test_corpus_ruleset(name: str) -> None:
    """Each ruleset parses and round-trips, or fails exactly at its known defects."""
    family = V6 if ".v6." in name else V4
    lines = (CORPUS / name).read_text().splitlines()
    _, defects = DEFECTS.get(name, ("", []))
    for line, token in defects:
        with pytest.raises(ParseError) as info:
            parse("\n".join(lines), family=family, filename=name)
        assert (info.value.file, info.value.line, info.value.token) == (name, line, token)
        if token == CENSORED:
            lines = [t.replace(CENSORED, "00:00:00:00:00:00") for t in lines]
        else:
            lines[line - 1] = "# " + lines[line - 1]
    rs = parse("\n".join(lines), family=family, filename=name)
    assert rs.rule_count() > 0
    text = save(rs, counters=True)
    again = parse(text, family=family, filename="saved")
    assert again == rs
    assert save(again, counters=True) == text
