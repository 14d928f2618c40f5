"""The standard targets: ACCEPT, DROP, RETURN, and jumps/gotos to user chains."""

from __future__ import annotations

from ..ir.model import ACCEPT, DROP, GOTO, JUMP, RETURN
from .registry import REGISTRY, TargetEntry

REGISTRY.add_target(TargetEntry(ACCEPT))
REGISTRY.add_target(TargetEntry(DROP))
REGISTRY.add_target(TargetEntry(RETURN))
# Jumps and gotos name a chain; the front-end builds their ChainRef parameter itself.
REGISTRY.add_target(TargetEntry(JUMP, terminal=False))
REGISTRY.add_target(TargetEntry(GOTO))
