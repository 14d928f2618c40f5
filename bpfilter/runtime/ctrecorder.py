"""The ICMP query recorder at tcx egress, beside tc ingress and XDP rulesets that read conntrack.

tc ingress and XDP programs find the kernel's entry of an ICMP query flow in a map the recorder
fills from outgoing packets (compiler/hooks/ctquery.py). Whenever a family's ruleset at such a
hook uses it, the map is pinned under the hook's directory as `ctquery_<family>` (one map for
both families, pinned once per family that uses it) and the recorder is attached first at tcx
egress of the interface, its link pinned as `link_ctquery`; each restore swaps the link's
program in place (link update) before the generation switch. The map outlives restores: what
it remembered stays valid (every pointer is checked where it is read), so a restore never
forgets an ICMP flow. When no family uses it any more, the pins go and the recorder is
detached; `flush` removes it with the hook's other links.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Hashable

from .. import netns
from ..bpf.consts import LinkFlags, ProgType
from ..bpf.link import Link
from ..bpf.maps import Map
from ..bpf.prog import Prog
from ..bpf.syscall import BpfError
from ..compiler.compiled import CompiledTable
from ..compiler.hooks.ctquery import CT_QUERY, map_spec, recorder
from ..ir.model import Family
from .state import pin_name, unlink_quiet

PREFIX = "ctquery"
LINK = "link_ctquery"


def _shape(m: Map) -> tuple:
    s = m.spec
    return s.type, s.key_size, s.value_size, s.max_entries


class RecorderSync:
    """The recorder's map for a restore (in `maps`, closed by the caller with the other shared
    maps). Construct before loading, `commit()` before the switch, `finish()` after."""

    def __init__(self, directory: str, family: Family, compiled: list[CompiledTable],
                 iface: str | None, netns_name: str | None) -> None:
        self.dir, self.iface, self.netns_name = directory, iface, netns_name
        self.pin = os.path.join(directory, pin_name(PREFIX, family.value))
        self.used = iface is not None and any(CT_QUERY in ct.maps for ct in compiled)
        self.maps: dict[Hashable, Map] = {}
        if not self.used:
            return
        want = map_spec()
        for path in self._pins():
            m = Map.open_pinned(path)
            if _shape(m) == (want.type, want.key_size, want.value_size, want.max_entries):
                self.maps[CT_QUERY] = m
                return
            m.close()
        # None, or of another shape (an older pybpfilter): start afresh.
        self._remove_all()
        self.maps[CT_QUERY] = Map.create(want)

    def _pins(self) -> list[str]:
        head = PREFIX + "_"
        return [os.path.join(self.dir, n) for n in sorted(os.listdir(self.dir))
                if n.startswith(head)]

    def _remove_all(self) -> None:
        path = os.path.join(self.dir, LINK)
        if os.path.exists(path):
            with Link.open_pinned(path) as link, contextlib.suppress(BpfError):
                link.detach()
            unlink_quiet(path)
        for p in self._pins():
            unlink_quiet(p)

    def commit(self) -> None:
        """Pin the map for this family and attach the recorder if it is not yet."""
        if not self.used:
            return
        m = self.maps[CT_QUERY]
        if not os.path.exists(self.pin):
            m.pin(self.pin)
        path = os.path.join(self.dir, LINK)
        prog = recorder()
        with Prog.load(ProgType.SCHED_CLS, prog.resolve({CT_QUERY: m.fd}), name="bpf_ctquery",
                       source=prog) as p:
            if os.path.exists(path):
                # Replaced in place with the ruleset (the map, and what it holds, stay).
                with Link.open_pinned(path) as link:
                    link.update(p.fd)
                return
            # Links bind to the caller's namespace; pins must be made back home.
            with netns.enter(self.netns_name) if self.netns_name else contextlib.nullcontext():
                assert self.iface is not None
                ifindex = socket.if_nametoindex(self.iface)
                # First at egress: the entry is recorded whatever later programs decide.
                link = Link.tcx(p.fd, ifindex, egress=True, flags=LinkFlags.BEFORE)
            with link:
                link.pin(path)

    def finish(self) -> None:
        """Unpin the family's map when its ruleset no longer uses it; detach the recorder when
        no family does."""
        if self.used:
            return
        unlink_quiet(self.pin)
        if not self._pins():
            self._remove_all()
