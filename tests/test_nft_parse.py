"""nftables JSON → IR (pure, no kernel): translations, helper chains for `log` + verdict, and
refusals that name the file, the JSON location and the token.

The corpus test reads the JSON of nftables' own py tests from ../shared at run time (skipped
when absent): every rule either loads or is refused by name; none crashes, and a loaded rule
keeps each of its statements.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from bpfilter.frontends.iptables.parser import parse as ipt_parse
from bpfilter.frontends.iptables.saver import save
from bpfilter.frontends.nftables import NftParseError, looks_like_json, parse
from bpfilter.ir.model import Counters, Family

V4, V6 = Family.IPV4, Family.IPV6
NFT_PY = Path(__file__).resolve().parents[1] / ".." / "shared" / "conformance" / "nftables-py"

# --- building JSON ------------------------------------------------------------------------------


def m(left: dict, right: Any, op: str = "==") -> dict:
    return {"match": {"op": op, "left": left, "right": right}}


def pl(proto: str, field: str) -> dict:
    return {"payload": {"protocol": proto, "field": field}}


def meta(key: str) -> dict:
    return {"meta": {"key": key}}


def ct(key: str) -> dict:
    return {"ct": {"key": key}}


def doc(rules: dict[str, list[list[dict]]], family: str = "inet", policy: str = "accept",
        regular: tuple[str, ...] = (), extra: list[dict] = ()) -> str:
    """A document with table `family` t, base chains named after their hook (`input`, ...)
    and `regular` chains; `rules` maps a chain to its rules' expression lists."""
    items: list[dict] = [{"metainfo": {"json_schema_version": 1}},
                         {"table": {"family": family, "name": "t", "handle": 1}}]
    handle = 1
    for name in [*rules, *(r for r in regular if r not in rules)]:
        body = {"family": family, "table": "t", "name": name, "handle": handle}
        handle += 1
        if name not in regular:
            body |= {"type": "filter", "hook": name, "prio": 0, "policy": policy}
        items.append({"chain": body})
    for name, exprs in rules.items():
        for e in exprs:
            items.append({"rule": {"family": family, "table": "t", "chain": name,
                                   "handle": handle, "expr": e}})
            handle += 1
    return json.dumps({"nftables": items + list(extra)})


def saved(text: str, family: Family = V4) -> list[str]:
    """The rule and chain lines of the translation, checked to round-trip through
    iptables-save text (what the runtime stores and `save`/`list` re-read)."""
    rs = parse(text, filename="r.json")[family]
    out = save(rs)
    assert ipt_parse(out, family=family) == rs
    return [ln for ln in out.splitlines() if ln.startswith(("-A", ":"))]


def refused(text: str) -> NftParseError:
    with pytest.raises(NftParseError) as ei:
        parse(text, filename="r.json")
    assert str(ei.value).startswith("r.json: ")
    return ei.value


# --- a Debian-style host firewall ----------------------------------------------------------------

DEBIAN = {
    "input": [
        [m(ct("state"), ["established", "related"], "in"), {"accept": None}],
        [m(ct("state"), "invalid", "in"), {"drop": None}],
        [m(meta("iif"), "lo"), {"accept": None}],
        [m(pl("tcp", "dport"), {"set": [22, 80]}), {"counter": {"packets": 7, "bytes": 420}},
         {"accept": None}],
        [m(pl("icmp", "type"), {"set": ["echo-request", "destination-unreachable"]}),
         {"accept": None}],
        [m(pl("icmpv6", "type"), {"set": ["echo-request", "nd-neighbor-solicit"]}),
         {"accept": None}],
        [{"log": {"prefix": "nft-drop: "}}, {"drop": None}],
    ],
    "forward": [],
    "output": [],
}


def test_debian_style_ruleset_both_families():
    text = doc(DEBIAN, policy="drop")
    v4 = saved(text, V4)
    assert v4 == [
        ":INPUT DROP [0:0]", ":FORWARD DROP [0:0]", ":OUTPUT DROP [0:0]", ":INPUT.10 - [0:0]",
        "-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        "-A INPUT -m conntrack --ctstate INVALID -j DROP",
        "-A INPUT -i lo -j ACCEPT",
        "-A INPUT -p tcp -m multiport --dports 22,80 -j ACCEPT",
        "-A INPUT -p icmp -m icmp --icmp-type 8 -j ACCEPT",
        "-A INPUT -p icmp -m icmp --icmp-type 3 -j ACCEPT",
        "-A INPUT -j INPUT.10",
        '-A INPUT.10 -j LOG --log-prefix "nft-drop: "',
        "-A INPUT.10 -j DROP",
    ]
    v6 = saved(text, V6)
    assert "-A INPUT -p ipv6-icmp -m icmp6 --icmpv6-type 135 -j ACCEPT" in v6
    assert not any("--icmp-type" in ln for ln in v6)
    # The counter statement's values go to the rule that counts the nft rule (restore -c).
    rs = parse(text)[V4]
    assert rs.tables["filter"].chains["INPUT"].rules[3].counters == Counters(7, 420)


def test_families_of_tables():
    rules = {"input": [[m(pl("tcp", "dport"), 22), {"accept": None}]]}
    assert set(parse(doc(rules, "ip"))) == {V4}
    assert set(parse(doc(rules, "ip6"))) == {V6}
    assert set(parse(doc(rules, "inet"))) == {V4, V6}
    assert set(parse(doc(rules, "inet"), families=(V6,))) == {V6}
    nfp = {"input": [[m(meta("nfproto"), "ipv6"), {"drop": None}]]}
    assert saved(doc(nfp), V4)[-1] == ":OUTPUT ACCEPT [0:0]"  # no rule for IPv4
    assert saved(doc(nfp), V6)[-1] == "-A INPUT -j DROP"


def test_matches_map_to_iptables_matches():
    rules = {"input": [
        [m(pl("ip", "saddr"), {"prefix": {"addr": "10.0.0.0", "len": 8}}, "!="),
         m(meta("iifname"), "eth*"), m(pl("udp", "sport"), {"range": [1000, 2000]}),
         {"accept": None}],
        [m(pl("ip", "daddr"), {"range": ["1.2.3.4", "1.2.3.9"]}), m(pl("ip", "ttl"), 3, "<"),
         m(meta("l4proto"), "tcp"), m(pl("tcp", "dport"), 1024, "<"), {"drop": None}],
        [m({"&": [pl("tcp", "flags"), ["fin", "syn", "rst", "ack"]]}, "syn"),
         m(meta("mark"), 0x10), m(meta("pkttype"), "broadcast"),
         m(ct("status"), "dnat", "in"), m(ct("status"), ["assured"], "in"), {"drop": None}],
        [m(pl("tcp", "flags"), "syn", "in"), m(ct("state"), "new", "!="), {"return": None}],
        [m({"&": [meta("mark"), 0xff]}, 1, "!="), m(ct("direction"), "reply"),
         {"continue": None}],
    ]}
    assert saved(doc(rules))[3:] == [
        "-A INPUT ! -s 10.0.0.0/8 -i eth+ -p udp -m udp --sport 1000:2000 -j ACCEPT",
        "-A INPUT -p tcp -m iprange --dst-range 1.2.3.4-1.2.3.9 -m ttl --ttl-lt 3 "
        "-m tcp --dport 0:1023 -j DROP",
        "-A INPUT -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -m mark --mark 0x10 "
        "-m pkttype --pkt-type broadcast -m conntrack --ctstate DNAT "
        "-m conntrack --ctstatus ASSURED -j DROP",
        "-A INPUT -p tcp -m tcp --tcp-flags SYN SYN -m conntrack ! --ctstate NEW -j RETURN",
        "-A INPUT -m mark ! --mark 0x1/0xff -m conntrack --ctdir REPLY",
    ]


def test_sets_expand_or_become_multiport():
    many = list(range(1, 21))
    rules = {"input": [
        [m(pl("ip", "saddr"), {"set": ["192.0.2.1", {"prefix": {"addr": "10.0.0.0", "len": 8}}]}),
         {"accept": None}],
        [m(pl("ip", "saddr"), {"set": ["192.0.2.1", {"range": ["192.0.2.5", "192.0.2.6"]}]},
           "!="), {"drop": None}],
        [m(pl("udp", "dport"), {"set": many}), {"accept": None}],
        [m(pl("tcp", "dport"), {"set": many}, "!="), {"drop": None}],
    ]}
    lines = saved(doc(rules, "ip"))[3:]
    assert lines[:3] == [
        "-A INPUT -s 192.0.2.1/32 -j ACCEPT", "-A INPUT -s 10.0.0.0/8 -j ACCEPT",
        "-A INPUT -m iprange ! --src-range 192.0.2.1-192.0.2.1 "
        "-m iprange ! --src-range 192.0.2.5-192.0.2.6 -j DROP"]
    ports = ",".join(map(str, range(1, 16)))
    assert lines[3:5] == [f"-A INPUT -p udp -m multiport --dports {ports} -j ACCEPT",
                          "-A INPUT -p udp -m multiport --dports 16,17,18,19,20 -j ACCEPT"]
    assert lines[5] == (f"-A INPUT -p tcp -m multiport ! --dports {ports} "
                        "-m multiport ! --dports 16,17,18,19,20 -j DROP")


def test_log_then_verdict_uses_one_counting_rule():
    rules = {"input": [
        [m(pl("tcp", "dport"), 23), {"log": {"prefix": "telnet ", "level": "info"}},
         {"counter": {"packets": 3, "bytes": 180}}, {"drop": None}],
        [m(pl("tcp", "dport"), 24), {"log": {"group": 5, "prefix": "g"}}, {"return": None}],
        [m(pl("tcp", "dport"), 25), {"log": None}, {"goto": {"target": "sub"}}],
        [m(pl("tcp", "dport"), 26), {"log": None}, {"jump": {"target": "sub"}}],
        [m(pl("tcp", "dport"), 27), {"log": {"prefix": "only"}}],
    ]}
    lines = saved(doc(rules, "ip", regular=("sub",)))
    body = [ln for ln in lines if ln.startswith("-A")]
    assert body == [
        "-A INPUT -p tcp -m tcp --dport 23 -j INPUT.3",
        "-A INPUT -p tcp -m tcp --dport 24 -g INPUT.4",  # return: via goto
        "-A INPUT -p tcp -m tcp --dport 25 -g INPUT.5",  # goto: via goto
        "-A INPUT -p tcp -m tcp --dport 26 -j INPUT.6",
        "-A INPUT -p tcp -m tcp --dport 27 -j LOG --log-prefix only",
        '-A INPUT.3 -j LOG --log-prefix "telnet " --log-level 6', "-A INPUT.3 -j DROP",
        "-A INPUT.4 -j NFLOG --nflog-prefix g --nflog-group 5",
        "-A INPUT.4 -j RETURN",  # entered by goto: returns from INPUT, as nft's return does
        "-A INPUT.5 -j LOG", "-A INPUT.5 -g sub",
        "-A INPUT.6 -j LOG", "-A INPUT.6 -j sub",
    ]
    rs = parse(doc(rules, "ip", regular=("sub",)))[V4]
    inp = rs.tables["filter"].chains["INPUT"]
    assert inp.rules[0].counters == Counters(3, 180)  # counted once, by the matching rule
    assert inp.rules[0].origin.text == "inet t input handle 3".replace("inet", "ip")


def test_limit_shared_by_set_elements_and_overlapping_wildcards():
    rules = {"input": [
        [m(pl("icmp", "type"), {"set": ["echo-request", "echo-reply"]}),
         {"limit": {"rate": 5, "per": "second", "burst": 10}}, {"accept": None}],
        [m(meta("iifname"), {"set": ["eth*", "eth0"]}), {"log": {"prefix": "x"}}],
    ]}
    body = [ln for ln in saved(doc(rules, "ip")) if ln.startswith("-A")]
    assert body == [
        "-A INPUT -j INPUT.2.1",
        "-A INPUT -j INPUT.3.1",
        "-A INPUT.2 -m limit --limit 5/sec --limit-burst 10 -j ACCEPT",  # one shared limit
        "-A INPUT.2.1 -p icmp -m icmp --icmp-type 8 -g INPUT.2",
        "-A INPUT.2.1 -p icmp -m icmp --icmp-type 0 -g INPUT.2",
        "-A INPUT.3 -j LOG --log-prefix x",
        "-A INPUT.3.1 -i eth+ -g INPUT.3",  # first match wins: eth0 logs once
        "-A INPUT.3.1 -i eth0 -g INPUT.3",
    ]


def test_reject_kinds_per_family():
    rules = {"input": [
        [m(pl("tcp", "dport"), 113), {"reject": {"type": "tcp reset"}}],
        [{"reject": {"type": "icmpx", "expr": "admin-prohibited"}}],
        [{"reject": {"type": "icmp", "expr": "host-unreachable"}}],
        [{"reject": None}],
    ]}
    v4 = [ln for ln in saved(doc(rules)) if ln.startswith("-A")]
    v6 = [ln for ln in saved(doc(rules), V6) if ln.startswith("-A")]
    assert v4 == ["-A INPUT -p tcp -m tcp --dport 113 -j REJECT --reject-with tcp-reset",
                  "-A INPUT -j REJECT --reject-with icmp-admin-prohibited",
                  "-A INPUT -j REJECT --reject-with icmp-host-unreachable",
                  "-A INPUT -j REJECT --reject-with icmp-port-unreachable"]
    assert v6 == ["-A INPUT -p tcp -m tcp --dport 113 -j REJECT --reject-with tcp-reset",
                  "-A INPUT -j REJECT --reject-with icmp6-adm-prohibited",
                  "-A INPUT -j REJECT --reject-with icmp6-port-unreachable"]


def test_prerouting_goes_to_mangle_and_shared_chains_follow():
    rules = {"prerouting": [[m(pl("udp", "dport"), 9), {"jump": {"target": "common"}}]],
             "input": [[{"jump": {"target": "common"}}]],
             "common": [[m(pl("ip", "saddr"), "192.0.2.9"), {"drop": None}]]}
    rs = parse(doc(rules, "ip", regular=("common",)))[V4]
    assert set(rs.tables) == {"filter", "mangle"}
    assert [r.target.kind for r in rs.tables["mangle"].chains["common"].rules] == ["DROP"]
    assert "common" in rs.tables["filter"].chains


def test_add_wrapped_input_and_detection():
    text = json.dumps({"nftables": [
        {"flush": {"ruleset": None}},
        {"add": {"table": {"family": "ip", "name": "t"}}},
        {"add": {"chain": {"family": "ip", "table": "t", "name": "input", "type": "filter",
                           "hook": "input", "prio": 0, "policy": "drop"}}},
        {"add": {"rule": {"family": "ip", "table": "t", "chain": "input",
                          "expr": [{"accept": None}]}}}]})
    assert saved(text)[-1] == "-A INPUT -j ACCEPT"
    assert looks_like_json("  {\"nftables\": []}") and not looks_like_json("*filter\n")


# --- refusals -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("exprs", "token", "where"), [
    ([m({"fib": {"flags": ["saddr", "iif"], "result": "oif"}}, False), {"drop": None}],
     "fib", "expression 1"),
    ([m(pl("ip", "saddr"), "@blocklist"), {"drop": None}], "@blocklist", "expression 1"),
    ([{"counter": "named"}, {"accept": None}], "named", "expression 1"),
    ([{"log": None}, m(pl("tcp", "dport"), 22), {"accept": None}], "match", "expression 2"),
    ([m(pl("tcp", "dport"), 22), {"masquerade": None}], "masquerade", "expression 2"),
    ([m(pl("tcp", "flags"), ["syn", "ack"], "in"), {"drop": None}], "in", "expression 1"),
    ([m(pl("tcp", "dport"), 22), {"limit": {"rate": 1, "per": "week"}}, {"drop": None}],
     "week", "expression 2"),
    ([{"log": {"prefix": "x" * 40}}, {"drop": None}], "x" * 40, "expression 1"),
    ([m(pl("udp", "dport"), 53), m(pl("tcp", "dport"), 53), {"drop": None}], "tcp",
     "expression 2"),
    ([m(pl("ip6", "saddr"), "::1"), {"drop": None}], "family", "expression 1"),
    ([{"accept": None}, {"drop": None}], "drop", "expression 2"),
])
def test_refusals_name_the_location(exprs, token, where):
    e = refused(doc({"input": [[{"counter": None}], exprs]}, "ip"))
    assert e.token == token
    assert e.location.startswith("nftables[4] rule 2 of chain ip t input (handle 3), ")
    assert e.location.endswith(where)


def test_refused_objects_and_chains():
    assert refused(doc({}, extra=[{"map": {"family": "inet", "table": "t", "name": "m",
                                           "type": "ipv4_addr", "map": "mark"}}])).token == "map"
    assert refused(doc({}, extra=[{"flowtable": {"name": "f"}}])).token == "flowtable"
    nat = json.dumps({"nftables": [
        {"table": {"family": "ip", "name": "n"}},
        {"chain": {"family": "ip", "table": "n", "name": "pre", "type": "nat",
                   "hook": "prerouting", "prio": -100}}]})
    e = refused(nat)
    assert e.token == "nat" and "chain ip n pre" in str(e)
    assert refused(doc({"input": []}, "netdev")).token == "netdev"
    raw = doc({"input": []}).replace('"prio": 0', '"prio": -300')
    assert refused(raw).token == "-300"


def test_two_base_chains_on_one_hook_are_refused():
    text = json.dumps({"nftables": [
        {"table": {"family": "inet", "name": "a"}}, {"table": {"family": "ip", "name": "b"}},
        {"chain": {"family": "inet", "table": "a", "name": "in1", "type": "filter",
                   "hook": "input", "prio": 0}},
        {"chain": {"family": "ip", "table": "b", "name": "in2", "type": "filter",
                   "hook": "input", "prio": 10}}]})
    e = refused(text)
    assert "chain inet a in1 and chain ip b in2 share hook input" in str(e)
    # Different families do not share a hook: ip6 + ip is fine.
    ok = text.replace('"family": "inet"', '"family": "ip6"')
    assert set(parse(ok)) == {V4, V6}


def test_inexact_equivalents_are_refused():
    # ip6 nexthdr reads the first header only; ip6tables -p looks past extension headers.
    e = refused(doc({"input": [[m(pl("ip6", "nexthdr"), "tcp"), {"accept": None}]]}, "ip6"))
    assert e.token == "ip6 nexthdr" and "meta l4proto" in e.message
    # A limit in a chain copied into two iptables tables would get two buckets.
    rules = {"prerouting": [[{"jump": {"target": "c"}}]], "input": [[{"jump": {"target": "c"}}]],
             "c": [[{"limit": {"rate": 1, "per": "second"}}, {"accept": None}]]}
    e = refused(doc(rules, "ip", regular=("c",)))
    assert e.token == "limit" and "counted twice" in e.message


def test_rule_error_from_the_match_parser_names_the_expression():
    e = refused(doc({"input": [[m(meta("oifname"), "lo"), {"accept": None}]]}, "ip"))
    assert "expression 1" in e.location and "INPUT" in e.message
    assert '"oifname"' in e.text


def test_not_json():
    e = refused("{nope")
    assert "not JSON" in str(e)


# --- the nftables py-test corpus ---------------------------------------------------------------

HANDLED = {"match", "counter", "limit", "log", "accept", "drop", "return", "continue", "jump",
           "goto", "reject", "vmap"}
TARGET_WORD = {"log": ("LOG", "NFLOG"), "accept": ("ACCEPT",), "drop": ("DROP",),
               "vmap": ("-j ", "-g "),
               "reject": ("REJECT",), "limit": ("-m limit",), "return": ("RETURN", "-g ")}


def _blocks(path: Path) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    title, buf = "", []
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            if buf:
                out.append((title, "\n".join(buf)))
                buf = []
            title = line[1:].strip()
        elif line.strip():
            buf.append(line)
    if buf:
        out.append((title, "\n".join(buf)))
    return out


def _header(tfile: Path) -> tuple[str, str, str | None]:
    """(chain type, hook, family) from a .t file's `:chain;type ...` and `*family;...` lines."""
    kind, hook, fam = "filter", "input", None
    if tfile.exists():
        text = tfile.read_text()
        if mt := re.search(r"^:\w+;type (\w+) hook (\w+)", text, re.M):
            kind, hook = mt.group(1), mt.group(2)
        fams = re.findall(r"^\*(\w+);", text, re.M)
        fam = next((f for f in fams if f in ("ip", "ip6", "inet")), fams[0] if fams else None)
    return kind, hook, fam


def _set_objects(tfile: Path, fam: str, body: str) -> list[dict]:
    """The named sets a .t file declares (`!name type a . b [flags interval] [timeout t];ok`)
    that the block `body` looks up, as `set` objects of table t."""
    out: list[dict] = []
    if not tfile.exists():
        return out
    for mt in re.finditer(r"^!(\w+) type ([^:;]+?)(?: flags (\w+))?(?: timeout (\w+))?;ok$",
                          tfile.read_text(), re.M):
        name, types, flags, timeout = mt.groups()
        if f'"@{name}"' not in body:
            continue
        kinds = [t.strip() for t in types.split(" . ")]
        obj: dict[str, Any] = {"family": fam, "table": "t", "name": name,
                               "type": kinds if len(kinds) > 1 else kinds[0]}
        if flags:
            obj["flags"] = [flags]
        if timeout:
            obj["timeout"] = timeout
        out.append({"set": obj})
    return out


@pytest.mark.skipif(not NFT_PY.is_dir(), reason=f"nftables py-test corpus not found at {NFT_PY} "
                    "(../shared/conformance/nftables-py)")
def test_nftables_py_corpus_loads_or_is_refused_by_name():
    counts = {"loaded": 0, "refused": 0}
    files = sorted(NFT_PY.glob("*/*.t.json"))
    assert files
    for path in files:
        kind, hook, fam = _header(path.with_suffix(""))
        fam = fam or path.parent.name
        for title, body in _blocks(path):
            try:
                exprs = json.loads(body)
            except json.JSONDecodeError:
                continue  # the corpus' own malformed-on-purpose blocks
            text = json.dumps({"nftables": [
                {"table": {"family": fam, "name": "t"}},
                *_set_objects(path.with_suffix(""), fam, body),
                {"chain": {"family": fam, "table": "t", "name": "c", "type": kind,
                           "hook": hook, "prio": 0}},
                {"chain": {"family": fam, "table": "t", "name": "x"}},
                {"rule": {"family": fam, "table": "t", "chain": "c", "handle": 2,
                          "expr": exprs}}]})
            try:
                out = parse(text, filename=str(path))
            except NftParseError as e:
                assert e.file == str(path) and e.token and e.location, (title, str(e))
                counts["refused"] += 1
                continue
            counts["loaded"] += 1
            kinds = [next(iter(x)) for x in exprs]
            assert set(kinds) <= HANDLED, title
            for rs in out.values():
                saved_text = save(rs)
                assert ipt_parse(saved_text, family=rs.family, sets=rs.sets) == rs, title
                for k in kinds:  # every statement shows in some family's translation
                    words = TARGET_WORD.get(k, ())
                    if words and rs.rule_count():
                        assert any(w in saved_text for w in words), (title, k, saved_text)
    # 298 blocks loaded before named sets and verdict maps, 351 with them.
    assert counts["loaded"] > 340 and counts["refused"] > 500, counts


# --- named sets and verdict maps ----------------------------------------------------------------


def nset(name: str, kind: Any, elem: list, flags: tuple[str, ...] = (), family: str = "inet",
         **extra: Any) -> dict:
    body = {"family": family, "table": "t", "name": name, "type": kind, "handle": 90,
            "elem": elem, **extra}
    if flags:
        body["flags"] = list(flags)
    return {"set": body}


NAMED = [
    nset("bl", "ipv4_addr", [{"prefix": {"addr": "192.0.2.0", "len": 24}}, "198.51.100.7",
                             {"range": ["203.0.113.1", "203.0.113.9"]}], ("interval",)),
    nset("hosts", "ipv4_addr", ["198.51.100.1", "198.51.100.2"]),
    nset("h6", "ipv6_addr", ["2001:db8::1"], size=100),
    nset("ports", "inet_service", [22, {"range": [8000, 8002]}], ("interval",)),
    nset("svc", ["ipv4_addr", "inet_service"], [{"concat": ["192.0.2.10", 53]}]),
    nset("nets", ["ipv4_addr", "inet_service"],
         [{"concat": [{"prefix": {"addr": "10.1.0.0", "len": 16}}, {"range": [80, 81]}]}],
         ("interval",)),
]


def test_named_sets_map_to_ipset_types():
    from bpfilter.frontends.ipset import save_set

    rs = parse(doc({"input": []}, extra=NAMED))
    v4, v6 = rs[V4].sets, rs[V6].sets
    types = {n: s.definition.type.name for n, s in v4.items()}
    assert types == {"bl": "hash:net", "hosts": "hash:ip", "ports": "bitmap:port",
                     "svc": "hash:ip,port", "nets": "hash:net,port"}
    # ipv6_addr only in IPv6, inet_service (no family) in both.
    assert set(v6) == {"h6", "ports"} and v6["h6"].definition.type.name == "hash:ip"
    assert v6["h6"].definition.maxelem == 100 and v4["ports"].definition.family is None
    members = {n: save_set(s).splitlines()[1:] for n, s in v4.items()}
    # 203.0.113.1-9: the fewest prefixes covering the range.
    assert members["bl"] == ["add bl 192.0.2.0/24", "add bl 198.51.100.7",
                             "add bl 203.0.113.1", "add bl 203.0.113.2/31",
                             "add bl 203.0.113.4/30", "add bl 203.0.113.8/31"]
    assert members["ports"] == ["add ports 22", "add ports 8000", "add ports 8001",
                                "add ports 8002"]
    # nft's port has no protocol: each element for TCP and UDP, the rule's -p picks.
    assert members["svc"] == ["add svc 192.0.2.10,tcp:53", "add svc 192.0.2.10,udp:53"]
    assert len(members["nets"]) == 4 and "add nets 10.1.0.0/16,udp:81" in members["nets"]


def test_named_set_lookups_become_set_matches():
    rules = {"input": [
        [m(pl("ip", "saddr"), "@bl"), {"counter": {"packets": 3, "bytes": 180}},
         {"drop": None}],
        [m(pl("ip", "daddr"), "@hosts", "!="), m(pl("tcp", "dport"), "@ports"),
         {"accept": None}],
        [m({"concat": [pl("ip", "daddr"), pl("udp", "dport")]}, "@svc"), {"accept": None}],
        [m(pl("udp", "sport"), "@ports", "!="), {"drop": None}],
        [m(pl("ip6", "saddr"), "@h6"), {"drop": None}],
    ]}
    text = doc(rules, extra=NAMED)
    rs = parse(text, filename="r.json")
    for fam, r in rs.items():  # what the runtime stores and re-reads, with the sets
        assert ipt_parse(save(r), family=fam, sets=r.sets) == r
    lines = [ln for ln in save(rs[V4]).splitlines() if ln.startswith("-A")]
    assert lines == [
        "-A INPUT -m set --match-set bl src -j DROP",
        "-A INPUT -p tcp -m set ! --match-set hosts dst -m set --match-set ports dst -j ACCEPT",
        "-A INPUT -p udp -m set --match-set svc dst,dst -j ACCEPT",
        "-A INPUT -p udp -m set ! --match-set ports src -j DROP"]
    assert rs[V4].tables["filter"].chains["INPUT"].rules[0].counters == Counters(3, 180)
    lines6 = [ln for ln in save(rs[V6]).splitlines() if ln.startswith("-A")]
    assert lines6 == ["-A INPUT -p udp -m set ! --match-set ports src -j DROP",
                      "-A INPUT -m set --match-set h6 src -j DROP"]


@pytest.mark.parametrize(("obj", "token"), [
    (nset("s", "ipv4_addr", [], ("timeout",)), "timeout"),
    (nset("s", "ipv4_addr", [], ("dynamic",)), "dynamic"),
    (nset("s", "ipv4_addr", [], timeout=60), "timeout"),
    (nset("s", "ipv4_addr", [], stmt=[{"counter": None}]), "stmt"),
    (nset("s", "inet_proto", ["tcp"]), "inet_proto"),
    (nset("s", "ifname", ["lo"]), "ifname"),
    (nset("s", ["ipv4_addr", "ipv4_addr"], []), "hash:ip,ip"),
    (nset("s", ["ipv4_addr", "inet_service", "ipv4_addr"], [], ("interval",)), "hash:net,port,net"),
    (nset("s", "ipv4_addr", [{"elem": {"val": "192.0.2.1", "timeout": 5}}]), "timeout"),
    (nset("s", "ipv4_addr", [{"elem": {"val": "192.0.2.1", "counter": {"packets": 1}}}]),
     "counter"),
    (nset("s", "ipv4_addr", ["0.0.0.0"]), "0.0.0.0"),
    (nset("s", "ipv4_addr", [{"prefix": {"addr": "0.0.0.0", "len": 0}}], ("interval",)), "{"),
    (nset("s" * 32, "ipv4_addr", []), "s" * 32),
])
def test_named_set_refusals_name_the_set_object(obj, token):
    e = refused(doc({"input": []}, extra=[obj]))
    assert e.token.startswith(token), e
    assert e.location.startswith("nftables[") and "(set inet t " in e.location


def test_named_set_lookup_refusals():
    def rule(expr: dict) -> NftParseError:
        return refused(doc({"input": [[expr, {"drop": None}]]}, extra=NAMED))

    assert rule(m(pl("ip", "saddr"), "@nope")).token == "@nope"
    assert rule(m(meta("iifname"), "@bl")).token == "meta iifname"
    assert rule(m(pl("ip", "saddr"), "@ports")).token == "@ports"  # wrong key type
    assert rule(m(pl("ip6", "saddr"), "@bl")).token == "@bl"
    assert rule(m(pl("tcp", "dport"), "@bl", "<")).token == "<"
    # Updating a set from the packet path.
    add = {"set": {"op": "add", "elem": pl("ip", "saddr"), "set": "@bl"}}
    e = refused(doc({"input": [[add]]}, extra=NAMED))
    assert e.token == "set" and "packet path" in e.message and e.location.endswith("expression 1")
    # One set name in two tables of one family.
    two = json.loads(doc({"input": []}, extra=NAMED[:1]))
    two["nftables"] += [{"table": {"family": "ip", "name": "u"}},
                        {"set": {**NAMED[0]["set"], "family": "ip", "table": "u"}}]
    e = refused(json.dumps(two))
    assert e.token == "bl" and e.location == "nftables[5]", e  # the second declaration


def vmap(key: dict, elems: list, counter: bool = False) -> list[dict]:
    out = [{"counter": {"packets": 0, "bytes": 0}}] if counter else []
    return [*out, {"vmap": {"key": key, "data": {"set": elems}}}]


def test_verdict_maps_become_one_rule_per_element():
    rules = {"input": [
        vmap(pl("ip", "protocol"), [["tcp", {"jump": {"target": "tc"}}], ["udp", {"accept": None}],
                                    ["icmp", {"continue": None}]]),
        [m(meta("l4proto"), "tcp"), *vmap(meta("iifname"), [["eth*", {"drop": None}],
                                                             ["lo", {"goto": {"target": "tc"}}]])],
        vmap(pl("tcp", "dport"), [[22, {"accept": None}], [{"range": [80, 90]}, {"drop": None}]],
             counter=True),
        vmap(pl("udp", "dport"), [[53, {"return": None}], [67, {"drop": None}]], counter=True),
    ]}
    lines = saved(doc(rules, "inet", regular=("tc",)))
    body = [ln for ln in lines if ln.startswith("-A")]
    assert body == [
        "-A INPUT -p tcp -j tc", "-A INPUT -p udp -j ACCEPT",
        "-A INPUT -i eth+ -p tcp -j DROP", "-A INPUT -i lo -p tcp -g tc",
        # A counter before the map counts every packet reaching it: one jumping rule, the
        # elements in a helper (entered by goto when elements return or goto).
        "-A INPUT -j INPUT.5", "-A INPUT -g INPUT.6",
        "-A INPUT.5 -p tcp -m tcp --dport 22 -j ACCEPT",
        "-A INPUT.5 -p tcp -m tcp --dport 80:90 -j DROP",
        "-A INPUT.6 -p udp -m udp --dport 53 -j RETURN",
        "-A INPUT.6 -p udp -m udp --dport 67 -j DROP"]
    # ip protocol implies IPv4: the IPv6 ruleset has no rule for it.
    v6 = [ln for ln in saved(doc(rules, "inet", regular=("tc",)), V6) if ln.startswith("-A")]
    assert v6[0] == "-A INPUT -i eth+ -p tcp -j DROP"


def test_verdict_map_refusals():
    def rule(exprs: list[dict]) -> NftParseError:
        return refused(doc({"input": [exprs]}, regular=("tc",)))

    named = [{"vmap": {"key": pl("ip", "protocol"), "data": "@vm"}}]
    assert rule(named).token == "@vm"
    mixed = vmap(pl("tcp", "dport"), [[22, {"jump": {"target": "tc"}}],
                                      [23, {"goto": {"target": "tc"}}]], counter=True)
    e = rule(mixed)
    assert e.token == "vmap" and e.location.endswith("expression 2")
    assert rule([{"log": None}, *vmap(pl("tcp", "dport"), [[22, {"accept": None}]])]).token \
        == "vmap"
    assert rule([*vmap(pl("tcp", "dport"), [[22, {"accept": None}]]), {"drop": None}]).token \
        == "drop"


def test_verdict_map_catch_all_goes_last():
    rules = {"input": [
        vmap(pl("ip", "saddr"), [["*", {"accept": None}], ["192.0.2.1", {"drop": None}]]),
        vmap(pl("tcp", "dport"), [[22, {"goto": {"target": "tc"}}], ["*", {"drop": None}]]),
    ]}
    text = doc(rules, "inet", regular=("tc",))
    assert [ln for ln in saved(text) if ln.startswith("-A")] == [
        "-A INPUT -s 192.0.2.1/32 -j DROP", "-A INPUT -j ACCEPT",
        # The key's protocol holds for the catch-all too: only TCP packets meet it.
        "-A INPUT -p tcp -m tcp --dport 22 -g tc", "-A INPUT -p tcp -j DROP"]
    # ip saddr implies IPv4: the catch-all is not an IPv6 rule.
    assert next(ln for ln in saved(text, V6) if ln.startswith("-A")) == \
        "-A INPUT -p tcp -m tcp --dport 22 -g tc"
    after_jump = vmap(pl("tcp", "dport"), [[22, {"jump": {"target": "tc"}}], ["*", {"drop": None}]])
    assert refused(doc({"input": [after_jump]}, regular=("tc",))).token == "*"


def test_nft_sets_are_replaced_by_a_restore():
    rs = parse(doc({"input": []}, extra=NAMED))
    assert all(s.replace for s in rs[V4].sets.values())
