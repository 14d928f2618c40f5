"""`bpfilter monitor`: one line per LOG/NFLOG event, like `cilium monitor` for a firewall."""

from __future__ import annotations

import datetime
import ipaddress
import json
import time
from collections.abc import Callable

from ..bpf.maps import Map
from ..bpf.ringbuf import RingBuffer
from ..compiler.logging import Event, decode
from ..ir.model import Family, Ruleset
from ..matches.values import proto_name
from ..runtime.loader import Runtime


class _Names:
    """Slot -> (chain, rule, prefix, level) for the ruleset active now (refreshed on change)."""

    def __init__(self, rt: Runtime, fam: Family) -> None:
        self.rt, self.fam = rt, fam
        self._text: str | None = None
        self._rs: Ruleset | None = None
        self._slots: dict[str, list] = {}

    def lookup(self, ev: Event) -> dict:
        from ..frontends.iptables.parser import parse

        rec = self.rt.loaded(self.fam)
        if rec is None:
            return {}
        if rec.record.text != self._text:
            self._text = rec.record.text
            self._rs = parse(self._text, family=self.fam, filename="<loaded>")
            self._slots = {t: tr.slots for t, tr in rec.record.tables.items()}
        slots = self._slots.get(ev.table, [])
        if ev.slot >= len(slots) or self._rs is None:
            return {}
        chain, n = slots[ev.slot]
        out = {"table": ev.table, "chain": chain, "rule": n}
        rule = self._rs.tables[ev.table].chains[chain].rules[n - 1]
        t = rule.target
        if t is not None:
            out["target"] = t.kind
            out["prefix"] = getattr(t.params, "prefix", "")
            if t.kind == "LOG":
                out["level"] = t.params.level
            else:
                out["group"] = getattr(t.params, "group", 0)
        return out


def _addr(raw: bytes) -> str:
    return str(ipaddress.ip_address(raw))


def event_dict(ev: Event, names: dict, wall_offset_ns: int) -> dict:
    """An event as the JSON object `monitor --json` prints."""
    when = datetime.datetime.fromtimestamp((ev.time_ns + wall_offset_ns) / 1e9,
                                           tz=datetime.UTC)
    fam = Family.IPV4 if ev.family == 4 else Family.IPV6
    d = {"time": when.isoformat(timespec="microseconds").replace("+00:00", "Z"),
         "family": fam.value, "in": ev.iif, "out": ev.oif, "src": _addr(ev.src),
         "dst": _addr(ev.dst), "proto": proto_name(ev.proto, fam), "len": ev.length}
    if ev.proto in (6, 17, 132, 136) and not ev.fragment:
        d["sport"], d["dport"] = ev.sport, ev.dport
    if ev.fragment:
        d["fragment"] = True
    d.update(names)
    return d


def event_line(d: dict) -> str:
    """An event as one human-readable line."""
    who = d.get("target", "LOG")
    head = f'{d["time"]} {who} "{d.get("prefix", "")}"'
    if "level" in d:
        head += f" level {d['level']}"
    elif "group" in d:
        head += f" group {d['group']}"
    src, dst = d["src"], d["dst"]
    if "sport" in d:
        fmt = (lambda a, p: f"[{a}]:{p}") if d["family"] == "ipv6" else (lambda a, p: f"{a}:{p}")
        src, dst = fmt(src, d["sport"]), fmt(dst, d["dport"])
    rule = f" rule {d['table']}/{d['chain']} #{d['rule']}" if "rule" in d else ""
    return (f"{head} in={d['in']} out={d['out']} {src} -> {dst} {d['proto']} "
            f"len={d['len']}{rule}")


def monitor(rt: Runtime, families: list[Family], *, as_json: bool, count: int | None,
            duration: float | None, emit: Callable[[str], None] = print) -> int:
    """Stream events until `count` events or `duration` seconds (forever when both None)."""
    rings: list[tuple[Family, Map, RingBuffer, _Names]] = []
    for fam in families:
        path = rt.log_path(fam)
        if path is None:
            continue
        m = Map.open_pinned(path)
        rings.append((fam, m, RingBuffer(m), _Names(rt, fam)))
    if not rings:
        raise ValueError("no ruleset with LOG or NFLOG rules is loaded here")
    wall_offset = time.time_ns() - time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    seen = 0
    end = None if duration is None else time.monotonic() + duration
    try:
        while (count is None or seen < count) and (end is None or time.monotonic() < end):
            for _, _, rb, names in rings:
                for raw in rb.poll(0.1 if len(rings) > 1 else 0.25):
                    ev = decode(raw)
                    d = event_dict(ev, names.lookup(ev), wall_offset)
                    emit(json.dumps(d) if as_json else event_line(d))
                    seen += 1
                    if count is not None and seen >= count:
                        return seen
    finally:
        for _, m, rb, _ in rings:
            rb.close()
            m.close()
    return seen
