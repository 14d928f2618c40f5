"""`bpfilter dump`: the programs as annotated assembly, with verifier statistics."""

from __future__ import annotations

import json

from ..bpf.disasm import disassemble
from ..bpf.insn import Insn, Pseudo
from ..ir.model import Ruleset
from ..runtime.loader import Runtime, compile_ruleset


def dump(rs: Ruleset, hook: str, iface: str | None, rt: Runtime | None, *,
         as_json: bool = False) -> str:
    """Annotated assembly of every program of `rs` (recompiled: the compiler is deterministic).

    With a runtime, each program also gets the kernel's statistics of the loaded copy
    (instructions the verifier processed, translated and JIT-compiled sizes).
    """
    stats = rt.program_stats(rs.family) if rt is not None else {}
    out: list[dict] = []
    for ct in compile_ruleset(rs, hook, iface):
        for chain, cp in ct.programs.items():
            keys = {r.index: r.key for r in cp.program.relocs}
            insns = list(cp.program.insns)
            for idx in keys:
                # Relocated slots hold no fd yet: tag each with its own index for the namer.
                insns[idx] = Insn(insns[idx].opcode, insns[idx].dst, Pseudo.MAP_FD, 0, idx)
            text = disassemble(
                insns, comments=cp.program.comments,
                map_name=lambda f, s, keys=keys, t=ct.table.name:
                f"map[{keys[f.imm]}.{rs.family.value}.{t}]")
            entry = {"table": ct.table.name, "chain": chain, "hook": hook,
                     "flavour": cp.flavour.name, "insns": len(cp.program.insns), "text": text}
            entry.update(stats.get((ct.table.name, chain), {}))
            out.append(entry)
    if as_json:
        return json.dumps(out, indent=2) + "\n"
    parts = []
    for p in out:
        extra = ""
        if "verified_insns" in p:
            extra = (f", verifier processed {p['verified_insns']}, translated "
                     f"{p['xlated_insns']}, JIT {p['jited_bytes']} bytes (prog id {p['prog_id']})")
        parts.append(f"# table {p['table']} chain {p['chain']} ({p['flavour']}): "
                     f"{p['insns']} instructions{extra}\n{p['text']}")
    return "\n".join(parts)
